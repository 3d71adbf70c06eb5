"""Backend ``"cuda"``: csrc/env_contrastive_cuda_kernels.cu + csrc/env_contrastive_cuda.cpp.

Four layers, so that a machine without a GPU still checks what it can:

* compile checks (CI has nvcc but no GPU): ``nvcc -c`` of the kernel translation unit for sm_80
  and sm_90 (a CUDA syntax or template error cannot land), and ``g++ -fsyntax-only`` of the torch
  bindings against the installed torch's headers (a CPU build of torch ships the c10/cuda headers;
  linking needs a CUDA build, so it is not attempted);
* the kernels' logic on the CPU: the ``.cu`` compiled by g++ against a small host emulation of the
  CUDA runtime (tests/cuda_emulation.py: one std::thread per CUDA thread, a std::barrier per
  block, shared memory poisoned with NaNs, a wmma stand-in with the documented fragment
  semantics) and run through the shared fused glue against the float64 reference. It checks
  indexing, masks, row shifts, column windows and barriers; it does not check the hardware's
  wmma fragments, timing or races between warps;
* loader and registry checks (no extension needed);
* ``gpu`` tests (skipped without CUDA or without the built extension): the reference sweep on the
  GPU for fp32/fp16/bf16 (the tolerance conventions of tests/test_triton_backend.py), opcheck, a
  fullgraph-compiled training step, determinism, linear memory.

Fresh random inputs every run; a failing case prints its seed (replay with
``FASTIPIRM_TEST_SEED=<seed>``).
"""
import ctypes
import sys
from pathlib import Path

import pytest
import torch

from cuda_emulation import FEAT_TYPE, bindings_syntax_check, build_library, emulation_source, \
    nvcc_compile_check, ptr
from fastipirm.check import (GRADIENT_FLOOR, VALUE_FLOOR, Case, check_compiled_step,
                             make_inputs, op_kwargs, outputs_and_grads, relative_error)
from fastipirm.ops import PENALTIES, env_contrastive_loss_reference
from fastipirm.ops import cuda_backend as CB
from fastipirm.ops.build import CUDA_EXTENSION
from fastipirm.ops.fused import FusedKernels, fused_eager

ROOT = Path(__file__).resolve().parents[1]
KERNELS_CU = ROOT / "csrc" / "env_contrastive_cuda_kernels.cu"
BINDINGS_CPP = ROOT / "csrc" / "env_contrastive_cuda.cpp"
NAMES = ["loss", "penalty", "grad z1", "grad z2", "grad weights"]


kwargs = op_kwargs


def run(fn, z1, z2, w, case, up, dtype, wdtype=None):
    """Outputs and gradients (z1, z2, and w in soft mode) for the upstream gradient ``up``."""
    return outputs_and_grads(lambda a, b, c: fn(a, b, c, **kwargs(case)), z1.to(dtype),
                             z2.to(dtype), w.to(wdtype or torch.float32), case.soft, *up)


def assert_close_to(got, want, tol, what):
    for i, (name, g, r) in enumerate(zip(NAMES, got, want)):
        assert torch.isfinite(g).all(), f"{name} not finite ({what})"
        err = relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        assert err < tol, f"{name}: relative error {err:.3e} ({what})"


def assert_within_twice_base(got, truth, base, floor, what):
    """Half-precision rule: error vs the truth <= 2 x (error of the torch backend fed the same
    rounded inputs) + floor."""
    for i, (name, g, r, b) in enumerate(zip(NAMES, got, truth, base)):
        assert torch.isfinite(g).all(), f"{name} not finite ({what})"
        fl = VALUE_FLOOR if i < 2 else GRADIENT_FLOOR
        err = relative_error(g, r, fl)
        allowed = 2 * relative_error(b, r, fl) + floor
        assert err <= allowed, f"{name}: {err:.3e} > {allowed:.3e} ({what})"


# ------------------------------------------------------------------ compile checks (no GPU)
def test_kernels_compile_with_nvcc_for_sm80_and_sm90(tmp_path):
    """``nvcc -c`` of the kernel translation unit (no torch headers in it; it includes
    csrc/cuda_common.cuh) with the extension's flags and the half-type restrictions torch's
    extension builder adds (no implicit half/bfloat16 conversions); any warning fails."""
    nvcc_compile_check(KERNELS_CU, tmp_path / "kernels.o")


