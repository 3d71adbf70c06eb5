"""3DIdent reader: published layout, lazy PNG images, exact chunked nearest-latent matching."""
import os

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fastipirm.data.latents import LatentSpace
from fastipirm.data.threedident import ZENODO_URL, ThreeDIdent, image_name

N = 30


def write_split(folder, n=N, seed=0, n_images=None, size=8, render=True):
    """A split in the published format: raw_latents.npy, latents.npy, images/<padded>.png."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    raw = rng.uniform(-1, 1, (n, 10)).astype(np.float64)
    np.save(os.path.join(folder, "raw_latents.npy"), raw)
    if render:
        np.save(os.path.join(folder, "latents.npy"), raw * 3)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    width = len(str(n - 1)) if n_images is None else None
    for i in range(n if n_images is None else n_images):
        name = f"{i:0{width}d}.png" if width else image_name(i, n)
        mpimg.imsave(os.path.join(folder, "images", name), images[i % n])
    return raw, images


def test_image_names_padding():
    assert image_name(7, 30) == "07.png"
    assert image_name(7, 250000) == "000007.png"
    assert image_name(24999, 25000) == "24999.png"
    assert image_name(999, 1000) == "999.png"
    assert image_name(5, 100) == "05.png"


def test_loads_latents_and_images(tmp_path):
    raw, images = write_split(str(tmp_path / "trainset"))
    ds = ThreeDIdent(str(tmp_path), "train")
    assert ds.folder == str(tmp_path / "trainset")
    assert len(ds) == N
    assert ds.latents.dtype == torch.float32 and ds.latents.shape == (N, 10)
    torch.testing.assert_close(ds.latents, torch.from_numpy(raw).float())
    torch.testing.assert_close(ds.render_latents, torch.from_numpy(raw * 3).float())
    assert ds.image_path(3) == str(tmp_path / "trainset" / "images" / "03.png")
    x, z = ds[5]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(images[5]).permute(2, 0, 1))
    assert torch.equal(z, ds.latents[5])
    batch = ds.load_images(torch.tensor([0, 29]))
    assert batch.shape == (2, 3, 8, 8)
    assert torch.equal(batch[1], torch.from_numpy(images[29]).permute(2, 0, 1))
    f = ThreeDIdent(str(tmp_path / "trainset"), image_dtype=torch.float32)
    xf = f.load_image(5)
    assert xf.dtype == torch.float32
    torch.testing.assert_close(xf, x.float() / 255)


def test_latent_dims_and_no_render_latents(tmp_path):
    raw, _ = write_split(str(tmp_path), render=False)
    ds = ThreeDIdent(str(tmp_path), latent_dims=[3, 4, 5, 6])
    assert ds.render_latents is None
    torch.testing.assert_close(ds.latents, torch.from_numpy(raw[:, 3:7]).float())
    with pytest.raises(ValueError, match="latent_dims"):
        ThreeDIdent(str(tmp_path), latent_dims=[10])


def brute_force(ref, q, exclude=None):
    d = ((q.double()[:, None, :] - ref.double()[None]) ** 2).sum(-1)
    if exclude is not None:
        d[torch.arange(len(q)), exclude] = float("inf")
    return d.argmin(1)


@pytest.mark.parametrize("chunk", [1 << 22, 7, 1, 64])
def test_nearest_matches_brute_force(tmp_path, seed, chunk):
    write_split(str(tmp_path), seed=seed % 1000)
    ds = ThreeDIdent(str(tmp_path), chunk_elements=chunk)
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(53, 10, generator=g) * 2 - 1
    got = ds.nearest_indices(q)
    assert got.dtype == torch.int64 and got.shape == (53,)
    assert torch.equal(got, brute_force(ds.latents, q)), f"seed {seed}"
    # exact hits find their own row; exclusion never returns the excluded row
    own = ds.nearest_indices(ds.latents)
    assert torch.equal(own, torch.arange(N)), f"seed {seed}"
    ex = ds.nearest_indices(ds.latents, exclude=own)
    assert torch.equal(ex, brute_force(ds.latents, ds.latents, own)), f"seed {seed}"
    assert not torch.any(ex == own), f"seed {seed}"


def test_chunking_does_not_change_results(tmp_path, seed):
    write_split(str(tmp_path), seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(40, 10, generator=g) * 2 - 1
    exclude = torch.randint(0, N, (40,), generator=g)
    results = [ThreeDIdent(str(tmp_path), chunk_elements=c).nearest_indices(q, exclude)
               for c in (1, 3, 30, 31, 1000, 1 << 22)]
    for r in results[1:]:
        assert torch.equal(r, results[0]), f"seed {seed}"


def test_sample_pair_indices(tmp_path, seed):
    write_split(str(tmp_path), seed=seed % 1000)
    ds = ThreeDIdent(str(tmp_path))
    space = LatentSpace("box", 10, -1.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    i, it = ds.sample_pair_indices(16, space, generator=g, conditional_param=0.1)
    assert i.shape == it.shape == (16,) and i.dtype == torch.int64
    assert not torch.any(i == it), f"seed {seed}"
    z, zt = space.sample_pair(16, conditional_param=0.1,
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(i, brute_force(ds.latents, z)), f"seed {seed}"
    assert torch.equal(it, brute_force(ds.latents, zt, i)), f"seed {seed}"
    with pytest.raises(ValueError, match="dimension 4"):
        ds.sample_pair_indices(2, LatentSpace("box", 4))


def check_error(exc, *names):
    msg = str(exc.value)
    for name in names:
        assert name in msg, msg
    assert ZENODO_URL in msg and "README" in msg, msg


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        ThreeDIdent(str(tmp_path), "test")
    check_error(exc, str(tmp_path / "test"), str(tmp_path / "testset"))
    with pytest.raises(FileNotFoundError) as exc:
        ThreeDIdent(str(tmp_path / "nowhere"))
    check_error(exc, str(tmp_path / "nowhere"))


def test_missing_raw_latents(tmp_path):
    write_split(str(tmp_path))
    os.remove(tmp_path / "raw_latents.npy")
    with pytest.raises(FileNotFoundError) as exc:
        ThreeDIdent(str(tmp_path))
    check_error(exc, str(tmp_path / "raw_latents.npy"))


def test_missing_image_folder_and_image(tmp_path):
    write_split(str(tmp_path))
    os.remove(tmp_path / "images" / "17.png")
    with pytest.raises(FileNotFoundError) as exc:
        ThreeDIdent(str(tmp_path))
    check_error(exc, str(tmp_path / "images" / "17.png"))
    # without the up-front check the lazy read still names the file
    ds = ThreeDIdent(str(tmp_path), check_images=False)
    with pytest.raises(FileNotFoundError) as exc:
        ds.load_image(17)
    check_error(exc, str(tmp_path / "images" / "17.png"))
    for f in os.listdir(tmp_path / "images"):
        os.remove(tmp_path / "images" / f)
    os.rmdir(tmp_path / "images")
    with pytest.raises(FileNotFoundError) as exc:
        ThreeDIdent(str(tmp_path))
    check_error(exc, str(tmp_path / "images"))


def test_mismatched_counts(tmp_path):
    write_split(str(tmp_path), n=N, n_images=N + 3)   # three extra images (30.png ... 32.png)
    with pytest.raises(ValueError) as exc:
        ThreeDIdent(str(tmp_path))
    check_error(exc, str(tmp_path / "images"), "33 PNG files", f"{N} rows")
    # fewer images than latents: the first missing one is named
    other = tmp_path / "other"
    write_split(str(other), n=N, n_images=N - 4)
    with pytest.raises(FileNotFoundError) as exc:
        ThreeDIdent(str(other))
    check_error(exc, str(other / "images" / "26.png"), "4 of 30")
    # latents.npy with another row count
    np.save(tmp_path / "latents.npy", np.zeros((N - 1, 10)))
    with pytest.raises(ValueError, match="latents.npy"):
        ThreeDIdent(str(tmp_path), check_images=False)
