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
from pathlib import Path

import pytest
import torch
from triton_helpers import (compile_without_interpreter, cuda_or_skip, import_interpreted,
                            interpreter_mark, shared_memory_limit)

from fastipirm.check import (VALUE_FLOOR, MaskedCase, make_masked_inputs, masked_backend_outputs,
                             masked_errors, masked_reference_outputs, masked_upstream,
                             relative_error)
from fastipirm.ops.masked_glue import Geometry
from fastipirm.ops.masked_torch import TorchMaskedKernels

# TRITON_INTERPRET=1 (unless set) while the kernels are decorated, restored afterwards
triton, K, MT = import_interpreted("fastipirm.kernels.masked_contrastive",
                                   "fastipirm.ops.masked_triton")
INTERPRETED = K.INTERPRETED
interp = interpreter_mark(triton, INTERPRETED)
SIMS = [("dot", None, 0), ("sqeuclidean", None, 1), ("l1", None, 2), ("lp", 3.0, 3)]


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
# The cases, inputs, upstream gradients and outputs of fastipirm.check (as in test_masked_ops);
# this module's defaults: Q = 37 queries x K = 23 keys (n_k=None: keys=None), D = 10, tau = 0.3,
# random key weights, the key penalty, per-row losses. targets=2 with ``repeat``: a repeated
# column on every other row; groups "single": a single-member group (own keys), "empty": a query
# group without keys (keys given), "sorted": block-diagonal.
def case(similarity="dot", p=None, **kw) -> MaskedCase:
    defaults = dict(n_q=37, n_k=23, dim=10, temperature=0.3, key_weights="rand",
                    key_penalty=True, reduction="none")
    return MaskedCase(similarity=similarity, p=p, **dict(defaults, **kw))


def make(case: MaskedCase) -> tuple[dict, tuple]:
    """``(inputs, upstream gradients)`` of a case (float64, CPU). Adapter: groups "sorted" with
    keys given and separate positives get block-diagonal query groups too (make_masked_inputs
    draws each query's group from a random key, so the query blocks would meet every key
    block)."""
    inputs = make_masked_inputs(case)
    if case.groups == "sorted" and case.keys_given and not case.targets and \
            not case.self_index:
        inputs["query_groups"] = inputs["query_groups"].sort().values
    return inputs, masked_upstream(case)


def errors(got: dict, want: dict) -> dict:
    """:func:`fastipirm.check.masked_errors` (on CPU copies), with key_grads judged against the
    value floor as this module always did (masked_errors uses the gradient floor for them)."""
    want = {name: t.cpu() for name, t in want.items()}
    out = masked_errors(got, want)
    if "key_grads" in want:
        out["key_grads"] = relative_error(got["key_grads"].cpu(), want["key_grads"], VALUE_FLOOR)
    return out


def check_fp32(case: MaskedCase, seed, tol=1e-4):
    inputs, up = make(case)
    want = masked_reference_outputs(inputs, case, up)
    got = masked_backend_outputs("triton", inputs, case, up)
    assert got["loss"].dtype == torch.float32 and got["loss"].shape == (case.n_q,)
    for name, t in got.items():
        assert torch.isfinite(t).all(), f"{name} not finite ({case}, seed {seed})"
    errs = errors(got, want)
    for name, err in errs.items():
        assert err < tol, f"{name}: relative error {err:.3e} ({case}, seed {seed})"
    return max(errs.values())


OP_CASES = [case("dot"), case("dot", targets=1), case("dot", targets=2, repeat=True),
            case("sqeuclidean"), case("sqeuclidean", targets=2, repeat=True),
            case("l1", targets=1), case("l1", n_q=17, targets=2, repeat=True),
            case("lp", 3.0), case("lp", 3.0, n_q=17, targets=2, repeat=True)]
