"""ResNet-18 / ResNet-50 encoders with the small-image stem of the official IP-IRM model
(``docs/official-ipirm.md#model``).

Architecture and initialisation follow torchvision's ``resnet18()`` / ``resnet50()`` (ResNet v1.5:
the stride of a bottleneck sits on its 3x3 conv; projection shortcuts are 1x1 conv + BN;
``zero_init_residual=False``), with the official changes:

- ``conv1`` is ``Conv2d(3, 64, 3, stride=1, padding=1, bias=False)``. It keeps PyTorch's default
  conv initialisation (the official code swaps it in after torchvision initialised the model);
  every other conv is Kaiming-normal (fan_out, ReLU gain), every BN has gamma 1 and beta 0.
- no max-pool and no fc: conv1 -> bn1 -> relu -> layer1..layer4 -> global average pool -> flatten,
  giving 512-d (ResNet-18) or 2048-d (ResNet-50) features. Total stride 8: 32x32 in -> 4x4 map.

Module names equal torchvision's, so ``encoder.state_dict()`` loads into a torchvision ResNet whose
conv1 was replaced the same way (with ``strict=False`` for the absent fc). ``width`` (default 64,
the official value) scales every layer's channels; smaller values are for quick CPU runs only.

``stem="imagenet"`` gives torchvision's own stem instead (``conv1`` 7x7 stride 2 padding 3, BN,
ReLU, ``maxpool`` 3x3 stride 2 padding 1; total stride 32, conv1 Kaiming-initialised like every
other conv), the encoder of CL-ICA's 3DIdent and of DCoDR (``torchvision.models.resnet18/50``
without fc); its ``state_dict`` loads into torchvision's model unchanged (``strict=False``).
``in_channels`` sets conv1's input channels (3 by default).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand (x4), BN after each; ResNet-50."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


STEMS = ("small", "imagenet")


class ResNet(nn.Module):
    """ResNet encoder: ``forward(x (N, C, H, W)) -> h (N, out_dim)``, unnormalised; the official
    IP-IRM small-image stem by default, torchvision's with ``stem="imagenet"``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck],
                 layers: tuple[int, int, int, int], width: int = 64, *, stem: str = "small",
                 in_channels: int = 3):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        self.stem = stem
        if stem == "small":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1,
                                   bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self._cin = width
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = width * 8 * block.expansion
        del self._cin
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and (module is not self.conv1 or stem != "small"):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._cin != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self._cin, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self._cin, planes, stride, downsample)]
        self._cin = planes * block.expansion
        layers += [block(self._cin, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(width: int = 64, **kwargs) -> ResNet:
    """ResNet-18 encoder, 512-d output at the default width (``stem``, ``in_channels``: see
    :class:`ResNet`)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), width, **kwargs)


def resnet50(width: int = 64, **kwargs) -> ResNet:
    """ResNet-50 encoder, 2048-d output at the default width (``stem``, ``in_channels``: see
    :class:`ResNet`)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width, **kwargs)


ARCHS = {"resnet18": resnet18, "resnet50": resnet50}
