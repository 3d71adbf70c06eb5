"""Kernel set ``"cuda"`` of ``masked_contrastive_loss``: csrc/masked_contrastive_cuda_kernels.cu +
csrc/masked_contrastive_cuda.cpp behind fastipirm/ops/masked_cuda.py.

Layers, so that a machine without a GPU checks what it can:

* compile checks: ``nvcc -c`` of the kernel translation unit for sm_80 and sm_90 with the
  project's flags (warnings, register spills included, fail), ``g++ -fsyntax-only`` of the
  bindings against the installed torch's headers, the build description lists the sources;
* the kernels' logic on the CPU: the ``.cu`` compiled by g++ against the host emulation of the
  CUDA runtime (tests/cuda_emulation.py: one std::thread per CUDA thread, a barrier per block,
  shared memory poisoned with NaNs, a wmma stand-in), wrapped as the extension's four ops (the
  bindings' argument handling) inside the real kernel set :class:`CudaMaskedKernels`, registered
  as a backend and called through the public op and the shared glue, against the float64
  reference: the four similarities, separate positives and positive columns (T = 2 with a
  repeated column), keys=None with and without include_self, self_index, groups (tile skipping,
  empty and single-member groups), key_penalty, key_weights, sizes not multiple of the 64-row
  blocks, D = 128 and D > 128 (two gradient windows), split stream sides (partials and their
  merge), an extreme temperature, fp16/bf16 (tensor-core path) and TF32, determinism. Outputs and
  workspaces are poisoned with NaNs before each launch (every element must be written). It does
  not check the hardware's wmma fragment layouts, timing or races between warps;
* loader, registry and wrapper checks (no extension needed);
* ``gpu`` tests (skipped without CUDA or without the built extension): the sweep of fp32 /
  fp16 / bf16 against the float64 torch kernel set, TF32, split vs unsplit, determinism, the
  ops' argument checks, a fullgraph-compiled training step.

The cases, their inputs, upstream gradients, outputs and errors are those of fastipirm/check.py
(:class:`MaskedCase` with ``reduction="none"``: every row's loss is checked). Fresh random inputs
every run; a failing case prints its seed (replay with ``FASTIPIRM_TEST_SEED=<seed>``).
"""
import ctypes
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from cuda_emulation import FEAT_TYPE, bindings_syntax_check, build_library, emulation_source, \
    nvcc_compile_check, ptr

from fastipirm.check import (FP32_TOLERANCE, MASKED_WEIGHTS, MaskedCase, make_masked_inputs,
                             masked_backend_outputs, masked_errors, masked_outputs_and_grads,
                             masked_reference_outputs, masked_upstream)
from fastipirm.ops import masked_backends, masked_contrastive_loss
from fastipirm.ops import masked_cuda as MC
from fastipirm.ops.backends import MASKED, Backend
from fastipirm.ops.build import CUDA_EXTENSION

ROOT = Path(__file__).resolve().parents[1]
KERNELS_CU = ROOT / "csrc" / "masked_contrastive_cuda_kernels.cu"
BINDINGS_CPP = ROOT / "csrc" / "masked_contrastive_cuda.cpp"
FP32_TOL = FP32_TOLERANCE
#: the cases of this file: per-row losses (reduction "none")
M = partial(MaskedCase, reduction="none")


# ------------------------------------------------------------------ compile checks (no GPU)
def test_kernels_compile_with_nvcc_for_sm80_and_sm90(tmp_path):
    """``nvcc -c`` with the extension's flags (sm_80 + sm_90 machine code) and torch's half-type
    restrictions; any warning fails, and ptxas warns about register spills and local memory."""
    nvcc_compile_check(KERNELS_CU, tmp_path / "masked.o", ["-Xptxas=-warn-spills,-warn-lmem-usage"])


def test_bindings_syntax_against_torch_headers():
    """``g++ -fsyntax-only`` of the bindings (schemas, checks, guards, stream): linking needs a
    CUDA build of torch, not attempted. No warning may point into the bindings or the header."""
    bindings_syntax_check(BINDINGS_CPP, "masked_contrastive_cuda", ("-Wall", "-Wextra"))


