"""Capacity of one SunSpec gateway process: how many chargers it keeps at its poll rate, and its CPU.

    v2grt bench gateway --protocol sunspec [--devices 100,300,1000] [--measure-s 20] [--json]

For each fleet size, real processes on loopback: `v2grt run` on configs/default.yaml as shipped (the
meter, served from this process, holds ``--f-hz`` 49.6 Hz, so under DC about a third of the
capacity discharges and every discharging charger gets the refresh write every ``revert_s / 3``);
`v2grt sim sunspec-chargers` split over ``--sim-processes`` processes (``--units-per-server`` unit
ids per TCP port) as the load; `v2grt gateway sunspec` at its defaults (poll 1/s, telemetry 1/s,
``--revert-s 2``) logging its counters every second. Once every charger is heard and a settling
pause has passed, the gateway's CPU (user + system from /proc, % of one core) and its counters
(GATEWAY_STATS lines) are taken over ``--measure-s``; the load generators' CPU is shown, not
counted. A size is *held* when every charger stays connected, no request times out or fails, and
the polls reach 95 % of the poll rate. Goal (issue 11, by analogy with OCPP): 1,000 devices in
<= 50 % of a core.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from v2grt.bench._common import (
    add_smoke_option,
    apply_smoke,
    child_env,
    emit,
    machine,
    quiet_pymodbus,
    source_state,
    table,
)

GATEWAY_ID = "sunspec1"
GOAL_DEVICES, GOAL_CPU_PCT = 1000, 50.0
HOLD_POLL_FRACTION = 0.95


def split_site(roster: Path, devices: Path, parts: int, out: Path) -> list[tuple[Path, Path]]:
    """The site's chargers in ``parts`` contiguous slices, a (roster, devices) file pair each, for one simulator
    process per slice (a slice keeps whole TCP ports: the devices file is grouped by port)."""
    with open(roster, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(devices, newline="") as fh:
        devs = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    dhead, by_node = devs[0], {r[0]: r for r in devs[1:]}
    ports = sorted({by_node[r[0]][2] for r in body}, key=int)
    per = -(-len(ports) // parts)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k in range(parts):
        mine = set(ports[k * per:(k + 1) * per])
        if not mine:
            break
        sel = [r for r in body if by_node[r[0]][2] in mine]
        pr, pd = out / f"roster_{k}.csv", out / f"devices_{k}.csv"
        with open(pr, "w", newline="") as fh:
            csv.writer(fh).writerows([head, *sel])
        with open(pd, "w", newline="") as fh:
            csv.writer(fh).writerows([dhead, *(by_node[r[0]] for r in sel)])
        pairs.append((pr, pd))
    return pairs


def place_on_ports(devices: Path, base_port: int | None) -> list[int]:
    """The simulators' TCP ports, one per server of the devices file (as write_site laid them out from a base
    port): kept from ``base_port`` on when one was given, else ports that were free a moment ago
    (procrig.free_ports) written into the file, so two runs at once (CI next to a bench) do not collide."""
    from v2grt.gateway import sunspec_mapping as sm
    from v2grt.procrig import free_ports

    devs = sm.load_devices(devices)
    ports = list(dict.fromkeys(a.port for a in devs.values()))
    if base_port is not None:
        return ports
    new = dict(zip(ports, free_ports(len(ports)), strict=True))
    sm.write_devices(devices, {nid: sm.DeviceAddress(a.host, new[a.port], a.unit_id) for nid, a in devs.items()})
    return list(new.values())


def wait_sims_serving(sims: list[tuple[Path, Path, subprocess.Popen]], timeout_s: float) -> None:
    """Every simulator (its log, its stderr file, its process) serving; RuntimeError with the simulator's own
    words (a port already taken names the port) if one exits first or does not start in time."""
    from v2grt.bench.bench_fuzz import _wait_for_line
    from v2grt.procrig import tail

    for k, (log_k, err_k, proc) in enumerate(sims):
        try:
            _wait_for_line(log_k, "SIM_SUNSPEC_START", proc, timeout_s, f"simulator {k}")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its stderr: {tail(err_k, 3)}") from None


def stats_lines(log: Path) -> list[dict[str, int]]:
    """The GATEWAY_STATS lines of a gateway log, as {counter: value} with t_mono_ns."""
    from v2grt.bench.bench_fuzz import _fields

    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "GATEWAY_STATS" in line:
            out.append({k: int(v) for k, v in _fields(line).items() if v.lstrip("-").isdigit()})
    return out


def window(stats: list[dict[str, int]], t0_ns: int, t1_ns: int) -> dict:
    """Counter deltas and the seconds between the first and the last stats line inside [t0_ns, t1_ns]."""
    inside = [s for s in stats if t0_ns <= s["t_mono_ns"] <= t1_ns]
    if len(inside) < 2:
        return {"seconds": 0.0}
    a, b = inside[0], inside[-1]
    d = {k: b[k] - a.get(k, 0) for k in b if k not in ("t_mono_ns", "devices_connected")}
    return {"seconds": (b["t_mono_ns"] - a["t_mono_ns"]) / 1e9, **d,
            "devices_connected_min": min(s.get("devices_connected", 0) for s in inside)}


def measure(n: int, args, tmp: Path, base_port: int | None) -> dict:
    """One fleet size: start everything, wait until every charger is heard, measure, stop."""
    import zmq

    from v2grt.bench.bench_fuzz import _Procs, start_aggregator
    from v2grt.bench.e2e_sunspec import cpu_s, wait_heard
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter
    from v2grt.sim.sunspec_chargers import write_site

    d = tmp / f"n{n}"
    paths = write_site(d / "site", n_devices=n, gateway_id=GATEWAY_ID, base_port=base_port or 1,
                       units_per_server=args.units_per_server)
    place_on_ports(paths["devices"], base_port)
    parts = split_site(paths["roster"], paths["devices"], args.sim_processes, d / "sims")
    meter = SunSpecMeter(213, f_hz=args.f_hz)
    msim = SimServerThread([meter], name="bench-meter").start()
    procs = _Procs()
    ctx = zmq.Context()
    cli = [sys.executable, "-m", "v2grt.cli"]
    gw_log = d / "gateway.log"
    try:
        agg, ep, _cfg, _rt = start_aggregator(d, paths["roster"], msim.port(meter), args.priority, procs)
        sims = []
        for k, (roster_k, devices_k) in enumerate(parts):
            log_k = d / f"sim{k}.log"
            with open(d / f"sim{k}.stderr", "w") as err:  # the child keeps its own descriptor
                sims.append((log_k, procs.add(f"sim{k}", subprocess.Popen(
                    [*cli, "sim", "sunspec-chargers", "--roster", str(roster_k), "--devices", str(devices_k),
                     "--gateway-id", GATEWAY_ID, "--tick-s", str(args.sim_tick_s), "--log-file", str(log_k),
                     "--sched-fifo-priority", str(args.sim_priority)],
                    stdout=subprocess.DEVNULL, stderr=err, env=child_env(), cwd=d))))
        wait_sims_serving([(log_k, d / f"sim{k}.stderr", proc) for k, (log_k, proc) in enumerate(sims)], 120)
        gw = procs.add("gateway", subprocess.Popen(
            [*cli, "gateway", "sunspec", "--roster", str(paths["roster"]), "--gateway-id", GATEWAY_ID, "--devices",
             str(paths["devices"]), "--setpoints", ep["setpoints"], "--telemetry", ep["telemetry"],
             "--stats-interval-s", "1", "--log-file", str(gw_log), "--sched-fifo-priority",
             str(args.gateway_priority), *args.gateway_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=d))
        watched = {"aggregator": agg, "gateway": gw, **{f"sim{k}": p for k, (_l, p) in enumerate(sims)}}
        heard_s = wait_heard(ctx, ep["control"], watched, 30.0 + n * 0.06)
        time.sleep(args.settle_s)
        cpu0 = {name: cpu_s(p.pid) for name, p in watched.items()}
        t0, t0_ns = time.monotonic(), time.monotonic_ns()
        time.sleep(args.measure_s)
        t1, t1_ns = time.monotonic(), time.monotonic_ns()
        cpu = {name: 100.0 * (cpu_s(p.pid) - cpu0[name]) / (t1 - t0) for name, p in watched.items()}
        load = os.getloadavg()
        code = procs.stop(gw)
    finally:
        procs.stop_all()
        msim.stop()
        ctx.term()
    w = window(stats_lines(gw_log), t0_ns, t1_ns)
    polls_per_s = w.get("modbus_reads_ok", 0) / w["seconds"] / n if w["seconds"] else 0.0
    failures = sum(w.get(k, 0) for k in ("modbus_timeouts", "modbus_errors", "modbus_write_failures",
                                         "modbus_connect_failures"))
    held = (w["seconds"] > 0 and w.get("devices_connected_min") == n and failures == 0
            and polls_per_s >= HOLD_POLL_FRACTION / args.poll_s)
    return {
        "devices": n, "heard_after_s": heard_s, "load_average": load, "gateway_exit": code,
        "gateway_cpu_pct": cpu["gateway"],
        "load_cpu_pct": {"aggregator": cpu["aggregator"],
                         "sims": sum(v for k, v in cpu.items() if k.startswith("sim"))},
        "window_s": w["seconds"], "polls_per_device_s": polls_per_s,
        "writes_per_s": w.get("modbus_writes_ok", 0) / w["seconds"] if w["seconds"] else 0.0,
        "telemetry_batches_per_s": w.get("batches_sent", 0) / w["seconds"] if w["seconds"] else 0.0,
        "failures": failures, "counters": w, "held": bool(held),
    }


def run(args) -> dict:
    """Every size of ``args.devices``, one after the other; the rig's result as one JSON-ready dict."""
    quiet_pymodbus()  # the meter's server logs the aggregator's cancelled requests at stop: noise, not a result
    tmp = Path(tempfile.mkdtemp(prefix="v2g-gateway-sunspec-"))
    # Each size on ports of its own: the previous size's listeners may linger a moment after their processes.
    rows = [measure(n, args, tmp, None if args.base_port is None else args.base_port + 2000 * k)
            for k, n in enumerate(args.devices)]
    goal = next((r for r in rows if r["devices"] == GOAL_DEVICES), None)
    return {
        "benchmark": "gateway", "protocol": "sunspec", "machine": machine(), "source": source_state(),
        "config": {"devices": args.devices, "units_per_server": args.units_per_server, "poll_s": args.poll_s,
                   "f_hz": args.f_hz, "measure_s": args.measure_s, "settle_s": args.settle_s,
                   "sim_processes": args.sim_processes, "sim_tick_s": args.sim_tick_s,
                   "gateway_priority": args.gateway_priority, "sim_priority": args.sim_priority,
                   "gateway_args": args.gateway_args},
        "results": rows,
        "goal": {"devices": GOAL_DEVICES, "cpu_pct": GOAL_CPU_PCT,
                 "met": None if goal is None else bool(goal["held"] and goal["gateway_cpu_pct"] <= GOAL_CPU_PCT)},
        "tmp": str(tmp),
    }


