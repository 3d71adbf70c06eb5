"""DCoDR's networks: the MoCo-initialised encoder, the AdaIN generator and the VGG16 perceptual
loss, checked against analytic parameter counts, the official file formats and literal
re-computations of the official math (``docs/dcodr-models.md``)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastipirm.losses.perceptual import (VGG16_LAYER_IDS, PerceptualDistance, VGG16Features,
                                         load_vgg16, perceptual_distance)
from fastipirm.models.dcodr_encoder import (MOCO_V2_URL, DCoDREncoder,
                                            convert_official_encoder_state_dict, load_moco_v2,
                                            moco_v2_strip_and_drop)
from fastipirm.models.dcodr_generator import (AdaptiveInstanceNorm2d, DCoDRGenerator,
                                              convert_official_generator_state_dict)
from fastipirm.models.resnet import resnet50


def count(module):
    return sum(p.numel() for p in module.parameters())


def linear(cin, cout):
    return cin * cout + cout


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def analytic_resnet50(width):
    """torchvision ResNet-50 without fc (ImageNet stem: 7x7 conv, BN), from the architecture."""
    total = conv(3, width, 7, bias=False) + 2 * width
    cin = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        p = width * 2 ** stage
        for b in range(blocks):
            total += (conv(cin, p, 1, False) + 2 * p + conv(p, p, 3, False) + 2 * p
                      + conv(p, 4 * p, 1, False) + 8 * p)
            if b == 0:
                total += conv(cin, 4 * p, 1, False) + 8 * p
            cin = 4 * p
    return total


# --------------------------------------------------------------------------------- encoder

def test_resnet50_analytic_count_is_torchvision():
    assert analytic_resnet50(64) == 23_508_032          # torchvision resnet50 minus its fc


@pytest.mark.parametrize("fc_head", [False, True])
def test_encoder_param_counts(fc_head):
    d, c = 8 * 32, 16
    enc = DCoDREncoder(c, fc_head=fc_head, width=8)
    head = 3 * linear(c, c) if fc_head else 0
    assert count(enc.content_encoder.resnet50) == analytic_resnet50(8) + linear(d, d)
    assert count(enc) == analytic_resnet50(8) + linear(d, d) + linear(d, c) + head
    assert enc.backbone_dim == d


def test_encoder_full_width_count():
    enc = DCoDREncoder(fc_head=True)
    assert count(enc) == 23_508_032 + linear(2048, 2048) + linear(2048, 128) + 3 * linear(128, 128)
    assert count(enc) == 28_016_192


def test_encoder_forward_shapes_and_layout(seed):
    enc = DCoDREncoder(12, fc_head=True, width=4).eval()
    x = torch.rand(3, 3, 64, 64)
    z = enc(x)
    assert z.shape == (3, 12)
    # the literal pipeline: pooled ResNet -> fc.0 (no ReLU) -> fc_layers.0 -> head
    ce = enc.content_encoder
    h = ce.resnet50(x)
    assert h.shape == (3, 128)
    lin = [m for m in enc.siamese]
    assert [type(m) for m in lin] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
    assert lin[1].negative_slope == 0.01 and lin[3].negative_slope == 0.01
    code = ce.fc_layers[0](ce.resnet50.fc[0](h))
    t = F.leaky_relu(lin[0](code), 0.01)
    t = F.leaky_relu(lin[2](t), 0.01)
    torch.testing.assert_close(z, lin[4](t))
    # grayscale input is tiled to three channels
    g = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(enc(g), enc(g.repeat(1, 3, 1, 1)))
    no_head = DCoDREncoder(12, width=4)
    assert not hasattr(no_head, "siamese") and no_head(x).shape == (3, 12)


def test_encoder_official_state_dict_names(seed):
    enc = DCoDREncoder(8, fc_head=True, width=4)
    ours = enc.state_dict()
    official = OrderedDict()
    for k, v in ours.items():       # what nn.DataParallel-wrapped official modules save
        top, rest = k.split(".", 1)
        official[f"{top}.module.{rest}"] = torch.randn_like(v.float()).to(v.dtype)
    assert "content_encoder.module.resnet50.fc.0.weight" in official
    assert "content_encoder.module.fc_layers.0.bias" in official
    assert "siamese.module.4.weight" in official
    other = DCoDREncoder(8, fc_head=True, width=4)
    other.load_state_dict(convert_official_encoder_state_dict(official))
    for k, v in other.state_dict().items():
        assert torch.equal(v, official[k.replace(".", ".module.", 1)])


# --------------------------------------------------------------------------------- MoCo v2

def moco_state(width, seed_tensors=True):
    """A MoCo v2 query encoder under the official checkpoint's names: torchvision ResNet-50 with
    fc = Sequential(Linear(d, d), ReLU, Linear(d, 128)), every key prefixed module.encoder_q."""
    net = resnet50(width, stem="imagenet")
    d = net.out_dim
    net.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 128))
    state = OrderedDict()
    for k, v in net.state_dict().items():
        if seed_tensors and k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif seed_tensors and v.is_floating_point():
            v = torch.randn_like(v)
        elif k.endswith("num_batches_tracked"):
            v = torch.randint(1, 10**6, ()).long()
        state["module.encoder_q." + k] = v
    return state


def write_moco(path, state, legacy=False):
    """The official release's layout (a 2020 legacy-format file with the optimizer state)."""
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(2)}},
                 "param_groups": [{"lr": 0.03, "momentum": 0.9, "dampening": 0,
                                   "weight_decay": 1e-4, "nesterov": False, "params": [0]}]}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": optimizer},
               path, _use_new_zipfile_serialization=not legacy)
    return path


