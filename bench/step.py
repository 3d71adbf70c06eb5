"""Step benchmark: one IP-IRM training step, the official-style step against fastipirm's.

    python -m bench step [--archs resnet50 resnet18] [--partitions 1 8] [--batch 256]
                         [--variants official fastipirm compiled simclr] [--device cuda]

For every architecture and every number P of retained partitions (K = 2 environments each),
in one process, on random uint8 source images of ``--source-size`` px (STL-10: 96) cropped to
``--crop`` px (official: 32):

* ``official``: :class:`bench.official_step.OfficialStep` (fp32, one graph and one double
  backward per environment, official cudnn flags) fed by the official per-image PIL pipeline
  in ``--workers`` DataLoader workers (``bench.official_style``);
* ``fastipirm``: the trainer's own IP-IRM step (``method.name = "ipirm"`` built by
  :func:`fastipirm.methods.build_method` as ``fastipirm train`` builds it: bf16 autocast on CUDA,
  channels_last, all partitions in one fused op) fed by the trainer's views
  (:class:`fastipirm.data.TwoViewBatches`: DALI when installed on CUDA, else the batched torch
  augmentation, as ``data.pipeline = "auto"``);
* ``compiled``: the same step under ``torch.compile`` (``MethodContext.compile_mode``: forward +
  objective, with CUDA graphs in the default ``reduce-overhead`` mode on CUDA, and the optimiser
  step); a failure is recorded in the row instead of a rate;
* ``simclr`` (once per architecture): the trainer's SimCLR step (``method.name = "simclr"``).

Each row has two rates: ``images_per_s`` with the data pipeline inside the timed step (what a
training epoch sees) and ``step_images_per_s`` on pre-made batches (model step only). Ratios:
``fastipirm/official`` and ``compiled/official`` (both rates), and the IP-IRM overhead
``time(fastipirm) / time(simclr)``; the targets are those of :mod:`bench.targets`. Timing:
:func:`bench.harness.measure` (CUDA events), each timed call runs ``--inner`` steps so the
per-call synchronisation is amortised; the warm-up of the data rows also drains the DataLoader's
prefetched batches. On a CPU the defaults are small (ResNet-18 width 8, batch 32) and the figures
are not GPU figures. On CUDA the default run compiles four steps (2 architectures x 2 values of
P, a few minutes); ``--archs`` and ``--variants`` split it.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from fastipirm.data import PIPELINES
from fastipirm.runtime import AMP_MODES

from .harness import device_and_defaults, figure, measure, random_images, sync
from .official_style import endless, stop_workers
from .targets import report

VARIANTS = ("official", "fastipirm", "compiled", "simclr")
GPU_DEFAULTS = dict(archs=["resnet50", "resnet18"], width=64, batch=256, num_images=8192,
                    warmup=3, repeats=10, inner=4, max_seconds=30.0)
CPU_DEFAULTS = dict(archs=["resnet18"], width=8, batch=32, num_images=256,
                    warmup=2, repeats=5, inner=1, max_seconds=10.0)
COMPILED_WARMUP = 8


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``bench.step`` (``None`` defaults resolve per device in :func:`run`)."""
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--archs", nargs="+", choices=["resnet50", "resnet18"], default=None,
                    help="default: resnet50 resnet18 on CUDA, resnet18 on CPU")
    ap.add_argument("--width", type=int, default=None,
                    help="ResNet base width (default: 64 official on CUDA, 8 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    ap.add_argument("--partitions", type=int, nargs="+", default=[1, 8],
                    help="numbers P of retained partitions")
    ap.add_argument("--envs", type=int, default=2, help="environments K per partition")
    ap.add_argument("--crop", type=int, default=32, help="RandomResizedCrop output size")
    ap.add_argument("--source-size", type=int, default=96, help="source image side (STL: 96)")
    ap.add_argument("--num-images", type=int, default=None,
                    help="random source images (default: 8192 on CUDA, 256 on CPU)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of 'official'")
    ap.add_argument("--pipeline", choices=PIPELINES, default="auto",
                    help="fastipirm's data pipeline (auto: DALI on CUDA when installed)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of 'compiled' (default: reduce-overhead on CUDA, "
                         "default on CPU)")
    ap.add_argument("--amp", choices=AMP_MODES, default="bf16",
                    help="fastipirm's autocast on CUDA (none on CPU)")
    ap.add_argument("--official-cudnn", choices=["official", "benchmark"], default="official",
                    help="official: deterministic cudnn without benchmark (official set_seed); "
                         "benchmark: give the official step cudnn autotuning")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    ap.add_argument("--inner", type=int, default=None, help="training steps per timed call")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a measurement after this long (at least 3 timed calls)")
    ap.add_argument("--seed", type=int, default=0)