OP_CASES += [
    # keys=None with and without the self column, with index targets
    case("dot", n_k=None, targets=1),
    case("l1", n_q=17, n_k=None, targets=2, repeat=True, include_self=True),
    case("sqeuclidean", n_k=None, include_self=True, key_weights=""),
    # keys given with self_index (the DDP layout)
    case("dot", n_q=17, n_k=40, targets=2, repeat=True, self_index=True),
    case("lp", 3.0, n_q=17, n_k=40, self_index=True, include_self=True),
    # groups: single-member groups, a query group without keys, block-diagonal
    case("dot", n_k=None, groups="single"),
    case("l1", n_k=None, groups="single", include_self=True),
    case("sqeuclidean", groups="empty"),
    case("dot", n_q=64, n_k=None, dim=32, groups="sorted", targets=2, repeat=True),
    case("lp", 3.0, n_q=33, n_k=33, groups="sorted", key_weights=""),
    # feature dimensions: several chunks (32-wide for dot, 16-wide for l1/lp; interpreter)
    case("dot", n_q=17, n_k=17, dim=128, targets=1),
    case("l1", n_q=5, n_k=17, dim=128),
    case("lp", 3.0, n_q=17, n_k=9, dim=40, targets=2, repeat=True),
    case("sqeuclidean", n_q=17, n_k=9, dim=3, targets=1, key_penalty=False),
    case("lp", 1.5, n_q=5, n_k=7, dim=5, key_penalty=False, key_weights=""),
]


@interp
@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_op_fp32_against_float64_reference(case, seed, triton_backend):
    check_fp32(case, seed)


@interp
@pytest.mark.parametrize("case", [
    case("sqeuclidean", temperature=0.005),
    case("sqeuclidean", temperature=0.005, n_q=23, n_k=None, groups="single"),
    case("l1", temperature=0.005, targets=1),
    case("dot", temperature=0.005, scale=2.0)], ids=str)
def test_extreme_temperature_is_finite_and_accurate(case, seed, triton_backend):
    """tau = 0.005 with distances of order 1: logits down to about -800 (-|q - k|^2 / tau) and
    row sums far below 1; nothing overflows (every exponential is shifted by the row max). The
    tolerance is test_masked_ops.py's for these temperatures: fp32 inputs alone put about 1e-3
    into the gradients of a row whose positive holds almost all of its softmax (1 - P_i cancels;
    seed 806530588 gives 1.6e-3 in d queries on the torch, cpu and triton backends alike)."""
    check_fp32(case, seed, tol=1e-2)


FP16 = [case("dot", temperature=0.1, dim=32, targets=2, repeat=True),
        case("sqeuclidean", temperature=0.2, groups="empty"),
        case("l1", n_k=None),
        case("lp", 3.0, dim=7, n_q=17, n_k=40, targets=1, self_index=True)]


@interp
@pytest.mark.parametrize("case", FP16, ids=str)
def test_fp16_within_twice_torch_error(case, seed, triton_backend):
    """fp16 inputs: error vs the float64 truth <= 2 x (the torch backend's own error on the same
    fp16 inputs) + 1e-3 (relative to each output's largest magnitude)."""
    inputs, up = make(case)
    truth = masked_reference_outputs(inputs, case, up)
    base = masked_backend_outputs("torch", inputs, case, up, torch.float16)
    got = masked_backend_outputs("triton", inputs, case, up, torch.float16)
    assert got["loss"].dtype == torch.float32 and got["d queries"].dtype == torch.float16
    for name, r in truth.items():
        assert torch.isfinite(got[name]).all(), f"{name} not finite ({case}, seed {seed})"
        err = relative_error(got[name], r, 1e-6)
        allowed = 2 * relative_error(base[name], r, 1e-6) + 1e-3
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e} ({case}, seed {seed})"


@interp
def test_float64_inputs_are_computed_in_fp32(seed, triton_backend):
    """float64 features: the kernels read float32 copies (the statistics are float32, so the
    custom op returns float32 losses / key gradients); the feature gradients come back float64;
    float32 accuracy."""
    c = case("l1", targets=2, repeat=True)
    inputs, up = make(c)
    want = masked_reference_outputs(inputs, c, up)
    got = masked_backend_outputs("triton", inputs, c, up, torch.float64)
    assert got["loss"].dtype in (torch.float32, torch.float64)
    for name, err in errors(got, want).items():
        if name.startswith("d "):
            assert got[name].dtype == torch.float64, name
        assert err < 1e-4, f"{name} (seed {seed})"


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
    lines = compile_without_interpreter(_AOT_SCRIPT, [80, 90], tmp_path, timeout=900)
    assert len(lines) == 14, "\n".join(lines)
    for line in lines:
        name, arch, shared = line.split()
        assert int(shared) <= shared_memory_limit(arch), \
            f"{name}: {shared} bytes of shared memory"


