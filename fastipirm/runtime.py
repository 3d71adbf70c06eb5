"""The run's environment from its config: device, seeds, threads, determinism, mixed precision,
the model and the data splits. The trainer, the evaluation commands and the benchmarks all take
these rules from here, so they agree on them.

* Device: ``run.device`` ``auto`` is CUDA when available, else CPU; asking for CUDA without one
  is an error.
* Seeds: Python, NumPy and torch's global generators are seeded with ``run.seed`` (model
  initialisation draws from torch's); every other random stream derives from it
  (:mod:`fastipirm.seeding`).
* Mixed precision: on CUDA, ``train.amp`` ``bf16`` or ``fp16`` autocast (fp16 with an enabled
  GradScaler); nothing on the CPU.
* Data: :func:`load_split` turns loading failures into :class:`DataUnavailable` naming the config
  keys to fix.
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .data import (LatentPairBatches, TwoViewAugment, TwoViewBatches, choose_pipeline,
                   load_dataset)
from .data.clica_sources import CLICA_SOURCES, load_pair_source
from .data.domain_batches import DOMAIN_METHODS, DomainBatches, domain_values
from .data.views import RankShares
from .models import MLP_ARCHS, MLPEncoder, SimCLRModel, load_pretrained
from .models.clica_image_encoders import CLICA_IMAGE_ARCHS, KittiConvEncoder, ResNetLatentEncoder
from .models.dcodr_encoder import DCODR_ARCHS, DCoDREncoder, load_moco_v2

AMP_MODES = ("bf16", "fp16", "none")


class DataUnavailable(RuntimeError):
    """A data set could not be loaded (missing or corrupt files); the message says why."""


class TrainingDiverged(RuntimeError):
    """The loss (or the partition objective) became NaN or infinite; the run was stopped."""


def select_device(name: str) -> torch.device:
    """``run.device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} was requested but CUDA is not available")
    return dev


def process_threads(threads: int) -> int:
    """This process's share of ``run.threads``: all of them, or under torchrun an equal share
    for each of the ``LOCAL_WORLD_SIZE`` processes of this machine (at least 1), so that N ranks
    on one CPU do not oversubscribe it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, threads // max(local, 1))


def setup(cfg) -> torch.device:
    """Threads, global seeds and determinism of ``cfg.run``; returns the device."""
    device = select_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(process_threads(cfg.run.threads))
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def amp_active(device: torch.device, amp: str) -> bool:
    return device.type == "cuda" and amp != "none"


def autocast_factory(device: torch.device, amp: str) -> Callable:
    """A no-argument context factory: bf16/fp16 autocast on CUDA, nothing on CPU or amp=none."""
    if not amp_active(device, amp):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """The GradScaler of a run: enabled only for fp16 autocast on CUDA (else a no-op)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")


def run_dir(cfg) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def build_model(cfg) -> SimCLRModel:
    """The network of ``cfg.model`` (on the CPU, freshly initialised)."""
    m = cfg.model
    c = cfg.clica
    if m.arch in MLP_ARCHS:
        return MLPEncoder(c.n, output_norm=c.encoder_norm)
    if m.arch == "clica_kitti_conv":
        return KittiConvEncoder(c.n, norm=c.encoder_norm)
    if m.arch in DCODR_ARCHS:
        return DCoDREncoder(cfg.dcodr.content_dim, fc_head=cfg.dcodr.fc_head, width=m.width)
    if m.arch in CLICA_IMAGE_ARCHS:
        return ResNetLatentEncoder(c.n, m.arch, norm=c.encoder_norm,
                                   periodic=c.periodic_dims(cfg.data.name), width=m.width)
    return SimCLRModel(arch=m.arch, feature_dim=m.feature_dim, width=m.width,
                       hidden_dim=m.hidden_dim)


