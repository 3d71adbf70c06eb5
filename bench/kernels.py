"""Kernel microbenchmark of env_contrastive_loss: forward + backward of every implementation.

    python -m bench kernels          # GPU: 2B in (512, 2048, 8192, 16384), D=128, M in (2, 16)
    python -m bench kernels          # CPU: 2B=512, D=128, M=16 (under a minute on 2 cores)
    python -m bench kernels --small  # CPU: tiny sizes, Triton in its interpreter

In one process and one run, for hard and soft mode, times forward + backward (random upstream
gradients, three input sets rotated between calls, warm-up excluded; ``bench.harness.measure``:
CUDA events on a GPU, ``perf_counter`` on the CPU) of:

* ``reference``: the literal official-style eager path (loop over environments, boolean
  selection, double backward; :func:`fastipirm.ops.env_contrastive_loss_reference`);
* ``torch.compile``: ``torch.compile`` of the ``"torch"`` backend;
* every backend of :func:`fastipirm.ops.available_backends` for the device (``torch``, ``cpu``,
  ``triton``, ``cuda``, ...), called through :func:`fastipirm.ops.env_contrastive_loss` with
  ``check_values=False``. On the CPU, ``triton`` runs only with ``--small`` (its interpreter).

Reports the median and p20/p80 in ms, TFLOP/s against the nominal matmul work 3 x 2 (2B)^2 D
(similarity forward and its two backward GEMMs), the peak memory above the inputs (CUDA only),
the speed-up over ``reference``, ``torch`` and ``torch.compile``, and the peak memory as a
fraction of theirs. Under the interpreter the Triton times measure NumPy, not the kernels.
"""
from __future__ import annotations

import argparse
import os

from .harness import fmt, ratio

