"""CL-ICA MLP experiment: the frozen invertible mixing g (fastipirm.data.mixing) and the MLP
encoder f (fastipirm.models.mlp_encoder). Random-seed tests take the ``seed`` fixture (fresh per
run; ``FASTIPIRM_TEST_SEED`` replays one) and print it in their messages."""
import time

import pytest
import torch
from torch import nn

from fastipirm.data.mixing import (ACTIVATIONS, InvertibleMLPMixing, SmoothLeakyReLU,
                                   build_mixing, condition_lower_bound, condition_numbers,
                                   condition_threshold, draw_normalised_matrices,
                                   select_conditioned_matrices)
from fastipirm.models.mlp_encoder import MLP_ARCHS, OUTPUT_NORMS, BoxNorm, MLPEncoder, SphereNorm


def gen(s):
    return torch.Generator().manual_seed(s)


def plain_loop_mixing(n, n_layers, cond_samples, ratio, s):
    """The official algorithm one matrix at a time (on torch's generator instead of numpy)."""
    g = gen(s)

    def draw():
        a = torch.rand(n, n, generator=g, dtype=torch.float64) * 2.0 - 1.0
        a = a / torch.linalg.vector_norm(a, dim=0, keepdim=True)
        sv = torch.linalg.svdvals(a)
        return a, float(sv[0] / sv[-1])

    conds = sorted(draw()[1] for _ in range(cond_samples))
    thresh = conds[int(cond_samples * ratio)]
    weights = []
    for _ in range(n_layers):
        c = thresh + 1
        while c > thresh:
            a, c = draw()
        weights.append(a)
    return thresh, weights


def small(seed, n=5, **kw):
    kw.setdefault("cond_samples", 100)
    return build_mixing(n, generator=gen(seed), **kw)


# ---------------------------------------------------------------- mixing g

@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_vectorised_equals_plain_loop(seed, ratio):
    n, layers, samples = 4, 3, 100
    thresh, weights = plain_loop_mixing(n, layers, samples, ratio, seed)
    for chunk in (3, 64, 8192):
        g = build_mixing(n, layers, cond_samples=samples, cond_thresh_ratio=ratio,
                         generator=gen(seed), dtype=torch.float64, chunk=chunk)
        msg = f"seed={seed} chunk={chunk} ratio={ratio}"
        assert g.cond_threshold == thresh, msg
        for lin, w in zip(g[::2], weights):
            assert torch.equal(lin.weight, w), msg


def test_prefilter_changes_nothing(seed):
    n = 6
    thresh = condition_threshold(n, 300, 0.0, gen(seed))
    a = select_conditioned_matrices(n, 3, thresh, gen(seed), chunk=500, prefilter=True)
    b = select_conditioned_matrices(n, 3, thresh, gen(seed), chunk=500, prefilter=False)
    assert a[1] == b[1], f"seed={seed}"
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])), f"seed={seed}"


def test_condition_lower_bound_is_a_lower_bound(seed):
    for n in (1, 2, 5, 10):
        m = draw_normalised_matrices(5000, n, gen(seed))
        lb, c = condition_lower_bound(m), condition_numbers(m)
        assert bool((lb <= c * (1 + 1e-9)).all()), f"seed={seed} n={n}"
    sing = torch.ones(1, 3, 3) / 3 ** 0.5
    assert condition_lower_bound(sing.double()).isinf().all()


def test_threshold_is_pool_minimum_and_quantile(seed):
    n, samples = 5, 400
    conds = condition_numbers(draw_normalised_matrices(samples, n, gen(seed)))
    assert condition_threshold(n, samples, 0.0, gen(seed), chunk=33) == float(conds.min())
    srt = torch.sort(conds).values
    assert condition_threshold(n, samples, 0.25, gen(seed)) == float(srt[100]), f"seed={seed}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_layers_conditioned_unit_columns_frozen(seed, dtype, tol):
    g = small(seed, n=7, dtype=dtype)
    msg = f"seed={seed}"
    assert isinstance(g, InvertibleMLPMixing) and len(g) == 5, msg
    assert [type(m) for m in g] == [nn.Linear, nn.LeakyReLU] * 2 + [nn.Linear], msg
    assert all(m.negative_slope == 0.2 for m in g[1::2]), msg
    assert len(g.condition_numbers) == 3, msg
    for lin, c in zip(g[::2], g.condition_numbers):
        assert lin.bias is None and lin.weight.dtype == dtype, msg
        assert c <= g.cond_threshold, msg
        w = lin.weight.double()
        assert float(condition_numbers(w)) <= g.cond_threshold * (1 + tol), msg
        # columns (axis 0 of the (out, in) weight) have unit L2 norm
        torch.testing.assert_close(torch.linalg.vector_norm(w, dim=0),
                                   torch.ones(7, dtype=torch.float64), atol=tol, rtol=0, msg=msg)
    assert all(not p.requires_grad for p in g.parameters()), msg
    z = torch.rand(64, 7, dtype=dtype, requires_grad=True)
    g(z).sum().backward()
    assert z.grad is not None and all(p.grad is None for p in g.parameters()), msg


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "smooth_leaky_relu", "softplus"])
def test_mixing_is_invertible(seed, act):
    g = small(seed, n=6, activation=act, dtype=torch.float64)
    z = torch.rand(2048, 6, generator=gen(seed + 1), dtype=torch.float64)  # box [0, 1]^n
    z = torch.cat([z, torch.randn(512, 6, generator=gen(seed + 2), dtype=torch.float64) * 3])
    x = g(z)
    torch.testing.assert_close(g.inverse(x), z, atol=1e-5, rtol=0, msg=f"seed={seed} act={act}")
    if act == "leaky_relu":  # the default float32 module, inverted in float64
        g32 = small(seed, n=6)
        x32 = g32(z.float()).double()
        torch.testing.assert_close(g32.inverse(x32), z, atol=1e-4, rtol=0, msg=f"seed={seed}")


