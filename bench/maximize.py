"""Maximisation benchmark: one full offline partition optimisation, official-style vs fastipirm.

    python -m bench maximize [--num-samples 105000] [--arch resnet50] [--epochs 61]
                             [--stop-rule fixed|official] [--official-epochs E] [--device cuda]

Both implementations do the two phases of the official ``train_update_split`` with
``--offline --random_init`` on the same model weights, the same random source
images and the same initial Theta ~ N(0, 1):

1. **extraction**: the normalised projections of one augmented view pair per image, model in
   eval mode under ``no_grad``;
2. **optimisation**: dense Adam (lr 0.5, MultiStepLR [5, 35] x 0.2 per epoch) on the N x K logits,
   shuffled feature batches of ``--feature-batch`` (3096) without drop_last, the soft loss and
   per-slot penalty per environment, the balance constraint, the best epoch's Theta kept.

``official``: the PIL pipeline in ``--workers`` DataLoader workers (extract batch 3096, dataset
order), an fp32 forward per view, the features moved to the host; then ``auto_split_offline``
re-created eagerly (:func:`official_auto_split`): a DataLoader with ``--workers`` workers over the
host feature bank, per batch and per environment the ``2B x (2B-1)`` logits with their slot map,
the soft loss, the per-slot penalty by ``autograd.grad(create_graph=True)``, and the official
``.item()`` reads; the logits and slot map are the official construction with its masks made on
the host (:func:`fastipirm.ops.reference.official_logits` with ``host_masks``). ``fastipirm``:
:func:`fastipirm.partition.extract_views` (resident images, batched torch augmentation, bf16
autocast and channels_last on CUDA) and :func:`fastipirm.partition.optimize_partition` (one
fused soft op call per batch). Both draw Theta's initial values and the batch order from the
same :mod:`fastipirm.seeding` streams.

Fairness: both run the same number of epochs and Adam steps. ``--stop-rule fixed`` (default)
runs exactly ``--epochs`` epochs in both (61 = the official maximum, epochs 0..60);
``--stop-rule official`` applies the official rule (stop after epoch e when e > 50 and 5 epochs
without improvement, or e = 60) to each, and the record compares seconds per epoch as well.
``--official-epochs E`` times only E epochs of the official loop and scales its optimisation
time to the epoch count of fastipirm (per-epoch work is constant); the record says so. Timing is
wall-clock with device synchronisation, after one untimed warm-up of both on a small subset. The
target (:mod:`bench.targets`): fastipirm's whole maximisation at N = 105,000 within 10 s.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastipirm.ops.reference import official_logits
from fastipirm.runtime import AMP_MODES
from fastipirm.seeding import Stream, derived_generator

from .harness import device_and_defaults, figure, random_images, sync
from .official_step import official_cudnn
from .targets import report

GPU_DEFAULTS = dict(arch="resnet50", width=64, num_samples=105_000, feature_batch=3096,
                    extract_batch=3096, epochs=61)
CPU_DEFAULTS = dict(arch="resnet18", width=8, num_samples=512, feature_batch=128,
                    extract_batch=128, epochs=3)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``bench.maximize`` (``None`` defaults resolve per device in :func:`run`)."""
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--arch", choices=["resnet50", "resnet18"], default=None,
                    help="default: resnet50 on CUDA, resnet18 on CPU")
    ap.add_argument("--width", type=int, default=None,
                    help="ResNet base width (default: 64 official on CUDA, 8 on CPU)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="N images (default: 105000 = STL-10 train+unlabeled on CUDA, 512 on CPU)")
    ap.add_argument("--source-size", type=int, default=96, help="source image side (STL: 96)")
    ap.add_argument("--crop", type=int, default=32, help="RandomResizedCrop output size")
    ap.add_argument("--feature-batch", type=int, default=None,
                    help="Theta optimisation batch (default: 3096 official on CUDA, 128 on CPU)")
    ap.add_argument("--extract-batch", type=int, default=None,
                    help="feature extraction batch (default: 3096 official on CUDA, 128 on CPU)")
    ap.add_argument("--envs", type=int, default=2, help="environments K")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs of both with --stop-rule fixed (default: 61 on CUDA, 3 on CPU)")
    ap.add_argument("--stop-rule", choices=["fixed", "official"], default="fixed")
    ap.add_argument("--official-epochs", type=int, default=None,
                    help="time only this many official epochs and scale to fastipirm's count")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of 'official'")
    ap.add_argument("--amp", choices=AMP_MODES, default="bf16",
                    help="fastipirm's extraction autocast on CUDA (none on CPU)")
    ap.add_argument("--official-cudnn", choices=["official", "benchmark"], default="official",
                    help="official: deterministic cudnn without benchmark (official set_seed)")
    ap.add_argument("--skip", nargs="*", choices=["official", "fastipirm"], default=[])
    ap.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------------------------
# the official-style implementation


def official_soft_loss(logits: torch.Tensor, slot_weight: torch.Tensor) -> torch.Tensor:
    """``soft_contrastive_loss(mode='v2')``: reweighted softmax of every row, anchor-weighted mean.

    ``slot_weight`` is the environment probability of the sample in every logit slot; column 0
    (the anchor's own sample) weights the anchor, the other columns the negatives (renormalised
    to ``2B-2`` per row).
    """
    slots = logits.shape[1]
    anchor, negative = torch.split(slot_weight, [1, slots - 1], dim=1)
    negative = negative / negative.sum(1, keepdim=True) * (slots - 1)
    weights = torch.cat([torch.ones_like(anchor), negative], dim=1)
    weighted = weights * logits.exp()
    prob = weighted / weighted.sum(1, keepdim=True)
    per_anchor = F.nll_loss(torch.log(prob), torch.zeros(logits.shape[0], dtype=torch.long,
                                                         device=logits.device), reduction="none")
    return (per_anchor * anchor.squeeze()).sum() / anchor.sum()


def official_entropy(prob: torch.Tensor, dim: int) -> torch.Tensor:
    return -(prob * prob.log()).sum(dim=dim)


def official_objective(f1: torch.Tensor, f2: torch.Tensor, theta_rows: torch.Tensor, *,
                       temperature: float, irm_temperature: float, irm_weight: float,
                       constrain_relax: bool = True) -> tuple[torch.Tensor, list]:
    """One batch of ``auto_split_offline`` (``irm_mode='v1'``, ``--constrain``): the risk.

    Per environment the logits and slot map are rebuilt (as the official loop does), the soft
    loss at ``temperature`` and the squared per-slot gradient of the soft loss at
    ``irm_temperature`` (``create_graph``). Returns the risk and the tensors the official code
    reads back with ``.item()`` (risk, -loss, -penalty, constraint).
    """
    q = F.softmax(theta_rows, dim=-1)
    losses, penalties = [], []
    for env in range(q.shape[1]):
        logits, slots = official_logits(torch.cat([f1, f2]), host_masks=True)
        weight = q[:, env][slots]
        losses.append(official_soft_loss(logits / temperature, weight))
        scale = torch.ones((1, logits.shape[-1]), dtype=logits.dtype).to(logits.device)
        scale.requires_grad_()
        scaled = official_soft_loss(logits / irm_temperature * scale, weight)
        grad = torch.autograd.grad(scaled, [scale], create_graph=True)[0]
        penalties.append(torch.sum(grad ** 2))
    loss, penalty = torch.stack(losses).mean(), torch.stack(penalties).mean()
    risk = -(loss + irm_weight * penalty)
    h = official_entropy(q.mean(0), dim=0)
    constraint = torch.relu(0.6365 - h) if constrain_relax else -h
    risk = risk + constraint
    return risk, [risk, -loss, -penalty, constraint]


class FeatureBank(torch.utils.data.Dataset):
    """``update_split_dataset``: ``(feature1[i], feature2[i], i)`` per index of host tensors."""

    def __init__(self, f1: torch.Tensor, f2: torch.Tensor):
        self.f1, self.f2 = f1, f2

    def __len__(self):
        return self.f1.shape[0]

    def __getitem__(self, index):
        return self.f1[index], self.f2[index], index


def official_auto_split(f1: torch.Tensor, f2: torch.Tensor, init: torch.Tensor, *,
                        device, temperature: float = 0.5, irm_temperature: float = 0.5,
                        irm_weight: float = 0.5, batch_size: int = 3096, workers: int = 4,
                        min_epochs: int = 50, patience: int = 5, max_epochs: int = 60,
                        stop_after: Optional[int] = None,
                        generator: Optional[torch.Generator] = None) -> dict:
    """``auto_split_offline`` re-created: returns best Theta, epochs run, Adam steps, history.

    ``f1``, ``f2``: host feature banks (N, D). Stops after epoch e when ``(e > min_epochs and
    cnt >= patience) or e == max_epochs``, or after ``stop_after`` epochs (partial timing).
    """
    device = torch.device(device)
    theta = init.detach().clone().to(device).requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.5, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [5, 35], gamma=0.2)
    loader = torch.utils.data.DataLoader(FeatureBank(f1, f2), batch_size=batch_size,
                                         shuffle=True, num_workers=workers, generator=generator)
    best, best_epoch, cnt, steps = 1e5, 0, 0, 0
    best_theta = theta.detach().clone()
    history = []
    epoch = 0
    while True:
        risks = []
        for b1, b2, idx in loader:
            b1, b2 = b1.to(device), b2.to(device)
            risk, logged = official_objective(b1, b2, theta[idx], temperature=temperature,
                                              irm_temperature=irm_temperature,
                                              irm_weight=irm_weight)
            opt.zero_grad()
            risk.backward()
            opt.step()
            steps += 1
            values = [t.item() for t in logged]        # the official progress line
            risks.append(values[0])
        sched.step()
        mean = sum(risks) / len(risks)
        history.append(mean)
        if mean < best:
            best, best_epoch, cnt = mean, epoch, 0
            best_theta = theta.detach().clone()
        else:
            cnt += 1
        if (epoch > min_epochs and cnt >= patience) or epoch >= max_epochs:
            break
        if stop_after is not None and epoch + 1 >= stop_after:
            break
        epoch += 1
    return {"logits": best_theta, "best_epoch": best_epoch, "epochs_run": epoch + 1,
            "adam_steps": steps, "history": history}


