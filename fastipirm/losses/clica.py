"""CL-ICA's InfoNCE (Zimmermann et al., 2021) on the general masked op.

The official training step (``main_mlp.py``, ``losses.py``; ``docs/clica.md``) compares every
anchor ``h_i`` with its positive ``h~_i`` and with *every* anchor of the batch, itself included
(the negatives are ``roll(h, 1)`` against ``h``: the full B x B matrix), at temperature ``tau``:
``l_i = pos_i / tau + LSE({-neg_ij / tau}_j, -pos_i / tau)``, mean over i, with
``pos_i = |h_i - h~_i|_p^p``, ``neg_ij = |h_i - h_j|_p^p`` (``LpSimCLRLoss``, p >= 1) or, for
``p = 0``, the dot product on the sphere (``SimCLRLoss(normalize=False)``). That is
``masked_contrastive_loss(h, positives=h~, include_self=True)`` with the similarity below.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import distributed
from ..ops import masked_contrastive_loss


def clica_similarity(p: float) -> dict:
    """The op's ``similarity``/``p`` arguments for CL-ICA's ``--p``: 0 the dot product, 1 L1,
    2 the squared L2 distance (the GEMM identity), any other p >= 1 the powered L_p distance."""
    if p == 0:
        return {"similarity": "dot"}
    if p == 1:
        return {"similarity": "l1"}
    if p == 2:
        return {"similarity": "sqeuclidean"}
    if p < 1:
        raise ValueError(f"clica.p: {p} is neither 0 (dot product) nor >= 1 (L_p distance)")
    return {"similarity": "lp", "p": float(p)}


def clica_infonce(h: torch.Tensor, h_pos: torch.Tensor, *, p: float, temperature: float,
                  backend: Optional[str] = None, check_values: bool = True) -> torch.Tensor:
    """CL-ICA's loss of the anchors' codes ``h`` and their positives' ``h_pos`` (B, n): a
    scalar, the mean over the anchors (every anchor, itself included, is a negative)."""
    return masked_contrastive_loss(h, positives=h_pos, include_self=True,
                                   temperature=temperature, backend=backend,
                                   check_values=check_values, **clica_similarity(p))


def clica_infonce_gathered(h: torch.Tensor, h_pos: torch.Tensor, *, p: float,
                           temperature: float, backend: Optional[str] = None,
                           check_values: bool = True) -> torch.Tensor:
    """:func:`clica_infonce` of this rank's anchors against the anchors of every rank (the op's
    DDP form: keys gathered with gradient, ``self_index`` the local anchors' columns): the mean
    over the local anchors; its mean over equal ranks is the global batch's loss."""
    keys = distributed.all_gather_grad(h)
    return masked_contrastive_loss(h, keys, positives=h_pos, include_self=True,
                                   self_index=distributed.local_columns(h.shape[0], h.device),
                                   temperature=temperature, backend=backend,
                                   check_values=check_values, **clica_similarity(p))
