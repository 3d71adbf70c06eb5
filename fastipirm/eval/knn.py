"""The weighted kNN monitor (the official ``test()`` of DCL and IP-IRM).

Memory = L2-normalised encoder features (``normalize(h)``, 2048-d for ResNet-50) of the labelled
train split, queries = the test split, both at native resolution, model in eval mode under
``no_grad``. Each query takes its ``k`` most cosine-similar memory items (``k`` clamped to the
memory size), weights them by ``exp(cos / T)`` and predicts the class with the largest weight
sum. Top-1 and top-5 in percent.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from ..models import eval_mode
from .features import extract_features, labels_of


@torch.no_grad()
def knn_predict(queries: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor,
                num_classes: int, *, k: int, temperature: float,
                chunk: int = 1024) -> torch.Tensor:
    """Class ranking ``(Q, num_classes)`` (best first) of each query by weighted kNN voting.

    ``queries`` and ``memory`` are L2-normalised rows; the weight of a neighbour is
    ``exp(cos / temperature)``.
    """
    k = min(k, memory.shape[0])
    ranks = []
    for q0 in range(0, queries.shape[0], chunk):
        sim = queries[q0:q0 + chunk] @ memory.T                      # (q, M)
        weight, idx = sim.topk(k, dim=1)
        weight = (weight / temperature).exp()
        labels = memory_labels[idx]                                  # (q, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weight.dtype)
        scores.scatter_add_(1, labels, weight)
        ranks.append(scores.argsort(dim=1, descending=True))
    return torch.cat(ranks)


def topk_accuracy(ranks: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of class rankings against ``labels``."""
    labels = labels.to(ranks.device)
    top1 = (ranks[:, 0] == labels).float().mean().item() * 100
    kk = min(5, ranks.shape[1])
    top5 = (ranks[:, :kk] == labels[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def knn_evaluate(model: torch.nn.Module, memory_set, test_set, *, k: int, temperature: float,
                 batch_size: int, device: torch.device, transform: Callable,
                 autocast: Callable = contextlib.nullcontext,
                 channels_last: bool = False) -> dict:
    """kNN top-1/top-5 (percent) of ``test_set`` against ``memory_set`` (model in eval mode)."""
    start = time.perf_counter()
    with eval_mode(model):
        def feat(x):
            return model(x)[0]                                        # normalize(h)
        kw = dict(batch_size=batch_size, device=device, transform=transform,
                  autocast=autocast, channels_last=channels_last)
        memory = extract_features(feat, memory_set, **kw)
        queries = extract_features(feat, test_set, **kw)
    num_classes = int(memory_set.num_classes)
    ranks = knn_predict(queries, memory, labels_of(memory_set).to(device), num_classes, k=k,
                        temperature=temperature)
    top1, top5 = topk_accuracy(ranks, labels_of(test_set))
    return {"knn_top1": top1, "knn_top5": top5, "knn_seconds": time.perf_counter() - start}
