"""Backend ``"cpu"``: the C++ CPU kernel of ``csrc/env_contrastive_cpu.cpp``.

The three kernels of :mod:`fastipirm.ops.fused` (row statistics, band reductions, gradients) in
C++: symmetric tile pairs (each similarity tile serves both of its anchor sets), register-blocked
GEMM micro-kernels, a vectorised exponential, OpenMP over tile pairs with deterministic
per-thread reductions, and a similarity tile cache: the row statistics store the tiles of
``F F^T`` and the three later kernels (forward band reduction, backward band reduction, gradients)
read them, so one forward and backward compute the similarity once instead of four times. The
cache is a fixed budget (``FASTIPIRM_CPU_SIM_CACHE_MB``, default 128 MiB, 0 disables it;
2B=2048 needs 8.6 MiB in float32) saved from the forward to the backward; tiles beyond it are
recomputed, so memory stays linear in the batch plus that constant. The O(N M) glue is the shared
torch code of :mod:`fastipirm.ops.fused`, as for the Triton and CUDA backends. Registered as
``torch.library`` custom ops, so a training step with it compiles.

The extension is built by ``setup.py`` (``pip install --no-build-isolation -e .``) as
``fastipirm._C`` with the flags of :mod:`fastipirm.ops.build`; when it is missing,
:func:`load_extension` says so and ``FASTIPIRM_JIT_BUILD=1`` compiles it on first use with
``torch.utils.cpp_extension.load``.
"""
from __future__ import annotations

import os

import torch

from .build import CPU_EXTENSION, import_extension
from .fused import FusedKernels, register_fused_backend

SIM_TILE = 64  # kTile of csrc/env_contrastive_cpu.cpp
CACHE_ENV = "FASTIPIRM_CPU_SIM_CACHE_MB"
DEFAULT_CACHE_MB = 128.0


def sim_cache_budget_mb() -> float:
    """The similarity cache budget in MiB: ``FASTIPIRM_CPU_SIM_CACHE_MB``, default 128."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_MB
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{CACHE_ENV} must be a number of MiB (0 disables the cache); got "
                         f"{raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{CACHE_ENV} must be >= 0 MiB; got {raw!r}")
    return value


def sim_cache_tiles(n: int, element_size: int, budget_mb: float) -> int:
    """How many of the unordered ``SIM_TILE`` tile pairs of an ``n``-row similarity fit the
    budget."""
    nt = -(-n // SIM_TILE)
    return min(nt * (nt + 1) // 2, int(budget_mb * 2**20) // (SIM_TILE * SIM_TILE * element_size))


def load_extension():
    """Import the compiled extension (registers ``torch.ops.fastipirm_ext``); raise with the fix."""
    if not (hasattr(torch.ops, "fastipirm_ext") and hasattr(torch.ops.fastipirm_ext, "rowstats")):
        import_extension(CPU_EXTENSION)
    return torch.ops.fastipirm_ext


class CpuKernels(FusedKernels):
    """The C++ kernels behind :mod:`fastipirm.ops.fused`: float32 statistics, float64 for float64
    inputs (so the float64 reference sweep holds to ~1e-12). ``cache_mb``: the similarity cache
    budget (None: :func:`sim_cache_budget_mb` at every call)."""

    name = "cpu"

    def __init__(self, cache_mb: float | None = None):
        if cache_mb is not None and not cache_mb >= 0:
            raise ValueError(f"cache_mb must be >= 0; got {cache_mb}")
        self.cache_mb = cache_mb

    def sim_cache_shape(self, n, dtype):
        budget = sim_cache_budget_mb() if self.cache_mb is None else self.cache_mb
        tiles = sim_cache_tiles(n, torch.empty(0, dtype=dtype).element_size(), budget)
        return (tiles, SIM_TILE, SIM_TILE) if tiles else (0,)

    def check(self, z1: torch.Tensor) -> None:
        if z1.device.type != "cpu":
            raise ValueError(f"the cpu backend needs CPU tensors; got {z1.device.type} tensors")

    def stat_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def feats(self, z1, z2):
        return torch.cat([z1, z2]).to(self.stat_dtype(z1.dtype)).contiguous()

    @staticmethod
    def _cache(cache, feats):
        return feats.new_empty(0) if cache is None else cache

    def rowstats(self, feats, spos, w2, batch, t1, t2, two_t, cache=None):
        mrow, zn, znt = torch.ops.fastipirm_ext.rowstats(feats, spos.contiguous(), w2, batch,
                                                          t1, t2, two_t, self._cache(cache, feats))
        return mrow, zn, znt

    def band(self, feats, mrow, fac, nb_out, batch, t2, trans, nb, cache=None):
        return torch.ops.fastipirm_ext.band(feats, mrow, fac.contiguous(), nb_out, batch, t2,
                                            trans, nb, self._cache(cache, feats))

    def grad(self, feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw,
             cache=None):
        df, gw = torch.ops.fastipirm_ext.grad(
            feats, mrow, w2.to(feats.dtype).contiguous(), gz1.contiguous(), gz2.contiguous(),
            rc.contiguous(), gacc.contiguous(), batch, t1, t2, two_t, need_gw,
            self._cache(cache, feats))
        return df, (gw if need_gw else None)


def load_cpu_backend():
    """The backend function (loads the extension first; raises ImportError when it cannot)."""
    load_extension()
    return register_fused_backend(CpuKernels())
