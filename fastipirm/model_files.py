"""Model files: every format fastipirm reads weights from, and the backbone it exports.

:func:`load_model_file` decides the format of a path in one place and returns the weights under
the names of :class:`~fastipirm.models.SimCLRModel` (``encoder.*``, ``g.*``):

* ``fastipirm``: a fastipirm checkpoint, a run's ``checkpoint.pt`` or its run directory
  (:mod:`fastipirm.checkpoint`); it carries the run's config and epoch.
* ``official``: a checkpoint of the official IP-IRM (or DCL) code, the state dict of its
  ``Model`` that ``main.py`` saves as ``model_<epoch>.pth`` every 25 epochs. The backbone is
  under ``f.`` (``f.0`` conv1, ``f.1`` bn1, ``f.3`` to ``f.6`` layer1 to layer4), the projection
  head under ``g.``, and every key starts with ``module.`` because the model is wrapped in
  ``nn.DataParallel`` (``docs/official-ipirm.md#model``). Also accepted without the prefix, and
  inside a dict (``{"state_dict": ..., "epoch": ...}`` and the like). No config; the epoch is
  read from the file name.
* ``state_dict``: a ``SimCLRModel`` state dict (``torch.save(model.state_dict())``). No config.
* ``backbone``: a backbone written by :func:`export_backbone` (torchvision names, no head); its
  config comes from the JSON beside it when that is there.

Files other than fastipirm checkpoints are first read with ``torch.load(weights_only=True)``, so
downloaded weights are not unpickled as arbitrary objects unless they need it. A file without a
config takes its data and evaluation settings from a config file or the default config (the
official STL-10 run), and its ``model.arch``, ``model.width``, ``model.hidden_dim`` and
``model.feature_dim`` from the shapes of its weights (:func:`model_config`).

It sits beside :mod:`fastipirm.checkpoint` (it reads checkpoints and configs), not inside
``fastipirm.models``, which the config imports.
"""
from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import runtime
from .checkpoint import CHECKPOINT, atomic_save, load_checkpoint
from .config import Config, apply_overrides, from_dict, load_config, validate
from .data import CIFAR10_MEAN, CIFAR10_STD
from .runlog import write_json
from .models.export import (SMALL_STEM, TORCHVISION_LAYOUT, from_torchvision, infer_model_keys,
                     to_torchvision, torchvision_arch)
from .models.simclr import SimCLRModel, convert_official_state_dict

BACKBONE_FORMAT = "fastipirm-backbone-1"

KINDS = {"fastipirm": "fastipirm checkpoint",
         "official": "official IP-IRM checkpoint",
         "state_dict": "SimCLRModel state dict",
         "backbone": "exported backbone"}

ACCEPTED = ("a fastipirm checkpoint (a run's checkpoint.pt or its run directory), an official "
            "IP-IRM checkpoint (model_<epoch>.pth: the state dict of the official Model, f.*/g.* "
            "keys with or without 'module.', possibly inside a dict), a SimCLRModel state dict "
            "(encoder.*/g.*) or a backbone written by 'fastipirm export'")

# keys under which a wrapped state dict is looked for first
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")


@dataclass
class ModelFile:
    """What :func:`load_model_file` read: ``state`` (our names; a backbone has no ``g.*``), the
    stored ``config`` (None for files without one), the ``epoch`` when known, the file ``path``
    (``checkpoint.pt`` for a run directory), the format ``kind`` (a key of :data:`KINDS`) and a
    one-line ``description``."""

    path: Path
    kind: str
    state: dict
    config: Optional[Config]
    epoch: Optional[int]
    description: str

    @property
    def has_head(self) -> bool:
        return any(k.startswith("g.") for k in self.state)

    @property
    def kind_name(self) -> str:
        return KINDS[self.kind]


def _one_line(text) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _not_a_model_file(path: Path, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} {why}; fastipirm reads {ACCEPTED}")


def _read_weights_only(path: Path):
    """``torch.load`` restricted to tensors and plain containers (memory-mapped when the file
    allows it), or None when the file needs the full unpickler or cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except Exception:  # noqa: BLE001 - any failure: the caller tries the other readers
        return None


def _read_full(path: Path):
    """``torch.load`` with the full unpickler (as for fastipirm checkpoints)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unreadable: say so, whatever torch raised
        raise _not_a_model_file(path, f"cannot be read ({type(exc).__name__}: "
                                      f"{_one_line(exc)})") from None


