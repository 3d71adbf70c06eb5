"""env_contrastive_loss (every CPU-capable backend) against the literal float64 reference.

Fresh random inputs every run: a failing case prints its seed so it can be replayed with
``FASTIPIRM_TEST_SEED=<seed>``.
"""
import itertools

import pytest
import torch

from fastipirm.check import (GRADIENT_FLOOR, VALUE_FLOOR, Case, make_inputs, op_kwargs,
                             outputs_and_grads, relative_error)
from fastipirm.ops import (PENALTIES, EnvContrastiveSpec, available_backends,
                           env_contrastive_loss, env_contrastive_loss_reference)

BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # triton: test_triton_backend


def make(case: Case, dtype=torch.float32):
    return make_inputs(case, dtype=dtype)


def run(fn, z1, z2, w, soft, up):
    return outputs_and_grads(fn, z1, z2, w, soft, *up)


kwargs = op_kwargs


def reference(case, z1, z2, w, up, dtype=torch.float64):
    return run(lambda a, b, c: env_contrastive_loss_reference(a, b, c, **kwargs(case)),
               z1.to(dtype), z2.to(dtype), w.to(dtype), case.soft,
               [u.to(dtype) for u in up])


def backend_out(backend, case, z1, z2, w, up):
    return run(lambda a, b, c: env_contrastive_loss(a, b, c, backend=backend, **kwargs(case)),
               z1, z2, w, case.soft, up)


SWEEP = [Case(b, d, m, soft, "slot")
         for b, d, m, soft in itertools.product((1, 2, 5, 37, 300), (3, 16, 128), (1, 2, 16),
                                                (False, True))]
SPECIAL = [Case(37, 16, 3, soft, pen, special=sp)
           for soft, pen, sp in itertools.product((False, True), PENALTIES,
                                                  ("empty", "single", "equal"))]
VARIANTS = [Case(b, 16, 3, soft, pen, temperature=t, nonorm=nonorm)
            for b, soft, pen, t, nonorm in itertools.product(
                (2, 37), (False, True), PENALTIES, (0.5, 0.2), (False, True))
            if soft or not nonorm]
NAMES = ["outputs: loss", "penalty", "grad z1", "grad z2", "grad weights"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SWEEP + SPECIAL + VARIANTS, ids=str)
def test_fp32_against_float64_reference(backend, case, seed):
    """Relative error below 1e-4 in fp32, values and gradients.

    One documented exception: the soft-mode weight gradient contains kappa = (2B-2) / (sum of
    the negatives' weights), which amplifies fp32 rounding by kappa when that sum is small (B = 2
    with a weight near 0: kappa ~ 1e3; the official construction in fp32 is then itself off by
    ~1e-4). Its bound is 1e-4 * max(1, kappa_max / 4); kappa is ~2 at realistic batch sizes.
    """
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    want = reference(case, z1, z2, w, up)
    got = backend_out(backend, case, z1, z2, w, up)
    assert got[0].dtype == torch.float32 and got[0].shape == (case.envs,)
    assert got[1].dtype == torch.float32 and got[1].shape == (case.envs,)
    for i, (name, g, r) in enumerate(zip(NAMES, got, want)):
        assert torch.isfinite(g).all(), f"{name} not finite (seed {seed})"
        err = relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        bound = 1e-4
        if i == 4:
            others = 2 * (w.double().sum(0, keepdim=True) - w.double())
            kappa = (2 * case.batch - 2) / others.clamp_min(1e-12)
            bound *= max(1.0, kappa.max().item() / 4)
        assert err < bound, f"{name}: relative error {err:.3e} >= {bound:.3e} (seed {seed})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("case", [Case(37, 128, 16, False, "slot"), Case(37, 128, 16, True, "slot"),
                                  Case(5, 16, 2, True, "split"), Case(64, 32, 3, False, "scalar")],
                         ids=str)
