"""How the compiled extensions are built and loaded: sources, compiler flags, the loader.

One description per extension (:data:`CPU_EXTENSION`, :data:`CUDA_EXTENSION`) serves ``setup.py``
(the ahead-of-time build of ``pip install``), the JIT build of ``FASTIPIRM_JIT_BUILD=1`` and the
loader of the backends (:func:`import_extension`). Standard library only at module level:
``setup.py`` loads this file by its path, before the package (or even torch) is importable, so it
must not import the package, torch or anything relative.

Environment variables: ``FASTIPIRM_PORTABLE=1`` drops ``-march=native`` from the CPU flags (for a
binary that moves between machines); ``FASTIPIRM_JIT_BUILD=1`` compiles a missing extension on
first use with ``torch.utils.cpp_extension.load``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# the repository root (the sources in csrc/ exist in a checkout, not in an installed wheel)
ROOT = Path(__file__).resolve().parents[2]

# nvcc flags of the CUDA kernels: sm_80 (A100) and sm_90 (H100/H200) machine code; no PTX (an
# unknown GPU gets a clear error at launch rather than a slow JIT). No --use_fast_math: the
# exponentials are already exp2f (one MUFU.EX2) on pre-scaled arguments, and fast math would only
# add denormal flushing and approximate division / square root for no measurable gain. No -std:
# torch's build helper picks the C++ standard its headers need.
CUDA_NVCC_FLAGS = ["-O3", "-gencode", "arch=compute_80,code=sm_80",
                   "-gencode", "arch=compute_90,code=sm_90", "-lineinfo"]
CUDA_CXX_FLAGS = ["-O3"]
OPENMP_LINK_FLAGS = ["-fopenmp"]


def cpu_compile_flags() -> list[str]:
    """Compiler flags of the CPU kernel (``FASTIPIRM_PORTABLE=1`` drops ``-march=native``)."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("FASTIPIRM_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


@dataclass(frozen=True)
class ExtensionSpec:
    """One compiled extension: its module, sources (relative to the repository root) and flags."""

    module: str                  # the importable module the build produces
    jit_name: str                # the module name of the JIT build
    sources: tuple[str, ...]
    cuda: bool
    what: str                    # for messages
    install_hint: str            # how to get it built, for the ImportError
    depends: tuple[str, ...] = ()  # headers the sources include (a change rebuilds; in the sdist)

    def compile_args(self) -> dict[str, list[str]]:
        """``extra_compile_args`` of the setuptools extension."""
        if self.cuda:
            return {"cxx": list(CUDA_CXX_FLAGS), "nvcc": list(CUDA_NVCC_FLAGS)}
        return {"cxx": cpu_compile_flags()}

    def link_args(self) -> list[str]:
        """``extra_link_args`` of the setuptools extension."""
        return [] if self.cuda else list(OPENMP_LINK_FLAGS)


_BUILD = "`pip install --no-build-isolation -e .`"
_JIT = "set FASTIPIRM_JIT_BUILD=1 to compile it on first use"

CPU_EXTENSION = ExtensionSpec(
    "fastipirm._C", "fastipirm_cpu_ext",
    ("csrc/env_contrastive_cpu.cpp", "csrc/masked_contrastive_cpu.cpp"), cuda=False,
    what="the C++ extension", install_hint=f"install with {_BUILD}, or {_JIT}",
    depends=("csrc/cpu_simd_gemm.h",))
CUDA_EXTENSION = ExtensionSpec(
    "fastipirm._cuda", "fastipirm_cuda_ext",
    ("csrc/env_contrastive_cuda.cpp", "csrc/env_contrastive_cuda_kernels.cu",
     "csrc/masked_contrastive_cuda.cpp", "csrc/masked_contrastive_cuda_kernels.cu"), cuda=True,
    what="the CUDA extension",
    install_hint=f"install with {_BUILD} on a machine with a CUDA build of torch and nvcc "
                 f"(FASTIPIRM_CUDA=1 forces the CUDA build), or {_JIT}",
    depends=("csrc/cuda_common.cuh",))


def jit_build(ext: ExtensionSpec):
    """Compile and load ``ext`` from the checkout's sources with ``torch.utils.cpp_extension``."""
    from torch.utils.cpp_extension import load

    sources = [str(ROOT / s) for s in ext.sources]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise ImportError(f"cannot JIT-build {ext.what}: sources missing: {missing}")
    args = ext.compile_args()
    return load(name=ext.jit_name, sources=sources, extra_cflags=args["cxx"],
                extra_cuda_cflags=args.get("nvcc"), extra_ldflags=ext.link_args(),
                extra_include_paths=[str(ROOT / "csrc")], verbose=False)


def import_extension(ext: ExtensionSpec, can_jit_build: Callable[[], bool] = lambda: True):
    """Import ``ext`` (which registers its ``torch.ops`` namespace); when it is not built, JIT-build
    it if ``FASTIPIRM_JIT_BUILD=1`` and ``can_jit_build()``, else raise ImportError saying how to
    build it."""
    try:
        importlib.import_module(ext.module)
    except ImportError as exc:
        if os.environ.get("FASTIPIRM_JIT_BUILD", "0") == "1" and can_jit_build():
            jit_build(ext)
        else:
            raise ImportError(f"{ext.what} {ext.module} is not built ({exc}): "
                              f"{ext.install_hint}") from exc
