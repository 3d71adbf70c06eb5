"""The CL-ICA MLP encoder f of the MLP-mixing experiment (official ``encoders.get_mlp`` as
``main_mlp.py`` calls it).

    f = Linear(n, 10n) LReLU Linear(10n, 50n) LReLU ... Linear(50n, 10n) LReLU Linear(10n, n) [norm]

Every Linear has a bias; ``nn.LeakyReLU()`` (slope 0.01) follows every hidden layer and not the
output layer; there are no normalisation layers. The optional output normalisation is

- ``"none"``: the raw output (official default for ``--p`` >= 1);
- ``"fixed_sphere"``: ``x / ||x|| * r`` with a fixed radius r = ``init_radius`` (1; ``--p 0``);
- ``"learnable_sphere"``: the same with a learnable scalar radius initialised to ``init_radius``
  (1; ``--sphere-norm``);
- ``"learnable_box"`` (alias ``"box"``): ``sigmoid(x) * b`` with a learnable per-dimension bound
  b initialised to ``init_bound`` (1), so outputs lie in (0, b) (``--box-norm``);
- ``"fixed_box"``: the same with b fixed.

The module is an ``nn.Sequential`` laid out as the official one, so an official ``f`` state_dict
loads as is (``0.weight`` ... ``12.bias``, then ``13.r`` or ``13.max_abs_bound`` when learnable).
"""
from __future__ import annotations

from collections import OrderedDict

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CLICA_HIDDEN_MULTIPLIERS", "MLP_ARCHS", "OUTPUT_NORMS", "BoxNorm", "MLPEncoder",
           "SphereNorm"]

CLICA_HIDDEN_MULTIPLIERS = (10, 50, 50, 50, 50, 10)
#: the ``model.arch`` names of the encoder (CL-ICA's MLP experiment)
MLP_ARCHS = ("clica_mlp",)
OUTPUT_NORMS = ("none", "fixed_sphere", "learnable_sphere", "fixed_box", "learnable_box", "box")


class SphereNorm(nn.Module):
    """Rescale each vector to norm ``r`` (official ``RescaleLayer``, mode "eq"; no epsilon)."""

    def __init__(self, init_radius: float = 1.0, learnable: bool = False):
        super().__init__()
        self.learnable = learnable
        r = torch.full((1,), float(init_radius))
        if learnable:
            self.r = nn.Parameter(r)
        else:
            self.register_buffer("r", r, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.r.to(x.dtype)

    def extra_repr(self) -> str:
        return f"learnable={self.learnable}"


class BoxNorm(nn.Module):
    """``sigmoid(x) * max_abs_bound`` with a per-dimension bound (official ``SoftclipLayer``)."""

    def __init__(self, n: int, init_bound: float = 1.0, learnable: bool = True):
        super().__init__()
        self.learnable = learnable
        b = torch.full((n,), float(init_bound))
        if learnable:
            self.max_abs_bound = nn.Parameter(b)
        else:
            self.register_buffer("max_abs_bound", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * self.max_abs_bound.to(x.dtype).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"n={self.max_abs_bound.numel()}, learnable={self.learnable}"


class MLPEncoder(nn.Sequential):
    """CL-ICA encoder n -> m_1 n -> ... -> m_k n -> n_out (official multipliers 10,50,50,50,50,10).

    ``n_out`` defaults to ``n``; ``negative_slope`` is the hidden LeakyReLU's (official 0.01);
    ``init_radius``/``init_bound`` initialise the sphere radius / box bound (official 1).
    """

    def __init__(self, n: int, hidden_multipliers: Sequence[int] = CLICA_HIDDEN_MULTIPLIERS,
                 output_norm: str | None = "none", *, n_out: int | None = None,
                 negative_slope: float = 0.01, init_radius: float = 1.0,
                 init_bound: float = 1.0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        n_out = n if n_out is None else n_out
        if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
            raise ValueError(f"n_out must be an int >= 1, got {n_out!r}")
        mults = tuple(hidden_multipliers)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
            raise ValueError(f"hidden_multipliers must be ints >= 1, got {hidden_multipliers!r}")
        if output_norm is None:
            output_norm = "none"
        if output_norm not in OUTPUT_NORMS:
            raise ValueError(f"output_norm must be one of {OUTPUT_NORMS}, got {output_norm!r}")
        if output_norm == "box":
            output_norm = "learnable_box"
        if not float(negative_slope) >= 0.0:
            raise ValueError(f"negative_slope must be >= 0, got {negative_slope}")
        if output_norm.endswith("sphere") and not float(init_radius) > 0.0:
            raise ValueError(f"init_radius must be > 0, got {init_radius}")
        if output_norm.endswith("box") and not float(init_bound) > 0.0:
            raise ValueError(f"init_bound must be > 0, got {init_bound}")
        widths = [n] + [m * n for m in mults] + [n_out]
        modules: list[nn.Module] = []
        for i in range(len(widths) - 1):
            modules.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                modules.append(nn.LeakyReLU(negative_slope))
        if output_norm == "fixed_sphere":
            modules.append(SphereNorm(init_radius, learnable=False))
        elif output_norm == "learnable_sphere":
            modules.append(SphereNorm(init_radius, learnable=True))
        elif output_norm == "fixed_box":
            modules.append(BoxNorm(n_out, init_bound, learnable=False))
        elif output_norm == "learnable_box":
            modules.append(BoxNorm(n_out, init_bound, learnable=True))
        super().__init__(*modules)
        self.n = n
        self.n_out = n_out
        self.output_norm = output_norm

    def __getitem__(self, idx):
        # a slice is a plain nn.Sequential (this class's constructor takes other arguments)
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Output widths of the Linear layers, e.g. (100, 500, 500, 500, 500, 100, 10) for n=10."""
        return tuple(m.out_features for m in self if isinstance(m, nn.Linear))
