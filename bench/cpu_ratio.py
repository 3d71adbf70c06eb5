"""The C++ ``"cpu"`` backend against the ``"torch"`` backend, forward + backward, interleaved.

    python -m bench.cpu_ratio [--batch 1024] [--dim 128] [--envs 16] [--rounds 12] [--threads 2]

``bench.kernels`` times one implementation after the other; the torch backend's time on this
2-core machine moves by up to 2x between runs (its (rows x 2B) temporaries are fresh memory every
call), so a ratio from two separate series mixes good and bad phases. Here every round runs both
backends back to back on the same fresh inputs (order alternating), and the record keeps every
round's pair, the medians and the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastipirm.ops import env_contrastive_loss

from .harness import save_record


def _fwd_bwd(backend, z1, z2, w, soft):
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    c = w.clone().requires_grad_(soft)
    t0 = time.perf_counter()
    loss, pen = env_contrastive_loss(a, b, c, temperature=0.5, irm_temperature=0.5, soft=soft,
                                     backend=backend, check_values=False)
    (loss.sum() + pen.sum()).backward()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1024, help="B (2B rows)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for soft in (False, True):
        rounds = []
        for i in range(args.rounds + 1):
            z1 = F.normalize(torch.randn(args.batch, args.dim), dim=1)
            z2 = F.normalize(torch.randn(args.batch, args.dim), dim=1)
            w = (torch.rand(args.batch, args.envs) if soft
                 else (torch.rand(args.batch, args.envs) < 0.5).float())
            order = ("torch", "cpu") if i % 2 else ("cpu", "torch")
            ms = {name: _fwd_bwd(name, z1, z2, w, soft) for name in order}
            if i:                                   # round 0 warms both up
                rounds.append(ms)
        med = {name: statistics.median(r[name] for r in rounds) for name in ("torch", "cpu")}
        ratio = statistics.median(r["torch"] / r["cpu"] for r in rounds)
        rows.append({"mode": "soft" if soft else "hard", "torch_median_ms": med["torch"],
                     "cpu_median_ms": med["cpu"], "median_round_ratio": ratio,
                     "rounds": rounds})
        print(f"2B={2 * args.batch} D={args.dim} M={args.envs} {rows[-1]['mode']}: torch "
              f"{med['torch']:.1f} ms, cpu {med['cpu']:.1f} ms, ratio {ratio:.2f} "
              f"(per-round ratios {min(r['torch'] / r['cpu'] for r in rounds):.2f}-"
              f"{max(r['torch'] / r['cpu'] for r in rounds):.2f}; {args.threads} threads)")
    if not args.no_save:
        path = save_record("cpu_ratio", {"benchmark": "bench.cpu_ratio", "shape": {
            "batch": args.batch, "dim": args.dim, "envs": args.envs}, "rows": rows})
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