def test_moco_real_key_names():
    state = moco_state(64, seed_tensors=False)
    keys = list(state)
    assert len(keys) == 318 + 4
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.num_batches_tracked", "layer3.5.conv2.weight",
              "layer4.2.bn3.bias"):
        assert "module.encoder_q." + k in state
    assert keys[-4:] == ["module.encoder_q.fc.0.weight", "module.encoder_q.fc.0.bias",
                         "module.encoder_q.fc.2.weight", "module.encoder_q.fc.2.bias"]
    assert keys[0] == "module.encoder_q.conv1.weight"


def test_load_moco_v2_loads_backbone_and_first_head_layer(tmp_path, seed):
    state = moco_state(4)
    path = write_moco(tmp_path / "moco_v2_800ep_pretrain.pth", state, legacy=True)
    enc = DCoDREncoder(16, fc_head=True, width=4)
    fc_before = {k: v.clone() for k, v in enc.content_encoder.fc_layers.state_dict().items()}
    head_before = {k: v.clone() for k, v in enc.siamese.state_dict().items()}
    dropped = load_moco_v2(enc, path)
    assert dropped == ["fc.2.weight", "fc.2.bias"]
    loaded = enc.content_encoder.resnet50.state_dict()
    assert len(loaded) == len(state) - 2
    for k, v in loaded.items():
        assert torch.equal(v, state["module.encoder_q." + k]), k
    for k, v in enc.content_encoder.fc_layers.state_dict().items():
        assert torch.equal(v, fc_before[k])
    for k, v in enc.siamese.state_dict().items():
        assert torch.equal(v, head_before[k])
    # the forward pass uses fc.0 from the file and no ReLU after it
    enc.eval()
    x = torch.rand(2, 3, 64, 64)
    w0, b0 = state["module.encoder_q.fc.0.weight"], state["module.encoder_q.fc.0.bias"]
    ce = enc.content_encoder
    expected = ce.fc_layers(F.linear(ce.resnet50(x), w0, b0))
    torch.testing.assert_close(ce(x), expected)


def test_strip_and_drop_rule_is_positional():
    t = torch.zeros(1)
    kept, dropped = moco_v2_strip_and_drop(OrderedDict(
        [("module.encoder_q.a.w", t), ("module.encoder_q.fc.2.weight", t + 1),
         ("module.encoder_q.b.w", t + 2), ("module.encoder_q.c.w", t + 3)]))
    assert list(kept) == ["a.w", "fc.2.weight"] and dropped == ["b.w", "c.w"]
    assert torch.equal(kept["fc.2.weight"], t + 1)


