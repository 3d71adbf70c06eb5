"""Loader benchmark: two-view augmented samples per second of each pipeline, and what a step eats.

    python -m bench.loader [--out-sizes 32 96] [--source-size 96] [--batch 256] [--batches 10]
                           [--arch resnet50] [--device cuda]
    fastipirm bench loader [options]

In one process and one run, for every output size:

* ``official``: per-image PIL transforms in 4 DataLoader workers (``bench.official_style``), the
  official pipeline;
* ``torch``: :class:`fastipirm.data.IndexedLoader` + the batched :class:`TwoViewAugment` on the
  device;
* ``dali``: :class:`fastipirm.data.dali.DaliTwoViewLoader` on the device (``device_id=None`` on a
  CPU), when NVIDIA DALI is installed;
* ``step``: the samples per second one IP-IRM minimisation step consumes (SimCLR model forward of
  both views, ``minimization_loss`` with one partition of 2 environments, backward, Adam step;
  bf16 autocast and channels_last on a GPU) on random inputs of that size.

A sample is one image turned into its two views. The source images are random uint8 arrays of
``source-size`` pixels (STL-10 is 96). Prints a table with each pipeline's rate and its ratio to
the step's consumption, and writes a JSON record to ``bench/results/``. Each rate is the batch
size over the mean time of one batch (``bench.harness.measure``, one warm-up batch).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from fastipirm.data import ArrayDataset, IndexedLoader, TwoViewAugment
from fastipirm.data.dali import DaliTwoViewLoader, dali_available

from .harness import measure

NAME = "loader"
PIPELINES = ("official", "torch", "dali", "step")


def _rate(batches, batch_size, warmup, count, device) -> float:
    """Samples per second of an iterator of batches: the batch size over the mean batch time."""
    it = iter(batches)
    res = measure(lambda i: next(it), device=str(device), warmup=warmup, repeats=count)
    return batch_size / (res["mean_ms"] * 1e-3)


def official_rate(images, batch, out_size, batches, workers):
    from .official_style import official_loader
    loader = official_loader(images, batch_size=batch, workers=workers, out_size=out_size)

    def gen():
        while True:                     # epochs after epoch, as the training loop iterates
            yield from loader

    return _rate(gen(), batch, 1, batches, "cpu")


def torch_rate(images, batch, out_size, batches, device):
    data = ArrayDataset(images=images, labels=None, num_classes=0, name="bench")
    loader = IndexedLoader(data, batch, seed=0, device=device)
    aug = TwoViewAugment(out_size=out_size).to(device)

    def gen():
        while True:
            for _, x in loader:
                yield aug(x)

    return _rate(gen(), batch, 1, batches, device)


def dali_rate(images, batch, out_size, batches, device, dtype):
    loader = DaliTwoViewLoader(images, batch, seed=0, device=device, out_size=out_size, dtype=dtype,
                               resident=device.type == "cuda")

    def gen():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    return _rate(gen(), batch, 1, batches, device)


def step_rate(arch, width, batch, out_size, batches, device):
    from fastipirm.models import SimCLRModel
    from fastipirm.objectives import minimization_loss

    model = SimCLRModel(arch=arch, width=width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    amp = device.type == "cuda"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    x1 = torch.randn(batch, 3, out_size, out_size, device=device)
    x2 = torch.randn_like(x1)
    if amp:
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    member = (torch.rand(batch, device=device) < 0.5).float()
    memberships = torch.stack([member, 1 - member], 1)

    def gen():
        while True:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, z1 = model(x1)
                _, z2 = model(x2)
            loss, _ = minimization_loss(z1.float(), z2.float(), memberships, temperature=0.5,
                                        irm_temperature=0.5, penalty_weight=0.2, keep_cont=True,
                                        check_values=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            yield

    return _rate(gen(), batch, 1, batches, device)


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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    for label, value in (("--source-size", args.source_size), ("--num-images", args.num_images),
                         ("--batch", args.batch), ("--batches", args.batches)):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    if args.num_images < args.batch:
        raise ValueError(f"--num-images ({args.num_images}) must be at least --batch "
                         f"({args.batch}): the loaders drop the last incomplete batch")
    images = np.random.default_rng(0).integers(
        0, 256, (args.num_images, args.source_size, args.source_size, 3), dtype=np.uint8)
    has_dali, dali_detail = dali_available()
    rows = []
    for size in args.out_sizes:
        rates = {}
        if "official" not in args.skip:
            rates["official"] = official_rate(images, args.batch, size, args.batches, args.workers)
        if "torch" not in args.skip:
            rates["torch"] = torch_rate(images, args.batch, size, args.batches, device)
        if "dali" not in args.skip and has_dali:
            rates["dali"] = dali_rate(images, args.batch, size, args.batches, device, torch.float32)
        if "step" not in args.skip:
            rates["step"] = step_rate(args.arch, args.width, args.batch, size, args.batches, device)
        for name, rate in rates.items():
            rows.append({"out_size": size, "pipeline": name, "samples_per_s": rate,
                         "vs_step": rate / rates["step"] if "step" in rates else None})
    record = {"benchmark": NAME, "device": str(device), "dali": dali_detail,
              "args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}
    return record


def figures(record: dict) -> dict:
    """``loader/<size>px/<pipeline>/samples_per_s`` and ``.../vs_step`` (higher is better)."""
    out = {}
    for r in record["rows"]:
        for metric in ("samples_per_s", "vs_step"):
            if r.get(metric) is not None and not (metric == "vs_step" and r["pipeline"] == "step"):
                out[f"{NAME}/{r['out_size']}px/{r['pipeline']}/{metric}"] = {
                    "value": r[metric], "higher_is_better": True}
    return out


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
    return "\n".join(lines)


def main(argv=None) -> dict:
    """``python -m bench.loader``: run, print the table, save the record unless ``--no-save``."""
    import sys

    from .harness import module_main
    return module_main(NAME, sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
