"""DCoDR's reconstruction generator (official ``model/modules.py``: ``Generator_Only_Model``,
``Modulation``, ``Generator``, ``AdaptiveInstanceNorm2d``; LORD's AdaIN generator;
``docs/dcodr-models.md``).

    e   = class_embedding[d]                                   (N, 256), one learned row per domain
    p_l = adain_per_layer[l](e)  -> (N, 256, 2), l = 0..3     [..., 0] AdaIN bias, [..., 1] weight
    c   = normalize(code)                                      (N, 128), L2 over dim 1
    h   = fc_layers(c): Linear(128, 16*32) LReLU Linear(16*32, 16*64) LReLU Linear(16*64, 16*256)
          LReLU, reshaped to (N, 256, H/16, W/16)
    4 x [Upsample x2 (nearest), Conv3x3(256, 256, pad 1), LReLU, AdaIN(p_l)]
    Conv5x5(256, 64, pad 2), LReLU, [Conv5x5(64, 64, pad 2), LReLU  iff W == 128],
    Conv7x7(64, C, pad 3), Sigmoid                             -> (N, C, H, W) in (0, 1)

``16*32`` etc. read ``(H/16)(W/16) * width/8``: the fc widths are the initial map's area times
width/8, width/4 and width (width = AdaIN dim = 256). Every LeakyReLU is PyTorch's default
(slope 0.01). AdaIN is instance normalisation with a per-sample, per-channel affine:

    AdaIN(x)[n, c] = (x[n, c] - mean_hw x[n, c]) / sqrt(var_hw x[n, c] + 1e-5) * w[n, c] + b[n, c]

with the biased variance; the official computes it as ``F.batch_norm`` on the (1, N*C, H, W)
reshape in training mode, which is the same statistic. The 2*256 outputs of each modulation
head are *interleaved*: bias = out[0::2], weight = out[1::2] (the official reshape of the
concatenated heads to (N, 4, 256, 2)).

The code is L2-normalised inside :meth:`DCoDRGenerator.forward` (``normalize_code=True``): the
official trainer feeds ``F.normalize(code)`` to the generator (``train_DCoDR`` and
``generate_samples``), not the raw encoder output.

Initialisation: the domain embedding U(-0.05, 0.05) (official ``init_LO``); every Linear and Conv
PyTorch's default. The official learning rates are 3e-4 for ``modulation`` + ``generator`` and
3e-3 for ``class_embedding`` (:meth:`DCoDRGenerator.param_groups`).

Parameter layout: the attribute names are the official ones (``class_embedding.weight``,
``modulation.adain_per_layer.{l}.*``, ``generator.fc_layers.{0,2,4}.*``,
``generator.adain_conv_layers.{1,5,9,13}.*``, ``generator.last_conv_layers.{0,2}.*``), so an
official ``generator_<epoch>.pth`` loads after :func:`convert_official_generator_state_dict`
drops the ``module.`` components of ``nn.DataParallel``.

``width`` (256) and ``last_width`` (64) are the official fixed channel counts; smaller values
are for CPU-scale tests only.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaINGenerator", "AdaptiveInstanceNorm2d", "DCoDRGenerator", "Modulation",
           "convert_official_generator_state_dict"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Modulation(nn.Module):
    """Domain embedding -> AdaIN parameters: ``n_adain_layers`` Linear(class_dim, 2 adain_dim)
    heads; ``forward(e (N, class_dim)) -> (N, n_adain_layers, adain_dim, 2)`` with index 0 of the
    last axis the bias and 1 the weight (even / odd outputs of each head)."""

    def __init__(self, class_dim: int = 256, n_adain_layers: int = 4, adain_dim: int = 256):
        super().__init__()
        self.n_adain_layers = n_adain_layers
        self.adain_dim = adain_dim
        self.adain_per_layer = nn.ModuleList(
            [nn.Linear(class_dim, 2 * adain_dim) for _ in range(n_adain_layers)])

    def forward(self, e: Tensor) -> Tensor:
        heads = torch.stack([head(e) for head in self.adain_per_layer], dim=1)
        return heads.unflatten(-1, (self.adain_dim, 2))


class AdaptiveInstanceNorm2d(nn.Module):
    """Instance normalisation with a per-sample affine (module docstring); ``forward(x, params)``
    with ``params`` (N, C, 2): ``[..., 0]`` bias, ``[..., 1]`` weight. No parameters of its own:
    the weights come from :class:`Modulation`."""

    def __init__(self, adain_layer_idx: int, eps: float = 1e-5):
        super().__init__()
        self.adain_layer_idx = adain_layer_idx
        self.eps = eps

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        if params.shape != (x.shape[0], x.shape[1], 2):
            raise ValueError(f"AdaIN parameters of shape {tuple(params.shape)} do not fit a "
                             f"feature map {tuple(x.shape)}; expected ({x.shape[0]}, "
                             f"{x.shape[1]}, 2)")
        bias, weight = params[..., 0], params[..., 1]
        normed = F.instance_norm(x, eps=self.eps)
        return torch.addcmul(bias[:, :, None, None], normed, weight[:, :, None, None])

    def extra_repr(self) -> str:
        return f"adain_layer_idx={self.adain_layer_idx}, eps={self.eps}"


class AdaINGenerator(nn.Module):
    """LORD's generator (official ``Generator`` with ``use_AdaIN=True``): ``forward(code (N,
    content_dim), adain_params (N, n_adain_layers, width, 2)) -> image (N, C, H, W)``. The code is
    used as given (:class:`DCoDRGenerator` normalises it)."""

    def __init__(self, content_dim: int = 128, image_size: int | tuple[int, int] = 64,
                 channels: int = 3, *, n_adain_layers: int = 4, width: int = 256,
                 last_width: int = 64):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for name, value in (("content_dim", content_dim), ("image height", h),
                            ("image width", w), ("channels", channels),
                            ("n_adain_layers", n_adain_layers), ("last_width", last_width)):
            _positive_int(name, value)
        if _positive_int("width", width) < 8:
            raise ValueError(f"width must be >= 8 (the first fc layer has width // 8 channels "
                             f"per position), got {width}")
        scale = 2 ** n_adain_layers
        if h % scale or w % scale:
            raise ValueError(f"image size {h}x{w} is not divisible by 2**n_adain_layers = {scale}")
        self.image_size = (h, w)
        self.channels = channels
        self.width = width
        self.n_adain_layers = n_adain_layers
        self.initial_size = (h // scale, w // scale)
        area = self.initial_size[0] * self.initial_size[1]
        self.fc_layers = nn.Sequential(
            nn.Linear(content_dim, area * (width // 8)), nn.LeakyReLU(),
            nn.Linear(area * (width // 8), area * (width // 4)), nn.LeakyReLU(),
            nn.Linear(area * (width // 4), area * width), nn.LeakyReLU(),
        )
        blocks: list[nn.Module] = []
        for i in range(n_adain_layers):
            blocks += [nn.Upsample(scale_factor=(2, 2)),
                       nn.Conv2d(width, width, kernel_size=3, padding=1),
                       nn.LeakyReLU(),
                       AdaptiveInstanceNorm2d(i)]
        self.adain_conv_layers = nn.Sequential(*blocks)
        last: list[nn.Module] = [nn.Conv2d(width, last_width, kernel_size=5, padding=2),
                                 nn.LeakyReLU()]
        if w == 128:    # the official adds this layer for 128-pixel-wide images only
            last += [nn.Conv2d(last_width, last_width, kernel_size=5, padding=2), nn.LeakyReLU()]
        last += [nn.Conv2d(last_width, channels, kernel_size=7, padding=3), nn.Sigmoid()]
        self.last_conv_layers = nn.Sequential(*last)

    def forward(self, code: Tensor, adain_params: Tensor) -> Tensor:
        expected = (code.shape[0], self.n_adain_layers, self.width, 2)
        if tuple(adain_params.shape) != expected:
            raise ValueError(f"adain_params has shape {tuple(adain_params.shape)}, expected "
                             f"{expected}")
        x = self.fc_layers(code).view(-1, self.width, *self.initial_size)
        for module in self.adain_conv_layers:
            if isinstance(module, AdaptiveInstanceNorm2d):
                x = module(x, adain_params[:, module.adain_layer_idx])
            else:
                x = module(x)
        return self.last_conv_layers(x)


class DCoDRGenerator(nn.Module):
    """Domain embedding + modulation + AdaIN generator (official ``Generator_Only_Model``):
    ``forward(code (N, content_dim), domain (N,) int64) -> image (N, channels, H, W)``.

    ``n_domains``: rows of the domain embedding (the dataset's number of domain classes).
    ``content_dim`` 128 and ``class_dim`` 256 are the official values of every run.
    ``image_size`` (int or (H, W); 64 for every 64x64 dataset) and ``channels`` follow the data.
    ``width``/``last_width``: the official 256/64 channels; smaller only for CPU tests.
    ``normalize_code``: L2-normalise the code first, as the official trainer does.
    """

    def __init__(self, n_domains: int, *, content_dim: int = 128, class_dim: int = 256,
                 image_size: int | tuple[int, int] = 64, channels: int = 3,
                 n_adain_layers: int = 4, width: int = 256, last_width: int = 64,
                 normalize_code: bool = True):
        super().__init__()
        _positive_int("n_domains", n_domains)
        _positive_int("class_dim", class_dim)
        self.class_embedding = nn.Embedding(n_domains, class_dim)
        self.modulation = Modulation(class_dim, n_adain_layers, width)
        self.generator = AdaINGenerator(content_dim, image_size, channels,
                                        n_adain_layers=n_adain_layers, width=width,
                                        last_width=last_width)
        self.normalize_code = normalize_code
        self.n_domains = n_domains
        self.reset_embedding()

    def reset_embedding(self) -> None:
        """The official ``init_LO``: the domain embedding ~ U(-0.05, 0.05)."""
        nn.init.uniform_(self.class_embedding.weight, -0.05, 0.05)

    def adain_params(self, domain: Tensor) -> Tensor:
        """(N, n_adain_layers, width, 2): the AdaIN bias ([..., 0]) and weight ([..., 1])."""
        return self.modulation(self.class_embedding(domain))

    def forward(self, code: Tensor, domain: Tensor) -> Tensor:
        if code.shape[0] != domain.shape[0]:
            raise ValueError(f"{code.shape[0]} codes but {domain.shape[0]} domain labels")
        if self.normalize_code:
            code = F.normalize(code, dim=1)
        return self.generator(code, self.adain_params(domain))

    def param_groups(self, lr: float = 3e-4, embedding_lr: float = 3e-3) -> list[dict]:
        """Optimizer groups as the official: modulation + generator at ``lr`` (official 3e-4, or
        ``--gen-lr``), the domain embedding at ``embedding_lr`` (official 3e-3)."""
        return [{"params": [*self.modulation.parameters(), *self.generator.parameters()],
                 "lr": lr},
                {"params": list(self.class_embedding.parameters()), "lr": embedding_lr}]


def convert_official_generator_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official ``Generator_Only_Model`` state dict (``class_embedding.module.weight``,
    ``generator.module.fc_layers.0.weight``, ...) under :class:`DCoDRGenerator`'s names: every
    ``module.`` path component of ``nn.DataParallel`` is removed."""
    return {re.sub(r"(^|\.)module\.", r"\1", k): v for k, v in state.items()}
