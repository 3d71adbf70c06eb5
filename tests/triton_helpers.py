"""What the tests of the Triton kernels share (tests/test_triton_backend.py,
tests/test_masked_triton.py): importing the kernels under the interpreter, and the marks that
select the interpreter tests or the GPU tests.

Triton decides when it decorates a kernel (the first import of its module) whether the kernel is
interpreted, so :func:`import_interpreted` sets ``TRITON_INTERPRET=1`` for that import unless the
variable is already set (``TRITON_INTERPRET=0`` selects the GPU), and restores it afterwards so
that other test modules of the same session (and the subprocesses they start) do not see it.
"""
from __future__ import annotations

import os

import pytest
import torch


def import_interpreted(*modules: str) -> tuple:
    """``(triton, *modules)`` imported with ``TRITON_INTERPRET`` defaulting to 1 (the calling
    test module is skipped where one of them cannot be imported)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        return tuple(pytest.importorskip(name) for name in ("triton", *modules))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def old_interpreter_with_new_numpy(triton) -> bool:
    """Triton 3.6's interpreter does ``int()`` of 1-element arrays (loop bounds), an error since
    NumPy 2.4; Triton 3.9 is fine (3.6 + NumPy 2.2 passes these tests too)."""
    import numpy as np
    try:
        int(np.array([1]))
        return False
    except TypeError:
        return tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9)


def interpreter_mark(triton, interpreted: bool):
    """Skips a test unless the kernels were created under the interpreter (and it can run)."""
    return pytest.mark.skipif(
        not interpreted or old_interpreter_with_new_numpy(triton),
        reason="kernels were not created under TRITON_INTERPRET=1 (run this module in its own "
               "pytest process), or Triton < 3.9's interpreter with NumPy >= 2.4")


def cuda_or_skip(interpreted: bool) -> None:
    """In a ``gpu`` test: skip unless the kernels were compiled for a CUDA device that exists."""
    if interpreted:
        pytest.skip("kernels are interpreted: run with TRITON_INTERPRET=0 for the GPU tests")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def compile_without_interpreter(script: str, args: list, tmp_path, timeout: int = 600
                                ) -> list[str]:
    """Run the compile check ``script`` (``python -c``, with ``args``) from the repository root
    in a subprocess without ``TRITON_INTERPRET`` and with its own Triton cache; its output
    lines (the test fails on a non-zero exit, with the end of its stderr)."""
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def shared_memory_limit(arch) -> int:
    """Bytes of shared memory a block may use on sm_80 (A100) or sm_90 (H100)."""
    return (163 if int(arch) == 80 else 227) * 1024
