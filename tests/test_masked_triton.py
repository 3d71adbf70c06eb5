"""Kernel set ``"triton"`` of ``masked_contrastive_loss`` (fastipirm.kernels.masked_contrastive,
wrapped by fastipirm.ops.masked_triton).

Two modes, chosen by ``TRITON_INTERPRET`` *before* this module imports Triton (as in
tests/test_triton_backend.py):

* default: the kernels are decorated with ``TRITON_INTERPRET=1`` (restored afterwards) and run in
  Triton's CPU interpreter on CPU tensors: tiny shapes that still cover several 16-wide tiles,
  ragged edges (Q=37, K=23, 17 = block + 1), several feature chunks, skipped tiles; fp32 and
  fp16 (no bf16 under the interpreter);
* ``TRITON_INTERPRET=0 pytest -m gpu tests/test_masked_triton.py`` on a CUDA machine: the ``gpu``
  tests (bf16/fp16/fp32 sweep, a larger shape, determinism, tile skipping with the GPU tiles).

Every kernel is checked against the ``"torch"`` kernel set on the same inputs (unit level) and the
whole op against the float64 literal reference. Fresh random inputs every run; a failing case
prints its seed (replay with ``FASTIPIRM_TEST_SEED=<seed>``).
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from fastipirm.check import GRADIENT_FLOOR, VALUE_FLOOR, relative_error
from fastipirm.ops import masked_contrastive_loss, masked_contrastive_loss_reference
from fastipirm.ops.masked_glue import Geometry
from fastipirm.ops.masked_torch import TorchMaskedKernels

_saved = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    triton = pytest.importorskip("triton")
    K = pytest.importorskip("fastipirm.kernels.masked_contrastive")
    MT = pytest.importorskip("fastipirm.ops.masked_triton")
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

INTERPRETED = K.INTERPRETED
SIMS = [("dot", None, 0), ("sqeuclidean", None, 1), ("l1", None, 2), ("lp", 3.0, 3)]


def _old_interpreter_with_new_numpy() -> bool:
    """Triton 3.6's interpreter does ``int()`` of 1-element arrays (loop bounds), an error since
    NumPy 2.4 (as in tests/test_triton_backend.py)."""
    import numpy as np
    try:
        int(np.array([1]))
        return False
    except TypeError:
        return tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9)


interp = pytest.mark.skipif(
    not INTERPRETED or _old_interpreter_with_new_numpy(),
    reason="kernels were not created under TRITON_INTERPRET=1 (run this module in its own pytest "
           "process), or Triton < 3.9's interpreter with NumPy >= 2.4")


@pytest.fixture
def triton_backend(monkeypatch):
    """The registry may have been imported before TRITON_INTERPRET was set: offer the "triton"
    backend for CPU tensors while the kernels are interpreted."""
    from fastipirm.ops import backends
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setitem(backends.MASKED.backends, "triton", backends.Backend(
            "triton", ("cuda", "cpu"), backends._masked_loader("triton")))


# ------------------------------------------------------------------ unit level: the four kernels
def _geometry(code, p, n_q, n_k, groups, exclude, inv_t=1 / 0.7, device="cpu"):
    qg = kg = ex = None
    if groups:
        qg = torch.randint(0, 3, (n_q,), device=device)
        kg = torch.randint(0, 4, (n_k,), device=device)   # group 3: no query; some rows none
        qg[0] = 5                                          # a row with no key of its group
    if exclude:
        ex = torch.randint(-1, n_k, (n_q, 3), device=device)
    return Geometry(code, p or 0.0, inv_t, qg, kg, ex)


def _kernel_outputs(kern, q, k, geo, w, m0, vecs, m=None):
    """Every kernel's outputs; the later kernels on ``m`` (default: this set's rowstats')."""
    rho, sigma, gamma, alpha, beta = vecs
    m_own, z = kern.rowstats(q, k, w, geo, m0)
    m = m_own if m is None else m
    return {"m": m_own, "z": z,
            "colsum": kern.colsum(q, k, geo, m, rho, sigma),
            "rowsum": kern.rowsum(q, k, w, geo, m, gamma),
            "grad": kern.grad(q, k, w, geo, m, alpha, beta, gamma),
            "grad (no gamma)": kern.grad(q, k, w, geo, m, alpha, None, None)}


