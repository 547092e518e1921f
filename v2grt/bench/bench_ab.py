"""A/B: one benchmark run from two or more source trees in turn, so their ratio is measured side by side.

    v2grt bench ab --tree old=../v2grt-old --tree new=. [--rounds 3] [--chrt 50] [--metric GLOB ...] \\
        -- kernel --sizes 100000,1000000

On a shared or drifting host (a cloud VM, a CI runner) absolute timings move from one hour to the next by
more than a change is worth, so a speed-up is only shown by running the old and the new code alternately,
under the same load, and taking the ratio per round. For each round, each tree in the order given runs
``python -m v2grt.cli bench NAME ARGS --json`` in a child process with the tree first on PYTHONPATH (so the
child imports that tree's v2grt, its compiled extensions included: build them there first), optionally under
``chrt -f PRIO``; the load average is read before each run. A tree given as ``-`` is this interpreter's
installed v2grt.

Every number in the child's JSON is a metric, named by its path (``results[nodes=1000000].cython.p50_ms``:
list items are named by their ``nodes``/``name``/``label``/``protocol`` field when they have one, else by
index). ``--metric`` globs select them (default ``*p50_ms`` and ``*p99_ms``). The table shows, per metric, each
tree's median over the rounds with its range, and the first tree's median over each other tree's
(``x`` above 1: that tree is faster/smaller). ``--json`` also keeps every round's raw value and load.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from v2grt.bench._common import add_smoke_option, apply_smoke, emit, machine, table

DEFAULT_METRICS = ("*p50_ms", "*p99_ms")
LABEL_KEYS = ("nodes", "name", "label", "protocol")
SMOKE = {"rounds": 1}


class AbError(Exception):
    """A tree that is not a v2grt source tree, or a child that failed or printed no JSON."""


def parse_tree(spec: str) -> tuple[str, str | None]:
    """NAME=PATH (PATH '-' = the installed package) -> (name, absolute path or None)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise AbError(f"--tree {spec!r}: expected NAME=PATH (PATH a source tree holding v2grt/, or - for the "
                      f"installed package)")
    if path == "-":
        return name, None
    root = Path(path).expanduser().resolve()
    if not (root / "v2grt" / "__init__.py").is_file():
        raise AbError(f"--tree {spec!r}: {root} holds no v2grt/__init__.py (expected a source tree)")
    return name, str(root)


def flatten(value, path: str = "") -> dict[str, float]:
    """Every number in a JSON value by its path; list items named by a label field when they have one."""
    out: dict[str, float] = {}
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        out[path] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            label = next((f"{k}={item[k]}" for k in LABEL_KEYS if isinstance(item, dict) and k in item), str(i))
            out.update(flatten(item, f"{path}[{label}]"))
    return out


