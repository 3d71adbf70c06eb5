"""KITTI Masks (Klindt et al. 2021, used by CL-ICA): pedestrian masks with temporal positive pairs.

The published file is ``kitti_peds_v2.pickle`` (Zenodo record 3931823, :data:`URL`); it is not
downloaded here: put it at ``root/kitti_peds_v2.pickle``. It is a pickled dict with

- ``"pedestrians"``: one array per tracked pedestrian sequence, shape (T_s, 64, 64), binary masks
  (bool or 0/1 values) in temporal order;
- ``"pedestrians_latents"``: one array per sequence, shape (T_s, 3): centre of mass vertical
  position, centre of mass horizontal position and mask area of each frame.

Index semantics (as in the reference loader): an index ``i`` in ``range(len(dataset))`` is an
*anchor*, a frame that is not the last one of its sequence. Sequence ``s`` contributes T_s - 1
anchors, in file order, so sequences of length 1 contribute none and are never sampled (their
frames are still kept in :attr:`KittiMasks.frames`). The positive partner of an anchor at position
t of its sequence is the frame at ``min(t + k, T_s - 1)`` with k drawn uniformly from
1..``max_delta_t``: always later in time (never the anchor itself), and the draws that would run
past the end of the sequence land on its last frame.

Loading: ``pickle`` runs code chosen by whoever wrote the file. By default the file is read with
the restricted unpickler of :mod:`fastipirm.data.cifar`, which only builds NumPy arrays and plain
containers; ``trusted=True`` uses plain :func:`pickle.load` and assumes the file is your own
download of the published data. Missing files raise ``FileNotFoundError`` (naming the path and the
URL) and malformed ones ``ValueError`` (naming the file and the offending key or sequence).
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cifar import ArrayUnpickler

FILENAME = "kitti_peds_v2.pickle"
URL = "https://zenodo.org/record/3931823/files/kitti_peds_v2.pickle"
FRAMES_KEY = "pedestrians"
LATENTS_KEY = "pedestrians_latents"
LATENT_NAMES = ("com_vertical", "com_horizontal", "area")


def _read_pickle(path: Path, trusted: bool) -> object:
    try:
        with open(path, "rb") as f:
            if trusted:
                return pickle.load(f, encoding="latin1")
            return ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        hint = "" if trusted else " (if you trust the file, pass trusted=True)"
        raise ValueError(f"{path}: not a readable KITTI Masks pickle ({exc}){hint}") from exc
    except Exception as exc:  # truncated or otherwise unreadable file
        raise ValueError(f"{path}: not a readable KITTI Masks pickle "
                         f"({type(exc).__name__}: {exc})") from exc


def _as_sequences(obj: dict, key: str, path: Path) -> list:
    if key not in obj:
        raise ValueError(f"{path}: missing key {key!r} (expected a dict with keys "
                         f"{FRAMES_KEY!r} and {LATENTS_KEY!r}; found {sorted(map(str, obj))})")
    value = obj[key]
    try:
        return list(value)  # a list, or an object/stacked array, of per-sequence arrays
    except TypeError:
        raise ValueError(f"{path}: {key!r} must be a sequence of per-sequence arrays, got "
                         f"{type(value).__name__}") from None


def load_kitti_masks(root: str | Path, *, trusted: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``root/kitti_peds_v2.pickle`` into (frames, latents, sequence_lengths).

    frames: uint8 (N, H, W) with values 0/1, every sequence concatenated in file order.
    latents: float64 (N, L) (L = 3 in the published file), rows aligned with ``frames``.
    sequence_lengths: int64 (S,), the length T_s of each sequence.
    """
    path = Path(root) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"KITTI Masks file not found: {path}. Download it from {URL} "
                                f"(Zenodo record 3931823) and put it there.")
    obj = _read_pickle(path, trusted)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict with keys {FRAMES_KEY!r} and "
                         f"{LATENTS_KEY!r}, got {type(obj).__name__}")
    seqs = _as_sequences(obj, FRAMES_KEY, path)
    lats = _as_sequences(obj, LATENTS_KEY, path)
    if len(seqs) != len(lats):
        raise ValueError(f"{path}: {len(seqs)} sequences under {FRAMES_KEY!r} but {len(lats)} "
                         f"under {LATENTS_KEY!r}")
    if not seqs:
        raise ValueError(f"{path}: {FRAMES_KEY!r} holds no sequences")

    frames, latents, lengths = [], [], []
    hw = None
    n_lat = None
    for s, (seq, lat) in enumerate(zip(seqs, lats)):
        seq = np.asarray(seq)
        lat = np.asarray(lat)
        if seq.ndim != 3 or seq.shape[0] == 0:
            raise ValueError(f"{path}: {FRAMES_KEY!r}[{s}] must be a non-empty (T, H, W) array "
                             f"of masks, got shape {seq.shape}")
        if hw is None:
            hw = seq.shape[1:]
        elif seq.shape[1:] != hw:
            raise ValueError(f"{path}: {FRAMES_KEY!r}[{s}] has frames of size {seq.shape[1:]}, "
                             f"sequence 0 has {hw}")
        if seq.dtype != np.bool_:
            if not (np.issubdtype(seq.dtype, np.integer) or np.issubdtype(seq.dtype, np.floating)):
                raise ValueError(f"{path}: {FRAMES_KEY!r}[{s}] has dtype {seq.dtype}, expected "
                                 f"binary masks")
            if not np.all((seq == 0) | (seq == 1)):
                raise ValueError(f"{path}: {FRAMES_KEY!r}[{s}] holds values other than 0 and 1; "
                                 f"expected binary masks")
        if lat.ndim == 1:
            lat = lat[:, None]
        if lat.ndim != 2 or lat.shape[0] != seq.shape[0]:
            raise ValueError(f"{path}: {LATENTS_KEY!r}[{s}] has shape {lat.shape}, expected "
                             f"({seq.shape[0]}, n_latents) to match {FRAMES_KEY!r}[{s}]")
        if n_lat is None:
            n_lat = lat.shape[1]
        elif lat.shape[1] != n_lat:
            raise ValueError(f"{path}: {LATENTS_KEY!r}[{s}] has {lat.shape[1]} latents, "
                             f"sequence 0 has {n_lat}")
        frames.append(seq.astype(np.uint8))
        latents.append(lat.astype(np.float64))
        lengths.append(seq.shape[0])
    return (np.ascontiguousarray(np.concatenate(frames)), np.concatenate(latents),
            np.asarray(lengths, dtype=np.int64))


