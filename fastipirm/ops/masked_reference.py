"""Literal reference of :func:`fastipirm.ops.masked_contrastive_loss`: the definition written
plainly, the oracle every backend is tested against.

It builds the whole ``Q x K`` logit matrix (for the distances through the ``Q x K x D``
difference tensor), takes each query's terms in a Python loop (its positive or target columns,
then its negatives with their weights) and their log-sum-exp (shifted by the largest logit of
the row whose weight is not zero), and obtains the per-key-column
gradients of the penalty by ``autograd.grad(create_graph=True)`` w.r.t. a dummy vector of ones
that scales the key columns' logits. Slow on purpose; any floating dtype (float64 for tests).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .spec import MaskedContrastiveSpec


def _similarity(a: Tensor, b: Tensor, spec: MaskedContrastiveSpec) -> Tensor:
    """``s(a_i, b_j)`` for every pair: (A, B)."""
    if spec.similarity == "dot":
        return a @ b.T
    diff = a[:, None, :] - b[None, :, :]
    return -(diff.abs() ** spec.p).sum(-1) if spec.similarity != "sqeuclidean" \
        else -(diff * diff).sum(-1)


def masked_contrastive_loss_reference(
        queries: Tensor, keys: Optional[Tensor] = None, positives: Optional[Tensor] = None,
        positive_index: Optional[Tensor] = None, *, positive_weight: Optional[Tensor] = None,
        similarity: str = "dot", p: Optional[float] = None, temperature: float = 1.0,
        include_self: bool = False, query_groups: Optional[Tensor] = None,
        key_groups: Optional[Tensor] = None, self_index: Optional[Tensor] = None,
        key_weights: Optional[Tensor] = None, penalty_row_weights: Optional[Tensor] = None,
        reduction: str = "mean", key_penalty: bool = False):
    """The loop-over-queries definition (see :func:`fastipirm.ops.masked_contrastive_loss` for
    the arguments); computes in the dtype of ``queries``."""
    spec = MaskedContrastiveSpec(similarity, p, temperature, include_self, reduction, key_penalty)
    q = queries
    k = q if keys is None else keys
    n_q, n_k = q.shape[0], k.shape[0]
    if keys is None:
        self_index = torch.arange(n_q, device=q.device)
        key_groups = query_groups
    dummy = torch.ones(n_k, dtype=q.dtype, device=q.device, requires_grad=key_penalty)
    logits = _similarity(q, k, spec) / spec.temperature * dummy             # (Q, K)
    if positives is not None:
        pos_logits = (q * positives).sum(1) if spec.similarity == "dot" else torch.diagonal(
            _similarity(q, positives, spec))
        pos_logits = pos_logits / spec.temperature
    if positive_index is not None and positive_index.dim() == 1:
        positive_index = positive_index[:, None]
    if positive_index is not None:
        tw = (torch.ones(positive_index.shape[1], dtype=q.dtype, device=q.device)
              if positive_weight is None else positive_weight.to(q.dtype))
        tw = tw.expand(n_q, positive_index.shape[1])
    losses = []
    for i in range(n_q):
        targets = [] if positive_index is None else positive_index[i].tolist()
        terms, weighted, numerator = [], [], None
        if positives is not None:
            terms.append(pos_logits[i])
            numerator = pos_logits[i]
        else:
            for t, j in enumerate(targets):
                if j not in targets[:t]:                  # a column counts once in the sum
                    terms.append(logits[i, j])
                part = tw[i, t] * logits[i, j]
                numerator = part if numerator is None else numerator + part
        for j in range(n_k):
            if j in targets:
                continue
            if query_groups is not None and int(query_groups[i]) != int(key_groups[j]):
                continue
            if self_index is not None and j == int(self_index[i]) and not include_self:
                continue
            weight = None if key_weights is None else key_weights[j].to(q.dtype)
            weighted.append((logits[i, j], weight))
        # log(sum_t e^{x_t} + sum_j w_j e^{x_j}), shifted by the largest logit that counts (a
        # zero-weight column keeps its derivative e^{x_j} / Z in w_j but sets no shift)
        shift = torch.stack(terms + [x for x, w in weighted if w is None or float(w.detach()) > 0])
        shift = shift.detach().max()
        total = torch.exp(torch.stack(terms) - shift).sum()
        for x, w in weighted:
            e = torch.exp(x - shift)
            if w is not None and float(w.detach()) == 0 and not bool(torch.isfinite(e)):
                continue                          # 0 * inf: the term is 0 (its w-derivative inf)
            total = total + e * (1.0 if w is None else w)
        losses.append(torch.log(total) + shift - numerator)
    losses = torch.stack(losses)
    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    if not key_penalty:
        return loss
    if penalty_row_weights is None:
        if query_groups is None:
            penalty_row_weights = torch.full((n_q,), 1.0 / n_q, dtype=q.dtype, device=q.device)
        else:
            same = (query_groups[:, None] == query_groups[None, :]).sum(1)
            penalty_row_weights = 1.0 / same.to(q.dtype)
    penalty = (penalty_row_weights.to(q.dtype) * losses).sum()
    if not penalty.requires_grad:         # no negative pair anywhere: nothing depends on dummy
        return loss, torch.zeros_like(dummy.detach())
    (key_grads,) = torch.autograd.grad(penalty, dummy, create_graph=True,
                                       materialize_grads=True)
    return loss, key_grads
