"""Backend ``"cuda"``: the CUDA kernels of ``csrc/env_contrastive_cuda_kernels.cu``.

The three kernels of :mod:`fastipirm.ops.fused` (row statistics, band reductions, gradients) as
hand-written CUDA, the second GPU implementation beside the Triton kernels
(``kernels/env_contrastive.py``), computing the same thing: row blocks of the ``N x N``
similarity, similarity tiles on tensor cores (``nvcuda::wmma``, fp32 accumulation) for
float16/bfloat16 inputs, exact fp32 FMAs for float32 inputs (TF32 tensor cores only when
``torch.get_float32_matmul_precision() != "highest"``, the Triton backend's rule), no atomics
(deterministic), no ``N x N`` buffer. float64 inputs are computed in float32 and returned as
float64 (as the Triton backend). The O(N M) glue is the shared torch code of
:mod:`fastipirm.ops.fused`; registered as ``torch.library`` custom ops, so a training step with it
compiles.

The extension ``fastipirm._cuda`` (``csrc/env_contrastive_cuda.cpp`` + the ``.cu``) is built by
``setup.py`` when torch has CUDA and ``nvcc`` is found (``pip install --no-build-isolation -e .``);
when it is missing, :func:`load_extension` says so and ``FASTIPIRM_JIT_BUILD=1`` compiles it on
first use with ``torch.utils.cpp_extension.load`` (needs CUDA and ``nvcc``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .fused import FusedKernels, register_fused_backend

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SOURCES = ["env_contrastive_cuda.cpp", "env_contrastive_cuda_kernels.cu"]
# sm_80 (A100) and sm_90 (H100/H200) machine code; no PTX (an unknown GPU gets a clear error at
# launch rather than a slow JIT). No --use_fast_math: it would flush denormals and swap in the
# approximate division / square root for no gain, since the exponentials are already exp2f
# (MUFU.EX2) on pre-scaled arguments.
NVCC_FLAGS = ["-O3", "-gencode", "arch=compute_80,code=sm_80",
              "-gencode", "arch=compute_90,code=sm_90", "-lineinfo"]
CXX_FLAGS = ["-O3"]

_INSTALL_HINT = ("install with `pip install --no-build-isolation -e .` on a machine with a CUDA "
                 "build of torch and nvcc (FASTIPIRM_CUDA=1 forces the CUDA build), or set "
                 "FASTIPIRM_JIT_BUILD=1 to compile it on first use")


def _ops_registered() -> bool:
    return hasattr(torch.ops.fastipirm_cuda, "rowstats")


def _jit_build():
    from torch.utils.cpp_extension import load

    sources = [str(CSRC / s) for s in CUDA_SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise ImportError(f"cannot JIT-build the CUDA kernels: sources missing: {missing}")
    return load(name="fastipirm_cuda_ext", sources=sources, extra_cflags=CXX_FLAGS,
                extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(CSRC)], verbose=False)


def _import_extension():
    """Import ``fastipirm._cuda`` (registers ``torch.ops.fastipirm_cuda``), or JIT-build it when
    ``FASTIPIRM_JIT_BUILD=1`` and CUDA is available; otherwise raise ImportError with the fix."""
    try:
        from .. import _cuda  # noqa: F401  (built by setup.py)
    except ImportError as exc:
        if os.environ.get("FASTIPIRM_JIT_BUILD", "0") == "1" and torch.cuda.is_available():
            _jit_build()
        else:
            raise ImportError(f"the CUDA extension fastipirm._cuda is not built ({exc}): "
                              + _INSTALL_HINT) from exc


def load_extension():
    """The ``torch.ops.fastipirm_cuda`` namespace (importing or building the extension first)."""
    if not _ops_registered():
        _import_extension()
    return torch.ops.fastipirm_cuda


def _allow_tf32(dtype: torch.dtype) -> bool:
    """TF32 similarity tiles for float32 features: torch's float32 matmul precision decides."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


class CudaKernels(FusedKernels):
    """The CUDA kernels behind :mod:`fastipirm.ops.fused` (float32 statistics)."""

    name = "cuda"

    def check(self, z1: torch.Tensor) -> None:
        if z1.device.type != "cuda":
            raise RuntimeError(f"the cuda backend needs CUDA tensors; got {z1.device.type} "
                               "tensors")

    def rowstats(self, feats, spos, w2, batch, t1, t2, two_t, cache=None):
        mrow, zn, znt = torch.ops.fastipirm_cuda.rowstats(
            feats, spos.float().contiguous(), w2.float().contiguous(), batch, t1, t2, two_t,
            _allow_tf32(feats.dtype))
        return mrow, zn, (znt if two_t else zn)

    def band(self, feats, mrow, fac, nb_out, batch, t2, trans, nb, cache=None):
        return torch.ops.fastipirm_cuda.band(feats, mrow.contiguous(), fac.float().contiguous(),
                                             nb_out, batch, t2, trans, nb,
                                             _allow_tf32(feats.dtype))

    def grad(self, feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw,
             cache=None):
        df, gw = torch.ops.fastipirm_cuda.grad(
            feats, mrow.contiguous(), w2.float().contiguous(), gz1.float().contiguous(),
            gz2.float().contiguous(), rc.float().contiguous(), gacc.float().contiguous(), batch,
            t1, t2, two_t, need_gw, _allow_tf32(feats.dtype))
        return df, (gw if need_gw else None)


CUDA_KERNELS = CudaKernels()


def load_cuda_backend():
    """The backend function; raises (with the reason and the fix) when it cannot run here."""
    if torch.version.cuda is None:
        raise ImportError(f"torch {torch.__version__} is a build without CUDA; the cuda backend "
                          "needs a CUDA build of torch")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")
    load_extension()
    return register_fused_backend(CUDA_KERNELS)


def env_contrastive_loss_cuda_eager(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor,
                                    *, temperature: float, irm_temperature: float, soft: bool,
                                    penalty: str = "slot", nonorm: bool = False
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernels through :class:`fastipirm.ops.fused.FusedFunction` (plain eager autograd,
    no custom-op boundary; for tests that watch every tensor the implementation allocates)."""
    from .fused import fused_eager
    load_extension()
    return fused_eager(CUDA_KERNELS, z1, z2, env_weights, temperature=temperature,
                       irm_temperature=irm_temperature, soft=soft, penalty=penalty, nonorm=nonorm)