def select(flat: dict[str, float], patterns) -> dict[str, float]:
    """The metrics whose path matches any glob, in the child's order."""
    return {k: v for k, v in flat.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def load_average() -> float:
    """The 1-minute load average (what else ran on the host)."""
    return os.getloadavg()[0]


def child_env(root: str | None) -> dict:
    """This environment with the tree first on PYTHONPATH."""
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def imported_from(root: str | None) -> str:
    """The v2grt package a child run from this tree imports; AbError if it is not the tree's own (an editable
    install or a .pth ahead of PYTHONPATH would silently measure other code)."""
    proc = subprocess.run([sys.executable, "-c", "import v2grt; print(v2grt.__file__)"],
                          cwd=root or os.getcwd(), env=child_env(root), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AbError(f"tree {root or 'installed'}: v2grt does not import: {proc.stderr[-1000:]}")
    package = str(Path(proc.stdout.strip()).resolve().parent)
    if root is not None and not Path(package).is_relative_to(root):
        raise AbError(f"tree {root}: a child imports v2grt from {package}, not from the tree")
    return package


def run_once(root: str | None, bench_argv: list[str], chrt: int | None, timeout_s: float) -> dict:
    """One run of the benchmark from one tree; its JSON."""
    env = child_env(root)
    cmd = [sys.executable, "-m", "v2grt.cli", "bench", *bench_argv, "--json"]
    if chrt is not None:
        cmd = ["chrt", "-f", str(chrt), *cmd]
    proc = subprocess.run(cmd, cwd=root or os.getcwd(), env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise AbError(f"{' '.join(cmd)} (in {root or 'the installed package'}): exit {proc.returncode}\n"
                      f"{proc.stderr[-2000:]}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AbError(f"{' '.join(cmd)}: printed no JSON object; stdout ends {proc.stdout[-500:]!r}") from None


def summarize(trees: list[str], runs: list[dict]) -> list[dict]:
    """Per metric: each tree's median and range over the rounds, and the first tree's median over each other's."""
    metrics: list[str] = []
    for run in runs:
        metrics += [m for m in run["metrics"] if m not in metrics]
    rows = []
    for m in metrics:
        per_tree = {t: [r["metrics"][m] for r in runs if r["tree"] == t and m in r["metrics"]] for t in trees}
        med = {t: statistics.median(v) for t, v in per_tree.items() if v}
        base = med.get(trees[0])
        rows.append({
            "metric": m,
            "median": med,
            "min": {t: min(v) for t, v in per_tree.items() if v},
            "max": {t: max(v) for t, v in per_tree.items() if v},
            "ratio_first_over": {t: (base / med[t] if base is not None and med.get(t) else None)
                                 for t in trees[1:]},
        })
    return rows


def render(r: dict) -> str:
    trees = r["trees"]
    headers = ["metric"] + [f"{t} median (min-max)" for t in trees] + [f"{trees[0]}/{t}" for t in trees[1:]]
    body = []
    for row in r["summary"]:
        cells = [row["metric"]]
        for t in trees:
            cells.append(f"{row['median'][t]:.4g} ({row['min'][t]:.4g}-{row['max'][t]:.4g})"
                         if t in row["median"] else "-")
        cells += [f"{x:.3f}x" if x is not None else "-" for x in row["ratio_first_over"].values()]
        body.append(cells)
    loads = ", ".join(f"{run['tree']}#{run['round']} {run['load_1min']:.2f}" for run in r["runs"])
    return "\n".join([
        f"A/B of `v2grt bench {' '.join(r['bench'])}` on {r['machine']['cpu']}, {r['rounds']} round(s), trees in turn: "
        + ", ".join(f"{t}={r['packages'][t]}" for t in trees),
        table(headers, body),
        f"load average (1 min) before each run: {loads}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="a source tree to run the benchmark from (twice or more; '-' = the installed package)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every tree once, in order")
    ap.add_argument("--chrt", type=int, default=None, metavar="PRIO", help="run each child under chrt -f PRIO")
    ap.add_argument("--metric", action="append", default=[], metavar="GLOB",
                    help=f"which numbers of the child's JSON to compare (default {' '.join(DEFAULT_METRICS)})")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per child run")
    ap.add_argument("--json", action="store_true")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- NAME [ARGS]: the benchmark to run (without --json)")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    bench_argv = [a for a in args.bench if a != "--"] if args.bench[:1] == ["--"] else list(args.bench)
    if args.smoke:
        args.tree = args.tree or ["a=-", "b=-"]
        bench_argv = bench_argv or ["kernel", "--smoke"]
    if not bench_argv:
        ap.error("name the benchmark after --, e.g. -- kernel --sizes 1000000")
    if len(args.tree) < 2:
        ap.error("give at least two --tree NAME=PATH")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: expected at least 1")
    try:
        trees = [parse_tree(s) for s in args.tree]
        names = [n for n, _ in trees]
        if len(set(names)) != len(names):
            raise AbError(f"--tree names must differ: {names}")
        patterns = args.metric or list(DEFAULT_METRICS)
        packages = {name: imported_from(root) for name, root in trees}
        runs = []
        for k in range(1, args.rounds + 1):
            for name, root in trees:
                load = load_average()
                result = run_once(root, bench_argv, args.chrt, args.timeout_s)
                runs.append({"tree": name, "round": k, "load_1min": load,
                             "metrics": select(flatten(result), patterns)})
    except (AbError, subprocess.TimeoutExpired) as exc:
        print(f"v2grt bench ab: {exc}", file=sys.stderr)
        return 2
    if not any(r["metrics"] for r in runs):
        print(f"v2grt bench ab: no number of the benchmark's JSON matched {patterns}", file=sys.stderr)
        return 2
    result = {"bench": bench_argv, "trees": names, "paths": dict(trees), "packages": packages,
              "rounds": args.rounds, "chrt": args.chrt,
              "machine": machine(), "smoke": args.smoke, "runs": runs, "summary": summarize(names, runs)}
    emit(result, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
