"""Backend ``"torch"``: the environment objective for all M columns at once, in GEMM form.

No Python loop over environments, no boolean indexing, no host synchronisation. Every
per-environment quantity is a narrow matrix product of a block of the ``N x N`` (``N = 2B``)
similarity with the ``N x M`` weight matrix ``W2 = [w; w]`` (both views of every sample), so the
cost is a few ``N^2 (D + M)`` GEMMs however many environments there are.

Notation (one environment; rows ``a`` and columns ``c`` index the concatenated views, sample
``i = a mod B``, partner ``a' = (a + B) mod N``, negatives of ``a`` are all ``c`` not in
``{i, i+B}``):

* ``Z_a = e^{x_aa'} + kappa_a * sum_c w_c e^{x_ac}`` with ``x = S / T``; ``kappa_a = 1`` in hard
  mode and ``(N-2) / sum_{c neg} w_c`` in soft mode (the official "v2" renormalisation);
* ``loss = sum_a w_a (log Z_a - x_aa') / norm``, ``norm = sum_a w_a`` (or ``N`` with ``nonorm``);
* the per-slot penalty needs the gradient ``g_j`` of the loss (at ``irm_temperature``) w.r.t. a
  dummy scale per logit *slot*: ``g_j = sum_a gw_a sum_{c: slot(a,c)=j} (P_ac - [c=a']) x_ac``
  with ``gw_a = w_a / norm`` and ``P`` the row's weighted softmax. The slot of a negative ``c``
  in row ``a`` is ``1 + pos(c) - [pos(a) < pos(c)] - [pos(a') < pos(c)]`` where ``pos`` is the
  rank in the environment's concatenated order (``pos(c) = c`` in soft mode, prefix counts of
  the membership in hard mode). ``pos`` is monotone in ``c``, so the two indicators only depend
  on whether ``c`` lies below ``i``, between ``i`` and ``i+B``, or above ``i+B``: three diagonal
  bands, the same for every environment. ``g`` is therefore three band-masked column reductions
  ``A_b = W2 * ((K * band_b)^T @ rc)`` with ``K = E * x`` and row coefficients
  ``rc = gw kappa / Z``, scattered to slots ``pos+1``, ``pos`` and ``pos-1``, plus the positive
  slot.

Backward (closed form, no double backward). With ``Gamma = dR/dg`` gathered back from the slots
(``Gamma_b`` per band, a column factor), ``dK = sum_b band_b * (rc @ (Gamma_b * W2)^T)``,
``d rc = sum_b (K * band_b) @ (Gamma_b * W2)`` and the usual weighted-softmax chain; the weight
gradients (soft mode) add the anchor weights, the normalisers, the column weights and kappa.

Everything except the column sums is row-local, so forward and backward stream over blocks of
rows (``chunk`` rows at a time, see :func:`chunk_rows`): the ``N x N`` matrices never exist
whole, memory is ``O(chunk * N + N (D + M))`` and only the features, the weights and the slot
gradients ``g`` are kept between forward and backward. The fused kernels implement the same
formulas tile by tile. What only depends on the weights (kappa, norms, ranks, row groups) and the
assembly of the penalty from the band sums (scatter to slots, ``g`` -> penalty, ``Gamma``) are
shared with the fused glue: :mod:`fastipirm.ops.env_weights`.

The distributed form (:func:`env_contrastive_partials_torch`, hard mode) streams over one
rank's anchor rows only (``samples``: both views' rows of a range of samples): every forward
quantity above is a sum over rows, so it returns exact partial sums of the loss and of ``g``,
and its backward takes ``Gamma = dL/dg`` directly (``docs/distributed.md#gradients``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .env_weights import SHIFTS, Setup, penalty_cotangent, penalty_of, slot_gather, slot_gradient
from .spec import EnvContrastiveSpec

CHUNK_ELEMENTS = int(os.environ.get("FASTIPIRM_TORCH_CHUNK_ELEMENTS", 1 << 22))


def chunk_rows(n: int) -> int:
    """Rows per block so that one ``rows x N`` temporary holds about CHUNK_ELEMENTS entries."""
    return max(1, min(n, CHUNK_ELEMENTS // max(n, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Block:
    """Masks of the rows ``r0:r1`` of the ``N x N`` similarity."""

    def __init__(self, r0: int, r1: int, batch: int, device: torch.device, dtype: torch.dtype):
        n = 2 * batch
        rows = torch.arange(r0, r1, device=device)
        self.rows = slice(r0, r1)
        self.local = torch.arange(r1 - r0, device=device)
        self.partner = (rows + batch) % n
        low = (rows % batch)[:, None]         # sample index i of row a = min(a, a')
        col = torch.arange(n, device=device)[None, :]
        lo = (col < low).to(dtype)                        # c < i
        hi = (col > low + batch).to(dtype)                # c > i + B
        self.neg = ((col != low) & (col != low + batch)).to(dtype)
        self.bands = (lo, self.neg - lo - hi, hi)         # (c < i, i < c < i+B, c > i+B)
        self.diag = col == rows[:, None]


def _path(sim: torch.Tensor, blk: _Block, s: Setup, temperature: float) -> dict:
    """Shifted exponentials and the per-environment row normalisers of a row block."""
    x = sim / temperature
    shift = x.masked_fill(blk.diag, float("-inf")).amax(1)                 # (R,)
    x_pos = x.gather(1, blk.partner[:, None])[:, 0]                        # (R,)
    # where, not a product with the mask: the diagonal's exp may overflow (non-normalised
    # features at a low temperature) and inf * 0 would be NaN
    exp_neg = torch.where(blk.neg > 0, torch.exp(x - shift[:, None]), 0.0)  # (R, N)
    exp_pos = torch.exp(x_pos - shift)                                      # (R,)
    neg_sum = exp_neg @ s.w2                                                # (R, M)
    z = (exp_pos[:, None] + s.kappa[blk.rows] * neg_sum).clamp_min(torch.finfo(sim.dtype).tiny)
    return dict(x=x, x_pos=x_pos, shift=shift, exp_neg=exp_neg, exp_pos=exp_pos,
                neg_sum=neg_sum, z=z)


def _per_anchor(p: dict, kappa: torch.Tensor) -> torch.Tensor:
    """``log Z - x_pos + shift`` as ``log1p(kappa * neg_sum / exp_pos)``: exact for small losses.

    The direct form loses the relative precision of a loss near 0 (log of 1 + eps); it is kept
    for rows whose ratio overflows (positive logit far below the row maximum).
    """
    ratio = kappa * p["neg_sum"] / p["exp_pos"][:, None]
    direct = torch.log(p["z"]) + (p["shift"] - p["x_pos"])[:, None]
    return torch.where(torch.isfinite(ratio), torch.log1p(ratio), direct)


def row_ranges(s: Setup, samples: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
    """The anchor rows of the ``N x N`` similarity: all of them, or both views' rows of the
    samples ``[start, stop)`` (the distributed form: one rank's share of the gathered batch)."""
    if samples is None:
        return [(0, s.n)]
    start, stop = samples
    return [(start, stop), (s.batch + start, s.batch + stop)]


def _blocks(feats: torch.Tensor, s: Setup, samples: Optional[tuple[int, int]] = None):
    """Yield ``(block, similarity rows)`` over the anchor rows (:func:`row_ranges`) of the
    ``N x N`` similarity; the columns are always all ``N``."""
    step = chunk_rows(s.n)
    for lo, hi in row_ranges(s, samples):
        for r0 in range(lo, hi, step):
            blk = _Block(r0, min(hi, r0 + step), s.batch, feats.device, feats.dtype)
            yield blk, feats[blk.rows] @ feats.T


def forward_rows(feats, s: Setup, samples: Optional[tuple[int, int]] = None):
    """The streamed part of the forward: ``(loss_sum (M,), g_pos (G,), col_sums [3 x (N, G)])``.

    ``loss_sum`` is ``sum_a w2 (log Z - x_pos)``, ``g_pos`` the positive slot's gradient and
    ``col_sums[b] = (K * band_b)^T @ rc`` the band column reductions of the penalty. All three
    are sums over the anchor rows: with ``samples`` (:func:`row_ranges`) the partial sums of
    those rows.
    """
    temperature, irm_temperature = s.spec.temperature, s.spec.irm_temperature
    loss_sum = torch.zeros_like(s.total)
    g_pos = torch.zeros(s.w2g.shape[1], dtype=feats.dtype, device=feats.device)
    col_sums = [torch.zeros_like(s.w2g) for _ in SHIFTS]
    for blk, sim in _blocks(feats, s, samples):
        r = blk.rows
        p = _path(sim, blk, s, temperature)
        loss_sum = loss_sum + (s.w2[r] * _per_anchor(p, s.kappa[r])).sum(0)
        if irm_temperature != temperature:
            p = _path(sim, blk, s, irm_temperature)
        zg = s.rep(p["z"])
        gw = s.group_weight[r]
        g_pos = g_pos + (gw * (p["exp_pos"][:, None] / zg - 1.0) * p["x_pos"][:, None]).sum(0)
        row_coef = gw * s.kappag[r] / zg
        k = p["exp_neg"] * p["x"]
        for b, band in enumerate(blk.bands):
            col_sums[b] = col_sums[b] + (k * band).T @ row_coef
    return loss_sum, g_pos, col_sums


def _forward(z1, z2, w, spec: EnvContrastiveSpec):
    """Loss, penalty and the slot gradients ``g``."""
    feats = torch.cat([z1, z2])
    s = Setup(w, spec)
    loss_sum, g_pos, col_sums = forward_rows(feats, s)
    g = slot_gradient(s, col_sums, g_pos)
    loss = s.valid * loss_sum / s.norm.clamp_min(1e-30)
    return loss, penalty_of(s, g), g


def backward_rows(feats, s: Setup, d_loss, normc, col_factors, gamma0,
                  samples: Optional[tuple[int, int]] = None):
    """The streamed part of the backward (one pass over row blocks; with ``samples`` over those
    anchor rows only, giving the gradient of the partial sums w.r.t. every row of ``feats``).

    Returns ``d_feats (N, D)`` and, in soft mode, the partial weight gradients: ``d_w2`` (N, M)
    (anchor weights of the loss and the column weights of the row sums), ``d_kappa`` (N, M),
    ``d_gw`` (N, G), ``col_sums`` (3 x (N, G), as in the forward) and ``loss_sum`` (M,).
    """
    soft = s.soft
    temperature, irm_temperature = s.spec.temperature, s.spec.irm_temperature
    d_feats = torch.zeros_like(feats)
    d_w2 = torch.zeros_like(s.w2)
    d_kappa = torch.zeros_like(s.w2)
    d_gw = torch.zeros_like(s.w2g)
    col_sums = [torch.zeros_like(s.w2g) for _ in SHIFTS] if soft else None
    loss_sum = torch.zeros_like(s.total)
    for blk, sim in _blocks(feats, s, samples):
        r = blk.rows
        # ---- loss path: loss_m = sum_a w2 (log Z - x_pos + shift) / norm
        p = _path(sim, blk, s, temperature)
        d_ell = d_loss * s.w2[r] / normc                                   # (R, M)
        if soft:
            ell = _per_anchor(p, s.kappa[r])
            d_w2[r] += d_loss * ell / normc
            loss_sum = loss_sum + (s.w2[r] * ell).sum(0)
        d_z = d_ell / p["z"]
        d_x_pos = -d_ell.sum(1) + d_z.sum(1) * p["exp_pos"]
        d_neg_sum = d_z * s.kappa[r]
        if soft:
            d_kappa[r] += d_z * p["neg_sum"]
            d_w2 += p["exp_neg"].T @ d_neg_sum
        d_sim = (d_neg_sum @ s.w2.T) * p["exp_neg"] / temperature
        d_sim[blk.local, blk.partner] += d_x_pos / temperature

        # ---- penalty path
        if irm_temperature != temperature:
            p = _path(sim, blk, s, irm_temperature)
        gw = s.group_weight[r]
        zg = s.rep(p["z"])
        kappag = s.kappag[r]
        x_pos = p["x_pos"][:, None]
        row_coef = gw * kappag / zg                                        # (R, G)
        k = p["exp_neg"] * p["x"]
        d_k = torch.zeros_like(k)
        d_row_coef = torch.zeros_like(row_coef)
        for b, (band, col) in enumerate(zip(blk.bands, col_factors)):
            kb = k * band
            d_k += band * (row_coef @ col.T)
            d_row_coef += kb @ col
            if soft:
                col_sums[b] = col_sums[b] + kb.T @ row_coef
        p_pos = p["exp_pos"][:, None] / zg
        d_gw[r] = gamma0 * (p_pos - 1.0) * x_pos + d_row_coef * kappag / zg
        d_p_pos = gamma0 * gw * x_pos
        d_x_pos = (gamma0 * gw * (p_pos - 1.0)).sum(1)
        d_z = s.fold(-(d_row_coef * row_coef + d_p_pos * p_pos) / zg)
        d_exp_pos = (d_p_pos / zg).sum(1) + d_z.sum(1)
        d_neg_sum = d_z * s.kappa[r]
        if soft:
            d_kappa[r] += s.fold(d_row_coef * gw / zg) + d_z * p["neg_sum"]
            d_w2 += p["exp_neg"].T @ d_neg_sum
        # K = E * x and E = exp(x - shift) * neg: dx = E * (dK (1 + x) + dE from the row sums)
        d_x = (d_k * (1.0 + p["x"]) + d_neg_sum @ s.w2.T) * p["exp_neg"]
        d_sim = d_sim + d_x / irm_temperature
        d_sim[blk.local, blk.partner] += (d_x_pos + d_exp_pos * p["exp_pos"]) / irm_temperature
        # S = F F^T: rows r get d_sim @ F, every column c gets d_sim^T @ F[r]
        d_feats[r] += d_sim @ feats
        d_feats += d_sim.T @ feats[r]

    return d_feats, d_w2, d_kappa, d_gw, col_sums, loss_sum


def _column_factors(s: Setup, gamma: torch.Tensor):
    """``gamma`` (G, slots) per band as the slot gradient seen by every column, and the column
    factors (N, G) of the backward."""
    gammas = slot_gather(s, gamma, len(SHIFTS))
    return gammas, [gam * s.w2g for gam in gammas]


def _backward(z1, z2, w, g, d_loss, d_pen, spec: EnvContrastiveSpec):
    """Closed-form gradients w.r.t. z1, z2 and (soft) w, recomputing the similarity by rows."""
    feats = torch.cat([z1, z2])
    s = Setup(w, spec)
    batch, soft = s.batch, s.soft
    d_loss = d_loss * s.valid
    normc = s.norm.clamp_min(1e-30)
    gamma = penalty_cotangent(s, g, d_pen)                                     # (G, slots)
    gammas, col_factors = _column_factors(s, gamma)
    d_feats, d_w2, d_kappa, d_gw, col_sums, loss_sum = backward_rows(
        feats, s, d_loss, normc, col_factors, gamma[:, 0])
    d_w = None
    if soft:
        if not s.nonorm:
            d_w2 -= d_loss * loss_sum / normc / normc
        # A_b = w2g * col_sums_b scattered by slot: the column weight's own gradient
        d_w2g = sum(gam * acc for gam, acc in zip(gammas, col_sums))
        # gw = w2g * mask / group_norm (group_norm = sum of w2g * mask unless nonorm)
        gn = s.group_norm.clamp_min(1e-30)
        d_masked = d_gw / gn
        if not s.nonorm:
            d_masked = d_masked - (d_gw * s.group_weight).sum(0) / gn
        d_w2 += s.fold(d_w2g + d_masked * s.group_mask)
        # kappa = (N - 2) / D with D_a = 2 (sum_k w_k - w_{i(a)})
        d_others = torch.where(s.others > 0, -d_kappa.double() * s.kappa.double()
                               / s.others.clamp_min(1e-300), 0.0)
        d_w = (d_w2[:batch] + d_w2[batch:]).double()
        d_w += 2.0 * (d_others.sum(0, keepdim=True) - d_others[:batch] - d_others[batch:])
        d_w = d_w.to(w.dtype)
    return d_feats[:batch], d_feats[batch:], d_w


class _EnvContrastive(torch.autograd.Function):
    """Forward and closed-form backward; saves only the inputs and the slot gradients."""

    @staticmethod
    def forward(ctx, z1, z2, w, spec):
        loss, pen, g = _forward(z1, z2, w, spec)
        ctx.save_for_backward(z1, z2, w, g)
        ctx.spec = spec
        return loss, pen

    @staticmethod
    def backward(ctx, d_loss, d_pen):
        z1, z2, w, g = ctx.saved_tensors
        m = w.shape[1]
        if d_loss is None:
            d_loss = torch.zeros(m, dtype=g.dtype, device=g.device)
        if d_pen is None:
            d_pen = torch.zeros(m, dtype=g.dtype, device=g.device)
        d_z1, d_z2, d_w = _backward(z1, z2, w, g, d_loss, d_pen, ctx.spec)
        return d_z1, d_z2, d_w, None


def env_contrastive_loss_torch(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor,
                               spec: EnvContrastiveSpec | None = None, **options
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``env_contrastive_loss`` (inputs already validated by the public op).

    ``spec``, or the op's keyword options (``temperature``, ``irm_temperature``, ``soft``,
    ``penalty``, ``nonorm``) to build one.
    """
    spec = EnvContrastiveSpec.of(spec, **options)
    dtype = _compute_dtype(z1.dtype)
    w = env_weights.to(dtype)
    if not spec.soft:
        w = w.detach()
    return _EnvContrastive.apply(z1.to(dtype), z2.to(dtype), w, spec)


class _EnvPartials(torch.autograd.Function):
    """The distributed form (hard mode): the partial loss sums and slot gradients of the anchors
    of ``samples``; the backward takes the slot gradients' cotangent directly."""

    @staticmethod
    def forward(ctx, z1, z2, w, spec, samples):
        s = Setup(w, spec)
        loss_sum, g_pos, col_sums = forward_rows(torch.cat([z1, z2]), s, samples)
        ctx.save_for_backward(z1, z2, w)
        ctx.spec, ctx.samples = spec, samples
        return s.valid * loss_sum / s.norm.clamp_min(1e-30), slot_gradient(s, col_sums, g_pos)

    @staticmethod
    def backward(ctx, d_loss, d_g):
        z1, z2, w = ctx.saved_tensors
        s = Setup(w, ctx.spec)
        if d_loss is None:
            d_loss = torch.zeros_like(s.total)
        if d_g is None:
            d_g = torch.zeros(s.w2g.shape[1], s.slots, dtype=z1.dtype, device=z1.device)
        _, col_factors = _column_factors(s, d_g)
        d_feats = backward_rows(torch.cat([z1, z2]), s, d_loss * s.valid,
                                s.norm.clamp_min(1e-30), col_factors, d_g[:, 0],
                                samples=ctx.samples)[0]
        return d_feats[:s.batch], d_feats[s.batch:], None, None, None


def env_contrastive_partials_torch(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor,
                                   spec: EnvContrastiveSpec, samples: tuple[int, int]
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's distributed form on the torch backend (inputs validated by
    :func:`fastipirm.ops.env_contrastive.env_contrastive_partials`)."""
    dtype = _compute_dtype(z1.dtype)
    return _EnvPartials.apply(z1.to(dtype), z2.to(dtype), env_weights.to(dtype).detach(), spec,
                              (int(samples[0]), int(samples[1])))


def env_penalty_torch(slot_grads: torch.Tensor, env_weights: torch.Tensor,
                      spec: EnvContrastiveSpec) -> torch.Tensor:
    """The penalty (M,) of complete slot gradients (differentiable w.r.t. them)."""
    return penalty_of(Setup(env_weights.to(slot_grads.dtype).detach(), spec), slot_grads)
