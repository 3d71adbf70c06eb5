"""Batched two-view augmentation against the official per-image semantics (statistical checks use
fixed seeds)."""
import colorsys
import math
import random

import numpy as np
import pytest
import torch

from fastipirm.data.augment import (CIFAR10_MEAN, CIFAR10_STD, TwoViewAugment, adjust_hue,
                                    bilinear_resample_matrix, eval_transform, gaussian_blur3,
                                    sample_crop_boxes)

MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)   # every random op disabled


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def denorm(x):
    return x * STD + MEAN


def random_images(n, size, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen(seed))


def test_shapes_dtypes_determinism():
    aug = TwoViewAugment(out_size=16)
    images = random_images(8, 24)
    v1, v2 = aug(images, gen(1))
    for v in (v1, v2):
        assert v.shape == (8, 3, 16, 16) and v.dtype == torch.float32 and v.device == images.device
        assert v.is_contiguous()
    assert not torch.equal(v1, v2)
    w1, w2 = aug(images, gen(1))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(aug(images, gen(2))[0], v1)
    assert aug.view(images, gen(1)).shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float())


def test_identity_when_everything_is_off_equals_eval_transform():
    images = random_images(4, 20)
    aug = TwoViewAugment(out_size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), **OFF)
    ref = (images.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    torch.testing.assert_close(eval_transform(images), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(aug.view(images, gen()), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(aug.eval_transform(images), ref, rtol=0, atol=1e-6)
    assert eval_transform(random_images(2, 96)).shape == (2, 3, 96, 96)    # no resize


def torchvision_crop_params(height, width, scale, ratio, rng):
    """RandomResizedCrop.get_params, one image at a time (the official per-image rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width,scale", [(96, 96, (0.08, 1.0)), (32, 32, (0.08, 1.0)),
                                                (20, 60, (0.3, 1.0))])
def test_crop_boxes_match_torchvision_distribution(height, width, scale):
    n, ratio = 4000, (3 / 4, 4 / 3)
    top, left, h, w = sample_crop_boxes(n, height, width, scale, ratio, generator=gen(3))
    assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)
            & (h > 0) & (w > 0)).all()
    rng = random.Random(3)
    ref = np.array([torchvision_crop_params(height, width, scale, ratio, rng) for _ in range(n)],
                   dtype=float)
    ours = torch.stack([top, left, h, w], 1).double().numpy()
    area_ours, area_ref = (ours[:, 2] * ours[:, 3] / (height * width),
                           ref[:, 2] * ref[:, 3] / (height * width))
    assert abs(area_ours.mean() - area_ref.mean()) < 0.02
    assert abs(np.median(area_ours) - np.median(area_ref)) < 0.03
    aspect_ours, aspect_ref = ours[:, 3] / ours[:, 2], ref[:, 3] / ref[:, 2]
    assert abs(aspect_ours.mean() - aspect_ref.mean()) < 0.02
    centre_ours, centre_ref = ours[:, 1] + ours[:, 3] / 2, ref[:, 1] + ref[:, 3] / 2
    assert abs(centre_ours.mean() - centre_ref.mean()) < 0.03 * width


def test_crop_fallback_is_central_ratio_clamped_crop():
    # 8x64 with area >= 50%: no try can fit, so every sample takes the fallback
    # (h=8, w=round(8*4/3)=11)
    top, left, h, w = sample_crop_boxes(50, 8, 64, (0.5, 1.0), (3 / 4, 4 / 3), generator=gen())
    assert (h == 8).all() and (w == 11).all() and (top == 0).all() and (left == 26).all()


def test_resample_matches_pil_bilinear():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(img).resize((96, 96), Image.Resampling.BILINEAR))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()
    for top, left, h, w in [(5, 7, 60, 40), (0, 0, 96, 96), (10, 20, 13, 17), (50, 3, 46, 90)]:
        wy = bilinear_resample_matrix(torch.tensor([top]), torch.tensor([h]), 96, 32)
        wx = bilinear_resample_matrix(torch.tensor([left]), torch.tensor([w]), 96, 32)
        ours = (wy[:, None] @ x @ wx[:, None].transpose(-1, -2))[0].permute(1, 2, 0).numpy()
        ref = np.asarray(Image.fromarray(img).crop((left, top, left + w, top + h))
                         .resize((32, 32), Image.Resampling.BILINEAR)).astype(np.float64)
        assert np.abs(ours - ref).max() <= 1.0   # PIL rounds to uint8 (fixed-point); we stay float


def test_flip_rate_and_direction():
    n = 600
    half = torch.zeros(n, 16, 16, 3, dtype=torch.uint8)
    half[:, :, 8:] = 255                                   # left black, right white
    aug = TwoViewAugment(out_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**OFF, "flip_p": 0.5})
    out = denorm(aug.view(half, gen(5)))
    flipped = out[:, 0, 0, 0] > 0.5                        # top-left corner white
    assert (out[:, 0, 0, 15] > 0.5).logical_xor(flipped).all()
    assert abs(flipped.float().mean().item() - 0.5) < 0.07


def colourful(n, size=8, seed=0):
    g = gen(seed)
    return torch.randint(30, 226, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_grayscale_rate():
    aug = TwoViewAugment(out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**OFF, "gray_p": 0.2})
    out = denorm(aug.view(colourful(1000), gen(6)))
    gray = (((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-5)
            & ((out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 1e-5))
    assert abs(gray.float().mean().item() - 0.2) < 0.05
    x = colourful(1).permute(0, 3, 1, 2).float() / 255
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    g_out = denorm(TwoViewAugment(out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                  **{**OFF, "gray_p": 1.0})
                   .view(colourful(1), gen()))
    torch.testing.assert_close(g_out[:, 1], luma, atol=1e-5, rtol=0)


def test_jitter_and_blur_rates():
    images = colourful(1000, seed=1)
    base = TwoViewAugment(out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), **OFF).view(images, gen())
    jit = TwoViewAugment(out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                         **{**OFF, "jitter_p": 0.8}).view(images, gen(7))
    changed = (jit - base).abs().amax((1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.8) < 0.05
    blur = TwoViewAugment(out_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          **{**OFF, "blur_p": 0.5}).view(images, gen(8))
    changed = (blur - base).abs().amax((1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.5) < 0.06


def test_crops_happen():
    images = colourful(400, size=32, seed=2)
    full = TwoViewAugment(out_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          **OFF).view(images, gen())
    crop = TwoViewAugment(out_size=32, **OFF).view(images, gen(9))
    changed = (crop - full).abs().amax((1, 2, 3)) > 1e-4
    assert changed.float().mean().item() > 0.95   # a 32x32 full-image crop of a 32x32 image is rare


def test_blur_matches_cv2_kernel():
    x = torch.rand(2, 3, 6, 7, generator=gen(4))
    sigma = torch.tensor([0.7, 1.9])
    out = gaussian_blur3(x, sigma, torch.tensor([True, False]))
    torch.testing.assert_close(out[1], x[1])
    k = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.7 ** 2))
    k /= k.sum()
    # reflect-101 = cv2 default border
    xp = np.pad(x[0].numpy(), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    ref = sum(k[i] * k[j] * xp[:, i:i + 6, j:j + 7] for i in range(3) for j in range(3))
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-6)


def test_hue_matches_colorsys():
    x = torch.rand(2, 3, 4, 4, generator=gen(5))
    shift = torch.tensor([0.07, -0.09])
    out = adjust_hue(x, shift)
    ref = np.zeros((2, 3, 4, 4))
    for n in range(2):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                ref[n, :, i, j] = colorsys.hsv_to_rgb((h + shift[n].item()) % 1.0, s, v)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def reference_jitter(img, order, factors):
    """torchvision ColorJitter on one float image (3, H, W), ops applied in ``order``."""
    def gray(t):
        return (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
    for op in order:
        f = float(factors[op])
        if op == 0:
            img = (f * img).clamp(0, 1)
        elif op == 1:
            img = (f * img + (1 - f) * gray(img).mean()).clamp(0, 1)
        elif op == 2:
            img = (f * img + (1 - f) * gray(img)).clamp(0, 1)
        else:
            img = adjust_hue(img[None], torch.tensor([f]))[0]
    return img


def test_color_jitter_follows_each_samples_op_order():
    n = 24
    x = torch.rand(n, 3, 5, 5, generator=gen(11))
    g = gen(12)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    factors = torch.stack([torch.empty(n).uniform_(0.6, 1.4, generator=g) for _ in range(3)]
                          + [torch.empty(n).uniform_(-0.1, 0.1, generator=g)], 1)
    active = torch.ones(n, dtype=torch.bool)
    active[::5] = False
    out = TwoViewAugment._color_jitter(x.clone(), active, order, factors)
    for i in range(n):
        ref = reference_jitter(x[i], order[i].tolist(), factors[i]) if active[i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_jitter_factor_ranges():
    aug = TwoViewAugment()
    p = aug.sample_params(5000, 32, 32, gen(13))
    f = p["factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert abs(p["jitter"].float().mean().item() - 0.8) < 0.03
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() < 2.0
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(5000, 4))
    firsts = torch.bincount(p["order"][:, 0], minlength=4).float() / 5000
    assert (firsts - 0.25).abs().max() < 0.03          # uniform random order
