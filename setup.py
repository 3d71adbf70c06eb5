"""Build script; metadata lives in pyproject.toml.

Builds what the machine can (the flash-attention pattern):

* the C++ CPU extension ``fastipirm._C`` (``csrc/*.cpp``) whenever torch is importable at build
  time, which is why the documented install is ``pip install --no-build-isolation -e .`` after
  torch;
* ``FASTIPIRM_NO_EXT=1`` skips it (the package then runs on the torch and Triton backends, and
  ``fastipirm info`` says the extension is missing);
* ``FASTIPIRM_PORTABLE=1`` drops ``-march=native`` (for a binary that moves between machines).
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
    return [cpu], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