def test_bindings_syntax_against_torch_headers():
    """``g++ -fsyntax-only`` of the torch bindings (schemas, TORCH_CHECKs, guards, stream):
    catches C++ errors without a CUDA build of torch. Linking needs libc10_cuda: not attempted."""
    bindings_syntax_check(BINDINGS_CPP, "env_contrastive_cuda", ("-Wall", "-Wno-unused-function"))


def test_nvcc_flags_target_ampere_and_hopper_without_fast_math():
    """The flags of setup.py and of the JIT build (one list, fastipirm/ops/build.py)."""
    flags = CUDA_EXTENSION.compile_args()["nvcc"]
    assert "--use_fast_math" not in flags
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=sm_90" in flags


# ------------------------------------------------------------------ the kernels emulated on a CPU
_EMU_HARNESS = r"""
#include "kernels_emu.cpp"
using namespace fastipirm_cuda;
static int done(int rc) { int e = emu::g_error; emu::g_error = 0; return rc ? rc : (e ? 99 : 0); }
extern "C" {
int emu_rowstats(const void* f, int ft, int tf, const float* spos, const float* w2, float* mrow,
                 float* zn, float* znt, int n, int d, int m, int b, float t1, float t2, int two_t) {
  return done(launch_rowstats(f, ft, tf, spos, w2, mrow, zn, znt, n, d, m, b, t1, t2, two_t,
                              nullptr)); }
int emu_band(const void* f, int ft, int tf, const float* mrow, const float* fac, float* out, int n,
             int d, int g, int b, float t2, int trans, int nb) {
  return done(launch_band(f, ft, tf, mrow, fac, out, n, d, g, b, t2, trans, nb, nullptr)); }
int emu_grad(const void* f, int ft, int tf, const float* mrow, const float* w2, const float* gz1,
             const float* gz2, const float* rc, const float* gacc, float* df, float* gw, int n,
             int d, int m, int g, int b, float t1, float t2, int two_t, int nb, int need_gw) {
  return done(launch_grad(f, ft, tf, mrow, w2, gz1, gz2, rc, gacc, df, gw, n, d, m, g, b, t1, t2,
                          two_t, nb, need_gw, nullptr)); }
int emu_smem(int which, int ft, int tf, int a, int b) {
  return which == 0 ? rowstats_smem_bytes(ft, tf, a)
       : which == 1 ? band_smem_bytes(ft, tf, a, b) : grad_smem_bytes(ft, tf, a, b); }
}
"""


def _emulation_source() -> str:
    """The kernel file with its two device-only constructs rewritten for the host emulation."""
    return emulation_source(KERNELS_CU, 3, 4, "tests/test_cuda_backend.py")


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("cuda_emu"), _emulation_source(), _EMU_HARNESS)


class EmulatedKernels(FusedKernels):
    """The CUDA kernels' launchers run by the host emulation on CPU tensors."""

    name = "cuda_emulated"

    def __init__(self, lib, allow_tf32=False):
        self.lib, self.tf32 = lib, int(allow_tf32)

    def rowstats(self, feats, spos, w2, batch, t1, t2, two_t, cache=None):
        n, d = feats.shape
        m = w2.shape[1]
        spos, w2 = spos.float().contiguous(), w2.float().contiguous()
        mrow, zn = torch.empty(n), torch.empty(n, m)
        znt = torch.empty(n, m) if two_t else None
        rc = self.lib.emu_rowstats(ptr(feats), FEAT_TYPE[feats.dtype], self.tf32, ptr(spos),
                                   ptr(w2), ptr(mrow), ptr(zn), ptr(znt), n, d, m, batch,
                                   ctypes.c_float(t1), ctypes.c_float(t2), int(two_t))
        assert rc == 0, rc
        return mrow, zn, (znt if two_t else zn)

    def band(self, feats, mrow, fac, nb_out, batch, t2, trans, nb, cache=None):
        n, d = feats.shape
        g = fac.shape[2]
        fac = fac.float().contiguous()
        out = torch.empty(nb_out, n, g)
        rc = self.lib.emu_band(ptr(feats), FEAT_TYPE[feats.dtype], self.tf32, ptr(mrow),
                               ptr(fac), ptr(out), n, d, g, batch, ctypes.c_float(t2),
                               int(trans), nb)
        assert rc == 0, rc
        return out

    def grad(self, feats, mrow, w2, gz1, gz2, rc, gacc, batch, t1, t2, two_t, need_gw,
             cache=None):
        n, d = feats.shape
        m, g, nb = w2.shape[1], rc.shape[1], gacc.shape[0]
        w2, gz1, gz2 = w2.float().contiguous(), gz1.contiguous(), gz2.contiguous()
        rc, gacc = rc.contiguous(), gacc.contiguous()
        df = torch.empty(n, d)
        gw = torch.empty(n, m) if need_gw else None
        err = self.lib.emu_grad(ptr(feats), FEAT_TYPE[feats.dtype], self.tf32, ptr(mrow),
                                ptr(w2), ptr(gz1), ptr(gz2), ptr(rc), ptr(gacc), ptr(df),
                                ptr(gw), n, d, m, g, batch, ctypes.c_float(t1),
                                ctypes.c_float(t2), int(two_t), nb, int(need_gw))
        assert err == 0, err
        return df, gw