def test_moco_file_with_head_not_last_is_rejected(tmp_path, seed):
    state = moco_state(4)
    keys = list(state)
    reordered = OrderedDict((k, state[k]) for k in keys[-2:] + keys[:-2])   # fc.2 first
    path = write_moco(tmp_path / "moco.pth", reordered)
    with pytest.raises(ValueError, match=r"unexpected keys: fc\.2\.weight") as info:
        load_moco_v2(DCoDREncoder(16, width=4), path)
    assert "missing keys: fc.0.weight, fc.0.bias" in str(info.value)


def test_moco_errors(tmp_path, seed):
    enc = DCoDREncoder(16, width=4)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    missing = tmp_path / "nowhere" / "moco_v2_800ep_pretrain.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_moco_v2(enc, missing)
    assert str(missing) in str(info.value) and MOCO_V2_URL in str(info.value)
    assert "moco_v2_800ep_pretrain.pth.tar" in str(info.value)

    state = moco_state(4)
    del state["module.encoder_q.layer2.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"missing keys: layer2\.0\.conv1\.weight"):
        load_moco_v2(enc, write_moco(tmp_path / "a.pth", state))

    state = moco_state(4)
    state = OrderedDict([("module.encoder_q.extra.weight", torch.zeros(2))] + list(state.items()))
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        load_moco_v2(enc, write_moco(tmp_path / "b.pth", state))

    state = moco_state(4)
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"module\.encoder_k\.conv1\.weight"):
        load_moco_v2(enc, write_moco(tmp_path / "c.pth", state))

    with pytest.raises(ValueError, match="shapes"):
        load_moco_v2(enc, write_moco(tmp_path / "d.pth", moco_state(2)))

    torch.save(moco_state(4), tmp_path / "e.pth")                  # no 'state_dict' wrapper
    with pytest.raises(ValueError, match="state_dict"):
        load_moco_v2(enc, tmp_path / "e.pth")
    for k, v in enc.state_dict().items():                        # failures change nothing
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------------------- generator

