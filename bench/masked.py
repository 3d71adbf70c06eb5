"""Benchmark of ``masked_contrastive_loss`` against the official constructions it replaces.

    python -m bench masked                  # GPU: every form, CL-ICA at B = 1024, 4096, 6144
    python -m bench masked --device cpu     # CPU: CL-ICA at B = 1024 and 4096 (--large: 6144)
    python -m bench masked --small          # CPU: tiny sizes (a smoke test, seconds)

Forward + backward of each form of the op, every available backend of
``fastipirm.ops.backends.MASKED`` on the device, against the official construction (written from
the specifications of the official code, fp32 by default):

* ``clica-l1``, ``clica-l2sq``, ``clica-l3``: CL-ICA's ``LpSimCLRLoss`` with the L1, squared L2
  and p = 3 powered distances, B in (1024, 4096, 6144), n = 10, tau = 1. Official: the B x B x n
  difference tensor between the anchors and the rolled batch (every anchor a negative, itself
  included), its norm and power, and ``mean_i [pos_i/tau + LSE_j(-neg_ij/tau, -pos_i/tau)]``.
  Ours: ``masked_contrastive_loss(h, positives=h_pos, similarity=..., include_self=True)``.
* ``dcodr``: DCoDR's ``SimCLR_Loss_w_Pos`` with one positive, B = 128 as 4 contiguous domain
  blocks of 32, D = 128, tau = 0.2. Official: per anchor, a numpy ``choice`` without replacement
  of up to 64 same-domain other anchors (here all 31) on the host, then the gathered codes, the
  per-anchor logits and the loss. ``dense-masked``: the B x B logits with a same-domain, not-self
  mask. Ours: ``masked_contrastive_loss(z, positives=z_aug, query_groups=domains)``.
* ``mixup``: IP-IRM + MixUp (i-Mix), B = 256 mixed queries against clean keys, D = 128, 2
  environments, tau = 0.2, penalty weight 0.2. Official: per environment, the logits, the
  lambda-weighted cross-entropy at the sample and at its mixing partner, and the per-key-column
  penalty by ``autograd.grad(create_graph=True)``. Ours: one call with ``positive_index``,
  ``positive_weight``, the groups and ``key_penalty=True``, then ``key_group_penalty``.

Times: ``bench.harness.measure`` (median, p20/p80 after warm-up, ``--sets`` fresh random input
sets rotated; CUDA events on a GPU, ``perf_counter`` on the CPU). Peak memory above the inputs:
on CUDA ``torch.cuda.max_memory_allocated``; on the CPU, after every row is timed, one forward +
backward per row in a fresh process (forked from a server that has only imported torch and
fastipirm): the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
above the resident set before the call, the inputs already built and a tiny call of the same
code made first. Each row also holds its loss on input set 0 and the relative difference from the
official loss (a benchmark of a wrong kernel would say nothing), and its time and memory as
fractions of the official construction's.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from .harness import fmt, ratio

NAME = "masked"
FORMS = ("clica", "dcodr", "mixup")
# CL-ICA variants: name -> (similarity of the op, its p, the official power p)
CLICA = {"l1": ("l1", None, 1), "l2sq": ("sqeuclidean", None, 2), "l3": ("lp", 3.0, 3)}
CLICA_GPU, CLICA_CPU, CLICA_LARGE, CLICA_SMALL = (1024, 4096, 6144), (1024, 4096), 6144, (32, 64)
DCODR = {"domains": 4, "per_domain": 32, "dim": 128, "negs": 64, "tau": 0.2}
MIXUP = {"batch": 256, "dim": 128, "envs": 2, "tau": 0.2, "penalty_weight": 0.2}
SMALL = {"dcodr": {"per_domain": 8, "dim": 16}, "mixup": {"batch": 32, "dim": 16}}
DTYPES = {"fp32": "float32", "fp64": "float64"}
OFFICIAL, DENSE, OURS = "official", "dense-masked", "ours"
LOSS_TOL = {"fp32": 1e-4, "fp64": 1e-9}      # relative loss difference that marks a row


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the masked-op benchmark."""
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes on the CPU (CL-ICA B = 32 64, DCoDR 4 x 8 with D = 16, "
                         "MixUp B = 32 with D = 16), 3 repeats: a smoke test")
    ap.add_argument("--device", default=None,
                    help="cpu | cuda | cuda:N (default: cuda when available, cpu with --small)")
    ap.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS),
                    help="which official objectives (default: all)")
    ap.add_argument("--similarity", nargs="+", choices=tuple(CLICA), default=list(CLICA),
                    help="CL-ICA distances: l1, l2sq (squared L2), l3 (p = 3) (default: all)")
    ap.add_argument("--clica-batch", type=int, nargs="+", default=None,
                    help="CL-ICA values of B (default: 1024 4096 6144 on a GPU, 1024 4096 on the "
                         "CPU)")
    ap.add_argument("--large", action="store_true",
                    help="on the CPU, also CL-ICA at B = 6144 (the official construction needs "
                         "several GB there)")
    ap.add_argument("--clica-dim", type=int, default=10, help="CL-ICA n (default 10)")
    ap.add_argument("--backend", nargs="+", default=None,
                    help="backends of fastipirm.ops.backends.MASKED to time (default: every one "
                         "available on the device; triton on the CPU only with --small)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                    help="input dtype (default fp32, as the official code trains)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per row (default 20 on a GPU, 7 on the CPU, 3 with --small)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first (default 3 on a GPU, 1 on the CPU)")
    ap.add_argument("--sets", type=int, default=3,
                    help="fresh random input sets rotated between calls (default 3)")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="per row: stop repeating (after 3 timed calls) once this much time "
                         "passed (default 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--memory", choices=("auto", "none"), default="auto",
                    help="auto: peak memory per row (CUDA allocator, or a fresh process per row "
                         "on the CPU); none: times only")
    ap.add_argument("--no-check-values", action="store_true",
                    help="call the op with check_values=False (default: the op's default, True)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the input sets")


