"""CL-ICA's supervised baseline (the official ``main_mlp.py`` trains it before the unsupervised
part unless ``--only-unsupervised``; ``--only-supervised`` alone): the encoder of
:mod:`.clica` regresses the true latents, ``MSE(f(g(z)), z)``, on the same fresh samples and is
scored the same way (an upper reference for R² and MCC). The latents come in the first slot of
the training batches (:class:`fastipirm.data.LatentPairBatches`).
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, MethodContext, TrainStep


class CLICASupervised(Method):
    name = "clica_supervised"
    label = "CL-ICA supervised"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.train_step = TrainStep(ctx, self.objective)

    def objective(self, z, x):
        with self.ctx.autocast():
            h = self.ctx.forward(x)
        return F.mse_loss(h.float(), z), {}

    def step(self, latents, view1, view2):
        return self.train_step(latents, view1)
