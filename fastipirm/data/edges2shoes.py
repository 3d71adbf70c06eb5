"""Edges2Shoes as DCoDR uses it: the pix2pix edge|photo pairs, domain = photo vs edge map.

Published files (pix2pix, Isola et al. 2017; :data:`URL`, extract the tarball under ``root``)::

    root/edges2shoes/train/<k>_AB.jpg    49,825 pairs, k = 1..49825
    root/edges2shoes/val/<k>_AB.jpg         200 pairs, k = 1..200

(``root/pix2pix/edges2shoes/`` -- the official script's place -- and ``root/train|val`` are found
too.) Each jpg is 256 x 512 RGB: the edge map (A) on the left half, the photo (B) on the right.

Rows (official ``prepare_edges2shoes_zappos.py``): the jpgs of both folders sorted by the number
``k`` before the first underscore; ties (``train/7_AB.jpg`` and ``val/7_AB.jpg``) are ordered by
folder name here (the official order of ties is the file system's ``glob`` order). Each jpg gives
two consecutive rows: its photo (domain 0), then its edge map (domain 1), so in the ``all`` order
row ``r`` and row ``r ^ 1`` are a pair. Preprocessing of every image, photos included, as the
shipped script does: "inflate black lines" (``255 - dilate(255 - img, 3x3 ones, iterations=2)``,
i.e. a 5 x 5 grey erosion per channel), then OpenCV's bilinear resize 256 -> 64 computed in float
(each output pixel is the mean of a 2 x 2 block); the float result is rounded half up to uint8
here (the official arrays stay float). ``inflate_lines`` chooses which images are eroded.

Factors: ``modality`` (the domain: 0 photo, 1 edge map). With the UT Zappos50K files (below) the
DCoDR attributes are attached to both images of a pair: ``shoe_type``, ``gender``, ``closure``,
``material``, ``toe_style``. They come from the Zappos image nearest to the pair's photo, both
reduced to 32 x 32 with OpenCV-style bicubic interpolation, by exact L2 distance; the Zappos
``meta-data.csv`` row ``i`` labels image ``i`` of ``image-path.mat``; a missing value is
"Other", a multi-valued one keeps its first ``;``-separated value, values seen at most 250 times
in the column become "Other", and the codes number the remaining strings in sorted order.
Zappos50K (:data:`ZAPPOS_URL`), extracted under ``root`` or ``root/zappos_50k``::

    ut-zap50k-data/image-path.mat      variable ``imagepath``: 50,025 relative image paths
    ut-zap50k-data/meta-data.csv       CID,Category,SubCategory,...,Closure,Gender,Material,ToeStyle
    ut-zap50k-images/<imagepath>       the jpgs

Split: the stratified (by modality) 90/10 rule of :mod:`fastipirm.data.domain_split` on the rows
above; the official script makes an *unstratified*, unseeded 90/10 split, which cannot be
reproduced.

This module also holds :func:`resize_like_cv2`, the OpenCV-style resize the DCoDR readers share.
"""
from __future__ import annotations

import csv
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from .datasets import ArrayDataset
from .domain_split import SEED, check_split, factor_codes, split_rows
from .imagefolder import read_rgb, run_threads

__all__ = ["URL", "ZAPPOS_URL", "ATTRIBUTES", "load_edges2shoes", "resize_like_cv2",
           "zappos_labels", "pair_files"]

URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/edges2shoes.tar.gz"
ZAPPOS_URL = "https://vision.cs.utexas.edu/projects/finegrained/utzap50k/"
#: DCoDR attribute name -> Zappos50K meta-data.csv column.
ATTRIBUTES = {"shoe_type": "Category", "gender": "Gender", "closure": "Closure",
              "material": "Material", "toe_style": "ToeStyle"}
