"""The O(N M) glue shared by the fused backends (Triton, C++ CPU, CUDA), around three kernels.

A fused backend supplies the three kernels that touch the ``N x N`` similarity ``S = F F^T``
(``F = [z1; z2]``, ``N = 2B``); everything else (kappa, norms, hard/soft, nonorm, split groups,
the rank ``pos``, the scatter of the band sums to slots, the positive pair, the four penalty
variants) is this module's torch glue, whose backward is in closed form (:func:`glue_g_acc`,
:func:`glue_cotangents`; O(N M) work, no double backward, tested against ``torch.func.vjp`` of
the glue). The weights-derived quantities and the penalty's assembly from the band sums are those
of the ``"torch"`` backend (:mod:`fastipirm.ops.env_weights`, shared with it). The mathematics and
the notation are those of :mod:`fastipirm.ops.torch_backend` (``docs/kernels.md#contract``); the
kernels' contract (``m_a`` a row shift, every exponential ``E = exp((S - m_a)/T)`` on the
negatives of the anchor row ``a``; bands ``lo/mid/hi`` = column below ``i``, between ``i`` and
``i+B``, above ``i+B`` with ``i = a mod B``; ``K~ = E~ * S / T'``):

* ``rowstats(feats, spos, w2, batch, t1, t2, two_t, cache) -> (mrow (N,), zn (N, M), znt (N, M))``:
  a row shift ``mrow`` with ``mrow_a >= spos_a`` and no exponential overflowing, ``zn = E W2`` at
  ``t1`` and ``znt = E~ W2`` at ``t2`` (``znt`` may be ``zn`` when ``two_t`` is false);
* ``band(feats, mrow, fac, nb_out, batch, t2, trans, nb, cache) -> out (nb_out, N, G)``: with
  ``trans`` the column reductions ``out[b, c] = sum_a band_b(a, c) K~_ac fac[0, a]`` (forward),
  else the row reduction ``out[0, a] = sum_c sum_b band_b(a, c) K~_ac fac[b, c]`` (backward);
  ``nb = 1``: the whole negative mask is the single band (scalar penalties);
* ``grad(feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw, cache) -> (df, gw)``:
  ``df_p = sum_q (dS_pq + dS_qp) F_q`` with, on negatives,
  ``dS_ac = E_ac/T (gZN W2^T)_ac + E~_ac/T' (gZN~ W2^T)_ac + E~_ac (1 + S_ac/T')/T'
  sum_b band_b(a, c) (RC gACC_b^T)_ac``, and (``need_gw``)
  ``gw_c = sum_a E_ac gZN_a + E~_ac gZN~_a``.

The kernels take the temperatures as plain scalars (``t1 = temperature``, ``t2 =
irm_temperature``, ``two_t`` whether they differ); the glue reads everything else from the
call's :class:`~fastipirm.ops.spec.EnvContrastiveSpec`, which travels with the weights' setup.

``cache`` is the kernel set's similarity cache of one op call (:meth:`FusedKernels.sim_cache`, None
for kernel sets without one, as on the GPU, where recomputing a tile is cheaper than storing it):
``rowstats`` fills it, the forward's ``band``, the backward's ``band`` and ``grad`` read it, and it
is saved for the backward with the statistics. A kernel set that caches computes ``F F^T`` once per
forward and backward instead of four times; its size is that kernel set's fixed budget, so memory
stays linear in the batch plus that constant.

The statistics are computed in :meth:`FusedKernels.stat_dtype` (float32, or float64 where a
backend computes in float64). :func:`register_fused_backend` turns a kernel set into a backend
(``torch.library`` custom ops, so a training step with it compiles).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch

from .custom_ops import register_env_contrastive_op
from .env_weights import Setup, penalty_cotangent, penalty_of, slot_gather, slot_gradient
from .spec import EnvContrastiveSpec


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

    def sim_cache_shape(self, n: int, dtype: torch.dtype) -> tuple[int, ...]:
        """Shape of the similarity cache for ``n`` rows of ``dtype`` features; ``(0,)``: none (the
        default)."""
        return (0,)

    def sim_cache(self, feats: torch.Tensor):
        """A fresh (unfilled) similarity cache for ``feats``, or None."""
        shape = self.sim_cache_shape(feats.shape[0], feats.dtype)
        if shape == (0,):
            return None
        return torch.empty(shape, dtype=feats.dtype, device=feats.device)

    @abstractmethod
    def rowstats(self, feats, spos, w2, batch, t1, t2, two_t, cache=None):
        """``(mrow, zn, znt)``; fills ``cache``: see the module docstring."""

    @abstractmethod
    def band(self, feats, mrow, fac, nb_out, batch, t2, trans, nb, cache=None):
        """``(nb_out, N, G)`` band reductions; reads ``cache``: see the module docstring."""

    @abstractmethod
    def grad(self, feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw,
             cache=None):
        """``(df, gw or None)``; reads ``cache``: see the module docstring."""


def _z(e_pos, kappa, zn):
    z = e_pos[:, None] + kappa * zn
    return z.clamp_min(torch.finfo(z.dtype).tiny)


def _inv_group_z(st: Setup, zt):
    """``1 / Z~`` per row group (N, G) as ``exp(-log Z~)``: its derivative is ``-(1/Z~)(1/Z~)``
    (never forming ``Z~^2``, which underflows for rows whose environment sum is tiny, and
    ``x / 0`` is infinite); 1 where the row's group weight is 0 (zero weight times that would
    be NaN)."""
    zg = st.rep(zt)
    zg = torch.where(st.group_weight != 0, zg, torch.ones_like(zg))
    return torch.exp(-torch.log(zg))


def glue_rc(st: Setup, znt, spos, mrow):
    """Row coefficients of the penalty's column reductions: ``gw * kappa / Z~`` (N, G)."""
    t2 = st.spec.irm_temperature
    zt = _z(torch.exp((spos - mrow) / t2), st.kappa, znt)
    return st.group_weight * st.rep(st.kappa) * _inv_group_z(st, zt)