def _resolve(args: argparse.Namespace) -> dict:
    device, opts = device_and_defaults(args, GPU_DEFAULTS, CPU_DEFAULTS)
    opts.update(device=device, partitions=list(args.partitions), envs=args.envs,
                crop=args.crop, source_size=args.source_size, workers=args.workers,
                pipeline=args.pipeline,
                variants=list(args.variants), amp=args.amp, seed=args.seed,
                compile_mode=args.compile_mode or ("reduce-overhead" if device.type == "cuda"
                                                   else "default"),
                official_cudnn=args.official_cudnn == "official")
    if opts["batch"] > opts["num_images"]:
        raise ValueError(f"--batch {opts['batch']} exceeds --num-images {opts['num_images']}")
    if min(opts["partitions"]) < 1 or opts["envs"] < 2:
        raise ValueError("--partitions must be >= 1 and --envs >= 2")
    for key in ("warmup", "repeats", "inner"):
        if opts[key] < (0 if key == "warmup" else 1):
            raise ValueError(f"--{key} must be {'>= 0' if key == 'warmup' else '>= 1'}")
    return opts


def _timed(step: Callable[[int], None], opts: dict, *, warmup: Optional[int] = None) -> dict:
    """``measure`` of ``--inner`` consecutive steps per call; per-step milliseconds and img/s."""
    inner = opts["inner"]

    def call(i):
        for j in range(inner):
            step(i * inner + j)

    m = measure(call, device=opts["device"].type,
                warmup=opts["warmup"] if warmup is None else warmup,
                repeats=opts["repeats"], max_seconds=opts["max_seconds"])
    ms = m["median_ms"] / inner
    return {"ms": ms, "images_per_s": opts["batch"] * 1e3 / ms, "p20_ms": m["p20_ms"] / inner,
            "p80_ms": m["p80_ms"] / inner, "calls": m["repeats"], "peak_mib": m["peak_mib"]}


