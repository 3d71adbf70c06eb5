"""Backend ``"cpu"``: the C++ CPU kernel of ``csrc/env_contrastive_cpu.cpp``.

The kernel streams the ``N x N`` similarity in row tiles (OpenMP, vectorised inner loops,
deterministic per-thread reductions) and implements the streamed part of the forward and of the
closed-form backward; the ``O(N M)`` prologue and epilogue are the torch backend's
(:func:`fastipirm.ops.torch_backend._forward` / ``_backward`` with ``rows=`` these functions), so
both backends share one statement of the mathematics. Registered as ``torch.library`` custom ops
(:mod:`fastipirm.ops.custom_ops`), so a training step with it compiles.

The extension is built by ``setup.py`` (``pip install --no-build-isolation -e .``) as
``fastipirm._C``; when it is missing, :func:`load_extension` says so and
``FASTIPIRM_JIT_BUILD=1`` compiles it on first use with ``torch.utils.cpp_extension.load``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .custom_ops import register_env_contrastive_op
from .torch_backend import _backward, _forward, _SHIFTS

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ["env_contrastive_cpu.cpp"]


def cpu_compile_flags() -> list[str]:
    """Compiler flags of the CPU kernel (``FASTIPIRM_PORTABLE=1`` drops ``-march=native``)."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("FASTIPIRM_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


def _jit_build():
    from torch.utils.cpp_extension import load

    sources = [str(CSRC / s) for s in CPU_SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise ImportError(f"cannot JIT-build the CPU kernel: sources missing: {missing}")
    return load(name="fastipirm_cpu_ext", sources=sources, extra_cflags=cpu_compile_flags(),
                extra_ldflags=["-fopenmp"], verbose=False)


def load_extension():
    """Import the compiled extension (registers ``torch.ops.fastipirm_ext``); raise with the fix."""
    if hasattr(torch.ops, "fastipirm_ext") and hasattr(torch.ops.fastipirm_ext, "forward_rows"):
        return torch.ops.fastipirm_ext
    try:
        from .. import _C  # noqa: F401  (built by setup.py)
    except ImportError as exc:
        if os.environ.get("FASTIPIRM_JIT_BUILD", "0") == "1":
            _jit_build()
        else:
            raise ImportError(
                "the C++ extension fastipirm._C is not built (" + str(exc) + "): install with "
                "`pip install --no-build-isolation -e .`, or set FASTIPIRM_JIT_BUILD=1 to compile "
                "it on first use") from exc
    return torch.ops.fastipirm_ext


def forward_rows_cpu(feats, s, temperature, irm_temperature):
    loss_sum, g_pos, col_sums = torch.ops.fastipirm_ext.forward_rows(
        feats.contiguous(), s.w2.contiguous(), s.kappa.contiguous(), s.group_weight.contiguous(),
        s.kappag.contiguous(), temperature, irm_temperature, s.batch)
    return loss_sum, g_pos, list(col_sums.unbind(0))


def backward_rows_cpu(feats, s, temperature, irm_temperature, d_loss, normc, col_factors, gamma0):
    d_feats, d_w2, d_kappa, d_gw, col_sums, loss_sum = torch.ops.fastipirm_ext.backward_rows(
        feats.contiguous(), s.w2.contiguous(), s.kappa.contiguous(), s.group_weight.contiguous(),
        s.kappag.contiguous(), temperature, irm_temperature, s.batch,
        d_loss.to(feats.dtype).contiguous(), normc.contiguous(),
        torch.stack(col_factors).contiguous(), gamma0.contiguous(), s.soft)
    return d_feats, d_w2, d_kappa, d_gw, list(col_sums.unbind(0)), loss_sum


def _dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _fwd(z1, z2, w, soft, nonorm, penalty, temperature, irm_temperature):
    dt = _dtype(z1)
    loss, pen, g = _forward(z1.to(dt), z2.to(dt), w.to(dt), soft, nonorm, penalty, temperature,
                            irm_temperature, rows=forward_rows_cpu)
    return loss, pen, [g]


def _bwd(z1, z2, w, saved, d_loss, d_pen, soft, nonorm, penalty, temperature, irm_temperature):
    dt = _dtype(z1)
    d_z1, d_z2, d_w = _backward(z1.to(dt), z2.to(dt), w.to(dt), saved[0], d_loss.to(dt),
                                d_pen.to(dt), soft, nonorm, penalty, temperature, irm_temperature,
                                rows=backward_rows_cpu)
    return d_z1.to(z1.dtype), d_z2.to(z2.dtype), None if d_w is None else d_w.to(w.dtype)


def _fake_saved(z1, z2, w, soft, nonorm, penalty):
    m = w.shape[1]
    groups = 2 * m if penalty in ("split", "scalar_split") else m
    slots = 1 if penalty in ("scalar", "scalar_split") else 2 * z1.shape[0]
    return [z1.new_empty(groups, slots, dtype=_dtype(z1))]


def load_cpu_backend():
    """The backend function (loads the extension first; raises ImportError when it cannot)."""
    load_extension()
    assert len(_SHIFTS) == 3
    return register_env_contrastive_op("cpu", _fwd, _bwd, _fake_saved)
