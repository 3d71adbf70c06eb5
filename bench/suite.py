"""The whole benchmark suite in one process, and the wall time of a full STL-10 IP-IRM run.

    python -m bench all [--only kernels step] [--kernels-args "--n 8192 --envs 16"] ...

Runs ``kernels``, ``loader``, ``step`` and ``maximize`` (each with its own defaults, or the
options given as one string in ``--<part>-args``) and returns one record holding each part's
record under ``parts`` (a part that fails to import or to run holds its error instead), plus
``estimate``: the wall time of the official 400-epoch STL-10 ResNet-50 IP-IRM run
(``runsh/IPIRM_STL_400epoch.sh``) from the measured rates, with its formula (:data:`FORMULA`).
"""
from __future__ import annotations

import argparse
import importlib
import math
import shlex
import time
import traceback

from .targets import report

NAME = "all"
PARTS = ("kernels", "loader", "step", "maximize")

DATASET_IMAGES = 105_000     # STL-10 train (5,000) + unlabeled (100,000)
BATCH = 256
EPOCHS = 400
MAXIMIZE_EVERY = 50          # maximize_iter: at epoch 0, then after every 50th epoch
STEPS_PER_EPOCH = DATASET_IMAGES // BATCH                      # 410 (drop_last)
MAXIMIZATIONS = 1 + EPOCHS // MAXIMIZE_EVERY                   # 9: epochs 0, 50, ..., 400
FORMULA = (
    f"hours = (train_s + maximize_s) / 3600; train_s = sum over epochs e = 1..{EPOCHS} of "
    f"{STEPS_PER_EPOCH} steps/epoch ({DATASET_IMAGES} // {BATCH}, drop_last) x "
    f"{BATCH} / images_per_s(P_e), with P_e = ceil(e / {MAXIMIZE_EVERY}) retained partitions "
    f"(--retain_group: P = 1..8, {MAXIMIZE_EVERY} epochs each) and images_per_s(P) the fastest "
    f"fastipirm variant of the step benchmark (data pipeline included) at the measured P, "
    f"linear in the time per image between measured P and held constant outside them; "
    f"maximize_s = {MAXIMIZATIONS} maximisations (epoch 0 and after every {MAXIMIZE_EVERY}th "
    f"epoch up to {EPOCHS}, the official schedule, whose last partition is never used) x the "
    f"measured fastipirm seconds of one maximisation over N = {DATASET_IMAGES} (scaled by "
    f"{DATASET_IMAGES}/N if measured at another N: its cost is linear in N). Not included: the "
    f"kNN monitor every 25 epochs, checkpoints, start-up."
)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the suite: which parts, and each part's own options as one string."""
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                    help="run only these parts (default: all four)")
    for part in PARTS:
        ap.add_argument(f"--{part}-args", default="", metavar="OPTIONS",
                        help=f"options of 'python -m bench {part}', quoted as one string")


def _part_args(part: str, module, text: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m bench all --{part}-args",
                                 conflict_handler="resolve")
    module.add_arguments(ap)
    try:
        return ap.parse_args(shlex.split(text))
    except SystemExit as exc:           # argparse printed the reason
        raise ValueError(f"--{part}-args {text!r}: invalid options for bench.{part}") from exc


def run(args: argparse.Namespace) -> dict:
    """Run the chosen parts in order; return the combined record (not saved)."""
    modules = {}
    parts, rows = {}, []
    for part in args.only:           # parse every part's options before measuring anything
        try:
            module = importlib.import_module(f"bench.{part}")
        except Exception as exc:  # noqa: BLE001 - a missing part is reported, the rest runs
            parts[part] = {"error": f"bench.{part} cannot be imported: "
                                    f"{type(exc).__name__}: {exc}"}
            continue
        modules[part] = (module, _part_args(part, module, getattr(args, f"{part}_args")))
    for part in args.only:
        if part not in modules:
            rows.append({"part": part, "status": parts[part]["error"], "seconds": None})
            continue
        module, part_args = modules[part]
        started = time.perf_counter()
        try:
            parts[part] = module.run(part_args)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - one failing part does not lose the others
            status = f"{type(exc).__name__}: {exc}"
            parts[part] = {"error": status, "traceback": traceback.format_exc()}
        rows.append({"part": part, "status": status,
                     "seconds": time.perf_counter() - started})
        print(f"[bench all] {part}: {status} ({rows[-1]['seconds']:.1f} s)", flush=True)
    record = {"benchmark": NAME, "rows": rows, "parts": parts}
    record["estimate"] = estimate(parts.get("step"), parts.get("maximize"))
    return record


def _step_rates(step: dict) -> tuple[str, dict]:
    """``(arch, {P: fastest fastipirm images/s})`` of a step record, ResNet-50 when measured."""
    rows = [r for r in step.get("rows", []) if r.get("variant") in ("fastipirm", "compiled")
            and r.get("images_per_s")]
    archs = sorted({r["arch"] for r in rows})
    if not archs:
        raise ValueError("the step record has no fastipirm rate")
    arch = "resnet50" if "resnet50" in archs else archs[0]
    rates = {}
    for r in rows:
        if r["arch"] == arch:
            rates[r["partitions"]] = max(rates.get(r["partitions"], 0.0), r["images_per_s"])
    return arch, rates


