"""The public general op: a contrastive loss of queries against keys under a mask, with L_p
similarities, self-pairs, groups, soft targets and the per-key-column IRM ingredient.

For query ``i`` with positive ``p_i`` (a separate vector, or key columns with weights) and
negative set ``N(i)``, with ``s`` the similarity and ``T`` the temperature::

    l_i = -s(q_i, p_i)/T + log( exp(s(q_i, p_i)/T) + sum_{j in N(i)} w_j exp(s(q_i, k_j)/T) )

``N(i)`` holds the keys of the query's group (every key without groups) except the query's own
column (unless ``include_self``) and its positive column(s). An empty ``N(i)`` gives ``l_i = 0``
and zero gradient. Gradients flow to the queries, keys, positives and key weights. How the
official objectives map onto it:

* CL-ICA (``LpSimCLRLoss`` / ``SimCLRLoss``): ``queries`` = anchors, ``keys=None``,
  ``positives`` = the positive codes, ``similarity="l1" | "sqeuclidean" | "lp"`` (or ``"dot"``),
  ``include_self=True`` (the official negatives are all anchors, self included);
* DCoDR (``SimCLR_Loss_w_Pos``): ``queries`` = the normalised anchor codes, ``keys=None``,
  ``positives`` = their augmented codes, ``query_groups`` = domains, ``similarity="dot"``;
* IP-IRM + MixUp (i-Mix): ``queries`` = mixed view-1 codes, ``keys`` = clean view-2 codes,
  ``positive_index`` = ``[[i, perm[i]]]`` with ``positive_weight = (lam, 1 - lam)``: the loss is
  ``lam CE(i) + (1 - lam) CE(perm(i))``; with ``key_penalty=True`` the op also returns ``g_j``,
  the gradient of the (per group) mean loss w.r.t. a dummy scale of key column ``j``, and
  :func:`key_group_penalty` turns it into the per-key-column IRM penalty of each group
  (environment); several environments are one call with ``query_groups``/``key_groups``.
* DDP: local ``queries`` against ``keys`` gathered from every rank (an autograd-aware
  all-gather), ``self_index`` = the local queries' columns among the gathered keys, and
  ``positive_index`` in gathered columns. ``key_grads`` are then partial sums over the local
  rows: all-reduce them (autograd-aware) before :func:`key_group_penalty` squares them, with
  ``penalty_row_weights`` the global ``1 / group size``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import MASKED
from .masked_glue import Inputs
from .spec import MaskedContrastiveSpec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _compiling() -> bool:
    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


def _tensor(name: str, t, dims: int) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    return t


def _index(name: str, t, rows: int, device) -> Tensor:
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the features on {device}")
    return t.long().contiguous()


def masked_contrastive_loss(
        queries: Tensor, keys: Optional[Tensor] = None, positives: Optional[Tensor] = None,
        positive_index: Optional[Tensor] = None, *, positive_weight: Optional[Tensor] = None,
        similarity: str = "dot", p: Optional[float] = None, temperature: float = 1.0,
        include_self: bool = False, query_groups: Optional[Tensor] = None,
        key_groups: Optional[Tensor] = None, self_index: Optional[Tensor] = None,
        key_weights: Optional[Tensor] = None, penalty_row_weights: Optional[Tensor] = None,
        reduction: str = "mean", key_penalty: bool = False, backend: Optional[str] = None,
        check_values: bool = True):
    """Masked contrastive loss of ``queries`` (Q, D) against ``keys`` (K, D); see the module
    docstring for the formula and the official objectives it covers.

    Args:
        keys: ``None``: the queries themselves (then key ``i`` is query ``i``: the self column).
        positives: (Q, D), a separate positive per query (never a negative); or
        positive_index: (Q,) or (Q, T) int, key columns that are the query's positive(s) (never
            negatives; a repeated column counts once in the denominator), with
        positive_weight: (T,) or (Q, T), the target weights of those columns (each row sums to
            1; default: one column with weight 1; constants, no gradient flows to them). Exactly
            one of ``positives`` and ``positive_index``.
        similarity: ``"dot"`` (``q . k``), ``"sqeuclidean"`` (``-|q - k|^2``), ``"l1"``
            (``-|q - k|_1``) or ``"lp"`` (``-sum |q - k|^p``, give ``p >= 1``).
        temperature: divides the similarity.
        include_self: the query's own column is one of its negatives (``keys=None`` or
            ``self_index`` only).
        query_groups, key_groups: (Q,), (K,) ints: negatives only where the groups are equal
            (``keys=None``: ``query_groups`` serves both). Target columns must lie in the
            query's group.
        self_index: (Q,) int, the key column that is query ``i`` itself (``keys`` given, e.g.
            gathered across ranks); excluded from its negatives unless ``include_self``.
        key_weights: (K,) non-negative weights of the negative columns (targets keep weight 1);
            differentiable.
        penalty_row_weights: (Q,) the weights ``c_i`` of the losses whose key-column gradients
            ``key_penalty`` returns (default: one over the size of the query's group; constants,
            no gradient flows to them).
        reduction: ``"mean"`` or ``"sum"`` over the queries, ``"none"``: the (Q,) losses.
        key_penalty: also return ``key_grads`` (K,): ``d(sum_i c_i l_i) / d sigma_j`` where
            ``sigma_j`` scales the logits of key column ``j`` (differentiable).
        backend: ``None``/``"auto"`` or a name of ``fastipirm.ops.backends.MASKED``.
        check_values: check indices, weights and groups by value (one device synchronisation;
            skipped under ``torch.compile``).

    Returns:
        the loss (a scalar, or (Q,) with ``reduction="none"``), float32 for 16/32-bit inputs and
        float64 for float64 inputs; with ``key_penalty``: ``(loss, key_grads)``.
    """
    spec = MaskedContrastiveSpec(similarity, p, temperature, include_self, reduction,
                                 key_penalty)
    inp = _validated(queries, keys, positives, positive_index, positive_weight, query_groups,
                     key_groups, self_index, key_weights, penalty_row_weights, spec,
                     check_values)
    _, impl = MASKED.resolve(backend, queries.device)
    losses, key_grads = impl(inp.q, inp.k, inp.pos, inp.idx, inp.tw, inp.qg, inp.kg,
                             inp.self_index, inp.w, inp.c, spec)
    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    return (loss, key_grads) if key_penalty else loss


def _validated(q, k, pos, idx, tw, qg, kg, self_index, w, c, spec, check_values) -> Inputs:
    """Shapes, dtypes and devices (always), values (``check_values``); the normalised inputs."""
    _tensor("queries", q, 2)
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"queries must be float16, bfloat16, float32 or float64, got {q.dtype}")
    n_q, dim = q.shape
    if n_q == 0 or dim == 0:
        raise ValueError(f"queries must have at least one row and one column, got "
                         f"{tuple(q.shape)}")
    own_keys = k is None
    if own_keys:
        if kg is not None:
            raise ValueError("key_groups is only used with keys; with keys=None query_groups "
                             "serves both")
        if self_index is not None:
            raise ValueError("self_index is only used with keys (keys=None: key i is query i)")
        k, kg = q, qg
        self_index = torch.arange(n_q, device=q.device)
    else:
        _tensor("keys", k, 2)
        if k.shape[1] != dim or k.dtype != q.dtype or k.device != q.device:
            raise ValueError(f"keys must be (K, {dim}) of the queries' dtype and device, got "
                             f"{tuple(k.shape)} {k.dtype} on {k.device}")
        if k.shape[0] == 0:
            raise ValueError("keys must have at least one row")
        if spec.include_self and self_index is None:
            raise ValueError("include_self needs keys=None or self_index (which key column is "
                             "the query itself)")
        if self_index is not None:
            self_index = _index("self_index", _tensor("self_index", self_index, 1), n_q,
                                q.device)
    n_k = k.shape[0]
    if (pos is None) == (idx is None):
        raise ValueError("give exactly one of positives (a separate positive per query) and "
                         "positive_index (the positive key column(s) of each query)")
    if pos is not None:
        _tensor("positives", pos, 2)
        if pos.shape != q.shape or pos.dtype != q.dtype or pos.device != q.device:
            raise ValueError(f"positives must be {tuple(q.shape)} of the queries' dtype and "
                             f"device, got {tuple(pos.shape)} {pos.dtype} on {pos.device}")
        if tw is not None:
            raise ValueError("positive_weight is only used with positive_index")
    else:
        if not isinstance(idx, torch.Tensor) or idx.dim() not in (1, 2):
            raise ValueError("positive_index must be a (Q,) or (Q, T) integer tensor")
        idx = _index("positive_index", idx if idx.dim() == 2 else idx[:, None], n_q, q.device)
        n_t = idx.shape[1]
        if n_t == 0:
            raise ValueError("positive_index has no column (T=0)")
        if tw is None:
            if n_t != 1:
                raise ValueError("positive_weight is needed with several positive columns")
            tw = torch.ones(n_q, 1, device=q.device)
        else:
            if not isinstance(tw, torch.Tensor) or not tw.is_floating_point():
                raise ValueError("positive_weight must be a floating-point tensor")
            if tw.requires_grad:
                raise ValueError("positive_weight requires grad, but no gradient flows to it "
                                 "(the target weights are constants); pass .detach()")
            if tw.shape not in ((n_t,), (n_q, n_t)):
                raise ValueError(f"positive_weight must be ({n_t},) or ({n_q}, {n_t}), got "
                                 f"{tuple(tw.shape)}")
            tw = tw.to(q.device).expand(n_q, n_t).contiguous()
    for name, g, rows in (("query_groups", qg, n_q), ("key_groups", kg, n_k)):
        if g is not None:
            _tensor(name, g, 1)
            _index(name, g, rows, q.device)
    if (qg is None) != (kg is None):
        raise ValueError("give both query_groups and key_groups, or neither")
    qg = None if qg is None else qg.long().contiguous()
    kg = None if kg is None else kg.long().contiguous()
    if w is None:
        w = torch.ones(n_k, device=q.device)
    else:
        _tensor("key_weights", w, 1)
        if w.shape[0] != n_k or not w.is_floating_point() or w.device != q.device:
            raise ValueError(f"key_weights must be a floating-point ({n_k},) tensor on "
                             f"{q.device}, got {tuple(w.shape)} {w.dtype} on {w.device}")
    if c is None:
        exact = torch.float64 if q.dtype == torch.float64 else torch.float32
        if qg is None:
            c = torch.full((n_q,), 1.0 / n_q, device=q.device, dtype=exact)
        else:
            _, inverse, counts = torch.unique(qg, return_inverse=True, return_counts=True)
            c = 1.0 / counts[inverse].to(exact)
    else:
        _tensor("penalty_row_weights", c, 1)
        if c.shape[0] != n_q or not c.is_floating_point() or c.device != q.device:
            raise ValueError(f"penalty_row_weights must be a floating-point ({n_q},) tensor on "
                             f"{q.device}, got {tuple(c.shape)} {c.dtype} on {c.device}")
        if c.requires_grad:
            raise ValueError("penalty_row_weights requires grad, but no gradient flows to it "
                             "(key_grads are not differentiated w.r.t. their row weights); "
                             "pass .detach()")
        if check_values and not _compiling() and not bool(torch.isfinite(c).all()):
            raise ValueError("penalty_row_weights must be finite")
    if check_values and not _compiling():
        _check_values(q, k, pos, idx, tw, qg, kg, self_index, w, spec, own_keys)
    return Inputs(q, k, pos, idx, tw, qg, kg, self_index, w, c)


def _check_values(q, k, pos, idx, tw, qg, kg, self_index, w, spec, own_keys) -> None:
    n_k = k.shape[0]
    for name, t in (("queries", q), ("keys", k), ("positives", pos)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    for name, t in (("positive_index", idx), ("self_index", self_index)):
        if t is not None and (bool((t < 0).any()) or bool((t >= n_k).any())):
            raise ValueError(f"{name} must lie in [0, {n_k}) (key columns), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    if idx is not None:
        if bool((tw < 0).any()) or not bool(torch.allclose(tw.sum(1), torch.ones_like(tw[:, 0]),
                                                           atol=1e-4)):
            raise ValueError("positive_weight must be non-negative and sum to 1 per query")
        if self_index is not None and not spec.include_self and \
                bool((idx == self_index[:, None]).any()):
            raise ValueError("a positive_index column is the query's own column; pass "
                             "include_self=True if that is meant")
        if qg is not None and bool((kg[idx] != qg[:, None]).any()):
            raise ValueError("a positive_index column lies outside the query's group")
    if w is not None and (bool((w < 0).any()) or not bool(torch.isfinite(w).all())):
        raise ValueError("key_weights must be finite and non-negative")


def key_group_penalty(key_grads: Tensor, key_groups: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor]:
    """The per-key-column IRM penalty of each group: ``sum_{j in group} key_grads_j ** 2``.
    Returns ``(groups, penalties)``: the sorted group ids and their penalties (one group of id
    0 without ``key_groups``). Differentiable; call it after all-reducing ``key_grads``."""
    if key_groups is None:
        return torch.zeros(1, dtype=torch.long, device=key_grads.device), \
            (key_grads * key_grads).sum()[None]
    groups, inverse = torch.unique(key_groups, return_inverse=True)
    out = key_grads.new_zeros(groups.shape[0]).index_add(0, inverse, key_grads * key_grads)
    return groups, out
