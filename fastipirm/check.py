"""Self-check: every available backend of both ops against their literal float64 references.

``fastipirm check`` runs, for ``env_contrastive_loss``, a fixed set of cases (hard and soft,
every penalty variant, odd sizes, empty and one-sample environments) on fresh random inputs,
compares values and gradients (z1, z2 and, in soft mode, the weights) with
:func:`env_contrastive_loss_reference` in float64, prints the largest relative error per backend
and fails when one exceeds its tolerance. A second table does the same for
``masked_contrastive_loss`` against :func:`masked_contrastive_loss_reference`
(:func:`run_masked_check`: every similarity, both positive modes, groups, self-pairs, the key
penalty with random upstream gradients on both outputs, odd sizes). The masked helpers
(:class:`MaskedCase`, :func:`make_masked_inputs`, :func:`masked_outputs_and_grads`) are shared
with the tests.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from .ops import (PENALTIES, EnvContrastiveSpec, available_backends, env_contrastive_loss,
                  env_contrastive_loss_reference, masked_contrastive_loss,
                  masked_contrastive_loss_reference)
from .ops.backends import MASKED

FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    batch: int
    dim: int
    envs: int
    soft: bool
    penalty: str
    temperature: float = 0.5
    irm_temperature: float = 0.5
    nonorm: bool = False
    special: str = ""   # "", "empty", "single", "equal"


def default_cases(quick: bool = False) -> list[Case]:
    shapes = [(1, 3, 1), (5, 16, 3), (37, 128, 16)] if quick else \
        [(1, 3, 1), (2, 16, 2), (5, 16, 3), (37, 128, 16), (64, 32, 4)]
    cases = [Case(b, d, m, soft, pen) for (b, d, m), soft, pen
             in itertools.product(shapes, (False, True), PENALTIES)]
    cases += [Case(37, 16, 3, False, "slot", special="empty"),
              Case(37, 16, 3, False, "slot", special="single"),
              Case(37, 16, 3, True, "slot", special="equal"),
              Case(37, 16, 3, True, "slot", special="empty"),
              Case(37, 16, 3, True, "split", nonorm=True),
              Case(37, 16, 2, False, "slot", temperature=0.2, irm_temperature=0.5),
              Case(37, 16, 2, True, "slot", temperature=0.2, irm_temperature=0.5)]
    return cases


def make_inputs(case: Case, dtype=torch.float32, device="cpu", generator=None):
    """Fresh random unit-norm features and weights for a case (``generator`` for repeatability)."""
    g = generator
    z1 = torch.nn.functional.normalize(torch.randn(case.batch, case.dim, generator=g), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(case.batch, case.dim, generator=g), dim=1)
    if case.soft:
        w = torch.rand(case.batch, case.envs, generator=g)
    else:
        w = (torch.rand(case.batch, case.envs, generator=g) < 0.5).float()
    if case.special == "empty":
        w[:, 0] = 0.0
    elif case.special == "single":
        w[:, 0] = 0.0
        w[case.batch // 2, 0] = 1.0
    elif case.special == "equal":
        w[:] = 0.3 if case.soft else 1.0
    return (z1.to(device, dtype), z2.to(device, dtype), w.to(device))


VALUE_FLOOR = 1e-3      # loss and penalty
GRADIENT_FLOOR = 1e-2   # gradients: an all-zero true gradient (only empty / one-sample envs)


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = VALUE_FLOOR) -> float:
    """Max abs error over the tensor relative to the tensor's largest reference magnitude.

    Magnitudes below ``floor`` count as ``floor``, so an exact zero (the loss of a one-sample
    environment, the gradient when every environment is empty) is judged by an absolute error
    of ``tolerance * floor`` instead of being divided by 0.
    """
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), floor)
    return (got - want).abs().max().item() / scale


def op_kwargs(case: Case) -> dict:
    """The keyword arguments of ``env_contrastive_loss`` for a case."""
    return dict(temperature=case.temperature, irm_temperature=case.irm_temperature,
                soft=case.soft, penalty=case.penalty, nonorm=case.nonorm)


def outputs_and_grads(fn, z1, z2, w, soft: bool, up_loss, up_pen) -> list:
    """``[loss, penalty, d z1, d z2 (, d w in soft mode)]`` of ``fn(z1, z2, w)`` for the upstream
    gradients ``(up_loss, up_pen)``, on fresh leaf copies of the inputs."""
    z1 = z1.detach().clone().requires_grad_()
    z2 = z2.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(soft)
    loss, pen = fn(z1, z2, w)
    inputs = [z1, z2] + ([w] if soft else [])
    total = (loss * up_loss.to(loss.dtype)).sum() + (pen * up_pen.to(pen.dtype)).sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return [loss.detach(), pen.detach()] + [g.detach() for g in grads]


def check_compiled_step(impl, device="cpu") -> None:
    """A tiny training step through ``impl`` (backend signature ``impl(z1, z2, w, spec)``)
    compiles with ``fullgraph=True`` (aot_eager) and gives the eager loss and parameter
    gradient."""
    lin = torch.nn.Linear(8, 8).to(device)
    z1, z2, w = make_inputs(Case(6, 8, 2, True, "slot"), device=device)
    spec = EnvContrastiveSpec(temperature=0.5, irm_temperature=0.4, soft=True, penalty="slot",
                              nonorm=False)

    def step(x1, x2, weights):
        a = torch.nn.functional.normalize(lin(x1), dim=1)
        b = torch.nn.functional.normalize(lin(x2), dim=1)
        loss, pen = impl(a, b, weights, spec)
        return loss.mean() + 0.5 * pen.mean()

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(z1, z2, w)
    out.backward()
    grad = lin.weight.grad.clone()
    lin.weight.grad = None
    ref = step(z1, z2, w)
    ref.backward()
    assert torch.allclose(out, ref), f"compiled loss {out.item()} != eager {ref.item()}"
    assert torch.allclose(grad, lin.weight.grad, atol=1e-6), "compiled gradient != eager"


def compare_case(backend: str, case: Case, device="cpu", dtype=torch.float32) -> float:
    """Largest relative error of ``backend`` against the float64 reference over all outputs."""
    z1, z2, w = make_inputs(case, dtype=dtype, device=device)
    up_loss = torch.randn(case.envs, device=device)
    up_pen = torch.randn(case.envs, device=device)
    kw = op_kwargs(case)
    want = outputs_and_grads(
        lambda a, b, c: env_contrastive_loss_reference(a, b, c, **kw),
        z1.double(), z2.double(), w.double(), case.soft, up_loss.double(), up_pen.double())
    got = outputs_and_grads(
        lambda a, b, c: env_contrastive_loss(a, b, c, backend=backend, **kw),
        z1, z2, w, case.soft, up_loss, up_pen)
    return max(relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
               for i, (g, r) in enumerate(zip(got, want)))


def _table(title: str, backends, cases, compare: Callable, out) -> bool:
    """Print one table: per backend, the largest error of ``compare(backend, case) -> (error,
    what)`` over ``cases`` (a raise or a NaN is a failure); True when every backend passes."""
    ok = True
    out(f"{title}: {len(cases)} cases, fp32 inputs, vs float64 reference (values and "
        f"gradients, relative tolerance {FP32_TOLERANCE:g})")
    out(f"{'backend':<10} {'cases':>6} {'max rel err':>12} {'worst case':<50} status")
    for name in backends:
        worst, worst_case = 0.0, None
        for case in cases:
            try:
                err, what = compare(name, case)
            except Exception as exc:  # report, do not hide: a crashing backend is a failure
                worst, worst_case = float("inf"), f"{case} raised {type(exc).__name__}: {exc}"
                break
            if math.isnan(err):
                worst, worst_case = float("inf"), f"{case} gave NaN{what}"
                break
            if err > worst:
                worst, worst_case = err, f"{case}{what}"
        passed = worst <= FP32_TOLERANCE
        ok &= passed
        label = (worst_case or "")[:50]
        out(f"{name:<10} {len(cases):>6} {worst:>12.3e} {label:<50} {'ok' if passed else 'FAIL'}")
        if not passed:
            out(f"  {name}: worst case {worst_case}")
    return ok


def run_check(backends=None, quick: bool = False, device: str = "cpu", out=print) -> bool:
    """Print the table of ``env_contrastive_loss``: the largest relative error per backend;
    True when all pass."""
    return _table(f"env_contrastive_loss on {device}", backends or available_backends(device),
                  default_cases(quick),
                  lambda name, case: (compare_case(name, case, device=device), ""), out)


# ------------------------------------------------------------------ masked_contrastive_loss
@dataclass(frozen=True)
class MaskedCase:
    """One call of ``masked_contrastive_loss`` (the inputs: :func:`make_masked_inputs`).

    ``n_k`` None: ``keys=None`` (the queries are the keys). ``targets`` 0: a separate positive
    per query; ``T >= 1``: ``positive_index`` with ``T`` columns (``repeat``: every other row
    repeats its first column in its last). ``self_index`` (keys given): each query's own key
    column is known. ``groups``: "" (none), "random" (scattered ids), "sorted" (contiguous
    blocks), "one" (one group), "distinct" (a group per key), "single" (one single-member group),
    "negative" (negative ids), "empty" (keys given: random, and one query's group has no
    key). ``key_weights``: "", "rand" or "zeros" (a third of them 0).
    ``row_weights``: random ``penalty_row_weights``. ``scale`` multiplies the features, which
    are drawn so that similarities are of order one; ``special="equal"``: every query, key and
    positive is the same vector.
    """

    n_q: int
    dim: int
    similarity: str = "dot"
    p: Optional[float] = None
    n_k: Optional[int] = None
    targets: int = 0
    repeat: bool = False
    include_self: bool = False
    self_index: bool = False
    groups: str = ""
    key_weights: str = ""
    row_weights: bool = False
    reduction: str = "mean"
    key_penalty: bool = False
    temperature: float = 0.5
    scale: float = 1.0
    special: str = ""

    def __str__(self) -> str:
        sim = f"lp{self.p:g}" if self.similarity == "lp" else self.similarity
        parts = [f"q{self.n_q}" + ("" if self.n_k is None else f"k{self.n_k}"),
                 f"d{self.dim}", sim, f"t{self.temperature:g}",
                 "pos" if self.targets == 0 else f"T{self.targets}" + "r" * self.repeat]
        defaults = MaskedCase(1, 1)
        for f in fields(self):
            if f.name in ("n_q", "n_k", "dim", "similarity", "p", "temperature", "targets",
                          "repeat"):
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                parts.append(f.name if value is True else f"{f.name}={value}")
        return " ".join(parts)

    @property
    def keys_given(self) -> bool:
        return self.n_k is not None

    @property
    def keys(self) -> int:
        return self.n_q if self.n_k is None else self.n_k

    def op_kwargs(self) -> dict:
        """The scalar keyword arguments of the op for this case."""
        return dict(similarity=self.similarity, p=self.p, temperature=self.temperature,
                    include_self=self.include_self, reduction=self.reduction,
                    key_penalty=self.key_penalty)


#: the tensor arguments of masked_contrastive_loss, in the order of its signature
MASKED_TENSORS = ("queries", "keys", "positives", "positive_index", "positive_weight",
                  "query_groups", "key_groups", "self_index", "key_weights",
                  "penalty_row_weights")
#: the differentiable ones
MASKED_LEAVES = ("queries", "keys", "positives", "key_weights")
#: the floating-point arguments that are weights (kept in float32/float64, not the feature dtype)
MASKED_WEIGHTS = ("positive_weight", "key_weights", "penalty_row_weights")


def _no_singletons(ids: torch.Tensor) -> torch.Tensor:
    """Move the member of a single-member group into its neighbour's group (sorted ids stay
    sorted), until every group has two members or more."""
    while ids.numel() > 1:
        values, counts = ids.unique(return_counts=True)
        if not (counts == 1).any():
            break
        i = int(torch.nonzero(ids == values[counts == 1][0])[0, 0])
        ids[i] = ids[i - 1] if i > 0 else ids[1]
    return ids


def _group_ids(kind: str, n: int, g) -> torch.Tensor:
    """Group ids of ``n`` rows; every group has two members or more except with "distinct"
    (one each) and "single" (one group of one, id 99)."""
    if kind == "random":
        return _no_singletons(torch.randint(0, 3, (n,), generator=g) * 5 + 1)
    if kind == "sorted":
        return _no_singletons(torch.randint(0, 4, (n,), generator=g).sort().values)
    if kind == "one":
        return torch.full((n,), 7, dtype=torch.long)
    if kind == "distinct":
        return torch.arange(n) * 2
    if kind == "single":
        rest = _no_singletons(torch.randint(0, 2, (n - 1,), generator=g))
        j = int(torch.randint(0, n, (1,), generator=g))
        return torch.cat([rest[:j], torch.tensor([99]), rest[j:]])
    if kind == "negative":
        return _no_singletons(torch.randint(-3, 3, (n,), generator=g))
    raise ValueError(f"unknown groups kind {kind!r}")


def make_masked_inputs(case: MaskedCase, generator=None) -> dict:
    """Fresh random float64 CPU inputs of a case: ``{argument name: tensor or None}`` for the
    names of :data:`MASKED_TENSORS`. Raises ``ValueError`` when a query has no possible target
    column (a case that cannot be built)."""
    g = generator
    n_q, n_k, d = case.n_q, case.keys, case.dim
    f64 = torch.float64
    exponent = {"dot": 2.0, "sqeuclidean": 2.0, "l1": 1.0}.get(case.similarity, case.p)
    spread = d ** (-1.0 / exponent)       # typical |similarity| of order one

    def feats(n):
        x = torch.randn(n, d, generator=g, dtype=f64)
        return torch.nn.functional.normalize(x, dim=1) if case.similarity == "dot" \
            else x * spread

    if case.special == "equal":
        v = feats(1)
        q, k, pos = v.expand(n_q, d), v.expand(n_k, d), v.expand(n_q, d)
    else:
        q, k = feats(n_q), feats(n_k)
        pos = q + 0.5 * feats(n_q)
        if case.similarity == "dot":
            pos = torch.nn.functional.normalize(pos, dim=1)
    q, k, pos = (t.contiguous() * case.scale for t in (q, k, pos))
    out = dict.fromkeys(MASKED_TENSORS)
    out["queries"] = q
    if case.keys_given:
        out["keys"] = k
    if case.targets == 0:
        out["positives"] = pos
    own = torch.arange(n_q) if not case.keys_given else None
    if case.self_index:
        own = torch.randperm(n_k, generator=g)[:n_q]
        out["self_index"] = own
    qg = kg = None
    if case.groups:
        if not case.keys_given:
            qg = kg = _group_ids(case.groups, n_q, g)
            out["query_groups"] = qg
        else:
            kg = _group_ids("random" if case.groups == "empty" else case.groups, n_k, g)
            qg = kg[own] if own is not None else kg[torch.randint(0, n_k, (n_q,), generator=g)]
            if case.groups == "empty":
                qg = qg.clone()
                qg[n_q // 2] = 1000                   # no key has this group
            out["query_groups"], out["key_groups"] = qg, kg
    if case.targets:
        idx = torch.empty(n_q, case.targets, dtype=torch.long)
        cols = torch.arange(n_k)
        for i in range(n_q):
            ok = torch.ones(n_k, dtype=torch.bool)
            if kg is not None:
                ok &= kg == qg[i]
            if own is not None and not case.include_self:
                ok &= cols != own[i]
            cand = cols[ok]
            if cand.numel() == 0:
                raise ValueError(f"case {case}: query {i} has no possible target column")
            cand = cand[torch.randperm(cand.numel(), generator=g)]
            idx[i] = cand[torch.arange(case.targets) % cand.numel()]
            if case.repeat and i % 2 == 0:
                idx[i, -1] = idx[i, 0]
        out["positive_index"] = idx
        if case.targets > 1:
            tw = torch.rand(n_q, case.targets, generator=g, dtype=f64) + 0.05
            out["positive_weight"] = tw / tw.sum(1, keepdim=True)
    if case.key_weights:
        w = torch.rand(n_k, generator=g, dtype=f64)
        if case.key_weights == "rand":
            w = 0.2 + 0.8 * w
        else:
            w[torch.randperm(n_k, generator=g)[:max(1, n_k // 3)]] = 0.0
        out["key_weights"] = w
    if case.row_weights:
        out["penalty_row_weights"] = 0.1 + torch.rand(n_q, generator=g, dtype=f64)
    return out


#: a weight that stands for 0 in the reference (see :func:`reference_inputs`)
TINY_WEIGHT = 1e-300


def reference_inputs(inputs: dict) -> dict:
    """The inputs for :func:`masked_contrastive_loss_reference`, float64, with every zero key
    weight replaced by :data:`TINY_WEIGHT`: the reference drops a zero-weight column, which gives
    the right values but a zero gradient for that weight instead of the derivative
    ``sum_i e^{x_ij} / Z_i`` of the (smooth) loss; a weight of 1e-300 changes no value and gives
    that derivative."""
    out = {}
    for name, t in inputs.items():
        if t is not None and t.is_floating_point():
            t = t.detach().to(torch.float64)
        if name == "key_weights" and t is not None:
            t = torch.where(t == 0, torch.full_like(t, TINY_WEIGHT), t)
        out[name] = t
    return out


def masked_upstream(case: MaskedCase, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random upstream gradients ``(of the loss, of key_grads)``, float64."""
    shape = (case.n_q,) if case.reduction == "none" else ()
    return (torch.randn(shape, generator=generator, dtype=torch.float64),
            torch.randn(case.keys, generator=generator, dtype=torch.float64))