def test_extension_lists_the_masked_sources():
    for src in ("csrc/masked_contrastive_cuda.cpp", "csrc/masked_contrastive_cuda_kernels.cu"):
        assert src in CUDA_EXTENSION.sources and (ROOT / src).exists()
    # the device helpers both kernel files include
    assert "csrc/cuda_common.cuh" in CUDA_EXTENSION.depends
    assert (ROOT / "csrc" / "cuda_common.cuh").exists()
    # the bindings add no second module definition to the extension
    assert "PYBIND11_MODULE" not in BINDINGS_CPP.read_text()


# ------------------------------------------------------------------ the kernels emulated on a CPU
_HARNESS = r"""
#include "kernels_emu.cpp"
using namespace fastipirm_cuda;
static int done(int rc) { int e = emu::g_error; emu::g_error = 0; return rc ? rc : (e ? 99 : 0); }
#define PROB const void* q, const void* k, int ft, int tf, int nq, int nk, int d, int code, \
  float p, float inv_t, const int64_t* qg, const int64_t* kg, const int64_t* ex, int ne, int target
static MaskedProblem prob(PROB) {
  MaskedProblem pr{};
  pr.q = q; pr.k = k; pr.feat_type = ft; pr.allow_tf32 = tf != 0; pr.nq = nq; pr.nk = nk;
  pr.d = d; pr.code = code; pr.p = p; pr.inv_t = inv_t; pr.qg = qg; pr.kg = kg;
  pr.exclude = ex; pr.ne = ne; pr.target_blocks = target;
  return pr;
}
#define ARGS q, k, ft, tf, nq, nk, d, code, p, inv_t, qg, kg, ex, ne, target
extern "C" {
size_t emu_work(PROB, int op) { return masked_workspace_bytes(prob(ARGS), op); }
int emu_rowstats(PROB, const float* w, const float* m0, float* m, float* z, void* work) {
  return done(launch_masked_rowstats(prob(ARGS), w, m0, m, z, work, nullptr)); }
int emu_colsum(PROB, const float* m, const float* rho, const float* sigma, float* a, void* work) {
  return done(launch_masked_colsum(prob(ARGS), m, rho, sigma, a, work, nullptr)); }
int emu_rowsum(PROB, const float* w, const float* m, const float* gamma, float* r, void* work) {
  return done(launch_masked_rowsum(prob(ARGS), w, m, gamma, r, work, nullptr)); }
int emu_grad(PROB, const float* w, const float* m, const float* alpha, const float* beta,
             const float* gamma, float* dq, float* dk, void* work) {
  return done(launch_masked_grad(prob(ARGS), w, m, alpha, beta, gamma, dq, dk, work, nullptr)); }
int emu_smem(int ft, int tf, int op) { return masked_smem_bytes(ft, tf, op); }
}
"""
_OPS = {"rowstats": 0, "colsum": 1, "rowsum": 2, "grad": 3}


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    # 2 kernel templates declare shared memory; 5 launches: group ranges, reduce, grad, the
    # rowstats merge and the sum merge (of the other reductions and of grad)
    src = emulation_source(KERNELS_CU, 2, 5, "tests/test_masked_cuda.py")
    lib = build_library(tmp_path_factory.mktemp("masked_cuda_emu"), src, _HARNESS)
    lib.emu_work.restype = ctypes.c_size_t
    return lib


