"""KITTI Masks loader: tiny pickles in the published layout (dict of per-sequence arrays)."""
import pickle

import numpy as np
import pytest
import torch

from fastipirm.data.kitti_masks import (FILENAME, FRAMES_KEY, LATENTS_KEY, URL, KittiMasks,
                                        load_kitti_masks)

LENGTHS = (4, 7, 1)


def _write(root, payload):
    with open(root / FILENAME, "wb") as f:
        pickle.dump(payload, f)


def _make(root, lengths=LENGTHS, rng_seed=0, dtype=bool):
    rng = np.random.default_rng(rng_seed)
    seqs = [(rng.random((t, 64, 64)) < 0.3).astype(dtype) for t in lengths]
    lats = [rng.normal(size=(t, 3)) for t in lengths]
    _write(root, {FRAMES_KEY: seqs, LATENTS_KEY: lats})
    return seqs, lats


def _sequence_of_row(ds, rows):
    return ds.frame_sequence[rows]


def test_lengths_frames_and_latents_round_trip(tmp_path):
    seqs, lats = _make(tmp_path)
    ds = KittiMasks(tmp_path, max_delta_t=3)
    assert len(ds) == sum(t - 1 for t in LENGTHS) == 9
    assert ds.num_frames == sum(LENGTHS) and ds.image_size == (64, 64)
    assert ds.sequence_lengths.tolist() == list(LENGTHS)
    assert ds.sequence_starts.tolist() == [0, 4, 11]
    # anchors: every frame but the last of each sequence; the length-1 sequence gives none
    assert ds.anchor_rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    expected = [(s, t) for s, n in enumerate(LENGTHS) for t in range(n - 1)]
    for i, (s, t) in enumerate(expected):
        x, z = ds[i]
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32
        assert torch.equal(x[0], torch.from_numpy(seqs[s][t].astype(np.float32)))
        assert torch.equal(z, torch.from_numpy(lats[s][t]))
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    # every frame, including the last ones and the length-1 sequence, is kept in row order
    assert torch.equal(ds.frames, torch.from_numpy(np.concatenate(seqs).astype(np.uint8)))
    assert torch.equal(ds.latents, torch.from_numpy(np.concatenate(lats)))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_binary_masks_of_any_numeric_dtype(tmp_path, dtype):
    seqs, _ = _make(tmp_path, dtype=dtype)
    frames, _, _ = load_kitti_masks(tmp_path)
    assert frames.dtype == np.uint8 and set(np.unique(frames)) <= {0, 1}
    assert np.array_equal(frames, np.concatenate(seqs).astype(np.uint8))


@pytest.mark.parametrize("max_delta_t", [1, 3, 5, 10])
def test_partners_same_sequence_forward_within_max_delta_t(tmp_path, seed, max_delta_t):
    _make(tmp_path)
    ds = KittiMasks(tmp_path, max_delta_t=max_delta_t)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ds), (5000,), generator=g)
    rows = ds.anchor_rows[idx]
    partners = ds.pair_indices(idx, g)
    assert partners.shape == idx.shape and partners.dtype == torch.int64
    assert torch.equal(_sequence_of_row(ds, rows), _sequence_of_row(ds, partners)), f"seed={seed}"
    offset = partners - rows
    assert int(offset.min()) >= 1 and int(offset.max()) <= max_delta_t, f"seed={seed}"


def test_offset_support_matches_reference(tmp_path, seed):
    """Offset k ~ U{1..max_delta_t}, clipped to the sequence end: every allowed offset appears."""
    _make(tmp_path)
    max_dt = 3
    ds = KittiMasks(tmp_path, max_delta_t=max_dt)
    g = torch.Generator().manual_seed(seed)
    draws = 3000
    for i in range(len(ds)):
        row = int(ds.anchor_rows[i])
        last = int(ds.anchor_last_rows[i])
        partners = ds.pair_indices(torch.full((draws,), i), g)
        offsets, counts = torch.unique(partners - row, return_counts=True)
        allowed = list(range(1, min(max_dt, last - row) + 1))
        assert offsets.tolist() == allowed, f"seed={seed} anchor={i}"
        # clipping piles the mass of the steps past the end onto the last frame
        n_clipped = max_dt - len(allowed) + 1
        expected = torch.tensor([1.0] * (len(allowed) - 1) + [float(n_clipped)]) / max_dt
        freq = counts.double() / draws
        assert torch.allclose(freq, expected.double(), atol=0.05), f"seed={seed} anchor={i}"


def test_length_one_sequences_are_never_anchors_or_partners(tmp_path, seed):
    _make(tmp_path, lengths=(1, 3, 1, 2, 1))
    ds = KittiMasks(tmp_path, max_delta_t=5)
    assert len(ds) == 3 and ds.anchor_rows.tolist() == [1, 2, 5]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ds), (2000,), generator=g)
    partners = ds.pair_indices(idx, g)
    assert set(partners.tolist()) <= {2, 3, 6}, f"seed={seed}"
    assert set(_sequence_of_row(ds, partners).tolist()) <= {1, 3}, f"seed={seed}"


