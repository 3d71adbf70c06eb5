"""Throughput regression gates.

* CPU (runs in CI): the C++ ``"cpu"`` backend against the ``"torch"`` backend, forward + backward
  interleaved in one process (``bench.cpu_ratio.interleaved_rounds``) at the shape and thread
  count of ``bench.targets.CPU_RATIO``; fails when ``time(torch) / time(cpu)`` falls under its
  ``min``.
* GPU (``pytest -m gpu_perf``; skipped without CUDA or without a baseline for this GPU): quick
  ``kernels`` (2B=8192, M=16), ``step`` (ResNet-50, P=8) and ``maximize`` (fastipirm only,
  N=105,000) runs compared with ``bench/baselines/<gpu>.json`` by ``bench.baselines.compare``
  (a figure 10% worse than accepted, or a missed target, fails).
"""
import argparse
import os
import statistics

import pytest
import torch

from bench import baselines, cpu_ratio, targets
from fastipirm.ops import available_backends, backend_report

ROUNDS, MIN_ROUNDS, BUDGET_S = 7, 3, 5.0    # per mode: at most 7 rounds, fewer after 5 s


# ---------------------------------------------------------------------------------------------
# CPU: the C++ backend may not get slower than its target allows


def _cpu_ratio_spec() -> dict:
    return targets.CPU_RATIO


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
            # 1 warm-up round, then interleaved rounds; a loaded machine: fewer, same median
            rounds = cpu_ratio.interleaved_rounds(b, d, m, soft=soft, rounds=ROUNDS,
                                                  budget_s=BUDGET_S, min_rounds=MIN_ROUNDS,
                                                  generator=gen)
            med = {k: statistics.median(r[k] for r in rounds) / 1e3 for k in ("torch", "cpu")}
            ratios["soft" if soft else "hard"] = (med["torch"] / med["cpu"], med)
    finally:
        torch.set_num_threads(threads)
    bad = {mode: r for mode, r in ratios.items() if r[0] < spec["min"]}
    assert not bad, (
        f"C++ 'cpu' backend too slow at B={b}, D={d}, M={m} ({used} threads): "
        + "; ".join(f"{mode}: torch {med['torch'] * 1e3:.1f} ms / cpu {med['cpu'] * 1e3:.1f} ms = "
                    f"{ratio:.2f} < min {spec['min']}" for mode, (ratio, med) in bad.items())
        + " (bench/targets.py CPU_RATIO)")


# ---------------------------------------------------------------------------------------------
# GPU: quick runs against this GPU's accepted figures


@pytest.fixture
def gpu_baseline():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = baselines.baseline_path()
    if not path.exists():
        pytest.skip(f"no baseline for {torch.cuda.get_device_name(0)}: {path} does not exist "
                    f"(write it with 'python -m bench all --accept' on this GPU)")
    return baselines.load_baseline(path)


def _args(module, argv):
    ap = argparse.ArgumentParser(conflict_handler="resolve")
    module.add_arguments(ap)
    return ap.parse_args(argv)


@pytest.mark.gpu_perf
def test_kernels_against_baseline(gpu_baseline):
    from bench import kernels

    record = kernels.run(_args(kernels, ["--n", "8192", "--envs", "16", "--repeats", "10"]))
    failed = [f"{r['impl']} {r['mode']}: {r['status']}" for r in record["rows"]
              if r["status"] != "ok" and not r["status"].startswith("skipped")]
    assert not failed, failed
    failures = baselines.compare(record, gpu_baseline)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu_perf
def test_step_against_baseline(gpu_baseline):
    from bench import step

    record = step.run(_args(step, ["--archs", "resnet50", "--partitions", "8",
                                   "--repeats", "5"]))
    errors = [f"{r['variant']}: {r['error']}" for r in record["rows"] if r.get("error")]
    assert not errors, errors
    failures = baselines.compare(record, gpu_baseline)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu_perf
def test_maximize_against_baseline(gpu_baseline):
    from bench import maximize

    record = maximize.run(_args(maximize, ["--skip", "official"]))     # N = 105,000, fastipirm
    failures = baselines.compare(record, gpu_baseline)
    assert not failures, "\n".join(failures)
