"""Literal reference of the IP-IRM environment objective (the official construction, plainly).

This is the oracle every backend is tested against. It follows the official code
(Wangt-CN/IP-IRM ``utils.info_nce_loss``, ``utils.penalty``, ``info_nce_loss_update`` and
``soft_contrastive_loss(mode='v2')``; see ``docs/official-ipirm.md#nt-xent``, ``#soft-loss`` and
``#penalty``) step by step:

* hard mode: for every environment column, take the member samples (boolean selection, dynamic
  shapes), build the ``2b x (2b-1)`` logit matrix with the positive first and the negatives in
  ascending order of the environment's own concatenated order, take the cross-entropy, and the
  per-slot penalty as the squared norm of ``autograd.grad(..., create_graph=True)`` with respect
  to a dummy vector of ones, one entry per logit column slot;
* soft mode: the full ``2B x (2B-1)`` logit matrix with its slot -> sample map, the "v2" soft loss
  (negatives reweighted by their sample's probability and renormalised to ``2B-2`` per row,
  positive weight 1, anchor-weighted mean), and the same per-slot penalty of that soft loss.

It loops over environments in Python, materialises every logit matrix and uses double backward:
slow on purpose. It runs in any floating dtype (float64 for tests, bf16/fp16 to measure what
PyTorch's own error in that dtype is).

Documented deviations from the official code (shared by every backend;
``docs/deviations.md#empty-environment`` and ``#zero-negative-weight``):

* an empty environment (hard) or an all-zero column (soft) gives loss 0 and penalty 0 with zero
  gradient; the official code stops with an error on an empty environment (its logit
  construction cannot reshape an empty matrix) and would give NaN for an all-zero soft column;
* in soft mode, a row whose negatives all have weight 0 gets a negative term of 0 instead of the
  official ``0/0 = NaN``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .penalties import PENALTIES, SCALAR_PENALTIES, SPLIT_PENALTIES


def official_logits(features: torch.Tensor, *, slots: bool = True, host_masks: bool = False
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``utils.info_nce_loss`` with T=1: raw cosine logits ``(n, n-1)``, positive first.

    ``features`` is ``(n, D)`` with ``n = 2b``: view-1 block first, then view-2 block; the
    negatives follow in ascending column order. Also returns the in-batch sample index of the
    embedding in each slot (the official ``info_nce_loss_update`` map), shape ``(n, n-1)``, int64;
    None with ``slots=False``. ``host_masks``: build the same-sample and diagonal masks on the
    host and copy them to the device, as the official code does (same values; for baselines that
    time the official construction).
    """
    n = features.shape[0]
    b = n // 2
    device = features.device
    sample = torch.cat([torch.arange(b), torch.arange(b)])
    if host_masks:
        same = (sample[None, :] == sample[:, None]).float().to(device)
        off_diag = ~torch.eye(n, dtype=torch.bool).to(device)
        same = same[off_diag].view(n, -1).bool()
    else:
        sample = sample.to(device)
        same = sample[None, :] == sample[:, None]
        off_diag = ~torch.eye(n, dtype=torch.bool, device=device)
        same = same[off_diag].view(n, -1)
    sim = features @ features.T
    sim = sim[off_diag].view(n, -1)
    logits = torch.cat([sim[same].view(n, -1), sim[~same].view(n, -1)], dim=1)
    if not slots:
        return logits, None
    cols = sample.to(device)[None, :].expand(n, n)[off_diag].view(n, -1)
    return logits, torch.cat([cols[same].view(n, -1), cols[~same].view(n, -1)], dim=1)


def _hard_ce(logits: torch.Tensor) -> torch.Tensor:
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def _soft_ce(logits: torch.Tensor, slot_weight: torch.Tensor, anchor_weight: torch.Tensor,
             nonorm: bool) -> torch.Tensor:
    """``soft_contrastive_loss(mode='v2')`` on logits already divided by the temperature."""
    rows, slots = logits.shape  # slots = 2B - 1 (rows < 2B for a split-batch half)
    neg_w = slot_weight[:, 1:]
    row_sum = neg_w.sum(1, keepdim=True)
    safe = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    neg_w = torch.where(row_sum > 0, neg_w / safe * (slots - 1), torch.zeros_like(neg_w))
    exp = torch.exp(logits)
    pos = exp[:, 0]
    neg = (exp[:, 1:] * neg_w).sum(1)
    per_anchor = -torch.log(pos / (pos + neg))
    norm = logits.new_tensor(float(rows)) if nonorm else anchor_weight.sum()
    return (per_anchor * anchor_weight).sum() / norm


def _penalty(loss_fn, scaled_logits: torch.Tensor, penalty: str) -> torch.Tensor:
    """``utils.penalty``: gradient of the loss w.r.t. a dummy scale, by create_graph autograd.

    ``loss_fn(logits, rows)`` evaluates the loss on a subset of rows.
    """
    n, slots = scaled_logits.shape
    scalar = penalty in SCALAR_PENALTIES
    split = penalty in SPLIT_PENALTIES
    dummy = torch.ones(1 if scalar else slots, dtype=scaled_logits.dtype,
                       device=scaled_logits.device, requires_grad=True)
    groups = [torch.arange(0, n, 2), torch.arange(1, n, 2)] if split else [torch.arange(n)]
    grads = []
    for rows in groups:
        rows = rows.to(scaled_logits.device)
        loss = loss_fn(scaled_logits[rows] * dummy, rows)
        grads.append(torch.autograd.grad(loss, dummy, create_graph=True)[0])
    if split:
        return (grads[0] * grads[1]).sum()
    return (grads[0] ** 2).sum()


def env_contrastive_loss_reference(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor, *,
                                   temperature: float, irm_temperature: float, soft: bool,
                                   penalty: str = "slot", nonorm: bool = False
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop-over-environments reference of :func:`fastipirm.ops.env_contrastive_loss`.

    Computes in the dtype of ``z1`` (pass float64 tensors for an exact oracle). Returns
    ``(loss, penalty)`` of shape ``(M,)`` in that dtype. Differentiable w.r.t. z1, z2 and, in soft
    mode, env_weights (double backward through the penalty).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; expected one of {PENALTIES}")
    batch, n_env = env_weights.shape
    losses, penalties = [], []
    zero = (z1.sum() + z2.sum()) * 0.0
    if soft:
        logits, slot_sample = official_logits(torch.cat([z1, z2]))
        for m in range(n_env):
            w = env_weights[:, m].to(z1.dtype)
            if not bool((w > 0).any()):
                losses.append(zero + (w * 0).sum())
                penalties.append(zero + (w * 0).sum())
                continue
            slot_w = w[slot_sample]
            anchor_w = slot_w[:, 0]

            def loss_fn(lg, rows, slot_w=slot_w, anchor_w=anchor_w):
                return _soft_ce(lg, slot_w[rows], anchor_w[rows], nonorm)

            all_rows = torch.arange(2 * batch, device=z1.device)
            losses.append(loss_fn(logits / temperature, all_rows))
            penalties.append(_penalty(loss_fn, logits / irm_temperature, penalty))
    else:
        for m in range(n_env):
            members = torch.nonzero(env_weights[:, m] > 0.5).flatten()
            if members.numel() == 0:
                losses.append(zero)
                penalties.append(zero)
                continue
            logits, _ = official_logits(torch.cat([z1[members], z2[members]]), slots=False)

            def loss_fn(lg, rows):
                return _hard_ce(lg)

            losses.append(_hard_ce(logits / temperature))
            penalties.append(_penalty(loss_fn, logits / irm_temperature, penalty))
    return torch.stack(losses), torch.stack(penalties)