def render(r: dict) -> str:
    m, c = r["machine"], r["config"]
    head = (f"one `v2grt gateway sunspec` process, polls every {c['poll_s']:g} s, meter at {c['f_hz']:g} Hz, on "
            f"{m['cpu']} ({m['cores']} cores); {c['units_per_server']} unit ids per port, {c['sim_processes']} "
            f"simulator process(es); SCHED_FIFO gateway {c['gateway_priority']}, simulators {c['sim_priority']} "
            f"(0: SCHED_OTHER); CPU over {c['measure_s']:g} s, % of one core")
    rows = [[x["devices"], x["gateway_cpu_pct"], x["polls_per_device_s"], x["writes_per_s"], x["failures"],
             "yes" if x["held"] else "NO", x["load_cpu_pct"]["sims"], x["load_cpu_pct"]["aggregator"],
             x["load_average"][0]] for x in r["results"]]
    g = r["goal"]
    verdict = "not measured" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
    return "\n".join([
        head,
        table(["devices", "gateway CPU %", "polls/device/s", "writes/s", "failures", "held", "sims CPU %",
               "aggregator CPU %", "load"], rows),
        f"goal: {g['devices']} devices held in <= {g['cpu_pct']:g} % of a core: {verdict}",
    ])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This rig's options (beside bench gateway's --protocol, --smoke and --json)."""
    ap.add_argument("--devices", type=lambda s: [int(x) for x in s.split(",")], default=[100, 300, 1000],
                    help="comma-separated fleet sizes, one gateway run each (default 100,300,1000)")
    ap.add_argument("--units-per-server", type=int, default=10, help="unit ids per simulated TCP port (10)")
    ap.add_argument("--sim-processes", type=int, default=2, help="simulator processes sharing the chargers (2)")
    ap.add_argument("--sim-tick-s", type=float, default=0.1,
                    help="the simulators' physics tick (0.1 s: their registers move 10 times a second)")
    ap.add_argument("--poll-s", type=float, default=1.0, help="the gateway's --poll-s (1 s)")
    ap.add_argument("--f-hz", type=float, default=49.6, help="the meter's frequency (49.6 Hz)")
    ap.add_argument("--measure-s", type=float, default=20.0, help="CPU and counters over this long (20 s)")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after every charger is heard (3 s)")
    ap.add_argument("--base-port", type=int, default=None,
                    help="the simulators' first TCP port, each fleet size 2000 ports further on (default: ports "
                         "free at the start, so two runs at once do not collide)")
    ap.add_argument("--priority", type=int, default=None,
                    help="the aggregator's SCHED_FIFO priority (default: configs/default.yaml's)")
    ap.add_argument("--gateway-priority", type=int, default=0,
                    help="the gateway's SCHED_FIFO priority (default 0: SCHED_OTHER; on a loaded shared machine a "
                         "priority keeps other users' load from starving its polls, its CPU is the same)")
    ap.add_argument("--sim-priority", type=int, default=0, help="the simulators' SCHED_FIFO priority (default 0)")
    ap.add_argument("--gateway-arg", dest="gateway_args", action="append", default=[],
                    help="an extra argument for `v2grt gateway sunspec` (repeat; e.g. --gateway-arg=--revert-s=3)")


#: --smoke: a few seconds at a tiny size (structure and counts, not capacity).
SMOKE = {"devices": [8], "measure_s": 3.0, "settle_s": 1.0, "units_per_server": 4}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench gateway --protocol sunspec", description=__doc__.splitlines()[0])
    add_arguments(ap)
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    args.gateway_args = [*args.gateway_args, f"--poll-s={args.poll_s}"]
    emit(run(args), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
