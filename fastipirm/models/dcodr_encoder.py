"""DCoDR's content encoder (official ``model/modules.py``: ``Moco_Resnet50`` inside
``Encoder_Model``; ``docs/dcodr-models.md``).

    x (N, C, H, W) in [0, 1], no mean/std normalisation; C = 1 is tiled to 3 channels
    -> ResNet-50 (torchvision's, ImageNet stem, global-average-pooled, 2048-d)
    -> Linear(2048, 2048)       MoCo v2's first head layer, kept *without* its ReLU
    -> Linear(2048, 128)        the content code (``content_dim``)
    [-> Linear(128, 128) LeakyReLU Linear(128, 128) LeakyReLU Linear(128, 128)]   fc_head=True

The optional head (official ``use_fc_head``; only DCoDR's SmallNorb run enables it) uses
``nn.LeakyReLU()`` (slope 0.01) between its layers and nothing after the last one. The code is
returned unnormalised; the contrastive loss and the generator L2-normalise it themselves.

Parameter layout: the attributes mirror the official modules, so that the official encoder's
``state_dict`` (``content_encoder.module.resnet50.*``, ``content_encoder.module.fc_layers.0.*``,
``siamese.module.{0,2,4}.*``) loads after :func:`convert_official_encoder_state_dict` drops the
``module.`` components that ``nn.DataParallel`` inserts:

- ``content_encoder.resnet50``: :func:`fastipirm.models.resnet.resnet50` (torchvision's module
  names) with the MoCo head layer attached as ``resnet50.fc = Sequential(Linear(2048, 2048))``,
  exactly where the official model puts it (torchvision's ``fc`` slot);
- ``content_encoder.fc_layers = Sequential(Linear(2048, content_dim))``;
- ``siamese = Sequential(Linear, LeakyReLU, Linear, LeakyReLU, Linear)`` when ``fc_head``.

Initialisation: the backbone as torchvision's ResNet-50 (Kaiming-normal convs, BN 1/0), every
Linear PyTorch's default; the official ``init_LO`` touches only ``nn.Embedding`` modules, of which
the encoder has none. :func:`load_moco_v2` then overwrites the backbone and ``fc.0`` with the MoCo
v2 weights (the official ``use_pretrain=True``, used by every DCoDR run except the
"no pretraining" ablation).

``width`` (default 64, torchvision's) scales the backbone's channels for small CPU runs; the head
layers then take the backbone's ``out_dim = 32 * width`` instead of 2048.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import Tensor, nn

from .resnet import ResNet, resnet50
from .weights_file import check_fit, names, read_weights

__all__ = ["MOCO_V2_FILE", "MOCO_V2_PREFIX", "MOCO_V2_URL", "DCoDREncoder", "MoCoResNet50",
           "convert_official_encoder_state_dict", "load_moco_v2", "moco_v2_strip_and_drop"]

#: where the official MoCo v2 800-epoch ImageNet checkpoint is published
MOCO_V2_URL = ("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
               "moco_v2_800ep_pretrain.pth.tar")
#: the name the official DCoDR code reads it under (``pretrained_weights/<this>``)
MOCO_V2_FILE = "moco_v2_800ep_pretrain.pth"
#: every key of the checkpoint's ``state_dict`` starts with this (DDP wrapper + query encoder)
MOCO_V2_PREFIX = "module.encoder_q."


#: the ``model.arch`` of DCoDR's encoder
DCODR_ARCHS = ("dcodr_resnet50",)


class MoCoResNet50(nn.Module):
    """ResNet-50 -> MoCo head layer ``resnet50.fc.0`` (no ReLU) -> ``fc_layers.0`` to the code
    (official ``Moco_Resnet50``)."""

    def __init__(self, content_dim: int = 128, *, width: int = 64):
        super().__init__()
        self.resnet50: ResNet = resnet50(width, stem="imagenet", in_channels=3)
        d = self.resnet50.out_dim
        # torchvision's fc slot, as the official model replaces it; ResNet.forward does not call
        # it (the module has no fc of its own), so forward() below applies it after the pooling.
        self.resnet50.fc = nn.Sequential(nn.Linear(d, d))
        self.fc_layers = nn.Sequential(nn.Linear(d, content_dim))
        self.backbone_dim = d
        self.content_dim = content_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.tile((1, 3, 1, 1))
        return self.fc_layers(self.resnet50.fc(self.resnet50(x)))


class DCoDREncoder(nn.Module):
    """DCoDR's encoder: ``forward(x (N, C, H, W) in [0, 1]) -> code (N, content_dim)``.

    ``content_dim``: 128 in every official run. ``fc_head``: the three-layer 128 -> 128 head with
    LeakyReLU (official ``--use-fc-head``, on only for SmallNorb with reconstruction).
    ``width``: the backbone's base width (64 = torchvision's ResNet-50; smaller for CPU tests).
    ``negative_slope``: the head's LeakyReLU slope (official: PyTorch's default 0.01).
    The weights are random; call :func:`load_moco_v2` for the official initialisation.
    """

    def __init__(self, content_dim: int = 128, *, fc_head: bool = False, width: int = 64,
                 negative_slope: float = 0.01):
        super().__init__()
        for name, value in (("content_dim", content_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not float(negative_slope) >= 0.0:
            raise ValueError(f"negative_slope must be >= 0, got {negative_slope}")
        self.content_encoder = MoCoResNet50(content_dim, width=width)
        self.fc_head = bool(fc_head)
        if self.fc_head:
            c = content_dim
            self.siamese = nn.Sequential(
                nn.Linear(c, c), nn.LeakyReLU(negative_slope),
                nn.Linear(c, c), nn.LeakyReLU(negative_slope),
                nn.Linear(c, c),
            )
        self.content_dim = content_dim
        self.width = width

    @property
    def backbone_dim(self) -> int:
        """The pooled ResNet feature size (2048 at width 64)."""
        return self.content_encoder.backbone_dim

    def forward(self, x: Tensor) -> Tensor:
        z = self.content_encoder(x)
        return self.siamese(z) if self.fc_head else z


def convert_official_encoder_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official ``Encoder_Model`` state dict (``content_encoder.module.resnet50.conv1.weight``,
    ..., ``siamese.module.0.weight``) under :class:`DCoDREncoder`'s names: every ``module.``
    path component that ``nn.DataParallel`` inserts is removed."""
    return {re.sub(r"(^|\.)module\.", r"\1", k): v for k, v in state.items()}


