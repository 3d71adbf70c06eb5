"""CL-ICA on image data: 3DIdent's and KITTI Masks' pair sources, encoders, the periodic loss
and short ``fastipirm train`` runs on files the tests write in the published formats."""
import math
import os
import pickle

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fastipirm import train as trainmod
from fastipirm.config import load_config
from fastipirm.data.kitti_masks import (FILENAME, FRAMES_KEY, LATENTS_KEY, KittiMasks,
                                        KittiPairs, affine_pairs, augment_pairs)
from fastipirm.data.threedident import IMAGE_MEAN, IMAGE_STD, ThreeDIdent, ThreeDIdentPairs
from fastipirm.models.clica_image_encoders import KittiConvEncoder, ResNetLatentEncoder
from fastipirm.models.resnet import resnet18
from test_clica_method import official_clica_loss


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def write_threedident(folder, n=48, size=32, columns=10, periodic=False, seed=0):
    """A split in the published layout: raw_latents.npy and images/<zero-padded>.png."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"))
    raw = rng.uniform(-1, 1, (n, columns))
    if periodic:                                   # rotations and hues on the unit sphere
        raw[:, 3:] /= np.linalg.norm(raw[:, 3:], axis=1, keepdims=True)
    np.save(os.path.join(folder, "raw_latents.npy"), raw)
    # images that depend on the latents, so a short run has something to learn
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.stack([np.clip(0.5 + 0.5 * raw[i, c] * np.cos(3 * xx + c * yy), 0, 1)
                        for c in range(3)], -1)
        mpimg.imsave(os.path.join(folder, "images", f"{i:02d}.png"), img)
    return raw


def write_kitti(root, lengths=(6, 9, 1, 12, 7), seed=0):
    rng = np.random.default_rng(seed)
    seqs, lats = [], []
    for t in lengths:
        frames = np.zeros((t, 64, 64), dtype=bool)
        com = rng.integers(16, 48, 2)
        for k in range(t):
            r = 5 + k % 4
            c0, c1 = com + k
            frames[k, max(0, c0 - r):c0 + r, max(0, c1 - r // 2):c1 + r // 2] = True
        seqs.append(frames)
        lats.append(np.stack([f.nonzero()[0].mean() for f in frames]
                             )[:, None].repeat(3, 1) + rng.normal(size=(t, 3)))
    with open(os.path.join(root, FILENAME), "wb") as f:
        pickle.dump({FRAMES_KEY: seqs, LATENTS_KEY: lats}, f)


# ------------------------------------------------------------------ encoders

def test_resnet_latent_encoder_layout_and_size():
    n = 10
    enc = ResNetLatentEncoder(n, "clica_resnet18", norm="box")
    backbone = sum(p.numel() for p in resnet18(stem="imagenet").parameters())
    assert backbone == 11689512 - (512 * 1000 + 1000)       # torchvision resnet18 without fc
    expected = backbone + (512 * 10 * n + 10 * n) + (10 * n * n + n) + n   # fc, out, box bound
    assert sum(p.numel() for p in enc.parameters()) == expected
    h = enc(torch.randn(3, 3, 64, 64))
    assert h.shape == (3, n) and bool(((h > 0) & (h < 1)).all())        # the box (0, 1) at init


def test_periodic_encoder_puts_the_periodic_codes_on_a_sphere():
    enc = ResNetLatentEncoder(11, "clica_resnet18", norm="none", periodic=8, width=8)
    h = enc(torch.randn(4, 3, 32, 32))
    assert torch.allclose(h[:, 3:].norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(h[:, :3].norm(dim=1), torch.ones(4), atol=1e-2)


def test_kitti_encoder_layout_init_and_input_check():
    enc = KittiConvEncoder(10, norm="box")
    convs = [m for m in enc.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 32, (4, 4), (2, 2)), (32, 32, (4, 4), (2, 2)), (32, 64, (4, 4), (2, 2)),
        (64, 64, (4, 4), (2, 2)), (64, 256, (4, 4), (1, 1))]
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    # Kaiming-normal, fan_in, ReLU gain: std sqrt(2 / fan_in) (loose: a sample estimate)
    w = convs[4].weight.detach()
    assert abs(float(w.std()) / math.sqrt(2 / (64 * 16)) - 1) < 0.05
    assert enc(torch.rand(5, 1, 64, 64)).shape == (5, 10)
    with pytest.raises(ValueError, match="64 x 64"):
        enc(torch.rand(2, 1, 32, 32))


# ------------------------------------------------------------------ loss

def test_periodic_loss_is_the_official_sum():
    """3DIdent's periodic loss: L_p InfoNCE of the 3 position codes + dot-product InfoNCE of the
    rest (official ``main_3dident.py``), at the official tau = 1."""
    from fastipirm.methods.clica import CLICA

    torch.manual_seed(fresh_seed())
    h = torch.randn(9, 8, dtype=torch.float64)
    hp = h + 0.1 * torch.randn_like(h)
    method = CLICA.__new__(CLICA)

    class Ctx:
        class cfg:
            class train:
                temperature = 1.0

            class clica:
                p = 2.0

        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

        @staticmethod
        def forward(x):
            return x

    method.ctx, method.backend, method.periodic = Ctx, "torch", 5
    got, _ = method.objective(h, hp)
    want = official_clica_loss(h[:, :3], hp[:, :3], 2, 1.0) + \
        official_clica_loss(h[:, 3:], hp[:, 3:], 0, 1.0)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ KITTI transform

def reference_affine(img, tx, ty, flip, degrees):
    """Pixel-by-pixel: output pixel centre -> rotate back and unshift -> nearest input pixel."""
    h, w = img.shape
    a = math.radians(degrees)
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            xo, yo = j + 0.5 - w / 2 - tx, i + 0.5 - h / 2 - ty
            xi = math.cos(a) * xo + math.sin(a) * yo
            yi = -math.sin(a) * xo + math.cos(a) * yo
            ji, ii = round(xi + w / 2 - 0.5), round(yi + h / 2 - 0.5)
            if 0 <= ii < h and 0 <= ji < w:
                out[i, j] = img[ii, ji]
    return out[:, ::-1] if flip else out


def test_kitti_transform_matches_the_pixel_reference():
    g = torch.Generator().manual_seed(fresh_seed())
    x = (torch.rand(3, 1, 64, 64, generator=g) < 0.3).float()
    x_pos = (torch.rand(3, 1, 64, 64, generator=g) < 0.3).float()
    tx = torch.tensor([0.0, 5.0, -3.0])
    ty = torch.tensor([0.0, -5.0, 2.0])
    flip = torch.tensor([False, True, False])
    a, b = affine_pairs(x, x_pos, tx, ty, flip)
    for k in range(3):
        for got, src in ((a, x), (b, x_pos)):
            want = reference_affine(src[k, 0].numpy(), float(tx[k]), float(ty[k]),
                                    bool(flip[k]), 2.0)
            assert (got[k, 0].numpy() != want).mean() < 2e-3       # only exact rounding ties


def test_kitti_transform_moves_both_frames_together_with_integer_shifts():
    g = torch.Generator().manual_seed(fresh_seed())
    x = (torch.rand(64, 1, 64, 64, generator=g) < 0.3).float()
    a, b = augment_pairs(x, x.clone(), g)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="square"):
        affine_pairs(x[:, :, :32], x[:, :, :32], torch.zeros(64), torch.zeros(64),
                     torch.zeros(64, dtype=torch.bool))


# ------------------------------------------------------------------ pair sources

def test_threedident_pairs_are_nearest_renderings_normalised(tmp_path):
    raw = write_threedident(tmp_path / "train")
    ds = ThreeDIdent(str(tmp_path), "train")
    src = ThreeDIdentPairs(ds, sigma=0.1, workers=2)
    g = torch.Generator().manual_seed(fresh_seed())
    z, x, xt = src.pair_batch(6, g)
    assert x.shape == xt.shape == (6, 3, 32, 32) and z.shape == (6, 10)
    rows = [int(np.argmin(((raw - zi.numpy()) ** 2).sum(1))) for zi in z]
    assert np.allclose(raw[rows], z.numpy(), atol=1e-6)          # the latents are rendered rows
    img = torch.from_numpy(mpimg.imread(tmp_path / "train" / "images" / f"{rows[0]:02d}.png"))
    img = torch.round(img[..., :3] * 255).permute(2, 0, 1) / 255
    want = (img - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]
    assert torch.allclose(x[0], want, atol=1e-4)
    xe, ze = src.eval_batch(5, g)
    assert xe.shape == (5, 3, 32, 32) and ze.shape == (5, 10)


def test_kitti_pairs_are_forward_partners(tmp_path):
    write_kitti(tmp_path)
    ds = KittiMasks(tmp_path, max_delta_t=3)
    src = KittiPairs(ds, augment=False)
    g = torch.Generator().manual_seed(fresh_seed())
    z, x, xt = src.pair_batch(32, g)
    assert x.shape == xt.shape == (32, 1, 64, 64) and z.shape == (32, 3)
    frames = ds.frames.float()
    lat = ds.latents.float()
    for k in range(32):
        row = int((lat - z[k]).abs().sum(1).argmin())             # the latents are unique
        assert torch.equal(frames[row], x[k, 0]) and row not in ds.anchor_last_rows.tolist()
        seq = int(ds.frame_sequence[row])
        later = [r for r in range(row + 1, min(row + 4, len(frames)))
                 if int(ds.frame_sequence[r]) == seq]
        assert any(torch.equal(frames[r], xt[k, 0]) for r in later)
    xe, ze = src.eval_batch(1000, g)
    assert xe.shape[0] == len(ds) == ze.shape[0]                 # distinct anchors, capped


# ------------------------------------------------------------------ fastipirm train

IMAGE_RUN = """
[run]
name = "{name}"
output_dir = "{out}"
seed = 3
progress = false
threads = 2
log_every = 1

