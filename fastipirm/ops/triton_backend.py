"""Backend ``"triton"``: the Triton kernels of :mod:`fastipirm.kernels.env_contrastive`.

The three kernels of :mod:`fastipirm.ops.fused` (row statistics, band reductions, gradients) as
Triton row-block kernels (``docs/kernels.md`` has their decomposition), wrapped here as a
:class:`~fastipirm.ops.fused.FusedKernels` set and registered as the ``torch.library`` custom ops
``fastipirm::env_contrastive_triton_{fwd,bwd}`` (:mod:`fastipirm.ops.custom_ops`), so a training
step with it compiles with ``fullgraph=True``. float32 statistics; float64 inputs are computed in
float32 and returned (with their gradients) as float64.

Importing this module imports Triton and decorates the kernels: on CPU tensors they run only in
Triton's interpreter, which ``TRITON_INTERPRET=1`` must select before that first import
(:func:`fastipirm.kernels.utils.is_interpreter`). The registry
(:mod:`fastipirm.ops.backends`) imports it lazily.
"""
from __future__ import annotations

import torch

from ..kernels import env_contrastive as K
from .fused import FusedKernels, fused_eager, register_fused_backend
from .spec import EnvContrastiveSpec


class TritonKernels(FusedKernels):
    """The Triton kernels behind :mod:`fastipirm.ops.fused` (float32 statistics)."""

    name = "triton"

    def check(self, z1: torch.Tensor) -> None:
        if z1.device.type != "cuda" and not K.INTERPRETED:
            raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 with "
                               f"CPU tensors); got {z1.device.type} tensors")
        if z1.shape[1] > K.MAX_D:
            raise ValueError(f"the triton backend supports feature dimensions up to {K.MAX_D}; "
                             f"got D={z1.shape[1]} (use backend='torch')")

    def rowstats(self, feats, spos, w2, batch, t1, t2, two_t, cache=None):
        return K.rowstats(feats, spos, w2, batch, t1, t2, two_t)

    def band(self, feats, mrow, fac, nb_out, batch, t2, trans, nb, cache=None):
        return K.band(feats, mrow, fac, nb_out, batch, t2, trans, nb)

    def grad(self, feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw,
             cache=None):
        return K.grad(feats, mrow, w2.float(), gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw)


TRITON_KERNELS = TritonKernels()
_op_backend = register_fused_backend(TRITON_KERNELS)


def env_contrastive_loss_triton_eager(z1: torch.Tensor, z2: torch.Tensor,
                                      env_weights: torch.Tensor,
                                      spec: EnvContrastiveSpec | None = None, **options
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op through :class:`fastipirm.ops.fused.FusedFunction` (plain eager autograd).

    Same kernels and numbers as :func:`env_contrastive_loss_triton`, without the custom-op
    dispatch (for eager use and for tests that watch every tensor the implementation allocates).
    """
    return fused_eager(TRITON_KERNELS, z1, z2, env_weights, spec, **options)


def env_contrastive_loss_triton(z1: torch.Tensor, z2: torch.Tensor, env_weights: torch.Tensor,
                                spec: EnvContrastiveSpec | None = None, **options
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton ``env_contrastive_loss`` (inputs already validated by the public op).

    ``spec``, or the op's keyword options to build one. Runs as the custom ops
    ``fastipirm::env_contrastive_triton_{fwd,bwd}``. Returns float32 ``(loss, penalty)`` of shape
    ``(M,)`` for fp16/bf16/fp32 inputs; float64 inputs are computed in float32 and returned (with
    their gradients) as float64. Gradients for z1, z2 and, in soft mode, env_weights.
    """
    TRITON_KERNELS.check(z1)
    return _op_backend(z1, z2, env_weights, spec, **options)