def _is_state(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _unwrap(obj) -> tuple[Optional[Mapping], Optional[str]]:
    """The state dict in ``obj`` (itself, or one of its values) and the key it was under."""
    if _is_state(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state(obj.get(key)):
                return obj[key], key
        inner = [k for k, v in obj.items() if _is_state(v)]
        if len(inner) == 1:
            return obj[inner[0]], inner[0]
    return None, None


def _epoch_of(path: Path, wrapper) -> tuple[Optional[int], str]:
    if isinstance(wrapper, Mapping) and isinstance(wrapper.get("epoch"), int):
        return wrapper["epoch"], f"epoch {wrapper['epoch']}"
    m = re.fullmatch(r"model_(\d+)\.pth", path.name)        # official main.py: model_<epoch>.pth
    if m:
        return int(m.group(1)), f"epoch {m.group(1)} from the file name"
    return None, "epoch unknown"


def _backbone_meta(path: Path) -> Optional[dict]:
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == BACKBONE_FORMAT else None


def _from_state_dict(path: Path, obj) -> ModelFile:
    """A file holding a bare (or wrapped) state dict: official, ours or an exported backbone."""
    if isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("fastipirm-"):
        raise _not_a_model_file(path, f"has the unknown format {obj['format']!r} (written by "
                                      "another fastipirm version?)")
    state, wrapper_key = _unwrap(obj)
    if state is None:
        raise _not_a_model_file(path, "holds no state dict of tensors")
    keys = [k.removeprefix("module.") for k in state]
    prefixed = "module." if any(k.startswith("module.") for k in state) else ""
    wrapped = f", inside a dict under {wrapper_key!r}" if wrapper_key else ""
    epoch, epoch_text = _epoch_of(path, obj)
    config, meta = None, None
    if any(k.startswith("f.") for k in keys):
        kind = "official"
        try:
            ours = convert_official_state_dict(dict(state))
        except KeyError as exc:
            raise _not_a_model_file(path, f"looks official (f.* keys) but {exc.args[0]}") from None
        extra = f"{prefixed!r} prefix of DataParallel" if prefixed else "no 'module.' prefix"
        detail = f"{extra}{wrapped}; {epoch_text}"
    elif keys and all(k.startswith(("encoder.", "g.")) for k in keys):
        kind, ours, detail = "state_dict", dict(zip(keys, state.values())), epoch_text + wrapped
    elif "conv1.weight" in keys:
        kind = "backbone"
        plain = dict(zip(keys, state.values()))
        try:
            ours = from_torchvision(plain, torchvision_arch(plain))
        except ValueError as exc:
            raise _not_a_model_file(path, f"has torchvision-style keys but {exc}") from None
        meta = _backbone_meta(path)
        if meta is not None:
            try:
                config = from_dict(meta["config"])
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path.with_suffix('.json')}: its config is not valid here: "
                                 f"{_one_line(exc)}") from None
            epoch = meta.get("source", {}).get("epoch")
            detail = f"config from {path.with_suffix('.json').name}, epoch {epoch}"
        else:
            detail = f"no {path.with_suffix('.json').name} beside it"
    else:
        first = ", ".join(list(state)[:3])
        raise _not_a_model_file(path, f"has keys ({first}, ...) of none of these formats")
    return ModelFile(path, kind, ours, config, epoch, f"{KINDS[kind]} {path} ({detail})")


