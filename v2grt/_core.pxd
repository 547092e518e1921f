# Inline helpers of the dispatch kernel, shared with any other Cython module that needs them.

cdef inline double _taper(double x, double inv_band) noexcept nogil:
    """0 at x <= 0, rising linearly to 1 at x >= band (a step at 0 when band is 0, inv_band 0).
    Selects, not branches, so loops that call it still vectorise."""
    cdef double y = x * inv_band
    y = 0.0 if y < 0.0 else y
    y = 1.0 if y > 1.0 else y
    cdef double step = 1.0 if x > 0.0 else 0.0
    return y if inv_band > 0.0 else step


cdef inline double _min(double a, double b) noexcept nogil:
    return a if a < b else b


cdef inline double _max(double a, double b) noexcept nogil:
    return a if a > b else b
