"""Capacity of one OCPP gateway process: its CPU (% of one core, from /proc) at N stations and R updates/s.

    v2grt bench gateway --protocol ocpp [--loads 1000@1,100@10] [--evses 2] [--measure-s 20] [--json]

For each load STATIONS@RATE: a site of STATIONS x --evses EVSEs, the Aggregator in this process
(period 100 ms, GB DC), `v2grt gateway ocpp` (TLS, Basic auth) and the stations as `v2grt sim
ocpp-stations` processes (--sim-processes shards of the site), all on loopback. An update is one
exchange each way per EVSE: every EVSE sends MeterValues every 1/RATE s, and the meter frequency
alternates between 49.5 and 50.5 Hz every 1/RATE s with the contracted capacity equal to the fleet's, so
every EVSE's setpoint swings between full discharge and full charge and goes out as an
UpdateDynamicSchedule. Once every EVSE is online, the
gateway's CPU time (user + system, all its threads) is read from /proc/PID/stat over --measure-s;
the stations' processes and the aggregator are the load, not counted (their CPU is reported apart).
The message counts of the gateway over the same window show the load was really carried.

Goal (issue 11): 1,000 stations at 1/s in <= 50 % of a core.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from v2grt.bench._common import (
    World,
    add_smoke_option,
    aggregator_config,
    apply_smoke,
    emit,
    machine,
    source_state,
    table,
)
from v2grt.bench._ocpp_rig import Rig, process_cpu_s, uptime
from v2grt.bench._ocpp_rig import online_heard as _online

#: GB DC's full discharge and full charge, with the contracted capacity = the fleet's: every EVSE swings between
#: +11 and -11 kW at each change (within DC's linear band the allocation moves only the marginal EVSEs)
F_LOW_HZ, F_HIGH_HZ = 49.5, 50.5


def measure(stations: int, rate: float, args, directory: Path) -> dict:
    from v2grt.aggregator import Aggregator
    from v2grt.fleet import Fleet

    n = stations * args.evses
    rig = Rig(directory, stations=stations, evses=args.evses, plaintext=args.plaintext).write_site()
    fleet = Fleet.from_csv(rig.paths["roster"])
    interval_s = 1.0 / rate
    with World(meter_model=213, f_hz=F_LOW_HZ) as world:
        cfg = aggregator_config(period_s=0.1, meter_port=world.meter_port, n_nodes=n, poll_s=0.02,
                                capacity_kw=float(fleet.p_dis_max_kw[:n].sum()))
        agg = Aggregator(cfg, epoch=1, fleet=fleet)
        agg.start()
        try:
            trace = directory / "gateway.trace"
            # the per-station message rate limit (default 20/s) sized for the load: at 10/s a station with two
            # EVSEs sends 20 MeterValues a second and would be rate-limited and disconnected
            per_station = 2.0 * args.evses * rate
            limit = ["--rate-per-s", f"{max(20.0, per_station):g}", "--burst", f"{max(40.0, 2 * per_station):g}"]
            rig.start_gateway(agg.publisher.endpoint, agg.telemetry.endpoint, "--trace-file", str(trace), *limit,
                              *args.gateway_args)
            rig.start_stations("--meter-interval-s", f"{interval_s:g}", processes=args.sim_processes)
            deadline = time.monotonic() + args.connect_timeout_s
            t_up = time.monotonic()
            while _online(agg.fleet, n) < n:
                rig.alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{_online(agg.fleet, n)} of {n} EVSEs online after "
                                       f"{args.connect_timeout_s:g} s ({directory}/gateway.log)")
                time.sleep(0.2)
            online_s = time.monotonic() - t_up
            # the frequency alternates at the update rate from here on; settle, then measure
            f_next, t_next = F_HIGH_HZ, time.monotonic()
            t_measure, t_end = t_next + args.settle_s, t_next + args.settle_s + args.measure_s
            c0 = s0 = t0 = None
            load = uptime()
            while True:
                now = time.monotonic()
                if c0 is None and now >= t_measure:
                    c0, t0, t0_ns = process_cpu_s(rig.gateway.pid), now, time.monotonic_ns()
                    s0 = rig.sims_cpu_s()
                    a0 = os.times()
                if now >= t_end:
                    break
                if now >= t_next:
                    world.call("set_frequency", f_hz=f_next)
                    f_next = F_LOW_HZ if f_next == F_HIGH_HZ else F_HIGH_HZ
                    t_next += interval_s
                wake = min(t_next, t_end) if c0 is not None else min(t_next, t_end, t_measure)  # start on time
                time.sleep(max(wake - time.monotonic(), 0.0))
            wall, t1_ns = time.monotonic() - t0, time.monotonic_ns()
            gw_cpu = 100.0 * (process_cpu_s(rig.gateway.pid) - c0) / wall
            sim_cpu = 100.0 * (rig.sims_cpu_s() - s0) / wall
            a1 = os.times()
            agg_cpu = 100.0 * ((a1.user - a0.user) + (a1.system - a0.system)) / wall
            online_end = int(agg.fleet.online[:n].sum())
            load_after = uptime()
        finally:
            codes = rig.stop()
            agg.stop()
    counters = rig.gateway_counters()
    sent = calls = 0
    with open(trace, newline="") as fh:  # event, t_handed_ns, t_sent_ns, row, p_kw
        for r in list(csv.reader(fh))[1:]:
            if t0_ns <= int(r[2]) < t1_ns:
                sent += r[0] == "update"
                calls += r[0] == "call"
    # the gateway's CPU per unit of work actually done (a starved load generator asks for less than planned)
    per_1000 = gw_cpu / ((sent + calls) / wall) * 1000.0 if sent + calls else None
    return {
        "stations": stations, "evses_per_station": args.evses, "nodes": n, "rate_per_s": rate,
        "gateway_cpu_percent": gw_cpu, "stations_cpu_percent": sim_cpu, "aggregator_process_cpu_percent": agg_cpu,
        "measure_s": wall, "online_after_s": online_s, "online_at_end": online_end,
        "gateway_counters": counters, "sim_processes": len(rig.shards),
        "updates_per_s_expected": n * rate, "updates_per_s": sent / wall, "calls_per_s": calls / wall,
        "gateway_cpu_percent_per_1000_messages_per_s": per_1000,
        "projected_cpu_percent_at_load": None if per_1000 is None else per_1000 * 2 * n * rate / 1000.0,
        "exit_codes": codes,
        "load": {"before": load, "after": load_after},
    }


def run(args) -> dict:
    rows = []
    for stations, rate in args.loads:
        with tempfile.TemporaryDirectory(prefix="v2g-gw-ocpp-") as tmp:
            directory = Path(args.keep) / f"{stations}at{rate:g}" if args.keep else Path(tmp)
            directory.mkdir(parents=True, exist_ok=True)
            rows.append(measure(stations, rate, args, directory))
    return {"benchmark": "gateway", "protocol": "ocpp", "machine": machine(), "source": source_state(),
            "config": {"loads": [f"{s}@{r:g}" for s, r in args.loads], "evses": args.evses,
                       "measure_s": args.measure_s, "tls": not args.plaintext, "sim_processes": args.sim_processes,
                       "gateway_args": args.gateway_args, "steps_hz": [F_LOW_HZ, F_HIGH_HZ],
                       "cpu_count": os.cpu_count()},
            "goal": "1,000 stations at 1/s in <= 50 % of a core", "results": rows}


def render(r: dict) -> str:
    m, c = r["machine"], r["config"]
    head = (f"one `v2grt gateway ocpp` process: CPU (% of one core) by load, on {m['cpu']} ({m['cores']} cores), "
            f"python {m['python']}; {c['evses']} EVSEs per station, TLS {'on' if c['tls'] else 'off'}, "
            f"{c['measure_s']:g} s per load; an update = one MeterValues and one UpdateDynamicSchedule per EVSE")
    rows = []
    for x in r["results"]:
        gc = x["gateway_counters"]
        rows.append([x["stations"], x["nodes"], x["rate_per_s"], round(x["gateway_cpu_percent"], 1),
                     round(x["stations_cpu_percent"], 1), x["online_at_end"], round(x["updates_per_s"]),
                     round(x["updates_per_s_expected"]), round(x["calls_per_s"]),
                     _r(x["gateway_cpu_percent_per_1000_messages_per_s"]), _r(x["projected_cpu_percent_at_load"]),
                     gc.get("call_timeouts", 0), x["load"]["before"]])
    return "\n".join([head, table(["stations", "EVSEs", "rate /s", "gateway CPU %", "stations CPU %", "online",
                                   "updates/s", "planned/s", "calls in/s", "CPU % per 1000 msg/s",
                                   "CPU % projected", "timeouts", "load"], rows),
                      "(a message = an UpdateDynamicSchedule sent or a CALL received; projected = the per-message cost "
                      "times the planned load: 2 messages per EVSE per update)",
                      f"goal: {r['goal']}"])


def _r(x):
    return None if x is None else round(x, 1)


def _loads(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        stations, _, rate = part.partition("@")
        if not stations.isdigit() or not rate:
            raise argparse.ArgumentTypeError(f"--loads {part!r}: expected STATIONS@RATE, e.g. 1000@1")
        out.append((int(stations), float(rate)))
    return out


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"loads": [(4, 2.0)], "measure_s": 2.0, "settle_s": 1.0, "sim_processes": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench gateway --protocol ocpp", description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=_loads, default=_loads("1000@1,100@10"),
                    help="comma-separated STATIONS@RATE (updates per second per EVSE), default 1000@1,100@10")
    ap.add_argument("--evses", type=int, default=2, help="EVSEs per station (default 2)")
    ap.add_argument("--measure-s", type=float, default=20.0, help="CPU measured over this long (default 20 s)")
    ap.add_argument("--settle-s", type=float, default=5.0, help="after every EVSE is online (default 5 s)")
    ap.add_argument("--sim-processes", type=int, default=2, help="simulator processes sharing the stations (2)")
    ap.add_argument("--plaintext", action="store_true", help="ws:// without TLS (default: TLS, security profile 2)")
    ap.add_argument("--connect-timeout-s", type=float, default=240.0)
    ap.add_argument("--gateway-args", type=shlex.split, default=[],
                    help="extra `v2grt gateway ocpp` options, one quoted string")
    ap.add_argument("--keep", help="keep sites, logs and traces under this directory")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    emit(run(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
