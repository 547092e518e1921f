"""Soak: the real aggregator for --duration seconds under a telemetry load; deadlines, overruns, errors.

    v2grt bench soak [--duration 600] [--nodes 10000] [--gateways 20] [--rate 10000] [--json]
    v2grt bench soak --nodes 100000 --gateways 200 --rates 100000,200000,500000,800000 --duration 30

The aggregator runs in this process at its configured period; child processes play the world: one
serves a SunSpec meter over Modbus TCP whose frequency wanders (so the response and the kernel's ranking
move every cycle) and a SUB receiving every setpoint message; another pushes telemetry, one PUSH socket
per gateway, batches at --rate node-updates per second in total (a process of its own, so a high rate
does not starve the meter server of its GIL and charge the harness to v2grt's meter input). Reported:
missed deadlines, budget overruns, cycle errors, p50/p99/max of every phase and of the meter sample's
age, telemetry batches sent, received, applied and rejected, and setpoint messages delivered. Target
(DESIGN.md section 10, issue 3): no missed deadline in a 10-minute run at 10,000 nodes and 10,000
node-updates per second.

--rates R1,R2,... runs one soak per rate (each --duration s, a fresh aggregator) and reports the highest
rate SUSTAINED: no missed deadline and no budget overrun; every batch sent received and none rejected
(the in-flight tail excepted: at most one batch per gateway); the load generator really sent >= 95 % of
the rate asked (else the row says generator-limited and proves nothing); the meter's frequency never
older than its stale limit (1 s). Target (issue 14): >= 500,000 node-updates/s into 100,000 vehicles.
"""

from __future__ import annotations

import argparse
import sys
import time

from v2grt.aggregator import Aggregator
from v2grt.bench._common import (
    World,
    add_smoke_option,
    aggregator_config,
    apply_smoke,
    catch_all_hwm,
    emit,
    machine,
    setup_report,
    source_state,
    stats_ms,
    table,
)
from v2grt.fleet import Fleet
from v2grt.loop import METRICS


def _tel(counters: dict) -> dict:
    """The telemetry counters of the load process (its sink and meter counters are not used)."""
    return {k: v for k, v in counters.items() if k.startswith("tel_")}


def run(duration_s: float, n: int, gateways: int, rate: float, period_s: float, priority: int,
        progress: bool) -> dict:
    fleet = Fleet.random(n, seed=0, n_gateways=gateways, now_ns=time.monotonic_ns())
    with World() as world, World(meter_model=None) as load:
        cfg = aggregator_config(period_s=period_s, meter_port=world.meter_port, n_nodes=n, priority=priority,
                                hwm=catch_all_hwm(gateways))
        agg = Aggregator(cfg, epoch=1, fleet=fleet)
        agg.start()
        try:
            if not agg.first_cycle.wait(10.0):
                raise RuntimeError("the aggregator ran no cycle within 10 s")
            world.connect(agg.publisher.endpoint, wander_hz=0.4)
            load.connect(agg.publisher.endpoint, sink=False, telemetry=agg.telemetry.endpoint,
                         fleet={"n": n, "seed": 0, "n_gateways": gateways}, rate=rate)
            time.sleep(2.0)  # telemetry flowing, gc frozen, caches warm
            s = agg.stats
            c0, miss0, over0, err0, seq0 = s.cycles, s.missed_deadlines, s.budget_overruns, s.errors, agg.seq
            frames0 = agg.telemetry.frames
            sent0 = {**world.call("counters"), **_tel(load.call("counters"))}
            t0 = time.monotonic()
            next_report = t0 + 60.0
            while (now := time.monotonic()) < t0 + duration_s:
                time.sleep(min(1.0, t0 + duration_s - now))
                if progress and time.monotonic() >= next_report:
                    next_report += 60.0
                    p = s.percentiles("total")
                    print(f"soak {time.monotonic() - t0:5.0f} s: cycles {s.cycles - c0}, missed "
                          f"{s.missed_deadlines - miss0}, overruns {s.budget_overruns - over0}, errors "
                          f"{s.errors - err0}, total p99 {p['p99_ms']:.2f} ms max {p['max_ms']:.2f} ms",
                          file=sys.stderr, flush=True)
            elapsed = time.monotonic() - t0
            cycles = s.cycles - c0
            window = {m: s.samples(m)[-cycles:] for m in METRICS}
            missed, overruns, errors = s.missed_deadlines - miss0, s.budget_overruns - over0, s.errors - err0
            seq1, frames1 = agg.seq, agg.telemetry.frames
            sent1 = {**world.call("counters"), **_tel(load.call("counters"))}
            now_ns = time.monotonic_ns()
            age_s = (now_ns - fleet.last_telemetry_ns[:n]) / 1e9
            last = agg.last_result.summary() if agg.last_result is not None else {}
            rt = setup_report(agg)
            tel_errors = dict(agg.telemetry.errors)  # frames
            refused_nodes = dict(agg.router.refused_nodes)  # vehicles
            pending = 0  # batches are written into the fleet as they are received (no queue since the gate)
        finally:
            agg.stop()
        counters = _tel(load.stop())
    received = frames1 - frames0
    rejected = sum(tel_errors.values())
    batches_sent = sent1["tel_batches"] - sent0["tel_batches"]
    nodes_sent = sent1["tel_nodes"] - sent0["tel_nodes"]
    expected_sp = (seq1 - seq0) * gateways
    return {
        "benchmark": "soak",
        "machine": machine(), "source": source_state(),
        "config": {"duration_s": duration_s, "nodes": n, "gateways": gateways, "telemetry_rate": rate,
                   "period_ms": period_s * 1e3, "sched_fifo_priority": priority},
        "realtime": rt,
        "elapsed_s": elapsed,
        "cycles": cycles,
        "expected_cycles": int(elapsed / period_s),
        "missed_deadlines": int(missed),
        "budget_overruns": int(overruns),
        "cycle_errors": int(errors),
        "phases": {m: stats_ms(window[m]) for m in METRICS if m != "input_age"},
        "input_age": stats_ms(window["input_age"][window["input_age"] >= 0]),
        "telemetry": {
            "batches_sent": int(batches_sent),
            "node_updates_per_s": nodes_sent / elapsed,
            "frames_received": int(received),
            "rejected": int(rejected),
            "errors_by_code": tel_errors,
            "refused_nodes_by_code": refused_nodes,
            "pending_at_end": pending,
            "sender_dropped": int(counters["tel_dropped"]),
            "sender_late_ms_max": counters["tel_late_ms_max"],
            "nodes_fresh_2s_at_end": int((age_s < 2.0).sum()),
        },
        "setpoints": {"expected_frames": int(expected_sp),
                      "received_frames": int(sent1["sp_frames"] - sent0["sp_frames"]),
                      "publisher_refused": int(agg.publisher.dropped)},
        "last_cycle": {k: last.get(k) for k in ("target_kw", "allocated_kw", "n_carrying") if k in last},
        "target_no_missed_deadline": missed == 0,
        "sustained": sustained(int(missed), int(overruns), int(batches_sent), int(received), int(rejected),
                               nodes_sent / elapsed, rate, gateways, stats_ms(window["input_age"])),
    }