def load_model_file(path) -> ModelFile:
    """Read the weights (and the config, when stored) of any accepted format (module docstring).

    ``FileNotFoundError`` for a missing file or a run directory without ``checkpoint.pt``;
    ``ValueError`` (one line naming the accepted formats) for anything else that is not a model
    file.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise FileNotFoundError(f"{str(path)!r} is a folder without {CHECKPOINT} (not a "
                                    "fastipirm run directory)")
        ckpt = load_checkpoint(path)
        path = path / CHECKPOINT
    elif not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    else:
        ckpt, obj = None, _read_weights_only(path)
        if obj is None or (isinstance(obj, Mapping) and "format" in obj):
            try:
                ckpt = load_checkpoint(path)
            except ValueError:
                if obj is None:      # not a fastipirm checkpoint, and needs the full unpickler
                    obj = _read_full(path)
        if ckpt is None:
            return _from_state_dict(path, obj)
    try:
        config = from_dict(ckpt["config"])
    except ValueError as exc:
        raise ValueError(f"{path}: the stored config is not valid: {_one_line(exc)}") from None
    epoch = ckpt.get("epoch")
    return ModelFile(path, "fastipirm", ckpt["model"], config, epoch,
                     f"fastipirm checkpoint {path} ({config.method.name}, epoch {epoch})")


def model_config(model_file: ModelFile, config=None, overrides=None,
                 log: Callable[[str], None] = print) -> Config:
    """The config to use with ``model_file``: its own (``config``, a TOML path, is then ignored)
    or, for a file without one, ``config`` (default: the default :class:`Config`, the official
    STL-10 run) with the ``model`` keys inferred from the weights. ``overrides``
    (``section.key=value``) apply in both cases, before the inference."""
    mf = model_file
    if mf.config is not None:
        if config:
            log(f"note: {mf.path} holds its config; --config {config} is ignored (use --set to "
                "change keys)")
        return apply_overrides(mf.config, overrides or [])
    cfg = load_config(config, overrides) if config else apply_overrides(Config(), overrides or [])
    try:
        inferred = infer_model_keys(mf.state)
    except ValueError as exc:
        raise ValueError(f"{mf.path}: {exc}") from None
    default = Config().model
    replaced = [f"model.{k} {getattr(cfg.model, k)} -> {v}" for k, v in inferred.items()
                if getattr(default, k) != getattr(cfg.model, k) != v]   # set by the user
    for k, v in inferred.items():
        setattr(cfg.model, k, v)
    validate(cfg)
    head = (f", head {cfg.model.hidden_dim} -> {cfg.model.feature_dim}" if mf.has_head else
            ", no projection head")
    log(f"{mf.kind_name} without a config: settings from "
        f"{config or 'the default config (the official STL-10 run)'}; model from the weights: "
        f"{cfg.model.arch}, width {cfg.model.width}{head}"
        + (f" (replacing {', '.join(replaced)})" if replaced else ""))
    return cfg


def load_weights(model: SimCLRModel, model_file: ModelFile) -> None:
    """Load ``model_file``'s weights into ``model`` (strict; a file without the projection head
    loads the encoder only and leaves the head as initialised: neither kNN nor the linear probe
    reads it). A mismatch is a one-line ``ValueError``."""
    mf = model_file
    try:
        if mf.has_head:
            model.load_state_dict(mf.state)
        else:
            model.encoder.load_state_dict({k.removeprefix("encoder."): v
                                           for k, v in mf.state.items()})
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ValueError(f"{mf.path}: the weights do not fit a {model.arch} of width "
                         f"{model.encoder.conv1.out_channels}: "
                         f"{_one_line(lines[1] if len(lines) > 1 else exc)}") from None


def load_model(path, *, config=None, overrides=None,
               log: Callable[[str], None] = print) -> tuple[SimCLRModel, Config, ModelFile]:
    """``(model on the CPU with the file's weights, its config, the ModelFile)`` of any accepted
    file (:func:`load_model_file`, :func:`model_config`)."""
    mf = load_model_file(path)
    cfg = model_config(mf, config, overrides, log)
    model = runtime.build_model(cfg)
    load_weights(model, mf)
    return model, cfg, mf


def backbone_state(model: SimCLRModel) -> dict:
    """``model``'s encoder as an exportable ``state_dict``: torchvision's names and order, every
    tensor a contiguous CPU copy with its own storage."""
    state = to_torchvision(model.encoder.state_dict(), model.arch)
    return {k: torch.empty_like(v, device="cpu", memory_format=torch.contiguous_format).copy_(v)
            for k, v in state.items()}


def export_backbone(path, out, *, config=None, overrides=None,
                    log: Callable[[str], None] = print) -> dict:
    """``fastipirm export``: the encoder of any accepted file as a torchvision-named
    ``state_dict`` at ``out`` (a folder: ``<out>/backbone.pt``) and its description beside it
    (``<out stem>.json``: architecture, stem, width, feature dimension, input normalisation and
    size, method, full config, source). Returns the description."""
    model, cfg, mf = load_model(path, config=config, overrides=overrides, log=log)
    out = Path(out)
    if out.is_dir():
        out = out / "backbone.pt"
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: name the weights file (e.g. backbone.pt); the "
                         "description is written beside it as <name>.json")
    state = backbone_state(model)
    kind, layers = TORCHVISION_LAYOUT[cfg.model.arch]
    width = cfg.model.width
    meta = {
        "format": BACKBONE_FORMAT,
        "weights": out.name,
        "key_names": "torchvision (no fc)",
        "architecture": cfg.model.arch,
        "block": "BasicBlock" if kind == "basic" else "Bottleneck",
        "layers": list(layers),
        "width": width,
        "stem": {**SMALL_STEM, "conv1": {**SMALL_STEM["conv1"], "out_channels": width}},
        "feature_dim": model.encoder_dim,
        "output": f"global-average-pooled features (N, {model.encoder_dim}), not normalised",
        "input_size": cfg.data.crop_size,
        "input_normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
                                "range": "RGB / 255, then (x - mean) / std per channel"},
        "input_note": f"pretraining crops are {cfg.data.crop_size}x{cfg.data.crop_size}; the "
                      "encoder is fully convolutional with global pooling, and the official "
                      "kNN and linear tests feed test images at their native resolution",
        "method": cfg.method.name if mf.config is not None else None,
        "config": cfg.to_dict(),
        "config_source": ("checkpoint" if mf.config is not None else
                          str(config) if config else "default config (assumed; not in the file)"),
        "source": {"checkpoint": str(mf.path), "format": mf.kind, "epoch": mf.epoch,
                   "description": mf.description},
        "tensors": len(state),
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    write_json(out.with_suffix(".json"), meta)
    log(f"wrote {out} ({cfg.model.arch} width {width}, {len(state)} tensors, "
        f"{model.encoder_dim}-d features, torchvision names) and {out.with_suffix('.json').name}")
    return meta
