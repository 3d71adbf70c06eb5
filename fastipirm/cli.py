"""Command line: ``fastipirm <command>``.

Commands: ``check`` (every backend against the reference), ``info`` (versions, devices,
backends), ``train`` (training from a TOML config, the method chosen by ``method.name``),
``eval linear`` / ``eval knn`` (linear probe / weighted kNN of a saved model), ``export`` (a
saved model's encoder as a torchvision-named ``state_dict`` plus a JSON description). ``eval``
and ``export`` read fastipirm checkpoints and the official IP-IRM checkpoints
(:mod:`fastipirm.model_files`). Each command is a ``_cmd_<name>`` function with its arguments
added in ``main``. The benchmarks are not part of the package: ``fastipirm bench`` only says how
to run them (``python -m bench`` in the repository).

Expected failures of ``train``, ``eval`` and ``export`` (a bad config key, missing or corrupt data
files, a diverged loss, an unreadable checkpoint, a file in no accepted format) print one
``error:`` line and exit with status 2 (config, file format) or 1 (the rest); set
``FASTIPIRM_DEBUG=1`` for the full traceback.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

def _cmd_check(args) -> int:
    import torch

    from .check import run_check, run_masked_check
    from .ops.backends import ENV, MASKED

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    requested = args.backend or []
    ok = True
    unknown = [b for b in requested if b not in ENV.backends and b not in MASKED.backends]
    if unknown:
        print(f"unknown backend(s) {unknown}; known: env_contrastive_loss {sorted(ENV.backends)}, "
              f"masked_contrastive_loss {sorted(MASKED.backends)}")
        ok = False
    checked = set()
    for device in devices:
        # one table per op: the named backends it has for this device, or all available
        for registry, run in ((ENV, run_check), (MASKED, run_masked_check)):
            if requested:
                names = [b for b in requested if b in registry.backends
                         and device in registry.backends[b].devices]
                if not names:
                    continue
            else:
                names = registry.available(device)
            checked.update(names)
            ok &= run(names, quick=args.quick, device=device)
    missed = [b for b in requested if b not in checked and b not in unknown]
    if missed:
        print(f"backend(s) {missed} run on none of the devices here ({', '.join(devices)})")
        ok = False
    print("all backends of both ops agree with their references" if ok
          else "FAILED: a backend disagrees")
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


def _expected_errors():
    from .runtime import DataUnavailable, TrainingDiverged
    return (DataUnavailable, TrainingDiverged, FileNotFoundError, ValueError)


def _report(exc: BaseException) -> int:
    from .runtime import TrainingDiverged
    if os.environ.get("FASTIPIRM_DEBUG"):
        raise exc
    label = "training stopped" if isinstance(exc, TrainingDiverged) else "error"
    print(f"fastipirm: {label}: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ValueError) else 1


def _cmd_train(args) -> int:
    from .checkpoint import CHECKPOINT, config_from_checkpoint
    from .config import load_config
    from .runtime import run_dir
    from .train import run

    # under torchrun, rank 0 alone prints the notes (errors are printed by every rank)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    try:
        if args.resume == "auto":                 # resume when the run has a checkpoint
            if not args.config:
                print("fastipirm: error: --resume auto needs --config PATH", file=sys.stderr)
                return 2
            found = run_dir(load_config(args.config, args.set)) / CHECKPOINT
            if found.exists():
                say(f"--resume auto: resuming {found}")
                args.resume, args.config = str(found), None
            else:
                say(f"--resume auto: no checkpoint in {found.parent}, starting fresh")
                args.resume = None
        if args.resume:
            if args.config:
                say(f"note: --resume uses the config stored in {args.resume}; "
                    f"--config {args.config} is ignored (use --set to change keys)")
            cfg = config_from_checkpoint(args.resume, args.set)
        elif args.config:
            cfg = load_config(args.config, args.set)
        else:
            print("fastipirm: error: train needs --config PATH (or --resume CHECKPOINT)",
                  file=sys.stderr)
            return 2
        from . import distributed
        run(cfg, resume=args.resume)
        # after a good run only: a failing rank must not wait at shutdown's barrier while the
        # other ranks wait in another collective; it exits and torchrun stops them
        # (docs/distributed.md#process-group)
        distributed.shutdown()
    except _expected_errors() as exc:
        return _report(exc)
    except KeyboardInterrupt:
        print("fastipirm: interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130
    return 0


def _cmd_eval_linear(args) -> int:
    from .eval.linear import linear_eval_checkpoint

    try:
        linear_eval_checkpoint(args.checkpoint, config=args.config, overrides=args.set,
                               epochs=args.epochs, fixed_bn=args.fixed_bn, augment=args.augment,
                               device=args.device, progress=not args.no_progress)
    except _expected_errors() as exc:
        return _report(exc)
    return 0


def _cmd_eval_knn(args) -> int:
    from .eval.saved import knn_eval_checkpoint

    try:
        knn_eval_checkpoint(args.checkpoint, config=args.config, overrides=args.set, k=args.k,
                            temperature=args.temperature, device=args.device)
    except _expected_errors() as exc:
        return _report(exc)
    return 0


def _cmd_export(args) -> int:
    from .model_files import export_backbone

    try:
        export_backbone(args.checkpoint, args.out, config=args.config, overrides=args.set)
    except _expected_errors() as exc:
        return _report(exc)
    return 0


CHECKPOINT_HELP = ("a fastipirm checkpoint (file or run directory) or an official IP-IRM "
                   "checkpoint (model_<epoch>.pth, the official Model's state dict); also a "
                   "SimCLRModel state dict or a backbone written by 'fastipirm export'")
CONFIG_HELP = ("TOML config for a file without one (official checkpoints): data and evaluation "
               "settings; the model shape is read from the weights (default: the default config, "
               "the official STL-10 run). A fastipirm checkpoint uses its own config")
EXPORT_DESCRIPTION = (
    "Write the encoder of a saved model as a plain state_dict with torchvision's ResNet key "
    "names (conv1.weight, bn1.*, layer1.0.conv1.weight, ..., no fc; contiguous CPU tensors) "
    "and, beside it, a JSON with the architecture, the small-image stem (3x3 conv stride 1, no "
    "max-pool), width, feature dimension, input normalisation and size, method, full config "
    "and source checkpoint. It loads into torchvision's resnet18()/resnet50() after conv1 = "
    "Conv2d(3, 64, 3, 1, 1, bias=False), maxpool = Identity(), fc = Identity().")
SET_HELP = "override a config key (repeatable), e.g. --set "


def _add_source(q, example: str) -> None:
    q.add_argument("--checkpoint", required=True, metavar="PATH", help=CHECKPOINT_HELP)
    q.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=SET_HELP + example)


BENCH_LINE = ("fastipirm: the benchmarks are the bench/ folder of the repository (not installed "
              "with the package): run 'python -m bench <name> [options]' from a checkout "
              "('python -m bench --help' lists them)")


def _cmd_bench(args) -> int:
    print(BENCH_LINE, file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastipirm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="compare every available backend of env_contrastive_loss "
                                     "and masked_contrastive_loss with the op's reference")
    p.add_argument("--backend", action="append",
                   help="only this backend (repeatable; each op checks the named backends it "
                        "has); default: all available")
    p.add_argument("--quick", action="store_true", help="fewer cases")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("info", help="versions, devices and backends")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train from a TOML config (method.name: ipirm, simclr)")
    p.add_argument("--config", help="TOML config, e.g. configs/quickstart.toml")
    p.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint file or run directory (its config is used, "
                        "with --set on top); 'auto': the config's run directory if it has a "
                        "checkpoint, else start fresh")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.epochs=10")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = p.add_subparsers(dest="eval_command", required=True)
    q = esub.add_parser("linear", help="linear probe (official linear.py protocol)")
    _add_source(q, "eval.linear_lr=0.01")
    q.add_argument("--epochs", type=int, help="probe epochs (default: eval.linear_epochs, 100)")
    q.add_argument("--fixed-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="encoder BN in eval mode while the probe trains; --no-fixed-bn: train "
                        "mode, as the official linear.py (default: the config's eval.fixed_bn)")
    q.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="train the probe on SSL-augmented views (official) or not "
                        "(default: the config's eval.linear_augment)")
    q.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's run.device)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_eval_linear)
    q = esub.add_parser("knn", help="weighted kNN monitor (the official test(): memory "
                                    "data.memory_split, queries data.test_split)")
    _add_source(q, "eval.batch_size=512")
    q.add_argument("--k", type=int, help="neighbours (default: eval.k, 200)")
    q.add_argument("--temperature", type=float,
                   help="weight temperature (default: eval.knn_temperature, else "
                        "train.temperature, 0.5)")
    q.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's run.device)")
    q.set_defaults(func=_cmd_eval_knn)

    p = sub.add_parser("export", help="write a saved model's encoder as a torchvision-named "
                                      "state_dict plus a JSON description",
                       description=EXPORT_DESCRIPTION)
    _add_source(p, "data.crop_size=96")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the state_dict file, e.g. backbone.pt (a folder: FOLDER/backbone.pt); "
                        "the description goes beside it as backbone.json")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="says how to run the benchmarks (python -m bench, from the "
                                     "repository)")
    p.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