@torch.no_grad()
def official_extract(model: torch.nn.Module, images: np.ndarray, *, device, batch_size: int,
                     workers: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offline feature bank: PIL views in DataLoader workers, fp32 forwards, host features."""
    from .official_style import OfficialPairDataset

    loader = torch.utils.data.DataLoader(OfficialPairDataset(images, out_size=crop),
                                         batch_size=batch_size, shuffle=False,
                                         num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    model.eval()
    bank1, bank2 = [], []
    for pos_1, pos_2, _, _ in loader:
        bank1.append(model(pos_1.to(device, non_blocking=True))[1].cpu())
        bank2.append(model(pos_2.to(device, non_blocking=True))[1].cpu())
    return torch.cat(bank1), torch.cat(bank2)


# ----------------------------------------------------------------------------------------------
# the benchmark


def _resolve(args: argparse.Namespace) -> dict:
    device, opts = device_and_defaults(args, GPU_DEFAULTS, CPU_DEFAULTS)
    opts.update(device=device, source_size=args.source_size, crop=args.crop, envs=args.envs,
                stop_rule=args.stop_rule, official_epochs=args.official_epochs,
                workers=args.workers, amp=args.amp, skip=list(args.skip), seed=args.seed,
                official_cudnn=args.official_cudnn == "official")
    if opts["envs"] != 2:
        raise ValueError("--envs: the official balance constant 0.6365 is defined for K = 2 only")
    if opts["epochs"] < 1:
        raise ValueError(f"--epochs must be >= 1, got {opts['epochs']}")
    if opts["official_epochs"] is not None and opts["official_epochs"] < 1:
        raise ValueError(f"--official-epochs must be >= 1, got {opts['official_epochs']}")
    if opts["num_samples"] < 2:
        raise ValueError(f"--num-samples must be >= 2, got {opts['num_samples']}")
    if opts["stop_rule"] == "fixed":   # exactly `epochs` epochs: stop at index epochs-1
        opts["rule"] = dict(min_epochs=50, patience=10**9, max_epochs=opts["epochs"] - 1)
    else:
        opts["rule"] = dict(min_epochs=50, patience=5, max_epochs=60)
    return opts


class _Clock:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


LOSS = dict(temperature=0.5, irm_temperature=0.5, irm_weight=0.5)


def _order(opts: dict) -> torch.Generator:
    """The feature-batch order of the Theta optimisation (the same stream for both)."""
    return derived_generator(opts["seed"], Stream.THETA_ORDER, 0)     # the trainer's epoch 0


def _official(model, images, theta0, opts) -> dict:
    device = opts["device"]
    n_warm = min(len(images), opts["feature_batch"] + len(images) % opts["feature_batch"])
    with official_cudnn(opts["official_cudnn"]):
        # warm-up (untimed): one extraction batch and one epoch on a subset
        w1, w2 = official_extract(model, images[:min(len(images), opts["extract_batch"])],
                                  device=device, batch_size=opts["extract_batch"], workers=0,
                                  crop=opts["crop"])
        official_auto_split(w1[:n_warm].repeat(-(-n_warm // len(w1)), 1)[:n_warm],
                            w2[:n_warm].repeat(-(-n_warm // len(w2)), 1)[:n_warm],
                            theta0[:n_warm], device=device, batch_size=opts["feature_batch"],
                            workers=0, max_epochs=0, **LOSS)
        with _Clock(device) as extract:
            f1, f2 = official_extract(model, images, device=device,
                                      batch_size=opts["extract_batch"], workers=opts["workers"],
                                      crop=opts["crop"])
        with _Clock(device) as optimise:
            res = official_auto_split(f1, f2, theta0, device=device,
                                      batch_size=opts["feature_batch"],
                                      workers=opts["workers"], stop_after=opts["official_epochs"],
                                      generator=_order(opts),
                                      **LOSS, **opts["rule"])
    return {"impl": "official", "n": len(images), "extract_s": extract.seconds,
            "optimize_s": optimise.seconds, "epochs_run": res["epochs_run"],
            "adam_steps": res["adam_steps"], "best_epoch": res["best_epoch"],
            "seconds_per_epoch": optimise.seconds / res["epochs_run"]}


def _fastipirm(model, cfg, images, theta0, opts) -> dict:
    from fastipirm.data import ArrayDataset, IndexedLoader, TwoViewAugment
    from fastipirm.partition import extract_views, optimize_partition
    from fastipirm.runtime import autocast_factory, place_model

    device = opts["device"]
    n = len(images)
    model = place_model(model, cfg, device)            # as the trainer: channels_last
    channels_last = cfg.model.channels_last
    autocast = autocast_factory(device, opts["amp"])
    augment = TwoViewAugment(out_size=opts["crop"]).to(device)
    generator = derived_generator(opts["seed"], Stream.AUGMENT, device=device)
    data = ArrayDataset(images=images, labels=None, num_classes=0, name="bench")
    loader = IndexedLoader(data, opts["extract_batch"], seed=opts["seed"], shuffle=False,
                           drop_last=False, device=device)
    n_warm = min(n, opts["feature_batch"] + n % opts["feature_batch"])
    kwargs = dict(**LOSS, batch_size=opts["feature_batch"])
    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"      # as the trainer sets it
    try:
        # warm-up (untimed): extraction kernels and the soft op at both batch shapes
        small = IndexedLoader(ArrayDataset(images=images[:min(n, opts["extract_batch"])],
                                           labels=None, num_classes=0, name="warm"),
                              opts["extract_batch"], seed=0, shuffle=False, drop_last=False,
                              device=device)
        w1, w2 = extract_views(model, small, augment, num_samples=len(small.dataset),
                               device=device, generator=generator, autocast=autocast,
                               channels_last=channels_last)
        reps = -(-n_warm // len(w1))
        optimize_partition(w1.repeat(reps, 1)[:n_warm], w2.repeat(reps, 1)[:n_warm],
                           theta0[:n_warm], max_epochs=0, **kwargs)
        with _Clock(device) as extract:
            z1, z2 = extract_views(model, loader, augment, num_samples=n, device=device,
                                   generator=generator, autocast=autocast,
                                   channels_last=channels_last)
        with _Clock(device) as optimise:
            res = optimize_partition(z1, z2, theta0, **kwargs, **opts["rule"],
                                     generator=_order(opts))
    finally:
        torch.backends.cudnn.benchmark = cudnn
    steps = res.epochs_run * math.ceil(n / opts["feature_batch"])
    return {"impl": "fastipirm", "n": n, "extract_s": extract.seconds,
            "optimize_s": optimise.seconds, "epochs_run": res.epochs_run, "adam_steps": steps,
            "best_epoch": res.best_epoch, "seconds_per_epoch": optimise.seconds / res.epochs_run}


def run(args: argparse.Namespace) -> dict:
    """Run both implementations; returns the record (not saved)."""
    from fastipirm.partition import initial_logits
    from fastipirm.runtime import build_model

    from .step import config

    opts = _resolve(args)
    device, n = opts["device"], opts["num_samples"]
    images = random_images(n, opts["source_size"], opts["seed"])
    cfg = config(opts["arch"], width=opts["width"], batch=opts["extract_batch"], amp=opts["amp"])
    torch.manual_seed(opts["seed"])
    model = build_model(cfg).to(device)
    theta0 = initial_logits(n, opts["envs"], random_init=True, previous=None,
                            generator=derived_generator(opts["seed"], Stream.THETA_INIT, 0),
                            device=device)
    rows = []
    fast = None
    if "fastipirm" not in opts["skip"]:
        fast = _fastipirm(copy.deepcopy(model), cfg, images, theta0, opts)
        rows.append(fast)
    if "official" not in opts["skip"]:
        off = _official(copy.deepcopy(model), images, theta0, opts)
        timed = off["epochs_run"]
        if opts["official_epochs"] is not None:
            target = fast["epochs_run"] if fast is not None else opts["rule"]["max_epochs"] + 1
            if timed < target:       # constant work per epoch: scale to the compared count
                off.update(optimize_s=off["seconds_per_epoch"] * target, epochs_run=target,
                           adam_steps=off["adam_steps"] // timed * target,
                           extrapolated_from_epochs=timed)
        rows.append(off)
    for r in rows:
        r["seconds"] = r["extract_s"] + r["optimize_s"]       # the whole maximisation
    ratios = {}
    if len(rows) == 2:
        f, o = rows
        ratios = {"total": o["seconds"] / f["seconds"], "extract": o["extract_s"] / f["extract_s"],
                  "optimize": o["optimize_s"] / f["optimize_s"],
                  "optimize_per_epoch": (o["optimize_s"] / o["epochs_run"])
                  / (f["optimize_s"] / f["epochs_run"]),
                  "same_epochs": o["epochs_run"] == f["epochs_run"],
                  "same_adam_steps": o["adam_steps"] == f["adam_steps"]}
    return {
        "benchmark": "maximize", "device": device.type, "n": n,
        "figures": ("GPU figures" if device.type == "cuda" else
                    "CPU figures at small sizes: not GPU figures, for a smoke run only"),
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in opts.items()},
        "official_pipeline": f"PIL, {opts['workers']} DataLoader workers; fp32",
        "amp": opts["amp"] if device.type == "cuda" else "none",
        "rows": rows, "ratios": ratios,
    }


def figures(record: dict) -> dict:
    """``maximize/<impl>_seconds`` (extraction + optimisation) of every row and
    ``maximize/fastipirm_over_official`` (the speed-up; see ``bench.baselines``)."""
    seconds = {r["impl"]: r["seconds"] for r in record.get("rows", [])
               if r.get("seconds") is not None}
    out = {f"maximize/{name}_seconds": figure(s, False) for name, s in seconds.items()}
    if seconds.get("fastipirm") and seconds.get("official") is not None:
        out["maximize/fastipirm_over_official"] = figure(
            seconds["official"] / seconds["fastipirm"], True)
    return out


def format_table(record: dict) -> str:
    """The rows and ratios of a record as text."""
    s = record["settings"]
    lines = [f"partition maximisation on {record['device']} ({record['figures']}): N "
             f"{s['num_samples']}, {s['arch']} width {s['width']}, feature batch "
             f"{s['feature_batch']}, stop rule {s['stop_rule']}",
             f"{'implementation':<15} {'extract s':>10} {'optimise s':>11} {'total s':>9} "
             f"{'epochs':>7} {'Adam steps':>11} {'s/epoch':>8}"]
    for r in record["rows"]:
        note = (f"  (optimisation scaled from {r['extrapolated_from_epochs']} timed epochs)"
                if r.get("extrapolated_from_epochs") else "")
        lines.append(f"{r['impl']:<15} {r['extract_s']:>10.2f} {r['optimize_s']:>11.2f} "
                     f"{r['seconds']:>9.2f} {r['epochs_run']:>7} {r['adam_steps']:>11} "
                     f"{r['seconds_per_epoch']:>8.3f}{note}")
    q = record["ratios"]
    if q:
        lines.append(f"official / fastipirm: total {q['total']:.2f}x, extraction "
                     f"{q['extract']:.2f}x, optimisation {q['optimize']:.2f}x (per epoch "
                     f"{q['optimize_per_epoch']:.2f}x); same epochs: {q['same_epochs']}, "
                     f"same Adam steps: {q['same_adam_steps']}")
    return "\n".join(lines + report(record))