class EmulatedOps:
    """``torch.ops.fastipirm_cuda.masked_*`` on CPU tensors: the bindings' argument handling (the
    l1 / lp similarities read float32, an empty exclusion list is none, ``target_blocks`` 0 is
    the device default) around the emulated launchers. Outputs and workspace are filled with
    NaNs first. ``default_target``: the emulated device's default grid target."""

    def __init__(self, lib, default_target: int = 4):
        self.lib, self.default_target = lib, default_target
        self.launches = 0

    def _problem(self, q, k, qg, kg, exclude, code, p, inv_t, allow_tf32, target_blocks):
        if code >= 2:
            q, k = q.float(), k.float()
        assert q.dtype == k.dtype and q.is_contiguous() and k.is_contiguous()
        assert (qg is None) == (kg is None)
        for t in (qg, kg, exclude):
            assert t is None or (t.dtype == torch.int64 and t.is_contiguous())
        ex = exclude if exclude is not None and exclude.numel() else None
        target = target_blocks or self.default_target
        args = (ptr(q), ptr(k), FEAT_TYPE[q.dtype], int(allow_tf32), q.shape[0], k.shape[0],
                q.shape[1], code, ctypes.c_float(p), ctypes.c_float(inv_t), ptr(qg), ptr(kg),
                ptr(ex), 0 if ex is None else ex.shape[1], target)
        return args, (q, k, qg, kg, ex)

    def _call(self, op, args, vectors, outs):
        for v in vectors:
            assert v is None or (v.dtype == torch.float32 and v.is_contiguous() and v.dim() == 1)
        for o in outs:
            o.fill_(float("nan"))
        work = torch.full((max(1, self.lib.emu_work(*args, _OPS[op])),), 255, dtype=torch.uint8)
        rc = getattr(self.lib, f"emu_{op}")(*args, *[ptr(v) for v in vectors],
                                            *[ptr(o) for o in outs], ptr(work))
        assert rc == 0, f"{op}: launcher returned {rc}"
        self.launches += 1
        return outs

    def masked_rowstats(self, q, k, w, m0, qg, kg, exclude, code, p, inv_t, allow_tf32=False,
                        target_blocks=0):
        args, keep = self._problem(q, k, qg, kg, exclude, code, p, inv_t, allow_tf32,
                                   target_blocks)
        return self._call("rowstats", args, (w, m0), (torch.empty(q.shape[0]),
                                                      torch.empty(q.shape[0])))

    def masked_colsum(self, q, k, m, rho, sigma, qg, kg, exclude, code, p, inv_t,
                      allow_tf32=False, target_blocks=0):
        args, keep = self._problem(q, k, qg, kg, exclude, code, p, inv_t, allow_tf32,
                                   target_blocks)
        return self._call("colsum", args, (m, rho, sigma), (torch.empty(k.shape[0]),))[0]

    def masked_rowsum(self, q, k, w, m, gamma, qg, kg, exclude, code, p, inv_t,
                      allow_tf32=False, target_blocks=0):
        args, keep = self._problem(q, k, qg, kg, exclude, code, p, inv_t, allow_tf32,
                                   target_blocks)
        return self._call("rowsum", args, (w, m, gamma), (torch.empty(q.shape[0]),))[0]

    def masked_grad(self, q, k, w, m, alpha, beta, gamma, qg, kg, exclude, code, p, inv_t,
                    allow_tf32=False, target_blocks=0):
        assert (beta is None) == (gamma is None)
        args, keep = self._problem(q, k, qg, kg, exclude, code, p, inv_t, allow_tf32,
                                   target_blocks)
        return self._call("grad", args, (w, m, alpha, beta, gamma),
                          (torch.empty(q.shape), torch.empty(k.shape)))


class EmulatedKernels(MC.CudaMaskedKernels):
    """The real kernel set with the emulated ops, on CPU tensors."""

    name = "cuda_emulated"

    def check(self, q):
        assert q.device.type == "cpu"


_KERNELS = EmulatedKernels()


@pytest.fixture
def emulated(emu_lib, monkeypatch):
    """The emulated kernel set, registered as the backend ``"cuda_emulated"`` of the public op
    for this test (its custom ops are registered once per session)."""
    _KERNELS._ops = EmulatedOps(emu_lib)
    _KERNELS.target_blocks = 0
    monkeypatch.setitem(MASKED.backends, "cuda_emulated",
                        Backend("cuda_emulated", ("cpu",),
                                lambda: masked_backends.register(_KERNELS)))
    return _KERNELS


def backend(name, **extra):
    """The public op on backend ``name`` (``extra``: more keyword arguments)."""
    return lambda **kw: masked_contrastive_loss(**kw, backend=name, **extra)


def rounded(inputs: dict, dtype) -> dict:
    """``inputs`` with the features rounded to ``dtype`` (and back to float64; weights as they
    are)."""
    return {n: t.to(dtype).double()
            if t is not None and n not in MASKED_WEIGHTS and t.is_floating_point() else t
            for n, t in inputs.items()}


def assert_close(got, want, tol, what):
    for name, t in got.items():
        assert torch.isfinite(t).all(), f"{name} not finite ({what})"
    errs = masked_errors(got, want)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors {bad} > {tol:g} ({what})"


