"""CPU benchmark of env_contrastive_loss: ``bench.kernels`` with the CPU defaults of issue 2.

    python -m bench.cpu [--batch 256] [--dim 128] [--envs 16] [--repeats 7] [--threads N]

The literal reference and every CPU backend (``torch``, the C++ ``cpu`` when built), hard and
soft, B=256 (2B=512), D=128, M=16; every option of ``bench.kernels`` applies (e.g. ``--impl
reference torch.compile torch cpu``). The record is a ``kernels`` record.
"""
from __future__ import annotations

import argparse

from . import kernels


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``bench.kernels`` with CPU defaults."""
    kernels.add_arguments(ap)
    ap.set_defaults(device="cpu", n=[512], dim=128, envs=[16])


def run(args: argparse.Namespace) -> dict:
    """``bench.kernels.run`` over the reference and the CPU backends unless ``--impl`` is given."""
    if args.impl is None and not args.small:
        from fastipirm.ops import available_backends
        args.impl = ["reference"] + [b for b in available_backends("cpu") if b != "triton"]
    return kernels.run(args)


format_table = kernels.format_table


def main(argv=None) -> dict:
    """``python -m bench.cpu``: run, print the table, save the record unless ``--no-save``."""
    import sys

    from .harness import module_main
    return module_main(kernels.NAME, sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
