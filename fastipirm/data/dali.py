"""NVIDIA DALI pipeline: the official two-view augmentation, on the GPU (or the CPU for tests).

:class:`DaliTwoViewLoader` yields ``(indices, view1, view2)`` per batch: the dataset indices
(partitions are keyed by them) and two independently augmented views, normalised, in NCHW shape
with channels-last memory (DALI writes HWC), in float32, float16 or bfloat16.

Recipe (``utils.train_transform`` of the official code, ``docs/official-ipirm.md#augmentation``),
per view and sample:
RandomResizedCrop to ``out_size`` (scale (0.08, 1), ratio (3/4, 4/3), bilinear, 10 attempts),
horizontal flip p=0.5, colour jitter (brightness/contrast/saturation 0.4, hue 0.1) with p=0.8,
grayscale p=0.2, 3x3 Gaussian blur with sigma ~ U[0.1, 2) and p=0.5, normalise (CIFAR-10 mean/std).

How the random choices map onto DALI operators (no conditionals needed):

* jitter with probability p: factors ``1 + coin * U(-0.4, 0.4)`` (and hue ``coin * U(-36, 36)``
  degrees = 0.1 of the hue circle), so a sample without jitter gets the identity;
* brightness and contrast: ``fn.brightness_contrast`` around the sample's own grayscale mean,
  which is torchvision's ``adjust_contrast`` (its order with brightness does not matter:
  ``b * (m + c (x - m))`` either way);
* saturation, hue and grayscale: ``fn.hsv`` (a YIQ colour matrix); grayscale multiplies the
  saturation by 0, which leaves ITU-R 601 luma, torchvision's grayscale;
* blur with probability p: sigma ``U[0.1, 2)`` or 0.01 (a 3x3 kernel with sigma 0.01 is exactly
  the identity).

Deviations from torchvision, documented: the four jitter operations run in a fixed order
(brightness/contrast, then hue/saturation) instead of a random order per call; intermediate
results stay in float (clamped to [0, 255] after each jitter stage) instead of being rounded to
uint8 after every step.

Order and resumption: an epoch's order is :func:`fastipirm.data.loader.epoch_permutation`
(the same as the torch pipeline for a (seed, epoch)); the pipeline is rebuilt per epoch with a
seed derived from (seed, epoch), so a run resumed at an epoch boundary gets the same batches and
the same augmentations. ``drop_last`` as the official training loader.

Sources: an in-memory uint8 array (N, H, W, 3) (STL-10, CIFAR, synthetic; ``resident=True``
keeps the whole array on the GPU and gathers batches there), or an image folder decoded by DALI
(nvJPEG on the GPU). ``device_id=None`` (``device="cpu"``) runs the same pipeline on the CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..seeding import Stream, derive_seed
from .augment import CIFAR10_MEAN, CIFAR10_STD
from .loader import epoch_permutation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_OUT_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}


def dali_available() -> tuple[bool, str]:
    """``(True, version)`` when NVIDIA DALI imports, else ``(False, reason)``."""
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        return False, (f"NVIDIA DALI is not installed ({exc}); install it with "
                       "`pip install nvidia-dali-cuda130` (or `pip install fastipirm[dali]`)")
    return True, dali.__version__


def _require_dali():
    ok, detail = dali_available()
    if not ok:
        raise ImportError(detail)


def epoch_seed(seed: int, epoch: int) -> int:
    """The DALI pipeline seed of one epoch (a pure function of the run seed and the epoch)."""
    return derive_seed(seed, epoch, Stream.DALI) & 0x7FFFFFFF      # DALI takes a 31-bit seed


def _augment_view(images, *, out_size, scale, ratio, flip_p, jitter, jitter_p, gray_p, blur_p,
                  blur_sigma, mean, std, out_dtype):
    """One augmented view of a batch of HWC uint8 images (DALI graph)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    x = fn.random_resized_crop(images, size=(out_size, out_size), random_area=scale,
                               random_aspect_ratio=ratio, num_attempts=10,
                               interp_type=types.INTERP_LINEAR)
    x = fn.flip(x, horizontal=fn.random.coin_flip(probability=flip_p))
    x = fn.cast(x, dtype=types.FLOAT)
    b, c, s, h = jitter
    apply = fn.cast(fn.random.coin_flip(probability=jitter_p), dtype=types.FLOAT)

    def factor(width):
        return 1.0 + apply * fn.random.uniform(range=(-width, width)) if width > 0 else 1.0

    brightness, contrast, saturation = factor(b), factor(c), factor(s)
    hue = apply * fn.random.uniform(range=(-360.0 * h, 360.0 * h)) if h > 0 else 0.0
    gray_mean = fn.reductions.mean(fn.hsv(x, saturation=0.0, dtype=types.FLOAT))
    x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast,
                               contrast_center=gray_mean, dtype=types.FLOAT)
    x = dmath.clamp(x, 0.0, 255.0)
    keep_colour = 1.0 - fn.cast(fn.random.coin_flip(probability=gray_p), dtype=types.FLOAT)
    x = fn.hsv(x, hue=hue, saturation=saturation * keep_colour, dtype=types.FLOAT)
    x = dmath.clamp(x, 0.0, 255.0)
    blur = fn.cast(fn.random.coin_flip(probability=blur_p), dtype=types.FLOAT)
    sigma = blur * fn.random.uniform(range=blur_sigma) + (1.0 - blur) * 0.01
    x = fn.gaussian_blur(x, window_size=3, sigma=sigma)
    return fn.crop_mirror_normalize(x, dtype=getattr(types, out_dtype), output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * v for v in std])


