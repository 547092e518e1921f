"""Receive-path benchmark: how long the bus thread holds the GIL per telemetry message, hostile and legitimate.

    v2grt bench ingest [--vehicles 100000] [--messages 40] [--json]

A real Aggregator (no meter, control loop at --period-s) receives telemetry on its PULL socket from a
sender process (so sending costs the measured interpreter nothing), one scenario at a time, a message
every --gap-ms. A probe thread in the aggregator's process sleeps 0.2 ms in a loop and records how
late it wakes: with the switch interval at 0.5 ms (the real-time setup's), a late wake beyond that is
the GIL held by one call on another thread, which is what delays the control thread's wake-up too.
Scenarios (issue 10): the hostile 3.8 MB frame of 760,000 ids behind empty arrays, under an unknown
and a roster gateway; a batch claiming more nodes than its gateway owns; 1 MB id lists under a new
gateway id each time; and a legitimate gateway of half the fleet (50,000 vehicles at the default)
sending every key, in setpoint order (fast path), in one other order (cached), and in a new order every
time (the slow path, the worst legitimate case). Reported per scenario: probe lateness p99/max,
control-loop deadline misses, RSS growth, frames by code, and which mapping path the batches took.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import numpy as np

from v2grt.bench._common import (
    add_smoke_option,
    apply_smoke,
    child_env,
    emit,
    machine,
    setup_report,
    source_state,
    table,
)
from v2grt.testing import short_ids

T_NS = 1_700_000_000_000_000_000
SCENARIOS = ("idle", "hostile_unknown_gw", "hostile_roster_gw", "too_many_nodes", "new_gw_1mb_ids",
             "legit_setpoint_order", "legit_one_other_order", "legit_new_order_each")




def frames_for(scenario: str, messages: int, big: list[str]) -> list[bytes]:
    """The frames one scenario sends (built in the sender process)."""
    import msgpack

    from v2grt.io import wire

    n = len(big)
    full = {"soc": np.full(n, 0.6), "p_kw": np.zeros(n), "online": np.ones(n, np.uint8),
            "fault": np.zeros(n, np.uint8), **{k: np.full(n, 0.5) for k in ("soh", "p_dis_max_kw", "p_chg_max_kw")},
            "temp_c": np.full(n, 20.0), "v_dc": np.full(n, 400.0), "cycle_count": np.full(n, 100.0),
            "cabin_temp_c": np.full(n, 20.0)}

    def batch(gw, ids):
        return wire.encode_telemetry(gw, 1, T_NS, wire.join_ids(ids), **full)

    if scenario == "idle":
        return []
    if scenario in ("hostile_unknown_gw", "hostile_roster_gw"):
        gw = "gw_attacker" if scenario == "hostile_unknown_gw" else "gw1"
        frame = msgpack.packb({"v": 1, "gw": gw, "seq": 1, "t_ns": T_NS, "ids": short_ids(760_000), "soc": b"",
                               "p_kw": b"", "online": b"", "fault": b""})
        return [frame] * messages
    if scenario == "too_many_nodes":
        m = 2 * n
        frame = msgpack.packb({"v": 1, "gw": "gw2", "seq": 1, "t_ns": T_NS, "ids": short_ids(m), "soc": bytes(4 * m),
                               "p_kw": bytes(4 * m), "online": bytes(m), "fault": bytes(m)})
        return [frame] * messages
    if scenario == "new_gw_1mb_ids":
        ids = short_ids(250_000)
        k = ids.count(b"\x00") + 1
        return [msgpack.packb({"v": 1, "gw": f"gw_new_{i}", "seq": 1, "t_ns": T_NS, "ids": ids,
                               "soc": bytes(4 * k), "p_kw": bytes(4 * k), "online": bytes(k), "fault": bytes(k)})
                for i in range(messages)]
    if scenario == "legit_setpoint_order":
        return [batch("gw1", big)] * messages
    if scenario == "legit_one_other_order":
        return [batch("gw1", big[::-1])] * messages
    if scenario == "legit_new_order_each":
        rng = np.random.default_rng(0)
        return [batch("gw1", [big[i] for i in rng.permutation(n)]) for _ in range(messages)]
    raise ValueError(scenario)


def sender(endpoint: str, scenario: str, messages: int, gap_ms: float, vehicles: int) -> None:
    """Child process: build the scenario's frames, say so, then send them one every gap_ms."""
    import zmq

    width = max(2, len(str(vehicles)))
    big = [f"EV_NODE_{i + 1:0{width}d}" for i in range(vehicles // 2)]
    frames = frames_for(scenario, messages, big)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.setsockopt(zmq.SNDHWM, 10_000)
    push.connect(endpoint)
    time.sleep(0.2)  # connected before the first frame
    print("ready", sum(map(len, frames)), flush=True)
    sys.stdin.readline()
    for frame in frames:
        push.send(frame)
        time.sleep(gap_ms / 1e3)
    push.close()
    ctx.term()


class Probe(threading.Thread):
    """Sleeps 0.2 ms in a loop and records each wake-up's lateness (ns) with its time."""

    def __init__(self, size: int = 4_000_000):
        super().__init__(name="gil-probe", daemon=True)
        self.t = np.zeros(size, np.int64)
        self.late = np.zeros(size, np.int64)
        self.n = 0
        self.stop = threading.Event()

    def run(self) -> None:
        clock, sleep, t, late = time.perf_counter_ns, time.sleep, self.t, self.late
        i = 0
        while not self.stop.is_set() and i < t.size:
            t0 = clock()
            sleep(0.0002)
            t1 = clock()
            t[i], late[i] = t1, t1 - t0 - 200_000
            i += 1
            self.n = i

    def window(self, t0: int, t1: int) -> np.ndarray:
        n = self.n
        sel = (self.t[:n] >= t0) & (self.t[:n] <= t1)
        return self.late[:n][sel]


def paths_of(agg) -> tuple[int, int, int]:
    """Batches mapped by the fast, cached and slow path so far (zeros for a build without v2grt.ingest)."""
    router = getattr(agg, "router", None)
    return (router.fast, router.cached, router.slow) if router is not None else (0, 0, 0)


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def per_message_cost(fleet, scenarios: list[str], messages: int) -> dict:
    """What the bus thread does per message (decode with the roster limit, map ids to rows), timed in this
    thread with nothing else running: for a hostile frame that is one or two C calls, so it bounds the GIL
    hold the probe can only see through the noise of a shared machine."""
    from v2grt import ingest
    from v2grt.io import wire

    router = ingest.TelemetryRouter()
    layout = []
    for gw in fleet.gateway_ids:
        rows = fleet.gateway_rows(gw)
        layout.append((gw, wire.join_ids(fleet.node_ids[r] for r in rows), rows))
    router.set_roster(fleet, layout)
    big = [fleet.node_ids[r] for r in fleet.gateway_rows("gw1")]
    out = {}
    for scenario in scenarios:
        samples = []
        for frame in frames_for(scenario, messages, big):
            t0 = time.perf_counter_ns()
            try:
                router.route(wire.decode_telemetry(frame, strict=False, max_nodes=router.max_nodes, check_ids=False))
            except wire.WireError:
                pass
            samples.append(time.perf_counter_ns() - t0)
        if samples:
            a = np.array(samples) / 1e6
            out[scenario] = {"p50_ms": float(np.median(a)), "max_ms": float(a.max())}
    return out


def run(args) -> dict:
    import zmq

    from v2grt.aggregator import Aggregator
    from v2grt.config import config_from_dict
    from v2grt.fleet import Fleet

    cfg = config_from_dict({
        "fleet_id": "bench-ingest", "period_s": args.period_s, "budget_s": args.period_s, "meter": None,
        "realtime": {"sched_fifo_priority": args.fifo, "mlockall": True, "gc_freeze": True},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
        "service": {"name": "dc", "capacity_kw": 1000.0}, "fleet": {"random": args.vehicles}})
    fleet = Fleet.random(args.vehicles, seed=1, n_gateways=2, now_ns=time.monotonic_ns())
    cost = per_message_cost(fleet, args.scenarios, min(args.messages, 10))
    agg = Aggregator(cfg, epoch=1, fleet=fleet, ctx=zmq.Context())
    agg.start()
    agg.first_cycle.wait(10)
    time.sleep(1.0)  # warm-up cycles: gc frozen, switch interval set
    probe = Probe()
    probe.start()
    results = []
    try:
        for scenario in args.scenarios:
            child = subprocess.Popen([sys.executable, "-m", "v2grt.bench.bench_ingest", "--sender",
                                      agg.telemetry.endpoint, scenario, str(args.messages), str(args.gap_ms),
                                      str(args.vehicles)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
            ready = child.stdout.readline().split()
            frames0, errors0 = agg.telemetry.frames, sum(agg.telemetry.errors.values())
            paths0 = paths_of(agg)
            codes0 = dict(agg.telemetry.errors)
            miss0 = agg.stats.missed_deadlines + agg.stats.budget_overruns
            cycles0 = agg.stats.cycles
            rss0 = rss_mib()
            t0 = time.perf_counter_ns()
            child.stdin.write("go\n")
            child.stdin.flush()
            expect = args.messages if scenario != "idle" else 0
            deadline = time.monotonic() + 60
            if scenario == "idle":
                time.sleep(args.messages * args.gap_ms / 1e3)
            while (agg.telemetry.frames + sum(agg.telemetry.errors.values()) - frames0 - errors0 < expect
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            time.sleep(0.05)
            t1 = time.perf_counter_ns()
            child.wait(30)
            late = probe.window(t0, t1) / 1e6
            k = agg.stats.cycles - cycles0
            cyc = {m: agg.stats.samples(m)[-k:] / 1e6 if k else np.zeros(1) for m in ("total", "inputs", "lateness")}
            paths = tuple(b - a for a, b in zip(paths0, paths_of(agg)))
            results.append({
                "scenario": scenario, "messages": expect, "bytes_sent": int(ready[1]) if len(ready) > 1 else 0,
                "probe_wakes": int(late.size),
                "probe_late_p99_ms": float(np.percentile(late, 99)) if late.size else None,
                "probe_late_max_ms": float(late.max()) if late.size else None,
                "deadline_misses": agg.stats.missed_deadlines + agg.stats.budget_overruns - miss0,
                "cycles": k, "cycle_max_ms": float(cyc["total"].max()), "inputs_max_ms": float(cyc["inputs"].max()),
                "wake_late_max_ms": float(cyc["lateness"].max()),
                "rss_growth_mib": rss_mib() - rss0,
                "frames_by_code": {k: v - codes0.get(k, 0) for k, v in agg.telemetry.errors.items()
                                   if v - codes0.get(k, 0)},
                "paths_fast_cached_slow": paths,
            })
            print(f"{scenario}: {results[-1]}", file=sys.stderr, flush=True)
    finally:
        probe.stop.set()
        probe.join(2)
        rt = setup_report(agg)
        agg.stop()
    return {"benchmark": "ingest", "machine": machine(), "source": source_state(), "vehicles": args.vehicles,
            "gateway_vehicles": args.vehicles // 2, "period_s": args.period_s, "gap_ms": args.gap_ms,
            "switch_interval_ms": sys.getswitchinterval() * 1e3, "realtime": rt, "results": results,
            "per_message_cost": cost, "load_average": os.getloadavg()}


def render(r: dict) -> str:
    rows = [[x["scenario"], x["messages"], f"{x['bytes_sent'] / max(x['messages'], 1) / 1e6:.2f}",
             x["probe_late_p99_ms"], x["probe_late_max_ms"], x["deadline_misses"], x["wake_late_max_ms"],
             x["inputs_max_ms"], x["cycle_max_ms"], f"{x['rss_growth_mib']:+.1f}",
             " ".join(f"{k}={v}" for k, v in x["frames_by_code"].items()) or "-",
             "/".join(map(str, x["paths_fast_cached_slow"]))] for x in r["results"]]
    return (f"receive path, {r['vehicles']} vehicles ({r['gateway_vehicles']} on the legitimate gateway), loop "
            f"{r['period_s'] * 1e3:g} ms, a message every {r['gap_ms']:g} ms, switch interval "
            f"{r['switch_interval_ms']:g} ms\n"
            + table(["scenario", "msgs", "MB/msg", "probe late p99 ms", "max ms", "misses", "loop late max ms",
                     "inputs max ms", "cycle max ms", "RSS MiB",
                     "dropped frames by code", "fast/cached/slow"], rows)
            + "\n\nper message on the bus thread's path alone (decode + map to rows), ms\n"
            + table(["scenario", "p50 ms", "max ms"],
                    [[k, v["p50_ms"], v["max_ms"]] for k, v in r["per_message_cost"].items()])
            + f"\nload average {' '.join(f'{x:.1f}' for x in r['load_average'])}")


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"vehicles": 2000, "messages": 3, "gap_ms": 5.0}


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--sender"]:
        endpoint, scenario, messages, gap_ms, vehicles = sys.argv[2:7]
        sender(endpoint, scenario, int(messages), float(gap_ms), int(vehicles))
        return 0
    ap = argparse.ArgumentParser(prog="v2grt bench ingest", description=__doc__.split("\n")[0])
    ap.add_argument("--vehicles", type=int, default=100_000, help="fleet size; half of it is one gateway")
    ap.add_argument("--messages", type=int, default=40, help="messages per scenario")
    ap.add_argument("--gap-ms", type=float, default=25.0, help="time between two messages of a scenario")
    ap.add_argument("--period-s", type=float, default=0.1, help="control period (the shipped default)")
    ap.add_argument("--fifo", type=int, default=0, help="SCHED_FIFO priority of the control thread (0: none)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated subset of " + ", ".join(SCENARIOS))
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    args.scenarios = args.scenarios.split(",")
    emit(run(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
