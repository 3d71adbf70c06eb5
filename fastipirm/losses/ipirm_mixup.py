"""IP-IRM + MixUp's losses (official ``utils_mixup.py``; ``docs/official-ipirm.md#mixup``) on
the general masked op.

* :func:`imix_loss`: the i-Mix form, one-directional and B x B: mixed view-1 queries ``q``
  against clean view-2 keys ``k``, ``S = q k^T / tau``, ``lam_bar CE(S, i) + (1 - lam_bar)
  CE(S, partner(i))`` with ``lam_bar`` the **batch mean** of the per-sample weights (the official
  ``CrossEntropyLoss`` averages before lambda multiplies it). On the op: two target columns per
  row, ``i`` and ``partner(i)``, weighted ``lam_bar`` and ``1 - lam_bar``.
* :func:`imix_environment_terms`: one retained partition's terms. Rows sorted by environment,
  each environment's queries re-mixed within it; for environment ``k`` the same i-Mix loss over
  its members only (its keys, its ``lam_bar_k``), ``L_k``, and the IRM penalty with one dummy
  scale per key column, ``R_k = sum_j (dL_k / ds_j)^2`` (the op's ``key_penalty``, closed form).
  Returns ``mean_k L_k`` and ``mean_k R_k`` over the environments present.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import distributed
from ..ops import key_group_penalty, masked_contrastive_loss


def _targets(lam_bar: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    own = torch.arange(partner.shape[0], device=partner.device)
    weights = torch.stack([lam_bar, 1 - lam_bar], 1)
    return torch.stack([own, partner], 1), weights


def imix_loss(q: Tensor, k: Tensor, lam: Tensor, partner: Tensor, *, temperature: float,
              backend: Optional[str] = None, check_values: bool = True,
              rows: Optional[Tensor] = None) -> Tensor:
    """The i-Mix loss of mixed queries ``q`` (B, D) against clean keys ``k`` (B, D).

    ``rows`` (the op's DDP form, ``docs/distributed.md``): ``q`` holds only the queries of the
    batch positions ``rows`` (this rank's share), ``k`` every key of the batch (gathered),
    ``lam`` and ``partner`` the whole batch's draws; the mean over the local queries."""
    lam_bar = lam.to(q.dtype).mean().expand(q.shape[0])
    if rows is None:
        index, weights = _targets(lam_bar, partner)
    else:
        index = torch.stack([rows, partner[rows]], 1)
        weights = torch.stack([lam_bar, 1 - lam_bar], 1)
    return masked_contrastive_loss(q, k, positive_index=index, positive_weight=weights,
                                   temperature=temperature, backend=backend,
                                   check_values=check_values)


def imix_environment_terms(q: Tensor, k: Tensor, envs: Tensor, lam: Tensor, partner: Tensor, *,
                           temperature: float, backend: Optional[str] = None,
                           check_values: bool = True, rows: Optional[Tensor] = None,
                           world: int = 1) -> tuple[Tensor, Tensor]:
    """``(mean_k L_k, mean_k R_k)`` of one partition; rows sorted by environment ``envs``,
    ``partner`` inside each row's environment (sorted coordinates).

    ``rows`` (the op's DDP form, ``docs/distributed.md``): ``q`` holds only the queries of the
    sorted positions ``rows`` (this rank's share of each environment), ``k``, ``envs``, ``lam``
    and ``partner`` the whole (sorted) batch. Each ``L_k`` is then this rank's partial sum of
    the environment's mean, times ``world`` (so that the mean over the ranks is ``mean_k L_k``),
    and the per-key-column gradients are all-reduced (autograd-aware) before they are squared:
    every rank returns the whole ``mean_k R_k``."""
    groups, inverse, counts = torch.unique(envs, return_inverse=True, return_counts=True)
    lam_sum = torch.zeros(groups.shape[0], dtype=q.dtype, device=q.device).index_add(
        0, inverse, lam.to(q.dtype))
    lam_bar = (lam_sum / counts.to(q.dtype))[inverse]
    if rows is None:
        index, weights = _targets(lam_bar, partner)
        query_envs, query_inverse, extra = envs, inverse, {}
    else:
        index = torch.stack([rows, partner[rows]], 1)
        weights = torch.stack([lam_bar[rows], 1 - lam_bar[rows]], 1)
        query_envs, query_inverse = envs[rows], inverse[rows]
        # c_i = 1 / (the environment's size in the whole batch), not in this rank's share
        extra = {"penalty_row_weights": 1.0 / counts[query_inverse].to(q.dtype)}
    losses, key_grads = masked_contrastive_loss(
        q, k, positive_index=index, positive_weight=weights, query_groups=query_envs,
        key_groups=envs, temperature=temperature, reduction="none", key_penalty=True,
        backend=backend, check_values=check_values, **extra)
    per_env = torch.zeros(groups.shape[0], dtype=losses.dtype, device=q.device).index_add(
        0, query_inverse, losses) / counts.to(losses.dtype)
    if rows is not None:
        per_env = per_env * world
        key_grads = distributed.all_reduce_grad(key_grads)
    _, penalties = key_group_penalty(key_grads, envs)
    return per_env.mean(), penalties.mean()


def mixup_maximization_objective(q: Tensor, k: Tensor, lam: Tensor, partner: Tensor,
                                 logits: Tensor, *, temperature: float, irm_weight: float,
                                 constrain: bool = True, constrain_relax: bool = True,
                                 nonorm: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective of the online MixUp partition search (official ``--mixup_max``,
    ``auto_split_online_mixup``) on one feature batch; minimise it over ``logits`` (B, K).

    ``q`` the mixed view-1 projections, ``k`` the clean view-2 ones (fixed), ``S = q k^T / tau``.
    For environment ``e`` with soft memberships ``w = softmax(logits)[:, e]``: column weights
    ``W_ii = 1`` and ``W_ij = (B - 1) w_j / sum_{l != i} w_l``, ``p_ij = W_ij e^{S_ij} / sum_l
    W_il e^{S_il}`` (the partner's numerator carries its weight), ``L_e = mean_i [lam_i (-log
    p_ii) + (1 - lam_i)(-log p_i,partner(i))]`` (the official takes the mean before its anchor
    weighting, which therefore cancels), ``R_e = sum_j (dL_e / ds_j)^2`` for a scale ``s_j`` of
    column ``j``. ``J = -(mean_e L_e + irm_weight mean_e R_e) + C(q)`` with IP-IRM's balance term.
    Plain torch (B x B per environment, double backward for the penalty): a search step, not the
    training hot path.
    """
    from .ipirm import balance_constraint

    b = q.shape[0]
    s = q @ k.T / temperature
    eye = torch.eye(b, dtype=torch.bool, device=q.device)
    soft = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    own = torch.arange(b, device=q.device)
    lam = lam.to(s.dtype)
    losses, penalties = [], []
    for e in range(soft.shape[1]):
        w = soft[:, e].to(s.dtype)
        off = w.unsqueeze(0).expand(b, b).masked_fill(eye, 0.0)
        weights = torch.where(eye, torch.ones_like(off), off / off.sum(1, keepdim=True) * (b - 1))
        scale = torch.ones(1, b, dtype=s.dtype, device=q.device, requires_grad=True)

        def env_loss(logits_):
            logp = torch.log(weights) + logits_
            logp = logp - torch.logsumexp(logp, dim=1, keepdim=True)
            return (lam * -logp[own, own] + (1 - lam) * -logp[own, partner]).mean()

        losses.append(env_loss(s))
        (g,) = torch.autograd.grad(env_loss(s * scale), scale, create_graph=True)
        penalties.append((g * g).sum())
    loss, pen = torch.stack(losses).mean(), torch.stack(penalties).mean()
    constraint = balance_constraint(soft, constrain=constrain, constrain_relax=constrain_relax,
                                    nonorm=nonorm)
    objective = -(loss + irm_weight * pen) + constraint
    return objective, {"loss": loss.detach(), "penalty": pen.detach(),
                       "constraint": constraint.detach()}