def dali_to_torch(tensor_list, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A DALI batch output as one torch tensor on ``device`` (a copy on the GPU, a view of the
    pipeline's buffer copied out on the CPU)."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(tensor_list.as_tensor()))
    from nvidia.dali.plugin.pytorch import feed_ndarray
    out = torch.empty(tensor_list.as_tensor().shape(), dtype=dtype, device=device)
    feed_ndarray(tensor_list, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _dcodr_positive(images, size: tuple[int, int]):
    """DCoDR's positive of each anchor (:mod:`fastipirm.data.dcodr_augment`) as a DALI graph:
    all four augmentations computed, one kept per sample by a uniform draw (no conditionals).
    Returns (anchors, positives) as float HWC in [0, 1]."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    x = fn.cast(images, dtype=types.FLOAT)
    blur = fn.gaussian_blur(x, window_size=5, sigma=1.0)
    gray_mean = fn.reductions.mean(fn.hsv(x, saturation=0.0, dtype=types.FLOAT))
    contrast = fn.brightness_contrast(x, contrast=fn.random.uniform(range=(1.8, 3.0)),
                                      contrast_center=gray_mean, dtype=types.FLOAT)
    crop = fn.cast(fn.random_resized_crop(images, size=size, random_area=(0.5, 1.0),
                                          random_aspect_ratio=(3 / 4, 4 / 3), num_attempts=10,
                                          interp_type=types.INTERP_LINEAR), dtype=types.FLOAT)
    saturation = fn.hsv(x, saturation=fn.random.uniform(range=(1.8, 3.0)), dtype=types.FLOAT)
    choice = fn.random.uniform(values=[0, 1, 2, 3], dtype=types.INT32)
    pick = [fn.cast(choice == k, dtype=types.FLOAT) for k in range(4)]
    positive = (pick[0] * blur + pick[1] * dmath.clamp(contrast, 0.0, 255.0) + pick[2] * crop
                + pick[3] * dmath.clamp(saturation, 0.0, 255.0))
    return x / 255.0, positive / 255.0


class DaliDomainLoader:
    """DCoDR's batches (:class:`fastipirm.data.domain_batches.DomainBatches`) made by DALI:
    ``(indices, anchors, positives)`` per batch of ``batches`` (the epoch's index arrays, each at
    most ``max_batch`` long), float32 NCHW in [0, 1], on ``device`` (``"cpu"``: DALI with
    ``device_id=None``). The draws come from a pipeline seed derived from (seed, epoch)."""

    def __init__(self, images: np.ndarray, *, seed: int, device="cpu",
                 num_threads: Optional[int] = None):
        _require_dali()
        self.images = images
        self.seed = int(seed)
        self.device = torch.device(device)
        self.device_id = None if self.device.type == "cpu" else (
            self.device.index if self.device.index is not None else torch.cuda.current_device())
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))

    def epoch(self, epoch: int, batches: list) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]]:
        from nvidia.dali import fn, pipeline_def, types

        size = (self.images.shape[1], self.images.shape[2])
        gpu = self.device_id is not None

        @pipeline_def(batch_size=max(len(b) for b in batches), num_threads=self.num_threads,
                      device_id=self.device_id, seed=epoch_seed(self.seed, epoch),
                      prefetch_queue_depth=1)
        def pipe():
            def source(info):
                if info.iteration >= len(batches):
                    raise StopIteration
                idx = batches[info.iteration]
                return self.images[idx], idx.astype(np.int64)

            images, idx = fn.external_source(source=source, num_outputs=2, batch=True,
                                             batch_info=True, layout=["HWC", ""],
                                             dtype=[types.UINT8, types.INT64])
            if gpu:
                images = images.gpu()
            anchors, positives = _dcodr_positive(images, size)
            return anchors, positives, idx

        p = pipe()
        p.build()
        try:
            for _ in range(len(batches)):
                a, b, idx = p.run()
                anchors = dali_to_torch(a, self.device).permute(0, 3, 1, 2)
                positives = dali_to_torch(b, self.device).permute(0, 3, 1, 2)
                indices = torch.from_numpy(np.array(idx.as_tensor()).reshape(-1).astype(np.int64))
                yield indices.to(self.device), anchors.contiguous(), positives.contiguous()
        finally:
            del p


class DaliTwoViewLoader:
    """Batches of ``(indices (B,), view1, view2)`` made by a DALI pipeline.

    Args:
        images: uint8 array (N, H, W, 3) (ignored when ``files`` is given).
        batch_size: samples per batch; ``drop_last`` drops the incomplete last batch.
        seed: the run seed: epoch order and augmentation randomness derive from (seed, epoch).
        device: ``"cpu"`` (DALI with ``device_id=None``) or ``"cuda[:k]"`` (ops on the GPU).
        dtype: float32, float16 or bfloat16 views (bfloat16 is converted from float32 in torch).
        resident: GPU only: copy the whole uint8 array to the GPU once and gather batches there.
        files: image paths for an image-folder source, decoded by DALI (nvJPEG on the GPU); the
            dataset index of ``files[k]`` is k.
        num_threads: DALI CPU worker threads.
        Remaining keyword arguments: the augmentation parameters (official defaults).
    """

    def __init__(self, images: Optional[np.ndarray], batch_size: int, *, seed: int,
                 device="cpu", dtype=torch.float32, out_size: int = 32, shuffle: bool = True,
                 drop_last: bool = True, resident: bool = False,
                 files: Optional[Sequence[str]] = None, num_threads: Optional[int] = None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
                 jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0),
                 mean=CIFAR10_MEAN, std=CIFAR10_STD):
        _require_dali()
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if files is None:
            if (images is None or images.dtype != np.uint8 or images.ndim != 4
                    or images.shape[3] != 3):
                raise ValueError("images must be a uint8 array of shape (N, H, W, 3), got "
                                 f"{None if images is None else (images.dtype, images.shape)}")
            self.num_samples = images.shape[0]
        else:
            self.num_samples = len(files)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and self.num_samples < batch_size:
            raise ValueError(f"{self.num_samples} samples cannot fill one batch of {batch_size} "
                             "with drop_last=True")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        self.device_id = None if self.device.type == "cpu" else (
            self.device.index if self.device.index is not None else torch.cuda.current_device())
        self.images = images
        self.files = list(files) if files is not None else None
        self.batch_size = int(batch_size)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.dtype = dtype
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self.aug = dict(out_size=out_size, scale=tuple(scale), ratio=tuple(ratio), flip_p=flip_p,
                        jitter=tuple(jitter), jitter_p=jitter_p, gray_p=gray_p, blur_p=blur_p,
                        blur_sigma=tuple(blur_sigma), mean=tuple(mean), std=tuple(std),
                        out_dtype=_OUT_DTYPES[dtype])
        self.resident = None
        if resident and self.device.type == "cuda" and files is None:
            self.resident = torch.from_numpy(images).to(self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self) -> torch.Tensor:
        """Dataset indices of this epoch, in batch order (truncated to full batches if
        drop_last)."""
        perm = (epoch_permutation(self.num_samples, self.seed, self.epoch) if self.shuffle
                else torch.arange(self.num_samples))
        return perm[:len(self) * self.batch_size] if self.drop_last else perm

    def _pipeline(self, order: np.ndarray):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None
        batch = self.batch_size
        num_batches = len(self)

        def batch_indices(iteration: int) -> np.ndarray:
            return order[iteration * batch:(iteration + 1) * batch]

        @pipeline_def(batch_size=batch, num_threads=self.num_threads, device_id=self.device_id,
                      seed=epoch_seed(self.seed, self.epoch), prefetch_queue_depth=2)
        def pipe():
            if self.files is not None:
                files = [self.files[i] for i in order]
                jpegs, idx = fn.readers.file(files=files, labels=[int(i) for i in order],
                                             random_shuffle=False, pad_last_batch=False,
                                             name="reader")
                images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                           output_type=types.RGB)
            else:
                def source(info):
                    if info.iteration >= num_batches:
                        raise StopIteration
                    idx = batch_indices(info.iteration)
                    if self.resident is not None:
                        data = self.resident[torch.from_numpy(idx).to(self.device)]
                    else:
                        data = self.images[idx]
                    return data, idx.astype(np.int64)

                images, idx = fn.external_source(
                    source=source, num_outputs=2, batch=True, batch_info=True,
                    layout=["HWC", ""], dtype=[types.UINT8, types.INT64],
                    device="gpu" if self.resident is not None else "cpu")
                if gpu and self.resident is None:
                    images = images.gpu()
            v1 = _augment_view(images, **self.aug)
            v2 = _augment_view(images, **self.aug)
            return v1, v2, idx

        p = pipe()
        p.build()
        return p

    def _to_torch(self, tensor_list) -> torch.Tensor:
        return dali_to_torch(tensor_list, self.device,
                             torch.float16 if self.aug["out_dtype"] == "FLOAT16"
                             else torch.float32)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.order().numpy()
        pipe = self._pipeline(order)
        try:
            for _ in range(len(self)):
                v1, v2, idx = pipe.run()
                views = []
                for v in (v1, v2):
                    t = self._to_torch(v).permute(0, 3, 1, 2)   # NHWC memory = channels_last
                    views.append(t.to(self.dtype) if t.dtype != self.dtype else t)
                indices = torch.from_numpy(np.array(idx.as_tensor()).reshape(-1).astype(np.int64))
                yield indices.to(self.device), views[0], views[1]
        finally:
            del pipe


def image_folder_files(root, split: str = "") -> tuple[list[str], np.ndarray, list[str]]:
    """Sorted image files of ``root/<split>/<class>/*`` with integer labels and the class names."""
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist "
                                f"(expected {base}/<class>/<image>)")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {base} has no class sub-folders")
    files, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((base / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(f))
                labels.append(k)
    if not files:
        raise FileNotFoundError(f"image folder {base} has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
    return files, np.asarray(labels, dtype=np.int64), classes
