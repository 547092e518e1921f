"""The live rig of `v2grt prequal`: the real aggregator and gateway processes, driven by a test signal.

In this process: a simulated grid meter (SunSpec model 213 over Modbus TCP, which the aggregator
polls for frequency) and one simulated site inverter (SunSpec 701) per gateway, whose measured ``W``
is set the moment the gateway reports its vehicles' actual output (the sim-only ``--site-power``
link, as `v2grt demo` uses). As child processes (v2grt.procrig: each dying with this one): the
simulated gateways (`v2grt gateway sim`) and the aggregator (`v2grt run`) with its dispatch journal
on. The frequency programme of each test is written into the meter every METER_TICK_S; afterwards
the journal is read back: its cycle records carry the frequency the aggregator used and the site
inverters' measured power, which is what the grid operator's meters would show.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from v2grt import procrig

PERIOD_S = 0.05  # 20 Hz cycle records: the rate GB's dynamic services are monitored at
METER_TICK_S = 0.01
SETPOINT_TTL_S = procrig.RIG_SETPOINT_TTL_S
METER_TIMEOUT_S = procrig.RIG_METER_TIMEOUT_S


class RigError(RuntimeError):
    """The rig could not start or run; the message says which process and where its log is."""


class Rig:
    """Meter, inverters, gateways and aggregator for one prequalification run (use as a context manager)."""

    def __init__(self, out: Path, *, service: str, vehicles: int, gateways: int, capacity_kw: float | None,
                 seed: int = 0, telemetry_interval_s: float = 0.5, unreachable_fraction: float = 0.01):
        self.out = out
        self.service = service
        self.vehicles = vehicles
        self.gateways = gateways
        self.capacity_kw = capacity_kw
        self.seed = seed
        self.telemetry_interval_s = telemetry_interval_s
        self.unreachable_fraction = unreachable_fraction
        self.children: procrig.Children | None = None
        self.journal_dir = out / "journal"
        self.site_kw: dict[str, float] = {}
        self.f_hz = 50.0
        self._sim = self._ctx = self._pull = self._control = self._thread = None
        self._stop = threading.Event()
        self._pm_handler: logging.Handler | None = None

    # ------------------------------------------------------------------------------ start
    def __enter__(self) -> Rig:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        import zmq

        from v2grt.fleet import Fleet
        from v2grt.io import bus
        from v2grt.roster import write_roster
        from v2grt.services import get_service
        from v2grt.sim.sunspec import (
            SimServerThread,
            SunSpecInverter,
            SunSpecMeter,
            inverter_limit_kw,
            inverter_w_sf,
        )

        self.curve = get_service(self.service)
        self.f_hz = self.curve.nominal_hz
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.children = procrig.Children(self.logs, self.out, error=RigError)
        # a previous run's segments would be read as this run's, its logs counted in this run's health
        for old in [*self.journal_dir.glob("*"), *self.logs.glob("*.log"), *self.logs.glob("*.out"),
                    self.out / "engine.log"]:
            old.unlink(missing_ok=True)
        # pymodbus logs a client hanging up mid-reply (the aggregator stopping), and its frames, to a file
        self._pm_handler = logging.FileHandler(self.logs / "prequal.log", encoding="utf-8")
        pm = logging.getLogger("pymodbus")
        pm.addHandler(self._pm_handler)
        pm.propagate = False
        fleet = Fleet.random(self.vehicles, seed=self.seed, n_gateways=self.gateways, n_sites=self.gateways)
        roster = self.out / "roster.csv"
        write_roster(fleet, roster)
        n = fleet.n_rows
        per_site = np.bincount(fleet.site[:n], weights=np.maximum(fleet.p_dis_max_kw[:n], fleet.p_chg_max_kw[:n]),
                               minlength=len(fleet.site_ids))
        self.fleet_rated_kw = float(np.sum(fleet.p_dis_max_kw[:n]))
        w_sf = inverter_w_sf(float(per_site.max()) * 1.05)
        self.w_lim_kw = inverter_limit_kw(w_sf)
        self.gateway_ids, self.site_ids = list(fleet.gateway_ids), list(fleet.site_ids)

        self.meter = SunSpecMeter(213, f_hz=self.f_hz, name="grid-meter")
        self.inverters = {s: SunSpecInverter(f_hz=self.f_hz, w_sf=w_sf, name=f"inv-{s}") for s in self.site_ids}
        self._sim = SimServerThread([self.meter, *self.inverters.values()], name="prequal-modbus").start()
        names = ["setpoints", "telemetry", "control"]
        ports = dict(zip(names, procrig.free_ports(len(names)), strict=True))
        ends = {k: f"tcp://127.0.0.1:{ports[k]}" for k in names}
        config = self._config(ends, self._sim.port(self.meter),
                              {s: self._sim.port(inv) for s, inv in self.inverters.items()})

        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        site_endpoint = f"tcp://127.0.0.1:{self._pull.bind_to_random_port('tcp://127.0.0.1')}"
        self._thread = threading.Thread(target=self._site_power, name="prequal-site-power", daemon=True)
        self._thread.start()
        self._control = bus.ControlClient(self._ctx, ends["control"], timeout_ms=1000)

        for i, gw in enumerate(self.gateway_ids):
            self.children.spawn(f"gateway-{gw}", [
                "gateway", "sim", "--roster", str(roster), "--gateway-id", gw, "--setpoints", ends["setpoints"],
                "--telemetry", ends["telemetry"], "--telemetry-interval-s", f"{self.telemetry_interval_s:g}",
                "--seed", str(self.seed * 1000 + i), "--unreachable-fraction", f"{self.unreachable_fraction:g}",
                # a prequalification test runs with the vehicles plugged in: no churn during it
                "--unplug-rate-per-h", "0", "--plug-rate-per-h", "0",
                "--site-power", site_endpoint, "--log-file", str(self.logs / f"gateway-{gw}.log")])
        deadline = time.monotonic() + timeout_s
        procrig.wait_for(lambda: len(self.site_kw) >= len(self.site_ids), timeout_s,  # every gateway stepping
                         lambda: f"only {len(self.site_kw)} of {len(self.site_ids)} gateways reported after "
                                 f"{timeout_s:g} s; logs in {self.logs}", children=self.children, error=RigError)
        self.children.spawn("aggregator", ["run", "--config", str(config), "--log-file", str(self.out / "engine.log"),
                                           *procrig.allow_root_args()])
        self._wait_heard(deadline)

    def _config(self, ends: dict[str, str], meter_port: int, inverter_ports: dict[str, int]) -> Path:
        import yaml

        from v2grt.config import ConfigError, config_from_dict

        data = {
            "fleet_id": "prequal",
            "period_s": PERIOD_S,
            "budget_s": PERIOD_S,
            "state_dir": "state",
            "realtime": {"sched_fifo_priority": 50},  # best effort, as the shipped config
            # timeout 0.25 s, not the shipped 0.05 s: procrig.RIG_METER_TIMEOUT_S says why
            "meter": {"host": "127.0.0.1", "port": meter_port, "poll_interval_s": 0.005,
                      "timeout_s": METER_TIMEOUT_S},
            "inverters": [{"name": f"inv-{s}", "site": s, "host": "127.0.0.1", "port": p}
                          for s, p in inverter_ports.items()],
            # setpoint expiry 0.5 s, as `v2grt demo`, not 3 periods: procrig.RIG_SETPOINT_TTL_S says why
            "bus": {"setpoints": ends["setpoints"], "telemetry": ends["telemetry"], "control": ends["control"],
                    "setpoint_ttl_s": SETPOINT_TTL_S},
            "service": {"name": self.curve.name, "nominal_hz": self.curve.nominal_hz,
                        "capacity_kw": self.capacity_kw},
            "fleet": {"roster": "roster.csv"},
            "journal": {"enabled": True, "dir": "journal"},
        }
        path = self.out / "config.yaml"
        try:
            config_from_dict(data, path)
        except ConfigError as exc:
            raise RigError(f"generated config is invalid (a bug): {exc}") from None
        path.write_text("# Generated by `v2grt prequal`: the aggregator's config for this run.\n"
                        + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def status(self) -> dict | None:
        from v2grt.io.wire import WireError

        try:
            reply = self._control.call("status")
        except WireError:
            return None
        return reply.result if reply.ok else None

    def _wait_heard(self, deadline: float) -> None:
        """The aggregator answers and has heard the fleet: its available discharge stopped growing (within 1 %
        over 0.5 s, after at least one telemetry interval: thermal limits may keep it drifting a little)."""
        last, since = None, None
        while True:
            self.children.check()
            st = self.status()
            now = time.monotonic()
            if st is not None:
                avail = float(st.get("available_dis_kw") or 0.0)
                since = since or now
                if (avail > 0 and last is not None and abs(avail - last) <= 0.01 * avail
                        and now - since >= self.telemetry_interval_s + 0.5):
                    return
                last = avail
            if now > deadline:
                raise RigError(f"the aggregator {'answers but heard no vehicle' if st else 'does not answer'} "
                               f"in time; see {self.out / 'engine.log'} and {self.logs}")
            time.sleep(0.5)

    # ------------------------------------------------------------------------------ while running
    def _site_power(self) -> None:
        """Each gateway's per-site output -> its inverter's measured W, as soon as it arrives."""
        import msgpack
        import zmq

        while not self._stop.is_set():
            if not self._pull.poll(100):
                continue
            for _ in range(256):
                try:
                    m = msgpack.unpackb(self._pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                except Exception:
                    continue  # a sim-only link: a bad frame is skipped
                for site, kw in m.get("sites", {}).items():
                    inv = self.inverters.get(str(site))
                    if inv is None:
                        continue
                    self.site_kw[str(site)] = float(kw)
                    inv.set_measured(min(max(float(kw), -self.w_lim_kw), self.w_lim_kw), self.f_hz)

    def set_frequency(self, f_hz: float) -> None:
        self.f_hz = f_hz
        self.meter.set_frequency(f_hz)
        self.meter.set_power(-sum(self.site_kw.values()))  # the meter counts import as positive

    def drive(self, programme, pre_s: float, duration_s: float) -> int:
        """Apply ``programme(t_s)`` every METER_TICK_S: ``pre_s`` of t < 0, then ``duration_s`` from t = 0.

        Returns the UTC time (ns) at which the t = 0 value was written into the meter: the test's t = 0.
        """
        self.set_frequency(programme(-1.0))
        end = time.monotonic() + pre_s
        while time.monotonic() < end:
            self.children.check()
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        t0_mono = time.monotonic()
        t0_ns = time.time_ns()
        self.set_frequency(programme(0.0))
        next_t = next_check = t0_mono
        while True:
            next_t += METER_TICK_S
            now = time.monotonic()
            if now - t0_mono >= duration_s:
                return t0_ns
            if now >= next_check:
                self.children.check()
                next_check = now + 0.5
            if next_t > now:
                time.sleep(next_t - now)
            self.set_frequency(programme(time.monotonic() - t0_mono))

    # ------------------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Aggregator first (its journal is sealed, its final zero reaches the gateways), then the gateways."""
        if self.children is not None:
            self.children.stop(("aggregator", ""))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._pull is not None:
            self._pull.close(0)
        if self._control is not None:
            self._control.close()
        if self._sim is not None:
            self._sim.stop()
        if self._ctx is not None:
            self._ctx.term()
        self._sim = self._ctx = self._pull = self._control = self._thread = None
        if self._pm_handler is not None:
            logging.getLogger("pymodbus").removeHandler(self._pm_handler)
            self._pm_handler.close()
            self._pm_handler = None


