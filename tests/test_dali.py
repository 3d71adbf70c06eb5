"""DALI two-view pipeline on the CPU (device_id=None): bookkeeping, determinism, statistics.

Augmentation statistics are compared with the batched torch pipeline (TwoViewAugment) on images
that encode their pixel coordinates in the colour channels, so crop boxes, flips and grayscale
can be read back from the output.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")

from fastipirm.data.augment import CIFAR10_MEAN, CIFAR10_STD, TwoViewAugment  # noqa: E402
from fastipirm.data.dali import DaliTwoViewLoader, dali_available, image_folder_files  # noqa: E402
from fastipirm.data.loader import epoch_permutation  # noqa: E402

NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def random_images(n, size=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def denormalise(views: torch.Tensor) -> torch.Tensor:
    """Back to [0, 255] pixel values, NCHW float."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (views.float() * std + mean) * 255.0


def coordinate_images(n, size=48):
    """R encodes x, G encodes y, B a constant: crop boxes and flips can be read back."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    img = np.stack([np.broadcast_to(ramp[None, :], (size, size)),
                    np.broadcast_to(ramp[:, None], (size, size)),
                    np.full((size, size), 60.0, np.float32)], -1)
    return np.repeat(img[None].round().astype(np.uint8), n, 0)


def crop_area_and_flip(views: torch.Tensor, size: int):
    px = denormalise(views)
    r, g = px[:, 0], px[:, 1]
    width = (r.amax((1, 2)) - r.amin((1, 2))) / 255.0 * (size - 1) + 1
    height = (g.amax((1, 2)) - g.amin((1, 2))) / 255.0 * (size - 1) + 1
    area = (width * height / size ** 2).clamp(max=1.0)
    half = r.shape[-1] // 2
    flipped = r[..., :half].mean((1, 2)) > r[..., half:].mean((1, 2))
    return area, flipped


def test_dali_is_available():
    ok, detail = dali_available()
    assert ok, detail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes_channels_last(dtype):
    loader = DaliTwoViewLoader(random_images(40), 8, seed=1, dtype=dtype, out_size=16)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    idx, v1, v2 = batches[0]
    assert idx.dtype == torch.int64 and idx.shape == (8,)
    for v in (v1, v2):
        assert v.shape == (8, 3, 16, 16) and v.dtype == dtype
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v.float()).all()
    assert not torch.equal(v1, v2), "the two views must be independent draws"


def test_each_index_once_per_epoch_in_loader_order():
    n, b = 50, 16
    loader = DaliTwoViewLoader(random_images(n), b, seed=7, out_size=8)
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        got = torch.cat([i for i, _, _ in loader])
        assert len(got) == (n // b) * b and len(set(got.tolist())) == len(got)
        assert torch.equal(got, epoch_permutation(n, 7, epoch)[:len(got)])
    loader = DaliTwoViewLoader(random_images(n), b, seed=7, out_size=8, drop_last=False)
    assert sorted(torch.cat([i for i, _, _ in loader]).tolist()) == list(range(n))


def test_indices_point_at_their_images():
    n = 30
    imgs = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 8, 12, 1)
    imgs = np.ascontiguousarray(np.repeat(np.repeat(imgs, 12, 2), 3, 3))  # constant image k*8
    loader = DaliTwoViewLoader(imgs, 10, seed=2, out_size=8, **NO_COLOUR)
    for idx, v1, v2 in loader:
        for v in (v1, v2):
            value = denormalise(v).mean((1, 2, 3))
            assert torch.allclose(value, idx.float() * 8, atol=1.0)


def test_deterministic_for_seed_and_epoch():
    imgs = random_images(32)

    def run(seed, epoch):
        loader = DaliTwoViewLoader(imgs, 8, seed=seed, out_size=16)
        loader.set_epoch(epoch)
        return list(loader)

    a, b = run(5, 1), run(5, 1)
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    c = run(5, 2)
    assert not torch.equal(a[0][1], c[0][1])
    d = run(6, 1)
    assert not torch.equal(a[0][1], d[0][1])


def _torch_views(imgs, n_draws, **kw):
    aug = TwoViewAugment(**kw)
    g = torch.Generator().manual_seed(0)
    return aug.view(torch.from_numpy(imgs[:n_draws]), g)


def _dali_views(imgs, **kw):
    loader = DaliTwoViewLoader(imgs, 128, seed=0, **kw)
    return torch.cat([v1 for _, v1, _ in loader] + [v2 for _, _, v2 in loader])


def test_crop_area_and_flip_rate_match_torch_pipeline():
    size, n = 48, 512
    imgs = coordinate_images(n, size)
    area_d, flip_d = crop_area_and_flip(_dali_views(imgs, out_size=24, **NO_COLOUR), size)
    area_t, flip_t = crop_area_and_flip(_torch_views(imgs, n, out_size=24, **NO_COLOUR), size)
    # RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)): mean area fraction about 0.54
    assert abs(area_d.mean() - area_t.mean()) < 0.06, (area_d.mean(), area_t.mean())
    assert 0.4 < area_d.mean() < 0.7 and area_d.min() > 0.05
    assert abs(flip_d.float().mean() - 0.5) < 0.08 and abs(flip_t.float().mean() - 0.5) < 0.08


def test_grayscale_rate_matches():
    n = 512
    imgs = coordinate_images(n, 32)
    kw = dict(out_size=16, jitter_p=0.0, gray_p=0.2, blur_p=0.0, scale=(0.5, 1.0))
    for views in (_dali_views(imgs, **kw), _torch_views(imgs, n, **kw)):
        px = denormalise(views)
        gray = (px.amax(1) - px.amin(1)).amax((1, 2)) < 3.0
        assert abs(gray.float().mean() - 0.2) < 0.06


def colour_statistics(views: torch.Tensor) -> torch.Tensor:
    """Spread of per-image brightness, mean and spread of per-image colourfulness."""
    px = denormalise(views)
    brightness = px.mean((1, 2, 3))
    colourful = (px.amax(1) - px.amin(1)).mean((1, 2))
    return torch.stack([brightness.std(), colourful.mean(), colourful.std()])


def test_full_recipe_colour_statistics_match_torch_pipeline():
    """Jitter + grayscale statistics agree with the torch pipeline within 10 %.

    They are discriminative: without jitter and grayscale the brightness spread halves and the
    colourfulness rises by ~40 % (checked below on the torch pipeline).
    """
    rng = np.random.default_rng(1)
    n, size = 512, 32
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)   # smooth random colour fields
    imgs = np.repeat(np.repeat(base, size // 4, 1), size // 4, 2)
    imgs = np.clip(imgs + rng.normal(0, 12, imgs.shape), 0, 255).astype(np.uint8)
    dali = colour_statistics(_dali_views(imgs, out_size=16))
    torch_ = colour_statistics(_torch_views(imgs, n, out_size=16))
    plain = colour_statistics(_torch_views(imgs, n, out_size=16, jitter_p=0.0, gray_p=0.0))
    assert ((dali - torch_).abs() / torch_).max() < 0.10, (dali, torch_)
    assert ((plain - torch_).abs() / torch_).max() > 0.3, (plain, torch_)


def test_image_folder_source(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for j in range(6):
            arr = rng.integers(0, 256, (20 + j, 18, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "train" / cls / f"{j}.{'png' if j % 2 else 'jpg'}")
    files, labels, classes = image_folder_files(tmp_path, "train")
    assert classes == ["cat", "dog"] and len(files) == 12 and labels.tolist() == [0] * 6 + [1] * 6
    loader = DaliTwoViewLoader(None, 4, seed=0, files=files, out_size=16)
    got = [(i, v1, v2) for i, v1, v2 in loader]
    assert len(got) == 3
    assert sorted(torch.cat([i for i, _, _ in got]).tolist()) == list(range(12))
    assert got[0][1].shape == (4, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_files(tmp_path, "val")


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        DaliTwoViewLoader(np.zeros((4, 8, 8, 3), np.float32), 2, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        DaliTwoViewLoader(random_images(3), 4, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        DaliTwoViewLoader(random_images(8), 4, seed=0, dtype=torch.int8)
