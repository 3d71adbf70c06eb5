"""Check and benchmark everything on a GPU machine, in one command with a time budget.

    python -m bench gpu-check [--quick] [--only PHASE ...] [--skip PHASE ...] [--budget S]
                              [--results-dir DIR] [--plot] [--compare] [--allow-cpu]

Run it from the repository root after installing the package with its extensions (``pip
install --no-build-isolation -e .``: the ``cpu`` and ``cuda`` backends are built then; the
``info`` phase says which backends are available and why not). The phases, in order:

==============  ==============================================================  =====  =====
phase           what it runs                                                    limit  quick
==============  ==============================================================  =====  =====
info            ``fastipirm info``: versions, the GPU, the available backends    60 s   60 s
check           ``fastipirm check``: every CPU and CUDA backend against the     150 s   60 s
                float64 reference (``--quick`` cases in the quick run)
gpu-tests       ``pytest -m gpu`` on the Triton and CUDA tests of both ops           240 s   90 s
                (tests/test_{triton,cuda}_backend.py, test_masked_{triton,cuda}.py)
                with ``TRITON_INTERPRET=0`` (the quick run keeps the fp32
                sweeps and the memory tests)
kernels         ``python -m bench kernels``: 2B = 512, 2048, 8192 (quick:       240 s  100 s
                8192), M = 16, hard and soft: every GPU backend against the
                reference and torch.compile
masked          ``python -m bench masked``: masked_contrastive_loss against      150 s   60 s
                the official CL-ICA (B = 1024, 4096, 6144; quick: L1 at 4096),
                DCoDR and MixUp constructions
step            ``python -m bench step``: ResNet-50, P = 1 and 8 (quick: 8),     240 s   90 s
                the official-style step against fastipirm's and SimCLR's
ddp-loss        ``python -m bench ddp-loss``: IP-IRM's loss on one rank of N      60 s   45 s
                (2B = 2048, P = 8): the replicated global loss (every backend)
                against the op's distributed form at N = 2, 4, 8
step-resnet18   the same for ResNet-18, only when the budget still has its      150 s     -
                limit left
maximize        ``python -m bench maximize``: one partition maximisation over   240 s   75 s
                N = 105,000 (quick: 26,250), official-style (2 timed epochs,
                quick 1, extrapolated to fastipirm's count) against fastipirm
==============  ==============================================================  =====  =====

Each phase runs as its own process (in its own process group) under its limit, or under what is
left of the whole run's ``--budget`` (default 700 s, just under 12 minutes; quick 255 s) when
that is less; a phase that hangs is stopped (SIGTERM, then SIGKILL) and reported as timed out,
and a phase that no longer has 30 s left is skipped, so the run ends within its budget. What each
phase prints goes to a log beside the records,
``<results-dir>/gpu_check_<gpu>_<start>_<phase>.log`` (``--results-dir`` defaults to
``bench/results/``; ``<start>``: when the run began). The benchmark phases write their JSON records
there (with charts under ``--plot``; ``--compare`` compares each with this GPU's baseline and
fails the phase on a regression). The run's own record, ``gpu_check_<gpu>_<stamp>.json``, holds
each phase's status, seconds, log, record and key figure, and the targets of
:mod:`bench.targets` the records measured; the table printed last shows the same. The exit status
is 0 when every phase passed, 1 when one failed, timed out or had no time left (the optional
``step-resnet18`` excepted), 2 on a machine without CUDA: it refuses then, unless
``--allow-cpu``, which runs tiny CPU versions of the same phases (about a minute; a smoke test of
the command, not a measurement). The compiled step variant is not part of the check (its compiles
take minutes): ``python -m bench step --variants compiled``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

NAME = "gpu_check"
ROOT = Path(__file__).resolve().parent.parent
COMMON_OPTIONS = ("results_dir",)
BUDGET = {"full": 700.0, "quick": 255.0, "cpu": 240.0}
MIN_START_S = 30.0               # a phase with less time left than this is skipped
KILL_GRACE_S = 10.0
GPU_TESTS = ["tests/test_triton_backend.py", "tests/test_cuda_backend.py",
             "tests/test_masked_triton.py", "tests/test_masked_cuda.py"]

KERNELS = {"full": ["--n", "512", "2048", "8192", "--envs", "16", "--max-seconds", "5"],
           "quick": ["--n", "8192", "--envs", "16", "--repeats", "10", "--max-seconds", "5"],
           "cpu": ["--device", "cpu", "--n", "16", "--dim", "8", "--envs", "3", "--repeats", "2",
                   "--warmup", "0", "--impl", "reference", "torch"]}
MASKED = {"full": ["--max-seconds", "4"],
          "quick": ["--clica-batch", "4096", "--similarity", "l1", "--repeats", "10",
                    "--max-seconds", "3"],
          "cpu": ["--small", "--device", "cpu", "--similarity", "l1", "--repeats", "2",
                  "--warmup", "0", "--memory", "none"]}
STEP_VARIANTS = ["--variants", "official", "fastipirm", "simclr"]
STEP = {"full": ["--archs", "resnet50", "--partitions", "1", "8", *STEP_VARIANTS],
        "quick": ["--archs", "resnet50", "--partitions", "8", "--repeats", "5", *STEP_VARIANTS],
        "cpu": ["--device", "cpu", "--archs", "resnet18", "--width", "2", "--batch", "16",
                "--num-images", "48", "--source-size", "24", "--partitions", "2",
                "--workers", "0", "--warmup", "1", "--repeats", "2", *STEP_VARIANTS]}
DDP_LOSS = {"full": ["--device", "cuda", "--batch", "1024", "--worlds", "2", "4", "8"],
            "quick": ["--device", "cuda", "--batch", "1024", "--worlds", "2", "8",
                      "--repeats", "3"],
            "cpu": ["--device", "cpu", "--batch", "16", "--dim", "8", "--partitions", "2",
                    "--worlds", "2", "4", "--repeats", "1"]}
MAXIMIZE = {"full": ["--official-epochs", "2"],
            "quick": ["--num-samples", "26250", "--official-epochs", "1"],
            "cpu": ["--device", "cpu", "--num-samples", "40", "--feature-batch", "16",
                    "--extract-batch", "16", "--epochs", "2", "--width", "2",
                    "--source-size", "24", "--workers", "0"]}


# ----------------------------------------------------------------------------------------------
# key figures: one short text per phase from its log and its record


def _last_line(log: str, pattern: str = r"\S") -> str:
    lines = [ln.strip() for ln in log.splitlines() if re.search(pattern, ln)]
    return lines[-1][:90] if lines else ""


def _info_key(log: str, record: Optional[dict]) -> str:
    gpus = re.findall(r"^cuda:\d+ (.+)$", log, re.M)
    backends = re.findall(r"^\s+(\S+)\s+(available|unavailable)\b", log, re.M)
    ok = [name for name, state in backends if state == "available"]
    missing = [name for name, state in backends if state == "unavailable"]
    return (f"{gpus[0] if gpus else 'no GPU'}; backends {', '.join(ok) or 'none'}"
            + (f" (unavailable: {', '.join(missing)})" if missing else ""))


def _tests_key(log: str, record: Optional[dict]) -> str:
    return _last_line(log, r"\d+ (passed|failed|skipped|deselected|errors?)\b")


def _kernels_key(log: str, record: Optional[dict]) -> str:
    rows = [r for r in (record or {}).get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return ""
    n = max(r["n"] for r in rows)
    top = [r for r in rows if r["n"] == n and r["mode"] == "hard" and r["impl"] != "reference"]
    fused = [r for r in top if r["impl"] in ("triton", "cuda")] or \
        [r for r in top if r["impl"] not in ("torch.compile",)]
    parts = []
    for r in fused:
        text = f"{r['impl']} {r['x_reference']:.1f}x ref" if r.get("x_reference") else r["impl"]
        if r.get("x_compile"):
            text += f", {r['x_compile']:.1f}x compile"
        parts.append(text)
    return f"2B={n} hard: " + "; ".join(parts)


def _masked_key(log: str, record: Optional[dict]) -> str:
    rows = [r for r in (record or {}).get("rows", []) if r.get("status") == "ok"
            and r.get("form") == "clica" and r.get("implementation") == "ours"
            and r.get("time_over_official")]
    if not rows:
        return ""
    b = max(r["batch"] for r in rows)
    best = min((r for r in rows if r["batch"] == b), key=lambda r: r["time_over_official"])
    return (f"CL-ICA {best['variant']} B={b}: {best['backend']} "
            f"{best['time_over_official']:.3f}x official time")


def _step_key(log: str, record: Optional[dict]) -> str:
    ratios = (record or {}).get("ratios", [])
    if not ratios:
        return ""
    q = max(ratios, key=lambda q: q["partitions"])

    def num(key, spec):
        return "-" if q.get(key) is None else format(q[key], spec)

    return (f"{q['arch']} P={q['partitions']}: fastipirm {num('fastipirm_vs_official', '.2f')}x "
            f"official, IP-IRM/SimCLR {num('ipirm_overhead', '.3f')}")


def _ddp_loss_key(log: str, record: Optional[dict]) -> str:
    rows = (record or {}).get("rows", [])
    local = [r for r in rows if r["impl"] == "local" and r.get("over_replicated")]
    return ", ".join(f"local N={r['world']} {r['over_replicated']:.2f}x" for r in local) + \
        (" of the fastest replicated loss" if local else "")


def _maximize_key(log: str, record: Optional[dict]) -> str:
    rows = {r["impl"]: r for r in (record or {}).get("rows", [])}
    fast = rows.get("fastipirm")
    if fast is None:
        return ""
    text = f"fastipirm {fast['seconds']:.1f} s at N={fast['n']}"
    total = (record or {}).get("ratios", {}).get("total")
    return text + (f", {total:.1f}x official" if total else "")


# ----------------------------------------------------------------------------------------------
# phases


@dataclass(frozen=True)
class Phase:
    """A phase: its command per mode (``None``: not run in that mode), its limit per mode, how
    its key figure is read, and whether it runs only when its whole limit is left."""

    name: str
    command: Callable[[str, argparse.Namespace], Optional[list]]
    limits: dict
    key: Callable[[str, Optional[dict]], str]
    optional: bool = False


def _bench(name: str, sizes: dict) -> Callable:
    def command(mode: str, args: argparse.Namespace) -> Optional[list]:
        if mode not in sizes:
            return None
        extra = ["--plot"] * args.plot + ["--compare"] * args.compare
        return ["-m", "bench", name, *sizes[mode], "--results-dir", str(args.results_dir),
                *extra]
    return command


def _gpu_tests(mode: str, args: argparse.Namespace) -> list:
    select = ["-k", "float32 or peak_memory"] if mode == "quick" else []
    return ["-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider", *select,
            *GPU_TESTS]


PHASES = (
    Phase("info", lambda mode, args: ["-m", "fastipirm", "info"],
          {"full": 60, "quick": 60, "cpu": 60}, _info_key),
    Phase("check", lambda mode, args: ["-m", "fastipirm", "check"]
          + (["--quick"] if mode != "full" else []),
          {"full": 150, "quick": 60, "cpu": 60}, lambda log, rec: _last_line(log)),
    Phase("gpu-tests", _gpu_tests, {"full": 240, "quick": 90, "cpu": 60}, _tests_key),
    Phase("kernels", _bench("kernels", KERNELS), {"full": 240, "quick": 100, "cpu": 60},
          _kernels_key),
    Phase("masked", _bench("masked", MASKED), {"full": 150, "quick": 60, "cpu": 60},
          _masked_key),
    Phase("step", _bench("step", STEP), {"full": 240, "quick": 90, "cpu": 90}, _step_key),
    Phase("ddp-loss", _bench("ddp-loss", DDP_LOSS), {"full": 60, "quick": 45, "cpu": 60},
          _ddp_loss_key),
    Phase("step-resnet18",
          _bench("step", {"full": ["--archs", "resnet18", *STEP["full"][2:]]}),
          {"full": 150}, _step_key, optional=True),
    Phase("maximize", _bench("maximize", MAXIMIZE), {"full": 240, "quick": 75, "cpu": 90},
          _maximize_key),
)
NAMES = tuple(p.name for p in PHASES)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the GPU check."""
    ap.add_argument("--quick", action="store_true",
                    help="smaller phases, about 4 minutes in all (default run: under 12)")
    ap.add_argument("--only", nargs="+", choices=NAMES, default=None, metavar="PHASE",
                    help=f"run only these phases ({', '.join(NAMES)})")
    ap.add_argument("--skip", nargs="+", choices=NAMES, default=[], metavar="PHASE",
                    help="leave these phases out")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 700; 255 with --quick)")
    ap.add_argument("--plot", action="store_true",
                    help="the benchmark phases also write PNG charts (needs matplotlib)")
    ap.add_argument("--compare", action="store_true",
                    help="the benchmark phases compare with this GPU's baseline "
                         "(bench/baselines/); a regression fails the phase")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="on a machine without CUDA, run tiny CPU versions of the phases "
                         "instead of refusing")