def _emulated(lib, allow_tf32=False):
    kern = EmulatedKernels(lib, allow_tf32)
    return lambda z1, z2, w, **kw: fused_eager(kern, z1, z2, w, **kw)


# (B, D, M): one-sample batch, ragged single tiles, several row blocks (64-row blocks, 32 in the
# gradient kernel), D not a multiple of the 32-column chunk, D > 256 (two dF windows), M = 70
# (two environment windows; G = 140 for the split penalties: three group windows)
EMU_FP32 = [Case(1, 3, 1, True, "split"), Case(2, 16, 3, False, "scalar_split", 0.1, 0.07),
            Case(17, 16, 3, True, "slot", 0.2, 0.5), Case(37, 128, 16, False, "split"),
            Case(37, 3, 16, True, "scalar", 0.1, 0.07), Case(70, 20, 4, True, "scalar_split"),
            Case(40, 20, 70, True, "split", 0.2, 0.5), Case(33, 300, 5, False, "slot", 0.1, 0.07),
            Case(37, 16, 3, True, "slot", special="single"),
            Case(37, 16, 3, False, "split", special="empty"),
            Case(17, 16, 3, True, "slot", temperature=0.3, nonorm=True)]


@pytest.mark.parametrize("case", EMU_FP32, ids=str)
def test_emulated_fp32_kernels_against_float64_reference(emu_lib, case, seed):
    z1, z2, w = make_inputs(case)
    if case.soft and case.batch <= 2:
        w = 0.3 + 0.7 * w   # see test_triton_backend.check_fp32
    up = (torch.randn(case.envs), torch.randn(case.envs))
    want = run(env_contrastive_loss_reference, z1, z2, w, case, [u.double() for u in up],
               torch.float64, wdtype=torch.float64)
    got = run(_emulated(emu_lib), z1, z2, w, case, up, torch.float32)
    assert_close_to(got, want, 1e-4, f"{case}, seed {seed}")


@pytest.mark.parametrize("dtype,floor", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", [Case(37, 128, 16, True, "slot"),
                                  Case(17, 40, 3, False, "scalar_split", 0.1, 0.3)], ids=str)