def _per_anchor(st: Setup, zn, spos, mrow, t1):
    """Per anchor and environment ``log(Z / e_pos) = log1p(kappa ZN / e_pos)`` (N, M): exact where
    the row has no negative mass (a one-sample environment), unlike the cancellation
    ``log(Z) + shift - x_pos``, which is kept where ``e_pos`` underflows."""
    y1 = ((spos - mrow) / t1)[:, None]                                              # <= 0
    return torch.where(
        y1 > -80.0, torch.log1p(st.kappa * zn * torch.exp((-y1).clamp_max(80.0))),
        torch.log(_z(torch.exp(y1[:, 0]), st.kappa, zn)) - y1)


def glue_out(st: Setup, zn, znt, acc, spos, mrow):
    """``(loss, penalty, g)`` from the kernel statistics; ``g`` (G, slots) is the penalty's
    gradient vector (:func:`fastipirm.ops.env_weights.penalty_of`)."""
    per_anchor = _per_anchor(st, zn, spos, mrow, st.spec.temperature)
    loss = torch.where(st.total > 0, (st.w2 * per_anchor).sum(0) / st.norm.clamp_min(1e-30), 0.0)
    return (loss, *glue_penalty(st, znt, acc, spos, mrow))


def glue_penalty(st: Setup, znt, acc, spos, mrow):
    """``(penalty, g)``: the penalty part of :func:`glue_out` (the backward needs only ``g``):
    the positive's slot from the statistics, the others from the band sums ``acc``."""
    t2 = st.spec.irm_temperature
    e2pos = torch.exp((spos - mrow) / t2)
    zt = _z(e2pos, st.kappa, znt)
    p_pos_m1 = -st.rep(st.kappa * znt) * _inv_group_z(st, zt)                        # P_pos - 1
    g_pos = (st.group_weight * p_pos_m1 * (spos / t2)[:, None]).sum(0)             # (G,)
    g = slot_gradient(st, acc, g_pos)
    return penalty_of(st, g), g