def masked_outputs_and_grads(fn: Callable, inputs: dict, case: MaskedCase, up: tuple,
                             dtype=torch.float64, device="cpu") -> dict:
    """``{name: tensor}``: ``loss``, ``key_grads`` (with ``key_penalty``) and ``d <leaf>`` for
    each differentiable input given, of ``fn(**inputs, **case.op_kwargs())`` on fresh leaf
    copies: features in ``dtype``, weights in float64 (float64 features) or float32, on
    ``device``; the upstream gradients ``up = (of the loss, of key_grads)``."""
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args, leaves = {}, {}
    for name, t in inputs.items():
        if t is not None:
            if t.is_floating_point():
                t = t.detach().to(device, weight_dtype if name in MASKED_WEIGHTS else dtype)
            else:
                t = t.to(device)
            if name in MASKED_LEAVES:
                t = t.clone().requires_grad_()
                leaves[name] = t
        args[name] = t
    out = fn(**args, **case.op_kwargs())
    loss, key_grads = out if case.key_penalty else (out, None)
    total = (loss * up[0].to(device, loss.dtype)).sum()
    if key_grads is not None:
        total = total + (key_grads * up[1].to(device, key_grads.dtype)).sum()
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    result = {"loss": loss.detach()}
    if key_grads is not None:
        result["key_grads"] = key_grads.detach()
    for (name, leaf), grad in zip(leaves.items(), grads):
        result[f"d {name}"] = torch.zeros_like(leaf) if grad is None else grad.detach()
    return result


