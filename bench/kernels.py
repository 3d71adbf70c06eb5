"""Kernel microbenchmark of env_contrastive_loss: forward + backward of every implementation.

    python -m bench.kernels          # GPU: 2B in (512, 2048, 8192, 16384), D=128, M in (2, 16)
    python -m bench.kernels --small  # CPU: tiny sizes, Triton in its interpreter

In one process and one run, for hard and soft mode, times forward + backward (random upstream
gradient; median over repeats after warm-up; CUDA events on a GPU, perf_counter on the CPU;
input sets rotated between repeats) and the peak memory above the inputs of:

* ``reference``: the literal official-style eager path (loop over environments, boolean
  selection, double backward; :func:`fastipirm.ops.env_contrastive_loss_reference`);
* ``torch.compile``: ``torch.compile`` of the ``"torch"`` backend;
* ``torch``: the vectorised ``"torch"`` backend, eager;
* ``triton``: the fused Triton kernels (``kernels/env_contrastive.py``).

Reports achieved TFLOP/s against the nominal matmul work of the op, 3 x 2 (2B)^2 D (similarity
forward and its two backward GEMMs), prints a table and writes JSON (device name, versions, date,
command) to ``bench/results/``. Under the interpreter (``--small``) the times are NOT GPU figures:
the file name says ``cpu-interpreter``. Peak memory is only measured on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("reference", "torch.compile", "torch", "triton")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes for a CPU run (Triton in the interpreter)")
    ap.add_argument("--n", type=int, nargs="+", help="values of 2B (default per mode)")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--envs", type=int, nargs="+", default=None)
    ap.add_argument("--mode", choices=("hard", "soft"), nargs="+", default=["hard", "soft"])
    ap.add_argument("--impl", choices=IMPLS, nargs="+", default=list(IMPLS))
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="input dtype (default bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--max-reference-n", type=int, default=16384,
                    help="skip the literal reference above this 2B")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="per row: stop repeating (after 3 timed runs) once this much time passed")
    ap.add_argument("--out", type=str, default=None, help="JSON path (default: bench/results/)")
    ap.add_argument("--no-save", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    import torch
    cuda = torch.cuda.is_available() and not args.small
    if not cuda:
        # must precede the first import of the kernels (Triton decides at decoration time)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch.nn.functional as F

    from fastipirm.ops import env_contrastive_loss_reference
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch

    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    if not cuda and dtype == torch.bfloat16:
        raise SystemExit("bf16 is not supported by the Triton interpreter: use --dtype fp32/fp16")
    sizes = args.n or ([16, 64] if args.small or not cuda else [512, 2048, 8192, 16384])
    dim = args.dim or (32 if args.small or not cuda else 128)
    envs = args.envs or [2, 16]
    repeats = args.repeats or (3 if not cuda else 20)
    warmup = args.warmup if args.warmup is not None else (1 if not cuda else 3)
    kw = dict(temperature=0.5, irm_temperature=0.5, penalty="slot")

    impls = {}
    if "reference" in args.impl:
        impls["reference"] = env_contrastive_loss_reference
    if "torch.compile" in args.impl:
        import torch._dynamo
        for knob in ("recompile_limit", "cache_size_limit"):  # one graph per shape and mode
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        impls["torch.compile"] = torch.compile(env_contrastive_loss_torch, dynamic=False)
    if "torch" in args.impl:
        impls["torch"] = env_contrastive_loss_torch
    if "triton" in args.impl:
        try:
            from kernels.env_contrastive import env_contrastive_loss_triton
            impls["triton"] = env_contrastive_loss_triton
        except Exception as exc:  # noqa: BLE001 - reported in the table
            print(f"triton unavailable: {type(exc).__name__}: {exc}")

    def make_sets(n, m, soft, count=3):
        b = n // 2
        sets = []
        for _ in range(count):
            z1 = F.normalize(torch.randn(b, dim, device=device), dim=1).to(dtype)
            z2 = F.normalize(torch.randn(b, dim, device=device), dim=1).to(dtype)
            w = (torch.rand(b, m, device=device) if soft
                 else (torch.rand(b, m, device=device) < 0.5).float())
            sets.append((z1, z2, w, torch.randn(m, device=device), torch.randn(m, device=device)))
        return sets

    def step(fn, s, soft):
        z1, z2, w, ul, up = s
        z1 = z1.detach().clone().requires_grad_()
        z2 = z2.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_(soft)
        return z1, z2, w, ul, up

    def time_one(fn, sets, soft):
        times = []
        t_start = time.perf_counter()
        for i in range(warmup + repeats):
            if len(times) >= 3 and time.perf_counter() - t_start > args.max_seconds:
                break  # slow implementation (the literal reference at large 2B): fewer repeats
            z1, z2, w, ul, up = step(fn, sets[i % len(sets)], soft)
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            loss, pen = fn(z1, z2, w, soft=soft, **kw)
            ((loss * ul.to(loss.dtype)).sum() + (pen * up.to(pen.dtype)).sum()).backward()
            if cuda:
                end.record()
                torch.cuda.synchronize()
                dt = start.elapsed_time(end)
            else:
                dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(dt)
        peak = None
        if cuda:
            z1, z2, w, ul, up = step(fn, sets[0], soft)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss, pen = fn(z1, z2, w, soft=soft, **kw)
            ((loss * ul.to(loss.dtype)).sum() + (pen * up.to(pen.dtype)).sum()).backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return statistics.median(times), min(times), peak, len(times)

    rows = []
    for n in sizes:
        for m in envs:
            for mode in args.mode:
                soft = mode == "soft"
                sets = make_sets(n, m, soft)
                flops = 3 * 2 * n * n * dim
                for name, fn in impls.items():
                    row = {"n": n, "batch": n // 2, "dim": dim, "envs": m, "mode": mode,
                           "impl": name, "dtype": str(dtype).replace("torch.", "")}
                    if name == "reference" and n > args.max_reference_n:
                        row["status"] = f"skipped (2B > {args.max_reference_n})"
                    else:
                        try:
                            med, best, peak, reps = time_one(fn, sets, soft)
                            row.update(status="ok", median_ms=med, min_ms=best, peak_mib=peak,
                                       repeats=reps, tflops=flops / (med * 1e-3) / 1e12)
                        except Exception as exc:  # noqa: BLE001 - OOM or compile failure
                            row["status"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                            if cuda:
                                torch.cuda.empty_cache()
                    rows.append(row)
                    print(_fmt(row), flush=True)
                ok = {r["impl"]: r for r in rows if r["n"] == n and r["envs"] == m
                      and r["mode"] == mode and r.get("status") == "ok"}
                if "triton" in ok:
                    for r in rows[-len(impls):]:
                        if r.get("status") == "ok":
                            r["triton_speedup"] = r["median_ms"] / ok["triton"]["median_ms"]
    dev_name = (torch.cuda.get_device_name() if cuda else
                f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    print()
    print(f"env_contrastive_loss fwd+bwd on {dev_name}, D={dim}, dtype={dtype}, "
          f"median of {repeats} after {warmup} warm-up")
    print(_header())
    for r in rows:
        print(_fmt(r))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = {
        "benchmark": "bench.kernels",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.kernels"] +
                            list(argv if argv is not None else sys.argv[1:])),
        "device": dev_name,
        "gpu": cuda,
        "triton_interpreter": not cuda,
        "note": ("GPU figures" if cuda else
                 "CPU run with Triton in its interpreter: NOT a GPU figure; the triton times "
                 "measure the NumPy interpreter, not the kernels"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton_version,
                     "cuda": torch.version.cuda if cuda else None},
        "flops_model": "3 * 2 * (2B)^2 * D",
        "timing": "CUDA events" if cuda else "time.perf_counter",
        "repeats": repeats, "warmup": warmup,
        "rows": rows,
    }
    if not args.no_save:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        tag = "gpu-" + "".join(c if c.isalnum() else "_" for c in dev_name) if cuda \
            else "cpu-interpreter"
        path = Path(args.out) if args.out else RESULTS / f"kernels_{tag}_{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")
    return record


def _header():
    return (f"{'2B':>6} {'M':>3} {'mode':<5} {'impl':<14} {'median ms':>10} {'TFLOP/s':>8} "
            f"{'peak MiB':>9} {'x triton':>8}  status")


def _fmt(r):
    if r.get("status") != "ok":
        return (f"{r['n']:>6} {r['envs']:>3} {r['mode']:<5} {r['impl']:<14} {'-':>10} {'-':>8} "
                f"{'-':>9} {'-':>8}  {r.get('status')}")
    peak = f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "n/a"
    spd = f"{r['triton_speedup']:.2f}" if "triton_speedup" in r else "-"
    return (f"{r['n']:>6} {r['envs']:>3} {r['mode']:<5} {r['impl']:<14} {r['median_ms']:>10.3f} "
            f"{r['tflops']:>8.3g} {peak:>9} {spd:>8}  ok")


if __name__ == "__main__":
    main()
