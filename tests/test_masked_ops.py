"""masked_contrastive_loss on every available backend against its literal float64 reference.

The backends are those of ``fastipirm.ops.backends.MASKED`` that run on CPU tensors here
(``triton`` only with ``TRITON_INTERPRET=1`` set before fastipirm is imported, as CI does; the
interpreter is slow, so it gets the small shapes only). A backend whose statistics are float64
for float64 inputs is compared in float64 (relative error <= 1e-10) and in fp32 (<= 1e-4); the
others in fp32. fp16 inputs: a backend's error against the reference of the fp32 inputs is at most
twice the torch backend's own fp16 error plus a small floor.

Fresh random inputs every run: a failing case prints its seed, replayed with
``FASTIPIRM_TEST_SEED=<seed>``.
"""
import dataclasses
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from fastipirm import cli
from fastipirm.check import (FP32_TOLERANCE, MaskedCase, default_masked_cases, make_masked_inputs,
                             masked_backend_outputs, masked_errors, masked_outputs_and_grads,
                             masked_reference_outputs, masked_upstream, reference_inputs,
                             run_masked_check)
from fastipirm.ops import (key_group_penalty, masked_contrastive_loss,
                           masked_contrastive_loss_reference)
from fastipirm.ops.backends import MASKED, Backend

BACKENDS = MASKED.available("cpu")
F64_TOLERANCE = 1e-10
FP16_FLOOR = 2e-3          # fp16 rule: err <= 2 * err(torch backend in fp16) + this
M = MaskedCase

pytestmark = pytest.mark.usefixtures("one_thread")


def float64_capable(backend: str) -> bool:
    """The backend keeps float64 statistics (and gradients) for float64 inputs."""
    kern = getattr(MASKED.backends[backend].load(), "kernels", None)
    return kern is not None and kern.stat_dtype(torch.float64) == torch.float64


def skip_if_too_big(backend: str, case: MaskedCase) -> None:
    if backend == "triton" and case.n_q * case.keys * max(case.dim, 16) > 40 * 40 * 16:
        pytest.skip("Triton interpreter: small shapes only")


