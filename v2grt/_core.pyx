# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The dispatch kernel, compiled: availability, ranking, allocation and ramp limits in O(N), without the GIL.

Same names and docstrings as v2grt.reference, which is its specification. The ranking uses a
histogram of quantised scores instead of a sort (a million-key argsort is ~90 ms here), and falls back
to an O(N) counting sort only in cycles where a site limit binds.
"""

# The whole kernel lives in _kernel.pxi, shared with the AVX2 build (v2grt/_core_avx2.pyx).
include "_kernel.pxi"

ISA = "baseline"
