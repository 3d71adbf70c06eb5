"""CelebA (Liu et al., ICCV 2015) at 64 x 64 as DCoDR uses it: domain = identity.

Published files (:data:`URL`; the Google Drive release, or any mirror with the same files), found
under ``root`` or in the release's sub-folders ``root/Img``, ``root/Anno`` and ``root/Eval``:

- ``img_align_celeba/000001.jpg ...``: the 202,599 aligned and cropped faces, 178 x 218 RGB
  (``img_align_celeba_png/000001.png ...`` is read when a jpg is missing);
- ``identity_CelebA.txt``: one line ``<image name> <identity>`` per image, no header;
- ``list_landmarks_align_celeba.txt``: the image count, a header line naming the ten columns
  (``lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x
  rightmouth_y``), then ``<image name>`` and the ten pixel coordinates in the aligned image;
- ``list_eval_partition.txt`` (only for ``protocol="disjoint"``): ``<image name> <0|1|2>``.

Preprocessing (official ``prepare_celeba_x64.py``): the central 128 x 128 crop (rows
``h//2 - 64 : h//2 + 64``, columns likewise), reduced to 64 x 64 by ``cv2.resize``, which for an
exact 2x reduction is the mean of each 2 x 2 block rounded half up (computed so here).

Factors: ``identity`` (the domain), int64 codes numbering the identities of the loaded pool in
increasing order of the published identity number (the official numbering follows Python's
unordered ``set``, which changes from run to run). Targets: ``landmarks``, float32 (N, 10), the
five published landmarks moved into the 64 x 64 image, ``x64 = (x - left - 0.5) / 2`` (and
likewise for y), in output pixel units. DCoDR instead detects 68 landmarks on the 64 x 64 images
with the ``face_alignment`` network and truncates them to integers; that network is not a
dependency here, so the published landmarks stand in for it.

Rows and splits: the pool is every image of ``identity_CelebA.txt`` (file order) whose identity
has at least ``min_images`` images; ``all`` is the pool. ``protocol="stratified"`` (default):
``train``/``test`` are the stratified (by identity) 90/10 split of
:mod:`fastipirm.data.domain_split`, seed 2 (an identity with fewer than 10 images may land wholly
in train). ``protocol="disjoint"``: train = CelebA's published partitions 0 and 1, test =
partition 2, which share no identity, in pool order -- the closest published stand-in for DCoDR's
own identity-disjoint ``align_train``/``align_test`` folders, which were not released. DCoDR also
drops identities with at most 19 images when training (``min_images=20`` reproduces that filter
on the pool).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from .datasets import ArrayDataset
from .domain_split import SEED, check_split, factor_codes, split_rows
from .imagefolder import read_rgb, run_threads

__all__ = ["URL", "IMAGE_FOLDER", "IDENTITY_FILE", "LANDMARK_FILE", "PARTITION_FILE",
           "LANDMARK_NAMES", "load_celeba", "read_identities", "read_landmarks",
           "read_partition"]

URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
IMAGE_FOLDER = "img_align_celeba"
IDENTITY_FILE = "identity_CelebA.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_NAMES = ("lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                  "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")
CROP = 128
SIDE = 64
PROTOCOLS = ("stratified", "disjoint")
_GET = (f"Get the aligned CelebA images and annotations from {URL} (img_align_celeba.zip, "
        "Anno/identity_CelebA.txt, Anno/list_landmarks_align_celeba.txt, "
        "Eval/list_eval_partition.txt) and extract them under the data root.")


def _find_file(root: Path, name: str, subfolders: tuple[str, ...]) -> Path:
    tried = [root / name] + [root / sub / name for sub in subfolders]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"celeba: missing {tried[0]} (also tried "
                            f"{', '.join(str(t) for t in tried[1:])}). {_GET}")


def _image_folders(root: Path) -> list[Path]:
    found = []
    for name in (IMAGE_FOLDER, IMAGE_FOLDER + "_png"):
        for folder in (root / name, root / "Img" / name, root / name / name):
            if folder.is_dir():
                found.append(folder)
    if not found:
        raise FileNotFoundError(f"celeba: no image folder {root / IMAGE_FOLDER} (also tried "
                                f"{root / 'Img' / IMAGE_FOLDER} and the _png variants). {_GET}")
    return found


def _table(path: Path, columns: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line after ``skip`` lines; every line must have
    ``columns`` whitespace-separated fields."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the CelebA annotation ({exc})") from None
    rows = []
    for number, line in enumerate(lines[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise ValueError(f"{path}, line {number}: expected {columns} fields, got "
                             f"{len(fields)}: {line.strip()[:80]!r}")
        rows.append((number, fields))
    if not rows:
        raise ValueError(f"{path}: no entry; the file is empty or truncated")
    return rows


def read_identities(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(image names, identity numbers) of ``identity_CelebA.txt``, in file order."""
    path = Path(path)
    names, ids = [], []
    for number, (name, identity) in _table(path, 2):
        try:
            ids.append(int(identity))
        except ValueError:
            raise ValueError(f"{path}, line {number}: identity {identity!r} is not an integer") \
                from None
        names.append(name)
    return names, np.asarray(ids, dtype=np.int64)


