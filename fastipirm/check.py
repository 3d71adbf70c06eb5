"""Self-check: every available backend against the literal float64 reference.

``fastipirm check`` runs a fixed set of cases (hard and soft, every penalty variant, odd sizes,
empty and one-sample environments) on fresh random inputs, compares values and gradients
(z1, z2 and, in soft mode, the weights) with :func:`env_contrastive_loss_reference` in float64,
prints the largest relative error per backend and fails when one exceeds its tolerance.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .ops import (PENALTIES, EnvContrastiveSpec, available_backends, env_contrastive_loss,
                  env_contrastive_loss_reference)

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


def run_check(backends=None, quick: bool = False, device: str = "cpu", out=print) -> bool:
    """Print a table of the largest relative error per backend; True when all pass."""
    backends = backends or available_backends(device)
    cases = default_cases(quick)
    ok = True
    out(f"fastipirm check: {len(cases)} cases on {device}, fp32 inputs, vs float64 reference "
        f"(values and gradients, relative tolerance {FP32_TOLERANCE:g})")
    out(f"{'backend':<10} {'cases':>6} {'max rel err':>12} {'worst case':<50} status")
    for name in backends:
        worst, worst_case = 0.0, None
        for case in cases:
            try:
                err = compare_case(name, case, device=device)
            except Exception as exc:  # report, do not hide: a crashing backend is a failure
                err, worst_case = float("inf"), f"{case} raised {type(exc).__name__}: {exc}"
                worst = err
                break
            if math.isnan(err):
                worst, worst_case = float("inf"), f"{case} gave NaN"
                break
            if err > worst:
                worst, worst_case = err, str(case)
        passed = worst <= FP32_TOLERANCE
        ok &= passed
        label = (worst_case or "")[:50]
        out(f"{name:<10} {len(cases):>6} {worst:>12.3e} {label:<50} {'ok' if passed else 'FAIL'}")
        if not passed:
            out(f"  {name}: worst case {worst_case}")
    return ok
