"""End-to-end latency through OCPP 2.1: a frequency step at the meter to the simulated stations applying it.

    v2grt bench e2e --protocol ocpp [--stations 200] [--evses 2] [--trials 100] [--period-ms 100] [--json]

Real processes on loopback: the SunSpec meter (model 213) in the bench's world child process, the
Aggregator in this process (as `v2grt bench e2e` runs it, so its cycle can be timed), `v2grt gateway
ocpp` (TLS, Basic auth) and `v2grt sim ocpp-stations`. The meter steps between 49.5 and 50.5 Hz (the
GB DC service's full discharge and full charge: every EVSE reverses), each step after a pause of
--gap-s plus a random fraction of two periods (not phase-locked to the cycle). For every step and
every EVSE the time runs from the step to the moment the simulated station applied a setpoint of the
new sign: the station's own CLOCK_MONOTONIC timestamp, taken when its command latency has passed
and the new value becomes the EV's target (the power ramp after it is the EV's, not counted).

How the times come back: both processes run with ``--trace-file`` and write, on exit, what they
recorded in memory (the gateway: when each UpdateDynamicSchedule was handed to its station's session
and when it was sent; the stations: when each was received and applied); CLOCK_MONOTONIC is one clock
for every process of the host. The aggregator's side (first meter read of the new value, the cycle
that used it, the end of its publish) is timed in this process. Phases, per step and EVSE:

- meter -> publish: step to the end of the publish of the first cycle that used the new frequency
  (meter poll + wait for the cycle + the cycle);
- publish -> send: ZeroMQ to the gateway, its scan, and the wait in the station's session (one CALL at
  a time per station, OCPP-J: the second EVSE's update waits for the first's reply);
- send -> receive: websocket + TLS, and the simulator's event loop;
- receive -> apply: the simulated station's command latency (``--latency-ms``, uniform).

Goal (issue 11): p99 <= period + 100 ms with 200 stations.

``--operation-mode central,local-frequency`` runs the rig once per mode, one after the other in one
command, with the same aggregator, site and steps. In ``local-frequency`` the gateway installs
LocalFrequency profiles (the aggregator's service, ``dc``, scaled to each EVSE's share of its capacity)
and the stations read the bench's meter themselves (``--frequency-from``, polled every 20 ms): the time
then runs from the step to the station applying its own answer, and the gateway's phases do not apply.
For each mode the table gives the messages the gateway sent to stations per step (UpdateDynamicSchedule,
or SetChargingProfile for a LocalFrequency baseline). ``--policy prorata`` shares the response as the
stations' curves do (a pure step then moves no baseline); ``merit`` (the aggregator's default) does not.
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

import numpy as np

from v2grt.bench._common import (
    World,
    add_smoke_option,
    aggregator_config,
    apply_smoke,
    emit,
    machine,
    source_state,
    stats_ms,
    table,
)
from v2grt.bench._ocpp_rig import GATEWAY_ID, Rig, process_cpu_s, uptime
from v2grt.bench._ocpp_rig import online_heard as _online
from v2grt.bench.bench_e2e import F_CHARGE_HZ, F_DISCHARGE_HZ, _FirstSeen, _PublishTimer

#: kW: a setpoint or applied value counts as "of the new sign" beyond this (the deadband is 0.5 kW).
SIGN_KW = 0.1

PHASES = ("meter_to_publish", "publish_to_send", "send_to_receive", "receive_to_apply")

#: --operation-mode values (v2grt gateway ocpp --operation-mode).
MODES = ("central", "local-frequency")


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[1:]


def first_per_row(events: np.ndarray, t0: int, t1: int, sign: float) -> dict[int, np.ndarray]:
    """events (t_ns, row, p_kw, ...) sorted by t: the first of each row in [t0, t1) whose p_kw has ``sign``."""
    lo, hi = np.searchsorted(events[:, 0], [t0, t1])
    out: dict[int, np.ndarray] = {}
    for ev in events[lo:hi]:
        if sign * ev[2] > SIGN_KW and int(ev[1]) not in out:
            out[int(ev[1])] = ev
    return out


def analyse(steps: list[dict], seen, records, gw_trace: np.ndarray, st_recv: np.ndarray,
            st_apply: np.ndarray) -> dict:
    """Per step and EVSE: total latency and the four phases (ns); per step: the last EVSE's latency."""
    samples: dict[str, list[int]] = {"total": [], **{p: [] for p in PHASES}}
    last_evse, per_step_rows, missing = [], [], 0
    aggregator: dict[str, list[int]] = {"meter": [], "wait": [], "cycle": []}
    for k, st in enumerate(steps):
        t0, f, sign = st["t_step_ns"], st["f_hz"], st["sign"]
        t1 = steps[k + 1]["t_step_ns"] if k + 1 < len(steps) else t0 + 10**10
        t_read = next((t for fv, t in seen if t >= t0 and abs(fv - f) < 1e-3), None)
        cyc = None if t_read is None else next(((w, e) for fv, w, e, _seq in records
                                                if w >= t_read and abs(fv - f) < 1e-3), None)
        if cyc is None:
            continue
        t_pub = cyc[1]
        aggregator["meter"].append(t_read - t0)
        aggregator["wait"].append(cyc[0] - t_read)
        aggregator["cycle"].append(cyc[1] - cyc[0])
        # gateway trace columns: sent, row, kW, handed (sorted by sent)
        sends = first_per_row(gw_trace, t0, t1, sign)
        recvs = first_per_row(st_recv, t0, t1, sign)
        applies = first_per_row(st_apply, t0, t1, sign)
        missing += len(set(sends) - set(applies))
        per_step_rows.append(len(applies))
        worst = 0
        for row, ap in applies.items():
            total = int(ap[0]) - t0
            worst = max(worst, total)
            samples["total"].append(total)
            samples["meter_to_publish"].append(t_pub - t0)
            if row in sends and row in recvs:
                t_sent, t_recv = int(sends[row][0]), int(recvs[row][0])
                samples["publish_to_send"].append(t_sent - t_pub)
                samples["send_to_receive"].append(t_recv - t_sent)
                samples["receive_to_apply"].append(int(ap[0]) - t_recv)
        if applies:
            last_evse.append(worst)
    return {"samples": samples, "last_evse": last_evse, "rows_per_step": per_step_rows, "missing": missing,
            "aggregator": aggregator}