# the four similarities, both positive modes (T = 2 with a repeated column), keys=None with and
# without include_self, self_index, groups (sorted: tile skipping; empty and single-member
# groups), key_penalty, key_weights, 64-row blocks cut (70 = 64 + 6, 130 = 2 x 64 + 2), D = 128
# and D = 130 (two gradient windows, D not a multiple of 32), CL-ICA's D = 5-10
EMU_FP32 = [
    M(70, 16, "dot", groups="random", key_penalty=True),
    M(37, 10, "sqeuclidean", n_k=130, targets=2, repeat=True, key_weights="rand",
      key_penalty=True),
    M(70, 5, "l1", include_self=True, temperature=0.2),
    M(70, 7, "lp", p=3.0, n_k=150, targets=1, self_index=True, groups="sorted",
      key_penalty=True),
    M(20, 130, "dot", n_k=33, targets=1, key_penalty=True, key_weights="rand"),
    M(33, 128, "l1", n_k=40, targets=2, key_penalty=True),
    M(40, 9, "lp", p=1.5, include_self=True, groups="single", key_penalty=True),
    M(30, 8, "sqeuclidean", n_k=70, groups="empty", key_penalty=True, temperature=0.3),
]


@pytest.mark.parametrize("case", EMU_FP32, ids=str)
def test_emulated_fp32_against_float64_reference(emulated, case, seed):
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    got = masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float32)
    assert got["loss"].dtype == torch.float32
    assert_close(got, want, FP32_TOL, f"{case}, seed {seed}")


def test_emulated_zero_weight_key_sets_no_row_shift(emulated):
    """A zero-weight key far closer than every weighted column (logit gap 1000 at tau = 0.001)
    neither sets the row shift nor turns 0 * inf into NaN (tests/test_masked_ops.py has the same
    case for the other backends)."""
    q = torch.zeros(1, 2)
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    w = torch.tensor([0.0, 1.0, 1.0])
    q.requires_grad_()
    loss = masked_contrastive_loss(q, keys, positive_index=torch.tensor([2]), key_weights=w,
                                   similarity="l1", temperature=0.001, backend="cuda_emulated")
    loss.backward()
    assert loss.item() == pytest.approx(1000.0, rel=1e-6)
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("case", [
    M(37, 8, "sqeuclidean", include_self=True, temperature=0.005, key_penalty=True),
    M(30, 6, "l1", n_k=20, targets=2, temperature=0.005, key_penalty=True),
], ids=str)
def test_emulated_extreme_temperature_is_finite_and_accurate(emulated, case, seed):
    """tau = 0.005 with distances of order one: logits of a few hundred; every output finite and
    within float32 accuracy of the reference (relative to the outputs' magnitudes; the tolerance
    of test_masked_ops.py for these temperatures: fp32 inputs alone put about 1e-3 into the
    gradients of a row whose positive holds almost all of its softmax, on every backend)."""
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    got = masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float32)
    assert_close(got, want, 1e-2, f"{case}, seed {seed}")


def test_emulated_split_stream_side_matches_unsplit(emulated, seed):
    """One own block against 4 stream tiles (and back): target 1 (no split), 3 and 64 blocks
    (partials merged by the second kernels, rowstats by the online-max merge) agree."""
    case = M(50, 12, "dot", n_k=250, targets=1, groups="random", key_penalty=True)
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    runs = []
    for target in (1, 3, 64):
        emulated.target_blocks = target
        runs.append(masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float32))
        assert_close(runs[-1], want, FP32_TOL, f"{case}, target {target}, seed {seed}")
    for other in runs[1:]:
        assert_close(other, runs[0], 2e-6, f"split vs unsplit, seed {seed}")


@pytest.mark.parametrize("dtype,floor", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)],
                         ids=str)
@pytest.mark.parametrize("case", [
    M(70, 40, "dot", n_k=90, targets=2, repeat=True, key_penalty=True, groups="random"),
    M(45, 24, "sqeuclidean", include_self=True, key_penalty=True, key_weights="rand"),
], ids=str)
def test_emulated_half_within_twice_torch_error(emulated, case, dtype, floor, seed):
    """Tensor-core tiles (the wmma stand-in): the error against the float64 truth is at most
    twice that of the torch kernel set fed the same rounded inputs, plus ``floor``."""
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    truth = masked_reference_outputs(rounded(inputs, dtype), case, up)
    base = masked_errors(masked_backend_outputs("torch", inputs, case, up, dtype), truth)
    got = masked_backend_outputs("cuda_emulated", inputs, case, up, dtype)
    assert got["loss"].dtype == torch.float32 and got["d queries"].dtype == dtype
    for name, err in masked_errors(got, truth).items():
        assert torch.isfinite(got[name]).all(), name
        assert err <= 2 * base[name] + floor, f"{name}: {err:.3e} vs torch {base[name]:.3e} " \
                                              f"({case}, {dtype}, seed {seed})"


