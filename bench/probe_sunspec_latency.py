"""Indicative latency of the SunSpec gateway (not a benchmark): frequency step at the meter -> WSet at a charger.

An in-process aggregator (period 100 ms, meter poll 20 ms, GB DC), the SunSpec gateway (GatewayCore +
SunSpecChargers, in-process threads) and N simulated chargers (one pymodbus server each) on loopback.
The meter steps between 49.5 and 50.5 Hz, 1.5 s plus a random fraction of a period apart (a fixed
gap of 15 periods would time every step at the same phase of the control cycle); for each step the
time from ``SunSpecMeter.set_frequency`` to

- the first charger receiving a WSet of the new sign (write arrival at the device), and the last of
  the chargers that get one before the next step;
- the first charger *applying* it (the simulator's command latency, 5-20 ms, on top).

    PYTHONPATH=. python bench/probe_sunspec_latency.py --chargers 10 --steps 30
"""

from __future__ import annotations

import argparse
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
from v2grt.sim.battery import SimFleetState
from v2grt.sim.sunspec import SimServerThread, SunSpecMeter
from v2grt.sim.sunspec_chargers import SimChargers, grouped_layout, write_site
from v2grt.testing import wait_until


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chargers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--gap-s", type=float, default=1.5)
    ap.add_argument("--settle-s", type=float, default=3.0,
                    help="wait after all chargers are online (the first dispatch after start-up is not timed)")
    args = ap.parse_args()
    n = args.chargers
    d = Path(tempfile.mkdtemp(prefix="v2g-ss-"))
    paths = write_site(d / "site", n_devices=n, gateway_id="sunspec1", base_port=0)
    fleet = gateway_fleet(Fleet.from_csv(paths["roster"]), "sunspec1")
    state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0, low_soh_fraction=0.0)
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
    gw = SunSpecChargers(fleet, devices, SunSpecSettings(), gateway_id="sunspec1").start()
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
            writes = [w for w in list(sim.writes) if w.t_ns > t0 and w.p_kw * sign > 0.5]
            rows = {}
            for w in writes:
                rows.setdefault(w.row, w.t_ns)
            if rows:
                first.append((min(rows.values()) - t0) / 1e6)
                last.append((max(rows.values()) - t0) / 1e6)
            ap_ns = [t for t, _row, kw in list(sim.applies) if t > t0 and kw * sign > 0.5]
            if ap_ns:
                applied.append((min(ap_ns) - t0) / 1e6)
    finally:
        stop.set()
        runner.join(5.0)
        gw.close()
        agg.stop()
        ctx.term()
        sim.stop()
        msim.stop()

    def q(xs):
        a = np.array(xs)
        return (f"p50 {np.percentile(a, 50):.0f} ms, p90 {np.percentile(a, 90):.0f} ms, "
                f"p99 {np.percentile(a, 99):.0f} ms, max {a.max():.0f} ms (n={a.size})")

    print(f"{n} chargers, {args.steps} steps of {args.gap_s} s")
    print(f"first WSet of the new sign at a charger: {q(first)}")
    print(f"last dispatched charger's WSet:          {q(last)}")
    print(f"first charger applying it:               {q(applied)}")
    print(f"per step, first WSet (ms): {[round(x) for x in first]}")
    print(f"gateway counters: {gw.counters()}")


if __name__ == "__main__":
    main()