def messages_per_step(steps: list[dict], gw_trace: np.ndarray) -> list[int]:
    """Messages the gateway sent to stations (its trace's updates, sorted by send time) in each step's window."""
    out = []
    for k, st in enumerate(steps):
        t0 = st["t_step_ns"]
        t1 = steps[k + 1]["t_step_ns"] if k + 1 < len(steps) else t0 + 10**10
        lo, hi = np.searchsorted(gw_trace[:, 0], [t0, t1])
        out.append(int(hi - lo))
    return out


def _mode_args(mode: str, capacity_kw: float, meter_port: int) -> tuple[list[str], list[str]]:
    """(extra gateway options, extra simulator options) of an operation mode."""
    if mode == "central":
        return [], []
    return (["--operation-mode", "local-frequency", "--service", "dc", "--service-capacity-kw", f"{capacity_kw:g}"],
            ["--frequency-from", f"127.0.0.1:{meter_port}"])


def _with_policy(cfg, policy: str, directory: Path):
    """The bench aggregator's config with the dispatch policy asked (a discharge_profile file of one key)."""
    import dataclasses
    import json

    if policy == "merit":
        return cfg
    path = directory / "profile.json"
    path.write_text(json.dumps({"policy": policy}))
    return dataclasses.replace(cfg, discharge_profile=str(path))


def _fifo_process(pid: int, priority: int) -> int:
    """Every thread of process ``pid`` at SCHED_FIFO ``priority`` (the simulated meter: a meter is hardware of
    its own, and a meter starved by other users of a shared box would be charged to the gateway); threads
    granted."""
    from v2grt.loop import set_thread_fifo

    return sum(set_thread_fifo(int(t), priority, f"meter[{t}]").granted for t in os.listdir(f"/proc/{pid}/task"))


