"""Backend ``"triton"`` of env_contrastive_loss (the kernels of fastipirm.kernels.env_contrastive,
wrapped by fastipirm.ops.triton_backend).

Two modes, chosen by ``TRITON_INTERPRET`` *before* this module imports Triton (Triton decides at
decoration time whether a kernel is interpreted; docs/kernels.md#triton-interpreter):

* default: this module imports the kernels with ``TRITON_INTERPRET=1`` (restoring the variable
  afterwards; the kernel module sets it again around each interpreted launch) and runs them in
  Triton's CPU interpreter on CPU tensors, small shapes (fp32 and fp16; no bf16 under the
  interpreter). If another module imported the kernels first, for the GPU, these tests skip;
* ``TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_backend.py`` on a machine with CUDA: the
  ``gpu`` tests (B up to 8192, fp32/fp16/bf16); the interpreter tests then skip.

Fresh random inputs every run; a failing case prints its seed (replay with
``FASTIPIRM_TEST_SEED=<seed>``).
"""
import itertools

import pytest
import torch
from triton_helpers import (compile_without_interpreter, cuda_or_skip, import_interpreted,
                            interpreter_mark, shared_memory_limit)

from fastipirm.check import (GRADIENT_FLOOR, VALUE_FLOOR, Case, check_compiled_step,
                             make_inputs, op_kwargs, outputs_and_grads, relative_error)
from fastipirm.ops import PENALTIES, env_contrastive_loss_reference

# TRITON_INTERPRET=1 (unless set) while the kernels are decorated, restored afterwards
triton, K, T = import_interpreted("fastipirm.kernels.env_contrastive",
                                  "fastipirm.ops.triton_backend")
INTERPRETED = K.INTERPRETED
interp = interpreter_mark(triton, INTERPRETED)
NAMES = ["loss", "penalty", "grad z1", "grad z2", "grad weights"]


def make(case: Case, norms=None, min_weight=0.0, device="cpu"):
    """``fastipirm.check.make_inputs``, with feature norms drawn uniformly from ``norms`` and soft
    weights rescaled into ``[min_weight, 1)`` (not for the special empty/single/equal columns)."""
    z1, z2, w = make_inputs(case, device=device)
    if norms is not None:
        lo, hi = norms
        z1 = z1 * (lo + (hi - lo) * torch.rand(case.batch, 1, device=device))
        z2 = z2 * (lo + (hi - lo) * torch.rand(case.batch, 1, device=device))
    if case.soft and min_weight > 0 and not case.special:
        w = min_weight + (1 - min_weight) * w
    return z1, z2, w


kwargs = op_kwargs


def run(fn, z1, z2, w, case, up, dtype, wdtype=None):
    """Outputs and gradients (z1, z2, and w in soft mode) for the upstream gradient ``up``."""
    return outputs_and_grads(lambda a, b, c: fn(a, b, c, **kwargs(case)), z1.to(dtype),
                             z2.to(dtype), w.to(wdtype or torch.float32), case.soft, *up)


def reference(case, z1, z2, w, up, dtype=torch.float64):
    return run(env_contrastive_loss_reference, z1, z2, w, case,
               [u.to(dtype) for u in up], dtype, wdtype=dtype)


def triton_out(case, z1, z2, w, up, dtype=torch.float32):
    return run(T.env_contrastive_loss_triton, z1, z2, w, case, up, dtype)


def check_fp32(case, seed, norms=None, min_weight=0.0, tol=1e-4):
    if case.soft and case.batch <= 2:
        # one other sample: kappa = (N-2) / (2 w_other) amplifies fp32 rounding in the weight
        # gradient by ~1/w_other^2 in any fp32 implementation (the "torch" backend too)
        min_weight = max(min_weight, 0.3)
    z1, z2, w = make(case, norms, min_weight)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    want = reference(case, z1, z2, w, up)
    got = triton_out(case, z1, z2, w, up)
    assert got[0].dtype == torch.float32 and got[0].shape == (case.envs,)
    assert got[1].dtype == torch.float32 and got[1].shape == (case.envs,)
    errs = []
    for i, (name, g, r) in enumerate(zip(NAMES, got, want)):
        assert torch.isfinite(g).all(), f"{name} not finite ({case}, seed {seed})"
        err = relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        errs.append(err)
        assert err < tol, f"{name}: relative error {err:.3e} ({case}, seed {seed})"
    return max(errs)


