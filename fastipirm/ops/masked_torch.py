"""Kernel set ``"torch"`` of ``masked_contrastive_loss``: the four kernels of
:mod:`fastipirm.ops.masked_glue` as blocked torch code.

The ``Q x K`` pairs are visited in tiles of ``rows x cols`` (at most about
``FASTIPIRM_TORCH_CHUNK_ELEMENTS`` pairs, or pair-dimensions for the elementwise distances), so
memory stays linear in ``Q + K``; a tile whose query and key groups cannot meet (disjoint
ranges of group ids, e.g. different domain blocks) is skipped. Runs on any device and dtype;
statistics in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .masked_glue import Geometry, MaskedKernels
from .masked_similarity import DOT, SQEUCLIDEAN, pairwise, pairwise_grads

CHUNK_ELEMENTS = int(os.environ.get("FASTIPIRM_TORCH_CHUNK_ELEMENTS", 1 << 22))


class TorchMaskedKernels(MaskedKernels):
    name = "torch"

    def _tiles(self, q: Tensor, k: Tensor, geo: Geometry):
        """Yield ``(rows, cols, mask, x)`` for every tile with at least one possible negative:
        slices, the (R, C) negative mask (or None: all) and the logits ``x = s / T``."""
        n_q, n_k, d = q.shape[0], k.shape[0], q.shape[1]
        per_pair = 1 if geo.code in (DOT, SQEUCLIDEAN) else d
        cols = max(1, min(n_k, CHUNK_ELEMENTS // per_pair))
        rows = max(1, min(n_q, CHUNK_ELEMENTS // (cols * per_pair)))
        ranges = None
        if geo.qg is not None:      # one host read of the tiles' group ranges
            def span(g, step):
                return [(int(g[i:i + step].min()), int(g[i:i + step].max()))
                        for i in range(0, g.shape[0], step)]
            ranges = (span(geo.qg.cpu(), rows), span(geo.kg.cpu(), cols))
        key_index = torch.arange(n_k, device=q.device)
        for bi, r0 in enumerate(range(0, n_q, rows)):
            r = slice(r0, min(n_q, r0 + rows))
            for bj, c0 in enumerate(range(0, n_k, cols)):
                c = slice(c0, min(n_k, c0 + cols))
                if ranges is not None:
                    (qa, qb), (ka, kb) = ranges[0][bi], ranges[1][bj]
                    if qb < ka or kb < qa:
                        continue
                mask = None
                if geo.qg is not None:
                    mask = geo.qg[r][:, None] == geo.kg[c][None, :]
                if geo.exclude is not None:
                    hit = (geo.exclude[r][:, :, None] == key_index[c][None, None, :]).any(1)
                    mask = ~hit if mask is None else mask & ~hit
                yield r, c, mask, pairwise(q[r], k[c], geo.code, geo.p) * geo.inv_t

    @staticmethod
    def _weighted(mask, w: Tensor):
        """``mask`` without the zero-weight columns (they set no row shift, and ``0 * e^{x - m}``
        must not become NaN when that exponential overflows)."""
        nonzero = (w > 0)[None, :]
        return nonzero if mask is None else mask & nonzero

    @staticmethod
    def _exp(x: Tensor, m: Tensor, mask) -> Tensor:
        e = torch.exp(x - m[:, None])
        return e if mask is None else torch.where(mask, e, torch.zeros((), dtype=e.dtype,
                                                                        device=e.device))

    def rowstats(self, q, k, w, geo, m0):
        m = m0.clone()
        z = torch.zeros_like(m0)
        for r, c, mask, x in self._tiles(q, k, geo):
            mask = self._weighted(mask, w[c])
            xm = x.masked_fill(~mask, float("-inf"))
            new = torch.maximum(m[r], xm.amax(1))
            scale = torch.where(torch.isfinite(new), torch.exp(m[r] - new), 1.0)
            z[r] = z[r] * scale + (self._exp(x, new, mask) * w[c]).sum(1)
            m[r] = new
        return m, z

    def colsum(self, q, k, geo, m, rho, sigma):
        a = torch.zeros(k.shape[0], dtype=m.dtype, device=m.device)
        for r, c, mask, x in self._tiles(q, k, geo):
            e = self._exp(x, m[r], mask)
            a[c] += (e * (rho[r, None] * x + sigma[r, None])).sum(0)
        return a

    def rowsum(self, q, k, w, geo, m, gamma):
        out = torch.zeros_like(m)
        for r, c, mask, x in self._tiles(q, k, geo):
            mask = self._weighted(mask, w[c])
            out[r] += (self._exp(x, m[r], mask) * x * (w[c] * gamma[c])).sum(1)
        return out

    def grad(self, q, k, w, geo, m, alpha, beta, gamma):
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        for r, c, mask, x in self._tiles(q, k, geo):
            coef = alpha[r, None]
            if gamma is not None:
                coef = coef + beta[r, None] * gamma[c] * (1.0 + x)
            g = self._exp(x, m[r], self._weighted(mask, w[c])) * w[c] * coef * geo.inv_t
            gq, gk = pairwise_grads(g, q[r], k[c], geo.code, geo.p)
            dq[r] += gq
            dk[c] += gk
        return dq, dk


def kernels() -> TorchMaskedKernels:
    return TorchMaskedKernels()