def measure(args, directory: Path, mode: str = "central") -> dict:
    from v2grt.aggregator import Aggregator
    from v2grt.fleet import Fleet

    period_s = args.period_ms / 1e3
    n = args.stations * args.evses
    directory.mkdir(parents=True, exist_ok=True)
    rig = Rig(directory, stations=args.stations, evses=args.evses, plaintext=args.plaintext).write_site()
    fleet = Fleet.from_csv(rig.paths["roster"])
    gw_trace_path = directory / "gateway.trace"
    steps: list[dict] = []
    with World(meter_model=213, f_hz=F_CHARGE_HZ) as world:
        if args.meter_priority:
            _fifo_process(world.proc.pid, args.meter_priority)
        cfg = aggregator_config(period_s=period_s, meter_port=world.meter_port, n_nodes=n, poll_s=args.poll_ms / 1e3,
                                priority=args.priority, capacity_kw=0.8 * float(fleet.p_dis_max_kw[:n].sum()))
        cfg = _with_policy(cfg, args.policy, directory)
        gw_mode, sim_mode = _mode_args(mode, cfg.service.capacity_kw, world.meter_port)
        agg = Aggregator(cfg, epoch=1, fleet=fleet)
        seen = agg.meter.latest = _FirstSeen()
        timer = agg._publish = _PublishTimer(agg)
        agg.start()
        try:
            if not agg.first_cycle.wait(10.0):
                raise RuntimeError("the aggregator ran no cycle within 10 s")
            rig.start_gateway(agg.publisher.endpoint, agg.telemetry.endpoint, "--trace-file", str(gw_trace_path),
                              *gw_mode, "--sched-fifo-priority", str(args.gateway_priority), *args.gateway_args)
            rig.start_stations("--latency-ms", args.latency_ms, "--meter-interval-s", str(args.meter_interval_s),
                               "--sched-fifo-priority", str(args.sim_priority), *sim_mode,
                               processes=args.sim_processes, trace=True)
            t_up = time.monotonic()
            deadline = t_up + args.connect_timeout_s
            while _online(agg.fleet, n) < n:
                rig.alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{_online(agg.fleet, n)} of {n} EVSEs online after "
                                       f"{args.connect_timeout_s:g} s (see {directory}/gateway.log)")
                time.sleep(0.1)
            online_s = time.monotonic() - t_up
            time.sleep(args.settle_s)
            rng = np.random.default_rng(args.seed)
            load_before = uptime()
            cpu0 = {"gateway": process_cpu_s(rig.gateway.pid), "stations": rig.sims_cpu_s()}
            t_cpu0 = time.monotonic()
            miss0 = agg.stats.missed_deadlines
            for k in range(args.trials):
                time.sleep(args.gap_s + float(rng.uniform(0.0, 2 * period_s)))
                f = F_DISCHARGE_HZ if k % 2 == 0 else F_CHARGE_HZ
                reply = world.call("set_frequency", f_hz=f)
                steps.append({"f_hz": f, "sign": 1.0 if f == F_DISCHARGE_HZ else -1.0, "t_step_ns": reply["t_ns"]})
            time.sleep(args.gap_s)
            wall = time.monotonic() - t_cpu0
            cpu = {"gateway": 100.0 * (process_cpu_s(rig.gateway.pid) - cpu0["gateway"]) / wall,
                   "stations": 100.0 * (rig.sims_cpu_s() - cpu0["stations"]) / wall}
            missed = agg.stats.missed_deadlines - miss0
            load_after = uptime()
        finally:
            codes = rig.stop()
            agg.stop()
    gw = np.array([[int(r[2]), int(r[3]), float(r[4]), int(r[1])] for r in read_csv(gw_trace_path)
                   if r[0] == "update"], dtype=np.float64).reshape(-1, 4)
    recv, appl = [], []
    for path, ids in rig.station_traces():  # each simulator's rows are its own roster's: map to the gateway's
        rows = [fleet.row_of[i] for i in ids]
        for r in read_csv(path):
            (recv if r[0] == "recv" else appl).append([int(r[1]), rows[int(r[2])], float(r[3])])
    recv, appl = np.array(recv, dtype=np.float64).reshape(-1, 3), np.array(appl, dtype=np.float64).reshape(-1, 3)
    for a in (gw, recv, appl):
        a[:] = a[np.argsort(a[:, 0], kind="stable")]
    res = analyse(steps, seen.changes, timer.records, gw, recv, appl)
    msgs = messages_per_step(steps, gw)
    total = stats_ms(res["samples"]["total"])
    last = stats_ms(res["last_evse"])
    target_ms = args.period_ms + 100.0
    rows = res["rows_per_step"]
    return {
        "operation_mode": mode, "policy": args.policy,
        "messages_per_step": {"p50": float(np.median(msgs)) if msgs else 0.0, "max": max(msgs, default=0),
                              "mean": float(np.mean(msgs)) if msgs else 0.0, "per_evse_mean":
                              float(np.mean(msgs)) / n if msgs else 0.0},
        "stations": args.stations, "evses_per_station": args.evses, "nodes": n, "trials": args.trials,
        "steps_timed": len(res["last_evse"]), "evses_per_step_min": min(rows) if rows else 0,
        "evses_per_step_median": float(np.median(rows)) if rows else 0.0, "sent_not_applied": res["missing"],
        "latency": total, "last_evse_per_step": last,
        # LocalFrequency: the stations answer on their own; the gateway's sends are baselines, not the step's path
        "phases": {p: stats_ms(res["samples"][p] if mode == "central" else []) for p in PHASES},
        "aggregator_split": {k: stats_ms(v) for k, v in res["aggregator"].items()},
        "target_ms": target_ms,
        "target_met": bool(total.get("n")) and total["p99_ms"] <= target_ms,
        "target_met_last_evse": bool(last.get("n")) and last["p99_ms"] <= target_ms,
        "cpu_percent_of_core": cpu, "missed_deadlines": int(missed), "online_after_s": online_s,
        "exit_codes": codes, "gateway_counters": rig.gateway_counters(),
        "gateway_threads_fifo": sum(" granted=True " in line for line in
                                    (directory / "gateway.log").read_text().splitlines() if "RT_SETUP" in line),
        "load": {"before": load_before, "after": load_after},
    }


