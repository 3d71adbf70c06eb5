"""CL-ICA's generated data (``data.name = "latent_mixing"``): latents of a space
(:mod:`fastipirm.data.latents`) seen through a frozen invertible MLP (:mod:`fastipirm.data.mixing`).

There is no data set: every training step draws fresh pairs ``(z, z~)`` from the marginal and the
conditional and feeds the encoder ``x = g(z)``, ``x~ = g(z~)``, as the official ``main_mlp.py``.
:class:`LatentMixing` holds the space, the laws and ``g`` (built once from the run seed);
:class:`LatentPairBatches` are the training "views" of the loop: an epoch is
``clica.steps_per_epoch`` steps (the official ``--n-log-steps``), and its samples come from a
generator seeded by (run seed, epoch), so a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..seeding import Stream, derived_generator
from .latents import LatentSpace, conditional_from_code, marginal_from_code
from .mixing import build_mixing

#: the generated data sets (``data.name``) that are not image data sets
GENERATIVE = ("latent_mixing",)


class LatentMixing:
    """The data of a CL-ICA MLP-mixing run, from ``cfg.clica`` and the run seed.

    ``labels``/``images`` are None (no kNN or linear probe: the run is scored by R² and MCC against
    the true latents, :meth:`sample`).
    """

    images = None
    labels = None
    #: the raw observations g(z) are scored once for reference (how nonlinear the mixing is)
    raw_scores = True

    def __init__(self, clica, seed: int, device="cpu"):
        self.cfg, self.device = clica, torch.device(device)
        self.space = LatentSpace(clica.space, clica.n, clica.box_min, clica.box_max,
                                 clica.sphere_r)
        self.marginal, self.marginal_p = marginal_from_code(clica.m_p)
        self.conditional, self.conditional_p = conditional_from_code(clica.c_p)
        mixing = build_mixing(clica.n, clica.mixing_layers, clica.act_fct,
                              cond_samples=clica.cond_samples,
                              cond_thresh_ratio=clica.cond_thresh_ratio,
                              generator=derived_generator(seed, Stream.LATENT_MIXING))
        self.mixing = mixing.to(self.device).eval()

    def to(self, device) -> "LatentMixing":
        """Sample and mix on ``device`` from now on (in place; returns self)."""
        self.device = torch.device(device)
        self.mixing = self.mixing.to(self.device)
        return self

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, z~)`` (batch, n) on the device: anchors from the marginal, positives from the
        conditional."""
        c = self.cfg
        return self.space.sample_pair(batch, self.marginal, c.m_param, self.conditional,
                                      c.c_param, self.marginal_p, self.conditional_p,
                                      generator=generator, device=self.device)

    @torch.no_grad()
    def observe(self, z: torch.Tensor) -> torch.Tensor:
        """The observations ``g(z)``."""
        return self.mixing(z)

    @property
    def generator_device(self) -> torch.device:
        """Where the sampling generators live (the sampling runs on the device)."""
        return self.device

    def pair_batch(self, batch: int, generator: torch.Generator):
        """One training step's ``(z, g(z), g(z~))``."""
        z, zt = self.sample(batch, generator)
        return z, self.observe(z), self.observe(zt)

    def eval_batch(self, batch: int, generator: torch.Generator):
        """``(x, z)`` of ``batch`` fresh latents for the R²/MCC scores."""
        z, _ = self.sample(batch, generator)
        return self.observe(z), z


class LatentPairBatches:
    """The loop's training views of a CL-ICA run: ``len()`` steps per epoch, each
    ``(z, x, x~)`` of ``batch`` fresh positive pairs from a pair source (:class:`LatentMixing`,
    :class:`fastipirm.data.threedident.ThreeDIdentPairs`,
    :class:`fastipirm.data.kitti_masks.KittiPairs`: anything with ``device`` and
    ``pair_batch(batch, generator)``). The latents stand where image data has the samples'
    indices: they are what identifies a sample; the supervised baseline regresses on them. The
    samples of an epoch come from a generator seeded by (run seed, epoch)."""

    augment = None

    def __init__(self, data, batch: int, steps_per_epoch: int, seed: int):
        self.data, self.batch, self.steps, self.seed = data, batch, steps_per_epoch, seed

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = derived_generator(self.seed, Stream.LATENT_PAIRS, epoch,
                                device=self.data.generator_device)
        for _ in range(self.steps):
            yield self.data.pair_batch(self.batch, gen)
