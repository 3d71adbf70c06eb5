"""DCoDR's domain-wise contrastive loss (Kahana & Hoshen, ECCV 2022) on the general masked op.

The official ``SimCLR_Loss_w_Pos`` (``docs/dcodr.md#loss``): the codes of the un-augmented
anchors ``z_i`` and of their positives ``z_i^+`` are L2-normalised; anchor ``i``'s logits are its
positive ``<z_i, z_i^+> / tau`` and its negatives ``<z_i, z_j> / tau`` over the *other anchors of
its domain* (with the official 32 anchors per domain and at most 64 random negatives, every other
same-domain anchor: the loss is deterministic given the batch);
``l_i = -s_i^+ + LSE({s_ij}_j, s_i^+)``, mean over the anchors. Anchors compare with anchors only
and positives are never anchors. That is ``masked_contrastive_loss(z, positives=z+,
query_groups=domains)`` with the dot product of the normalised codes, computed in one pass without
the official per-anchor ``np.random.choice`` index lists (and their host synchronisation).

``domain_negatives=False`` (the official ``--class-negs False`` ablation) takes every other anchor
of the batch (equal to the official's 64 random ones up to a batch of 65 anchors);
``positives=False`` (``--num-pos 0``) replaces the positive similarity by the constant 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import distributed
from ..ops import masked_contrastive_loss


def dcodr_contrastive_loss(z: torch.Tensor, z_pos: torch.Tensor, domains: torch.Tensor, *,
                           temperature: float, domain_negatives: bool = True,
                           positives: bool = True, backend: Optional[str] = None,
                           check_values: bool = True, gather: bool = False) -> torch.Tensor:
    """DCoDR's loss of the anchors' codes ``z`` (B, D), their positives' ``z_pos`` (B, D) and
    the anchors' ``domains`` (B,) ints: a scalar, the mean over the anchors.

    ``gather``: the op's DDP form, this rank's anchors against the anchors of every rank (keys
    and their domains gathered, ``self_index`` the local columns); the mean over the local
    anchors, whose mean over equal ranks is the global batch's loss."""
    z = F.normalize(z, dim=1)
    if positives:
        z_pos = F.normalize(z_pos, dim=1)
    else:                    # a positive of similarity exactly 1: the anchor itself, detached
        z_pos = z.detach()
    groups = domains if domain_negatives else None
    if gather:
        keys = distributed.all_gather_grad(z)
        key_groups = None if groups is None else distributed.all_gather_nograd(groups)
        return masked_contrastive_loss(
            z, keys, positives=z_pos, query_groups=groups, key_groups=key_groups,
            self_index=distributed.local_columns(z.shape[0], z.device), temperature=temperature,
            backend=backend, check_values=check_values)
    return masked_contrastive_loss(z, positives=z_pos, query_groups=groups,
                                   temperature=temperature, backend=backend,
                                   check_values=check_values)