def run(args) -> dict:
    modes = [m.strip() for m in args.operation_mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--operation-mode {args.operation_mode!r}: expected a comma-separated list of {MODES}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="v2g-e2e-ocpp-") as tmp:
        directory = Path(args.keep) if args.keep else Path(tmp)
        for mode in modes:  # one after the other, same site and steps; each mode's files in a directory of its own
            rows.append(measure(args, directory / mode if len(modes) > 1 else directory, mode))
    return {"benchmark": "e2e", "protocol": "ocpp", "machine": machine(), "source": source_state(),
            "config": {"stations": args.stations, "evses": args.evses, "period_ms": args.period_ms,
                       "poll_ms": args.poll_ms, "trials": args.trials, "gap_s": args.gap_s,
                       "station_latency_ms": args.latency_ms, "tls": not args.plaintext,
                       "meter_interval_s": args.meter_interval_s, "gateway_args": args.gateway_args,
                       "priority": args.priority, "gateway_priority": args.gateway_priority,
                       "meter_priority": args.meter_priority, "sim_priority": args.sim_priority,
                       "sim_processes": args.sim_processes, "operation_modes": modes, "policy": args.policy,
                       "steps_hz": [F_DISCHARGE_HZ, F_CHARGE_HZ], "cpu_count": os.cpu_count()},
            "results": rows}


def render(r: dict) -> str:
    """One block per operation mode (render_one), then the modes side by side when there are several."""
    blocks = [render_one({**r, "results": [x]}) for x in r["results"]]
    if len(r["results"]) > 1:
        blocks.append("side by side (one run, the modes one after the other):\n" + table(
            ["mode", "n", "p50 ms", "p99 ms", "last EVSE p99 ms", "messages/step p50", "max"],
            [[x.get("operation_mode", "central"), x["latency"].get("n", 0), x["latency"].get("p50_ms"),
              x["latency"].get("p99_ms"), x["last_evse_per_step"].get("p99_ms"), x["messages_per_step"]["p50"],
              x["messages_per_step"]["max"]] for x in r["results"]]))
    return "\n\n".join(blocks)


