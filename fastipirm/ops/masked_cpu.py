"""Kernel set ``"cpu"`` of ``masked_contrastive_loss``: the four kernels of
:mod:`fastipirm.ops.masked_glue` in C++ (``csrc/masked_contrastive_cpu.cpp``, ops
``torch.ops.fastipirm_ext.masked_{rowstats,colsum,rowsum,grad}`` of the extension
``fastipirm._C``).

The ``Q x K`` pairs are visited in 64 x 64 tiles whose logits are computed on the fly
(register-blocked GEMM micro-kernels for the dot product and the squared distance, a vectorised
elementwise loop over the features for L1 / Lp), so memory stays linear in ``Q + K``; a tile
whose query and key group ranges cannot meet is skipped. OpenMP over row tiles (rowstats,
rowsum), column tiles (colsum) and a fixed grid of row-tile chunks (grad, with per-chunk dk
partials of at most 64 MiB, ``FASTIPIRM_MASKED_CPU_PARTIAL_MB``; beyond it two passes): bitwise
deterministic, and independent of the thread count up to 16 threads. Statistics in float32
(float64 for float64 inputs, so the float64 reference sweep holds to ~1e-12); 16-bit inputs are
read as float32.

The extension is built by ``pip install --no-build-isolation -e .``; :func:`kernels` raises
ImportError saying so when it is missing (``FASTIPIRM_JIT_BUILD=1`` compiles it on first use).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .build import CPU_EXTENSION, import_extension
from .masked_glue import Geometry, MaskedKernels

_OPS = ("masked_rowstats", "masked_colsum", "masked_rowsum", "masked_grad")


def load_extension():
    """Import the compiled extension (registers ``torch.ops.fastipirm_ext``); ImportError with
    the fix when it is not built or predates the masked kernels."""
    ns = getattr(torch.ops, "fastipirm_ext", None)
    if ns is None or not all(hasattr(ns, op) for op in _OPS):
        import_extension(CPU_EXTENSION)
    missing = [op for op in _OPS if not hasattr(torch.ops.fastipirm_ext, op)]
    if missing:
        raise ImportError(f"{CPU_EXTENSION.what} {CPU_EXTENSION.module} has no masked kernels "
                          f"({', '.join(missing)}): it was built before "
                          f"csrc/masked_contrastive_cpu.cpp existed; rebuild it "
                          f"({CPU_EXTENSION.install_hint})")
    return torch.ops.fastipirm_ext


def tiles_computed() -> int:
    """Tiles of pairs the masked kernels have computed since the extension was loaded (tiles
    skipped because their groups cannot meet are not counted)."""
    return int(load_extension().masked_tiles_computed())


class CpuMaskedKernels(MaskedKernels):
    """The C++ kernels behind :mod:`fastipirm.ops.masked_glue` (module docstring)."""

    name = "cpu"

    def check(self, q: Tensor) -> None:
        if q.device.type != "cpu":
            raise ValueError(f"the cpu kernels of masked_contrastive_loss need CPU tensors; got "
                             f"{q.device.type} tensors")

    @staticmethod
    def _geo(geo: Geometry) -> tuple:
        """The geometry as the ops take it: empty int64 tensors stand for None."""
        none = torch.empty(0, dtype=torch.long)

        def index(t):
            return none if t is None else t.to(torch.long).contiguous()

        return (int(geo.code), float(geo.p), float(geo.inv_t), index(geo.qg), index(geo.kg),
                index(geo.exclude))

    @staticmethod
    def _vec(t: Tensor, like: Tensor) -> Tensor:
        return t.to(like.dtype).contiguous()

    def rowstats(self, q, k, w, geo, m0):
        m, z = torch.ops.fastipirm_ext.masked_rowstats(q, k, self._vec(w, q), *self._geo(geo),
                                                       self._vec(m0, q))
        return m, z

    def colsum(self, q, k, geo, m, rho, sigma):
        return torch.ops.fastipirm_ext.masked_colsum(q, k, *self._geo(geo), self._vec(m, q),
                                                     self._vec(rho, q), self._vec(sigma, q))

    def rowsum(self, q, k, w, geo, m, gamma):
        return torch.ops.fastipirm_ext.masked_rowsum(q, k, self._vec(w, q), *self._geo(geo),
                                                     self._vec(m, q), self._vec(gamma, q))

    def grad(self, q, k, w, geo, m, alpha, beta, gamma):
        empty = q.new_empty(0)
        penalty = gamma is not None
        dq, dk = torch.ops.fastipirm_ext.masked_grad(
            q, k, self._vec(w, q), *self._geo(geo), self._vec(m, q), self._vec(alpha, q),
            self._vec(beta, q) if penalty else empty, self._vec(gamma, q) if penalty else empty)
        return dq, dk


def kernels() -> CpuMaskedKernels:
    """The kernel set (raises ImportError with the fix when the extension is not built)."""
    load_extension()
    return CpuMaskedKernels()
