"""Whole-cycle time of the real Aggregator (inputs, kernel, publish to every gateway, status) by fleet size.

    v2grt bench cycle [--nodes 10000,100000,1000000] [--gateways 10,100,1000] [--priorities 0,80]
                      [--journal off,on] [--publisher on|off|off,on] [--kernel-threads 1|2|1,2] [--cycles 200]
                      [--json]

For every (nodes, gateways) pair, and for each control-thread priority of --priorities side by side
(0: SCHED_OTHER as configs/default.yaml ships; N: SCHED_FIFO N, as a tuned deployment runs it): the
Aggregator runs in this process on its control thread at --period-ms, with the other real-time
settings of configs/default.yaml (mlockall, gc freeze, 0.5 ms switch interval); a child process plays the world: a
SunSpec meter over Modbus TCP whose frequency wanders +-0.4 Hz (so the DC response, the ranking and
the allocation move every cycle) and one SUB socket subscribed to every topic, so every gateway's
message is really encoded, queued and sent over TCP (the setpoint HWM is raised to several cycles'
worth of messages, _common.catch_all_hwm, so the catch-all subscriber does not drop them; with one
SUB per gateway, each pipe carries one message per cycle). Telemetry is held fresh (no gateways push
here; see `bench soak`).

Reported per pair: p50/p99/max of the total, inputs, kernel and publish phases and of wake-up
lateness, missed deadlines and budget overruns, setpoint frames delivered and bytes per cycle, and
a breakdown of the publish phase measured after the run on the same fleet, layouts and result, by
calling Aggregator._publish itself on this thread: the whole phase, the phase with the socket's send
made a no-op (gathering and encoding every gateway's message, and the status), and the status
message alone. With --journal off,on (the default) every pair runs with the dispatch journal off and on
side by side (v2grt.journal, in a temporary directory, every vehicle sampled once a second); the journal
column is the control thread's cost of Journal.record() per cycle, the rest of the journal's work being
on its writer thread. With --publisher off,on every pair also runs with the frames sent on the
control thread (bus.publisher_thread false) and by the publisher thread (true, v2grt.publisher) side by side;
both report the control thread's cost (the total phase), that cost besides the kernel (`non_kernel`, total
minus kernel cycle by cycle) and `wire`: the time from the cycle's deadline to its last setpoint frame queued
to ZeroMQ (after the control thread's sends, or the publisher thread's); with the publisher thread, `queue`
(in the JSON) is the hand-over to that thread taking the cycle up. --kernel-threads sets kernel.threads (default:
the config's, 2; `1,2` runs both side by side); the kthr column says what the kernel last ran (kernel.mode).
Targets (DESIGN.md section 10, issues 3, 12 and 14): whole cycle p99 under 5 ms at 100,000 nodes, and at
most 2.5 ms with 1,000 gateways (issue 14); a million nodes inside the 100 ms budget, with p99 at most 12 ms
(issue 14); the journal's cost in
the cycle <= 0.1 ms p99 at 100,000 nodes.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time

import numpy as np

from v2grt.aggregator import Aggregator
from v2grt.bench._common import (
    World,
    add_smoke_option,
    aggregator_config,
    apply_smoke,
    catch_all_hwm,
    emit,
    keep_fresh,
    machine,
    setup_report,
    source_state,
    stats_ms,
    table,
)
from v2grt.fleet import Fleet
from v2grt.io import wire

WARMUP_CYCLES = 25  # the loop freezes gc after 20


def publish_breakdown(agg, reps: int = 7) -> dict:
    """Median ms of the publish phase and its parts, run on this thread after the loop has stopped, on
    the aggregator's own layouts and last result: the whole phase (real sends), the phase with the
    socket's send replaced by a no-op (gather + encode + status), and the status message alone.
    Generic on purpose: it calls Aggregator._publish itself, whatever its internals are; with the publisher
    thread, each call is timed until that thread has sent the cycle (hand-over plus sends)."""
    result = agg.last_result
    sender = agg.sender
    if sender is not None:
        sender.wait_idle()  # the loop's last cycle may still be going out

    def median_ms(fn) -> float:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            if sender is not None:
                sender.wait_idle()
            ts.append(time.perf_counter_ns() - t0)
        return float(np.median(ts)) / 1e6

    whole = median_ms(lambda: agg._publish(result, time.monotonic_ns()))
    # instance attributes shadow the methods; the socket is left alone
    agg.publisher.send, agg.publisher.send_frames = (lambda frame: True), len
    try:
        nosend = median_ms(lambda: agg._publish(result, time.monotonic_ns()))
    finally:
        del agg.publisher.send, agg.publisher.send_frames
    status = median_ms(lambda: wire.encode_status(agg._status_fields(result, time.time_ns(), time.monotonic_ns(),
                                                                     agg.epoch, agg.seq, agg.delivered_kw)))
    return {"publish_ms": whole, "frames_ms": max(nosend - status, 0.0), "status_ms": status,
            "send_ms": max(whole - nosend, 0.0)}


def measure(n: int, gateways: int, cycles: int, period_s: float, priority: int, journal: bool = False,
            cpu: int | None = None, samples: bool = False, publisher: bool | None = None,
            kernel_threads: int | None = None) -> dict:
    """One (nodes, gateways) pair; `cpu` pins the control thread; `samples` adds the per-cycle total times
    (ns) under "total_ns" (bench qualify draws them); `publisher` sets bus.publisher_thread and `kernel_threads`
    kernel.threads (None: the config's default)."""
    fleet = Fleet.random(n, seed=0, n_gateways=gateways, now_ns=time.monotonic_ns())
    jdir = tempfile.mkdtemp(prefix="v2grt-bench-journal-")
    with World() as world:
        cfg = aggregator_config(period_s=period_s, meter_port=world.meter_port, n_nodes=n, priority=priority,
                                cpu=cpu, hwm=catch_all_hwm(gateways))
        # Parquet conversion off: it runs in its own process at rotation, not in this measurement
        cfg.journal.enabled, cfg.journal.dir, cfg.journal.parquet = journal, jdir, False
        if publisher is not None:
            cfg.bus.publisher_thread = publisher
        if kernel_threads is not None:
            cfg.kernel.threads = kernel_threads
        agg = Aggregator(cfg, epoch=1, fleet=fleet)
        keep_fresh(agg)
        agg.start()
        try:
            if not agg.first_cycle.wait(30.0):
                raise RuntimeError(f"{n} nodes: the aggregator ran no cycle within 30 s")
            world.connect(agg.publisher.endpoint, wander_hz=0.4)
            s = agg.stats
            while s.cycles < WARMUP_CYCLES:
                time.sleep(period_s)
            c0, miss0, over0, seq0 = s.cycles, s.missed_deadlines, s.budget_overruns, agg.seq
            wire0 = _wire_count(agg)
            rx0 = world.call("counters")
            t0 = time.monotonic()
            while s.cycles - c0 < cycles:
                time.sleep(period_s)
            elapsed = time.monotonic() - t0
            rx1 = world.call("counters")
            c1, miss1, over1, seq1 = s.cycles, s.missed_deadlines, s.budget_overruns, agg.seq
            k = c1 - c0
            window = {m: s.samples(m)[-k:] for m in ("lateness", "inputs", "kernel", "publish", "total")}
            # the control thread's cost besides the kernel, cycle by cycle (issue 14: the part this side owns)
            window["non_kernel"] = window["total"] - window["kernel"]
            window["wire"] = _wire_samples(agg, _wire_count(agg) - wire0)
            if agg.sender is not None:  # the hand-over to the publisher thread taking the cycle up
                sent = agg.sender.sent_cycles - wire0
                window["queue"] = agg.sender.samples("queue")[-sent:] if sent > 0 else np.zeros(0, np.int64)
            busy_skips = 0 if agg.sender is None else agg.sender.busy_skips
            if agg.journal is not None:
                window["journal"] = agg.journal.cost_samples_ns()[-k:]
            agg.loop.stop()  # the breakdown below runs on this thread: the control thread must be done
            breakdown = publish_breakdown(agg)
            rt = setup_report(agg)
            kernel_mode = agg.dispatcher.kernel_mode()
            refused = agg.publisher.dropped
            n_carrying = agg.last_result.n_carrying
            journal_counters = None if agg.journal is None else dict(vars(agg.journal.counters))
        finally:
            agg.stop()
            shutil.rmtree(jdir, ignore_errors=True)
    frames = rx1["sp_frames"] - rx0["sp_frames"]
    nbytes = rx1["sp_bytes"] - rx0["sp_bytes"]
    ph = {m: stats_ms(w) for m, w in window.items()}
    extra = {"total_ns": [int(x) for x in window["total"]]} if samples else {}
    return {**extra,
        "nodes": n, "gateways": gateways, "cycles": int(k), "elapsed_s": elapsed, "journal": journal,
        "publisher_thread": agg.sender is not None, "publisher_busy_skips": int(busy_skips),
        "journal_counters": journal_counters,
        "phases": ph,
        "missed_deadlines": int(miss1 - miss0), "budget_overruns": int(over1 - over0),
        "setpoint_frames_expected": int((seq1 - seq0) * gateways), "setpoint_frames_received": int(frames),
        "publisher_refused": int(refused),
        "mb_per_cycle": nbytes / max(seq1 - seq0, 1) / 1e6,
        "publish_breakdown_p50_ms": breakdown,
        "n_carrying_last": int(n_carrying),
        "realtime": rt,
        "kernel_threads": cfg.kernel.threads, "kernel_mode": kernel_mode,
    }


def _wire_count(agg) -> int:
    return agg.sender.sent_cycles if agg.sender is not None else agg.to_wire_count


def _wire_samples(agg, k: int) -> np.ndarray:
    """The newest `k` deadline-to-last-frame times (ns) of either publishing path."""
    if agg.sender is not None:
        return agg.sender.samples("to_wire")[-k:] if k > 0 else np.zeros(0, np.int64)
    ring = agg.to_wire_ns
    k = min(k, len(ring))
    return ring[np.arange(agg.to_wire_count - k, agg.to_wire_count) % len(ring)]


def run(sizes, gateways, cycles, period_s, priorities, journals=(False, True), publishers=(True,),
        kernel_threads=(None,)) -> dict:
    rows = []
    for n in sizes:
        for g in gateways:
            if g > n:
                continue
            for prio in priorities:  # side by side: the same pair under each scheduling policy
                for journal in journals:  # ... and with the dispatch journal off and on
                    for pub in publishers:  # ... and sending on the control thread or the publisher thread
                        for kt in kernel_threads:  # ... and the kernel on one thread or two
                            gc.collect()
                            row = measure(n, g, cycles if n < 1_000_000 else max(cycles // 2, 20), period_s, prio,
                                          journal, publisher=pub, kernel_threads=kt)
                            fifo = row["realtime"].get("sched_fifo", {})
                            row["sched"] = f"FIFO {prio}" if fifo.get("granted") else "OTHER"
                            rows.append(row)
    budget_ms = period_s * 1e3
    targets = {}
    for sched in dict.fromkeys(r["sched"] for r in rows):
        at_100k = [r for r in rows if r["nodes"] == 100_000 and r["sched"] == sched]
        for r in at_100k:
            p99 = r["phases"]["total"]["p99_ms"]
            targets[f"p99_under_5ms_at_100k/{r['gateways']}gw/{sched}{_jtag(r)}"] = {"met": p99 < 5.0, "p99_ms": p99}
            if r["gateways"] >= 1000:  # issue 14: the control thread's cost, and the deadline to the last frame
                targets[f"p99_at_most_2.5ms_at_100k/{r['gateways']}gw/{sched}{_jtag(r)}"] = {
                    "met": p99 <= 2.5, "p99_ms": p99, "wire_p99_ms": r["phases"]["wire"].get("p99_ms", 0.0)}
            if r["journal"]:
                jp99 = r["phases"]["journal"]["p99_ms"]
                targets[f"journal_p99_at_most_0.1ms_at_100k/{r['gateways']}gw/{sched}"] = {
                    "met": jp99 <= 0.1, "p99_ms": jp99, "dropped": r["journal_counters"]["dropped"]}
        for r in (r for r in rows if r["nodes"] == 1_000_000 and r["sched"] == sched):
            p99 = r["phases"]["total"]["p99_ms"]
            targets[f"p99_at_most_12ms_at_1M/{r['gateways']}gw/{sched}{_jtag(r)}"] = {  # issue 14
                "met": p99 <= 12.0, "p99_ms": p99, "kernel_threads_run": r["kernel_mode"]["threads"]}
            worst = r["phases"]["total"]["max_ms"]
            targets[f"1M_inside_budget/{r['gateways']}gw/{sched}{_jtag(r)}"] = {
                "met": worst < budget_ms and r["missed_deadlines"] == 0, "max_ms": worst,
                "missed_deadlines": r["missed_deadlines"]}
    return {"benchmark": "cycle", "machine": machine(), "source": source_state(),
            "config": {"period_ms": budget_ms, "cycles": cycles, "priorities": list(priorities)},
            "results": rows, "targets": targets}


def _jtag(row: dict) -> str:
    return (("/journal" if row["journal"] else "") + ("/publisher-thread" if row.get("publisher_thread") else
                                                      "/control-thread-sends")
            + ("/kernel-threads-1" if row.get("kernel_threads") == 1 else ""))  # untagged: the default, 2


def render(r: dict) -> str:
    m = r["machine"]
    head = (f"whole cycle of the Aggregator on {m['cpu']} ({m['cores']} cores), python {m['python']}, numpy "
            f"{m['numpy']}; period {r['config']['period_ms']:.0f} ms; sched = control thread's policy")
    rows1, rows2 = [], []
    for x in r["results"]:
        p = x["phases"]
        j = p.get("journal")
        w = p["wire"]
        nk = p.get("non_kernel", {})
        rows1.append([x["nodes"], x["gateways"], x["sched"], "on" if x["journal"] else "off",
                      "thread" if x["publisher_thread"] else "control",
                      f"{x['kernel_mode']['threads']}/{x['kernel_threads']}", x["cycles"],
                      p["total"]["p50_ms"], p["total"]["p99_ms"],
                      p["total"]["max_ms"], nk.get("p50_ms", "-"), nk.get("p99_ms", "-"),
                      w.get("p50_ms", "-"), w.get("p99_ms", "-"), w.get("max_ms", "-"),
                      p["kernel"]["p50_ms"], p["kernel"]["p99_ms"], p["publish"]["p50_ms"],
                      p["publish"]["p99_ms"], p["inputs"]["p99_ms"], "-" if j is None else j["p50_ms"],
                      "-" if j is None else j["p99_ms"], "-" if j is None else j["max_ms"], p["lateness"]["p99_ms"],
                      x["missed_deadlines"], x["budget_overruns"], x["publisher_busy_skips"]])
        b = x["publish_breakdown_p50_ms"]
        rows2.append([x["nodes"], x["gateways"], f"{x['sched']}{_jtag(x)}", p["publish"]["p50_ms"], b["publish_ms"],
                      b["frames_ms"],
                      b["status_ms"], b["send_ms"], x["mb_per_cycle"],
                      f"{x['setpoint_frames_received']}/{x['setpoint_frames_expected']}"])
    out = [head,
           table(["nodes", "gw", "sched", "journal", "sends", "kthr", "cycles", "total p50", "total p99", "total max",
                  "non-kernel p50", "non-kernel p99", "wire p50", "wire p99", "wire max", "kernel p50",
                  "kernel p99", "publish p50", "publish p99", "inputs p99", "jrnl p50", "jrnl p99", "jrnl max",
                  "late p99", "missed", "overruns", "busy"], rows1),
           "(all times ms; total = the control thread's cost of the cycle; non-kernel = total - kernel, cycle by "
           "cycle; wire = the cycle's deadline to its last setpoint frame queued to ZeroMQ; sends = on the control "
           "thread or the publisher thread (bus.publisher_thread); kthr = kernel threads the last cycle ran / "
           "kernel.threads; busy = cycles not handed over, the publisher thread still sending;"
           " jrnl = the journal's cost on the control thread, Journal.record())", "",
           "publish phase (ms): in loop = p50 in the run; after the run, on this thread, median of: alone = the "
           "whole phase, frames = gathering and encoding every gateway's message, status = the status message, "
           "send = the ZeroMQ sends",
           table(["nodes", "gw", "sched", "in loop", "alone", "frames", "status", "send", "MB/cycle",
                  "frames rx/expected"],
                 rows2)]
    for name, t in r["targets"].items():
        detail = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items() if k != "met")
        out.append(f"target {name}: {'MET' if t['met'] else 'NOT MET'} ({detail})")
    return "\n".join(out)


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"nodes": "2000", "gateways": "4", "cycles": 5, "period_ms": 20.0, "priorities": "0"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench cycle", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="10000,100000,1000000", help="comma-separated fleet sizes")
    ap.add_argument("--gateways", default="10,100,1000", help="comma-separated gateway counts")
    ap.add_argument("--cycles", type=int, default=200, help="measured cycles per pair (1M nodes: half)")
    ap.add_argument("--period-ms", type=float, default=100.0)
    ap.add_argument("--priorities", default="0,80",
                    help="control-thread SCHED_FIFO priorities to compare (0: SCHED_OTHER, as configs/default.yaml)")
    ap.add_argument("--journal", default="off,on",
                    help="the dispatch journal off, on, or both side by side (default off,on)")
    ap.add_argument("--publisher", default="on",
                    help="bus.publisher_thread: off (the control thread sends), on (the publisher thread, the config's "
                         "default), or off,on side by side (default on)")
    ap.add_argument("--kernel-threads", default=None,
                    help="kernel.threads: 1, 2, or 1,2 side by side (default: the config's default, 2)")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    kernel_threads = [None]
    if args.kernel_threads is not None:
        try:
            kernel_threads = [int(s) for s in args.kernel_threads.split(",") if s]
        except ValueError:
            kernel_threads = []
        if not kernel_threads or any(t not in (1, 2) for t in kernel_threads):
            ap.error(f"--kernel-threads {args.kernel_threads!r}: expected 1, 2 or 1,2")
    journals = []
    for s in args.journal.split(","):
        if s not in ("off", "on"):
            ap.error(f"--journal {args.journal!r}: expected off, on or off,on")
        journals.append(s == "on")
    publishers = []
    for s in args.publisher.split(","):
        if s not in ("off", "on"):
            ap.error(f"--publisher {args.publisher!r}: expected off, on or off,on")
        publishers.append(s == "on")
    sizes = [int(s) for s in args.nodes.split(",") if s]
    gws = [int(s) for s in args.gateways.split(",") if s]
    prios = [int(s) for s in args.priorities.split(",") if s]
    emit(run(sizes, gws, args.cycles, args.period_ms / 1e3, prios, journals, publishers, kernel_threads), args.json,
         render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
