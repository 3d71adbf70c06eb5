"""Small-stem ResNets and the SimCLR model: parameter counts, outputs, init, channels_last, official
keys."""
import math

import pytest
import torch
from torch import nn

from fastipirm.models import SimCLRModel, convert_official_state_dict, resnet18, resnet50


def conv(cin, cout, k):
    return cin * cout * k * k


def bn(c):
    return 2 * c


def analytic_resnet_params(block, layers, width=64):
    """Parameter count of the small-stem ResNet encoder (no fc), from the architecture."""
    total = conv(3, width, 3) + bn(width)
    cin, expansion = width, (1 if block == "basic" else 4)
    for stage, blocks in enumerate(layers):
        planes = width * 2 ** stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            if block == "basic":
                total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            else:
                total += (conv(cin, planes, 1) + bn(planes) + conv(planes, planes, 3) + bn(planes)
                          + conv(planes, planes * 4, 1) + bn(planes * 4))
            if stride != 1 or cin != planes * expansion:
                total += conv(cin, planes * expansion, 1) + bn(planes * expansion)
            cin = planes * expansion
    return total


def count(module):
    return sum(p.numel() for p in module.parameters())


# torchvision's published totals, minus fc (512*1000+1000 / 2048*1000+1000), minus the 7x7 stem,
# plus the 3x3 stem
TV_RESNET18, TV_RESNET50 = 11_689_512, 25_557_032
STEM_DELTA = -conv(3, 64, 7) + conv(3, 64, 3)


def test_parameter_counts():
    r18, r50 = resnet18(), resnet50()
    assert (count(r18) == analytic_resnet_params("basic", (2, 2, 2, 2))
            == TV_RESNET18 - 513_000 + STEM_DELTA == 11_168_832)
    assert (count(r50) == analytic_resnet_params("bottleneck", (3, 4, 6, 3))
            == TV_RESNET50 - 2_049_000 + STEM_DELTA == 23_500_352)
    head = 2048 * 512 + bn(512) + 512 * 128 + 128
    assert count(SimCLRModel("resnet50")) == 23_500_352 + head
    assert count(resnet18(width=16)) == analytic_resnet_params("basic", (2, 2, 2, 2), width=16)


def test_outputs_and_norms():
    torch.manual_seed(0)
    model = SimCLRModel("resnet18", feature_dim=32)
    x = torch.randn(4, 3, 16, 16)
    h, z = model(x)
    assert h.shape == (4, 512) and z.shape == (4, 32)
    torch.testing.assert_close(h.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    raw = model.encoder(x)
    torch.testing.assert_close(nn.functional.normalize(raw, dim=1), h)
    assert model.encoder_dim == 512
    head = list(model.g)
    assert isinstance(head[0], nn.Linear) and head[0].bias is None and head[0].out_features == 512
    assert isinstance(head[1], nn.BatchNorm1d) and isinstance(head[2], nn.ReLU)
    assert head[3].bias is not None and head[3].out_features == 32
    (z.sum() + h.sum()).backward()
    assert model.encoder.conv1.weight.grad is not None


def test_resnet50_shapes_and_stride():
    model = SimCLRModel("resnet50")
    model.eval()
    maps = {}
    model.encoder.layer4.register_forward_hook(lambda m, i, o: maps.__setitem__("l4", o.shape))
    with torch.no_grad():
        h, z = model(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, 2048) and z.shape == (2, 128)
    assert maps["l4"] == (2, 2048, 4, 4)          # total stride 8: 32x32 -> 4x4
    assert not any(isinstance(m, (nn.MaxPool2d,)) for m in model.modules())
    stem = model.encoder.conv1
    assert (stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.padding == (1, 1)
            and stem.bias is None)


def test_initialisation():
    torch.manual_seed(0)
    enc = resnet50()
    conv2 = enc.layer3[0].conv2                     # 3x3, 256 -> 256
    fan_out = conv2.out_channels * 9
    assert abs(conv2.weight.std().item() - math.sqrt(2 / fan_out)) < 0.05 * math.sqrt(2 / fan_out)
    # PyTorch default conv init (kaiming_uniform a=sqrt(5))
    stem_bound = 1 / math.sqrt(3 * 9)
    assert (enc.conv1.weight.abs().max() <= stem_bound
            and enc.conv1.weight.abs().max() > 0.8 * stem_bound)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_channels_last():
    torch.manual_seed(0)
    model = SimCLRModel("resnet18", feature_dim=16).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_official_checkpoint_keys():
    torch.manual_seed(0)
    ours = SimCLRModel("resnet18", feature_dim=16)
    e = ours.encoder
    official_f = nn.Sequential(e.conv1, e.bn1, e.relu, e.layer1, e.layer2, e.layer3, e.layer4,
                               e.avgpool)
    state = {f"module.f.{k}": v for k, v in official_f.state_dict().items()}
    state.update({f"module.g.{k}": v for k, v in ours.g.state_dict().items()})
    fresh = SimCLRModel("resnet18", feature_dim=16)
    fresh.load_state_dict(convert_official_state_dict(state), strict=True)
    ours.eval(), fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[1], fresh(x)[1])
    with pytest.raises(KeyError):
        convert_official_state_dict({"fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown arch"):
        SimCLRModel("vit")