def masked_errors(got: dict, want: dict) -> dict:
    """``{name: relative error}`` of every output (:func:`relative_error`: the value floor for
    the loss, the gradient floor for the gradients and for key_grads, themselves gradients of
    the loss, w.r.t. the key columns' logit scales: in fp32 a self-pair's squared distance
    through ``|q|^2 + |k|^2 - 2 q.k`` is off by ~eps |q|^2, which moves key_grads of order 1e-3
    by ~3e-7)."""
    if set(got) != set(want):
        raise AssertionError(f"outputs {sorted(got)} != reference outputs {sorted(want)}")
    return {name: relative_error(got[name].cpu(), want[name],
                                 VALUE_FLOOR if name == "loss" else GRADIENT_FLOOR)
            for name in want}


def masked_reference_outputs(inputs: dict, case: MaskedCase, up: tuple) -> dict:
    """The float64 reference's outputs and gradients for a case's inputs."""
    return masked_outputs_and_grads(masked_contrastive_loss_reference, reference_inputs(inputs),
                                    case, up)


def masked_backend_outputs(backend: str, inputs: dict, case: MaskedCase, up: tuple,
                           dtype=torch.float32, device="cpu") -> dict:
    """``backend``'s outputs and gradients for a case's inputs in ``dtype`` on ``device``."""
    def fn(**kw):
        return masked_contrastive_loss(**kw, backend=backend)

    return masked_outputs_and_grads(fn, inputs, case, up, dtype=dtype, device=device)


