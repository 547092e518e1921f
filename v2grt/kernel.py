"""Which kernel runs: the compiled one by default, the NumPy twin only when asked, never by accident.

The compiled kernel exists in two builds of one source (setup.py): v2grt._core for any CPU and
v2grt._core_avx2 for CPUs with AVX2, whose block arithmetic runs twice as wide. The AVX2 build is
chosen where the CPU has AVX2 (numpy's runtime detection, which also checks the OS saves the
registers); $V2GRT_KERNEL_ISA=baseline pins the portable build, e.g. to compare the two.
"""

from __future__ import annotations

import importlib
import logging
import os

log = logging.getLogger("v2grt.kernel")

BACKENDS = ("cython", "reference")
ENV_VAR = "V2GRT_BACKEND"
ISA_ENV_VAR = "V2GRT_KERNEL_ISA"
ISAS = ("baseline", "avx2")  # worst to best
_ISA_MODULES = {"baseline": "v2grt._core", "avx2": "v2grt._core_avx2"}

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


def cpu_supports(isa: str) -> bool:
    """Whether this CPU (and OS) runs code built for `isa`."""
    if isa == "baseline":
        return True
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:  # numpy 1.x
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:  # numpy moved its private table: play safe, run the portable build
            log.warning("cannot read numpy's CPU features: running the portable kernel build")
            return False
    return bool(__cpu_features__.get(isa.upper(), False))


def available_isas() -> list[str]:
    """The compiled builds that are installed and that this CPU runs, worst to best."""
    found, digest = [], None
    for isa in ISAS:
        if not cpu_supports(isa):
            continue
        try:
            module = importlib.import_module(_ISA_MODULES[isa])
        except ImportError as exc:
            if isa != "baseline":  # a CPU that could run it but the build is missing or broken: say so
                log.warning("kernel build %s not usable (%s): running a more portable one", isa, exc)
            continue
        if digest is not None and module.SOURCE_DIGEST != digest:
            log.warning("kernel build %s was built from another source (%s) than the baseline build (%s): "
                        "not using it; rebuild with `pip install -e .`", isa, module.SOURCE_DIGEST, digest)
            continue
        digest = digest or module.SOURCE_DIGEST
        found.append(isa)
    return found


def compiled(isa: str | None = None):
    """The compiled kernel module for `isa` (None: $V2GRT_KERNEL_ISA, else the best this CPU runs)."""
    wanted = isa or os.environ.get(ISA_ENV_VAR, "") or None
    if wanted is not None and wanted not in ISAS:
        raise ValueError(f"kernel ISA {wanted!r}: expected one of {list(ISAS)}")
    try:
        importlib.import_module(_ISA_MODULES["baseline"])
    except ImportError as exc:
        raise ImportError(BUILD_HINT) from exc
    usable = available_isas()
    if wanted is not None:
        if wanted not in usable:
            why = ("this CPU lacks it" if not cpu_supports(wanted)
                   else "that build is missing, broken or from another source (the log says which)")
            raise ValueError(f"kernel ISA {wanted!r} requested but {why}; available: {usable}")
        return importlib.import_module(_ISA_MODULES[wanted])
    return importlib.import_module(_ISA_MODULES[usable[-1]])


def get_backend(name: str | None = None):
    """The kernel module for a backend name (None: the default). Fails loudly if _core is missing."""
    name = default_backend() if name is None else name
    if name == "cython":
        return compiled()
    if name == "reference":
        from v2grt import reference

        return reference
    raise ValueError(f"backend={name!r}: expected one of {list(BACKENDS)}")