def glue_cotangents(st: Setup, zn, znt, spos, mrow, g, rc, g_loss, g_pen, rho, acc=None):
    """The glue's vjp in closed form: ``(g_zn, g_znt, g_spos, g_w)`` for the cotangents
    ``g_loss``, ``g_pen`` of the outputs and ``rho`` of ``rc`` (``g`` and ``rc`` the forward's
    values); ``g_w`` (B, M), the soft weights' gradient through the setup, when the band sums
    ``acc`` are given, else None. Equal to ``torch.func.vjp`` of :func:`glue_rc` and
    :func:`glue_out` with the weights' setup in the graph (the tests compare the two) at a third
    of its cost.

    Loss: ``per_anchor = log(Z1) - y1`` with ``Z1 = exp(y1) + kappa ZN`` in both of its
    numerical forms, so ``d/dZN = kappa / Z1`` and ``d/dy1 = -kappa ZN / Z1`` (-1 where ``Z1``
    is clamped). Penalty and ``rc``: through ``q = kappa ZN~`` directly and through
    ``Z~ = exp(y2) + q``, whose reciprocal's derivative is formed as ``-(1/Z~)(1/Z~)``, never
    ``1/Z~^2``.
    """
    t1, t2 = st.spec.temperature, st.spec.irm_temperature
    tiny = torch.finfo(zn.dtype).tiny
    gamma = penalty_cotangent(st, g, g_pen)                                     # (G, slots)
    # loss
    scale = torch.where(st.total > 0, g_loss / st.norm.clamp_min(1e-30), 0.0)
    cot_pa = st.w2 * scale                                                      # (N, M)
    neg_mass = st.kappa * zn
    z1 = torch.exp((spos - mrow) / t1)[:, None] + neg_mass
    inv_z1 = torch.where(z1 >= tiny, 1.0 / z1.clamp_min(tiny), 0.0)
    g_zn = cot_pa * st.kappa * inv_z1
    d_y1 = torch.where(z1 >= tiny, -neg_mass * inv_z1, -1.0)
    g_spos = (cot_pa * d_y1).sum(1) / t1
    # penalty (through the positive's slot g_pos) and rc
    e2 = torch.exp((spos - mrow) / t2)
    zt = e2[:, None] + st.kappa * znt
    izg = _inv_group_z(st, zt.clamp_min(tiny))                                   # (N, G)
    q = st.rep(st.kappa * znt)
    d_g0 = gamma[:, 0]                                                           # (G,)
    cot_p = st.group_weight * d_g0                                               # / t2 * spos
    g_spos = g_spos - (cot_p * q * izg).sum(1) / t2
    cot_p = cot_p * (spos / t2)[:, None]
    cot_zg = (cot_p * izg) * (q * izg) - (rho * rc) * izg
    cot_zt = st.fold(cot_zg) * (zt >= tiny)
    cot_kzt = cot_zt - st.fold(cot_p * izg)                           # of kappa * ZN~
    g_znt = cot_kzt * st.kappa
    g_spos = g_spos + cot_zt.sum(1) * e2 / t2
    if acc is None:
        return g_zn, g_znt, g_spos, None
    # the soft weights: through w2 (loss weights, slot sums, group weights), kappa and the norms
    kappa_g = st.rep(st.kappa)
    cot_kappa = cot_pa * zn * inv_z1 + cot_kzt * znt + st.fold(rho * st.group_weight * izg)
    pa = _per_anchor(st, zn, spos, mrow, t1)
    cot_w2 = pa * scale
    norm = st.norm.clamp_min(1e-30)
    cot_norm = -scale * (st.w2 * pa).sum(0) / norm                     # (M,)
    cot_gw = (rho * kappa_g - (spos / t2)[:, None] * d_g0 * q) * izg   # of group_weight (N, G)
    gnorm = st.group_norm.clamp_min(1e-30)
    cot_w2g = cot_gw * st.group_mask / gnorm + (acc * _band_factors(st, gamma)).sum(0)
    cot_gnorm = -(cot_gw * st.group_weight).sum(0) / gnorm * (st.group_norm > 1e-30)
    if st.split:
        if not st.nonorm:  # group_norm = sum of the masked weights
            cot_w2g = cot_w2g + cot_gnorm * st.group_mask
    else:                  # group_norm is norm
        cot_norm = cot_norm + cot_gnorm
    cot_norm = cot_norm * (st.norm > 1e-30)
    if not st.nonorm:      # norm = total = sum of w2
        cot_w2 = cot_w2 + cot_norm
    cot_w2 = cot_w2 + st.fold(cot_w2g)
    # kappa = (N - 2) / others, others = 2 (sum_b w - w2)
    others = st.others.to(cot_kappa.dtype)
    cot_others = torch.where(st.others > 0, -cot_kappa * st.kappa / others.clamp_min(1e-300), 0.0)
    cot_w2 = cot_w2 - 2.0 * cot_others
    g_w = cot_w2[:st.batch] + cot_w2[st.batch:] + 2.0 * cot_others.sum(0)
    return g_zn, g_znt, g_spos, g_w


