"""DCoDR-norec (Kahana & Hoshen, ECCV 2022): the domain-wise contrastive objective alone.

The official ``train_DCoDR_norec`` (``docs/dcodr.md``): batches of contiguous same-domain blocks
(:class:`fastipirm.data.domain_batches.DomainBatches`: 4 domains x 32 anchors, one augmented
positive each), the encoder applied to the anchors and to the positives in two forward passes,
the loss :func:`fastipirm.losses.dcodr.dcodr_contrastive_loss` (same-domain negatives, cosine,
``train.temperature``), Adam with betas ``train.betas`` (official (0.5, 0.999)) and the official
StepLR (x ``dcodr.lr_gamma`` every ``dcodr.lr_step_epochs`` epochs, stepped per batch). The
scheduler's state is the method's checkpoint state. :class:`.dcodr.DCoDR` adds the reconstruction.
"""
from __future__ import annotations

import torch

from .. import distributed
from ..data.domain_batches import domain_epoch_length, domain_values
from ..losses.dcodr import dcodr_contrastive_loss
from ..models.codes import contrastive_code
from .base import Method, MethodContext, TrainStep


class DCoDRNoRec(Method):
    name = "dcodr_norec"
    label = "DCoDR-norec"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.backend = cfg.op.backend_or_none
        domains = domain_values(ctx.train_set, cfg.data.domain_factor)
        self.domains = torch.from_numpy(domains).to(ctx.device)
        self.build_extra(domains)
        d = cfg.dcodr
        steps = max(1, domain_epoch_length(domains, d.domains_per_batch, d.samples_per_domain))
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            ctx.optimizer, step_size=d.lr_step_epochs * steps, gamma=d.lr_gamma)
        self.train_step = TrainStep(ctx, self.objective, backend=self.backend)

    def build_extra(self, domains) -> None:
        """Modules the subclass adds (and their optimiser groups) before the StepLR is made."""

    def codes(self, anchors, positives):
        """Float32 codes of the anchors and of the positives (two forward passes)."""
        prep = (lambda x: x.contiguous(memory_format=torch.channels_last)) \
            if self.ctx.cfg.model.channels_last else (lambda x: x)
        with self.ctx.autocast():
            z = contrastive_code(self.ctx.forward(prep(anchors)))
            z_pos = contrastive_code(self.ctx.forward(prep(positives)))
        return z.float(), z_pos.float()

    def contrastive(self, z, z_pos, domains):
        d = self.ctx.cfg.dcodr
        return dcodr_contrastive_loss(z, z_pos, domains, temperature=self.ctx.cfg.train.temperature,
                                      domain_negatives=d.domain_negatives, positives=d.positives,
                                      backend=self.backend, check_values=False,
                                      gather=distributed.active())

    def objective(self, anchors, positives, domains):
        z, z_pos = self.codes(anchors, positives)
        return self.contrastive(z, z_pos, domains), {}

    def step(self, indices, anchors, positives):
        out = self.train_step(anchors, positives, self.domains[indices])
        self.scheduler.step()
        return out

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
