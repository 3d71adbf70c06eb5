"""Host emulation of the CUDA runtime: CUDA kernel files run on a CPU, for the tests.

Shared by the tests of the CUDA kernels (tests/test_cuda_backend.py, tests/test_masked_cuda.py).
A kernel translation unit (no torch headers) is compiled by g++ against the small stand-in
headers of :data:`HEADERS` (``cuda_runtime.h``, ``cuda_fp16.h``, ``cuda_bf16.h``, ``mma.h``):

* one ``std::thread`` per CUDA thread and a ``std::barrier`` per block (``__syncthreads``), the
  blocks of a launch run one after the other; ``threadIdx`` / ``blockIdx`` are thread-local;
* the dynamic shared memory is one static buffer, poisoned with NaNs before every block (reading
  an element no thread wrote gives NaN); a launch with more than 99 KB of it or another block
  size than 256 sets an error flag;
* ``__half`` is ``_Float16``, ``__nv_bfloat16`` a round-to-nearest-even 16-bit struct;
* ``nvcuda::wmma``: every lane of a warp holds and computes the whole fragment (its documented
  semantics: ``load_matrix_sync`` by layout, ``mma_sync`` in fp32, ``store_matrix_sync`` by lane
  0), ``__float_to_tf32`` rounds to 10 mantissa bits.

:func:`emulation_source` rewrites the two device-only constructs of a kernel file (the
``extern __shared__`` declarations and the ``k<<<...>>>(`` launches; the csrc/ headers it includes,
such as csrc/cuda_common.cuh, must have neither and compile unchanged), :func:`build_library`
compiles it with a C harness into a ``ctypes`` library. The compile checks of the same tests
(:func:`nvcc_compile_check`, :func:`bindings_syntax_check`) share the helpers :func:`nvcc`,
:func:`cuda_include` and :data:`NVCC_HALF_FLAGS`. What
the emulation checks: indexing, masks, shifts, windows, splits and barriers (a missing barrier
shows up as NaN reads of the poisoned shared memory or as a wrong value); what it does not
check: the hardware's wmma fragment layouts, timing, races between warps of one block.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from fastipirm.ops.build import CUDA_NVCC_FLAGS

ROOT = Path(__file__).resolve().parents[1]

#: the restrictions torch's extension builder adds to nvcc (no implicit half/bfloat16
#: conversions), for the ``nvcc -c`` compile checks
NVCC_HALF_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

#: the feature type codes of the kernels' launchers
FEAT_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def nvcc():
    """The nvcc on PATH, or None."""
    return shutil.which("nvcc")


def cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime_api.h), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = nvcc()
    if found:
        cands.append(str(Path(os.path.realpath(found)).parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return str(Path(c) / "include")
    return None


def nvcc_compile_check(kernel_file: Path, out: Path, extra=()) -> None:
    """``nvcc -c`` of a kernel translation unit (no torch headers in it) into ``out`` with the
    extension's flags (sm_80 + sm_90 machine code, fastipirm/ops/build.py), torch's half-type
    restrictions and ``extra``; any warning fails. Skips without nvcc."""
    found = nvcc()
    if found is None:
        pytest.skip("nvcc is not on PATH")
    cmd = [found, "-c", str(kernel_file), "-o", str(out), "-std=c++17", *CUDA_NVCC_FLAGS,
           *NVCC_HALF_FLAGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
    assert out.stat().st_size > 0


def bindings_syntax_check(bindings: Path, own: str, warnings=("-Wall",)) -> None:
    """``g++ -fsyntax-only`` of torch bindings against the installed torch's headers (schemas,
    checks, guards, stream: catches C++ errors without a CUDA build of torch; linking needs
    libc10_cuda, not attempted), with the warning flags ``warnings``: no warning may point into a
    file whose name contains ``own``. Skips without g++, the CUDA toolkit headers or torch's
    c10/cuda headers."""
    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc = cuda_include()
    if cxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_runtime_api.h)")
    tinc = include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").exists() for p in tinc):
        pytest.skip("this torch installation ships no c10/cuda headers")
    # a CPU build of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h (it only defines
    # the shared-library export switch, irrelevant to a syntax check)
    cmd = [cxx, "-fsyntax-only", "-std=c++20", *warnings, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-DTORCH_EXTENSION_NAME=_cuda", *[f"-I{p}" for p in tinc], f"-I{cuda_inc}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}", str(bindings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mine = [ln for ln in proc.stderr.splitlines() if own in ln and "warning" in ln]
    assert not mine, "\n".join(mine)


def ptr(t):
    """A ``ctypes`` pointer to ``t``'s data (null for None or an empty tensor)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


