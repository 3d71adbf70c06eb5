"""The MixUp baseline of IP-IRM's MixUp runs (official ``main_mixup.py --baseline``;
``docs/official-ipirm.md#mixup``): view 1 mixed over the batch, the i-Mix loss of the mixed view-1
queries against the clean view-2 keys (:func:`fastipirm.losses.ipirm_mixup.imix_loss`), no
partitions. :func:`mixup_global_term` is also the global term of :class:`.ipirm_mixup.IPIRMMixup`.
"""
from __future__ import annotations

from .. import distributed
from ..data.mixup import mix, mixup_draws
from ..losses.ipirm_mixup import imix_loss
from .base import Method, MethodContext, TrainStep, project_batch


def mixup_global_term(ctx: MethodContext, view1, view2, *, backend=None):
    """``(L_glob, z2)``: the i-Mix loss of the batch-mixed view 1 against the clean view 2.

    ``view1``, ``view2``: the whole global batch (on every rank under DDP: the MixUp partners
    range over it). Under DDP (``docs/distributed.md#mixup``) the draws are the global batch's
    (the same generator on every rank), each rank forwards its contiguous share of the mixed
    view 1 and of view 2, the view-2 projections are gathered as keys and the loss is the mean
    over the local queries; ``z2`` is then every rank's view-2 projections (gathered, with
    gradient)."""
    lam, partner = mixup_draws(view1.shape[0], ctx.cfg.ipirm.mixup_alpha,
                               generator=ctx.generator, device=view1.device)
    if distributed.active():
        mixed, view2 = distributed.shard((mix(view1, lam, partner), view2),
                                         distributed.world_size(), distributed.rank())
        z2 = project_batch(ctx, view2)
        q = project_batch(ctx, mixed)
        keys = distributed.all_gather_grad(z2)
        rows = distributed.local_columns(q.shape[0], q.device)
        return imix_loss(q, keys, lam, partner, temperature=ctx.cfg.train.temperature,
                         backend=backend, check_values=False, rows=rows), keys
    z2 = project_batch(ctx, view2)
    q = project_batch(ctx, mix(view1, lam, partner))
    return imix_loss(q, z2, lam, partner, temperature=ctx.cfg.train.temperature,
                     backend=backend, check_values=False), z2


class MixupBaseline(Method):
    name = "mixup"
    label = "MixUp baseline"
    global_batch = True          # MixUp partners range over the global batch's images

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.backend = ctx.cfg.op.backend_or_none
        self.train_step = TrainStep(ctx, self.objective, backend=self.backend)

    def objective(self, view1, view2):
        return mixup_global_term(self.ctx, view1, view2, backend=self.backend)[0], {}

    def step(self, indices, view1, view2):
        return self.train_step(view1, view2)
