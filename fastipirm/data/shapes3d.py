"""Shapes3D (Burgess & Kim 2018, DeepMind) as DCoDR uses it: domain = object shape.

Published file (:data:`URL`, from https://github.com/deepmind/3d-shapes): ``3dshapes.h5``, put at
``root/3dshapes.h5`` or ``root/3dshapes/3dshapes.h5`` (the official script's place under
``$DISENTANGLEMENT_LIB_DATA``). It is an HDF5 file with two datasets:

- ``images``: uint8 (480000, 64, 64, 3), RGB;
- ``labels``: float64 (480000, 6), the factor values in the order :data:`FACTORS`: floor hue,
  wall hue, object hue (10 values each in [0, 1)), scale (8 values in [0.75, 1.25]), shape (4:
  0..3) and orientation (15 values in [-30, 30]).

The images are used as they are (already 64 x 64, as in the official preprocessing). Each factor
becomes int64 codes 0..K-1 numbering its distinct values in increasing order, computed over the
whole file (DCoDR remaps the shape the same way; its evaluation remaps the other factors so).
``labels`` is the shape. Rows keep the file order in ``all``; ``train``/``test`` are the stratified
(by shape) 90/10 split of :mod:`fastipirm.data.domain_split`, seed 2. The official
``prepare_shapes3d.py`` draws that split from an unseeded generator, so the published split cannot
be reproduced; the rule is the same. ``reduced=50000`` gives the official reduced training set
(``..._train__reduced_50K``): that many training rows drawn without replacement by the same
generator right after the split.

Loading reads the file in chunks of rows (``chunk``), so memory stays near the size of the result
(5.9 GB for the whole file). ``limit`` keeps only the first ``limit`` rows of the file before
splitting (quick experiments; the split then differs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .datasets import ArrayDataset
from .domain_split import SEED, TEST_FRACTION, check_split, factor_codes, stratified_split

__all__ = ["URL", "FILENAME", "FACTORS", "DOMAIN", "load_shapes3d"]

URL = "https://storage.googleapis.com/3d-shapes/3dshapes.h5"
FILENAME = "3dshapes.h5"
FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
DOMAIN = "shape"
_GET = f"Download {URL} (see https://github.com/deepmind/3d-shapes) into the data root."


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading 3dshapes.h5 needs h5py: pip install h5py") from None
    return h5py


def _find(root: Path) -> Path:
    tried = [root / FILENAME, root / "3dshapes" / FILENAME]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"shapes3d: missing {tried[0]} (also tried {tried[1]}). {_GET}")


def _rows(shape_codes: np.ndarray, split: str, reduced: Optional[int], seed: int) -> np.ndarray:
    if split == "all":
        return np.arange(len(shape_codes), dtype=np.int64)
    rng = np.random.RandomState(seed)
    try:
        train, test = stratified_split(shape_codes, test_fraction=TEST_FRACTION, rng=rng)
    except ValueError as exc:
        raise ValueError(f"shapes3d: {exc}") from None
    if split == "test":
        return test
    if reduced is not None:
        if not 0 < reduced <= len(train):
            raise ValueError(f"shapes3d: reduced must be in 1..{len(train)} (the training rows), "
                             f"got {reduced}")
        train = train[rng.choice(np.arange(len(train)), size=reduced, replace=False)]
    return train


def _read_rows(images, rows: np.ndarray, chunk: int, path: Path) -> np.ndarray:
    """``images[rows]`` (rows in any order) by reading contiguous chunks of the h5 dataset."""
    out = np.empty((len(rows),) + tuple(images.shape[1:]), dtype=np.uint8)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    if len(rows) == 0:
        return out
    start = int(sorted_rows[0]) // chunk * chunk
    stop = int(sorted_rows[-1]) + 1
    for s in range(start, stop, chunk):
        lo, hi = np.searchsorted(sorted_rows, [s, s + chunk])
        if lo == hi:
            continue
        try:
            block = images[s:min(s + chunk, stop)]
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read images[{s}:{s + chunk}] ({exc}); the file is "
                             "truncated or corrupt.") from None
        out[order[lo:hi]] = block[sorted_rows[lo:hi] - s]
    return out


def load_shapes3d(root: str | Path, split: str, *, reduced: Optional[int] = None,
                  limit: Optional[int] = None, chunk: int = 20000,
                  seed: int = SEED) -> ArrayDataset:
    """Shapes3D ``split`` ("train", "test" or "all"), domain = ``shape``.

    ``reduced``: for ``train`` only, the official reduced training set of that many rows (50000 in
    the DCoDR-norec scripts). ``limit``: only the first ``limit`` rows of the file. ``chunk``: rows
    read at a time. ``seed``: the split's seed.
    """
    check_split("shapes3d", split)
    if reduced is not None and split != "train":
        raise ValueError(f"shapes3d: reduced applies to the train split only, not {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"shapes3d: limit must be positive, got {limit}")
    if chunk < 1:
        raise ValueError(f"shapes3d: chunk must be positive, got {chunk}")
    path = _find(Path(root))
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc}); the download is truncated or "
                         f"corrupt. {_GET}") from None
    with handle:
        missing = [key for key in ("images", "labels") if key not in handle]
        if missing:
            raise ValueError(f"{path}: missing dataset(s) {', '.join(missing)}; 3dshapes.h5 holds "
                             f"'images' (N, 64, 64, 3) uint8 and 'labels' (N, 6) float64")
        images, labels_ds = handle["images"], handle["labels"]
        if (images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] != 3):
            raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        if (len(labels_ds.shape) != 2 or labels_ds.shape[1] != len(FACTORS)
                or labels_ds.shape[0] != images.shape[0]
                or not np.issubdtype(labels_ds.dtype, np.number)):
            raise ValueError(f"{path}: 'labels' must be numeric ({images.shape[0]}, "
                             f"{len(FACTORS)}), got {labels_ds.dtype} {labels_ds.shape}")
        n = images.shape[0] if limit is None else min(limit, images.shape[0])
        try:
            values = np.asarray(labels_ds[:n], dtype=np.float64)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read 'labels' ({exc}); the file is truncated or "
                             "corrupt.") from None
        if not np.isfinite(values).all():
            raise ValueError(f"{path}: 'labels' holds non-finite values; the file is corrupt.")
        factors = {name: factor_codes(values[:, j]) for j, name in enumerate(FACTORS)}
        rows = _rows(factors[DOMAIN], split, reduced, seed)
        pixels = _read_rows(images, rows, chunk, path)
    num_domains = int(factors[DOMAIN].max()) + 1 if n else 0
    return ArrayDataset(pixels, factors[DOMAIN][rows], num_domains, f"shapes3d/{split}",
                        factors={k: v[rows] for k, v in factors.items()},
                        domain_factor=DOMAIN, channels=3)
