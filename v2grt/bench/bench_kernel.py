"""Kernel benchmark: Cython against the NumPy reference and a memory-streaming roofline, side by side.

    v2grt bench kernel [--sizes 1000,10000,100000,1000000] [--threads 1,2] [--cycles N] [--json]

For each fleet size, in one run: the compiled kernel over many cycles (the build v2grt.kernel picks
for this CPU, and the portable baseline build beside it when that is another), the reference twin over
fewer (it is slow), and a pass that only streams the kernel's bytes through memory. The request moves every
cycle (a DC response to the real CE frequency trace, scaled to the fleet) so hysteresis, ranking and
the marginal bucket all do real work; last setpoints feed back as in the loop. With --threads 1,2 the
compiled kernel runs with each kernel.threads value side by side (one row each, interleaved; "used" says
what the kernel did: below 50,000 rows it runs one thread whatever it is allowed), with the first value's
p50 over each one's (above 1: faster). The baseline build runs with the first value.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np

from v2grt import Fleet, reference
from v2grt._buffers import KernelOutput, Workspace
from v2grt.bench._common import add_smoke_option, apply_smoke, emit, machine, stats_ms, table
from v2grt.kernel import compiled
from v2grt.profile import DispatchProfile


def requests_kw(fleet: Fleet, cycles: int, seed: int = 0) -> np.ndarray:
    """A moving request: +-40 % of the fleet's rating, wandering like a frequency response does."""
    rng = np.random.default_rng(seed)
    rating_kw = float(fleet.column("p_dis_max_kw").sum())
    walk = np.cumsum(rng.normal(0.0, 0.05, cycles))
    return 0.4 * rating_kw * np.tanh(walk)


def time_kernel(kernel, fleet, profile, reqs, out, work, feed_back=True) -> list[int]:
    samples = []
    n = fleet.n_rows
    for req in reqs:
        t0 = time.perf_counter_ns()
        kernel.dispatch(fleet, profile, float(req), 0, 0.1, False, out, work)
        samples.append(time.perf_counter_ns() - t0)
        if feed_back:
            np.copyto(fleet.last_setpoint_kw[:n], out.setpoint_kw[:n])
    return samples


def time_roofline(core, fleet, out, cycles) -> list[int]:
    samples = []
    for _ in range(cycles):
        t0 = time.perf_counter_ns()
        core.stream_roofline(fleet, out)
        samples.append(time.perf_counter_ns() - t0)
    return samples


def run(sizes, cycles, ref_cycles, seed=0, threads=(1,)) -> dict:
    profile = DispatchProfile()
    core = compiled()  # what the service runs on this CPU
    baseline = compiled("baseline") if core.ISA != "baseline" else None
    rows = []
    for n in sizes:
        fleet = Fleet.random(n, seed=seed)
        out = KernelOutput(fleet.capacity)
        works = {}
        for t in threads:
            works[t] = Workspace(fleet.capacity, fleet.site_capacity)
            works[t].threads = t
        work = works[threads[0]]
        n_cycles = cycles if n < 1_000_000 else max(cycles // 4, 20)
        n_ref = ref_cycles if n < 1_000_000 else max(ref_cycles // 2, 5)
        reqs = requests_kw(fleet, n_cycles, seed)
        for t in threads:
            time_kernel(core, fleet, profile, reqs[:5], out, works[t])  # warm caches, page in, start the worker
        time_roofline(core, fleet, out, 3)
        gc.collect()
        gc.disable()
        try:
            # Interleave them so drift on a shared machine hits them alike.
            cy = {t: [] for t in threads}
            used = {t: [] for t in threads}
            base, roof, ref = [], [], []
            chunks = np.array_split(np.arange(n_cycles), n_ref)
            for idx in chunks:
                for t in threads:
                    cy[t] += time_kernel(core, fleet, profile, reqs[idx], out, works[t])
                    used[t].append(works[t].kernel_mode()["threads"])
                if baseline is not None:
                    base += time_kernel(baseline, fleet, profile, reqs[idx], out, work)
                roof += time_roofline(core, fleet, out, len(idx))
                ref += time_kernel(reference, fleet, profile, reqs[idx[:1]], out, work)
        finally:
            gc.enable()
        r, s = stats_ms(ref), stats_ms(roof)
        c = stats_ms(cy[threads[0]])
        variants = []
        for t in threads:
            ct = stats_ms(cy[t])
            variants.append({"label": f"threads={t}", "threads": t, "used": max(used[t]),
                             "kernel_mode": works[t].kernel_mode(), "cython": ct,
                             "first_over_this_p50": c["p50_ms"] / ct["p50_ms"],
                             "cython_over_roofline": ct["p50_ms"] / s["p50_ms"]})
        # The row's own numbers are the first --threads value's (what `bench ab` compares against a tree that
        # has no threads); each value's are under "threads", labelled for bench ab.
        rows.append({
            "nodes": n,
            "isa": core.ISA,
            "cython": c,
            "cython_baseline": stats_ms(base) if base else None,
            "reference": r,
            "roofline": s,
            "cython_over_roofline": c["p50_ms"] / s["p50_ms"],
            "reference_over_cython": r["p50_ms"] / c["p50_ms"],
            "budget_fraction": c["p99_ms"] / 100.0,
            "threads": variants,
        })
        works.clear()  # the worker threads stop with their workspaces
    return {"benchmark": "kernel", "machine": machine(), "isa": core.ISA, "profile": profile.to_dict(),
            "threads": list(threads), "results": rows}


def render(result: dict) -> str:
    first = result["threads"][0]
    headers = ["nodes", "threads", "used", "cython p50 ms", "cython p99 ms", f"{first} thr / this p50",
               "roofline p50 ms", "cython/roofline", "reference p50 ms", "reference/cython", "p99 % of 100 ms"]
    with_base = any(r["cython_baseline"] for r in result["results"])
    if with_base:
        headers += ["baseline-ISA p50 ms", "baseline/cython"]
    rows = []
    for r in result["results"]:
        for v in r["threads"]:
            c = v["cython"]
            row = [r["nodes"], v["threads"], v["used"], c["p50_ms"], c["p99_ms"], v["first_over_this_p50"],
                   r["roofline"]["p50_ms"], v["cython_over_roofline"], r["reference"]["p50_ms"],
                   r["reference"]["p50_ms"] / c["p50_ms"], c["p99_ms"]]
            if with_base:
                b = r["cython_baseline"]["p50_ms"]
                row += [b, b / c["p50_ms"]] if v["threads"] == first else ["-", "-"]
            rows.append(row)
    m = result["machine"]
    return (f"kernel benchmark on {m['cpu']} ({m['cores']} cores), python {m['python']}, numpy {m['numpy']}, "
            f"kernel build: {result['isa']}; threads = kernel.threads, used = what the kernel ran (below 50,000 "
            f"rows: one)\n" + table(headers, rows))


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"sizes": "1000", "cycles": 20, "ref_cycles": 4}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated fleet sizes")
    ap.add_argument("--cycles", type=int, default=400, help="compiled-kernel cycles per size (1M: a quarter)")
    ap.add_argument("--ref-cycles", type=int, default=20, help="reference cycles per size (1M: half)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="1,2",
                    help="kernel.threads values to run side by side, comma-separated (1, 2 or 1,2; default 1,2)")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    threads = [int(s) for s in args.threads.split(",") if s]
    if not threads or any(t not in (1, 2) for t in threads):
        ap.error(f"--threads {args.threads!r}: expected 1, 2 or 1,2")
    emit(run(sizes, args.cycles, args.ref_cycles, args.seed, tuple(threads)), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
