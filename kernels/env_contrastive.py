"""The Triton kernels of backend ``"triton"`` and their launchers: fused, O(N (D+M)) memory.

The kernel set of :mod:`fastipirm.ops.triton_backend`, which wraps these launchers for the shared
fused glue and registers the backend (this module imports nothing from the ops layer). The
function is that of the ``"torch"`` backend (``docs/kernels.md`` has the math and the notation:
``N = 2B`` concatenated views, ``W2 = [w; w]``, row stats ``Z = e_pos + kappa * (E @ W2)``,
per-slot penalty from three diagonal-band column reductions scattered to slots
``pos+1, pos, pos-1``). The ``N x N`` similarity is never materialised, neither in forward nor in
backward.

Decomposition
-------------
Everything that touches the ``N x N`` similarity ``S = F F^T`` (``F = [z1; z2]``) is one of four
row-block kernels (grid over blocks of ``BLOCK_M`` rows, loop over blocks of ``BLOCK_N`` columns,
``S`` tile by ``tl.dot`` with fp32 accumulation, deterministic: no atomics). Masks: ``neg`` (the
negatives of the anchor row), ``lo / mid / hi`` (column below ``i``, between ``i`` and ``i+B``,
above ``i+B``, ``i = anchor mod B``). ``E = exp((S - m_a) / T)`` on negatives, ``K~ = E~ * S / T'``
(tilde: at ``irm_temperature``), ``m_a`` the row max of ``S`` over ``c != a`` (positive included),
so every exponential is <= 1: no overflow for any temperature or input norm.

Numerical range (shared with the ``"torch"`` backend, which uses the same row shift): an
environment's row sum underflows in fp32 when *all* of its terms (the positive included) lie more
than ~87 temperatures below the row max, i.e. when a logit of a sample outside the environment (or
of weight 0) beats the positive by that much. With L2-normalised features that needs T < 2/87;
with non-normalised features at low temperature it can happen, and then that environment's values
are inaccurate. A shift per environment would fix it at M times the exp work; not done.

1. ``_rowstats_kernel``: online row max ``m`` (initialised with the positive logit) and
   ``ZN = E @ W2``, ``ZN~ = E~ @ W2`` (all M environment columns at once, one narrow dot per tile).
2. ``_band_kernel`` (``TRANS=True``): the penalty's column reductions
   ``ACC_band[c] = sum_a band(a, c) K~_ac RC_a`` for the ``G`` row groups (``G = M``, or ``2M``
   for the split penalties), computed per row block of ``c`` from the transposed tile (``S`` is
   symmetric), one narrow dot per band.
3. ``_band_kernel`` (``TRANS=False``, backward): the row reduction
   ``RHO_a = sum_c sum_band band(a, c) K~_ac gACC_band[c]`` (the gradient of ``ACC`` w.r.t. ``RC``).
4. ``_grad_kernel`` (backward): ``dS_ac`` on negatives from the closed form (below) for the tile
   and its transpose, ``dF_rows += (dS + dS^T) @ F_cols``, and (soft mode) the weight gradient of
   the row sums ``gW2 = E^T gZN + E~^T gZN~``.

All the environment logic (kappa, norms, hard/soft, nonorm, split groups, the rank ``pos``, the
scatter of the ``(3, N, G)`` band sums to slots, the positive pair, the four penalty variants) is
O(N M) torch "glue" on the kernel outputs, shared with the C++ and CUDA backends
(``docs/kernels.md#glue``; each kernel's contract: ``#contract``). Backward differentiates that
glue in closed form (O(N M) work, no ``create_graph``, no double backward) to get ``gZN, gZN~,
gACC, gRC`` and the direct weight gradients, then runs the two backward kernels.
With ``x = S/T``:

``dS_ac = E_ac/T (gZN W2^T)_ac + E~_ac/T' (gZN~ W2^T)_ac
          + E~_ac (1 + x~_ac)/T' sum_band band_ac (RC gACC_band^T)_ac``   (negatives only),

the positive pair ``(a, a')`` enters through the glue (``spos_a = F_a . F_a'``) and the row shift
``m`` is a constant (the function is shift invariant). The glue writes the per-anchor loss as
``log1p(kappa ZN / e_pos)`` and ``P_pos - 1`` as ``-kappa ZN / Z`` (no cancellation: exact zeros for
rows without negative mass, e.g. one-sample environments).

Precision: fp16/bf16 inputs feed the similarity GEMM directly (fp32 accumulation); fp32 inputs
use ``input_precision="ieee"`` unless ``torch.get_float32_matmul_precision() != "highest"``, then
tf32. The narrow environment dots take fp32 operands (``ieee``, or tf32 where the similarity GEMM
is tf32 or the inputs are fp16/bf16; under the interpreter everything is exact). float64 inputs
are computed in float32 and the outputs / gradients cast back to float64 (documented deviation:
float32 accuracy). Outputs are float32 for fp16/bf16/fp32 inputs.

Launchers: :func:`rowstats`, :func:`band` and :func:`grad` (the three kernels of the fused
glue's contract, see ``docs/kernels.md#contract``); float32 outputs, the input precision chosen
from the features' dtype and torch's float32 matmul precision.

Feature dimension: a row block keeps its ``(BLOCK_M, next_pow2(D))`` features and gradient in
registers, so ``D`` is limited to :data:`MAX_D` (a clear ``ValueError`` beyond; the projection
heads of IP-IRM use D = 128).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .utils import input_precisions, interpreter_env, next_pow2

MAX_D = 256
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _masks(anchor, other, B, N):
    """Negatives and band classes of ``other`` for the anchor row ``anchor`` (broadcasting)."""
    i = anchor % B
    valid = (anchor < N) & (other < N)
    neg = valid & (other != i) & (other != i + B)
    lo = neg & (other < i)
    hi = neg & (other > i + B)
    mid = neg & (other > i) & (other < i + B)
    return neg, lo, mid, hi


@triton.jit
def _rowstats_kernel(F, SPOS, W, M_OUT, ZN_OUT, ZNT_OUT,
                     N, B, D, M, stride_f, stride_w, stride_z,
                     scale1, scale2,
                     TWO_T: tl.constexpr, PREC: tl.constexpr, NPREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < M
    fi = tl.load(F + rows[:, None] * stride_f + offs_d[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    # the positive logit is a lower bound of the row max: the running max is finite from the start
    m_i = tl.load(SPOS + rows, mask=rmask, other=0.0)
    acc1 = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        fj = tl.load(F + cols[:, None] * stride_f + offs_d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(fi, tl.trans(fj), input_precision=PREC)
        neg, lo, mid, hi = _masks(rows[:, None], cols[None, :], B, N)
        m_new = tl.maximum(m_i, tl.max(tl.where(neg, s, -float("inf")), 1))
        wj = tl.load(W + cols[:, None] * stride_w + offs_e[None, :],
                     mask=cmask[:, None] & emask[None, :], other=0.0)
        p1 = tl.exp2(tl.where(neg, (s - m_new[:, None]) * scale1, -float("inf")))
        alpha1 = tl.exp2((m_i - m_new) * scale1)
        acc1 = acc1 * alpha1[:, None] + tl.dot(p1, wj, input_precision=NPREC)
        if TWO_T:
            p2 = tl.exp2(tl.where(neg, (s - m_new[:, None]) * scale2, -float("inf")))
            alpha2 = tl.exp2((m_i - m_new) * scale2)
            acc2 = acc2 * alpha2[:, None] + tl.dot(p2, wj, input_precision=NPREC)
        m_i = m_new
    tl.store(M_OUT + rows, m_i, mask=rmask)
    omask = rmask[:, None] & emask[None, :]
    optr = rows[:, None] * stride_z + offs_e[None, :]
    tl.store(ZN_OUT + optr, acc1, mask=omask)
    if TWO_T:
        tl.store(ZNT_OUT + optr, acc2, mask=omask)


@triton.jit
def _band_kernel(F, MROW, FAC, OUT,
                 N, B, D, G, stride_f, stride_fb, stride_fn, stride_ob, stride_on,
                 scale2, inv_t2,
                 TRANS: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr, NPREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """TRANS: ``OUT[b, p] = sum_q band_b(q, p) K~_qp FAC[0, q]`` (column reductions, forward).

    not TRANS: ``OUT[0, p] = sum_q sum_b band_b(p, q) K~_pq FAC[b, q]`` (row reduction, backward).
    ``NB = 1`` uses the whole negative mask as the single band (scalar penalties).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    fi = tl.load(F + rows[:, None] * stride_f + offs_d[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_r = tl.load(MROW + rows, mask=rmask, other=0.0)
    acc0 = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        fj = tl.load(F + cols[:, None] * stride_f + offs_d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(fi, tl.trans(fj), input_precision=PREC)
        fmask = cmask[:, None] & gmask[None, :]
        fptr = FAC + cols[:, None] * stride_fn + offs_g[None, :]
        if TRANS:
            m_c = tl.load(MROW + cols, mask=cmask, other=0.0)
            neg, lo, mid, hi = _masks(cols[None, :], rows[:, None], B, N)
            k = tl.exp2(tl.where(neg, (s - m_c[None, :]) * scale2, -float("inf"))) * (s * inv_t2)
            f0 = tl.load(fptr, mask=fmask, other=0.0)
            if NB == 1:
                acc0 += tl.dot(k, f0, input_precision=NPREC)
            else:
                acc0 += tl.dot(tl.where(lo, k, 0.0), f0, input_precision=NPREC)
                acc1 += tl.dot(tl.where(mid, k, 0.0), f0, input_precision=NPREC)
                acc2 += tl.dot(tl.where(hi, k, 0.0), f0, input_precision=NPREC)
        else:
            neg, lo, mid, hi = _masks(rows[:, None], cols[None, :], B, N)
            k = tl.exp2(tl.where(neg, (s - m_r[:, None]) * scale2, -float("inf"))) * (s * inv_t2)
            f0 = tl.load(fptr, mask=fmask, other=0.0)
            if NB == 1:
                acc0 += tl.dot(k, f0, input_precision=NPREC)
            else:
                f1 = tl.load(fptr + stride_fb, mask=fmask, other=0.0)
                f2 = tl.load(fptr + 2 * stride_fb, mask=fmask, other=0.0)
                acc0 += tl.dot(tl.where(lo, k, 0.0), f0, input_precision=NPREC)
                acc0 += tl.dot(tl.where(mid, k, 0.0), f1, input_precision=NPREC)
                acc0 += tl.dot(tl.where(hi, k, 0.0), f2, input_precision=NPREC)
    omask = rmask[:, None] & gmask[None, :]
    optr = OUT + rows[:, None] * stride_on + offs_g[None, :]
    tl.store(optr, acc0, mask=omask)
    if TRANS:
        if NB == 3:
            tl.store(optr + stride_ob, acc1, mask=omask)
            tl.store(optr + 2 * stride_ob, acc2, mask=omask)


@triton.jit
def _grad_kernel(F, MROW, W, GZ1, GZ2, RC, GACC, DF, GW,
                 N, B, D, M, G, stride_f, stride_w, stride_rc, stride_gb, stride_gn,
                 stride_df, scale1, scale2, inv_t1, inv_t2,
                 TWO_T: tl.constexpr, NB: tl.constexpr, NEED_GW: tl.constexpr,
                 PREC: tl.constexpr, NPREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """``DF[p] = sum_q (dS_pq + dS_qp) F_q`` over negatives, and ``GW[p] = sum_q E_qp gZN_q (+ ~)``.

    ``W, GZ1, GZ2`` are ``(N, M)`` with row stride ``stride_w``; ``RC`` is ``(N, G)``; ``GACC``
    ``(NB, N, G)``. With ``TWO_T == False`` the caller merged both temperatures' ``gZN`` into GZ1.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < M
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    fi = tl.load(F + rows[:, None] * stride_f + offs_d[None, :],
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_r = tl.load(MROW + rows, mask=rmask, other=0.0)
    eptr_i = rows[:, None] * stride_w + offs_e[None, :]
    emask_i = rmask[:, None] & emask[None, :]
    w_i = tl.load(W + eptr_i, mask=emask_i, other=0.0)
    g1_i = tl.load(GZ1 + eptr_i, mask=emask_i, other=0.0)
    gptr_i = rows[:, None] * stride_gn + offs_g[None, :]
    gmask_i = rmask[:, None] & gmask[None, :]
    rc_i = tl.load(RC + rows[:, None] * stride_rc + offs_g[None, :], mask=gmask_i, other=0.0)
    a0_i = tl.load(GACC + gptr_i, mask=gmask_i, other=0.0)
    dacc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    gwacc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        fj = tl.load(F + cols[:, None] * stride_f + offs_d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(fi, tl.trans(fj), input_precision=PREC)
        m_c = tl.load(MROW + cols, mask=cmask, other=0.0)
        eptr_j = cols[:, None] * stride_w + offs_e[None, :]
        emask_j = cmask[:, None] & emask[None, :]
        w_j = tl.load(W + eptr_j, mask=emask_j, other=0.0)
        g1_j = tl.load(GZ1 + eptr_j, mask=emask_j, other=0.0)
        gptr_j = cols[:, None] * stride_gn + offs_g[None, :]
        gmask_j = cmask[:, None] & gmask[None, :]
        rc_j = tl.load(RC + cols[:, None] * stride_rc + offs_g[None, :], mask=gmask_j, other=0.0)
        a0_j = tl.load(GACC + gptr_j, mask=gmask_j, other=0.0)
        # direct (anchor = row p, column q) and transposed (anchor = column q, column p) masks;
        # the negative mask is symmetric, the band classes are not
        neg, lo_d, mid_d, hi_d = _masks(rows[:, None], cols[None, :], B, N)
        e1d = tl.exp2(tl.where(neg, (s - m_r[:, None]) * scale1, -float("inf")))
        e1t = tl.exp2(tl.where(neg, (s - m_c[None, :]) * scale1, -float("inf")))
        ds = (e1d * tl.dot(g1_i, tl.trans(w_j), input_precision=NPREC)
              + e1t * tl.dot(w_i, tl.trans(g1_j), input_precision=NPREC)) * inv_t1
        if NEED_GW:
            gwacc += tl.dot(e1t, g1_j, input_precision=NPREC)
        if TWO_T:
            g2_i = tl.load(GZ2 + eptr_i, mask=emask_i, other=0.0)
            g2_j = tl.load(GZ2 + eptr_j, mask=emask_j, other=0.0)
            e2d = tl.exp2(tl.where(neg, (s - m_r[:, None]) * scale2, -float("inf")))
            e2t = tl.exp2(tl.where(neg, (s - m_c[None, :]) * scale2, -float("inf")))
            ds += (e2d * tl.dot(g2_i, tl.trans(w_j), input_precision=NPREC)
                   + e2t * tl.dot(w_i, tl.trans(g2_j), input_precision=NPREC)) * inv_t2
            if NEED_GW:
                gwacc += tl.dot(e2t, g2_j, input_precision=NPREC)
        else:
            e2d = e1d
            e2t = e1t
        if NB == 1:
            bd = tl.dot(rc_i, tl.trans(a0_j), input_precision=NPREC)
            bt = tl.dot(a0_i, tl.trans(rc_j), input_precision=NPREC)
        else:
            a1_i = tl.load(GACC + stride_gb + gptr_i, mask=gmask_i, other=0.0)
            a2_i = tl.load(GACC + 2 * stride_gb + gptr_i, mask=gmask_i, other=0.0)
            a1_j = tl.load(GACC + stride_gb + gptr_j, mask=gmask_j, other=0.0)
            a2_j = tl.load(GACC + 2 * stride_gb + gptr_j, mask=gmask_j, other=0.0)
            neg_t, lo_t, mid_t, hi_t = _masks(cols[None, :], rows[:, None], B, N)
            bd = tl.where(lo_d, tl.dot(rc_i, tl.trans(a0_j), input_precision=NPREC),
                          tl.where(mid_d, tl.dot(rc_i, tl.trans(a1_j), input_precision=NPREC),
                                   tl.dot(rc_i, tl.trans(a2_j), input_precision=NPREC)))
            bt = tl.where(lo_t, tl.dot(a0_i, tl.trans(rc_j), input_precision=NPREC),
                          tl.where(mid_t, tl.dot(a1_i, tl.trans(rc_j), input_precision=NPREC),
                                   tl.dot(a2_i, tl.trans(rc_j), input_precision=NPREC)))
        ds += (e2d * bd + e2t * bt) * (1.0 + s * inv_t2) * inv_t2
        dacc += tl.dot(ds, fj.to(tl.float32), input_precision=NPREC)
    tl.store(DF + rows[:, None] * stride_df + offs_d[None, :], dacc,
             mask=rmask[:, None] & dmask[None, :])
    if NEED_GW:
        tl.store(GW + eptr_i, gwacc, mask=emask_i)


# ----------------------------------------------------------------------------------------------
# launchers (autotuned on a GPU, one default config under the interpreter)
# ----------------------------------------------------------------------------------------------

def _configs(heavy: bool) -> list:
    """Hopper/Ampere candidates; ``heavy`` kernels (the backward) keep more tiles in registers."""
    cfgs = []
    for bm, bn, warps, stages in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
                                  (64, 128, 8, 2), (128, 128, 8, 2), (32, 64, 4, 2)):
        if heavy and bm * bn > 64 * 128:
            continue
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                  num_stages=stages))
    return cfgs


# Whether Triton created these kernels for its CPU interpreter (decided when this module was
# imported, by TRITON_INTERPRET at that time; see utils.is_interpreter).
INTERPRETED = type(_rowstats_kernel).__name__ == "InterpretedFunction"
# Under the interpreter: one config, small blocks so that tests reach several tiles cheaply.
INTERPRET_BLOCK = 32
_GPU_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64}
# The gradient kernel at 64 x 64 needs up to ~170 KB of shared memory (fp32 exact, two
# temperatures; sm_80 AOT compile), over the A100's 164 KB: its untuned default is 32 x 64.
_GPU_DEFAULT_HEAVY = {"BLOCK_M": 32, "BLOCK_N": 64}
_tuned: dict = {}


def _autotuned(kernel, heavy: bool):
    # keyed on (N = 2B, D, M or G): the shapes that change the best tile
    key = ["N", "D", "G"] if kernel is _band_kernel else ["N", "D", "M"]
    if kernel is _grad_kernel:
        key = ["N", "D", "M", "G"]
    if kernel not in _tuned:
        _tuned[kernel] = triton.autotune(configs=_configs(heavy), key=key)(kernel)
    return _tuned[kernel]


def _launch(kernel, heavy: bool, n: int, *args, **kwargs):
    """Interpreter: the bare JIT function with the default config; GPU: the autotuner.

    ``FASTIPIRM_TRITON_AUTOTUNE=0`` launches the default GPU config without tuning.
    """
    if INTERPRETED:
        grid = (triton.cdiv(n, INTERPRET_BLOCK),)
        with interpreter_env():
            kernel[grid](*args, **kwargs, BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK)
    elif os.environ.get("FASTIPIRM_TRITON_AUTOTUNE", "1") == "0":
        cfg = _GPU_DEFAULT_HEAVY if heavy else _GPU_DEFAULT
        grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
        kernel[grid](*args, **kwargs, **cfg, num_warps=4, num_stages=2)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        _autotuned(kernel, heavy)[grid](*args, **kwargs)


def rowstats(feats, spos, w2, batch, t1, t2, two_t):
    """Row shift ``mrow`` (N,) and the row sums ``zn = E W2``, ``znt = E~ W2`` (N, M) (``znt is
    zn`` unless ``two_t``); all float32."""
    prec = input_precisions(feats.dtype)
    n, d = feats.shape
    m = w2.shape[1]
    m_out = torch.empty(n, device=feats.device, dtype=torch.float32)
    zn = torch.empty(n, m, device=feats.device, dtype=torch.float32)
    znt = torch.empty(n, m, device=feats.device, dtype=torch.float32) if two_t else zn
    _launch(_rowstats_kernel, False, n, feats, spos, w2, m_out, zn, znt,
            n, batch, d, m, feats.stride(0), w2.stride(0), zn.stride(0),
            _LOG2E / t1, _LOG2E / t2,
            TWO_T=two_t, PREC=prec[0], NPREC=prec[1],
            BLOCK_D=next_pow2(d), BLOCK_E=next_pow2(m))
    return m_out, zn, znt


def band(feats, mrow, fac, nb_out, batch, t2, trans, nb):
    """``(nb_out, N, G)`` float32 band reductions of ``K~`` against the factors ``fac``: the
    column reductions (``trans``, forward) or the row reduction (backward)."""
    prec = input_precisions(feats.dtype)
    n, d = feats.shape
    g = fac.shape[2]
    out = torch.empty(nb_out, n, g, device=feats.device, dtype=torch.float32)
    _launch(_band_kernel, False, n, feats, mrow, fac, out,
            n, batch, d, g, feats.stride(0), fac.stride(0), fac.stride(1),
            out.stride(0), out.stride(1), _LOG2E / t2, 1.0 / t2,
            TRANS=trans, NB=nb, PREC=prec[0], NPREC=prec[1],
            BLOCK_D=next_pow2(d), BLOCK_G=next_pow2(g))
    return out


def grad(feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw):
    """``(dF (N, D), gW2 (N, M) or None)`` float32: the gradient kernel (``w2`` float32, the
    cotangents ``gz1, gz2`` with ``w2``'s strides)."""
    prec = input_precisions(feats.dtype)
    n, d = feats.shape
    m = w2.shape[1]
    g = rc.shape[1]
    nb = gacc.shape[0]
    df = torch.empty(n, d, device=feats.device, dtype=torch.float32)
    gw = torch.empty(n, m, device=feats.device, dtype=torch.float32) if need_gw else df
    for t in (gz1, gz2):
        assert t.stride() == w2.stride()
    _launch(_grad_kernel, True, n, feats, mrow, w2, gz1, gz2, rc, gacc, df, gw,
            n, batch, d, m, g, feats.stride(0), w2.stride(0), rc.stride(0),
            gacc.stride(0), gacc.stride(1), df.stride(0),
            _LOG2E / t1, _LOG2E / t2, 1.0 / t1, 1.0 / t2,
            TWO_T=two_t, NB=nb, NEED_GW=need_gw, PREC=prec[0], NPREC=prec[1],
            BLOCK_D=next_pow2(d), BLOCK_E=next_pow2(m), BLOCK_G=next_pow2(g))
    return df, (gw if need_gw else None)
