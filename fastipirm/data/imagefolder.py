"""An image folder, decoded once into one uint8 array.

Layout::

    root/<split>/<class>/**/*.png|*.jpg|*.jpeg     labelled: classes = sorted sub-folder names
    root/<split>/*.png|*.jpg|*.jpeg                unlabelled: images directly in the split folder

Class indices follow the sorted folder names (as torchvision's ``ImageFolder``); files are taken in
sorted path order, so dataset indices are stable across runs. Every image is converted to RGB and
brought to ``image_size`` x ``image_size``: the shorter side is resized to ``image_size`` with
Pillow's (antialiased) bilinear filter, then the centre square is cut (torchvision's
``Resize(s)`` + ``CenterCrop(s)``). ``image_size=None`` keeps the native size and requires all
images to share it. Needs Pillow (optional dependency).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg")


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("the 'imagefolder' data set decodes images with Pillow, which is not "
                          "installed: pip install pillow") from None
    return Image


def read_rgb(path: Path, Image, what: str = "image") -> np.ndarray:
    """One image file as uint8 RGB (H, W, 3); ``ValueError`` naming the file when Pillow cannot
    decode it (``what``: the data set's word for it, in the message)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:       # PIL's errors for corrupt files
        raise ValueError(f"{path}: cannot decode the {what} ({exc}); the file is "
                         "corrupt.") from None


def run_threads(work, n: int, workers: Optional[int] = None) -> None:
    """``work(i)`` for ``i`` in ``range(n)`` on ``workers`` threads (default: up to 8; Pillow
    decodes without the GIL), or in this thread when one suffices."""
    threads = workers if workers is not None else min(8, os.cpu_count() or 1)
    if threads > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, range(n)))
    else:
        for i in range(n):
            work(i)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in EXTENSIONS)


def load_image_folder(root: str | Path, split: str, *, image_size: Optional[int] = 32
                      ) -> tuple[np.ndarray, Optional[np.ndarray], int]:
    """Images (N, S, S, 3) uint8, int64 labels (None if unlabelled) and the number of classes (0 if
    unlabelled)."""
    Image = _pillow()
    folder = Path(root) / split
    hint = (f"imagefolder expects {folder}/<class>/<image>.png|jpg|jpeg (labelled) "
            f"or {folder}/<image>.png|jpg|jpeg (unlabelled)")
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder: {folder} is not a directory.\n{hint}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files, labels = [], []
        for index, name in enumerate(classes):
            found = _images_in(folder / name, recursive=True)
            if not found:
                raise FileNotFoundError(f"imagefolder: class folder {folder / name} holds no "
                                        f"image.\n{hint}")
            files += found
            labels += [index] * len(found)
        label_array: Optional[np.ndarray] = np.asarray(labels, dtype=np.int64)
    else:
        files, label_array = _images_in(folder, recursive=False), None
    if not files:
        raise FileNotFoundError(f"imagefolder: no image found in {folder}.\n{hint}")

    images = None
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if image_size is not None:
                    im = _resize_center_crop(im, image_size, Image)
                array = np.asarray(im, dtype=np.uint8)
        # PIL's errors for unreadable/corrupt files
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"{path}: cannot decode image ({exc}); the file is corrupt.") from None
        if images is None:
            images = np.empty((len(files),) + array.shape, dtype=np.uint8)
        elif array.shape != images.shape[1:]:
            raise ValueError(f"{path}: size {array.shape[1]}x{array.shape[0]} differs from "
                             f"{images.shape[2]}x{images.shape[1]}; pass image_size to resize")
        images[i] = array
    return images, label_array, len(classes)


def _resize_center_crop(im, size: int, Image):
    """torchvision ``Resize(size)`` (short side -> size, long side truncated) then
    ``CenterCrop(size)``."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))
