"""End-to-end latency: a frequency step written into the Modbus meter to the setpoint at a gateway.

    v2grt bench e2e [--configs 100/20,100/5,20/20,20/5] [--trials 200] [--nodes 10000] [--json]
    v2grt bench e2e --protocol ocpp [...]   (to a simulated OCPP station applying it: v2grt/bench/e2e_ocpp.py)

``--protocol sim`` (the default) is what follows; any other protocol hands the rest of the command
line to its rig module (``PROTOCOL_RIGS``), which has its own options (``--protocol ocpp --help``).

Each config is PERIOD_MS/POLL_MS: the aggregator's control period and its meter poll interval. The
Aggregator runs in this process; a child process plays the world: a SunSpec meter (model 213) served
over Modbus TCP, a GatewaySubscriber for gw1 and a SUB receiving every other gateway's messages (so
the publish phase sends them all). The child steps the meter between 49.5 and 50.5 Hz (the DC
service's full discharge and full charge), each step after a random pause (uniform over two periods,
so steps are not phase-locked to the period or the poll), and times from just after
SunSpecMeter.set_frequency to the first admitted gw1 message whose setpoints turned to the new
direction (their sum changed sign). Both processes read CLOCK_MONOTONIC, so each trial is also split,
from the aggregator's side, into: meter (step to the first poll that read the new value: poll wait +
Modbus read), wait (to the wake-up of the first cycle that used it), cycle (the control thread: inputs +
kernel + publish phase, to the hand-over), and with the publisher thread (bus.publisher_thread, the default)
queue (the hand-over to the publisher thread taking the cycle up), send (it writes the frames and the status
fields, checks the lease, and queues gw1's frame, the first of the cycle) and delivery (gw1's frame through
ZeroMQ to the gateway, and its decode); the time to the cycle's last frame queued (every gateway's send) is
shown beside them. With the control thread sending, its sends are in `cycle` and delivery starts at its last
frame. Target (DESIGN.md section 10, issue 3): p99 under one period plus 10 ms.
"""

from __future__ import annotations

import argparse
import sys
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
from v2grt.io.modbus import Latest

F_DISCHARGE_HZ, F_CHARGE_HZ = 49.5, 50.5  # GB DC: 100 % at -500 mHz and +500 mHz


class _FirstSeen(Latest):
    """The meter reader's Latest cell, noting when each new frequency value was first read (input thread)."""

    __slots__ = ("_last_f", "changes")

    def __init__(self):
        super().__init__()
        self.changes: list[tuple[float, int]] = []
        self._last_f = None

    def publish(self, value, t_mono_ns: int) -> None:
        super().publish(value, t_mono_ns)
        if value.f_hz != self._last_f:
            self._last_f = value.f_hz
            self.changes.append((value.f_hz, t_mono_ns))


class _PublishTimer:
    """Wraps Aggregator._publish: for each cycle whose frequency changed, its wake-up and publish-end times and the
    seq it published under; with the publisher thread, each sent cycle's times there by seq (its on_done)."""

    def __init__(self, agg):
        self._agg = agg
        self._publish = agg._publish
        self.records: list[tuple[float, int, int, int]] = []
        self.jobs: dict[int, tuple[int, int, int, int]] = {}  # seq -> (submit, start, first frame, last frame) ns
        self._last_f = None
        if agg.sender is not None:
            on_done = agg.sender.on_done

            def done(job, sent):  # on the publisher thread, after the cycle's frames and status were queued
                if sent:
                    self.jobs[job.seq] = (job.t_submit_ns, job.t_start_ns, job.t_send_ns, job.t_wire_ns)
                on_done(job, sent)

            agg.sender.on_done = done

    def __call__(self, result, now_ns: int) -> None:
        self._publish(result, now_ns)  # now_ns is the cycle's wake-up time (Aggregator._cycle)
        f = result.frequency_hz
        if f != self._last_f:
            self._last_f = f
            self.records.append((f, now_ns, time.monotonic_ns(), self._agg.seq))


SPLIT = ("meter", "wait", "cycle", "queue", "send", "delivery", "last_frame")


