"""Indicative CPU of one SunSpec gateway process (not a benchmark): N chargers, poll and telemetry at 1/s.

The aggregator runs in this process (period 100 ms, GB DC, a meter at ``--f-hz`` 49.6 so the fleet
discharges about a third of its capacity); the simulated chargers (`v2grt sim
sunspec-chargers`) and the gateway (`v2grt gateway sunspec`, defaults: --poll-s 1, --revert-s 2, so a
refresh write every 0.67 s per discharging charger) are real processes. The gateway's CPU is read
from /proc over ``--measure-s`` once every charger is online.

    python -m v2grt.bench.probe_sunspec_capacity --chargers 100 --units-per-server 10
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from v2grt.aggregator import Aggregator
from v2grt.config import config_from_dict
from v2grt.sim.sunspec import SimServerThread, SunSpecMeter
from v2grt.testing import wait_until

BIN = Path(sys.executable).parent


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chargers", type=int, default=100)
    ap.add_argument("--units-per-server", type=int, default=10)
    ap.add_argument("--base-port", type=int, default=16000)
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--f-hz", type=float, default=49.6)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="v2g-ssc-"))
    subprocess.run([str(BIN / "v2grt"), "sim", "sunspec-chargers", "--write-site", str(d), "--chargers",
                    str(args.chargers), "--units-per-server", str(args.units_per_server), "--base-port",
                    str(args.base_port)], check=True, capture_output=True)
    meter = SunSpecMeter(213, f_hz=args.f_hz)
    msim = SimServerThread([meter]).start()
    cfg = config_from_dict({
        "fleet_id": "capacity", "period_s": 0.1, "budget_s": 0.1, "state_dir": str(d / "state"),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": {"host": "127.0.0.1", "port": msim.port(meter), "poll_interval_s": 0.02},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
        "service": {"name": "dc", "capacity_kw": 11.0 * args.chargers * 0.8},
        "fleet": {"roster": str(d / "roster.csv")},
    })
    agg = Aggregator(cfg, epoch=1)
    agg.start()
    sim = subprocess.Popen([str(BIN / "v2grt"), "sim", "sunspec-chargers", "--roster", str(d / "roster.csv"),
                            "--devices", str(d / "devices.csv"), "--log-file", str(d / "sim.log")])
    time.sleep(2.0)
    gw = subprocess.Popen([str(BIN / "v2grt"), "gateway", "sunspec", "--roster", str(d / "roster.csv"),
                           "--gateway-id", "sunspec1", "--devices", str(d / "devices.csv"), "--setpoints",
                           agg.publisher.endpoint, "--telemetry", agg.telemetry.endpoint, "--log-file",
                           str(d / "gateway.log")])
    try:
        n = args.chargers
        wait_until(lambda: int(agg.fleet.online[:n].sum()) == n, 60.0, "every charger online")
        time.sleep(3.0)
        c0, t0 = cpu_s(gw.pid), time.monotonic()
        s0 = cpu_s(sim.pid)
        time.sleep(args.measure_s)
        c1, t1 = cpu_s(gw.pid), time.monotonic()
        s1 = cpu_s(sim.pid)
        p = agg.fleet.p_actual_kw[:n]
        print(f"{n} chargers ({args.units_per_server} unit ids per port): gateway CPU "
              f"{100.0 * (c1 - c0) / (t1 - t0):.1f} % of a core, simulator {100.0 * (s1 - s0) / (t1 - t0):.1f} %; "
              f"measured discharge {float(p.sum()):.1f} kW over {int((p > 0.1).sum())} chargers; "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        for proc in (gw, sim):
            proc.send_signal(signal.SIGTERM)
            proc.wait(20.0)
        agg.stop()
        msim.stop()
    print((d / "gateway.log").read_text().strip().splitlines()[-1][:600])


if __name__ == "__main__":
    main()