def test_low_precision_within_twice_torch_error(backend, case, dtype, floor, seed):
    """Inputs in bf16/fp16: error vs the fp64 truth <= 2 x PyTorch's own error in that dtype."""
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    truth = reference(case, z1, z2, w, up)
    torch_in_dtype = reference(case, z1.to(dtype), z2.to(dtype), w, up, dtype=dtype)
    got = backend_out(backend, case, z1.to(dtype), z2.to(dtype), w, up)
    assert got[0].dtype == torch.float32
    for name, g, t, r in zip(NAMES, got, torch_in_dtype, truth):
        scale = max(r.abs().max().item(), 1e-6)
        err = (g.double() - r.double()).abs().max().item() / scale
        allowed = 2 * (t.double() - r.double()).abs().max().item() / scale + floor
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e} (seed {seed})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("soft", [False, True])
def test_low_temperature_unnormalised_features(backend, soft, seed):
    """tau = 0.05 with feature norms up to 3 (CL-ICA style distances): finite and accurate.

    Logits reach 9 / 0.05 = 180, where fp32 carries ~1e-5 absolute error per logit: the bound
    is 1e-3 relative (the regular sweep keeps 1e-4).
    """
    case = Case(23, 16, 3, soft, "slot", temperature=0.05, irm_temperature=0.05)
    z1, z2, w = make(case)
    scale = 1.0 + 2.0 * torch.rand(case.batch, 1)
    z1, z2 = z1 * scale, z2 * scale.flip(0)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    want = reference(case, z1, z2, w, up)
    got = backend_out(backend, case, z1, z2, w, up)
    for i, (name, g, r) in enumerate(zip(NAMES, got, want)):
        assert torch.isfinite(g).all(), f"{name} not finite (seed {seed})"
        err = relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        assert err < 1e-3, f"{name}: relative error {err:.3e} (seed {seed})"


def test_empty_environment_is_zero_with_zero_gradient():
    z1, z2, w = make(Case(9, 8, 2, False, "slot"))
    w[:, 1] = 0
    z1.requires_grad_()
    loss, pen = env_contrastive_loss(z1, z2, w, temperature=0.5, irm_temperature=0.5, soft=False)
    assert loss[1] == 0 and pen[1] == 0
    (g,) = torch.autograd.grad(loss[1] + pen[1], z1)
    assert torch.count_nonzero(g) == 0


def test_uniform_soft_weights_reduce_to_ntxent():
    """With equal weights the v2 soft loss is plain NT-Xent (docs/official-ipirm.md#soft-loss)."""
    z1, z2, _ = make(Case(11, 8, 1, True, "slot"))
    soft, _ = env_contrastive_loss(z1, z2, torch.full((11, 1), 0.7), temperature=0.5,
                                   irm_temperature=0.5, soft=True)
    hard, _ = env_contrastive_loss(z1, z2, torch.ones(11, 1), temperature=0.5,
                                   irm_temperature=0.5, soft=False)
    assert torch.allclose(soft, hard, rtol=1e-5)


def test_hard_mode_columns_are_independent_of_each_other():
    """Column m's result only depends on column m (no leakage between environments)."""
    z1, z2, w = make(Case(20, 8, 4, False, "slot"))
    full = env_contrastive_loss(z1, z2, w, temperature=0.5, irm_temperature=0.5, soft=False)
    for m in range(4):
        one = env_contrastive_loss(z1, z2, w[:, m:m + 1], temperature=0.5, irm_temperature=0.5,
                                   soft=False)
        assert torch.allclose(full[0][m], one[0][0]) and torch.allclose(full[1][m], one[1][0])


def test_penalty_variants_differ_as_documented():
    """scalar = (sum of slot gradients)^2 <= (#slots) * slot penalty; all finite and >= 0."""
    z1, z2, w = make(Case(16, 8, 2, False, "slot"))
    out = {p: env_contrastive_loss(z1, z2, w, temperature=0.5, irm_temperature=0.5, soft=False,
                                   penalty=p)[1] for p in PENALTIES}
    assert (out["slot"] >= 0).all() and (out["scalar"] >= 0).all()
    n_slots = 2 * w.sum(0) - 1
    assert (out["scalar"] <= n_slots * out["slot"] + 1e-6).all()
    assert not torch.allclose(out["slot"], out["scalar"])


