"""Backend ``"torch"``: the environment objective for all M columns at once, in GEMM form.

No Python loop over environments, no boolean indexing, no host synchronisation. Every
per-environment quantity is a narrow matrix product of a block of the ``N x N`` (``N = 2B``)
similarity with the ``N x M`` weight matrix ``W2 = [w; w]`` (both views of every sample), so the
cost is a few ``N^2 (D + M)`` GEMMs however many environments there are.

Notation (one environment; rows ``a`` and columns ``c`` index the concatenated views, sample
``i = a mod B``, partner ``a' = (a + B) mod N``, negatives of ``a`` are all ``c`` not in ``{i, i+B}``):

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
formulas tile by tile.
"""
from __future__ import annotations

import os

import torch

_SHIFTS = (1, 0, -1)   # slot = pos + shift for the bands c < i, i < c < i+B, c > i+B
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


class _Setup:
    """Everything that depends on the weights but not on the features (all ``O(N M)``)."""

    def __init__(self, w: torch.Tensor, soft: bool, nonorm: bool, penalty: str):
        batch, m = w.shape
        n = 2 * batch
        dtype, device = w.dtype, w.device
        self.batch, self.n, self.m, self.soft = batch, n, m, soft
        self.nonorm = soft and nonorm
        self.w2 = torch.cat([w, w])                                         # (N, M)
        if soft:
            self.others = 2.0 * (w.double().sum(0, keepdim=True) - self.w2.double())
            self.kappa = torch.where(self.others > 0, (n - 2) / self.others.clamp_min(1e-300),
                                     0.0).to(dtype)
            self.pos = torch.arange(n, device=device)[:, None].expand(n, m)
        else:
            self.kappa = torch.ones_like(self.w2)
            self.pos = (torch.cumsum(self.w2, 0) - self.w2).round().long()  # rank among members
        self.total = self.w2.sum(0)                                         # (M,)
        self.norm = torch.full_like(self.total, float(n)) if self.nonorm else self.total
        self.valid = (self.total > 0).to(dtype)
        self.split = penalty in ("split", "scalar_split")
        self.slots = 1 if penalty in ("scalar", "scalar_split") else n
        self.reps = 2 if self.split else 1
        if self.split:
            parity = self.pos if not soft else torch.arange(n, device=device)[:, None].expand(n, m)
            even = (parity % 2 == 0).to(dtype)
            self.group_mask = torch.cat([even, 1.0 - even], 1)              # (N, 2M)
            masked = self.w2.repeat(1, 2) * self.group_mask
            self.group_norm = self.group_mask.sum(0) if self.nonorm else masked.sum(0)
        else:
            self.group_mask = torch.ones_like(self.w2)
            self.group_norm = self.norm
        self.w2g = self.rep(self.w2)                                        # (N, G)
        self.kappag = self.rep(self.kappa)
        self.group_weight = self.w2g * self.group_mask / self.group_norm.clamp_min(1e-30)
        self.group_pos = self.rep(self.pos)

    def rep(self, t: torch.Tensor) -> torch.Tensor:
        """(N, M) -> (N, G): one copy per row group."""
        return t.repeat(1, self.reps) if self.reps > 1 else t

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """(N, G) -> (N, M): sum the row groups' copies (the adjoint of :meth:`rep`)."""
        return t[:, :self.m] + t[:, self.m:] if self.reps > 1 else t

    def slot_index(self, shift: int) -> torch.Tensor:
        """(N, G) slot of every column for one band (clamped: non-members carry zeros)."""
        return (self.group_pos + shift).clamp(0, self.slots - 1)


def _path(sim: torch.Tensor, blk: _Block, s: _Setup, temperature: float) -> dict:
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


def _blocks(feats: torch.Tensor, s: _Setup):
    """Yield ``(block, similarity rows)`` over the rows of the ``N x N`` similarity."""
    step = chunk_rows(s.n)
    for r0 in range(0, s.n, step):
        blk = _Block(r0, min(s.n, r0 + step), s.batch, feats.device, feats.dtype)
        yield blk, feats[blk.rows] @ feats.T


def forward_rows(feats, s: _Setup, temperature: float, irm_temperature: float):
    """The streamed part of the forward: ``(loss_sum (M,), g_pos (G,), col_sums [3 x (N, G)])``.

    ``loss_sum`` is ``sum_a w2 (log Z - x_pos)``, ``g_pos`` the positive slot's gradient and
    ``col_sums[b] = (K * band_b)^T @ rc`` the band column reductions of the penalty.
    """
    loss_sum = torch.zeros_like(s.total)
    g_pos = torch.zeros(s.w2g.shape[1], dtype=feats.dtype, device=feats.device)
    col_sums = [torch.zeros_like(s.w2g) for _ in _SHIFTS]
    for blk, sim in _blocks(feats, s):
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


