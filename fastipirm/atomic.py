"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Everything fastipirm writes into a run directory (checkpoint, resolved config, CSV logs, summary)
goes through :func:`atomic_file`: the content is written to a hidden temporary file in the same
folder, flushed to disk, then renamed over the target with ``os.replace`` (atomic on POSIX and
Windows). If writing fails, the temporary file is removed and the previous file is untouched.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """``with atomic_file(path, "w") as fh: ...``: ``fh`` is the temporary file; on success it
    replaces ``path``. ``mode`` is ``"w"`` (text, ``newline=""`` so CSV writers control line
    ends) or ``"wb"``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **({} if mode == "wb" else {"newline": ""})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path, "w") as fh:
        fh.write(text)