def test_all_sequences_of_length_one_is_an_error(tmp_path):
    _make(tmp_path, lengths=(1, 1))
    with pytest.raises(ValueError, match="no frame pairs"):
        KittiMasks(tmp_path)


def test_reproducible_with_seeded_generator(tmp_path, seed):
    _make(tmp_path)
    ds = KittiMasks(tmp_path, max_delta_t=4)
    idx = torch.arange(len(ds)).repeat(50)
    a = ds.pair_indices(idx, torch.Generator().manual_seed(seed))
    b = ds.pair_indices(idx, torch.Generator().manual_seed(seed))
    assert torch.equal(a, b), f"seed={seed}"
    c = ds.pair_indices(idx, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(a, c), f"seed={seed}"
    pa = ds.sample_pairs(64, torch.Generator().manual_seed(seed))
    pb = ds.sample_pairs(64, torch.Generator().manual_seed(seed))
    for u, v in zip(pa, pb):
        assert torch.equal(u, v), f"seed={seed}"


def test_sample_pairs_shapes_and_consistency(tmp_path, seed):
    _make(tmp_path)
    ds = KittiMasks(tmp_path, max_delta_t=2)
    x, xp, z, zp = ds.sample_pairs(32, torch.Generator().manual_seed(seed))
    assert x.shape == xp.shape == (32, 1, 64, 64) and x.dtype == torch.float32
    assert z.shape == zp.shape == (32, 3) and z.dtype == torch.float64
    # each frame matches its latents' row: find rows by latents (they are distinct normals)
    for frames, lat in ((x, z), (xp, zp)):
        rows = [int(torch.nonzero((ds.latents == v).all(1))[0]) for v in lat]
        assert torch.equal(frames[:, 0], ds.frames[rows].float()), f"seed={seed}"


def test_pair_indices_rejects_out_of_range(tmp_path):
    _make(tmp_path)
    ds = KittiMasks(tmp_path)
    with pytest.raises(IndexError):
        ds.pair_indices(torch.tensor([0, len(ds)]))
    with pytest.raises(IndexError):
        ds.pair_indices(torch.tensor([-1]))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_max_delta_t(tmp_path, bad):
    _make(tmp_path)
    with pytest.raises(ValueError, match="max_delta_t"):
        KittiMasks(tmp_path, max_delta_t=bad)


def test_missing_file_names_path_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        KittiMasks(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / FILENAME) in msg and URL in msg


@pytest.mark.parametrize("key", [FRAMES_KEY, LATENTS_KEY])
def test_missing_key_names_the_key(tmp_path, key):
    seqs, lats = _make(tmp_path)
    payload = {FRAMES_KEY: seqs, LATENTS_KEY: lats}
    del payload[key]
    _write(tmp_path, payload)
    with pytest.raises(ValueError, match=repr(key)) as err:
        KittiMasks(tmp_path)
    assert str(tmp_path / FILENAME) in str(err.value)


def test_malformed_contents(tmp_path):
    seqs, lats = _make(tmp_path)
    cases = [
        ([1, 2, 3], "expected a pickled dict"),
        ({FRAMES_KEY: seqs, LATENTS_KEY: lats[:2]}, "3 sequences"),
        ({FRAMES_KEY: seqs, LATENTS_KEY: [lats[0], lats[1][:3], lats[2]]}, r"\[1\] has shape"),
        ({FRAMES_KEY: [seqs[0] * 255] + seqs[1:], LATENTS_KEY: lats}, "other than 0 and 1"),
        ({FRAMES_KEY: [seqs[0][:, :32]] + seqs[1:], LATENTS_KEY: lats}, "frames of size"),
        ({FRAMES_KEY: [seqs[0][:0]] + seqs[1:], LATENTS_KEY: [lats[0][:0]] + lats[1:]},
         "non-empty"),
        ({FRAMES_KEY: [], LATENTS_KEY: []}, "no sequences"),
    ]
    for payload, pattern in cases:
        _write(tmp_path, payload)
        with pytest.raises(ValueError, match=pattern):
            KittiMasks(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_globals_unless_trusted(tmp_path):
    seqs, lats = _make(tmp_path)
    _write(tmp_path, {FRAMES_KEY: seqs, LATENTS_KEY: lats, "extra": _Evil()})
    with pytest.raises(ValueError, match="trusted=True"):
        KittiMasks(tmp_path)
    ds = KittiMasks(tmp_path, trusted=True)  # plain pickle: the caller vouches for the file
    assert len(ds) == 9


def test_truncated_file(tmp_path):
    _make(tmp_path)
    data = (tmp_path / FILENAME).read_bytes()
    (tmp_path / FILENAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        KittiMasks(tmp_path)
