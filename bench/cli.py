"""``python -m bench <name> [options]``: every benchmark of fastipirm behind one parser.

Run from the repository root (``bench/`` is not installed with the package: it writes its
records into the checkout). Each benchmark module (``bench.<module>``, see :mod:`bench.harness`
for the interface) adds its own options; the common ones are added here where they make sense:

* ``--no-save``: print the table only; otherwise the JSON record (with the environment: date,
  command, host, GPU, versions, git commit) goes to ``--results-dir`` (default
  ``bench/results/``);
* ``--plot``: PNG charts next to the record (matplotlib; checked before a long run starts);
* ``--compare``: compare with this GPU's baseline (``bench/baselines/<gpu>.json``); exit 1 on a
  figure 10% worse than accepted or outside its target (:mod:`bench.targets`);
* ``--accept``: write the run's figures into this GPU's baseline; refused on a machine without a
  GPU unless ``--force``.

Exit status: 0, 1 (a failure or regression), 2 (bad options or a refusal).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

# subcommand -> (module of bench/, one-line help)
BENCHMARKS = {
    "kernels": ("kernels", "the fused op's forward + backward, every implementation and size"),
    "masked": ("masked", "masked_contrastive_loss against the official CL-ICA, DCoDR and MixUp "
                         "constructions (time and peak memory)"),
    "loader": ("loader", "two-view samples/s of each data pipeline against a step's needs"),
    "step": ("step", "one training step: the official-style step against fastipirm's"),
    "mixup-step": ("mixup_step", "one IP-IRM + MixUp step against a main.py IP-IRM step and the "
                                 "official MixUp structure"),
    "dcodr-step": ("dcodr_step", "one DCoDR / DCoDR-norec step: official-style against "
                                 "fastipirm"),
    "ddp-loss": ("ddp_loss", "IP-IRM's loss on one rank of N: the replicated global loss "
                             "against the op's distributed form"),
    "maximize": ("maximize", "one partition maximisation: official-style against fastipirm"),
    "all": ("suite", "kernels, loader, step and maximize, and the 400-epoch run estimate"),
    "cpu": ("cpu", "the CPU table of the kernel benchmark (reference and CPU backends)"),
    "cpu-ratio": ("cpu_ratio", "the C++ cpu backend against the torch backend, interleaved"),
    "gpu-check": ("gpu_check", "on a GPU machine: check and benchmark everything (phases with "
                               "time limits, a table last)"),
}
# the common options: attribute -> (flag, argparse keywords)
COMMON_SPECS = {
    "no_save": ("--no-save", dict(action="store_true", help="write no JSON record")),
    "results_dir": ("--results-dir", dict(default=None, help="where the JSON record and the "
                                          "charts go (default: bench/results/)")),
    "plot": ("--plot", dict(action="store_true", help="also write PNG charts next to the JSON "
                            "(needs matplotlib)")),
    "compare": ("--compare", dict(action="store_true", help="compare with this GPU's baseline "
                                  "(bench/baselines/); exit 1 on a figure 10%% worse than "
                                  "accepted or outside its target")),
    "accept": ("--accept", dict(action="store_true",
                                help="write this run's figures into this GPU's baseline")),
    "force": ("--force", dict(action="store_true",
                              help="with --accept: also on a machine without a GPU")),
}
COMMON = tuple(COMMON_SPECS)


class BenchUnavailable(RuntimeError):
    """A benchmark module cannot be imported (not in this checkout, or broken)."""


def load(module_name: str):
    """``bench.<module_name>``; :class:`BenchUnavailable` with the reason when it cannot load."""
    try:
        return importlib.import_module(f"bench.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{module_name}":
            raise BenchUnavailable(f"bench/{module_name}.py does not exist in this "
                                   "checkout") from exc
        raise BenchUnavailable(f"bench.{module_name} cannot be imported: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken module is reported in one line
        raise BenchUnavailable(f"bench.{module_name} failed to import: "
                               f"{type(exc).__name__}: {exc}") from exc


def add_common_arguments(ap: argparse.ArgumentParser, names=COMMON) -> None:
    """The common options in ``names`` (a subset of :data:`COMMON`)."""
    common = ap.add_argument_group("common options")
    for name in names:
        flag, kwargs = COMMON_SPECS[name]
        common.add_argument(flag, **kwargs)


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``python -m bench``: one subcommand per benchmark. The ``selected`` one
    has the module's options and the common options it takes (``module.COMMON_OPTIONS``, default
    all); the others are listed only, so that no other module is imported (``kernels --small``
    must import the op itself, after setting ``TRITON_INTERPRET``)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks of fastipirm (run from the repository "
        "root); 'python -m bench <name> --help' shows a benchmark's options.")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="<name>")
    for name, (module_name, help_line) in BENCHMARKS.items():
        if name != selected:
            sub.add_parser(name, help=help_line, add_help=False)
            continue
        try:
            module = load(module_name)
        except BenchUnavailable as exc:
            p = sub.add_parser(name, help=f"{help_line} [unavailable]", add_help=False,
                               description=str(exc))
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(module=None, unavailable=str(exc))
            continue
        doc = (module.__doc__ or help_line).strip()
        p = sub.add_parser(name, help=help_line, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           conflict_handler="resolve")
        module.add_arguments(p)
        add_common_arguments(p, getattr(module, "COMMON_OPTIONS", COMMON))
        p.set_defaults(module=module)
    return parser


def _error(message: str, status: int) -> int:
    print(f"bench: error: {message}", file=sys.stderr)
    return status


def _option(module, args, name: str) -> bool:
    """A common option's value, False where the benchmark does not take it."""
    return name in getattr(module, "COMMON_OPTIONS", COMMON) and bool(getattr(args, name))


