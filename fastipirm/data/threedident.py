"""Reader for the published 3DIdent data set of CL-ICA (Zimmermann et al., ICML 2021).

3DIdent (Zenodo record 4502485, 250,000 training and 25,000 test renderings of a teapot) ships
one folder per split. A split folder holds:

``raw_latents.npy``  float (N, 10): the latents the renderings were *sampled* at. This is the
                     array the official training code loads and matches sampled latents against.
                     With the box ("non-periodic") parametrisation every column lies in [-1, 1];
                     columns 0-2 are the object position, 3-5 its rotation, 6 the spotlight
                     angle, 7 the object hue, 8 the spotlight hue, 9 the background hue.
``latents.npy``      optional, float (N, 10): the same latents rescaled to the renderer's units
                     (positions times 3, angles in radians), as the rendering script consumed
                     them. The official training code never reads it; it is loaded when present
                     (:attr:`ThreeDIdent.render_latents`) for reference only.
``images/``          one PNG per row, ``images/<i>.png`` with ``i`` zero-padded to
                     ``ceil(log10(N))`` digits (``000000.png`` ... ``249999.png`` for the train
                     split, five digits for the 25,000 test images).

Positive pairs (official ``ThreeDIdentDataset``): sample ``z ~ p(z)`` and ``z~ ~ p(z~ | z)`` in
the latent space, then replace each by the *nearest rendered latent* (exact L2 over the rows of
``raw_latents.npy``, restricted to the used latent columns, no normalisation; the official code
uses faiss ``IndexFlatL2``). ``z~`` takes its nearest row unless that row is ``z``'s own, in which
case it takes the second nearest, so the two images of a pair always differ. The returned latents
are the rendered rows, not the sampled values. Here the search is exact, in float64, with torch,
chunked so that memory stays bounded (:meth:`ThreeDIdent.nearest_indices`); there is no faiss
dependency and no approximate (IVF/HNSW) mode.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["ZENODO_URL", "ThreeDIdent", "image_name"]

ZENODO_URL = "https://zenodo.org/record/4502485"
_GET_DATA = (f"Download the 3DIdent archives from {ZENODO_URL} (linked from the '3DIdent "
             f"Dataset' section of the brendel-group/cl-ica README) and extract them so that "
             f"each split folder holds raw_latents.npy and images/.")

SPLIT_ALIASES = {"train": "trainset", "test": "testset"}
"""Fallback folder names tried when ``<root>/<split>`` does not exist (not fixed by the
official code, which takes the split folder's path directly)."""


def image_name(index: int, n: int) -> str:
    """File name of image ``index`` in a split of ``n`` images: zero-padded to ceil(log10(n))."""
    width = int(math.ceil(math.log10(n))) if n > 0 else 0
    return f"{str(index).zfill(width)}.png"


def _resolve(root: str, split: Optional[str]) -> str:
    if split is None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"3DIdent split folder {root!r} does not exist. {_GET_DATA}")
        return root
    tried = [os.path.join(root, split)]
    if split in SPLIT_ALIASES:
        tried.append(os.path.join(root, SPLIT_ALIASES[split]))
    for folder in tried:
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(f"3DIdent split folder not found: tried {', '.join(map(repr, tried))}. "
                            f"{_GET_DATA}")


def _load_latents(path: str, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path!r}: {err}. {_GET_DATA}") from err
    if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} {path!r} must be a non-empty floating (N, d) array, got "
                         f"{arr.dtype} {arr.shape}")
    return arr


