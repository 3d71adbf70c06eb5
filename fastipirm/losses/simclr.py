"""SimCLR's NT-Xent loss on the fused op.

NT-Xent over the ``2B`` views of a batch (each view's positive is the other view of its sample,
its negatives the other ``2B - 2`` views; mean over the ``2B`` anchors) is the op's loss for a
single environment holding every sample: one all-ones weight column.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import env_contrastive_loss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float,
            backend: Optional[str] = None, check_values: bool = True) -> torch.Tensor:
    """NT-Xent of the normalised projections ``z1``, ``z2`` (B, D) at ``temperature``; a scalar."""
    everyone = torch.ones(z1.shape[0], 1, dtype=torch.float32, device=z1.device)
    loss, _ = env_contrastive_loss(z1, z2, everyone, temperature=temperature,
                                   irm_temperature=temperature, soft=False, backend=backend,
                                   check_values=check_values)
    return loss[0]