UNIT = [(37, 23, 10, True, True), (17, 17, 5, False, True), (16, 33, 40, True, False),
        (5, 3, 17, False, False)]


@interp
@pytest.mark.parametrize("shape", UNIT, ids=lambda s: "Q{}-K{}-D{}-groups{}-excl{}".format(*s))
@pytest.mark.parametrize("sim", SIMS, ids=lambda s: s[0])
def test_kernels_match_torch_kernel_set(sim, shape, seed):
    """Each kernel against TorchMaskedKernels on the same fp32 inputs (the later kernels on the
    torch set's ``m``)."""
    _, p, code = sim
    n_q, n_k, d, groups, exclude = shape
    geo = _geometry(code, p, n_q, n_k, groups, exclude)
    q, k = torch.randn(n_q, d), torch.randn(n_k, d)
    w, m0 = 0.2 + torch.rand(n_k), torch.randn(n_q)
    vecs = (torch.randn(n_q), torch.randn(n_q), torch.randn(n_k), torch.randn(n_q),
            torch.randn(n_q))
    want = _kernel_outputs(TorchMaskedKernels(), q, k, geo, w, m0, vecs)
    got = _kernel_outputs(MT.kernels(), q, k, geo, w, m0, vecs, m=want["m"])
    for name, g in got.items():
        for i, (a, b) in enumerate(zip(g, want[name]) if isinstance(g, tuple)
                                   else [(g, want[name])]):
            assert a.dtype == torch.float32 and a.shape == b.shape, name
            err = relative_error(a, b, 1e-6)
            assert err < 2e-5, f"{name}[{i}]: {err:.2e} ({sim[0]}, {shape}, seed {seed})"


@interp
def test_rowstats_online_max_and_empty_rows(seed):
    """The running max grows across column tiles (the largest logit in the last tile) and a row
    without negatives keeps ``m = m0``, ``z = 0``; every exponential <= 1."""
    n_q, n_k, d = 5, 40, 16
    q, k = torch.randn(n_q, d), torch.randn(n_k, d)
    k[-1] = 4 * q[0]                              # row 0's max in the last tile
    qg = torch.tensor([0, 0, 1, 2, 7])            # row 4: no key of its group
    kg = torch.randint(0, 3, (n_k,))
    geo = Geometry(0, 0.0, 4.0, qg, kg, None)
    m0 = torch.full((n_q,), -3.0)
    w = torch.ones(n_k)
    m, z = MT.kernels().rowstats(q, k, w, geo, m0)
    mr, zr = TorchMaskedKernels().rowstats(q, k, w, geo, m0)
    assert torch.equal(m[4], m0[4]) and z[4] == 0
    assert torch.allclose(m, mr, rtol=1e-6) and torch.allclose(z, zr, rtol=1e-5)
    assert bool((z <= n_k).all())


# ------------------------------------------------------------------ the op against the reference
@dataclass(frozen=True)
class Case:
    """One call of the op: ``k=None`` is ``keys=None``; ``target`` ``"pos"`` (separate
    positives), ``"index1"`` (positive_index, T=1) or ``"index2"`` (T=2 with weights, a repeated
    column on half the rows); ``groups`` None, ``"random"`` (single-member groups, and with keys
    a query group without keys) or ``"blocks"`` (block-diagonal); ``scale`` multiplies the
    (L2-normalised) features."""

    sim: str = "dot"
    p: Optional[float] = None
    temperature: float = 0.3
    q: int = 37
    k: Optional[int] = 23
    d: int = 10
    target: str = "pos"
    include_self: bool = False
    self_index: bool = False
    groups: Optional[str] = None
    key_penalty: bool = True
    weights: bool = True
    scale: float = 1.0

    def __str__(self):
        out = f"{self.sim}{'' if self.p is None else self.p}-T{self.temperature}-Q{self.q}"
        out += f"-K{self.k}-D{self.d}-{self.target}"
        for flag in ("include_self", "self_index", "groups", "key_penalty", "weights"):
            if getattr(self, flag):
                out += f"-{flag}" + (f"={self.groups}" if flag == "groups" else "")
        return out + ("" if self.scale == 1.0 else f"-x{self.scale}")