def _seconds_per_image(rates: dict, p: int) -> float:
    """Time per image at ``p`` partitions: linear between measured P, constant outside."""
    ps = sorted(rates)
    if p <= ps[0]:
        return 1 / rates[ps[0]]
    if p >= ps[-1]:
        return 1 / rates[ps[-1]]
    hi = next(q for q in ps if q >= p)
    lo = max(q for q in ps if q <= p)
    if hi == lo:
        return 1 / rates[lo]
    t_lo, t_hi = 1 / rates[lo], 1 / rates[hi]
    return t_lo + (t_hi - t_lo) * (p - lo) / (hi - lo)


def _maximize_row(record: dict) -> dict:
    """fastipirm's row of a maximize record (``impl``, ``seconds``, ``n``)."""
    for r in record.get("rows", []):
        if r.get("impl") == "fastipirm" and r.get("seconds") is not None:
            if r.get("n") is None:
                raise ValueError("the maximize record does not say over how many samples N")
            return r
    raise ValueError("the maximize record has no fastipirm row with 'seconds'")


def estimate(step: dict | None, maximize: dict | None) -> dict:
    """The 400-epoch wall time from a step and a maximize record (see :data:`FORMULA`)."""
    out = {"formula": FORMULA, "hours": None}
    missing = [name for name, rec in (("step", step), ("maximize", maximize))
               if not rec or "error" in rec]
    if missing:
        out["status"] = f"not estimated: no {' and no '.join(missing)} record"
        return out
    try:
        arch, rates = _step_rates(step)
        row = _maximize_row(maximize)
    except (ValueError, KeyError, TypeError) as exc:
        out["status"] = f"not estimated: {exc}"
        return out
    max_p = math.ceil(EPOCHS / MAXIMIZE_EVERY)
    epoch_s = {p: STEPS_PER_EPOCH * BATCH * _seconds_per_image(rates, p)
               for p in range(1, max_p + 1)}
    train_s = sum(epoch_s[math.ceil(e / MAXIMIZE_EVERY)] for e in range(1, EPOCHS + 1))
    one_max_s = row["seconds"] * DATASET_IMAGES / row["n"]
    max_s = MAXIMIZATIONS * one_max_s
    s, m = step.get("settings", {}), maximize.get("settings", {})
    differ = []
    if not (arch == "resnet50" and s.get("width") == 64 and s.get("batch") == BATCH
            and s.get("crop") == 32 and step.get("device") == "cuda"):
        differ.append(f"step measured {arch} width {s.get('width')}, batch {s.get('batch')}, "
                      f"{s.get('crop')} px on {step.get('device')}")
    if not (m.get("arch") == "resnet50" and m.get("width") == 64
            and m.get("feature_batch") == 3096 and maximize.get("device") == "cuda"):
        differ.append(f"maximize measured {m.get('arch')} width {m.get('width')}, feature "
                      f"batch {m.get('feature_batch')}, N {row['n']} on {maximize.get('device')}")
    out.update(
        status="ok" if not differ else
        "ok, but NOT the official setting (ResNet-50 width 64, batch 256, 32 px, feature batch "
        "3096, CUDA): " + "; ".join(differ),
        arch=arch, measured_images_per_s=rates, epoch_seconds_by_partitions=epoch_s,
        train_seconds=train_s, maximize_seconds_each=one_max_s,
        maximize_measured={k: row.get(k) for k in ("seconds", "n", "epochs_run")},
        maximizations=MAXIMIZATIONS,
        maximize_seconds=max_s, hours=(train_s + max_s) / 3600)
    return out


def figures(record: dict) -> dict:
    """The figures of every part (``bench.baselines.figures``) and
    ``estimate/400_epoch_hours``."""
    from .baselines import figures as part_figures
    from .harness import figure

    out = {}
    for part in record.get("parts", {}).values():
        if isinstance(part, dict) and "benchmark" in part:
            out.update(part_figures(part))
    hours = record.get("estimate", {}).get("hours")
    if hours is not None:
        out["estimate/400_epoch_hours"] = figure(hours, False)
    return out


def format_table(record: dict) -> str:
    """Every part's table, then the parts' status and the estimate."""
    blocks = []
    for part, sub in record["parts"].items():
        if "error" in sub:
            continue
        module = importlib.import_module(f"bench.{part}")
        blocks.append(f"== {part} ==\n{module.format_table(sub)}")
    lines = ["== suite =="]
    for r in record["rows"]:
        took = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "-"
        lines.append(f"{r['part']:<9} {took:>9}  {r['status']}")
    est = record["estimate"]
    if est["hours"] is not None:
        lines.append(f"estimated 400-epoch STL-10 IP-IRM run ({est['arch']}): "
                     f"{est['hours']:.2f} h = {est['train_seconds'] / 3600:.2f} h of training "
                     f"+ {est['maximizations']} x {est['maximize_seconds_each']:.1f} s of "
                     f"maximisation; {est['status']}")
    else:
        lines.append(f"estimated 400-epoch run: {est['status']}")
    lines.append(f"formula: {est['formula']}")
    lines += [line for line in report(record) if "estimate/" in line]
    return "\n\n".join(blocks + ["\n".join(lines)])

