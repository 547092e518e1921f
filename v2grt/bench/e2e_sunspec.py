"""End to end over SunSpec: a frequency step at the meter to each simulated charger applying its new power.

    v2grt bench e2e --protocol sunspec [--chargers 100] [--trials 200] [--priorities 0/0,40/30] [--json]

Every part is a real process on loopback, as deployed: this process serves the grid meter (a
``SunSpecMeter``, model 213, on a real pymodbus server) and watches the setpoints (a SUB on
``sp/sunspec1``); `v2grt run` on configs/default.yaml as shipped (period 100 ms, meter poll 5 ms, DC
service) is the aggregator; `v2grt gateway sunspec` (its defaults) drives the chargers; `v2grt sim
sunspec-chargers` (its defaults: 5-20 ms command latency, one pymodbus server per charger) plays
them and records, with its own CLOCK_MONOTONIC, when each setpoint write arrived and when the
charger took it as its new target (``--trace-out``).

The meter steps between 49.5 and 50.5 Hz (GB DC: full discharge, full charge) after a random pause
(``--gap-s`` plus up to two periods, so steps fall at every phase of the period and the poll). For
each step and each charger the step moved, the time from just after ``SunSpecMeter.set_frequency``
to the charger applying the first setpoint that moved it in the new direction, split into
meter->publish (meter poll, wait for the next cycle, the cycle; observed where a gateway would
receive it), publish->write (ZeroMQ to the gateway, the gateway, the Modbus write arriving at the
charger) and write->applied (the charger's own command latency). Reported per charger and for the
last charger of each step. Goal (issue 11): p99 <= period + 30 ms with 100 devices.

Each row of ``--priorities`` runs the gateway and the simulator at those SCHED_FIFO priorities (0:
SCHED_OTHER), rows interleaved over ``--rounds``, so that a shared machine's load falls on every row
alike and the rows compare as ratios.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from v2grt.bench._common import (
    add_smoke_option,
    apply_smoke,
    child_env,
    emit,
    machine,
    quiet_pymodbus,
    source_state,
    stats_ms,
    table,
)

GATEWAY_ID = "sunspec1"
F_DISCHARGE_HZ, F_CHARGE_HZ = 49.5, 50.5
#: A setpoint counts as the step's once it moved this far in the new direction (above the gateway's
#: 0.2 kW deadband; the aggregator's node ramp, 100 kW/s, moves an 11 kW charger 10 kW in its first cycle).
MOVED_KW = 1.0
PHASES = ("meter_to_publish", "publish_to_write", "write_to_applied")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Observer:
    """A SUB on the gateway's setpoint topic in a thread: (arrival CLOCK_MONOTONIC ns, {row: kW}) per message."""

    def __init__(self, ctx, endpoint: str, row_of: dict[str, int]):
        from v2grt.io import bus

        self.sub = bus.GatewaySubscriber(ctx, endpoint, GATEWAY_ID, rcvhwm=1000)
        self.row_of = row_of
        self.messages: list[tuple[int, np.ndarray]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = len(self.row_of)
        while not self._stop.is_set():
            msg = self.sub.recv(50)
            if msg is None:
                continue
            t_ns = time.monotonic_ns()
            p = np.zeros(n)
            for nid, kw in zip(msg.node_ids, msg.p_kw.tolist()):
                row = self.row_of.get(nid)
                if row is not None:
                    p[row] = kw
            self.messages.append((t_ns, p))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sub.close()


def step_latencies(steps: list[tuple[int, float]], messages: list[tuple[int, np.ndarray]], trace: dict,
                   n: int) -> dict:
    """Per (step, charger): step -> publish -> write arrival -> applied, in ns (pure: the recorded times in).

    ``steps``: (t_step_ns, +1 discharge / -1 charge); ``messages``: the observer's (t_ns, p_kw per row);
    ``trace``: the simulator's save_trace arrays. A charger counts in a step when a message after the step
    moved its setpoint by MOVED_KW in the new direction from the last one before the step; its write and
    its apply are the first after that publish that moved it likewise.
    """
    t_msg = np.array([t for t, _p in messages], np.int64)
    p_msg = np.array([p for _t, p in messages]) if messages else np.zeros((0, n))
    by_row_w = _by_row(trace["write_t_ns"], trace["write_row"], trace["write_kw"], n)
    by_row_a = _by_row(trace["apply_t_ns"], trace["apply_row"], trace["apply_kw"], n)
    per = {k: [] for k in ("total", *PHASES)}
    last = {k: [] for k in ("total", *PHASES)}
    missing = 0
    for k, (t_step, sign) in enumerate(steps):
        t_next = steps[k + 1][0] if k + 1 < len(steps) else np.iinfo(np.int64).max
        before = np.searchsorted(t_msg, t_step) - 1
        if before < 0:
            continue
        p0 = p_msg[before]
        after = np.flatnonzero((t_msg > t_step) & (t_msg < t_next))
        rows_total = []
        for row in range(n):
            moved = [j for j in after if sign * (p_msg[j, row] - p0[row]) > MOVED_KW]
            if not moved:
                continue
            t_pub = int(t_msg[moved[0]])
            t_w = _first(by_row_w[row], t_step, t_next, p0[row], sign)
            t_a = _first(by_row_a[row], t_step, t_next, p0[row], sign)
            if t_w is None or t_a is None:
                missing += 1
                continue
            parts = {"total": t_a - t_step, "meter_to_publish": t_pub - t_step, "publish_to_write": t_w - t_pub,
                     "write_to_applied": t_a - t_w}
            for key, v in parts.items():
                per[key].append(v)
            rows_total.append(parts)
        if rows_total:
            worst = max(rows_total, key=lambda x: x["total"])
            for key, v in worst.items():
                last[key].append(v)
    return {"per_charger": per, "last_charger": last, "missing": missing}


def _by_row(t_ns, rows, kw, n):
    out = [([], []) for _ in range(n)]
    for t, r, p in zip(np.asarray(t_ns).tolist(), np.asarray(rows).tolist(), np.asarray(kw).tolist()):
        if 0 <= r < n:
            out[r][0].append(t)
            out[r][1].append(p)
    return [(np.array(t, np.int64), np.array(p)) for t, p in out]


def _first(events, t_from: int, t_to: int, p0: float, sign: float) -> int | None:
    t, p = events
    sel = np.flatnonzero((t > t_from) & (t < t_to) & (sign * (p - p0) > MOVED_KW))
    return int(t[sel[0]]) if sel.size else None


def merged_trace(parts: list[tuple[Path, Path]], row_of: dict[str, int]) -> dict[str, np.ndarray]:
    """The simulators' save_trace files as one, each (trace, its roster) part's rows mapped to the site's by node id."""
    with_rows = []
    for trace_path, roster in parts:
        with open(roster, newline="") as fh:
            ids = [r[0] for r in list(csv.reader(fh))[1:]]
        to_site = np.array([row_of[nid] for nid in ids], np.int64)
        t = dict(np.load(trace_path))
        t["write_row"], t["apply_row"] = to_site[t["write_row"]], to_site[t["apply_row"]]
        with_rows.append(t)
    return {k: np.concatenate([t[k] for t in with_rows]) for k in with_rows[0]}


def wait_heard(ctx, control: str, procs: dict, timeout_s: float) -> float:
    """Heard before dispatched: until every charger's telemetry reached the aggregator; the seconds it took."""
    from v2grt.bench.bench_fuzz import status

    t0 = time.monotonic()
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before every charger was heard")
        st = status(ctx, control) or {}
        if st.get("never_heard") == 0 and (st.get("nodes_by_reason") or {}).get("OFFLINE", 0) == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"not every charger heard within {timeout_s:.0f} s: never_heard="
                               f"{st.get('never_heard')} by reason {st.get('nodes_by_reason')}")
        time.sleep(0.3)


