"""Build script; metadata lives in pyproject.toml.

Builds what the machine can (the flash-attention pattern):

* the C++ CPU extension ``fastipirm._C`` (``csrc/*.cpp``) whenever torch is importable at build
  time, which is why the documented install is ``pip install --no-build-isolation -e .`` after
  torch;
* ``FASTIPIRM_NO_EXT=1`` skips it (the package then runs on the torch and Triton backends, and
  ``fastipirm info`` says the extension is missing);
* ``FASTIPIRM_PORTABLE=1`` drops ``-march=native`` (for a binary that moves between machines);
* the CUDA extension ``fastipirm._cuda`` (``csrc/env_contrastive_cuda.cpp`` +
  ``csrc/env_contrastive_cuda_kernels.cu``, backend ``"cuda"``) when torch is a CUDA build and
  ``nvcc`` is found (``CUDA_HOME``), or when ``FASTIPIRM_CUDA=1`` forces it; ``FASTIPIRM_CUDA=0``
  skips it. Machine code for sm_80 and sm_90. Otherwise it is skipped with the reason printed.
"""
import os

from setuptools import setup


def _extensions():
    if os.environ.get("FASTIPIRM_NO_EXT", "0") == "1":
        print("fastipirm: FASTIPIRM_NO_EXT=1, building without the C++ extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastipirm: torch is not importable at build time; building without the C++ "
              "extension (install torch first and use `pip install --no-build-isolation -e .`)")
        return [], {}
    cflags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("FASTIPIRM_PORTABLE", "0") != "1":
        cflags.append("-march=native")
    cpu = CppExtension("fastipirm._C", ["csrc/env_contrastive_cpu.cpp"],
                       extra_compile_args={"cxx": cflags}, extra_link_args=["-fopenmp"])
    return [cpu] + _cuda_extensions(), {"build_ext": BuildExtension}


# nvcc flags of the CUDA kernels (kept equal to fastipirm/ops/cuda_backend.py NVCC_FLAGS, used by
# the JIT build). No --use_fast_math: the exponentials are already exp2f on pre-scaled arguments
# (one MUFU.EX2), and fast math would only add denormal flushing and approximate division for no
# measurable gain. No -std: torch's build helper picks the C++ standard its headers need.
CUDA_NVCC_FLAGS = ["-O3", "-gencode", "arch=compute_80,code=sm_80",
                   "-gencode", "arch=compute_90,code=sm_90", "-lineinfo"]


def _cuda_extensions():
    flag = os.environ.get("FASTIPIRM_CUDA", "").strip()
    if flag == "0":
        print("fastipirm: FASTIPIRM_CUDA=0, building without the CUDA extension")
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    if flag != "1":
        if torch.version.cuda is None:
            print(f"fastipirm: torch {torch.__version__} has no CUDA; building without the CUDA "
                  "extension (backend 'cuda'; FASTIPIRM_CUDA=1 forces it)")
            return []
        if CUDA_HOME is None:
            print("fastipirm: nvcc / CUDA_HOME not found; building without the CUDA extension "
                  "(backend 'cuda'; set CUDA_HOME, or FASTIPIRM_CUDA=1 forces it)")
            return []
    print("fastipirm: building the CUDA extension fastipirm._cuda (sm_80, sm_90)")
    return [CUDAExtension("fastipirm._cuda", ["csrc/env_contrastive_cuda.cpp",
                                              "csrc/env_contrastive_cuda_kernels.cu"],
                          extra_compile_args={"cxx": ["-O3"], "nvcc": CUDA_NVCC_FLAGS})]


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
