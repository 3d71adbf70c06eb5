"""Triton kernels of fastipirm, installed as ``fastipirm.kernels`` (one module per kernel family:
the kernels and their launchers, nothing else).

A leaf: nothing here imports from the ops layer (:mod:`fastipirm.ops.triton_backend` wraps the
launchers), and nothing imports Triton at package import time: ``fastipirm.kernels.env_contrastive``
does, and the backend registry (:mod:`fastipirm.ops.backends`) imports it lazily, only when the
``"triton"`` backend is asked for.
"""
from .utils import is_interpreter, triton_available

__all__ = ["is_interpreter", "triton_available"]
