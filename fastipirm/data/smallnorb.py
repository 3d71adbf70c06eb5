"""SmallNORB (LeCun, Huang & Bottou, CVPR 2004) for DCoDR: domain = the toy object.

Published files (:data:`URL`; gunzip them, or leave them as ``.mat.gz``), under ``root`` or
``root/smallnorb``::

    smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat   24,300 stereo pairs, 96 x 96 grey
    smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat   category of each pair (0..4)
    smallnorb-5x46789x9x18x6x2x96x96-training-info.mat  instance, elevation, azimuth, lighting
    smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat   the same for the other 5 toys

Despite the suffix these are not MATLAB files but NORB binary matrices: a little-endian int32
magic number (``0x1E3D4C55`` = uint8 matrix, ``0x1E3D4C54`` = int32 matrix), an int32 number of
dimensions ``ndim``, ``max(3, ndim)`` int32 sizes (unused trailing ones are 1), then the data in
C order. ``dat`` is uint8 (N, 2, 96, 96) (left and right camera), ``cat`` int32 (N,), ``info``
int32 (N, 4): instance 0..9, elevation 0..8, azimuth 0, 2, ..., 34 and lighting 0..5.

DCoDR's SmallNorb preprocessing is not published (its README links a preprocessed ``.npz``; the
code says it is based on LORD, avivga/lord). Its evaluation names the attributes ``azimuth``,
``elevation`` and ``lighting``, so the domain is what remains of LORD's class, the toy object. The
choices here (``docs/dcodr-data.md``):

- the training and testing files are pooled (their toys are disjoint, and a split stratified by
  toy needs every toy on both sides): rows are the training pairs then the testing pairs;
- ``cameras="both"`` (default, like LORD's image export) gives two rows per pair, left then right;
  ``"left"``/``"right"`` keep one;
- each image is resized 96 -> 64 like LORD's ``cv2.resize`` (bilinear, see
  :func:`fastipirm.data.edges2shoes.resize_like_cv2`) and tiled to 3 channels (``channels=1``);
- factors (int64): ``object`` (the domain by default: the 50 (category, instance) pairs numbered
  in that order), ``category`` (0..4), ``instance`` (0..9), ``elevation`` (0..8), ``azimuth``
  (0..17, the published value / 2, so that steps are cyclic), ``lighting`` (0..5) and, with both
  cameras, ``camera`` (0 left, 1 right). ``domain="category"`` makes the category the domain.

Split: the stratified 90/10 rule of :mod:`fastipirm.data.domain_split` (seed 2) on the domain.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .datasets import ArrayDataset
from .domain_split import SEED, check_split, factor_codes, split_rows
from .edges2shoes import resize_like_cv2

__all__ = ["URL", "PARTS", "MAGIC", "read_norb_matrix", "norb_path", "load_smallnorb"]

URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
PARTS = {"training": "smallnorb-5x46789x9x18x6x2x96x96-training",
         "testing": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
MAGIC = {0x1E3D4C55: np.dtype(np.uint8), 0x1E3D4C54: np.dtype("<i4"),
         0x1E3D4C56: np.dtype("<i2"), 0x1E3D4C51: np.dtype("<f4"), 0x1E3D4C53: np.dtype("<f8")}
"""NORB matrix magic number -> element type."""
SIDE = 64
CAMERAS = ("both", "left", "right")
_GET = (f"Download the six smallnorb-*-{{dat,cat,info}}.mat.gz files of {URL} into the data root "
        "(gunzipped or not).")


def norb_path(root: str | Path, part: str, kind: str) -> Path:
    """Path of the ``kind`` ("dat", "cat", "info") file of ``part`` ("training", "testing")."""
    root = Path(root)
    name = f"{PARTS[part]}-{kind}.mat"
    tried = []
    for folder in (root, root / "smallnorb"):
        for candidate in (folder / name, folder / (name + ".gz")):
            tried.append(candidate)
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"smallnorb: missing {tried[0]} (also tried "
                            f"{', '.join(str(t) for t in tried[1:])}). {_GET}")


def read_norb_matrix(path: str | Path, dtype=None, ndim=None) -> np.ndarray:
    """Read a NORB binary matrix (optionally gzipped); check its element type and rank."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read the NORB file ({exc}); it is truncated or "
                         "corrupt.") from None
    buffer = np.frombuffer(raw, dtype=np.uint8)
    if buffer.size < 20:
        raise ValueError(f"{path}: {buffer.size} bytes is too short for a NORB matrix header")
    magic, rank = (int(v) for v in buffer[:8].view("<i4"))
    if magic not in MAGIC:
        raise ValueError(f"{path}: magic number {magic:#x} is not a NORB matrix type "
                         f"({', '.join(f'{m:#x}' for m in MAGIC)}); the file is corrupt")
    if not 1 <= rank <= 16:
        raise ValueError(f"{path}: implausible number of dimensions {rank}; the file is corrupt")
    stored = max(3, rank)
    header = 8 + 4 * stored
    if buffer.size < header:
        raise ValueError(f"{path}: the header is truncated")
    dims = tuple(int(v) for v in buffer[8:header].view("<i4")[:rank])
    element = MAGIC[magic]
    if dtype is not None and element != np.dtype(dtype):
        raise ValueError(f"{path}: holds {element} elements (magic {magic:#x}), expected "
                         f"{np.dtype(dtype)}")
    if ndim is not None and rank != ndim:
        raise ValueError(f"{path}: has {rank} dimensions {dims}, expected {ndim}")
    if any(d < 0 for d in dims):
        raise ValueError(f"{path}: negative size in {dims}; the file is corrupt")
    expected = header + int(np.prod(dims, dtype=np.int64)) * element.itemsize
    if buffer.size != expected:
        raise ValueError(f"{path}: {buffer.size} bytes, but a {element} matrix of shape {dims} "
                         f"takes {expected}; the file is truncated or corrupt")
    return buffer[header:].view(element).reshape(dims)


