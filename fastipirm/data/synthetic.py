"""The embedded data set: procedurally drawn coloured shapes with known generative factors.

Every image shows one anti-aliased shape on a shaded, noisy background. The factors, drawn
independently per image (unless ``color_correlation`` ties colour to shape), are

============  ==========================================================================
shape         discrete: the first ``num_shapes`` (2-8, default 5) of circle, square, triangle,
              cross, ring, star, half-disc, tee (the default label)
color         discrete: one of ``num_colors`` (<= 8, default 8) saturated foreground colours
background    discrete: one of ``num_backgrounds`` (<= 4, default 4) dull background colours
size          continuous: shape radius in pixels, U[0.22, 0.38] * image_size
pos_x, pos_y  continuous: shape centre in pixels (the shape may touch the border)
rotation      continuous: U[0, rotation) degrees (stored in radians), rotation = 360 by default
bg_angle      continuous: direction of the background's linear shading, U[0, 2*pi)
bg_strength   continuous: amplitude of that shading, U[0, shading], shading = 0.3 by default
============  ==========================================================================

plus i.i.d. Gaussian pixel noise (std ``noise``, in [0, 1] units). Colour jitter and grayscale
weaken the colour cues and crops change position and size, while shape survives the
augmentations; a probe on ``shape`` therefore measures how much shape the features carry. What
tells one image from another decides what contrastive learning picks up: a 4-way background,
shading and free rotation are cues that separate instances without their shape, so the
quickstart (``configs/quickstart.toml``) uses one flat background, upright shapes (``rotation =
0``) and all 8 silhouettes, and there a short SimCLR or IP-IRM run beats the untrained network on
the shape by 20-70 points (README). With the defaults (5 rotated shapes, 4 shaded backgrounds) and
a similar budget the gain on the shape stayed within a few points of the untrained network.
``color_correlation`` = rho > 0 makes ``color = shape % num_colors`` for a fraction rho of the
images: a spurious feature (``configs/synthetic_spurious.toml`` ties it in the pretraining split
only, ``data.eval_color_correlation``).

Generation is vectorised NumPy over chunks of images (signed distance functions evaluated on the
pixel grid, alpha = clip(0.5 - distance, 0, 1) for one-pixel anti-aliasing) and deterministic in
(seed, split, n, image_size, options): 10,000 images of 32x32 take about a second.
"""
from __future__ import annotations

import numpy as np

from ..seeding import numpy_rng

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "half-disc", "tee")
DEFAULT_SHAPES = 5   # the first five unless num_shapes says otherwise
COLORS = np.array([  # saturated foregrounds
    [0.90, 0.10, 0.10], [0.10, 0.80, 0.10], [0.15, 0.30, 0.95], [0.95, 0.90, 0.10],
    [0.90, 0.15, 0.85], [0.10, 0.85, 0.90], [0.95, 0.55, 0.05], [0.95, 0.95, 0.95],
], dtype=np.float32)
BACKGROUNDS = np.array([  # dull backgrounds
    [0.10, 0.10, 0.10], [0.45, 0.45, 0.45], [0.12, 0.16, 0.35], [0.35, 0.27, 0.15],
], dtype=np.float32)
#: discrete factor -> largest number of values (usable as the label)
DISCRETE_FACTORS = {"shape": len(SHAPES), "color": len(COLORS), "background": len(BACKGROUNDS)}
#: split -> (random stream id, default number of images)
SPLITS = {"train": (0, 10_000), "test": (1, 2_000), "val": (2, 2_000)}
_CHUNK = 2048  # images rendered at once; fixed so that results do not depend on it


def _sdf_circle(u, v):
    return np.sqrt(u * u + v * v) - 1.0


def _sdf_square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) - 0.8


def _sdf_triangle(u, v):  # equilateral, inradius 0.6 (circumradius 1.2), flat side at v = -0.6
    a = 0.5 * v
    b = 0.8660254 * u
    return np.maximum(np.maximum(-v, a + b), a - b) - 0.6


def _sdf_cross(u, v):  # plus sign, arms 2.0 long and 0.6 wide
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))


def _sdf_ring(u, v):  # annulus between radii 0.4 and 1.0
    return np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.3


def _sdf_star(u, v):  # five-pointed, radius 0.55 to 1.0 (a distance along rays, not exact)
    return np.sqrt(u * u + v * v) - (0.775 + 0.225 * np.cos(5.0 * np.arctan2(v, u)))


def _sdf_half_disc(u, v):  # the half of the unit disc above v = -0.3
    return np.maximum(np.sqrt(u * u + (v + 0.3) ** 2) - 1.0, -(v + 0.3))


def _sdf_tee(u, v):  # a T: bar 2.0 x 0.6 on top of a 0.6-wide stem
    au = np.abs(u)
    bar = np.maximum(au - 1.0, np.abs(v - 0.6) - 0.3)
    stem = np.maximum(au - 0.3, np.abs(v + 0.2) - 0.6)
    return np.minimum(bar, stem)


_SDFS = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_cross, _sdf_ring, _sdf_star,
         _sdf_half_disc, _sdf_tee)