[data]
name = "{data}"
root = "{root}"
split = "{split}"

[model]
arch = "{arch}"
width = 8
channels_last = false

[train]
epochs = 2
batch_size = {batch}
lr = 1e-3
weight_decay = 0.0
temperature = 1.0
amp = "none"

[method]
name = "clica"

[eval]
batch_size = 16

[clica]
n = {n}
p = {p}
c_p = 2.0
c_param = 0.1
latents = "{latents}"
output_norm = "box"
steps_per_epoch = 3
eval_samples = 40
num_eval_batches = 2
workers = 2
"""


def run_image_config(tmp_path, **kw):
    path = tmp_path / "run.toml"
    path.write_text(IMAGE_RUN.format(out=(tmp_path / "runs").as_posix(), **kw))
    return trainmod.train(load_config(path), log=lambda s: None)


@pytest.mark.parametrize("latents, columns", [("box", 10), ("periodic", 11)])
def test_threedident_run_writes_scores(tmp_path, latents, columns):
    write_threedident(tmp_path / "data" / "train", columns=columns, periodic=latents == "periodic")
    summary = run_image_config(tmp_path, name="t3d", data="threedident",
                               root=(tmp_path / "data").as_posix(), split="train",
                               arch="clica_resnet18", batch=8, n=columns, p=2.0,
                               latents=latents)
    for key in ("r2", "r2_std", "mcc", "mcc_std"):
        assert math.isfinite(summary[key])
    assert summary["raw_r2"] is None and summary["steps"] == 6
    assert (tmp_path / "runs" / "t3d" / "checkpoint.pt").exists()


def test_kitti_run_writes_scores(tmp_path):
    (tmp_path / "data").mkdir()
    write_kitti(tmp_path / "data")
    summary = run_image_config(tmp_path, name="kitti", data="kitti_masks",
                               root=(tmp_path / "data").as_posix(), split="train",
                               arch="clica_kitti_conv", batch=16, n=10, p=1.0, latents="box")
    assert all(math.isfinite(summary[k]) for k in ("r2", "mcc"))


def test_missing_image_data_names_the_file_and_where_to_get_it(tmp_path):
    from fastipirm.runtime import DataUnavailable

    with pytest.raises(DataUnavailable, match="kitti_peds_v2.pickle.*zenodo"):
        run_image_config(tmp_path, name="k", data="kitti_masks", root=tmp_path.as_posix(),
                         split="train", arch="clica_kitti_conv", batch=16, n=10, p=1.0,
                         latents="box")
    with pytest.raises(DataUnavailable, match="3DIdent.*zenodo"):
        run_image_config(tmp_path, name="t", data="threedident", root=tmp_path.as_posix(),
                         split="train", arch="clica_resnet18", batch=8, n=10, p=2.0,
                         latents="box")


def test_threedident_code_size_must_match_the_latents(tmp_path):
    from fastipirm.runtime import DataUnavailable

    write_threedident(tmp_path / "data" / "train")
    with pytest.raises(DataUnavailable, match="clica.n: 7 code dimensions.*10 latent columns"):
        run_image_config(tmp_path, name="t", data="threedident",
                         root=(tmp_path / "data").as_posix(), split="train",
                         arch="clica_resnet18", batch=8, n=7, p=2.0, latents="box")