def make(case: Case, device="cpu"):
    """``(data, kwargs)``: float64 tensors (features, key weights, upstream gradients) and the
    op's other arguments."""
    f64 = dict(dtype=torch.float64, device=device)
    n_q, n_k = case.q, case.q if case.k is None else case.k

    def feats(n):
        return torch.nn.functional.normalize(torch.randn(n, case.d, **f64), dim=1) * case.scale

    q = feats(n_q)
    data = {"queries": q, "keys": None if case.k is None else feats(n_k)}
    kw = dict(similarity=case.sim, p=case.p, temperature=case.temperature,
              include_self=case.include_self, key_penalty=case.key_penalty)
    qg = kg = None
    if case.groups == "random":
        qg = torch.randint(0, 4, (n_q,), device=device)
        qg[:3] = torch.tensor([10, 11, 12])          # single-member groups (keys=None)
        kg = qg if case.k is None else torch.randint(0, 4, (n_k,), device=device)
        if case.k is not None:
            kg[kg == 3] = 2                              # query group 3 has no keys
    elif case.groups == "blocks":
        qg = torch.arange(n_q, device=device) * 4 // n_q
        kg = qg if case.k is None else torch.arange(n_k, device=device) * 4 // n_k
    if qg is not None:
        kw["query_groups"] = qg
        if case.k is not None:
            kw["key_groups"] = kg
    self_col = None
    if case.self_index:
        self_col = torch.arange(n_q, device=device) % n_k
        kw["self_index"] = self_col
    elif case.k is None:
        self_col = torch.arange(n_q, device=device)
    if case.target == "pos":
        data["positives"] = torch.nn.functional.normalize(
            q + 0.5 * torch.randn_like(q), dim=1) * case.scale
    else:
        avoid = self_col if self_col is not None and not case.include_self else None
        first = _columns(qg, kg, n_q, n_k, avoid, device)
        if case.target == "index1":
            kw["positive_index"] = first
        else:
            second = _columns(qg, kg, n_q, n_k, avoid, device)
            second[::2] = first[::2]                     # a repeated column
            kw["positive_index"] = torch.stack([first, second], 1)
            lam = torch.rand(n_q, 1, **f64)
            kw["positive_weight"] = torch.cat([lam, 1 - lam], 1)
    data["positives"] = data.get("positives")
    data["key_weights"] = (0.2 + torch.rand(n_k, **f64)) if case.weights else None
    data["v"] = torch.randn(n_q, **f64)
    data["gamma"] = torch.randn(n_k, **f64)
    return data, kw


def _columns(qg, kg, n_q, n_k, avoid, device):
    """A random key column per query in the query's group (every key without groups), not
    ``avoid[i]`` (the self column); the groups must leave a choice."""
    if qg is None:
        qg, kg = torch.zeros(n_q, dtype=torch.long, device=device), \
            torch.zeros(n_k, dtype=torch.long, device=device)
    sorted_kg, order = torch.sort(kg, stable=True)
    lo = torch.searchsorted(sorted_kg, qg)
    count = torch.searchsorted(sorted_kg, qg, right=True) - lo
    pick = (torch.rand(n_q, device=device) * count).long()
    cols = order[lo + pick]
    if avoid is not None:
        other = order[lo + (pick + 1) % count.clamp_min(1)]
        cols = torch.where(cols == avoid, other, cols)
        assert not bool((cols == avoid).any()), "a group leaves no target but the query itself"
    return cols


