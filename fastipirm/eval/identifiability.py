"""CL-ICA's evaluation of a run: how well the codes identify the true latents.

As the official ``main_mlp.py``: after every logging interval (an epoch here), linear R² and MCC
(:mod:`.disentanglement`) of the codes of ``clica.eval_samples`` fresh samples against their
latents; at the end, their mean and std over ``clica.num_eval_batches`` fresh batches of
``train.batch_size``; and once, for generated data, the score of the raw observations ``g(z)``
(how nonlinear the mixing is). The samples come from the run's pair source
(:mod:`fastipirm.data.clica_sources`: fresh latents, 3DIdent's matched renderings, KITTI's
frames), each from its own seed stream (run seed, ``LATENT_EVAL``, epoch), so a resumed run
scores on the samples the uninterrupted run scored on. Images are encoded in chunks of
``eval.batch_size``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..models import eval_mode
from ..seeding import Stream, derived_generator
from .disentanglement import disentanglement_scores, scores_over_batches


class IdentifiabilityMonitor:
    """Scores of a model on the CL-ICA pair ``source``."""

    def __init__(self, cfg, source, log: Callable[[str], None] = print):
        self.cfg, self.source, self.log = cfg, source, log
        self.raw = None
        if source.raw_scores:
            self.raw = disentanglement_scores(*self._codes(None, cfg.clica.eval_samples,
                                                           self._generator(0)))
            log(f"raw observations g(z): linear R² {self.raw['r2']:.4f}, MCC "
                f"{self.raw['mcc']:.4f} (how nonlinear the mixing is)")

    def _generator(self, *tags: int) -> torch.Generator:
        return derived_generator(self.cfg.run.seed, Stream.LATENT_EVAL, *tags,
                                 device=self.source.generator_device)

    @torch.no_grad()
    def _codes(self, model, batch: int, generator: torch.Generator):
        """``(codes, z)`` of ``batch`` fresh samples (``model`` None: the observations)."""
        x, z = self.source.eval_batch(batch, generator)
        if model is None:
            return x.flatten(1), z
        chunk = self.cfg.eval.batch_size if x.dim() > 2 else x.shape[0]
        with eval_mode(model):
            return torch.cat([model(x[i:i + chunk]).float()
                              for i in range(0, x.shape[0], chunk)]), z

    def scores(self, model, epoch: int) -> dict:
        """``r2`` and ``mcc`` after ``epoch`` (1-based)."""
        return disentanglement_scores(*self._codes(model, self.cfg.clica.eval_samples,
                                                   self._generator(epoch)))

    def final(self, model) -> dict:
        """``r2``, ``r2_std``, ``mcc``, ``mcc_std`` over the fresh batches, ``eval_batches``,
        and the raw observations' ``raw_r2``, ``raw_mcc``."""
        c, batch = self.cfg.clica, self.cfg.train.batch_size
        gen = self._generator(0, 1)
        res = scores_over_batches(lambda: self._codes(model, batch, gen), c.num_eval_batches)
        raw = self.raw or {"r2": None, "mcc": None}
        self.log(f"final over {c.num_eval_batches} fresh batches of {batch}: linear R² "
                 f"{res['r2_mean']:.4f} ± {res['r2_std']:.4f}, MCC {res['mcc_mean']:.4f} ± "
                 f"{res['mcc_std']:.4f}" + ("" if self.raw is None else
                                            f" (raw observations: {raw['r2']:.4f}, "
                                            f"{raw['mcc']:.4f})"))
        return {"r2": res["r2_mean"], "r2_std": res["r2_std"], "mcc": res["mcc_mean"],
                "mcc_std": res["mcc_std"], "eval_batches": res["n_batches"],
                "raw_r2": raw["r2"], "raw_mcc": raw["mcc"]}
