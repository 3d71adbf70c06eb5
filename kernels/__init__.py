"""Triton kernels of fastipirm (one module per kernel family, the autograd.Function beside it).

Nothing here imports Triton at package import time: ``kernels.env_contrastive`` does, and the
backend registry (:mod:`fastipirm.ops.backends`) imports it lazily, only when the ``"triton"``
backend is asked for.
"""
from .utils import is_interpreter, triton_available

__all__ = ["is_interpreter", "triton_available"]
