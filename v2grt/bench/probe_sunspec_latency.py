"""Indicative latency of the SunSpec gateway (not a benchmark): frequency step at the meter -> WSet at a charger.

An in-process aggregator (period 100 ms, meter poll 20 ms, GB DC), the SunSpec gateway (GatewayCore +
SunSpecChargers, in-process threads) and N simulated chargers (one pymodbus server each) on loopback.
The meter steps between 49.5 and 50.5 Hz, 1.5 s plus a random fraction of a period apart (a fixed
gap of 15 periods would time every step at the same phase of the control cycle); for each step the
time from ``SunSpecMeter.set_frequency`` to

- the first charger receiving a WSet of the new sign (write arrival at the device), and the last of
  the chargers that get one before the next step;
- the first charger *applying* it (the simulator's command latency, 5-20 ms, on top).

    python -m v2grt.bench.probe_sunspec_latency --chargers 10 --steps 30
    python -m v2grt.bench.probe_sunspec_latency --chargers 100 --steps 80 --sim-process
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from v2grt.aggregator import Aggregator
from v2grt.config import config_from_dict
from v2grt.fleet import Fleet
from v2grt.gateway.core import GatewayCore
from v2grt.gateway.sim import gateway_fleet
from v2grt.gateway.sunspec import SunSpecChargers, SunSpecSettings
from v2grt.gateway.sunspec_mapping import load_devices
from v2grt.sim.battery import SimFleetState
from v2grt.sim.sunspec import SimServerThread, SunSpecMeter
from v2grt.sim.sunspec_chargers import SimChargers, grouped_layout, write_site
from v2grt.testing import wait_until


def _timed(write_due, row, poller, acks):
    async def timed(now_ns):
        written = await write_due(now_ns)
        if written:
            acks.append((time.monotonic_ns(), row, poller.written_kw))
        return written

    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chargers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--gap-s", type=float, default=1.5)
    ap.add_argument("--sim-process", action="store_true",
                    help="run the chargers as a `v2grt sim sunspec-chargers` process (ports from --base-port) "
                         "and time the write's acknowledgement at the gateway instead of its arrival")
    ap.add_argument("--base-port", type=int, default=17000)
    ap.add_argument("--settle-s", type=float, default=3.0,
                    help="wait after all chargers are online (the first dispatch after start-up is not timed)")
    args = ap.parse_args()
    n = args.chargers
    d = Path(tempfile.mkdtemp(prefix="v2g-ss-"))
    paths = write_site(d / "site", n_devices=n, gateway_id="sunspec1",
                       base_port=args.base_port if args.sim_process else 0)
    fleet = gateway_fleet(Fleet.from_csv(paths["roster"]), "sunspec1")
    sim = sim_proc = None
    if args.sim_process:
        sim_proc = subprocess.Popen([sys.executable, "-m", "v2grt.sim.cli", "sunspec-chargers", "--roster",
                                     str(paths["roster"]), "--devices", str(paths["devices"]), "--log-file",
                                     str(d / "sim.log")])
        devices = load_devices(paths["devices"])
        time.sleep(2.0)
    else:
        state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0,
                                         low_soh_fraction=0.0)
        sim = SimChargers(state, grouped_layout(n)).start()
        devices = sim.devices_map(list(fleet.node_ids[:n]))
    meter = SunSpecMeter(213, f_hz=50.0)
    msim = SimServerThread([meter]).start()
    cfg = config_from_dict({
        "fleet_id": "probe", "period_s": 0.1, "budget_s": 0.1, "state_dir": str(d / "state"),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": {"host": "127.0.0.1", "port": msim.port(meter), "poll_interval_s": 0.02},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
        "service": {"name": "dc", "capacity_kw": 11.0 * n * 0.8},
        "fleet": {"roster": str(paths["roster"])},
    })
    agg = Aggregator(cfg, epoch=1)
    agg.start()
    gw = SunSpecChargers(fleet, devices, SunSpecSettings(), gateway_id="sunspec1")
    acks: list[tuple[int, int, float]] = []  # (t_ns the charger acknowledged a write, row, kW)
    for row, poller in enumerate(gw.pollers):  # probe-only instrumentation of the write path
        poller._write_due = _timed(poller._write_due, row, poller, acks)
    gw.start()
    ctx = zmq.Context()
    core = GatewayCore(ctx, "sunspec1", gw, setpoints=agg.publisher.endpoint, telemetry=agg.telemetry.endpoint)
    stop = threading.Event()
    runner = threading.Thread(target=core.run, args=(stop,), daemon=True)
    runner.start()
    first, last, applied = [], [], []
    rng = np.random.default_rng(0)
    try:
        wait_until(lambda: int(agg.fleet.online[:n].sum()) == n, 20.0, "all chargers online")
        time.sleep(args.settle_s)
        for k in range(args.steps):
            f_hz, sign = (49.5, 1.0) if k % 2 == 0 else (50.5, -1.0)
            t0 = time.monotonic_ns()
            meter.set_frequency(f_hz)
            time.sleep(args.gap_s + rng.uniform(0.0, 0.1))  # a random phase against the 100 ms period
            events = [(w.t_ns, w.row, w.p_kw) for w in list(sim.writes)] if sim is not None else list(acks)
            rows = {}
            for t_ns, row, kw in events:
                if t_ns > t0 and kw * sign > 0.5:
                    rows.setdefault(row, t_ns)
            if rows:
                first.append((min(rows.values()) - t0) / 1e6)
                last.append((max(rows.values()) - t0) / 1e6)
            ap_ns = [t for t, _row, kw in list(sim.applies) if t > t0 and kw * sign > 0.5] if sim else []
            if ap_ns:
                applied.append((min(ap_ns) - t0) / 1e6)
    finally:
        stop.set()
        runner.join(5.0)
        gw.close()
        agg.stop()
        ctx.term()
        if sim is not None:
            sim.stop()
        if sim_proc is not None:
            sim_proc.send_signal(signal.SIGTERM)
            sim_proc.wait(20.0)
        msim.stop()

    def q(xs):
        a = np.array(xs)
        return (f"p50 {np.percentile(a, 50):.0f} ms, p90 {np.percentile(a, 90):.0f} ms, "
                f"p99 {np.percentile(a, 99):.0f} ms, max {a.max():.0f} ms (n={a.size})")

    at = "acknowledged by" if args.sim_process else "arriving at"
    print(f"{n} chargers{' (simulator in its own process)' if args.sim_process else ''}, {args.steps} steps")
    print(f"first WSet of the new sign {at} a charger: {q(first)}")
    print(f"last dispatched charger's WSet {at} it:    {q(last)}")
    if applied:
        print(f"first charger applying it:                       {q(applied)}")
    print(f"per step, first WSet (ms): {[round(x) for x in first]}")
    print(f"gateway counters: {gw.counters()}")


if __name__ == "__main__":
    main()
