"""The training views: ``(indices, view1, view2)`` batches of the pretraining split, per epoch or
endlessly, from the batched torch pipeline or from NVIDIA DALI.

Both pipelines visit the same dataset indices in the same order for a (seed, epoch)
(:func:`fastipirm.data.loader.epoch_permutation`, full batches only), so a run resumed at an epoch
boundary sees the batches of the uninterrupted run. The torch pipeline augments each uint8 batch
on its device with :class:`~fastipirm.data.augment.TwoViewAugment`, drawing from one generator
(``generator``) whose state the trainer checkpoints; DALI derives its randomness from (seed,
epoch). The trainer, the step benchmark and the loader benchmark all iterate this class.

Several processes (``docs/distributed.md#data-order``): with ``shard=(rank, world)`` every rank
walks the same global batches and yields its contiguous share; the torch pipeline draws the
whole global batch's augmentation parameters (so every rank's generator stays in step) and makes
the views of the share only. :class:`RankShares` gives the other training views (DCoDR's domain
batches, CL-ICA's pairs) the same interface by slicing the global batch.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..distributed import shard as rank_share
from ..distributed import share_rows
from .augment import TwoViewAugment
from .datasets import ArrayDataset
from .loader import IndexedLoader

PIPELINES = ("auto", "torch", "dali")


def choose_pipeline(name: str, device) -> str:
    """``auto`` is DALI on a GPU when DALI is installed, else torch; other names are kept."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; expected one of {', '.join(PIPELINES)}")
    if name != "auto":
        return name
    from .dali import dali_available
    return "dali" if torch.device(device).type == "cuda" and dali_available()[0] else "torch"


class TwoViewBatches:
    """Two augmented views of every batch of ``dataset`` (shuffled, incomplete batch dropped).

    Args:
        dataset: the in-memory pretraining split (uint8 NHWC images).
        batch_size: samples per batch.
        seed: the run seed (epoch order; DALI's augmentation seeds).
        device: where the views are made and returned.
        pipeline: ``"torch"``, ``"dali"`` or ``"auto"`` (:func:`choose_pipeline`).
        out_size, scale: RandomResizedCrop output size and scale range.
        generator: the torch pipeline's augmentation generator (a new unseeded one if None).
        shard: ``(rank, world)``: yield this rank's contiguous share of every global batch of
            ``batch_size`` (which ``world`` must divide; DALI makes the whole batch and slices
            it); None: the whole batch.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, seed: int, device,
                 pipeline: str = "torch", out_size: int = 32, scale=(0.08, 1.0),
                 generator: Optional[torch.Generator] = None,
                 shard: Optional[tuple[int, int]] = None):
        self.device = torch.device(device)
        self.shard = shard
        self.rows = None if shard is None else share_rows(batch_size, *shard)
        self.pipeline = choose_pipeline(pipeline, self.device)
        self.augment = TwoViewAugment(out_size=out_size, scale=scale).to(self.device)
        self.generator = generator if generator is not None else torch.Generator(self.device)
        self.dali = None
        if self.pipeline == "dali":
            from .dali import DaliTwoViewLoader, dali_available
            ok, why = dali_available()
            if not ok:
                raise ImportError(why)
            self.dali = DaliTwoViewLoader(dataset.images, batch_size, seed=seed,
                                          device=self.device, out_size=out_size, scale=scale,
                                          shuffle=True, drop_last=True,
                                          resident=self.device.type == "cuda")
        self.loader = None if self.dali is not None else IndexedLoader(
            dataset, batch_size, seed=seed, shuffle=True, drop_last=True, device=self.device)

    def __len__(self) -> int:
        return len(self.dali if self.dali is not None else self.loader)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches ``(indices, view1, view2)`` of one epoch."""
        if self.dali is not None:
            self.dali.set_epoch(epoch)
            for batch in self.dali:
                yield batch if self.shard is None else rank_share(batch, self.shard[1],
                                                                  self.shard[0])
            return
        self.loader.set_epoch(epoch)
        for indices, images in self.loader:
            v1, v2 = self.augment(images.to(self.device, non_blocking=True), self.generator,
                                  rows=self.rows)
            yield (indices if self.rows is None else indices[self.rows]), v1, v2

    def forever(self, start_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]]:
        """Epoch after epoch without end (benchmarks)."""
        epoch = start_epoch
        while True:
            yield from self.epoch(epoch)
            epoch += 1


class RankShares:
    """This rank's contiguous share of every batch of ``views`` (training views whose
    ``epoch(e)`` yields tuples of global batches): every rank makes the whole batch and keeps its
    share. Other attributes (``augment``, ...) are those of ``views``."""

    def __init__(self, views, rank: int, world: int):
        self.views, self.rank, self.world = views, rank, world

    def __len__(self) -> int:
        return len(self.views)

    def __getattr__(self, name: str):
        return getattr(self.views, name)

    def epoch(self, epoch: int) -> Iterator[tuple]:
        for batch in self.views.epoch(epoch):
            yield rank_share(batch, self.world, self.rank)