#: The meter's frequency older than this is GRID_FREQUENCY_STALE (meter.stale_after_s as benches configure it).
METER_STALE_MS = 1000.0


def sustained(missed: int, overruns: int, sent: int, received: int, rejected: int, sent_rate: float,
              asked_rate: float, gateways: int, meter_age: dict) -> dict:
    """Whether the aggregator sustained this telemetry rate, rule by rule (see the module's doc)."""
    rules = {
        "no_missed_deadline": missed == 0 and overruns == 0,
        "all_batches_applied": rejected == 0 and received >= sent - gateways,
        "generator_reached_rate": sent_rate >= 0.95 * asked_rate,
        "meter_stayed_fresh": meter_age.get("max_ms", float("inf")) < METER_STALE_MS,
    }
    return {"ok": all(rules.values()), "rules": rules}


def sweep(rates: list[float], duration_s: float, n: int, gateways: int, period_s: float, priority: int,
          progress: bool) -> dict:
    """One soak per rate, in order; the highest rate sustained."""
    rows = []
    for rate in rates:
        r = run(duration_s, n, gateways, rate, period_s, priority, progress)
        t = r["telemetry"]
        rows.append({"rate_asked": rate, "rate_sent": t["node_updates_per_s"],
                     "rate_applied": t["frames_received"] * (n / gateways) / r["elapsed_s"],
                     "cycles": r["cycles"], "missed_deadlines": r["missed_deadlines"],
                     "budget_overruns": r["budget_overruns"], "batches_sent": t["batches_sent"],
                     "batches_received": t["frames_received"], "rejected": t["rejected"],
                     "total": r["phases"]["total"], "meter_age": r["input_age"],
                     "sustained": r["sustained"]})
        if progress:
            print(f"soak sweep: {rate:.0f}/s -> {'sustained' if r['sustained']['ok'] else 'not sustained'}",
                  file=sys.stderr, flush=True)
    ok = [row["rate_sent"] for row in rows if row["sustained"]["ok"]]
    return {"benchmark": "soak", "mode": "sweep", "machine": machine(), "source": source_state(),
            "config": {"duration_s": duration_s, "nodes": n, "gateways": gateways, "period_ms": period_s * 1e3,
                       "sched_fifo_priority": priority, "rates": rates},
            "results": rows, "highest_sustained_rate": max(ok) if ok else None,
            "target_500k_at_100k": bool(ok) and max(ok) >= 500_000 * 0.95 and n >= 100_000}


