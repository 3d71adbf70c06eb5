"""What the environment weights determine, and the assembly of the per-slot penalty from them.

One home for the algebra that the ``"torch"`` backend (:mod:`fastipirm.ops.torch_backend`) and
the glue of the fused backends (:mod:`fastipirm.ops.fused`) share; the notation is that of the
torch backend's docstring (``N = 2B`` rows, ``W2 = [w; w]``, ``G`` row groups):

* :class:`Setup`: every weights-derived ``O(N M)`` quantity: the soft renormalisation ``kappa``,
  the loss norms, the rank ``pos`` of every row in its environment's concatenated order (hence
  the slots), the row groups of the split penalties and their normalised weights;
* :func:`slot_gradient`: the band column sums scattered to their slots (slot ``pos + 1``,
  ``pos``, ``pos - 1`` for the bands below ``i``, between ``i`` and ``i+B``, above ``i+B``; one
  sum for the scalar penalties) plus the positive's slot: the penalty's gradient vector ``g``;
* :func:`penalty_of` (``g`` -> penalty), :func:`penalty_cotangent` (its derivative times the
  upstream gradient) and :func:`slot_gather` (that derivative gathered back to every band's
  columns: the column factors of the backward).
"""
from __future__ import annotations

import torch

from .penalties import SCALAR_PENALTIES
from .spec import EnvContrastiveSpec

SHIFTS = (1, 0, -1)   # slot = pos + shift for the bands c < i, i < c < i+B, c > i+B


class Setup:
    """Everything that depends on the weights ``w`` (B, M) and the options, not on the features.

    ``nbands`` is the number of band reductions the fused kernels compute (3, or 1 for the scalar
    penalties, whose single band is the whole negative mask).
    """

    def __init__(self, w: torch.Tensor, spec: EnvContrastiveSpec):
        batch, m = w.shape
        n = 2 * batch
        soft = spec.soft
        dtype, device = w.dtype, w.device
        self.spec = spec
        self.batch, self.n, self.m, self.soft = batch, n, m, soft
        self.nonorm = spec.normalise_by_rows
        self.scalar, self.split = spec.scalar, spec.split
        self.nbands = self.nbands_of(spec.penalty)
        self.w2 = torch.cat([w, w])                                         # (N, M)
        if soft:
            self.others = 2.0 * (w.double().sum(0, keepdim=True) - self.w2.double())
            self.kappa = torch.where(self.others > 0, (n - 2) / self.others.clamp_min(1e-300),
                                     0.0).to(dtype)
            self.pos = torch.arange(n, device=device)[:, None].expand(n, m)
        else:
            self.kappa = torch.ones_like(self.w2)
            self.pos = (torch.cumsum(self.w2, 0) - self.w2).round().long()  # rank among members
        self.total = self.w2.sum(0)                                         # (M,)
        self.norm = torch.full_like(self.total, float(n)) if self.nonorm else self.total
        self.valid = (self.total > 0).to(dtype)
        self.slots = 1 if self.scalar else n
        self.reps = 2 if self.split else 1
        if self.split:
            parity = self.pos if not soft else torch.arange(n, device=device)[:, None].expand(n, m)
            even = (parity % 2 == 0).to(dtype)
            self.group_mask = torch.cat([even, 1.0 - even], 1)              # (N, 2M)
            masked = self.w2.repeat(1, 2) * self.group_mask
            self.group_norm = self.group_mask.sum(0) if self.nonorm else masked.sum(0)
        else:
            self.group_mask = torch.ones_like(self.w2)
            self.group_norm = self.norm
        self.w2g = self.rep(self.w2)                                        # (N, G)
        self.kappag = self.rep(self.kappa)
        self.group_weight = self.w2g * self.group_mask / self.group_norm.clamp_min(1e-30)
        self.group_pos = self.rep(self.pos)

    @staticmethod
    def nbands_of(penalty: str) -> int:
        """The fused kernels' band reductions for ``penalty``."""
        return 1 if penalty in SCALAR_PENALTIES else len(SHIFTS)

    def rep(self, t: torch.Tensor) -> torch.Tensor:
        """(N, M) -> (N, G): one copy per row group."""
        return t.repeat(1, self.reps) if self.reps > 1 else t

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """(N, G) -> (N, M): sum the row groups' copies (the adjoint of :meth:`rep`)."""
        return t[:, :self.m] + t[:, self.m:] if self.reps > 1 else t

    def slot_index(self, shift: int) -> torch.Tensor:
        """(N, G) slot of every column for one band (clamped: non-members carry zeros)."""
        return (self.group_pos + shift).clamp(0, self.slots - 1)


def slot_gradient(st: Setup, bands, g_pos: torch.Tensor) -> torch.Tensor:
    """The penalty's gradient vector ``g`` (G, slots) from the band column sums.

    ``bands``: the (N, G) column sums ``(K * band_b)^T @ rc`` in the order of :data:`SHIFTS`
    (any number for the scalar penalties, which add them all into their one slot); ``g_pos``
    (G,): the positive's slot. Each band sum is weighted by the column's own weight ``W2``.
    """
    if st.slots == 1:
        col = None
        for acc in bands:
            term = (st.w2g * acc).sum(0)
            col = term if col is None else col + term
        return (col + g_pos)[:, None]
    g = torch.zeros(st.w2g.shape[1], st.slots, dtype=g_pos.dtype, device=g_pos.device)
    for acc, shift in zip(bands, SHIFTS):
        g = g.scatter_add(1, st.slot_index(shift).T, (st.w2g * acc).T)
    g[:, 0] += g_pos
    return g


def penalty_of(st: Setup, g: torch.Tensor) -> torch.Tensor:
    """The penalty (M,) from ``g``: ``sum_s g^2`` per group, or the product of the two halves for
    the split penalties; 0 for an empty environment."""
    pen = (g[:st.m] * g[st.m:]).sum(1) if st.split else (g * g).sum(1)
    return torch.where(st.total > 0, pen, 0.0)


def penalty_cotangent(st: Setup, g: torch.Tensor, d_pen: torch.Tensor) -> torch.Tensor:
    """``d pen / d g`` (G, slots) times the penalty's upstream gradient ``d_pen`` (M,)."""
    d_pen = torch.where(st.total > 0, d_pen, 0.0)[:, None]
    if st.split:  # pen = sum_s g[:M] g[M:]
        return torch.cat([g[st.m:] * d_pen, g[:st.m] * d_pen])
    return 2.0 * g * d_pen


def slot_gather(st: Setup, gamma: torch.Tensor, nbands: int) -> list[torch.Tensor]:
    """``gamma`` (G, slots) gathered from the slot of every (row, group), one (N, G) tensor per
    band (``nbands`` of them, each the whole slot for the scalar penalties)."""
    if st.slots == 1:
        return [gamma[:, 0].expand_as(st.w2g)] * nbands
    return [gamma.gather(1, st.slot_index(shift).T).T for shift in SHIFTS[:nbands]]
