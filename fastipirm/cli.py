"""Command line: ``fastipirm <command>``.

Commands: ``check`` (every backend against the reference), ``info`` (versions, devices,
backends). Each command is a ``_cmd_<name>`` function with its arguments added in ``main``.
"""
from __future__ import annotations

import argparse
import platform
import sys


def _cmd_check(args) -> int:
    import torch

    from .check import run_check
    from .ops import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ok = True
    for device in devices:
        backends = args.backend or available_backends(device)
        ok &= run_check(backends, quick=args.quick, device=device)
    print("all backends agree with the reference" if ok else "FAILED: a backend disagrees")
    return 0 if ok else 1


def _cmd_info(args) -> int:
    import torch

    from . import __version__
    from .ops import backend_report

    print(f"fastipirm {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("cuda: not available")
    print("backends of env_contrastive_loss:")
    for name, ok, detail in backend_report():
        print(f"  {name:<8} {'available' if ok else 'unavailable'}  {detail}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastipirm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="compare every available backend with the reference")
    p.add_argument("--backend", action="append",
                   help="only this backend (repeatable); default: all available")
    p.add_argument("--quick", action="store_true", help="fewer cases")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("info", help="versions, devices and backends")
    p.set_defaults(func=_cmd_info)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
