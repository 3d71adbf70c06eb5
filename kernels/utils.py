"""Small helpers of the Triton kernels and their registry (no Triton import here)."""
from __future__ import annotations

import importlib.util
import os


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must be set before ``triton`` decorates the kernels (before the first import
    of ``fastipirm.kernels.env_contrastive``); see ``docs/kernels.md#triton-interpreter``. The
    one place that reads the variable (the backend registry asks it too).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a usable device)."""
    return importlib.util.find_spec("triton") is not None


def next_pow2(x: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(x, minimum) (tl.dot needs every dimension >= 16)."""
    x = max(int(x), minimum)
    return 1 << (x - 1).bit_length()
