"""IP-IRM's minimisation loss on one rank of an N-rank run: the whole global loss on every rank
(the replicated form) against the op's distributed form (this rank's anchors, per-slot sums to
all-reduce).

    python -m bench ddp-loss                          # CPU: global batch 256, D 128, P 8
    python -m bench ddp-loss --device cuda --batch 1024 --worlds 2 4 8

Measured in one process (no collectives; the all-reduce moves ``G x 2B`` floats, the gather the
features, both small next to the loss at these sizes): forward + backward of
:func:`fastipirm.losses.ipirm.minimization_loss` with ``keep_cont`` and P retained partitions of
K = 2 environments (random memberships), with a random upstream gradient through the features.

Rows: ``replicated-<backend>`` (the global batch's loss through that backend, what a rank
computes when ``op.backend`` names a fused backend) and ``local`` at every world size N (rank 0's
``B/N`` samples as anchors, the torch backend's GEMM form); ``over_replicated`` is a row's time
over the fastest replicated backend's: the share of the loss one rank pays.
"""
from __future__ import annotations

import argparse

from .harness import fmt, ratio

NAME = "ddp_loss"
COMMON_OPTIONS = ("no_save", "results_dir")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256, help="the global batch")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from fastipirm.losses.ipirm import minimization_loss
    from fastipirm.ops import available_backends

    from .harness import environment, measure, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    b = args.batch
    if any(b % n for n in args.worlds):
        raise ValueError(f"--batch {b} must be divisible by every --worlds value {args.worlds}")
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(b, args.dim, generator=g), dim=1).to(device).requires_grad_()
    z2 = F.normalize(torch.randn(b, args.dim, generator=g), dim=1).to(device).requires_grad_()
    envs = torch.randint(0, 2, (b, args.partitions), generator=g)
    memberships = F.one_hot(envs, 2).reshape(b, 2 * args.partitions).float().to(device)
    kw = dict(temperature=0.2, irm_temperature=0.5, penalty_weight=0.2, keep_cont=True,
              check_values=False)

    def timed(**extra):
        def step(i):
            loss, _ = minimization_loss(z1, z2, memberships, **kw, **extra)
            loss.backward()
            z1.grad = z2.grad = None
        return measure(step, device=str(device), warmup=1, repeats=args.repeats)

    rows = []
    for backend in available_backends(device):
        rows.append({"impl": f"replicated-{backend}", "world": None,
                     **timed(backend=backend)})
    for n in args.worlds:
        rows.append({"impl": "local", "world": n,
                     **timed(backend="torch", rows=(0, b // n), world=n)})
    best = min(r["median_ms"] for r in rows if r["world"] is None)
    for r in rows:
        r["over_replicated"] = ratio(r["median_ms"], best)
    return {"benchmark": NAME, "environment": environment(),
            "settings": {"device": str(device), "batch": b, "dim": args.dim,
                         "partitions": args.partitions, "threads": args.threads},
            "rows": rows}


def format_table(record: dict) -> str:
    s = record["settings"]
    lines = [f"global batch {s['batch']}, D {s['dim']}, P {s['partitions']} (K = 2), "
             f"{s['device']}",
             f"{'loss on one rank':<20} {'N':>3} {'median ms':>10} {'/ replicated':>13}"]
    for r in record["rows"]:
        lines.append(f"{r['impl']:<20} {r['world'] or '-':>3} {fmt(r['median_ms'], '.2f'):>10} "
                     f"{fmt(r['over_replicated'], '.2f'):>13}")
    return "\n".join(lines)