# ---------------------------------------------------------------------------------------------
# the official constructions, written from what the official code computes
# (docs/masked-contrastive.md#official, docs/clica.md#loss, docs/official-ipirm.md#mixup)


def clica_official(h, h_pos, p: int, tau: float):
    """CL-ICA's ``LpSimCLRLoss`` (docs/clica.md#loss): the distances ``||h_i - c_j||_p^p`` to
    the batch rolled by one (so every anchor, itself included, is a negative) through the
    materialised B x B x n difference tensor, its norm and power; the per-anchor loss
    ``2 (a pos_i / tau + (1 - a) LSE(-neg_i. / tau, -pos_i / tau))`` with ``a = 1/2``,
    averaged."""
    import torch

    candidates = torch.roll(h, shifts=1, dims=0)
    difference = h.unsqueeze(1) - candidates.unsqueeze(0)                    # (B, B, n)
    neg = torch.linalg.vector_norm(difference, ord=p, dim=-1) ** p
    pos = torch.linalg.vector_norm(h - h_pos, ord=p, dim=-1) ** p
    scores = torch.cat([-pos.unsqueeze(1), -neg], dim=1) / tau
    alpha = 0.5
    return (2 * (alpha * pos / tau + (1 - alpha) * torch.logsumexp(scores, dim=1))).mean()