def test_emulated_tf32_when_matmul_precision_allows(emulated, seed):
    case = M(70, 40, "sqeuclidean", n_k=80, targets=1, key_penalty=True)
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float32)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert_close(got, want, 5e-3, f"{case}, seed {seed}")


def test_emulated_deterministic_and_float64_inputs(emulated, seed):
    """Two runs are bitwise equal; float64 inputs run in float32 and come back as float64."""
    case = M(40, 6, "lp", p=2.5, n_k=70, targets=2, key_penalty=True, groups="sorted")
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    a = masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float32)
    b = masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float32)
    assert all(torch.equal(a[n], b[n]) for n in a)
    got = masked_backend_outputs("cuda_emulated", inputs, case, up, torch.float64)
    assert all(t.dtype == torch.float64 for t in got.values())
    assert_close(got, masked_reference_outputs(inputs, case, up), FP32_TOL,
                 f"float64, seed {seed}")


def test_emulated_tiles_skip_groups_that_cannot_meet(emulated, seed):
    """Keys 64..127 are in a group no query has, and their features are NaN: a kernel that visited
    their tile would turn the gradients NaN (0 * NaN in the products); skipped, every output is
    the reference's (computed with finite features there, which no output depends on)."""
    case = M(70, 16, "dot", n_k=150, targets=1, key_penalty=True)
    inputs = make_masked_inputs(case)
    kg = torch.zeros(150, dtype=torch.long)
    kg[64:128] = 5
    inputs["query_groups"], inputs["key_groups"] = torch.zeros(70, dtype=torch.long), kg
    inputs["positive_index"] = torch.cat([torch.arange(64), torch.arange(128, 150)])[
        torch.randint(0, 86, (70, 1))]
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    poisoned = dict(inputs, keys=inputs["keys"].clone())
    poisoned["keys"][64:128] = float("nan")
    got = masked_outputs_and_grads(backend("cuda_emulated", check_values=False), poisoned, case,
                                   up, torch.float32)
    assert_close(got, want, FP32_TOL, f"seed {seed}")


def test_emulated_shared_memory_fits(emu_lib):
    worst = max(emu_lib.emu_smem(ft, tf, op) for ft in (0, 1, 2) for tf in (0, 1)
                for op in range(4))
    assert 0 < worst <= 99 * 1024, worst


# ------------------------------------------------------------------ loader, registry, wrapper
def test_registry_lists_the_cuda_kernel_set():
    assert MASKED.backends["cuda"].devices == ("cuda",)
    assert masked_backends._kernel_module("cuda") is MC
    assert "cuda" in MASKED.auto_order["cuda"] and "cuda" not in MASKED.auto_order["cpu"]
    if not torch.cuda.is_available():
        assert MASKED.backends["cuda"].error   # says why


def test_kernels_say_why_they_cannot_run(monkeypatch):
    """The check shared with the env op's backend (``cuda_backend.require_cuda``; its no-device
    case: tests/test_cuda_backend.py), naming the kernel set."""
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError, match="build without CUDA; the cuda kernel set needs"):
        MC.kernels()


def test_loader_says_how_to_build_the_extension(monkeypatch):
    monkeypatch.setattr(MC, "_ops_registered", lambda: False)
    monkeypatch.setitem(sys.modules, "fastipirm._cuda", None)   # import fails as if not built
    monkeypatch.delenv("FASTIPIRM_JIT_BUILD", raising=False)
    with pytest.raises(ImportError, match=r"fastipirm\._cuda is not built.*FASTIPIRM_JIT_BUILD"):
        MC.load_extension()
    # an extension built before the masked kernels existed
    monkeypatch.setitem(sys.modules, "fastipirm._cuda", object())
    with pytest.raises(ImportError, match="without the masked_contrastive_loss kernels"):
        MC.load_extension()


def test_kernel_set_rejects_cpu_tensors():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        MC.CudaMaskedKernels().check(torch.randn(3, 4))