# ------------------------------------------------------------------ GPU (skipped without CUDA)
GPU_CASES = [case("dot", temperature=0.1, n_q=1000, n_k=None, dim=128),
             case("dot", temperature=0.2, n_q=512, n_k=2048, dim=128, targets=2, repeat=True,
                  self_index=True),
             case("dot", temperature=0.1, n_q=512, n_k=None, dim=128, groups="sorted"),
             case("sqeuclidean", temperature=0.5, n_q=700, n_k=None, include_self=True),
             case("l1", temperature=0.5, n_q=700, n_k=None, include_self=True),
             case("lp", 3.0, temperature=1.0, n_q=300, n_k=300, dim=7, groups="empty"),
             case("sqeuclidean", temperature=0.1, n_q=600, n_k=None, dim=256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.0), (torch.float16, 1e-3),
                                         (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_against_float64_torch_backend(case, dtype, floor, seed):
    """Truth: the ``"torch"`` backend in float64. fp32 (``ieee`` dots): relative error < 1e-4;
    fp16/bf16: <= 2 x (the torch backend's error on the same rounded inputs) + floor."""
    cuda_or_skip(INTERPRETED)
    inputs, up = make(case)
    truth = masked_backend_outputs("torch", inputs, case, up, torch.float64, device="cuda")
    got = masked_backend_outputs("triton", inputs, case, up, dtype, device="cuda")
    for name, t in got.items():
        assert torch.isfinite(t).all(), f"{name} not finite ({case}, seed {seed})"
    errs = errors(got, truth)
    base = errors(masked_backend_outputs("torch", inputs, case, up, dtype, device="cuda"),
                  truth) if dtype != torch.float32 else None
    for name, err in errs.items():
        print(f"[gpu max error] {dtype} {case} {name}: {err:.3e}")
        if base is None:
            assert err < 1e-4, f"{name}: {err:.3e} ({case}, seed {seed})"
        else:
            allowed = 2 * base[name] + floor
            assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e} ({case}, seed {seed})"


@pytest.mark.gpu
def test_gpu_larger_shape_and_peak_memory(seed):
    """Q = K = 8192, D = 128, bf16, key penalty: finite, close to the torch backend (fp32 on the
    same inputs), and the forward + backward peak stays far below one Q x K float32 matrix."""
    cuda_or_skip(INTERPRETED)
    c = case("dot", temperature=0.2, n_q=8192, n_k=8192, dim=128, targets=1, self_index=True,
             groups="sorted")
    inputs, up = make(c)
    base = masked_backend_outputs("torch", inputs, c, up, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = masked_backend_outputs("triton", inputs, c, up, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    print(f"[gpu peak memory] Q=K=8192 D=128 bf16 fwd+bwd: {extra / 2**20:.1f} MiB")
    assert extra < 8192 * 8192, f"peak {extra / 2**20:.1f} MiB"
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    for name, err in errors(got, base).items():
        assert err < 2e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", [case("dot", n_q=1000, n_k=None, dim=128, groups="single"),
                                  case("l1", n_q=500, n_k=700, targets=2, repeat=True)], ids=str)
def test_gpu_deterministic(case, seed):
    """No atomics: two runs are bitwise identical."""
    cuda_or_skip(INTERPRETED)
    inputs, up = make(case)
    a = masked_backend_outputs("triton", inputs, case, up, torch.bfloat16, device="cuda")
    b = masked_backend_outputs("triton", inputs, case, up, torch.bfloat16, device="cuda")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.gpu
def test_gpu_skips_tiles_of_block_diagonal_groups(seed, monkeypatch):
    """DCoDR's 4 x 32 domains with the GPU tiles: a quarter of the dense tiles."""
    cuda_or_skip(INTERPRETED)
    monkeypatch.setattr(K, "COUNT_TILES", True)
    monkeypatch.setattr(K, "LAST_VISITS", {})
    c = case("dot", n_q=128, n_k=None, dim=128)
    inputs, up = make(c)
    inputs["query_groups"] = _block_diagonal()
    masked_backend_outputs("triton", inputs, c, up, torch.float16, device="cuda")
    for name, (visited, dense) in K.LAST_VISITS.items():
        assert visited * 4 == dense, (name, visited, dense)
