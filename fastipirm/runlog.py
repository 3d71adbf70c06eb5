"""What a run writes besides its checkpoint: CSV logs, TensorBoard, progress bars, the curves
plot, ``summary.json`` and the table comparing two runs.

:class:`RunLog` owns the files of one run directory: ``metrics.csv`` (one row per epoch),
``steps.csv`` (one row per logged step; on resume the rows after the checkpoint's step are
dropped, so the file matches the resumed run) and TensorBoard events under ``tb/`` when
TensorBoard is installed. Every file is rewritten atomically.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable, Optional

from .atomic import atomic_file, atomic_write_text

TB_EPOCH_KEYS = ("loss", "loss_global", "loss_env", "penalty", "knn_top1", "balance", "img_per_s")


def write_csv(path, fields: list, rows: list) -> None:
    """``rows`` (dicts) as a CSV with columns ``fields`` (missing or None values are empty)."""
    with atomic_file(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def interactive() -> bool:
    """True when both standard streams are terminals: only then are progress bars drawn (in a
    log file their carriage returns are noise; the trainer logs one line per epoch anyway)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar (``update``/``set_postfix``/``close``), or None when progress is off or the
    output is not a terminal (:func:`interactive`)."""
    if not (enabled and interactive()):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class RunLog:
    """The CSV and TensorBoard logs of one run directory ``out``.

    ``epoch_fields`` / ``step_fields``: the columns of ``metrics.csv`` / ``steps.csv``.
    ``resume_step``: when resuming, the checkpoint's step (``steps.csv`` keeps the rows up to it).
    """

    def __init__(self, out: Path, epoch_fields: list, step_fields: list, *, tensorboard: bool,
                 resume_step: Optional[int] = None, log: Callable[[str], None] = print):
        self.out, self.epoch_fields, self.step_fields = Path(out), epoch_fields, step_fields
        self.steps_path = self.out / "steps.csv"
        self.step_rows: list = []
        if resume_step is not None and self.steps_path.exists():
            with open(self.steps_path, newline="") as fh:
                self.step_rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        write_csv(self.steps_path, step_fields, self.step_rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:
                log("note: tensorboard is not installed; metrics go to metrics.csv only")

    def step(self, row: dict) -> None:
        """A logged step (``epoch``, ``step``, values); TensorBoard ``step/<name>`` scalars."""
        self.step_rows.append(row)
        if self.tb is not None:
            for key in self.step_fields:
                if key not in ("epoch", "step", "img_per_s"):
                    self.tb.add_scalar(f"step/{key}", row[key], row["step"])

    def epoch(self, history: list) -> None:
        """Rewrite ``metrics.csv`` and ``steps.csv``; TensorBoard ``epoch/<name>`` scalars."""
        write_csv(self.out / "metrics.csv", self.epoch_fields, history)
        write_csv(self.steps_path, self.step_fields, self.step_rows)
        if self.tb is not None:
            row = history[-1]
            for key in TB_EPOCH_KEYS:
                if row.get(key) is not None:
                    self.tb.add_scalar(f"epoch/{key}", row[key], row["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list, path: Path, title: str) -> bool:
    """Loss (and its parts), IRM penalty, kNN accuracy (CL-ICA: R² and MCC) and partition balance
    over epochs (panels without data stay empty); False when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ep = [h["epoch"] for h in history]

    def series(key):
        return [(h["epoch"], h[key]) for h in history if h.get(key) is not None]

    axes[0].plot(ep, [h["loss"] for h in history], label="total")
    for key, label in (("loss_global", "global NT-Xent"), ("loss_env", "env NT-Xent (mean)")):
        if any(h.get(key) for h in history):
            axes[0].plot(*zip(*series(key)), label=label)
    axes[0].set_title("loss")
    axes[0].legend(fontsize=7)
    for ax, key, label in ((axes[1], "penalty", "IRM penalty (mean over p,k)"),
                           (axes[2], "knn_top1", "kNN top-1 (%)"),
                           (axes[3], "balance", "partition balance (smallest env share)")):
        points = series(key)
        if points:
            ax.plot(*zip(*points), marker="o" if key != "penalty" else None)
        ax.set_title(label)
    if series("r2"):               # CL-ICA: identifiability scores on fresh samples
        axes[2].set_title("linear R² and MCC (fresh samples)")
        for key, label in (("r2", "R²"), ("mcc", "MCC")):
            if series(key):
                axes[2].plot(*zip(*series(key)), marker="o", label=label)
        axes[2].legend(fontsize=7)
    for a in axes:
        a.set_xlabel("epoch")
    _save(plt, fig, path, title)
    return True


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pair(r: dict) -> str:
    return f"{_fmt(r.get('knn_top1'))} / {_fmt(r.get('linear_top1'))}" if r else "-"