def test_feats_and_tf32_rules():
    kern = MC.CudaMaskedKernels()
    h = torch.randn(5, 3).half()
    f = kern.feats(h)
    assert f.dtype == torch.float32 and torch.equal(f, h.float())
    assert kern._feats(f, 0) is getattr(f, MC._KERNEL_FEATS)    # dot: the fp16 original
    assert kern._feats(f, 2).dtype == torch.float32            # l1 / lp: float32
    d = kern.feats(torch.randn(5, 3, dtype=torch.float64))
    assert d.dtype == torch.float64 and kern._feats(d, 0).dtype == torch.float32
    assert kern.stat_dtype(torch.float64) == torch.float64
    assert kern.stat_dtype(torch.bfloat16) == torch.float32
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not MC.allow_tf32(torch.float32, 0)
        torch.set_float32_matmul_precision("high")
        assert MC.allow_tf32(torch.float32, 1) and not MC.allow_tf32(torch.float32, 2)
        assert not MC.allow_tf32(torch.float16, 0) and not MC.allow_tf32(torch.float64, 0)
    finally:
        torch.set_float32_matmul_precision(saved)


# ------------------------------------------------------------------ GPU (skipped without CUDA)
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if MASKED.backends["cuda"].load() is None:
        pytest.skip(f"cuda kernel set unavailable: {MASKED.backends['cuda'].error}")


#: on CUDA: the inputs and upstream gradients (drawn on the CPU) move to the GPU
on_gpu = partial(masked_backend_outputs, device="cuda")

