"""Small helpers of the Triton kernels and their registry (no Triton import here): what the
kernel modules share besides their kernels (the interpreter's environment around a launch, the
input precisions of their dots, the block sizes)."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch


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


@contextlib.contextmanager
def interpreter_env():
    """``TRITON_INTERPRET=1`` around an interpreted launch (the interpreter's builtins check the
    variable at run time too), restored afterwards."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def input_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """``(similarity GEMM, fp32 dots)`` ``input_precision`` of ``tl.dot`` for features of
    ``dtype``: fp32 features ``"ieee"`` (exact) unless ``torch.get_float32_matmul_precision() !=
    "highest"`` (then ``"tf32"``) for both; fp16/bf16 ``"tf32"``, ``tl.dot``'s default, a no-op for
    half operands (the similarity) and tf32 for the fp32 dots."""
    exact = torch.get_float32_matmul_precision() == "highest"
    if dtype == torch.float32:
        p = "ieee" if exact else "tf32"
        return p, p
    return "tf32", "tf32"