def _forward(z1, z2, w, soft, nonorm, penalty, temperature, irm_temperature, rows=forward_rows):
    """Loss, penalty and the slot gradients ``g``; ``rows`` is the streamed part (torch or C++)."""
    feats = torch.cat([z1, z2])
    s = _Setup(w, soft, nonorm, penalty)
    loss_sum, g_pos, col_sums = rows(feats, s, temperature, irm_temperature)
    g = torch.zeros(s.w2g.shape[1], s.slots, dtype=feats.dtype, device=feats.device)
    for acc, shift in zip(col_sums, _SHIFTS):
        acc = s.w2g * acc
        if s.slots == 1:
            g[:, 0] += acc.sum(0)
        else:
            g = g.scatter_add(1, s.slot_index(shift).T, acc.T)
    g[:, 0] += g_pos
    loss = s.valid * loss_sum / s.norm.clamp_min(1e-30)
    pen = (g[:s.m] * g[s.m:]).sum(1) if s.split else (g * g).sum(1)
    return loss, s.valid * pen, g


def backward_rows(feats, s: _Setup, temperature: float, irm_temperature: float, d_loss, normc,
                  col_factors, gamma0):
    """The streamed part of the backward (one pass over row blocks).

    Returns ``d_feats (N, D)`` and, in soft mode, the partial weight gradients: ``d_w2`` (N, M)
    (anchor weights of the loss and the column weights of the row sums), ``d_kappa`` (N, M),
    ``d_gw`` (N, G), ``col_sums`` (3 x (N, G), as in the forward) and ``loss_sum`` (M,).
    """
    soft = s.soft
    d_feats = torch.zeros_like(feats)
    d_w2 = torch.zeros_like(s.w2)
    d_kappa = torch.zeros_like(s.w2)
    d_gw = torch.zeros_like(s.w2g)
    col_sums = [torch.zeros_like(s.w2g) for _ in _SHIFTS] if soft else None
    loss_sum = torch.zeros_like(s.total)
    for blk, sim in _blocks(feats, s):
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


def _backward(z1, z2, w, g, d_loss, d_pen, soft, nonorm, penalty, temperature, irm_temperature,
              rows=backward_rows):
    """Closed-form gradients w.r.t. z1, z2 and (soft) w, recomputing the similarity by rows."""
    feats = torch.cat([z1, z2])
    s = _Setup(w, soft, nonorm, penalty)
    batch = s.batch
    d_loss = d_loss * s.valid
    d_pen = d_pen * s.valid
    normc = s.norm.clamp_min(1e-30)
    if s.split:
        gamma = torch.cat([g[s.m:] * d_pen[:, None], g[:s.m] * d_pen[:, None]])  # (G, slots)
    else:
        gamma = 2.0 * g * d_pen[:, None]
    gamma0 = gamma[:, 0]
    # Gamma per band: the slot gradient seen by column c, as a column factor (N, G)
    if s.slots == 1:
        gammas = [gamma0.expand_as(s.w2g)] * 3
    else:
        gammas = [gamma.gather(1, s.slot_index(shift).T).T for shift in _SHIFTS]
    col_factors = [gam * s.w2g for gam in gammas]
    d_feats, d_w2, d_kappa, d_gw, col_sums, loss_sum = rows(
        feats, s, temperature, irm_temperature, d_loss, normc, col_factors, gamma0)
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
    def forward(ctx, z1, z2, w, soft, nonorm, penalty, temperature, irm_temperature):
        loss, pen, g = _forward(z1, z2, w, soft, nonorm, penalty, temperature, irm_temperature)
        ctx.save_for_backward(z1, z2, w, g)
        ctx.args = (soft, nonorm, penalty, temperature, irm_temperature)
        return loss, pen

    @staticmethod
    def backward(ctx, d_loss, d_pen):
        z1, z2, w, g = ctx.saved_tensors
        m = w.shape[1]
        if d_loss is None:
            d_loss = torch.zeros(m, dtype=g.dtype, device=g.device)
        if d_pen is None:
            d_pen = torch.zeros(m, dtype=g.dtype, device=g.device)
        d_z1, d_z2, d_w = _backward(z1, z2, w, g, d_loss, d_pen, *ctx.args)
        return d_z1, d_z2, d_w, None, None, None, None, None


def env_contrastive_loss_torch(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor, *,
                               temperature: float, irm_temperature: float, soft: bool,
                               penalty: str = "slot", nonorm: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``env_contrastive_loss`` (inputs already validated by the public op)."""
    dtype = _compute_dtype(z1.dtype)
    w = env_weights.to(dtype)
    if not soft:
        w = w.detach()
    return _EnvContrastive.apply(z1.to(dtype), z2.to(dtype), w, soft, nonorm, penalty,
                                 float(temperature), float(irm_temperature))
