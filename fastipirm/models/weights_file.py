"""Reading a published weights file into a network, with errors that name the file and what is
wrong: one home for the checks that DCoDR's MoCo v2 checkpoint and the VGG16 of its perceptual
loss share."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch


def names(keys, limit: int = 8) -> str:
    """``a, b, c, ... (n more)``."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_weights(path: str | os.PathLike, what: str, where: str) -> object:
    """``torch.load(path, weights_only=True)``; ``FileNotFoundError`` naming ``where`` to get
    ``what`` when the file is missing, ``ValueError`` in one line when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; {where}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for whatever reason: say so in one line
        raise ValueError(f"{str(path)!r} cannot be read as {what} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def check_fit(own: Mapping, state: Mapping, path, what: str) -> None:
    """``ValueError`` naming the missing / unexpected keys, or else the mismatched shapes, of
    ``state`` against the network's ``own`` state dict (``what`` says what was expected)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {names(unexpected)}")
        raise ValueError(f"{str(path)!r} is not {what}: " + "; ".join(parts))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if state[k].shape != v.shape]
    if shapes:
        raise ValueError(f"{str(path)!r}: tensor shapes do not fit {what} (file vs model): "
                         f"{names(shapes, 4)}")
