"""Build script. Metadata lives in pyproject.toml.

The C++/CUDA extension of ``csrc/`` is added here by the build logic of issue 5; until then the
package is pure Python (the Triton kernels in ``kernels/`` are JIT-compiled at run time).
"""
from setuptools import setup

setup()
