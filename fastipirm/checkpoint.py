"""Checkpoint I/O: atomic save, load with a format check, RNG capture and restore, config.

A checkpoint (``<run dir>/checkpoint.pt``) is one ``torch.save`` dict:
``format``, ``config`` (the resolved config as a dict), ``epoch``, ``step``, ``model``,
``optimizer``, ``scaler``, ``method`` (the method's own state, e.g. IP-IRM's partitions), ``rng``
(:func:`capture_rng`) and ``history`` (one metrics row per epoch). It is written atomically
(:mod:`fastipirm.atomic`), so a crash or a kill while saving leaves the previous checkpoint
intact. Checkpoints of the first format (before methods had their own state) are upgraded when
they are read.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .atomic import atomic_file
from .config import Config, apply_overrides, from_dict, upgrade_v1_dict

CHECKPOINT = "checkpoint.pt"
FORMAT = "fastipirm-checkpoint-2"
_V1 = "fastipirm-checkpoint-1"


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (the previous file survives any failure)."""
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


def _upgrade_v1(ckpt: dict) -> dict:
    """A first-format checkpoint in the current layout (IP-IRM state under ``method``)."""
    ckpt = dict(ckpt)
    ckpt["config"] = upgrade_v1_dict(ckpt["config"])
    ckpt["method"] = {key: ckpt.pop(key) for key in ("partitions", "last_theta", "partition_log")
                      if key in ckpt}
    if ckpt["config"]["method"]["name"] != "ipirm":
        ckpt["method"] = {}
    ckpt["format"] = FORMAT
    return ckpt


def load_checkpoint(path) -> dict:
    """Read a checkpoint file (or ``<run dir>/checkpoint.pt``); ``ValueError`` if it is not one."""
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
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == _V1:
        return _upgrade_v1(ckpt)
    if fmt != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fastipirm checkpoint")
    return ckpt


def config_from_checkpoint(path, overrides: Optional[list] = None) -> Config:
    """The config stored in a checkpoint, with ``section.key=value`` overrides applied."""
    return apply_overrides(from_dict(load_checkpoint(path)["config"]), overrides or [])


def capture_rng(device: torch.device, generators: dict) -> dict:
    """Every RNG state a run draws from: torch, NumPy, Python, CUDA (on a GPU) and the named
    ``generators`` (e.g. the augmentation generator), all as CPU objects."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            **{name: g.get_state().cpu() for name, g in generators.items()}}


def restore_rng(state: dict, device: torch.device, generators: dict) -> None:
    """Put back what :func:`capture_rng` captured (same ``generators`` names)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state[name].to(g.get_state().device))