def _read_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dat_path, cat_path, info_path = (norb_path(root, part, k) for k in ("dat", "cat", "info"))
    dat = read_norb_matrix(dat_path, np.uint8, 4)
    cat = read_norb_matrix(cat_path, "<i4", 1)
    info = read_norb_matrix(info_path, "<i4", 2)
    n = dat.shape[0]
    if dat.shape[1] != 2:
        raise ValueError(f"{dat_path}: expected (N, 2, H, W) stereo pairs, got {dat.shape}")
    if cat.shape != (n,):
        raise ValueError(f"{cat_path}: {cat.shape[0]} categories for the {n} pairs of {dat_path}")
    if info.shape != (n, 4):
        raise ValueError(f"{info_path}: shape {info.shape}, expected ({n}, 4) for the pairs of "
                         f"{dat_path}")
    checks = ((cat_path, "category", cat, 0, 4), (info_path, "instance", info[:, 0], 0, 9),
              (info_path, "elevation", info[:, 1], 0, 8), (info_path, "azimuth", info[:, 2], 0, 34),
              (info_path, "lighting", info[:, 3], 0, 5))
    for path, what, values, low, high in checks:
        if n and (values.min() < low or values.max() > high):
            raise ValueError(f"{path}: {what} must lie in {low}..{high}, found "
                             f"{values.min()}..{values.max()}; the file is corrupt")
    if n and np.any(info[:, 2] % 2):
        raise ValueError(f"{info_path}: azimuths must be even (0, 2, ..., 34); the file is corrupt")
    return dat, cat.astype(np.int64), info.astype(np.int64)


def load_smallnorb(root: str | Path, split: str, *, cameras: str = "both", domain: str = "object",
                   chunk: int = 4096, seed: int = SEED) -> ArrayDataset:
    """SmallNORB ``split`` ("train", "test" or "all") as 64 x 64 grey tiled to RGB.

    ``cameras``: "both" (two rows per pair), "left" or "right". ``domain``: "object" (50 toys) or
    "category" (5). ``chunk``: pairs resized at a time. ``seed``: the split's seed.
    """
    check_split("smallnorb", split)
    if cameras not in CAMERAS:
        raise ValueError(f"smallnorb: cameras must be one of {', '.join(CAMERAS)}, got {cameras!r}")
    if domain not in ("object", "category"):
        raise ValueError(f"smallnorb: domain must be 'object' or 'category', got {domain!r}")
    root = Path(root)
    parts = [_read_part(root, part) for part in PARTS]
    cams = [0, 1] if cameras == "both" else [0] if cameras == "left" else [1]
    per_pair = len(cams)
    cat = np.concatenate([p[1] for p in parts])
    info = np.concatenate([p[2] for p in parts])

    def rows_of(values: np.ndarray) -> np.ndarray:  # per pair -> per row
        return np.repeat(values, per_pair)

    factors = {"object": rows_of(factor_codes(cat * 10 + info[:, 0])), "category": rows_of(cat),
               "instance": rows_of(info[:, 0]), "elevation": rows_of(info[:, 1]),
               "azimuth": rows_of(info[:, 2] // 2), "lighting": rows_of(info[:, 3])}
    if per_pair == 2:
        factors["camera"] = np.tile(np.array([0, 1], dtype=np.int64), len(cat))
    rows = split_rows(factors[domain], split, seed=seed, dataset="smallnorb")
    where = np.full(len(cat) * per_pair, -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    grey = np.empty((len(rows), SIDE, SIDE), dtype=np.uint8)
    offset = 0  # first row of the current part
    for dat, _, _ in parts:
        for s in range(0, dat.shape[0], chunk):
            pairs = dat[s:s + chunk]
            for k, cam in enumerate(cams):
                at = where[offset + (s + np.arange(len(pairs))) * per_pair + k]
                keep = at >= 0
                if keep.any():
                    small = resize_like_cv2(pairs[keep, cam, :, :, None], SIDE, SIDE, "linear")
                    grey[at[keep]] = small[..., 0]
        offset += dat.shape[0] * per_pair
    images = np.repeat(grey[..., None], 3, axis=3)
    num_domains = int(factors[domain].max()) + 1 if len(cat) else 0
    return ArrayDataset(images, factors[domain][rows], num_domains, f"smallnorb/{split}",
                        factors={k: v[rows] for k, v in factors.items()},
                        domain_factor=domain, channels=1)
