"""Simulated SunSpec DER chargers: bidirectional EV chargers on Modbus TCP with EVs from the battery model.

Each charger is a :class:`~v2grt.sim.sunspec.SunSpecDevice` register image: 'SunS' at 40000, model
1, 701 (DERMeasureAC), 702 (DERCapacity), 704 (DERCtlAC), 713 (DERStorageCapacity), end model, laid
out from pysunspec2's model definitions. Chargers are served by real pymodbus ``ModbusTcpServer``s,
one per (host, port), each holding one or more unit ids. Behind every charger is an EV from
:class:`~v2grt.sim.battery.SimFleetState` (charger ``i`` = roster row ``i``), stepped every ``tick_s``
for all chargers at once. What a charger does with a write of the 704 setpoint block:

- the new ``WSet`` (``WSetEna`` ENABLED, ``WSetMod`` WATTS; anything else means 0 W here) takes
  effect after the charger's command latency (uniform in ``latency_s``, default 5-20 ms: a charger's
  controller picking up a Modbus write), timed on its own (not on the physics tick, which would add
  up to ``tick_s`` that no charger has), then the power ramps at ``ramp_kw_per_s`` (a converter does
  not jump), clipped to the 702 ratings and the battery;
- the reversion timer: ``WSetRvrtTms`` whole seconds after the write (when ``WSetEnaRvrt`` is
  ENABLED), with no newer write, the charger goes to ``WSetRvrt`` on its own; ``WSetRvrtRem``
  counts down.

Kinds that misbehave on purpose: ``silent`` (never answers; the TCP connection stays up) and ``bad``
(reports SoC 250 %). Powers are kW, + = discharge into the grid; SunSpec's signs (the same) come
from v2grt.gateway.sunspec_mapping.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymodbus.server import ModbusTcpServer

from v2grt.gateway import sunspec_mapping as sm
from v2grt.io.modbus import block_decoder, encode_point, model_points
from v2grt.sim.battery import SimFleetState
from v2grt.sim.sunspec import SunSpecDevice

KINDS = ("normal", "silent", "bad")
#: The physics tick's register values (SimChargers._publish) and the points they go to.
_LIVE_POINT = {"W": "W", "SoC": "SoC", "SoH": "SoH", "WHAvail": "WHAvail", "Rem": "WSetRvrtRem", "Alrm": "Alrm"}
#: The 704 points a charger acts on when its setpoint block is written (SunSpecCharger._on_write), in that order.
_SETPOINT_POINTS = ("WSetEna", "WSetMod", "WSet", "WSetRvrt", "WSetEnaRvrt", "WSetRvrtTms")
#: 713 scale factors of the simulated chargers: SoC/SoH in 0.1 %, energy in 10 Wh (uint16 up to 655 kWh).
PCT_SF = -1
WH_SF = 1


def _w_sf(p_max_kw: float) -> int:
    """The smallest W_SF >= 0 whose int16 (701 W) / uint16 (702) holds 1.2 x the rating."""
    sf = 0
    while p_max_kw * 1200.0 / 10.0**sf > 32767:
        sf += 1
    return sf


@dataclass
class Write:
    """One client write of the 704 setpoint block, as the charger received it (tests, latency probes)."""

    t_ns: int  # CLOCK_MONOTONIC of arrival
    row: int
    p_kw: float  # WSet as kW (+ discharge); 0 when WSetEna is not ENABLED or WSetMod is not WATTS
    revert_s: int  # WSetRvrtTms (0: no reversion)
    revert_kw: float


class SunSpecCharger(SunSpecDevice):
    """One charger's register image (models 1, 701, 702, 704, 713); physics live in :class:`SimChargers`."""

    def __init__(self, row: int, *, p_dis_max_kw: float, p_chg_max_kw: float, capacity_kwh: float,
                 on_write=None, device_id: int = 1, name: str = "charger", sn: str = "0001"):
        super().__init__([701, 702, 704, 713], md="ev-charger-701-702-704-713", device_id=device_id, name=name,
                         sn=sn)
        self.row = row
        self.w_sf = _w_sf(max(p_dis_max_kw, p_chg_max_kw, 1.0))
        self.wset_sf = 0
        self._on_write_cb = on_write
        self.set_points(701, ACType=2, St=sm.ST_ON, InvSt=sm.INVST_RUNNING, ConnSt=sm.CONNST_CONNECTED, Alrm=0,
                        W=0, W_SF=self.w_sf, Hz=50000, Hz_SF=-3, A_SF=-1, V_SF=-1, VA_SF=self.w_sf,
                        Var_SF=self.w_sf, PF_SF=-3, TotWh_SF=0, TotVarh_SF=0, Tmp_SF=0)
        r = 10.0**self.w_sf
        self.set_points(702, WMaxRtg=round(max(p_dis_max_kw, p_chg_max_kw) * 1e3 / r),
                        WChaRteMaxRtg=round(p_chg_max_kw * 1e3 / r), WDisChaRteMaxRtg=round(p_dis_max_kw * 1e3 / r),
                        W_SF=self.w_sf, VA_SF=self.w_sf, Var_SF=self.w_sf, V_SF=0, A_SF=0, PF_SF=-3, S_SF=0,
                        CtrlModes=1 << 1)  # FIXED_W: the 704 WSet
        self.set_points(704, WSetEna=0, WSetMod=sm.WSETMOD_WATTS, WSet=0, WSetRvrt=0, WSetPct=0, WSetPctRvrt=0,
                        WSetEnaRvrt=0, WSetRvrtTms=0, WSetRvrtRem=0, WSet_SF=self.wset_sf, WSetPct_SF=-2)
        self.set_points(713, WHRtg=round(capacity_kwh * 1e3 / 10.0**WH_SF), WH_SF=WH_SF, Pct_SF=PCT_SF,
                        Sta=sm.STA_OK)
        first, count = sm.span(704, sm.WRITE_704)
        self._block = (self.models[704] + first, count)
        pts = model_points(704)
        self._decode_704 = block_decoder([pts[n] for n in _SETPOINT_POINTS], -first)
        #: The points the physics tick updates: (index into the image, Point), for :meth:`poke`.
        self._live = {name: (self.models[mid] + model_points(mid)[name].offset - self.base, model_points(mid)[name])
                      for mid, name in ((701, "W"), (701, "Alrm"), (713, "SoC"), (713, "SoH"), (713, "WHAvail"),
                                        (704, "WSetRvrtRem"))}

    def poke(self, **values) -> None:
        """Set raw values of the live points (W, Alrm, SoC, SoH, WHAvail, WSetRvrtRem) in one step: the physics
        tick's fast path (set_points looks every point up again: most of a 100-charger simulator's tick)."""
        live = self._live
        enc = []
        for name, v in values.items():
            i, p = live[name]
            if v is not None and p.size == 1 and -0x8000 <= v <= 0xFFFF:
                enc.append((i, (v & 0xFFFF,)))  # int16/uint16 in range: its two's complement, without struct
            elif v is not None and p.size == 2 and 0 <= v <= 0xFFFFFFFE:
                enc.append((i, (v >> 16, v & 0xFFFF)))  # uint32/bitfield32 (0xFFFFFFFF: not implemented)
            else:
                enc.append((i, encode_point(p, v)))
        with self._lock:
            for i, regs in enc:
                self._image[i : i + len(regs)] = regs

    def _on_write(self, address: int, count: int) -> None:
        start, n = self._block
        if address >= start + n or address + count <= start:
            return
        t_ns = time.monotonic_ns()
        ena, mod, wset, rvrt, ena_rvrt, rvrt_tms = self._decode_704(self.registers(start, n))
        sf = self.wset_sf  # static (WSet_SF "static": "S"): the value this device was built with
        on = ena == sm.ENABLED and mod == sm.WSETMOD_WATTS
        p_kw = sm.wset_to_kw(wset or 0, sf) if on else 0.0
        write = Write(t_ns, self.row, p_kw, (rvrt_tms or 0) if ena_rvrt == sm.ENABLED else 0,
                      sm.wset_to_kw(rvrt or 0, sf))
        if self._on_write_cb is not None:
            self._on_write_cb(write)


