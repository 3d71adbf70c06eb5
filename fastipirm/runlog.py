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


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar (``update``/``set_postfix``/``close``), or None when progress is off."""
    if not enabled:
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


def plot_curves(history: list, path: Path, title: str) -> bool:
    """Loss (and its parts), IRM penalty, kNN accuracy and partition balance over epochs (panels
    without data stay empty); False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    for a in axes:
        a.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    """Label accuracy (kNN, linear final/best) per method, then kNN/linear per factor if any."""
    lines = [f"{'method':<10} {'kNN top-1':>10} {'linear final':>13} {'linear best':>12}"]
    for label, s in rows:
        lin = s.get("linear") or {}
        lines.append(f"{label:<10} {_fmt(s.get('knn_top1')):>10} "
                     f"{_fmt(lin.get('final_top1')):>13} {_fmt(lin.get('best_top1')):>12}")
    factors = list(rows[0][1].get("factors") or {})
    if factors:
        lines.append("")
        lines.append(f"{'factor':<12} {'classes':>7} " + " ".join(
            f"{label + ' kNN':>12} {label + ' lin':>12}" for label, _ in rows))
        for f in factors:
            cells = []
            for _, s in rows:
                r = (s.get("factors") or {}).get(f, {})
                cells.append(f"{_fmt(r.get('knn_top1')):>12} {_fmt(r.get('linear_top1')):>12}")
            classes = rows[0][1]["factors"][f]["num_classes"]
            lines.append(f"{f:<12} {classes:>7} " + " ".join(cells))
    return "\n".join(lines)