def dcodr_official(z, z_aug, domains, tau: float, max_negatives: int, rng):
    """DCoDR's ``SimCLR_Loss_w_Pos`` with one positive (spec A1): on the host, for every anchor
    a numpy ``choice`` without replacement of ``min(same-domain others, max_negatives)`` anchors
    of its domain, itself excluded (``domains`` a numpy array, ``rng`` a ``RandomState``); their
    codes gathered, the per-anchor logits, and ``-2 (a LSE(pos) - (1 - a) LSE(negs, pos))`` with
    ``a = 1/2``, averaged. Balanced batches (every anchor the same number of negatives)."""
    import numpy as np
    import torch

    everyone = np.arange(domains.shape[0])
    picks = []
    for i in everyone:
        same = everyone[(domains == domains[i]) & (everyone != i)]
        picks.append(rng.choice(same, size=min(same.size, max_negatives), replace=False))
    index = torch.from_numpy(np.stack(picks)).to(z.device)
    negatives = z[index]                                                     # (B, K, D)
    neg_logits = torch.einsum("bd,bkd->bk", z, negatives) / tau
    pos_logits = (z * z_aug).sum(dim=1, keepdim=True) / tau                  # (B, 1)
    alpha = 0.5
    every = torch.cat([neg_logits, pos_logits], dim=1)
    per_anchor = -2 * (alpha * torch.logsumexp(pos_logits, dim=1)
                       - (1 - alpha) * torch.logsumexp(every, dim=1))
    return per_anchor.mean()