def outputs(fn, data, kw, dtype):
    """``[losses, key_grads, d queries, d keys, d positives, d key_weights]`` (absent ones
    dropped) for the upstream gradients ``v`` (losses) and ``gamma`` (key grads)."""
    leaves, args = [], {}
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ("queries", "keys", "positives", "key_weights"):
        t = data[name]
        if t is not None:
            t = t.to(wdtype if name == "key_weights" else dtype).detach().requires_grad_()
            leaves.append(t)
        args[name] = t
    if "positive_weight" in kw:
        kw = dict(kw, positive_weight=kw["positive_weight"].to(wdtype))
    out = fn(args["queries"], args["keys"], args["positives"], key_weights=args["key_weights"],
             reduction="none", **kw)
    loss, kgrads = out if kw["key_penalty"] else (out, None)
    total = (loss * data["v"].to(loss.dtype)).sum()
    if kgrads is not None:
        total = total + (kgrads * data["gamma"].to(kgrads.dtype)).sum()
    grads = torch.autograd.grad(total, leaves)
    return [loss.detach()] + ([kgrads.detach()] if kgrads is not None else []) + list(grads)


def triton_op(*a, **kw):
    return masked_contrastive_loss(*a, backend="triton", **kw)


def torch_op(*a, **kw):
    return masked_contrastive_loss(*a, backend="torch", **kw)


