"""Loader benchmark: two-view augmented samples per second of each pipeline, and what a step eats.

    python -m bench loader [--out-sizes 32 96] [--source-size 96] [--batch 256] [--batches 10]
                           [--arch resnet50] [--device cuda]

In one process and one run, for every output size:

* ``official``: per-image PIL transforms in 4 DataLoader workers (``bench.official_style``), the
  official pipeline;
* ``torch``: the trainer's views (:class:`fastipirm.data.TwoViewBatches`, ``pipeline="torch"``:
  the index-keyed loader and the batched :class:`~fastipirm.data.TwoViewAugment` on the device);
* ``dali``: the same with ``pipeline="dali"`` (NVIDIA DALI on the device, ``device_id=None`` on
  a CPU), when DALI is installed;
* ``step``: the samples per second one IP-IRM minimisation step consumes: the trainer's step
  (``bench.step.build_method``: model forward of both views, the fused loss with one partition
  of 2 environments, backward, Adam; bf16 autocast and channels_last on a GPU) on fixed random
  inputs of that size.

A sample is one image turned into its two views. The source images are random uint8 arrays of
``source-size`` pixels (STL-10 is 96). Prints a table with each pipeline's rate and its ratio to
the step's consumption (target, :mod:`bench.targets`: DALI at 32 px >= 2x a ResNet-50 step).
Each rate is the batch size over the mean time of one batch (``bench.harness.measure``, one
warm-up batch).
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch

from fastipirm.data import ArrayDataset, TwoViewBatches
from fastipirm.data.dali import dali_available

from .harness import figure, measure, random_images, resolve_device
from .official_style import endless, official_loader, stop_workers
from .targets import report

NAME = "loader"
PIPELINES = ("official", "torch", "dali", "step")


def _rate(batches: Iterator, batch_size: int, count: int, device) -> float:
    """Samples per second of an iterator of batches: the batch size over the mean batch time
    (one untimed warm-up batch)."""
    res = measure(lambda i: next(batches), device=str(device), warmup=1, repeats=count)
    return batch_size / (res["mean_ms"] * 1e-3)


def official_rate(images, batch: int, out_size: int, batches: int, workers: int) -> float:
    loader = official_loader(images, batch_size=batch, workers=workers, out_size=out_size)
    try:
        return _rate(endless(loader), batch, batches, "cpu")
    finally:
        stop_workers(loader)


def views_rate(images, batch: int, out_size: int, batches: int, device, pipeline: str) -> float:
    """The trainer's two-view batches (``pipeline``: torch or dali) epoch after epoch."""
    data = ArrayDataset(images=images, labels=None, num_classes=0, name="bench")
    views = TwoViewBatches(data, batch, seed=0, device=device, pipeline=pipeline,
                           out_size=out_size)
    return _rate(views.forever(), batch, batches, device)


def step_rate(arch: str, width: int, batch: int, out_size: int, batches: int, device) -> float:
    from .step import build_method, config

    cfg = config(arch, width=width, batch=batch, amp="bf16")
    method = build_method(cfg, device, seed=0)
    g = torch.Generator().manual_seed(0)
    method.partitions = torch.randn(1, batch, 2, generator=g).to(device)
    method.penalty_weight = cfg.ipirm.penalty_weight
    indices = torch.arange(batch, device=device)
    x1, x2 = torch.randn(2, batch, 3, out_size, out_size, generator=g).to(device)

    def steps():
        while True:
            yield method.step(indices, x1, x2)

    return _rate(steps(), batch, batches, device)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the loader benchmark."""
    ap.add_argument("--out-sizes", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--source-size", type=int, default=96)
    ap.add_argument("--num-images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=10, help="measured batches per pipeline")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of 'official'")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--width", type=int, default=64, help="ResNet base width of the step model")
    ap.add_argument("--device", default=None,
                    help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--skip", nargs="*", default=[], choices=PIPELINES)


def run(args: argparse.Namespace) -> dict:
    """Measure every pipeline at every output size; return the record (not saved)."""
    device = resolve_device(args.device)
    for label, value in (("--source-size", args.source_size), ("--num-images", args.num_images),
                         ("--batch", args.batch), ("--batches", args.batches)):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    if args.num_images < args.batch:
        raise ValueError(f"--num-images ({args.num_images}) must be at least --batch "
                         f"({args.batch}): the loaders drop the last incomplete batch")
    images = random_images(args.num_images, args.source_size, 0)
    has_dali, dali_detail = dali_available()
    rows = []
    for size in args.out_sizes:
        rates = {}
        if "official" not in args.skip:
            rates["official"] = official_rate(images, args.batch, size, args.batches, args.workers)
        if "torch" not in args.skip:
            rates["torch"] = views_rate(images, args.batch, size, args.batches, device, "torch")
        if "dali" not in args.skip and has_dali:
            rates["dali"] = views_rate(images, args.batch, size, args.batches, device, "dali")
        if "step" not in args.skip:
            rates["step"] = step_rate(args.arch, args.width, args.batch, size, args.batches, device)
        for name, rate in rates.items():
            rows.append({"out_size": size, "pipeline": name, "samples_per_s": rate,
                         "vs_step": rate / rates["step"] if "step" in rates else None})
    record = {"benchmark": NAME, "device": str(device), "dali": dali_detail,
              "args": dict(vars(args)), "rows": rows}
    return record


def figures(record: dict) -> dict:
    """``loader/<size>px/<pipeline>/samples_per_s`` and ``.../vs_step`` (higher is better)."""
    return {f"{NAME}/{r['out_size']}px/{r['pipeline']}/{metric}": figure(r[metric], True)
            for r in record["rows"] for metric in ("samples_per_s", "vs_step")
            if r.get(metric) is not None and not (metric == "vs_step" and r["pipeline"] == "step")}


def format_table(record: dict) -> str:
    """The record as a text table."""
    a = record["args"]
    lines = [f"two-view samples/s on {record['device']} (source {a['source_size']}px, batch "
             f"{a['batch']}, step model {a['arch']} width {a['width']}); DALI: {record['dali']}",
             f"{'size':>5} {'pipeline':<9} {'samples/s':>11} {'x step':>8}"]
    for r in record["rows"]:
        ratio = f"{r['vs_step']:.2f}" if r["vs_step"] is not None else "-"
        lines.append(f"{r['out_size']:>5} {r['pipeline']:<9} {r['samples_per_s']:>11.1f} "
                     f"{ratio:>8}")
    return "\n".join(lines + report(record))

