"""Kernel set ``"triton"`` of ``masked_contrastive_loss``: the Triton kernels of
:mod:`fastipirm.kernels.masked_contrastive` behind the shared glue
(:mod:`fastipirm.ops.masked_glue`).

Dtypes: float32 statistics for every input dtype. The kernels read fp16/bf16/fp32 features as
they are and float64 features as float32 copies. The glue, which computes the targets' logits
and their gradients in torch on the tensors :meth:`TritonMaskedKernels.feats` returns, gets
float32 tensors (exact upcasts of fp16/bf16, so its target terms are as accurate as the torch
kernel set's); the tensor the kernels read rides along as an attribute of that upcast
(:func:`_kernel_feats`). The custom op therefore returns float32 losses and key gradients (also
for float64 inputs) and feature gradients in the inputs' dtype.

Tile skipping: with groups, the per-block min/max group ids of the queries and keys (a few torch
ops, no host synchronisation) give, for each block of one dimension, the blocks of the other
that it can meet (:func:`tile_plan`); the kernels visit only those. The plan is cached on the
call's :class:`Geometry` (the forward's ``rowstats`` and ``colsum`` share one, as do the
backward's kernels).

Importing the kernels imports Triton and decorates them: on CPU tensors they run only in Triton's
interpreter, which ``TRITON_INTERPRET=1`` must select before that first import
(:func:`fastipirm.kernels.utils.is_interpreter`); :func:`kernels` raises with the reason when the
set cannot run here (no Triton, or no CUDA and no interpreter).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.utils import triton_available
from .masked_glue import Geometry, MaskedKernels


def _block_ranges(g: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per block of ``block`` consecutive entries of ``g``: ``(min, max)`` group id."""
    n = g.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        g = torch.cat([g, g[-1:].expand(pad)])
    g = g.view(nb, block)
    return g.amin(1), g.amax(1)


def _lists(meet: Tensor) -> tuple[Tensor, Tensor]:
    """``(cnt, list)`` int32: for each row of ``meet`` (bool), how many of its columns are true
    and (first ``cnt`` entries, in increasing order) which."""
    cnt = meet.sum(1, dtype=torch.int32)
    order = torch.argsort((~meet).to(torch.uint8), dim=1, stable=True)
    return cnt.contiguous(), order.to(torch.int32).contiguous()


def tile_plan(qg: Tensor, kg: Tensor, block_m: int, block_n: int
              ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(row_plan, col_plan)``: the column blocks each row block of ``block_m`` queries may
    meet, and the row blocks of each column block of ``block_n`` keys (a pair of blocks meets
    when their group ranges ``[min, max]`` overlap; a tile outside every such pair has no
    negative)."""
    q_lo, q_hi = _block_ranges(qg, block_m)
    k_lo, k_hi = _block_ranges(kg, block_n)
    meet = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])
    return _lists(meet), _lists(meet.T)


def _kernel_feats(t: Tensor) -> Tensor:
    """What the kernels read for a feature tensor from :meth:`TritonMaskedKernels.feats`: the
    original fp16/bf16 tensor where there was one."""
    return getattr(t, "_fastipirm_kernel_feats", t)


class TritonMaskedKernels(MaskedKernels):
    """The Triton kernels behind :mod:`fastipirm.ops.masked_glue` (float32 statistics)."""

    name = "triton"

    def __init__(self):
        from ..kernels import masked_contrastive
        self.K = masked_contrastive

    def check(self, q: Tensor) -> None:
        if q.device.type != "cuda" and not self.K.INTERPRETED:
            raise RuntimeError("the triton kernel set needs CUDA tensors (or TRITON_INTERPRET=1 "
                               f"with CPU tensors); got {q.device.type} tensors")

    def stat_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def feats(self, t: Tensor) -> Tensor:
        """A float32 tensor for the glue; the kernels read fp16/bf16 features as they are.

        The glue computes the targets' logits and gradients in torch on what this returns, so
        fp16/bf16 are upcast (exactly) for it, and the half tensor rides along as an attribute
        that :func:`_kernel_feats` hands to the kernels (tensor-core similarity, half the
        bytes). float64 is computed in float32.
        """
        if t.dtype in (torch.float16, torch.bfloat16):
            half = t.contiguous()
            out = half.float()
            out._fastipirm_kernel_feats = half
            return out
        return t.float().contiguous()

    def problem(self, q: Tensor, geo: Geometry):
        """The kernels' view of a call (tiles, and the tile plans with groups), cached on
        ``geo``."""
        cache = geo.__dict__.setdefault("_triton_problems", {})
        key = (q.shape[1], q.dtype, q.device)
        if key not in cache:
            plans = {}

            def tiling(blocks):
                if geo.qg is None:
                    return self.K.Tiling(blocks)
                shape = (blocks.block_m, blocks.block_n)
                if shape not in plans:
                    plans[shape] = tile_plan(geo.qg, geo.kg, *shape)
                return self.K.Tiling(blocks, *plans[shape])

            fwd, bwd = self.K.blocks(geo.code, q.shape[1], geo.qg is not None, q.dtype)
            exclude = None if geo.exclude is None else geo.exclude.contiguous()
            cache[key] = self.K.Problem(geo.code, float(geo.p or 0.0), float(geo.inv_t),
                                        geo.qg, geo.kg, exclude, tiling(fwd), tiling(bwd))
        return cache[key]

    @staticmethod
    def _f32(t: Tensor) -> Tensor:
        return t.to(torch.float32).contiguous()

    def _args(self, q, k, geo):
        qk, kk = _kernel_feats(q), _kernel_feats(k)
        return qk, kk, self.problem(qk, geo)

    def rowstats(self, q, k, w, geo, m0):
        q, k, prob = self._args(q, k, geo)
        return self.K.rowstats(q, k, self._f32(w), self._f32(m0), prob)

    def colsum(self, q, k, geo, m, rho, sigma):
        q, k, prob = self._args(q, k, geo)
        return self.K.colsum(q, k, self._f32(m), self._f32(rho), self._f32(sigma), prob)

    def rowsum(self, q, k, w, geo, m, gamma):
        q, k, prob = self._args(q, k, geo)
        return self.K.rowsum(q, k, self._f32(w), self._f32(m), self._f32(gamma), prob)

    def grad(self, q, k, w, geo, m, alpha, beta, gamma):
        q, k, prob = self._args(q, k, geo)
        has_gamma = gamma is not None
        return self.K.grad(q, k, self._f32(w), self._f32(m), self._f32(alpha),
                           self._f32(beta) if has_gamma else None,
                           self._f32(gamma) if has_gamma else None, prob)


def kernels() -> TritonMaskedKernels:
    """The kernel set, or an error saying why it cannot run here."""
    if not triton_available():
        raise ImportError("the 'triton' package is not installed (pip install triton; it ships "
                          "with the CUDA builds of torch on Linux)")
    try:
        kern = TritonMaskedKernels()
    except ImportError as exc:
        raise ImportError(f"the Triton kernels (fastipirm.kernels.masked_contrastive) cannot be "
                          f"imported: {exc}") from exc
    if not kern.K.INTERPRETED and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available (set TRITON_INTERPRET=1 before importing "
                           "fastipirm to run the Triton kernels in the CPU interpreter, for tests)")
    return kern
