"""Disentanglement scores of CL-ICA (Zimmermann et al. 2021): linear R² and MCC.

The definitions follow the official ``disentanglement_utils.py`` as used by ``main_mlp.py``
(``docs/clica.md#metrics``), reimplemented in float64 torch:

* :func:`linear_r2`: an affine least-squares map from the encoding ``h`` (N, m) to the true
  latents ``z`` (N, n) is fitted and scored **on the same samples** (officially
  ``LinearRegression().fit(h, z)`` then ``r2_score(z, prediction)``, uniform average over the
  n dimensions of ``z``). Like ``LinearRegression``, the data are centred and the minimum-norm
  least-squares solution is used, so a rank-deficient ``h`` is fine (the predictions are unique).
* :func:`mcc`: the Pearson correlations between every z-dimension (rows) and every
  h-dimension (columns), a linear sum assignment maximising the total ``|corr|``, and the mean
  ``|corr|`` over the matched pairs (officially Munkres on ``-|corr|``; its per-column rescaling
  step does not change a Pearson correlation).
* :func:`disentanglement_scores` gives both; :func:`scores_over_batches` the mean and the
  population standard deviation (``np.std``, ddof = 0, as ``main_mlp.py`` prints) over fresh
  batches (officially ``--num-eval-batches 10``).

Conventions where the official code is silent or undefined:

* A constant z-dimension scores R² 1.0 if its prediction is exact and 0.0 otherwise, which is
  sklearn's ``r2_score`` rule (``force_finite=True``). An affine map always reproduces a constant
  through its intercept, so here the intercept of an exactly constant column is taken as the
  column's value itself and such a column scores 1.0 (sklearn computes it as a float mean and may
  give 1.0 or 0.0 depending on rounding).
* A constant dimension (in ``z`` or ``h``) has an undefined Pearson correlation (``np.corrcoef``
  gives NaN, on which the official Munkres solver is undefined); here it counts as correlation 0.
* ``m != n`` is allowed (the official MCC asserts ``m == n``): ``min(n, m)`` pairs are matched and
  their ``|corr|`` summed over the ``n`` true latents: with ``m < n`` an unmatched z-dimension
  counts as 0 (an encoding with fewer dimensions cannot score 1).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch

__all__ = [
    "linear_r2",
    "mcc",
    "correlation_matrix",
    "disentanglement_scores",
    "scores_over_batches",
]


def _check_pair(h, z) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate ``h`` (N, m) and ``z`` (N, n); return both as float64 on ``h``'s device."""
    tensors = []
    for name, x in (("h", h), ("z", z)):
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{name} must be a tensor or array-like, got {type(x)!r}") from exc
        if x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (N, dims), got shape {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one dimension, got shape {tuple(x.shape)}")
        tensors.append(x.detach())
    h, z = tensors
    if h.shape[0] != z.shape[0]:
        raise ValueError(
            f"h and z must have the same number of samples N, got {h.shape[0]} and {z.shape[0]}"
        )
    if h.shape[0] < 2:
        raise ValueError(f"at least N >= 2 samples are needed, got N = {h.shape[0]}")
    z = z.to(device=h.device)
    h = h.to(torch.float64)
    z = z.to(torch.float64)
    for name, x in (("h", h), ("z", z)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return h, z


def _constant_columns(x: torch.Tensor) -> torch.Tensor:
    """Boolean (dims,) mask of the columns whose values are all exactly equal."""
    return x.amax(dim=0) == x.amin(dim=0)


def _center(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Column means and centred columns; exactly constant columns centre to exact zeros."""
    const = _constant_columns(x)
    mean = torch.where(const, x[0], x.mean(dim=0))
    xc = torch.where(const, torch.zeros_like(x), x - mean)
    return mean, xc


def _min_norm_lstsq(a: torch.Tensor, b: torch.Tensor, use_pinv: bool) -> torch.Tensor:
    """Minimum-norm least-squares solution of ``a @ x = b`` (``a`` may be rank-deficient).

    On the CPU this is LAPACK ``gelsd`` (SVD-based, as scipy's ``lstsq`` inside sklearn's
    ``LinearRegression``); elsewhere (CUDA only offers the full-rank ``gels``) the SVD-based
    pseudo-inverse gives the same solution.
    """
    if use_pinv:
        return torch.linalg.pinv(a) @ b
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def _r2_uniform(z: torch.Tensor, pred: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """sklearn's ``r2_score(z, pred)`` (uniform average, ``force_finite=True``).

    ``const`` marks the exactly constant z-columns, whose total sum of squares is zero.
    """
    ss_res = ((z - pred) ** 2).sum(dim=0)
    _, zc = _center(z)
    ss_tot = (zc**2).sum(dim=0)
    ss_tot = torch.where(const, torch.zeros_like(ss_tot), ss_tot)
    res_nonzero = ss_res != 0
    tot_nonzero = ss_tot != 0
    scores = torch.ones_like(ss_res)
    valid = res_nonzero & tot_nonzero
    scores[valid] = 1.0 - ss_res[valid] / ss_tot[valid]
    scores[res_nonzero & ~tot_nonzero] = 0.0
    return scores.mean()


def linear_r2(h, z) -> float:
    """R² of the affine least-squares map from ``h`` (N, m) to ``z`` (N, n), fitted and scored
    on the same samples; the per-dimension R² are averaged uniformly over the n z-dimensions."""
    h, z = _check_pair(h, z)
    h_mean, hc = _center(h)
    z_mean, zc = _center(z)
    coef = _min_norm_lstsq(hc, zc, use_pinv=h.device.type != "cpu")
    pred = hc @ coef + z_mean
    return float(_r2_uniform(z, pred, _constant_columns(z)))


def correlation_matrix(h, z) -> torch.Tensor:
    """Pearson correlations (n, m) between the z-dimensions (rows) and the h-dimensions
    (columns), float64; a pair with a constant dimension gets 0."""
    h, z = _check_pair(h, z)
    return _corr(h, z)


def _corr(h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    _, hc = _center(h)
    _, zc = _center(z)
    hn = hc.norm(dim=0)
    zn = zc.norm(dim=0)
    corr = (zc.T @ hc) / (zn[:, None] * hn[None, :])
    corr = torch.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    return corr.clamp(-1.0, 1.0)


def mcc(h, z) -> float:
    """Mean correlation coefficient: the ``|Pearson corr|`` of the z/h dimension pairs matched by
    a linear sum assignment that maximises the total ``|corr|``, averaged over the ``n``
    z-dimensions."""
    from scipy.optimize import linear_sum_assignment

    h, z = _check_pair(h, z)
    absc = _corr(h, z).abs().cpu()
    rows, cols = linear_sum_assignment(-absc.numpy())
    matched = absc[torch.as_tensor(rows), torch.as_tensor(cols)]
    return float(matched.sum() / z.shape[1])        # an unmatched z-dimension counts as 0


def disentanglement_scores(h, z) -> Dict[str, float]:
    """``{"r2": linear_r2(h, z), "mcc": mcc(h, z)}``."""
    return {"r2": linear_r2(h, z), "mcc": mcc(h, z)}


def scores_over_batches(
    sample_fn: Callable[[], Tuple[torch.Tensor, torch.Tensor]], n_batches: int = 10
) -> Dict[str, object]:
    """Scores over ``n_batches`` fresh batches, as the final evaluation of ``main_mlp.py``.

    ``sample_fn()`` is called once per batch and returns ``(h, z)``: the encoding (N, m) and the
    true latents (N, n) of a fresh batch. Returns ``r2_mean``, ``r2_std``, ``mcc_mean``,
    ``mcc_std`` (population standard deviation, ddof = 0, like ``np.std``), the per-batch lists
    ``r2_values`` and ``mcc_values``, and ``n_batches``.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    if not callable(sample_fn):
        raise ValueError("sample_fn must be a callable returning (h, z)")
    values: Dict[str, list] = {"r2": [], "mcc": []}
    for i in range(n_batches):
        out = sample_fn()
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"sample_fn() must return a pair (h, z); batch {i} gave {type(out)!r}")
        scores = disentanglement_scores(*out)
        for key in values:
            values[key].append(scores[key])
    result: Dict[str, object] = {"n_batches": n_batches}
    for key, vals in values.items():
        mean = math.fsum(vals) / len(vals)
        var = math.fsum((v - mean) ** 2 for v in vals) / len(vals)
        result[f"{key}_mean"] = mean
        result[f"{key}_std"] = math.sqrt(var)
        result[f"{key}_values"] = list(vals)
    return result
