"""Probes of every discrete generative factor of a synthetic data set (shape, colour, ...).

One eval-mode, no-grad pass over each split gives the encoder's features; for every discrete
factor, kNN on the normalised features (as the kNN monitor) and a linear probe on the cached
*unnormalised* features (frozen, eval-mode BN, no augmentation: the fast variant of the protocol).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..models import eval_mode
from .features import extract_features
from .knn import knn_predict, topk_accuracy
from .linear import linear_on_features


def factor_datasets(dataset) -> dict:
    """``{factor: dataset labelled by it}`` for every discrete factor of a synthetic data set that
    takes more than one value."""
    out = {}
    for name, values in (getattr(dataset, "factors", None) or {}).items():
        values = np.asarray(values)
        if values.dtype.kind in "iu" and len(np.unique(values)) > 1:   # a constant: no probe
            out[name] = SimpleNamespace(images=dataset.images, labels=values.astype(np.int64),
                                        num_classes=int(values.max()) + 1,
                                        name=f"{dataset.name}[{name}]")
    return out


def factor_evaluation(model: torch.nn.Module, memory_set, test_set, *, k: int,
                      temperature: float, batch_size: int, device: torch.device,
                      transform: Callable, linear_epochs: int, linear_batch_size: int,
                      linear_lr: float, linear_weight_decay: float, seed: int = 0,
                      autocast: Callable = contextlib.nullcontext,
                      channels_last: bool = False) -> dict:
    """kNN and linear accuracy for every discrete generative factor. Returns
    ``{factor: {"knn_top1", "linear_top1", "linear_best_top1", "num_classes"}}``."""
    mem_f, test_f = factor_datasets(memory_set), factor_datasets(test_set)
    names = [f for f in mem_f if f in test_f]
    if not names:
        return {}
    with eval_mode(model):
        kw = dict(batch_size=batch_size, device=device, transform=transform, autocast=autocast,
                  channels_last=channels_last, normalize=False)
        mem_h = extract_features(model.encoder, memory_set, **kw)
        test_h = extract_features(model.encoder, test_set, **kw)
    mem_n, test_n = F.normalize(mem_h, dim=1), F.normalize(test_h, dim=1)
    out = {}
    for name in names:
        classes = max(mem_f[name].num_classes, test_f[name].num_classes)
        y_mem = torch.as_tensor(mem_f[name].labels).to(device)
        y_test = torch.as_tensor(test_f[name].labels)
        ranks = knn_predict(test_n, mem_n, y_mem, classes, k=k, temperature=temperature)
        lin = linear_on_features(mem_h, y_mem, test_h, y_test, classes, epochs=linear_epochs,
                                 batch_size=linear_batch_size, lr=linear_lr,
                                 weight_decay=linear_weight_decay, seed=seed)
        out[name] = {"num_classes": classes, "knn_top1": topk_accuracy(ranks, y_test)[0],
                     "linear_top1": lin["final_top1"], "linear_best_top1": lin["best_top1"]}
    return out
