"""The official SimCLR two-view augmentation as batched torch ops
(``docs/official-ipirm.md#augmentation``).

Official ``train_transform`` (DCL / IP-IRM), applied independently to each view of each image::

    RandomResizedCrop(32)                       scale (0.08, 1), ratio (3/4, 4/3), bilinear
    RandomHorizontalFlip(0.5)
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(0.2)
    GaussianBlur: p=0.5, 3x3 kernel, sigma ~ U[0.1, 2.0), reflect-101 border (cv2 default)
    ToTensor, Normalize(CIFAR-10 mean, std)

Here the whole batch is transformed at once on the device holding it; every random parameter is
drawn per sample as a tensor (no per-image Python, no host synchronisation):

- **RandomResizedCrop**: torchvision's rule exactly in distribution: 10 tries of (area fraction
  ~ U(scale), log aspect ~ U(log ratio)), each rounded to integer w, h; the first try that fits is
  taken at a uniform integer offset; if none fits, the central crop clamped to the ratio range. All
  10 tries are drawn for every sample and the first valid one is selected with ``argmax``. The crop
  is resampled with PIL's bilinear filter (the official pipeline resizes PIL images): a triangle
  filter whose support widens with the downscaling factor (antialiasing), as two per-sample
  resampling matrices (out x H, out x W), so crop + resize is two batched matmuls.
- **Flip** is folded into the horizontal resampling matrix (its rows reversed).
- **ColorJitter**: factors b, c, s ~ U[0.6, 1.4], h ~ U[-0.1, 0.1] and a random order of the four
  ops per sample (torchvision draws ``randperm(4)`` per call). Brightness, contrast and saturation
  are all blends ``clamp(f*x + (1-f)*y, 0, 1)`` with y = 0, the mean of the grayscale image, or the
  grayscale image; hue rotates H in HSV space. A sample's order is executed as: its (up to three)
  blends before hue, hue once on the whole batch, its blends after hue; an absent blend is f = 1,
  which is the identity. Samples without jitter (p = 0.2) keep f = 1 and skip hue.
- **Grayscale**: ITU-R 601-2 luma (0.299, 0.587, 0.114) copied to the three channels.
- **Blur**: the separable 3-tap Gaussian of cv2 (``exp(-x^2 / 2 sigma^2)`` at x = -1, 0, 1,
  normalised) with a per-sample sigma, reflect-101 padding; unblurred samples get the kernel
  (0, 1, 0).

Deviations from the official per-image PIL/cv2 code (all numerical, none in distribution):
intermediate results stay float32 in [0, 1] instead of being rounded to uint8 after the resize,
after each jitter op and after the blur; PIL's HSV conversion is 8-bit, ours is float
(torchvision's tensor formulas); the random streams are torch's, so individual draws differ.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_LUMA = (0.299, 0.587, 0.114)
_CROP_TRIES = 10


def _uniform(shape, lo, hi, generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=generator, device=device)


def _to_float_nchw(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def _grayscale(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def sample_crop_boxes(n: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), *,
                      generator: Optional[torch.Generator] = None,
                      device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``RandomResizedCrop.get_params`` for ``n`` samples at once: int64 (top, left, h, w), each
    (n,).

    Same distribution as torchvision: up to 10 tries with area ~ U(scale) * H * W and
    log(aspect) ~ U(log ratio), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)),
    top ~ U{0..H-h}, left ~ U{0..W-w} for the first try with 0 < w <= W and 0 < h <= H; otherwise
    the central crop whose aspect is clamped to ``ratio``.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand((4, n, _CROP_TRIES), generator=generator, device=device, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)   # first valid try (0 if none)
    pick = lambda t: t.gather(1, first).squeeze(1)            # noqa: E731
    w, h = pick(w), pick(h)
    top = torch.floor(pick(u[2]) * (height - h + 1))
    left = torch.floor(pick(u[3]) * (width - w + 1))
    # fallback: central crop, aspect clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    found = ok.any(dim=1)
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return top.long(), left.long(), h.long(), w.long()


def bilinear_resample_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int,
                             flip: Optional[Tensor] = None) -> Tensor:
    """Per-sample (n, out_size, in_size) matrix resizing pixels [start, start+length) to out_size.

    PIL's bilinear ``resize`` (what torchvision applies to PIL images): output pixel o has centre
    c = start + (o + 0.5) * length / out_size; input pixel i gets weight
    max(0, 1 - |i + 0.5 - c| / max(1, length / out_size)) if it lies inside the crop, and each row
    is normalised to sum 1. Rows are reversed where ``flip`` is set (a horizontal flip of the
    output).
    """
    dtype = torch.float32
    scale = length.to(dtype) / out_size                                        # (n,)
    support = torch.clamp(scale, min=1.0)
    o = torch.arange(out_size, device=start.device, dtype=dtype)
    centre = start.to(dtype)[:, None] + (o[None, :] + 0.5) * scale[:, None]    # (n, out)
    i = torch.arange(in_size, device=start.device, dtype=dtype)
    weight = torch.clamp(1.0 - (i[None, None, :] + 0.5 - centre[:, :, None]).abs()
                         / support[:, None, None], min=0.0)
    inside = (i[None, :] >= start[:, None]) & (i[None, :] < (start + length)[:, None])  # (n, in)
    weight = weight * inside[:, None, :]
    weight = weight / weight.sum(dim=2, keepdim=True)
    if flip is not None:
        weight = torch.where(flip[:, None, None], weight.flip(1), weight)
    return weight


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """Float RGB in [0, 1] (n, 3, H, W) -> HSV with hue in [0, 1) (torchvision's tensor
    formulas)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    grey = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    sat = chroma / torch.where(grey, ones, maxc)
    safe = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, sat, maxc), dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # (R, G, B) for sectors 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    table = torch.stack((torch.stack((v, q, p, p, t, v)), torch.stack((t, v, v, q, p, p)),
                         torch.stack((p, p, t, v, v, q))))                  # (3, 6, n, H, W)
    return (table.gather(1, sector[None, None].expand(3, 1, *sector.shape))
            .squeeze(1).transpose(0, 1))


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each sample by ``shift`` (n,) turns (torchvision ``adjust_hue``)."""
    hsv = _rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)
    return _hsv_to_rgb(torch.cat((hue.unsqueeze(1), hsv[:, 1:]), dim=1))


def gaussian_blur3(x: Tensor, sigma: Tensor, apply: Tensor) -> Tensor:
    """cv2.GaussianBlur(ksize=(3, 3), sigma) per sample where ``apply``; reflect-101 borders."""
    side = torch.exp(-0.5 / (sigma * sigma))
    side = torch.where(apply, side / (1.0 + 2.0 * side), torch.zeros_like(side)).to(x.dtype)
    centre = 1.0 - 2.0 * side
    side, centre = side[:, None, None, None], centre[:, None, None, None]
    pad = F.pad(x, (1, 1, 0, 0), mode="reflect")
    x = centre * x + side * (pad[..., :-2] + pad[..., 2:])
    pad = F.pad(x, (0, 0, 1, 1), mode="reflect")
    return centre * x + side * (pad[..., :-2, :] + pad[..., 2:, :])


class TwoViewAugment(torch.nn.Module):
    """Two independent draws of the official SimCLR ``train_transform`` for a uint8 NHWC batch.

    ``forward(images, generator)`` returns (view1, view2), each float32 (N, 3, out_size, out_size),
    normalised, on the device of ``images``. ``view(images, generator)`` gives one view. With a
    ``generator`` (preferably on the images' device) the result is a pure function of its state.
    ``rows`` (a slice of the batch, e.g. one rank's share): the parameters are drawn for the
    whole batch, as without it, and only those rows are made, so the result is those rows of the
    whole batch's views and the generator ends in the same state.
    """

    def __init__(self, out_size: int = 32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_p: float = 0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 gray_p: float = 0.2, blur_p: float = 0.5, blur_sigma=(0.1, 2.0), mean=CIFAR10_MEAN,
                 std=CIFAR10_STD):
        super().__init__()
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError("need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                             f"got {scale}, {ratio}")
        b, c, s, h = jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise ValueError("jitter (brightness, contrast, saturation, hue) needs b, c, s >= 0 "
                             f"and 0 <= hue <= 0.5, got {jitter}")
        self.out_size = int(out_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip_p, self.jitter_p, self.gray_p, self.blur_p = flip_p, jitter_p, gray_p, blur_p
        # torchvision: brightness/contrast/saturation factor ~ U[max(0, 1 - v), 1 + v];
        # hue ~ U[-h, h]
        self.jitter_ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c),
                              (max(0.0, 1 - s), 1 + s), (-h, h))
        self.blur_sigma = tuple(blur_sigma)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip_p={self.flip_p}, jitter_ranges={self.jitter_ranges}, "
                f"jitter_p={self.jitter_p}, gray_p={self.gray_p}, "
                f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma}")

    @torch.no_grad()
    def forward(self, images: Tensor, generator: Optional[torch.Generator] = None,
                rows: Optional[slice] = None) -> tuple[Tensor, Tensor]:
        n = images.shape[0]
        x = _to_float_nchw(images if rows is None else images[rows])
        return self._view(x, generator, n, rows), self._view(x, generator, n, rows)

    @torch.no_grad()
    def view(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self._view(_to_float_nchw(images), generator)

    def eval_transform(self, images: Tensor) -> Tensor:
        """The test transform with this module's mean/std (no resize)."""
        return eval_transform(images, self.mean, self.std)

    def sample_params(self, n: int, height: int, width: int,
                      generator: Optional[torch.Generator] = None,
                      device=None) -> dict[str, Tensor]:
        """All random parameters of one view of ``n`` samples (drawn in a fixed order), on
        ``device``."""
        gdev = generator.device if generator is not None else device
        top, left, h, w = sample_crop_boxes(n, height, width, self.scale, self.ratio,
                                            generator=generator, device=gdev)
        u = torch.rand((4, n), generator=generator, device=gdev)
        flip, jitter_on, gray, blur_on = (u[0] < self.flip_p, u[1] < self.jitter_p,
                                          u[2] < self.gray_p, u[3] < self.blur_p)
        # uniform permutation of the 4 ops
        order = torch.rand((n, 4), generator=generator, device=gdev).argsort(dim=1)
        factors = torch.stack([_uniform(n, lo, hi, generator, gdev)
                               for lo, hi in self.jitter_ranges], dim=1)
        sigma = _uniform(n, *self.blur_sigma, generator, gdev)
        params = dict(top=top, left=left, height=h, width=w, flip=flip, jitter=jitter_on,
                      order=order, factors=factors, gray=gray, blur=blur_on, sigma=sigma)
        if device is not None and torch.device(gdev) != torch.device(device):
            params = {k: v.to(device, non_blocking=True) for k, v in params.items()}
        return params

    def apply(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """One view from float NCHW images in [0, 1] and parameters from :meth:`sample_params`."""
        n, _, height, width = x.shape
        wy = bilinear_resample_matrix(p["top"], p["height"], height, self.out_size)
        wx = bilinear_resample_matrix(p["left"], p["width"], width, self.out_size, flip=p["flip"])
        # (n, 3, out, out)
        x = torch.matmul(torch.matmul(wy[:, None], x), wx[:, None].transpose(-1, -2))
        x = self._color_jitter(x, p["jitter"], p["order"], p["factors"])
        x = torch.where(p["gray"][:, None, None, None], _grayscale(x).expand_as(x), x)
        x = gaussian_blur3(x, p["sigma"], p["blur"])
        mean, std = (self.mean.to(x.device, non_blocking=True),
                     self.std.to(x.device, non_blocking=True))
        return ((x - mean) / std).contiguous()

    def _view(self, x: Tensor, generator: Optional[torch.Generator], n: Optional[int] = None,
              rows: Optional[slice] = None) -> Tensor:
        """One view of ``x`` (``rows`` of a batch of ``n``: the whole batch's draws, those rows')."""
        _, _, height, width = x.shape
        params = self.sample_params(x.shape[0] if n is None else n, height, width, generator,
                                    device=x.device)
        if rows is not None:
            params = {k: v[rows] for k, v in params.items()}
        return self.apply(x, params)

    @staticmethod
    def _color_jitter(x: Tensor, active: Tensor, order: Tensor, factors: Tensor) -> Tensor:
        """ColorJitter with a per-sample op order. Ops: 0 brightness, 1 contrast, 2 saturation,
        3 hue.

        ``order`` (n, 4) is a permutation per sample, ``factors`` (n, 4) the four factors,
        ``active`` (n,) whether the jitter is applied at all. Six blend slots (three before the hue
        position, three after) plus one hue pass reproduce every order; unused slots blend with
        f = 1.
        """
        hue_pos = (order == 3).to(torch.int64).argmax(dim=1)                       # (n,)
        one = torch.ones_like(factors[:, 0])
        for before in (True, False):
            for step in range(3):
                pos = torch.full_like(hue_pos, step) if before else hue_pos + 1 + step
                valid = active & ((pos < hue_pos) if before else (pos <= 3))
                # never hue where valid
                op = order.gather(1, pos.clamp(max=3)[:, None]).squeeze(1)
                f = torch.where(valid, factors.gather(1, op.clamp(max=2)[:, None]).squeeze(1), one)
                f = f.to(x.dtype)[:, None, None, None]
                gray = _grayscale(x)
                target = torch.where((op == 1)[:, None, None, None],
                                     gray.mean(dim=(2, 3), keepdim=True),
                                     torch.where((op == 2)[:, None, None, None], gray,
                                                 torch.zeros_like(gray)))
                x = (f * x + (1.0 - f) * target).clamp_(0.0, 1.0)
            if before:
                x = torch.where(active[:, None, None, None],
                                adjust_hue(x, factors[:, 3].to(x.dtype)), x)
        return x


def eval_transform(images: Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Tensor:
    """The official ``test_transform``: ToTensor + Normalize, no resize. uint8 NHWC -> float32
    NCHW."""
    x = _to_float_nchw(images)
    mean = (torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            .to(x.device, non_blocking=True))
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    return ((x - mean) / std).contiguous()
