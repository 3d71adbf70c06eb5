"""The C++ ``"cpu"`` backend against the ``"torch"`` backend, forward + backward, interleaved.

    python -m bench cpu-ratio [--batch 1024] [--dim 128] [--envs 16] [--rounds 12] [--threads 2]

The kernel benchmark times one implementation after the other; the torch backend's time on a
small shared machine moves by up to 2x between runs (its (rows x 2B) temporaries are fresh memory
every call), so a ratio from two separate series mixes good and bad phases. Here every round runs
both backends back to back on the same fresh inputs (order alternating, round 0 a warm-up), and
the record keeps every round's pair, the medians and the median of the per-round ratios. The CI
gate (``tests/test_perf_regression.py``) runs the same rounds at the shape and thread count of
``bench.targets.CPU_RATIO``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "cpu")
COMMON_OPTIONS = ("no_save", "results_dir")


def _inputs(batch: int, dim: int, envs: int, soft: bool, generator: Optional[torch.Generator]):
    """Leaf features, environment weights (learnt in soft mode) and upstream gradients."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    z1 = F.normalize(normal(batch, dim), dim=1).requires_grad_()
    z2 = F.normalize(normal(batch, dim), dim=1).requires_grad_()
    w = torch.rand(batch, envs, generator=generator)
    w = (w if soft else (w < 0.5).float()).requires_grad_(soft)
    return z1, z2, w, normal(envs), normal(envs)


def _fwd_bwd(backend: str, inputs, soft: bool) -> float:
    """Milliseconds of one forward + backward of ``backend`` on ``inputs``."""
    from fastipirm.ops import env_contrastive_loss

    z1, z2, w, up_loss, up_pen = inputs
    z1.grad = z2.grad = w.grad = None
    t0 = time.perf_counter()
    loss, pen = env_contrastive_loss(z1, z2, w, temperature=0.5, irm_temperature=0.5, soft=soft,
                                     backend=backend, check_values=False)
    torch.autograd.backward([loss, pen], [up_loss, up_pen])
    return (time.perf_counter() - t0) * 1e3


def interleaved_rounds(batch: int, dim: int, envs: int, *, soft: bool, rounds: int,
                       budget_s: Optional[float] = None, min_rounds: int = 3,
                       generator: Optional[torch.Generator] = None) -> list[dict]:
    """``[{"torch": ms, "cpu": ms}, ...]``: one warm-up round, then up to ``rounds`` timed ones,
    both backends on the same fresh inputs per round in alternating order. With ``budget_s``,
    stops after ``min_rounds`` timed rounds once that many seconds have passed."""
    out = []
    started = time.perf_counter()
    for i in range(rounds + 1):
        if budget_s is not None and i > min_rounds and time.perf_counter() - started > budget_s:
            break
        inputs = _inputs(batch, dim, envs, soft, generator)
        order = BACKENDS if i % 2 else BACKENDS[::-1]
        ms = {name: _fwd_bwd(name, inputs, soft) for name in order}
        if i:
            out.append(ms)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the interleaved CPU ratio."""
    ap.add_argument("--batch", type=int, default=1024, help="B (2B rows)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> dict:
    """Hard and soft mode, ``--rounds`` interleaved rounds each; the record (not saved)."""
    from fastipirm.ops import available_backends

    if "cpu" not in available_backends("cpu"):
        raise ValueError("cpu-ratio needs the C++ 'cpu' backend, which is not built here "
                         "('fastipirm info' says why)")
    if min(args.batch, args.dim, args.envs, args.rounds, args.threads) < 1:
        raise ValueError("--batch, --dim, --envs, --rounds and --threads must be positive")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows = []
    try:
        for soft in (False, True):
            rounds = interleaved_rounds(args.batch, args.dim, args.envs, soft=soft,
                                        rounds=args.rounds)
            med = {name: statistics.median(r[name] for r in rounds) for name in BACKENDS}
            rows.append({"mode": "soft" if soft else "hard", "torch_median_ms": med["torch"],
                         "cpu_median_ms": med["cpu"],
                         "median_round_ratio": statistics.median(r["torch"] / r["cpu"]
                                                                 for r in rounds),
                         "rounds": rounds})
    finally:
        torch.set_num_threads(before)
    return {"benchmark": "cpu_ratio", "shape": {"batch": args.batch, "dim": args.dim,
                                                "envs": args.envs},
            "threads": args.threads, "rows": rows}


def figure_key(record: dict, mode: str) -> str:
    """``cpu_ratio/B=<B>/D=<D>/M=<M>/threads=<n>/<mode>/torch_over_cpu``."""
    s = record["shape"]
    return (f"cpu_ratio/B={s['batch']}/D={s['dim']}/M={s['envs']}/threads={record['threads']}/"
            f"{mode}/torch_over_cpu")


def figures(record: dict) -> dict:
    """The median per-round ratio of each mode (higher is better)."""
    from .harness import figure

    return {figure_key(record, r["mode"]): figure(r["median_round_ratio"], True)
            for r in record["rows"]}


def format_table(record: dict) -> str:
    """One line per mode, then the targets the record measures."""
    from .targets import report

    s = record["shape"]
    lines = []
    for r in record["rows"]:
        ratios = [x["torch"] / x["cpu"] for x in r["rounds"]]
        lines.append(f"2B={2 * s['batch']} D={s['dim']} M={s['envs']} {r['mode']}: torch "
                     f"{r['torch_median_ms']:.1f} ms, cpu {r['cpu_median_ms']:.1f} ms, ratio "
                     f"{r['median_round_ratio']:.2f} (per-round ratios {min(ratios):.2f}-"
                     f"{max(ratios):.2f}; {record['threads']} threads)")
    return "\n".join(lines + report(record))
