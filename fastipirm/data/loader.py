"""Batches of (dataset index, uint8 images) from an in-memory :class:`ArrayDataset`, without
workers.

The order of an epoch is a pure function of (seed, epoch): ``torch.randperm`` under the generator
of the stream ``(seed, epoch)`` (:mod:`fastipirm.seeding`). A run resumed at an epoch boundary
therefore sees exactly the batches the uninterrupted run would have seen. As in the official loaders
(``shuffle=True, drop_last=True`` for training), the last incomplete batch is dropped when
``drop_last`` is set, so an epoch holds ``N // batch_size`` batches of the first
``batch_size * (N // batch_size)`` indices of the permutation.

Placement: with ``device`` a GPU and ``preload=True`` (default) the whole uint8 array is copied to
the device once and batches are gathered there (no host work or synchronisation per batch);
otherwise the array stays in host memory (pinned when the target is a GPU) and each batch is
gathered on the host and copied with ``non_blocking=True``. Augmentation is not done here: the
trainer applies :class:`~fastipirm.data.augment.TwoViewAugment` to the uint8 batch on its device.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..seeding import derived_generator
from .datasets import ArrayDataset


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` indices for (seed, epoch); int64 on the CPU."""
    return torch.randperm(n, generator=derived_generator(seed, epoch))


class IndexedLoader:
    """Iterate over ``dataset`` in batches of ``(indices (B,) int64, images (B, H, W, 3) uint8)``.

    Both tensors live on ``device``. ``labels`` holds the dataset's labels as an int64 tensor on
    ``device`` (None for unlabelled data), so ``loader.labels[indices]`` gives a batch's labels.
    Call :meth:`set_epoch` before iterating an epoch (the default epoch is 0).
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = True, device="cpu", preload: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"{dataset.name}: {len(dataset)} images cannot fill one batch of "
                             f"{batch_size} with drop_last=True")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.epoch = 0
        host = torch.from_numpy(dataset.images)
        on_gpu = self.device.type != "cpu"
        if on_gpu and preload:
            self.images = host.to(self.device)
        else:
            self.images = host.pin_memory() if on_gpu and torch.cuda.is_available() else host
        self.labels: Optional[torch.Tensor] = (
            None if dataset.labels is None else torch.from_numpy(dataset.labels).to(self.device))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> torch.Tensor:
        """All indices of the current epoch in iteration order (int64, CPU), before batching."""
        n = len(self.dataset)
        return epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()[: len(self) * self.batch_size]
        images_on_device = self.images.device == self.device
        if images_on_device:
            order = order.to(self.device, non_blocking=True)
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start:start + self.batch_size]
            if images_on_device:
                yield idx, self.images.index_select(0, idx)
            else:
                batch = self.images.index_select(0, idx)
                if self.device.type != "cpu":
                    batch = batch.pin_memory().to(self.device, non_blocking=True)
                    idx = idx.pin_memory().to(self.device, non_blocking=True)
                yield idx, batch