def default_masked_cases(quick: bool = False) -> list[MaskedCase]:
    """The fixed cases of ``fastipirm check`` for ``masked_contrastive_loss``: every similarity,
    separate positives and positive columns (one, two, a repeated one), groups, self-pairs (own
    keys and ``self_index``), key weights, the key penalty with random upstream gradients on
    both outputs, odd sizes."""
    M = MaskedCase
    cases = [
        M(37, 16, "dot", key_penalty=True, groups="random"),
        M(5, 3, "sqeuclidean", include_self=True, key_penalty=True),
        M(37, 10, "l1", include_self=True, temperature=0.2),
        M(13, 10, "lp", p=3.0, include_self=True, key_penalty=True, groups="sorted"),
        M(13, 16, "dot", n_k=29, targets=2, repeat=True, key_penalty=True),
        M(20, 16, "dot", n_k=37, targets=1, self_index=True, include_self=True,
          groups="random", key_penalty=True, key_weights="rand"),
    ]
    if quick:
        return cases
    return cases + [
        M(1, 3, "dot", include_self=True, key_penalty=True),
        M(2, 1, "l1", targets=1, include_self=True, key_penalty=True),
        M(37, 128, "sqeuclidean", targets=2, key_penalty=True, groups="one",
          reduction="none"),
        M(17, 3, "lp", p=1.5, n_k=9, targets=1, key_penalty=True, groups="random"),
        M(37, 16, "dot", targets=1, groups="single", include_self=True, key_penalty=True,
          row_weights=True),
        M(25, 16, "dot", key_penalty=True, groups="distinct", include_self=True,
          reduction="sum"),
        M(37, 16, "sqeuclidean", n_k=37, targets=2, self_index=True, groups="sorted",
          key_weights="zeros", key_penalty=True),
        M(16, 16, "dot", key_penalty=True, special="equal", include_self=True),
        M(33, 10, "l1", targets=1, n_k=40, key_penalty=True, temperature=0.05),
    ]


def compare_masked_case(backend: str, case: MaskedCase, device="cpu", dtype=torch.float32,
                        generator=None) -> tuple[float, str]:
    """``(largest relative error, the output it occurs in)`` of ``backend`` against the float64
    reference, values and gradients."""
    inputs = make_masked_inputs(case, generator)
    up = masked_upstream(case, generator)
    want = masked_reference_outputs(inputs, case, up)
    got = masked_backend_outputs(backend, inputs, case, up, dtype=dtype, device=device)
    errors = masked_errors(got, want)
    name = max(errors, key=lambda n: errors[n])
    return errors[name], name


def run_masked_check(backends=None, quick: bool = False, device: str = "cpu",
                     out=print) -> bool:
    """The second table of ``fastipirm check``: the largest relative error per backend of
    ``masked_contrastive_loss`` (fp32 inputs) against its float64 reference; True when all
    pass."""
    backends = MASKED.available(device) if backends is None else backends

    def compare(name, case):
        err, output = compare_masked_case(name, case, device=device)
        return err, f" ({output})"

    ok = _table(f"masked_contrastive_loss on {device}", backends, default_masked_cases(quick),
                compare, out)
    if not backends:
        out(f"  (no masked_contrastive_loss backend available on {device})")
    return ok