def test_emulated_half_kernels_within_twice_torch_error(emu_lib, case, dtype, floor, seed):
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch
    z1, z2, w = make_inputs(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    truth = run(env_contrastive_loss_reference, z1, z2, w, case, [u.double() for u in up],
                torch.float64, wdtype=torch.float64)
    base = run(env_contrastive_loss_torch, z1.to(dtype), z2.to(dtype), w, case, up,
               torch.float32)
    got = run(_emulated(emu_lib), z1, z2, w, case, up, dtype)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    assert_within_twice_base(got, truth, base, floor, f"{case}, seed {seed}")


def test_emulated_tf32_kernels(emu_lib, seed):
    case = Case(37, 128, 16, True, "split", 0.2, 0.5)
    z1, z2, w = make_inputs(case)
    up = (torch.randn(case.envs), torch.randn(case.envs))
    want = run(env_contrastive_loss_reference, z1, z2, w, case, [u.double() for u in up],
               torch.float64, wdtype=torch.float64)
    got = run(_emulated(emu_lib, allow_tf32=True), z1, z2, w, case, up, torch.float32)
    assert_close_to(got, want, 2e-3, f"{case}, seed {seed}")


def test_emulated_kernels_are_deterministic_and_fit_shared_memory(emu_lib, seed):
    case = Case(37, 16, 3, True, "split", temperature=0.2)
    z1, z2, w = make_inputs(case)
    up = (torch.randn(3), torch.randn(3))
    a = run(_emulated(emu_lib), z1, z2, w, case, up, torch.float32)
    b = run(_emulated(emu_lib), z1, z2, w, case, up, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    smem = emu_lib.emu_smem
    worst = max([smem(0, ft, tf, two, 0) for ft in (0, 1, 2) for tf in (0, 1) for two in (0, 1)]
                + [smem(1, ft, tf, tr, nb) for ft in (0, 1, 2) for tf in (0, 1) for tr in (0, 1)
                   for nb in (1, 3)]
                + [smem(2, ft, tf, two, gw) for ft in (0, 1, 2) for tf in (0, 1) for two in (0, 1)
                   for gw in (0, 1)])
    assert worst <= 99 * 1024, worst   # the opt-in limit of sm_86/89; sm_80: 163 KB, sm_90: 227 KB


# ------------------------------------------------------------------ loader and registry (no GPU)
def test_registry_lists_cuda_after_triton():
    from fastipirm.ops import backends
    assert backends.BACKENDS["cuda"].devices == ("cuda",)
    assert backends.AUTO_ORDER["cuda"] == ("triton", "cuda", "torch")
    assert "cuda" not in backends.AUTO_ORDER["cpu"]
    name, ok, detail = next(r for r in backends.backend_report() if r[0] == "cuda")
    assert ok or detail   # unavailable: the report says why
    if not torch.cuda.is_available():
        assert not ok


def test_loader_says_how_to_build_the_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastipirm._cuda", None)   # import fails as if not built
    monkeypatch.delenv("FASTIPIRM_JIT_BUILD", raising=False)
    with pytest.raises(ImportError, match=r"fastipirm\._cuda is not built.*pip install "
                                          r"--no-build-isolation -e \..*FASTIPIRM_JIT_BUILD=1"):
        CB.load_extension()
    # JIT requested but no CUDA: the same message (nothing to compile for)
    monkeypatch.setenv("FASTIPIRM_JIT_BUILD", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ImportError, match="FASTIPIRM_JIT_BUILD=1"):
        CB.load_extension()


def test_backend_loader_says_why_cuda_is_unavailable(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError, match="build without CUDA"):
        CB.load_cuda_backend()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        CB.load_cuda_backend()


def test_cuda_backend_rejects_cpu_tensors():
    z = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        CB.CUDA_KERNELS.check(z)


def test_allow_tf32_follows_torch_matmul_precision():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not CB._allow_tf32(torch.float32)
        torch.set_float32_matmul_precision("high")
        assert CB._allow_tf32(torch.float32) and not CB._allow_tf32(torch.bfloat16)
    finally:
        torch.set_float32_matmul_precision(saved)


# ------------------------------------------------------------------ GPU (skipped without CUDA)
def _backend_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fastipirm.ops.backends import BACKENDS
    impl = BACKENDS["cuda"].load()
    if impl is None:
        pytest.skip(f"cuda backend unavailable: {BACKENDS['cuda'].error}")
    return impl


def cuda_out(case, z1, z2, w, up, dtype=torch.float32):
    impl = _backend_or_skip()
    return run(impl, z1, z2, w, case, up, dtype)


# odd sizes (N not a multiple of the 64/32-row blocks, D not a multiple of 32, D > 256, M > 64),
# all four penalties, hard and soft, one and two temperatures, B up to 4096
GPU_CASES = [Case(256, 128, 16, False, "slot"), Case(1000, 128, 3, True, "split", 0.2, 0.5),
             Case(2048, 128, 16, True, "slot"), Case(4096, 128, 4, False, "scalar", 0.1, 0.07),
             Case(333, 96, 5, True, "scalar_split", 0.1, 0.07),
             Case(37, 20, 70, True, "split", 0.5, 0.3), Case(129, 300, 3, False, "slot"),
             Case(4096, 128, 16, True, "scalar", 0.2, 0.5)]
GPU_ERRORS: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.0), (torch.float16, 1e-3),
                                         (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_against_float64_torch_backend(case, dtype, floor, seed):
    """Truth: the ``"torch"`` backend in float64 (itself tested against the literal reference).

    fp32 (exact FMA similarity tiles, torch's default matmul precision): relative error < 1e-4.
    fp16/bf16: error <= 2 x (error of the torch backend fed the same rounded inputs) + floor.
    """
    _backend_or_skip()
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    truth = run(env_contrastive_loss_torch, z1, z2, w, case, [u.double() for u in up],
                torch.float64, wdtype=torch.float64)
    got = cuda_out(case, z1, z2, w, up, dtype=dtype)
    assert got[0].dtype == torch.float32 and got[0].shape == (case.envs,)
    for i, (name, g, r) in enumerate(zip(NAMES, got, truth)):
        err = relative_error(g, r, VALUE_FLOOR if i < 2 else GRADIENT_FLOOR)
        GPU_ERRORS[str(dtype)] = max(GPU_ERRORS.get(str(dtype), 0.0), err)
        print(f"[gpu max error] cuda {dtype} {case} {name}: {err:.3e}")
    if dtype == torch.float32:
        assert_close_to(got, truth, 1e-4, f"{case}, seed {seed}")
    else:
        base = run(env_contrastive_loss_torch, z1.to(dtype), z2.to(dtype), w, case, up,
                   torch.float32)
        assert_within_twice_base(got, truth, base, floor, f"{case}, seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [Case(37, 128, 16, False, "slot"),
                                  Case(300, 64, 3, True, "split", 0.2, 0.5)], ids=str)
def test_gpu_against_literal_reference(case, seed):
    _backend_or_skip()
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    want = run(env_contrastive_loss_reference, z1, z2, w, case, [u.double() for u in up],
               torch.float64, wdtype=torch.float64)
    assert_close_to(cuda_out(case, z1, z2, w, up), want, 1e-4, f"{case}, seed {seed}")


@pytest.mark.gpu
def test_gpu_tf32_when_matmul_precision_allows(seed):
    """``torch.set_float32_matmul_precision("high")``: TF32 similarity tiles; the error stays
    within 2 x that of the torch backend under the same setting + 2e-3."""
    _backend_or_skip()
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch
    case = Case(1000, 128, 16, True, "slot", 0.2, 0.5)
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    truth = run(env_contrastive_loss_torch, z1, z2, w, case, [u.double() for u in up],
                torch.float64, wdtype=torch.float64)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = cuda_out(case, z1, z2, w, up)
        base = run(env_contrastive_loss_torch, z1, z2, w, case, up, torch.float32)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert_within_twice_base(got, truth, base, 2e-3, f"{case}, seed {seed}")


@pytest.mark.gpu
def test_gpu_float64_inputs_computed_in_fp32_returned_as_float64(seed):
    _backend_or_skip()
    case = Case(50, 32, 3, True, "slot")
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    got = run(_backend_or_skip(), z1, z2, w, case, up, torch.float64, wdtype=torch.float64)
    want = run(env_contrastive_loss_reference, z1, z2, w, case, [u.double() for u in up],
               torch.float64, wdtype=torch.float64)
    assert all(g.dtype == torch.float64 for g in got)
    assert_close_to(got, want, 1e-4, f"{case}, seed {seed}")


@pytest.mark.gpu
def test_gpu_agrees_with_triton_backend(seed):
    impl = _backend_or_skip()
    from fastipirm.ops.backends import BACKENDS
    triton_impl = BACKENDS["triton"].load()
    if triton_impl is None:
        pytest.skip(f"triton backend unavailable: {BACKENDS['triton'].error}")
    case = Case(1000, 128, 16, True, "split", 0.2, 0.5)
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    a = run(impl, z1, z2, w, case, up, torch.float32)
    b = run(triton_impl, z1, z2, w, case, up, torch.float32)
    assert_close_to(a, b, 1e-4, f"{case}, seed {seed}")


@pytest.mark.gpu
def test_gpu_deterministic(seed):
    """No atomics: two runs give bitwise identical values and gradients."""
    _backend_or_skip()
    case = Case(1000, 128, 16, True, "split", temperature=0.2)
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    for dtype in (torch.float32, torch.bfloat16):
        a = cuda_out(case, z1, z2, w, up, dtype)
        b = cuda_out(case, z1, z2, w, up, dtype)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), dtype


