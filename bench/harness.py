"""Shared pieces of the benchmarks: the environment record and where results are written.

Every benchmark writes one JSON record to ``bench/results/`` holding what it measured and where:
date (UTC), exact command, host (CPU, GPU name, driver), library versions and git commit.
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


def environment() -> dict:
    """Host, accelerator and versions of everything that affects a measurement."""
    import torch

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
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


def save_record(name: str, record: dict) -> Path:
    """Write ``record`` (with the environment added) to ``bench/results/<name>_<where>_<stamp>.json``."""
    record = {**environment(), **record}
    where = record.get("gpu", {}).get("name", "cpu").replace(" ", "-")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{where}_{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    return path