def comparison_table(rows: list[tuple[str, dict]], label_factor: str = "") -> str:
    """The label accuracy of each run (kNN, final and best linear probe), a line naming the best
    run, then kNN / linear per generative factor when the data has factors. ``rows``:
    ``(label, summary)``; a row labelled ``random init`` is the untrained reference."""
    width = max(12, *(len(label) + 2 for label, _ in rows))
    lines = []
    if any(s.get("knn_top1") is not None or s.get("linear") for _, s in rows):
        lines.append(f"{'method':<{width}}{'kNN top-1':>10} {'linear final':>13} "
                     f"{'linear best':>12}")
        for label, s in rows:
            lin = s.get("linear") or {}
            lines.append(f"{label:<{width}}{_fmt(s.get('knn_top1')):>10} "
                         f"{_fmt(lin.get('final_top1')):>13} {_fmt(lin.get('best_top1')):>12}")
        lines.append(_verdict(rows, label_factor))
    factors = list(rows[0][1].get("factors") or {})
    if factors:
        lines += ["", "per generative factor, kNN / linear top-1 (%):",
                  f"{'factor':<12}{'classes':>8}" + "".join(f"{label:>16}" for label, _ in rows)]
        for f in factors:
            classes = rows[0][1]["factors"][f]["num_classes"]
            lines.append(f"{f:<12}{classes:>8}" + "".join(
                f"{_pair((s.get('factors') or {}).get(f, {})):>16}" for _, s in rows))
    probes = list(rows[0][1].get("probes") or {})
    if probes:
        domain = rows[0][1].get("domain_factor")
        lines += ["factor probes on the frozen codes, test accuracy (%) (the domain: lower is "
                  "more invariant):",
                  f"{'factor':<18}{'chance':>8}" + "".join(f"{label:>16}" for label, _ in rows)]
        for f in probes:
            first = rows[0][1]["probes"][f]
            if "accuracy" not in first:
                continue
            name = f"{f} (domain)" if f == domain else f
            accs = [((s.get("probes") or {}).get(f) or {}).get("accuracy") for _, s in rows]
            lines.append(f"{name:<18}{100 * first['chance']:>8.1f}" + "".join(
                f"{_fmt(None if a is None else 100 * a):>16}" for a in accs))
    return "\n".join(lines)


def _verdict(rows: list[tuple[str, dict]], label_factor: str) -> str:
    """Which run is best on the label by kNN and by linear probe, and by how much it beats the
    untrained network."""
    def score(s, key):
        return s.get("knn_top1") if key == "kNN" else (s.get("linear") or {}).get("final_top1")

    what = f" ({label_factor})" if label_factor else ""
    parts = []
    for key in ("kNN", "linear"):
        scored = [(score(s, key), label) for label, s in rows if score(s, key) is not None]
        if not scored:
            continue
        best, winner = max(scored)
        text = f"{key}: {winner} ({best:.2f})"
        init = next((score(s, key) for label, s in rows if label == "random init"), None)
        if init is not None and winner != "random init":
            text += f", {best - init:+.2f} over random init"
        parts.append(text)
    return f"best on the label{what}: " + "; ".join(parts) if parts else ""


def plot_comparison(rows: list[tuple[str, dict]], path: Path, title: str) -> bool:
    """One figure for a comparison: kNN top-1 over epochs of each trained run (the untrained
    network as a dashed line) and the kNN / linear accuracy per generative factor as bars; False
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    factors = list(rows[0][1].get("factors") or {})
    fig, axes = plt.subplots(1, 3 if factors else 1, figsize=(16 if factors else 6, 4),
                             squeeze=False)
    ax = axes[0][0]
    probes = [f for f, r in (rows[0][1].get("probes") or {}).items() if "accuracy" in r]
    if probes and not any(s.get("knn_curve") or s.get("knn_top1") is not None for _, s in rows):
        step = 0.8 / len(rows)
        for i, (label, s) in enumerate(rows):
            accs = [100 * ((s.get("probes") or {}).get(f) or {}).get("accuracy", 0.0)
                    for f in probes]
            ax.bar([j + i * step for j in range(len(probes))], accs, width=step, label=label)
        chance = [100 * rows[0][1]["probes"][f]["chance"] for f in probes]
        ax.scatter([j + 0.4 - step / 2 for j in range(len(probes))], chance, marker="_",
                   s=300, color="black", label="chance", zorder=3)
        domain = rows[0][1].get("domain_factor")
        ax.set_xticks([j + 0.4 - step / 2 for j in range(len(probes))],
                      [f"{f}\n(domain)" if f == domain else f for f in probes], fontsize=7)
        ax.set_title("factor probes on the frozen codes (%)")
        ax.legend(fontsize=8)
    else:
        for label, s in rows:
            curve = s.get("knn_curve") or []
            if curve:
                ax.plot(*zip(*curve), marker="o", label=label)
            elif s.get("knn_top1") is not None:
                ax.axhline(s["knn_top1"], linestyle="--", color="grey", label=label)
        ax.set_title("kNN top-1 on the label (%)")
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax, key, name in ((axes[0][1], "knn_top1", "kNN"), (axes[0][2], "linear_top1", "linear")
                          ) if factors else ():
        step = 0.8 / len(rows)
        for i, (label, s) in enumerate(rows):
            values = [(s.get("factors") or {}).get(f, {}).get(key) or 0.0 for f in factors]
            ax.bar([j + i * step for j in range(len(factors))], values, width=step, label=label)
        ax.set_xticks([j + 0.4 - step / 2 for j in range(len(factors))], factors)
        ax.set_title(f"{name} top-1 per generative factor (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    _save(plt, fig, path, title)
    return True
