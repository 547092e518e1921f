"""The benchmarks, shipped with the package so they run on the deployment host: `v2grt bench NAME`.

Each ``bench_NAME`` module here is one benchmark with ``main(argv) -> int``; it prints a table, or one JSON
object with ``--json``, and has ``--smoke`` (a tiny size, a few seconds: structure, not timing). ``_common``
holds what they share; ``e2e_PROTOCOL`` and ``gateway_PROTOCOL`` are the per-protocol rigs that
``v2grt bench e2e --protocol`` and ``v2grt bench gateway --protocol`` hand over to. Benchmarks measure; no test
asserts a latency.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

PREFIX = "bench_"


def names() -> list[str]:
    """The benchmarks in this package, by NAME (module bench_NAME), found by importlib, not by a path."""
    return sorted(m.name[len(PREFIX):] for m in pkgutil.iter_modules(__path__) if m.name.startswith(PREFIX))


def load(name: str) -> ModuleType:
    """The module of benchmark NAME; KeyError naming the known ones when there is none."""
    if name not in names():
        raise KeyError(f"no benchmark {name!r}; expected one of {names()}")
    return importlib.import_module(f"{__name__}.{PREFIX}{name}")