def _mode(args: argparse.Namespace) -> str:
    import torch

    if torch.cuda.is_available():
        return "quick" if args.quick else "full"
    if not args.allow_cpu:
        raise ValueError("gpu-check needs a CUDA GPU and this machine has none (--allow-cpu "
                         "runs a tiny CPU version of the phases)")
    return "cpu"


def _environment() -> dict:
    """The phases' environment: Triton compiles real kernels, output is not held back."""
    return dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")


def _stop(proc: subprocess.Popen) -> None:
    """End what is left of the phase's process group (its DataLoader workers and compilers)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _execute(argv: list, limit: float, log_path: Path) -> tuple[Optional[int], float]:
    """Run ``python <argv>`` in the repository root under ``limit`` seconds, output to
    ``log_path``; ``(exit status or None when it timed out, seconds)``."""
    command = [sys.executable, *argv]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(['python', *argv])}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=_environment(), start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop(proc)                  # a hung phase, or workers its process left behind
    return rc, time.perf_counter() - started


def _written_record(log: str) -> Optional[str]:
    """The JSON record a benchmark phase wrote (its ``wrote <path>.json`` line)."""
    found = re.findall(r"^wrote (.+\.json)$", log, re.M)
    return found[-1] if found else None


def _run_phase(phase: Phase, mode: str, args, limit: float, stem: Path) -> dict:
    row = {"phase": phase.name, "limit_s": round(limit, 1)}
    log_path = stem.with_name(f"{stem.name}_{phase.name}.log")
    print(f"[gpu-check] {phase.name}: running (limit {limit:.0f} s), log {log_path}", flush=True)
    rc, seconds = _execute(phase.command(mode, args), limit, log_path)
    log = log_path.read_text(errors="replace")
    record_file = _written_record(log)
    record = None
    if record_file:
        try:
            record = json.loads(Path(record_file).read_text())
        except (OSError, json.JSONDecodeError):
            record = None
    try:
        key = phase.key(log, record)
    except (KeyError, TypeError, ValueError) as exc:
        key = f"(no key figure: {type(exc).__name__}: {exc})"
    status = ("ok" if rc == 0 else f"timed out after {limit:.0f} s" if rc is None
              else f"failed (exit {rc})")
    if rc != 0:
        key = key or _last_line(log)
    row.update(status=status, seconds=round(seconds, 1), rc=rc, log=str(log_path),
               record=record_file, key=key)
    if record is not None:
        row["targets"] = _targets(record)
    print(f"[gpu-check] {phase.name}: {status} ({seconds:.0f} s) {key}", flush=True)
    if rc != 0:
        print("\n".join("    " + ln for ln in log.rstrip().splitlines()[-5:]), flush=True)
    return row


def _targets(record: dict) -> list:
    from .targets import check

    try:
        return [{"key": key, "value": value, "met": met} for key, value, met in check(record)]
    except ValueError:                   # a record without figures
        return []


def run(args: argparse.Namespace) -> dict:
    """Run the phases in order within the budget; the summary record (not saved)."""
    from .baselines import baseline_path
    from .harness import RESULTS, record_path

    mode = _mode(args)
    args.results_dir = Path(args.results_dir or RESULTS).resolve()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.compare and not baseline_path().exists():
        raise ValueError(f"--compare: no baseline for this GPU ({baseline_path()}); write one "
                         "with 'python -m bench <name> --accept'")
    if args.plot:
        from .plots import pyplot
        pyplot()
    budget = args.budget if args.budget is not None else BUDGET[mode]
    if budget <= 0:
        raise ValueError(f"--budget must be positive, got {budget}")
    wanted = [p for p in PHASES if mode in p.limits and p.name not in args.skip
              and (args.only is None or p.name in args.only)]
    stem = record_path(NAME, args.results_dir).with_suffix("")
    print(f"[gpu-check] {mode} run: {', '.join(p.name for p in wanted)}; budget {budget:.0f} s; "
          f"results in {args.results_dir}", flush=True)
    started = time.perf_counter()
    rows = []
    for phase in wanted:
        left = budget - (time.perf_counter() - started)
        cap = phase.limits[mode]
        if left < MIN_START_S or (phase.optional and left < cap):
            rows.append({"phase": phase.name, "status": "skipped: no time left", "seconds": 0.0,
                         "limit_s": cap, "optional": phase.optional,
                         "key": f"{left:.0f} s of the budget left"})
            print(f"[gpu-check] {phase.name}: skipped, {left:.0f} s left", flush=True)
            continue
        rows.append({**_run_phase(phase, mode, args, min(cap, left), stem),
                     "optional": phase.optional})
    return {"benchmark": NAME, "mode": mode, "budget_s": budget,
            "seconds": round(time.perf_counter() - started, 1),
            "results_dir": str(args.results_dir), "rows": rows}


def status(record: dict) -> int:
    """0 when every phase passed (an optional one may have been skipped), else 1."""
    return int(any(r["status"] != "ok" and not (r["optional"] and r["status"].startswith(
        "skipped")) for r in record["rows"]))


def format_table(record: dict) -> str:
    """The phases (status, seconds, key figure), then the targets the records measured."""
    lines = [f"gpu-check ({record['mode']} run, {record['seconds']:.0f} s of a "
             f"{record['budget_s']:.0f} s budget; logs and records in {record['results_dir']})",
             f"{'phase':<14} {'status':<24} {'seconds':>8}  key figure"]
    for r in record["rows"]:
        lines.append(f"{r['phase']:<14} {r['status']:<24} {r['seconds']:>8.1f}  {r['key']}")
    measured = [t for r in record["rows"] for t in r.get("targets", [])]
    if measured:
        missed = [t for t in measured if not t["met"]]
        lines.append(f"targets (bench/targets.py): {len(measured) - len(missed)} met, "
                     f"{len(missed)} missed")
        lines += [f"  MISSED {t['key']} = {t['value']:.4g}" for t in missed]
    return "\n".join(lines)
