"""CL-ICA's encoders of image data: 3DIdent's ResNet (official ``main_3dident.py``) and KITTI
Masks' convolutional encoder (official ``kitti_masks/model.py``, the encoder half of the
beta-VAE of ``bethgelab/slow_disentanglement``).

3DIdent (``model.arch`` ``clica_resnet18`` / ``clica_resnet50``)::

    ResNet (torchvision's, ImageNet stem, fc to 10 n) -> LeakyReLU -> Linear(10 n, n) -> norm

KITTI Masks (``model.arch = "clica_kitti_conv"``, 64 x 64 masks)::

    Conv(c, 32, 4, 2, 1) ReLU Conv(32, 32, 4, 2, 1) ReLU Conv(32, 64, 4, 2, 1) ReLU
    Conv(64, 64, 4, 2, 1) ReLU Conv(64, 256, 4, 1) ReLU flatten Linear(256, n) -> norm

with Kaiming-normal weights (fan_in, ReLU gain) and zero biases, as the official ``kaiming_init``.

The output normalisation ``norm`` is one of :data:`fastipirm.models.mlp_encoder.OUTPUT_NORMS`
(``box``: the learnable box of ``--box-constraint learnable`` / ``--box-norm 1``). With
``periodic > 0`` (3DIdent's periodic parametrisation) the last ``periodic`` code dimensions are
put on a sphere of learnable radius and the norm applies to the others
(:class:`SplitNorm`, the official concatenation of the two rescalings).
"""
from __future__ import annotations

import torch
from torch import nn

from .mlp_encoder import BoxNorm, SphereNorm
from .resnet import resnet18, resnet50

__all__ = ["CLICA_IMAGE_ARCHS", "KittiConvEncoder", "ResNetLatentEncoder", "SplitNorm",
           "output_norm_layer"]

#: ``model.arch`` -> the backbone of the 3DIdent encoder (None: KITTI's conv encoder)
CLICA_IMAGE_ARCHS = {"clica_resnet18": resnet18, "clica_resnet50": resnet50,
                     "clica_kitti_conv": None}


def output_norm_layer(norm: str, n: int) -> nn.Module:
    """The rescaling of ``n`` code dimensions: ``none``, ``fixed_sphere``, ``learnable_sphere``,
    ``fixed_box``, ``learnable_box`` (alias ``box``); radius and bounds start at 1."""
    if norm in ("none", None):
        return nn.Identity()
    if norm.endswith("sphere"):
        return SphereNorm(1.0, learnable=norm == "learnable_sphere")
    if norm in ("box", "learnable_box", "fixed_box"):
        return BoxNorm(n, 1.0, learnable=norm != "fixed_box")
    raise ValueError(f"unknown output normalisation {norm!r}")


class SplitNorm(nn.Module):
    """``cat(norm(h[:, :k]), sphere(h[:, k:]))``: the non-periodic codes rescaled by ``norm``,
    the ``periodic`` last ones on a sphere of learnable radius."""

    def __init__(self, n: int, periodic: int, norm: str):
        super().__init__()
        if not 0 < periodic < n:
            raise ValueError(f"periodic must lie in (0, {n}), got {periodic}")
        self.k = n - periodic
        self.non_periodic = output_norm_layer(norm, self.k)
        self.periodic = SphereNorm(1.0, learnable=True)

    def forward(self, h):
        return torch.cat([self.non_periodic(h[:, :self.k]), self.periodic(h[:, self.k:])], 1)


def _rescaling(n: int, norm: str, periodic: int) -> nn.Module:
    return SplitNorm(n, periodic, norm) if periodic else output_norm_layer(norm, n)


class ResNetLatentEncoder(nn.Module):
    """3DIdent's encoder: ``backbone -> fc(out, 10 n) -> LeakyReLU -> Linear(10 n, n) -> norm``.

    ``arch``: ``clica_resnet18`` or ``clica_resnet50``; ``width`` scales the backbone (64 is
    torchvision's; smaller is for CPU tests).
    """

    def __init__(self, n: int, arch: str = "clica_resnet18", *, norm: str = "none",
                 periodic: int = 0, width: int = 64, in_channels: int = 3):
        super().__init__()
        build = CLICA_IMAGE_ARCHS.get(arch)
        if build is None:
            raise ValueError(f"arch must be one of clica_resnet18, clica_resnet50, got {arch!r}")
        self.backbone = build(width, stem="imagenet", in_channels=in_channels)
        self.fc = nn.Linear(self.backbone.out_dim, 10 * n)
        self.act = nn.LeakyReLU()
        self.out = nn.Linear(10 * n, n)
        self.norm = _rescaling(n, norm, periodic)

    def forward(self, x):
        return self.norm(self.out(self.act(self.fc(self.backbone(x)))))


class KittiConvEncoder(nn.Module):
    """KITTI Masks' encoder for 64 x 64 inputs with ``in_channels`` channels (1 for masks)."""

    def __init__(self, n: int = 10, *, norm: str = "none", in_channels: int = 1):
        super().__init__()
        chans = [in_channels, 32, 32, 64, 64]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.ReLU(True)]
        layers += [nn.Conv2d(64, 256, 4, 1), nn.ReLU(True), nn.Flatten(), nn.Linear(256, n)]
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.norm = output_norm_layer(norm, n)

    def forward(self, x):
        if x.shape[-2:] != (64, 64):
            raise ValueError(f"the KITTI Masks encoder takes 64 x 64 inputs, got "
                             f"{tuple(x.shape[-2:])}")
        return self.norm(self.net(x))