def _cudagraph_skips() -> int:
    """Inductor's count of graphs that fell back from CUDA graphs (it logs each reason)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["inductor"]["cudagraph_skips"])
    except (ImportError, KeyError, TypeError):
        return 0


def _row(arch, partitions, variant, with_data: Optional[dict], step_only: Optional[dict],
         **extra) -> dict:
    row = {"arch": arch, "partitions": partitions, "variant": variant,
           "images_per_s": None, "ms": None, "step_images_per_s": None, "step_ms": None}
    if with_data is not None:
        row.update(images_per_s=with_data["images_per_s"], ms=with_data["ms"],
                   p20_ms=with_data["p20_ms"], p80_ms=with_data["p80_ms"],
                   peak_mib=with_data["peak_mib"])
    if step_only is not None:
        row.update(step_images_per_s=step_only["images_per_s"], step_ms=step_only["ms"],
                   step_p20_ms=step_only["p20_ms"], step_p80_ms=step_only["p80_ms"],
                   step_peak_mib=step_only["peak_mib"])
    row.update(extra)
    return row


# ----------------------------------------------------------------------------------------------
# the variants


def _official_rows(arch: str, opts: dict, batches: Iterator, n: int) -> list[dict]:
    from fastipirm.models import SimCLRModel

    from .official_step import OfficialStep, official_cudnn

    device = opts["device"]
    rows = []
    # drain what the workers prefetched, so the data rows time the pipeline's steady state
    data_warmup = max(opts["warmup"], -(-(2 * opts["workers"] + 2) // opts["inner"]))
    for p in opts["partitions"]:
        torch.manual_seed(opts["seed"])
        model = SimCLRModel(arch=arch, width=opts["width"]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
        step = OfficialStep(model, opt, list(_partitions(p, n, opts).unbind(0)), device=device)
        fixed = [next(batches) for _ in range(3)]

        def with_data(i):
            pos_1, pos_2, _, idx = next(batches)
            step(pos_1, pos_2, idx)

        def step_only(i):
            pos_1, pos_2, _, idx = fixed[i % len(fixed)]
            step(pos_1, pos_2, idx)

        with official_cudnn(opts["official_cudnn"]):
            data = _timed(with_data, opts, warmup=data_warmup)
            only = _timed(step_only, opts)
        rows.append(_row(arch, p, "official", data, only))
    return rows


def _partitions(p: int, n: int, opts: dict) -> torch.Tensor:
    """``(P, N, K)`` random partition logits on the device, the same for every variant."""
    from fastipirm.seeding import Stream, derived_generator

    g = derived_generator(opts["seed"], Stream.THETA_INIT)
    return torch.randn(p, n, opts["envs"], generator=g).to(opts["device"])


def _fast_views(opts: dict, images: np.ndarray):
    """fastipirm's training views (:class:`fastipirm.data.TwoViewBatches`) of ``images``."""
    from fastipirm.data import ArrayDataset, TwoViewBatches
    from fastipirm.seeding import Stream, derived_generator

    device = opts["device"]
    data = ArrayDataset(images=images, labels=None, num_classes=0, name="bench")
    try:
        return TwoViewBatches(data, opts["batch"], seed=opts["seed"], device=device,
                              pipeline=opts["pipeline"], out_size=opts["crop"],
                              generator=derived_generator(opts["seed"], Stream.AUGMENT,
                                                          device=device))
    except ImportError as exc:
        raise ValueError(f"--pipeline {opts['pipeline']}: {exc}") from None


def config(arch: str, *, width: int, batch: int, amp: str, method: str = "ipirm"):
    """The :class:`fastipirm.config.Config` of a benchmark step (defaults elsewhere)."""
    from fastipirm.config import Config

    cfg = Config()
    cfg.model.arch, cfg.model.width = arch, width
    cfg.train.batch_size, cfg.train.amp = batch, amp
    cfg.method.name = method
    return cfg


def build_method(cfg, device: torch.device, *, seed: int, compile_mode: Optional[str] = None):
    """The trainer's method for ``cfg`` as ``fastipirm train`` builds it: the model (initialised
    from torch's global generator seeded with ``seed``) placed on ``device`` in channels_last,
    Adam, the GradScaler and autocast of ``train.amp``, the step compiled in ``compile_mode``."""
    from fastipirm import methods, runtime

    torch.manual_seed(seed)
    model = runtime.place_model(runtime.build_model(cfg), cfg, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay)
    ctx = methods.MethodContext(cfg, model, optimizer, device,
                                scaler=runtime.grad_scaler(device, cfg.train.amp),
                                autocast=runtime.autocast_factory(device, cfg.train.amp),
                                compile_mode=compile_mode)
    return methods.build_method(cfg.method.name, ctx)


