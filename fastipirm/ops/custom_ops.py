"""Wrap a compiled backend (Triton, C++/CUDA) as ``torch.library`` custom ops.

A kernel launcher is opaque to ``torch.compile``: it must be a registered op with a fake
(meta) implementation giving output shapes, and its backward another such op, so that a whole
training step traces into one graph with no graph break. :func:`register_env_contrastive_op`
does that for a backend described by three plain functions of an
:class:`~fastipirm.ops.spec.EnvContrastiveSpec` ``spec``:

* ``forward(z1, z2, w, spec)`` -> ``(loss, penalty, saved)``: ``saved`` a list of tensors the
  backward needs;
* ``backward(z1, z2, w, saved, d_loss, d_pen, spec)`` -> ``(d_z1, d_z2, d_w or None)``;
* ``fake_saved(z1, z2, w, spec)`` -> empty tensors shaped like ``saved``.

The ops' schemas take the spec's fields as plain scalars (:meth:`EnvContrastiveSpec.op_args`,
rebuilt on the other side with :meth:`EnvContrastiveSpec.from_op_args`): this is the one place
where the spec is flattened. The result is a function with the backend signature of
:mod:`fastipirm.ops.backends` (``(z1, z2, w, spec)``; keyword options instead of ``spec`` are
accepted too).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .spec import EnvContrastiveSpec

_REGISTERED: dict[str, Callable] = {}


def _owned(t: Tensor) -> Tensor:
    """A custom op's outputs may not alias each other or an input: copy views."""
    return t.clone() if t._base is not None else t


def register_env_contrastive_op(name: str, forward: Callable, backward: Callable,
                                fake_saved: Callable) -> Callable:
    """Register ``fastipirm::env_contrastive_<name>_{fwd,bwd}`` and return the backend function."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    fwd_name = f"fastipirm::env_contrastive_{name}_fwd"
    bwd_name = f"fastipirm::env_contrastive_{name}_bwd"

    unflatten = EnvContrastiveSpec.from_op_args

    @torch.library.custom_op(fwd_name, mutates_args=())
    def fwd(z1: Tensor, z2: Tensor, w: Tensor, soft: bool, nonorm: bool, penalty: str,
            temperature: float, irm_temperature: float) -> list[Tensor]:
        spec = unflatten(soft, nonorm, penalty, temperature, irm_temperature)
        loss, pen, saved = forward(z1, z2, w, spec)
        return [_owned(t) for t in (loss, pen, *saved)]

    @fwd.register_fake
    def _(z1, z2, w, *flat):
        m = w.shape[1]
        out = z1.new_empty(m, dtype=torch.float32 if z1.dtype != torch.float64 else z1.dtype)
        return [out, torch.empty_like(out), *fake_saved(z1, z2, w, unflatten(*flat))]

    @torch.library.custom_op(bwd_name, mutates_args=())
    def bwd(z1: Tensor, z2: Tensor, w: Tensor, saved: list[Tensor], d_loss: Tensor, d_pen: Tensor,
            soft: bool, nonorm: bool, penalty: str, temperature: float,
            irm_temperature: float) -> list[Tensor]:
        spec = unflatten(soft, nonorm, penalty, temperature, irm_temperature)
        d_z1, d_z2, d_w = backward(z1, z2, w, saved, d_loss, d_pen, spec)
        return [_owned(d_z1), _owned(d_z2), torch.zeros_like(w) if d_w is None else _owned(d_w)]

    @bwd.register_fake
    def _(z1, z2, w, saved, d_loss, d_pen, *flat):
        return [torch.empty_like(z1), torch.empty_like(z2), torch.empty_like(w)]

    def setup_context(ctx, inputs, output):
        z1, z2, w, *flat = inputs
        ctx.save_for_backward(z1, z2, w, *output[2:])
        ctx.spec = unflatten(*flat)

    def backward_rule(ctx, grads):
        z1, z2, w, *saved = ctx.saved_tensors
        d_loss, d_pen = grads[0], grads[1]
        m = w.shape[1]
        if d_loss is None:
            d_loss = torch.zeros(m, dtype=torch.float32, device=w.device)
        if d_pen is None:
            d_pen = torch.zeros(m, dtype=torch.float32, device=w.device)
        d_z1, d_z2, d_w = bwd(z1, z2, w, list(saved), d_loss.contiguous(), d_pen.contiguous(),
                              *ctx.spec.op_args())
        return d_z1, d_z2, d_w if ctx.spec.soft else None, None, None, None, None, None

    fwd.register_autograd(backward_rule, setup_context=setup_context)

    def backend(z1: Tensor, z2: Tensor, env_weights: Tensor,
                spec: EnvContrastiveSpec | None = None, **options):
        out = fwd(z1, z2, env_weights, *EnvContrastiveSpec.of(spec, **options).op_args())
        return out[0], out[1]

    backend.forward_op, backend.backward_op = fwd, bwd
    _REGISTERED[name] = backend
    return backend
