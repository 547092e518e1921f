# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The dispatch kernel compiled for AVX2 (setup.py: -mavx2): the same source as v2grt._core.

Its block arithmetic runs eight floats per instruction instead of four. v2grt.kernel imports it only
on a CPU that has AVX2; results are bit-identical to v2grt._core's (no FMA contraction in either).
"""

include "_kernel.pxi"

ISA = "avx2"