def analytic_generator(n_domains, content_dim, class_dim, width, last_width, channels, size):
    area = (size // 16) ** 2
    total = n_domains * class_dim + 4 * linear(class_dim, 2 * width)
    total += (linear(content_dim, area * (width // 8)) + linear(area * (width // 8),
              area * (width // 4)) + linear(area * (width // 4), area * width))
    total += 4 * conv(width, width, 3) + conv(width, last_width, 5)
    if size == 128:
        total += conv(last_width, last_width, 5)
    return total + conv(last_width, channels, 7)


def test_generator_official_param_count():
    g = DCoDRGenerator(183)             # Cars3D: 183 car models
    assert count(g) == analytic_generator(183, 128, 256, 256, 64, 3, 64)
    assert count(g) - 183 * 256 == 8_095_491
    assert count(g.modulation) == 4 * (256 * 512 + 512)


@pytest.mark.parametrize("size,channels", [(64, 3), (64, 1), (128, 3), (32, 3)])
def test_generator_small_counts_and_shapes(size, channels, seed):
    g = DCoDRGenerator(5, content_dim=10, class_dim=12, image_size=size, channels=channels,
                       width=16, last_width=8)
    assert count(g) == analytic_generator(5, 10, 12, 16, 8, channels, size)
    n_last_convs = sum(isinstance(m, nn.Conv2d) for m in g.generator.last_conv_layers)
    assert n_last_convs == (3 if size == 128 else 2)
    code = torch.randn(4, 10, requires_grad=True)
    domain = torch.randint(0, 5, (4,))
    img = g(code, domain)
    assert img.shape == (4, channels, size, size)
    assert img.min() > 0 and img.max() < 1
    img.square().mean().backward()
    assert code.grad.shape == (4, 10) and code.grad.abs().sum() > 0
    for name, p in g.named_parameters():
        assert p.grad is not None, name
    used = torch.zeros(5, dtype=torch.bool)
    used[domain] = True
    rows = g.class_embedding.weight.grad.abs().sum(1)
    assert (rows[~used] == 0).all() and (rows[used] > 0).all()


def test_generator_layout_and_init(seed):
    g = DCoDRGenerator(7)
    keys = list(g.state_dict())
    assert keys[:3] == ["class_embedding.weight", "modulation.adain_per_layer.0.weight",
                        "modulation.adain_per_layer.0.bias"]
    convs = [k for k in keys if k.startswith("generator.adain_conv_layers")]
    assert convs == [f"generator.adain_conv_layers.{i}.{p}" for i in (1, 5, 9, 13)
                     for p in ("weight", "bias")]
    assert [k for k in keys if k.startswith("generator.last")] == [
        f"generator.last_conv_layers.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    fc = g.generator.fc_layers
    assert [m.out_features for m in fc if isinstance(m, nn.Linear)] == [512, 1024, 4096]
    assert all(m.negative_slope == 0.01 for m in g.modules() if isinstance(m, nn.LeakyReLU))
    assert isinstance(g.generator.last_conv_layers[-1], nn.Sigmoid)
    ups = [m for m in g.generator.adain_conv_layers if isinstance(m, nn.Upsample)]
    assert len(ups) == 4 and all(u.mode == "nearest" for u in ups)
    e = g.class_embedding.weight
    assert e.abs().max() <= 0.05 and e.std() > 0.01
    groups = g.param_groups()
    assert [grp["lr"] for grp in groups] == [3e-4, 3e-3]
    ids = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(ids) == sorted(id(p) for p in g.parameters())
    official = {k.split(".", 1)[0] + ".module." + k.split(".", 1)[1]: v
                for k, v in g.state_dict().items()}
    g2 = DCoDRGenerator(7)
    g2.load_state_dict(convert_official_generator_state_dict(official))
    assert torch.equal(g2.class_embedding.weight, e)


def test_adain_literal(seed):
    n, c = 3, 6
    x = torch.randn(n, c, 5, 7, dtype=torch.float64) * 3 + 1
    head = torch.randn(n, 2 * c, dtype=torch.float64)      # one modulation head's output
    b, w = head[:, 0::2], head[:, 1::2]                     # interleaved: bias even, weight odd
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)  # biased
    expected = (x - mean) / torch.sqrt(var + 1e-5) * w[:, :, None, None] + b[:, :, None, None]
    got = AdaptiveInstanceNorm2d(0)(x, head.view(n, c, 2))
    torch.testing.assert_close(got, expected)
    # the official reading: F.batch_norm over the (1, N*C, H, W) reshape in training mode
    official = F.batch_norm(x.reshape(1, n * c, 5, 7), None, None, weight=w.reshape(-1),
                            bias=b.reshape(-1), training=True).view_as(x)
    torch.testing.assert_close(got, official)


def test_generator_literal_forward(seed):
    nd, cd, kd, wd, lw = 4, 10, 12, 16, 8
    g = DCoDRGenerator(nd, content_dim=cd, class_dim=kd, width=wd, last_width=lw).double()
    code = torch.randn(3, cd, dtype=torch.float64) * 5
    domain = torch.randint(0, nd, (3,))
    sd = g.state_dict()
    # every step written out from the state dict
    c = code / code.norm(dim=1, keepdim=True)
    e = sd["class_embedding.weight"][domain]
    h = c
    for i in (0, 2, 4):
        h = F.leaky_relu(h @ sd[f"generator.fc_layers.{i}.weight"].T
                         + sd[f"generator.fc_layers.{i}.bias"], 0.01)
    h = h.reshape(3, wd, 4, 4)
    for layer, idx in enumerate((1, 5, 9, 13)):
        out = (e @ sd[f"modulation.adain_per_layer.{layer}.weight"].T
               + sd[f"modulation.adain_per_layer.{layer}.bias"])
        bias, weight = out[:, 0::2], out[:, 1::2]
        h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        h = F.conv2d(h, sd[f"generator.adain_conv_layers.{idx}.weight"],
                     sd[f"generator.adain_conv_layers.{idx}.bias"], padding=1)
        h = F.leaky_relu(h, 0.01)
        mu = h.mean(dim=(2, 3), keepdim=True)
        var = h.var(dim=(2, 3), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * weight[..., None, None] + bias[..., None, None]
    h = F.leaky_relu(F.conv2d(h, sd["generator.last_conv_layers.0.weight"],
                              sd["generator.last_conv_layers.0.bias"], padding=2), 0.01)
    h = F.conv2d(h, sd["generator.last_conv_layers.2.weight"],
                 sd["generator.last_conv_layers.2.bias"], padding=3)
    expected = torch.sigmoid(h)
    got = g(code, domain)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g(code * 3.7, domain), got)       # the code is L2-normalised
    raw = DCoDRGenerator(nd, content_dim=cd, class_dim=kd, width=wd, last_width=lw,
                         normalize_code=False).double()
    raw.load_state_dict(sd)
    torch.testing.assert_close(raw(c, domain), got)
    assert not torch.allclose(raw(code, domain), got)


def test_generator_errors():
    with pytest.raises(ValueError, match="divisible"):
        DCoDRGenerator(3, image_size=72)
    g = DCoDRGenerator(3, width=16, last_width=8)
    with pytest.raises(ValueError, match="domain labels"):
        g(torch.randn(2, 128), torch.tensor([0]))


# ------------------------------------------------------------------------------ perceptual

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random VGG16 weights in torchvision's file format (features.N.*, classifier.*)."""
    state = OrderedDict()
    cin, idx = 3, 0
    for v in CFG:
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3) * (2 / (9 * v)) ** 0.5
        state[f"features.{idx}.bias"] = torch.randn(v) * 0.1
        cin, idx = v, idx + 2
    for i, shape in ((0, (8, 4)), (3, (8, 8)), (6, (3, 8))):   # ignored by load_vgg16; tiny
        state[f"classifier.{i}.weight"] = torch.randn(shape)
        state[f"classifier.{i}.bias"] = torch.randn(shape[0])
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


def reference_loss(gen, real, state, post_relu=True):
    """The official loss written out: per-sample pixel L1 mean + per-layer L1 means of the VGG16
    taps (features 2, 7, 12, 21 read after their in-place ReLU; 30 = pool5), batch mean."""
    def feats(x):
        out, idx = [], 0
        for v in CFG:
            if v == "M":
                x = F.max_pool2d(x, 2, 2)
                if idx == 30:
                    out.append(x)
                idx += 1
            else:
                x = F.conv2d(x, state[f"features.{idx}.weight"].to(x.dtype),
                             state[f"features.{idx}.bias"].to(x.dtype), padding=1)
                pre = x
                x = F.relu(x)
                if idx in (2, 7, 12, 21):
                    out.append(x if post_relu else pre)
                idx += 2
        return out

    n = gen.shape[0]
    loss = torch.zeros(n, dtype=gen.dtype)
    loss = loss + (gen - real).abs().reshape(n, -1).mean(1)
    for a, b in zip(feats(gen), feats(real)):
        loss = loss + (a - b).abs().reshape(n, -1).mean(1)
    return loss.mean()


def official_loop_features(vgg, x, layer_ids=(2, 7, 12, 21, 30)):
    """The official NetVGGFeatures mechanics: keep module i's output, run on (in-place ReLUs)."""
    out = []
    for i in range(layer_ids[-1] + 1):
        x = vgg.features[i](x)
        if i in layer_ids:
            out.append(x)
    return out


def test_vgg_layout_and_count():
    v = VGG16Features()
    assert count(v) == sum(conv(cin, cout, 3) for cin, cout in
                           [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                            (256, 256), (256, 512), (512, 512), (512, 512), (512, 512),
                            (512, 512), (512, 512)])
    assert count(v) == 14_714_688
    assert len(v.features) == 31
    assert [type(v.features[i]).__name__ for i in VGG16_LAYER_IDS] == [
        "Conv2d", "Conv2d", "Conv2d", "Conv2d", "MaxPool2d"]
    assert all(m.inplace for m in v.features if isinstance(m, nn.ReLU))


def test_load_vgg16_weights_and_frozen(vgg_file, tmp_path):
    path, state = vgg_file
    vgg = load_vgg16(path)
    for k, t in vgg.state_dict().items():
        assert torch.equal(t, state[k])
    # torchvision's released file predates the zip format: the legacy format loads too
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = load_vgg16(tmp_path / "legacy.pth")
    assert torch.equal(legacy.features[28].weight, state["features.28.weight"])
    assert not vgg.training
    assert all(not p.requires_grad for p in vgg.parameters())


def test_perceptual_matches_literal_reference(vgg_file, seed):
    path, state = vgg_file
    loss_fn = PerceptualDistance.from_file(path)
    gen = torch.rand(3, 3, 32, 32)
    real = torch.rand(3, 3, 32, 32)
    got = loss_fn(gen, real)
    expected = reference_loss(gen.double(), real.double(), state)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # the taps really are post-ReLU: the pre-ReLU reading gives another value
    pre = reference_loss(gen.double(), real.double(), state, post_relu=False)
    assert not torch.isclose(pre, expected, rtol=1e-3)


def test_official_inplace_loop_reads_post_relu(vgg_file, seed):
    vgg = load_vgg16(vgg_file[0])
    x = torch.rand(2, 3, 32, 32)
    official = official_loop_features(vgg, x.clone())
    ours = vgg(x)
    assert len(official) == len(ours) == 5
    for a, b in zip(official, ours):
        torch.testing.assert_close(a, b)
        assert a.min() >= 0


def test_perceptual_gradients_flow_to_input_only(vgg_file, seed):
    path, state = vgg_file
    loss_fn = PerceptualDistance(load_vgg16(path))
    gen = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    real = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    loss_fn.double()
    loss_fn(gen, real).backward()
    assert all(p.grad is None for p in loss_fn.parameters())
    gen_ref = gen.detach().clone().requires_grad_(True)
    reference_loss(gen_ref, real, state).backward()
    assert gen.grad.abs().sum() > 0
    torch.testing.assert_close(gen.grad, gen_ref.grad)


def test_perceptual_train_mode_keeps_vgg_frozen(seed):
    vgg = VGG16Features()
    assert all(p.requires_grad for p in vgg.parameters())
    loss_fn = PerceptualDistance(vgg).train()
    assert loss_fn.training and not loss_fn.vgg.training
    assert all(not p.requires_grad for p in vgg.parameters())


def test_perceptual_grayscale_is_tiled(vgg_file, seed):
    vgg = load_vgg16(vgg_file[0])
    gen, real = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(perceptual_distance(gen, real, vgg),
                               perceptual_distance(gen.repeat(1, 3, 1, 1),
                                                   real.repeat(1, 3, 1, 1), vgg))
    assert perceptual_distance(real, real, vgg) == 0


def test_vgg_errors(vgg_file, tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_vgg16(missing)
    assert str(missing) in str(info.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in str(info.value)
    state = OrderedDict(vgg_file[1])
    del state["features.28.bias"]
    state["features.31.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys: features\.28\.bias") as info:
        load_vgg16(tmp_path / "bad.pth")
    assert "unexpected keys: features.31.weight" in str(info.value)
    state = OrderedDict(vgg_file[1])
    state["features.0.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        load_vgg16(tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="layer_ids"):
        PerceptualDistance(VGG16Features(), (7, 2))


def test_generator_through_perceptual_loss(vgg_file, seed):
    g = DCoDRGenerator(3, content_dim=8, class_dim=8, image_size=32, width=16, last_width=8)
    loss_fn = PerceptualDistance(load_vgg16(vgg_file[0]))
    code = torch.randn(4, 8, requires_grad=True)
    loss = loss_fn(g(code, torch.tensor([0, 1, 2, 0])), torch.rand(4, 3, 32, 32))
    loss.backward()
    assert code.grad.abs().sum() > 0
    assert all(p.grad is not None for p in g.generator.parameters())
    assert all(p.grad is None for p in loss_fn.parameters())