GPU_CASES = [
    M(1000, 128, "dot", n_k=3000, targets=2, repeat=True, key_penalty=True, groups="sorted",
      temperature=0.1),
    M(4096, 128, "dot", include_self=True, key_penalty=True, temperature=0.2),
    M(777, 10, "sqeuclidean", include_self=True, key_penalty=True, key_weights="rand"),
    M(2000, 10, "l1", include_self=True, temperature=0.2),
    M(513, 7, "lp", p=3.0, n_k=1500, targets=1, self_index=True, groups="random",
      key_penalty=True),
    # separate positives: the query whose group has no key has no positive column either
    M(300, 300, "sqeuclidean", n_k=700, key_penalty=True, groups="empty"),
    M(256, 128, "l1", n_k=4096, targets=1, key_penalty=True),
    M(1024, 8, "sqeuclidean", include_self=True, temperature=0.005, key_penalty=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 0.0), (torch.float16, 1e-3),
                                         (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_against_float64_torch_kernel_set(case, dtype, floor, seed):
    """Truth: the ``"torch"`` kernel set in float64 on the inputs rounded to ``dtype``. fp32
    (exact FMA tiles): relative error < 1e-4 (1e-3 at tau = 0.005); fp16/bf16: at most twice the
    error of the torch kernel set in ``dtype`` + floor."""
    _cuda_or_skip()
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    truth = on_gpu("torch", rounded(inputs, dtype), case, up, torch.float64)
    got = on_gpu("cuda", inputs, case, up, dtype)
    errs = masked_errors(got, truth)
    print(f"[gpu max error] cuda masked {dtype} {case}: "
          + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    if dtype == torch.float32:
        assert_close(got, truth, 1e-3 if case.temperature < 0.01 else FP32_TOL,
                     f"{case}, seed {seed}")
    else:
        base = masked_errors(on_gpu("torch", inputs, case, up, dtype), truth)
        for name, err in errs.items():
            assert torch.isfinite(got[name]).all(), name
            assert err <= 2 * base[name] + floor, f"{name}: {err:.3e} vs {base[name]:.3e}"


@pytest.mark.gpu
def test_gpu_against_literal_reference(seed):
    _cuda_or_skip()
    case = M(70, 16, "lp", p=1.5, n_k=130, targets=2, repeat=True, key_penalty=True,
             key_weights="rand", groups="random")
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    want = masked_reference_outputs(inputs, case, up)
    got = on_gpu("cuda", inputs, case, up, torch.float32)
    assert_close({n: t.cpu() for n, t in got.items()}, want, FP32_TOL, f"seed {seed}")


@pytest.mark.gpu
def test_gpu_tf32_split_and_determinism(seed):
    """TF32 within 5e-3; target_blocks 1 (no split) vs the default agree to float32 rounding;
    two runs are bitwise equal (fp32 and bf16)."""
    _cuda_or_skip()
    kern = MASKED.backends["cuda"].load().kernels
    case = M(256, 128, "dot", n_k=4096, targets=1, key_penalty=True, groups="random")
    inputs = make_masked_inputs(case)
    up = masked_upstream(case)
    truth = on_gpu("torch", inputs, case, up, torch.float64)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert_close(on_gpu("cuda", inputs, case, up, torch.float32), truth, 5e-3,
                     f"tf32, seed {seed}")
    finally:
        torch.set_float32_matmul_precision(saved)
    default = on_gpu("cuda", inputs, case, up, torch.float32)
    try:
        kern.target_blocks = 1
        unsplit = on_gpu("cuda", inputs, case, up, torch.float32)
    finally:
        kern.target_blocks = 0
    assert_close(unsplit, default, 1e-5, f"split, seed {seed}")
    for dtype in (torch.float32, torch.bfloat16):
        a = on_gpu("cuda", inputs, case, up, dtype)
        b = on_gpu("cuda", inputs, case, up, dtype)
        assert all(torch.equal(a[n], b[n]) for n in a), dtype


@pytest.mark.gpu
def test_gpu_ops_reject_bad_inputs():
    _cuda_or_skip()
    ops = torch.ops.fastipirm_cuda
    q, k = torch.randn(8, 5, device="cuda"), torch.randn(6, 5, device="cuda")
    w, m = torch.ones(6, device="cuda"), torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.masked_rowstats(torch.randn(5, 8, device="cuda").t(), k, w, m, None, None, None, 0,
                            0.0, 2.0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.masked_rowstats(q, k, w.double(), m, None, None, None, 0, 0.0, 2.0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.masked_rowstats(q.double(), k.double(), w, m, None, None, None, 0, 0.0, 2.0)
    with pytest.raises(RuntimeError, match="both qg and kg"):
        ops.masked_rowstats(q, k, w, m, torch.zeros(8, dtype=torch.long, device="cuda"), None,
                            None, 0, 0.0, 2.0)
    with pytest.raises(RuntimeError, match="p >= 1"):
        ops.masked_rowstats(q, k, w, m, None, None, None, 3, 0.5, 2.0)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ops.masked_rowstats(q.cpu(), k.cpu(), w, m, None, None, None, 0, 0.0, 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("code,p", [(0, 0.0), (1, 2.0), (3, 1.5)])
def test_gpu_opcheck_custom_op(code, p):
    """The custom op around the kernel set (schema, fake tensors, autograd registration)."""
    _cuda_or_skip()
    impl = MASKED.backends["cuda"].load()
    q = torch.randn(9, 5, device="cuda", requires_grad=True)
    k = torch.randn(11, 5, device="cuda", requires_grad=True)
    idx = torch.randint(0, 11, (9, 2), device="cuda")
    tw = torch.full((9, 2), 0.5, device="cuda")
    groups = torch.zeros(11, dtype=torch.long, device="cuda")
    w = (torch.rand(11, device="cuda") + 0.5).requires_grad_()
    c = torch.full((9,), 1.0 / 9, device="cuda")
    args = (q, k, None, idx, tw, groups[:9], groups, None, w, c, code, p, 0.5, False, True)
    torch.library.opcheck(impl.forward_op, args)


@pytest.mark.gpu
def test_gpu_training_step_compiles_fullgraph(seed):
    """The op (a custom op around the kernels) inside a fullgraph-compiled step: values and
    gradients as in eager mode."""
    _cuda_or_skip()
    q = torch.randn(300, 64, device="cuda", requires_grad=True)
    k = torch.randn(498, 64, device="cuda", requires_grad=True)
    groups = torch.arange(498, device="cuda") % 3
    first = torch.randint(0, 498, (300,), device="cuda")
    second = (first + 3 * torch.randint(1, 100, (300,), device="cuda")) % 498   # same group
    idx = torch.stack([first, second], 1)
    tw = torch.tensor([0.7, 0.3], device="cuda")
    qg = groups[first]
    c = 1.0 / (qg[:, None] == qg[None, :]).sum(1).float()

    def step(q, k):
        loss, g = masked_contrastive_loss(
            torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1),
            positive_index=idx, positive_weight=tw, query_groups=qg, key_groups=groups,
            penalty_row_weights=c, temperature=0.2, key_penalty=True, backend="cuda",
            check_values=False)
        return loss + (g * g).sum()

    eager = step(q, k)
    (ge,) = torch.autograd.grad(eager, [q])
    out = torch.compile(step, fullgraph=True)(q, k)
    (gc,) = torch.autograd.grad(out, [q])
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gc, ge, rtol=1e-4, atol=1e-6)
