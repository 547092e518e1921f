"""Wake-up lateness of v2grt's ControlLoop against cyclictest, side by side in one run.

    v2grt bench loop [--periods-ms 1,10,100] [--seconds 20] [--rounds 2] [--priority 80] [--cpu N] [--json]

For each period, the two alternate in --rounds slices (so drift on a shared machine hits both alike),
each getting --seconds in total: cyclictest (Debian rt-tests) with one thread at that interval, and
v2grt's ControlLoop running an empty cycle at that period, with the same priority settings (SCHED_FIFO
at --priority when permitted, else SCHED_OTHER for both), mlockall for both, and the same CPU pinning
if --cpu is given. cyclictest tunes nothing else (--default-system: it would otherwise hold
/dev/cpu_dma_latency at 0 us for its own run only). Lateness is the time from the absolute deadline to
the moment the sleeping thread runs again; cyclictest's comes from its histogram (--histfile, 1 us
buckets), v2grt's from the loop's own lateness ring, floored to whole microseconds the same way.
Percentiles are nearest-rank. Target (DESIGN.md section 10): v2grt p99 within 2x of cyclictest p99.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from v2grt.bench._common import add_smoke_option, apply_smoke, emit, machine, percentiles_us, source_state, table
from v2grt.loop import ControlLoop, CycleStats, CycleTimes, RealtimeConfig

INSTALL_HINT = "cyclictest not found: install it with `apt-get install rt-tests` (Debian/Ubuntu)"
HIST_MAX_US = 100_000  # histogram range; anything above is counted as an overflow (and shows in max)


def fifo_permitted(priority: int) -> tuple[bool, str]:
    """Whether this process may use SCHED_FIFO at `priority` (tried on a throw-away thread)."""
    if priority <= 0:
        return False, "not asked (--priority 0)"
    import threading

    out: list = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            out.append((True, f"SCHED_FIFO priority {priority}"))
        except (OSError, ValueError) as exc:
            out.append((False, f"SCHED_FIFO {priority} refused: {exc}"))

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return out[0]


# --------------------------------------------------------------------------------------------- cyclictest
def parse_histogram(text: str) -> dict:
    """cyclictest's --histfile: lines 'latency_us count' per thread column, '# Total/Max/Histogram
    Overflows' trailers. Returns counts (index = us), overflow count and the reported max (us)."""
    counts: dict[int, int] = {}
    overflows = 0
    max_us = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            key, fields = key.strip(), value.split()
            if key == "Max Latencies" and fields:
                max_us = max(int(f) for f in fields)
            elif key == "Histogram Overflows" and fields:
                overflows = sum(int(f) for f in fields)
            continue
        fields = line.split()
        us, per_thread = int(fields[0]), [int(f) for f in fields[1:]]
        if sum(per_thread):
            counts[us] = counts.get(us, 0) + sum(per_thread)
    return {"counts": counts, "overflows": overflows, "max_us": max_us}


def histogram_percentiles(hist: dict) -> dict:
    """Nearest-rank p50/p99/p99.9 from 1 us buckets; overflowed samples sit at the reported max."""
    keys = sorted(hist["counts"])
    values = np.array(keys, dtype=np.int64)
    weights = np.array([hist["counts"][k] for k in keys], dtype=np.int64)
    if hist["overflows"]:
        values = np.append(values, hist["max_us"])
        weights = np.append(weights, hist["overflows"])
    n = int(weights.sum())
    if n == 0:
        return {"n": 0}
    cum = np.cumsum(weights)
    out = {"n": n}
    for name, q in (("p50_us", 50), ("p99_us", 99), ("p999_us", 99.9)):
        k = max(int(np.ceil(q * n / 100.0 - 1e-9)), 1)  # 99.9 / 100 * 1000 is 999.0000000000001
        out[name] = int(values[np.searchsorted(cum, k)])
    out["max_us"] = int(hist["max_us"] if hist["max_us"] is not None else values[-1])
    out["mean_us"] = float((values * weights).sum() / n)
    return out