RARE = 250
"""A label seen at most this many times in its column becomes "Other" (official rule)."""
SIDE = 64
MATCH_SIDE = 32
# pandas.read_csv's default missing-value strings (the official script reads the csv with pandas)
_NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
               "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_NAME = re.compile(r"^(\d+)_")
_GET = f"Download {URL} and extract it under the data root (it holds edges2shoes/train and val)."
_GET_ZAP = (f"Download ut-zap50k-data.zip and ut-zap50k-images.zip from {ZAPPOS_URL} and extract "
            "them under the data root (or root/zappos_50k).")


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("the DCoDR image readers decode images with Pillow, which is not "
                          "installed: pip install pillow") from None
    return Image


# --------------------------------------------------------------------------------------------
# OpenCV-style resize (no OpenCV dependency)
# --------------------------------------------------------------------------------------------

def _taps(n_in: int, n_out: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n_out, K) and float32 weights (n_out, K) of OpenCV's ``cv::resize`` along
    one axis: source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` in float32, borders replicated
    (bilinear clamps the coordinate itself, as OpenCV does)."""
    pos = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    start = np.floor(pos).astype(np.int64)
    frac = (pos - start.astype(np.float32)).astype(np.float32)
    if kind == "linear":
        low = start < 0
        frac[low], start[low] = 0, 0
        high = start >= n_in - 1
        frac[high], start[high] = 0, n_in - 1
        weights = np.stack([np.float32(1) - frac, frac], axis=1)
        offsets = np.arange(2)
    elif kind == "cubic":
        a = np.float32(-0.75)
        x = frac
        w0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
        w1 = ((a + 2) * x - (a + 3)) * x * x + 1
        w2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
        weights = np.stack([w0, w1, w2, np.float32(1) - w0 - w1 - w2], axis=1).astype(np.float32)
        offsets = np.arange(-1, 3)
    else:
        raise ValueError(f"unknown interpolation {kind!r}; choose 'linear' or 'cubic'")
    index = np.clip(start[:, None] + offsets[None, :], 0, n_in - 1)
    return index, weights.astype(np.float32)


def _vertical_fixed(taps: list, weights: np.ndarray, kind: str) -> np.ndarray:
    """OpenCV's vectorised vertical pass for uint8 (what its x86 and ARM builds run): ``taps``
    are the horizontal sums (weights scaled by 2048), ``weights`` the int row weights."""
    if kind == "linear":  # VResizeLinearVec_32s8u: 16-bit high products, rounding shift by 2
        acc = sum(((tap >> 4) * w) >> 16 for tap, w in zip(taps, weights))
        return np.clip((acc + 2) >> 2, 0, 255).astype(np.uint8)
    # VResizeCubicVec_32s8u: float32 multiply, then add (each rounded), then round half to even
    scale = np.float32(1.0 / (2048 * 2048))
    acc = None
    for tap, w in reversed(list(zip(taps, weights))):
        term = tap.astype(np.float32) * (np.asarray(w).astype(np.float32) * scale)
        acc = term if acc is None else term + acc
    return np.clip(np.rint(acc), 0, 255).astype(np.uint8)


def resize_like_cv2(images: np.ndarray, height: int, width: int, kind: str = "linear",
                    chunk: int = 256) -> np.ndarray:
    """Resize a batch (N, H, W, C) as ``cv2.resize(img, (width, height), interpolation=...)`` does
    with ``INTER_LINEAR`` (``kind="linear"``) or ``INTER_CUBIC`` (``kind="cubic"``).

    uint8 input follows OpenCV's fixed-point path: weights rounded to multiples of 1/2048, the
    horizontal pass summed exactly and the vertical pass rounded as OpenCV's SIMD kernels do.
    Checked against opencv-python 5.0 on random images: identical for bilinear reductions (96 ->
    64, 128 -> 64, 256 -> 64) and for bicubic at integer ratios (256 -> 32); at other bicubic
    ratios a few percent of the pixels differ by one grey level (OpenCV's vertical bicubic weights
    are not exactly reproduced). Float input uses the float weights and returns float64. Like
    OpenCV, an exact 2x bilinear reduction is the mean of each 2 x 2 block rounded half up. No
    antialiasing (OpenCV has none either).
    """
    if images.ndim != 4:
        raise ValueError(f"resize_like_cv2 expects (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    rows, wy = _taps(h, height, kind)
    cols, wx = _taps(w, width, kind)
    fixed = images.dtype == np.uint8
    if fixed:
        wy_ = np.rint(wy.astype(np.float64) * 2048).astype(np.int64)
        wx_ = np.rint(wx.astype(np.float64) * 2048).astype(np.int64)
        out = np.empty((n, height, width, c), dtype=np.uint8)
    else:
        wy_, wx_ = wy.astype(np.float64), wx.astype(np.float64)
        out = np.empty((n, height, width, c), dtype=np.float64)
    for s in range(0, n, chunk):
        block = images[s:s + chunk].astype(np.int64 if fixed else np.float64)
        horiz = sum(wx_[None, None, :, k, None] * block[:, :, cols[:, k], :]
                    for k in range(cols.shape[1]))
        taps = [horiz[:, rows[:, k], :, :] for k in range(rows.shape[1])]
        weights = [wy_[None, :, k, None, None] for k in range(rows.shape[1])]
        if fixed:
            out[s:s + chunk] = _vertical_fixed(taps, weights, kind)
        else:
            out[s:s + chunk] = sum(t * wt for t, wt in zip(taps, weights))
    return out


# --------------------------------------------------------------------------------------------
# Edges2Shoes files
# --------------------------------------------------------------------------------------------

def _pairs_folder(root: Path) -> Path:
    for folder in (root / "edges2shoes", root / "pix2pix" / "edges2shoes", root):
        if (folder / "train").is_dir() or (folder / "val").is_dir():
            return folder
    raise FileNotFoundError(f"edges2shoes: no folder {root / 'edges2shoes'}/train or /val "
                            f"(also tried {root / 'pix2pix' / 'edges2shoes'} and {root}). {_GET}")


def pair_files(root: str | Path) -> list[Path]:
    """The edge|photo jpgs in row order: sorted by the leading number, then by folder name."""
    folder = _pairs_folder(Path(root))
    keyed = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sub.glob("*.jpg"):
            match = _NAME.match(path.name)
            if match is None:
                raise ValueError(f"{path}: edges2shoes file names must be '<number>_AB.jpg'")
            keyed.append((int(match.group(1)), sub.name, path))
    if not keyed:
        raise FileNotFoundError(f"edges2shoes: no '<number>_AB.jpg' file under {folder}. {_GET}")
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [path for _, _, path in keyed]


def _read_pair(path: Path, Image) -> tuple[np.ndarray, np.ndarray]:
    """(photo, edges) halves of one jpg, RGB uint8."""
    array = read_rgb(path, Image, "edges2shoes image")
    h, w, _ = array.shape
    if w != 2 * h:
        raise ValueError(f"{path}: an edges2shoes image is edge|photo side by side (width = 2 x "
                         f"height, 512 x 256 as published), got {w} x {h}")
    return array[:, h:], array[:, :h]


def _inflate_lines(image: np.ndarray) -> np.ndarray:
    """``255 - cv2.dilate(255 - image, ones((3, 3)), iterations=2)``: a 5 x 5 minimum per channel
    (OpenCV ignores the pixels outside the image, as edge padding does for a minimum), computed
    as a row minimum then a column minimum."""
    h, w = image.shape[:2]
    pad = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
    rows = pad[0:h]
    for i in range(1, 5):
        rows = np.minimum(rows, pad[i:i + h])
    out = rows[:, 0:w]
    for j in range(1, 5):
        out = np.minimum(out, rows[:, j:j + w])
    return out


def _to_64(image: np.ndarray, inflate: bool) -> np.ndarray:
    if inflate:
        image = _inflate_lines(image)
    small = resize_like_cv2(image[None].astype(np.float64), SIDE, SIDE, "linear")[0]
    return np.clip(np.floor(small + 0.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Zappos50K attributes
# --------------------------------------------------------------------------------------------

def _zappos_folder(root: Path) -> Optional[Path]:
    for folder in (root, root / "zappos_50k"):
        if (folder / "ut-zap50k-data").is_dir():
            return folder
    return None


def zappos_labels(csv_path: str | Path, rare: int = RARE) -> dict[str, np.ndarray]:
    """The five DCoDR attributes of every row of ``meta-data.csv`` as int64 codes (see the module
    docstring for the rule; ``rare`` is the official 250)."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{csv_path}: cannot read the Zappos50K meta-data ({exc})") from None
    missing = [col for col in ATTRIBUTES.values() if not rows or col not in rows[0]]
    if missing:
        raise ValueError(f"{csv_path}: the Zappos50K meta-data needs the columns "
                         f"{', '.join(ATTRIBUTES.values())}; missing {', '.join(missing)}")
    labels = {}
    for name, column in ATTRIBUTES.items():
        raw = [row[column] for row in rows]
        values = np.array(["Other" if v is None or v in _NA_STRINGS else v.split(";")[0]
                           for v in raw], dtype=object)
        _, inverse, counts = np.unique(values.astype(str), return_inverse=True,
                                       return_counts=True)
        values = np.where(counts[inverse.reshape(-1)] <= rare, "Other", values.astype(str))
        labels[name] = factor_codes(values)
    return labels


def _zappos_paths(mat_path: Path) -> list[str]:
    from scipy.io import loadmat
    try:
        cells = loadmat(mat_path)["imagepath"]
    except KeyError:
        raise ValueError(f"{mat_path}: no variable 'imagepath' (the Zappos50K image list)") \
            from None
    except Exception as exc:  # scipy raises several types for a damaged file
        raise ValueError(f"{mat_path}: cannot read the Zappos50K image list "
                         f"({type(exc).__name__}: {exc})") from None
    paths = []
    for cell in np.asarray(cells, dtype=object).reshape(-1):
        value = np.asarray(cell).reshape(-1)
        if value.size != 1 or not isinstance(value[0], str):
            raise ValueError(f"{mat_path}: 'imagepath' must be a cell array of strings")
        paths.append(value[0])
    return paths


def _small(image: np.ndarray) -> np.ndarray:
    return resize_like_cv2(image[None], MATCH_SIDE, MATCH_SIDE, "cubic")[0]


def _nearest(queries: np.ndarray, gallery: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Index of the nearest gallery row (exact squared L2 on integer pixels, first on ties)."""
    g = gallery.reshape(len(gallery), -1).astype(np.float64)
    g_norm = np.einsum("ij,ij->i", g, g)
    out = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk].reshape(len(queries[s:s + chunk]), -1).astype(np.float64)
        dist = np.einsum("ij,ij->i", q, q)[:, None] + g_norm[None, :] - 2.0 * (q @ g.T)
        out[s:s + chunk] = np.argmin(dist, axis=1)
    return out


def _zappos_attributes(folder: Path, photos_small: np.ndarray, Image, rare: int
                       ) -> dict[str, np.ndarray]:
    data = folder / "ut-zap50k-data"
    mat_path, csv_path = data / "image-path.mat", data / "meta-data.csv"
    for path in (mat_path, csv_path):
        if not path.is_file():
            raise FileNotFoundError(f"edges2shoes attributes: missing {path}. {_GET_ZAP}")
    paths = _zappos_paths(mat_path)
    labels = zappos_labels(csv_path, rare)
    if len(paths) != len(next(iter(labels.values()))):
        raise ValueError(f"{mat_path} lists {len(paths)} images but {csv_path} has "
                         f"{len(next(iter(labels.values())))} rows; they must match row for row")
    images = np.empty((len(paths), MATCH_SIDE, MATCH_SIDE, 3), dtype=np.uint8)
    for i, rel in enumerate(paths):
        path = folder / "ut-zap50k-images" / rel
        if not path.is_file():
            raise FileNotFoundError(f"edges2shoes attributes: missing Zappos50K image {path}. "
                                    f"{_GET_ZAP}")
        try:
            with Image.open(path) as im:
                images[i] = _small(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"{path}: cannot decode the Zappos50K image ({exc})") from None
    match = _nearest(photos_small, images)
    return {name: codes[match] for name, codes in labels.items()}


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------

def load_edges2shoes(root: str | Path, split: str, *, attributes: Optional[bool] = None,
                     inflate_lines: str = "both", limit: Optional[int] = None,
                     rare: int = RARE, workers: Optional[int] = None,
                     seed: int = SEED) -> ArrayDataset:
    """Edges2Shoes ``split`` ("train", "test" or "all") as 64 x 64 RGB, domain = ``modality``.

    ``attributes``: attach the Zappos50K attributes (True: required, False: never, None: when
    ``ut-zap50k-data`` is found under ``root`` or ``root/zappos_50k``). ``inflate_lines``: which
    images get the line-thickening erosion, "both" (the shipped script), "edges" or "none".
    ``limit``: use only the first ``limit`` jpgs of the row order (the split is then drawn on
    those). ``rare``: attribute values seen at most this often become "Other" (official: 250).
    ``workers``: decoding threads (default: up to 8). ``seed``: the split's seed.
    """
    check_split("edges2shoes", split)
    if inflate_lines not in ("both", "edges", "none"):
        raise ValueError(f"edges2shoes: inflate_lines must be 'both', 'edges' or 'none', got "
                         f"{inflate_lines!r}")
    root = Path(root)
    files = pair_files(root)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"edges2shoes: limit must be positive, got {limit}")
        files = files[:limit]
    zap_folder = _zappos_folder(root)
    if attributes and zap_folder is None:
        raise FileNotFoundError(f"edges2shoes attributes: no ut-zap50k-data folder under {root} "
                                f"or {root / 'zappos_50k'}. {_GET_ZAP}")
    want_attributes = zap_folder is not None and attributes is not False
    Image = _pillow()

    modality = np.tile(np.array([0, 1], dtype=np.int64), len(files))
    rows = split_rows(modality, split, seed=seed, dataset="edges2shoes")
    where = np.full(len(modality), -1, dtype=np.int64)  # output position of each row, -1 if unused
    where[rows] = np.arange(len(rows))
    images = np.empty((len(rows), SIDE, SIDE, 3), dtype=np.uint8)
    photos_small = np.empty((len(files) if want_attributes else 0, MATCH_SIDE, MATCH_SIDE, 3),
                            dtype=np.uint8)

    def work(i: int) -> None:
        at_photo, at_edges = where[2 * i], where[2 * i + 1]
        if at_photo < 0 and at_edges < 0 and not want_attributes:
            return
        photo, edges = _read_pair(files[i], Image)
        if want_attributes:
            photos_small[i] = _small(np.ascontiguousarray(photo))
        if at_photo >= 0:
            images[at_photo] = _to_64(photo, inflate_lines == "both")
        if at_edges >= 0:
            images[at_edges] = _to_64(edges, inflate_lines != "none")

    run_threads(work, len(files), workers)
    factors = {"modality": modality}
    if want_attributes:
        pair_labels = _zappos_attributes(zap_folder, photos_small, Image, rare)
        factors.update({name: np.repeat(codes, 2) for name, codes in pair_labels.items()})
    return ArrayDataset(images, modality[rows], 2, f"edges2shoes/{split}",
                        factors={k: v[rows] for k, v in factors.items()},
                        domain_factor="modality", channels=3)