def _fast_row(arch: str, p: int, variant: str, opts: dict, views: Iterator, n: int) -> dict:
    """One fastipirm row: ``fastipirm`` / ``compiled`` at P partitions, or ``simclr`` (p = 0)."""
    device = opts["device"]
    cfg = config(arch, width=opts["width"], batch=opts["batch"], amp=opts["amp"],
                 method="simclr" if variant == "simclr" else "ipirm")
    compile_mode = opts["compile_mode"] if variant == "compiled" else None
    if compile_mode is not None:
        torch._dynamo.reset()           # a fresh compile per row: no shape reuse between rows
    fixed = [next(views) for _ in range(3)]
    extra = {}
    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"      # as the trainer sets it
    try:
        if compile_mode is not None:
            extra["compile_mode"] = compile_mode
            skips_before = _cudagraph_skips()
            t0 = time.perf_counter()
        try:
            method = build_method(cfg, device, seed=opts["seed"], compile_mode=compile_mode)
            if variant != "simclr":
                method.partitions = _partitions(p, n, opts)
                method.penalty_weight = cfg.ipirm.penalty_weight
            if compile_mode is not None:
                method.step(*fixed[0])                           # compiles
                sync(device)
        except Exception as exc:  # noqa: BLE001 - the row reports why compile failed
            if compile_mode is None:
                raise
            return _row(arch, p, variant, None, None, compile_mode=compile_mode,
                        error=f"torch.compile failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}")
        if compile_mode is not None:
            extra["first_call_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                extra["cudagraph_skips"] = _cudagraph_skips() - skips_before
            # compiled code settles over its first calls (cudagraph recording, lazy inits)
            warmup = max(opts["warmup"], COMPILED_WARMUP)
        else:
            warmup = opts["warmup"]
        only = _timed(lambda i: method.step(*fixed[i % len(fixed)]), opts, warmup=warmup)
        data = _timed(lambda i: method.step(*next(views)), opts, warmup=warmup)
    finally:
        torch.backends.cudnn.benchmark = cudnn
    return _row(arch, p if variant != "simclr" else 0, variant, data, only, **extra)


# ----------------------------------------------------------------------------------------------
# record


def _ratios(rows: list[dict]) -> list[dict]:
    """Per (arch, P): fastipirm and compiled over official (rates), IP-IRM over SimCLR (time)."""
    def find(arch, p, variant):
        for r in rows:
            if r["arch"] == arch and r["variant"] == variant and (
                    variant == "simclr" or r["partitions"] == p):
                return r
        return None

    def div(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    out = []
    keys = sorted({(r["arch"], r["partitions"]) for r in rows if r["variant"] != "simclr"})
    for arch, p in keys:
        off, fast, comp = (find(arch, p, v) for v in ("official", "fastipirm", "compiled"))
        simclr = find(arch, p, "simclr")
        entry = {"arch": arch, "partitions": p}
        for name, r in (("fastipirm", fast), ("compiled", comp)):
            if r is not None and off is not None:
                entry[f"{name}_vs_official"] = div(r["images_per_s"], off["images_per_s"])
                entry[f"{name}_vs_official_step_only"] = div(r["step_images_per_s"],
                                                             off["step_images_per_s"])
        if fast is not None and simclr is not None:
            entry["ipirm_overhead"] = div(fast["step_ms"], simclr["step_ms"])
            entry["ipirm_overhead_with_data"] = div(fast["ms"], simclr["ms"])
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict:
    """Measure every requested variant; returns the record (not saved)."""
    opts = _resolve(args)
    device = opts["device"]
    images = random_images(opts["num_images"], opts["source_size"], opts["seed"])
    n = len(images)
    rows: list[dict] = []
    official_loader = None
    pipeline = None
    try:
        if "official" in opts["variants"]:
            from .official_style import official_loader as make_loader
            official_loader = make_loader(images, batch_size=opts["batch"],
                                          workers=opts["workers"], out_size=opts["crop"])
            batches = endless(official_loader)
            next(batches)                           # start the workers before any timing
        fast_variants = [v for v in ("fastipirm", "compiled", "simclr") if v in opts["variants"]]
        if fast_variants:
            two_views = _fast_views(opts, images)
            pipeline, views = two_views.pipeline, two_views.forever()
        for arch in opts["archs"]:
            if "official" in opts["variants"]:
                rows += _official_rows(arch, opts, batches, n)
            for p in opts["partitions"]:
                for variant in ("fastipirm", "compiled"):
                    if variant in opts["variants"]:
                        rows.append(_fast_row(arch, p, variant, opts, views, n))
            if "simclr" in opts["variants"]:
                rows.append(_fast_row(arch, 0, "simclr", opts, views, n))
    finally:
        if official_loader is not None:
            stop_workers(official_loader)
    record = {
        "benchmark": "step", "device": device.type,
        "figures": ("GPU figures" if device.type == "cuda" else
                    "CPU figures at small sizes: not GPU figures, for a smoke run only"),
        "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in opts.items()},
        "pipeline": pipeline, "official_pipeline": f"PIL, {opts['workers']} DataLoader workers",
        "amp": opts["amp"] if device.type == "cuda" else "none",
        "rows": rows, "ratios": _ratios(rows),
    }
    return record


_RATIO_FIGURES = {"fastipirm_vs_official": ("fastipirm_over_official", True),
                  "fastipirm_vs_official_step_only": ("fastipirm_over_official_step_only", True),
                  "compiled_vs_official": ("compiled_over_official", True),
                  "compiled_vs_official_step_only": ("compiled_over_official_step_only", True),
                  "ipirm_overhead": ("ipirm_over_simclr_time", False),
                  "ipirm_overhead_with_data": ("ipirm_over_simclr_time_with_data", False)}


def figures(record: dict) -> dict:
    """``step/<arch>/P=<P>/<variant>/{images_per_s,step_images_per_s}`` and the ratios
    ``step/<arch>/P=<P>/<ratio>`` (see ``bench.baselines``)."""
    out = {}
    for r in record.get("rows", []):
        for metric in ("images_per_s", "step_images_per_s"):
            if r.get(metric) is not None:
                out[f"step/{r['arch']}/P={r['partitions']}/{r['variant']}/{metric}"] = \
                    figure(r[metric], True)
    for q in record.get("ratios", []):
        for field, (name, higher) in _RATIO_FIGURES.items():
            if q.get(field) is not None:
                out[f"step/{q['arch']}/P={q['partitions']}/{name}"] = figure(q[field], higher)
    return out


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(record: dict) -> str:
    """The rows and ratios of a record as text."""
    s = record["settings"]
    lines = [f"training step on {record['device']} ({record['figures']}): batch {s['batch']}, "
             f"{s['crop']} px, width {s['width']}, fastipirm pipeline {record['pipeline']}, "
             f"amp {record['amp']}",
             f"{'arch':<9} {'P':>2} {'variant':<10} {'img/s':>9} {'ms':>8} "
             f"{'step img/s':>11} {'step ms':>8}  note"]
    for r in record["rows"]:
        note = r.get("error") or (f"compile {r['first_call_s']:.1f}s ({r['compile_mode']})"
                                  if r.get("first_call_s") is not None else "")
        if r.get("cudagraph_skips"):
            note += f"; {r['cudagraph_skips']} graph(s) ran without CUDA graphs (see the log)"
        lines.append(f"{r['arch']:<9} {r['partitions']:>2} {r['variant']:<10} "
                     f"{_fmt(r['images_per_s']):>9} {_fmt(r['ms'], '.2f'):>8} "
                     f"{_fmt(r['step_images_per_s']):>11} {_fmt(r['step_ms'], '.2f'):>8}  {note}")
    if record["ratios"]:
        lines.append("")
        lines.append(f"{'arch':<9} {'P':>2} {'fast/off':>9} {'(step)':>7} {'comp/off':>9} "
                     f"{'(step)':>7} {'IP-IRM/SimCLR':>14} {'(data)':>7}")
        for q in record["ratios"]:
            lines.append(
                f"{q['arch']:<9} {q['partitions']:>2} "
                f"{_fmt(q.get('fastipirm_vs_official'), '.2f'):>9} "
                f"{_fmt(q.get('fastipirm_vs_official_step_only'), '.2f'):>7} "
                f"{_fmt(q.get('compiled_vs_official'), '.2f'):>9} "
                f"{_fmt(q.get('compiled_vs_official_step_only'), '.2f'):>7} "
                f"{_fmt(q.get('ipirm_overhead'), '.3f'):>14} "
                f"{_fmt(q.get('ipirm_overhead_with_data'), '.3f'):>7}")
    return "\n".join(lines + report(record))

