"""The official data pipeline re-created for benchmarks: per-image PIL transforms in workers.

The official code (DCL / IP-IRM ``utils.train_transform``) runs torchvision's PIL transforms and a
cv2 blur per image inside 4 DataLoader workers. torchvision and cv2 are not dependencies of
fastipirm, so the same PIL calls are made here directly: RandomResizedCrop (torchvision's
parameter rule, PIL bilinear resize), horizontal flip, ColorJitter with a random order of
``ImageEnhance`` brightness/contrast/saturation and an 8-bit HSV hue shift (what torchvision does
on PIL images), grayscale by ``convert("L")``, a 3x3 Gaussian (cv2's kernel, via
``ImageFilter.Kernel``), ToTensor and Normalize. It is a baseline for speed, kept faithful in the
work it does per image.
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch

from fastipirm.data.augment import CIFAR10_MEAN, CIFAR10_STD


def _require_pil():
    try:
        from PIL import Image  # noqa: F401
    except ImportError as exc:
        raise ImportError("the official-style pipeline needs Pillow (pip install pillow)") from exc


class OfficialTransform:
    """One view of ``utils.train_transform`` on a PIL image, returning a normalised CHW tensor."""

    def __init__(self, out_size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                 blur_sigma=(0.1, 2.0)):
        _require_pil()
        self.out_size, self.scale, self.ratio = out_size, scale, ratio
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.blur_p, self.blur_sigma = blur_p, blur_sigma
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def _crop_box(self, width, height):
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def _jitter(self, img):
        from PIL import Image, ImageEnhance

        b, c, s, h = self.jitter
        ops = [lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(1 - b, 1 + b)),
               lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(1 - c, 1 + c)),
               lambda im: ImageEnhance.Color(im).enhance(random.uniform(1 - s, 1 + s))]

        def hue(im):
            hsv = np.array(im.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(random.uniform(-h, h) * 255)) % 256
            return Image.fromarray(hsv, "HSV").convert("RGB")

        ops.append(hue)
        random.shuffle(ops)
        for op in ops:
            img = op(img)
        return img

    def __call__(self, img):
        from PIL import Image, ImageFilter

        img = img.resize((self.out_size, self.out_size), Image.BILINEAR,
                         box=self._crop_box(*img.size))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if random.random() < self.jitter_p:
            img = self._jitter(img)
        if random.random() < self.gray_p:
            img = img.convert("L").convert("RGB")
        if np.random.random_sample() < self.blur_p:
            sigma = random.uniform(*self.blur_sigma)
            k1 = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma ** 2))
            k1 /= k1.sum()
            img = img.filter(ImageFilter.Kernel((3, 3), np.outer(k1, k1).ravel().tolist(),
                                                scale=1))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


class OfficialPairDataset(torch.utils.data.Dataset):
    """``(view1, view2, label, index)`` per image, as the official ``STL10Pair``/``CIFAR10Pair``."""

    def __init__(self, images: np.ndarray, labels=None, **transform_kwargs):
        _require_pil()
        self.images = images
        self.labels = labels
        self.transform = OfficialTransform(**transform_kwargs)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        img = Image.fromarray(self.images[index])
        label = -1 if self.labels is None else int(self.labels[index])
        return self.transform(img), self.transform(img), label, index


def official_loader(images: np.ndarray, batch_size: int = 256, workers: int = 4, **kwargs):
    """The official training loader: shuffle, drop_last, ``workers`` processes, pinned memory."""
    return torch.utils.data.DataLoader(OfficialPairDataset(images, **kwargs),
                                       batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)


def endless(loader) -> Iterator:
    """The batches of ``loader`` epoch after epoch, as the official training loop iterates."""
    while True:
        yield from loader


def stop_workers(loader) -> None:
    """Shut down the persistent workers of a DataLoader now (not at garbage collection)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None
