"""The C++ CPU backend: built where it should be, deterministic, compiles, registered correctly.

Its agreement with the reference is part of the sweep in test_ops.py (every available backend).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastipirm.check import relative_error
from fastipirm.ops import available_backends, backend_report, env_contrastive_loss

HAVE_CPU = "cpu" in available_backends("cpu")
needs_ext = pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")


@pytest.mark.skipif(os.environ.get("CI", "") != "true", reason="only CI must have the extension")
def test_ci_built_the_extension():
    assert HAVE_CPU, dict((n, d) for n, _, d in backend_report())


def _inputs(b=45, d=32, m=5, soft=True):
    z1 = F.normalize(torch.randn(b, d), dim=1)
    z2 = F.normalize(torch.randn(b, d), dim=1)
    w = torch.rand(b, m) if soft else (torch.rand(b, m) < 0.5).float()
    return z1, z2, w


def _run(z1, z2, w, soft, penalty="slot"):
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    c = w.clone().requires_grad_(soft)
    loss, pen = env_contrastive_loss(a, b, c, temperature=0.5, irm_temperature=0.3, soft=soft,
                                     backend="cpu", penalty=penalty)
    (loss.sum() + pen.sum()).backward()
    return [loss, pen, a.grad, b.grad] + ([c.grad] if soft else [])


@needs_ext
@pytest.mark.parametrize("soft,penalty", [(False, "slot"), (True, "slot"), (True, "split")])
def test_deterministic_bitwise(soft, penalty):
    z1, z2, w = _inputs(soft=soft)
    first, second = _run(z1, z2, w, soft, penalty), _run(z1, z2, w, soft, penalty)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@needs_ext
def test_agrees_with_torch_backend_across_thread_counts():
    z1, z2, w = _inputs()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(z1, z2, w, True)
    finally:
        torch.set_num_threads(threads)
    many = _run(z1, z2, w, True)
    for x, y in zip(one, many):   # only the summation order differs
        assert relative_error(x, y, 1e-3) < 1e-5


@needs_ext
def test_opcheck_and_fullgraph_compile():
    from fastipirm.ops.backends import BACKENDS
    backend = BACKENDS["cpu"].load()
    z1, z2, w = _inputs(b=9, d=8, m=3)
    torch.library.opcheck(backend.forward_op, (z1.requires_grad_(), z2.requires_grad_(),
                                               w.requires_grad_(), True, False, "slot", 0.5, 0.5))

    def step(a, b, c):
        loss, pen = env_contrastive_loss(a, b, c, temperature=0.5, irm_temperature=0.5,
                                         soft=False, backend="cpu", check_values=False)
        return loss.mean() + 0.2 * pen.mean()

    hard = (torch.rand(9, 3) < 0.5).float()
    a = z1.detach().clone().requires_grad_()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(a, z2.detach(), hard)
    out.backward()
    a2 = z1.detach().clone().requires_grad_()
    ref = step(a2, z2.detach(), hard)
    ref.backward()
    assert torch.allclose(out, ref) and torch.allclose(a.grad, a2.grad, atol=1e-6)


@needs_ext
def test_kernels_reject_bad_input():
    ext = torch.ops.fastipirm_ext
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.rowstats(torch.randn(4, 3).t(), torch.ones(3), torch.ones(3, 1), 2, 0.5, 0.5, False,
                     torch.empty(0))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.rowstats(torch.randn(4, 3).half(), torch.ones(4).half(), torch.ones(4, 1).half(), 2,
                     0.5, 0.5, False, torch.empty(0))
    with pytest.raises(RuntimeError, match="2 \\* batch"):
        ext.rowstats(torch.randn(4, 3), torch.ones(4), torch.ones(4, 1), 3, 0.5, 0.5, False,
                     torch.empty(0))
    with pytest.raises(RuntimeError, match="similarity cache"):
        ext.rowstats(torch.randn(4, 3), torch.ones(4), torch.ones(4, 1), 2, 0.5, 0.5, False,
                     torch.empty(1, 8, 8))
    with pytest.raises(RuntimeError, match="similarity cache"):
        ext.rowstats(torch.randn(4, 3), torch.ones(4), torch.ones(4, 1), 2, 0.5, 0.5, False,
                     torch.empty(1, 64, 64, dtype=torch.float64))


@needs_ext
@pytest.mark.parametrize("soft,penalty,temps", [(False, "slot", (0.5, 0.5)),
                                                (True, "split", (0.5, 0.3)),
                                                (True, "scalar", (0.2, 0.2))])
def test_sim_cache_is_bitwise_invisible(soft, penalty, temps):
    """No cache, a cache holding some of the tile pairs and one holding all of them give bitwise
    equal losses and gradients (cached tiles are the tiles the kernels would recompute)."""
    from fastipirm.ops.cpu_backend import SIM_TILE, CpuKernels, sim_cache_tiles
    from fastipirm.ops.fused import fused_eager

    z1, z2, w = _inputs(b=150, d=24, m=4, soft=soft)       # N = 300: 5 row tiles, 15 pairs
    tile_mb = SIM_TILE * SIM_TILE * 4 / 2**20
    assert sim_cache_tiles(300, 4, 6 * tile_mb) == 6 and sim_cache_tiles(300, 4, 1e3) == 15
    results = []
    for budget in (0.0, 6 * tile_mb, 1e3):
        kern = CpuKernels(cache_mb=budget)
        assert (kern.sim_cache(torch.empty(300, 24)) is None) == (budget == 0)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        c = w.clone().requires_grad_(soft)
        loss, pen = fused_eager(kern, a, b, c, temperature=temps[0], irm_temperature=temps[1],
                                soft=soft, penalty=penalty)
        (loss.sum() + 0.3 * pen.sum()).backward()
        results.append([loss, pen, a.grad, b.grad] + ([c.grad] if soft else []))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_sim_cache_budget_from_environment(monkeypatch):
    from fastipirm.ops.cpu_backend import (CACHE_ENV, DEFAULT_CACHE_MB, CpuKernels,
                                           sim_cache_budget_mb, sim_cache_tiles)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert sim_cache_budget_mb() == DEFAULT_CACHE_MB
    assert sim_cache_tiles(2048, 4, DEFAULT_CACHE_MB) == 32 * 33 // 2   # 2B=2048 fits (8.6 MiB)
    assert sim_cache_tiles(100_000, 4, DEFAULT_CACHE_MB) == 128 * 2**20 // (64 * 64 * 4)
    monkeypatch.setenv(CACHE_ENV, "0")
    assert CpuKernels().sim_cache(torch.empty(200, 8)) is None
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=CACHE_ENV):
        sim_cache_budget_mb()
    monkeypatch.setenv(CACHE_ENV, "-1")
    with pytest.raises(ValueError, match=">= 0"):
        sim_cache_budget_mb()
    with pytest.raises(ValueError, match="cache_mb"):
        CpuKernels(cache_mb=-2)


@needs_ext
def test_long_vector_at_low_temperature():
    """One feature 30x longer than the rest at T = 0.05: logits span thousands of temperatures;
    the online row max keeps every row's sums in range (a shift from a norm bound would
    underflow them all), so the result matches the float64 torch backend."""
    z1 = torch.randn(40, 16)
    z2 = z1 + 0.1 * torch.randn(40, 16)
    z1[0] *= 30.0                      # one long vector: every other row's bound is loose
    w = torch.rand(40, 3)
    kw = dict(temperature=0.05, irm_temperature=0.05, soft=True)
    loss, pen = env_contrastive_loss(z1, z2, w, backend="cpu", **kw)
    ref_loss, ref_pen = env_contrastive_loss(z1.double(), z2.double(), w.double(),
                                             backend="torch", **kw)
    assert relative_error(loss.double(), ref_loss, 1e-3) < 1e-4
    assert relative_error(pen.double(), ref_pen, 1e-3) < 1e-4
