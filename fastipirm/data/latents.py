"""Latent spaces and latent distributions of CL-ICA's MLP-mixing experiment.

CL-ICA ("Contrastive Learning Inverts the Data Generating Process", Zimmermann et al., ICML
2021) draws, every training step, a fresh batch of latents ``z ~ p(z)`` (the *marginal*) and one
positive ``z~ ~ p(z~ | z)`` per latent (the *conditional*) on one of three spaces:

=========  ==================================================================================
box        the hyper-rectangle [box_min, box_max]^n, by default [0, 1]^n
sphere     the sphere S^{n-1} = {z in R^n : |z| = radius} (n >= 2), by default radius 1
unbounded  R^n
=========  ==================================================================================

Marginals (``dist`` of :meth:`LatentSpace.sample_marginal`, ``param`` = scale, ``--m-param``):
``uniform`` (box: uniform; sphere: a normalised Gaussian; not defined on R^n), ``laplace``
(scale), ``normal`` (std) and ``gennorm`` (exponent ``p``, density ~ exp(-|x / scale|^p)), all
around eta = 0, or eta = radius * e_1 on the sphere. Conditionals (:meth:`sample_conditional`,
``param`` = ``--c-param``): ``vmf`` (von Mises-Fisher, kappa = param, sphere only), ``laplace``,
``normal`` and ``gennorm`` centred on z. The official integer codes (``--m-p``, ``--c-p``)
translate with :func:`marginal_from_code` and :func:`conditional_from_code`.

How each space restricts a distribution drawn in R^n:

* box: the product of the 1-D distributions, each truncated to [box_min, box_max]. This is
  what the official per-coordinate rejection resampling (``truncated_rejection_resampling``,
  used by the marginals as well as the conditionals) produces: every coordinate is redrawn
  until it lands in the box. Here the same law is drawn *exactly* by the inverse CDF of the
  truncated 1-D distribution, in float64, with one uniform per coordinate and no loop and no
  host sync: closed forms for the Normal (``erfc`` / ``ndtri``) and the Laplace; for the
  generalised normal, 12 bisection then 8 bracketed Newton steps on its CDF
  1/2 + sign(x)/2 P(1/p, |x|^p) (regularised incomplete gamma; ~1e-12 accurate). Intervals
  that lie entirely on the positive side are mirrored to the negative side, where the CDF is
  accurate in the far tail. The result is clamped to the box against rounding.
* sphere: drawn in R^n around the centre and projected back by normalisation; von Mises-Fisher
  is sampled natively by Wood's (1994) algorithm (a Beta((n-1)/2, (n-1)/2) proposal for the
  cosine w to the mean direction, accept/reject, a uniform direction orthogonal to the mean,
  combined as w mu + sqrt(1 - w^2) v).
* unbounded: no restriction.

Everything runs on the device of the inputs (or of ``generator``), vectorised, with no host sync
(no ``.item()``, no data-dependent Python branch). The vMF accept/reject draws
:data:`VMF_CANDIDATES` = 64 proposals per sample at once and keeps the first accepted one. Wood's
acceptance rate is above 0.65 for every n >= 2 and kappa > 0, so all 64 are rejected with a
probability below 0.35^64 < 1e-29 per sample; in that event the last proposal is kept.

Deviations from the official code (brendel-group/cl-ica ``spaces.py``, ``vmf.py``):

* the sphere projections (uniform, Normal, Laplace, generalised normal) and vMF use the sphere's
  radius; the official code projects to the *unit* sphere whatever ``--sphere-r`` is, and its vMF
  is only on the sphere of radius 1 (its orthogonal projection divides by |mu|, not |mu|^2);
* the sphere marginals are centred on radius * e_1 (official: e_1, which its own assertion
  ``|mean| == r`` rejects unless r = 1);
* on the box the truncated laws are drawn by the inverse CDF instead of rejection (same law,
  bounded work; the official loop never ends when the box holds almost no mass, which is here
  a ValueError for the marginal);
* vMF is drawn in torch on the device (official: numpy on the CPU, then copied).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = [
    "CONDITIONALS",
    "MARGINALS",
    "SPACES",
    "VMF_CANDIDATES",
    "LatentSpace",
    "conditional_from_code",
    "marginal_from_code",
]

SPACES = ("box", "sphere", "unbounded")
MARGINALS = ("uniform", "laplace", "normal", "gennorm")
CONDITIONALS = ("vmf", "laplace", "normal", "gennorm")

VMF_CANDIDATES = 64
"""Wood proposals drawn per vMF sample (first accepted one is kept)."""

_BISECTION_STEPS = 12
_NEWTON_STEPS = 8
_SQRT1_2 = math.sqrt(0.5)
# Largest tail exponent (x^2 / 2, |x| or |x|^p, x in scales) at which the box may lie away from
# the marginal's centre: beyond it the mass in the box underflows float64.
_MAX_TAIL_EXPONENT = 600.0


def marginal_from_code(m_p: int) -> tuple[str, float | None]:
    """Official ``--m-p`` code as ``(dist, p)``: 0 uniform, 1 Laplace, 2 Normal, else gennorm."""
    _check_real("m_p", m_p)
    if m_p == 0:
        return "uniform", None
    if m_p == 1:
        return "laplace", None
    if m_p == 2:
        return "normal", None
    return "gennorm", float(m_p)


def conditional_from_code(c_p: int) -> tuple[str, float | None]:
    """The official ``--c-p`` code as ``(dist, p)``: 0 vMF, 1 Laplace, 2 Normal, else gennorm."""
    _check_real("c_p", c_p)
    if c_p == 0:
        return "vmf", None
    if c_p == 1:
        return "laplace", None
    if c_p == 2:
        return "normal", None
    return "gennorm", float(c_p)


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number (not a tensor), got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_dist(dist: str, param: float, p: float | None, allowed: tuple[str, ...],
                role: str) -> None:
    if dist not in allowed:
        raise ValueError(f"unknown {role} dist {dist!r}; expected one of {allowed}")
    _check_real("param", param)
    if dist != "uniform" and param <= 0:
        raise ValueError(f"param (the {dist} scale/concentration) must be > 0, got {param!r}")
    if dist == "gennorm":
        if p is None:
            raise ValueError("p (the gennorm exponent) is required for dist 'gennorm'")
        _check_real("p", p)
        if p < 1:
            raise ValueError(f"p (the gennorm exponent) must be >= 1, got {p!r}")
    elif p is not None:
        raise ValueError(f"p is only used by dist 'gennorm', got p={p!r} for dist {dist!r}")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    g_dev = torch.device(generator.device)
    if g_dev.type != device.type or (
        g_dev.index is not None and device.index is not None and g_dev.index != device.index
    ):
        raise ValueError(f"generator is on {g_dev}, but the samples are on {device}")


# --------------------------------------------------------------------------- primitives

def _uniform(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


def _sign(shape, generator, device) -> torch.Tensor:
    u = _uniform(shape, generator, device)
    return torch.where(u < 0.5, -1.0, 1.0).to(torch.float64)


def _gamma(alpha: float, shape, generator, device) -> torch.Tensor:
    a = torch.full(shape, float(alpha), dtype=torch.float64, device=device)
    return torch._standard_gamma(a, generator=generator)


def _standard(dist: str, p: float | None, shape, generator, device) -> torch.Tensor:
    """Unit-scale samples (float64) of an untruncated 1-D law, i.i.d. over ``shape``."""
    if dist == "normal":
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    if dist == "laplace":
        e = torch.empty(shape, dtype=torch.float64, device=device).exponential_(
            generator=generator)
        return _sign(shape, generator, device) * e
    # gennorm: sign * Gamma(1/p, 1)^(1/p), density ~ exp(-|x|^p)
    g = _gamma(1.0 / p, shape, generator, device)
    return _sign(shape, generator, device) * g.pow(1.0 / p)


def _gennorm_cdf(x: torch.Tensor, p: float) -> torch.Tensor:
    """CDF of the unit-scale generalised normal: 1/2 + sign(x)/2 * P(1/p, |x|^p)."""
    half_q = 0.5 * torch.special.gammaincc(torch.full_like(x, 1.0 / p), x.abs().pow(p))
    return torch.where(x <= 0, half_q, 1.0 - half_q)


def _gennorm_solve(t: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                   p: float) -> torch.Tensor:
    """x in [left, right] with CDF(x) = t: bisection, then Newton kept inside the bracket."""
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (left + right)
        go_right = _gennorm_cdf(mid, p) < t
        left = torch.where(go_right, mid, left)
        right = torch.where(go_right, right, mid)
    x = 0.5 * (left + right)
    log_norm = math.log(p / 2.0) - math.lgamma(1.0 / p)
    for _ in range(_NEWTON_STEPS):
        f = _gennorm_cdf(x, p)
        below = f < t
        left = torch.where(below, x, left)
        right = torch.where(below, right, x)
        step = x - (f - t) / torch.exp(log_norm - x.abs().pow(p))
        ok = (step >= left) & (step <= right)  # False for NaN / inf too
        x = torch.where(ok, step, 0.5 * (left + right))
    return x


def _truncated_standard(dist: str, p: float | None, lo: torch.Tensor, hi: torch.Tensor,
                        generator, device) -> torch.Tensor:
    """Exact samples of the unit-scale law truncated to [lo, hi] (float64, elementwise)."""
    flip = lo > 0  # mirror intervals on the positive side: then a <= 0 always
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    u = _uniform(a.shape, generator, device)
    if dist == "normal":
        # 0.5 erfc(-x / sqrt 2), not torch.special.ndtr, which loses the lower tail (< 1e-16)
        fa = 0.5 * torch.special.erfc(a * -_SQRT1_2)
        fb = 0.5 * torch.special.erfc(b * -_SQRT1_2)
        x = torch.special.ndtri(fa + u * (fb - fa))
    elif dist == "laplace":
        # b > 0: F(x) = exp(x)/2 (x <= 0), 1 - exp(-x)/2 (x > 0)
        fa, fb = 0.5 * torch.exp(a), 1.0 - 0.5 * torch.exp(-b.clamp(min=0))
        t = fa + u * (fb - fa)
        straddle = torch.where(t <= 0.5, torch.log(2.0 * t), -torch.log(2.0 * (1.0 - t)))
        # b <= 0: the stable form of log(2 t) relative to b
        r = torch.exp(a - b)
        negative = b + torch.log(r + u * (1.0 - r))
        x = torch.where(b > 0, straddle, negative)
    else:
        fa, fb = _gennorm_cdf(a, p), _gennorm_cdf(b, p)
        t = fa + u * (fb - fa)
        x = _gennorm_solve(t, a, b, p)
    x = torch.where(flip, -x, x)
    return torch.minimum(torch.maximum(x, lo), hi)


def _vmf_cosine(kappa: float, n: int, batch: int, generator, device) -> torch.Tensor:
    """Wood's accept/reject for w = <z~, mu> of a vMF on S^{n-1} (float64, shape (batch,))."""
    m = n - 1
    b = m / (math.sqrt(4.0 * kappa * kappa + m * m) + 2.0 * kappa)
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + m * math.log(1.0 - x0 * x0)
    shape = (batch, VMF_CANDIDATES)
    g1 = _gamma(m / 2.0, shape, generator, device)
    g2 = _gamma(m / 2.0, shape, generator, device)
    beta = g1 / (g1 + g2)
    w = (1.0 - (1.0 + b) * beta) / (1.0 - (1.0 - b) * beta)
    u = _uniform(shape, generator, device)
    accept = kappa * w + m * torch.log1p(-x0 * w) - c >= torch.log(u)
    # first accepted candidate; the last one if none is (probability < 1e-29)
    accept[:, -1] = True
    first = torch.argmax(accept.to(torch.uint8), dim=1, keepdim=True)
    return w.gather(1, first).squeeze(1).clamp(-1.0, 1.0)


