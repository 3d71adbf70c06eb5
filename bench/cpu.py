"""The CPU table of env_contrastive_loss: ``python -m bench kernels`` with CPU defaults.

    python -m bench cpu [--n 512] [--dim 128] [--envs 16] [--repeats 7] [--threads N]

The literal reference and every CPU backend (``torch``, the C++ ``cpu`` when built), hard and
soft, 2B=512, D=128, M=16; every option of the kernel benchmark applies (e.g. ``--impl
reference torch.compile torch cpu``). The record is a ``kernels`` record.
"""
from __future__ import annotations

import argparse

from . import kernels

format_table = kernels.format_table
figures = kernels.figures


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the kernel benchmark with CPU defaults."""
    kernels.add_arguments(ap)
    ap.set_defaults(device="cpu", n=[512], dim=128, envs=[16])


def run(args: argparse.Namespace) -> dict:
    """The kernel benchmark over the reference and the CPU backends unless ``--impl`` is given."""
    if args.impl is None and not args.small:
        from fastipirm.ops import available_backends
        args.impl = ["reference"] + [b for b in available_backends("cpu") if b != "triton"]
    return kernels.run(args)
