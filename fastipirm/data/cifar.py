"""CIFAR-10 / CIFAR-100 as published: the "python version" pickle batches.

Layout expected under ``root``::

    root/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch     (cifar10)
    root/cifar-100-python/train, test                                      (cifar100)

Each file is a (Python 2) pickle of a dict with ``data``: uint8 (n, 3072), rows holding the R, G
and B 32x32 planes in row-major order, and the labels under ``labels`` (CIFAR-10, 0..9) or
``fine_labels`` (CIFAR-100, 0..99; the 20 coarse labels are not used). Train = the five batches in
order (50,000 images), test = ``test_batch`` / ``test`` (10,000).

The pickles are read with a restricted unpickler that only accepts what a NumPy array and plain
containers need, so a tampered file cannot run code; anything else is reported as a ``ValueError``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .download import extract_tar, fetch_archive, md5_file

SPECS = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz", archive_md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py", label_key="labels", num_classes=10,
        splits={"train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                          "data_batch_5"),
                "test": ("test_batch",)},
        md5={"data_batch_1": "c99cafc152244af753f735de768cd75f",
             "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
             "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
             "test_batch": "40351d587109b95175f43aff81a1287e"}),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz", archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python", label_key="fine_labels", num_classes=100,
        splits={"train": ("train",), "test": ("test",)},
        md5={"train": "16019d7e3df5f24257cddd939b257f8d",
             "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
}

# (module, name) pairs a pickled NumPy array (NumPy 1.x/2.x, protocols 2-5) and its dict need.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers only (CIFAR batches, KITTI Masks' file)."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # NumPy 2 moved numpy.core to numpy._core (the old path still works but warns); 1.x has
        # only numpy.core.
        for candidate in (module.replace("numpy.core.", "numpy._core."),
                          module.replace("numpy._core.", "numpy.core.")):
            try:
                return super().find_class(candidate, name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def layout_hint(name: str, root: Path) -> str:
    spec = SPECS[name]
    files = ", ".join(f for files in spec["splits"].values() for f in files)
    return (f"{name} expects the published python pickles under {Path(root) / spec['folder']}/ "
            f"({files}); "
            f"get {spec['url']} (MD5 {spec['archive_md5']}) and extract it into {root}, "
            "or pass download=True.")


def load_cifar(name: str, root: str | Path, split: str, *, download: bool = False
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Images (N, 32, 32, 3) uint8 C-contiguous, int64 labels and the number of classes."""
    spec = SPECS[name]
    if split not in spec["splits"]:
        raise ValueError(f"{name}: unknown split {split!r}; choose one of {sorted(spec['splits'])}")
    root = Path(root)
    folder = root / spec["folder"]
    files = spec["splits"][split]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        archive = fetch_archive(spec["url"], root / spec["archive"], spec["archive_md5"],
                                layout_hint=layout_hint(name, root))
        extract_tar(archive, root)
        for f in files:
            if not (folder / f).is_file() or md5_file(folder / f) != spec["md5"][f]:
                raise ValueError(f"{folder / f}: missing or MD5 mismatch after extracting "
                                 f"{archive}.\n"
                                 + layout_hint(name, root))
        missing = []
    if missing:
        raise FileNotFoundError(f"{name} split {split!r}: missing "
                                f"{', '.join(str(folder / m) for m in missing)}.\n"
                                + layout_hint(name, root))
    parts = [_read_batch(folder / f, spec["label_key"], spec["num_classes"]) for f in files]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return np.ascontiguousarray(images), labels, spec["num_classes"]


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = ArrayUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # any unpickling failure means the file is not what we expect
        raise ValueError(f"{path}: not a readable CIFAR python pickle "
                         f"({type(exc).__name__}: {exc}); "
                         "the file is truncated or corrupt.") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
    data = batch["data"]
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3072):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be uint8 of shape (n, 3072), got {desc}")
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must be 0..{num_classes - 1}, "
                         f"found [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
