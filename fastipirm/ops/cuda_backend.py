"""Backend ``"cuda"``: the CUDA kernels of ``csrc/env_contrastive_cuda_kernels.cu``.

The three kernels of :mod:`fastipirm.ops.fused` (row statistics, band reductions, gradients) as
hand-written CUDA, the second GPU implementation beside the Triton kernels
(:mod:`fastipirm.kernels.env_contrastive`), computing the same thing: row blocks of the ``N x N``
similarity, similarity tiles on tensor cores (``nvcuda::wmma``, fp32 accumulation) for
float16/bfloat16 inputs, exact fp32 FMAs for float32 inputs (TF32 tensor cores only when
``torch.get_float32_matmul_precision() != "highest"``, the Triton backend's rule), no atomics
(deterministic), no ``N x N`` buffer. float64 inputs are computed in float32 and returned as
float64 (as the Triton backend). The O(N M) glue is the shared torch code of
:mod:`fastipirm.ops.fused`; registered as ``torch.library`` custom ops, so a training step with it
compiles.

The extension ``fastipirm._cuda`` (``csrc/env_contrastive_cuda.cpp`` + the ``.cu``) is built by
``setup.py`` with the flags of :mod:`fastipirm.ops.build` when torch has CUDA and ``nvcc`` is
found (``pip install --no-build-isolation -e .``); when it is missing, :func:`load_extension` says
so and ``FASTIPIRM_JIT_BUILD=1`` compiles it on first use with ``torch.utils.cpp_extension.load``
(needs CUDA and ``nvcc``).
"""
from __future__ import annotations

import torch

from .build import CUDA_EXTENSION, import_extension
from .fused import FusedKernels, fused_eager, register_fused_backend
from .spec import EnvContrastiveSpec


def _ops_registered() -> bool:
    return hasattr(torch.ops.fastipirm_cuda, "rowstats")


def load_extension():
    """The ``torch.ops.fastipirm_cuda`` namespace (importing the extension first, or JIT-building
    it when ``FASTIPIRM_JIT_BUILD=1`` and CUDA is available; else ImportError with the fix)."""
    if not _ops_registered():
        import_extension(CUDA_EXTENSION, can_jit_build=lambda: torch.cuda.is_available())
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


def require_cuda(what: str) -> None:
    """Raise unless torch is a CUDA build (ImportError) with a device (RuntimeError); ``what``
    (the code that needs them) is named in the message. Shared with the masked op's kernel set
    (:mod:`fastipirm.ops.masked_cuda`)."""
    if torch.version.cuda is None:
        raise ImportError(f"torch {torch.__version__} is a build without CUDA; {what} needs a "
                          "CUDA build of torch")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")


def load_cuda_backend():
    """The backend function; raises (with the reason and the fix) when it cannot run here."""
    require_cuda("the cuda backend")
    load_extension()
    return register_fused_backend(CUDA_KERNELS)


def env_contrastive_loss_cuda_eager(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor,
                                    spec: EnvContrastiveSpec | None = None, **options
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernels through :class:`fastipirm.ops.fused.FusedFunction` (plain eager autograd,
    no custom-op boundary; for tests that watch every tensor the implementation allocates)."""
    load_extension()
    return fused_eager(CUDA_KERNELS, z1, z2, env_weights, spec, **options)
