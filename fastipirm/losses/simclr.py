"""SimCLR's NT-Xent loss on the fused op.

NT-Xent over the ``2B`` views of a batch (each view's positive is the other view of its sample,
its negatives the other ``2B - 2`` views; mean over the ``2B`` anchors) is the op's loss for a
single environment holding every sample: one all-ones weight column.

:func:`debiased_nt_xent` is DCL's debiased estimator (the official ``--debiased``), plain torch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import distributed
from ..ops import env_contrastive_loss, masked_contrastive_loss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float,
            backend: Optional[str] = None, check_values: bool = True) -> torch.Tensor:
    """NT-Xent of the normalised projections ``z1``, ``z2`` (B, D) at ``temperature``; a scalar."""
    everyone = torch.ones(z1.shape[0], 1, dtype=torch.float32, device=z1.device)
    loss, _ = env_contrastive_loss(z1, z2, everyone, temperature=temperature,
                                   irm_temperature=temperature, soft=False, backend=backend,
                                   check_values=check_values)
    return loss[0]


def nt_xent_gathered(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float,
                     backend: Optional[str] = None, check_values: bool = True) -> torch.Tensor:
    """NT-Xent of this rank's ``2b`` views against the views of every rank (the general op's
    DDP form, ``docs/distributed.md``): the mean over the local anchors of the loss of the
    global batch. With equal shares, the mean over the ranks is :func:`nt_xent` of the global
    batch, and DDP's gradient average gives its gradient. Without a process group: the keys are
    the local views (the same value as :func:`nt_xent`, through the masked op)."""
    b = z1.shape[0]
    g1, g2 = distributed.all_gather_grad(z1), distributed.all_gather_grad(z2)
    n = g1.shape[0]
    cols = distributed.local_columns(b, z1.device)
    return masked_contrastive_loss(
        torch.cat([z1, z2]), torch.cat([g1, g2]), positive_index=torch.cat([n + cols, cols]),
        self_index=torch.cat([cols, n + cols]), similarity="dot", temperature=temperature,
        backend=backend, check_values=check_values)


def debiased_nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float,
                     tau_plus: float) -> torch.Tensor:
    """DCL's debiased NT-Xent (Chuang et al., 2020), the official ``main.py --debiased``; a scalar.

    ``z1``, ``z2`` are the normalised projections (B, D) of the two views. Over the ``2B`` anchors
    ``a`` of ``[z1; z2]`` with ``N = 2B - 2`` negatives each (every view but ``a`` and its partner):

    * ``pos_a = exp(<z1_i, z2_i> / t)`` for the anchor's sample ``i``;
    * ``neg_a = sum_{b not in {a, partner(a)}} exp(<f_a, f_b> / t)``;
    * ``Ng_a = max((neg_a - tau_plus * N * pos_a) / (1 - tau_plus), N * exp(-1 / t))``;
    * loss ``= mean_a -log(pos_a / (pos_a + Ng_a))``.

    ``tau_plus = 0`` gives NT-Xent, except where the clamp at ``N * exp(-1/t)`` binds (there the
    estimator is replaced by its lower bound and passes no gradient, as the official clamp).
    Plain PyTorch (the baseline, no fused op), in float32 at least (float64 stays float64).
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must lie in [0, 1), got {tau_plus!r}")
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be (B, D) of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    batch = z1.shape[0]
    if batch < 2:
        raise ValueError(f"the debiased estimator needs at least 2 samples, got B={batch}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    a, b = z1.to(dtype), z2.to(dtype)
    views = torch.cat([a, b])                                           # (2B, D)
    sim = torch.exp(views @ views.T / temperature)                      # (2B, 2B)
    log_pos = ((a * b).sum(-1) / temperature).repeat(2)                 # (2B,)
    pos = torch.exp(log_pos)
    sample = torch.arange(batch, device=z1.device).repeat(2)
    negative = sample[:, None] != sample[None, :]                       # not itself, not partner
    neg = torch.where(negative, sim, torch.zeros_like(sim)).sum(-1)
    n_neg = 2 * batch - 2
    ng = (neg - tau_plus * n_neg * pos) / (1.0 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.exp(-1.0 / temperature))
    return (torch.log(pos + ng) - log_pos).mean()                       # -log(pos / (pos + Ng))
