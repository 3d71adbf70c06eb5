"""The IP-IRM trainer (official ``main.py`` recipe, spec sections 2, 3, 6, 7, 9), top to bottom.

``fastipirm train --config configs/stl.toml`` calls :func:`run`, which calls :func:`train` (and
trains the SimCLR baseline after it when ``run.compare_baseline`` is set). :func:`train` reads in
the order it runs:

1. setup: device, seeds, run directory with the resolved ``config.toml``;
2. data: the pretraining split (also the partition data, keyed by dataset index), the labelled
   memory/test splits for evaluation, the batched on-device two-view augmentation;
3. model (ResNet + projection head), Adam (lr 1e-3, coupled wd 1e-6, no schedule), AMP;
4. resume from a checkpoint, or the epoch-0 partition on the untrained network;
5. the epoch loop: minimisation steps over all retained partitions at once (:class:`TrainStep`:
   one ``memberships_from_logits`` + one ``minimization_loss``), then every ``maximize_iter`` epochs
   the maximisation step (:mod:`fastipirm.partition`), the kNN monitor, metrics, checkpoint;
6. the end: plot, optional linear probe, ``summary.json``.

Official behaviour kept: two forward passes per step (one per view, so BN sees each view
separately; ``model.bn_splits = 2`` also splits each view in two BN groups as the official
2-GPU DataParallel run, see :func:`grouped_projection`); ``keep_cont`` global NT-Xent; penalty
weight lambda1 from epoch ``penalty_iters`` (always when ``penalty_iters >= 200``); partition at
epoch 0 in eval mode on the untrained network and after the training of every
``maximize_iter``-th epoch (before that epoch's kNN); optimiser state never reset. Deviations:

* with ``model.bn_splits = 1`` (default) BN normalises each view over the whole batch (the
  official DataParallel run normalises per GPU, 128 images; ``bn_splits = 2`` emulates it);
* the partition after the final epoch, which the official code computes and never uses, is
  skipped unless ``partition.at_last_epoch``;
* ``random_init = false`` warm-starts from a copy of the previous best Theta, without the
  official aliasing (spec section 13, bug 4);
* an empty environment in a batch contributes 0 (the official code gives NaN).

Reproducibility: the batch order is a pure function of (seed, epoch) (``IndexedLoader``); the
augmentation draws from one generator whose state is checkpointed; each maximisation shuffles
and initialises Theta from generators derived from (seed, epoch). Together with the model,
optimiser, scaler, partitions and the torch/numpy/python/CUDA RNG states in the checkpoint, a
resumed run on CPU reproduces the uninterrupted one bit for bit.

Host synchronisation: the step itself never reads a device value; losses are accumulated on the
device and read every ``run.log_every`` steps (progress bar, ``steps.csv``, NaN/inf check) and at
the end of the epoch. A non-finite loss raises :class:`TrainingDiverged` before anything is
written, so the last checkpoint on disk is always a good one.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import Config, from_dict, write_config
from .objectives.ipirm import memberships_from_logits, minimization_loss
from . import partition as part
from .eval import factor_evaluation, knn_evaluate, linear_probe

CHECKPOINT = "checkpoint.pt"
EPOCH_FIELDS = ["epoch", "step", "loss", "loss_global", "loss_env", "penalty", "penalty_weight",
                "partitions", "balance", "knn_top1", "knn_top5", "img_per_s", "epoch_seconds",
                "partition_seconds", "knn_seconds", "peak_mem_gb"]


class TrainingDiverged(RuntimeError):
    """The loss (or the partition objective) became NaN or infinite; the run was stopped."""


class DataUnavailable(RuntimeError):
    """A data set could not be loaded (missing or corrupt files); the message says why."""


# ----------------------------------------------------------------------------------------------
# small helpers


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} was requested but CUDA is not available")
    return dev


def autocast_factory(device: torch.device, amp: str) -> Callable:
    """A no-argument context factory: bf16/fp16 autocast on CUDA, nothing on CPU or amp=none."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def derived_generator(seed: int, *tags: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, tags)."""
    value = seed
    for t in tags:
        value = (value * 1_000_003 + t + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def scheduled_penalty_weight(cfg: Config, epoch: int) -> float:
    """Official schedule: lambda1 from epoch ``penalty_iters`` on (always if it is >= 200)."""
    t = cfg.train
    return t.penalty_weight if (epoch >= t.penalty_iters or t.penalty_iters >= 200) else 0.0


def grouped_projection(forward: Callable, x: torch.Tensor, splits: int,
                       model: torch.nn.Module) -> torch.Tensor:
    """Projections of a batch whose BN sees ``splits`` equal groups, as ``nn.DataParallel``.

    The official run splits every view over 2 GPUs, so train-mode BN normalises each half with
    its own statistics, and only replica 0 (the first group) updates the running statistics.
    Here the groups are forwarded one after the other and the later ones run with BN momentum
    0, which leaves the running statistics as the first group set them. ``splits=1``: one plain
    forward.
    """
    if splits == 1:
        return forward(x)[1]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    outs = []
    try:
        for j, chunk in enumerate(x.chunk(splits)):
            if j == 1:
                for m in bns:
                    m.momentum = 0.0
            outs.append(forward(chunk)[1])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return torch.cat(outs)


def choose_pipeline(name: str, device: torch.device) -> str:
    """``data.pipeline``: ``auto`` is DALI on a GPU when DALI is installed, else torch."""
    if name != "auto":
        return name
    from .data.dali import dali_available
    return "dali" if device.type == "cuda" and dali_available()[0] else "torch"


class TrainStep:
    """One minimisation step of the trainer (spec section 6.2), exactly as :func:`train` runs it.

    ``step(indices, v1, v2, partitions, penalty_weight)``: one forward per view under
    ``autocast`` (channels_last inputs when asked, ``bn_splits`` BN groups per view, see
    :func:`grouped_projection`), the batch's hard memberships in every retained partition
    (``partitions`` (P, N, K) logits; ``None`` for a plain SimCLR step), one
    :func:`minimization_loss` call over all of them, backward through ``scaler`` (a disabled
    GradScaler is a no-op) and one optimiser step. Returns ``(loss, parts)``, detached and on
    the device: nothing is read back to the host.

    ``compile_mode`` (``None``: eager) compiles the forward + objective with
    ``torch.compile(mode=compile_mode)`` (``"reduce-overhead"`` adds CUDA graphs) and, when no
    GradScaler is active, the optimiser step with ``torch.compile`` as well. The backward runs
    the compiled graph's backward (AOTAutograd), so the whole step is compiled code.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 scaler: torch.amp.GradScaler, forward: Optional[Callable] = None,
                 autocast: Callable = contextlib.nullcontext, channels_last: bool = False,
                 bn_splits: int = 1, temperature: float, irm_temperature: float,
                 keep_cont: bool, backend: Optional[str] = None, penalty: str = "slot",
                 compile_mode: Optional[str] = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.forward = model if forward is None else forward
        self.autocast, self.channels_last, self.bn_splits = autocast, channels_last, bn_splits
        self.loss_kwargs = dict(temperature=temperature, irm_temperature=irm_temperature,
                                keep_cont=keep_cont, backend=backend, penalty=penalty,
                                check_values=False)
        self.compile_mode = compile_mode
        self._objective = self.objective
        self._optimizer_step = None
        self._cudagraphs = False
        if compile_mode is not None:
            from .ops.backends import resolve_backend
            # load the op's backend now: a lazy load inside the traced code forces a recompile
            resolve_backend(backend, next(model.parameters()).device)
            self._objective = torch.compile(self.objective, mode=compile_mode)
            self._cudagraphs = compile_mode in ("reduce-overhead", "max-autotune")
            if not scaler.is_enabled():
                self._optimizer_step = torch.compile(optimizer.step)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def objective(self, indices: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                  partitions: Optional[torch.Tensor], penalty_weight: float):
        """Forward of both views and the minimisation loss: ``(loss, parts)`` with a graph."""
        with self.autocast():                       # one forward per view (official BN)
            z1 = grouped_projection(self.forward, self.to_input(v1), self.bn_splits, self.model)
            z2 = grouped_projection(self.forward, self.to_input(v2), self.bn_splits, self.model)
        memberships = None if partitions is None else memberships_from_logits(partitions, indices)
        return minimization_loss(z1.float(), z2.float(), memberships,
                                 penalty_weight=penalty_weight, **self.loss_kwargs)

    def __call__(self, indices: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                 partitions: Optional[torch.Tensor], penalty_weight: float):
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, parts = self._objective(indices, v1, v2, partitions, penalty_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self._optimizer_step is not None:
            self._optimizer_step()
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = loss.detach()
        if self._cudagraphs:                        # outputs of a CUDA graph are overwritten
            loss, parts = loss.clone(), {k: v.clone() for k, v in parts.items()}
        return loss, parts


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, *,
                    device, scaler: Optional[torch.amp.GradScaler] = None,
                    forward: Optional[Callable] = None,
                    compile_mode: Optional[str] = None) -> TrainStep:
    """The :class:`TrainStep` of ``cfg`` (AMP, channels_last, BN groups, loss options).

    ``scaler``: the run's GradScaler (a new one, enabled only for fp16 on CUDA, if None).
    """
    t = cfg.train
    device = torch.device(device)
    if scaler is None:
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.amp == "fp16")
    return TrainStep(model, optimizer, scaler=scaler, forward=forward,
                     autocast=autocast_factory(device, t.amp),
                     channels_last=cfg.model.channels_last, bn_splits=cfg.model.bn_splits,
                     temperature=t.temperature, irm_temperature=t.irm_temperature,
                     keep_cont=t.keep_cont, backend=None if t.backend == "auto" else t.backend,
                     penalty=t.penalty, compile_mode=compile_mode)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def build_model(cfg: Config) -> torch.nn.Module:
    from .models import SimCLRModel
    return SimCLRModel(arch=cfg.model.arch, feature_dim=cfg.model.feature_dim,
                       width=cfg.model.width, hidden_dim=cfg.model.hidden_dim)


def load_split(cfg: Config, split: str):
    """``fastipirm.data.load_dataset`` for one split; failures become :class:`DataUnavailable`."""
    from .data import load_dataset
    d = cfg.data
    kwargs = {}
    if d.name == "synthetic":
        count = d.num_samples if split == d.split else d.eval_num_samples
        if count:
            kwargs["n"] = count
        if d.image_size:
            kwargs["image_size"] = d.image_size
        kwargs.update(seed=d.synthetic_seed, label_factor=d.label_factor)
        for key in ("color_correlation", "noise", "shading"):
            if getattr(d, key) is not None:
                kwargs[key] = getattr(d, key)
        for key in ("num_colors", "num_backgrounds"):
            if getattr(d, key):
                kwargs[key] = getattr(d, key)
    try:
        return load_dataset(d.name, split, root=d.root, download=d.download, **kwargs)
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise DataUnavailable(f"cannot load data set {d.name!r} split {split!r} from "
                              f"{d.root!r} (config keys data.root, data.download): {exc}"
                              ) from None


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path) -> dict:
    """Read a checkpoint file (or ``<run dir>/checkpoint.pt``) written by :func:`train`."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file: say so, whatever torch raised
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: "
                         f"{exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fastipirm-checkpoint-1":
        raise ValueError(f"{str(path)!r} is not a fastipirm checkpoint")
    return ckpt


def _write_csv(path: Path, fields: list, rows: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    tmp.replace(path)


def plot_curves(history: list, partition_log: list, path: Path, title: str) -> bool:
    """Loss, penalty, kNN accuracy and partition balance over epochs; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ep = [h["epoch"] for h in history]
    ax = axes[0]
    ax.plot(ep, [h["loss"] for h in history], label="total")
    if any(h["loss_env"] for h in history):
        ax.plot(ep, [h["loss_global"] for h in history], label="global NT-Xent")
        ax.plot(ep, [h["loss_env"] for h in history], label="env NT-Xent (mean)")
    ax.set_title("loss")
    ax.legend(fontsize=7)
    axes[1].plot(ep, [h["penalty"] for h in history])
    axes[1].set_title("IRM penalty (mean over p,k)")
    knn = [(h["epoch"], h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    if knn:
        axes[2].plot(*zip(*knn), marker="o")
    axes[2].set_title("kNN top-1 (%)")
    if partition_log:
        axes[3].plot([p["epoch"] for p in partition_log],
                     [min(p["fractions"]) for p in partition_log], marker="o")
        axes[3].set_ylim(0, 1.0 / len(partition_log[0]["fractions"]) + 0.05)
    axes[3].set_title("partition balance (smallest env share)")
    for a in axes:
        a.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_PLOT_WARNED = False


# ----------------------------------------------------------------------------------------------
# the trainer


def train(cfg: Config, *, resume: Optional[str] = None, log: Callable[[str], None] = print,
          on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train one run as configured; returns the summary (also written to ``summary.json``).

    ``resume``: a checkpoint file or run directory; its model, optimiser, scaler, partitions,
    RNG states and history are restored and training continues after its epoch (``cfg`` should
    be the checkpoint's config, see :func:`config_from_checkpoint`). ``on_epoch_end(epoch,
    state)`` is called after each epoch's checkpoint (tests use it to interrupt a run).
    """
    from .data import IndexedLoader, TwoViewAugment, eval_transform

    # 1. setup ---------------------------------------------------------------------------------
    t, pc, ev = cfg.train, cfg.partition, cfg.eval
    device = select_device(cfg.run.device)
    seed = cfg.run.seed
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = autocast_factory(device, t.amp)
    out = run_dir(cfg)
    ckpt_path = out / CHECKPOINT
    kind = "SimCLR baseline" if t.baseline else "IP-IRM"
    log(f"[{cfg.run.name}] {kind} on {cfg.data.name}/{cfg.data.split}, device {device}, "
        f"amp {t.amp if device.type == 'cuda' else 'none'}, run dir {out}")

    # 2. data ------------------------------------------------------------------------------------
    train_set = load_split(cfg, cfg.data.split)
    n = len(train_set.images)
    if n < t.batch_size:
        raise ValueError(f"train.batch_size: {t.batch_size} is larger than the {n} images of "
                         f"{cfg.data.name}/{cfg.data.split} (batches drop the remainder)")
    want_eval = ev.knn_every > 0 or ev.linear_at_end
    memory_set = test_set = None
    if want_eval:
        memory_set = (train_set if cfg.data.memory_split == cfg.data.split
                      else load_split(cfg, cfg.data.memory_split))
        test_set = load_split(cfg, cfg.data.test_split)
        if memory_set.labels is None or test_set.labels is None:
            log(f"note: {cfg.data.name} splits {cfg.data.memory_split}/{cfg.data.test_split} "
                "have no labels: kNN and linear evaluation are disabled")
            memory_set = test_set = None
    out.mkdir(parents=True, exist_ok=True)              # only once the data has loaded
    write_config(cfg, out / "config.toml")
    augment = TwoViewAugment(out_size=cfg.data.crop_size, scale=(cfg.data.crop_scale_min, 1.0))
    loader = IndexedLoader(train_set, t.batch_size, seed=seed, shuffle=True, drop_last=True,
                           device=device)
    extract_loader = IndexedLoader(train_set, pc.extract_batch_size, seed=seed, shuffle=False,
                                   drop_last=False, device=device)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    dali_views = None
    if choose_pipeline(cfg.data.pipeline, device) == "dali":             # training views from NVIDIA DALI (same order, per-epoch
        from .data.dali import DaliTwoViewLoader, dali_available   # seeds); the rest stays torch
        ok, why = dali_available()
        if not ok:
            raise ValueError(f"data.pipeline = \"dali\": {why}")
        dali_views = DaliTwoViewLoader(
            train_set.images, t.batch_size, seed=seed, device=device,
            out_size=cfg.data.crop_size, scale=(cfg.data.crop_scale_min, 1.0), shuffle=True,
            drop_last=True, resident=device.type == "cuda")

    def training_batches(epoch: int):
        """``(indices, view1, view2)`` of one epoch, in the order of ``IndexedLoader``."""
        if dali_views is not None:
            dali_views.set_epoch(epoch)
            yield from dali_views
            return
        loader.set_epoch(epoch)
        for indices, images in loader:
            v1, v2 = augment(images.to(device, non_blocking=True), aug_gen)
            yield indices, v1, v2

    # 3. model, optimiser, AMP ---------------------------------------------------------------------
    model = build_model(cfg).to(device)
    if cfg.run.pretrain_model and not resume:
        from .models import convert_official_state_dict
        state = torch.load(cfg.run.pretrain_model, map_location="cpu", weights_only=False)
        state = state.get("model", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if any(k.startswith("f.") for k in state):          # an official IP-IRM/DCL checkpoint
            state = convert_official_state_dict(state)
        model.load_state_dict(state)
        log(f"initialised the model from {cfg.run.pretrain_model}")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.model.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    use_scaler = device.type == "cuda" and t.amp == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    train_step = make_train_step(model, optimizer, cfg, device=device, scaler=scaler,
                                 forward=forward)

    def maximize(epoch: int, previous_theta: Optional[torch.Tensor]):
        """The maximisation step: features of one view pair per image, then Theta."""
        start = time.perf_counter()
        z1, z2 = part.extract_views(forward, extract_loader, augment, num_samples=n,
                                    device=device, generator=aug_gen, autocast=autocast,
                                    channels_last=cfg.model.channels_last)
        init = part.initial_logits(n, pc.env_num, random_init=pc.random_init,
                                   previous=previous_theta,
                                   generator=derived_generator(seed, 1, epoch), device=device)
        bar = None
        if cfg.run.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=pc.max_epochs + 1, desc=f"partition @{epoch}", leave=False,
                       dynamic_ncols=True)

        def progress(e, j):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(J=f"{j:.4f}")

        try:
            result = part.optimize_partition(
                z1, z2, init, temperature=t.temperature, irm_temperature=t.irm_temperature,
                irm_weight=pc.irm_weight_maxim, constrain=pc.constrain,
                constrain_relax=pc.constrain_relax, nonorm=pc.nonorm, lr=pc.lr,
                milestones=pc.milestones, gamma=pc.gamma, batch_size=pc.batch_size,
                min_epochs=pc.min_epochs, patience=pc.patience, max_epochs=pc.max_epochs,
                generator=derived_generator(seed, 2, epoch),
                backend=None if t.backend == "auto" else t.backend, penalty=t.penalty,
                progress=progress)
        except FloatingPointError as exc:
            raise TrainingDiverged(f"partition step after epoch {epoch}: {exc}") from None
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        entry = {"epoch": epoch, "best_objective": result.best_objective,
                 "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                 "fractions": result.fractions(), "seconds": seconds}
        log(f"  partition after epoch {epoch}: J* {result.best_objective:.4f} (epoch "
            f"{result.best_epoch} of {result.epochs_run}), env shares "
            f"{', '.join(f'{f:.3f}' for f in entry['fractions'])}, {seconds:.1f}s")
        return result.logits, entry

    # 4. resume, or the epoch-0 partition --------------------------------------------------------
    start_epoch, step = 0, 0
    retained: Optional[torch.Tensor] = None       # (P, N, K) partition logits
    last_theta: Optional[torch.Tensor] = None     # latest best Theta (warm start)
    history: list = []                            # one dict per epoch (EPOCH_FIELDS)
    partition_log: list = []
    if resume:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        retained = None if ckpt["partitions"] is None else ckpt["partitions"].to(device)
        last_theta = None if ckpt["last_theta"] is None else ckpt["last_theta"].to(device)
        history, partition_log = ckpt["history"], ckpt["partition_log"]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        aug_gen.set_state(rng["augment"].to(aug_gen.get_state().device))
        log(f"resumed from {resume} after epoch {start_epoch} (step {step})")
    elif ckpt_path.exists():
        log(f"note: {ckpt_path} (an earlier run) will be replaced at this run's first "
            "checkpoint; use --resume to continue it instead")
    if not resume and not t.baseline:
        last_theta, entry = maximize(0, None)
        retained = part.retain(None, last_theta, retain_group=pc.retain_group)
        entry["partitions"] = 1
        partition_log.append(entry)

    steps_path = out / "steps.csv"
    step_rows = []
    if steps_path.exists() and resume:
        with open(steps_path, newline="") as fh:
            step_rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
    step_fields = ["epoch", "step", "loss", "penalty", "img_per_s"]
    _write_csv(steps_path, step_fields, step_rows)
    tb = None
    if cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            log("note: tensorboard is not installed; metrics go to metrics.csv only")

    def save_checkpoint(epoch: int) -> None:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate(), "augment": aug_gen.get_state().cpu(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        atomic_save({"format": "fastipirm-checkpoint-1", "config": cfg.to_dict(),
                     "epoch": epoch, "step": step, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "partitions": None if retained is None else retained.cpu(),
                     "last_theta": None if last_theta is None else last_theta.cpu(),
                     "rng": rng, "history": history, "partition_log": partition_log},
                    ckpt_path)

    # 5. the epoch loop ----------------------------------------------------------------------------
    for epoch in range(start_epoch + 1, t.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        lam = scheduled_penalty_weight(cfg, epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, global, env, penalty
        steps_in_epoch = len(loader)
        bar = None
        if cfg.run.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps_in_epoch, desc=f"epoch {epoch}/{t.epochs}", leave=False,
                       dynamic_ncols=True)
        last_log_time, last_log_i = time.perf_counter(), 0
        img_per_s = 0.0
        for i, (indices, v1, v2) in enumerate(training_batches(epoch), 1):
            indices = indices.to(device, non_blocking=True)
            loss, parts = train_step(indices, v1, v2, None if t.baseline else retained, lam)
            step += 1
            sums += torch.stack([loss, parts["loss_global"], parts["loss_env"],
                                 parts["penalty"]]).double()
            if i % cfg.run.log_every == 0 or i == steps_in_epoch:   # the only host syncs
                cur_loss, cur_pen = torch.stack([loss.float(),
                                                 parts["penalty"].float()]).tolist()
                if not (math.isfinite(cur_loss) and math.isfinite(cur_pen)):
                    if bar is not None:
                        bar.close()
                    raise TrainingDiverged(
                        f"the loss became {cur_loss} (penalty {cur_pen}) at epoch {epoch}, "
                        f"step {step}; training stopped. The last good checkpoint is "
                        + (f"{ckpt_path} (kept unchanged)" if ckpt_path.exists() else
                           "none (no checkpoint had been written yet)"))
                now = time.perf_counter()
                img_per_s = (i - last_log_i) * t.batch_size / max(now - last_log_time, 1e-9)
                last_log_time, last_log_i = now, i
                step_rows.append({"epoch": epoch, "step": step, "loss": cur_loss,
                                  "penalty": cur_pen, "img_per_s": img_per_s})
                if bar is not None:
                    bar.update(i - bar.n)
                    bar.set_postfix(loss=f"{cur_loss:.4f}", pen=f"{cur_pen:.4f}",
                                    img_s=f"{img_per_s:.0f}")
                if tb is not None:
                    tb.add_scalar("step/loss", cur_loss, step)
                    tb.add_scalar("step/penalty", cur_pen, step)
        if bar is not None:
            bar.close()
        means = (sums / steps_in_epoch).tolist()
        if not all(math.isfinite(v) for v in means):
            raise TrainingDiverged(
                f"the mean loss of epoch {epoch} is not finite ({means[0]}); training stopped. "
                f"The last good checkpoint is "
                + (f"{ckpt_path} (kept unchanged)" if ckpt_path.exists() else "none"))
        train_seconds = time.perf_counter() - epoch_start

        # maximisation step after the training of every maximize_iter-th epoch
        partition_seconds = 0.0
        if (not t.baseline and epoch % pc.maximize_iter == 0
                and (epoch < t.epochs or pc.at_last_epoch)):
            last_theta, entry = maximize(epoch, last_theta)
            retained = part.retain(retained, last_theta, retain_group=pc.retain_group,
                                   retain_group_set=pc.retain_group_set)
            entry["partitions"] = retained.shape[0]
            partition_log.append(entry)
            partition_seconds = entry["seconds"]

        row = {"epoch": epoch, "step": step, "loss": means[0], "loss_global": means[1],
               "loss_env": means[2], "penalty": means[3], "penalty_weight": lam,
               "partitions": 0 if retained is None else retained.shape[0],
               "balance": min(partition_log[-1]["fractions"]) if partition_log else None,
               "img_per_s": steps_in_epoch * t.batch_size / train_seconds,
               "epoch_seconds": train_seconds, "partition_seconds": partition_seconds}
        if memory_set is not None and ev.knn_every > 0 and (epoch % ev.knn_every == 0
                                                            or epoch == t.epochs):
            knn = knn_evaluate(forward, memory_set, test_set, k=ev.k,
                               temperature=ev.knn_temperature or t.temperature,
                               batch_size=ev.batch_size, device=device,
                               transform=eval_transform, autocast=autocast,
                               channels_last=cfg.model.channels_last)
            row.update(knn_top1=knn["knn_top1"], knn_top5=knn["knn_top5"],
                       knn_seconds=knn["knn_seconds"])
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        history.append(row)
        log(f"epoch {epoch}/{t.epochs}  loss {means[0]:.4f} (global {means[1]:.4f}, env "
            f"{means[2]:.4f}, penalty {means[3]:.4f} x {lam:g})  P={row['partitions']}  "
            f"{row['img_per_s']:.0f} img/s"
            + (f"  kNN {row['knn_top1']:.2f}%" if row.get("knn_top1") is not None else ""))
        _write_csv(out / "metrics.csv", EPOCH_FIELDS, history)
        _write_csv(steps_path, step_fields, step_rows)
        if tb is not None:
            for key in ("loss", "loss_global", "loss_env", "penalty", "knn_top1", "balance",
                        "img_per_s"):
                if row.get(key) is not None:
                    tb.add_scalar(f"epoch/{key}", row[key], epoch)
        if epoch % cfg.run.ckpt_every == 0 or epoch == t.epochs:
            save_checkpoint(epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"row": row, "partitions": retained, "step": step})
    if tb is not None:
        tb.close()

    # 6. the end ---------------------------------------------------------------------------------
    global _PLOT_WARNED
    if cfg.run.plot and history:
        if plot_curves(history, partition_log, out / "curves.png", f"{cfg.run.name} ({kind})"):
            log(f"curves: {out / 'curves.png'}")
        elif not _PLOT_WARNED:
            _PLOT_WARNED = True
            log("note: matplotlib is not installed; skipping curves.png (pip install matplotlib)")
    summary = {"name": cfg.run.name, "kind": kind, "epochs": t.epochs, "steps": step,
               "run_dir": str(out), "checkpoint": str(ckpt_path),
               "final_loss": history[-1]["loss"] if history else None,
               "knn_top1": next((h["knn_top1"] for h in reversed(history)
                                 if h.get("knn_top1") is not None), None),
               "partitions": partition_log}
    if ev.linear_at_end and memory_set is not None:
        res = linear_probe(model.encoder, memory_set, test_set, epochs=ev.linear_epochs,
                           batch_size=ev.linear_batch_size, lr=ev.linear_lr,
                           weight_decay=ev.linear_weight_decay, fixed_bn=ev.fixed_bn,
                           augment=augment.view if ev.linear_augment else None,
                           test_transform=eval_transform, device=device, seed=seed,
                           eval_batch_size=ev.batch_size, autocast=autocast,
                           channels_last=cfg.model.channels_last, progress=cfg.run.progress)
        _write_csv(out / "linear.csv", ["epoch", "train_loss", "top1", "top5"], res["history"])
        log(f"linear probe ({ev.linear_epochs} epochs, BN {'eval' if ev.fixed_bn else 'train'}"
            f" mode): final top-1 {res['final_top1']:.2f}%, best {res['best_top1']:.2f}% "
            f"(epoch {res['best_epoch']})")
        summary["linear"] = {k: v for k, v in res.items() if k != "history"}
    if ev.factors and memory_set is not None and getattr(memory_set, "factors", None):
        facs = factor_evaluation(model, memory_set, test_set, k=ev.k,
                                 temperature=ev.knn_temperature or t.temperature,
                                 batch_size=ev.batch_size, device=device,
                                 transform=eval_transform, linear_epochs=ev.linear_epochs,
                                 linear_batch_size=ev.linear_batch_size, linear_lr=ev.linear_lr,
                                 linear_weight_decay=ev.linear_weight_decay, seed=seed,
                                 autocast=autocast, channels_last=cfg.model.channels_last)
        summary["factors"] = facs
        log("generative factors (kNN / linear on frozen eval-mode features): " + ", ".join(
            f"{f} {r['knn_top1']:.1f}/{r['linear_top1']:.1f}%" for f, r in facs.items()))
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


# ----------------------------------------------------------------------------------------------
# entry points


def config_from_checkpoint(path, overrides: Optional[list] = None) -> Config:
    """The config stored in a checkpoint, with ``section.key=value`` overrides applied."""
    from .config import apply_overrides
    return apply_overrides(from_dict(load_checkpoint(path)["config"]), overrides or [])


def baseline_config(cfg: Config) -> Config:
    """The SimCLR baseline of ``cfg``: same data, model, budget and seed; no partitions."""
    b = cfg.copy()
    b.train.baseline = True
    b.train.keep_cont = True
    b.run.name = f"{cfg.run.name}_simclr"
    b.run.compare_baseline = False
    return b


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    """Label accuracy (kNN, linear final/best) per method, then kNN/linear per factor if any."""
    lines = [f"{'method':<10} {'kNN top-1':>10} {'linear final':>13} {'linear best':>12}"]
    for label, s in rows:
        lin = s.get("linear") or {}
        lines.append(f"{label:<10} {_fmt(s.get('knn_top1')):>10} "
                     f"{_fmt(lin.get('final_top1')):>13} {_fmt(lin.get('best_top1')):>12}")
    factors = [f for f in (rows[0][1].get("factors") or {})]
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


def run(cfg: Config, *, resume: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Train ``cfg``; with ``run.compare_baseline`` also the SimCLR baseline, then compare."""
    start = time.perf_counter()
    summary = train(cfg, resume=resume, log=log)
    if not cfg.run.compare_baseline or cfg.train.baseline:
        log(f"done in {time.perf_counter() - start:.1f}s")
        return summary
    base = train(baseline_config(cfg), log=log)
    table = comparison_table([("IP-IRM", summary), ("SimCLR", base)])
    log(f"\n{cfg.data.name}: IP-IRM vs SimCLR (same data, model, epochs, seed)\n{table}")
    both = {"ipirm": summary, "simclr": base, "table": table,
            "seconds": time.perf_counter() - start}
    with open(Path(cfg.run.output_dir) / f"{cfg.run.name}_comparison.json", "w") as fh:
        json.dump(both, fh, indent=2)
    log(f"done in {both['seconds']:.1f}s")
    return both
