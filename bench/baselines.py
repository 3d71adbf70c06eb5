"""Accepted figures per GPU and the throughput regression gate.

``bench/baselines/<gpu-name-slug>.json`` (e.g. ``nvidia-h200.json``) holds, for one GPU model::

    {"gpu": "NVIDIA H200",
     "figures": {"kernels/bf16/D=128/2B=8192/M=16/hard/triton/median_ms":
                     {"value": 1.9, "higher_is_better": false}, ...},
     "targets": {"step/resnet50/P=8/fastipirm_over_official": {"min": 5}, ...},
     "accepted": [{"date": ..., "git_commit": ..., "command": ..., "benchmark": ...}]}

:func:`figures` turns a record of any benchmark into such keyed numbers (each benchmark module's
``figures(record)``); :func:`compare` fails a figure more than 10% worse than its baseline and a
figure beyond its target; :func:`accept` writes a run into the file of the current GPU, with the
targets of :mod:`bench.targets` it does not have yet.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

from . import targets
from .harness import environment, slug

BASELINES = Path(__file__).resolve().parent / "baselines"
TOLERANCE = 0.10


def figures(record: dict) -> dict:
    """``{key: {"value", "higher_is_better"}}`` of a record; keys start with the benchmark name.

    ``bench.<benchmark>.figures(record)`` reads a record of its own benchmark (an ``all`` record
    is the union of its parts plus the 400-epoch estimate, ``bench.suite.figures``).
    """
    name = record.get("benchmark")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"not a benchmark record: 'benchmark' is {name!r}")
    module_name = "suite" if name == "all" else name
    try:
        module = importlib.import_module(f"bench.{module_name}")
    except ImportError:
        module = None
    if module is None or not callable(getattr(module, "figures", None)):
        raise ValueError(f"bench.{module_name} defines no figures(record): nothing to compare")
    return module.figures(record)


def baseline_path(gpu_name: Optional[str] = None) -> Path:
    """``bench/baselines/<slug>.json`` of ``gpu_name`` (default: this machine's GPU)."""
    name = gpu_name or current_device_name()
    return BASELINES / f"{slug(name)}.json"


def current_device_name() -> str:
    """The GPU's name, or ``cpu-<machine>`` on a machine without CUDA."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine() or 'unknown'}"


def load_baseline(path: Path | str) -> dict:
    """Read and check a baseline file; ValueError naming the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("figures", {}), dict) or \
            not isinstance(data.get("targets", {}), dict):
        raise ValueError(f"{path}: a baseline is an object with 'figures' and 'targets' objects")
    for key, fig in data.get("figures", {}).items():
        if not (isinstance(fig, dict) and isinstance(fig.get("value"), (int, float))
                and isinstance(fig.get("higher_is_better"), bool)):
            raise ValueError(f"{path}: figure {key!r} needs a numeric 'value' and a boolean "
                             f"'higher_is_better', got {fig!r}")
    for key, bound in data.get("targets", {}).items():
        if not (isinstance(bound, dict) and bound and set(bound) <= {"min", "max"}
                and all(isinstance(v, (int, float)) for v in bound.values())):
            raise ValueError(f"{path}: target {key!r} must be {{'min': x}} and/or {{'max': x}}, "
                             f"got {bound!r}")
    return data


def compare(record: dict, baseline: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Failures of ``record`` against ``baseline``: one line per figure that is more than
    ``tolerance`` worse than its baseline value or outside its target. Figures the record does
    not have are not checked, nor targets set for settings the record does not have
    (:func:`bench.targets.applies`)."""
    current = figures(record)
    failures = []
    for key, base in sorted(baseline.get("figures", {}).items()):
        if key not in current:
            continue
        value, ref = current[key]["value"], base["value"]
        if base["higher_is_better"]:
            worse = value < ref * (1 - tolerance)
            change = (ref - value) / ref if ref else 0.0
        else:
            worse = value > ref * (1 + tolerance)
            change = (value - ref) / ref if ref else 0.0
        if worse:
            failures.append(f"{key}: {value:.4g} is {change:.0%} worse than the baseline "
                            f"{ref:.4g} (allowed {tolerance:.0%})")
    for key, bound in sorted(baseline.get("targets", {}).items()):
        if key not in current or not targets.applies(key, record):
            continue
        value = current[key]["value"]
        if "min" in bound and value < bound["min"]:
            failures.append(f"{key}: {value:.4g} is below its target {bound['min']:.4g}")
        if "max" in bound and value > bound["max"]:
            failures.append(f"{key}: {value:.4g} is above its target {bound['max']:.4g}")
    return failures


def accept(record: dict, *, force: bool = False, path: Optional[Path | str] = None) -> Path:
    """Write the figures of ``record`` into the baseline of this GPU (merged with what is there).

    Refuses on a machine without CUDA unless ``force`` (the file is then ``cpu-<machine>.json``):
    baselines hold GPU figures. The GPU targets of :mod:`bench.targets` the file lacks are
    added; the targets it has are kept (a bound edited by hand for this GPU stays).
    """
    import torch

    if not torch.cuda.is_available() and not force:
        raise ValueError("refusing to accept a run without a GPU as a baseline: baselines hold "
                         "GPU figures (pass --force to write a CPU baseline anyway)")
    new = figures(record)
    if not new:
        raise ValueError(f"the {record.get('benchmark')} record has no figures to accept "
                         "(every row failed?)")
    name = current_device_name()
    path = Path(path) if path is not None else baseline_path(name)
    data = load_baseline(path) if path.exists() else {"gpu": name, "figures": {}, "targets": {}}
    data.setdefault("figures", {}).update(new)
    kept = data.setdefault("targets", {})
    for key, bound in targets.bounds("gpu").items():
        kept.setdefault(key, bound)
    env = environment()
    data.setdefault("accepted", []).append(
        {"benchmark": record.get("benchmark"), "figures": len(new),
         **{k: env[k] for k in ("date", "git_commit", "command")}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
