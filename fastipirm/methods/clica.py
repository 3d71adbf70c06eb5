"""CL-ICA (Zimmermann et al., ICML 2021): InfoNCE recovers the latents of the data.

The MLP-mixing experiment of the official ``main_mlp.py`` (``docs/clica.md``): every step draws
fresh latent pairs ``(z, z~)`` (:mod:`fastipirm.data.latent_mixing`), the encoder maps their
observations ``g(z)``, ``g(z~)`` to codes ``h``, ``h~``, and the loss is CL-ICA's InfoNCE
(:func:`fastipirm.losses.clica_infonce`: every anchor, itself included, is a negative), with the
loop's Adam. On 3DIdent and KITTI Masks the pairs are renderings and frames
(:mod:`fastipirm.data.clica_sources`); with 3DIdent's periodic parametrisation the loss is the
L_p InfoNCE of the non-periodic code dimensions plus the dot-product InfoNCE of the periodic
ones, as the official ``main_3dident.py``. The run's evaluation scores the codes against the
true latents (linear R², MCC: :mod:`fastipirm.eval.identifiability`). No state of its own: the
data's streams are functions of (seed, epoch), so the base class's empty state, log part and
summary serve.
"""
from __future__ import annotations

from .. import distributed
from ..losses.clica import clica_infonce, clica_infonce_gathered
from .base import Method, MethodContext, TrainStep


class CLICA(Method):
    name = "clica"
    label = "CL-ICA"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.backend = ctx.cfg.op.backend_or_none
        self.periodic = ctx.cfg.clica.periodic_dims(ctx.cfg.data.name)
        self.train_step = TrainStep(ctx, self.objective, backend=self.backend)

    def objective(self, x, x_pos):
        with self.ctx.autocast():
            h, h_pos = self.ctx.forward(x), self.ctx.forward(x_pos)
        cfg = self.ctx.cfg
        h, h_pos = h.float(), h_pos.float()
        k = h.shape[1] - self.periodic
        kw = dict(temperature=cfg.train.temperature, backend=self.backend, check_values=False)
        # under DDP: local anchors against the anchors of every rank (docs/distributed.md)
        infonce = clica_infonce_gathered if distributed.active() else clica_infonce
        loss = infonce(h[:, :k], h_pos[:, :k], p=cfg.clica.p, **kw)
        if self.periodic:       # 3DIdent's periodic latents: the dot product on their sphere
            loss = loss + infonce(h[:, k:], h_pos[:, k:], p=0, **kw)
        return loss, {}

    def step(self, indices, view1, view2):
        return self.train_step(view1, view2)

