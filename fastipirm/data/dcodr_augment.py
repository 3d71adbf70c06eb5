"""DCoDR's positive views (official ``main.py`` ``pos_transforms``), batched on the device.

Each positive is its anchor with **one** augmentation drawn uniformly from four (never
composed):

0. Gaussian blur, kernel 5, sigma 1 (torchvision ``GaussianBlur(5, sigma=(1, 1))``: separable,
   reflect padding);
1. high contrast: blend with the mean grey level, factor ~ U[1.8, 3]
   (``ColorJitter(contrast=(1.8, 3))``);
2. ``RandomResizedCrop`` to the image size, scale (0.5, 1), ratio (3/4, 4/3), bilinear
   (the official resizes to 64, the size of its data);
3. high saturation: blend with the grey image, factor ~ U[1.8, 3]
   (``ColorJitter(saturation=(1.8, 3))``).

Inputs and outputs are float (N, 3, H, W) in [0, 1]; no mean/std normalisation (the official
feeds [0, 1] images). Grey images stored as three equal channels stay grey (the official averages
its grey positives back to one channel and tiles them again for the encoder: the same images).
All four are computed for the whole batch and selected per sample, so nothing is read back to the
host. The official augments uint8 PIL images on CPU workers; here the values are not quantised to
8 bits (``docs/dcodr.md#deviations``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import _grayscale, bilinear_resample_matrix, sample_crop_boxes

__all__ = ["POSITIVE_AUGMENTATIONS", "dcodr_positive_views", "gaussian_blur5"]

POSITIVE_AUGMENTATIONS = ("blur", "contrast", "crop", "saturation")
_FACTOR_RANGE = (1.8, 3.0)
_CROP_SCALE = (0.5, 1.0)


def gaussian_blur5(x: Tensor, sigma: float = 1.0) -> Tensor:
    """torchvision's ``gaussian_blur`` with kernel 5: a normalised separable 5-tap Gaussian,
    reflect padding."""
    t = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def dcodr_positive_views(x: Tensor, generator: Optional[torch.Generator] = None, *,
                         choice: Optional[Tensor] = None) -> Tensor:
    """One positive per anchor of ``x`` (float (N, 3, H, W) in [0, 1]); ``choice`` (N,) int in
    0..3 forces the augmentation of each sample (default: uniform draws)."""
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected float images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    n, _, h, w = x.shape
    dev = x.device
    if choice is None:
        choice = torch.randint(0, 4, (n,), generator=generator, device=dev)
    lo, hi = _FACTOR_RANGE
    f = (lo + (hi - lo) * torch.rand(n, 2, generator=generator, device=dev)).to(x.dtype)
    top, left, ch, cw = sample_crop_boxes(n, h, w, _CROP_SCALE, (3 / 4, 4 / 3),
                                          generator=generator, device=dev)
    gray = _grayscale(x)
    contrast = (f[:, 0, None, None, None] * x + (1 - f[:, 0, None, None, None])
                * gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    saturation = (f[:, 1, None, None, None] * x + (1 - f[:, 1, None, None, None]) * gray
                  ).clamp(0, 1)
    wy = bilinear_resample_matrix(top, ch, h, h).to(x.dtype)
    wx = bilinear_resample_matrix(left, cw, w, w).to(x.dtype)
    crop = torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))
    views = torch.stack([gaussian_blur5(x), contrast, crop, saturation])    # (4, N, 3, H, W)
    pick = choice.view(1, n, 1, 1, 1).expand(1, n, *x.shape[1:])
    return views.gather(0, pick).squeeze(0).contiguous()
