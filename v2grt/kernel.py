"""Which kernel runs: the compiled one by default, the NumPy twin only when asked, never by accident."""

from __future__ import annotations

import os

BACKENDS = ("cython", "reference")
ENV_VAR = "V2GRT_BACKEND"

BUILD_HINT = (
    "v2grt's compiled kernel (v2grt._core) is not built. Build it with `pip install -e .` (or "
    "`python setup.py build_ext --inplace`) from the source checkout; this needs a C compiler, Cython "
    "and numpy. To run the slow NumPy twin on purpose, set V2GRT_BACKEND=reference."
)


def default_backend() -> str:
    """The backend named by $V2GRT_BACKEND, else "cython"."""
    name = os.environ.get(ENV_VAR, "cython") or "cython"
    if name not in BACKENDS:
        raise ValueError(f"${ENV_VAR}={name!r}: expected one of {list(BACKENDS)}")
    return name


def get_backend(name: str | None = None):
    """The kernel module for a backend name (None: the default). Fails loudly if _core is missing."""
    name = default_backend() if name is None else name
    if name == "cython":
        try:
            from v2grt import _core
        except ImportError as exc:
            raise ImportError(BUILD_HINT) from exc
        return _core
    if name == "reference":
        from v2grt import reference

        return reference
    raise ValueError(f"backend={name!r}: expected one of {list(BACKENDS)}")