def run_cyclictest(exe: str, period_us: int, seconds: float, priority: int, cpu: int | None) -> dict:
    """One cyclictest slice; its merged histogram."""
    loops = max(int(seconds * 1e6 / period_us), 1)
    with tempfile.TemporaryDirectory() as tmp:
        hist_path = os.path.join(tmp, "hist.txt")
        cmd = [exe, "-m", "-t", "1", "-q", "--default-system", "-i", str(period_us), "-l", str(loops),
               "-h", str(HIST_MAX_US), f"--histfile={hist_path}"]
        if priority > 0:
            cmd += ["-p", str(priority), "--policy=fifo"]
        else:
            cmd += ["--policy=other"]
        if cpu is not None:
            cmd += ["-a", str(cpu)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 3 + 30)
        if proc.returncode != 0 or not os.path.exists(hist_path):  # a bad option prints usage and exits 0
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        with open(hist_path) as fh:
            shown = ["--histfile=FILE" if c.startswith("--histfile=") else c for c in cmd]
            return {"cmd": " ".join(shown), **parse_histogram(fh.read())}


def merge(hists: list[dict]) -> dict:
    counts: dict[int, int] = {}
    for h in hists:
        for k, c in h["counts"].items():
            counts[k] = counts.get(k, 0) + c
    maxes = [h["max_us"] for h in hists if h["max_us"] is not None]
    return {"counts": counts, "overflows": sum(h["overflows"] for h in hists), "max_us": max(maxes) if maxes else None}


# ------------------------------------------------------------------------------------------------- v2grt
_EMPTY = CycleTimes()


def _empty_cycle(deadline_ns: int, woke_ns: int) -> CycleTimes:
    return _EMPTY