def assert_outputs(got: dict, want: dict, tol: float, what: str) -> dict:
    for name, t in got.items():
        assert torch.isfinite(t).all(), f"{name} is not finite ({what})"
    errors = masked_errors(got, want)
    bad = {n: f"{e:.3e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors {bad} > {tol:g} ({what})"
    return errors


_REFERENCE: dict = {}


def reference_of(case: MaskedCase, seed: int) -> tuple:
    """``(seed, inputs, upstream, reference outputs)`` of a case: drawn by the first backend's test
    of the case (with its seed) and reused by the other backends' (the slow reference once)."""
    if case not in _REFERENCE:
        inputs = make_masked_inputs(case)
        up = masked_upstream(case)
        _REFERENCE[case] = (seed, inputs, up, masked_reference_outputs(inputs, case, up))
    return _REFERENCE[case]


def check_case(backend: str, case: MaskedCase, seed: int, f64_tol=F64_TOLERANCE,
               fp32_tol=FP32_TOLERANCE) -> None:
    """One case: the reference (once per case); the backend in float64 (if capable) and in
    fp32."""
    skip_if_too_big(backend, case)
    seed, inputs, up, want = reference_of(case, seed)
    dtypes = [torch.float32] + ([torch.float64] if float64_capable(backend) else [])
    for dtype in dtypes:
        got = masked_backend_outputs(backend, inputs, case, up, dtype=dtype)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        assert got["loss"].dtype == stat and got.get("key_grads", got["loss"]).dtype == stat
        for name in ("queries", "keys", "positives"):
            if f"d {name}" in got:
                assert got[f"d {name}"].dtype == dtype
                assert got[f"d {name}"].shape == inputs[name].shape
        tol = f64_tol if dtype == torch.float64 else fp32_tol
        assert_outputs(got, want, tol, f"{backend} {dtype} {case}, seed {seed}")


# ------------------------------------------------------------------ the sweep
SIMILARITIES = [("dot", None), ("sqeuclidean", None), ("l1", None), ("lp", 3.0)]
SIZES = (1, 2, 37, 65, 130)           # odd, and not a multiple of any tile (64, 128)
DIMS = (1, 3, 10, 128)
SHAPES = []
for (i, n), (j, (sim, p)) in itertools.product(enumerate(SIZES), enumerate(SIMILARITIES)):
    d = DIMS[(i + j) % 4]             # every similarity meets every dimension
    if (i + j) % 2 == 0:              # own keys, a separate positive, self-pairs as negatives
        SHAPES.append(M(n, d, sim, p, include_self=True, key_penalty=n <= 65))
    else:                             # keys given (K = Q + 3), one positive column
        SHAPES.append(M(n, d, sim, p, n_k=n + 3, targets=1, key_penalty=True,
                        temperature=0.3))
SHAPES.append(M(37, 10, "lp", 1.5, n_k=19, targets=2, key_penalty=True))

# positives vs positive_index (T=1, T=2, T=2 with a repeated column) x the ways to give keys
KEY_MODES = [dict(), dict(include_self=True), dict(n_k=21), dict(n_k=21, self_index=True),
             dict(n_k=21, self_index=True, include_self=True)]
TARGETS = [dict(targets=0), dict(targets=1), dict(targets=2), dict(targets=2, repeat=True)]
POSITIVES = [M(13, 10, *SIMILARITIES[k % 4], key_penalty=True, **km, **tg)
             for k, (km, tg) in enumerate(itertools.product(KEY_MODES, TARGETS))]

# groups: scattered, sorted blocks, one group, all distinct (empty negative sets), one
# single-member group, negative ids; own keys, keys with self_index, keys without
GROUPS = []
for k, (kind, km) in enumerate(itertools.product(
        ("random", "sorted", "one", "distinct", "single", "negative"),
        (dict(), dict(n_k=29, self_index=True), dict(n_k=29)))):
    # (distinct groups of keys without self_index: one key per query, its positive)
    targets = 0 if kind == "distinct" and km == dict(n_k=29) else k % 2
    # a query alone in its group has no target column but its own: include it; and all
    # distinct without self-pairs has no negative anywhere (test_empty_negative_set_...)
    own = not km.get("n_k") or km.get("self_index")
    include_self = bool(own and (kind == "distinct" or (targets and kind == "single")))
    GROUPS.append(M(23, 10, *SIMILARITIES[k % 4], groups=kind, targets=targets,
                    include_self=include_self, key_penalty=True, **km))

# key weights (incl. zeros), penalty row weights, reductions
WEIGHTS = [M(17, 10, *SIMILARITIES[k % 4], key_weights=kw, row_weights=rw, reduction=red,
             key_penalty=True, targets=k % 3, n_k=None if k % 2 else 23,
             groups="random" if k % 4 == 1 else "")
           for k, (kw, rw, red) in enumerate(itertools.product(
               ("rand", "zeros"), (False, True), ("mean", "sum", "none")))]

# all-equal inputs: every logit of a row equal
EQUAL = [M(9, 10, sim, p, special="equal", key_penalty=True, include_self=k % 2 == 0,
           targets=0 if k % 2 == 0 else 2, n_k=None if k % 2 == 0 else 12)
         for k, (sim, p) in enumerate(SIMILARITIES)]

SWEEP = SHAPES + POSITIVES + GROUPS + WEIGHTS + EQUAL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_against_float64_reference(backend, case, seed):
    check_case(backend, case, seed)


# extreme temperature: tau = 0.005 with similarities of order one (logits of order 400), and
# distances of order 100 at tau = 1: finite, no NaN/inf, and still the reference's values
EXTREME = [M(37, 10, sim, p, temperature=0.005, key_penalty=True, include_self=True)
           for sim, p in SIMILARITIES]
EXTREME += [M(21, 10, "sqeuclidean", n_k=30, targets=2, temperature=0.005, key_penalty=True,
              groups="random"),
            M(21, 10, "sqeuclidean", temperature=1.0, scale=8.0, key_penalty=True),
            M(21, 3, "l1", n_k=9, targets=1, temperature=0.005, scale=4.0, key_penalty=True,
              key_weights="rand")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EXTREME, ids=str)
def test_extreme_temperatures_are_finite_and_exact(backend, case, seed):
    # fp32: a logit of order 400 carries an absolute error of about 400 * 6e-8 (and the squared
    # distance through |q|^2 + |k|^2 - 2 q.k about 2 * 6e-8 / 0.005), which the loss's
    # cancellation and the small key_grads (judged against the 1e-3 floor) see
    check_case(backend, case, seed, f64_tol=1e-9, fp32_tol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zero_weight_key_does_not_set_the_row_shift(backend, dtype):
    """BUG (reported): the row shift m_i of rowstats is the largest negative logit whatever its
    key weight. A zero-weight key far closer to the query than every weighted column (logit gap
    > ~88 in fp32, > ~745 in float64) makes z_i = sum_j w_j e^{x_ij - m_i} underflow to 0: the
    loss is -inf (and inaccurate well before, through denormals). The reference, which drops
    zero-weight columns, gives 1000."""
    q = torch.tensor([[0.0, 0.0]], dtype=dtype)
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=dtype)
    w = torch.tensor([0.0, 1.0, 1.0], dtype=dtype)
    kw = dict(positive_index=torch.tensor([2]), key_weights=w, similarity="l1")
    for temperature, want in ((0.01, 100.0), (0.001, 1000.0)):
        ref = masked_contrastive_loss_reference(q.double(), keys.double(), temperature=temperature,
                                                **dict(kw, key_weights=w.double()))
        assert ref.item() == pytest.approx(want)
        loss = masked_contrastive_loss(q, keys, temperature=temperature, backend=backend, **kw)
        assert loss.item() == pytest.approx(want, rel=1e-6), f"tau={temperature}: {loss.item()}"


FP16 = [M(37, 16, "dot", key_penalty=True, groups="random"),
        M(37, 16, "sqeuclidean", n_k=40, targets=2, key_penalty=True),
        M(20, 10, "l1", include_self=True, key_penalty=True, reduction="none"),
        M(20, 10, "lp", 3.0, n_k=25, self_index=True, targets=1, key_weights="rand",
          key_penalty=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FP16, ids=str)
def test_fp16_inputs(backend, case, seed):
    """fp16 inputs: float32 outputs, fp16 gradients, and an error against the reference of the
    fp32 inputs at most twice the torch backend's own fp16 error plus a small floor."""
    skip_if_too_big(backend, case)
    inputs = make_masked_inputs(case)
    inputs = {n: t.float() if t is not None and t.is_floating_point() else t
              for n, t in inputs.items()}
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    own = masked_errors(masked_backend_outputs("torch", inputs, case, up, torch.float16), want)
    got = masked_backend_outputs(backend, inputs, case, up, torch.float16)
    assert got["loss"].dtype == torch.float32 and got["key_grads"].dtype == torch.float32
    assert got["d queries"].dtype == torch.float16
    errors = assert_outputs(got, want, 1.0, f"{backend} fp16 {case}, seed {seed}")
    for name, err in errors.items():
        assert err <= 2 * own[name] + FP16_FLOOR, \
            f"{name}: fp16 error {err:.3e} > 2 x torch's {own[name]:.3e} + {FP16_FLOOR} " \
            f"({backend} {case}, seed {seed})"


# ------------------------------------------------------------------ shapes, dtypes, reductions
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_reduction_none_shapes_and_dtypes(backend, dtype, seed):
    """Float32 losses and key_grads for 16/32-bit inputs, float64 for float64 inputs (the op's
    documented contract, whatever the backend's statistics); gradients in the inputs' dtype."""
    case = M(11, 8, "dot", n_k=14, targets=2, key_penalty=True, reduction="none")
    inputs = make_masked_inputs(case)
    args = {n: (t.to(dtype).requires_grad_() if n in ("queries", "keys") else t)
            for n, t in inputs.items()}
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    losses, g = masked_contrastive_loss(**args, **case.op_kwargs(), backend=backend)
    assert losses.shape == (11,) and losses.dtype == stat
    assert g.shape == (14,) and g.dtype == stat
    (losses.sum() + g.sum()).backward()
    for name in ("queries", "keys"):
        assert args[name].grad.dtype == dtype and args[name].grad.shape == args[name].shape
    kw = dict(case.op_kwargs(), key_penalty=False)
    for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum)):
        kw["reduction"] = reduction
        loss = masked_contrastive_loss(**args, **kw, backend=backend)
        assert loss.shape == () and loss.dtype == stat
        torch.testing.assert_close(loss, reduce(losses))
    kw["reduction"] = "none"
    torch.testing.assert_close(masked_contrastive_loss(**args, **kw, backend=backend), losses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_weight_shapes_agree(backend, seed):
    """positive_weight (T,) is the same as that row repeated (Q, T); T=1 without weights is
    weight 1; positive_index (Q,) is (Q, 1)."""
    q = torch.randn(9, 5, dtype=torch.float64)
    k = torch.randn(12, 5, dtype=torch.float64)
    idx = torch.randint(0, 12, (9, 2))
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    a = masked_contrastive_loss(q, k, positive_index=idx, positive_weight=w, backend=backend)
    b = masked_contrastive_loss(q, k, positive_index=idx, positive_weight=w.expand(9, 2),
                                backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    c = masked_contrastive_loss(q, k, positive_index=idx[:, 0], backend=backend)
    d = masked_contrastive_loss(q, k, positive_index=idx[:, :1],
                                positive_weight=torch.ones(1, dtype=torch.float64),
                                backend=backend)
    torch.testing.assert_close(c, d, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ empty negative sets
EMPTY = [M(7, 5, "dot", groups="distinct", key_penalty=True),                 # own keys
         M(7, 5, "sqeuclidean", groups="distinct", targets=1, include_self=True,
           key_penalty=True),                                                 # target = self
         M(7, 5, "l1", n_k=7, groups="distinct", targets=1, key_penalty=True),  # keys given
         M(7, 5, "lp", 3.0, n_k=9, key_weights="zeros", targets=1, key_penalty=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EMPTY, ids=str)
def test_empty_negative_set_gives_zero_loss_and_gradient(backend, case, seed):
    skip_if_too_big(backend, case)
    inputs = make_masked_inputs(case)
    if case.key_weights:
        inputs["key_weights"] = torch.zeros_like(inputs["key_weights"])
    case = dataclasses.replace(case, reduction="none")
    up = masked_upstream(case)
    dtype = torch.float64 if float64_capable(backend) else torch.float32
    got = masked_backend_outputs(backend, inputs, case, up, dtype=dtype)
    # fp32: the closed form's cancelling target terms (c gamma x, x of order 10) leave ~1e-5
    atol = 1e-12 if dtype == torch.float64 else 1e-4
    for name, t in got.items():
        if name == "d key_weights":     # the derivative of log Z w.r.t. a zero weight: e^x / Z
            continue
        assert t.abs().max() <= atol, f"{name} = {t} ({backend} {case}, seed {seed})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_negatives_are_zero_among_others(backend, seed):
    """One single-member group (own keys, separate positives): that row's loss is 0; the other
    rows are the reference's."""
    case = M(12, 6, "dot", groups="single", reduction="none", key_penalty=True)
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    got = masked_backend_outputs(backend, inputs, case, up, dtype=torch.float32)
    alone = inputs["query_groups"] == 99
    assert got["loss"][alone].abs().max() <= 1e-6
    assert (got["loss"][~alone] > 0).all()
    assert_outputs(got, masked_reference_outputs(inputs, case, up), FP32_TOLERANCE,
                   f"{backend}, seed {seed}")


# ------------------------------------------------------------------ key_group_penalty
def test_key_group_penalty_per_group(seed):
    g = torch.randn(10, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([5, -1, 5, 3, 3, 5, -1, 0, 0, 5])
    ids, pen = key_group_penalty(g, groups)
    assert ids.tolist() == [-1, 0, 3, 5]
    want = torch.stack([(g[groups == i] ** 2).sum() for i in ids])
    torch.testing.assert_close(pen, want, rtol=1e-14, atol=0)
    up = torch.randn(4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((pen * up).sum(), g)
    torch.testing.assert_close(grad, 2 * g.detach() * up[torch.searchsorted(ids, groups)])
    ids, pen = key_group_penalty(g)
    assert ids.tolist() == [0] and pen.shape == (1,)
    torch.testing.assert_close(pen[0], (g ** 2).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_in_one_call_equal_one_call_per_group(backend, seed):
    """key_grads of one call with groups (default row weights: 1 / group size) squared per group
    by key_group_penalty are each group's own call's penalty; so are the mean losses."""
    n, k, d = 23, 31, 6
    dtype = torch.float64 if float64_capable(backend) else torch.float32
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    q = F.normalize(torch.randn(n, d, dtype=dtype), dim=1)
    keys = F.normalize(torch.randn(k, d, dtype=dtype), dim=1)
    kg = torch.randint(0, 3, (k,))
    kg[:3] = torch.arange(3)
    qg = kg[torch.randint(0, k, (n,))]
    qg[:3] = torch.arange(3)
    idx = torch.stack([torch.nonzero(kg == int(qg[i]))[0, 0] for i in range(n)])
    kw = dict(temperature=0.2, key_penalty=True, backend=backend)
    losses, g = masked_contrastive_loss(q, keys, positive_index=idx, query_groups=qg,
                                        key_groups=kg, reduction="none", **kw)
    ids, pens = key_group_penalty(g, kg)
    for e, pen in zip(ids.tolist(), pens):
        rows, cols = qg == e, kg == e
        remap = torch.cumsum(cols.long(), 0) - 1
        loss_e, g_e = masked_contrastive_loss(q[rows], keys[cols], positive_index=remap[idx[rows]],
                                              **kw)
        what = f"group {e}, seed {seed}"
        torch.testing.assert_close(losses[rows].mean(), loss_e, rtol=rtol, atol=rtol * 1e-2,
                                   msg=what)
        scale = rtol * max(float(g_e.abs().max()), 1e-3)
        torch.testing.assert_close(g[cols], g_e, rtol=rtol, atol=scale, msg=what)
        torch.testing.assert_close(pen, (g_e ** 2).sum(), rtol=10 * rtol, atol=scale * 1e-3,
                                   msg=what)


# ------------------------------------------------------------------ custom ops and compile
def _op_args(kind: str):
    g = torch.Generator().manual_seed(0)
    n, k, d = 5, 7, 4
    q = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.randn(k, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(k, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if kind == "index":     # l2, two target columns, key weights, key penalty
        idx = torch.randint(0, k, (n, 2), generator=g)
        tw = torch.tensor([[0.3, 0.7]] * n, dtype=torch.float64)
        return (q, keys, None, idx, tw, None, None, None, w, c, 1, 2.0, 0.5, False, True)
    # lp, separate positives, groups, self_index, include_self, no key penalty
    pos = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    kg = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    si = torch.tensor([0, 1, 2, 3, 4])
    return (q, keys, pos, None, None, kg[si], kg, si, w, c, 3, 3.0, 0.7, True, False)


@pytest.mark.parametrize("kind", ["index", "positives"])
def test_opcheck_custom_ops(kind):
    impl = MASKED.backends["torch"].load()
    args = _op_args(kind)
    torch.library.opcheck(impl.forward_op, args)
    out = impl.forward_op(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    n, k = args[0].shape[0], args[1].shape[0]
    key_penalty = args[-1]
    bargs = (*plain[:10], *(t.detach() for t in out[2:]), torch.randn(n, dtype=torch.float64),
             torch.randn(k if key_penalty else 0, dtype=torch.float64), *plain[10:], True)
    torch.library.opcheck(impl.backward_op, bargs)


def _step(lin, x, a, idx, tw, groups):
    q = F.normalize(lin(x), dim=1)
    keys = F.normalize(lin(a), dim=1)
    losses, g = masked_contrastive_loss(q, keys, positive_index=idx, positive_weight=tw,
                                        query_groups=groups, key_groups=groups, temperature=0.2,
                                        reduction="none", key_penalty=True, backend="torch")
    _, pens = key_group_penalty(g, groups)
    return losses.mean() + 0.2 * pens.mean()


def _mixup_batch(n=12):
    x, a = torch.randn(n, 8), torch.randn(n, 8)
    groups = torch.arange(n) % 2
    perm = torch.arange(n).view(-1, 2)[torch.randperm(n // 2)].flatten()   # within the groups
    idx = torch.stack([torch.arange(n), perm], 1)
    tw = torch.tensor([0.7, 0.3])
    return x, a, idx, tw, groups


def test_compiled_training_step_equals_eager(seed):
    MASKED.resolve("torch", torch.device("cpu"))    # loaded eagerly: see the test below
    lin = torch.nn.Linear(8, 8)
    batch = _mixup_batch()
    out = torch.compile(lambda *b: _step(lin, *b), fullgraph=True, backend="aot_eager")(*batch)
    out.backward()
    grad = lin.weight.grad.clone()
    lin.weight.grad = None
    ref = _step(lin, *batch)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, lin.weight.grad, rtol=1e-5, atol=1e-7)


def test_first_call_of_the_op_may_be_compiled(monkeypatch):
    """BUG (reported): the op loads its backend on first use through importlib.import_module
    (masked_backends.load), which dynamo refuses under fullgraph=True: a training step whose
    first call of the op is compiled fails unless the backend was loaded eagerly before.
    env_contrastive_loss's first compiled call works."""
    fresh = Backend("torch", ("cpu", "cuda"), MASKED.backends["torch"].loader)
    monkeypatch.setitem(MASKED.backends, "torch", fresh)
    lin = torch.nn.Linear(8, 8)
    out = torch.compile(lambda *b: _step(lin, *b), fullgraph=True,
                        backend="aot_eager")(*_mixup_batch())
    assert torch.isfinite(out)


# ------------------------------------------------------------------ the reference itself
def test_reference_gradient_of_a_zero_key_weight(seed):
    """BUG (reported): the reference drops a zero-weight column, so its gradient w.r.t. that
    weight is 0; the loss is smooth in w_j at 0 with derivative sum_i e^{x_ij} / Z_i (the
    glue's value, and the reference's own limit w_j -> 0+)."""
    q = torch.randn(6, 3, dtype=torch.float64)
    pos = torch.randn(6, 3, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64) + 0.1
    w[2] = 0.0

    def grad(weights):
        weights = weights.clone().requires_grad_()
        masked_contrastive_loss_reference(q, positives=pos, key_weights=weights).backward()
        return weights.grad

    limit = grad(torch.where(w == 0, torch.full_like(w, 1e-300), w))
    op = w.clone().requires_grad_()
    masked_contrastive_loss(q, positives=pos, key_weights=op, backend="torch").backward()
    torch.testing.assert_close(op.grad, limit, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad(w), limit, rtol=1e-12, atol=0)


def test_reference_key_penalty_without_any_negative(seed):
    """BUG (reported): with no negative pair anywhere (every query alone in its group, separate
    positives) the reference's autograd.grad w.r.t. the unused dummy raises instead of
    returning key_grads = 0, as the op does."""
    q = torch.randn(4, 3, dtype=torch.float64)
    pos = torch.randn(4, 3, dtype=torch.float64)
    groups = torch.arange(4)
    loss, g = masked_contrastive_loss(q, positives=pos, query_groups=groups, key_penalty=True,
                                      backend="torch")
    assert loss == 0 and torch.equal(g, torch.zeros(4, dtype=torch.float64))
    ref_loss, ref_g = masked_contrastive_loss_reference(q, positives=pos, query_groups=groups,
                                                        key_penalty=True)
    assert ref_loss == 0 and torch.equal(ref_g, torch.zeros(4, dtype=torch.float64))


def test_reference_inputs_stand_in_for_zero_weights():
    """The sweep's stand-in for a zero key weight changes no value of the reference."""
    case = M(9, 4, "dot", key_weights="zeros", key_penalty=True, targets=1, n_k=12)
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    exact = masked_outputs_and_grads(masked_contrastive_loss_reference, inputs, case, up)
    tiny = masked_reference_outputs(inputs, case, up)
    for name in ("loss", "key_grads", "d queries", "d keys"):
        torch.testing.assert_close(tiny[name], exact[name], rtol=1e-12, atol=1e-14)
    assert (reference_inputs(inputs)["key_weights"] > 0).all()


# ------------------------------------------------------------------ validation
def _valid():
    q = torch.randn(5, 3)
    return dict(queries=q, keys=torch.randn(7, 3), positive_index=torch.tensor([0, 1, 2, 3, 4]))


def _own():
    return dict(queries=torch.randn(5, 3), positives=torch.randn(5, 3))


META = torch.device("meta")
ERRORS = [
    # (description, arguments, message pattern)
    ("queries not a tensor", dict(_own(), queries=[[1.0]]), "queries must be a torch.Tensor"),
    ("queries 1-D", dict(_own(), queries=torch.randn(5)), r"queries must be 2-D"),
    ("queries int", dict(_own(), queries=torch.ones(5, 3, dtype=torch.long)),
     "queries must be float16, bfloat16, float32 or float64"),
    ("queries empty", dict(queries=torch.randn(0, 3), positives=torch.randn(0, 3)),
     "at least one row and one column"),
    ("queries no columns", dict(queries=torch.randn(5, 0), positives=torch.randn(5, 0)),
     "at least one row and one column"),
    ("queries NaN", dict(_own(), queries=torch.full((5, 3), float("nan"))),
     "queries contains NaN or infinite"),
    ("keys inf", dict(_valid(), keys=torch.full((7, 3), float("inf"))),
     "keys contains NaN or infinite"),
    ("positives NaN", dict(_own(), positives=torch.full((5, 3), float("nan"))),
     "positives contains NaN or infinite"),
    ("keys 3-D", dict(_valid(), keys=torch.randn(7, 3, 1)), "keys must be 2-D"),
    ("keys wrong dim", dict(_valid(), keys=torch.randn(7, 4)), r"keys must be \(K, 3\)"),
    ("keys wrong dtype", dict(_valid(), keys=torch.randn(7, 3, dtype=torch.float64)),
     r"keys must be \(K, 3\) of the queries' dtype"),
    ("keys wrong device", dict(_valid(), keys=torch.randn(7, 3, device=META)),
     r"keys must be \(K, 3\) of the queries' dtype and device"),
    ("keys empty", dict(_valid(), keys=torch.randn(0, 3)), "keys must have at least one row"),
    ("neither positive", dict(queries=torch.randn(5, 3)), "give exactly one of positives"),
    ("both positives", dict(_valid(), positives=torch.randn(5, 3)),
     "give exactly one of positives"),
    ("positives wrong shape", dict(_own(), positives=torch.randn(4, 3)),
     r"positives must be \(5, 3\)"),
    ("positives wrong dtype", dict(_own(), positives=torch.randn(5, 3, dtype=torch.float64)),
     r"positives must be \(5, 3\) of the queries' dtype"),
    ("positives wrong device", dict(_own(), positives=torch.randn(5, 3, device=META)),
     r"positives must be \(5, 3\) of the queries' dtype and device"),
    ("positive_weight with positives", dict(_own(), positive_weight=torch.ones(1)),
     "positive_weight is only used with positive_index"),
    ("positive_index 3-D", dict(_valid(), positive_index=torch.zeros(5, 1, 1, dtype=torch.long)),
     r"positive_index must be a \(Q,\) or \(Q, T\) integer tensor"),
    ("positive_index a list", dict(_valid(), positive_index=[0, 1, 2, 3, 4]),
     r"positive_index must be a \(Q,\) or \(Q, T\) integer tensor"),
    ("positive_index float", dict(_valid(), positive_index=torch.zeros(5)),
     "positive_index must be an integer tensor"),
    ("positive_index rows", dict(_valid(), positive_index=torch.tensor([0, 1])),
     "positive_index must have 5 rows"),
    ("positive_index device", dict(_valid(), positive_index=torch.zeros(5, dtype=torch.long,
                                                                        device=META)),
     "positive_index is on meta"),
    ("positive_index T=0", dict(_valid(), positive_index=torch.zeros(5, 0, dtype=torch.long)),
     r"positive_index has no column \(T=0\)"),
    ("positive_index out of range", dict(_valid(), positive_index=torch.tensor([0, 1, 2, 3, 7])),
     r"positive_index must lie in \[0, 7\) \(key columns\), got values in \[0, 7\]"),
    ("positive_index negative", dict(_valid(), positive_index=torch.tensor([0, -1, 2, 3, 4])),
     r"positive_index must lie in \[0, 7\)"),
    ("T=2 without weights", dict(_valid(), positive_index=torch.zeros(5, 2, dtype=torch.long)),
     "positive_weight is needed with several positive columns"),
    ("positive_weight int", dict(_valid(), positive_index=torch.zeros(5, 2, dtype=torch.long),
                                 positive_weight=torch.tensor([1, 0])),
     "positive_weight must be a floating-point tensor"),
    ("positive_weight shape", dict(_valid(), positive_index=torch.zeros(5, 2, dtype=torch.long),
                                   positive_weight=torch.ones(3) / 3),
     r"positive_weight must be \(2,\) or \(5, 2\), got \(3,\)"),
    ("positive_weight sum", dict(_valid(), positive_index=torch.zeros(5, 2, dtype=torch.long),
                                 positive_weight=torch.tensor([0.5, 0.6])),
     "positive_weight must be non-negative and sum to 1 per query"),
    ("positive_weight negative", dict(_valid(), positive_index=torch.zeros(5, 2, dtype=torch.long),
                                      positive_weight=torch.tensor([1.5, -0.5])),
     "positive_weight must be non-negative and sum to 1 per query"),
    ("positive_weight needs grad",
     dict(_valid(), positive_index=torch.zeros(5, 2, dtype=torch.long),
          positive_weight=torch.tensor([0.5, 0.5], requires_grad=True)),
     "positive_weight .* no gradient"),
    ("positive column is self", dict(_own(), positives=None,
                                     positive_index=torch.tensor([1, 1, 0, 0, 0])),
     "a positive_index column is the query's own column; pass include_self=True"),
    ("positive column is self (self_index)",
     dict(_valid(), self_index=torch.tensor([0, 6, 5, 4, 3])),
     "a positive_index column is the query's own column"),
    ("positive column outside the group",
     dict(_valid(), query_groups=torch.zeros(5, dtype=torch.long),
          key_groups=torch.tensor([0, 0, 0, 0, 1, 1, 1])),
     "a positive_index column lies outside the query's group"),
    ("include_self without self_index", dict(_valid(), include_self=True),
     "include_self needs keys=None or self_index"),
    ("self_index with own keys", dict(_own(), self_index=torch.arange(5)),
     r"self_index is only used with keys \(keys=None: key i is query i\)"),
    ("self_index rows", dict(_valid(), self_index=torch.arange(4)), "self_index must have 5 rows"),
    ("self_index 2-D", dict(_valid(), self_index=torch.zeros(5, 1, dtype=torch.long)),
     "self_index must be 1-D"),
    ("self_index float", dict(_valid(), self_index=torch.zeros(5)),
     "self_index must be an integer tensor"),
    ("self_index out of range", dict(_valid(), self_index=torch.tensor([5, 6, 7, 0, 1])),
     r"self_index must lie in \[0, 7\)"),
    ("key_groups with own keys", dict(_own(), key_groups=torch.zeros(5, dtype=torch.long)),
     "key_groups is only used with keys; with keys=None query_groups serves both"),
    ("query_groups only", dict(_valid(), query_groups=torch.zeros(5, dtype=torch.long)),
     "give both query_groups and key_groups, or neither"),
    ("key_groups only", dict(_valid(), key_groups=torch.zeros(7, dtype=torch.long)),
     "give both query_groups and key_groups, or neither"),
    ("query_groups rows", dict(_own(), query_groups=torch.zeros(4, dtype=torch.long)),
     "query_groups must have 5 rows"),
    ("key_groups rows", dict(_valid(), query_groups=torch.zeros(5, dtype=torch.long),
                             key_groups=torch.zeros(6, dtype=torch.long)),
     "key_groups must have 7 rows"),
    ("query_groups float", dict(_own(), query_groups=torch.zeros(5)),
     "query_groups must be an integer tensor"),
    ("query_groups bool", dict(_own(), query_groups=torch.zeros(5, dtype=torch.bool)),
     "query_groups must be an integer tensor"),
    ("query_groups 2-D", dict(_own(), query_groups=torch.zeros(5, 1, dtype=torch.long)),
     "query_groups must be 1-D"),
    ("query_groups device", dict(_own(), query_groups=torch.zeros(5, dtype=torch.long,
                                                                  device=META)),
     "query_groups is on meta"),
    ("key_weights shape", dict(_valid(), key_weights=torch.ones(5)),
     r"key_weights must be a floating-point \(7,\) tensor"),
    ("key_weights 2-D", dict(_valid(), key_weights=torch.ones(7, 1)), "key_weights must be 1-D"),
    ("key_weights int", dict(_valid(), key_weights=torch.ones(7, dtype=torch.long)),
     r"key_weights must be a floating-point \(7,\) tensor"),
    ("key_weights device", dict(_valid(), key_weights=torch.ones(7, device=META)),
     r"key_weights must be a floating-point \(7,\) tensor on cpu"),
    ("key_weights negative", dict(_valid(), key_weights=-torch.ones(7)),
     "key_weights must be finite and non-negative"),
    ("key_weights inf", dict(_valid(), key_weights=torch.full((7,), float("inf"))),
     "key_weights must be finite and non-negative"),
    ("penalty_row_weights shape", dict(_valid(), penalty_row_weights=torch.ones(7)),
     r"penalty_row_weights must be a floating-point \(5,\) tensor"),
    ("penalty_row_weights int", dict(_valid(), penalty_row_weights=torch.ones(5, dtype=torch.long)),
     r"penalty_row_weights must be a floating-point \(5,\) tensor"),
    ("penalty_row_weights 2-D", dict(_valid(), penalty_row_weights=torch.ones(5, 1)),
     "penalty_row_weights must be 1-D"),
    ("penalty_row_weights device", dict(_valid(), penalty_row_weights=torch.ones(5, device=META)),
     r"penalty_row_weights must be a floating-point \(5,\) tensor on cpu"),
    ("penalty_row_weights NaN", dict(_valid(), penalty_row_weights=torch.full((5,), float("nan"))),
     "penalty_row_weights must be finite"),
    ("penalty_row_weights needs grad", dict(_valid(), penalty_row_weights=torch.ones(
        5, requires_grad=True)), "penalty_row_weights .* no gradient"),
    ("unknown similarity", dict(_own(), similarity="cosine"), "unknown similarity 'cosine'"),
    ("lp without p", dict(_own(), similarity="lp"), "similarity 'lp' needs a finite p >= 1"),
    ("lp with p < 1", dict(_own(), similarity="lp", p=0.5),
     r"similarity 'lp' needs a finite p >= 1, got p=0.5"),
    ("lp with p inf", dict(_own(), similarity="lp", p=float("inf")),
     "similarity 'lp' needs a finite p >= 1"),
    ("p with l1", dict(_own(), similarity="l1", p=1.0),
     "p is only used with similarity 'lp', got p=1.0 with 'l1'"),
    ("temperature 0", dict(_own(), temperature=0.0), "temperature must be a positive finite"),
    ("temperature negative", dict(_own(), temperature=-0.5),
     "temperature must be a positive finite"),
    ("temperature nan", dict(_own(), temperature=float("nan")),
     "temperature must be a positive finite"),
    ("temperature bool", dict(_own(), temperature=True), "temperature must be a positive number"),
    ("temperature str", dict(_own(), temperature="0.5"), "temperature must be a positive number"),
    ("include_self not bool", dict(_own(), include_self=1),
     "include_self must be True or False"),
    ("key_penalty not bool", dict(_own(), key_penalty="yes"), "key_penalty must be True or False"),
    ("unknown reduction", dict(_own(), reduction="max"), "unknown reduction 'max'"),
    ("unknown backend", dict(_own(), backend="nope"), "unknown backend 'nope'"),
]


@pytest.mark.parametrize("what,kwargs,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_validation_errors(what, kwargs, message):
    with pytest.raises(ValueError, match=message):
        masked_contrastive_loss(**kwargs)


def test_check_values_false_skips_value_checks():
    kw = dict(_valid(), positive_index=torch.tensor([0, 1, 2, 3, 4]),
              key_weights=torch.ones(7), backend="torch")
    masked_contrastive_loss(**kw, check_values=False)
    with pytest.raises(ValueError, match="must lie in"):
        masked_contrastive_loss(**dict(kw, positive_index=torch.tensor([0, 1, 2, 3, 9])))


# ------------------------------------------------------------------ fastipirm check
def test_check_table_covers_the_masked_op():
    lines = []
    assert run_masked_check(["torch"], quick=True, out=lines.append)
    text = "\n".join(lines)
    assert "masked_contrastive_loss" in text and re.search(r"^torch .* ok$", text, re.M)
    sims = {c.similarity for c in default_masked_cases(quick=True)}
    assert sims == {"dot", "sqeuclidean", "l1", "lp"}
    cases = default_masked_cases()
    assert {c.targets > 0 for c in cases} == {True, False}
    assert any(c.groups for c in cases) and any(c.include_self for c in cases)
    assert any(c.key_penalty for c in cases) and any(c.self_index for c in cases)


def _wrong_masked(scale=1.001, crash=False):
    impl = MASKED.backends["torch"].load()

    def wrong(*args):
        if crash:
            raise RuntimeError("masked boom")
        losses, g = impl(*args)
        return losses * scale, g

    return wrong


@pytest.mark.parametrize("crash", [False, True])
def test_check_command_fails_on_a_wrong_masked_backend(monkeypatch, capsys, crash):
    monkeypatch.setitem(MASKED.backends, "wrongm",
                        Backend("wrongm", ("cpu",), lambda: _wrong_masked(crash=crash)))
    assert cli.main(["check", "--quick", "--backend", "wrongm"]) == 1
    out = capsys.readouterr().out
    assert "masked_contrastive_loss" in out and "FAIL" in out
    assert ("masked boom" in out) == crash


def test_check_command_rejects_an_unknown_backend(capsys):
    assert cli.main(["check", "--quick", "--backend", "nosuch"]) == 1
    assert "unknown backend" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_command_fails_when_a_named_backend_runs_on_no_device_here(monkeypatch, capsys):
    monkeypatch.setitem(MASKED.backends, "gpuonly",
                        Backend("gpuonly", ("cuda",), lambda: _wrong_masked(scale=1.0)))
    assert cli.main(["check", "--quick", "--backend", "gpuonly"]) == 1
    assert "run on none of the devices here" in capsys.readouterr().out
