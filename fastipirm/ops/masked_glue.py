"""The glue of ``masked_contrastive_loss``: four kernels over the ``Q x K`` pairs, and O((Q + K)
D) torch work around them, with a closed-form backward.

Notation. Rows are the queries ``q_i``, columns the keys ``k_j``; ``x_ij = s(q_i, k_j) / T``
(:mod:`fastipirm.ops.masked_similarity`). Row ``i``'s *negative columns* are the keys of its
group (``query_groups[i] == key_groups[j]``, every key without groups) except the columns listed
in its row of ``exclude`` (its own column unless ``include_self``, and its target columns).
``w_j`` are the key weights (ones by default). A row's *targets* are either a separate positive
``x+_i = s(q_i, p_i) / T`` or the key columns ``positive_index[i, t]`` with weights ``u_it``
(summing to 1); a repeated target column counts once in the denominator.

* loss ``l_i = log Z_i - sum_t u_it x_it`` with ``Z_i = sum_{j neg} w_j e^{x_ij} + sum_{t distinct}
  e^{x_it}``; in the shifted form the kernels give ``m_i`` (a row shift at least every logit of
  the row, targets included) and ``z_i = sum_{j neg} w_j e^{x_ij - m_i}``, and
  ``Zt_i = z_i + sum_t e^{x_it - m_i}`` (one target: ``l_i = log1p(z_i / e^{x+_i - m_i})``, exact
  for small losses);
* penalty ingredient (``key_penalty``): ``g_j = d(sum_i c_i l_i) / d sigma_j`` at ``sigma = 1``,
  where ``sigma_j`` scales the logits of key column ``j`` and ``c_i`` are row weights (default:
  one over the number of queries in the row's group, so ``g`` belongs to each group's mean loss):
  ``g_j = w_j A_j + (target columns)`` with ``A_j = sum_i c_i e^{x_ij - m_i} x_ij / Zt_i``;
* backward: with the upstream ``v_i`` of ``l_i`` and ``gamma_j`` of ``g_j``,
  ``r_i = sum_{j in row} gamma_j P_ij x_ij`` (``P`` the row's softmax), ``alpha_i = (v_i - c_i r_i)
  / Zt_i`` and ``beta_i = c_i / Zt_i``, every negative pair has
  ``dl/dx_ij = w_j e^{x_ij - m_i} (alpha_i + beta_i gamma_j (1 + x_ij))``; a target column has
  ``e^{x_it - m_i} (alpha_i + beta_i gamma_j (1 + x_it)) [first occurrence] - u_it (v_i + c_i
  gamma_j)``; a separate positive ``alpha_i e^{x+_i - m_i} - v_i``; the key weights get
  ``dw_j = gamma_j A_j + sum_i e^{x_ij - m_i} alpha_i``.

The kernel contract (:class:`MaskedKernels`; every sum runs over negative pairs only, ``m`` is
the row shift of ``rowstats``):

* ``rowstats(q, k, w, geo, m0) -> (m, z)``: ``m_i = max(m0_i, max_{j: w_j > 0} x_ij)``,
  ``z_i = sum_j w_j e^{x_ij - m_i}`` (a zero-weight column sets no shift and adds nothing, also
  in ``rowsum`` and ``grad``, where its ``e^{x_ij - m_i}`` may overflow: ``0 * inf`` must not
  become NaN);
* ``colsum(q, k, geo, m, rho, sigma) -> a``: ``a_j = sum_i e^{x_ij - m_i} (rho_i x_ij + sigma_i)``
  (unweighted: for a zero-weight column it is the true, possibly overflowing, derivative);
* ``rowsum(q, k, w, geo, m, gamma) -> r``: ``r_i = sum_j w_j gamma_j e^{x_ij - m_i} x_ij``;
* ``grad(q, k, w, geo, m, alpha, beta, gamma) -> (dq, dk)`` with
  ``G_ij = w_j e^{x_ij - m_i} (alpha_i + beta_i gamma_j (1 + x_ij))`` (``gamma`` None: no second
  term): ``dq_i = sum_j G_ij dx_ij/dq_i``, ``dk_j = sum_i G_ij dx_ij/dk_j``.

A kernel set may skip any tile of pairs that the groups mask out entirely. Memory is linear in
``Q + K``: the kernels stream over tiles; the glue keeps ``m``, ``z`` and (penalty) ``A``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .masked_similarity import paired, paired_grads
from .spec import MaskedContrastiveSpec


@dataclass
class Geometry:
    """Which pairs are negatives, and the similarity: ``code``/``p`` (``masked_similarity``),
    ``inv_t`` = 1 / temperature, groups ``qg`` (Q,) and ``kg`` (K,) int64 or None, ``exclude``
    (Q, E) int64 key columns that are not negatives of row i (-1: none) or None."""

    code: int
    p: float
    inv_t: float
    qg: Optional[Tensor] = None
    kg: Optional[Tensor] = None
    exclude: Optional[Tensor] = None


class MaskedKernels(ABC):
    """The four kernels of a backend of ``masked_contrastive_loss`` (module docstring)."""

    name = "masked"

    def check(self, q: Tensor) -> None:
        """Raise (clear message) when this kernel set cannot run on inputs like ``q``."""

    def stat_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype of the statistics, the glue and the gradients for input dtype ``dtype``."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def feats(self, t: Tensor) -> Tensor:
        """A feature tensor (queries, keys, positives) as the glue computes with it: the
        statistics dtype, contiguous (the targets' logits and gradients are torch code on it). A
        kernel set that reads another representation (fp16/bf16 for tensor cores) keeps it on the
        returned tensor itself (the Triton and CUDA sets attach the 16-bit original)."""
        return t.to(self.stat_dtype(t.dtype)).contiguous()

    @abstractmethod
    def rowstats(self, q, k, w, geo: Geometry, m0) -> tuple[Tensor, Tensor]:
        """``(m, z)``."""

    @abstractmethod
    def colsum(self, q, k, geo: Geometry, m, rho, sigma) -> Tensor:
        """``a`` (K,)."""

    @abstractmethod
    def rowsum(self, q, k, w, geo: Geometry, m, gamma) -> Tensor:
        """``r`` (Q,)."""

    @abstractmethod
    def grad(self, q, k, w, geo: Geometry, m, alpha, beta, gamma) -> tuple[Tensor, Tensor]:
        """``(dq, dk)``."""


@dataclass
class Inputs:
    """One call's tensors, normalised: ``k`` the keys (``q`` itself for ``keys=None``), ``pos``
    (Q, D) or None, ``idx`` (Q, T) int64 or None, ``tw`` (Q, T) target weights or None, the
    groups, ``self_index`` (Q,) or None, ``w`` (K,) key weights, ``c`` (Q,) penalty row
    weights (all in the statistics dtype)."""

    q: Tensor
    k: Tensor
    pos: Optional[Tensor]
    idx: Optional[Tensor]
    tw: Optional[Tensor]
    qg: Optional[Tensor]
    kg: Optional[Tensor]
    self_index: Optional[Tensor]
    w: Tensor
    c: Tensor


def geometry(inp: Inputs, spec: MaskedContrastiveSpec) -> Geometry:
    """The negatives' mask of a call: groups, and the excluded columns (self, targets)."""
    cols = []
    if inp.self_index is not None and not spec.include_self:
        cols.append(inp.self_index[:, None])
    if inp.idx is not None:
        cols.append(inp.idx)
    exclude = torch.cat(cols, 1).contiguous() if cols else None
    return Geometry(spec.code, spec.exponent, 1.0 / spec.temperature, inp.qg, inp.kg, exclude)


def _targets(inp: Inputs, spec: MaskedContrastiveSpec):
    """``(x_t (Q, T), first (Q, T), weights (Q, T))``: the target logits, 1 where a column first
    occurs in its row, and the targets' weights."""
    if inp.pos is not None:
        x = paired(inp.q, inp.pos[:, None, :], spec.code, spec.exponent) / spec.temperature
        ones = torch.ones_like(x)
        return x, ones, ones
    x = paired(inp.q, inp.k[inp.idx], spec.code, spec.exponent) / spec.temperature
    t = inp.idx.shape[1]
    same = inp.idx[:, :, None] == inp.idx[:, None, :]                      # (Q, T, T)
    earlier = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
    first = (~(same & earlier).any(2)).to(x.dtype)
    return x, first, inp.tw


def _loss(z, m, xt, et, zt, tw) -> Tensor:
    if xt.shape[1] == 1:          # log1p(z / e^{x+ - m}): exact for small losses
        ratio = z * torch.exp((m - xt[:, 0]).clamp_max(80.0))
        direct = torch.log(zt) + m - xt[:, 0]
        return torch.where(m - xt[:, 0] < 80.0, torch.log1p(ratio), direct)
    return torch.log(zt) + m - (tw * xt).sum(1)


def forward(kern: MaskedKernels, inp: Inputs, spec: MaskedContrastiveSpec):
    """``(losses (Q,), key_grads (K,) or empty, saved)``; ``saved = (m, z, a)``."""
    geo = geometry(inp, spec)
    xt, first, tw = _targets(inp, spec)
    m, z = kern.rowstats(inp.q, inp.k, inp.w, geo, xt.amax(1))
    et = torch.exp(xt - m[:, None]) * first
    zt = z + et.sum(1)
    losses = _loss(z, m, xt, et, zt, tw)
    if not spec.key_penalty:
        return losses, losses.new_empty(0), (m, z, losses.new_empty(0))
    a = kern.colsum(inp.q, inp.k, geo, m, inp.c / zt, torch.zeros_like(zt))
    # (a zero-weight column's a_j may overflow: it is the unshifted sum of its exponentials)
    g = torch.where(inp.w > 0, inp.w * a, torch.zeros_like(a))
    if inp.idx is not None:       # target columns: c_i (P_it [first] - u_it) x_it
        g = g.index_add(0, inp.idx.reshape(-1),
                        (inp.c[:, None] * (et / zt[:, None] - tw) * xt).reshape(-1))
    return losses, g, (m, z, a)


def backward(kern: MaskedKernels, inp: Inputs, spec: MaskedContrastiveSpec, saved, v: Tensor,
             gamma: Optional[Tensor], need_w: bool):
    """Gradients ``(dq, dk, dpos or None, dw or None)`` for the upstream ``v`` (Q,) of the losses
    and ``gamma`` (K,) of the key gradients (None without ``key_penalty``)."""
    m, z, a = saved
    geo = geometry(inp, spec)
    xt, first, tw = _targets(inp, spec)
    et = torch.exp(xt - m[:, None]) * first
    zt = z + et.sum(1)
    penalty = spec.key_penalty and gamma is not None
    if penalty:
        r = kern.rowsum(inp.q, inp.k, inp.w, geo, m, gamma)
        if inp.idx is not None:
            r = r + (gamma[inp.idx] * et * xt).sum(1)
        r = r / zt
        alpha, beta = (v - inp.c * r) / zt, inp.c / zt
    else:
        alpha, beta, gamma = v / zt, None, None
    dq, dk = kern.grad(inp.q, inp.k, inp.w, geo, m, alpha, beta, gamma)
    # the targets: dl/dx_t, then through s(q_i, target)
    dxt = et * alpha[:, None] - tw * v[:, None]
    if penalty and inp.idx is not None:
        gt = gamma[inp.idx]
        dxt = dxt + (et * beta[:, None] * gt * (1.0 + xt) - tw * inp.c[:, None] * gt)
    dxt = dxt / spec.temperature
    dpos = None
    if inp.pos is not None:
        dq_t, dp = paired_grads(dxt, inp.q, inp.pos[:, None, :], spec.code, spec.exponent)
        dpos = dp[:, 0]
    else:
        dq_t, dk_t = paired_grads(dxt, inp.q, inp.k[inp.idx], spec.code, spec.exponent)
        dk = dk.index_add(0, inp.idx.reshape(-1), dk_t.reshape(-1, dk_t.shape[-1]))
    dq = dq + dq_t
    dw = None
    if need_w:
        dw = kern.colsum(inp.q, inp.k, geo, m, torch.zeros_like(alpha), alpha)
        if penalty:
            dw = dw + gamma * a
    return dq, dk, dpos, dw