def render_one(r: dict) -> str:
    m, c, x = r["machine"], r["config"], r["results"][0]
    head = (f"[{x.get('operation_mode', 'central')}, policy {x.get('policy', 'merit')}] "
            f"frequency step at the meter -> simulated OCPP station applying the new setpoint, on {m['cpu']} "
            f"({m['cores']} cores), python {m['python']}; {c['stations']} stations x {c['evses']} EVSEs, period "
            f"{c['period_ms']:g} ms, meter poll {c['poll_ms']:g} ms, station latency {c['station_latency_ms']} ms, "
            f"TLS {'on' if c['tls'] else 'off'}; SCHED_FIFO aggregator/gateway/stations {c.get('priority', 0)}/"
            f"{c.get('gateway_priority', 0)}/{c.get('sim_priority', 0)}; {x['load']['before']} (after: "
            f"{x['load']['after']})")

    def row(name, s):
        return [name, s.get("n", 0), s.get("p50_ms"), s.get("p99_ms"), s.get("max_ms"), s.get("mean_ms")]

    lines = [head, table(["per", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
                         [row("step x EVSE", x["latency"]), row("step (last EVSE)", x["last_evse_per_step"])]),
             f"target p99 <= {x['target_ms']:g} ms: {'MET' if x['target_met'] else 'NOT MET'} (every EVSE), "
             f"{'MET' if x['target_met_last_evse'] else 'NOT MET'} (last EVSE of each step); "
             f"{x['steps_timed']}/{x['trials']} steps timed, {x['evses_per_step_median']:g} EVSEs per step "
             f"(min {x['evses_per_step_min']}), {x['sent_not_applied']} sent but not applied",
             "", "phases (per step x EVSE):",
             table(["phase", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
                   [row(p, x["phases"][p]) for p in PHASES] + [row(f"  aggregator {k}", v)
                                                               for k, v in x["aggregator_split"].items()]),
             f"messages to stations per step: p50 {x['messages_per_step']['p50']:g}, max "
             f"{x['messages_per_step']['max']}, mean per EVSE {x['messages_per_step']['per_evse_mean']:.3f}",
             f"CPU during the steps (% of one core): gateway {x['cpu_percent_of_core']['gateway']:.1f}, stations "
             f"{x['cpu_percent_of_core']['stations']:.1f}; missed deadlines {x['missed_deadlines']}; exit codes "
             f"{x['exit_codes']}"]
    return "\n".join(lines)


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"stations": 3, "trials": 4, "gap_s": 0.4, "settle_s": 0.5, "sim_processes": 1, "gateway_priority": 1,
         "sim_priority": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench e2e --protocol ocpp", description=__doc__.splitlines()[0])
    ap.add_argument("--stations", type=int, default=200)
    ap.add_argument("--evses", type=int, default=2, help="EVSEs per station (default 2)")
    ap.add_argument("--trials", type=int, default=100, help="frequency steps (default 100)")
    ap.add_argument("--period-ms", type=float, default=100.0, help="the aggregator's control period (100 ms)")
    ap.add_argument("--poll-ms", type=float, default=5.0,
                    help="the aggregator's meter poll interval (5 ms, as configs/default.yaml ships)")
    ap.add_argument("--gap-s", type=float, default=1.0,
                    help="pause between steps, plus a random fraction of two periods (default 1.0 s)")
    ap.add_argument("--latency-ms", default="5:20",
                    help="the simulated stations' command latency MIN:MAX (default 5:20 ms: the station's "
                         "controller taking the value; docs/benchmarks.md)")
    ap.add_argument("--meter-interval-s", type=float, default=1.0, help="stations' MeterValues period (1 s)")
    ap.add_argument("--sim-processes", type=int, default=2,
                    help="simulator processes sharing the stations (default 2: one per core of the reference box)")
    ap.add_argument("--plaintext", action="store_true", help="ws:// without TLS (default: TLS, security profile 2)")
    ap.add_argument("--settle-s", type=float, default=2.0, help="wait after every EVSE is online (2 s)")
    ap.add_argument("--connect-timeout-s", type=float, default=120.0)
    ap.add_argument("--priority", type=int, default=0, help="SCHED_FIFO priority of the control thread (0: off)")
    ap.add_argument("--meter-priority", type=int, default=0,
                    help="SCHED_FIFO priority of the simulated meter's process (default 0: SCHED_OTHER)")
    ap.add_argument("--gateway-priority", type=int, default=0,
                    help="SCHED_FIFO priority of `v2grt gateway ocpp` (default 0: SCHED_OTHER; below --priority)")
    ap.add_argument("--sim-priority", type=int, default=0,
                    help="SCHED_FIFO priority of the simulator processes (default 0; below the gateway's)")
    ap.add_argument("--gateway-args", type=shlex.split, default=[],
                    help="extra `v2grt gateway ocpp` options, one quoted string (e.g. \"--deadband-kw 1\")")
    ap.add_argument("--operation-mode", default="central",
                    help="comma-separated: central (CentralSetpoint, the default), local-frequency (stations answer "
                         "frequency with LocalFrequency profiles); several run one after the other in this command")
    ap.add_argument("--policy", default="merit", choices=("merit", "prorata"),
                    help="the aggregator's dispatch policy (merit: its default; prorata shares the response as the "
                         "stations' local curves do)")
    ap.add_argument("--keep", help="keep the site, logs and traces in this directory")
    ap.add_argument("--seed", type=int, default=3)
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    emit(run(args), args.json, render)
    return 0


__all__ = ["GATEWAY_ID", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