#: the stand-in CUDA headers, by file name
HEADERS = {
    "cuda_runtime.h": r"""
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) alignas(n)
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;
constexpr int cudaErrorInvalidValue = 1;
constexpr int cudaFuncAttributeMaxDynamicSharedMemorySize = 8;
template <typename K> inline int cudaFuncSetAttribute(K, int, int) { return 0; }
inline int cudaGetLastError() { return 0; }
inline int min(int a, int b) { return a < b ? a : b; }
using std::exp2f; using std::fmaf; using std::fmaxf;
namespace emu {
inline std::barrier<>* g_bar = nullptr;
alignas(1024) inline unsigned char g_smem[160 * 1024];
inline int g_error = 0;
inline unsigned char* smem() { return g_smem; }
template <typename K, typename... A>
void launch(K kernel, int grid, int block, size_t smem_bytes, cudaStream_t, A... args) {
  if (smem_bytes > 99 * 1024 || block != 256) { g_error = 1; return; }
  for (int b = 0; b < grid; ++b) {
    const uint32_t nan = 0x7fc00000u;  // poison: reading an unwritten element gives NaN
    for (size_t i = 0; i < sizeof(g_smem) / 4; ++i) memcpy(g_smem + 4 * i, &nan, 4);
    std::barrier<> bar(block);
    g_bar = &bar;
    std::vector<std::thread> ts;
    for (int t = 0; t < block; ++t)
      ts.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = b; kernel(args...); });
    for (auto& th : ts) th.join();
  }
}
}  // namespace emu
inline void __syncthreads() { emu::g_bar->arrive_and_wait(); }
""",
    "cuda_runtime_api.h": '#pragma once\n#include "cuda_runtime.h"\n',
    "cuda_fp16.h": r"""
#pragma once
#include "cuda_runtime.h"
typedef _Float16 __half;
typedef __half half;
inline __half __float2half(float x) { return (__half)x; }
inline float __half2float(__half x) { return (float)x; }
""",
    "cuda_bf16.h": r"""
#pragma once
#include "cuda_runtime.h"
struct __nv_bfloat16 {
  uint16_t bits;
  operator float() const {
    uint32_t u = uint32_t(bits) << 16; float f; memcpy(&f, &u, 4); return f; }
};
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1);
  __nv_bfloat16 b; b.bits = uint16_t(u >> 16); return b; }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
""",
    "mma.h": r"""
#pragma once
#include "cuda_runtime.h"
#include "cuda_fp16.h"
#include "cuda_bf16.h"
// every lane of a warp holds (and computes) the whole matrix; lane 0 stores it
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <typename U> struct elem { using type = U; };
template <> struct elem<precision::tf32> { using type = float; };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int C = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = R * C;
  typename elem<T>::type x[R * C];  // x[r * C + c]
};
inline float __float_to_tf32(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) { u += 0x1000u; u &= 0xffffe000u; }
  float g; memcpy(&g, &u, 4); return g;
}
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c)
      f.x[r * F::C + c] = std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, T v) { for (auto& e : f.x) e = v; }
template <int M, int N, int K, typename TA, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += float(a.x[i * K + k]) * float(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  memcpy(d.x, out, sizeof(out));
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}
}}  // namespace nvcuda::wmma
""",
}


def emulation_source(kernel_file: Path, decls: int, launches: int, owner: str) -> str:
    """The kernel file with its two device-only constructs rewritten for the host emulation: each
    of the ``decls`` declarations ``extern __shared__ __align__(128) unsigned char smem[];`` and
    each of the ``launches`` launches ``k<<<...>>>(`` (``<<<...>>>(`` on one line). A different
    count fails the test: update ``owner`` (the test file) with the kernel file. The headers it
    includes by ``#include "..."`` (csrc/cuda_common.cuh) are compiled as they are (found through
    ``-I csrc``), so they must have neither construct (outside comments); one that has fails."""
    src = kernel_file.read_text()
    for name in re.findall(r'^#include "([^"]+)"', src, flags=re.M):
        header = kernel_file.parent / name
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", header.read_text(), flags=re.S) \
            if header.exists() else ""
        if "extern __shared__" in code or "<<<" in code:
            pytest.fail(f"{header} (included by {kernel_file.name}) declares shared memory or "
                        "launches a kernel: the emulation rewrites those in kernel files only")
    decl = "extern __shared__ __align__(128) unsigned char smem[];"
    if src.count(decl) != decls:
        pytest.fail(f"the emulation expects the {decls} kernels to declare `{decl}`; update "
                    f"{owner} with the kernel file")
    src = src.replace(decl, "unsigned char* smem = emu::smem();")
    src, n = re.subn(r"(\w+)<<<(.*?)>>>\(", r"emu::launch(\1, \2, ", src)
    if n != launches:
        pytest.fail(f"the emulation expects {launches} kernel launches `k<<<...>>>(` on one line, "
                    f"found {n}; update {owner} with the kernel file")
    return src


def build_library(d: Path, source: str, harness: str) -> ctypes.CDLL:
    """Compile the rewritten kernel ``source`` (as ``kernels_emu.cpp``, which ``harness``
    includes) with the stand-in headers in the directory ``d``; skips the test when g++ (C++20,
    ``<barrier>``, ``_Float16``) is missing."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ (C++20, <barrier>) for the host emulation of the CUDA kernels")
    (d / "include").mkdir(exist_ok=True)
    for name, text in HEADERS.items():
        (d / "include" / name).write_text(text)
    (d / "kernels_emu.cpp").write_text(source)
    (d / "harness.cpp").write_text(harness)
    so = d / "libemu.so"
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                           f"-I{d / 'include'}", f"-I{ROOT / 'csrc'}", "-o", str(so),
                           str(d / "harness.cpp")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("barrier" in proc.stderr and "No such file" in proc.stderr
                                 or "_Float16" in proc.stderr):
        pytest.skip("this g++ lacks <barrier> or _Float16: " + proc.stderr[-500:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(so))