def check_fp32(case: Case, seed, tol=1e-4):
    data, kw = make(case)
    want = outputs(masked_contrastive_loss_reference, data, kw, torch.float64)
    got = outputs(triton_op, data, kw, torch.float32)
    assert got[0].dtype == torch.float32 and got[0].shape == (case.q,)
    errs = []
    for i, (g, r) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"output {i} not finite ({case}, seed {seed})"
        err = relative_error(g.double(), r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        errs.append(err)
        assert err < tol, f"output {i}: relative error {err:.3e} ({case}, seed {seed})"
    return max(errs)


OP_CASES = [Case("dot", target="pos"), Case("dot", target="index1"), Case("dot", target="index2"),
            Case("sqeuclidean", target="pos"), Case("sqeuclidean", target="index2"),
            Case("l1", target="index1"), Case("l1", target="index2", q=17),
            Case("lp", 3.0, target="pos"), Case("lp", 3.0, target="index2", q=17)]
OP_CASES += [
    # keys=None with and without the self column, with index targets
    Case("dot", k=None, target="index1", include_self=False),
    Case("l1", k=None, target="index2", include_self=True, q=17),
    Case("sqeuclidean", k=None, target="pos", include_self=True, weights=False),
    # keys given with self_index (the DDP layout)
    Case("dot", q=17, k=40, target="index2", self_index=True),
    Case("lp", 3.0, q=17, k=40, target="pos", self_index=True, include_self=True),
    # groups: single-member groups, a query group without keys, block-diagonal
    Case("dot", k=None, groups="random", target="pos"),
    Case("l1", k=None, groups="random", target="pos", include_self=True),
    Case("sqeuclidean", groups="random", target="pos"),
    Case("dot", q=64, k=None, d=32, groups="blocks", target="index2"),
    Case("lp", 3.0, q=33, k=33, groups="blocks", target="pos", weights=False),
    # feature dimensions: several chunks (32-wide for dot, 16-wide for l1/lp; interpreter)
    Case("dot", q=17, k=17, d=128, target="index1"),
    Case("l1", q=5, k=17, d=128, target="pos"),
    Case("lp", 3.0, q=17, k=9, d=40, target="index2"),
    Case("sqeuclidean", q=17, k=9, d=3, target="index1", key_penalty=False),
    Case("lp", 1.5, q=5, k=7, d=5, target="pos", key_penalty=False, weights=False),
]


@interp
@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_op_fp32_against_float64_reference(case, seed, triton_backend):
    check_fp32(case, seed)


@interp
@pytest.mark.parametrize("case", [
    Case("sqeuclidean", temperature=0.005, target="pos"),
    Case("sqeuclidean", temperature=0.005, k=None, target="pos", groups="random", q=23),
    Case("l1", temperature=0.005, target="index1"),
    Case("dot", temperature=0.005, target="pos", scale=2.0)], ids=str)
def test_extreme_temperature_is_finite_and_accurate(case, seed, triton_backend):
    """tau = 0.005 with distances of order 1: logits down to about -800 (-|q - k|^2 / tau) and
    row sums far below 1; nothing overflows (every exponential is shifted by the row max)."""
    check_fp32(case, seed, tol=2e-4)


FP16 = [Case("dot", temperature=0.1, d=32, target="index2"),
        Case("sqeuclidean", temperature=0.2, target="pos", groups="random"),
        Case("l1", d=10, target="pos", k=None),
        Case("lp", 3.0, d=7, target="index1", q=17, k=40, self_index=True)]


@interp
@pytest.mark.parametrize("case", FP16, ids=str)
def test_fp16_within_twice_torch_error(case, seed, triton_backend):
    """fp16 inputs: error vs the float64 truth <= 2 x (the torch backend's own error on the same
    fp16 inputs) + 1e-3 (relative to each output's largest magnitude)."""
    data, kw = make(case)
    truth = outputs(masked_contrastive_loss_reference, data, kw, torch.float64)
    base = outputs(torch_op, data, kw, torch.float16)
    got = outputs(triton_op, data, kw, torch.float16)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float16
    for i, (g, b, r) in enumerate(zip(got, base, truth)):
        assert torch.isfinite(g).all(), f"output {i} not finite ({case}, seed {seed})"
        scale = max(r.abs().max().item(), 1e-6)
        err = (g.double() - r).abs().max().item() / scale
        allowed = 2 * (b.double() - r).abs().max().item() / scale + 1e-3
        assert err <= allowed, f"output {i}: {err:.3e} > {allowed:.3e} ({case}, seed {seed})"


@interp
def test_float64_inputs_are_computed_in_fp32(seed, triton_backend):
    """float64 features: the kernels read float32 copies (the statistics are float32, so the
    custom op returns float32 losses / key gradients); the feature gradients come back float64;
    float32 accuracy."""
    case = Case("l1", target="index2")
    data, kw = make(case)
    want = outputs(masked_contrastive_loss_reference, data, kw, torch.float64)
    got = outputs(triton_op, data, kw, torch.float64)
    assert got[0].dtype in (torch.float32, torch.float64)
    for i, (g, r) in enumerate(zip(got, want)):
        if i >= 2:
            assert g.dtype == torch.float64, i
        assert relative_error(g.double(), r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR) < 1e-4, \
            f"output {i} (seed {seed})"


# ------------------------------------------------------------------ tile skipping
def _block_diagonal(n_groups=4, size=32):
    return torch.arange(n_groups * size) // size


def test_tile_plan_of_block_diagonal_groups():
    """DCoDR's 4 domains x 32 with the GPU's 32-wide grouped tiles: each block meets one block
    (a quarter of the dense tiles); with 64-wide tiles half."""
    g = _block_diagonal()
    for block, share in ((32, 4), (64, 2)):
        (rc, rl), (cc, cl) = MT.tile_plan(g, g, block, block)
        nb = 128 // block
        assert rc.tolist() == [nb // share] * nb and cc.tolist() == [nb // share] * nb
        assert rl.dtype == torch.int32 and rl.shape == (nb, nb)


def test_tile_plan_lists_every_block_pair_with_a_negative(seed):
    """Random (unsorted, ragged) groups: every pair of blocks that holds a pair of equal groups is
    listed, in increasing order, in both plans."""
    qg, kg = torch.randint(0, 9, (45,)), torch.randint(3, 12, (30,))
    qg[:16] = torch.randint(0, 3, (16,))              # a row block that meets no key
    bm, bn = 16, 8
    (rc, rl), (cc, cl) = MT.tile_plan(qg, kg, bm, bn)
    for i in range(rc.shape[0]):
        listed = rl[i, :rc[i]].tolist()
        assert listed == sorted(listed)
        for j in range(cc.shape[0]):
            a, b = qg[i * bm:(i + 1) * bm], kg[j * bn:(j + 1) * bn]
            if bool((a[:, None] == b[None, :]).any()):
                assert j in listed and i in cl[j, :cc[j]].tolist(), (i, j)
    assert rc[0] == 0


@interp
def test_kernels_skip_tiles_of_groups_that_cannot_meet(seed, monkeypatch):
    """4 x 32 block-diagonal groups: every launch visits a quarter of the dense tiles (debug
    counter in the kernels), with the same results as the torch kernel set."""
    monkeypatch.setattr(K, "COUNT_TILES", True)
    monkeypatch.setattr(K, "LAST_VISITS", {})
    g = _block_diagonal()
    n, d = g.shape[0], 16
    q, k = torch.randn(n, d), torch.randn(n, d)
    geo = Geometry(0, 0.0, 2.0, g, g, torch.arange(n)[:, None])
    w, m0 = torch.rand(n) + 0.5, torch.randn(n)
    vecs = (torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n))
    got = _kernel_outputs(MT.kernels(), q, k, geo, w, m0, vecs)
    visits = dict(K.LAST_VISITS)
    assert set(visits) == {"rowstats", "colsum", "rowsum", "dq", "dk"}
    for name, (visited, dense) in visits.items():
        assert visited * 4 == dense, (name, visited, dense)
    want = _kernel_outputs(TorchMaskedKernels(), q, k, geo, w, m0, vecs)
    for name in ("m", "z", "colsum", "rowsum"):
        assert relative_error(got[name], want[name], 1e-6) < 2e-5, name
    for a, b in zip(got["grad"], want["grad"]):
        assert relative_error(a, b, 1e-6) < 2e-5
    # without groups: the dense count
    K.LAST_VISITS.clear()
    MT.kernels().rowstats(q, k, w, Geometry(0, 0.0, 2.0), m0)
    visited, dense = K.LAST_VISITS["rowstats"]
    assert visited == dense == (n // K.INTERPRET_BLOCK) ** 2


# ------------------------------------------------------------------ plumbing
@interp
def test_deterministic_and_plan_cached(seed):
    """Two runs give bitwise identical outputs; the plan is built once per Geometry."""
    n_q, n_k = 37, 23
    geo = _geometry(1, 2.0, n_q, n_k, True, True)
    q, k = torch.randn(n_q, 10), torch.randn(n_k, 10)
    w, m0 = torch.rand(n_k), torch.randn(n_q)
    vecs = (torch.randn(n_q), torch.randn(n_q), torch.randn(n_k), torch.randn(n_q),
            torch.randn(n_q))
    kern = MT.kernels()
    a = _kernel_outputs(kern, q, k, geo, w, m0, vecs)
    plan = kern.problem(q, geo)
    b = _kernel_outputs(kern, q, k, geo, w, m0, vecs)
    assert kern.problem(q, geo) is plan
    for name in a:
        x, y = a[name], b[name]
        x, y = (x, y) if isinstance(x, tuple) else ((x,), (y,))
        assert all(torch.equal(u, v) for u, v in zip(x, y)), name


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_custom_op(dtype):
    """The custom op of the set (schema, fake tensors, autograd registration, AOT dispatch)."""
    from fastipirm.ops import masked_backends
    impl = masked_backends.load("triton")
    q, k = torch.randn(5, 8, dtype=dtype), torch.randn(7, 8, dtype=dtype)
    tw = torch.full((5, 2), 0.5)
    qg, kg = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1, 1, 0])
    idx = torch.tensor([[0, 1], [6, 6], [2, 3], [4, 5], [0, 6]])
    args = (q.requires_grad_(), k.requires_grad_(), None, idx, tw, qg, kg, None,
            torch.rand(7).requires_grad_(), torch.full((5,), 0.2), 0, 0.0, 0.5, False, True)
    torch.library.opcheck(impl.forward_op, args)