def read_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """Image name -> the ten landmark coordinates of ``list_landmarks_align_celeba.txt``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            head = [f.readline(), f.readline()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the CelebA landmarks ({exc})") from None
    if not head[0].strip().isdigit() or tuple(head[1].split()) != LANDMARK_NAMES:
        raise ValueError(f"{path}: expected the image count on line 1 and the header "
                         f"{' '.join(LANDMARK_NAMES)!r} on line 2")
    table = {}
    for number, fields in _table(path, 1 + len(LANDMARK_NAMES), skip=2):
        try:
            table[fields[0]] = np.asarray([float(v) for v in fields[1:]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}, line {number}: landmark coordinates must be numbers") \
                from None
    if len(table) != int(head[0]):
        raise ValueError(f"{path}: line 1 announces {int(head[0])} images, the file lists "
                         f"{len(table)}; it is truncated or corrupt")
    return table


def read_partition(path: str | Path) -> dict[str, int]:
    """Image name -> published partition (0 train, 1 validation, 2 test)."""
    path = Path(path)
    table = {}
    for number, (name, part) in _table(path, 2):
        if part not in ("0", "1", "2"):
            raise ValueError(f"{path}, line {number}: partition must be 0, 1 or 2, got {part!r}")
        table[name] = int(part)
    return table


def _image_path(folders: list[Path], name: str) -> Path:
    stem = Path(name).stem
    for folder in folders:
        for candidate in (folder / name, folder / f"{stem}.jpg", folder / f"{stem}.png"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"celeba: image {name} not found in "
                            f"{', '.join(str(f) for f in folders)}. {_GET}")


def _crop_offsets(height: int, width: int) -> tuple[int, int]:
    return height // 2 - CROP // 2, width // 2 - CROP // 2


def _load_face(path: Path, Image) -> tuple[np.ndarray, int, int]:
    """(64 x 64 face, crop top, crop left) of one aligned image."""
    array = read_rgb(path, Image, "CelebA image")
    h, w, _ = array.shape
    if h < CROP or w < CROP:
        raise ValueError(f"{path}: {w} x {h} is smaller than the {CROP} x {CROP} centre crop")
    top, left = _crop_offsets(h, w)
    crop = array[top:top + CROP, left:left + CROP].astype(np.uint16)
    blocks = crop.reshape(SIDE, 2, SIDE, 2, 3).sum(axis=(1, 3))
    return ((blocks + 2) >> 2).astype(np.uint8), top, left


def load_celeba(root: str | Path, split: str, *, protocol: str = "stratified",
                min_images: int = 2, landmarks: bool = True, limit: Optional[int] = None,
                workers: Optional[int] = None, seed: int = SEED) -> ArrayDataset:
    """CelebA ``split`` ("train", "test" or "all") at 64 x 64, domain = ``identity``.

    ``protocol``: "stratified" (90/10 by identity) or "disjoint" (published partitions).
    ``min_images``: identities with fewer images are left out of the pool. ``landmarks``: read the
    landmark file into ``targets["landmarks"]``. ``limit``: only the first ``limit`` lines of the
    identity file. ``workers``: decoding threads (default: up to 8). ``seed``: the split's seed.
    """
    check_split("celeba", split)
    if protocol not in PROTOCOLS:
        raise ValueError(f"celeba: protocol must be one of {', '.join(PROTOCOLS)}, got "
                         f"{protocol!r}")
    if min_images < 1:
        raise ValueError(f"celeba: min_images must be at least 1, got {min_images}")
    if limit is not None and limit < 1:
        raise ValueError(f"celeba: limit must be positive, got {limit}")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("celeba decodes the images with Pillow, which is not installed: "
                          "pip install pillow") from None
    root = Path(root)
    identity_path = _find_file(root, IDENTITY_FILE, ("Anno",))
    names, ids = read_identities(identity_path)
    if limit is not None:
        names, ids = names[:limit], ids[:limit]
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    pool = np.nonzero(counts[inverse.reshape(-1)] >= min_images)[0]
    if len(pool) == 0:
        raise ValueError(f"{identity_path}: no identity has {min_images} or more images")
    names = [names[i] for i in pool]
    identity = factor_codes(ids[pool])

    if protocol == "stratified":
        rows = split_rows(identity, split, seed=seed, dataset="celeba")
    elif split == "all":
        rows = np.arange(len(names), dtype=np.int64)
    else:
        part_path = _find_file(root, PARTITION_FILE, ("Eval", "Anno"))
        partition = read_partition(part_path)
        missing = [n for n in names if n not in partition]
        if missing:
            raise ValueError(f"{part_path}: no partition for {len(missing)} image(s), e.g. "
                             f"{missing[0]}")
        parts = np.asarray([partition[n] for n in names])
        rows = np.nonzero(parts == 2 if split == "test" else parts != 2)[0].astype(np.int64)

    marks = None
    if landmarks:
        mark_path = _find_file(root, LANDMARK_FILE, ("Anno",))
        table = read_landmarks(mark_path)
        missing = [names[r] for r in rows if names[r] not in table]
        if missing:
            raise ValueError(f"{mark_path}: no landmarks for {len(missing)} image(s), e.g. "
                             f"{missing[0]}")
        marks = np.stack([table[names[r]] for r in rows]) if len(rows) else np.zeros((0, 10))

    folders = _image_folders(root)
    paths = [_image_path(folders, names[r]) for r in rows]
    images = np.empty((len(rows), SIDE, SIDE, 3), dtype=np.uint8)
    offsets = np.empty((len(rows), 2), dtype=np.float64)  # (top, left) of each crop

    def work(i: int) -> None:
        images[i], offsets[i, 0], offsets[i, 1] = _load_face(paths[i], Image)

    run_threads(work, len(paths), workers)

    targets = None
    if marks is not None:
        shift = np.empty_like(marks)
        shift[:, 0::2] = offsets[:, 1:2]  # x: crop left
        shift[:, 1::2] = offsets[:, 0:1]  # y: crop top
        targets = {"landmarks": ((marks - shift - 0.5) / 2.0).astype(np.float32)}
    num_domains = int(identity.max()) + 1
    return ArrayDataset(images, identity[rows], num_domains, f"celeba/{split}",
                        factors={"identity": identity[rows]}, domain_factor="identity",
                        channels=3, targets=targets)
