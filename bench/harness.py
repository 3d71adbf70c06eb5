"""Shared pieces of the benchmarks: timing, devices, the environment record and where results go.

Every benchmark writes one JSON record to ``bench/results/`` holding what it measured and where:
date (UTC), exact command, host (CPU, GPU name, driver), library versions and git commit.

Every benchmark module ``bench.<name>`` has the same interface, which ``python -m bench <name>``
(:mod:`bench.cli`) drives: ``add_arguments(ap)``, ``run(args) -> record`` (a dict with at least
``benchmark`` and ``rows``; not saved) and ``format_table(record) -> str``. A module may also
define ``figures(record) -> {key: {"value": float, "higher_is_better": bool}}``, the numbers of
its record that ``bench.baselines`` compares between runs and ``bench.targets`` bounds.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return out + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """The command line of this process, quoted for a shell; ``python -m <module>`` for modules
    of the repository and ``fastipirm`` for the console script."""
    import shlex

    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    root = Path(__file__).resolve().parent.parent
    try:
        rel = argv0.resolve().relative_to(root)
    except (ValueError, OSError):
        rel = None
    if rel is not None and rel.suffix == ".py":
        parts = list(rel.with_suffix("").parts)
        head = ["python", "-m", ".".join(parts[:-1] if parts[-1] == "__main__" else parts)]
    elif argv0.name == "fastipirm":
        head = ["fastipirm"]
    else:
        head = [os.path.basename(sys.executable), str(argv0)]
    return shlex.join(head + sys.argv[1:])


def environment() -> dict:
    """Host, accelerator and versions of everything that affects a measurement."""
    import torch

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
        "host": {"machine": platform.machine(), "processor": platform.processor() or "unknown",
                 "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "cuda": torch.version.cuda}
        try:
            env["gpu"]["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            env["gpu"]["driver"] = "unknown"
    for name in ("triton", "nvidia.dali", "numpy", "PIL"):
        try:
            module = __import__(name, fromlist=["__version__"])
            env["versions"][name] = getattr(module, "__version__", "unknown")
        except ImportError:
            pass
    return env


def slug(text: str) -> str:
    """Lower-case file-name form of ``text``: runs of other characters become one ``-``."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in out.split("-") if part) or "unknown"


def record_path(name: str, directory: Path | str | None = None) -> Path:
    """Where :func:`save_record` writes now: ``<directory>/<name>_<where>_<stamp>.json``.

    ``where`` is the GPU name (spaces as ``-``) or ``cpu``; ``directory`` defaults to
    ``bench/results/``.
    """
    import torch

    where = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(directory if directory is not None else RESULTS) / f"{name}_{where}_{stamp}.json"


def save_record(name: str, record: dict, directory: Path | str | None = None) -> Path:
    """Write ``record`` (with the environment added) to :func:`record_path` and return the path."""
    record = {**environment(), **record}
    path = record_path(name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def random_images(n: int, size: int, seed: int):
    """``n`` random uint8 RGB images of ``size`` x ``size`` (NHWC), a pure function of ``seed``
    (the source images of the loader, step and maximisation benchmarks)."""
    import numpy as np

    from fastipirm.seeding import numpy_rng

    return numpy_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def figure(value, higher_is_better: bool) -> dict:
    """One comparable number of a record (see ``bench.baselines``)."""
    return {"value": float(value), "higher_is_better": higher_is_better}


def row_figures(record: dict, metrics: dict, key) -> dict:
    """The figures of a record whose ``rows`` hold the metrics: ``{key(row, metric):
    figure(row[metric], higher)}`` for every ok row and every ``metric: higher_is_better`` of
    ``metrics`` the row has."""
    return {key(row, metric): figure(row[metric], higher)
            for row in record["rows"] if row.get("status") == "ok"
            for metric, higher in metrics.items() if row.get(metric) is not None}


def ratio(num, den):
    """``num / den``, or None when either is missing (or ``den`` is 0)."""
    return num / den if num is not None and den else None


def fmt(value, spec: str) -> str:
    """``value`` formatted by ``spec``, ``-`` for None (table cells)."""
    return format(value, spec) if value is not None else "-"


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, *, device: str = "cpu", warmup: int = 2, repeats: int = 10,
            max_seconds: float | None = None) -> dict:
    """Time ``step(i)`` (one iteration; ``i`` rotates the caller's input sets) after warm-up.

    CUDA: CUDA events around each call and the peak memory allocated above what was allocated
    before the first timed call; CPU: ``time.perf_counter`` and no memory figure. Stops early
    (after at least 3 timed calls) once ``max_seconds`` have passed. Returns milliseconds:
    ``median_ms, min_ms, p20_ms, p80_ms, mean_ms, repeats`` and ``peak_mib`` (None on the CPU).
    """
    import statistics
    import time

    import torch

    cuda = device.startswith("cuda")
    for i in range(warmup):
        step(i)
    times = []
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    for i in range(repeats):
        if max_seconds is not None and len(times) >= 3 and \
                time.perf_counter() - started > max_seconds:
            break
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(warmup + i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "min_ms": min(times), "p20_ms": q[0],
            "p80_ms": q[3], "mean_ms": statistics.fmean(times), "repeats": len(times),
            "peak_mib": peak}


def resolve_device(name: str | None, *, fallback: str = "auto"):
    """The ``torch.device`` of a ``--device`` option: ``cpu``, ``cuda`` or ``cuda:N``; ``None``
    means ``fallback`` (``auto``: CUDA when available, else the CPU). ValueError when CUDA is
    asked for and missing."""
    import torch

    from fastipirm.runtime import select_device

    name = name or fallback
    try:
        device = select_device(name)
    except (RuntimeError, ValueError) as exc:
        if "CUDA is not available" in str(exc):
            raise ValueError(f"--device {name}: CUDA is not available on this machine") from None
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)          # measure() times the current device
    return device


def device_and_defaults(args, gpu_defaults: dict, cpu_defaults: dict):
    """``(device, options)``: ``args.device`` (default: cuda when available, else cpu) and, for
    every key of that device's defaults, ``args.<key>`` where given, else the default."""
    device = resolve_device(args.device)
    base = gpu_defaults if device.type == "cuda" else cpu_defaults
    return device, {k: (getattr(args, k) if getattr(args, k, None) is not None else v)
                    for k, v in base.items()}
