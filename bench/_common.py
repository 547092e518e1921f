"""Shared pieces of the benchmarks: percentiles, the machine description, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np


def stats_ms(samples_ns) -> dict:
    """Median, tails and max of a list of durations in ns, as milliseconds."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "p999_ms": float(np.percentile(a, 99.9)),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
    }


def machine() -> dict:
    """What the numbers were measured on (a shared 2-core box drifts: compare within one run)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def emit(result: dict, as_json: bool, render) -> None:
    """Print one JSON object, or the human table made by render(result)."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (no dependency): numbers right-aligned."""
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)