def place_model(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, in channels_last memory format when ``model.channels_last``."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.model.channels_last else model


def training_model(cfg, device: torch.device, *, resuming: bool,
                   log: Callable[[str], None] = print) -> torch.nn.Module:
    """The model a run trains: built, initialised from ``run.pretrain_model`` (fresh runs only)
    and placed on ``device``."""
    model = build_model(cfg).to(device)
    if cfg.model.arch in DCODR_ARCHS and not resuming:
        if cfg.dcodr.init == "moco" and not cfg.run.pretrain_model:
            load_moco_v2(model, cfg.dcodr.moco_path)
            log(f"initialised the encoder from the MoCo v2 checkpoint {cfg.dcodr.moco_path}")
        elif cfg.dcodr.init == "random":
            log('note: dcodr.init = "random": the encoder starts from random weights (the '
                "official DCoDR starts from MoCo v2; this is its no-pretraining ablation)")
    if cfg.run.pretrain_model and not resuming:
        load_pretrained(model, cfg.run.pretrain_model)
        log(f"initialised the model from {cfg.run.pretrain_model}")
    return place_model(model, cfg, device)


def load_split(cfg, split: str):
    """``fastipirm.data.load_dataset`` for one split; failures become :class:`DataUnavailable`."""
    d = cfg.data
    if d.name in CLICA_SOURCES:               # CL-ICA: a source of positive pairs
        try:
            return load_pair_source(cfg)
        except (OSError, ValueError, EOFError, KeyError) as exc:
            raise DataUnavailable(f"cannot load CL-ICA data {d.name!r} from {d.root!r} "
                                  f"(config keys data.root, data.split, [clica]): {exc}"
                                  ) from None
    kwargs = {}
    if d.name == "celeba" and d.min_images:
        kwargs["min_images"] = d.min_images
    if d.name == "synthetic":
        count = d.num_samples if split == d.split else d.eval_num_samples
        if count:
            kwargs["n"] = count
        if d.image_size:
            kwargs["image_size"] = d.image_size
        kwargs.update(seed=d.synthetic_seed, label_factor=d.label_factor)
        for key in ("color_correlation", "noise", "shading", "rotation"):
            if getattr(d, key) is not None:
                kwargs[key] = getattr(d, key)
        if split != d.split and d.eval_color_correlation is not None:
            kwargs["color_correlation"] = d.eval_color_correlation
        for key in ("num_shapes", "num_colors", "num_backgrounds"):
            if getattr(d, key):
                kwargs[key] = getattr(d, key)
    try:
        return load_dataset(d.name, split, root=d.root, download=d.download, **kwargs)
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise DataUnavailable(f"cannot load data set {d.name!r} split {split!r} from "
                              f"{d.root!r} (config keys data.root, data.download): {exc}"
                              ) from None


def load_eval_splits(cfg, train_set, log: Callable[[str], None] = print):
    """``(memory, test)`` splits of the evaluation (kNN memory / probe training, queries / probe
    test), or ``(None, None)`` when no evaluation is configured or the splits have no labels."""
    ev, d = cfg.eval, cfg.data
    if d.name in CLICA_SOURCES or not (ev.knn_every > 0 or ev.linear_at_end
                                       or ev.factor_probes):
        return None, None
    memory = train_set if d.memory_split == d.split else load_split(cfg, d.memory_split)
    test = load_split(cfg, d.test_split)
    if memory.labels is None or test.labels is None:
        log(f"note: {d.name} splits {d.memory_split}/{d.test_split} have no labels: kNN and "
            "linear evaluation are disabled")
        return None, None
    return memory, test


def augmentation(cfg, device: torch.device) -> TwoViewAugment:
    """The two-view augmentation of ``cfg`` (crop size and scale range) on ``device``."""
    return TwoViewAugment(out_size=cfg.data.crop_size,
                          scale=(cfg.data.crop_scale_min, 1.0)).to(device)


def training_views(cfg, train_set, device: torch.device, generator: Optional[torch.Generator],
                   shard: Optional[tuple[int, int]] = None) -> TwoViewBatches:
    """The two-view batches of ``cfg`` (``train.batch_size``, ``data.pipeline``, crop options);
    for CL-ICA's data, its fresh pairs on ``device``. ``shard=(rank, world)``: every batch is
    this rank's contiguous share of the global batch (the torch image pipeline augments the
    share only; the others make the global batch and slice it)."""
    if cfg.data.name in CLICA_SOURCES:
        pairs = LatentPairBatches(train_set.to(device), cfg.train.batch_size,
                                  cfg.clica.steps_per_epoch, cfg.run.seed)
        return pairs if shard is None else RankShares(pairs, *shard)
    if cfg.method.name in DOMAIN_METHODS:
        d = cfg.dcodr
        pipeline = choose_pipeline(cfg.data.pipeline, device)
        try:
            domains = DomainBatches(train_set, domain_values(train_set, cfg.data.domain_factor),
                                    domains_per_batch=d.domains_per_batch,
                                    samples_per_domain=d.samples_per_domain, seed=cfg.run.seed,
                                    device=device, generator=generator, pipeline=pipeline)
        except ImportError as exc:
            raise ValueError(f"data.pipeline = \"{pipeline}\": {exc}") from None
        return domains if shard is None else RankShares(domains, *shard)
    n, batch = len(train_set.images), cfg.train.batch_size
    if n < batch:
        raise ValueError(f"train.batch_size: {batch} is larger than the {n} images of "
                         f"{cfg.data.name}/{cfg.data.split} (batches drop the remainder)")
    pipeline = choose_pipeline(cfg.data.pipeline, device)
    try:
        return TwoViewBatches(train_set, batch, seed=cfg.run.seed, device=device,
                              pipeline=pipeline, out_size=cfg.data.crop_size,
                              scale=(cfg.data.crop_scale_min, 1.0), generator=generator,
                              shard=shard)
    except ImportError as exc:
        raise ValueError(f"data.pipeline = \"{pipeline}\": {exc}") from None
