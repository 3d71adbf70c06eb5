"""CL-ICA latent spaces (fastipirm.data.latents): supports, moments, vMF, validation, no sync."""
import math

import pytest
import torch

from fastipirm.data.latents import (
    LatentSpace,
    conditional_from_code,
    marginal_from_code,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(x, expected, se, seed, what, k=5.0):
    assert abs(x - expected) <= k * se + 1e-12, (
        f"{what}: got {x:.6g}, expected {expected:.6g} +- {k}*{se:.3g} (seed {seed})")


def _check_mean_var(x, mean, var, seed, what):
    """Sample mean/variance of the 1-D samples x against (mean, var), within 5 standard errors."""
    x = x.double()
    n = x.numel()
    m = x.mean().item()
    v = x.var().item()
    m4 = ((x - m) ** 4).mean().item()
    _close(m, mean, math.sqrt(var / n), seed, f"{what} mean")
    _close(v, var, math.sqrt(max(m4 - v * v, 1e-30) / n), seed, f"{what} variance")


def _quad_moments(logdens, lo, hi, points=400_001):
    """Mean and variance of the density exp(logdens) restricted to [lo, hi] (trapezoid rule)."""
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    w = torch.exp(logdens(x))
    z = torch.trapezoid(w, x)
    mean = torch.trapezoid(w * x, x) / z
    var = torch.trapezoid(w * (x - mean) ** 2, x) / z
    return mean.item(), var.item()


def _truncnorm_moments(c, s, a, b):
    """Closed-form mean and variance of N(c, s^2) truncated to [a, b]."""
    al, be = (a - c) / s, (b - c) / s
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    zz = cdf(be) - cdf(al)
    d = (phi(al) - phi(be)) / zz
    mean = c + s * d
    var = s * s * (1 + (al * phi(al) - be * phi(be)) / zz - d * d)
    return mean, var


# ------------------------------------------------------------------------------- supports

@pytest.mark.parametrize("dist,p", [("laplace", None), ("normal", None), ("gennorm", 3.0),
                                    ("gennorm", 1.5)])
def test_box_samples_stay_in_box(seed, dist, p):
    space = LatentSpace("box", 7, box_min=-0.5, box_max=1.5)
    g = _gen(seed)
    z = space.sample_marginal(4000, dist, 1.0, p, generator=g)
    assert z.shape == (4000, 7) and z.dtype == torch.float32
    assert z.min() >= -0.5 and z.max() <= 1.5, f"marginal left the box (seed {seed})"
    zt = space.sample_conditional(z, dist, 0.3, p, generator=g)
    assert zt.shape == z.shape and zt.dtype == z.dtype
    assert zt.min() >= -0.5 and zt.max() <= 1.5, f"conditional left the box (seed {seed})"
    assert torch.isfinite(zt).all()
    # uniform marginal too
    u = space.sample_marginal(4000, generator=g)
    assert u.min() >= -0.5 and u.max() <= 1.5


@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_sphere_samples_have_radius(seed, radius):
    space = LatentSpace("sphere", 6, radius=radius)
    g = _gen(seed)
    for dist, p in [("uniform", None), ("laplace", None), ("normal", None), ("gennorm", 4.0)]:
        z = space.sample_marginal(2000, dist, 1.0, p, generator=g, dtype=torch.float64)
        torch.testing.assert_close(z.norm(dim=1), torch.full((2000,), radius),
                                   check_dtype=False, msg=f"{dist} marginal (seed {seed})")
    for dist, p, param in [("vmf", None, 5.0), ("laplace", None, 0.1), ("normal", None, 0.1),
                           ("gennorm", 3.0, 0.1)]:
        zt = space.sample_conditional(z, dist, param, p, generator=g)
        torch.testing.assert_close(zt.norm(dim=1), torch.full((2000,), radius),
                                   check_dtype=False, msg=f"{dist} conditional (seed {seed})")
    # the non-uniform marginals are centred on radius * e_1
    z = space.sample_marginal(4000, "normal", 0.1, generator=g, dtype=torch.float64)
    assert z[:, 0].mean() > 0.9 * radius, f"seed {seed}"


def test_unbounded_untruncated(seed):
    space = LatentSpace("unbounded", 3)
    g = _gen(seed)
    z = space.sample_marginal(20000, "normal", 2.0, generator=g, dtype=torch.float64)
    _check_mean_var(z.flatten(), 0.0, 4.0, seed, "unbounded normal marginal")
    zt = space.sample_conditional(z, "laplace", 0.5, generator=g)
    _check_mean_var((zt - z).flatten(), 0.0, 2 * 0.25, seed, "unbounded laplace conditional")


# ------------------------------------------------------------------------------- moments

def test_box_uniform_moments(seed):
    a, b = -1.0, 3.0
    space = LatentSpace("box", 5, box_min=a, box_max=b)
    z = space.sample_marginal(40000, generator=_gen(seed), dtype=torch.float64)
    for k in range(5):
        _check_mean_var(z[:, k], (a + b) / 2, (b - a) ** 2 / 12, seed, f"uniform coord {k}")


# centres per coordinate: on the lower face, near it, inside, near and on the upper face
_CENTRES = [0.0, 0.02, 0.5, 0.97, 1.0]


@pytest.mark.parametrize("dist,p", [("normal", None), ("laplace", None), ("gennorm", 3.0)])
def test_box_conditional_truncated_moments(seed, dist, p):
    """Each coordinate is the 1-D law around z_k truncated to the box (official semantics)."""
    scale = 0.05
    space = LatentSpace("box", len(_CENTRES))
    z = torch.tensor(_CENTRES, dtype=torch.float64).expand(40000, -1).contiguous()
    zt = space.sample_conditional(z, dist, scale, p, generator=_gen(seed))
    assert zt.dtype == torch.float64
    for k, c in enumerate(_CENTRES):
        if dist == "normal":
            mean, var = _truncnorm_moments(c, scale, 0.0, 1.0)
        elif dist == "laplace":
            mean, var = _quad_moments(lambda x: -(x - c).abs() / scale, 0.0, 1.0)
        else:
            mean, var = _quad_moments(lambda x: -((x - c).abs() / scale) ** p, 0.0, 1.0)
        _check_mean_var(zt[:, k], mean, var, seed, f"{dist} conditional around {c}")


def test_truncnorm_closed_form_matches_quadrature():
    for c in _CENTRES:
        m1, v1 = _truncnorm_moments(c, 0.05, 0.0, 1.0)
        m2, v2 = _quad_moments(lambda x: -((x - c) / 0.05) ** 2 / 2, 0.0, 1.0)
        assert abs(m1 - m2) < 1e-8 and abs(v1 - v2) < 1e-8


@pytest.mark.parametrize("dist,p", [("normal", None), ("laplace", None), ("gennorm", 4.0)])
def test_box_marginal_truncated_moments(seed, dist, p):
    """Marginals around eta = 0 on [0, 1]^n: the law truncated at the lower face (and at 1)."""
    scale = 0.7
    space = LatentSpace("box", 4)
    z = space.sample_marginal(25000, dist, scale, p, generator=_gen(seed), dtype=torch.float64)
    if dist == "normal":
        mean, var = _truncnorm_moments(0.0, scale, 0.0, 1.0)
    elif dist == "laplace":
        mean, var = _quad_moments(lambda x: -x.abs() / scale, 0.0, 1.0)
    else:
        mean, var = _quad_moments(lambda x: -(x.abs() / scale) ** p, 0.0, 1.0)
    _check_mean_var(z.flatten(), mean, var, seed, f"{dist} marginal on the box")


def test_box_far_tail_interval(seed):
    """A box many scales away from the centre (mirrored tail inverse CDF) stays exact."""
    space = LatentSpace("box", 1, box_min=0.6, box_max=0.8)
    z = torch.zeros(40000, 1, dtype=torch.float64)
    zt = space.sample_conditional(z, "normal", 0.05, generator=_gen(seed))
    mean, var = _quad_moments(lambda x: -(x / 0.05) ** 2 / 2, 0.6, 0.8)
    _check_mean_var(zt[:, 0], mean, var, seed, "normal 12 sigma out")
    zt = space.sample_conditional(z, "laplace", 0.05, generator=_gen(seed + 1))
    mean, var = _quad_moments(lambda x: -x.abs() / 0.05, 0.6, 0.8)
    _check_mean_var(zt[:, 0], mean, var, seed, "laplace 12 scales out")


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5, 8.0])
def test_gennorm_variance(seed, p):
    scale = 0.3
    space = LatentSpace("unbounded", 4)
    z = torch.zeros(25000, 4, dtype=torch.float64)
    zt = space.sample_conditional(z, "gennorm", scale, p, generator=_gen(seed))
    var = scale ** 2 * math.gamma(3 / p) / math.gamma(1 / p)
    _check_mean_var(zt.flatten(), 0.0, var, seed, f"gennorm p={p}")


