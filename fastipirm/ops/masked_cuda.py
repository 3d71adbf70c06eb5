"""Kernel set ``"cuda"`` of ``masked_contrastive_loss``: the hand-written CUDA kernels of
``csrc/masked_contrastive_cuda_kernels.cu`` behind the shared glue
(:mod:`fastipirm.ops.masked_glue`).

The four kernels of the glue's contract (``torch.ops.fastipirm_cuda.masked_{rowstats, colsum,
rowsum, grad}``, bindings in ``csrc/masked_contrastive_cuda.cpp``): blocks of 64 queries (or
keys) streaming over tiles of 64 keys (or queries), the similarity tile in shared memory (dot
product and squared distance on tensor cores for float16/bfloat16, exact fp32 FMAs for float32,
TF32 tensor cores only when ``torch.get_float32_matmul_precision() != "highest"``; the l1 / lp
distances elementwise in fp32), the group masks and the exclusion lists applied per tile, tiles
whose query and key groups cannot meet skipped, float32 statistics, no atomics (deterministic),
memory linear in ``Q + K``; the gradient as two passes (``dq`` and ``dk``).

Dtypes: the glue computes (the targets' logits and gradients, the O((Q + K) D) algebra) on what
:meth:`CudaMaskedKernels.feats` returns: float32 for float16/bfloat16/float32 inputs (16-bit
features are upcast exactly for the glue; the kernels read the 16-bit tensor itself, which rides
along as an attribute of the copy) and float64 for float64 inputs (the kernels read a float32
copy; the op returns float64 losses and gradients of float32 accuracy, as the public op
documents).

The kernels live in the CUDA extension ``fastipirm._cuda`` (built by ``setup.py`` when torch has
CUDA and ``nvcc`` is found; ``FASTIPIRM_JIT_BUILD=1`` compiles it on first use): :func:`kernels`
raises with the reason when torch has no CUDA, there is no device, or the extension (or its
masked kernels) is not built.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .build import CUDA_EXTENSION, import_extension
from .cuda_backend import require_cuda
from .masked_glue import Geometry, MaskedKernels

#: attribute of a glue feature tensor holding the tensor the kernels read
_KERNEL_FEATS = "_fastipirm_cuda_kernel_feats"


def _ops_registered() -> bool:
    return hasattr(torch.ops.fastipirm_cuda, "masked_rowstats")


def load_extension():
    """The ``torch.ops.fastipirm_cuda`` namespace with the masked kernels (importing the extension
    first, or JIT-building it when ``FASTIPIRM_JIT_BUILD=1`` and CUDA is available; else
    ImportError with the fix)."""
    if not _ops_registered():
        import_extension(CUDA_EXTENSION, can_jit_build=lambda: torch.cuda.is_available())
        if not _ops_registered():
            raise ImportError(f"{CUDA_EXTENSION.what} {CUDA_EXTENSION.module} was built without "
                              "the masked_contrastive_loss kernels (an older build): rebuild it; "
                              f"{CUDA_EXTENSION.install_hint}")
    return torch.ops.fastipirm_cuda


def allow_tf32(dtype: torch.dtype, code: int) -> bool:
    """TF32 similarity tiles: float32 features, dot or squared distance, and torch's float32
    matmul precision allows it (the rule of the env op's CUDA and Triton backends)."""
    return dtype == torch.float32 and code in (0, 1) and \
        torch.get_float32_matmul_precision() != "highest"


class CudaMaskedKernels(MaskedKernels):
    """The CUDA kernels behind the glue (float32 statistics). ``ops``: the namespace of the four
    ops (``torch.ops.fastipirm_cuda``; the tests pass a host emulation); ``target_blocks``: the
    grid the split of the streamed side aims at (0: twice the multiprocessors)."""

    name = "cuda"

    def __init__(self, ops=None, target_blocks: int = 0):
        self._ops = ops
        self.target_blocks = target_blocks

    @property
    def ops(self):
        return self._ops if self._ops is not None else torch.ops.fastipirm_cuda

    def check(self, q: Tensor) -> None:
        if q.device.type != "cuda":
            raise RuntimeError(f"the cuda kernel set needs CUDA tensors; got {q.device.type} "
                               "tensors")

    def feats(self, t: Tensor) -> Tensor:
        """float32 (float64 for float64 inputs) for the glue; a 16-bit original rides along as an
        attribute of its (fresh) float32 copy, for the kernels."""
        if t.dtype in (torch.float16, torch.bfloat16):
            out = t.float().contiguous()
            setattr(out, _KERNEL_FEATS, t.contiguous())
            return out
        return t.contiguous() if t.dtype == torch.float64 else t.float().contiguous()

    @staticmethod
    def _feats(t: Tensor, code: int) -> Tensor:
        """What the kernels read for the glue tensor ``t``: the 16-bit original for the dot
        product and the squared distance (tensor cores), else float32 (the l1 / lp tiles read
        float32; float64 inputs are computed in float32)."""
        kern = getattr(t, _KERNEL_FEATS, t) if code < 2 else t
        if kern.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            kern = kern.float()
        return kern.contiguous()

    def _common(self, q: Tensor, k: Tensor, geo: Geometry):
        """``(q, k)`` for the kernels and the trailing arguments of every op."""
        code = int(geo.code)
        exclude = None if geo.exclude is None or geo.exclude.numel() == 0 else \
            geo.exclude.to(torch.int64).contiguous()
        qg = None if geo.qg is None else geo.qg.to(torch.int64).contiguous()
        kg = None if geo.kg is None else geo.kg.to(torch.int64).contiguous()
        tail = (qg, kg, exclude, code, float(geo.p or 0.0), float(geo.inv_t),
                allow_tf32(q.dtype, code), int(self.target_blocks))
        return self._feats(q, code), self._feats(k, code), tail

    @staticmethod
    def _f32(t: Tensor) -> Tensor:
        return t.to(torch.float32).contiguous()

    def rowstats(self, q, k, w, geo, m0):
        sd = self.stat_dtype(q.dtype)
        qk, kk, tail = self._common(q, k, geo)
        m, z = self.ops.masked_rowstats(qk, kk, self._f32(w), self._f32(m0), *tail)
        return m.to(sd), z.to(sd)

    def colsum(self, q, k, geo, m, rho, sigma):
        qk, kk, tail = self._common(q, k, geo)
        a = self.ops.masked_colsum(qk, kk, self._f32(m), self._f32(rho), self._f32(sigma), *tail)
        return a.to(self.stat_dtype(q.dtype))

    def rowsum(self, q, k, w, geo, m, gamma):
        qk, kk, tail = self._common(q, k, geo)
        r = self.ops.masked_rowsum(qk, kk, self._f32(w), self._f32(m), self._f32(gamma), *tail)
        return r.to(self.stat_dtype(q.dtype))

    def grad(self, q, k, w, geo, m, alpha, beta, gamma):
        sd = self.stat_dtype(q.dtype)
        qk, kk, tail = self._common(q, k, geo)
        second = gamma is not None
        dq, dk = self.ops.masked_grad(qk, kk, self._f32(w), self._f32(m), self._f32(alpha),
                                      self._f32(beta) if second else None,
                                      self._f32(gamma) if second else None, *tail)
        return dq.to(sd), dk.to(sd)


def kernels() -> CudaMaskedKernels:
    """The kernel set, or an error saying why it cannot run here."""
    require_cuda("the cuda kernel set")
    load_extension()
    return CudaMaskedKernels()