def glue_g_acc(st: Setup, g, g_pen):
    """The cotangent of the band sums ``acc`` (nbands, N, G) for the penalty cotangent ``g_pen``
    (M,), in closed form: ``acc[b]`` enters ``g`` through a scatter-add to the slots
    ``group_pos + shift_b`` (a sum for the scalar penalties), so its cotangent is
    ``w2 * dpen/dg`` gathered back from those slots."""
    return st.rep(st.w2) * _band_factors(st, penalty_cotangent(st, g, g_pen))


def _band_factors(st: Setup, gamma):
    """``gamma = dpen/dg`` gathered from the slot of every (band, row, group): (nbands, N, G)."""
    return torch.stack(slot_gather(st, gamma, st.nbands))


def fused_forward(kern: FusedKernels, feats, w, spec: EnvContrastiveSpec):
    """Forward on ``feats = [z1; z2]`` (N, D) and weights ``w`` (B, M) in the statistics dtype.

    Returns ``(loss, penalty, saved)`` with ``saved = (mrow, zn, znt, acc, cache)``: the O(N M)
    statistics the backward needs (``znt is zn`` when the two temperatures coincide) and the
    similarity cache (None without one).
    """
    batch = feats.shape[0] // 2
    t1, t2, two_t = spec.temperature, spec.irm_temperature, spec.two_temperatures
    with torch.no_grad(), kern.device(feats):
        st = Setup(w, spec)
        ff = feats.to(w.dtype)
        spos = (ff * ff.roll(batch, 0)).sum(1)
        cache = kern.sim_cache(feats)
        mrow, zn, znt = kern.rowstats(feats, spos, st.w2.contiguous(), batch, t1, t2, two_t,
                                      cache=cache)
        rc = glue_rc(st, znt, spos, mrow)
        acc = kern.band(feats, mrow, rc.unsqueeze(0).contiguous(), st.nbands, batch, t2, True,
                        st.nbands, cache=cache)
        loss, pen, _ = glue_out(st, zn, znt, acc, spos, mrow)
    return loss, pen, (mrow, zn, znt, acc, cache)


def fused_backward(kern: FusedKernels, feats, w, saved, g_loss, g_pen, spec: EnvContrastiveSpec,
                   need_gw):
    """Gradients ``(d_feats (N, D) in feats' dtype, d_w (B, M) or None)``.

    The O(N M) glue's vjp is in closed form (tested against ``torch.func.vjp`` of the glue): first
    the cotangent of the band sums (:func:`glue_g_acc`), which the row-reduction band kernel
    needs, then the rest (:func:`glue_cotangents`, with the soft weights' gradient when asked),
    then the gradient kernel.
    """
    mrow, zn, znt, acc, cache = saved
    batch = feats.shape[0] // 2
    t1, t2, two_t = spec.temperature, spec.irm_temperature, spec.two_temperatures
    need_gw = bool(spec.soft and need_gw)
    g_loss = g_loss.to(w.dtype)
    g_pen = g_pen.to(w.dtype)
    w_const = w.detach()

    with kern.device(feats), torch.no_grad():
        ff = feats.detach().to(w.dtype)
        partner = ff.roll(batch, 0)
        spos = (ff * partner).sum(1)
        znt = znt if two_t else zn
        st = Setup(w_const, spec)
        rc = glue_rc(st, znt, spos, mrow)
        g = glue_penalty(st, znt, acc, spos, mrow)[1]
        g_acc = glue_g_acc(st, g, g_pen).contiguous()
        rho = kern.band(feats, mrow, g_acc, 1, batch, t2, False, st.nbands, cache=cache)[0]
        g_zn, g_znt, g_spos, g_w = glue_cotangents(st, zn, znt, spos, mrow, g, rc, g_loss, g_pen,
                                                   rho, acc=acc if need_gw else None)
        if not two_t:  # one statistic in both roles: one cotangent
            g_zn = g_zn + g_znt
        g_zn = g_zn.contiguous()
        g_znt = g_znt.contiguous() if two_t else g_zn
        w2 = torch.cat([w_const, w_const]).contiguous()
        df, gw2 = kern.grad(feats, mrow, w2, g_zn, g_znt, rc.detach().contiguous(), g_acc, batch,
                            t1, t2, two_t, need_gw, cache=cache)
        # spos_a = F_a . F_a' (a' the partner): dF_p += (g_spos_p + g_spos_p') F_p'
        df = df.to(w.dtype).addcmul_((g_spos + g_spos.roll(batch, 0))[:, None], partner)
    d_feats = df.to(feats.dtype)
    d_w = g_w + gw2[:batch] + gw2[batch:] if need_gw else None
    return d_feats, d_w


