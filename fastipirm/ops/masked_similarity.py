"""The similarities of ``masked_contrastive_loss`` and their derivatives, in plain torch.

``s(q, k)`` is the dot product ``q . k`` (code 0), ``-|q - k|^2`` (1), ``-|q - k|_1`` (2) or
``-sum_d |q_d - k_d|^p`` (3, ``p >= 1``). :func:`pairwise` gives the ``(R, C)`` matrix of a row
block against a column block (GEMMs for the dot product and, through ``|q|^2 + |k|^2 - 2 q.k``,
for the squared distance; an elementwise loop over the feature dimension otherwise);
:func:`paired` the ``(R, T)`` values of each row against its own ``T`` vectors.
:func:`pairwise_grads` turns a coefficient matrix ``G`` (``R x C``) into
``(sum_j G_ij ds_ij/dq_i, sum_i G_ij ds_ij/dk_j)``; :func:`paired_grads` does the same for
:func:`paired`. Used by the glue (the positives' terms) and by the torch kernel set.
"""
from __future__ import annotations

import torch
from torch import Tensor

DOT, SQEUCLIDEAN, L1, LP = 0, 1, 2, 3


def _lp_terms(diff: Tensor, code: int, p: float) -> Tensor:
    if code == L1:
        return diff.abs()
    if code == SQEUCLIDEAN:
        return diff * diff
    return diff.abs().pow(p)


def _lp_slope(diff: Tensor, code: int, p: float) -> Tensor:
    """d/d(diff) of the per-dimension term |diff|^p (0 at diff = 0 for p = 1, as sign)."""
    if code == L1:
        return diff.sign()
    if code == SQEUCLIDEAN:
        return 2.0 * diff
    return p * diff.abs().pow(p - 1.0) * diff.sign()


def pairwise(q: Tensor, k: Tensor, code: int, p: float) -> Tensor:
    """``s(q_i, k_j)`` for a row block ``q`` (R, D) and a column block ``k`` (C, D): (R, C)."""
    if code == DOT:
        return q @ k.T
    if code == SQEUCLIDEAN:
        d2 = (q * q).sum(1)[:, None] + (k * k).sum(1)[None, :] - 2.0 * (q @ k.T)
        return -d2.clamp_min(0.0)
    out = torch.zeros(q.shape[0], k.shape[0], dtype=q.dtype, device=q.device)
    for d in range(q.shape[1]):                      # (R, C) per dimension: no (R, C, D) tensor
        out -= _lp_terms(q[:, d, None] - k[None, :, d], code, p)
    return out


def pairwise_grads(g: Tensor, q: Tensor, k: Tensor, code: int, p: float
                   ) -> tuple[Tensor, Tensor]:
    """``(dq, dk)`` with ``dq_i = sum_j g_ij ds(q_i, k_j)/dq_i`` and ``dk_j`` likewise."""
    if code == DOT:
        return g @ k, g.T @ q
    if code == SQEUCLIDEAN:   # ds/dq = -2 (q - k), ds/dk = 2 (q - k)
        return (2.0 * (g @ k - g.sum(1)[:, None] * q),
                2.0 * (g.T @ q - g.sum(0)[:, None] * k))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    for d in range(q.shape[1]):
        slope = _lp_slope(q[:, d, None] - k[None, :, d], code, p) * g      # (R, C)
        dq[:, d] = -slope.sum(1)
        dk[:, d] = slope.sum(0)
    return dq, dk


def paired(q: Tensor, k: Tensor, code: int, p: float) -> Tensor:
    """``s(q_i, k_it)`` for ``q`` (R, D) and ``k`` (R, T, D): (R, T)."""
    if code == DOT:
        return (q[:, None, :] * k).sum(-1)
    return -_lp_terms(q[:, None, :] - k, code, p).sum(-1)


def paired_grads(g: Tensor, q: Tensor, k: Tensor, code: int, p: float
                 ) -> tuple[Tensor, Tensor]:
    """For :func:`paired`: ``(dq (R, D), dk (R, T, D))`` for the coefficients ``g`` (R, T)."""
    if code == DOT:
        return (g[..., None] * k).sum(1), g[..., None] * q[:, None, :]
    slope = _lp_slope(q[:, None, :] - k, code, p) * g[..., None]              # (R, T, D)
    return -slope.sum(1), slope
