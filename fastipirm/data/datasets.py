"""Data sets as one in-memory uint8 array, and the dispatcher that loads them by name.

Every sample is identified by its row index in ``ArrayDataset.images``: IP-IRM's partitions are
keyed by it, so the order of rows is part of the contract (it is the order of the published files;
see each reader's module for the layout it expects):

- ``stl10``      splits train, test, unlabeled, train+unlabeled  (:mod:`fastipirm.data.stl10`)
- ``cifar10``    splits train, test                              (:mod:`fastipirm.data.cifar`)
- ``cifar100``   splits train, test (fine labels)                (:mod:`fastipirm.data.cifar`)
- ``imagefolder``  root/<split>/<class>/*.png|jpg|jpeg           (:mod:`fastipirm.data.imagefolder`)
- ``synthetic``  embedded coloured shapes, splits train/test/val (:mod:`fastipirm.data.synthetic`)

The five DCoDR data sets (splits train, test, all; the 90/10 split stratified by the domain of
:mod:`fastipirm.data.domain_split`; ``docs/dcodr-data.md`` lists the files and every choice):

- ``shapes3d``     ``3dshapes.h5``, domain = shape           (:mod:`fastipirm.data.shapes3d`)
- ``cars3d``       ``car_*_mesh.mat``, domain = car model     (:mod:`fastipirm.data.cars3d`)
- ``smallnorb``    NORB binary files, domain = toy object     (:mod:`fastipirm.data.smallnorb`)
- ``celeba``       aligned jpgs, domain = identity            (:mod:`fastipirm.data.celeba`)
- ``edges2shoes``  pix2pix jpgs, domain = photo vs edge map   (:mod:`fastipirm.data.edges2shoes`)

Missing files raise ``FileNotFoundError`` and malformed ones ``ValueError``; both messages name the
file and the expected layout, so a command-line front end can print them as they are.
"""
from __future__ import annotations

import importlib
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

#: DCoDR data set -> (module, reader); imported on first use (the readers import this module).
DCODR_READERS = {
    "shapes3d": ("shapes3d", "load_shapes3d"),
    "cars3d": ("cars3d", "load_cars3d"),
    "smallnorb": ("smallnorb", "load_smallnorb"),
    "celeba": ("celeba", "load_celeba"),
    "edges2shoes": ("edges2shoes", "load_edges2shoes"),
}
DATASETS = ("stl10", "cifar10", "cifar100", "imagefolder", "synthetic") + tuple(DCODR_READERS)


@dataclass
class ArrayDataset:
    """A whole data set in memory.

    images:      uint8 (N, H, W, 3), RGB, C-contiguous.
    labels:      int64 (N,) class indices, or None for unlabelled data. STL-10 ``train+unlabeled``
                 keeps labels for its first 5,000 rows and -1 for the unlabelled rest.
    num_classes: number of classes (0 when unlabelled).
    name:        e.g. ``"stl10/train+unlabeled"``.
    factors:     synthetic and DCoDR data: every discrete factor of variation, each an (N,) array
                 (int64 codes 0..K-1 for the DCoDR data sets).
    domain_factor: DCoDR data: the key of ``factors`` that is the domain; ``labels`` then equals
                 that factor and ``num_classes`` is the number of domains. None otherwise.
    channels:    channels of the published images: 1 when grey images were tiled to RGB
                 (SmallNorb), 3 otherwise. ``images`` always has 3 channels.
    targets:     continuous factors, each a float (N, k) array (CelebA's landmarks), or None.
    """

    images: np.ndarray
    labels: Optional[np.ndarray]
    num_classes: int
    name: str
    factors: Optional[dict[str, np.ndarray]] = None
    domain_factor: Optional[str] = None
    channels: int = 3
    targets: Optional[dict[str, np.ndarray]] = None

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
        for kind, table in (("factor", self.factors), ("target", self.targets)):
            for key, value in (table or {}).items():
                if len(value) != im.shape[0]:
                    raise ValueError(f"{self.name}: {kind} {key!r} has {len(value)} entries for "
                                     f"{im.shape[0]} images")
        if self.domain_factor is not None and self.domain_factor not in (self.factors or {}):
            raise ValueError(f"{self.name}: domain factor {self.domain_factor!r} is not one of the "
                             f"factors {sorted(self.factors or {})}")
        if self.channels not in (1, 3):
            raise ValueError(f"{self.name}: channels must be 1 or 3, got {self.channels}")

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
    The DCoDR data sets (shapes3d, cars3d, smallnorb, celeba, edges2shoes) take the split "train",
    "test" or "all" and the keyword options of their ``load_<name>`` reader (e.g. ``limit``); they
    are never downloaded (``download`` is ignored; a missing file's error says where to get it).
    Unknown options raise ``TypeError`` naming them.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    readers = {"imagefolder": load_image_folder, "synthetic": load_synthetic}
    if name in DCODR_READERS:
        module, function = DCODR_READERS[name]
        readers[name] = getattr(importlib.import_module(f".{module}", __package__), function)
    if name in readers:
        params = inspect.signature(readers[name]).parameters
        unknown = sorted(set(options) - {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY})
    else:
        unknown = sorted(options)
    if unknown:
        raise TypeError(f"data set {name!r} takes no option(s) {', '.join(unknown)}")

    label = f"{name}/{split}"
    if name in DCODR_READERS:
        return readers[name](root, split, **options)
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
