"""Backend ``"torch"``: the environment objective for all M columns at once, in GEMM form.

No Python loop over environments, no boolean indexing, no host synchronisation. Every
per-environment quantity is a narrow matrix product of an ``N x N`` (``N = 2B``) matrix with the
``N x M`` weight matrix ``W2 = [w; w]`` (both views of every sample), so the cost is a few
``N^2 (D + M)`` GEMMs and the memory ``O(N^2 + N M)`` however many environments there are.

Notation (one environment; rows ``a`` and columns ``c`` index the concatenated views, sample
``i = a mod B``, partner ``a' = (a + B) mod N``, negatives of ``a`` are all ``c`` not in ``{i, i+B}``):

* ``Z_a = e^{x_aa'} + kappa_a * sum_c w_c e^{x_ac}`` with ``x = S / T``; ``kappa_a = 1`` in hard
  mode and ``(N-2) / sum_{c neg} w_c`` in soft mode (the official "v2" renormalisation);
* ``loss = sum_a w_a (log Z_a - x_aa') / norm``, ``norm = sum_a w_a`` (or ``N`` with ``nonorm``);
* the per-slot penalty needs the gradient ``g_j`` of the loss (at ``irm_temperature``) w.r.t. a
  dummy scale per logit *slot*. The slot of a negative ``c`` in row ``a`` is
  ``1 + pos(c) - [pos(a) < pos(c)] - [pos(a') < pos(c)]`` where ``pos`` is the rank in the
  environment's concatenated order (``pos(c) = c`` in soft mode, prefix counts of the membership in
  hard mode). Because ``pos`` is monotone in ``c``, the two indicators only depend on whether ``c``
  lies below ``i``, between ``i`` and ``i+B``, or above ``i+B``: three diagonal bands, independent
  of the environment. So ``g`` is three band-masked column reductions (GEMMs against the
  per-row coefficients), scattered to slots ``pos+1``, ``pos``, ``pos-1``, plus the positive slot.

Gradients come from autograd through these closed forms (single backward, no ``create_graph``),
so the whole thing also compiles with ``torch.compile``.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Bands:
    """Index structure of the ``N x N`` similarity shared by every environment."""

    def __init__(self, batch: int, device: torch.device, dtype: torch.dtype):
        n = 2 * batch
        ar = torch.arange(n, device=device)
        self.partner = (ar + batch) % n
        low = (ar % batch)[:, None]          # sample index i of row a = min(a, a')
        col = ar[None, :]
        self.lo = (col < low).to(dtype)                  # c < i
        self.hi = (col > low + batch).to(dtype)          # c > i + B
        self.neg = ((col != low) & (col != low + batch)).to(dtype)
        self.mid = self.neg - self.lo - self.hi          # i < c < i + B
        self.diag = torch.eye(n, dtype=torch.bool, device=device)


def _row_stats(sim: torch.Tensor, bands: _Bands, w2: torch.Tensor, kappa: torch.Tensor,
               temperature: float):
    """Shifted exponentials and the per-environment row normalisers at one temperature."""
    x = sim / temperature
    shift = x.detach().masked_fill(bands.diag, float("-inf")).amax(1, keepdim=True)
    x_pos = x.gather(1, bands.partner[:, None])                       # (N, 1)
    exp_neg = torch.exp(x - shift) * bands.neg                        # (N, N)
    exp_pos = torch.exp(x_pos - shift)                                # (N, 1)
    z = exp_pos + kappa * (exp_neg @ w2)                              # (N, M)
    z = z.clamp_min(torch.finfo(z.dtype).tiny)
    return x, x_pos, shift, exp_neg, exp_pos, z


def _slot_gradients(x, x_pos, exp_neg, exp_pos, z, w2, kappa, group_weight, pos, bands, slots):
    """Per-slot gradient ``g`` (shape ``(G, slots)``) of each row group's loss w.r.t. the dummy.

    ``group_weight`` (N, G) is the anchor weight divided by the group's normaliser; ``pos`` (N, G)
    the rank of every column in the environment's concatenated order; ``slots=1`` gives only the
    sum over slots (the scalar dummy).
    """
    m = w2.shape[1]
    reps = group_weight.shape[1] // m
    w2g = w2.repeat(1, reps)
    kappag = kappa.repeat(1, reps)
    zg = z.repeat(1, reps)
    p_pos = exp_pos / zg
    g_pos = (group_weight * (p_pos - 1.0) * x_pos).sum(0)             # (G,)
    row_coef = group_weight * kappag / zg                             # (N, G)
    k = exp_neg * x                                                   # (N, N), zero off negatives
    if slots == 1:
        return (g_pos + (w2g * (k.T @ row_coef)).sum(0))[:, None]
    g = torch.zeros(group_weight.shape[1], slots, dtype=x.dtype, device=x.device)
    for band, shift in ((bands.lo, 1), (bands.mid, 0), (bands.hi, -1)):
        acc = w2g * ((k * band).T @ row_coef)                         # (N, G) column sums
        idx = (pos + shift).clamp(0, slots - 1)
        g = g.scatter_add(1, idx.T, acc.T)
    g[:, 0] += g_pos
    return g


def env_contrastive_loss_torch(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor, *,
                               temperature: float, irm_temperature: float, soft: bool,
                               penalty: str = "slot", nonorm: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``env_contrastive_loss`` (inputs already validated by the public op)."""
    dtype = _compute_dtype(z1.dtype)
    batch = z1.shape[0]
    n = 2 * batch
    feats = torch.cat([z1, z2]).to(dtype)
    w = env_weights.to(dtype)
    if not soft:
        w = w.detach()
    w2 = torch.cat([w, w])                                            # (N, M)
    bands = _Bands(batch, feats.device, dtype)
    sim = feats @ feats.T

    if soft:
        others = 2.0 * (w.double().sum(0, keepdim=True) - w2.double())  # sum of negatives' weights
        kappa = torch.where(others > 0, (n - 2) / others.clamp_min(1e-300), 0.0).to(dtype)
        pos = torch.arange(n, device=feats.device)[:, None].expand(n, w.shape[1])
    else:
        kappa = torch.ones_like(w2)
        pos = (torch.cumsum(w2, 0) - w2).round().long()               # rank among members
    total = w2.sum(0)                                                 # (M,)
    norm = torch.full_like(total, float(n)) if (soft and nonorm) else total

    # loss at `temperature`
    x, x_pos, shift, exp_neg, exp_pos, z = _row_stats(sim, bands, w2, kappa, temperature)
    per_anchor = torch.log(z) + shift - x_pos                         # (N, M)
    loss = torch.where(total > 0, (w2 * per_anchor).sum(0) / norm.clamp_min(1e-30), 0.0)

    # penalty at `irm_temperature` (the statistics are shared when the temperatures coincide)
    if irm_temperature != temperature:
        x, x_pos, shift, exp_neg, exp_pos, z = _row_stats(sim, bands, w2, kappa, irm_temperature)
    split = penalty in ("split", "scalar_split")
    if split:
        parity = pos if not soft else torch.arange(n, device=feats.device)[:, None].expand_as(w2)
        even = (parity % 2 == 0).to(dtype)
        halves = torch.cat([w2 * even, w2 * (1.0 - even)], 1)         # (N, 2M)
        if soft and nonorm:
            half_norm = torch.cat([even.sum(0), (1.0 - even).sum(0)])
        else:
            half_norm = halves.sum(0)
        group_weight = halves / half_norm.clamp_min(1e-30)
        group_pos = pos.repeat(1, 2)
    else:
        group_weight = w2 / norm.clamp_min(1e-30)
        group_pos = pos
    slots = 1 if penalty in ("scalar", "scalar_split") else n
    g = _slot_gradients(x, x_pos, exp_neg, exp_pos, z, w2, kappa, group_weight, group_pos,
                        bands, slots)
    if split:
        m = w2.shape[1]
        pen = (g[:m] * g[m:]).sum(1)
    else:
        pen = (g * g).sum(1)
    pen = torch.where(total > 0, pen, 0.0)
    return loss, pen