NAME = "kernels"
SPECIAL = ("reference", "torch.compile")     # implementations that are not backends
GPU_SIZES, CPU_SIZES, SMALL_SIZES = (512, 2048, 8192, 16384), (512,), (16, 64)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the kernel benchmark."""
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes on the CPU, Triton in its interpreter (sets "
                         "TRITON_INTERPRET=1 when fastipirm.ops is not imported yet)")
    ap.add_argument("--device", default=None,
                    help="cpu | cuda | cuda:N (default: cuda when available, cpu with --small)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--n", type=int, nargs="+",
                      help="values of 2B (default: 512 2048 8192 16384 on a GPU, 512 on the CPU, "
                           "16 64 with --small)")
    size.add_argument("--batch", type=int, nargs="+", help="values of B instead of 2B")
    ap.add_argument("--dim", type=int, default=None, help="D (default 128, 32 with --small)")
    ap.add_argument("--envs", type=int, nargs="+", default=None,
                    help="values of M (default: 2 16 on a GPU and with --small, 16 on the CPU)")
    ap.add_argument("--mode", choices=("hard", "soft"), nargs="+", default=["hard", "soft"])
    ap.add_argument("--impl", nargs="+", default=None,
                    help="implementations: reference, torch.compile and backend names (default: "
                         "reference, torch.compile and every available backend)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="input dtype (default bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per row (default 20 on a GPU, 7 on the CPU, 3 with --small)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first (default 3 on a GPU, 1 on the CPU)")
    ap.add_argument("--max-reference-n", type=int, default=16384,
                    help="skip the literal reference above this 2B")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="per row: stop repeating (after 3 timed calls) once this much time passed")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _resolve(args) -> dict:
    """Sizes, device, dtype and counts from ``args`` and the machine; ValueError on bad input."""
    from .harness import resolve_device

    if args.small and args.device not in (None, "cpu"):
        raise ValueError(f"--small runs on the CPU (Triton in its interpreter); got --device "
                         f"{args.device}")
    device = str(resolve_device(args.device, fallback="cpu" if args.small else "auto"))
    cuda = device.startswith("cuda")
    if args.batch:
        sizes = [2 * b for b in args.batch]
    else:
        sizes = args.n or list(SMALL_SIZES if args.small else GPU_SIZES if cuda else CPU_SIZES)
    envs = args.envs or ([16] if not cuda and not args.small else [2, 16])
    dim = args.dim or (32 if args.small else 128)
    for label, values in (("2B", sizes), ("M", envs), ("D", [dim])):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"{label} must be positive, got {bad}")
    odd = [n for n in sizes if n % 2]
    if odd:
        raise ValueError(f"2B must be even (two views of B samples), got {odd}")
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    repeats = args.repeats or (20 if cuda else 3 if args.small else 7)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    return {"device": device, "cuda": cuda, "sizes": sizes, "envs": envs, "dim": dim,
            "dtype": dtype, "repeats": repeats, "warmup": warmup}


def _implementations(args, device: str) -> tuple[dict, dict]:
    """``({name: fn}, {name: reason it is absent})`` with ``fn(z1, z2, w, soft=...)``."""
    import torch

    from fastipirm.ops import (
        available_backends,
        env_contrastive_loss,
        env_contrastive_loss_reference,
    )
    from fastipirm.ops.backends import BACKENDS
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch

    kw = dict(temperature=0.5, irm_temperature=0.5, penalty="slot")
    dev_type = device.split(":")[0]
    available = available_backends(dev_type)
    if dev_type == "cpu" and not args.small:
        available = [b for b in available if b != "triton"]   # the interpreter: --small only
    wanted = args.impl or list(SPECIAL) + available
    if args.small and not args.impl and "triton" not in available:
        wanted.append("triton")                            # a row that says why it is missing
    known = list(SPECIAL) + list(BACKENDS)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {known}")
    impls, absent = {}, {}
    for name in wanted:
        if name == "reference":
            impls[name] = lambda z1, z2, w, soft: env_contrastive_loss_reference(
                z1, z2, w, soft=soft, **kw)
        elif name == "torch.compile":
            import torch._dynamo
            for knob in ("recompile_limit", "cache_size_limit"):  # one graph per shape and mode
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 256)
            compiled = torch.compile(env_contrastive_loss_torch, dynamic=False)
            impls[name] = lambda z1, z2, w, soft, f=compiled: f(z1, z2, w, soft=soft, **kw)
        elif name in available:
            impls[name] = lambda z1, z2, w, soft, b=name: env_contrastive_loss(
                z1, z2, w, soft=soft, backend=b, check_values=False, **kw)
        elif dev_type == "cpu" and name == "triton":
            absent[name] = ("on the CPU only in the Triton interpreter: --small, in a process "
                            "where TRITON_INTERPRET=1 was set before fastipirm was imported")
        else:
            b = BACKENDS[name]
            absent[name] = (f"does not run on {dev_type}" if dev_type not in b.devices
                            else f"unavailable: {b.error}")
    return impls, absent


def _input_sets(n: int, m: int, dim: int, soft: bool, dtype, device: str, count: int = 3):
    """``count`` sets of leaf inputs ``(z1, z2, w)`` and random upstream gradients."""
    import torch
    import torch.nn.functional as F

    b = n // 2
    sets = []
    for _ in range(count):
        z1 = F.normalize(torch.randn(b, dim, device=device), dim=1).to(dtype).requires_grad_()
        z2 = F.normalize(torch.randn(b, dim, device=device), dim=1).to(dtype).requires_grad_()
        w = (torch.rand(b, m, device=device) if soft
             else (torch.rand(b, m, device=device) < 0.5).float()).requires_grad_(soft)
        sets.append((z1, z2, w, torch.randn(m, device=device), torch.randn(m, device=device)))
    return sets



def run(args: argparse.Namespace) -> dict:
    """Time every implementation at every size; return the record (not saved)."""
    import sys

    import torch

    cfg = _resolve(args)
    if args.small and "fastipirm.ops" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"   # read when fastipirm.ops and kernels are imported
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dim, dtype = cfg["device"], cfg["dim"], getattr(torch, DTYPES[cfg["dtype"]])
    impls, absent = _implementations(args, device)
    rows = []
    for n in cfg["sizes"]:
        for m in cfg["envs"]:
            for mode in args.mode:
                soft = mode == "soft"
                group = []
                sets = _input_sets(n, m, dim, soft, dtype, device)
                for name in list(impls) + list(absent):
                    row = {"n": n, "batch": n // 2, "dim": dim, "envs": m, "mode": mode,
                           "impl": name, "dtype": cfg["dtype"]}
                    if name in absent:
                        row["status"] = absent[name]
                    elif name == "reference" and n > args.max_reference_n:
                        row["status"] = f"skipped (2B > {args.max_reference_n})"
                    elif name == "triton" and not cfg["cuda"] and cfg["dtype"] == "bf16":
                        row["status"] = "skipped (the Triton interpreter has no bf16)"
                    else:
                        row.update(_time_one(impls[name], sets, soft, cfg, args.max_seconds))
                        if row["status"] == "ok":
                            row["tflops"] = 6 * n * n * dim / (row["median_ms"] * 1e-3) / 1e12
                    group.append(row)
                _add_ratios(group)
                rows.extend(group)
                del sets
    record = {
        "benchmark": NAME,
        "device": torch.cuda.get_device_name(device) if cfg["cuda"] else "cpu",
        "triton_interpreter": not cfg["cuda"] and "triton" in impls,
        "dim": dim, "dtype": cfg["dtype"], "repeats": cfg["repeats"], "warmup": cfg["warmup"],
        "threads": torch.get_num_threads(),
        "timing": "CUDA events" if cfg["cuda"] else "time.perf_counter",
        "flops_model": "3 * 2 * (2B)^2 * D",
        "args": dict(vars(args)),
        "rows": rows,
    }
    if record["triton_interpreter"]:
        record["note"] = ("CPU run with Triton in its interpreter: the triton times measure the "
                          "NumPy interpreter, not the kernels")
    return record


def _time_one(fn, sets, soft: bool, cfg: dict, max_seconds: float) -> dict:
    import torch

    from .harness import measure

    def step(i):
        z1, z2, w, up_loss, up_pen = sets[i % len(sets)]
        z1.grad = z2.grad = w.grad = None
        loss, pen = fn(z1, z2, w, soft=soft)
        torch.autograd.backward([loss, pen], [up_loss.to(loss.dtype), up_pen.to(pen.dtype)])

    try:
        res = measure(step, device=cfg["device"], warmup=cfg["warmup"], repeats=cfg["repeats"],
                      max_seconds=max_seconds)
    except Exception as exc:  # noqa: BLE001 - OOM or a compile failure is a row of the table
        if cfg["cuda"]:
            torch.cuda.empty_cache()
        return {"status": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        for z1, z2, w, _, _ in sets:
            z1.grad = z2.grad = w.grad = None
    return {"status": "ok", **res}


def _add_ratios(group: list) -> None:
    """Speed-ups over and memory fractions of reference, torch and torch.compile, in place."""
    ok = {r["impl"]: r for r in group if r["status"] == "ok"}
    for r in ok.values():
        for base, tag in (("reference", "reference"), ("torch", "torch"),
                          ("torch.compile", "compile")):
            if base in ok:
                r[f"x_{tag}"] = ratio(ok[base]["median_ms"], r["median_ms"])
                if tag != "torch":
                    r[f"memory_over_{tag}"] = ratio(r.get("peak_mib"),
                                                    ok[base].get("peak_mib"))


FIGURES = {"median_ms": False, "peak_mib": False, "x_reference": True, "x_torch": True,
           "x_compile": True, "memory_over_reference": False, "memory_over_compile": False}


def figure_key(row: dict, metric: str) -> str:
    """``kernels/<dtype>/D=<D>/2B=<n>/M=<M>/<mode>/<impl>/<metric>``."""
    return (f"{NAME}/{row['dtype']}/D={row['dim']}/2B={row['n']}/M={row['envs']}/{row['mode']}/"
            f"{row['impl']}/{metric}")


def figures(record: dict) -> dict:
    """The comparable numbers of a kernels record (see ``bench.baselines``)."""
    from .harness import row_figures

    return row_figures(record, FIGURES, figure_key)



def format_table(record: dict) -> str:
    """The record as a text table."""
    head = (f"env_contrastive_loss fwd+bwd on {record['device']}, D={record['dim']}, "
            f"dtype={record['dtype']}, median of up to {record['repeats']} after "
            f"{record['warmup']} warm-up ({record['timing']}, {record['threads']} CPU threads)")
    lines = [head]
    if record.get("note"):
        lines.append(f"note: {record['note']}")
    lines.append(f"{'2B':>6} {'M':>3} {'mode':<5} {'impl':<14} {'median ms':>10} {'p20':>9} "
                 f"{'p80':>9} {'TFLOP/s':>8} {'peak MiB':>9} {'x ref':>7} {'x torch':>7} "
                 f"{'x compile':>9} {'mem/ref':>8} {'mem/comp':>8}  status")
    for r in record["rows"]:
        lead = f"{r['n']:>6} {r['envs']:>3} {r['mode']:<5} {r['impl']:<14}"
        if r["status"] != "ok":
            lines.append(f"{lead} {'-':>10} {'-':>9} {'-':>9} {'-':>8} {'-':>9} {'-':>7} {'-':>7} "
                         f"{'-':>9} {'-':>8} {'-':>8}  {r['status']}")
            continue
        lines.append(
            f"{lead} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f} "
            f"{r['tflops']:>8.3g} {fmt(r.get('peak_mib'), '.1f'):>9} "
            f"{fmt(r.get('x_reference'), '.2f'):>7} {fmt(r.get('x_torch'), '.2f'):>7} "
            f"{fmt(r.get('x_compile'), '.2f'):>9} "
            f"{fmt(r.get('memory_over_reference'), '.3f'):>8} "
            f"{fmt(r.get('memory_over_compile'), '.3f'):>8}  ok")
    return "\n".join(lines)

