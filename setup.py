"""Build script; metadata lives in pyproject.toml.

Packages: ``fastipirm`` and its subpackages, and the repository's top-level ``kernels/`` folder
(the Triton kernels) installed inside the package as ``fastipirm.kernels``; nothing else becomes
importable (no top-level ``kernels``, ``bench`` or ``tests``), in a wheel and in an editable
install alike (the mapping makes setuptools use an import finder there, not a path entry for the
repository root).

Builds what the machine can (the flash-attention pattern), with the sources and compiler flags of
``fastipirm/ops/build.py`` (which the JIT build of the backends uses too; loaded here by its
path, since the package is not importable before it is installed):

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
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_fastipirm_build",
                                                  HERE / "fastipirm" / "ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # (dataclasses look their module up while it executes)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


def _packages():
    """``(packages, package_dir)``: fastipirm's packages, ``kernels/`` as ``fastipirm.kernels``."""
    packages = find_packages(where=str(HERE), include=["fastipirm", "fastipirm.*"])
    packages += ["fastipirm.kernels" + (f".{sub}" if sub else "")
                 for sub in ["", *find_packages(where=str(HERE / "kernels"))]]
    return packages, {"fastipirm.kernels": "kernels"}


def _extension(kind, ext):
    return kind(ext.module, list(ext.sources), depends=list(ext.depends),
                extra_compile_args=ext.compile_args(), extra_link_args=ext.link_args())


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
    cpu = _extension(CppExtension, build.CPU_EXTENSION)
    return [cpu] + _cuda_extensions(), {"build_ext": BuildExtension}


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
    return [_extension(CUDAExtension, build.CUDA_EXTENSION)]


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
