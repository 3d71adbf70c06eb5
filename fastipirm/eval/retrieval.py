"""DCoDR's retrieval evaluation: does the nearest code share the query's attributes?

What the official ``evaluation.py --eval-type retrieval`` computes
(``retrieval_utils.get_retrieval_accuracies__from_all`` with the rules of
``get_retrieval_attrs_and_modulos``), and :func:`retrieval_top1` the same way
(``docs/dcodr-eval.md#retrieval``):

* Queries are the (L2-normalised) test codes; the gallery is every code, train then test, so each
  query is also in the gallery. Distances are Euclidean (``torch.cdist``; the faiss variant,
  ``IndexFlatL2``, ranks the same). The nearest gallery item is dropped as the query itself and the
  next one is the retrieved neighbour (officially ranks 1..10 are kept, but only rank 1 is
  reported).
* The neighbour matches attribute ``k`` when ``|q_k - n_k| <= allowed[k]``; for a cyclic attribute
  the distance is ``min(|q_k - n_k|, M_k - |q_k - n_k|)`` with ``M_k`` the number of distinct values
  of ``k`` among all codes. ``all`` matches when every attribute does. The domain is never matched.
* Reported: per attribute and ``all``, the fraction of queries whose neighbour matches (officially
  ``<attribute>__mean_accuracy``).
* The rules (:data:`OFFICIAL_RULES`, here with fastipirm's factor names): SmallNorb azimuth within 2
  (cyclic), elevation and lighting exact; Shapes3D every factor but the domain exact; Edges2Shoes
  shoe type and gender exact; Cars3D the 96-way pose exact (officially the ``content`` column).

Deviation: by default (``skip="self"``) the excluded gallery item is the query's own row, known by
construction; officially it is whatever ranks first, which is the query itself unless another code
is exactly as close (a duplicate code, or floating-point noise in a collapsed representation), in
which case the query can retrieve itself. ``skip="rank0"`` is the literal official rule.
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OFFICIAL_RULES", "retrieval_rules", "cyclic_sizes", "top1_neighbours",
           "factor_matches", "retrieval_top1"]

OFFICIAL_RULES: dict[str, tuple[dict[str, float], tuple[str, ...]]] = {
    "smallnorb": ({"azimuth": 2, "elevation": 0, "lighting": 0}, ("azimuth",)),
    "edges2shoes": ({"shoe_type": 0, "gender": 0}, ()),
    "cars3d": ({"pose": 0}, ()),
}
"""Data set -> (allowed distance per attribute, cyclic attributes). Shapes3D, and any data set not
named here, match every factor but the domain exactly."""

_GALLERY_FLOATS = 1 << 25          # distance-matrix entries per query chunk


def retrieval_rules(dataset: str, factor_names: Iterable[str],
                    domain_factor: str) -> tuple[dict[str, float], tuple[str, ...]]:
    """The official matching rules of ``dataset`` (a name such as ``"smallnorb"`` or
    ``"shapes3d/test"``): ``(allowed, cyclic)``. Every named attribute must be a factor."""
    names = list(factor_names)
    key = str(dataset).lower().split("/")[0]
    rule = next((r for k, r in OFFICIAL_RULES.items() if key.startswith(k)), None)
    if rule is None:
        allowed, cyclic = {k: 0 for k in names if k != domain_factor}, ()
    else:
        allowed, cyclic = dict(rule[0]), tuple(rule[1])
    missing = sorted(set(allowed) - set(names))
    if missing:
        raise ValueError(f"{dataset}: the retrieval rules need the factors {missing}; the data "
                         f"has {sorted(names)}")
    if not allowed:
        raise ValueError(f"{dataset}: no factor besides the domain {domain_factor!r} to match")
    return allowed, cyclic


def cyclic_sizes(gallery_factors: Mapping, cyclic: Iterable[str]) -> dict[str, int]:
    """``M_k`` of every cyclic attribute: its number of distinct gallery values (official)."""
    return {k: int(torch.unique(torch.as_tensor(gallery_factors[k])).numel()) for k in cyclic}


@torch.no_grad()
def top1_neighbours(queries: torch.Tensor, gallery: torch.Tensor, *,
                    exclude: Optional[torch.Tensor] = None, skip_first: bool = False,
                    chunk: Optional[int] = None) -> torch.Tensor:
    """Index (Q,) of each query's nearest gallery row by Euclidean distance (``torch.cdist``).

    ``exclude``: (Q,) gallery index never returned for that query (its own row; -1: none).
    ``skip_first``: return the second nearest instead (the official rule). Queries go in chunks
    of ``chunk`` rows (default: about 32 M distances at a time).
    """
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries (Q, d) and gallery (G, d) must share d, got "
                         f"{tuple(queries.shape)} and {tuple(gallery.shape)}")
    g = gallery.shape[0]
    usable = g - (exclude is not None) - bool(skip_first)
    if usable < 1:
        raise ValueError(f"a gallery of {g} codes leaves no neighbour to retrieve")
    step = chunk or max(1, _GALLERY_FLOATS // g)
    out = []
    for q0 in range(0, queries.shape[0], step):
        dist = torch.cdist(queries[q0:q0 + step], gallery)
        if exclude is not None:
            ex = exclude[q0:q0 + step].to(dist.device)
            rows = torch.nonzero(ex >= 0).squeeze(1)
            dist[rows, ex[rows]] = float("inf")
        if skip_first:
            out.append(dist.topk(2, dim=1, largest=False, sorted=True).indices[:, 1])
        else:
            out.append(dist.argmin(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=gallery.device)


def factor_matches(query_values: Mapping, neighbour_values: Mapping, allowed: Mapping,
                   modulo: Optional[Mapping] = None) -> dict[str, torch.Tensor]:
    """Boolean (Q,) per attribute of ``allowed`` (and ``"all"``): does the neighbour's value lie
    within the allowed distance of the query's (cyclic distance for the attributes of
    ``modulo``: ``min(d, M - d)``, as officially, with no wrapping of values outside 0..M-1)."""
    modulo = modulo or {}
    out = {}
    for k, limit in allowed.items():
        q, n = query_values[k], neighbour_values[k]
        diff = (q - n).abs()
        if k in modulo:
            diff = torch.minimum(diff, modulo[k] - diff)
        out[k] = diff <= limit
    out["all"] = torch.stack(list(out.values())).all(0)
    return out


def _check_split(codes, factors: Mapping, keys, split: str) -> tuple[torch.Tensor, dict]:
    codes = codes if isinstance(codes, torch.Tensor) else torch.as_tensor(np.asarray(codes))
    if codes.dim() != 2 or codes.shape[0] == 0 or not codes.is_floating_point():
        raise ValueError(f"{split} codes must be a non-empty floating (N, d) tensor, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if not bool(torch.isfinite(codes).all()):
        raise ValueError(f"{split} codes contain NaN or inf")
    vals = {}
    for k in keys:
        if k not in factors:
            raise ValueError(f"{split} factors lack {k!r} (have {sorted(factors)})")
        v = factors[k]
        v = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        if v.shape != (codes.shape[0],):
            raise ValueError(f"{split} factor {k!r} must have shape ({codes.shape[0]},), got "
                             f"{tuple(v.shape)}")
        if v.dtype == torch.bool or v.is_complex():
            raise ValueError(f"{split} factor {k!r} must be numeric, got {v.dtype}")
        vals[k] = v
    return codes.detach(), vals


def retrieval_top1(train_codes, train_factors: Mapping, test_codes, test_factors: Mapping, *,
                   allowed: Mapping[str, float],
                   cyclic: Union[Iterable[str], Mapping[str, int]] = (), skip: str = "self",
                   normalize: bool = True,
                   device: Union[str, torch.device, None] = None,
                   chunk: Optional[int] = None) -> dict:
    """DCoDR's top-1 retrieval (module docstring): each test code against all codes.

    ``allowed``: attribute -> largest matching distance (:func:`retrieval_rules` gives the
    official ones). ``cyclic``: cyclic attribute names (their cycle ``M`` is their number of
    distinct values among all codes, as officially) or a mapping name -> ``M``. ``skip``:
    ``"self"`` excludes each query's own gallery row, ``"rank0"`` the nearest item (official).
    Codes are L2-normalised when ``normalize`` and compared in their own floating dtype.

    Returns ``{"top1": {attribute: rate, ..., "all": rate}, "allowed", "modulo", "skip",
    "num_queries", "gallery_size", "seconds"}``; rates are fractions of the test queries.
    """
    start = time.perf_counter()
    if skip not in ("self", "rank0"):
        raise ValueError(f"skip must be 'self' or 'rank0', got {skip!r}")
    if not allowed:
        raise ValueError("allowed is empty: name at least one attribute to match")
    keys = list(allowed)
    cyc = dict(cyclic) if isinstance(cyclic, Mapping) else {k: None for k in cyclic}
    unknown = sorted(set(cyc) - set(keys))
    if unknown:
        raise ValueError(f"cyclic attributes {unknown} are not among the matched {keys}")
    x_tr, f_tr = _check_split(train_codes, train_factors, keys, "train")
    x_te, f_te = _check_split(test_codes, test_factors, keys, "test")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"train codes have {x_tr.shape[1]} dimensions and test codes "
                         f"{x_te.shape[1]}")
    device = torch.device(device) if device is not None else x_tr.device
    dtype = torch.promote_types(x_tr.dtype, x_te.dtype)
    gallery = torch.cat([x_tr.to(device, dtype), x_te.to(device, dtype)])
    if normalize:
        gallery = F.normalize(gallery, dim=1)
    n_tr, n_te = x_tr.shape[0], x_te.shape[0]
    queries = gallery[n_tr:]
    g_vals = {k: torch.cat([f_tr[k].to(device), f_te[k].to(device)]) for k in keys}
    modulo = cyclic_sizes(g_vals, [k for k, m in cyc.items() if m is None])
    modulo.update({k: int(m) for k, m in cyc.items() if m is not None})
    exclude = torch.arange(n_tr, n_tr + n_te, device=device) if skip == "self" else None
    nn_idx = top1_neighbours(queries, gallery, exclude=exclude, skip_first=skip == "rank0",
                             chunk=chunk)
    matches = factor_matches({k: v[n_tr:] for k, v in g_vals.items()},
                             {k: v[nn_idx] for k, v in g_vals.items()}, allowed, modulo)
    return {"top1": {k: m.double().mean().item() for k, m in matches.items()},
            "allowed": dict(allowed), "modulo": modulo, "skip": skip, "num_queries": n_te,
            "gallery_size": n_tr + n_te, "seconds": time.perf_counter() - start}