def test_relu_mixing_not_invertible(seed):
    g = small(seed, n=3, activation="relu")
    assert isinstance(g[1], nn.ReLU)
    with pytest.raises(ValueError, match="not invertible"):
        g.inverse(torch.randn(4, 3))


def test_activation_definitions():
    x = torch.linspace(-30, 30, 601, dtype=torch.float64)
    sl = SmoothLeakyReLU(0.2)
    ref = 0.2 * x + 0.8 * torch.log(1 + torch.exp(x))  # official definition
    torch.testing.assert_close(sl(x), ref)
    for act, cls in [("elu", nn.ELU), ("softplus", nn.Softplus),
                     ("smooth_leaky_relu", SmoothLeakyReLU)]:
        g = build_mixing(2, 2, act, cond_samples=10, generator=gen(0))
        assert isinstance(g[1], cls)
    g = build_mixing(2, 2, "elu", cond_samples=10, generator=gen(0))
    assert g[1].alpha == 1.0
    g = build_mixing(2, 2, "softplus", cond_samples=10, generator=gen(0))
    assert g[1].beta == 1
    g = build_mixing(2, 1, cond_samples=10, generator=gen(0))
    assert len(g) == 1 and isinstance(g[0], nn.Linear)


def test_deterministic_per_seed(seed):
    a, b = small(seed), small(seed)
    c = small(seed + 1)
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), f"seed={seed}"
    assert list(a.state_dict()) == ["0.weight", "2.weight", "4.weight"]
    assert not torch.equal(a[0].weight, c[0].weight), f"seed={seed}"
    assert a.cond_threshold == b.cond_threshold
    # generator=None draws a fresh seed
    assert not torch.equal(build_mixing(4, cond_samples=20)[0].weight,
                           build_mixing(4, cond_samples=20)[0].weight)


@pytest.mark.parametrize("kw,name", [
    (dict(activation="tanh"), "activation"), (dict(n=0), "n"), (dict(n=2.0), "n"),
    (dict(n_layers=0), "n_layers"), (dict(cond_samples=0), "cond_samples"),
    (dict(cond_thresh_ratio=1.0), "cond_thresh_ratio"),
    (dict(cond_thresh_ratio=-0.1), "cond_thresh_ratio"), (dict(slope=0.0), "slope"),
    (dict(chunk=0), "chunk"), (dict(dtype=torch.float16), "dtype"),
    (dict(generator=0), "generator")])
def test_mixing_bad_options(kw, name):
    args = dict(n=3, cond_samples=10)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        build_mixing(**args)


def test_unknown_activation_names_the_options():
    with pytest.raises(ValueError) as e:
        build_mixing(3, activation="tanh")
    assert all(a in str(e.value) for a in ACTIVATIONS)


def test_condition_search_timing():
    """n=10, 25,000 pool matrices, 3 layers (the official setting). Fixed seed on purpose: the
    number of re-draws is heavy-tailed (a layer needs > k*N draws with probability ~N/(N+k),
    unbounded mean), so a random seed would make any time limit flaky."""
    t = time.perf_counter()
    g = build_mixing(10, generator=gen(0))
    dt = time.perf_counter() - t
    assert dt < 20.0, f"condition search took {dt:.1f} s"
    assert len(g.condition_numbers) == 3 and max(g.condition_numbers) <= g.cond_threshold


# ---------------------------------------------------------------- encoder f