def run_v2grt(period_ns: int, seconds: float, priority: int, cpu: int | None) -> dict:
    """One slice of the ControlLoop with an empty cycle; lateness samples (ns) and its setup report."""
    expected = int(seconds * 1e9 / period_ns)
    stats = CycleStats(size=expected + 1000)
    rt = RealtimeConfig(cpu_affinity=None if cpu is None else [cpu], sched_fifo_priority=priority, mlockall=True,
                        gc_freeze=True, warmup_cycles=min(20, max(expected // 10, 1)))
    loop = ControlLoop(period_ns, _empty_cycle, realtime=rt, stats=stats, name="v2grt-bench-loop")
    loop.start()
    loop.started.wait(5.0)
    t_end = time.monotonic() + seconds
    while stats.cycles <= rt.warmup_cycles + 1 and time.monotonic() < t_end:
        time.sleep(period_ns / 1e9)
    warmup_missed = stats.missed_deadlines  # the one-off gc.collect + gc.freeze may overrun a 1 ms period
    time.sleep(max(t_end - time.monotonic(), 0.0))
    loop.stop()
    # The first cycles are the loop's warm-up (gc.collect + gc.freeze run after them): steady state only.
    return {"lateness_ns": stats.samples("lateness")[rt.warmup_cycles + 1:],
            "missed_deadlines": stats.missed_deadlines - warmup_missed, "warmup_missed": warmup_missed,
            "setup": {s.step: {"granted": s.granted, "detail": s.detail} for s in loop.setup_report}}


# --------------------------------------------------------------------------------------------------- run
def run(periods_ms: list[float], seconds: float, rounds: int, priority: int, cpu: int | None) -> dict:
    exe = shutil.which("cyclictest")
    fifo_ok, fifo_detail = fifo_permitted(priority)
    prio = priority if fifo_ok else 0  # same settings for both: SCHED_OTHER for both when FIFO is refused
    rows = []
    setup = {}
    for period_ms in periods_ms:
        period_us = round(period_ms * 1000)
        slice_s = seconds / rounds
        v_samples, v_missed, warm_missed, hists, cmd = [], 0, 0, [], None
        for _ in range(rounds):
            if exe:
                h = run_cyclictest(exe, period_us, slice_s, prio, cpu)
                cmd = h.pop("cmd")
                hists.append(h)
            v = run_v2grt(period_us * 1000, slice_s, prio, cpu)
            v_samples.append(v["lateness_ns"])
            v_missed += v["missed_deadlines"]
            warm_missed += v["warmup_missed"]
            setup = v["setup"]
        v2 = percentiles_us(np.concatenate(v_samples))
        row = {"period_ms": period_ms, "v2grt": v2, "v2grt_missed_deadlines": int(v_missed),
               "v2grt_warmup_missed": int(warm_missed)}
        if exe:
            ct = histogram_percentiles(merge(hists))
            row["cyclictest"] = ct
            row["cyclictest_overflows"] = merge(hists)["overflows"]
            row["p99_ratio"] = v2["p99_us"] / max(ct["p99_us"], 1)
            row["p50_ratio"] = v2["p50_us"] / max(ct["p50_us"], 1)
            row["target_met"] = row["p99_ratio"] <= 2.0
        rows.append(row)
    return {
        "benchmark": "loop",
        "machine": machine(), "source": source_state(),
        "config": {"seconds_each": seconds, "rounds": rounds, "priority_asked": priority, "cpu": cpu},
        "scheduling": {"sched_fifo": fifo_ok, "priority_used": prio, "detail": fifo_detail},
        "v2grt_setup": setup,
        "cyclictest": {"path": exe, "cmd_example": cmd} if exe else {"path": None, "hint": INSTALL_HINT},
        "results": rows,
    }


def render(r: dict) -> str:
    m, s = r["machine"], r["scheduling"]
    head = [f"loop wake-up lateness on {m['cpu']} ({m['cores']} cores), python {m['python']}",
            f"scheduling: {'SCHED_FIFO priority ' + str(s['priority_used']) if s['sched_fifo'] else 'SCHED_OTHER'}"
            f" for both ({s['detail']}); {r['config']['seconds_each']:g} s each per period in "
            f"{r['config']['rounds']} alternating slices"]
    if not r["cyclictest"]["path"]:
        head.append(r["cyclictest"]["hint"] + "; v2grt's own numbers only")
    headers = ["period ms", "side", "samples", "p50 us", "p99 us", "p99.9 us", "max us"]
    rows = []
    for row in r["results"]:
        for side in ("cyclictest", "v2grt"):
            if side in row:
                p = row[side]
                rows.append([row["period_ms"], side, p["n"], p["p50_us"], p["p99_us"], p["p999_us"], p["max_us"]])
    out = "\n".join(head) + "\n" + table(headers, rows)
    if r["cyclictest"]["path"]:
        ratio_rows = [[row["period_ms"], row["p50_ratio"], row["p99_ratio"], row["v2grt_missed_deadlines"],
                       "MET" if row["target_met"] else "NOT MET"] for row in r["results"]]
        out += "\n\n" + table(["period ms", "v2grt/cyclictest p50", "v2grt/cyclictest p99", "v2grt missed",
                               "p99 within 2x"], ratio_rows)
    return out


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"periods_ms": "10", "seconds": 0.6, "rounds": 1, "priority": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench loop", description=__doc__.splitlines()[0])
    ap.add_argument("--periods-ms", default="1,10,100", help="comma-separated periods in ms")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per side per period (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating slices per side per period")
    ap.add_argument("--priority", type=int, default=80, help="SCHED_FIFO priority for both (0: SCHED_OTHER)")
    ap.add_argument("--cpu", type=int, default=None, help="pin both to this CPU")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    periods = [float(p) for p in args.periods_ms.split(",") if p]
    emit(run(periods, args.seconds, max(args.rounds, 1), args.priority, args.cpu), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
