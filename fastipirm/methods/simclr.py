"""SimCLR (Chen et al., 2020): NT-Xent between two augmented views of every image.

IP-IRM's baseline (the official ``main.py --baseline``): the same network, augmentation,
optimiser and temperature, no partitions and no penalty. ``ipirm.debiased`` switches the loss to
DCL's debiased estimator with prior ``ipirm.tau_plus`` (the official ``--baseline --debiased``).
"""
from __future__ import annotations

from .. import distributed
from ..losses.simclr import debiased_nt_xent, nt_xent, nt_xent_gathered
from .base import Method, MethodContext, TrainStep, project_views


class SimCLR(Method):
    name = "simclr"
    label = "SimCLR"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.backend = ctx.cfg.op.backend_or_none
        self.train_step = TrainStep(ctx, self.objective, backend=self.backend)

    def objective(self, view1, view2):
        z1, z2 = project_views(self.ctx, view1, view2)
        ip = self.ctx.cfg.ipirm
        if distributed.active():        # the global batch's loss (docs/distributed.md)
            if ip.debiased:             # every rank: the global loss on the gathered views
                z1, z2 = distributed.all_gather_grad(z1), distributed.all_gather_grad(z2)
                return debiased_nt_xent(z1, z2, temperature=self.ctx.cfg.train.temperature,
                                        tau_plus=ip.tau_plus), {}
            return nt_xent_gathered(z1, z2, temperature=self.ctx.cfg.train.temperature,
                                    backend=self.backend, check_values=False), {}
        if ip.debiased:
            return debiased_nt_xent(z1, z2, temperature=self.ctx.cfg.train.temperature,
                                    tau_plus=ip.tau_plus), {}
        return nt_xent(z1, z2, temperature=self.ctx.cfg.train.temperature, backend=self.backend,
                       check_values=False), {}

    def step(self, indices, view1, view2):
        return self.train_step(view1, view2)