def generate_shapes(n: int, *, image_size: int = 32, seed: int = 0, stream: int = 0,
                    color_correlation: float = 0.0, noise: float = 0.03,
                    num_colors: int = len(COLORS), num_backgrounds: int = len(BACKGROUNDS),
                    shading: float = 0.3, num_shapes: int = DEFAULT_SHAPES,
                    rotation: float = 360.0
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render ``n`` images (n, image_size, image_size, 3) uint8 and return them with their factors.

    ``stream`` separates independent draws with the same seed (the splits use 0, 1, 2).
    ``num_shapes`` / ``num_colors`` / ``num_backgrounds`` use the first entries of the shape list
    and the palettes only; ``shading`` is the largest amplitude of the background's linear shading
    (0 gives flat backgrounds); ``rotation`` the largest rotation of a shape in degrees (0: every
    shape upright). Discrete factors are int64, continuous ones float32.
    """
    if n < 1 or image_size < 8:
        raise ValueError(f"synthetic: need n >= 1 and image_size >= 8, got n={n}, "
                         f"image_size={image_size}")
    if not 0.0 <= color_correlation <= 1.0 or noise < 0 or not 0.0 <= shading < 1.0:
        raise ValueError("synthetic: color_correlation must lie in [0, 1], noise be >= 0 and "
                         "shading in [0, 1)")
    if not (1 <= num_colors <= len(COLORS) and 1 <= num_backgrounds <= len(BACKGROUNDS)):
        raise ValueError(f"synthetic: num_colors must be 1..{len(COLORS)} and num_backgrounds "
                         f"1..{len(BACKGROUNDS)}")
    if not 2 <= num_shapes <= len(SHAPES):
        raise ValueError(f"synthetic: num_shapes must be 2..{len(SHAPES)}, got {num_shapes}")
    if not 0.0 <= rotation <= 360.0:
        raise ValueError(f"synthetic: rotation must lie in [0, 360] degrees, got {rotation}")
    rng = numpy_rng(seed, stream)
    s = float(image_size)
    shape = rng.integers(0, num_shapes, n)
    color = rng.integers(0, num_colors, n)
    tie = rng.random(n) < color_correlation
    color = np.where(tie, shape % num_colors, color)
    radius = (rng.uniform(0.22, 0.38, n) * s).astype(np.float32)
    lo, hi = 0.7 * radius, s - 0.7 * radius
    factors = {
        "shape": shape.astype(np.int64),
        "color": color.astype(np.int64),
        "background": rng.integers(0, num_backgrounds, n).astype(np.int64),
        "size": radius,
        "pos_x": (lo + (hi - lo) * rng.random(n)).astype(np.float32),
        "pos_y": (lo + (hi - lo) * rng.random(n)).astype(np.float32),
        "rotation": (rng.uniform(0, 2 * np.pi, n) * (rotation / 360.0)).astype(np.float32),
        "bg_angle": rng.uniform(0, 2 * np.pi, n).astype(np.float32),
        "bg_strength": rng.uniform(0, shading, n).astype(np.float32),
    }
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    noise_rng = numpy_rng(seed, stream, 1)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        images[sl] = _render({k: v[sl] for k, v in factors.items()}, image_size, noise, noise_rng)
    return images, factors


def _render(f: dict[str, np.ndarray], size: int, noise: float,
            rng: np.random.Generator) -> np.ndarray:
    n = f["shape"].shape[0]
    grid = np.arange(size, dtype=np.float32) + 0.5           # pixel centres
    dx = grid[None, None, :] - f["pos_x"][:, None, None]     # (n, 1, S)
    dy = grid[None, :, None] - f["pos_y"][:, None, None]     # (n, S, 1)
    cos, sin = np.cos(f["rotation"])[:, None, None], np.sin(f["rotation"])[:, None, None]
    r = f["size"][:, None, None]
    u = (cos * dx + sin * dy) / r                            # shape frame, in radii
    v = (cos * dy - sin * dx) / r
    dist = np.empty((n, size, size), dtype=np.float32)
    for k, sdf in enumerate(_SDFS):
        m = f["shape"] == k
        if m.any():
            dist[m] = sdf(u[m], v[m])
    alpha = np.clip(0.5 - dist * r, 0.0, 1.0)[..., None]    # distance in pixels -> coverage

    centred = grid / size * 2.0 - 1.0                        # [-1, 1]
    ramp = (np.cos(f["bg_angle"])[:, None, None] * centred[None, None, :]
            + np.sin(f["bg_angle"])[:, None, None] * centred[None, :, None])
    shade = 1.0 + f["bg_strength"][:, None, None] * ramp     # (n, S, S)
    background = BACKGROUNDS[f["background"]][:, None, None, :] * shade[..., None]
    foreground = COLORS[f["color"]][:, None, None, :]
    img = background + alpha * (foreground - background)
    if noise > 0:
        img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def load_synthetic(split: str, *, n: int | None = None, image_size: int = 32, seed: int = 0,
                   label_factor: str = "shape", color_correlation: float = 0.0, noise: float = 0.03,
                   num_colors: int = len(COLORS), num_backgrounds: int = len(BACKGROUNDS),
                   shading: float = 0.3, num_shapes: int = DEFAULT_SHAPES,
                   rotation: float = 360.0
                   ) -> tuple[np.ndarray, np.ndarray, int, dict[str, np.ndarray]]:
    """Images, labels (= ``factors[label_factor]``), number of classes and all factors of a split.

    Splits ``train`` (10,000 by default), ``test`` and ``val`` (2,000 each) are independent draws.
    """
    if split not in SPLITS:
        raise ValueError(f"synthetic: unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if label_factor not in DISCRETE_FACTORS:
        raise ValueError(f"synthetic: label_factor must be one of {sorted(DISCRETE_FACTORS)}, "
                         f"got {label_factor!r}")
    stream, default_n = SPLITS[split]
    images, factors = generate_shapes(default_n if n is None else int(n), image_size=image_size,
                                      seed=seed, stream=stream,
                                      color_correlation=color_correlation, noise=noise,
                                      num_colors=num_colors, num_backgrounds=num_backgrounds,
                                      shading=shading, num_shapes=num_shapes, rotation=rotation)
    num_classes = {"shape": num_shapes, "color": num_colors,
                   "background": num_backgrounds}[label_factor]
    return images, factors[label_factor].copy(), num_classes, factors
