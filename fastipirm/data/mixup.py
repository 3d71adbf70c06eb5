"""MixUp of IP-IRM's MixUp runs (official ``main_mixup.py``, ``utils_mixup.py``;
``docs/official-ipirm.md#mixup``).

Per sample ``lambda_i ~ Beta(alpha, alpha)`` (official ``--alpha`` 1: uniform), then
``lambda_i <- max(lambda_i, 1 - lambda_i)`` (in [0.5, 1]), a random partner ``pi = randperm``,
and ``x~_i = lambda_i x_i + (1 - lambda_i) x_pi(i)`` on the normalised images of view 1 (mixing
after the normalisation equals mixing before it: the normalisation is affine and the weights sum
to one). :func:`group_mixup_draws` draws a partner inside each group (an environment's subset,
re-mixed within itself as the official minimisation does). Everything runs on the device from the
run's augmentation generator.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def mixup_draws(n: int, alpha: float = 1.0, *, generator: Optional[torch.Generator] = None,
                device=None) -> tuple[Tensor, Tensor]:
    """``(lam (n,), partner (n,))`` of one MixUp of ``n`` samples."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if alpha == 1.0:                               # Beta(1, 1) is uniform
        lam = torch.rand(n, generator=generator, device=device)
    else:                                          # Beta(a, a) = G1 / (G1 + G2)
        g = torch._standard_gamma(torch.full((2, n), float(alpha), device=device),
                                  generator=generator)
        lam = g[0] / (g[0] + g[1])
    lam = torch.maximum(lam, 1 - lam)
    partner = torch.randperm(n, generator=generator, device=device)
    return lam, partner


def group_mixup_draws(counts: Sequence[int], alpha: float = 1.0, *,
                      generator: Optional[torch.Generator] = None, device=None
                      ) -> tuple[Tensor, Tensor]:
    """MixUp inside consecutive groups of sizes ``counts`` (the rows sorted by group):
    ``(lam, partner)`` with every partner inside its own group, in the sorted coordinates."""
    lams, partners, start = [], [], 0
    for c in counts:
        if c:
            lam, partner = mixup_draws(c, alpha, generator=generator, device=device)
            lams.append(lam)
            partners.append(partner + start)
        start += c
    if not lams:
        return torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(lams), torch.cat(partners)


def mix(x: Tensor, lam: Tensor, partner: Tensor) -> Tensor:
    """``lam_i x_i + (1 - lam_i) x_partner(i)`` along the first dimension."""
    w = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return w * x + (1 - w) * x[partner]
