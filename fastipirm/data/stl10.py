"""STL-10 as published: the binary files of ``stl10_binary.tar.gz``.

Layout expected under ``root``::

    root/stl10_binary/train_X.bin       5,000 images   (labelled)
    root/stl10_binary/train_y.bin       5,000 labels
    root/stl10_binary/test_X.bin        8,000 images
    root/stl10_binary/test_y.bin        8,000 labels
    root/stl10_binary/unlabeled_X.bin 100,000 images

Each image is 3*96*96 = 27,648 bytes: the three colour planes (R, G, B) one after the other, and
each plane stored **column-major** (the MATLAB order of the release: the row index varies fastest).
Labels are single bytes 1..10, returned as 0..9. ``train+unlabeled`` is ``train`` followed by
``unlabeled`` (N = 105,000, the IP-IRM pretraining set); its unlabelled rows get label -1, as in
torchvision's ``STL10`` (so dataset indices coincide with the official code's).

Image counts are not required to match the published ones (small files in the same format load),
but a file whose size is not a whole number of images, or whose label count or range is wrong, is
reported with a ``ValueError`` naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .download import extract_tar, fetch_archive, md5_file

URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
ARCHIVE = "stl10_binary.tar.gz"
ARCHIVE_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
FOLDER = "stl10_binary"
SIDE = 96
RECORD_BYTES = 3 * SIDE * SIDE
NUM_CLASSES = 10
#: split -> (image files, label file or None). Order matters for train+unlabeled.
SPLITS = {
    "train": (("train_X.bin",), "train_y.bin"),
    "test": (("test_X.bin",), "test_y.bin"),
    "unlabeled": (("unlabeled_X.bin",), None),
    "train+unlabeled": (("train_X.bin", "unlabeled_X.bin"), "train_y.bin"),
}
#: published MD5 of each extracted file (checked after a download).
FILE_MD5 = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
    "unlabeled_X.bin": "5242ba1fed5e4be9e1e742405eb56ca4",
}


def layout_hint(root: Path) -> str:
    files = ", ".join(FILE_MD5)
    return (f"STL-10 expects the published binary release under {Path(root) / FOLDER}/ "
            f"({files}); get {URL} (MD5 {ARCHIVE_MD5}) and extract it into {root}, "
            "or pass download=True.")


def load_stl10(root: str | Path, split: str, *, download: bool = False
               ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Images (N, 96, 96, 3) uint8 C-contiguous and int64 labels 0..9 (-1 unlabelled; None for
    ``unlabeled``)."""
    if split not in SPLITS:
        raise ValueError(f"stl10: unknown split {split!r}; choose one of {sorted(SPLITS)}")
    root = Path(root)
    folder = root / FOLDER
    image_files, label_file = SPLITS[split]
    needed = list(image_files) + ([label_file] if label_file else [])
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing and download:
        archive = fetch_archive(URL, root / ARCHIVE, ARCHIVE_MD5, layout_hint=layout_hint(root))
        extract_tar(archive, root)
        for name in needed:
            path = folder / name
            if not path.is_file() or md5_file(path) != FILE_MD5[name]:
                raise ValueError(f"{path}: missing or MD5 mismatch after extracting {archive}.\n"
                                 + layout_hint(root))
        missing = []
    if missing:
        raise FileNotFoundError(f"stl10 split {split!r}: missing "
                                f"{', '.join(str(folder / m) for m in missing)}.\n"
                                + layout_hint(root))

    counts = [_image_count(folder / name) for name in image_files]
    images = np.empty((sum(counts), SIDE, SIDE, 3), dtype=np.uint8)
    start = 0
    for name, count in zip(image_files, counts):
        _read_images_into(folder / name, images[start:start + count])
        start += count
    if label_file is None:
        return images, None
    labels = _read_labels(folder / label_file, expected=counts[0],
                          image_file=folder / image_files[0])
    if len(image_files) > 1:  # train+unlabeled: the unlabelled rows carry -1
        labels = np.concatenate([labels, np.full(sum(counts[1:]), -1, dtype=np.int64)])
    return images, labels


def _image_count(path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % RECORD_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a whole number of 3x96x96 images "
                         f"({RECORD_BYTES} bytes each); the file is truncated or corrupt.")
    return size // RECORD_BYTES


def _read_images_into(path: Path, out: np.ndarray, chunk: int = 4096) -> None:
    """Fill ``out`` (n, 96, 96, 3) from the column-major planar records of ``path``, chunk by chunk.

    Record ``r`` viewed as (3, 96, 96) is indexed [channel, column, row], so HWC is its (2, 1, 0)
    transpose. Chunking keeps the peak memory near the size of the result (the unlabeled file is
    2.8 GB).
    """
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(out.shape[0], 3, SIDE, SIDE))
    try:
        for s in range(0, out.shape[0], chunk):
            out[s:s + chunk] = raw[s:s + chunk].transpose(0, 3, 2, 1)
    finally:
        del raw


def _read_labels(path: Path, *, expected: int, image_file: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != expected:
        raise ValueError(f"{path}: {raw.size} labels but {image_file} holds {expected} images; "
                         "one of the files is truncated or corrupt.")
    if raw.size and (raw.min() < 1 or raw.max() > NUM_CLASSES):
        raise ValueError(f"{path}: labels must be 1..{NUM_CLASSES}, found values in "
                         f"[{raw.min()}, {raw.max()}]; the file is corrupt.")
    return raw.astype(np.int64) - 1