class SimChargers:
    """N simulated chargers on one asyncio thread: their Modbus servers and one vectorised EV model.

    ``layout``: a list of (host, port, [(row, unit id), ...]) servers; port 0 binds an ephemeral port
    (see :meth:`address`). ``state`` row ``i`` is charger ``i``. ``writes`` keeps the last setpoint
    writes received and ``applies`` the (t_ns, row, kW) of each taking effect; ``p_kw`` is what each
    charger delivers now (+ discharge), ``target_kw`` what it is heading for, ``applied_ns`` when its
    newest target took effect, ``reversions`` how often its reversion timer moved it (to WSetRvrt
    from another power).
    """

    def __init__(self, state: SimFleetState, layout: list[tuple[str, int, list[tuple[int, int]]]], *,
                 kinds: dict[int, str] | None = None, latency_s: tuple[float, float] = (0.005, 0.02),
                 ramp_kw_per_s: float = 50.0, tick_s: float = 0.02, seed: int = 0):
        self.state = state
        n = len(state)
        rows = sorted(r for _h, _p, units in layout for r, _u in units)
        if rows != list(range(n)):
            raise ValueError(f"layout: expected every charger row 0..{n - 1} exactly once, got {len(rows)} rows")
        self.layout = [(h, p, list(units)) for h, p, units in layout]
        self.latency_s = latency_s
        self.ramp_kw_per_s = ramp_kw_per_s
        self.tick_s = tick_s
        self.rng = random.Random(seed)
        self.devices: list[SunSpecCharger] = [None] * n  # type: ignore[list-item]
        for _h, _p, units in self.layout:
            for row, unit in units:
                self.devices[row] = SunSpecCharger(
                    row, p_dis_max_kw=float(state.p_dis_max_kw[row]), p_chg_max_kw=float(state.p_chg_max_kw[row]),
                    capacity_kwh=float(state.capacity_kwh[row]), on_write=self._written, device_id=unit,
                    name=f"charger {row}", sn=f"{row + 1:06d}")
        self.kinds = np.array(["normal"] * n, dtype=object)
        for row, kind in (kinds or {}).items():
            self.set_kind(row, kind)
        self.target_kw = np.zeros(n)
        self.p_kw = np.zeros(n)
        self.applied_ns = np.zeros(n, dtype=np.int64)
        self._command = [0] * n  # per charger, the number of its newest write (a newer one supersedes)
        self.revert_at_ns = np.full(n, np.iinfo(np.int64).max)
        self.revert_kw = np.zeros(n)
        self.reversions = np.zeros(n, dtype=np.int64)
        self.writes: collections.deque[Write] = collections.deque(maxlen=100_000)
        self.applies: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=100_000)
        self._raw = {k: np.full(n, -1, dtype=np.int64) for k in _LIVE_POINT}
        self._online = np.ones(n, dtype=bool)
        self._w_sf = np.array([d.w_sf for d in self.devices])
        self._ports: list[int] = [p for _h, p, _u in self.layout]
        self._servers: list[ModbusTcpServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------------ misbehaviour
    def set_kind(self, row: int, kind: str) -> None:
        """Make charger ``row`` normal, silent (answers nothing) or bad (SoC 250 %), from now on."""
        if kind not in KINDS:
            raise ValueError(f"charger {row}: kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.kinds[row] = kind
        self.devices[row].set_stale(kind == "silent")
        if hasattr(self, "_raw"):
            self._raw["SoC"][row] = -1  # rewrite the SoC register on the next tick

    # ------------------------------------------------------------------------------ physics
    def _written(self, w: Write) -> None:
        """On the server loop: a setpoint block arrived; it takes effect after the command latency."""
        self.writes.append(w)
        i = w.row
        self._command[i] += 1
        delay_s = self.rng.uniform(*self.latency_s) - (time.monotonic_ns() - w.t_ns) / 1e9
        self.loop.call_later(max(delay_s, 0.0), self._take, i, self._command[i], w.p_kw)
        # The reversion timer runs from the write (SunSpec 704: WSetRvrtTms after the last write).
        self.revert_at_ns[i] = w.t_ns + w.revert_s * 1_000_000_000 if w.revert_s > 0 else np.iinfo(np.int64).max
        self.revert_kw[i] = w.revert_kw

    def _take(self, i: int, command: int, p_kw: float) -> None:
        """On the server loop, when a write's command latency has passed: its WSet is the new target."""
        if command != self._command[i]:
            return  # a newer write arrived meanwhile: it replaces this one, as in the register image
        now_ns = time.monotonic_ns()
        self.target_kw[i] = p_kw
        self.applied_ns[i] = now_ns
        self.applies.append((now_ns, i, p_kw))

    def step(self, dt_s: float, now_ns: int) -> None:
        """Advance every charger by ``dt_s``: reversion, ramp, battery, registers."""
        s = self.state
        reverted = self.revert_at_ns <= now_ns
        if reverted.any():
            # Counted (and timed) only where the timer changes what the charger does.
            moved = reverted & (self.target_kw != self.revert_kw)
            self.reversions[moved] += 1
            self.applied_ns[moved] = now_ns
            self.target_kw[reverted] = self.revert_kw[reverted]
            self.revert_at_ns[reverted] = np.iinfo(np.int64).max
        target = np.clip(self.target_kw, -s.p_chg_max_kw, s.p_dis_max_kw)
        step = self.ramp_kw_per_s * dt_s
        self.p_kw += np.clip(target - self.p_kw, -step, step)
        delivered = s.step(self.p_kw, dt_s)
        self.p_kw[:] = np.where(np.abs(delivered - self.p_kw) > 1e-9, delivered, self.p_kw)
        self._publish(now_ns)

    def _publish(self, now_ns: int) -> None:
        """Write the registers that changed: 701 W and Alrm, 713 SoC/SoH/WHAvail, 704 WSetRvrtRem."""
        s = self.state
        w_sf = self._w_sf
        raw = {
            "W": np.rint(self.p_kw * 1e3 / 10.0**w_sf).astype(np.int64),
            "SoC": np.where(self.kinds == "bad", 2500, np.rint(s.soc * 100.0 * 10**-PCT_SF)).astype(np.int64),
            "SoH": np.rint(s.soh * 100.0 * 10**-PCT_SF).astype(np.int64),
            "WHAvail": np.rint(s.capacity_kwh * s.soh * s.soc * 1e3 / 10**WH_SF).astype(np.int64),
            "Rem": np.where(self.revert_at_ns == np.iinfo(np.int64).max, 0,
                            np.ceil(np.maximum(self.revert_at_ns - now_ns, 0) / 1e9)).astype(np.int64),
            "Alrm": np.where(s.thermal_limit, sm.ALRM_OVER_TEMP, 0).astype(np.int64),
        }
        online = s.online.astype(bool)
        per_row: dict[int, dict] = {}
        for k, v in raw.items():
            moved = v != self._raw[k]
            if k in ("SoC", "WHAvail"):
                moved |= online != self._online  # not implemented while the EV is away
            for i in np.flatnonzero(moved).tolist():
                per_row.setdefault(i, {})[_LIVE_POINT[k]] = int(v[i]) if online[i] or k not in ("SoC", "WHAvail") \
                    else None
        for i, values in per_row.items():
            self.devices[i].poke(**values)
        self._online = online
        for k, v in raw.items():
            self._raw[k][:] = v

    async def _physics(self) -> None:
        t_prev = time.monotonic_ns()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic_ns()
            self.step(max((now - t_prev) / 1e9, 1e-6), now)
            t_prev = now

    def save_trace(self, path: str | Path) -> None:
        """The writes received and the targets taken (``writes``, ``applies``) as .npz arrays, CLOCK_MONOTONIC ns:
        ``write_t_ns``, ``write_row``, ``write_kw``, ``apply_t_ns``, ``apply_row``, ``apply_kw`` (benchmarks)."""
        writes, applies = list(self.writes), list(self.applies)
        np.savez(path, write_t_ns=np.array([w.t_ns for w in writes], np.int64),
                 write_row=np.array([w.row for w in writes], np.int64),
                 write_kw=np.array([w.p_kw for w in writes], float),
                 apply_t_ns=np.array([a[0] for a in applies], np.int64),
                 apply_row=np.array([a[1] for a in applies], np.int64),
                 apply_kw=np.array([a[2] for a in applies], float))

    # ------------------------------------------------------------------------------ servers
    def address(self, row: int) -> sm.DeviceAddress:
        """Where charger ``row`` answers (after start: the bound port)."""
        for k, (host, _p, units) in enumerate(self.layout):
            for r, unit in units:
                if r == row:
                    return sm.DeviceAddress(host, self._ports[k], unit)
        raise KeyError(row)

    def devices_map(self, node_ids: list[str]) -> dict[str, sm.DeviceAddress]:
        """{node id: address} for a devices file (node ``i`` = charger ``i``)."""
        return {nid: self.address(i) for i, nid in enumerate(node_ids)}

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            for k, (host, port, units) in enumerate(self.layout):
                server = ModbusTcpServer([self.devices[r].sim_device() for r, _u in units], address=(host, port),
                                         ignore_missing_devices=True)
                await server.serve_forever(background=True)
                self._servers.append(server)
                self._ports[k] = server.transport.sockets[0].getsockname()[1]
        except BaseException as exc:  # pymodbus says "Could not start listen, please check address." alone
            self._error = f"{host}:{port}: {exc}" if len(self._servers) < len(self.layout) else exc
            self._ready.set()
            for server in self._servers:
                await server.shutdown()
            return
        self.step(1e-3, time.monotonic_ns())  # registers hold the initial state before the first read
        physics = asyncio.create_task(self._physics())
        self._ready.set()
        await self._stop.wait()
        physics.cancel()
        for server in self._servers:
            await server.shutdown()

    def _serve(self) -> None:
        # uvloop when installed, as the gateway's input thread: a charger's answer should not wait on the
        # simulator's event loop more than a device's own controller would.
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._main())

    def start(self, timeout_s: float = 10.0) -> SimChargers:
        """Bind every server and start the physics; RuntimeError if a port cannot be bound."""
        self._thread = threading.Thread(target=self._serve, name="sunspec-chargers", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"simulated chargers did not start within {timeout_s:g} s")
        if self._error is not None:
            self._thread.join(5.0)
            self._thread = None
            raise RuntimeError(f"simulated chargers: cannot serve: {self._error}")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10.0)
            self._thread = None

    def run_forever(self, stop) -> None:
        """Run until ``stop`` (an object with is_set()) is set; the CLI's main loop."""
        self.start()
        while not stop.is_set():
            time.sleep(0.1)
        self.stop()

    def __enter__(self) -> SimChargers:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------ layouts and site files
