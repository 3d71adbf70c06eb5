"""DCoDR's reconstruction loss: pixel L1 plus VGG16 feature L1 distances (official
``model/modules.py``: ``PerceptualDistance`` and ``NetVGGFeatures``, from LORD;
``docs/dcodr-models.md``).

For a generated batch x_hat and the real batch x (N, C, H, W), both in [0, 1]:

    loss = mean_n [ mean |x_hat_n - x_n| + sum_l mean |phi_l(x_hat_n) - phi_l(x_n)| ]

every term with weight 1, each ``mean`` over all elements of one sample (C*H*W, or the feature
map's size), then the mean over the batch. phi_l are torchvision VGG16 ``features`` taps at the
official indices (2, 7, 12, 21, 30): conv1_2, conv2_2, conv3_2, conv4_3 and pool5. torchvision's
ReLUs are in-place and the official code reads each tap by keeping a reference to the module's
output and running on, so the ReLU that follows a conv overwrites the stored tensor: the
features the official loss really compares are the *post-ReLU* relu1_2, relu2_2, relu3_2, relu4_3
and pool5. :class:`VGG16Features` reads them so explicitly (a conv index is read after its ReLU).

Input: no ImageNet mean/std normalisation (the official feeds the [0, 1] images to the VGG as
they are); 1-channel images are tiled to 3 channels (the official trainer tiles both images
before the loss; the pixel term is unchanged by the tiling).

Deliberate deviation: the VGG is **frozen** here (``requires_grad=False``, eval mode; gradients
still flow to the generated images). The official ``PerceptualDistance`` leaves the pretrained
VGG's parameters trainable but never gives them to the optimizer, so every backward pass
computes VGG weight gradients that are discarded (and zeroed by no one); the loss value and
every gradient the optimizer uses are the same. The VGG16 ``features`` have no dropout or
batch norm, so eval mode changes nothing numerically either.

Weights: torchvision's ImageNet VGG16, ``vgg16-397923af.pth``
(https://download.pytorch.org/models/vgg16-397923af.pth; the official code gets it through
``torchvision.models.vgg16(pretrained=True)``). :func:`load_vgg16` reads that file (its
``classifier.*`` tensors are ignored); torchvision is not needed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from torch import Tensor, nn

from ..models.weights_file import check_fit, read_weights

__all__ = ["VGG16_CFG", "VGG16_LAYER_IDS", "VGG16_URL", "PerceptualDistance", "VGG16Features",
           "load_vgg16", "perceptual_distance"]

#: torchvision's VGG16 ("D") configuration: conv output channels, "M" = 2x2 max-pool
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")
#: the official taps in ``features`` (conv1_2, conv2_2, conv3_2, conv4_3, pool5)
VGG16_LAYER_IDS = (2, 7, 12, 21, 30)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` (31 modules: 3x3 convs with padding 1, in-place ReLUs,
    2x2 max-pools), laid out as torchvision so its ``features.N.*`` keys load.

    ``forward(x, layer_ids)`` returns the feature maps at ``layer_ids`` (indices into
    ``features``, increasing): a conv index is read after the in-place ReLU that follows it
    (what the official loop sees, module docstring), any other index at the module's output.
    Only the modules up to the last requested index run. Random init as torchvision's
    (Kaiming-normal fan_out convs, zero biases); use :func:`load_vgg16` for the real weights.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _check(self, layer_ids: Sequence[int]) -> tuple[int, ...]:
        ids = tuple(int(i) for i in layer_ids)
        n = len(self.features)
        if not ids or any(i < 0 or i >= n for i in ids) or list(ids) != sorted(set(ids)):
            raise ValueError(f"layer_ids must be increasing indices in [0, {n}), got {layer_ids}")
        return ids

    def read_indices(self, layer_ids: Sequence[int]) -> tuple[int, ...]:
        """The module after which each tap of ``layer_ids`` is read: a conv's following ReLU,
        otherwise the module itself."""
        ids = self._check(layer_ids)
        f = self.features
        return tuple(i + 1 if isinstance(f[i], nn.Conv2d) and i + 1 < len(f)
                     and isinstance(f[i + 1], nn.ReLU) else i for i in ids)

    def forward(self, x: Tensor, layer_ids: Sequence[int] = VGG16_LAYER_IDS) -> list[Tensor]:
        reads = self.read_indices(layer_ids)
        taps: dict[int, Tensor] = {}
        for i, module in enumerate(self.features[: reads[-1] + 1]):
            x = module(x)
            if i in reads:
                taps[i] = x
        return [taps[r] for r in reads]


def load_vgg16(path: str | os.PathLike) -> VGG16Features:
    """The frozen (``requires_grad=False``, eval mode) :class:`VGG16Features` with the weights of
    a torchvision-format VGG16 file at ``path`` (``vgg16-397923af.pth``: a state dict with
    ``features.N.weight/bias`` and ``classifier.*``; the classifier is ignored, a
    ``{"state_dict": ...}`` wrapper is accepted).

    ``FileNotFoundError`` for a missing file, naming where to get it; ``ValueError`` naming the
    missing/unexpected keys or mismatched shapes.
    """
    obj = read_weights(path, "VGG16 weights",
                       f"download torchvision's ImageNet VGG16 {VGG16_URL} (vgg16-397923af.pth)")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a VGG16 state dict")
    vgg = VGG16Features()
    state = {k: v for k, v in obj.items() if not str(k).startswith("classifier.")}
    check_fit(vgg.state_dict(), state, path,
              "a torchvision VGG16 state dict (features.N.* keys)")
    vgg.load_state_dict(state, strict=True)
    return _freeze(vgg)



def _freeze(vgg: VGG16Features) -> VGG16Features:
    vgg.requires_grad_(False)
    return vgg.eval()


def perceptual_distance(generated: Tensor, target: Tensor, vgg: VGG16Features,
                        layer_ids: Sequence[int] = VGG16_LAYER_IDS) -> Tensor:
    """The official loss (module docstring) as a scalar: per-sample pixel L1 mean plus the
    per-sample L1 means of the VGG features at ``layer_ids``, averaged over the batch. Both
    images (N, C, H, W) in [0, 1], C = 1 or 3. ``vgg`` is used as given (freeze it: see
    :class:`PerceptualDistance`)."""
    if generated.shape != target.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    if generated.dim() != 4 or generated.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(generated.shape)}")
    if generated.shape[1] == 1:
        generated, target = generated.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
    n = generated.shape[0]
    loss = (generated - target).abs().reshape(n, -1).mean(1)
    # two passes, as the official: the real images' pass builds no graph (frozen VGG, target
    # without grad), where one concatenated pass would back-propagate through both halves
    for f_gen, f_real in zip(vgg(generated, layer_ids), vgg(target, layer_ids)):
        loss = loss + (f_gen - f_real).abs().reshape(n, -1).mean(1)
    return loss.mean()


class PerceptualDistance(nn.Module):
    """``forward(generated, target) -> scalar`` (:func:`perceptual_distance`) with a frozen VGG16.

    ``vgg``: a :class:`VGG16Features` (e.g. from :func:`load_vgg16`); it is frozen here and kept
    in eval mode by :meth:`train`. ``layer_ids``: the official (2, 7, 12, 21, 30) by default.
    """

    def __init__(self, vgg: VGG16Features, layer_ids: Sequence[int] = VGG16_LAYER_IDS):
        super().__init__()
        self.vgg = _freeze(vgg)
        self.layer_ids = vgg._check(layer_ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike,
                  layer_ids: Sequence[int] = VGG16_LAYER_IDS) -> "PerceptualDistance":
        """With the torchvision VGG16 weights at ``path`` (:func:`load_vgg16`)."""
        return cls(load_vgg16(path), layer_ids)

    def train(self, mode: bool = True) -> "PerceptualDistance":
        super().train(mode)
        self.vgg.eval()
        return self

    def forward(self, generated: Tensor, target: Tensor) -> Tensor:
        return perceptual_distance(generated, target, self.vgg, self.layer_ids)

    def extra_repr(self) -> str:
        return f"layer_ids={self.layer_ids}, frozen VGG16"