def health(out: Path, t_from_ns: int, t_to_ns: int) -> dict:
    """What the processes logged about the rig: the aggregator's missed deadlines over its life, and the
    gateways' setpoint expiries while the tests ran (``t_from_ns``..``t_to_ns``, UTC).

    A prequalification result is only as good as the rig under it: on a loaded host a starved gateway lets
    its setpoints expire (its vehicles go to 0 kW) and the report should say so next to the verdict. The
    expiries every gateway logs at the end (the aggregator is stopped first) fall outside the window.
    """
    import datetime as dt
    import re

    def ints(text: str, key: str) -> list[int]:
        return [int(v) for v in re.findall(rf"\b{key}=(\d+)", text)]

    engine = (out / "engine.log").read_text(errors="replace") if (out / "engine.log").exists() else ""
    stopped = [line for line in engine.splitlines() if " STOPPED " in line]
    expiries = 0
    for path in sorted((out / "logs").glob("gateway-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "SETPOINT_EXPIRED" not in line:
                continue
            try:
                t_ns = int(dt.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() * 1e9)
            except (ValueError, IndexError):
                continue
            if t_from_ns <= t_ns <= t_to_ns:
                expiries += 1 + sum(ints(line, "suppressed"))
    return {
        "aggregator_missed_deadlines": sum(ints(stopped[-1], "missed_deadlines")) if stopped else None,
        "aggregator_cycles": sum(ints(stopped[-1], "cycles")) if stopped else None,
        "gateway_setpoint_expiries": expiries,
    }


def read_cycles(journal_dir: Path) -> dict[str, np.ndarray]:
    """The cycle records of every segment in ``journal_dir``, time order, as columns (inverter_kw, reasons left out)."""
    from v2grt.journal import SUFFIX, read_segment

    segs = [read_segment(p) for p in sorted(journal_dir.glob(f"*{SUFFIX}"))]
    segs = [s for s in segs if s.header is not None and len(s.cycles)]
    if not segs:
        raise RigError(f"the journal in {journal_dir} holds no cycle record")
    fields = [n for n in segs[0].cycles.dtype.names if n not in ("reasons", "inverter_kw")]
    cols = {f: np.concatenate([s.cycles[f] for s in segs]) for f in fields}
    order = np.argsort(cols["t_ns"], kind="stable")
    return {f: v[order] for f, v in cols.items()}


__all__ = ["PERIOD_S", "Rig", "RigError", "health", "read_cycles"]