# --------------------------------------------------------------------------- the space

@dataclass(frozen=True)
class LatentSpace:
    """A latent space of CL-ICA's MLP-mixing experiment (``--space-type``, ``--n``, ...).

    Args:
        kind: ``"box"`` (default), ``"sphere"`` or ``"unbounded"``.
        n: dimensionality of the ambient space R^n (official default 10; >= 2 on the sphere).
        box_min, box_max: the box [box_min, box_max]^n (only used by ``"box"``).
        radius: radius of the sphere (only used by ``"sphere"``).
    """

    kind: str = "box"
    n: int = 10
    box_min: float = 0.0
    box_max: float = 1.0
    radius: float = 1.0

    def __post_init__(self):
        if self.kind not in SPACES:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {SPACES}")
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.kind == "sphere" and self.n < 2:
            raise ValueError(f"n must be >= 2 on the sphere, got {self.n!r}")
        _check_real("box_min", self.box_min)
        _check_real("box_max", self.box_max)
        if self.box_min >= self.box_max:
            raise ValueError(
                f"box_min must be < box_max, got box_min={self.box_min!r}, "
                f"box_max={self.box_max!r}")
        _check_real("radius", self.radius)
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius!r}")

    # ------------------------------------------------------------------ helpers

    def eta(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Centre of the non-uniform marginals: 0, or radius * e_1 on the sphere."""
        e = torch.zeros(self.n, device=device, dtype=dtype)
        if self.kind == "sphere":
            e[0] = self.radius
        return e

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.radius / torch.linalg.vector_norm(x, dim=-1, keepdim=True))

    def _box_truncated(self, center: torch.Tensor, dist: str, scale: float, p, generator,
                       device) -> torch.Tensor:
        center = center.to(torch.float64)
        lo = (self.box_min - center) / scale
        hi = (self.box_max - center) / scale
        x = center + scale * _truncated_standard(dist, p, lo, hi, generator, device)
        return x.clamp(self.box_min, self.box_max)

    # ------------------------------------------------------------------ sampling

    def sample_marginal(self, batch: int, dist: str = "uniform", param: float = 1.0,
                        p: float | None = None, *, generator: torch.Generator | None = None,
                        device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw ``batch`` latents z ~ p(z), shape (batch, n).

        Args:
            batch: number of samples.
            dist: ``"uniform"``, ``"laplace"``, ``"normal"`` or ``"gennorm"`` (``--m-p``).
            param: scale of the non-uniform marginals (``--m-param``, default 1; ignored by
                uniform).
            p: exponent, for ``"gennorm"`` only (>= 1).
            generator: torch.Generator on the samples' device, for reproducibility.
            device: device of the samples; defaults to the generator's device, else the CPU.
            dtype: floating dtype of the samples.

        On the box the non-uniform marginals are the product of the 1-D laws around eta = 0
        truncated to [box_min, box_max] (the official per-coordinate rejection), drawn exactly by
        the inverse CDF; the uniform marginal is uniform on the box. On the sphere the uniform
        marginal is a normalised Gaussian and the others are drawn around radius * e_1 in R^n and
        projected onto the sphere of radius ``radius``. On R^n the uniform marginal is undefined
        (ValueError).
        """
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        _check_dist(dist, param, p, MARGINALS, "marginal")
        if device is None:
            device = generator.device if generator is not None else "cpu"
        device = torch.device(device)
        _check_generator(generator, device)
        shape = (batch, self.n)

        if dist == "uniform":
            if self.kind == "unbounded":
                raise ValueError("dist 'uniform' is not defined on the unbounded space R^n")
            if self.kind == "box":
                u = _uniform(shape, generator, device)
                x = self.box_min + (self.box_max - self.box_min) * u
                return x.clamp(self.box_min, self.box_max).to(dtype)
            g = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
            return self._project(g).to(dtype)

        if self.kind == "box":
            # distance (in scales) from eta = 0 to the box; beyond it the box holds no mass
            d = max(self.box_min, -self.box_max, 0.0) / param
            tail = {"normal": d * d / 2.0, "laplace": d}.get(dist)
            tail = d ** p if tail is None else tail
            if tail > _MAX_TAIL_EXPONENT:
                raise ValueError(
                    f"param={param!r}: the box [{self.box_min}, {self.box_max}] lies {d:.3g} "
                    f"scales from the marginal's centre 0 and holds no {dist} mass")
            center = torch.zeros(shape, dtype=torch.float64, device=device)
            return self._box_truncated(center, dist, param, p, generator, device).to(dtype)

        x = self.eta(device, torch.float64) + param * _standard(dist, p, shape, generator, device)
        if self.kind == "sphere":
            x = self._project(x)
        return x.to(dtype)

    def sample_conditional(self, z: torch.Tensor, dist: str = "normal", param: float = 0.05,
                           p: float | None = None, *,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one positive z~ ~ p(z~ | z) per row of ``z`` (shape (batch, n)), same dtype/device.

        Args:
            z: the anchors, shape (batch, n), in the space.
            dist: ``"vmf"`` (sphere only, kappa = param), ``"laplace"`` (scale), ``"normal"``
                (std) or ``"gennorm"`` (scale, exponent ``p``) (``--c-p``).
            param: scale or concentration (``--c-param``, official default 0.05).
            p: exponent, for ``"gennorm"`` only (>= 1; the official codes use p >= 3).
            generator: torch.Generator on ``z``'s device.

        Box: per-coordinate truncation to [box_min, box_max] around each z_k (the official
        rejection resampling's law), drawn exactly by the inverse CDF. Sphere: drawn in R^n around
        z and projected onto the sphere of radius ``radius``; vMF natively (Wood), around the
        direction of z. R^n: untruncated. No host sync in any case.
        """
        if not torch.is_tensor(z) or z.dim() != 2 or z.shape[1] != self.n or z.shape[0] < 1:
            shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (batch, {self.n}), got {shape}")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating tensor, got dtype {z.dtype}")
        _check_dist(dist, param, p, CONDITIONALS, "conditional")
        if dist == "vmf" and self.kind != "sphere":
            raise ValueError(f"dist 'vmf' is only defined on the sphere, not on kind "
                             f"{self.kind!r}")
        device = z.device
        _check_generator(generator, device)
        z = z.detach()

        if self.kind == "box":
            return self._box_truncated(z, dist, param, p, generator, device).to(z.dtype)

        if dist == "vmf":
            zz = z.to(torch.float64)
            mu = zz / torch.linalg.vector_norm(zz, dim=-1, keepdim=True)
            w = _vmf_cosine(float(param), self.n, z.shape[0], generator, device).unsqueeze(1)
            v = torch.randn(z.shape, generator=generator, device=device, dtype=torch.float64)
            v = v - (v * mu).sum(-1, keepdim=True) * mu
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
            x = w * mu + torch.sqrt((1.0 - w * w).clamp(min=0.0)) * v
            return (self.radius * x).to(z.dtype)

        x = z.to(torch.float64) + param * _standard(dist, p, z.shape, generator, device)
        if self.kind == "sphere":
            x = self._project(x)
        return x.to(z.dtype)

    def sample_pair(self, batch: int, marginal: str = "uniform", marginal_param: float = 1.0,
                    conditional: str = "normal", conditional_param: float = 0.05,
                    marginal_p: float | None = None, conditional_p: float | None = None, *,
                    generator: torch.Generator | None = None, device=None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, z~)``: one step's latents (official defaults: box, uniform, Normal 0.05)."""
        z = self.sample_marginal(batch, marginal, marginal_param, marginal_p,
                                 generator=generator, device=device, dtype=dtype)
        zt = self.sample_conditional(z, conditional, conditional_param, conditional_p,
                                     generator=generator)
        return z, zt
