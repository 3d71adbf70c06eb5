"""Evaluation of saved models: ``fastipirm eval knn``, and what it shares with ``eval linear``.

Both commands take any file :func:`fastipirm.model_files.load_model_file` reads: a fastipirm
checkpoint (file or run directory) brings its own config; an official IP-IRM checkpoint (or
another file without a config) takes its data and evaluation settings from ``--config`` (default:
the default config, i.e. the official STL-10 run) and its model shape from its weights. The
results are written next to the checkpoint (:func:`result_path`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .. import runtime
from ..data import eval_transform
from ..checkpoint import CHECKPOINT
from ..model_files import ModelFile, load_model
from ..runlog import write_json
from .knn import knn_evaluate


def result_path(checkpoint, name: str) -> Path:
    """Where the result file ``name`` (e.g. ``knn_eval.json``) of ``checkpoint`` is written: in
    the run directory for a run (or its ``checkpoint.pt``), else beside the file with its name in
    front (``model_400.knn_eval.json``), so the evaluations of several files in one folder do not
    overwrite each other."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / name
    if path.name == CHECKPOINT:
        return path.parent / name
    return path.with_name(f"{path.stem}.{name}")


def load_for_eval(checkpoint, *, config=None, overrides=None, device: Optional[str] = None,
                  log: Callable[[str], None] = print):
    """``(model placed on the device, config, device, ModelFile)`` of a saved model; the device is
    ``device`` or the config's ``run.device``, and ``run.threads`` is applied."""
    model, cfg, mf = load_model(checkpoint, config=config, overrides=overrides, log=log)
    dev = runtime.select_device(device or cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return runtime.place_model(model, cfg, dev), cfg, dev, mf


def source_fields(checkpoint, mf: ModelFile) -> dict:
    """The fields naming the evaluated model in a result file."""
    return {"checkpoint": str(checkpoint), "checkpoint_format": mf.kind, "epoch": mf.epoch}


def knn_eval_checkpoint(checkpoint, *, config=None, overrides=None, k: Optional[int] = None,
                        temperature: Optional[float] = None, device: Optional[str] = None,
                        log: Callable[[str], None] = print) -> dict:
    """``fastipirm eval knn``: the weighted kNN monitor of a saved model
    (``docs/official-ipirm.md#knn``). The memory bank is ``data.memory_split``, the queries
    ``data.test_split``; ``k`` and ``temperature`` default to ``eval.k`` and the config's kNN
    temperature (``eval.knn_temperature``, else ``train.temperature``, as officially). Writes
    ``knn_eval.json`` next to the checkpoint (:func:`result_path`) and returns its content."""
    sets = list(overrides or [])
    if k is not None:
        sets.append(f"eval.k={k}")
    if temperature is not None:
        sets.append(f"eval.knn_temperature={temperature!r}")
    model, cfg, dev, mf = load_for_eval(checkpoint, config=config, overrides=sets, device=device,
                                        log=log)
    memory = runtime.load_split(cfg, cfg.data.memory_split)
    test = runtime.load_split(cfg, cfg.data.test_split)
    ev = cfg.eval
    log(f"kNN of {mf.description}: {cfg.data.name} memory {cfg.data.memory_split} "
        f"({len(memory.images)}), queries {cfg.data.test_split} ({len(test.images)}), "
        f"k {ev.k}, temperature {cfg.knn_temperature:g}")
    res = knn_evaluate(model, memory, test, k=ev.k, temperature=cfg.knn_temperature,
                       batch_size=ev.batch_size, device=dev, transform=eval_transform,
                       autocast=runtime.autocast_factory(dev, cfg.train.amp),
                       channels_last=cfg.model.channels_last)
    out = {**res, "k": ev.k, "temperature": cfg.knn_temperature, "data": cfg.data.name,
           "memory_split": cfg.data.memory_split, "test_split": cfg.data.test_split,
           **source_fields(checkpoint, mf)}
    write_json(result_path(checkpoint, "knn_eval.json"), out)
    log(f"kNN top-1 {res['knn_top1']:.2f}%, top-5 {res['knn_top5']:.2f}% "
        f"({res['knn_seconds']:.1f} s)")
    return out