# ---------------------------------------------------------------- input validation
GOOD = dict(temperature=0.5, irm_temperature=0.5, soft=False)


def _inputs(b=4, d=3, m=2):
    return torch.randn(b, d), torch.randn(b, d), torch.ones(b, m)


@pytest.mark.parametrize("mutate,match", [
    (lambda z1, z2, w, kw: (z1, z2[:3], w, kw), "same shape"),
    (lambda z1, z2, w, kw: (z1[0], z2[0], w, kw), "2-D"),
    (lambda z1, z2, w, kw: (z1[:0], z2[:0], w[:0], kw), "B=0"),
    (lambda z1, z2, w, kw: (z1, z2, w[:3], kw), "one row per sample"),
    (lambda z1, z2, w, kw: (z1, z2, w * 0.5, kw), "0/1 memberships"),
    (lambda z1, z2, w, kw: (z1, z2, w * 2, {**kw, "soft": True}), r"\[0, 1\]"),
    (lambda z1, z2, w, kw: (z1, z2, -w, {**kw, "soft": True}), r"\[0, 1\]"),
    (lambda z1, z2, w, kw: (z1, z2, w, {**kw, "temperature": 0.0}), "temperature"),
    (lambda z1, z2, w, kw: (z1, z2, w, {**kw, "irm_temperature": -1.0}), "irm_temperature"),
    (lambda z1, z2, w, kw: (z1, z2, w, {**kw, "temperature": float("nan")}), "temperature"),
    (lambda z1, z2, w, kw: (z1, z2, w, {**kw, "backend": "nope"}), "unknown backend"),
    (lambda z1, z2, w, kw: (z1, z2, w, {**kw, "penalty": "l2"}), "unknown penalty"),
    (lambda z1, z2, w, kw: (z1.long(), z2.long(), w, kw), "float16, bfloat16"),
    (lambda z1, z2, w, kw: (z1, z2.double(), w, kw), "same dtype"),
    (lambda z1, z2, w, kw: (z1, z2, w[:, :0], kw), "M=0"),
    (lambda z1, z2, w, kw: (z1, z2, w * float("nan"), kw), "NaN"),
])
def test_bad_input_is_a_clear_value_error(mutate, match):
    z1, z2, w, kw = mutate(*_inputs(), dict(GOOD))
    with pytest.raises(ValueError, match=match):
        env_contrastive_loss(z1, z2, w, **kw)


def test_bool_memberships_are_accepted_in_hard_mode():
    z1, z2, w = _inputs()
    a = env_contrastive_loss(z1, z2, w.bool(), **GOOD)
    b = env_contrastive_loss(z1, z2, w, **GOOD)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("options,match", [
    (dict(temperature=0.0), "temperature must be a positive finite number"),
    (dict(temperature=True), "temperature must be a positive number"),
    (dict(irm_temperature=float("inf")), "irm_temperature"),
    (dict(soft=1), "soft must be True or False"),
    (dict(penalty="l2"), "unknown penalty"),
])
def test_spec_validates_its_options_once(options, match):
    with pytest.raises(ValueError, match=match):
        EnvContrastiveSpec(**{**GOOD, **options})


def test_spec_is_frozen_and_flattens_in_the_custom_op_order():
    spec = EnvContrastiveSpec(1, 0.5, True, "split", nonorm=1)
    assert (spec.temperature, spec.nonorm) == (1.0, True)
    assert type(spec.temperature) is float and spec.scalar is False and spec.split is True
    assert spec.op_args() == (True, True, "split", 1.0, 0.5)
    assert EnvContrastiveSpec.from_op_args(*spec.op_args()) == spec
    with pytest.raises(AttributeError):
        spec.soft = False


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_argument_gives_the_keyword_result(backend):
    z1, z2, w = make(Case(9, 8, 3, True, "split", nonorm=True))
    kw = dict(temperature=0.4, irm_temperature=0.3, soft=True, penalty="split", nonorm=True)
    a = env_contrastive_loss(z1, z2, w, backend=backend, **kw)
    b = env_contrastive_loss(z1, z2, w, backend=backend, spec=EnvContrastiveSpec(**kw))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="not both"):
        env_contrastive_loss(z1, z2, w, temperature=0.4, spec=EnvContrastiveSpec(**kw))


