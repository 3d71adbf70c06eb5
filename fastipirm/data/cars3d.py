"""Cars3D (Reed et al., NeurIPS 2015 "Deep Visual Analogy-Making") as DCoDR uses it.

Published files: ``nips2015-analogy-data.tar.gz`` (:data:`URL`; the disentanglement_lib
instructions fetch the same archive). Its ``data/cars/`` folder holds one MATLAB file per car
model, ``car_<id>_mesh.mat`` (183 of them), each with the variable

- ``im``: uint8 (128, 128, 3, 24, 4): height, width, RGB, 24 azimuths, 4 elevations

(and ``mask``, unused). The folder is looked for at ``root/cars`` (the official script's
``$DISENTANGLEMENT_LIB_DATA/cars``), ``root/data/cars`` (the extracted archive) or ``root``.

Preprocessing (official ``prepare_cars3d.py`` through disentanglement_lib's ``Cars3D``): every
view is shrunk to 64 x 64 with Pillow's Lanczos filter (``thumbnail``), and the rows are ordered
``row = elevation * 24 * C + azimuth * C + car`` with ``C`` the number of car files (183). Car
numbers follow the sorted file names here; disentanglement_lib numbers the files in directory
listing order, which depends on the file system, so which physical car carries which number may
differ from an official run -- the rows of each number and the split are the same.

Factors (int64): ``car`` (the domain, 0..C-1), ``elevation`` (0..3), ``azimuth`` (0..23) and
``pose = elevation * 24 + azimuth`` (0..95), the single 96-way pose attribute DCoDR evaluates
(its ``contents``). ``train``/``test``: the official split, ``train_test_split(np.arange(N),
stratify=car, test_size=0.1)`` after ``np.random.seed(2)``, reproduced exactly by
:mod:`fastipirm.data.domain_split` (15,811 / 1,757 rows for the full data; rows in the official
npz order).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import ArrayDataset
from .domain_split import SEED, check_split, split_rows

__all__ = ["URL", "ELEVATIONS", "AZIMUTHS", "FACTORS", "DOMAIN", "car_files", "load_cars3d"]

URL = "http://www.scottreed.info/files/nips2015-analogy-data.tar.gz"
ELEVATIONS = 4
AZIMUTHS = 24
SIDE = 64
FACTORS = ("car", "elevation", "azimuth", "pose")
DOMAIN = "car"
_GET = (f"Download {URL} and extract it under the data root (its data/cars/ folder holds the "
        "183 car_*_mesh.mat files).")


def car_files(root: str | Path) -> list[Path]:
    """The car ``.mat`` files in car-number order (sorted names)."""
    root = Path(root)
    for folder in (root / "cars", root / "data" / "cars", root):
        files = sorted(folder.glob("*.mat")) if folder.is_dir() else []
        if files:
            return files
    raise FileNotFoundError(f"cars3d: no car_*_mesh.mat file in {root / 'cars'}, "
                            f"{root / 'data' / 'cars'} or {root}. {_GET}")


def _read_views(path: Path) -> np.ndarray:
    """The (4 elevations, 24 azimuths, H, W, 3) uint8 views of one car file."""
    from scipy.io import loadmat
    try:
        data = loadmat(path, variable_names=["im"])
    except Exception as exc:  # scipy raises several types for a damaged file
        raise ValueError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc}); the "
                         "file is corrupt.") from None
    if "im" not in data:
        raise ValueError(f"{path}: no variable 'im' (a Cars3D file holds im: uint8 "
                         f"(128, 128, 3, {AZIMUTHS}, {ELEVATIONS}))")
    im = data["im"]
    if im.ndim != 5 or im.shape[2:] != (3, AZIMUTHS, ELEVATIONS) or im.dtype != np.uint8:
        raise ValueError(f"{path}: 'im' must be uint8 (H, W, 3, {AZIMUTHS}, {ELEVATIONS}), got "
                         f"{im.dtype} {im.shape}")
    return np.ascontiguousarray(im.transpose(4, 3, 0, 1, 2))


def _shrink(view: np.ndarray, Image) -> np.ndarray:
    """disentanglement_lib's ``thumbnail((64, 64), ANTIALIAS)`` for a square view: one Lanczos
    resize (Pillow's ``reducing_gap`` pre-reduction never triggers at 2x)."""
    im = Image.fromarray(view)
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    out = np.asarray(im, dtype=np.uint8)
    if out.shape[:2] != (SIDE, SIDE):
        h, w = view.shape[:2]
        raise ValueError(f"a Cars3D view of {w} x {h} shrinks to {out.shape[1]} x {out.shape[0]}, "
                         f"not {SIDE} x {SIDE}; the views must be square and at least {SIDE} wide")
    return out


def load_cars3d(root: str | Path, split: str, *, seed: int = SEED) -> ArrayDataset:
    """Cars3D ``split`` ("train", "test" or "all"): 64 x 64 RGB, domain = ``car``.

    ``seed`` is the split's seed (2, the official one).
    """
    check_split("cars3d", split)
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("cars3d shrinks the views with Pillow, which is not installed: "
                          "pip install pillow") from None
    files = car_files(root)
    n_cars = len(files)
    views_per_car = ELEVATIONS * AZIMUTHS
    n = views_per_car * n_cars
    elevation, azimuth, car = np.unravel_index(np.arange(n), (ELEVATIONS, AZIMUTHS, n_cars))
    factors = {"car": car.astype(np.int64), "elevation": elevation.astype(np.int64),
               "azimuth": azimuth.astype(np.int64),
               "pose": (elevation * AZIMUTHS + azimuth).astype(np.int64)}
    rows = split_rows(factors[DOMAIN], split, seed=seed, dataset="cars3d")
    where = np.full(n, -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    images = np.empty((len(rows), SIDE, SIDE, 3), dtype=np.uint8)
    for c, path in enumerate(files):
        views = None
        for e in range(ELEVATIONS):
            for a in range(AZIMUTHS):
                at = where[(e * AZIMUTHS + a) * n_cars + c]
                if at < 0:
                    continue
                if views is None:
                    views = _read_views(path)
                try:
                    images[at] = _shrink(views[e, a], Image)
                except ValueError as exc:
                    raise ValueError(f"{path}: {exc}") from None
    return ArrayDataset(images, factors[DOMAIN][rows], n_cars, f"cars3d/{split}",
                        factors={k: v[rows] for k, v in factors.items()},
                        domain_factor=DOMAIN, channels=3)
