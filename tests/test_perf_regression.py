"""Throughput regression gates.

* CPU (runs in CI): the C++ ``"cpu"`` backend against the ``"torch"`` backend, forward + backward
  in one process at the shape of ``bench/baselines/cpu.json``; fails when
  ``time(torch) / time(cpu)`` falls under the file's ``min``.
* GPU (``pytest -m gpu_perf``; skipped without CUDA or without a baseline for this GPU): quick
  ``kernels`` (2B=8192, M=16), ``step`` (ResNet-50, P=8) and ``maximize`` (fastipirm only,
  N=105,000) runs compared with ``bench/baselines/<gpu>.json`` by ``bench.baselines.compare``
  (a figure 10% worse than accepted, or a missed target, fails).
"""
import argparse
import json
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from fastipirm.cli import _import_bench
from fastipirm.ops import available_backends, backend_report, env_contrastive_loss

baselines = _import_bench("baselines")      # bench/ is the repository's, not installed

CPU_RATIOS = baselines.BASELINES / "cpu.json"
ROUNDS, MIN_ROUNDS, BUDGET_S = 7, 3, 5.0    # per mode: at most 7 rounds, fewer after 5 s


# ---------------------------------------------------------------------------------------------
# CPU: the C++ backend may not get slower than the file allows


def _cpu_ratio_spec() -> dict:
    return json.loads(CPU_RATIOS.read_text())["ratios"]["cpu_over_torch_fwd_bwd"]


def _fwd_bwd(backend, inputs, soft):
    z1, z2, w, up_loss, up_pen = inputs
    z1.grad = z2.grad = w.grad = None
    t0 = time.perf_counter()
    loss, pen = env_contrastive_loss(z1, z2, w, temperature=0.5, irm_temperature=0.5, soft=soft,
                                     backend=backend, check_values=False)
    torch.autograd.backward([loss, pen], [up_loss, up_pen])
    return time.perf_counter() - t0


def test_cpu_ratio_file_is_well_formed():
    spec = _cpu_ratio_spec()
    assert isinstance(spec["min"], (int, float)) and spec["min"] > 0
    assert {"batch", "dim", "envs"} <= set(spec["shape"])


def test_cpu_backend_speed_ratio_against_torch():
    if "cpu" not in available_backends("cpu"):
        reason = dict((n, d) for n, _, d in backend_report())["cpu"]
        if os.environ.get("CI", "") == "true":
            pytest.fail(f"CI must build the C++ extension: {reason}")
        pytest.skip(f"the 'cpu' backend (C++ extension) is not available: {reason}")
    spec = _cpu_ratio_spec()
    shape = spec["shape"]
    b, d, m = shape["batch"], shape["dim"], shape["envs"]
    threads = torch.get_num_threads()
    # one thread each: the ratio of per-core efficiency, which a busy CI machine does not distort
    # the way it distorts OpenMP teams waiting for a preempted thread (the 2-thread figures are
    # in bench/results/)
    used = int(spec.get("threads", 1))
    torch.set_num_threads(used)
    gen = torch.Generator().manual_seed(0)
    try:
        ratios = {}
        for soft in (False, True):
            z1 = F.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
            z2 = F.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
            w = (torch.rand(b, m, generator=gen) if soft
                 else (torch.rand(b, m, generator=gen) < 0.5).float()).requires_grad_(soft)
            inputs = (z1, z2, w, torch.randn(m, generator=gen), torch.randn(m, generator=gen))
            times = {"torch": [], "cpu": []}
            started = time.perf_counter()
            for i in range(1 + ROUNDS):         # 1 warm-up round, then interleaved rounds
                if i > MIN_ROUNDS and time.perf_counter() - started > BUDGET_S:
                    break                       # a loaded machine: fewer rounds, same median
                for backend in ("torch", "cpu") if i % 2 else ("cpu", "torch"):
                    dt = _fwd_bwd(backend, inputs, soft)
                    if i >= 1:
                        times[backend].append(dt)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios["soft" if soft else "hard"] = (med["torch"] / med["cpu"], med)
    finally:
        torch.set_num_threads(threads)
    bad = {mode: r for mode, r in ratios.items() if r[0] < spec["min"]}
    assert not bad, (
        f"C++ 'cpu' backend too slow at B={b}, D={d}, M={m} ({used} threads): "
        + "; ".join(f"{mode}: torch {med['torch'] * 1e3:.1f} ms / cpu {med['cpu'] * 1e3:.1f} ms = "
                    f"{ratio:.2f} < min {spec['min']}" for mode, (ratio, med) in bad.items())
        + " (bench/baselines/cpu.json)")


# ---------------------------------------------------------------------------------------------
# GPU: quick runs against this GPU's accepted figures


@pytest.fixture
def gpu_baseline():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = baselines.baseline_path()
    if not path.exists():
        pytest.skip(f"no baseline for {torch.cuda.get_device_name(0)}: {path} does not exist "
                    f"(write it with 'fastipirm bench all --accept' on this GPU)")
    return baselines.load_baseline(path)


def _args(module, argv):
    ap = argparse.ArgumentParser(conflict_handler="resolve")
    module.add_arguments(ap)
    return ap.parse_args(argv)


@pytest.mark.gpu_perf
def test_kernels_against_baseline(gpu_baseline):
    kernels = _import_bench("kernels")

    record = kernels.run(_args(kernels, ["--n", "8192", "--envs", "16", "--repeats", "10"]))
    failed = [f"{r['impl']} {r['mode']}: {r['status']}" for r in record["rows"]
              if r["status"] != "ok" and not r["status"].startswith("skipped")]
    assert not failed, failed
    failures = baselines.compare(record, gpu_baseline)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu_perf
def test_step_against_baseline(gpu_baseline):
    step = _import_bench("step")

    record = step.run(_args(step, ["--archs", "resnet50", "--partitions", "8",
                                   "--repeats", "5"]))
    errors = [f"{r['variant']}: {r['error']}" for r in record["rows"] if r.get("error")]
    assert not errors, errors
    failures = baselines.compare(record, gpu_baseline)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu_perf
def test_maximize_against_baseline(gpu_baseline):
    maximize = _import_bench("maximize")

    record = maximize.run(_args(maximize, ["--skip", "official"]))     # N = 105,000, fastipirm
    failures = baselines.compare(record, gpu_baseline)
    assert not failures, "\n".join(failures)
