"""Run configuration: a TOML file (stdlib ``tomllib``) into typed, nested dataclasses.

A config has six tables, ``[run]``, ``[data]``, ``[model]``, ``[train]``, ``[partition]`` and
``[eval]``; every key is a field below with its default. Unknown tables or keys and values of the
wrong type are ``ValueError``s that name the key (``train.bach_size: unknown key``), so a typo
never silently falls back to a default. ``--set section.key=value`` overrides a key after the file
is read (the value is parsed as a TOML value; a bare word is taken as a string).

The official ``main.py`` flags (Wangt-CN/IP-IRM, spec section 10) map to keys as follows:

==========================  ====================================================================
official flag               key
==========================  ====================================================================
``--feature_dim``           ``model.feature_dim``
``--temperature``           ``train.temperature`` (also the kNN weight temperature by default)
``--tau_plus``              ``train.tau_plus`` (only used by ``--debiased``: not implemented)
``--k``                     ``eval.k``
``--batch_size``            ``train.batch_size``
``--epochs``                ``train.epochs``
``--debiased``              ``train.debiased`` (only ``false``; the DCL estimator is not ported)
``--dataset``               ``data.name``
``--name``                  ``run.name``
``--pretrain_model``        ``run.pretrain_model``
``--baseline``              ``train.baseline``
``--ours_mode``             ``train.ours_mode`` (only ``"w"``; ``"f"`` crashes officially)
``--penalty_weight``        ``train.penalty_weight`` (lambda1)
``--penalty_iters``         ``train.penalty_iters``
``--increasing_weight``     ``train.increasing_weight`` (only ``false``; crashes officially)
``--env_num``               ``partition.env_num``
``--maximize_iter``         ``partition.maximize_iter``
``--irm_mode``              ``partition.irm_mode`` (only ``"v1"``)
``--irm_weight_maxim``      ``partition.irm_weight_maxim`` (lambda2)
``--irm_temp``              ``train.irm_temperature``
``--random_init``           ``partition.random_init``
``--constrain``             ``partition.constrain``
``--constrain_relax``       ``partition.constrain_relax``
``--retain_group``          ``partition.retain_group``
``--retain_group_set``      ``partition.retain_group_set`` (main_mixup.py; 0 = keep all)
``--nonorm``                ``partition.nonorm``
``--offline``               ``partition.offline`` (only ``true``; online is not implemented)
``--keep_cont``             ``train.keep_cont``
``--debug``, ``--groupnorm`` unused officially; no key
==========================  ====================================================================

Defaults are the official STL-10 headline run (``runsh/IPIRM_STL_400epoch.sh``), not the argparse
defaults of ``main.py`` (which no script uses unchanged); ``configs/stl.toml`` spells them out.

Keys of our own (no official flag): ``run.*`` (output, device, threads, seeds, intervals, logging),
``data.*`` (paths, splits, ``crop_size``/``crop_scale_min`` of RandomResizedCrop, the synthetic
generator), ``model.width``/``hidden_dim``/``channels_last``/``compile``, ``train.penalty`` (IRM
penalty variant), ``train.backend``, ``train.amp``, the partition optimiser's counts
(``partition.lr``, ``milestones``, ``gamma``, ``batch_size``, ``min_epochs``, ``patience``,
``max_epochs``: official 0.5, [5, 35], 0.2, 3096, 50, 5, 60) and the ``[eval]`` protocol.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class RunConfig:
    name: str = "ipirm_stl"              # run directory: <output_dir>/<name>
    output_dir: str = "runs"
    seed: int = 1234                     # official set_seed(1234)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    deterministic: bool = False          # torch.use_deterministic_algorithms + cudnn flags
    threads: int = 0                     # CPU threads for torch (0 = torch's default)
    pretrain_model: str = ""             # initialise the model from this checkpoint/state_dict
    compare_baseline: bool = False       # also train the SimCLR baseline, print a comparison
    log_every: int = 50                  # steps between host syncs (loss logging, NaN check)
    ckpt_every: int = 25                 # epochs between checkpoints (and always at the end)
    progress: bool = True                # tqdm progress bars
    tensorboard: bool = True             # write TensorBoard events when it is installed
    plot: bool = True                    # PNG of the curves at the end (matplotlib if installed)


@dataclass
class DataConfig:
    name: str = "stl10"                  # stl10 | cifar10 | cifar100 | imagefolder | synthetic
    root: str = "data"
    split: str = "train+unlabeled"       # pretraining (and partition) split
    memory_split: str = "train"          # labelled split: kNN memory and linear-probe training
    test_split: str = "test"             # kNN queries and linear-probe test
    download: bool = False
    crop_size: int = 32                  # RandomResizedCrop output size (official: 32)
    crop_scale_min: float = 0.08         # RandomResizedCrop scale lower bound (official: 0.08)
    pipeline: str = "auto"               # training views: auto (dali on a GPU when installed, else
                                         # torch) | torch (batched on-device ops) | dali
    # synthetic data only (0 or absent = the generator's default)
    num_samples: int = 0                 # images of the pretraining split
    eval_num_samples: int = 0            # images of every other split (e.g. test)
    image_size: int = 0                  # image side in pixels
    synthetic_seed: int = 0              # generator seed
    label_factor: str = "shape"          # factor used as the label: shape | color | background
    color_correlation: Optional[float] = None  # fraction of images with color = shape (spurious)
    noise: Optional[float] = None        # pixel noise std
    num_colors: int = 0                  # foreground colours in use
    num_backgrounds: int = 0             # background colours in use
    shading: Optional[float] = None      # maximum strength of the background shading


@dataclass
class ModelConfig:
    arch: str = "resnet50"               # resnet50 | resnet18
    feature_dim: int = 128               # official --feature_dim
    width: int = 64                      # base channel width of the ResNet (official 64)
    hidden_dim: int = 512                # projection head hidden width (official 512)
    channels_last: bool = True
    compile: bool = False                # torch.compile the model
    bn_splits: int = 1                   # BN groups per view in training (2 = official 2 GPUs)


@dataclass
class TrainConfig:
    epochs: int = 400
    batch_size: int = 256
    lr: float = 1e-3                     # Adam, coupled L2 weight decay (official)
    weight_decay: float = 1e-6
    temperature: float = 0.5             # tau
    irm_temperature: float = 0.5         # official --irm_temp
    penalty_weight: float = 0.2          # lambda1
    penalty_iters: int = 0               # lambda1 active from this epoch (>= 200: always)
    keep_cont: bool = True               # global NT-Xent term
    baseline: bool = False               # plain SimCLR: no partitions, no penalty
    penalty: str = "slot"                # slot (official) | scalar | split | scalar_split
    backend: str = "auto"                # env_contrastive_loss backend: auto | torch | triton ...
    amp: str = "bf16"                    # bf16 | fp16 | none (always none on CPU)
    debiased: bool = False               # official DCL switch: only false is implemented
    tau_plus: float = 0.1                # official DCL prior (unused while debiased = false)
    ours_mode: str = "w"                 # official penalty mode: only "w"
    increasing_weight: bool = False      # official flag that crashes: only false


@dataclass
class PartitionConfig:
    env_num: int = 2                     # K
    maximize_iter: int = 50              # partition after every maximize_iter-th epoch
    irm_weight_maxim: float = 0.5        # lambda2
    random_init: bool = True             # fresh N(0,1) Theta every time (else warm start)
    constrain: bool = True
    constrain_relax: bool = True
    retain_group: bool = True            # keep all partitions (else only the latest)
    retain_group_set: int = 0            # keep at most this many, FIFO (0 = unlimited)
    offline: bool = True                 # offline maximisation on a fixed feature bank
    nonorm: bool = False
    irm_mode: str = "v1"                 # only v1 (IRM gradient penalty)
    lr: float = 0.5                      # Adam on Theta
    milestones: list[int] = field(default_factory=lambda: [5, 35])
    gamma: float = 0.2
    batch_size: int = 3096               # feature batch of the Theta optimisation
    extract_batch_size: int = 3096       # image batch of the feature extraction
    min_epochs: int = 50                 # early stop allowed once epoch > min_epochs ...
    patience: int = 5                    # ... and this many epochs without improvement
    max_epochs: int = 60                 # stop at this epoch index (official 60: 61 epochs)
    at_last_epoch: bool = False          # also partition after the final epoch (never used)


@dataclass
class EvalConfig:
    knn_every: int = 25                  # epochs between kNN evaluations (0 = never)
    k: int = 200                         # official --k (clamped to the memory size)
    knn_temperature: Optional[float] = None  # None: train.temperature (official)
    batch_size: int = 256                # feature-extraction batch
    linear_at_end: bool = False          # run the linear probe after training
    linear_epochs: int = 100
    linear_batch_size: int = 512
    linear_lr: float = 1e-3
    linear_weight_decay: float = 1e-6
    fixed_bn: bool = False               # encoder BN in eval mode (official: train mode)
    linear_augment: bool = True          # train the probe on SSL-augmented views (official)
    factors: bool = True                 # synthetic data: kNN + linear on every discrete factor


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def copy(self) -> "Config":
        return copy.deepcopy(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {"run": RunConfig, "data": DataConfig, "model": ModelConfig,
                    "train": TrainConfig, "partition": PartitionConfig, "eval": EvalConfig}

_CHOICES = {
    ("data", "name"): ("stl10", "cifar10", "cifar100", "imagefolder", "synthetic"),
    ("data", "pipeline"): ("auto", "torch", "dali"),
    ("data", "label_factor"): ("shape", "color", "background"),
    ("model", "arch"): ("resnet18", "resnet50"),
    ("train", "penalty"): ("slot", "scalar", "split", "scalar_split"),
    ("train", "amp"): ("bf16", "fp16", "none"),
    ("train", "ours_mode"): ("w",),
    ("partition", "irm_mode"): ("v1",),
}
_NOT_IMPLEMENTED = {
    ("train", "debiased", True): "the DCL debiased estimator is not ported (IP-IRM runs never "
                                 "use it)",
    ("train", "increasing_weight", True): "the official flag calls a missing function and "
                                          "crashes",
    ("partition", "offline", False): "online maximisation (auto_split) is not implemented; the "
                                     "STL runs use offline",
}
_POSITIVE_INT = {("train", "epochs"), ("train", "batch_size"), ("partition", "env_num"),
                 ("partition", "maximize_iter"), ("partition", "batch_size"),
                 ("partition", "extract_batch_size"), ("partition", "patience"),
                 ("eval", "k"), ("eval", "batch_size"), ("eval", "linear_batch_size"),
                 ("model", "feature_dim"), ("model", "width"), ("model", "hidden_dim"),
                 ("model", "bn_splits"),
                 ("data", "crop_size"),
                 ("run", "log_every"), ("run", "ckpt_every")}
_NONNEG_INT = {("run", "threads"), ("train", "penalty_iters"), ("partition", "retain_group_set"),
               ("partition", "min_epochs"), ("partition", "max_epochs"),
               ("eval", "knn_every"), ("eval", "linear_epochs"), ("data", "num_samples"),
               ("data", "eval_num_samples"), ("data", "image_size"), ("data", "synthetic_seed"),
               ("data", "num_colors"), ("data", "num_backgrounds")}
_POSITIVE_FLOAT = {("data", "crop_scale_min"), ("train", "lr"), ("train", "temperature"),
                   ("train", "irm_temperature"),
                   ("partition", "lr"), ("partition", "gamma"), ("eval", "linear_lr"),
                   ("eval", "knn_temperature")}
_NONNEG_FLOAT = {("data", "color_correlation"), ("data", "noise"), ("data", "shading"),
                 ("train", "weight_decay"),
                 ("train", "penalty_weight"), ("train", "tau_plus"),
                 ("partition", "irm_weight_maxim"), ("eval", "linear_weight_decay")}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list of {_type_name(item)}, got "
                             f"{type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {type(value).__name__} "
                             f"{value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(raw: dict, base: Optional[Config] = None) -> Config:
    """Build a validated :class:`Config` from nested ``{section: {key: value}}`` data."""
    cfg = (base or Config()).copy()
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a table, got {type(raw).__name__}")
    for section, table in raw.items():
        if section not in _SECTION_CLASSES:
            raise ValueError(f"{section}: unknown section (expected one of "
                             f"{', '.join(_SECTION_CLASSES)})")
        if not isinstance(table, dict):
            raise ValueError(f"{section}: expected a table [{section}], got "
                             f"{type(table).__name__} {table!r}")
        hints = _hints(_SECTION_CLASSES[section])
        target = getattr(cfg, section)
        for key, value in table.items():
            name = f"{section}.{key}"
            if key not in hints:
                raise ValueError(f"{name}: unknown key")
            setattr(target, key, _coerce(name, value, hints[key]))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and choice checks; every message starts with the offending key."""
    for section, cls in _SECTION_CLASSES.items():
        obj = getattr(cfg, section)
        for key, tp in _hints(cls).items():
            _coerce(f"{section}.{key}", getattr(obj, key), tp)
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ValueError(f"{section}.{key}: {value!r} is not one of {', '.join(choices)}")
    for (section, key, bad), why in _NOT_IMPLEMENTED.items():
        if getattr(getattr(cfg, section), key) == bad:
            raise ValueError(f"{section}.{key} = {str(bad).lower()}: not implemented ({why})")
    for group, test, what in ((_POSITIVE_INT, lambda v: v > 0, "a positive integer"),
                              (_NONNEG_INT, lambda v: v >= 0, "a non-negative integer"),
                              (_POSITIVE_FLOAT, lambda v: v > 0, "a positive number"),
                              (_NONNEG_FLOAT, lambda v: v >= 0, "a non-negative number")):
        for section, key in group:
            value = getattr(getattr(cfg, section), key)
            if value is not None and not test(value):
                raise ValueError(f"{section}.{key}: must be {what}, got {value!r}")
    if cfg.data.crop_scale_min > 1:
        raise ValueError(f"data.crop_scale_min: must lie in (0, 1], got {cfg.data.crop_scale_min}")
    if (cfg.data.color_correlation or 0) > 1:
        raise ValueError(f"data.color_correlation: must lie in [0, 1], got "
                         f"{cfg.data.color_correlation}")
    p = cfg.partition
    if p.env_num < 2:
        raise ValueError(f"partition.env_num: needs at least 2 environments, got {p.env_num}")
    if any(m < 0 for m in p.milestones) or list(p.milestones) != sorted(p.milestones):
        raise ValueError(f"partition.milestones: must be non-negative and increasing, got "
                         f"{p.milestones}")
    if cfg.train.batch_size % cfg.model.bn_splits:
        raise ValueError(f"model.bn_splits: {cfg.model.bn_splits} does not divide "
                         f"train.batch_size {cfg.train.batch_size}")
    if cfg.train.baseline and not cfg.train.keep_cont:
        raise ValueError("train.keep_cont: the SimCLR baseline (train.baseline = true) needs "
                         "keep_cont = true (its loss is the global NT-Xent)")
    dev = cfg.run.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"run.device: {dev!r} is not auto, cpu, cuda or cuda:N")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise ValueError(f"run.name: {cfg.run.name!r} must be a plain directory name")


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> ``(section, key, value)``; the value is parsed as TOML."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.key=value")
    path, text = item.split("=", 1)
    path = path.strip()
    if path.count(".") != 1:
        raise ValueError(f"--set {item!r}: the key must be section.key, got {path!r}")
    section, key = path.split(".")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string (data.name=cifar10)
    return section, key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    raw: dict = {}
    for item in overrides or []:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, base=cfg) if raw else cfg


def load_config(path, overrides: Optional[list[str]] = None) -> Config:
    """Read a TOML config file, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    try:
        cfg = from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return apply_overrides(cfg, overrides or [])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (keys whose value is None, i.e. "derived", are omitted)."""
    lines = ["# resolved fastipirm config (every key, defaults included)"]
    for section, table in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        for key, value in table.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_config(cfg: Config, path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_toml(cfg))
    tmp.replace(path)
