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


class ResNet(nn.Module):
    """Small-image ResNet encoder: ``forward(x (N, 3, H, W)) -> h (N, out_dim)``, unnormalised."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck],
                 layers: tuple[int, int, int, int], width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
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
            if isinstance(module, nn.Conv2d) and module is not self.conv1:
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
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(width: int = 64) -> ResNet:
    """ResNet-18 encoder, 512-d output at the default width."""
    return ResNet(BasicBlock, (2, 2, 2, 2), width)


def resnet50(width: int = 64) -> ResNet:
    """ResNet-50 encoder, 2048-d output at the default width."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width)


ARCHS = {"resnet18": resnet18, "resnet50": resnet50}