# ------------------------------------------------------------------ sweep under the interpreter
# The interpreter launches with INTERPRET_BLOCK = 32 rows/columns per tile: B=17 (N=34) is "one
# size just above the block", B=37 (N=74) three ragged tiles; M=3 is not a power of two.
SHAPES = [(1, 3, 1), (2, 16, 3), (5, 128, 16), (17, 16, 3), (37, 128, 3), (37, 3, 16)]
SWEEP = []
for k, ((b, d, m), soft, pen) in enumerate(itertools.product(SHAPES, (False, True), PENALTIES)):
    t, t_irm = [(0.5, 0.5), (0.2, 0.5), (0.1, 0.07)][k % 3]
    SWEEP.append(Case(b, d, m, soft, pen, temperature=t, irm_temperature=t_irm))
SPECIAL = [Case(37, 16, 3, soft, pen, special=sp)
           for soft, pen, sp in itertools.product((False, True), ("slot", "split"),
                                                  ("empty", "single", "equal"))]
# one-sample environment of a two-sample batch; a one-sample batch (one positive, no negative)
SPECIAL += [Case(2, 16, 2, False, "slot", special="single"),
            Case(1, 16, 2, True, "split", special="equal")]
NONORM = [Case(b, 16, 3, True, pen, temperature=0.3, nonorm=True)
          for b, pen in zip((5, 37, 17, 37), PENALTIES)]


@interp
@pytest.mark.parametrize("case", SWEEP + SPECIAL + NONORM, ids=str)
def test_fp32_against_float64_reference(case, seed):
    check_fp32(case, seed)


# Low temperature with non-normalised inputs: logits up to |z|^2 / T = 180 (soft, norms up to 3;
# every weight > 0, so no environment's row sum can underflow, see the module docstring) and
# about 40 (hard, norms up to 1.4).
LOW_T = [(Case(16, 16, 3, True, "slot", temperature=0.05, irm_temperature=0.05), (0.5, 3.0)),
         (Case(37, 16, 3, True, "split", temperature=0.05, irm_temperature=0.1), (0.5, 3.0)),
         (Case(16, 16, 3, False, "slot", temperature=0.05, irm_temperature=0.05), (0.5, 1.4)),
         (Case(37, 16, 3, False, "scalar", temperature=0.1, irm_temperature=0.05), (0.5, 1.4))]


@interp
@pytest.mark.parametrize("case,norms", LOW_T, ids=str)
def test_low_temperature_non_normalised_inputs(case, norms, seed):
    check_fp32(case, seed, norms=norms, min_weight=0.05)


@interp
def test_hard_environment_far_below_the_row_max(seed):
    """Hard mode, norms up to 3 at T = 0.05: a row outside an environment (weight 0) can have an
    environment sum near the fp32 floor; the glue's vjp must not turn its 1/Z^2 into inf * 0
    (logits up to 180: bound 1e-3 as in test_ops)."""
    check_fp32(Case(23, 16, 3, False, "slot", temperature=0.05, irm_temperature=0.05), seed,
               norms=(1.0, 3.0), tol=1e-3)


FP16 = [Case(37, 128, 16, False, "slot"), Case(37, 128, 16, True, "slot"),
        Case(5, 16, 2, True, "split", temperature=0.2), Case(17, 32, 3, False, "scalar_split"),
        Case(17, 16, 3, True, "scalar", temperature=0.1, irm_temperature=0.3)]


@interp
@pytest.mark.parametrize("case", FP16, ids=str)
def test_fp16_within_twice_torch_error(case, seed):
    """fp16 inputs: error vs the fp64 truth <= 2 x (the reference's own error in fp16) + 1e-3."""
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    truth = reference(case, z1, z2, w, up)
    ref16 = reference(case, z1.half(), z2.half(), w, up, dtype=torch.float16)
    got = triton_out(case, z1, z2, w, up, dtype=torch.float16)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float16
    for name, g, t, r in zip(NAMES, got, ref16, truth):
        assert torch.isfinite(g).all(), f"{name} not finite ({case}, seed {seed})"
        scale = max(r.abs().max().item(), 1e-6)
        err = (g.double() - r).abs().max().item() / scale
        allowed = 2 * (t.double() - r).abs().max().item() / scale + 1e-3
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e} ({case}, seed {seed})"


@interp
def test_float64_inputs_are_computed_in_fp32_and_returned_as_float64(seed):
    case = Case(5, 16, 3, True, "slot")
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    got = run(T.env_contrastive_loss_triton, z1, z2, w, case, up, torch.float64,
              wdtype=torch.float64)
    want = reference(case, z1, z2, w, up)
    for i, (name, g, r) in enumerate(zip(NAMES, got, want)):
        assert g.dtype == torch.float64, name
        assert relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR) < 1e-4, \
            f"{name} (seed {seed})"