@pytest.mark.gpu
def test_gpu_peak_memory_is_linear():
    """B=8192, D=128, M=16: fwd+bwd peak below N^2 bytes (256 MiB; a (2B)^2 bf16 matrix: 512)."""
    impl = _backend_or_skip()
    case = Case(8192, 128, 16, True, "slot")
    z1, z2, w = make_inputs(case, device="cuda")
    z1, z2 = z1.bfloat16().requires_grad_(), z2.bfloat16().requires_grad_()
    w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, pen = impl(z1, z2, w, **kwargs(case))
    (loss.sum() + pen.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    n = 2 * case.batch
    print(f"[gpu peak memory] cuda B=8192 D=128 M=16 soft bf16 fwd+bwd: {extra / 2**20:.1f} MiB")
    assert extra < n * n, f"peak {extra / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("soft,penalty", [(False, "slot"), (True, "split"), (True, "scalar")])
def test_gpu_opcheck_custom_op(soft, penalty):
    impl = _backend_or_skip()
    z1, z2, w = make_inputs(Case(5, 8, 3, soft, penalty), device="cuda")
    args = (z1.requires_grad_(), z2.requires_grad_(), w.requires_grad_(soft), soft, False,
            penalty, 0.5, 0.4)
    torch.library.opcheck(impl.forward_op, args)


@pytest.mark.gpu
def test_gpu_training_step_compiles_fullgraph(seed):
    check_compiled_step(_backend_or_skip(), device="cuda")


@pytest.mark.gpu
def test_gpu_public_op_dispatches_to_cuda(seed):
    impl = _backend_or_skip()
    from fastipirm.ops import env_contrastive_loss
    case = Case(6, 8, 2, True, "slot")
    z1, z2, w = make_inputs(case, device="cuda")
    a = env_contrastive_loss(z1, z2, w, backend="cuda", **kwargs(case))
    b = impl(z1, z2, w, **kwargs(case))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
def test_gpu_ops_reject_bad_inputs():
    _backend_or_skip()
    ops = torch.ops.fastipirm_cuda
    f = torch.randn(8, 5, device="cuda")
    spos = torch.zeros(8, device="cuda")
    w2 = torch.ones(8, 2, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rowstats(torch.randn(5, 8, device="cuda").t(), spos, w2, 4, 0.5, 0.5, False)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rowstats(f, spos.double(), w2, 4, 0.5, 0.5, False)
    with pytest.raises(RuntimeError, match="2 \\* batch"):
        ops.rowstats(f, spos, w2, 3, 0.5, 0.5, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.rowstats(f.double(), spos, w2, 4, 0.5, 0.5, False)
    with pytest.raises(RuntimeError, match="nb must be 1 or 3"):
        ops.band(f, spos, torch.ones(1, 8, 2, device="cuda"), 2, 4, 0.5, True, 2)


@pytest.mark.gpu
def test_gpu_eager_autograd_function_matches_custom_op(seed):
    impl = _backend_or_skip()
    case = Case(100, 32, 3, True, "split", 0.5, 0.3)
    z1, z2, w = make_inputs(case, device="cuda")
    up = (torch.randn(case.envs, device="cuda"), torch.randn(case.envs, device="cuda"))
    a = run(impl, z1, z2, w, case, up, torch.float32)
    b = run(CB.env_contrastive_loss_cuda_eager, z1, z2, w, case, up, torch.float32)
    for name, x, y in zip(NAMES, a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-9), f"{name} (seed {seed})"


def test_penalties_covered_by_the_gpu_sweep():
    assert {c.penalty for c in GPU_CASES} == set(PENALTIES)
    assert {c.soft for c in GPU_CASES} == {False, True}
    assert any(c.temperature != c.irm_temperature for c in GPU_CASES)