def test_kernel_module_is_a_leaf():
    """kernels/masked_contrastive.py imports only triton, torch and its package's utils."""
    path = Path(__file__).resolve().parents[1] / "kernels" / "masked_contrastive.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 or node.module == "utils", ast.dump(node)
            assert node.level > 0 or node.module.split(".")[0] in (
                "__future__", "torch", "triton", "contextlib", "os", "dataclasses",
                "typing"), node.module
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in ("torch", "triton", "contextlib", "os")
                       for a in node.names), ast.dump(node)


def test_kernels_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device.*TRITON_INTERPRET=1"):
        MT.kernels()
    monkeypatch.setattr(MT, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="'triton' package is not installed"):
        MT.kernels()


def test_cpu_tensors_without_the_interpreter_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        MT.TritonMaskedKernels().check(torch.zeros(2, 3))


# ------------------------------------------------------------------ compiler (no GPU needed)
_AOT_SCRIPT = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastipirm.kernels.masked_contrastive as mod
assert not mod.INTERPRETED
ptr = {"QG": "*i64", "KG": "*i64", "EX": "*i64", "CNT": "*i32", "LIST": "*i32",
       "VISITS": "*i32"}
dtypes = {"*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp32": torch.float32}
plans = [(0, 128, False, "*bf16", ("_row_kernel", "_dq_kernel", "_dk_kernel")),
         (1, 256, True, "*fp16", ("_col_kernel", "_dq_kernel")),
         (0, 64, False, "*fp32", ("_dq_kernel",)), (3, 10, True, "*fp16", ("_dk_kernel",))]