class ThreeDIdent(torch.utils.data.Dataset):
    """One split of 3DIdent: latents in memory, images read lazily.

    Args:
        root: folder holding the split folders, or the split folder itself when ``split`` is None
            (the official ``--offline-dataset`` path).
        split: name of the split folder under ``root``; ``"train"``/``"test"`` fall back to
            ``trainset``/``testset`` when ``<root>/<split>`` does not exist.
        latent_dims: the latent columns to use (official ``latent_dimensions_to_use``), e.g.
            ``[3, 4, 5, 6]`` for rotations only; None uses all columns.
        image_dtype: ``torch.uint8`` (default, values 0-255) or a floating dtype (values in
            [0, 1]) for the (3, H, W) image tensors.
        check_images: list ``images/`` up front and fail on a missing image or a count mismatch.
        chunk_elements: bound on the number of query x reference distances held at once by
            :meth:`nearest_indices` (float64, so 8 bytes each; default 2^22 = 32 MiB).

    Every error about missing or malformed files names the file and where to get the data.
    ``dataset[i]`` is ``(image, latent)``: image (3, H, W) as above, latent float32 (d,).
    """

    def __init__(self, root: str, split: Optional[str] = None, *,
                 latent_dims: Optional[Sequence[int]] = None,
                 image_dtype: torch.dtype = torch.uint8, check_images: bool = True,
                 chunk_elements: int = 1 << 22):
        super().__init__()
        if image_dtype != torch.uint8 and not image_dtype.is_floating_point:
            raise ValueError(f"image_dtype must be torch.uint8 or floating, got {image_dtype}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements!r}")
        self.folder = _resolve(root, split)
        self.image_dtype = image_dtype
        self.chunk_elements = int(chunk_elements)

        raw_path = os.path.join(self.folder, "raw_latents.npy")
        if not os.path.isfile(raw_path):
            raise FileNotFoundError(f"3DIdent latents file {raw_path!r} is missing. {_GET_DATA}")
        raw = _load_latents(raw_path, "3DIdent latents file")
        n, d = raw.shape
        self.raw_latents = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))

        render_path = os.path.join(self.folder, "latents.npy")
        self.render_latents: Optional[torch.Tensor] = None
        if os.path.isfile(render_path):
            rend = _load_latents(render_path, "3DIdent render latents file")
            if rend.shape[0] != n:
                raise ValueError(f"{render_path!r} has {rend.shape[0]} rows but {raw_path!r} has "
                                 f"{n}")
            self.render_latents = torch.from_numpy(np.ascontiguousarray(rend, dtype=np.float32))

        if latent_dims is None:
            dims = list(range(d))
        else:
            dims = [int(i) for i in latent_dims]
            bad = [i for i in dims if not 0 <= i < d]
            if not dims or bad:
                raise ValueError(f"latent_dims {list(latent_dims)!r} must be a non-empty list of "
                                 f"columns of the {d} latents in {raw_path!r}")
        self.latent_dims = dims
        self.latents = self.raw_latents[:, dims].contiguous()
        self._ref = self.latents.to(torch.float64)
        self._ref_sq = (self._ref * self._ref).sum(1)

        self.image_folder = os.path.join(self.folder, "images")
        if not os.path.isdir(self.image_folder):
            raise FileNotFoundError(f"3DIdent image folder {self.image_folder!r} is missing. "
                                    f"{_GET_DATA}")
        self.image_names = [image_name(i, n) for i in range(n)]
        if check_images:
            present = {e for e in os.listdir(self.image_folder) if e.endswith(".png")}
            missing = [name for name in self.image_names if name not in present]
            if missing:
                raise FileNotFoundError(
                    f"3DIdent image {os.path.join(self.image_folder, missing[0])!r} is missing "
                    f"({len(missing)} of {n} images listed by {raw_path!r} are missing). "
                    f"{_GET_DATA}")
            if len(present) != n:
                raise ValueError(
                    f"{self.image_folder!r} holds {len(present)} PNG files but {raw_path!r} has "
                    f"{n} rows; the counts must match. {_GET_DATA}")

    # ------------------------------------------------------------------ images

    def __len__(self) -> int:
        return self.latents.shape[0]

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_folder, self.image_names[index])

    def load_image(self, index: int) -> torch.Tensor:
        """Image ``index`` as a (3, H, W) tensor of ``image_dtype`` (alpha dropped, grey
        replicated to RGB, like the official PIL ``convert("RGB")`` loader)."""
        import matplotlib.image as mpimg

        path = self.image_path(index)
        try:
            arr = mpimg.imread(path, format="png")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"3DIdent image {path!r} is missing. {_GET_DATA}") from err
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        elif arr.ndim == 3 and arr.shape[2] in (1, 2):
            arr = np.repeat(arr[:, :, :1], 3, axis=2)
        elif arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"3DIdent image {path!r} has unsupported shape {arr.shape}")
        arr = arr[:, :, :3]
        if np.issubdtype(arr.dtype, np.floating):   # PNG through matplotlib: floats in [0, 1]
            u8 = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        else:
            u8 = arr.astype(np.uint8)
        t = torch.from_numpy(np.ascontiguousarray(u8.transpose(2, 0, 1)))
        if self.image_dtype == torch.uint8:
            return t
        return t.to(self.image_dtype) / 255.0

    def load_images(self, indices) -> torch.Tensor:
        """The images of ``indices`` stacked into (B, 3, H, W)."""
        idx = torch.as_tensor(indices).reshape(-1).tolist()
        return torch.stack([self.load_image(int(i)) for i in idx])

    def __getitem__(self, index: int):
        return self.load_image(index), self.latents[index]

    # ------------------------------------------------------------------ matching

    def nearest_indices(self, query: torch.Tensor,
                        exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row of the nearest rendered latent (exact L2 on ``latent_dims``) for each query row.

        Args:
            query: (B, d) latents, d = ``len(latent_dims)``.
            exclude: optional (B,) row indices; query ``b`` never returns ``exclude[b]`` (the
                official rule for z~: second nearest when the nearest is z's own row).

        Returns an int64 (B,) tensor on ``query``'s device. Computed on the CPU in float64, in
        chunks of at most ``chunk_elements`` query x reference distances; exact ties go to the
        lowest row index.
        """
        d = self.latents.shape[1]
        if not torch.is_tensor(query) or query.dim() != 2 or query.shape[1] != d:
            shape = tuple(query.shape) if torch.is_tensor(query) else type(query).__name__
            raise ValueError(f"query must be a tensor of shape (batch, {d}), got {shape}")
        n = self._ref.shape[0]
        if exclude is not None:
            exclude = torch.as_tensor(exclude).reshape(-1).to("cpu", torch.int64)
            if exclude.shape[0] != query.shape[0]:
                raise ValueError(f"exclude has {exclude.shape[0]} entries for "
                                 f"{query.shape[0]} queries")
            if n < 2:
                raise ValueError("excluding a row needs at least 2 rendered latents")
        q = query.detach().to("cpu", torch.float64)
        q_sq = (q * q).sum(1)
        out = torch.empty(q.shape[0], dtype=torch.int64)
        rows = max(1, min(q.shape[0], self.chunk_elements // max(1, min(n, self.chunk_elements))))
        cols = max(1, min(n, self.chunk_elements // rows))
        for q0 in range(0, q.shape[0], rows):
            qc, qs = q[q0:q0 + rows], q_sq[q0:q0 + rows]
            best = torch.full((qc.shape[0],), math.inf, dtype=torch.float64)
            arg = torch.zeros(qc.shape[0], dtype=torch.int64)
            ex = None if exclude is None else exclude[q0:q0 + rows]
            for c0 in range(0, n, cols):
                ref = self._ref[c0:c0 + cols]
                dist = qs[:, None] - 2.0 * (qc @ ref.T) + self._ref_sq[c0:c0 + cols][None, :]
                if ex is not None:
                    local = ex - c0
                    hit = (local >= 0) & (local < ref.shape[0])
                    if bool(hit.any()):
                        r = torch.nonzero(hit).squeeze(1)
                        dist[r, local[r]] = math.inf
                val, pos = dist.min(1)
                better = val < best
                best = torch.where(better, val, best)
                arg = torch.where(better, pos + c0, arg)
            out[q0:q0 + rows] = arg
        return out.to(query.device)

    def sample_pair_indices(self, batch: int, space, *, generator: Optional[torch.Generator] = None,
                            **pair_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(i, i~)`` of one batch of positive pairs, the official way.

        Draws ``(z, z~) = space.sample_pair(batch, **pair_kwargs, generator=generator)`` on the
        CPU (``space`` is a :class:`fastipirm.data.latents.LatentSpace` of dimension
        ``len(latent_dims)``; the official 3DIdent run with box latents uses
        ``LatentSpace("box", 10, -1.0, 1.0)``, a uniform marginal and a Normal conditional with
        ``conditional_param`` = ``--sigma`` = 0.1), then ``i = nearest(z)`` and
        ``i~ = nearest(z~)`` excluding ``i``. The pair's latents are ``self.latents[i]``,
        ``self.latents[i~]`` and its images ``load_images(i)``, ``load_images(i~)``.
        """
        d = self.latents.shape[1]
        if space.n != d:
            raise ValueError(f"latent space has dimension {space.n} but the data set uses {d} "
                             f"latent columns {self.latent_dims}")
        z, zt = space.sample_pair(batch, generator=generator, device="cpu", **pair_kwargs)
        i = self.nearest_indices(z)
        return i, self.nearest_indices(zt, exclude=i)

    def __repr__(self) -> str:
        return (f"ThreeDIdent(folder={self.folder!r}, n={len(self)}, "
                f"latent_dims={self.latent_dims})")


#: per-channel mean and std of the 3DIdent images (the official training transform normalises
#: with these after scaling to [0, 1])
IMAGE_MEAN = (0.3292, 0.3278, 0.3215)
IMAGE_STD = (0.0778, 0.0776, 0.0771)
#: the latent parametrisations of the official ``main_3dident.py``
LATENT_KINDS = ("box", "periodic")
#: columns of the object position (the non-periodic latents of the "periodic" parametrisation)
POSITION_DIMS = 3


class ThreeDIdentPairs:
    """The CL-ICA pair source of 3DIdent (``data.name = "threedident"``): the official
    ``ThreeDIdentDataset`` as a batch sampler.

    Every batch samples ``(z, z~)`` in the latent space and takes the nearest rendered latents
    and their images (:meth:`ThreeDIdent.sample_pair_indices`). The latent space is

    - ``kind="box"`` (official ``--non-periodic-rotation-and-color``, the paper's headline
      setting): every used column in the box ``[box_min, box_max]`` (official [-1, 1]), uniform
      marginal, conditional ``conditional`` (``"normal"``, ``"laplace"``, ``"gennorm"``) with
      scale ``sigma`` truncated to the box;
    - ``kind="periodic"``: the first :data:`POSITION_DIMS` columns as above, the remaining ones
      a point on the unit sphere (rotations and hues), uniform marginal and a von Mises-Fisher
      conditional with ``kappa = 1 / sigma``. This needs the data set rendered with that
      parametrisation (one more latent column than the box release).

    Images are scaled to [0, 1] and normalised with :data:`IMAGE_MEAN`/:data:`IMAGE_STD`, as
    the official transform, and put on ``device``; the matching and the loading run on the CPU
    (``workers`` threads decode the PNG files of a batch).
    """

    raw_scores = False          # images: a linear fit of raw pixels says nothing

    def __init__(self, dataset: ThreeDIdent, *, kind: str = "box", conditional: str = "normal",
                 conditional_p: Optional[float] = None, sigma: float = 0.1,
                 box_min: float = -1.0, box_max: float = 1.0, normalize: bool = True,
                 device="cpu", workers: int = 4):
        from .latents import LatentSpace

        if kind not in LATENT_KINDS:
            raise ValueError(f"kind must be one of {LATENT_KINDS}, got {kind!r}")
        if conditional not in ("normal", "laplace", "gennorm"):
            raise ValueError(f"conditional must be normal, laplace or gennorm, got "
                             f"{conditional!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        d = dataset.latents.shape[1]
        self.dataset, self.kind, self.sigma = dataset, kind, float(sigma)
        self.conditional, self.conditional_p = conditional, conditional_p
        self.normalize, self.workers = normalize, max(1, int(workers))
        self.device = torch.device(device)
        if kind == "box":
            self.non_periodic = d
            self.box = LatentSpace("box", d, box_min, box_max)
            self.sphere = None
        else:
            if d < POSITION_DIMS + 2:
                raise ValueError(f"the periodic parametrisation needs {POSITION_DIMS} position "
                                 f"columns and at least 2 sphere columns; the data set uses "
                                 f"{d} latent columns {dataset.latent_dims}")
            self.non_periodic = POSITION_DIMS
            self.box = LatentSpace("box", POSITION_DIMS, box_min, box_max)
            self.sphere = LatentSpace("sphere", d - POSITION_DIMS)
        self.n = d

    @property
    def generator_device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device) -> "ThreeDIdentPairs":
        self.device = torch.device(device)
        return self

    def _sample(self, batch: int, generator: torch.Generator, pair: bool):
        """Latents (z, z~ or None) in the space, on the CPU."""
        z = self.box.sample_marginal(batch, generator=generator, device="cpu")
        zt = None
        if pair:
            zt = self.box.sample_conditional(z, self.conditional, self.sigma, self.conditional_p,
                                             generator=generator)
        if self.sphere is not None:
            s = self.sphere.sample_marginal(batch, generator=generator, device="cpu")
            z = torch.cat([z, s], 1)
            if pair:
                st = self.sphere.sample_conditional(s, "vmf", 1.0 / self.sigma,
                                                    generator=generator)
                zt = torch.cat([zt, st], 1)
        return z, zt

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of ``rows`` as float32 (B, 3, H, W) on the device, normalised."""
        from .imagefolder import run_threads

        idx = rows.tolist()
        imgs: list = [None] * len(idx)

        def work(k: int) -> None:
            imgs[k] = self.dataset.load_image(idx[k])

        run_threads(work, len(idx), self.workers)
        x = torch.stack(imgs).to(self.device, non_blocking=True)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.normalize:
            mean = torch.tensor(IMAGE_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGE_STD, device=self.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def pair_batch(self, batch: int, generator: torch.Generator):
        """``(z, x, x~)``: the rendered latents of the anchors and both images."""
        z, zt = self._sample(batch, generator, pair=True)
        i = self.dataset.nearest_indices(z)
        it = self.dataset.nearest_indices(zt, exclude=i)
        return (self.dataset.latents[i].to(self.device), self.images(i), self.images(it))

    def eval_batch(self, batch: int, generator: torch.Generator):
        """``(x, z)`` of ``batch`` anchors drawn as in training (the official scores the codes
        of fresh training samples)."""
        z, _ = self._sample(batch, generator, pair=False)
        i = self.dataset.nearest_indices(z)
        return self.images(i), self.dataset.latents[i].to(self.device)