def dcodr_dense(z, z_aug, domains, tau: float):
    """The DCoDR loss as dense torch: B x B logits, the not-same-domain and self entries masked
    to -inf, the positive as one more column (``domains`` a tensor on the codes' device)."""
    import torch

    logits = z @ z.T / tau
    negative = (domains[:, None] == domains[None, :]) & ~torch.eye(
        z.shape[0], dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(~negative, float("-inf"))
    pos = (z * z_aug).sum(dim=1) / tau
    return (torch.logsumexp(torch.cat([pos[:, None], logits], dim=1), dim=1) - pos).mean()


def mixup_official(queries, keys, envs, partners, lams, tau: float, penalty_weight: float):
    """IP-IRM's MixUp minimisation term of one partition (docs/official-ipirm.md#mixup): for
    every environment ``k``, its queries (the next ``len(partners[k])`` rows of ``queries``, as from
    the forward of its re-mixed subset) against the keys of its members (``envs == k``),
    ``S = q k^T / tau`` scaled by a dummy ``s = ones(1, b_k)``, ``L_k = lam_k CE(S s, i) +
    (1 - lam_k) CE(S s, partner(i))`` and ``R_k = ||dL_k/ds||^2`` through
    ``autograd.grad(create_graph=True)``; returns ``mean_k L_k + penalty_weight mean_k R_k``."""
    import torch
    import torch.nn.functional as F

    losses, penalties = [], []
    start = 0
    for k, (partner, lam) in enumerate(zip(partners, lams)):
        members = torch.nonzero(envs == k).squeeze(1)
        size = partner.shape[0]
        q_k = queries[start:start + size]
        start += size
        logits = q_k @ keys[members].T / tau
        dummy = torch.ones(1, size, dtype=logits.dtype, device=logits.device, requires_grad=True)
        scaled = logits * dummy
        own = torch.arange(size, device=logits.device)
        loss = lam * F.cross_entropy(scaled, own) + (1 - lam) * F.cross_entropy(scaled, partner)
        (grad,) = torch.autograd.grad(loss, dummy, create_graph=True)
        losses.append(loss)
        penalties.append((grad * grad).sum())
    return torch.stack(losses).mean() + penalty_weight * torch.stack(penalties).mean()


# ---------------------------------------------------------------------------------------------
# cases, inputs and the implementations of each case


def _cases(args, cuda: bool) -> list[dict]:
    """``[{"form", "variant", "params"}]`` in table order; ValueError on bad sizes."""
    cases = []
    if "clica" in args.forms:
        batches = args.clica_batch or list(
            CLICA_SMALL if args.small else CLICA_GPU if cuda else CLICA_CPU)
        if args.large and not args.clica_batch and CLICA_LARGE not in batches:
            batches.append(CLICA_LARGE)
        if min(batches) < 2 or args.clica_dim < 1:
            raise ValueError(f"CL-ICA needs B >= 2 and n >= 1, got B {batches} and n "
                             f"{args.clica_dim}")
        for variant in args.similarity:
            for b in batches:
                cases.append({"form": "clica", "variant": variant,
                              "params": {"batch": b, "dim": args.clica_dim, "tau": 1.0}})
    if "dcodr" in args.forms:
        params = {**DCODR, **(SMALL["dcodr"] if args.small else {})}
        params["batch"] = params["domains"] * params["per_domain"]
        cases.append({"form": "dcodr", "variant": "", "params": params})
    if "mixup" in args.forms:
        params = {**MIXUP, **(SMALL["mixup"] if args.small else {})}
        cases.append({"form": "mixup", "variant": "", "params": params})
    return cases


def case_key(case: dict) -> str:
    """``clica-l1/B=4096/n=10``, ``dcodr/B=128/D=128/domains=4``, ``mixup/B=256/D=128/envs=2``."""
    p = case["params"]
    if case["form"] == "clica":
        return f"clica-{case['variant']}/B={p['batch']}/n={p['dim']}"
    if case["form"] == "dcodr":
        return f"dcodr/B={p['batch']}/D={p['dim']}/domains={p['domains']}"
    return f"mixup/B={p['batch']}/D={p['dim']}/envs={p['envs']}"


def make_inputs(case: dict, dtype, device, seed: int) -> dict:
    """One random input set of ``case``: its tensors and ``leaves`` (what gets gradients)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    p = case["params"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def leaf(t):
        return t.to(device=device, dtype=dtype, copy=True).requires_grad_()

    if case["form"] == "clica":
        b, n = p["batch"], p["dim"]
        h = torch.rand(b, n, generator=gen, dtype=torch.float64)            # box latents' scale
        out = {"h": leaf(h), "h_pos": leaf(h + 0.05 * randn(b, n))}
        out["leaves"] = [out["h"], out["h_pos"]]
        return out
    if case["form"] == "dcodr":
        z = F.normalize(randn(p["batch"], p["dim"]), dim=1)
        z_aug = F.normalize(z + 0.5 * randn(p["batch"], p["dim"]), dim=1)
        ids = torch.randperm(max(20, p["domains"]), generator=gen)[:p["domains"]]
        domains = ids.repeat_interleave(p["per_domain"])                     # contiguous blocks
        out = {"z": leaf(z), "z_aug": leaf(z_aug), "domains_np": domains.numpy().copy(),
               "domains": domains.to(device)}
        out["leaves"] = [out["z"], out["z_aug"]]
        return out
    b, d, m = p["batch"], p["dim"], p["envs"]
    envs = torch.randperm(b, generator=gen) % m                              # balanced, shuffled
    lam = torch.rand(b, generator=gen, dtype=torch.float64)
    lam = torch.maximum(lam, 1 - lam)
    partners, lams, pidx, pw, qg, row_w = [], [], [], [], [], []
    for k in range(m):
        members = torch.nonzero(envs == k).squeeze(1)
        size = members.shape[0]
        if size == 0:
            raise ValueError(f"MixUp: environment {k} is empty (B = {b}, {m} environments)")
        partner = torch.randperm(size, generator=gen)
        lam_k = float(lam[members].mean())
        partners.append(partner.to(device))
        lams.append(lam_k)
        pidx.append(torch.stack([members, members[partner]], dim=1))
        pw.append(torch.tensor([[lam_k, 1 - lam_k]], dtype=torch.float64).expand(size, 2))
        qg.append(torch.full((size,), k, dtype=torch.long))
        row_w.append(torch.full((size,), 1.0 / (m * size), dtype=torch.float64))
    out = {"queries": leaf(randn(b, d) / d ** 0.5), "keys": leaf(randn(b, d) / d ** 0.5),
           "envs": envs.to(device), "partners": partners, "lams": lams,
           "positive_index": torch.cat(pidx).to(device),
           "positive_weight": torch.cat(pw).to(device=device, dtype=dtype),
           "query_groups": torch.cat(qg).to(device),
           "row_weight": torch.cat(row_w).to(device=device, dtype=dtype)}
    out["leaves"] = [out["queries"], out["keys"]]
    return out


def implementations(case: dict) -> list[str]:
    """The reference implementations of ``case`` (ours follows, one row per backend)."""
    return [OFFICIAL, DENSE] if case["form"] == "dcodr" else [OFFICIAL]


def loss_fn(case: dict, impl: str, backend: Optional[str] = None,
            check_values: bool = True) -> Callable:
    """``fn(inputs) -> scalar loss`` of ``impl`` (official, dense-masked or ours + backend)."""
    import numpy as np

    from fastipirm.ops import key_group_penalty, masked_contrastive_loss

    p = case["params"]
    form = case["form"]
    kw = dict(backend=backend, check_values=check_values)
    if form == "clica":
        similarity, exponent, power = CLICA[case["variant"]]
        if impl == OFFICIAL:
            return lambda x: clica_official(x["h"], x["h_pos"], power, p["tau"])
        return lambda x: masked_contrastive_loss(
            x["h"], positives=x["h_pos"], similarity=similarity, p=exponent, include_self=True,
            temperature=p["tau"], **kw)
    if form == "dcodr":
        if impl == OFFICIAL:
            rng = np.random.RandomState(0)
            return lambda x: dcodr_official(x["z"], x["z_aug"], x["domains_np"], p["tau"],
                                            p["negs"], rng)
        if impl == DENSE:
            return lambda x: dcodr_dense(x["z"], x["z_aug"], x["domains"], p["tau"])
        return lambda x: masked_contrastive_loss(
            x["z"], positives=x["z_aug"], query_groups=x["domains"], temperature=p["tau"], **kw)
    if impl == OFFICIAL:
        return lambda x: mixup_official(x["queries"], x["keys"], x["envs"], x["partners"],
                                        x["lams"], p["tau"], p["penalty_weight"])

    def ours(x):
        losses, key_grads = masked_contrastive_loss(
            x["queries"], x["keys"], positive_index=x["positive_index"],
            positive_weight=x["positive_weight"], query_groups=x["query_groups"],
            key_groups=x["envs"], temperature=p["tau"], reduction="none", key_penalty=True, **kw)
        _, penalties = key_group_penalty(key_grads, x["envs"])
        return (losses * x["row_weight"]).sum() + p["penalty_weight"] * penalties.mean()

    return ours


# ---------------------------------------------------------------------------------------------
# backends, timing and memory


def _backends(args, dev_type: str) -> tuple[list[str], dict]:
    """``(backends to time, {name: "ok" or why not})`` of ``MASKED`` for ``dev_type``."""
    from fastipirm.ops.backends import MASKED

    report = {}
    for name, b in MASKED.backends.items():
        if dev_type not in b.devices:
            report[name] = f"does not run on {dev_type}"
        elif b.load() is None:
            report[name] = f"unavailable: {b.error}"
        elif dev_type == "cpu" and name == "triton" and not args.small:
            report[name] = "on the CPU only in the Triton interpreter (--small)"
        else:
            report[name] = "ok"
    if args.backend:
        unknown = [n for n in args.backend if n not in MASKED.backends]
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; known: {list(MASKED.backends)}")
        return list(args.backend), report
    return [n for n, status in report.items() if status == "ok"], report


def _resolve(args) -> dict:
    from .harness import resolve_device

    if args.small and args.device not in (None, "cpu"):
        raise ValueError(f"--small runs on the CPU; got --device {args.device}")
    device = str(resolve_device(args.device, fallback="cpu" if args.small else "auto"))
    cuda = device.startswith("cuda")
    repeats = args.repeats or (20 if cuda else 3 if args.small else 7)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if repeats < 1 or warmup < 0 or args.sets < 1:
        raise ValueError(f"--repeats and --sets must be >= 1 and --warmup >= 0, got {repeats}, "
                         f"{args.sets} and {warmup}")
    return {"device": device, "cuda": cuda, "repeats": repeats, "warmup": warmup}


def _time_one(fn, sets, cfg: dict, max_seconds: float) -> dict:
    """Forward + backward of ``fn`` over the rotated ``sets``: measure's figures, ``loss`` (of
    set 0), or a failed ``status``."""
    import torch

    from .harness import measure

    first = {}

    def step(i):
        x = sets[i % len(sets)]
        for t in x["leaves"]:
            t.grad = None
        loss = fn(x)
        loss.backward()
        if i == 0:
            first["loss"] = loss.detach()

    try:
        res = measure(step, device=cfg["device"], warmup=cfg["warmup"], repeats=cfg["repeats"],
                      max_seconds=max_seconds)
    except Exception as exc:  # noqa: BLE001 - OOM or a missing kernel is a row of the table
        if cfg["cuda"]:
            torch.cuda.empty_cache()
        return {"status": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        for x in sets:
            for t in x["leaves"]:
                t.grad = None
    return {"status": "ok", **res, "loss": float(first["loss"])}


CPU_MEMORY = ("peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident "
              "set before one forward + backward, in a fresh process per row; inputs built and a "
              "tiny call of the same code made before")
CPU_MEMORY_FALLBACK = ("growth of the resident-set high-water mark (getrusage ru_maxrss) over "
                       "one forward + backward, in a fresh process per row; inputs built and a "
                       "tiny call made before (/proc/self/clear_refs was not writable)")
CUDA_MEMORY = ("torch.cuda.max_memory_allocated during the timed calls above the memory "
               "allocated before them (inputs included in neither)")


def _status_kib() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f
                if line.startswith(("VmRSS", "VmHWM"))}


def _tiny(case: dict) -> dict:
    """A small case of the same form and variant (the warm-up call of a memory process)."""
    p = dict(case["params"])
    if case["form"] == "clica":
        p["batch"] = 8
    elif case["form"] == "dcodr":
        p.update(per_domain=4, batch=4 * p["domains"])
    else:
        p["batch"] = 4 * p["envs"]
    return {**case, "params": p}


def memory_child(job: dict) -> dict:
    """In a fresh process: one forward + backward of a row; ``{"peak_mib", "method"}``."""
    import gc
    import resource

    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dtype, device = getattr(torch, DTYPES[job["dtype"]]), job["device"]
    case = job["case"]
    fn = loss_fn(case, job["impl"], job["backend"], job["check_values"])
    tiny = make_inputs(_tiny(case), dtype, device, job["seed"] + 1)
    fn(tiny).backward()
    x = make_inputs(case, dtype, device, job["seed"])
    del tiny
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib()["VmRSS"]
        fn(x).backward()
        peak = _status_kib()["VmHWM"]
        method = CPU_MEMORY
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(x).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = CPU_MEMORY_FALLBACK
    return {"peak_mib": max(0, peak - before) / 1024, "method": method}


MARK = "bench.masked memory: "       # the server's result lines (other output may interleave)


def memory_server(backends=()) -> None:
    """The CPU memory server: imports torch and fastipirm and loads the ``backends`` of
    ``MASKED`` once, then for every JSON job on stdin forks a fresh child that runs
    :func:`memory_child` and prints its result as one line (``MARK`` + JSON) on stdout. It runs
    no torch op itself, so forking it is safe (no OpenMP team yet) and every child starts from
    the same small resident set."""
    import gc
    import json

    import torch._dynamo  # noqa: F401 - imported once, before any fork (a custom op's first call
    # imports it: seconds)

    from fastipirm.ops.backends import MASKED

    for name in backends:            # loads these kernel sets and registers their custom ops
        MASKED.backends[name].load()
    gc.collect()
    gc.freeze()                 # the children's gc.collect skips (and does not copy) all this
    for line in sys.stdin:
        job = json.loads(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                             # the child: one row, then exit
            os.close(read)
            try:
                res = memory_child(job)
            except BaseException as exc:  # noqa: BLE001 - reported as the row's memory error
                res = {"peak_mib": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
            os.write(write, json.dumps(res).encode())
            os._exit(0)
        os.close(write)
        chunks = []
        while True:
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read)
        _, code = os.waitpid(pid, 0)
        res = json.loads(b"".join(chunks)) if chunks else {
            "peak_mib": None, "error": f"the process ended without a result (wait status {code}:"
                                       " killed, e.g. out of memory?)"}
        print(MARK + json.dumps(res), flush=True)
    gc.unfreeze()                # a normal shutdown (frozen objects would look leaked at exit)


def _cpu_memory(jobs: list[dict]) -> list[dict]:
    """:func:`memory_child` of every job, each in a fresh process forked by one
    :func:`memory_server` subprocess."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    backends = sorted({job["backend"] for job in jobs if job["backend"]})
    server = subprocess.Popen([sys.executable, "-c", "import sys; from bench.masked import "
                               "memory_server; memory_server(sys.argv[1:])", *backends],
                              cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    out = []
    where = " (processes forked from a server that had only imported torch and fastipirm)"
    try:
        for job in jobs:
            server.stdin.write(json.dumps(job) + "\n")
            server.stdin.flush()
            for line in server.stdout:
                if line.startswith(MARK):
                    res = json.loads(line[len(MARK):])
                    break
            else:
                res = {"peak_mib": None, "error": f"the memory server ended (status "
                                                  f"{server.wait()})"}
            if res.get("method"):
                res["method"] += where
            out.append(res)
            if server.poll() is not None:
                out += [dict(res) for _ in jobs[len(out):]]
                break
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    return out



def _add_ratios(group: list, dtype: str) -> None:
    """Time and memory as fractions of the official row's, and the loss's relative difference
    from the official loss, in place."""
    off = next((r for r in group if r["implementation"] == OFFICIAL and r["status"] == "ok"),
               None)
    for r in group:
        if r["status"] != "ok" or off is None:
            continue
        r["time_over_official"] = ratio(r["median_ms"], off["median_ms"])
        r["memory_over_official"] = ratio(r.get("peak_mib"), off.get("peak_mib"))
        r["loss_rel_diff"] = abs(r["loss"] - off["loss"]) / max(abs(off["loss"]), 1e-30)
        if r["loss_rel_diff"] > LOSS_TOL[dtype]:
            r["status"] = f"ok, but the loss differs from the official by {r['loss_rel_diff']:.2g}"


def _progress(row: dict) -> None:
    ms = f"{row['median_ms']:.2f} ms" if row.get("median_ms") is not None else row["status"]
    print(f"masked: {row['case']} {row['implementation']} {row['backend']}: {ms}",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Time every implementation of every case, then (CPU) measure the memory; the record."""
    import torch

    cfg = _resolve(args)
    if args.small and "fastipirm.ops" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"   # read when fastipirm.ops is imported
    before = torch.get_num_threads()
    if args.threads:
        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        return _run(args, cfg)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace, cfg: dict) -> dict:
    import torch
    import torch._dynamo  # noqa: F401 - a custom op's first call imports it (seconds): not timed

    device, cuda = cfg["device"], cfg["cuda"]
    dtype = getattr(torch, DTYPES[args.dtype])
    cases = _cases(args, cuda)
    backends, report = _backends(args, device.split(":")[0])
    check_values = not args.no_check_values
    rows, jobs = [], []
    for case in cases:
        sets = [make_inputs(case, dtype, device, args.seed + 1000 * i) for i in range(args.sets)]
        group = []
        for impl, backend in [(i, "torch") for i in implementations(case)] + \
                [(OURS, b) for b in backends]:
            key = case_key(case)
            row = {"case": key, "form": case["form"], "variant": case["variant"],
                   "size": key.split("/", 1)[1], **case["params"], "implementation": impl,
                   "backend": backend, "dtype": args.dtype}
            if impl == OURS and report.get(backend) != "ok":
                row["status"] = report.get(backend, "unknown backend")
            else:
                fn = loss_fn(case, impl, backend if impl == OURS else None, check_values)
                row.update(_time_one(fn, sets, cfg, args.max_seconds))
                if not cuda:
                    row["peak_mib"] = None
                    if args.memory == "auto" and row["status"] == "ok":
                        jobs.append((row, {"case": case, "impl": impl,
                                           "backend": backend if impl == OURS else None,
                                           "dtype": args.dtype, "device": device,
                                           "seed": args.seed, "threads": torch.get_num_threads(),
                                           "check_values": check_values}))
                elif args.memory == "none":
                    row["peak_mib"] = None
            _progress(row)
            group.append(row)
        rows.append(group)
        del sets
    memory = CUDA_MEMORY if cuda else "not measured (--memory none)"
    if jobs:
        for (row, _), res in zip(jobs, _cpu_memory([job for _, job in jobs])):
            row["peak_mib"] = res["peak_mib"]
            if res.get("error"):
                row["memory_error"] = res["error"]
            memory = res.get("method", memory)
    if args.memory == "none":
        memory = "not measured (--memory none)"
    for group in rows:
        _add_ratios(group, args.dtype)
    return {
        "benchmark": NAME,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": args.dtype, "repeats": cfg["repeats"], "warmup": cfg["warmup"],
        "sets": args.sets, "threads": torch.get_num_threads(),
        "timing": "CUDA events" if cuda else "time.perf_counter",
        "memory": memory,
        "backends": report,
        "settings": {"device": "cuda" if cuda else "cpu", "dtype": args.dtype,
                     "check_values": check_values},
        "args": dict(vars(args)),
        "rows": [r for group in rows for r in group],
    }


# ---------------------------------------------------------------------------------------------
# figures and the table

FIGURES = {"median_ms": False, "peak_mib": False, "time_over_official": False,
           "memory_over_official": False}


def impl_key(row: dict) -> str:
    """``official``, ``dense-masked`` or ``ours-<backend>``."""
    return f"{OURS}-{row['backend']}" if row["implementation"] == OURS else row["implementation"]


def figure_key(row: dict, metric: str) -> str:
    """``masked/<case>/<dtype>/<impl>/<metric>``, e.g.
    ``masked/clica-l1/B=4096/n=10/fp32/ours-cpu/time_over_official``."""
    return f"{NAME}/{row['case']}/{row['dtype']}/{impl_key(row)}/{metric}"


def figures(record: dict) -> dict:
    """The comparable numbers of a masked record (see ``bench.baselines``)."""
    from .harness import row_figures

    return row_figures(record, FIGURES, figure_key)



def format_table(record: dict) -> str:
    """The record as a text table, then the targets it measures."""
    from .targets import report

    lines = [f"masked_contrastive_loss fwd+bwd against the official constructions on "
             f"{record['device']}, {record['dtype']}, median of up to {record['repeats']} after "
             f"{record['warmup']} warm-up, {record['sets']} input sets rotated "
             f"({record['timing']}, {record['threads']} CPU threads)",
             f"peak memory: {record['memory']}",
             "backends: " + "; ".join(f"{n} {s}" for n, s in record["backends"].items())]
    lines.append(f"{'case':<30} {'impl':<13} {'backend':<8} {'median ms':>10} {'p20':>9} "
                 f"{'p80':>9} {'peak MiB':>9} {'t/off':>7} {'mem/off':>8} {'dloss':>8}  status")
    for r in record["rows"]:
        lead = f"{r['case']:<30} {r['implementation']:<13} {r['backend']:<8}"
        if r.get("median_ms") is None:
            lines.append(f"{lead} {'-':>10} {'-':>9} {'-':>9} {'-':>9} {'-':>7} {'-':>8} "
                         f"{'-':>8}  {r['status']}")
            continue
        status = r["status"] + (f" (memory: {r['memory_error']})" if r.get("memory_error")
                                else "")
        lines.append(
            f"{lead} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f} "
            f"{fmt(r.get('peak_mib'), '.1f'):>9} "
            f"{fmt(r.get('time_over_official'), '.3f'):>7} "
            f"{fmt(r.get('memory_over_official'), '.4f'):>8} "
            f"{fmt(r.get('loss_rel_diff'), '.1e'):>8}  {status}")
    return "\n".join(lines + report(record))