def split(trials: list[dict], seen, records, jobs) -> dict[str, list[int]]:
    """Per trial (ns): meter, wait, cycle, then with the publisher thread queue, send (to gw1's frame queued, the
    cycle's first) and delivery, beside last_frame (the publisher thread's start to the cycle's last frame
    queued); without it (``jobs`` empty) delivery from the end of the control thread's publish phase. The first
    read of the new value after the step, then the first cycle that used it."""
    parts: dict[str, list[int]] = {k: [] for k in SPLIT}
    for tr in trials:
        t_step, f_new = tr["t_step_ns"], tr["f_hz"]
        t_read = next((t for f, t in seen if t >= t_step and abs(f - f_new) < 1e-3), None)
        if t_read is None:
            continue
        cyc = next(((woke, end, seq) for f, woke, end, seq in records if woke >= t_read and abs(f - f_new) < 1e-3),
                   None)
        if cyc is None:
            continue
        woke, end, seq = cyc
        job = jobs.get(seq)
        if jobs and job is None:  # that cycle was not sent (busy, stale, fenced): the trial's frame came later
            continue
        parts["meter"].append(t_read - t_step)
        parts["wait"].append(woke - t_read)
        if job is None:  # the control thread sent it: its sends are in `cycle`
            parts["cycle"].append(end - woke)
            parts["delivery"].append(tr["t_arrival_ns"] - end)
            continue
        t_submit, t_start, t_send, t_wire = job
        parts["cycle"].append(t_submit - woke)
        parts["queue"].append(t_start - t_submit)
        parts["send"].append(t_send - t_start)
        parts["delivery"].append(tr["t_arrival_ns"] - t_send)
        parts["last_frame"].append(t_wire - t_start)
    return parts


def measure(period_ms: float, poll_ms: float, n: int, gateways: int, trials: int, priority: int,
            seed: int, cpu: int | None = None, samples: bool = False) -> dict:
    """One PERIOD_MS/POLL_MS config; `cpu` pins the control thread; `samples` adds each trial's latency (ns)
    under "latency_ns" (bench qualify draws them)."""
    period_s = period_ms / 1e3
    fleet = Fleet.random(n, seed=0, n_gateways=gateways, now_ns=time.monotonic_ns())
    with World(meter_model=213) as world:
        cfg = aggregator_config(period_s=period_s, meter_port=world.meter_port, n_nodes=n, poll_s=poll_ms / 1e3,
                                priority=priority, cpu=cpu, hwm=catch_all_hwm(gateways))
        agg = Aggregator(cfg, epoch=1, fleet=fleet)
        keep_fresh(agg)
        seen = agg.meter.latest = _FirstSeen()  # instrumentation only: same cell, times of first reads
        timer = agg._publish = _PublishTimer(agg)
        agg.start()
        try:
            if not agg.first_cycle.wait(10.0):
                raise RuntimeError("the aggregator ran no cycle within 10 s")
            world.connect(agg.publisher.endpoint)
            s = agg.stats
            miss0 = s.missed_deadlines
            out = world.call("e2e", setpoints=agg.publisher.endpoint, gateway="gw1", trials=trials,
                             f=[F_DISCHARGE_HZ, F_CHARGE_HZ], gap_s=[0.02, 0.02 + 2 * period_s],
                             timeout_s=period_s + poll_ms / 1e3 + 1.0, seed=seed)
            missed = s.missed_deadlines - miss0
            cycle = stats_ms(s.samples("total")[-200:])
            rt = setup_report(agg)
        finally:
            agg.stop()
    done = [t for t in out["trials"] if t["t_arrival_ns"] is not None]
    lat = [t["t_arrival_ns"] - t["t_step_ns"] for t in done]
    parts = split(done, seen.changes, timer.records, timer.jobs)
    target_ms = period_ms + 10.0
    e2e = stats_ms(lat)
    extra = {"latency_ns": [int(x) for x in lat]} if samples else {}
    return {**extra,
        "period_ms": period_ms, "poll_ms": poll_ms, "trials": trials, "arrived": len(done),
        "timeouts": trials - len(done),
        "latency": e2e,
        "split_mean_ms": {k: float(np.mean(v)) / 1e6 if v else None for k, v in parts.items()},
        "split_p99_ms": {k: float(np.percentile(v, 99)) / 1e6 if v else None for k, v in parts.items()},
        "split_n": len(parts["meter"]),
        "publisher_thread": agg.sender is not None,
        "cycle_total": cycle,
        "missed_deadlines": int(missed),
        "subscriber_errors": out["sub_errors"],
        "target_ms": target_ms,
        "target_met": bool(done) and len(done) == trials and e2e["p99_ms"] < target_ms,
        "realtime": rt,
    }