for arch in map(int, sys.argv[1:]):
    for code, dim, grouped, dt, names in plans:
        fwd, bwd = mod.blocks(code, dim, grouped, dtypes[dt])
        prec = "ieee" if dt == "*fp32" else "tf32"
        for name in names:
            fn = getattr(mod, name)
            b = bwd if name in ("_dq_kernel", "_dk_kernel") else fwd
            consts = dict(CODE=code, HAS_GROUPS=grouped, N_EX=2, COUNT=False, PREC=prec,
                          ONE_CHUNK=dim <= b.block_d, BLOCK_M=b.block_m, BLOCK_N=b.block_n,
                          BLOCK_D=b.block_d)
            consts.update({"_row_kernel": dict(MODE=0), "_col_kernel": {}}.get(
                name, dict(HAS_GAMMA=True, GPREC=prec)))
            sig = {a: "constexpr" if a in consts else dt if a in ("Q", "K") else
                   ptr.get(a, "*fp32" if a[0].isupper() and a != "D" else
                           "fp32" if a in ("inv_t", "p") else "i32")
                   for a in fn.arg_names}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": b.num_warps, "num_stages": 2})
            assert k.asm.get("cubin"), name
            print(f"{name}-{code}-{dim}-sm{arch}", arch, k.metadata.shared, flush=True)
