"""The backends of ``masked_contrastive_loss``: kernel sets wrapped as ``torch.library`` custom
ops around the shared glue (:mod:`fastipirm.ops.masked_glue`), so a training step with the op
compiles.

:func:`load` returns the backend function ``impl(inputs, spec) -> (losses (Q,), key_grads (K,)
or empty)`` of a kernel set name (the registry :data:`fastipirm.ops.backends.MASKED` calls it
lazily); the custom ops ``fastipirm::masked_contrastive_<name>_{fwd,bwd}`` take the spec's fields
as plain scalars (the one place the spec is flattened).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .masked_glue import Inputs, MaskedKernels, backward, forward
from .spec import SIMILARITIES, MaskedContrastiveSpec

_REGISTERED: dict[str, Callable] = {}


def _spec(code: int, p: float, temperature: float, include_self: bool,
          key_penalty: bool) -> MaskedContrastiveSpec:
    similarity = SIMILARITIES[code]
    return MaskedContrastiveSpec(similarity, p if similarity == "lp" else None, temperature,
                                 include_self, "none", key_penalty)


def _flat(spec: MaskedContrastiveSpec) -> tuple:
    return spec.code, spec.exponent, spec.temperature, spec.include_self, spec.key_penalty


def _out_dtype(q: Tensor) -> torch.dtype:
    """The losses' dtype: float64 for float64 inputs (even where a kernel set computes in
    float32), float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _inputs(kern: MaskedKernels, q, k, pos, idx, tw, qg, kg, self_index, w, c) -> Inputs:
    sd = kern.stat_dtype(q.dtype)

    def feats(t):
        return None if t is None else kern.feats(t)

    return Inputs(feats(q), feats(k), feats(pos), idx, None if tw is None else tw.to(sd),
                  qg, kg, self_index, w.to(sd), c.to(sd))


def register(kern: MaskedKernels) -> Callable:
    """The backend function of ``kern`` (registering its custom ops on first use)."""
    if kern.name in _REGISTERED:
        return _REGISTERED[kern.name]
    fwd_name = f"fastipirm::masked_contrastive_{kern.name}_fwd"
    bwd_name = f"fastipirm::masked_contrastive_{kern.name}_bwd"

    @torch.library.custom_op(fwd_name, mutates_args=())
    def fwd(q: Tensor, k: Tensor, pos: Optional[Tensor], idx: Optional[Tensor],
            tw: Optional[Tensor], qg: Optional[Tensor], kg: Optional[Tensor],
            self_index: Optional[Tensor], w: Tensor, c: Tensor, code: int, p: float,
            temperature: float, include_self: bool, key_penalty: bool) -> list[Tensor]:
        kern.check(q)
        spec = _spec(code, p, temperature, include_self, key_penalty)
        inp = _inputs(kern, q, k, pos, idx, tw, qg, kg, self_index, w, c)
        losses, g, (m, z, a) = forward(kern, inp, spec)
        out = _out_dtype(q)
        return [losses.to(out, copy=True), g.to(out, copy=True), m, z, a]

    @fwd.register_fake
    def _(q, k, pos, idx, tw, qg, kg, self_index, w, c, code, p, temperature, include_self,
          key_penalty):
        sd, out = kern.stat_dtype(q.dtype), _out_dtype(q)
        n_q, n_k = q.shape[0], k.shape[0] if key_penalty else 0
        return [q.new_empty(n_q, dtype=out), q.new_empty(n_k, dtype=out),
                q.new_empty(n_q, dtype=sd), q.new_empty(n_q, dtype=sd),
                q.new_empty(n_k, dtype=sd)]

    @torch.library.custom_op(bwd_name, mutates_args=())
    def bwd(q: Tensor, k: Tensor, pos: Optional[Tensor], idx: Optional[Tensor],
            tw: Optional[Tensor], qg: Optional[Tensor], kg: Optional[Tensor],
            self_index: Optional[Tensor], w: Tensor, c: Tensor, m: Tensor, z: Tensor,
            a: Tensor, d_losses: Tensor, d_g: Tensor, code: int, p: float, temperature: float,
            include_self: bool, key_penalty: bool, need_w: bool) -> list[Tensor]:
        spec = _spec(code, p, temperature, include_self, key_penalty)
        inp = _inputs(kern, q, k, pos, idx, tw, qg, kg, self_index, w, c)
        gamma = d_g.to(m.dtype) if key_penalty else None
        dq, dk, dpos, dw = backward(kern, inp, spec, (m, z, a), d_losses.to(m.dtype), gamma,
                                    need_w)
        return [dq.to(q.dtype), dk.to(k.dtype), _empty(dpos, q).to(q.dtype),
                _empty(dw, w).to(w.dtype)]

    @bwd.register_fake
    def _(q, k, pos, idx, tw, qg, kg, self_index, w, c, m, z, a, d_losses, d_g, code, p,
          temperature, include_self, key_penalty, need_w):
        return [torch.empty_like(q), torch.empty_like(k),
                q.new_empty(0) if pos is None else torch.empty_like(pos),
                torch.empty_like(w) if need_w else w.new_empty(0)]

    def setup_context(ctx, inputs, output):
        q, k, pos, idx, tw, qg, kg, self_index, w, c, *flags = inputs
        ctx.save_for_backward(q, k, pos, idx, tw, qg, kg, self_index, w, c, *output[2:])
        ctx.flags = tuple(flags)

    def backward_rule(ctx, grads):
        d_losses, d_g = grads[0], grads[1]
        q, k, pos, idx, tw, qg, kg, self_index, w, c, m, z, a = ctx.saved_tensors
        key_penalty = ctx.flags[-1]
        if d_losses is None:
            d_losses = torch.zeros_like(m)
        if d_g is None or not key_penalty:
            d_g = m.new_zeros(k.shape[0] if key_penalty else 0)
        need_w = bool(ctx.needs_input_grad[8])
        dq, dk, dpos, dw = bwd(q, k, pos, idx, tw, qg, kg, self_index, w, c, m, z, a,
                               d_losses.contiguous(), d_g.contiguous(), *ctx.flags, need_w)
        return (dq, dk, dpos if pos is not None else None, None, None, None, None, None,
                dw if need_w else None, None, None, None, None, None, None)

    fwd.register_autograd(backward_rule, setup_context=setup_context)

    def impl(q: Tensor, k: Tensor, pos, idx, tw, qg, kg, self_index, w: Tensor, c: Tensor,
             spec: MaskedContrastiveSpec):
        out = fwd(q, k, pos, idx, tw, qg, kg, self_index, w, c, *_flat(spec))
        return out[0], out[1]

    impl.kernels, impl.forward_op, impl.backward_op = kern, fwd, bwd
    _REGISTERED[kern.name] = impl
    return impl


def _kernel_module(name: str):
    """The module of fastipirm.ops that builds kernel set ``name`` (its ``kernels()``); plain
    import statements, which dynamo traces (it refuses ``importlib.import_module``), so a
    compiled step may be the first caller of the op."""
    if name == "torch":
        from . import masked_torch as module
    elif name == "cpu":
        from . import masked_cpu as module
    elif name == "triton":
        from . import masked_triton as module
    elif name == "cuda":
        from . import masked_cuda as module
    else:
        raise ValueError(f"unknown masked_contrastive_loss kernel set {name!r}")
    return module


def load(name: str) -> Callable:
    """The backend function of kernel set ``name``: its module's ``kernels()`` (which raises
    with the reason when the kernels cannot run here), registered as custom ops."""
    return register(_kernel_module(name).kernels())
