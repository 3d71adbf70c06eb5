"""The frozen invertible MLP mixing g of the CL-ICA MLP experiment (Zimmermann et al., ICML 2021).

g is ``n_layers`` bias-free ``Linear(n, n)`` layers with an elementwise activation between them
(none after the last). Each weight matrix is drawn from U(-1, 1)^(n x n), its columns are scaled to
unit L2 norm, and it is kept only if its 2-norm condition number is at most a threshold. The
threshold is taken from a pool of ``cond_samples`` matrices drawn the same way: the pool's
conditions sorted ascending, the entry at index ``int(cond_samples * cond_thresh_ratio)`` (ratio
0, the experiment's setting, is the pool minimum). The same construction as the official
``construct_invertible_mlp`` with its "pcl" initialisation, but on a ``torch.Generator`` and
vectorised: the pool and the re-draws are evaluated in chunks with batched ``svdvals``, and a
re-draw whose cheap lower bound on the condition already exceeds the threshold skips its SVD.

The matrices form one stream from the generator: first the ``cond_samples`` pool matrices, then the
candidates, each layer taking the first acceptable candidate after the previous layer's. This is
exactly what a plain one-matrix-at-a-time loop gives, whatever the chunk size; only the generator's
state afterwards differs (the last chunk's unused draws are consumed).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "InvertibleMLPMixing", "SmoothLeakyReLU", "build_mixing",
           "condition_lower_bound", "condition_numbers", "condition_threshold",
           "draw_normalised_matrices", "select_conditioned_matrices"]

ACTIVATIONS = ("leaky_relu", "relu", "elu", "smooth_leaky_relu", "softplus")
_CHUNK = 8192
# the bound's relative slack (LU-inverse rounding is ~n * eps * cond) and the thresholds up to
# which that slack is safe; above it every candidate gets its exact SVD
_PREFILTER_SLACK = 1e-6
_PREFILTER_MAX_THRESH = 1e7


class SmoothLeakyReLU(nn.Module):
    """``alpha * x + (1 - alpha) * log(1 + exp(x))``, written with a stable log(1 + exp)."""

    def __init__(self, alpha: float = 0.2):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + (1.0 - self.alpha) * torch.logaddexp(x, torch.zeros_like(x))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def _make_activation(activation: str, slope: float) -> nn.Module:
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope=slope)
    if activation == "relu":
        return nn.ReLU()
    if activation == "elu":
        return nn.ELU(alpha=1.0)
    if activation == "smooth_leaky_relu":
        return SmoothLeakyReLU(alpha=slope)
    if activation == "softplus":
        return nn.Softplus(beta=1)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _inverse_activation(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(act, nn.LeakyReLU):
        if act.negative_slope <= 0:
            raise ValueError("leaky_relu with slope <= 0 is not invertible")
        return torch.where(y >= 0, y, y / act.negative_slope)
    if isinstance(act, nn.ELU):
        if not bool((y > -act.alpha).all()):
            raise ValueError("elu inverse needs every value above -alpha")
        return torch.where(y > 0, y, torch.log1p(y / act.alpha))
    if isinstance(act, nn.Softplus):
        if not bool((y > 0).all()):
            raise ValueError("softplus inverse needs positive values")
        # nn.Softplus is linear above its threshold (20): invert that branch linearly
        lin = y * act.beta > act.threshold
        safe = torch.where(lin, torch.ones_like(y), y)
        return torch.where(lin, y, torch.log(torch.expm1(safe * act.beta)) / act.beta)
    if isinstance(act, SmoothLeakyReLU):
        if act.alpha <= 0:
            raise ValueError("smooth_leaky_relu with alpha <= 0 is not invertible")
        # strictly increasing and convex: Newton's method from the right converges monotonically
        x = torch.maximum(y, y / act.alpha)
        for _ in range(100):
            step = (act(x) - y) / (act.alpha + (1.0 - act.alpha) * torch.sigmoid(x))
            x = x - step
            if bool((step.abs() <= 1e-12 * (1.0 + x.abs())).all()):
                break
        return x
    raise ValueError(f"{type(act).__name__} is not invertible (relu maps all negatives to 0)")


class InvertibleMLPMixing(nn.Sequential):
    """The mixing network: ``Linear, act, Linear, act, ..., Linear`` (no biases, frozen).

    The layout (and so the ``state_dict`` keys ``0.weight``, ``2.weight``, ...) is the official
    ``nn.Sequential``'s. ``cond_threshold`` is the threshold the weights were selected against and
    ``condition_numbers`` the selected matrices' conditions (computed in float64 before the cast).
    """

    def __init__(self, weights: list[torch.Tensor], activation: str = "leaky_relu",
                 slope: float = 0.2, cond_threshold: float = float("nan"),
                 condition_numbers: tuple[float, ...] = (), dtype: torch.dtype = torch.float32):
        if len(weights) < 1:
            raise ValueError("n_layers must be >= 1")
        n = weights[0].shape[0]
        layers: list[nn.Module] = []
        for i, w in enumerate(weights):
            if tuple(w.shape) != (n, n):
                raise ValueError(f"weights must all be ({n}, {n}), got {tuple(w.shape)}")
            lin = nn.Linear(n, n, bias=False, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w.to(dtype))
            layers.append(lin)
            if i < len(weights) - 1:
                layers.append(_make_activation(activation, slope))
        super().__init__(*layers)
        for p in self.parameters():
            p.requires_grad_(False)
        self.n = n
        self.activation = activation
        self.slope = slope
        self.cond_threshold = float(cond_threshold)
        self.condition_numbers = tuple(float(c) for c in condition_numbers)

    def __getitem__(self, idx):
        # a slice is a plain nn.Sequential (this class's constructor takes other arguments)
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @torch.no_grad()
    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """g^-1 computed numerically: solve each linear layer, invert each activation (in the
        input's dtype; pass float64 for accuracy). relu raises ValueError (not bijective)."""
        for m in reversed(list(self)):
            if isinstance(m, nn.Linear):
                w = m.weight.to(x.dtype)
                # y = x W^T  <=>  W x^T = y^T
                x = torch.linalg.solve(w, x.reshape(-1, self.n).mT).mT.reshape(x.shape)
            else:
                x = _inverse_activation(m, x)
        return x


def _check_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(torch.seed())
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator")
    return generator


def draw_normalised_matrices(count: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` float64 (n, n) matrices, entries U(-1, 1), each column scaled to unit L2 norm.
    Draws consume the generator exactly like ``count`` separate (n, n) draws."""
    a = torch.rand(count, n, n, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    return a / torch.linalg.vector_norm(a, dim=-2, keepdim=True)


def condition_numbers(mats: torch.Tensor) -> torch.Tensor:
    """2-norm condition numbers (largest / smallest singular value) of a batch of matrices."""
    s = torch.linalg.svdvals(mats)
    return s[..., 0] / s[..., -1]


def condition_lower_bound(mats: torch.Tensor) -> torch.Tensor:
    """A cheap lower bound on the 2-norm condition number of column-normalised matrices:
    sigma_max >= max(1, largest row norm) (unit columns) and 1 / sigma_min = ||A^-1|| >= largest
    column norm of A^-1 (one batched LU inverse instead of an SVD). inf where A is singular."""
    inv, info = torch.linalg.inv_ex(mats)
    smax = torch.linalg.vector_norm(mats, dim=-1).amax(-1).clamp_min(1.0)
    bound = smax * torch.linalg.vector_norm(inv, dim=-2).amax(-1)
    return torch.where(info == 0, bound, torch.full_like(bound, float("inf")))


def condition_threshold(n: int, cond_samples: int = 25000, cond_thresh_ratio: float = 0.0,
                        generator: torch.Generator | None = None,
                        chunk: int = _CHUNK) -> float:
    """The official threshold: ascending-sorted conditions of ``cond_samples`` fresh matrices, the
    entry at index ``int(cond_samples * cond_thresh_ratio)`` (ratio 0: the minimum)."""
    _check_int("n", n, 1)
    _check_int("cond_samples", cond_samples, 1)
    _check_int("chunk", chunk, 1)
    if not (0.0 <= float(cond_thresh_ratio) < 1.0):
        raise ValueError(f"cond_thresh_ratio must be in [0, 1), got {cond_thresh_ratio}")
    generator = _check_generator(generator)
    conds = []
    left = cond_samples
    while left > 0:
        k = min(chunk, left)
        conds.append(condition_numbers(draw_normalised_matrices(k, n, generator)))
        left -= k
    conds_all = torch.cat(conds)
    idx = int(cond_samples * float(cond_thresh_ratio))
    if idx == 0:
        return float(conds_all.min())
    return float(torch.sort(conds_all).values[idx])


def select_conditioned_matrices(n: int, count: int, threshold: float,
                                generator: torch.Generator | None = None,
                                chunk: int = _CHUNK, max_draws: int | None = None,
                                prefilter: bool = True
                                ) -> tuple[list[torch.Tensor], list[float]]:
    """The first ``count`` matrices of the generator's stream with condition <= ``threshold``
    (float64), and their conditions. ``max_draws`` (None: unlimited, as the official loop) bounds
    the candidates drawn; exceeding it raises RuntimeError. ``prefilter`` skips the SVD of
    candidates whose cheap lower bound (:func:`condition_lower_bound`) already exceeds the
    threshold; it changes the speed only, never the selection."""
    _check_int("n", n, 1)
    _check_int("count", count, 0)
    _check_int("chunk", chunk, 1)
    generator = _check_generator(generator)
    chosen: list[torch.Tensor] = []
    conds: list[float] = []
    drawn = 0
    buf = torch.empty(0, n, n, dtype=torch.float64)
    buf_c = torch.empty(0, dtype=torch.float64)
    while len(chosen) < count:
        if buf.shape[0] == 0:
            if max_draws is not None and drawn >= max_draws:
                raise RuntimeError(f"no matrix with condition <= {threshold} in {drawn} draws")
            k = chunk if max_draws is None else min(chunk, max_draws - drawn)
            buf = draw_normalised_matrices(k, n, generator)
            drawn += k
            if prefilter and threshold <= _PREFILTER_MAX_THRESH:
                # exact conditions only where the bound cannot rule the matrix out
                maybe = ~(condition_lower_bound(buf) * (1.0 - _PREFILTER_SLACK) > threshold)
                buf_c = torch.full((k,), float("inf"), dtype=torch.float64)
                if bool(maybe.any()):
                    buf_c[maybe] = condition_numbers(buf[maybe])
            else:
                buf_c = condition_numbers(buf)
        ok = torch.nonzero(buf_c <= threshold)
        if ok.numel() == 0:
            buf = buf[:0]
            continue
        i = int(ok[0, 0])
        chosen.append(buf[i].clone())
        conds.append(float(buf_c[i]))
        buf, buf_c = buf[i + 1:], buf_c[i + 1:]
    return chosen, conds


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def build_mixing(n: int, n_layers: int = 3, activation: str = "leaky_relu", slope: float = 0.2,
                 cond_samples: int = 25000, cond_thresh_ratio: float = 0.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 chunk: int = _CHUNK) -> InvertibleMLPMixing:
    """The frozen CL-ICA mixing g: R^n -> R^n (official defaults of ``main_mlp.py``: 3 layers,
    leaky_relu 0.2, 25,000 pool matrices, ratio 0). ``slope`` is the negative slope of leaky_relu
    and the alpha of smooth_leaky_relu (both 0.2 officially); elu uses alpha 1, softplus beta 1.
    ``generator`` None draws from a fresh random seed. Deterministic for a given generator state;
    the result does not depend on ``chunk`` (only speed and memory do)."""
    _check_int("n", n, 1)
    _check_int("n_layers", n_layers, 1)
    _check_int("cond_samples", cond_samples, 1)
    _check_int("chunk", chunk, 1)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    slope = float(slope)
    if activation in ("leaky_relu", "smooth_leaky_relu") and not (0.0 < slope <= 1.0):
        raise ValueError(f"slope must be in (0, 1] for {activation}, got {slope}")
    if not (0.0 <= float(cond_thresh_ratio) < 1.0):
        raise ValueError(f"cond_thresh_ratio must be in [0, 1), got {cond_thresh_ratio}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    generator = _check_generator(generator)
    thresh = condition_threshold(n, cond_samples, cond_thresh_ratio, generator, chunk)
    weights, conds = select_conditioned_matrices(n, n_layers, thresh, generator, chunk)
    return InvertibleMLPMixing(weights, activation, slope, thresh, tuple(conds), dtype)
