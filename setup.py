"""Build the Cython hot path (v2grt._core) against numpy's headers.

-O3 only: no -march=native, so a wheel built here runs on any x86-64 the service is deployed to.
"""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "v2grt._core",
        ["v2grt/_core.pyx"],
        include_dirs=[np.get_include()],
        # -fno-trapping-math: the kernel never reads FP exception flags, and without this GCC will not
        # if-convert (and so not vectorise) loops whose selects compare doubles. Results are unchanged
        # (IEEE rounding as before). -ffp-contract=off: never fuse a*b+c into an FMA, so a build for a
        # CPU with FMA rounds exactly like the NumPy twin.
        extra_compile_args=["-O3", "-fno-trapping-math", "-ffp-contract=off"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
