"""The O(N M) glue shared by the fused backends (Triton, C++ CPU, CUDA), around three kernels.

A fused backend supplies the three kernels that touch the ``N x N`` similarity ``S = F F^T``
(``F = [z1; z2]``, ``N = 2B``); everything else (kappa, norms, hard/soft, nonorm, split groups, the
rank ``pos``, the scatter of the band sums to slots, the positive pair, the four penalty variants)
is this module's differentiable torch glue, whose backward is taken with ``torch.func.vjp`` (one
backward of O(N M) work; no double backward). The mathematics and the notation are those of
:mod:`fastipirm.ops.torch_backend`; the kernels' contract (``m_a`` a row shift, every exponential
``E = exp((S - m_a)/T)`` on the negatives of the anchor row ``a``; bands ``lo/mid/hi`` = column below
``i``, between ``i`` and ``i+B``, above ``i+B`` with ``i = a mod B``; ``K~ = E~ * S / T'``):

* ``rowstats(feats, spos, w2, batch, t1, t2, two_t) -> (mrow (N,), zn (N, M), znt (N, M))``:
  a row shift ``mrow`` with ``mrow_a >= spos_a`` and no exponential overflowing, ``zn = E W2`` at
  ``t1`` and ``znt = E~ W2`` at ``t2`` (``znt`` may be ``zn`` when ``two_t`` is false);
* ``band(feats, mrow, fac, nb_out, batch, t2, trans, nb) -> out (nb_out, N, G)``: with ``trans``
  the column reductions ``out[b, c] = sum_a band_b(a, c) K~_ac fac[0, a]`` (forward), else the row
  reduction ``out[0, a] = sum_c sum_b band_b(a, c) K~_ac fac[b, c]`` (backward); ``nb = 1``: the
  whole negative mask is the single band (scalar penalties);
* ``grad(feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw) -> (df, gw)``:
  ``df_p = sum_q (dS_pq + dS_qp) F_q`` with, on negatives,
  ``dS_ac = E_ac/T (gZN W2^T)_ac + E~_ac/T' (gZN~ W2^T)_ac + E~_ac (1 + S_ac/T')/T'
  sum_b band_b(a, c) (RC gACC_b^T)_ac``, and (``need_gw``) ``gw_c = sum_a E_ac gZN_a + E~_ac gZN~_a``.

The statistics are computed in :meth:`FusedKernels.stat_dtype` (float32, or float64 where a
backend computes in float64). :func:`register_fused_backend` turns a kernel set into a backend
(``torch.library`` custom ops, so a training step with it compiles).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch

from .custom_ops import register_env_contrastive_op
from .torch_backend import _Setup as _TorchSetup


class FusedKernels(ABC):
    """The three kernels of a fused backend (see the module docstring); a backend implements the
    three abstract methods."""

    name = "fused"

    def check(self, z1: torch.Tensor) -> None:
        """Raise (clear message) when this backend cannot run on inputs like ``z1``."""

    def stat_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Dtype of the statistics, the glue and the gradients for input dtype ``dtype``."""
        return torch.float32

    def feats(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``[z1; z2]`` in the dtype the kernels read, contiguous."""
        feats = torch.cat([z1, z2])
        if feats.dtype == torch.float64 and self.stat_dtype(feats.dtype) != torch.float64:
            feats = feats.float()
        return feats.contiguous()

    def device(self, t: torch.Tensor):
        """Context making ``t``'s device current (kernels launch on the current CUDA device)."""
        return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

    @abstractmethod
    def rowstats(self, feats, spos, w2, batch, t1, t2, two_t):
        """``(mrow, zn, znt)``: see the module docstring."""

    @abstractmethod
    def band(self, feats, mrow, fac, nb_out, batch, t2, trans, nb):
        """``(nb_out, N, G)`` band reductions: see the module docstring."""

    @abstractmethod
    def grad(self, feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw):
        """``(df, gw or None)``: see the module docstring."""


class Setup(_TorchSetup):
    """The torch backend's weights-derived O(N M) quantities (differentiable w.r.t. ``w`` in soft
    mode, which the backward's ``torch.func.vjp`` relies on), plus the number of penalty bands."""

    def __init__(self, w: torch.Tensor, soft: bool, nonorm: bool, penalty: str):
        super().__init__(w, soft, nonorm, penalty)
        self.scalar = penalty in ("scalar", "scalar_split")
        self.nbands = self.nbands_of(penalty)

    @staticmethod
    def nbands_of(penalty: str) -> int:
        return 1 if penalty in ("scalar", "scalar_split") else 3


def _z(e_pos, kappa, zn):
    z = e_pos[:, None] + kappa * zn
    return z.clamp_min(torch.finfo(z.dtype).tiny)


def _inv_group_z(st: Setup, zt):
    """``1 / Z~`` per row group (N, G) as ``exp(-log Z~)``: its vjp is ``-g / Z~ * (1 / Z~)``
    (never forming ``Z~^2``, which underflows for rows whose environment sum is tiny, and
    ``x / 0`` is infinite); 1 where the row's group weight is 0 (zero weight times that would
    be NaN)."""
    zg = st.rep(zt)
    zg = torch.where(st.group_weight != 0, zg, torch.ones_like(zg))
    return torch.exp(-torch.log(zg))


def glue_rc(st: Setup, znt, spos, mrow, t2):
    """Row coefficients of the penalty's column reductions: ``gw * kappa / Z~`` (N, G)."""
    zt = _z(torch.exp((spos - mrow) / t2), st.kappa, znt)
    return st.group_weight * st.rep(st.kappa) * _inv_group_z(st, zt)


def glue_out(st: Setup, zn, znt, acc, spos, mrow, t1, t2):
    """``(loss, penalty)`` from the kernel statistics."""
    # per anchor: log(Z / e_pos) = log1p(kappa ZN / e_pos), exact where the row has no negative
    # mass (a one-sample environment) instead of the cancellation log(Z) + shift - x_pos
    y1 = ((spos - mrow) / t1)[:, None]                                              # <= 0
    neg_mass = st.kappa * zn
    per_anchor = torch.where(
        y1 > -80.0, torch.log1p(neg_mass * torch.exp((-y1).clamp_max(80.0))),
        torch.log(_z(torch.exp(y1[:, 0]), st.kappa, zn)) - y1)
    loss = torch.where(st.total > 0, (st.w2 * per_anchor).sum(0) / st.norm.clamp_min(1e-30), 0.0)

    e2pos = torch.exp((spos - mrow) / t2)
    zt = _z(e2pos, st.kappa, znt)
    p_pos_m1 = -st.rep(st.kappa * znt) * _inv_group_z(st, zt)                        # P_pos - 1
    g_pos = (st.group_weight * p_pos_m1 * (spos / t2)[:, None]).sum(0)             # (G,)
    w2g = st.rep(st.w2)
    if st.scalar:
        g = (g_pos + (w2g * acc[0]).sum(0))[:, None]
    else:
        g = torch.zeros(st.group_weight.shape[1], st.slots, dtype=acc.dtype, device=acc.device)
        for b, shift in enumerate((1, 0, -1)):
            idx = (st.group_pos + shift).clamp(0, st.slots - 1)
            g = g.scatter_add(1, idx.T, (w2g * acc[b]).T)
        g[:, 0] += g_pos
    if st.split:
        pen = (g[:st.m] * g[st.m:]).sum(1)
    else:
        pen = (g * g).sum(1)
    pen = torch.where(st.total > 0, pen, 0.0)
    return loss, pen


def fused_forward(kern: FusedKernels, feats, w, soft, penalty, nonorm, t1, t2):
    """Forward on ``feats = [z1; z2]`` (N, D) and weights ``w`` (B, M) in the statistics dtype.

    Returns ``(loss, penalty, saved)`` with ``saved = (mrow, zn, znt, acc)``: the O(N M) statistics
    the backward needs (``znt is zn`` when the two temperatures coincide).
    """
    batch = feats.shape[0] // 2
    two_t = t1 != t2
    with torch.no_grad(), kern.device(feats):
        st = Setup(w, soft, nonorm, penalty)
        ff = feats.to(w.dtype)
        spos = (ff * ff.roll(batch, 0)).sum(1)
        mrow, zn, znt = kern.rowstats(feats, spos, st.w2.contiguous(), batch, t1, t2, two_t)
        rc = glue_rc(st, znt, spos, mrow, t2)
        acc = kern.band(feats, mrow, rc.unsqueeze(0).contiguous(), st.nbands, batch, t2, True,
                        st.nbands)
        loss, pen = glue_out(st, zn, znt, acc, spos, mrow, t1, t2)
    return loss, pen, (mrow, zn, znt, acc)


def fused_backward(kern: FusedKernels, feats, w, saved, g_loss, g_pen, soft, penalty, nonorm,
                   t1, t2, need_gw):
    """Gradients ``(d_feats (N, D) in feats' dtype, d_w (B, M) or None)``.

    The O(N M) glue is differentiated with ``torch.func.vjp`` (unlike ``torch.autograd.grad`` it
    also works inside a ``torch.library`` custom op) for the gradients of the kernel statistics,
    then come the row-reduction band kernel and the gradient kernel.
    """
    mrow, zn, znt, acc = saved
    batch = feats.shape[0] // 2
    two_t = t1 != t2
    need_gw = bool(soft and need_gw)
    g_loss = g_loss.to(w.dtype)
    g_pen = g_pen.to(w.dtype)
    w_const = w.detach()

    def glue(zn_, znt_, acc_, spos_, w_):
        st = Setup(w_ if need_gw else w_const, soft, nonorm, penalty)
        znt_ = znt_ if two_t else zn_
        rc = glue_rc(st, znt_, spos_, mrow, t2)
        loss, pen = glue_out(st, zn_, znt_, acc_, spos_, mrow, t1, t2)
        return loss, pen, rc

    with kern.device(feats):
        ff = feats.detach().to(w.dtype)
        partner = ff.roll(batch, 0)
        spos = (ff * partner).sum(1)
        primals = (zn.detach(), (znt if two_t else zn).detach(), acc.detach(), spos, w_const)
        (_, _, rc), vjp_fn = torch.func.vjp(glue, *primals)
        g_acc = vjp_fn((g_loss, g_pen, torch.zeros_like(rc)))[2].contiguous()
        rho = kern.band(feats, mrow, g_acc, 1, batch, t2, False, Setup.nbands_of(penalty))[0]
        g_zn, g_znt, _, g_spos, g_w = vjp_fn((g_loss, g_pen, rho))
        g_zn = g_zn.contiguous()
        g_znt = g_znt.contiguous() if two_t else g_zn
        w2 = torch.cat([w_const, w_const]).contiguous()
        df, gw2 = kern.grad(feats, mrow, w2, g_zn, g_znt, rc.detach().contiguous(), g_acc, batch,
                            t1, t2, two_t, need_gw)
        # spos_a = F_a . F_a' (a' the partner): dF_p += (g_spos_p + g_spos_p') F_p'
        df = df.to(w.dtype).addcmul_((g_spos + g_spos.roll(batch, 0))[:, None], partner)
    d_feats = df.to(feats.dtype)
    d_w = g_w + gw2[:batch] + gw2[batch:] if need_gw else None
    return d_feats, d_w


class FusedFunction(torch.autograd.Function):
    """``(feats (N, D), w (B, M)) -> (loss (M,), penalty (M,))`` through a kernel set, eagerly.

    Forward: row-stats kernel, glue, band (column-reduction) kernel, glue. Backward: the glue's
    vjp, band (row-reduction) kernel, gradient kernel. No double backward.
    """

    @staticmethod
    def forward(ctx, kern, feats, w, soft, penalty, nonorm, t1, t2):
        loss, pen, saved = fused_forward(kern, feats, w, soft, penalty, nonorm, t1, t2)
        ctx.save_for_backward(feats, w, *saved)
        ctx.cfg = (kern, soft, penalty, nonorm, t1, t2)
        return loss, pen

    @staticmethod
    def backward(ctx, g_loss, g_pen):
        feats, w, *saved = ctx.saved_tensors
        kern, soft, penalty, nonorm, t1, t2 = ctx.cfg
        d_feats, d_w = fused_backward(kern, feats, w, saved, g_loss, g_pen, soft, penalty,
                                      nonorm, t1, t2, ctx.needs_input_grad[2])
        return (None, d_feats, None if d_w is None else d_w.to(w.dtype),
                None, None, None, None, None)


def _out_dtype(kern: FusedKernels, z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else kern.stat_dtype(z.dtype)


def fused_eager(kern: FusedKernels, z1, z2, env_weights, *, temperature: float,
                irm_temperature: float, soft: bool, penalty: str = "slot", nonorm: bool = False):
    """The fused op through :class:`FusedFunction` (plain eager autograd, no custom-op boundary)."""
    kern.check(z1)
    w = env_weights.to(kern.stat_dtype(z1.dtype))
    if not soft:
        w = w.detach()
    loss, pen = FusedFunction.apply(kern, kern.feats(z1, z2), w, bool(soft), penalty,
                                    bool(nonorm), float(temperature), float(irm_temperature))
    out = _out_dtype(kern, z1)
    return loss.to(out), pen.to(out)


def register_fused_backend(kern: FusedKernels):
    """The backend function of ``kern``: ``torch.library`` custom ops
    ``fastipirm::env_contrastive_<name>_{fwd,bwd}`` (fullgraph-compilable training steps)."""

    def forward(z1, z2, w, soft, nonorm, penalty, temperature, irm_temperature):
        kern.check(z1)
        loss, pen, (mrow, zn, znt, acc) = fused_forward(
            kern, kern.feats(z1, z2), w.to(kern.stat_dtype(z1.dtype)), soft, penalty, nonorm,
            temperature, irm_temperature)
        if znt is zn:  # outputs of a custom op may not alias each other
            znt = zn.clone()
        out = _out_dtype(kern, z1)
        return loss.to(out), pen.to(out), [mrow, zn, znt, acc]

    def backward(z1, z2, w, saved, d_loss, d_pen, soft, nonorm, penalty, temperature,
                 irm_temperature):
        mrow, zn, znt, acc = saved
        if temperature == irm_temperature:
            znt = zn
        d_feats, d_w = fused_backward(kern, kern.feats(z1, z2), w.to(kern.stat_dtype(z1.dtype)),
                                      (mrow, zn, znt, acc), d_loss, d_pen, soft, penalty, nonorm,
                                      temperature, irm_temperature, need_gw=soft)
        b = z1.shape[0]
        return (d_feats[:b].to(z1.dtype), d_feats[b:].to(z2.dtype),
                None if d_w is None else d_w.to(w.dtype))

    def fake_saved(z1, z2, w, soft, nonorm, penalty):
        n, m = 2 * z1.shape[0], w.shape[1]
        groups = 2 * m if penalty in ("split", "scalar_split") else m
        sd = dict(dtype=kern.stat_dtype(z1.dtype))
        return [z1.new_empty(n, **sd), z1.new_empty(n, m, **sd), z1.new_empty(n, m, **sd),
                z1.new_empty(Setup.nbands_of(penalty), n, groups, **sd)]

    return register_env_contrastive_op(kern.name, forward, backward, fake_saved)
