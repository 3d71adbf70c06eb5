"""CPU benchmark of env_contrastive_loss: the literal reference against every CPU backend.

    python -m bench.cpu [--batch 256] [--dim 128] [--envs 16] [--repeats 7] [--threads N]

Times forward + backward (random upstream gradient, fresh inputs rotated between repeats) for
hard and soft mode, reports the median and p20/p80 in ms and the speed-up of each backend over the
reference, prints a table and writes a JSON record (host, versions, date, command) to
``bench/results/``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastipirm.ops import available_backends, env_contrastive_loss, env_contrastive_loss_reference

from .harness import save_record


def _inputs(batch, dim, envs, soft, sets):
    out = []
    for _ in range(sets):
        z1 = F.normalize(torch.randn(batch, dim), dim=1)
        z2 = F.normalize(torch.randn(batch, dim), dim=1)
        w = torch.rand(batch, envs) if soft else (torch.rand(batch, envs) < 0.5).float()
        out.append((z1, z2, w, torch.randn(envs), torch.randn(envs)))
    return out


def time_fwd_bwd(fn, inputs, soft, repeats, warmup=1):
    """Median/p20/p80 milliseconds of one forward + backward, rotating the input sets."""
    times = []
    for i in range(warmup + repeats):
        z1, z2, w, up_l, up_p = inputs[i % len(inputs)]
        z1 = z1.clone().requires_grad_()
        z2 = z2.clone().requires_grad_()
        w = w.clone().requires_grad_(soft)
        t0 = time.perf_counter()
        loss, pen = fn(z1, z2, w)
        ((loss * up_l).sum() + (pen * up_p).sum()).backward()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(dt)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3],
            "repeats": repeats}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", action="append", help="only these backends (repeatable)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backend or available_backends("cpu")
    kw = dict(temperature=0.5, irm_temperature=0.5)
    rows = []
    for soft in (False, True):
        inputs = _inputs(args.batch, args.dim, args.envs, soft, sets=3)
        ref = time_fwd_bwd(lambda a, b, c: env_contrastive_loss_reference(a, b, c, soft=soft, **kw),
                           inputs, soft, args.repeats)
        rows.append({"mode": "soft" if soft else "hard", "impl": "reference", **ref,
                     "speedup_vs_reference": 1.0})
        for name in backends:
            res = time_fwd_bwd(lambda a, b, c: env_contrastive_loss(a, b, c, soft=soft,
                                                                    backend=name, **kw),
                               inputs, soft, args.repeats)
            rows.append({"mode": "soft" if soft else "hard", "impl": name, **res,
                         "speedup_vs_reference": ref["median_ms"] / res["median_ms"]})
    print(f"env_contrastive_loss fwd+bwd on CPU ({torch.get_num_threads()} threads), "
          f"B={args.batch} (2B={2 * args.batch}), D={args.dim}, M={args.envs}")
    print(f"{'mode':<5} {'impl':<10} {'median ms':>10} {'p20':>9} {'p80':>9} {'x reference':>12}")
    for r in rows:
        print(f"{r['mode']:<5} {r['impl']:<10} {r['median_ms']:>10.2f} {r['p20_ms']:>9.2f} "
              f"{r['p80_ms']:>9.2f} {r['speedup_vs_reference']:>12.1f}")
    if not args.no_save:
        path = save_record("cpu_ops", {"benchmark": "bench.cpu", "shape": {
            "batch": args.batch, "dim": args.dim, "envs": args.envs}, "rows": rows})
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
