"""The official SimCLR/IP-IRM network (``model.py`` of DCL and IP-IRM;
``docs/official-ipirm.md#model``).

    h = encoder(x)                                   # ResNet, global-average-pooled, unnormalised
    g(h) = Linear(d -> 512, bias=False) -> BatchNorm1d(512) -> ReLU -> Linear(512 -> feature_dim)
    forward(x) = (normalize(h), normalize(g(h)))     # both L2-normalised along the last dim

normalize(g(h)) (128-d) enters every contrastive/IRM loss and the partition features;
normalize(h) feeds the kNN monitor; the linear probe reads the unnormalised ``encoder(x)``.
The head's modules keep the official indices (g.0 linear, g.1 BN, g.2 ReLU, g.3 linear), and
:func:`convert_official_state_dict` maps an official checkpoint (``f.*``/``g.*``, optionally with
the ``module.`` prefix of DataParallel) onto this module.
"""
from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import ARCHS

# official f = Sequential(conv1, bn1, relu, layer1, layer2, layer3, layer4, avgpool)
_OFFICIAL_F = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}


class SimCLRModel(nn.Module):
    """Encoder + projection head. ``arch`` is "resnet50" (official) or "resnet18".

    ``width`` scales the ResNet channels (64 = official) and ``hidden_dim`` is the head's hidden
    width (512 = official); change them only for quick small-scale runs.
    """

    def __init__(self, arch: str = "resnet50", feature_dim: int = 128, *, width: int = 64,
                 hidden_dim: int = 512):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        self.arch = arch
        self.encoder = ARCHS[arch](width)
        self.feature_dim = feature_dim
        self.g = nn.Sequential(
            nn.Linear(self.encoder.out_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, feature_dim, bias=True),
        )

    @property
    def encoder_dim(self) -> int:
        """Dimension of h (512 for ResNet-18, 2048 for ResNet-50 at the default width)."""
        return self.encoder.out_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return F.normalize(h, dim=-1), F.normalize(self.g(h), dim=-1)


def convert_official_state_dict(state: dict) -> dict:
    """Rename an official IP-IRM/DCL ``Model`` state dict (``[module.]f.N.*``, ``g.N.*``) to
    ours."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        m = re.match(r"f\.(\d+)\.(.*)", key)
        if m:
            if m.group(1) not in _OFFICIAL_F:
                raise KeyError(f"official key {key!r} has no counterpart in the encoder")
            key = f"encoder.{_OFFICIAL_F[m.group(1)]}.{m.group(2)}"
        elif not key.startswith("g."):
            raise KeyError(f"unexpected key {key!r} in an official checkpoint")
        out[key] = value
    return out


def load_pretrained(model: SimCLRModel, path) -> None:
    """Initialise ``model`` from a file: a fastipirm checkpoint (its ``model``), a state dict, or an
    official IP-IRM/DCL checkpoint (``f.*``/``g.*`` keys, optionally ``module.``-prefixed)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("f.") for k in state):
        state = convert_official_state_dict(state)
    model.load_state_dict(state)


def official_state_dict(state: dict, *, data_parallel: bool = True) -> dict:
    """Our ``SimCLRModel`` state dict under the official ``Model``'s names (the inverse of
    :func:`convert_official_state_dict`): ``encoder.conv1.*`` -> ``f.0.*``, ..., ``g.*`` kept;
    with ``data_parallel`` every key gets the ``module.`` prefix, as the official scripts save
    it (``nn.DataParallel``, ``docs/official-ipirm.md#model``)."""
    to_index = {name: index for index, name in _OFFICIAL_F.items()}
    prefix = "module." if data_parallel else ""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            module, rest = key.removeprefix("encoder.").split(".", 1)
            if module not in to_index:
                raise KeyError(f"key {key!r} has no counterpart in the official model")
            key = f"f.{to_index[module]}.{rest}"
        elif not key.startswith("g."):
            raise KeyError(f"key {key!r} is not a SimCLRModel key")
        out[prefix + key] = value
    return out