def render_sweep(r: dict) -> str:
    c, m = r["config"], r["machine"]
    rows = []
    for x in r["results"]:
        failed = [k for k, v in x["sustained"]["rules"].items() if not v]
        rows.append([x["rate_asked"], x["rate_sent"], x["rate_applied"], x["missed_deadlines"], x["budget_overruns"],
                     f"{x['batches_received']}/{x['batches_sent']}", x["rejected"], x["total"]["p99_ms"],
                     x["total"]["max_ms"], x["meter_age"]["p99_ms"], x["meter_age"]["max_ms"],
                     "yes" if x["sustained"]["ok"] else "no: " + ", ".join(failed)])
    best = r["highest_sustained_rate"]
    return "\n".join([
        f"soak sweep on {m['cpu']} ({m['cores']} cores): {c['nodes']} nodes, {c['gateways']} gateways, period "
        f"{c['period_ms']:.0f} ms, {c['duration_s']:g} s per rate, SCHED_FIFO priority {c['sched_fifo_priority']}",
        table(["asked /s", "sent /s", "applied /s", "missed", "overruns", "batches recv/sent", "rejected",
               "cycle p99 ms", "cycle max ms", "meter age p99 ms", "meter age max ms", "sustained"], rows),
        f"highest rate sustained: {'none' if best is None else f'{best:,.0f} node-updates/s'}",
    ])


def render(r: dict) -> str:
    m, c, t = r["machine"], r["config"], r["telemetry"]
    rows = [[name, p["p50_ms"], p["p99_ms"], p["p999_ms"], p["max_ms"]] for name, p in r["phases"].items()]
    rows.append(["meter age", r["input_age"]["p50_ms"], r["input_age"]["p99_ms"], r["input_age"]["p999_ms"],
                 r["input_age"]["max_ms"]])
    fifo = r["realtime"].get("sched_fifo", {})
    lines = [
        f"soak on {m['cpu']} ({m['cores']} cores), python {m['python']}, numpy {m['numpy']}",
        f"{c['nodes']} nodes, {c['gateways']} gateways, period {c['period_ms']:.0f} ms, {r['elapsed_s']:.0f} s, "
        f"telemetry {t['node_updates_per_s']:.0f} node-updates/s; SCHED_FIFO: "
        f"{'granted' if fifo.get('granted') else 'no'} ({fifo.get('detail', '')})",
        table(["phase", "p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows),
        "",
        table(["cycles", "expected", "missed deadlines", "budget overruns", "cycle errors"],
              [[r["cycles"], r["expected_cycles"], r["missed_deadlines"], r["budget_overruns"], r["cycle_errors"]]]),
        "",
        table(["tel batches sent", "received", "rejected", "pending", "sender dropped", "nodes fresh (<2 s)",
               "sp frames expected", "sp frames received"],
              [[t["batches_sent"], t["frames_received"], t["rejected"], t["pending_at_end"], t["sender_dropped"],
                t["nodes_fresh_2s_at_end"], r["setpoints"]["expected_frames"],
                r["setpoints"]["received_frames"]]]),
        f"target: no missed deadline -> {'MET' if r['target_no_missed_deadline'] else 'NOT MET'} "
        f"({r['missed_deadlines']} missed in {r['elapsed_s']:.0f} s)",
        "rate sustained: " + ("yes" if r["sustained"]["ok"] else "no (" + ", ".join(
            k for k, v in r["sustained"]["rules"].items() if not v) + ")"),
    ]
    return "\n".join(lines)


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"duration": 1.5, "nodes": 1000, "gateways": 4, "rate": 4000.0, "period_ms": 20.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench soak", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of measured run (default 600)")
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--gateways", type=int, default=20, help="gateways (each its own PUSH socket)")
    ap.add_argument("--rate", type=float, default=10_000.0, help="telemetry node-updates per second, in total")
    ap.add_argument("--rates", default=None, help="comma-separated rates: one soak each, and the highest sustained")
    ap.add_argument("--period-ms", type=float, default=100.0)
    ap.add_argument("--priority", type=int, default=0,
                    help="SCHED_FIFO priority of the control thread (0: SCHED_OTHER, as configs/default.yaml)")
    ap.add_argument("--progress", action="store_true", help="a line on stderr every minute")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    if args.rates:
        rates = [float(x) for x in args.rates.split(",") if x]
        emit(sweep(rates, args.duration, args.nodes, args.gateways, args.period_ms / 1e3, args.priority,
                   args.progress), args.json, render_sweep)
        return 0
    emit(run(args.duration, args.nodes, args.gateways, args.rate, args.period_ms / 1e3, args.priority,
             args.progress), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
