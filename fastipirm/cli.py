"""Command line: ``fastipirm <command>``.

Commands: ``check`` (every backend against the reference), ``info`` (versions, devices,
backends), ``train`` (IP-IRM or SimCLR training from a TOML config), ``eval linear`` (linear probe
of a checkpoint), ``bench {kernels,loader,step,maximize,all}`` (the benchmarks of the repository's
``bench/`` folder). Each command is a ``_cmd_<name>`` function with its arguments added in
``main``; ``bench`` builds each benchmark's options from its module when it is run.

Expected failures of ``train`` and ``eval`` (a bad config key, missing or corrupt data files, a
diverged loss, an unreadable checkpoint) print one ``error:`` line and exit with status 2 (config)
or 1 (the rest); set ``FASTIPIRM_DEBUG=1`` for the full traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

BENCHMARKS = {"kernels": "kernels", "loader": "loader", "step": "step", "maximize": "maximize",
              "all": "suite"}      # subcommand -> module of bench/


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


def _expected_errors():
    from .train import DataUnavailable, TrainingDiverged
    return (DataUnavailable, TrainingDiverged, FileNotFoundError, ValueError)


def _report(exc: BaseException) -> int:
    from .train import TrainingDiverged
    if os.environ.get("FASTIPIRM_DEBUG"):
        raise exc
    label = "training stopped" if isinstance(exc, TrainingDiverged) else "error"
    print(f"fastipirm: {label}: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ValueError) else 1


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import config_from_checkpoint, run

    try:
        if args.resume == "auto":                 # resume when the run has a checkpoint
            if not args.config:
                print("fastipirm: error: --resume auto needs --config PATH", file=sys.stderr)
                return 2
            from .train import CHECKPOINT, run_dir
            found = run_dir(load_config(args.config, args.set)) / CHECKPOINT
            if found.exists():
                print(f"--resume auto: resuming {found}")
                args.resume, args.config = str(found), None
            else:
                print(f"--resume auto: no checkpoint in {found.parent}, starting fresh")
                args.resume = None
        if args.resume:
            if args.config:
                print(f"note: --resume uses the config stored in {args.resume}; "
                      f"--config {args.config} is ignored (use --set to change keys)")
            cfg = config_from_checkpoint(args.resume, args.set)
        elif args.config:
            cfg = load_config(args.config, args.set)
        else:
            print("fastipirm: error: train needs --config PATH (or --resume CHECKPOINT)",
                  file=sys.stderr)
            return 2
        run(cfg, resume=args.resume)
    except _expected_errors() as exc:
        return _report(exc)
    except KeyboardInterrupt:
        print("fastipirm: interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130
    return 0


def _cmd_eval_linear(args) -> int:
    from .eval import linear_eval_checkpoint

    try:
        linear_eval_checkpoint(args.checkpoint, overrides=args.set, epochs=args.epochs,
                               fixed_bn=args.fixed_bn, augment=args.augment, device=args.device,
                               progress=not args.no_progress)
    except _expected_errors() as exc:
        return _report(exc)
    return 0


class BenchUnavailable(RuntimeError):
    """A benchmark module cannot be imported (not in this checkout, or broken)."""


def _import_bench(module_name: str):
    """``bench.<module_name>`` from the repository next to this package (``bench/`` is not
    installed: it writes its results into the checkout)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "harness.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        importlib.import_module("bench.harness")
    except ImportError as exc:
        raise BenchUnavailable(
            f"the benchmarks are the bench/ folder of the fastipirm repository and are not "
            f"installed with the package ({exc}): install from a checkout with "
            f"'pip install -e .' or run 'python -m fastipirm bench ...' from the repository "
            f"root") from exc
    try:
        return importlib.import_module(f"bench.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{module_name}":
            raise BenchUnavailable(f"bench/{module_name}.py does not exist in this checkout "
                                   f"({root})") from exc
        raise BenchUnavailable(f"bench.{module_name} cannot be imported: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken module is reported in one line
        raise BenchUnavailable(f"bench.{module_name} failed to import: "
                               f"{type(exc).__name__}: {exc}") from exc


def _bench_parser(name: str, module) -> argparse.ArgumentParser:
    """The options of ``fastipirm bench <name>``: the module's own and the common ones."""
    doc = (module.__doc__ or name).strip().splitlines()[0]
    ap = argparse.ArgumentParser(prog=f"fastipirm bench {name}", description=doc,
                                 conflict_handler="resolve")
    module.add_arguments(ap)
    common = ap.add_argument_group("common to every benchmark")
    common.add_argument("--no-save", action="store_true", help="write no JSON record")
    common.add_argument("--results-dir", default=None,
                        help="where the JSON record and the charts go (default: bench/results/)")
    common.add_argument("--plot", action="store_true",
                        help="also write PNG charts next to the JSON (needs matplotlib)")
    common.add_argument("--compare", action="store_true",
                        help="compare with this GPU's baseline (bench/baselines/); exit 1 on a "
                             "figure 10%% worse than accepted or outside its target")
    common.add_argument("--accept", action="store_true",
                        help="write this run's figures into this GPU's baseline")
    common.add_argument("--force", action="store_true",
                        help="with --accept: also on a machine without a GPU")
    return ap


def _bench_error(message: str, status: int) -> int:
    print(f"fastipirm: error: {message}", file=sys.stderr)
    return status


def _cmd_bench(args) -> int:
    name = args.benchmark
    try:
        module = _import_bench(BENCHMARKS[name])
        harness = _import_bench("harness")
    except BenchUnavailable as exc:
        return _bench_error(str(exc), 1)
    opts = _bench_parser(name, module).parse_args(args.options)
    try:
        if opts.plot:                       # fail before a long run, not after it
            _import_bench("plots")._pyplot()
        if opts.accept and not opts.force:
            import torch
            if not torch.cuda.is_available():
                raise ValueError("--accept: refusing to write a baseline from a run without a "
                                 "GPU (baselines hold GPU figures; --force to write one anyway)")
        record = module.run(opts)
    except (ImportError, ValueError, BenchUnavailable) as exc:
        if os.environ.get("FASTIPIRM_DEBUG"):
            raise
        return _bench_error(str(exc), 2 if isinstance(exc, ValueError) else 1)
    print(module.format_table(record))
    status = 0
    path = None
    if not opts.no_save:
        path = harness.save_record(name, record, opts.results_dir)
        print(f"wrote {path}")
    if opts.plot:
        stem = (path or harness.record_path(name, opts.results_dir)).with_suffix("")
        try:
            for png in _import_bench("plots").plot_record(record, stem):
                print(f"wrote {png}")
        except ValueError as exc:
            status = _bench_error(f"--plot: {exc}", 1)
    baselines = _import_bench("baselines")
    if opts.compare:
        where = baselines.baseline_path()
        if not where.exists():
            status = _bench_error(f"--compare: no baseline for this machine ({where}); write "
                                  f"one with --accept on this GPU", 1)
        else:
            failures = baselines.compare(record, baselines.load_baseline(where))
            for line in failures:
                print(f"REGRESSION {line}")
            print(f"compared with {where}: {len(failures)} failure(s)")
            status = status or (1 if failures else 0)
    if opts.accept:
        try:
            print(f"accepted into {baselines.accept(record, force=opts.force)}")
        except ValueError as exc:
            status = _bench_error(f"--accept: {exc}", 1)
    return status


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

    p = sub.add_parser("train", help="train IP-IRM (or the SimCLR baseline) from a TOML config")
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
    q.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    q.add_argument("--epochs", type=int, help="probe epochs (default: eval.linear_epochs, 100)")
    q.add_argument("--fixed-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="encoder BN in eval mode while the probe trains; --no-fixed-bn: train "
                        "mode, as the official linear.py (default: the config's eval.fixed_bn)")
    q.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="train the probe on SSL-augmented views (official) or not "
                        "(default: the config's eval.linear_augment)")
    q.add_argument("--device", help="cpu | cuda | cuda:N (default: the checkpoint's run.device)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the checkpoint's config, e.g. eval.linear_lr=0.01")
    q.set_defaults(func=_cmd_eval_linear)

    p = sub.add_parser("bench", help="benchmarks: kernels, loader, step, maximize, all "
                                     "('fastipirm bench <name> --help' for the options of one)")
    p.add_argument("benchmark", choices=tuple(BENCHMARKS),
                   help="kernels (the op), loader (data pipelines), step (training step against "
                        "the official-style one), maximize (partition optimisation), all (every "
                        "part and the 400-epoch estimate)")
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="the benchmark's options, and --no-save, --results-dir, --plot, "
                        "--compare, --accept, --force")
    p.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
