"""`v2grt demo`: the whole system on one machine, with no hardware, and a report of what the fleet did.

One command starts, in this process, a simulated grid meter (SunSpec model 213 over Modbus TCP)
replaying a real frequency trace sped up ``--speed`` times, and one simulated site inverter (SunSpec
701/704) per gateway whose measured power is the sum of its vehicles' actual output; then, as
separate processes, the gateways of ``--protocols``: ``--gateways`` simulated gateways (``v2grt
gateway sim``), an OCPP 2.1 gateway with simulated stations and a SunSpec DER gateway with
simulated chargers (v2grt.demo_protocols), sharing the fleet's simulated vehicles, and the
aggregator (``v2grt run`` on a config generated into ``--out``). It shows a live status while it
runs, stops everything cleanly after ``--duration`` seconds (or on Ctrl-C, or on an error), and
writes ``report.png``, ``report.json`` and ``timeseries.csv`` into ``--out``, with delivered power
and setpoint-to-applied latency per protocol. docs/demo.md explains how to read them.

Every child runs in its own session (a terminal's Ctrl-C reaches only the demo, which then stops
the children in order: aggregator first, so gateways hear its final zero, then gateways, so they
write their final state and hand the zero to their devices, then the device simulators) and with
a parent-death signal, so not even a killed demo leaves one behind (v2grt.procrig, as every rig).
Powers are kW, positive = discharge into the grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from v2grt import procrig

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

DEFAULT_VEHICLES = 10_000
DEFAULT_GATEWAYS = 20
DEFAULT_PROTOCOLS = "sim,ocpp,sunspec"
#: Vehicles behind the OCPP and SunSpec gateways by default (docs/demo.md says why these sizes): a few
#: hundred show each protocol at work; gateway + simulator cost 25-30 % of a core for OCPP, 14-15 % for
#: SunSpec (measured in the default run on the loaded 2-core machine).
DEFAULT_OCPP_VEHICLES = 200
DEFAULT_SUNSPEC_VEHICLES = 200
MAX_DEVICE_VEHICLES = 2000
DEFAULT_DURATION_S = 60.0
DEFAULT_SPEED = 10.0
DEFAULT_SERVICE = "dc"
PERIOD_S = 0.1
#: Gateways step their vehicles on every setpoint (10 Hz) but report only this often: at 10,000
#: vehicles in 20 processes that keeps the whole simulated fleet near a tenth of one core.
DEFAULT_TELEMETRY_INTERVAL_S = 1.0
METER_TICK_S = 0.02  # the meter's frequency is refreshed this often (the aggregator polls every 20 ms)
INVERTER_TICK_S = 0.1

_PROM_LINE = re.compile(r'^(v2grt_[a-z_]+)_bucket\{(.*)\} ([0-9.eE+-]+)$')


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what failed and where its log is."""


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM while starting up: nothing to report yet."""


# ------------------------------------------------------------------------------------- small helpers
def _fmt_kw(kw: float | None, signed: bool = True) -> str:
    if kw is None or not math.isfinite(kw):
        return "-"
    sign = "+" if signed else ""
    return f"{kw / 1e3:{sign},.3f} MW" if abs(kw) >= 1e3 else f"{kw:{sign},.1f} kW"


def _hms(t_s: float) -> str:
    t = int(t_s)
    return f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"


# ---------------------------------------------------------------------------------------- recorder
class _SetpointTap:
    """The demo's view of one gateway's setpoint topic: every message (a gateway keeps only the newest).

    With security on it connects with that gateway's own key, the only kind a gateway's topic admits. It
    reads what the report needs (docs/wire.md section 4) from its own aggregator without the full check
    of ``wire.decode_setpoints``, which parses every node id of every message once 22 gateways' id lists
    outrun that decoder's cache: 0.2 ms a message, 4 % of a core taken from the demo process, which also
    serves the grid meter the aggregator polls every 5 ms. The ids are parsed (and checked) once per list.
    """

    def __init__(self, ctx, endpoint: str, gateway_id: str, curve=None):
        from v2grt.io import bus

        # the gateway's own depth: a demo too slow to keep up loses messages, never holds the aggregator
        self.sub = bus.GatewaySubscriber(ctx, endpoint, gateway_id, curve=curve)
        self._blob: bytes | None = None
        self._ids: tuple[str, ...] = ()
        self.bad = 0

    def recv_all(self, max_frames: int = 64) -> list[tuple[int, tuple[str, ...], np.ndarray]]:
        """(t_ns, node ids, p_kw as float64) of every message queued, oldest first."""
        import msgpack

        from v2grt.io import wire

        self.sub.heal()
        out = []
        for frame in self.sub._drain(0, max_frames):  # GatewaySubscriber.recv would keep only the newest
            try:
                buf = frame.bytes
                m = msgpack.unpackb(buf[buf.index(b"\x00") + 1:])
                if m["ids"] != self._blob:
                    self._ids = tuple(wire.split_ids(m["ids"]))
                    self._blob = bytes(m["ids"])
                p_kw = np.frombuffer(m["p_kw"], dtype="<f4").astype(np.float64)
                if len(p_kw) != len(self._ids):
                    raise ValueError(f"{len(p_kw)} setpoints for {len(self._ids)} ids")
                out.append((int(m["t_ns"]), self._ids, p_kw))
            except Exception:  # not from our aggregator, or not a setpoint message: count and go on
                self.bad += 1
        return out


class _Recorder(threading.Thread):
    """Owns the status SUB, the setpoint taps and the site-power PULL: records every message, keeps the newest
    for the view.

    Per gateway: each setpoint message's receive time, publish time (t_ns), sum and non-zero count, the ids
    given a non-zero setpoint, and (for ``detailed`` gateways, whose devices report per node) every node's
    value; from the site-power frames each site's output, the setpoints the devices applied, how many
    devices their gateway has reached and, at the end, their SoC.
    """

    def __init__(self, ctx, status_endpoint: str, site_pull, gateway_index: dict[str, int], curve=None, *,
                 taps: dict[str, _SetpointTap] | None = None, detailed: frozenset[str] = frozenset(),
                 known_sites: frozenset[str] | None = None, known_nodes: frozenset[str] | None = None):
        super().__init__(name="demo-recorder", daemon=True)
        from v2grt.io import bus

        self.status_sub = bus.StatusSubscriber(ctx, status_endpoint, curve=curve)
        self.site_pull = site_pull  # bound by the demo's main thread, used only here from now on
        self.taps = taps or {}  # created by the main thread, used only here from now on
        self.gateway_index = gateway_index
        self.detailed = detailed
        # site and vehicle ids come from the frames' senders: only the demo's own are kept (None: any)
        self.known_sites, self.known_nodes = known_sites, known_nodes
        self.stop = threading.Event()
        self.status_rows: list[tuple] = []
        self.site_rows: list[tuple[float, int, float]] = []
        self.latest: dict | None = None
        self.site_kw: dict[str, float] = {}
        self.gw_kw: dict[str, float] = {}
        self.gw_seen: set[str] = set()
        self.bad_site_frames = 0
        # setpoints as published: (recv monotonic s, gateway index, t_ns, sum kW, non-zero count)
        self.sp_rows: list[tuple[float, int, int, float, int]] = []
        self.sp_values: dict[str, list[tuple[int, tuple[str, ...], np.ndarray]]] = {g: [] for g in detailed}
        self.dispatched: dict[str, set[str]] = {g: set() for g in gateway_index}
        # what the devices did: sim gateways' applied sums, device simulators' per-node applies
        self.p_set: dict[str, list[tuple[int, float]]] = {g: [] for g in gateway_index}
        self.applied: dict[str, list[tuple[str, int, float]]] = {g: [] for g in gateway_index}
        self.reached: dict[str, int] = {}
        self.final_soc: dict[str, float] = {}

    def run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.status_sub.sock, zmq.POLLIN)
        poller.register(self.site_pull, zmq.POLLIN)
        for tap in self.taps.values():
            poller.register(tap.sub.sock, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(100))
                now = time.monotonic()
                if self.status_sub.sock in events:
                    st = self.status_sub.recv(0, max_frames=256)
                    if st is not None:
                        self.latest = st
                        f = st["f_hz"]
                        self.status_rows.append((now, math.nan if f is None else f, st["target_kw"],
                                                 st["delivered_kw"], st["available_dis_kw"],
                                                 st["available_chg_kw"], st["n_active"]))
                for gw, tap in self.taps.items():
                    if tap.sub.sock in events:
                        for t_ns, ids, p_kw in tap.recv_all():
                            self._setpoints(now, gw, t_ns, ids, p_kw)
                if self.site_pull in events:
                    self._site_frames(now)
        finally:
            self.status_sub.close()
            for tap in self.taps.values():
                tap.sub.close()
            self.site_pull.close(0)

    def _setpoints(self, now: float, gw: str, t_ns: int, ids: tuple[str, ...], p_kw: np.ndarray) -> None:
        on = np.flatnonzero(p_kw)  # p_kw in float64, as the gateway holds them (it sums in this order too)
        if on.size:
            self.dispatched[gw].update(ids[i] for i in on.tolist())
        self.sp_rows.append((now, self.gateway_index[gw], t_ns, float(p_kw.sum()), int(on.size)))
        if gw in self.detailed:
            self.sp_values[gw].append((t_ns, ids, p_kw))

    def _site_frames(self, now: float) -> None:
        import zmq

        from v2grt.sim import site_power

        for _ in range(1024):
            try:
                frame = self.site_pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                m = site_power.decode(frame)
                gw = m["gw"]
                g = self.gateway_index[gw]
            except Exception:  # a sim-only link: count and go on
                self.bad_site_frames += 1
                continue
            sites = m["sites"]
            if self.known_sites is not None:
                sites = {k: v for k, v in sites.items() if k in self.known_sites}
            self.site_kw.update(sites)
            self.gw_kw[gw] = sum(sites.values())
            self.gw_seen.add(gw)
            self.site_rows.append((now, g, sum(sites.values())))
            if "p_set_kw" in m:
                self.p_set[gw].append((m["t_ns"], float(m["p_set_kw"])))
            for node, t_ns, kw in m.get("applied", ()):
                self.applied[gw].append((str(node), int(t_ns), float(kw)))
            if "reached" in m:
                self.reached[gw] = int(m["reached"])
            if "soc" in m:
                self.final_soc.update({str(k): float(v) for k, v in m["soc"].items()
                                       if self.known_nodes is None or str(k) in self.known_nodes})


# ------------------------------------------------------------------------------------------- demo
class Demo:
    """One run of the demo; ``run()`` returns the exit code. See the module docstring."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).expanduser().resolve()
        self.children = procrig.Children(self.out / "logs", self.out, error=DemoError)
        from v2grt.service import SignalFlag

        # Set from signal handlers, so not threading.Event: its set() takes a lock a second signal deadlocks on
        self.stop = SignalFlag()  # Ctrl-C / SIGTERM: stop early (the report covers what ran)
        self.hurry = SignalFlag()  # a second one: kill the children now
        self.interrupted = False
        self.t_run0: float | None = None
        self.t_run_end: float | None = None
        self.final: dict = {}
        self.cycle_hist: dict | None = None
        self._loop0: dict = {}
        self._hist0: dict | None = None
        self.cpu: dict[str, float] = {}
        self.cpu_by_protocol: dict[str, dict] = {}
        self._sim = self._recorder = self._feeder = self._ctx = self._control = None
        self._live_lines = 0

    # ------------------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Check the flags, build the fleet, roster, trace and config (files only; nothing started)."""
        from v2grt import demo_protocols as dp
        from v2grt.roster import write_roster
        from v2grt.services import ServiceError, get_service
        from v2grt.sim.sunspec import inverter_w_sf

        a = self.args
        try:
            self.protocols = dp.parse_protocols(a.protocols)
        except ValueError as exc:
            raise DemoError(str(exc)) from None
        n_ocpp = a.ocpp_vehicles if "ocpp" in self.protocols else 0
        n_sunspec = a.sunspec_vehicles if "sunspec" in self.protocols else 0
        for flag, n, proto in (("--ocpp-vehicles", n_ocpp, "ocpp"), ("--sunspec-vehicles", n_sunspec, "sunspec")):
            if proto in self.protocols and not 1 <= n <= MAX_DEVICE_VEHICLES:
                raise DemoError(f"{flag} {n}: expected 1..{MAX_DEVICE_VEHICLES:,}")
        with_sim = "sim" in self.protocols
        total = a.vehicles if a.vehicles is not None else (DEFAULT_VEHICLES if with_sim else n_ocpp + n_sunspec)
        n_sim = total - n_ocpp - n_sunspec
        if not 1 <= total <= 1_000_000:
            raise DemoError(f"--vehicles {total}: expected 1..1,000,000")
        if with_sim and n_sim < 1:
            raise DemoError(f"--vehicles {total}: leaves no vehicle behind the sim gateways once {n_ocpp} are behind "
                            f"OCPP and {n_sunspec} behind SunSpec")
        if not with_sim and n_sim != 0:
            raise DemoError(f"--vehicles {total}: without sim the fleet is the OCPP and SunSpec vehicles "
                            f"({n_ocpp + n_sunspec}); leave --vehicles out or set --ocpp/--sunspec-vehicles")
        if with_sim and (not 1 <= a.gateways <= 200 or a.gateways > n_sim):
            raise DemoError(f"--gateways {a.gateways}: expected 1..200 and at most the {n_sim:,} vehicles behind "
                            "the sim gateways")
        self.n_vehicles = total
        self.n_sim_gateways = a.gateways if with_sim else 0
        if not 1.0 <= a.duration <= 86400.0:
            raise DemoError(f"--duration {a.duration}: expected 1..86400 s")
        if not 0.01 <= a.speed <= 1000.0:
            raise DemoError(f"--speed {a.speed}: expected 0.01..1000 (trace seconds per second)")
        if not 0.05 <= a.telemetry_interval_s <= 4.0:
            raise DemoError(f"--telemetry-interval-s {a.telemetry_interval_s}: expected 0.05..4 s (the aggregator "
                            "excludes vehicles whose telemetry is older than 5 s)")
        try:
            self.curve = get_service(a.service)
        except ServiceError as exc:
            raise DemoError(f"--service: {exc}") from None
        self.trace, self.trace_shift_hz = self._load_trace()
        window_s = a.duration * a.speed
        self.trace_start_s = self._trace_start(window_s)

        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        for old in ("report.png", "report.json", "timeseries.csv"):
            (self.out / old).unlink(missing_ok=True)
        for old in self.out.glob("state-*.csv"):
            old.unlink()
        # --protocols sim: Fleet.random(--vehicles) behind --gateways, exactly the demo before protocols
        self.fleet = dp.build_fleet(n_sim=n_sim, n_gateways=self.n_sim_gateways, n_ocpp=n_ocpp, n_sunspec=n_sunspec,
                                    seed=a.seed)
        self.roster = self.out / "roster.csv"
        write_roster(self.fleet, self.roster)
        self.gateway_ids = list(self.fleet.gateway_ids)
        self.protocol_of = {gw: "ocpp" if gw == dp.OCPP_GATEWAY else "sunspec" if gw == dp.SUNSPEC_GATEWAY else "sim"
                            for gw in self.gateway_ids}
        self.site_ids = list(self.fleet.site_ids)
        n = self.fleet.n_rows
        self.node_ids = list(self.fleet.node_ids[:n])
        self.soc_before = np.array(self.fleet.soc[:n])
        # one site (and inverter) per gateway: Fleet.random places both in the same contiguous blocks, and
        # each other protocol has a site of its own
        per_site = np.bincount(self.fleet.site[:n], weights=np.maximum(self.fleet.p_dis_max_kw[:n],
                                                                        self.fleet.p_chg_max_kw[:n]),
                               minlength=len(self.site_ids))
        self.inverter_w_sf = inverter_w_sf(float(per_site.max()) * 1.05)

    def _load_trace(self):
        from v2grt.sim.traces import TraceError, load_trace, sample_trace_path, synthetic_trace

        a = self.args
        try:
            if a.trace in (None, "", "sample"):
                trace = load_trace(sample_trace_path())
            elif a.trace == "synthetic":
                trace = synthetic_trace(max(3600.0, 2.0 * a.duration * a.speed), 1.0, a.seed)
            else:
                trace = load_trace(a.trace)
        except (TraceError, OSError) as exc:
            raise DemoError(f"--trace {a.trace!r}: {exc}") from None
        return trace, self.curve.nominal_hz - trace.nominal_hz

    def _trace_start(self, window_s: float) -> float:
        """--trace-start-s, or by default the window over which the frequency swings the most.

        The widest swing in the shipped Continental Europe day (49.930 to 50.068 Hz in 600 s) asks
        the fleet for both discharge and charge, which is what a first look should show.
        """
        t = self.trace.t_s
        if self.args.trace_start_s is not None:
            return t[0] + self.args.trace_start_s
        if self.trace.duration_s <= window_s + 1.0:
            return float(t[0])
        grid = self.trace.resample(1.0)
        w = int(window_s) + 1
        view = np.lib.stride_tricks.sliding_window_view(grid.f_hz, w)
        swing = view.max(axis=1) - view.min(axis=1)
        return float(grid.t_s[int(np.argmax(swing))])

    def _config(self, ports: dict[str, int]) -> Path:
        """Write the aggregator's config (validated first) and return its path."""
        import yaml

        from v2grt.config import Config, ConfigError, config_from_dict

        a = self.args
        data = {
            "fleet_id": "demo",
            "period_s": PERIOD_S,
            "budget_s": PERIOD_S,
            "state_dir": "state",
            # as the shipped config: SCHED_FIFO for the control thread, best effort (engine.log says if granted);
            # with 20+ processes on two cores it is what keeps the cycle's tail short
            "realtime": {"sched_fifo_priority": 50},
            "meter": {"host": "127.0.0.1", "port": ports["meter"], "poll_interval_s": 0.005, "timeout_s": 0.05},
            "inverters": [{"name": f"inv-{site}", "site": site, "host": "127.0.0.1", "port": ports[f"inv-{site}"]}
                          for site in self.site_ids],
            "bus": {"setpoints": f"tcp://127.0.0.1:{ports['setpoints']}",
                    "telemetry": f"tcp://127.0.0.1:{ports['telemetry']}",
                    "control": f"tcp://127.0.0.1:{ports['control']}",
                    "setpoint_ttl_s": procrig.RIG_SETPOINT_TTL_S},  # not 3 periods: procrig says why
            "service": {"name": a.service, "nominal_hz": self.curve.nominal_hz, "capacity_kw": a.capacity_kw},
            "fleet": {"roster": "roster.csv"},
        }
        if any(f.name == "metrics" for f in dataclasses.fields(Config)):
            # the aggregator's Prometheus endpoint: the demo reads its cycle-time histogram at the end
            data["metrics"] = {"enabled": True, "address": "127.0.0.1", "port": ports["metrics"]}
            self.metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        else:
            self.metrics_url = None
        self.keys = None
        if getattr(a, "secure", False):  # security.enabled: a key pair per process, peers from loopback only
            from v2grt.security import provision_local

            self.keys = provision_local(self.out / "keys", self.gateway_ids)
            data["security"] = self.keys.config_section()
        path = self.out / "config.yaml"
        try:
            config_from_dict(data, path)
        except ConfigError as exc:
            raise DemoError(f"generated config is invalid (a bug): {exc}") from None
        header = ("# Generated by `v2grt demo`: the aggregator's config for this run "
                  "(`v2grt run --config config.yaml`).\n")
        path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    # ------------------------------------------------------------------------------ the run
    def run(self) -> int:
        a = self.args
        try:
            self.prepare()
        except DemoError as exc:
            print(f"v2grt demo: {exc}", file=sys.stderr)
            return EXIT_INVALID
        # pymodbus logs a client that hangs up mid-reply (the aggregator stopping) at ERROR: to a file
        pm = logging.getLogger("pymodbus")
        pm.addHandler(logging.FileHandler(self.logs / "demo.log", encoding="utf-8"))
        pm.propagate = False
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        started = False
        code = EXIT_OK
        try:
            self._say(f"v2grt demo: {self._fleet_line()}, service {a.service}, "
                      f"{a.duration:g} s, trace at {a.speed:g}x; files in {self.out}")
            self._t_start = time.monotonic()
            self._start_world()
            self._wait_ready()
            started = True
            self._run_clock()
            self._final_status()
        except _Interrupted:
            print("v2grt demo: interrupted while starting; stopping everything", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except DemoError as exc:
            print(f"v2grt demo: {exc}", file=sys.stderr)
            code = EXIT_FAILED
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if started:
            try:
                self._report()
            except Exception as exc:  # the run happened; say why its report did not
                print(f"v2grt demo: the report failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                return EXIT_FAILED
        if code == EXIT_OK and self.interrupted:
            code = EXIT_INTERRUPTED
        return code

    def _on_signal(self, signum, frame) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()
        self.interrupted = True

    def _say(self, line: str) -> None:
        print(line, flush=True)

    def _vehicles_of(self, protocol: str) -> int:
        return sum(len(self.fleet.gateway_rows(gw)) for gw, p in self.protocol_of.items() if p == protocol)

    def _fleet_line(self) -> str:
        if self.protocols == ("sim",):
            return f"{self.n_vehicles:,} vehicles, {self.n_sim_gateways} gateway processes"
        parts = [f"{self._vehicles_of('sim'):,} behind {self.n_sim_gateways} sim gateway processes"] * (
            "sim" in self.protocols)
        parts += [f"{self._vehicles_of(p):,} behind {p.upper() if p == 'ocpp' else 'SunSpec'} (gateway + simulated "
                  f"{'stations' if p == 'ocpp' else 'chargers'})" for p in self.protocols if p != "sim"]
        return f"{self.n_vehicles:,} vehicles: " + ", ".join(parts)

    def _start_world(self) -> None:
        import zmq

        from v2grt import demo_protocols as dp
        from v2grt.io import bus
        from v2grt.io.wire import MAX_FRAME_BYTES
        from v2grt.sim.sunspec import SimServerThread, SunSpecInverter, SunSpecMeter

        a = self.args
        f0 = self.trace.at(self.trace_start_s, looped=True) + self.trace_shift_hz
        self.meter = SunSpecMeter(213, f_hz=f0, name="grid-meter")
        self.inverters = {site: SunSpecInverter(f_hz=f0, w_sf=self.inverter_w_sf, name=f"inv-{site}")
                          for site in self.site_ids}
        self._sim = SimServerThread([self.meter, *self.inverters.values()], name="demo-modbus").start()
        names = ["setpoints", "telemetry", "control", "metrics"]
        n_servers = dp.sunspec_servers(self._vehicles_of("sunspec")) if "sunspec" in self.protocols else 0
        free = procrig.free_ports(len(names) + 1 + n_servers)
        ports = dict(zip(names, free, strict=False))
        ocpp_port, sunspec_ports = free[len(names)], free[len(names) + 1:]
        ports["meter"] = self._sim.port(self.meter)
        ports.update({f"inv-{site}": self._sim.port(inv) for site, inv in self.inverters.items()})
        self.config_path = self._config(ports)
        self.endpoints = {k: f"tcp://127.0.0.1:{ports[k]}" for k in ("setpoints", "telemetry", "control")}

        self._ctx = zmq.Context()
        site_pull = self._ctx.socket(zmq.PULL)
        site_pull.setsockopt(zmq.LINGER, 0)
        site_pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # bounded before msgpack sees it
        site_port = site_pull.bind_to_random_port("tcp://127.0.0.1")
        site_endpoint = f"tcp://127.0.0.1:{site_port}"
        view_curve = self.keys.curve("demo-view") if self.keys else None  # an observer key: status only
        # each gateway's setpoints as published, for the per-protocol report (a gateway key sees its own topic)
        taps = {gw: _SetpointTap(self._ctx, self.endpoints["setpoints"], gw,
                                 curve=self.keys.curve(gw) if self.keys else None) for gw in self.gateway_ids}
        self._recorder = _Recorder(self._ctx, self.endpoints["setpoints"], site_pull,
                                   {g: i for i, g in enumerate(self.gateway_ids)}, curve=view_curve, taps=taps,
                                   detailed=frozenset(g for g, p in self.protocol_of.items() if p != "sim"),
                                   known_sites=frozenset(self.site_ids),
                                   known_nodes=frozenset(self.fleet.row_of))
        self._recorder.start()
        self._feeder_stop = threading.Event()
        self.meter_rows: list[tuple[float, float]] = []
        self._feeder = threading.Thread(target=self._feed, name="demo-meter", daemon=True)
        self._feeder.start()
        self._control = bus.ControlClient(self._ctx, self.endpoints["control"], timeout_ms=1000, curve=view_curve)

        def bus_args(gw: str) -> list[str]:
            return ["--setpoints", self.endpoints["setpoints"], "--telemetry", self.endpoints["telemetry"],
                    "--telemetry-interval-s", f"{a.telemetry_interval_s:g}",
                    "--log-file", str(self.logs / f"gateway-{gw}.log"),
                    *(self.keys.client_args(gw) if self.keys else [])]

        def devices_args(gw: str) -> list[str]:
            return ["--site-power", site_endpoint, "--log-file", str(self.logs / f"devices-{gw}.log")]

        self.sides: list[dp.DeviceSide] = []
        if "ocpp" in self.protocols:
            self.sides.append(dp.ocpp_side(self.out / "ocpp", self.fleet, self.roster, port=ocpp_port, seed=a.seed,
                                           gateway_args=bus_args(dp.OCPP_GATEWAY),
                                           devices_args=devices_args(dp.OCPP_GATEWAY)))
        if "sunspec" in self.protocols:
            self.sides.append(dp.sunspec_side(self.out / "sunspec", self.fleet, self.roster, ports=sunspec_ports,
                                              seed=a.seed, gateway_args=bus_args(dp.SUNSPEC_GATEWAY),
                                              devices_args=devices_args(dp.SUNSPEC_GATEWAY)))
        # Gateways first; the aggregator once they are all up (_wait_ready), so its first cycles do not
        # share two cores with twenty interpreters starting, and none of them misses its first cycle.
        # Chargers before their gateway (it connects to them), the OCPP gateway before its stations.
        for side in self.sides:
            first, second = ((side.devices_argv, side.gateway_argv) if side.protocol == "sunspec"
                             else (side.gateway_argv, side.devices_argv))
            for argv in (first, second):
                self.children.spawn(f"{'devices' if argv is side.devices_argv else 'gateway'}-{side.gateway_id}", argv)
        for i, gw in enumerate(g for g in self.gateway_ids if self.protocol_of[g] == "sim"):
            self.children.spawn(f"gateway-{gw}", [
                "gateway", "sim", "--roster", str(self.roster), "--gateway-id", gw,
                "--setpoints", self.endpoints["setpoints"], "--telemetry", self.endpoints["telemetry"],
                "--telemetry-interval-s", f"{a.telemetry_interval_s:g}", "--seed", str(a.seed * 1000 + i),
                # plugs come and go as fast as the trace runs, so a one-minute demo shows some
                "--unplug-rate-per-h", f"{0.1 * a.speed:g}", "--plug-rate-per-h", f"{0.5 * a.speed:g}",
                "--state-out", str(self.out / f"state-{gw}.csv"), "--site-power", site_endpoint,
                "--log-file", str(self.logs / f"gateway-{gw}.log"), *(self.keys.client_args(gw) if self.keys else [])])
        self._aggregator_argv = ["run", "--config", str(self.config_path), "--log-file", str(self.out / "engine.log"),
                                 *procrig.allow_root_args()]

    def _feed(self) -> None:
        """Meter frequency from the trace every METER_TICK_S; inverters' measured W from the site reports."""
        from v2grt.sim.sunspec import inverter_limit_kw

        speed, shift = self.args.speed, self.trace_shift_hz
        lim_kw = inverter_limit_kw(self.inverter_w_sf)
        next_inv = 0.0
        failed = False
        while not self._feeder_stop.is_set():
            now = time.monotonic()
            try:
                t_trace = self.trace_start_s + (speed * (now - self.t_run0) if self.t_run0 is not None else 0.0)
                f = self.trace.at(t_trace, looped=True) + shift
                self.meter.set_frequency(f)
                site_kw = dict(self._recorder.site_kw)  # a copy: the recorder thread adds keys
                self.meter.set_power(-sum(site_kw.values()))  # the meter counts import as positive
                self.meter_rows.append((now, f))
                if now >= next_inv:
                    next_inv = now + INVERTER_TICK_S
                    for site, inv in self.inverters.items():
                        inv.set_measured(min(max(site_kw.get(site, 0.0), -lim_kw), lim_kw), f)
            except Exception as exc:  # the meter must keep ticking; say it once
                if not failed:
                    print(f"v2grt demo: meter feed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    failed = True
            self._feeder_stop.wait(max(0.0, METER_TICK_S - (time.monotonic() - now)))

    def _status(self) -> dict | None:
        from v2grt.io.wire import WireError

        try:
            reply = self._control.call("status")
        except WireError:
            return None
        return reply.result if reply.ok else None

    def _wait_ready(self) -> None:
        """Every gateway up (stepping its vehicles; the OCPP and SunSpec gateways have reached their devices),
        then the aggregator started, answering and fed telemetry."""
        a = self.args
        n_gw = len(self.gateway_ids)
        limit_s = max(60.0, 3.0 * n_gw)
        deadline = time.monotonic() + limit_s
        agg_ok = False
        agg_ok_at = None
        while True:
            if self.stop.is_set():
                raise _Interrupted
            self.children.check()
            now = time.monotonic()
            seen = len(self._recorder.gw_seen)
            reached = {s.gateway_id: (self._recorder.reached.get(s.gateway_id, 0), s.reachable) for s in self.sides}
            ready = seen == n_gw and all(r >= want for r, want in reached.values())
            if ready and not any(c.name == "aggregator" for c in self.children):
                self.children.spawn("aggregator", self._aggregator_argv)
            if not agg_ok and any(c.name == "aggregator" for c in self.children):
                agg_ok = self._status() is not None
            if agg_ok:
                agg_ok_at = agg_ok_at or now
                if now - agg_ok_at >= a.telemetry_interval_s + 0.5:
                    return
            devices = "".join(f", {gw} reached {r}/{want} devices" for gw, (r, want) in reached.items())
            if now > deadline:
                raise DemoError(f"not ready after {limit_s:.0f} s: aggregator "
                                f"{'answers' if agg_ok else 'does not answer'}, {seen} of {n_gw} gateways "
                                f"heard{devices}; logs in {self.logs} and {self.out / 'engine.log'}")
            if not a.no_live and sys.stdout.isatty():
                print(f"\rstarting: aggregator {'up' if agg_ok else 'starting'}, gateways {seen}/{n_gw}{devices} ",
                      end="", flush=True)
            time.sleep(0.1)

    def _run_clock(self) -> None:
        a = self.args
        if not a.no_live and sys.stdout.isatty():
            print("\r" + " " * 60 + "\r", end="")
        # The aggregator's counters and histogram at the start, so the report covers the run alone.
        self._loop0 = (self._status() or {}).get("loop", {})
        self._hist0 = self._scrape_histogram() if self.metrics_url else None
        for c in self.children:
            c.cpu_at_start_s = procrig.cpu_seconds(c.proc.pid)
        self._cpu_demo0 = time.process_time()
        self.t_run0 = time.monotonic()
        self.t_run0_utc_ns = time.time_ns()
        self._say(f"v2grt demo: everything is up after {self.t_run0 - self._t_start:.1f} s; running for "
                  f"{a.duration:g} s (Ctrl-C stops early and still writes the report)")
        end = self.t_run0 + a.duration
        last_status, control = 0.0, None
        next_line = self.t_run0 + 5.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            self.children.check()
            if not a.no_live:
                if now - last_status >= 1.0:  # the control socket's view, once a second (it costs percentiles)
                    control = self._status() or control
                    last_status = now
                if sys.stdout.isatty():
                    self._render(now, control)
                elif now >= next_line:
                    self._render_line(now, control)
                    next_line += 5.0
            self.stop.wait(min(0.5, max(0.0, end - now)))
        self.t_run_end = time.monotonic()

    # ------------------------------------------------------------------------------ live view
    def _view(self, now: float, control: dict | None) -> list[str]:
        a, st = self.args, self._recorder.latest or {}
        t = now - self.t_run0
        f = st.get("f_hz")
        fdev = f"({1e3 * (f - self.curve.nominal_hz):+.1f} mHz)" if f is not None else "(stale)"
        t_trace = self.trace_start_s + a.speed * t - self.trace.t_s[0]
        n_nodes = st.get("n_nodes", 0)
        excluded = st.get("excluded", {})
        available = n_nodes - sum(excluded.values())
        metered = sum(dict(self._recorder.site_kw).values())
        loop = (control or {}).get("loop", {})
        p99 = loop.get("total", {}).get("p99_ms", st.get("cycle_p99_ms"))
        cap = (control or {}).get("capacity_kw")
        excl = " · ".join(f"{k} {v:,}" for k, v in sorted(excluded.items(), key=lambda kv: -kv[1])) or "none"
        return [
            f"v2grt demo  {t:5.1f} / {a.duration:g} s   trace +{_hms(t_trace)} at {a.speed:g}x   "
            f"(Ctrl-C stops early; the report goes to {self.out})",
            f"frequency   {f:.4f} Hz {fdev}" if f is not None else "frequency   - (no meter reading)",
            f"target      {_fmt_kw(st.get('target_kw'))}   delivered {_fmt_kw(metered)} (site meters), "
            f"{_fmt_kw(st.get('delivered_kw'))} (telemetry)   (+ = discharge)",
            f"available   up {_fmt_kw(st.get('available_dis_kw'), signed=False)}   down "
            f"{_fmt_kw(st.get('available_chg_kw'), signed=False)}"
            + (f"   contracted {cap / 1e3:,.1f} MW ({self.curve.name})" if cap else ""),
            f"vehicles    {n_nodes:,} in the fleet: {available:,} available, {st.get('n_active', 0):,} carrying load",
            *(["protocols   " + " · ".join(f"{p} {_fmt_kw(kw)}" for p, kw in self._delivered_by_protocol().items())
               + "   (delivered, site meters)"] if len(self.protocols) > 1 else []),
            f"not avail.  {excl}",
            f"cycles      p99 {p99 if p99 is not None else float('nan'):.2f} ms   deadline misses "
            f"{st.get('deadline_misses', 0)}   cycles {loop.get('cycles', st.get('seq', 0)):,}",
        ]

    def _delivered_by_protocol(self) -> dict[str, float]:
        by_gw = dict(self._recorder.gw_kw)  # a copy: the recorder thread adds keys
        return {p: sum(kw for gw, kw in by_gw.items() if self.protocol_of[gw] == p) for p in self.protocols}

    def _render(self, now: float, control: dict | None) -> None:
        lines = self._view(now, control)
        width = shutil.get_terminal_size((120, 20)).columns
        up = f"\x1b[{self._live_lines}F" if self._live_lines else ""
        sys.stdout.write(up + "".join("\x1b[2K" + line[:width - 1] + "\n" for line in lines))
        sys.stdout.flush()
        self._live_lines = len(lines)

    def _render_line(self, now: float, control: dict | None) -> None:
        v = self._view(now, control)
        print(" | ".join(" ".join(s.split("   (")[0].split()) for s in (v[0], v[1], v[2], v[-1])), flush=True)

    # ------------------------------------------------------------------------------ wind-down
    def _final_status(self) -> None:
        """What only the running aggregator can tell: its loop summary and cycle-time histogram."""
        self.final = self._status() or {}
        (self.out / "status.json").write_text(json.dumps(self.final, indent=2) + "\n", encoding="utf-8")
        if self.metrics_url:
            end, start = self._scrape_histogram(), self._hist0
            if end and start and end["le_ms"] == start["le_ms"]:
                end["counts"] = [e - b for e, b in zip(end["counts"], start["counts"], strict=True)]
            self.cycle_hist = end
        t_end = self.t_run_end or time.monotonic()
        wall = max(t_end - self.t_run0, 1e-9)

        def pct(children: list[procrig.Child]) -> float:
            return 100.0 * sum(procrig.cpu_seconds(c.proc.pid) - c.cpu_at_start_s for c in children) / wall

        gw = [c for c in self.children if c.name.startswith("gateway-")]
        devices = [c for c in self.children if c.name.startswith("devices-")]
        agg = [c for c in self.children if c.name == "aggregator"]
        self.cpu = {"aggregator": pct(agg), "gateways": pct(gw), "demo": 100.0 * (time.process_time() - self._cpu_demo0)
                    / wall}
        if devices:
            self.cpu["device_simulators"] = pct(devices)
        self.cpu["total"] = sum(self.cpu.values())
        self.cpu["cores"] = os.cpu_count() or 1
        # per protocol: its gateway processes and (OCPP, SunSpec) the simulator of its devices
        self.cpu_by_protocol = {p: {"gateways": round(pct([c for c in gw if self.protocol_of[c.name[8:]] == p]), 1),
                                    "devices": round(pct([c for c in devices if self.protocol_of[c.name[8:]] == p]), 1)}
                                for p in self.protocols}

    def _scrape_histogram(self) -> dict | None:
        """The aggregator's v2grt_cycle_duration_seconds{phase="total"} buckets, non-cumulative, in ms."""
        try:
            text = urllib.request.urlopen(self.metrics_url, timeout=2.0).read().decode()
        except OSError:
            return None
        buckets = []
        for line in text.splitlines():
            m = _PROM_LINE.match(line)
            if m and m.group(1) == "v2grt_cycle_duration_seconds" and 'phase="total"' in m.group(2):
                le = re.search(r'le="([^"]+)"', m.group(2)).group(1)
                if le != "+Inf":
                    buckets.append((float(le) * 1e3, float(m.group(3))))
        if not buckets:
            return None
        buckets.sort()
        cum = np.array([c for _, c in buckets])
        return {"le_ms": [b for b, _ in buckets], "counts": np.diff(np.r_[0.0, cum]).astype(int).tolist()}

    def _shutdown(self) -> None:
        """Aggregator first (its final zero reaches the gateways), then gateways (their zeros reach the devices),
        then the device simulators, then this process's threads."""
        self.children.stop(("aggregator", "gateway-", ""), hurry=self.hurry, on_kill=lambda c: print(
            f"v2grt demo: {c.name} (pid {c.proc.pid}) did not stop; killing it", file=sys.stderr))
        if self._control is not None:
            self._control.close()
        if self._recorder is not None:
            self._recorder.stop.set()
            self._recorder.join(5.0)
        if self._feeder is not None:
            self._feeder_stop.set()
            self._feeder.join(5.0)
        if self._sim is not None:
            self._sim.stop()
        if self._ctx is not None:
            self._ctx.term()
        if self._live_lines:
            self._live_lines = 0

    # ------------------------------------------------------------------------------ report
    def _report(self) -> None:
        from v2grt import report
        from v2grt.profile import DispatchProfile

        a, rec = self.args, self._recorder
        t0 = self.t_run0
        t_end = (self.t_run_end or time.monotonic()) - t0
        st = np.array([r for r in rec.status_rows if t0 <= r[0] <= t0 + t_end], dtype=float).reshape(-1, 7)
        site = np.array(rec.site_rows, dtype=float).reshape(-1, 3)
        meter = np.array(self.meter_rows, dtype=float).reshape(-1, 2)
        capacity_kw = float(self.final.get("capacity_kw") or a.capacity_kw or 0.0)
        recording = report.Recording(
            t_s=st[:, 0] - t0, f_agg_hz=st[:, 1], target_kw=st[:, 2], delivered_tel_kw=st[:, 3],
            available_dis_kw=st[:, 4], available_chg_kw=st[:, 5], n_active=st[:, 6],
            meter_t_s=meter[:, 0] - t0, meter_f_hz=meter[:, 1],
            site_t_s=site[:, 0] - t0, site_gw=site[:, 1].astype(int), site_kw=site[:, 2],
            n_gateways=len(self.gateway_ids), curve=self.curve, capacity_kw=capacity_kw, period_s=PERIOD_S,
            tolerance=a.tolerance_pct / 100.0)
        series = report.derive(recording)
        tracking = report.tracking_summary(recording, series)
        protocols, latency_ms = self._per_protocol(recording, series)
        soc_after = self._soc_after()
        loop = self.final.get("loop", {})
        total = loop.get("total", {})
        late = loop.get("lateness", {})
        by_reason = self.final.get("nodes_by_reason") or {}

        def during(key: str) -> int:
            return int(loop[key]) - int(self._loop0.get(key, 0)) if key in loop else 0

        summary = {
            "vehicles": self.n_vehicles, "gateways": self.n_sim_gateways, "gateway_processes": len(self.gateway_ids),
            "protocols": protocols, "service": self.curve.name,
            "service_title": (self.curve.description or self.curve.name).split(":")[0],
            "capacity_kw": capacity_kw, "nominal_hz": self.curve.nominal_hz,
            "deadband_hz": report.deadband_hz(self.curve), "speed": a.speed,
            "trace": str(self.trace.source), "trace_start_s": float(self.trace_start_s - self.trace.t_s[0]),
            "duration_s": float(t_end), "interrupted": self.interrupted,
            "telemetry_interval_s": a.telemetry_interval_s, "period_ms": PERIOD_S * 1e3, "budget_ms": PERIOD_S * 1e3,
            # during the measured run (the aggregator's counters at its end minus at its start) ...
            "cycles": during("cycles"),
            "deadline_misses": during("missed_deadlines") + during("budget_overruns"),
            "missed_deadlines": during("missed_deadlines"),
            "budget_overruns": during("budget_overruns"),
            # ... and over the aggregator's whole life, its start included (so are the percentiles)
            "cycles_total": int(loop.get("cycles", 0)),
            "deadline_misses_total": int(loop.get("missed_deadlines", 0)) + int(loop.get("budget_overruns", 0)),
            "cycle_ms": {k: total.get(f"{k}_ms") for k in ("p50", "p99", "p999", "max")},
            "lateness_ms": {k: late.get(f"{k}_ms") for k in ("p50", "p99", "p999", "max")},
            "tracking": tracking, "tolerance": a.tolerance_pct / 100.0,
            "energy_kwh": tracking.get("energy_kwh"),
            "vehicles_by_reason": by_reason,
            "vehicles_carrying": int(self.final.get("nodes_carrying", 0) or 0),
            "soc": {"mean_before": float(np.mean(self.soc_before)),
                    "mean_after": float(np.mean(soc_after)) if len(soc_after) else None,
                    "vehicles_after": len(soc_after)},
            "cpu_pct": {**{k: round(v, 1) if isinstance(v, float) else v for k, v in self.cpu.items()},
                        "by_protocol": self.cpu_by_protocol},
            "site_power_reports": len(site), "status_samples": len(st),
            "files": {"png": "report.png", "json": "report.json", "timeseries": "timeseries.csv",
                      "config": "config.yaml", "roster": "roster.csv", "status": "status.json",
                      "engine_log": "engine.log", "logs": "logs/"},
        }
        report.write_timeseries(self.out / "timeseries.csv", series)
        report.write_json(self.out / "report.json", summary)
        report.plot(self.out / "report.png", series, summary, soc_before=self.soc_before, soc_after=soc_after,
                    cycle_hist=self.cycle_hist, minimum_soc=DispatchProfile().minimum_soc, latency_ms=latency_ms)
        self._print_summary(summary)

    def _per_protocol(self, recording, series: dict) -> tuple[dict, dict]:
        """Each protocol's rows of report.json (adding its series to ``series``) and its latency samples (ms)."""
        from v2grt import report

        rec, t0 = self._recorder, self.t_run0
        sp = np.array(rec.sp_rows, dtype=float).reshape(-1, 5)
        index = {g: i for i, g in enumerate(self.gateway_ids)}
        groups = {p: [index[g] for g, q in self.protocol_of.items() if q == p] for p in self.protocols}
        series.update(report.protocol_series(recording, groups, sp[:, 0] - t0, sp[:, 1].astype(int), sp[:, 3],
                                             sp[:, 4]))
        t_start_ns = self.t_run0_utc_ns
        t_end_ns = t_start_ns + int(((self.t_run_end or time.monotonic()) - t0) * 1e9)
        out, latency = {}, {}
        for p in self.protocols:
            samples, unmatched = [], 0
            for gw, q in self.protocol_of.items():
                if q != p:
                    continue
                ms, miss = report.publish_to_applied_ms(self._setpoint_log(gw, sp), since_ns=t_start_ns,
                                                        until_ns=t_end_ns)  # the measured run only
                samples.append(ms)
                unmatched += miss
            latency[p] = np.concatenate(samples) if samples else np.zeros(0)
            out[p] = report.protocol_summary(
                p, series, recording.t_s, vehicles=self._vehicles_of(p), fleet_vehicles=self.n_vehicles,
                dispatched=sum(len(rec.dispatched[g]) for g, q in self.protocol_of.items() if q == p),
                latency_ms=latency[p], unmatched=unmatched)
            out[p]["gateway_processes"] = sum(q == p for q in self.protocol_of.values())
        return out, latency

    def _setpoint_log(self, gw: str, sp: np.ndarray):
        """One gateway's SetpointLog: per node for OCPP/SunSpec (their devices apply per node), else the sums."""
        from v2grt import report

        rec = self._recorder
        if gw in rec.sp_values:
            msgs = rec.sp_values[gw]
            ids = list(dict.fromkeys(i for _, node_ids, _ in msgs[:1] for i in node_ids))
            columns = {nid: k for k, nid in enumerate(ids)}
            values = np.full((len(msgs), len(ids)), np.nan)
            for m, (_, node_ids, p_kw) in enumerate(msgs):
                if node_ids == tuple(ids):
                    values[m] = p_kw
                else:  # the aggregator's roster changed (not in the demo): place by id
                    for nid, v in zip(node_ids, p_kw.tolist(), strict=True):
                        if nid in columns:
                            values[m, columns[nid]] = v
            return report.SetpointLog(np.array([t for t, _, _ in msgs], dtype=np.int64),
                                      values, columns, list(rec.applied[gw]))
        mine = sp[:, 1] == self.gateway_ids.index(gw)
        pub = np.array([r[2] for r, m in zip(rec.sp_rows, mine, strict=True) if m], dtype=np.int64)
        return report.SetpointLog(pub, sp[mine, 3:4], {"": 0},
                                  [("", t_ns, kw) for t_ns, kw in rec.p_set[gw]])

    def _soc_after(self) -> np.ndarray:
        values = []
        if self._recorder.final_soc:  # the OCPP and SunSpec simulators' vehicles, from their last frames
            values.append(np.array(list(self._recorder.final_soc.values()), dtype=float))
        for gw in (g for g in self.gateway_ids if self.protocol_of[g] == "sim"):
            path = self.out / f"state-{gw}.csv"
            if not path.exists():
                print(f"v2grt demo: {path.name} missing (gateway {gw} did not stop cleanly)", file=sys.stderr)
                continue
            data = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8", usecols=("soc",))
            values.append(np.atleast_1d(data["soc"]).astype(float))
        return np.concatenate(values) if values else np.array([])

    def _print_summary(self, s: dict) -> None:
        tr, cyc = s["tracking"], s["cycle_ms"]
        e = s.get("energy_kwh") or {}
        print(f"\nv2grt demo: {'interrupted after' if s['interrupted'] else 'ran'} {s['duration_s']:.1f} s: "
              f"{s['cycles']:,} cycles, cycle p50 {cyc['p50'] or float('nan'):.2f} ms, "
              f"p99 {cyc['p99'] or float('nan'):.2f} ms, {s['deadline_misses']} deadline misses")
        if tr.get("mae_kw") is not None:
            print(f"  tracking: mean |delivered - target| {tr['mae_kw']:,.1f} kW "
                  f"({tr['mae_pct_of_capacity']:.3f} % of {s['capacity_kw'] / 1e3:,.1f} MW); "
                  f"in tolerance {100 * tr['within_tolerance_share']:.1f} % of the time; "
                  f"net {e.get('net_discharged', 0):+,.1f} kWh discharged")
        print("  per protocol (delivered at the site inverters; latency: setpoint publish to applied at the device, "
              f"moves >= {s['protocols'] and next(iter(s['protocols'].values()))['latency_ms']['min_move_kw']:g} kW):")
        print(f"    {'protocol':<9}{'vehicles':>16}{'dispatched':>12}{'|setpoint|':>13}{'|delivered|':>13}"
              f"{'|error|':>11}{'latency p50 / p99 (moves)':>30}")
        for name, row in s["protocols"].items():
            lat = row["latency_ms"]
            timing = (f"{lat['p50']:.0f} / {lat['p99']:.0f} ms ({lat['samples']})" if lat["samples"]
                      else f"- ({lat['unmatched']} unmatched)")
            print(f"    {name:<9}{row['vehicles']:>8,} {row['share_pct']:5.1f} %{row['dispatched_vehicles']:>12,}"
                  f"{_fmt_kw(row['setpoint_mean_abs_kw'], signed=False):>13}"
                  f"{_fmt_kw(row['delivered_mean_abs_kw'], signed=False):>13}"
                  f"{_fmt_kw(row['mae_kw'], signed=False):>11}{timing:>30}")
        cpu = s["cpu_pct"]
        print(f"  CPU: aggregator {cpu.get('aggregator', 0):.0f} %, gateways {cpu.get('gateways', 0):.0f} %"
              + (f", device simulators {cpu['device_simulators']:.0f} %" if "device_simulators" in cpu else "")
              + f", demo {cpu.get('demo', 0):.0f} % (of one core; {cpu.get('cores', 1)} cores)")
        print(f"  report: {self.out / 'report.png'}, {self.out / 'report.json'}")


# ---------------------------------------------------------------------------------------------- CLI
def cmd_demo(args) -> int:
    """Run the whole system on this machine (meter, inverters, gateways, aggregator) and report."""
    if getattr(args, "ha", False):  # a separate path: two aggregators under etcd on the HA rig (v2grt/demo_ha.py)
        from v2grt.demo_ha import run_ha

        return run_ha(args, DEFAULT_VEHICLES, DEFAULT_GATEWAYS, PERIOD_S)
    return Demo(args).run()


def add_parser(sub) -> None:
    """Register `v2grt demo` on the v2grt command line."""
    p = sub.add_parser(
        "demo", help="the whole system on one machine: simulated meter, vehicles, gateways, aggregator; a report",
        description=cmd_demo.__doc__ + " See docs/demo.md.")
    p.add_argument("--protocols", default=DEFAULT_PROTOCOLS,
                   help=f"the protocols the fleet sits behind, a subset of {DEFAULT_PROTOCOLS} (default: all three; "
                        "sim alone is the demo with simulated gateways only)")
    p.add_argument("--vehicles", type=int, default=None,
                   help=f"the whole fleet (default {DEFAULT_VEHICLES:,} with sim; without sim, the OCPP and SunSpec "
                        "vehicles); the sim gateways take what OCPP and SunSpec leave")
    p.add_argument("--gateways", type=int, default=DEFAULT_GATEWAYS,
                   help=f"sim gateway processes (one site inverter each), default {DEFAULT_GATEWAYS}")
    p.add_argument("--ocpp-vehicles", type=int, default=DEFAULT_OCPP_VEHICLES,
                   help=f"EVSEs behind the OCPP gateway (stations of two), default {DEFAULT_OCPP_VEHICLES}")
    p.add_argument("--sunspec-vehicles", type=int, default=DEFAULT_SUNSPEC_VEHICLES,
                   help=f"chargers behind the SunSpec gateway (10 per Modbus port), default {DEFAULT_SUNSPEC_VEHICLES}")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                   help=f"seconds to run once everything is up, default {DEFAULT_DURATION_S:g}")
    p.add_argument("--speed", type=float, default=DEFAULT_SPEED,
                   help=f"trace seconds replayed per second, default {DEFAULT_SPEED:g}")
    p.add_argument("--service", default=DEFAULT_SERVICE,
                   help="service curve: dc (GB Dynamic Containment, default), fcr, fcr_n, ffr, ieee1547, ...")
    p.add_argument("--capacity-kw", type=float, default=None,
                   help="contracted capacity, kW (default: what the fleet can deliver both ways at start)")
    p.add_argument("--out", default="demo-out", help="directory for the report, config, roster and logs "
                                                     "(default ./demo-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fleet, faults and plug events (default 0)")
    p.add_argument("--trace", default=None,
                   help="frequency trace: a CSV path, 'synthetic', or (default) the shipped Continental Europe "
                        "1 s PMU recording")
    p.add_argument("--trace-start-s", type=float, default=None,
                   help="where in the trace to start, s (default: the window over which the frequency swings "
                        "the most)")
    p.add_argument("--telemetry-interval-s", type=float, default=DEFAULT_TELEMETRY_INTERVAL_S,
                   help=f"gateway telemetry interval, default {DEFAULT_TELEMETRY_INTERVAL_S:g} s")
    p.add_argument("--tolerance-pct", type=float, default=3.0,
                   help="tolerance band, %% of contracted capacity (default 3, as GB DC)")
    p.add_argument("--no-live", action="store_true", help="no live status while running (logs, CI)")
    p.add_argument("--secure", action="store_true", help="security.enabled: CURVE keys for every process (in "
                                                         "--out/keys), peers from 127.0.0.1 only (docs/security.md)")
    p.add_argument("--ha", action="store_true", help="two aggregators under etcd on the HA rig (network namespaces "
                                                     "as root), the leader killed midway, the gap reported "
                                                     "(docs/demo.md)")
    p.set_defaults(func=cmd_demo)