def run(configs, n, gateways, trials, priority, seed) -> dict:
    rows = [measure(p, q, n, gateways, trials, priority, seed) for p, q in configs]
    return {"benchmark": "e2e", "machine": machine(), "source": source_state(),
            "config": {"nodes": n, "gateways": gateways, "trials": trials, "sched_fifo_priority": priority,
                       "steps_hz": [F_DISCHARGE_HZ, F_CHARGE_HZ], "meter_model": 213},
            "results": rows}


def render(r: dict) -> str:
    m, c = r["machine"], r["config"]
    head = (f"frequency step at the Modbus meter -> setpoint at gateway gw1, on {m['cpu']} ({m['cores']} cores), "
            f"python {m['python']}; {c['nodes']} nodes, {c['gateways']} gateways, {c['trials']} trials per row")
    rows1, rows2 = [], []
    for x in r["results"]:
        lat = x["latency"]
        rows1.append([x["period_ms"], x["poll_ms"], x["arrived"], lat.get("p50_ms"), lat.get("p99_ms"),
                      lat.get("max_ms"), x["target_ms"], "MET" if x["target_met"] else "NOT MET", x["timeouts"],
                      x["missed_deadlines"]])
        sm = x["split_mean_ms"]
        rows2.append([x["period_ms"], x["poll_ms"], x["split_n"], "thread" if x.get("publisher_thread") else "control",
                      *("-" if sm.get(k) is None else sm[k] for k in SPLIT), lat.get("mean_ms")])
    return "\n".join([
        head,
        table(["period ms", "poll ms", "trials", "p50 ms", "p99 ms", "max ms", "target ms", "target", "timeouts",
               "missed"], rows1),
        "",
        "where the latency comes from (mean ms per trial): meter = step to the first poll that read it (poll "
        "wait + Modbus read), wait = to the wake-up of the next cycle, cycle = the control thread's inputs + kernel + "
        "publish phase (with sends = control: its sends too); with the publisher thread: queue = hand-over to that "
        "thread taking the cycle up, send = it writes the frames and queues gw1's (the first), delivery = ZeroMQ to "
        "the gateway + decode (after the control thread's last send when it sends); last frame = the publisher "
        "thread's start to the cycle's last frame queued (beside, not in the sum)",
        table(["period ms", "poll ms", "trials", "sends", "meter", "wait", "cycle", "queue", "send", "delivery",
               "last frame", "total mean"], rows2),
    ])


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"configs": "20/5", "trials": 4, "nodes": 1000, "gateways": 4}


#: --protocol NAME -> the module whose main(argv) runs that rig (one line per protocol).
PROTOCOL_RIGS = {
    "ocpp": "v2grt.bench.e2e_ocpp",
    "sunspec": "v2grt.bench.e2e_sunspec",
}


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--protocol", default="sim", choices=["sim", *PROTOCOL_RIGS])
    known, rest = pre.parse_known_args(argv)
    if known.protocol != "sim":
        import importlib

        return int(importlib.import_module(PROTOCOL_RIGS[known.protocol]).main(rest) or 0)
    ap = argparse.ArgumentParser(prog="v2grt bench e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="sim", choices=["sim", *PROTOCOL_RIGS],
                    help="sim (default): to the setpoint at a gateway; others: to a simulated charger applying it")
    ap.add_argument("--configs", default="100/20,100/5,20/20,20/5",
                    help="comma-separated PERIOD_MS/POLL_MS pairs (control period / meter poll interval)")
    ap.add_argument("--trials", type=int, default=200, help="frequency steps per config")
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--gateways", type=int, default=20)
    ap.add_argument("--priority", type=int, default=0,
                    help="SCHED_FIFO priority of the control thread (0: SCHED_OTHER, as configs/default.yaml)")
    ap.add_argument("--seed", type=int, default=3)
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    configs = []
    for item in args.configs.split(","):
        period, _, poll = item.partition("/")
        configs.append((float(period), float(poll or 20)))
    emit(run(configs, args.nodes, args.gateways, args.trials, args.priority, args.seed), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