class FusedFunction(torch.autograd.Function):
    """``(feats (N, D), w (B, M)) -> (loss (M,), penalty (M,))`` through a kernel set, eagerly.

    Forward: row-stats kernel, glue, band (column-reduction) kernel, glue. Backward: the glue's
    closed-form cotangents, band (row-reduction) kernel, gradient kernel. No double backward.
    """

    @staticmethod
    def forward(ctx, kern, feats, w, spec):
        loss, pen, saved = fused_forward(kern, feats, w, spec)
        ctx.save_for_backward(feats, w, *saved)
        ctx.cfg = (kern, spec)
        return loss, pen

    @staticmethod
    def backward(ctx, g_loss, g_pen):
        feats, w, *saved = ctx.saved_tensors
        kern, spec = ctx.cfg
        d_feats, d_w = fused_backward(kern, feats, w, saved, g_loss, g_pen, spec,
                                      ctx.needs_input_grad[2])
        return None, d_feats, None if d_w is None else d_w.to(w.dtype), None


def _out_dtype(kern: FusedKernels, z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else kern.stat_dtype(z.dtype)


def fused_eager(kern: FusedKernels, z1, z2, env_weights, spec: EnvContrastiveSpec | None = None,
                **options):
    """The fused op through :class:`FusedFunction` (plain eager autograd, no custom-op boundary);
    ``spec``, or the op's keyword options to build one."""
    spec = EnvContrastiveSpec.of(spec, **options)
    kern.check(z1)
    w = env_weights.to(kern.stat_dtype(z1.dtype))
    if not spec.soft:
        w = w.detach()
    loss, pen = FusedFunction.apply(kern, kern.feats(z1, z2), w, spec)
    out = _out_dtype(kern, z1)
    return loss.to(out), pen.to(out)


def register_fused_backend(kern: FusedKernels):
    """The backend function of ``kern``: ``torch.library`` custom ops
    ``fastipirm::env_contrastive_<name>_{fwd,bwd}`` (fullgraph-compilable training steps)."""

    def forward(z1, z2, w, spec):
        kern.check(z1)
        loss, pen, (mrow, zn, znt, acc, cache) = fused_forward(
            kern, kern.feats(z1, z2), w.to(kern.stat_dtype(z1.dtype)), spec)
        if znt is zn:  # outputs of a custom op may not alias each other
            znt = zn.clone()
        if cache is None:  # outputs are tensors: an empty one stands for "no cache"
            cache = mrow.new_empty(0)
        out = _out_dtype(kern, z1)
        return loss.to(out), pen.to(out), [mrow, zn, znt, acc, cache]

    def backward(z1, z2, w, saved, d_loss, d_pen, spec):
        mrow, zn, znt, acc, cache = saved
        if not spec.two_temperatures:
            znt = zn
        d_feats, d_w = fused_backward(kern, kern.feats(z1, z2), w.to(kern.stat_dtype(z1.dtype)),
                                      (mrow, zn, znt, acc, cache if cache.numel() else None),
                                      d_loss, d_pen, spec, need_gw=spec.soft)
        b = z1.shape[0]
        return (d_feats[:b].to(z1.dtype), d_feats[b:].to(z2.dtype),
                None if d_w is None else d_w.to(w.dtype))

    def fake_saved(z1, z2, w, spec):
        n, m = 2 * z1.shape[0], w.shape[1]
        sd = dict(dtype=kern.stat_dtype(z1.dtype))
        return [z1.new_empty(n, **sd), z1.new_empty(n, m, **sd), z1.new_empty(n, m, **sd),
                z1.new_empty(Setup.nbands_of(spec.penalty), n, spec.groups(m), **sd),
                z1.new_empty(kern.sim_cache_shape(n, sd["dtype"]), **sd)]

    return register_env_contrastive_op(kern.name, forward, backward, fake_saved)
