"""The Triton kernels of ``masked_contrastive_loss`` (kernel set ``"triton"``) and their launchers.

The four kernels of the contract in :mod:`fastipirm.ops.masked_glue` (``rowstats``, ``colsum``,
``rowsum``, ``grad``), wrapped as a kernel set by :mod:`fastipirm.ops.masked_triton`, which also
computes the tile plan (this module imports nothing from the ops layer). Notation: rows are the
queries ``q_i`` (Q, D), columns the keys ``k_j`` (K, D), ``x_ij = s(q_i, k_j) * inv_t``; every sum
runs over the *negative* pairs only (same group, or no groups; ``j`` not in ``exclude[i]``);
``m`` is the row shift. The ``Q x K`` matrix is never stored: each kernel recomputes its tiles.

Kernels (deterministic: no atomics, every program owns its outputs)
----------------------------------------------------------------
* ``_row_kernel`` (grid over blocks of ``BLOCK_M`` rows, loop over blocks of ``BLOCK_N``
  columns), ``MODE`` 0 = rowstats: online ``m_i = max(m0_i, max_{j: w_j > 0} x_ij)`` and
  ``z_i = sum_j w_j e^{x_ij - m_i}`` (the running sum rescaled when the max grows);
  ``MODE`` 1 = rowsum: ``r_i = sum_j w_j gamma_j e^{x_ij - m_i} x_ij``.
* ``_col_kernel`` (grid over column blocks, loop over row blocks): colsum
  ``a_j = sum_i e^{x_ij - m_i} (rho_i x_ij + sigma_i)``.
* ``_dq_kernel`` / ``_dk_kernel`` (grid over row / column blocks and over chunks of ``BLOCK_D``
  features of the output): with ``G_ij = w_j e^{x_ij - m_i} (alpha_i + beta_i gamma_j (1 + x_ij))
  inv_t`` (``HAS_GAMMA`` false: ``alpha_i`` only), ``dq_i = sum_j G_ij ds_ij/dq_i`` and
  ``dk_j = sum_i G_ij ds_ij/dk_j``: dot ``G K``, ``G^T Q``; sqeuclidean ``2 (G K - rowsum(G) q)``,
  ``2 (G^T Q - colsum(G) k)``; l1/lp ``-/+ sum G_ij p |q - k|^(p-1) sign(q - k)`` per feature.

Similarity tiles (``_logits``): dot and sqeuclidean (``2 q.k - |q|^2 - |k|^2``, clamped at 0
like the torch kernel set) through ``tl.dot`` with fp32 accumulation; l1/lp elementwise on a
``(BLOCK_M, BLOCK_N, BLOCK_D)`` difference tile, ``|d|^p = exp2(p log2 |d|)`` with ``|d| = 0``
giving 0. When ``D <= BLOCK_D`` (``ONE_CHUNK``: dot/sqeuclidean up to D = 128, l1/lp up to
D = 16, the CL-ICA sizes) a program loads its own block's features once and one tile of the
other side per step; otherwise it loops over the features in chunks of ``BLOCK_D``, and the
gradient kernels, which own one feature chunk of the output each (second grid axis), recompute
the similarity per chunk (``ceil(D / BLOCK_D)`` times in the backward). Any D works.

Masks: rows >= Q and columns >= K; groups compared in the tile; ``exclude`` (Q, E) compared
against the column indices (``E`` a compile-time constant: 1 + the number of targets).
**Tile skipping**: with groups, a program visits only the blocks listed for it in the plan
(``CNT``/``LIST``, built in torch from per-block min/max group ids by
:mod:`fastipirm.ops.masked_triton`): blocks whose group ranges cannot meet are never loaded
(block-diagonal groups of 32, e.g. DCoDR's 4 domains x 32, do a quarter of the dense work with
the 32-wide tiles the launch picks when groups are given). ``COUNT_TILES`` makes every launch
record the blocks its programs visited (tests).

Tiles (:func:`blocks`; no autotuning, since the tile plan depends on the tiles): fp16/bf16
dot/sqeuclidean 64 x 64 forward and 64 x 32 gradients (8 warps), 32 x 32 (4 warps) with groups or
fp32 inputs, l1/lp 32 x 16 forward and 16 x 16 gradients (4 warps). sm_90 ptxas reports (D = 128,
D = 10): no spills for fp16/bf16 with Triton 3.9, at most 44 bytes with Triton 3.6 (sqeuclidean
and l1 gradients). Exact fp32 (``ieee``) dots run on the FMA units and spill in some kernels (the
row kernels with Triton 3.6, as the env op's kernels do).

Numerics: statistics in float32; fp16/bf16 inputs are read directly (tensor-core similarity,
fp32 accumulation), fp32 inputs use ``input_precision="ieee"`` unless
``torch.get_float32_matmul_precision() != "highest"`` (then tf32); the gradient dots take fp32
operands (``G`` and the features, ``ieee`` for exact fp32, else tf32). Every exponential is
``exp2((x - m) log2 e)`` of the negatives only (``x <= m`` there; ``exp2(-inf) = 0`` elsewhere),
so nothing overflows at any temperature. Offsets are int32: ``Q D`` and ``K D`` below 2^31.

Under the interpreter (``TRITON_INTERPRET=1`` before this module is imported) the launches use
16-wide blocks and small feature chunks, so tiny test shapes still cover several tiles, ragged
edges, skipped tiles and several feature chunks; the device helpers run as plain Python inside
their kernel (:func:`_device`), which makes an interpreted launch several times faster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import input_precisions, interpreter_env, next_pow2

DOT, SQEUCLIDEAN, L1, LP = 0, 1, 2, 3


def _device(fn):
    """``triton.jit`` for a device helper; under the interpreter the plain function, run inside
    its kernel's patched ``triton.language`` (the interpreter re-patches the language on every
    call of one jit function from another, about 6 ms each: most of an interpreted launch)."""
    jitted = triton.jit(fn)
    return fn if type(jitted).__name__ == "InterpretedFunction" else jitted


# ----------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------

@_device
def _pow(a, p):
    """``a ** p`` for ``a >= 0`` (0 at ``a = 0``, never NaN)."""
    pos = a > 0.0
    return tl.where(pos, tl.exp2(p * tl.log2(tl.where(pos, a, 1.0))), 0.0)


@_device
def _slope(diff, p, CODE: tl.constexpr):
    """d|diff|^p / d diff (``sign`` for l1, 0 at ``diff = 0``)."""
    sgn = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    if CODE == 2:
        out = sgn
    else:
        out = p * _pow(tl.abs(diff), p - 1.0) * sgn
    return out


@_device
def _tile(P, idx, imask, offs, dmask, stride):
    """Rows ``idx`` x features ``offs`` of a feature matrix (0 outside)."""
    return tl.load(P + idx[:, None] * stride + offs[None, :], mask=imask[:, None] & dmask[None, :],
                   other=0.0)


@_device
def _sim_chunk(qi, kj, s, nq, nk, p, CODE: tl.constexpr, PREC: tl.constexpr):
    """Add one feature chunk (``qi`` (BLOCK_M, BLOCK_D), ``kj`` (BLOCK_N, BLOCK_D)) to the
    similarity accumulator ``s`` (and, sqeuclidean, the squared norms ``nq``, ``nk``)."""
    if CODE < 2:
        s = tl.dot(qi, tl.trans(kj), s, input_precision=PREC)
        if CODE == 1:
            qf = qi.to(tl.float32)
            kf = kj.to(tl.float32)
            nq += tl.sum(qf * qf, 1)
            nk += tl.sum(kf * kf, 1)
    else:
        diff = qi.to(tl.float32)[:, None, :] - kj.to(tl.float32)[None, :, :]
        if CODE == 2:
            s -= tl.sum(tl.abs(diff), 2)
        else:
            s -= tl.sum(_pow(tl.abs(diff), p), 2)
    return s, nq, nk


@_device
def _logits(Q, K, rows, cols, rmask, cmask, qi, kj, D, stride_q, stride_k, inv_t, p,
            CODE: tl.constexpr, PREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``x = s(q_rows, k_cols) * inv_t`` (BLOCK_M, BLOCK_N), float32. ``ONE_CHUNK`` (D <=
    BLOCK_D): from the tiles ``qi``, ``kj`` the caller loaded; else a loop over the chunks."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nk = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if ONE_CHUNK:
        s, nq, nk = _sim_chunk(qi, kj, s, nq, nk, p, CODE, PREC)
    else:
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dmask = offs < D
            s, nq, nk = _sim_chunk(_tile(Q, rows, rmask, offs, dmask, stride_q),
                                   _tile(K, cols, cmask, offs, dmask, stride_k),
                                   s, nq, nk, p, CODE, PREC)
    if CODE == 1:
        s = tl.minimum(2.0 * s - nq[:, None] - nk[None, :], 0.0)
    return s * inv_t


@_device
def _negatives(QG, KG, EX, rows, cols, rmask, cmask, stride_ex,
               HAS_GROUPS: tl.constexpr, N_EX: tl.constexpr):
    """The negative pairs of the tile (bool, BLOCK_M x BLOCK_N)."""
    neg = rmask[:, None] & cmask[None, :]
    if HAS_GROUPS:
        gq = tl.load(QG + rows, mask=rmask, other=0)
        gk = tl.load(KG + cols, mask=cmask, other=0)
        neg = neg & (gq[:, None] == gk[None, :])
    if N_EX > 0:
        for e in tl.static_range(N_EX):
            ex = tl.load(EX + rows * stride_ex + e, mask=rmask, other=-1).to(tl.int32)
            neg = neg & (cols[None, :] != ex[:, None])
    return neg


@_device
def _shifted_exp(x, m, neg):
    """``e^{x - m}`` on the negatives (<= 1 there), exactly 0 elsewhere (exp2 of -inf)."""
    return tl.exp2(tl.where(neg, (x - m[:, None]) * 1.4426950408889634, -float("inf")))


@_device
def _span(block, n, BLOCK: tl.constexpr):
    """The indices ``block * BLOCK + [0, BLOCK)`` and which of them are below ``n``."""
    idx = block * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < n


@_device
def _trip(CNT, pid, n, BLOCK: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """Number of blocks of the other dimension this program visits (all, or its plan's)."""
    if HAS_GROUPS:
        out = tl.load(CNT + pid)
    else:
        out = tl.cdiv(n, BLOCK)
    return out


@_device
def _visit(LIST, pid, stride_list, t, n, BLOCK: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """The indices (and mask, :func:`_span`) of the ``t``-th block of the other dimension this
    program visits (the ``t``-th block, or its plan's ``t``-th entry)."""
    if HAS_GROUPS:
        block = tl.load(LIST + pid * stride_list + t)
    else:
        block = t
    return _span(block, n, BLOCK)


@_device
def _vectors(A, B, idx, mask, HAS_B: tl.constexpr):
    """``(A[idx], B[idx])`` (0 outside ``mask``); ``B`` is not read without ``HAS_B`` (then
    ``A[idx]`` stands in for it)."""
    a = tl.load(A + idx, mask=mask, other=0.0)
    b = a
    if HAS_B:
        b = tl.load(B + idx, mask=mask, other=0.0)
    return a, b


@_device
def _count(VISITS, slot, visits, COUNT: tl.constexpr):
    """``COUNT_TILES``: record how many blocks the program visited."""
    if COUNT:
        tl.store(VISITS + slot, visits)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_kernel(Q, K, W, GAMMA, M_IN, M_OUT, OUT, QG, KG, EX, CNT, LIST, VISITS,
                n_q, n_k, D, stride_q, stride_k, stride_ex, stride_list, inv_t, p,
                MODE: tl.constexpr, CODE: tl.constexpr, HAS_GROUPS: tl.constexpr,
                N_EX: tl.constexpr, COUNT: tl.constexpr, PREC: tl.constexpr,
                ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """MODE 0: rowstats (``M_IN`` = m0; writes ``M_OUT`` = m and ``OUT`` = z).
    MODE 1: rowsum (``M_IN`` = m; writes ``OUT`` = r)."""
    pid = tl.program_id(0)
    rows, rmask = _span(pid, n_q, BLOCK_M)
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    qi = _tile(Q, rows, rmask, offs, dmask, stride_q)        # used when ONE_CHUNK
    m_i = tl.load(M_IN + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    visits = 0
    for t in range(0, _trip(CNT, pid, n_k, BLOCK_N, HAS_GROUPS)):
        cols, cmask = _visit(LIST, pid, stride_list, t, n_k, BLOCK_N, HAS_GROUPS)
        kj = qi
        if ONE_CHUNK:
            kj = _tile(K, cols, cmask, offs, dmask, stride_k)
        x = _logits(Q, K, rows, cols, rmask, cmask, qi, kj, D, stride_q, stride_k, inv_t, p,
                    CODE, PREC, ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D)
        w = tl.load(W + cols, mask=cmask, other=0.0)
        # a zero-weight column sets no shift and adds nothing (its exponential may overflow)
        neg = _negatives(QG, KG, EX, rows, cols, rmask, cmask, stride_ex, HAS_GROUPS, N_EX) \
            & (w > 0)[None, :]
        if MODE == 0:
            m_new = tl.maximum(m_i, tl.max(tl.where(neg, x, -float("inf")), 1))
            # a row without any finite logit yet keeps its (empty) sum
            scale = tl.exp2(tl.where(m_new > -float("inf"), (m_i - m_new) * 1.4426950408889634,
                                     0.0))
            e = _shifted_exp(x, m_new, neg)
            acc = acc * scale + tl.sum(e * w[None, :], 1)
            m_i = m_new
        else:
            g = tl.load(GAMMA + cols, mask=cmask, other=0.0)
            e = _shifted_exp(x, m_i, neg)
            acc += tl.sum(e * x * (w * g)[None, :], 1)
        visits += 1
    if MODE == 0:
        tl.store(M_OUT + rows, m_i, mask=rmask)
    tl.store(OUT + rows, acc, mask=rmask)
    _count(VISITS, pid, visits, COUNT)


@triton.jit
def _col_kernel(Q, K, MROW, RHO, SIGMA, OUT, QG, KG, EX, CNT, LIST, VISITS,
                n_q, n_k, D, stride_q, stride_k, stride_ex, stride_list, inv_t, p,
                CODE: tl.constexpr, HAS_GROUPS: tl.constexpr, N_EX: tl.constexpr,
                COUNT: tl.constexpr, PREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """colsum: ``OUT_j = sum_i e^{x_ij - m_i} (rho_i x_ij + sigma_i)``."""
    pid = tl.program_id(0)
    cols, cmask = _span(pid, n_k, BLOCK_N)
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    kj = _tile(K, cols, cmask, offs, dmask, stride_k)        # used when ONE_CHUNK
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    visits = 0
    for t in range(0, _trip(CNT, pid, n_q, BLOCK_M, HAS_GROUPS)):
        rows, rmask = _visit(LIST, pid, stride_list, t, n_q, BLOCK_M, HAS_GROUPS)
        qi = kj
        if ONE_CHUNK:
            qi = _tile(Q, rows, rmask, offs, dmask, stride_q)
        x = _logits(Q, K, rows, cols, rmask, cmask, qi, kj, D, stride_q, stride_k, inv_t, p,
                    CODE, PREC, ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D)
        neg = _negatives(QG, KG, EX, rows, cols, rmask, cmask, stride_ex, HAS_GROUPS, N_EX)
        m_i = tl.load(MROW + rows, mask=rmask, other=0.0)
        rho = tl.load(RHO + rows, mask=rmask, other=0.0)
        sig = tl.load(SIGMA + rows, mask=rmask, other=0.0)
        e = _shifted_exp(x, m_i, neg)
        acc += tl.sum(e * (rho[:, None] * x + sig[:, None]), 0)
        visits += 1
    tl.store(OUT + cols, acc, mask=cmask)
    _count(VISITS, pid, visits, COUNT)


@_device
def _coef(x, neg, m_i, alpha, beta, w, gamma, inv_t, HAS_GAMMA: tl.constexpr):
    """``G`` of the tile (float32, 0 off the negatives and on zero-weight columns, whose
    exponential may overflow), ``inv_t`` included."""
    coef = alpha[:, None]
    if HAS_GAMMA:
        coef = coef + beta[:, None] * gamma[None, :] * (1.0 + x)
    return _shifted_exp(x, m_i, neg & (w > 0)[None, :]) * w[None, :] * coef * inv_t


@_device
def _accumulate(acc, gsum, g, qi, kj, p, CODE: tl.constexpr, GPREC: tl.constexpr,
                COLS: tl.constexpr):
    """Add the tile's ``G`` terms to the feature chunk ``acc`` of the program's rows (``dq``) or,
    ``COLS``, columns (``dk``): dot/sqeuclidean ``G K`` / ``G^T Q`` (sqeuclidean: ``gsum`` adds
    the row / column sums of ``G``, :func:`_store_grad` subtracts them); l1/lp ``-/+`` the sum
    over the other side of ``G_ij slope(q_i - k_j)``."""
    if CODE < 2:
        if COLS:
            acc = tl.dot(tl.trans(g), qi.to(tl.float32), acc, input_precision=GPREC)
            if CODE == 1:
                gsum += tl.sum(g, 0)
        else:
            acc = tl.dot(g, kj.to(tl.float32), acc, input_precision=GPREC)
            if CODE == 1:
                gsum += tl.sum(g, 1)
    else:
        diff = qi.to(tl.float32)[:, None, :] - kj.to(tl.float32)[None, :, :]
        terms = g[:, :, None] * _slope(diff, p, CODE)
        if COLS:
            acc += tl.sum(terms, 0)
        else:
            acc -= tl.sum(terms, 1)
    return acc, gsum


@_device
def _store_grad(OUT, P, idx, imask, offs_o, omask, stride_out, stride_p, acc, gsum,
                CODE: tl.constexpr):
    """Store the program's chunk ``acc`` of the gradient of the features ``P`` (rows ``idx``);
    sqeuclidean: ``2 (acc - gsum p)``, the chunk of ``P`` reloaded (not kept live through the
    loop)."""
    if CODE == 1:
        own = _tile(P, idx, imask, offs_o, omask, stride_p).to(tl.float32)
        acc = 2.0 * (acc - gsum[:, None] * own)
    tl.store(OUT + idx[:, None] * stride_out + offs_o[None, :], acc,
             mask=imask[:, None] & omask[None, :])


@triton.jit
def _dq_kernel(Q, K, W, GAMMA, MROW, ALPHA, BETA, DQ, QG, KG, EX, CNT, LIST, VISITS,
               n_q, n_k, D, stride_q, stride_k, stride_ex, stride_list, stride_dq,
               inv_t, p, CODE: tl.constexpr, HAS_GAMMA: tl.constexpr,
               HAS_GROUPS: tl.constexpr, N_EX: tl.constexpr, COUNT: tl.constexpr,
               PREC: tl.constexpr, GPREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DQ[rows, chunk] = sum_j G_ij ds_ij/dq_i`` for the feature chunk ``program_id(1)``."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows, rmask = _span(pid, n_q, BLOCK_M)
    offs_o, omask = _span(pid_d, D, BLOCK_D)
    qi = _tile(Q, rows, rmask, offs_o, omask, stride_q)       # the output chunk (the only one
                                                              # when ONE_CHUNK)
    m_i = tl.load(MROW + rows, mask=rmask, other=0.0)
    alpha, beta = _vectors(ALPHA, BETA, rows, rmask, HAS_GAMMA)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    visits = 0
    for t in range(0, _trip(CNT, pid, n_k, BLOCK_N, HAS_GROUPS)):
        cols, cmask = _visit(LIST, pid, stride_list, t, n_k, BLOCK_N, HAS_GROUPS)
        kj = _tile(K, cols, cmask, offs_o, omask, stride_k)
        x = _logits(Q, K, rows, cols, rmask, cmask, qi, kj, D, stride_q, stride_k, inv_t, p,
                    CODE, PREC, ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D)
        neg = _negatives(QG, KG, EX, rows, cols, rmask, cmask, stride_ex, HAS_GROUPS, N_EX)
        w, gamma = _vectors(W, GAMMA, cols, cmask, HAS_GAMMA)
        g = _coef(x, neg, m_i, alpha, beta, w, gamma, inv_t, HAS_GAMMA)
        acc, gsum = _accumulate(acc, gsum, g, qi, kj, p, CODE, GPREC, False)
        visits += 1
    _store_grad(DQ, Q, rows, rmask, offs_o, omask, stride_dq, stride_q, acc, gsum, CODE)
    _count(VISITS, pid * tl.num_programs(1) + pid_d, visits, COUNT)


@triton.jit
def _dk_kernel(Q, K, W, GAMMA, MROW, ALPHA, BETA, DK, QG, KG, EX, CNT, LIST, VISITS,
               n_q, n_k, D, stride_q, stride_k, stride_ex, stride_list, stride_dk,
               inv_t, p, CODE: tl.constexpr, HAS_GAMMA: tl.constexpr,
               HAS_GROUPS: tl.constexpr, N_EX: tl.constexpr, COUNT: tl.constexpr,
               PREC: tl.constexpr, GPREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DK[cols, chunk] = sum_i G_ij ds_ij/dk_j`` for the feature chunk ``program_id(1)``."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols, cmask = _span(pid, n_k, BLOCK_N)
    offs_o, omask = _span(pid_d, D, BLOCK_D)
    kj = _tile(K, cols, cmask, offs_o, omask, stride_k)
    w, gamma = _vectors(W, GAMMA, cols, cmask, HAS_GAMMA)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    visits = 0
    for t in range(0, _trip(CNT, pid, n_q, BLOCK_M, HAS_GROUPS)):
        rows, rmask = _visit(LIST, pid, stride_list, t, n_q, BLOCK_M, HAS_GROUPS)
        qi = _tile(Q, rows, rmask, offs_o, omask, stride_q)
        x = _logits(Q, K, rows, cols, rmask, cmask, qi, kj, D, stride_q, stride_k, inv_t, p,
                    CODE, PREC, ONE_CHUNK, BLOCK_M, BLOCK_N, BLOCK_D)
        neg = _negatives(QG, KG, EX, rows, cols, rmask, cmask, stride_ex, HAS_GROUPS, N_EX)
        m_i = tl.load(MROW + rows, mask=rmask, other=0.0)
        alpha, beta = _vectors(ALPHA, BETA, rows, rmask, HAS_GAMMA)
        g = _coef(x, neg, m_i, alpha, beta, w, gamma, inv_t, HAS_GAMMA)
        acc, gsum = _accumulate(acc, gsum, g, qi, kj, p, CODE, GPREC, True)
        visits += 1
    _store_grad(DK, K, cols, cmask, offs_o, omask, stride_dk, stride_k, acc, gsum, CODE)
    _count(VISITS, pid * tl.num_programs(1) + pid_d, visits, COUNT)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------

# Whether Triton created these kernels for its CPU interpreter (decided when this module was
# imported, by TRITON_INTERPRET at that time; see utils.is_interpreter).
INTERPRETED = type(_row_kernel).__name__ == "InterpretedFunction"
# Under the interpreter: 16-wide blocks (the smallest tl.dot tile) and small feature chunks, so
# tiny test shapes cover several tiles and chunks.
INTERPRET_BLOCK = 16
# Debugging / tests: when true, every launch records the blocks its programs visited in
# LAST_VISITS[kernel] = (visited, dense) (one host synchronisation per launch).
COUNT_TILES = False
LAST_VISITS: dict = {}


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of some launches: ``block_m`` rows, ``block_n`` columns, ``block_d`` features
    per chunk, and their ``num_warps``."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4


def blocks(code: int, dim: int, grouped: bool, dtype: torch.dtype = torch.float16
           ) -> tuple[Blocks, Blocks]:
    """``(forward, gradient)`` tiles of a call with similarity ``code``, ``dim`` features of
    ``dtype``, with or without groups (the forward tiles serve rowstats, colsum and rowsum; the
    gradient tiles dq and dk; each has its own tile plan). GPU: see the module docstring; with
    groups the dot/sqeuclidean tiles are 32 wide, so that groups of 32 skip tiles.
    """
    if code in (DOT, SQEUCLIDEAN):
        if INTERPRETED:
            b = Blocks(INTERPRET_BLOCK, INTERPRET_BLOCK, min(next_pow2(dim), 32))
            return b, b
        bd = min(next_pow2(dim), 128)
        if grouped or dtype == torch.float32:
            b = Blocks(32, 32, bd, 4)
            return b, b
        return Blocks(64, 64, bd, 8), Blocks(64, 32, bd, 8)
    bd = min(next_pow2(dim, 2), 16)
    if INTERPRETED:
        b = Blocks(INTERPRET_BLOCK, INTERPRET_BLOCK, bd)
        return b, b
    return Blocks(32, 16, bd, 4), Blocks(16, 16, bd, 4)


@dataclass
class Tiling:
    """Tiles and, with groups, their plan: ``row_plan = (cnt (nbq,), list (nbq, nbk))`` int32,
    the column blocks each row block visits (``list[b, :cnt[b]]``), ``col_plan`` the row blocks
    of each column block."""

    blocks: Blocks
    row_plan: Optional[tuple[Tensor, Tensor]] = None
    col_plan: Optional[tuple[Tensor, Tensor]] = None


@dataclass
class Problem:
    """Everything of a call but the per-kernel vectors: the similarity (``code``, ``p``,
    ``inv_t``), the mask (groups ``qg``/``kg`` int64 or None, ``exclude`` (Q, E) int64 or None)
    and the tilings of the forward kernels and of the gradient kernels."""

    code: int
    p: float
    inv_t: float
    qg: Optional[Tensor]
    kg: Optional[Tensor]
    exclude: Optional[Tensor]
    fwd: Tiling
    bwd: Tiling


_VISITS = object()   # placeholder of the VISITS pointer in a launch's arguments


def _launch(name: str, kernel, q: Tensor, k: Tensor, prob: Problem, tiling: Tiling,
            transposed: bool, n_dc: int, head: tuple, tail: tuple, **consts):
    """Launch ``kernel`` over the blocks of rows (or, ``transposed``, of columns) x ``n_dc``
    feature chunks with arguments ``head``, the shared mask/plan/shape arguments, ``tail``."""
    t = tiling.blocks
    n_q, n_k = q.shape[0], k.shape[0]
    grouped = prob.qg is not None
    assert q.stride(1) == 1 and k.stride(1) == 1, "features must be row-major (contiguous rows)"
    plan = tiling.col_plan if transposed else tiling.row_plan
    if grouped and plan is None:
        raise ValueError("a grouped problem needs its tile plan")
    nb = triton.cdiv(n_k, t.block_n) if transposed else triton.cdiv(n_q, t.block_m)
    n_other = triton.cdiv(n_q, t.block_m) if transposed else triton.cdiv(n_k, t.block_n)
    cnt, lst = plan if grouped else (q, q)
    ex = prob.exclude if prob.exclude is not None else q
    visits = torch.zeros(nb * n_dc, dtype=torch.int32, device=q.device) if COUNT_TILES else q
    args = (*head, prob.qg if grouped else q, prob.kg if grouped else q, ex, cnt, lst, visits,
            n_q, n_k, q.shape[1], q.stride(0), k.stride(0),
            ex.stride(0) if prob.exclude is not None else 0, lst.stride(0) if grouped else 0,
            *tail)
    args = tuple(q if a is None else a for a in args)      # unused pointers (constexpr-off)
    consts.update(CODE=prob.code, HAS_GROUPS=grouped,
                  N_EX=0 if prob.exclude is None else prob.exclude.shape[1],
                  COUNT=COUNT_TILES, ONE_CHUNK=q.shape[1] <= t.block_d,
                  BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d)
    grid = (nb, n_dc) if n_dc > 1 else (nb,)
    if INTERPRETED:
        with interpreter_env():
            kernel[grid](*args, **consts)
    else:
        with torch.cuda.device(q.device):
            kernel[grid](*args, **consts, num_warps=t.num_warps, num_stages=2)
    if COUNT_TILES:
        LAST_VISITS[name] = (int(visits.sum()), nb * n_dc * n_other)


def rowstats(q: Tensor, k: Tensor, w: Tensor, m0: Tensor, prob: Problem
             ) -> tuple[Tensor, Tensor]:
    """``(m, z)`` (Q,) float32: ``m_i = max(m0_i, max_{j: w_j > 0} x_ij)``, ``z_i = sum_j w_j
    e^{x_ij - m_i}`` over the negatives."""
    return _rows(0, q, k, w, None, m0, prob)


def rowsum(q: Tensor, k: Tensor, w: Tensor, m: Tensor, gamma: Tensor, prob: Problem) -> Tensor:
    """``r`` (Q,) float32: ``r_i = sum_j w_j gamma_j e^{x_ij - m_i} x_ij`` over the negatives."""
    return _rows(1, q, k, w, gamma, m, prob)[1]


def _rows(mode, q, k, w, gamma, m_in, prob):
    m_out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    _launch("rowstats" if mode == 0 else "rowsum", _row_kernel, q, k, prob, prob.fwd, False, 1,
            (q, k, w, gamma, m_in, m_out, out), (prob.inv_t, prob.p), MODE=mode,
            PREC=input_precisions(q.dtype)[0])
    return m_out, out


def colsum(q: Tensor, k: Tensor, m: Tensor, rho: Tensor, sigma: Tensor, prob: Problem
           ) -> Tensor:
    """``a`` (K,) float32: ``a_j = sum_i e^{x_ij - m_i} (rho_i x_ij + sigma_i)`` over the
    negatives."""
    out = torch.empty(k.shape[0], dtype=torch.float32, device=q.device)
    _launch("colsum", _col_kernel, q, k, prob, prob.fwd, True, 1, (q, k, m, rho, sigma, out),
            (prob.inv_t, prob.p), PREC=input_precisions(q.dtype)[0])
    return out


def grad(q: Tensor, k: Tensor, w: Tensor, m: Tensor, alpha: Tensor, beta: Optional[Tensor],
         gamma: Optional[Tensor], prob: Problem) -> tuple[Tensor, Tensor]:
    """``(dq (Q, D), dk (K, D))`` float32 for ``G_ij = w_j e^{x_ij - m_i} (alpha_i + beta_i
    gamma_j (1 + x_ij))`` (``gamma`` None: ``alpha_i`` only) on the negatives, ``inv_t``
    included: two launches (rows, then columns), no atomics."""
    dim = q.shape[1]
    prec, gprec = input_precisions(q.dtype)
    has_gamma = gamma is not None
    n_dc = triton.cdiv(dim, prob.bwd.blocks.block_d)
    vec = (w, gamma, m, alpha, beta if has_gamma else None)
    out = []
    for name, kernel, n, transposed in (("dq", _dq_kernel, q.shape[0], False),
                                        ("dk", _dk_kernel, k.shape[0], True)):
        d = torch.empty(n, dim, dtype=torch.float32, device=q.device)
        _launch(name, kernel, q, k, prob, prob.bwd, transposed, n_dc, (q, k, *vec, d),
                (d.stride(0), prob.inv_t, prob.p), HAS_GAMMA=has_gamma, PREC=prec,
                GPREC=gprec)
        out.append(d)
    return out[0], out[1]
