"""The encoder under torchvision's names, and the architecture a set of weights implies.

An exported backbone is a plain ``state_dict`` that loads into torchvision's ``resnet18()`` /
``resnet50()`` once their stem is made the small-image stem of the official model
(``docs/official-ipirm.md#model``): ``conv1 = Conv2d(3, 64, 3, stride 1, padding 1, bias=False)``,
``maxpool = Identity()``, ``fc = Identity()``. Its keys are torchvision's: ``conv1.weight``,
``bn1.*``, ``layer1.0.conv1.weight``, ..., ``layer2.0.downsample.0.weight``, and no ``fc``.

Our encoder (:mod:`fastipirm.models.resnet`) uses torchvision's module names, so today the
conversion renames nothing; it still goes key by key through :data:`RENAMES` and checks the
result against torchvision's layout, written out independently in :func:`torchvision_keys`, so
a renamed module here fails loudly instead of producing a file torchvision cannot load.

:func:`infer_model_keys` reads ``model.arch``, ``model.width``, ``model.hidden_dim`` and
``model.feature_dim`` off a state dict in our names (a file without a config, e.g. an official
checkpoint).
"""
from __future__ import annotations

import functools
import re
from collections import OrderedDict

from torch import Tensor

from .resnet import ARCHS

# torchvision's ResNets: block type and blocks per stage (torchvision.models.resnet)
TORCHVISION_LAYOUT = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_NBT = ".num_batches_tracked"

# (our key prefix, torchvision's key prefix): empty while our module names are torchvision's;
# a module renamed in resnet.py gets its entry here
RENAMES: tuple[tuple[str, str], ...] = ()

# what the small-image stem is (the JSON of an export records it)
SMALL_STEM = {"conv1": {"in_channels": 3, "kernel_size": 3, "stride": 1, "padding": 1,
                        "bias": False},
              "maxpool": None,
              "description": "3x3 conv, stride 1, padding 1, no bias; no max-pool (the "
                             "small-image stem of the official IP-IRM model); total stride 8"}


def torchvision_keys(arch: str) -> list[str]:
    """The ``state_dict`` keys of torchvision's ``arch`` without ``fc``, in torchvision's order."""
    if arch not in TORCHVISION_LAYOUT:
        raise ValueError(f"no torchvision layout for arch {arch!r}; known: "
                         f"{', '.join(TORCHVISION_LAYOUT)}")
    kind, layers = TORCHVISION_LAYOUT[arch]
    convs = 2 if kind == "basic" else 3

    def conv_bn(prefix: str, conv: str, bn: str) -> list[str]:
        return [f"{prefix}{conv}.weight", *(f"{prefix}{bn}.{s}" for s in _BN)]

    keys = conv_bn("", "conv1", "bn1")
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            for c in range(1, convs + 1):
                keys += conv_bn(p, f"conv{c}", f"bn{c}")
            # the first block of a stage projects its shortcut when the stride or the channel
            # count changes: stages 2-4, and stage 1 of a bottleneck ResNet (64 -> 256)
            if b == 0 and (stage > 1 or kind == "bottleneck"):
                keys += conv_bn(p, "downsample.0", "downsample.1")
    return keys


def _torchvision_name(key: str) -> str:
    for ours, theirs in RENAMES:
        if key == ours or key.startswith(ours + "."):
            return theirs + key[len(ours):]
    return key


def _our_name(key: str) -> str:
    for ours, theirs in RENAMES:
        if key == theirs or key.startswith(theirs + "."):
            return ours + key[len(theirs):]
    return key


def _check_keys(found, arch: str, what: str) -> None:
    expected = torchvision_keys(arch)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}"
                         + (" ..." if len(unexpected) > 4 else ""))
        raise ValueError(f"{what} does not match torchvision's {arch} layout: {'; '.join(parts)}")


def to_torchvision(encoder_state: dict, arch: str) -> "OrderedDict[str, Tensor]":
    """Our encoder's ``state_dict`` (keys relative to the encoder) under torchvision's names, in
    torchvision's order; ``ValueError`` unless the keys are exactly torchvision's ``arch``
    without ``fc``. The tensors are the same objects (no copy)."""
    renamed = {_torchvision_name(k): v for k, v in encoder_state.items()}
    _check_keys(renamed, arch, "the encoder's state dict")
    return OrderedDict((k, renamed[k]) for k in torchvision_keys(arch))


def from_torchvision(state: dict, arch: str) -> dict:
    """A torchvision-named backbone ``state_dict`` (no ``fc``) in our names, ``encoder.``-prefixed
    (the keys of :class:`fastipirm.models.SimCLRModel`)."""
    _check_keys(state, arch, "the backbone state dict")
    return {f"encoder.{_our_name(k)}": v for k, v in state.items()}


def torchvision_arch(state: dict) -> str:
    """The torchvision ResNet whose key set (without ``fc``) ``state`` has; ``ValueError`` if
    none."""
    for arch in TORCHVISION_LAYOUT:
        if set(state) == set(torchvision_keys(arch)):
            return arch
    raise ValueError("the keys are not those of a torchvision resnet18 or resnet50 without fc")


@functools.lru_cache(maxsize=None)
def _encoder_keys(arch: str) -> frozenset:
    """Our encoder's keys for ``arch`` (they do not depend on the width)."""
    return frozenset(f"encoder.{k}" for k in ARCHS[arch](1).state_dict())


def _blocks_per_stage(keys) -> tuple[int, ...]:
    counts = {}
    for k in keys:
        m = re.match(r"encoder\.layer(\d+)\.(\d+)\.", k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            counts[stage] = max(counts.get(stage, 0), block + 1)
    return tuple(counts[s] for s in sorted(counts))


def infer_model_keys(state: dict) -> dict:
    """``{"arch", "width"}`` and, when the projection head is present, ``{"hidden_dim",
    "feature_dim"}`` of a state dict in our names (``encoder.*``, ``g.*``); ``ValueError``
    saying what is missing when they cannot be inferred."""
    stem = state.get("encoder.conv1.weight")
    if stem is None:
        raise ValueError("cannot infer the architecture: the weights have no stem convolution "
                         "(encoder.conv1.weight; official f.0.weight)")
    if tuple(stem.shape[1:]) != (3, 3, 3):
        raise ValueError(f"cannot use these weights: the stem convolution has shape "
                         f"{tuple(stem.shape)}, not the small-image stem (width, 3, 3, 3) of "
                         "fastipirm's encoders (a 7x7 stem is an ImageNet ResNet)")
    # BN's num_batches_tracked is optional (files of old PyTorch versions lack it; BatchNorm
    # loads without it)
    keys = {k for k in state if k.startswith("encoder.") and not k.endswith(_NBT)}
    arch = next((a for a in ARCHS if keys == {k for k in _encoder_keys(a)
                                              if not k.endswith(_NBT)}), None)
    if arch is None:
        kind = "bottleneck" if "encoder.layer1.0.conv3.weight" in keys else "basic"
        blocks = "-".join(map(str, _blocks_per_stage(keys))) or "none"
        raise ValueError(f"cannot infer the architecture: {kind} blocks per stage {blocks} are "
                         "neither resnet18 (basic, 2-2-2-2) nor resnet50 (bottleneck, 3-4-6-3), "
                         "the encoders fastipirm builds")
    out = {"arch": arch, "width": int(stem.shape[0])}
    first, last = state.get("g.0.weight"), state.get("g.3.weight")
    if first is not None and last is not None:
        out.update(hidden_dim=int(first.shape[0]), feature_dim=int(last.shape[0]))
    return out