# ------------------------------------------------------------------------------- vMF

def _vmf_mean_cosine(kappa, n):
    """E[cos] of a vMF on S^{n-1}: density of theta ~ exp(kappa cos t) sin^(n-2) t on [0, pi]."""
    t = torch.linspace(0.0, math.pi, 200_001, dtype=torch.float64)
    w = torch.exp(kappa * (torch.cos(t) - 1)) * torch.sin(t) ** (n - 2)
    return (torch.trapezoid(w * torch.cos(t), t) / torch.trapezoid(w, t)).item()


def test_vmf_reference_matches_bessel_ratio_n3():
    for kappa in (1.0, 10.0):  # A_3(kappa) = coth(kappa) - 1/kappa
        assert abs(_vmf_mean_cosine(kappa, 3) - (1 / math.tanh(kappa) - 1 / kappa)) < 1e-9


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("kappa", [1.0, 10.0])
def test_vmf_mean_cosine(seed, kappa, n):
    radius = 1.5
    space = LatentSpace("sphere", n, radius=radius)
    g = _gen(seed)
    batch = 10000
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    mu = radius * mu / mu.norm()
    z = mu.expand(batch, -1).contiguous()
    zt = space.sample_conditional(z, "vmf", kappa, generator=g)
    cos = zt @ mu / radius ** 2
    expected = _vmf_mean_cosine(kappa, n)
    se = cos.std().item() / math.sqrt(batch)
    _close(cos.mean().item(), expected, se, seed, f"vMF mean cosine kappa={kappa} n={n}")
    # the orthogonal part is a uniform direction: E[z~] = radius * A_n(kappa) * mu_hat
    orth = zt - (zt @ mu / radius ** 2).unsqueeze(1) * mu
    assert orth.mean(0).norm() < 6 * radius / math.sqrt(batch), f"seed {seed}"


