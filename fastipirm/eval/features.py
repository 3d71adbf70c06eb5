"""Frozen features of a data set: the network in eval mode, under ``no_grad``, in dataset order."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F


def images_of(dataset) -> torch.Tensor:
    return torch.as_tensor(dataset.images)


def labels_of(dataset) -> torch.Tensor:
    if dataset.labels is None:
        raise ValueError(f"split of {getattr(dataset, 'name', 'the data set')} has no labels")
    return torch.as_tensor(dataset.labels).long()


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], dataset, *,
                     batch_size: int, device: torch.device, transform: Callable,
                     autocast: Callable = contextlib.nullcontext,
                     channels_last: bool = False, normalize: bool = True) -> torch.Tensor:
    """``encoder(transform(images))`` of every image of ``dataset`` in order, float32 (N, D);
    L2-normalised rows unless ``normalize=False``. The caller sets the encoder's mode."""
    images = images_of(dataset)
    out = []
    for b0 in range(0, images.shape[0], batch_size):
        x = transform(images[b0:b0 + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            h = encoder(x)
        h = h.flatten(1).float()
        out.append(F.normalize(h, dim=1) if normalize else h)
    return torch.cat(out)
