"""Build the Cython hot path against numpy's headers: the kernel twice, for any x86-64 and for AVX2.

No -march=native: a wheel built here runs on any CPU of its architecture. The kernel's source
(v2grt/_kernel.pxi) is compiled as v2grt._core with the baseline instruction set and, on x86-64, again
as v2grt._core_avx2 with -mavx2; v2grt.kernel imports the AVX2 build only where the CPU has AVX2
(numpy's runtime CPU detection), as numpy does for its own loops.
"""
import hashlib
import platform
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# -fno-trapping-math: the kernel never reads FP exception flags, and without this GCC will not
# if-convert (and so not vectorise) loops whose selects compare doubles. Results are unchanged
# (IEEE rounding as before). -ffp-contract=off: never fuse a*b+c into an FMA, so every build rounds
# exactly like the NumPy twin (and like each other).
COMMON_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=off"]
# The kernel's passes (_availability, _allocate, _fill_above) are each called once: inlined into their
# caller, GCC 12 stopped vectorising _fill_above and the setpoints' sum (their restrict pointers no longer
# separate them from the caller's memoryviews) whenever an edit elsewhere tipped its inlining, and the 1M
# kernel lost ~1.5 ms. Kept apart, each is compiled on its own, as written.
KERNEL_FLAGS = ["-fno-inline-functions-called-once"]


# Both builds carry a digest of the kernel's source (v2grt.kernel refuses a build whose digest is not
# the baseline's: a leftover module from another version would otherwise run other rules).
KERNEL_DIGEST = hashlib.sha256(Path(__file__).with_name("v2grt").joinpath("_kernel.pxi").read_bytes()).hexdigest()[:16]


def kernel_extension(name: str, pyx: str, isa_flags: list[str]) -> Extension:
    return Extension(
        name,
        [pyx],
        include_dirs=[np.get_include()],
        extra_compile_args=COMMON_FLAGS + KERNEL_FLAGS + isa_flags,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("V2GRT_KERNEL_DIGEST", f'"{KERNEL_DIGEST}"')],
        depends=["v2grt/_kernel.pxi"],
    )


extensions = [kernel_extension("v2grt._core", "v2grt/_core.pyx", [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    extensions.append(kernel_extension("v2grt._core_avx2", "v2grt/_core_avx2.pyx", ["-mavx2"]))
# The setpoint frames' fill and send (v2grt.io.wire.SetpointFrames, the publisher thread): no libzmq at link
# time; it calls the zmq_send of pyzmq's own libzmq through an address resolved at run time.
extensions.append(Extension("v2grt.io._frames", ["v2grt/io/_frames.pyx"], extra_compile_args=COMMON_FLAGS))

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