def test_vmf_per_row_means(seed):
    """Each row is drawn around its own z."""
    space = LatentSpace("sphere", 4)
    g = _gen(seed)
    z = space.sample_marginal(3000, generator=g, dtype=torch.float64)
    zt = space.sample_conditional(z, "vmf", 50.0, generator=g)
    cos = (zt * z).sum(1)
    _close(cos.mean().item(), _vmf_mean_cosine(50.0, 4), cos.std().item() / math.sqrt(3000),
           seed, "vMF per-row cosine")


# ------------------------------------------------------------------------------- API

def test_reproducible_with_generator(seed):
    space = LatentSpace("box", 5)
    a = space.sample_pair(100, "laplace", 0.5, "gennorm", 0.1, conditional_p=3.0,
                          generator=_gen(seed))
    b = space.sample_pair(100, "laplace", 0.5, "gennorm", 0.1, conditional_p=3.0,
                          generator=_gen(seed))
    c = space.sample_pair(100, "laplace", 0.5, "gennorm", 0.1, conditional_p=3.0,
                          generator=_gen(seed + 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    sphere = LatentSpace("sphere", 5)
    z = sphere.sample_marginal(50, generator=_gen(seed))
    assert torch.equal(sphere.sample_conditional(z, "vmf", 1.0, generator=_gen(seed)),
                       sphere.sample_conditional(z, "vmf", 1.0, generator=_gen(seed)))


def test_official_codes():
    assert marginal_from_code(0) == ("uniform", None)
    assert marginal_from_code(1) == ("laplace", None)
    assert marginal_from_code(2) == ("normal", None)
    assert marginal_from_code(3) == ("gennorm", 3.0)
    assert conditional_from_code(0) == ("vmf", None)
    assert conditional_from_code(2) == ("normal", None)
    assert conditional_from_code(5) == ("gennorm", 5.0)
    assert LatentSpace().eta().tolist() == [0.0] * 10
    assert LatentSpace("sphere", 3, radius=2.0).eta().tolist() == [2.0, 0.0, 0.0]


@pytest.mark.parametrize("kwargs,name", [
    (dict(kind="cube"), "kind"),
    (dict(n=0), "n"),
    (dict(n=2.5), "n"),
    (dict(kind="sphere", n=1), "n"),
    (dict(box_min=1.0, box_max=1.0), "box_min"),
    (dict(box_min=2.0, box_max=1.0), "box_min"),
    (dict(radius=0.0), "radius"),
    (dict(radius=float("nan")), "radius"),
])
def test_bad_space_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LatentSpace(**kwargs)


def test_bad_sampling_options():
    box, sphere, real = LatentSpace("box", 3), LatentSpace("sphere", 3), LatentSpace("unbounded", 3)
    z = torch.rand(4, 3)
    cases = [
        (lambda: box.sample_conditional(z, "vmf", 1.0), "vmf"),
        (lambda: real.sample_conditional(z, "vmf", 1.0), "vmf"),
        (lambda: real.sample_marginal(4, "uniform"), "uniform"),
        (lambda: box.sample_marginal(4, "cauchy"), "dist"),
        (lambda: box.sample_conditional(z, "uniform", 0.1), "dist"),
        (lambda: box.sample_conditional(z, "gennorm", 0.1, 0.5), "p"),
        (lambda: box.sample_conditional(z, "gennorm", 0.1), "p"),
        (lambda: box.sample_conditional(z, "normal", 0.1, 3.0), "p"),
        (lambda: box.sample_conditional(z, "normal", 0.0), "param"),
        (lambda: box.sample_conditional(z, "laplace", -1.0), "param"),
        (lambda: sphere.sample_conditional(z, "vmf", 0.0), "param"),
        (lambda: box.sample_conditional(z, "normal", torch.tensor(0.1)), "param"),
        (lambda: box.sample_conditional(z[:, :2], "normal", 0.1), "z"),
        (lambda: box.sample_conditional(z[0], "normal", 0.1), "z"),
        (lambda: box.sample_conditional(z.long(), "normal", 0.1), "z"),
        (lambda: box.sample_marginal(0), "batch"),
        (lambda: LatentSpace("box", 3, 5.0, 6.0).sample_marginal(4, "normal", 0.05), "param"),
        (lambda: marginal_from_code("2"), "m_p"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def test_no_host_sync(seed, monkeypatch):
    """No .item()/bool()/float() on tensors while sampling (a GPU would sync on each)."""
    def boom(*args, **kwargs):
        raise AssertionError("host sync while sampling")

    box = LatentSpace("box", 6)
    sphere = LatentSpace("sphere", 6, radius=2.0)
    g = _gen(seed)
    zb = box.sample_marginal(256, generator=g)
    zs = sphere.sample_marginal(256, generator=g)
    for attr in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    for dist, p in [("normal", None), ("laplace", None), ("gennorm", 3.0)]:
        box.sample_conditional(zb, dist, 0.05, p, generator=g)
        box.sample_marginal(64, dist, 1.0, p, generator=g)
        sphere.sample_conditional(zs, dist, 0.05, p, generator=g)
    sphere.sample_conditional(zs, "vmf", 1.0, generator=g)
    box.sample_pair(64, generator=g)
    monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_cuda(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    box, sphere = LatentSpace("box", 10), LatentSpace("sphere", 10)
    zb = box.sample_marginal(6144, generator=g)
    zs = sphere.sample_marginal(6144, generator=g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dist, p in [("normal", None), ("laplace", None), ("gennorm", 3.0)]:
            out = box.sample_conditional(zb, dist, 0.05, p, generator=g)
            sphere.sample_conditional(zs, dist, 0.05, p, generator=g)
        vm = sphere.sample_conditional(zs, "vmf", 1.0, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.device.type == "cuda" and vm.device.type == "cuda"
    assert out.min() >= 0 and out.max() <= 1, f"seed {seed}"