def moco_v2_strip_and_drop(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The official loader's key rule: strip the first two dotted components of every key
    (``module.encoder_q.``) and drop the *last two* tensors in file order (the second MoCo head
    layer, ``fc.2.weight``/``fc.2.bias`` in the official file). Returns ``(kept, dropped names)``.

    Unlike the official rule, which strips any two components, a key that does not start with
    ``module.encoder_q.`` is an error (``ValueError`` naming it): such a file is not the query
    encoder of a MoCo checkpoint, and stripping would silently mix e.g. ``encoder_k`` weights in.
    """
    foreign = [k for k in state if not k.startswith(MOCO_V2_PREFIX)]
    if foreign:
        raise ValueError(f"not a MoCo v2 checkpoint: {len(foreign)} key(s) do not start with "
                         f"{MOCO_V2_PREFIX!r}: {names(foreign)}")
    stripped = {".".join(k.split(".")[2:]): v for k, v in state.items()}
    keys = list(stripped)
    return {k: stripped[k] for k in keys[:-2]}, keys[-2:]



def load_moco_v2(encoder: DCoDREncoder | MoCoResNet50, path: str | os.PathLike) -> list[str]:
    """Initialise the backbone and the MoCo head layer (``resnet50.fc.0``) of ``encoder`` from the
    official MoCo v2 checkpoint at ``path``, as the official ``Moco_Resnet50`` does: read the
    file's ``state_dict``, apply :func:`moco_v2_strip_and_drop`, load strictly. The content layer
    ``fc_layers`` and the optional head keep their initialisation.

    Returns the (stripped) names of the two dropped tensors (``['fc.2.weight', 'fc.2.bias']`` for
    the official file). ``FileNotFoundError`` for a missing file (naming where to get it);
    ``ValueError`` naming the missing/unexpected keys or mismatched shapes.
    """
    obj = read_weights(path, "MoCo v2 checkpoint",
                       f"download the official MoCo release {MOCO_V2_URL} (the DCoDR code reads "
                       f"it as pretrained_weights/{MOCO_V2_FILE})")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        what = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{str(path)!r} is not a MoCo v2 checkpoint: expected a dict with a "
                         f"'state_dict' entry, found {what}")
    try:
        kept, dropped = moco_v2_strip_and_drop(obj["state_dict"])
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None
    target = encoder.content_encoder.resnet50 if isinstance(encoder, DCoDREncoder) else \
        encoder.resnet50
    check_fit(target.state_dict(), kept, path,
              f"the DCoDR ResNet-50 of width {target.conv1.out_channels} after stripping "
              f"{MOCO_V2_PREFIX!r} and dropping the last two tensors ({', '.join(dropped)})")
    target.load_state_dict(kept, strict=True)
    return dropped