def test_registered_backend_receives_the_spec(monkeypatch):
    from fastipirm.ops import backends
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch
    seen = []

    def impl(z1, z2, w, spec):
        seen.append(spec)
        return env_contrastive_loss_torch(z1, z2, w, spec)

    monkeypatch.setitem(backends.BACKENDS, "spy", backends.Backend("spy", ("cpu",), lambda: impl))
    env_contrastive_loss(*_inputs(), backend="spy", penalty="scalar", **GOOD)
    assert seen == [EnvContrastiveSpec(0.5, 0.5, False, "scalar")]


def test_explicit_unavailable_backend_is_an_error(monkeypatch):
    from fastipirm.ops import backends
    monkeypatch.setitem(backends.BACKENDS, "broken", backends.Backend(
        "broken", ("cpu",), lambda: (_ for _ in ()).throw(ImportError("not built"))))
    with pytest.raises(RuntimeError, match="not available here.*not built"):
        env_contrastive_loss(*_inputs(), backend="broken", **GOOD)


def test_auto_backend_falls_back_and_says_so_once(monkeypatch):
    from fastipirm.ops import backends
    monkeypatch.setitem(backends.BACKENDS, "broken", backends.Backend(
        "broken", ("cpu",), lambda: (_ for _ in ()).throw(ImportError("not built"))))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("broken", "torch"))
    monkeypatch.setattr(backends.ENV, "_warned", set())
    monkeypatch.delenv("FASTIPIRM_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back to 'torch'"):
        env_contrastive_loss(*_inputs(), **GOOD)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env_contrastive_loss(*_inputs(), **GOOD)


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTIPIRM_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        env_contrastive_loss(*_inputs(), **GOOD)


# ---------------------------------------------------------------- compile: no graph break, no sync
@pytest.mark.parametrize("soft", [False, True])
def test_torch_backend_compiles_fullgraph_with_backward(soft):
    z1, z2, w = make(Case(12, 8, 3, soft, "slot"))

    def step(a, b, c):
        loss, pen = env_contrastive_loss(a, b, c, temperature=0.5, irm_temperature=0.4,
                                         soft=soft, backend="torch")
        return loss.sum() + 0.2 * pen.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b, c = (t.clone().requires_grad_(soft or i < 2) for i, t in enumerate((z1, z2, w)))
    out = compiled(a, b, c)
    out.backward()
    a2, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = step(a2, b2, w)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.allclose(a.grad, a2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", [Case(37, 16, 3, soft, pen, temperature=0.2, nonorm=nonorm)
                                  for soft, pen, nonorm in [(False, "slot", False),
                                                            (True, "slot", False),
                                                            (True, "split", True),
                                                            (False, "scalar_split", False)]],
                         ids=str)
@pytest.mark.parametrize("elements", [1, 7 * 74])
def test_torch_backend_row_blocks_give_the_same_result(case, elements, monkeypatch, seed):
    """The torch backend streams over row blocks; 1 row and 7 rows per block change nothing."""
    from fastipirm.ops import torch_backend
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    whole = backend_out("torch", case, z1, z2, w, up)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", elements)
    assert torch_backend.chunk_rows(74) == max(1, elements // 74) < 74
    blocked = backend_out("torch", case, z1, z2, w, up)
    want = reference(case, z1, z2, w, up)
    for i, (name, a, b, r) in enumerate(zip(NAMES, whole, blocked, want)):
        floor = VALUE_FLOOR if i < 2 else GRADIENT_FLOOR
        assert relative_error(b, r, floor) < 1e-4, f"{name} (seed {seed})"
        assert relative_error(a, b, floor) < 1e-5, f"{name} (seed {seed})"