class KittiMasks(torch.utils.data.Dataset):
    """KITTI Masks in memory, indexed by anchor frame (see the module docstring).

    ``dataset[i]`` -> (frame, latents): frame float32 (1, H, W) with values 0/1 (the reference
    loader's scaling), latents float64 (L,), for anchor ``i``.
    :meth:`pair_indices` draws positive partners as frame rows; :meth:`frames_at` and
    :attr:`latents` turn rows into tensors, and :meth:`sample_pairs` does both for a batch.

    Attributes: ``frames`` uint8 (N, H, W) 0/1 and ``latents`` float64 (N, L), every frame of every
    sequence in file order; ``sequence_lengths`` (S,) and ``sequence_starts`` (S,) (first row of
    each sequence); ``frame_sequence`` (N,) the sequence of each row; ``anchor_rows`` (len,) the
    frame row of each anchor and ``anchor_last_rows`` (len,) the last row of its sequence.
    """

    def __init__(self, root: str | Path = "data/kitti", max_delta_t: int = 5, *,
                 trusted: bool = False):
        if isinstance(max_delta_t, bool) or not isinstance(max_delta_t, (int, np.integer)) \
                or max_delta_t < 1:
            raise ValueError(f"max_delta_t must be an integer >= 1, got {max_delta_t!r}")
        self.max_delta_t = int(max_delta_t)
        self.path = Path(root) / FILENAME
        frames, latents, lengths = load_kitti_masks(root, trusted=trusted)
        self.frames = torch.from_numpy(frames)
        self.latents = torch.from_numpy(latents)
        self.sequence_lengths = torch.from_numpy(lengths)
        self.sequence_starts = torch.cumsum(self.sequence_lengths, 0) - self.sequence_lengths
        self.frame_sequence = torch.repeat_interleave(
            torch.arange(len(lengths)), self.sequence_lengths)
        # Every frame but the last of its sequence is an anchor, in file order.
        last_rows = self.sequence_starts + self.sequence_lengths - 1
        is_anchor = torch.ones(len(frames), dtype=torch.bool)
        is_anchor[last_rows] = False
        self.anchor_rows = torch.nonzero(is_anchor).flatten()
        self.anchor_last_rows = last_rows[self.frame_sequence[self.anchor_rows]]
        if len(self.anchor_rows) == 0:
            raise ValueError(f"{self.path}: every sequence has length 1, so there are no "
                             f"frame pairs")

    def __len__(self) -> int:
        return len(self.anchor_rows)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.frames.shape[1], self.frames.shape[2]

    def frames_at(self, rows: torch.Tensor) -> torch.Tensor:
        """Frame rows -> float32 (len(rows), 1, H, W) with values 0/1."""
        return self.frames[rows].unsqueeze(-3).to(torch.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} anchors")
        row = self.anchor_rows[index]
        return self.frames[row].unsqueeze(0).to(torch.float32), self.latents[row]

    def _anchor_index(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long)
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"anchor indices must lie in [0, {n}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        return idx

    def pair_indices(self, indices, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Anchor indices -> frame rows of their positive partners (same shape, int64).

        Partner of an anchor at row r: ``min(r + k, last row of its sequence)``, k uniform in
        1..max_delta_t, drawn with ``generator`` (reproducible for a seeded generator).
        """
        idx = self._anchor_index(indices)
        steps = torch.randint(1, self.max_delta_t + 1, idx.shape, generator=generator)
        return torch.minimum(self.anchor_rows[idx] + steps, self.anchor_last_rows[idx])

    def sample_pairs(self, batch_size: int, generator: Optional[torch.Generator] = None):
        """Draw anchors uniformly (with replacement) and their partners.

        Returns (x, x_pos, z, z_pos): float32 (B, 1, H, W) frames 0/1 and float64 (B, L) latents.
        """
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        rows = self.anchor_rows[idx]
        partners = self.pair_indices(idx, generator)
        return (self.frames_at(rows), self.frames_at(partners), self.latents[rows],
                self.latents[partners])


#: the official training transform: a rotation by exactly this many degrees (torchvision
#: ``RandomAffine(degrees=(2, 2))``), a translation of up to this fraction of the size per axis,
#: then a horizontal flip with probability 1/2; both frames of a pair get the same draw
AUGMENT_DEGREES = 2.0
AUGMENT_TRANSLATE = 5 / 64.0


def augment_pairs(x: torch.Tensor, x_pos: torch.Tensor, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official KITTI Masks training transform on a batch of pairs, on their device.

    ``x``, ``x_pos``: float (B, 1, H, W). Each pair gets one draw: integer shifts
    ``tx = round(U(-5, 5))`` and ``ty`` (pixels, for 64 px; :data:`AUGMENT_TRANSLATE` of the
    size), and a horizontal flip with probability 1/2 (:func:`affine_pairs`).
    """
    b, _, h, w = x.shape
    shift = torch.rand(b, 2, generator=generator, device=x.device) * 2 - 1
    tx = torch.round(shift[:, 0] * (AUGMENT_TRANSLATE * w))
    ty = torch.round(shift[:, 1] * (AUGMENT_TRANSLATE * h))
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return affine_pairs(x, x_pos, tx, ty, flip)


def affine_pairs(x: torch.Tensor, x_pos: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                 flip: torch.Tensor, degrees: float = AUGMENT_DEGREES
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each pair by ``degrees`` clockwise about the image centre and shift it by
    ``(tx[b], ty[b])`` pixels (nearest-neighbour resampling, zero fill), then mirror the pairs
    with ``flip[b]``; both frames of a pair move together."""
    b, _, h, w = x.shape
    if h != w:
        raise ValueError(f"the KITTI Masks transform takes square frames, got {h} x {w}")
    dev = x.device
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # output -> input map in normalised coordinates (y down): p_in = R^-1 (p_out - t)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin
    theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
    t = torch.stack([tx * 2 / w, ty * 2 / h], 1).to(x.dtype)
    theta[:, :, 2] = -(theta[:, :, :2] @ t.unsqueeze(-1)).squeeze(-1)
    grid = torch.nn.functional.affine_grid(theta, [b, 2, h, w], align_corners=False)
    both = torch.nn.functional.grid_sample(torch.cat([x, x_pos], 1), grid, mode="nearest",
                                           padding_mode="zeros", align_corners=False)
    both = torch.where(flip.view(b, 1, 1, 1), both.flip(-1), both)
    return both[:, :1], both[:, 1:]


class KittiPairs:
    """The CL-ICA pair source of KITTI Masks (``data.name = "kitti_masks"``): each batch draws
    ``batch`` anchors uniformly with replacement, their forward partners
    (:meth:`KittiMasks.pair_indices`' rule) and, with ``augment``, the official training
    transform (:func:`augment_pairs`). Everything lives and is drawn on ``device``. The scores use
    un-augmented anchor frames drawn without replacement (the evaluation's sampler).
    """

    raw_scores = False

    def __init__(self, dataset: KittiMasks, *, augment: bool = True, device="cpu"):
        self.dataset, self.augment = dataset, augment
        self.n = dataset.latents.shape[1]
        self.to(device)

    def to(self, device) -> "KittiPairs":
        self.device = torch.device(device)
        d = self.dataset
        self._frames = d.frames.to(self.device)
        self._latents = d.latents.to(self.device, torch.float32)
        self._anchor_rows = d.anchor_rows.to(self.device)
        self._last_rows = d.anchor_last_rows.to(self.device)
        return self

    @property
    def generator_device(self) -> torch.device:
        return self.device

    def _frames_at(self, rows: torch.Tensor) -> torch.Tensor:
        return self._frames[rows].unsqueeze(1).to(torch.float32)

    def pair_batch(self, batch: int, generator: torch.Generator):
        """``(z, x, x~)``: the anchors' latents (com vertical, com horizontal, area) and both
        frames, float32 (B, 1, H, W) with values in [0, 1]."""
        idx = torch.randint(0, len(self.dataset), (batch,), generator=generator,
                            device=self.device)
        steps = torch.randint(1, self.dataset.max_delta_t + 1, (batch,), generator=generator,
                              device=self.device)
        rows = self._anchor_rows[idx]
        partners = torch.minimum(rows + steps, self._last_rows[idx])
        x, x_pos = self._frames_at(rows), self._frames_at(partners)
        if self.augment:
            x, x_pos = augment_pairs(x, x_pos, generator)
        return self._latents[rows], x, x_pos

    def eval_batch(self, batch: int, generator: torch.Generator):
        """``(x, z)`` of ``min(batch, anchors)`` distinct anchor frames, un-augmented."""
        n = len(self.dataset)
        idx = torch.randperm(n, generator=generator, device=self.device)[:min(batch, n)]
        rows = self._anchor_rows[idx]
        return self._frames_at(rows), self._latents[rows]
