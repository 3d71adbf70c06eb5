"""DCoDR (Kahana & Hoshen, ECCV 2022): the domain-wise contrastive objective plus reconstruction.

The official ``train_DCoDR`` (``docs/dcodr.md``): DCoDR-norec's batches, codes and contrastive
loss (:class:`.dcodr_norec.DCoDRNoRec`), plus ``dcodr.reconstruction_weight`` (0.3) times the
perceptual distance (:class:`fastipirm.losses.perceptual.PerceptualDistance`: pixel L1 + VGG16
features, VGG frozen) between the anchors and their reconstructions by the generator
(:class:`fastipirm.models.dcodr_generator.DCoDRGenerator`) from the L2-normalised anchor code and
the anchor's domain. The generator trains at ``dcodr.generator_lr`` and the domain embedding at
``dcodr.embedding_lr`` (param groups added to the run's Adam, so one optimiser, one StepLR and one
checkpoint entry hold them). The generator is the method's checkpoint state.

Several processes (``docs/distributed.md#dcodr``): the contrastive part as DCoDR-norec's
(local anchors against the gathered ones), the reconstruction a mean over the local anchors
(equal shares: its mean over the ranks is the global batch's), the generator wrapped in its own
``DistributedDataParallel`` so that its gradients are averaged as the encoder's.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from ..losses.perceptual import PerceptualDistance
from ..models.dcodr_generator import DCoDRGenerator
from .dcodr_norec import DCoDRNoRec


class DCoDR(DCoDRNoRec):
    name = "dcodr"
    label = "DCoDR"
    metric_names = ("contrastive", "reconstruction")

    def build_extra(self, domains: np.ndarray) -> None:
        """The generator and the perceptual distance, their Adam groups (before the StepLR)."""
        cfg, d = self.ctx.cfg, self.ctx.cfg.dcodr
        images = self.ctx.train_set.images                     # uint8 (N, H, W, 3)
        channels = getattr(self.ctx.train_set, "channels", 3)
        code_dim = getattr(self.ctx.model, "content_dim", None) or cfg.model.feature_dim
        self.generator = DCoDRGenerator(
            int(domains.max()) + 1, content_dim=code_dim, class_dim=d.embedding_dim,
            image_size=(images.shape[1], images.shape[2]), channels=channels,
            width=d.generator_width).to(self.ctx.device)
        self.perceptual = PerceptualDistance.from_file(d.vgg_path).to(self.ctx.device)
        for group in self.generator.param_groups(d.generator_lr, d.embedding_lr):
            self.ctx.optimizer.add_param_group({**group, "weight_decay": 0.0})
        self.channels = channels
        # several processes: the generator (and the domain embedding inside it) lives outside
        # the DDP-wrapped encoder; its own DDP wrapper averages its gradients over the ranks in
        # the same backward (bucketed, overlapping it) and broadcasts rank 0's initial weights
        # (docs/distributed.md#dcodr). One process: the module itself.
        self.generator_forward = self.generator
        if distributed.active():
            dev = self.ctx.device
            self.generator_forward = torch.nn.parallel.DistributedDataParallel(
                self.generator, device_ids=[dev.index] if dev.type == "cuda" else None)

    def objective(self, anchors, positives, domains):
        z, z_pos = self.codes(anchors, positives)
        contrastive = self.contrastive(z, z_pos, domains)
        with self.ctx.autocast():
            generated = self.generator_forward(z, domains)
            target = anchors[:, :1] if self.channels == 1 else anchors
            reconstruction = self.perceptual(generated.float(), target)
        loss = contrastive + self.ctx.cfg.dcodr.reconstruction_weight * reconstruction
        return loss, {"contrastive": contrastive.detach(),
                      "reconstruction": reconstruction.detach()}

    def describe(self, row: dict) -> str:
        return (f"contrastive {row['contrastive']:.4f}  reconstruction "
                f"{row['reconstruction']:.4f}")

    def state_dict(self) -> dict:
        return {**super().state_dict(),
                "generator": {k: v.cpu() for k, v in self.generator.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