def _instruments_fifo(priority: int) -> None:
    """Every thread of this process (the meter's server, the observer, the stepping loop) at SCHED_FIFO
    `priority` while the meter steps, then (0) back to SCHED_OTHER before the next row starts its processes,
    which would inherit it: a meter is hardware of its own and the observer and the step's time stamp are
    clocks; none should wait behind other users of a shared machine (that would be charged to v2grt, or
    to its credit). Not granted: they stay as they are."""
    from v2grt.loop import set_process_fifo

    set_process_fifo(priority)


def measure(args, gateway_priority: int, sim_priority: int) -> dict:
    """One run: start the four processes, step the meter ``args.trials`` times, stop them; the raw samples."""
    import zmq

    from v2grt.bench.bench_fuzz import _fields, _find_line, _Procs, start_aggregator, status
    from v2grt.bench.gateway_sunspec import place_on_ports, split_site, wait_sims_serving
    from v2grt.fleet import Fleet
    from v2grt.gateway.sim import gateway_fleet
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter
    from v2grt.sim.sunspec_chargers import write_site
    from v2grt.testing import wait_until

    n = args.chargers
    tmp = Path(tempfile.mkdtemp(prefix="v2g-e2e-sunspec-"))
    paths = write_site(tmp / "site", n_devices=n, gateway_id=GATEWAY_ID, base_port=args.base_port or 1,
                       units_per_server=args.units_per_server)
    place_on_ports(paths["devices"], args.base_port)
    fleet = gateway_fleet(Fleet.from_csv(paths["roster"]), GATEWAY_ID)
    row_of = {nid: i for i, nid in enumerate(fleet.node_ids[: fleet.n_rows])}
    meter = SunSpecMeter(213, f_hz=F_CHARGE_HZ)
    msim = SimServerThread([meter], name="bench-meter").start()
    procs = _Procs()
    ctx = zmq.Context()
    observer = None
    cli = [sys.executable, "-m", "v2grt.cli"]
    gw_log = tmp / "gateway.log"
    # The chargers over --sim-processes simulators (devices with CPUs of their own, not 100 answers queued on
    # one event loop); each records its writes and applies by its own rows, mapped back by node id.
    parts = split_site(paths["roster"], paths["devices"], args.sim_processes, tmp / "sims")
    sims = []
    try:
        agg, ep, cfg, rt = start_aggregator(tmp, paths["roster"], msim.port(meter), args.priority, procs)
        for k, (roster_k, devices_k) in enumerate(parts):
            log_k = tmp / f"sim{k}.log"
            with open(tmp / f"sim{k}.stderr", "w") as err:  # the child keeps its own descriptor
                sims.append((log_k, tmp / f"trace{k}.npz", roster_k, procs.add(f"sim{k}", subprocess.Popen(
                    [*cli, "sim", "sunspec-chargers", "--roster", str(roster_k), "--devices", str(devices_k),
                     "--gateway-id", GATEWAY_ID, "--trace-out", str(tmp / f"trace{k}.npz"), "--log-file",
                     str(log_k), "--sched-fifo-priority", str(sim_priority)],
                    stdout=subprocess.DEVNULL, stderr=err, env=child_env(), cwd=tmp))))
        # all serving, or the gateway backs off
        wait_sims_serving([(log_k, tmp / f"sim{k}.stderr", proc) for k, (log_k, _t, _r, proc) in enumerate(sims)],
                          60)
        gw = procs.add("gateway", subprocess.Popen(
            [*cli, "gateway", "sunspec", "--roster", str(paths["roster"]), "--gateway-id", GATEWAY_ID, "--devices",
             str(paths["devices"]), "--setpoints", ep["setpoints"], "--telemetry", ep["telemetry"],
             "--log-file", str(gw_log), "--sched-fifo-priority", str(gateway_priority), *args.gateway_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=tmp))
        observer = Observer(ctx, ep["setpoints"], row_of).start()
        watched = {"aggregator": agg, "gateway": gw, **{f"sim{k}": x[3] for k, x in enumerate(sims)}}
        heard_s = wait_heard(ctx, ep["control"], watched, 60.0)
        # Dispatched before the first step (the merit order may leave a charger or two at less; each charger's
        # step is measured from its own setpoint before it).
        wait_until(lambda: bool(observer.messages) and (observer.messages[-1][1] < -MOVED_KW).mean() >= 0.5, 20.0,
                   "the chargers charging before the first step")
        if args.bench_priority:
            _instruments_fifo(args.bench_priority)
        time.sleep(args.gap_s)
        period_s = float(cfg["period_s"])
        rng = np.random.default_rng(args.seed)
        steps: list[tuple[int, float]] = []
        cpu0 = {name: cpu_s(p.pid) for name, p in watched.items()}
        t0 = time.monotonic()
        for k in range(args.trials):
            f_hz = F_DISCHARGE_HZ if k % 2 == 0 else F_CHARGE_HZ
            meter.set_frequency(f_hz)
            steps.append((time.monotonic_ns(), 1.0 if f_hz == F_DISCHARGE_HZ else -1.0))
            time.sleep(args.gap_s + float(rng.uniform(0.0, 2 * period_s)))
        elapsed = time.monotonic() - t0
        each = {name: 100.0 * (cpu_s(p.pid) - cpu0[name]) / elapsed for name, p in watched.items()}
        # the age of the meter sample each cycle took (the aggregator's own ring of cycles, this run's)
        meter_age = ((status(ctx, ep["control"]) or {}).get("loop") or {}).get("input_age") or {}
        cpu = {"aggregator": each["aggregator"], "gateway": each["gateway"],
               "sim": sum(v for k, v in each.items() if k.startswith("sim"))}
        load = os.getloadavg()
        observer.stop()
        codes = {"gateway": procs.stop(gw), "sim": max(procs.stop(x[3]) for x in sims),
                 "aggregator": procs.stop(agg)}
        trace = merged_trace([(t, r) for _l, t, r, _p in sims], row_of)
        stop_line = _find_line(gw_log, "GATEWAY_STOP") or ""
        rt_gateway = sum(" granted=True " in line for line in gw_log.read_text().splitlines() if "RT_SETUP" in line)
    finally:
        if args.bench_priority:
            _instruments_fifo(0)
        if observer is not None and observer._thread.is_alive():
            observer.stop()
        procs.stop_all()
        msim.stop()
        ctx.term()
    lat = step_latencies(steps, observer.messages, trace, n)
    # What the aggregator adds for a small fleet: its deadlines are k x period on CLOCK_MONOTONIC (v2grt.loop), so
    # a message's arrival here modulo the period is the time from the deadline to the setpoints at a gateway's SUB
    # (the wake, the cycle, the publisher thread, ZeroMQ over loopback).
    period_ns = round(period_s * 1e9)
    to_sub = [t % period_ns for t, _p in observer.messages if steps[0][0] <= t <= steps[-1][0] + period_ns]
    return {"gateway_priority": gateway_priority, "sim_priority": sim_priority, "period_ms": period_s * 1e3,
            "meter_poll_ms": cfg["meter"]["poll_interval_s"] * 1e3, "realtime": rt, "heard_after_s": heard_s,
            "steps": len(steps), "samples": lat, "missing": lat["missing"], "meter_age_at_cycle_ms": meter_age,
            "deadline_to_gateway_sub_raw": to_sub,
            "steps_unanswered": len(steps) - len(lat["last_charger"]["total"]), "load_average": load,
            "cpu_percent_of_a_core": cpu, "exit_codes": codes, "gateway_threads_fifo": rt_gateway,
            "gateway_counters": {k: int(v) for k, v in _fields(stop_line).items()
                                 if k.startswith("modbus_") or k == "accepted"},
            "tmp": str(tmp)}


def _summary(runs: list[dict]) -> dict:
    """One variant's runs (rounds) pooled: percentiles per phase, counts summed, CPU and load averaged."""
    per = {k: [v for r in runs for v in r["samples"]["per_charger"][k]] for k in ("total", *PHASES)}
    last = {k: [v for r in runs for v in r["samples"]["last_charger"][k]] for k in ("total", *PHASES)}
    goal_ms = runs[0]["period_ms"] + 30.0
    missing = sum(r["missing"] for r in runs)
    unanswered = sum(r["steps_unanswered"] for r in runs)
    p99 = stats_ms(per["total"]).get("p99_ms")
    return {
        "gateway_priority": runs[0]["gateway_priority"], "sim_priority": runs[0]["sim_priority"],
        "rounds": len(runs), "steps": sum(r["steps"] for r in runs),
        "per_charger": {k: stats_ms(v) for k, v in per.items()},
        "last_charger": {k: stats_ms(v) for k, v in last.items()},
        "missing": missing, "steps_unanswered": unanswered, "goal_ms": goal_ms,
        "goal_met": p99 is not None and missing == 0 and unanswered == 0 and p99 <= goal_ms,
        "load_average": [r["load_average"][0] for r in runs],
        "meter_age_at_cycle_ms": [r["meter_age_at_cycle_ms"] for r in runs],
        "deadline_to_gateway_sub_ms": stats_ms([v for r in runs for v in r["deadline_to_gateway_sub_raw"]]),
        "cpu_percent_of_a_core": {k: float(np.mean([r["cpu_percent_of_a_core"][k] for r in runs]))
                                  for k in runs[0]["cpu_percent_of_a_core"]},
        "exit_codes": [r["exit_codes"] for r in runs],
        "gateway_threads_fifo": [r["gateway_threads_fifo"] for r in runs],
        "gateway_counters": [r["gateway_counters"] for r in runs],
        "heard_after_s": [r["heard_after_s"] for r in runs],
        "tmp": [r["tmp"] for r in runs],
    }


def run(args) -> dict:
    """Each variant (gateway/simulator priorities) ``args.rounds`` times, interleaved so that the load of a shared
    machine falls on all alike; per variant the pooled latencies."""
    quiet_pymodbus()  # the meter's server logs the aggregator's cancelled requests at stop: noise, not a result
    runs: dict[tuple[int, int], list[dict]] = {v: [] for v in args.priorities}
    for _round in range(args.rounds):
        for variant in args.priorities:
            runs[variant].append(measure(args, *variant))
    first = next(iter(runs.values()))[0]
    return {
        "benchmark": "e2e", "protocol": "sunspec", "machine": machine(), "source": source_state(),
        "config": {"chargers": args.chargers, "units_per_server": args.units_per_server, "trials": args.trials,
                   "rounds": args.rounds, "gap_s": args.gap_s, "sim_processes": args.sim_processes,
                   "period_ms": first["period_ms"],
                   "meter_poll_ms": first["meter_poll_ms"], "gateway_args": args.gateway_args,
                   "steps_hz": [F_DISCHARGE_HZ, F_CHARGE_HZ], "moved_kw": MOVED_KW, "realtime": first["realtime"],
                   "bench_priority": args.bench_priority},
        "results": [_summary(rs) for rs in runs.values()],
    }


def render(r: dict) -> str:
    m, c = r["machine"], r["config"]
    out = [f"frequency step at the SunSpec meter -> simulated charger applying its new power, on {m['cpu']} "
           f"({m['cores']} cores); {c['chargers']} chargers ({c['units_per_server']} unit id(s) per port, "
           f"{c['sim_processes']} simulator processes), "
           f"{c['trials']} steps x {c['rounds']} round(s) per row, period {c['period_ms']:g} ms, meter poll "
           f"{c['meter_poll_ms']:g} ms; meter and observer at SCHED_FIFO {c['bench_priority']}"]
    for x in r["results"]:
        rows = []
        for who in ("per_charger", "last_charger"):
            for k in ("total", *PHASES):
                s = x[who][k]
                rows.append([who.replace("_", " "), k.replace("_to_", "->"), s.get("n", 0), s.get("p50_ms"),
                             s.get("p99_ms"), s.get("max_ms"), s.get("mean_ms")])
        cpu = ", ".join(f"{k} {v:.1f} %" for k, v in x["cpu_percent_of_a_core"].items())
        verdict = "MET" if x["goal_met"] else "NOT MET"
        d = x["deadline_to_gateway_sub_ms"]
        out += ["", f"gateway SCHED_FIFO priority {x['gateway_priority']}, simulator {x['sim_priority']} (0: "
                    f"SCHED_OTHER); load average {', '.join(f'{v:.1f}' for v in x['load_average'])}",
                table(["charger", "phase", "n", "p50 ms", "p99 ms", "max ms", "mean ms"], rows),
                f"goal: p99 (per charger) <= period + 30 ms = {x['goal_ms']:g} ms: {verdict}; chargers missing a "
                f"write or apply {x['missing']}, steps no charger answered {x['steps_unanswered']}",
                f"CPU during the steps (% of one core): {cpu}",
                "meter sample age when a cycle took it (the aggregator's cycles, each round): "
                + "; ".join(f"p50 {a.get('p50_ms', math.nan):.2f} p99 {a.get('p99_ms', math.nan):.2f} ms"
                            for a in x["meter_age_at_cycle_ms"]),
                "the cycle's deadline -> its setpoints at a gateway's SUB (the aggregator's part): p50 "
                f"{d.get('p50_ms', math.nan):.2f} p99 {d.get('p99_ms', math.nan):.2f} "
                f"max {d.get('max_ms', math.nan):.2f} ms over {d.get('n', 0)} cycles"]
    if len(r["results"]) > 1:
        base = r["results"][0]["per_charger"]["total"]
        for x in r["results"][1:]:
            t = x["per_charger"]["total"]
            if base.get("n") and t.get("n"):
                out.append(f"priorities {x['gateway_priority']}/{x['sim_priority']} vs "
                           f"{r['results'][0]['gateway_priority']}/{r['results'][0]['sim_priority']}: p50 x"
                           f"{t['p50_ms'] / base['p50_ms']:.2f}, p99 x{t['p99_ms'] / base['p99_ms']:.2f}")
    return "\n".join(out)


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"chargers": 4, "trials": 4, "gap_s": 0.4, "priorities": [(1, 1)]}