def main(argv=None) -> int:
    """Parse, run the benchmark, print its table, then save / plot / compare / accept."""
    from . import baselines, harness, plots

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in BENCHMARKS else None).parse_args(argv)
    module = vars(args).pop("module")                 # the options alone go to the benchmark
    if module is None:
        return _error(args.unavailable, 1)
    results_dir = getattr(args, "results_dir", None)
    try:
        if _option(module, args, "plot"):            # fail before a long run, not after it
            plots.pyplot()
        if _option(module, args, "accept") and not _option(module, args, "force"):
            import torch
            if not torch.cuda.is_available():
                raise ValueError("--accept: refusing to write a baseline from a run without a "
                                 "GPU (baselines hold GPU figures; --force to write one anyway)")
        record = module.run(args)
    except (ImportError, ValueError) as exc:
        if os.environ.get("FASTIPIRM_DEBUG"):
            raise
        return _error(str(exc), 2 if isinstance(exc, ValueError) else 1)
    print(module.format_table(record))
    status = module.status(record) if callable(getattr(module, "status", None)) else 0
    path = None
    if not getattr(args, "no_save", False):
        path = harness.save_record(record["benchmark"], record, results_dir)
        print(f"wrote {path}")
    if _option(module, args, "plot"):
        stem = (path or harness.record_path(record["benchmark"], results_dir)).with_suffix("")
        try:
            for png in plots.plot_record(record, stem):
                print(f"wrote {png}")
        except ValueError as exc:
            status = _error(f"--plot: {exc}", 1)
    if _option(module, args, "compare"):
        where = baselines.baseline_path()
        if not where.exists():
            status = _error(f"--compare: no baseline for this machine ({where}); write one "
                            "with --accept on this GPU", 1)
        else:
            failures = baselines.compare(record, baselines.load_baseline(where))
            for line in failures:
                print(f"REGRESSION {line}")
            print(f"compared with {where}: {len(failures)} failure(s)")
            status = status or (1 if failures else 0)
    if _option(module, args, "accept"):
        try:
            force = _option(module, args, "force")
            print(f"accepted into {baselines.accept(record, force=force)}")
        except ValueError as exc:
            status = _error(f"--accept: {exc}", 1)
    return status
