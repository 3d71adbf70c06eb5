"""The two IP-IRM objectives, built on one call of :func:`fastipirm.ops.env_contrastive_loss`.

* :func:`minimization_loss`: the encoder's loss of the official ``train_env``
  (``docs/official-ipirm.md#minimisation``):
  ``L_glob (if keep_cont) + mean_{p,k} L_{p,k} + lambda1 * mean_{p,k} R_{p,k}``, divided by
  ``lambda1`` when ``lambda1 > 1``. All retained partitions and environments are the columns of
  one hard membership matrix; the global NT-Xent is one more all-ones column of the same call.
  With ``debiased=True`` the global term is DCL's debiased estimator instead
  (:func:`~fastipirm.losses.simclr.debiased_nt_xent`; the official applies ``--debiased`` only to
  its ``--baseline`` loss, so this is an extension) and the op gets the environment columns only.
* :func:`maximization_objective`: the partition's objective of ``auto_split_offline``
  (``docs/official-ipirm.md#offline``), *minimised* over the partition logits:
  ``-mean_k (L^soft_k + lambda2 * R^soft_k) + C(q)`` with the balance constraint ``C``
  (``irm_mode="v1"``), or ``-(mean_k L^soft_k + lambda2 * var_k L^soft_k) + C(q)`` with the
  unbiased variance over the K environments (``irm_mode="v2"``, the official variance mode).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import distributed
from ..ops import env_contrastive_loss, env_contrastive_partials, env_penalty
from .simclr import debiased_nt_xent

IRM_MODES = ("v1", "v2")  # maximisation penalty: v1 the IRM gradient penalty, v2 the loss variance

OFFICIAL_RELAX_THRESHOLD = 0.6365  # the official literal: H(1/3, 2/3) rounded, K = 2 only


def relaxed_entropy_threshold(num_envs: int) -> float:
    """Entropy threshold of ``constrain_relax`` for K environments.

    K = 2: the official constant 0.6365 (= H(1/3, 2/3)). K > 2 (the official constant only fits
    K = 2): the entropy of a 2:1:...:1 split, ``H([2, 1, ..., 1] / (K + 1))``, as a public fork
    generalises it: an extension, not official behaviour (``docs/deviations.md#relaxed-threshold``).
    """
    if num_envs < 2:
        raise ValueError(f"the balance constraint needs at least 2 environments, got {num_envs}")
    if num_envs == 2:
        return OFFICIAL_RELAX_THRESHOLD
    probs = [2.0 / (num_envs + 1)] + [1.0 / (num_envs + 1)] * (num_envs - 1)
    return -sum(p * math.log(p) for p in probs)


def memberships_from_logits(partitions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Hard memberships of a batch for every retained partition, as one ``(B, P*K)`` matrix.

    ``partitions`` is ``(P, N, K)`` (logits or probabilities, one row per dataset index);
    column ``p*K + k`` is 1 where ``argmax_k partitions[p, idx]`` is ``k`` (official hard
    assignment; ties go to the lowest k, as ``torch.argmax``).
    """
    if partitions.dim() != 3:
        raise ValueError(f"partitions must be (P, N, K), got shape {tuple(partitions.shape)}")
    p, _, k = partitions.shape
    assign = partitions[:, indices].argmax(-1)                         # (P, B)
    onehot = F.one_hot(assign, k).to(torch.float32)                    # (P, B, K)
    return onehot.permute(1, 0, 2).reshape(indices.shape[0], p * k)


def minimization_loss(z1: torch.Tensor, z2: torch.Tensor, memberships: Optional[torch.Tensor], *,
                      temperature: float, irm_temperature: float, penalty_weight: float,
                      keep_cont: bool, backend: Optional[str] = None, penalty: str = "slot",
                      check_values: bool = True, debiased: bool = False, tau_plus: float = 0.1,
                      rows: Optional[tuple[int, int]] = None, world: int = 1
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Official minimisation loss over all retained partitions at once.

    Args:
        z1, z2: ``(B, D)`` normalised projections of the two views.
        memberships: ``(B, P*K)`` 0/1 matrix (see :func:`memberships_from_logits`), or ``None``
            for a plain SimCLR step (then ``keep_cont`` must be True).
        penalty_weight: lambda1 (already scheduled by the caller); the whole loss is divided by
            it when it exceeds 1, as the official code does.
        keep_cont: add the global NT-Xent over the whole batch (no penalty on it).
        debiased, tau_plus: the global term is DCL's debiased NT-Xent with class prior
            ``tau_plus`` (:func:`~fastipirm.losses.simclr.debiased_nt_xent`) instead of NT-Xent;
            needs ``keep_cont``. The environment terms are unchanged.
        rows, world: the op's distributed form (``docs/distributed.md#gradients``): ``z1``,
            ``z2`` and ``memberships`` are the gathered global batch and only the samples
            ``[start, stop) = rows`` (this rank's share) are anchors. Every loss term is then this
            rank's partial sum times ``world`` (their mean over the ranks is the global loss), and
            the per-slot gradients are all-reduced (autograd-aware) before they are squared, so
            every rank returns the whole penalty. Not with ``debiased``.

    Returns ``(total, parts)`` with parts ``loss_global``, ``loss_env`` (mean over the P*K
    columns), ``penalty`` (mean), and the per-column ``env_losses``/``env_penalties``, all
    detached.
    """
    if memberships is None and not keep_cont:
        raise ValueError("minimization_loss needs memberships, keep_cont=True, or both")
    if debiased:
        if rows is not None:
            raise ValueError("debiased has no distributed form (rows): compute the global "
                             "loss on every rank instead")
        return _debiased_minimization_loss(z1, z2, memberships, temperature=temperature,
                                           irm_temperature=irm_temperature,
                                           penalty_weight=penalty_weight, keep_cont=keep_cont,
                                           backend=backend, penalty=penalty,
                                           check_values=check_values, tau_plus=tau_plus)
    batch = z1.shape[0]
    columns = []
    if keep_cont:
        columns.append(torch.ones(batch, 1, dtype=torch.float32, device=z1.device))
    if memberships is not None:
        columns.append(memberships.to(device=z1.device, dtype=torch.float32))
    weights = torch.cat(columns, 1) if len(columns) > 1 else columns[0]
    if rows is None:
        losses, penalties = env_contrastive_loss(z1, z2, weights, temperature=temperature,
                                                 irm_temperature=irm_temperature, soft=False,
                                                 backend=backend, penalty=penalty,
                                                 check_values=check_values)
    else:
        losses, slot_grads = env_contrastive_partials(
            z1, z2, weights, samples=rows, temperature=temperature,
            irm_temperature=irm_temperature, penalty=penalty, backend=backend,
            check_values=check_values)
        penalties = env_penalty(distributed.all_reduce_grad(slot_grads), weights,
                                penalty=penalty)
        losses = losses * world
    zero = losses.new_zeros(())
    loss_global = losses[0] if keep_cont else zero
    env_losses = losses[1:] if keep_cont else losses
    env_penalties = penalties[1:] if keep_cont else penalties
    if memberships is not None:
        loss_env, pen = env_losses.mean(), env_penalties.mean()
    else:
        loss_env, pen = zero, zero
    return _combine(loss_global, loss_env, pen, env_losses, env_penalties, penalty_weight)


def _combine(loss_global, loss_env, pen, env_losses, env_penalties, penalty_weight):
    total = loss_global + loss_env + penalty_weight * pen
    if penalty_weight > 1.0:
        total = total / penalty_weight
    parts = {"loss_global": loss_global.detach(), "loss_env": loss_env.detach(),
             "penalty": pen.detach(), "env_losses": env_losses.detach(),
             "env_penalties": env_penalties.detach()}
    return total, parts


def _debiased_minimization_loss(z1, z2, memberships, *, temperature, irm_temperature,
                                penalty_weight, keep_cont, backend, penalty, check_values,
                                tau_plus):
    """:func:`minimization_loss` with a debiased global term; the op gets the environments only."""
    if not keep_cont:
        raise ValueError("debiased applies to the global NT-Xent term: it needs keep_cont=True")
    loss_global = debiased_nt_xent(z1, z2, temperature=temperature, tau_plus=tau_plus)
    if memberships is None:
        zero = loss_global.new_zeros(())
        empty = loss_global.new_zeros((0,))
        return _combine(loss_global, zero, zero, empty, empty, penalty_weight)
    weights = memberships.to(device=z1.device, dtype=torch.float32)
    env_losses, env_penalties = env_contrastive_loss(
        z1, z2, weights, temperature=temperature, irm_temperature=irm_temperature, soft=False,
        backend=backend, penalty=penalty, check_values=check_values)
    return _combine(loss_global, env_losses.mean(), env_penalties.mean(), env_losses,
                    env_penalties, penalty_weight)


def _entropy(q: torch.Tensor) -> torch.Tensor:
    return -(q * torch.log(q.clamp_min(1e-12))).sum(-1)


def balance_constraint(q: torch.Tensor, *, constrain: bool, constrain_relax: bool,
                       nonorm: bool) -> torch.Tensor:
    """Official balance term ``C(q)`` on the batch's soft memberships ``q`` (B, K).

    * ``constrain`` off: 0;
    * ``nonorm``: ``0.2 * (-H(mean q) + mean_i H(q_i))`` (balanced but confident);
    * ``constrain_relax``: ``relu(threshold - H(mean q))``, threshold 0.6365 for K = 2 (see
      :func:`relaxed_entropy_threshold` for K > 2);
    * otherwise: ``-H(mean q)``.
    """
    if not constrain:
        return q.new_zeros(())
    h_mean = _entropy(q.mean(0))
    if nonorm:
        return 0.2 * (-h_mean + _entropy(q).mean())
    if constrain_relax:
        return F.relu(relaxed_entropy_threshold(q.shape[1]) - h_mean)
    return -h_mean


def maximization_objective(z1: torch.Tensor, z2: torch.Tensor, logits: torch.Tensor, *,
                           temperature: float, irm_temperature: float, irm_weight: float,
                           constrain: bool = True, constrain_relax: bool = True,
                           nonorm: bool = False, backend: Optional[str] = None,
                           penalty: str = "slot", irm_mode: str = "v1"
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The partition objective J of one feature batch; minimise it over ``logits``.

    ``logits`` are the batch's rows of the partition logits Theta, shape ``(B, K)``; ``z1``,
    ``z2`` the fixed normalised projections of the batch's two views. Returns ``J`` and parts
    ``loss`` (mean_k L^soft_k), ``penalty`` (mean_k R^soft_k; with ``irm_mode="v2"`` the
    unbiased variance over k of L^soft_k, as the official ``torch.var``, and ``irm_temperature``
    and ``penalty`` play no part) and ``constraint`` (detached).
    J is expected to be negative: it is the negated adversarial objective (official
    GitHub issue #3, ``docs/official-ipirm.md#official-issues``).
    """
    if logits.dim() != 2 or logits.shape[0] != z1.shape[0]:
        raise ValueError(f"logits must be (B={z1.shape[0]}, K), got {tuple(logits.shape)}")
    if irm_mode not in IRM_MODES:
        raise ValueError(f"irm_mode must be one of {IRM_MODES}, got {irm_mode!r}")
    q = torch.softmax(logits.float(), dim=1)
    losses, penalties = env_contrastive_loss(z1, z2, q, temperature=temperature,
                                             irm_temperature=irm_temperature, soft=True,
                                             backend=backend, penalty=penalty, nonorm=nonorm,
                                             check_values=False)
    loss = losses.mean()
    pen = penalties.mean() if irm_mode == "v1" else losses.var()
    constraint = balance_constraint(q, constrain=constrain, constrain_relax=constrain_relax,
                                    nonorm=nonorm)
    objective = -(loss + irm_weight * pen) + constraint
    return objective, {"loss": loss.detach(), "penalty": pen.detach(),
                       "constraint": constraint.detach()}