"""


def test_kernels_compile_for_ampere_and_hopper_without_a_gpu(tmp_path):
    """Lower the kernels through Triton's real compiler (TTIR -> PTX -> cubin) for sm_80 and
    sm_90 with the GPU tiles (dot bf16 one chunk, sqeuclidean grouped two chunks, exact fp32,
    lp),
    in a subprocess without the interpreter: catches what the interpreter does not check (types,
    layouts, shared memory)."""
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "80", "90"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 14, proc.stdout
    for line in lines:
        name, arch, shared = line.split()
        limit = (163 if arch == "80" else 227) * 1024
        assert int(shared) <= limit, f"{name}: {shared} bytes of shared memory"


# ------------------------------------------------------------------ GPU (skipped without CUDA)
def _cuda_or_skip():
    if INTERPRETED:
        pytest.skip("kernels are interpreted: run with TRITON_INTERPRET=0 for the GPU tests")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


GPU_CASES = [Case("dot", temperature=0.1, q=1000, k=None, d=128, target="pos"),
             Case("dot", temperature=0.2, q=512, k=2048, d=128, target="index2",
                  self_index=True),
             Case("dot", temperature=0.1, q=512, k=None, d=128, groups="blocks", target="pos"),
             Case("sqeuclidean", temperature=0.5, q=700, k=None, d=10, target="pos",
                  include_self=True),
             Case("l1", temperature=0.5, q=700, k=None, d=10, target="pos", include_self=True),
             Case("lp", 3.0, temperature=1.0, q=300, k=300, d=7, target="pos",
                  groups="random"),
             Case("sqeuclidean", temperature=0.1, q=600, k=None, d=256, target="pos")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.0), (torch.float16, 1e-3),
                                         (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_against_float64_torch_backend(case, dtype, floor, seed):
    """Truth: the ``"torch"`` backend in float64. fp32 (``ieee`` dots): relative error < 1e-4;
    fp16/bf16: <= 2 x (the torch backend's error on the same rounded inputs) + floor."""
    _cuda_or_skip()
    data, kw = make(case, device="cuda")
    truth = outputs(torch_op, data, kw, torch.float64)
    got = outputs(triton_op, data, kw, dtype)
    base = outputs(torch_op, data, kw, dtype) if dtype != torch.float32 else None
    for i, (g, r) in enumerate(zip(got, truth)):
        assert torch.isfinite(g).all(), f"output {i} not finite ({case}, seed {seed})"
        fl = VALUE_FLOOR if i < 2 else GRADIENT_FLOOR
        err = relative_error(g.double(), r, fl)
        print(f"[gpu max error] {dtype} {case} output {i}: {err:.3e}")
        if base is None:
            assert err < 1e-4, f"output {i}: {err:.3e} ({case}, seed {seed})"
        else:
            allowed = 2 * relative_error(base[i].double(), r, fl) + floor
            assert err <= allowed, f"output {i}: {err:.3e} > {allowed:.3e} ({case}, seed {seed})"


@pytest.mark.gpu
def test_gpu_larger_shape_and_peak_memory(seed):
    """Q = K = 8192, D = 128, bf16, key penalty: finite, close to the torch backend (fp32 on the
    same inputs), and the forward + backward peak stays far below one Q x K float32 matrix."""
    _cuda_or_skip()
    case = Case("dot", temperature=0.2, q=8192, k=8192, d=128, target="index1",
                self_index=True, groups="blocks")
    data, kw = make(case, device="cuda")
    base = outputs(torch_op, data, kw, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = outputs(triton_op, data, kw, torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    print(f"[gpu peak memory] Q=K=8192 D=128 bf16 fwd+bwd: {extra / 2**20:.1f} MiB")
    assert extra < 8192 * 8192, f"peak {extra / 2**20:.1f} MiB"
    for i, (g, b) in enumerate(zip(got, base)):
        assert torch.isfinite(g).all(), i
        assert relative_error(g.double(), b.double(),
                              VALUE_FLOOR if i < 2 else GRADIENT_FLOOR) < 2e-2, i


@pytest.mark.gpu
@pytest.mark.parametrize("case", [Case("dot", q=1000, k=None, d=128, groups="random",
                                       target="pos"),
                                  Case("l1", q=500, k=700, d=10, target="index2")], ids=str)
def test_gpu_deterministic(case, seed):
    """No atomics: two runs are bitwise identical."""
    _cuda_or_skip()
    data, kw = make(case, device="cuda")
    a = outputs(triton_op, data, kw, torch.bfloat16)
    b = outputs(triton_op, data, kw, torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_gpu_skips_tiles_of_block_diagonal_groups(seed, monkeypatch):
    """DCoDR's 4 x 32 domains with the GPU tiles: a quarter of the dense tiles."""
    _cuda_or_skip()
    monkeypatch.setattr(K, "COUNT_TILES", True)
    monkeypatch.setattr(K, "LAST_VISITS", {})
    g = _block_diagonal().cuda()
    case = Case("dot", q=128, k=None, d=128, target="pos")
    data, kw = make(case, device="cuda")
    kw["query_groups"] = g
    outputs(triton_op, data, kw, torch.float16)
    for name, (visited, dense) in K.LAST_VISITS.items():
        assert visited * 4 == dense, (name, visited, dense)