def test_encoder_layout_n10():
    assert MLP_ARCHS == ("clica_mlp",)
    f = MLPEncoder(10)
    assert f.layer_sizes == (100, 500, 500, 500, 500, 100, 10)
    assert [type(m) for m in f] == [nn.Linear, nn.LeakyReLU] * 6 + [nn.Linear]
    assert all(m.negative_slope == 0.01 for m in f if isinstance(m, nn.LeakyReLU))
    assert all(m.bias is not None for m in f if isinstance(m, nn.Linear))
    assert f[0].in_features == 10
    assert f(torch.randn(3, 10)).shape == (3, 10)
    # the official nn.Sequential's keys
    assert list(f.state_dict())[:2] == ["0.weight", "0.bias"]
    assert list(f.state_dict())[-2:] == ["12.weight", "12.bias"]
    assert MLPEncoder(5, (2, 3), n_out=4).layer_sizes == (10, 15, 4)


def test_output_norms(seed):
    msg = f"seed={seed}"
    n = 4
    x = torch.randn(256, n) * 5
    base = MLPEncoder(n, (3, 3))
    raw = base(x)

    f = MLPEncoder(n, (3, 3), "fixed_sphere")
    f.load_state_dict(base.state_dict())
    assert isinstance(f[-1], SphereNorm) and len(list(f.parameters())) == 6
    y = f(x)
    torch.testing.assert_close(torch.linalg.vector_norm(y, dim=-1), torch.ones(256), msg=msg)
    torch.testing.assert_close(y, raw / raw.norm(dim=-1, keepdim=True), msg=msg)
    y2 = MLPEncoder(n, (3, 3), "fixed_sphere", init_radius=2.5)(x)
    torch.testing.assert_close(y2.norm(dim=-1), torch.full((256,), 2.5), msg=msg)

    f = MLPEncoder(n, (3, 3), "learnable_sphere")
    assert isinstance(f[-1].r, nn.Parameter) and float(f[-1].r.detach()) == 1.0
    with torch.no_grad():
        f[-1].r.fill_(3.0)
    y = f(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((256,), 3.0), msg=msg)
    y.pow(2).sum().backward()
    assert f[-1].r.grad is not None and float(f[-1].r.grad.abs()) > 0, msg
    assert "13.r" not in MLPEncoder(n, (3, 3, 3, 3, 3, 3), "fixed_sphere").state_dict()
    assert "13.r" in MLPEncoder(n, (3, 3, 3, 3, 3, 3), "learnable_sphere").state_dict()

    for name in ("learnable_box", "box"):
        f = MLPEncoder(n, (3, 3), name)
        f.load_state_dict(base.state_dict(), strict=False)
        assert f.output_norm == "learnable_box" and isinstance(f[-1], BoxNorm)
        b = f[-1].max_abs_bound
        assert isinstance(b, nn.Parameter) and torch.equal(b.detach(), torch.ones(n))
        y = f(x)
        torch.testing.assert_close(y, torch.sigmoid(raw), msg=msg)
        with torch.no_grad():
            b.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
        y = f(x)
        assert bool((y >= 0).all() and (y <= b.detach()).all()), msg
        y.sum().backward()
        assert b.grad is not None and bool((b.grad > 0).all()), msg
    f = MLPEncoder(n, (3, 3), "fixed_box", init_bound=2.0)
    assert len(list(f.parameters())) == 6
    y = f(x)
    assert bool((y >= 0).all() and (y <= 2.0).all()), msg
    assert MLPEncoder(n, (3, 3), None).output_norm == "none"
    assert len(MLPEncoder(n, (3, 3), "none")) == 5


@pytest.mark.parametrize("kw,name", [
    (dict(output_norm="unit"), "output_norm"), (dict(n=0), "n"), (dict(n="3"), "n"),
    (dict(hidden_multipliers=(10, 0)), "hidden_multipliers"), (dict(n_out=0), "n_out"),
    (dict(negative_slope=-1.0), "negative_slope"),
    (dict(output_norm="learnable_sphere", init_radius=0.0), "init_radius"),
    (dict(output_norm="box", init_bound=-1.0), "init_bound")])
def test_encoder_bad_options(kw, name):
    args = dict(n=3)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        MLPEncoder(**args)
    with pytest.raises(ValueError) as e:
        MLPEncoder(3, output_norm="unit")
    assert all(o in str(e.value) for o in OUTPUT_NORMS)


def test_slices_are_plain_sequentials():
    g = build_mixing(3, cond_samples=10, generator=gen(0))
    assert type(g[::2]) is nn.Sequential and len(g[::2]) == 3
    f = MLPEncoder(3, (2, 2), "box")
    assert type(f[:-1]) is nn.Sequential and len(f[:-1]) == 5
