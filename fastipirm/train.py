"""The training loop, read top to bottom. ``fastipirm train --config configs/stl.toml`` calls
:func:`run`, which calls :func:`train` (then, for a comparison, trains the SimCLR baseline with
``run.compare_baseline`` and evaluates the untrained network with ``run.compare_random``).
:func:`train` runs, in this order:

1. setup: device, seeds, threads (:mod:`fastipirm.runtime`);
2. data: the pretraining split, the labelled evaluation splits, the two-view training batches;
3. model, Adam (``train.lr``, coupled ``train.weight_decay``, no schedule, as the official code),
   AMP, and the method (``method.name``, :mod:`fastipirm.methods`), which owns the step;
4. resume from a checkpoint, or the method's start (IP-IRM: the epoch-0 partition);
5. the epochs: the method's steps, its end of epoch (IP-IRM: maximisation), the kNN monitor
   (CL-ICA: R² and MCC on fresh samples), metrics, checkpoint;
6. the end: curves, the final probes, ``summary.json``.

Host synchronisation: a step never reads a device value; the losses are accumulated on the
device and read every ``run.log_every`` steps (progress, ``steps.csv``, NaN check) and at the end
of the epoch. A non-finite loss raises :class:`TrainingDiverged` before anything is written, so
the last checkpoint on disk is always a good one.

Reproducibility: the batch order is a pure function of (seed, epoch); every random stream
derives from the run seed (:mod:`fastipirm.seeding`); the checkpoint holds the model, optimiser,
scaler, the method's state and every RNG state, so a run resumed on CPU reproduces the
uninterrupted one bit for bit.

Several processes (``torchrun``, ``docs/distributed.md``): every rank walks the same global
batches and makes and trains on its share, the model is wrapped in DDP, the methods gather their
keys from every rank, and rank 0 alone logs, evaluates and writes; world size 1 is the above
unchanged.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import distributed, runtime
from .checkpoint import CHECKPOINT, FORMAT, atomic_save, capture_rng, load_checkpoint, restore_rng
from .config import Config, write_config
from .data.clica_sources import CLICA_SOURCES
from .eval import RunEvaluation, evaluate_initialisation
from .eval.linear import HISTORY_FIELDS
from .methods import METHODS, MethodContext, build_method
from .runlog import (RunLog, comparison_table, plot_comparison, plot_curves, progress_bar,
                     write_csv, write_json)
from .runtime import TrainingDiverged
from .seeding import Stream, derived_generator

# the methods that train under DDP with the global batch's semantics (docs/distributed.md)
DDP_METHODS = ("simclr", "ipirm", "clica", "clica_supervised", "dcodr_norec", "dcodr", "mixup",
               "ipirm_mixup")

EPOCH_TAIL = ["knn_top1", "knn_top5", "r2", "mcc", "img_per_s", "epoch_seconds", "knn_seconds",
              "peak_mem_gb"]


def train(cfg: Config, *, resume: Optional[str] = None, log: Callable[[str], None] = print,
          on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train one run as configured; returns the summary (also written to ``summary.json``).

    ``resume``: a checkpoint file or run directory; training continues after its epoch (``cfg``
    should be the checkpoint's config, :func:`fastipirm.checkpoint.config_from_checkpoint`).
    ``on_epoch_end(epoch, state)`` is called after each epoch's checkpoint.
    """
    # 1. setup -----------------------------------------------------------------------------------
    t, seed = cfg.train, cfg.run.seed
    dinfo = distributed.init_from_env(cfg.run.device)   # world size 1: no process group
    world, main = dinfo.world_size, dinfo.main
    if not main:                                         # rank 0 alone logs and writes
        log = _silent
    device = runtime.setup(cfg)
    if world > 1:
        device = _check_distributed(cfg, device, dinfo)
    progress = cfg.run.progress and main
    autocast = runtime.autocast_factory(device, t.amp)
    out = runtime.run_dir(cfg)
    ckpt_path = out / CHECKPOINT
    label = METHODS[cfg.method.name].label
    log(f"[{cfg.run.name}] {label} on {cfg.data.name}/{cfg.data.split}, device {device}, amp "
        f"{t.amp if runtime.amp_active(device, t.amp) else 'none'}, run dir {out}"
        + (f", {world} processes (global batch {t.batch_size})" if world > 1 else ""))

    # 2. data ------------------------------------------------------------------------------------
    train_set = runtime.load_split(cfg, cfg.data.split)
    memory_set, test_set = runtime.load_eval_splits(cfg, train_set, log)
    aug_gen = derived_generator(seed, Stream.AUGMENT, device=device)
    # several processes: each rank's share of every global batch (a ``global_batch`` method,
    # MixUp, takes the whole batch and its share itself)
    share = (dinfo.rank, world) if world > 1 and not METHODS[cfg.method.name].global_batch \
        else None
    views = runtime.training_views(cfg, train_set, device, aug_gen, shard=share)
    if main:
        out.mkdir(parents=True, exist_ok=True)          # only once the data has loaded
        write_config(cfg, out / "config.toml")

    # 3. model, optimiser, AMP, method -------------------------------------------------------------
    model = runtime.training_model(cfg, device, resuming=bool(resume), log=log)
    forward = plain_forward = torch.compile(model) if cfg.model.compile else model
    if world > 1:                 # DDP: gradients averaged over the ranks (docs/distributed.md)
        if cfg.model.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            forward = plain_forward = torch.compile(model) if cfg.model.compile else model
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        forward = torch.compile(wrapped) if cfg.model.compile else wrapped
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                 betas=tuple(t.betas))
    scaler = runtime.grad_scaler(device, t.amp)
    method = build_method(cfg.method.name, MethodContext(
        cfg, model, optimizer, device, scaler=scaler, forward=forward, autocast=autocast,
        train_set=train_set, augment=views.augment, generator=aug_gen, log=log,
        progress=lambda total, desc: progress_bar(progress, total, desc),
        plain_forward=plain_forward))
    evaluation = RunEvaluation(cfg, memory_set, test_set, device=device, autocast=autocast,
                               augment=views.augment, log=log,
                               source=train_set if cfg.data.name in CLICA_SOURCES else None)

    # 4. resume, or the method's start -------------------------------------------------------------
    start_epoch, step, history = 0, 0, []
    if resume:
        ckpt = load_checkpoint(resume)
        saved_world = ckpt.get("world_size", 1)
        if saved_world != world:
            raise ValueError(f"{resume} was written by a run on {saved_world} process(es); "
                             f"resume it on {saved_world} (this run has {world}): the data "
                             "order and the optimiser state follow the world size")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        method.load_state_dict(ckpt["method"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        restore_rng(ckpt["rng"], device, {"augment": aug_gen})
        log(f"resumed from {resume} after epoch {start_epoch} (step {step})")
    else:
        if ckpt_path.exists():
            log(f"note: {ckpt_path} (an earlier run) will be replaced at this run's first "
                "checkpoint; use --resume to continue it instead")
        method.start()
    metrics = ["loss", *method.metric_names]
    runlog = RunLog(out, ["epoch", "step", *metrics, *method.epoch_fields, *EPOCH_TAIL],
                    ["epoch", "step", *metrics, "img_per_s"], tensorboard=cfg.run.tensorboard,
                    resume_step=step if resume else None, log=log) if main else _NullLog()

    def last_good() -> str:
        return (f"{ckpt_path} (kept unchanged)" if ckpt_path.exists()
                else "none (no checkpoint had been written yet)")

    # 5. the epochs ------------------------------------------------------------------------------
    for epoch in range(start_epoch + 1, t.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        method.begin_epoch(epoch)
        sums = torch.zeros(len(metrics), dtype=torch.float64, device=device)
        steps = len(views)
        bar = progress_bar(progress, steps, f"epoch {epoch}/{t.epochs}")
        last_time, last_i = time.perf_counter(), 0
        for i, (indices, v1, v2) in enumerate(views.epoch(epoch), 1):
            loss, parts = method.step(indices, v1, v2)
            step += 1
            values = torch.stack([loss, *(parts[k] for k in method.metric_names)]).double()
            sums += values
            if i % cfg.run.log_every == 0 or i == steps:           # the only host syncs
                current = dict(zip(metrics, distributed.mean_across(values).tolist()))
                if not all(math.isfinite(v) for v in current.values()):
                    if bar is not None:
                        bar.close()
                    raise TrainingDiverged(
                        f"the loss became {current['loss']} ({_values(current)}) at epoch "
                        f"{epoch}, step {step}; training stopped. The last good checkpoint is "
                        + last_good())
                now = time.perf_counter()
                img_per_s = (i - last_i) * t.batch_size / max(now - last_time, 1e-9)
                last_time, last_i = now, i
                runlog.step({"epoch": epoch, "step": step, **current, "img_per_s": img_per_s})
                if bar is not None:
                    bar.update(i - bar.n)
                    bar.set_postfix(loss=f"{current['loss']:.4f}", img_s=f"{img_per_s:.0f}")
        if bar is not None:
            bar.close()
        means = dict(zip(metrics, (distributed.mean_across(sums) / steps).tolist()))
        if not all(math.isfinite(v) for v in means.values()):
            raise TrainingDiverged(f"the mean loss of epoch {epoch} is not finite "
                                   f"({means['loss']}); training stopped. The last good "
                                   f"checkpoint is {last_good()}")
        train_seconds = time.perf_counter() - epoch_start
        row = {"epoch": epoch, "step": step, **means,
               **method.end_epoch(epoch, last=epoch == t.epochs),
               "img_per_s": steps * t.batch_size / train_seconds, "epoch_seconds": train_seconds}
        if main:                                  # evaluation once, on rank 0
            row.update(evaluation.after_epoch(epoch, plain_forward))
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        history.append(row)
        log(f"epoch {epoch}/{t.epochs}  loss {means['loss']:.4f}  {method.describe(row)}  "
            f"{row['img_per_s']:.0f} img/s"
            + (f"  kNN {row['knn_top1']:.2f}%" if row.get("knn_top1") is not None else "")
            + (f"  R² {row['r2']:.4f} MCC {row['mcc']:.4f}" if row.get("r2") is not None else ""))
        runlog.epoch(history)
        if main and (epoch % cfg.run.ckpt_every == 0 or epoch == t.epochs):
            atomic_save({"format": FORMAT, "config": cfg.to_dict(), "epoch": epoch, "step": step,
                         "world_size": world,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "method": method.state_dict(),
                         "rng": capture_rng(device, {"augment": aug_gen}), "history": history},
                        ckpt_path)
        # the other ranks go on once rank 0 has evaluated and its checkpoint is on disk: a rank
        # that fails in the next epoch (torchrun then stops rank 0) cannot cut this epoch's save
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"row": row, "step": step, "method": method})
    runlog.close()

    # 6. the end ---------------------------------------------------------------------------------
    if not main:                  # rank 0 evaluates and writes; the others take its summary
        return distributed.broadcast_object(None)
    summary = _finish(cfg, out, label, t, step, history, method, evaluation, model, ckpt_path,
                      world, log)
    return distributed.broadcast_object(summary)


def _finish(cfg, out, label, t, step, history, method, evaluation, model, ckpt_path, world,
            log) -> dict:
    """Rank 0's end of a run: curves, the final probes, ``summary.json``."""
    if cfg.run.plot and history:
        if plot_curves(history, out / "curves.png", f"{cfg.run.name} ({label})"):
            log(f"curves: {out / 'curves.png'}")
        else:
            log("note: matplotlib is not installed; skipping curves.png (pip install matplotlib)")
    summary = {"name": cfg.run.name, "method": cfg.method.name, "kind": label,
               "epochs": t.epochs, "steps": step, "run_dir": str(out),
               "checkpoint": str(ckpt_path),
               "final_loss": history[-1]["loss"] if history else None,
               "knn_top1": next((h["knn_top1"] for h in reversed(history)
                                 if h.get("knn_top1") is not None), None),
               "knn_curve": [[h["epoch"], h["knn_top1"]] for h in history
                             if h.get("knn_top1") is not None],
               "world_size": world, **method.summary()}
    final = evaluation.final(model)
    if "linear" in final:
        write_csv(out / "linear.csv", HISTORY_FIELDS, final["linear"]["history"])
        summary["linear"] = {k: v for k, v in final["linear"].items() if k != "history"}
    if "factors" in final:
        summary["factors"] = final["factors"]
    if "probes" in final:
        summary["domain_factor"] = final["probes"]["domain_factor"]
        summary["probes"] = final["probes"]["probes"]
        if "retrieval" in final["probes"]:
            summary["retrieval"] = final["probes"]["retrieval"]
    summary.update(final.get("identifiability", {}))
    write_json(out / "summary.json", summary)
    return summary


def _silent(message: str) -> None:
    """The ``log`` of ranks other than 0."""


class _NullLog:
    """The run log of ranks other than 0: writes nothing."""

    def step(self, row: dict) -> None:
        pass

    def epoch(self, history: list) -> None:
        pass

    def close(self) -> None:
        pass


def _check_distributed(cfg, device: torch.device, dinfo) -> torch.device:
    """The checks of a multi-process run; returns this rank's device (``cuda:LOCAL_RANK``)."""
    world = dinfo.world_size
    if cfg.method.name not in DDP_METHODS:
        raise ValueError(f"method.name: {cfg.method.name!r} does not train on several processes "
                         f"yet (multi-process methods: {', '.join(DDP_METHODS)}); run it on one")
    if cfg.method.name in ("dcodr_norec", "dcodr"):
        batch = cfg.dcodr.domains_per_batch * cfg.dcodr.samples_per_domain
        what = "dcodr.domains_per_batch x dcodr.samples_per_domain"
    else:
        batch, what = cfg.train.batch_size, "train.batch_size"
    if batch % world:
        raise ValueError(f"{what} ({batch}, the global batch) is not divisible by the world size "
                         f"{world}")
    if cfg.model.bn_splits != 1:
        raise ValueError("model.bn_splits emulates DataParallel's BN groups on one process; on "
                         "several processes every rank's BN is one group already (set it to 1)")
    if device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
        torch.cuda.set_device(device)
    elif cfg.model.sync_bn:
        raise ValueError("model.sync_bn: SyncBatchNorm runs on GPUs only (torch); on the CPU "
                         "set it to false (per-rank BN)")
    return device


def _values(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if k != "loss") or "no parts"


def baseline_config(cfg: Config) -> Config:
    """The SimCLR baseline of ``cfg``: same data, model, budget and seed; method ``simclr``."""
    b = cfg.copy()
    b.method.name = "simclr"
    b.run.name = f"{cfg.run.name}_simclr"
    b.run.compare_baseline = False
    return b


def run(cfg: Config, *, resume: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Train ``cfg``; with ``run.compare_baseline`` also the SimCLR baseline, with
    ``run.compare_random`` also evaluate the untrained network; then print the comparison table
    and draw the comparison figure."""
    start = time.perf_counter()
    distributed.init_from_env(cfg.run.device)
    main = distributed.is_main()
    if not main:
        log = _silent
    summary = train(cfg, resume=resume, log=log)
    rows = [(METHODS[cfg.method.name].label, summary)]
    if cfg.run.compare_baseline and cfg.method.name != "simclr":
        rows.append(("SimCLR", train(baseline_config(cfg), log=log)))
    if not main:                  # rank 0 evaluates the untrained network and compares
        return summary
    if cfg.run.compare_random:
        rows.append(("random init", evaluate_initialisation(cfg, log=log)))
    world = distributed.world_size()
    where = f" on {world} processes (world size {world})" if world > 1 else ""
    if len(rows) == 1:
        log(f"done in {time.perf_counter() - start:.1f}s{where}")
        return summary
    names = " vs ".join(label for label, _ in rows)
    table = comparison_table(rows, cfg.data.label_factor if cfg.data.name == "synthetic" else "")
    log(f"\n{cfg.data.name}: {names} (same data, model, epochs, seed)\n{table}")
    stem = Path(cfg.run.output_dir) / f"{cfg.run.name}_comparison"
    if cfg.run.plot and plot_comparison(rows, stem.with_suffix(".png"), f"{cfg.run.name}: {names}"):
        log(f"comparison figure: {stem.with_suffix('.png')}")
    both = {("random_init" if label == "random init" else s.get("method", label)): s
            for label, s in rows}
    both.update(table=table, seconds=time.perf_counter() - start)
    write_json(stem.with_suffix(".json"), both)
    log(f"done in {both['seconds']:.1f}s{where}")
    return both
