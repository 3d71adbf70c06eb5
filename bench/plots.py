"""PNG charts of benchmark records (``python -m bench ... --plot``), written next to the JSON.

* ``kernels``: median fwd+bwd time against 2B per implementation (log-log), one panel per
  (mode, M); and peak memory against 2B (CUDA runs only: the CPU has no memory figure);
* ``masked``: median fwd+bwd time and peak memory against B per implementation (log-log), one
  panel per form (``clica-l1``, ..., ``dcodr``, ``mixup``);
* ``loader``, ``step``, ``maximize``: a bar chart of the rates (samples/s, images/s, seconds);
* ``all``: the charts of each part.

matplotlib is optional (``pip install matplotlib``).
"""
from __future__ import annotations

from pathlib import Path


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib, which is not installed: "
                          "pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, groups: dict, ylabel: str, title: str, path: Path,
            xlabel: str = "2B (rows of the similarity)") -> Path:
    """One log-log panel per group: ``{panel title: {line label: [(x, y), ...]}}``; a label has
    the same colour in every panel."""
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    labels = list(dict.fromkeys(label for lines in groups.values() for label in lines))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, lines) in zip(axes[0], groups.items()):
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label,
                    color=cycle[labels.index(label) % len(cycle)])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _kernels(plt, record: dict, stem: Path) -> list[Path]:
    times, memory = {}, {}
    for r in record["rows"]:
        if r.get("status") != "ok":
            continue
        panel = f"{r['mode']}, M={r['envs']}"
        times.setdefault(panel, {}).setdefault(r["impl"], []).append((r["n"], r["median_ms"]))
        if r.get("peak_mib") is not None:
            memory.setdefault(panel, {}).setdefault(r["impl"], []).append((r["n"], r["peak_mib"]))
    if not times:
        raise ValueError("the kernels record has no successful row to plot")
    where = f"{record['device']}, D={record['dim']}, {record['dtype']}"
    paths = [_panels(plt, times, "median fwd+bwd time (ms)", f"env_contrastive_loss time ({where})",
                     stem.with_name(stem.name + "_time.png"))]
    if memory:
        paths.append(_panels(plt, memory, "peak memory above the inputs (MiB)",
                             f"env_contrastive_loss peak memory ({where})",
                             stem.with_name(stem.name + "_memory.png")))
    return paths


def _masked(plt, record: dict, stem: Path) -> list[Path]:
    """Time and (where measured) peak memory against B, one panel per form, one line per
    implementation (official, dense-masked, ours-<backend>)."""
    from .masked import impl_key

    times, memory = {}, {}
    for r in record["rows"]:
        if r.get("status") != "ok":
            continue
        panel = r["case"].split("/")[0]
        times.setdefault(panel, {}).setdefault(impl_key(r), []).append((r["batch"],
                                                                       r["median_ms"]))
        if r.get("peak_mib"):
            memory.setdefault(panel, {}).setdefault(impl_key(r), []).append((r["batch"],
                                                                            r["peak_mib"]))
    if not times:
        raise ValueError("the masked record has no successful row to plot")
    where = f"{record['device']}, {record['dtype']}"
    paths = [_panels(plt, times, "median fwd+bwd time (ms)",
                     f"masked_contrastive_loss vs official ({where})",
                     stem.with_name(stem.name + "_time.png"), xlabel="B (queries)")]
    if memory:
        paths.append(_panels(plt, memory, "peak memory above the inputs (MiB)",
                             f"masked_contrastive_loss vs official, peak memory ({where})",
                             stem.with_name(stem.name + "_memory.png"), xlabel="B (queries)"))
    return paths


def _bars(plt, labels: list, values: list, ylabel: str, title: str, path: Path) -> Path:
    if not values:
        raise ValueError(f"nothing to plot for {title!r}: no measured values")
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(values) + 2), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rate_bars(plt, record: dict, stem: Path) -> list[Path]:
    name, rows = record["benchmark"], record["rows"]
    path = stem.with_name(stem.name + "_rates.png")
    if name == "loader":
        keep = [r for r in rows if r.get("samples_per_s") is not None]
        return [_bars(plt, [f"{r['out_size']}px {r['pipeline']}" for r in keep],
                      [r["samples_per_s"] for r in keep], "two-view samples/s",
                      f"loader on {record['device']}", path)]
    if name == "step":
        keep = [r for r in rows if r.get("images_per_s") is not None]
        return [_bars(plt, [f"{r['arch']} P={r['partitions']} {r['variant']}" for r in keep],
                      [r["images_per_s"] for r in keep], "images/s (data pipeline included)",
                      f"training step on {record['device']}", path)]
    if name == "maximize":
        keep = [r for r in rows if r.get("seconds") is not None]
        labels = [f"{r.get('impl', '?')} (N={r.get('n', '?')})" for r in keep]
        return [_bars(plt, labels, [r["seconds"] for r in keep], "seconds (extraction + Adam)",
                      f"partition maximisation on {record.get('device', '?')}", path)]
    raise ValueError(f"no chart for a {name!r} record")


def plot_record(record: dict, stem: Path | str) -> list[Path]:
    """Write the PNG charts of ``record`` as ``<stem>_<chart>.png``; return their paths."""
    plt = pyplot()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    name = record.get("benchmark")
    if name == "all":              # a part without a chart does not cost the others theirs
        paths = []
        for part, sub in record.get("parts", {}).items():
            if isinstance(sub, dict) and sub.get("rows"):
                try:
                    paths += plot_record(sub, stem.with_name(f"{stem.name}_{part}"))
                except ValueError as exc:
                    print(f"no chart for {part}: {exc}")
        return paths
    if name == "kernels":
        return _kernels(plt, record, stem)
    if name == "masked":
        return _masked(plt, record, stem)
    return _rate_bars(plt, record, stem)