def grouped_layout(n: int, *, units_per_server: int = 1, host: str = "127.0.0.1", base_port: int = 0
                   ) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """Chargers 0..n-1, ``units_per_server`` unit ids (1, 2, ...) per server on ports base_port, +1, ...

    ``base_port`` 0 binds every server to an ephemeral port (tests).
    """
    if not 1 <= units_per_server <= 247:
        raise ValueError(f"units_per_server={units_per_server}: expected 1..247 (Modbus unit ids)")
    out = []
    for k, start in enumerate(range(0, n, units_per_server)):
        rows = range(start, min(start + units_per_server, n))
        out.append((host, base_port + k if base_port else 0, [(r, u + 1) for u, r in enumerate(rows)]))
    return out


def layout_from_devices(devices: dict[str, sm.DeviceAddress], node_ids: list[str]
                        ) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """Servers as a devices file places the roster's nodes (node ``i`` = charger ``i``)."""
    servers: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for row, nid in enumerate(node_ids):
        if nid not in devices:
            raise ValueError(f"roster node {nid!r}: no row in the devices file")
        a = devices[nid]
        servers.setdefault((a.host, a.port), []).append((row, a.unit_id))
    return [(h, p, units) for (h, p), units in servers.items()]


def write_site(directory: str | Path, *, n_devices: int, gateway_id: str = "sunspec1", prefix: str = "SS",
               host: str = "127.0.0.1", base_port: int = 15020, units_per_server: int = 1, seed: int = 0,
               soc: float = 0.6, capacity_kwh: float = 60.0, p_max_kw: float = 11.0) -> dict[str, Path]:
    """Write a roster (one node per charger under ``gateway_id``) and the devices file into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nodes = [f"{prefix}{i:04d}" for i in range(1, n_devices + 1)]
    paths = {"roster": directory / "roster.csv", "devices": directory / "devices.csv"}
    with open(paths["roster"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["node_id", "gateway_id", "site_id", "soc", "soh", "capacity_kwh", "p_dis_max_kw", "p_chg_max_kw",
                    "temp_c"])
        for nid in nodes:
            w.writerow([nid, gateway_id, "site1", f"{soc + rng.uniform(-0.1, 0.1):.3f}", "0.95", capacity_kwh,
                        p_max_kw, p_max_kw, "25.0"])
    layout = grouped_layout(n_devices, units_per_server=units_per_server, host=host, base_port=base_port)
    addresses = {nodes[r]: sm.DeviceAddress(h, p, u) for h, p, units in layout for r, u in units}
    sm.write_devices(paths["devices"], {nid: addresses[nid] for nid in nodes})
    return paths


__all__ = ["KINDS", "SimChargers", "SunSpecCharger", "Write", "grouped_layout", "layout_from_devices", "write_site"]