@interp
def test_public_op_dispatches_to_triton(monkeypatch, seed):
    from fastipirm.ops import backends, env_contrastive_loss
    # the registry may have been imported before TRITON_INTERPRET was set: register afresh
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends.BACKENDS, "triton", backends.Backend(
        "triton", ("cuda", "cpu"), backends._load_triton))
    assert backends.AUTO_ORDER["cuda"][0] == "triton"
    assert "triton" not in backends.AUTO_ORDER["cpu"]
    case = Case(6, 8, 2, True, "slot")
    z1, z2, w = make(case)
    a = env_contrastive_loss(z1, z2, w, backend="triton", **kwargs(case))
    b = T.env_contrastive_loss_triton(z1, z2, w, **kwargs(case))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@interp
def test_deterministic(seed):
    """No atomics: two runs give bitwise identical values and gradients."""
    case = Case(37, 16, 3, True, "split", temperature=0.2)
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    a = triton_out(case, z1, z2, w, up)
    b = triton_out(case, z1, z2, w, up)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not K._tuned, "the interpreter must bypass the autotuner (one default config)"


@interp
@pytest.mark.parametrize("soft,penalty", [(False, "slot"), (True, "split")])
def test_no_quadratic_buffer_in_forward_or_backward(soft, penalty):
    """Every tensor created by the forward and backward is smaller than N^2 bytes.

    (Even an N x N bool mask would not fit; an N x N fp32 matrix is 4 N^2 bytes.)
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = (0, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    nbytes = t.numel() * t.element_size()
                    if nbytes > self.biggest[0]:
                        self.biggest = (nbytes, str(func))
            return out

    case = Case(37, 3, 1, soft, penalty)
    z1, z2, w = make(case)
    n = 2 * case.batch
    z1.requires_grad_()
    w.requires_grad_(soft)
    mode = Largest()
    with mode:  # the eager path: same kernels and glue, no opaque custom-op boundary
        loss, pen = T.env_contrastive_loss_triton_eager(z1, z2, w, **kwargs(case))
        (loss.sum() + pen.sum()).backward()
    assert 0 < mode.biggest[0] < n * n, mode.biggest


@interp
@pytest.mark.parametrize("soft,penalty,t_irm", [(False, "slot", 0.5), (True, "split", 0.3),
                                                (True, "scalar", 0.5)])
def test_eager_autograd_function_matches_custom_op(soft, penalty, t_irm, seed):
    case = Case(17, 16, 3, soft, penalty, irm_temperature=t_irm)
    z1, z2, w = make(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    a = triton_out(case, z1, z2, w, up)
    b = run(T.env_contrastive_loss_triton_eager, z1, z2, w, case, up, torch.float32)
    for name, x, y in zip(NAMES, a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-9), f"{name} (seed {seed})"


@interp
@pytest.mark.parametrize("soft,penalty", [(False, "slot"), (True, "split"), (True, "scalar")])
def test_opcheck_custom_op(soft, penalty):
    z1, z2, w = make(Case(5, 8, 3, soft, penalty))
    args = (z1.requires_grad_(), z2.requires_grad_(), w.requires_grad_(soft), soft, False,
            penalty, 0.5, 0.4)
    torch.library.opcheck(T._op_backend.forward_op, args)


@interp
def test_training_step_compiles_fullgraph(seed):
    check_compiled_step(T.env_contrastive_loss_triton)


def test_too_wide_features_are_a_clear_error():
    z = torch.randn(3, K.MAX_D + 1)
    with pytest.raises(ValueError, match="feature dimensions up to"):
        T.env_contrastive_loss_triton(z, z, torch.ones(3, 1), temperature=0.5,
                                      irm_temperature=0.5, soft=False)


# ------------------------------------------------------------------ GPU (skipped without CUDA)
GPU_ERRORS: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.0), (torch.float16, 1e-3),
                                         (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", [Case(b, 128, m, soft, pen)
                                  for b, m, soft, pen in [(256, 16, False, "slot"),
                                                          (1000, 3, True, "split"),
                                                          (2048, 16, True, "slot"),
                                                          (4096, 4, False, "scalar"),
                                                          (8192, 4, True, "slot"),
                                                          (8192, 2, False, "slot")]], ids=str)
def test_gpu_against_float64_torch_backend(case, dtype, floor, seed):
    """Truth: the ``"torch"`` backend in float64 (itself tested against the literal reference).

    fp32 (exact ``ieee`` dots, torch's default matmul precision): relative error < 1e-4.
    fp16/bf16: error <= 2 x (error of the torch backend fed the same rounded inputs) + floor.
    """
    cuda_or_skip(INTERPRETED)
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch
    z1, z2, w = make(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    truth = run(env_contrastive_loss_torch, z1, z2, w, case, [u.double() for u in up],
                torch.float64, wdtype=torch.float64)
    got = triton_out(case, z1, z2, w, up, dtype=dtype)
    if dtype != torch.float32:
        base = run(env_contrastive_loss_torch, z1.to(dtype), z2.to(dtype), w, case, up,
                   torch.float32)
    for i, (name, g, r) in enumerate(zip(NAMES, got, truth)):
        assert torch.isfinite(g).all(), f"{name} not finite ({case}, seed {seed})"
        err = relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        key = str(dtype)
        GPU_ERRORS[key] = max(GPU_ERRORS.get(key, 0.0), err)
        print(f"[gpu max error] {key} {case} {name}: {err:.3e}")
        if dtype == torch.float32:
            assert err < 1e-4, f"{name}: {err:.3e} ({case}, seed {seed})"
        else:
            allowed = 2 * relative_error(base[i], r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR) \
                + floor
            assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e} ({case}, seed {seed})"


@pytest.mark.gpu
def test_gpu_peak_memory_is_linear():
    """B=8192, D=128, M=16: fwd+bwd peak below N^2 bytes (256 MiB; a (2B)^2 bf16 matrix: 512)."""
    cuda_or_skip(INTERPRETED)
    case = Case(8192, 128, 16, True, "slot")
    z1, z2, w = make(case, device="cuda")
    z1, z2 = z1.bfloat16().requires_grad_(), z2.bfloat16().requires_grad_()
    w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, pen = T.env_contrastive_loss_triton(z1, z2, w, **kwargs(case))
    (loss.sum() + pen.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    n = 2 * case.batch
    print(f"[gpu peak memory] B=8192 D=128 M=16 soft bf16 fwd+bwd: {extra / 2**20:.1f} MiB")
    assert extra < n * n, f"peak {extra / 2**20:.1f} MiB"


def test_loader_says_why_triton_is_unavailable(monkeypatch):
    from fastipirm.ops import backends
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device.*TRITON_INTERPRET=1"):
        backends._load_triton()
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k:
                        None if name == "triton" else find_spec(name, *a, **k))
    with pytest.raises(ImportError, match="'triton' package is not installed"):
        backends._load_triton()


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastipirm.kernels.env_contrastive as mod
assert not mod.INTERPRETED
arch = int(sys.argv[1])
f32 = "*fp32"
plans = [
    (mod._rowstats_kernel, {"F": "*fp16", "SPOS": f32, "W": f32, "M_OUT": f32, "ZN_OUT": f32,
                            "ZNT_OUT": f32}, dict(TWO_T=True, BLOCK_E=16)),
    (mod._band_kernel, {"F": "*bf16", "MROW": f32, "FAC": f32, "OUT": f32},
     dict(TRANS=True, NB=3, BLOCK_G=16)),
    (mod._band_kernel, {"F": "*fp16", "MROW": f32, "FAC": f32, "OUT": f32},
     dict(TRANS=False, NB=3, BLOCK_G=32)),
    (mod._grad_kernel, {"F": "*bf16", "MROW": f32, "W": f32, "GZ1": f32, "GZ2": f32, "RC": f32,
                        "GACC": f32, "DF": f32, "GW": f32},
     dict(TWO_T=True, NB=3, NEED_GW=True, BLOCK_E=16, BLOCK_G=32)),
]
floats = {"scale1", "scale2", "inv_t1", "inv_t2"}
for fn, ptrs, consts in plans:
    consts = dict(consts, PREC="tf32", NPREC="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_D=128)
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in floats else "i32")
           for a in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": 4, "num_stages": 2})
    assert k.asm.get("cubin"), fn.__name__
    print(fn.__name__, "shared", k.metadata.shared)
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_ampere_and_hopper_without_a_gpu(arch, tmp_path):
    """Lower the kernels through Triton's real compiler (TTIR -> PTX -> cubin with the bundled
    ptxas) for sm_80 / sm_90, in a subprocess without the interpreter: catches what the
    interpreter does not check (types, layouts, shared memory)."""
    limit = shared_memory_limit(arch)
    for line in compile_without_interpreter(_AOT_SCRIPT, [arch], tmp_path):
        name, _, shared = line.split()
        assert int(shared) <= limit, f"{name}: {shared} bytes of shared memory on sm_{arch}"
