"""Data sets as one in-memory uint8 array, and the dispatcher that loads them by name.

Every sample is identified by its row index in ``ArrayDataset.images``: IP-IRM's partitions are
keyed by it, so the order of rows is part of the contract (it is the order of the published files;
see each reader's module for the layout it expects):

- ``stl10``      splits train, test, unlabeled, train+unlabeled  (:mod:`fastipirm.data.stl10`)
- ``cifar10``    splits train, test                              (:mod:`fastipirm.data.cifar`)
- ``cifar100``   splits train, test (fine labels)                (:mod:`fastipirm.data.cifar`)
- ``imagefolder``  root/<split>/<class>/*.png|jpg|jpeg           (:mod:`fastipirm.data.imagefolder`)
- ``synthetic``  embedded coloured shapes, splits train/test/val (:mod:`fastipirm.data.synthetic`)

Missing files raise ``FileNotFoundError`` and malformed ones ``ValueError``; both messages name the
file and the expected layout, so a command-line front end can print them as they are.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .cifar import load_cifar
from .imagefolder import load_image_folder
from .stl10 import NUM_CLASSES as STL10_CLASSES
from .stl10 import load_stl10
from .synthetic import load_synthetic

DATASETS = ("stl10", "cifar10", "cifar100", "imagefolder", "synthetic")


@dataclass
class ArrayDataset:
    """A whole data set in memory.

    images:      uint8 (N, H, W, 3), RGB, C-contiguous.
    labels:      int64 (N,) class indices, or None for unlabelled data. STL-10 ``train+unlabeled``
                 keeps labels for its first 5,000 rows and -1 for the unlabelled rest.
    num_classes: number of classes (0 when unlabelled).
    name:        e.g. ``"stl10/train+unlabeled"``.
    factors:     synthetic data only: every generative factor, each an (N,) array.
    """

    images: np.ndarray
    labels: Optional[np.ndarray]
    num_classes: int
    name: str
    factors: Optional[dict[str, np.ndarray]] = None

    def __post_init__(self):
        im = self.images
        if (not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4
                or im.shape[-1] != 3):
            desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"{self.name}: images must be a uint8 (N, H, W, 3) array, got {desc}")
        if not im.flags.c_contiguous:
            self.images = np.ascontiguousarray(im)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (im.shape[0],):
                raise ValueError(f"{self.name}: labels shape {self.labels.shape} does not match "
                                 f"{im.shape[0]} images")
        for key, value in (self.factors or {}).items():
            if len(value) != im.shape[0]:
                raise ValueError(f"{self.name}: factor {key!r} has {len(value)} entries for "
                                 f"{im.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.images.shape[1], self.images.shape[2]


def load_dataset(name: str, split: str, root: str = "data", *, download: bool = False,
                 **options) -> ArrayDataset:
    """Load split ``split`` of data set ``name`` into an :class:`ArrayDataset`.

    ``root`` is the folder holding the published files (see the module docstring for the layouts).
    ``download=True`` fetches and MD5-checks the published archive for stl10/cifar10/cifar100 when
    the files are missing (it needs a network; without one the error says where to put the files).
    ``options`` go to the reader: ``imagefolder`` takes ``image_size`` (default 32; None keeps the
    native size); ``synthetic`` takes ``n``, ``image_size`` (32), ``seed`` (0), ``label_factor``
    ("shape"), ``color_correlation`` (0.0), ``noise`` (0.03), ``num_colors`` (8),
    ``num_backgrounds`` (4) and ``shading`` (0.3), and ignores ``root``/``download``.
    Unknown options raise ``TypeError`` naming them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    readers = {"imagefolder": load_image_folder, "synthetic": load_synthetic}
    if name in readers:
        params = inspect.signature(readers[name]).parameters
        unknown = sorted(set(options) - {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY})
    else:
        unknown = sorted(options)
    if unknown:
        raise TypeError(f"data set {name!r} takes no option(s) {', '.join(unknown)}")

    label = f"{name}/{split}"
    if name == "stl10":
        images, labels = load_stl10(root, split, download=download)
        return ArrayDataset(images, labels, 0 if labels is None else STL10_CLASSES, label)
    if name in ("cifar10", "cifar100"):
        images, labels, num_classes = load_cifar(name, root, split, download=download)
        return ArrayDataset(images, labels, num_classes, label)
    if name == "imagefolder":
        images, labels, num_classes = load_image_folder(Path(root), split, **options)
        return ArrayDataset(images, labels, num_classes if labels is not None else 0, label)
    images, labels, num_classes, factors = load_synthetic(split, **options)
    return ArrayDataset(images, labels, num_classes, label, factors=factors)