def _priorities(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        g, _, s = item.partition("/")
        out.append((int(g), int(s or 0)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench e2e --protocol sunspec", description=__doc__.splitlines()[0])
    ap.add_argument("--chargers", type=int, default=100)
    ap.add_argument("--units-per-server", type=int, default=1, help="unit ids per TCP port of the simulator (1)")
    ap.add_argument("--trials", type=int, default=200, help="frequency steps")
    ap.add_argument("--gap-s", type=float, default=0.6,
                    help="pause between steps (plus a random 0..2 periods); long enough for the last step's "
                         "setpoints to settle")
    ap.add_argument("--base-port", type=int, default=None,
                    help="the simulators' first TCP port (default: ports free at the start, so two runs at once "
                         "do not collide)")
    ap.add_argument("--sim-processes", type=int, default=2,
                    help="simulator processes sharing the chargers (2: as many as this machine's cores)")
    ap.add_argument("--priority", type=int, default=None,
                    help="the aggregator's SCHED_FIFO priority (default: configs/default.yaml's)")
    ap.add_argument("--priorities", type=_priorities, default=[(0, 0), (40, 30)],
                    help="GATEWAY/SIMULATOR SCHED_FIFO priorities, one row each, comma-separated (default 0/0,40/30: "
                         "as started by hand, and with the gateway at 40 below the aggregator's 50 and the "
                         "simulated chargers at 30, as devices with CPUs of their own)")
    ap.add_argument("--bench-priority", type=int, default=45,
                    help="SCHED_FIFO priority of this process's meter server and setpoint observer (default 45, "
                         "between the aggregator's 50 and the gateway's 40; 0: SCHED_OTHER)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, interleaved, and pool them (a shared machine's load drifts)")
    ap.add_argument("--gateway-arg", dest="gateway_args", action="append", default=[],
                    help="an extra argument for `v2grt gateway sunspec` (repeat; e.g. --gateway-arg=--poll-s=0.5)")
    ap.add_argument("--seed", type=int, default=3)
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    emit(run(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
