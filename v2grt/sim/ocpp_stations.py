"""Simulated OCPP 2.1 charging stations: ``ocpp`` ChargePoint clients with EVs from the battery model.

Each station is a real websocket client built on the ``ocpp`` package (the same classes a real
station's software could use), authenticating with HTTP Basic auth. Each EVSE has an EV from
:class:`~v2grt.sim.battery.SimFleetState` (vehicle ``i`` = roster row ``i``), stepped in real time
for all stations at once. What a station does with what it is told:

- SetChargingProfile (TxProfile, Dynamic / CentralSetpoint): the period's ``setpoint`` becomes the
  EV's target; TxDefaultProfile (evseId 0): the fallback limit (0 W as the gateway sends it);
- UpdateDynamicSchedule: a new target, applied after the station's command latency, then ramped
  at ``ramp_kw_per_s`` (an inverter does not jump);
- offline longer than the profile's ``maxOfflineDuration`` with ``invalidAfterOfflineDuration``:
  the profile is dropped and the EV falls back to the default (0 kW).

It reports StatusNotification, TransactionEvent (Started with meter values), NotifyEVChargingNeeds
(bidirectional AC_BPT with the BMS limits and the energy to its minimum SoC) and MeterValues (SoC,
Power.Active.Import/Export) every ``meter_interval_s``. Kinds that misbehave on purpose:
``rejects`` (refuses every profile and update), ``disconnects`` (drops the connection every
``disconnect_every_s`` for ``away_s``), ``v201`` (speaks only ocpp2.0.1: charge limits, no V2X),
``no_lf`` (2.1, but rejects LocalFrequency profiles). LocalFrequency itself: v2grt.sim.ocpp_local.
Powers are kW, + = discharge into the grid; the OCPP signs come from v2grt.gateway.ocpp_mapping.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import csv
import datetime
import itertools
import logging
import random
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from ocpp.exceptions import OCPPError
from ocpp.messages import CallError
from ocpp.routing import after, on
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v201 import ChargePoint as ChargePoint201

from v2grt.gateway import ocpp_mapping as om
from v2grt.gateway import ocpp_schema
from v2grt.gateway.ocpp import send_text
from v2grt.sim.battery import SimFleetState

log = logging.getLogger("v2grt.sim")
_LIB_LOG = logging.getLogger("v2grt.sim.ocpp.lib")
_LIB_LOG.setLevel(logging.CRITICAL)

KINDS = ("normal", "rejects", "disconnects", "v201", "no_lf")


@dataclass
class StationSpec:
    """One simulated station: its id, password, kind and (evse id, fleet row) pairs."""

    station_id: str
    password: str
    kind: str = "normal"
    evses: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Command:
    """One CSMS -> station request as received (for tests and the latency benchmark)."""

    t_ns: int  # CLOCK_MONOTONIC
    station_id: str
    action: str
    payload: dict


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _StationMixin:
    """Handlers of a simulated station, shared by the 2.1 and 2.0.1 clients."""

    def __init__(self, sim: SimStations, spec: StationSpec, ws):
        super().__init__(spec.station_id, ws, response_timeout=10, logger=_LIB_LOG)
        self.sim = sim
        self.spec = spec
        self.row_of_evse = dict(spec.evses)
        self.profile_evse: dict[int, int] = {}  # chargingProfileId -> evse id
        self._raw_id: str | None = None  # the call_raw CALL in flight and the future its reply resolves
        self._raw_fut: asyncio.Future | None = None
        self._id_prefix = f"{secrets.token_hex(4)}-"
        self._id_counter = itertools.count(1)

    async def route_message(self, raw_msg):
        """The hot frames without the package's unpack and routing: an UpdateDynamicSchedule CALL (checked
        against the same compiled schema, answered as ``_handle_call`` does) and the reply to a call_raw; the
        rest goes the package's way (its replies to ``call`` included)."""
        try:
            msg = orjson.loads(raw_msg)
        except (orjson.JSONDecodeError, TypeError):
            msg = None
        if type(msg) is list and len(msg) in (3, 4, 5) and type(msg[1]) is str and type(msg[-1]) is dict:
            if msg[1] == self._raw_id and (msg[0], len(msg)) in ((3, 3), (4, 5)) and not self._raw_fut.done():
                if msg[0] == 3:
                    self._raw_fut.set_result(msg[2])
                else:
                    try:
                        self._raw_fut.set_exception(CallError(*msg[1:]).to_exception())
                    except Exception as exc:  # a code the package does not know
                        self._raw_fut.set_exception(exc)
                return
            if len(msg) == 4 and msg[0] == 2 and msg[2] == "UpdateDynamicSchedule":
                try:
                    ocpp_schema.validate(self._ocpp_version, msg[2], msg[3])
                except ocpp_schema.OCPPError:
                    pass  # the package's path answers it with its CALLERROR
                else:
                    status = self._update(msg[3].get("chargingProfileId"), msg[3].get("scheduleUpdate"))
                    await send_text(self._connection, orjson.dumps([3, msg[1], {"status": status}]))
                    return
        await super().route_message(raw_msg)

    async def _handle_call(self, msg):
        """The gateway's requests are checked against the package's schemas, compiled (ocpp_schema: the
        package's own jsonschema check made the simulator the bench's bottleneck at 200 stations)."""
        if msg.action in self.route_map:
            ocpp_schema.validate(self._ocpp_version, msg.action, msg.payload)
        if msg.action == "UpdateDynamicSchedule":  # the hot one, answered without the package's conversions
            status = self._update(msg.payload.get("chargingProfileId"), msg.payload.get("scheduleUpdate"))
            await self._send(msg.create_call_result({"status": status}).to_json())
            return None
        return await super()._handle_call(msg)

    async def call_raw(self, action: str, payload: dict) -> dict:
        """A CALL of a payload already in the schema's camelCase names (the meter values, every second per
        EVSE): not ChargePoint.call, which converts a dataclass to camelCase and the reply back, and checks
        both with jsonschema, nor its reply queue (a task per call); the reply's payload is returned (a
        CALLRESULT resolves the future in route_message; a CALLERROR is raised here as the package's exception)."""
        async with self._call_lock:  # OCPP-J: one CALL in flight
            unique_id = self._id_prefix + str(next(self._id_counter))
            loop = asyncio.get_running_loop()
            fut = self._raw_fut = loop.create_future()
            self._raw_id = unique_id
            timer = loop.call_later(self._response_timeout, _expire, fut)
            try:
                await send_text(self._connection, orjson.dumps([2, unique_id, action, payload]))
                return await fut
            finally:
                timer.cancel()
                self._raw_id = self._raw_fut = None

    def _record(self, action: str, payload: dict) -> None:
        self.sim.commands.append(Command(time.monotonic_ns(), self.spec.station_id, action, payload))

    @on("SetChargingProfile", skip_schema_validation=True)  # checked in _handle_call
    async def on_set_profile(self, evse_id, charging_profile, **_):
        self._record("SetChargingProfile", {"evse_id": evse_id, "charging_profile": charging_profile})
        if self.spec.kind == "rejects" and charging_profile.get("charging_profile_purpose") == "TxProfile":
            return self._call_result.SetChargingProfile(status="Rejected")
        schedule = charging_profile["charging_schedule"][0]
        period = schedule["charging_schedule_period"][0]
        unit = schedule["charging_rate_unit"]
        if charging_profile.get("charging_profile_purpose") == "TxProfile" and evse_id in self.row_of_evse:
            row = self.row_of_evse[evse_id]
            self.profile_evse[charging_profile["id"]] = evse_id
            if period.get("operation_mode") == om.LOCAL_FREQUENCY:  # v2grt.sim.ocpp_local answers it
                status = self.sim.local.install(self.spec.kind, row, charging_profile) if self.sim.local else "Rejected"
                return self._call_result.SetChargingProfile(status=status)
            if self.sim.local is not None:
                self.sim.local.clear(row)
            if "setpoint" in period:
                target = om.setpoint_to_kw(period["setpoint"], unit)
            else:  # 2.0.1: a charge limit of X W, and the EV charges at it: the same as a setpoint of +X W
                target = om.setpoint_to_kw(period.get("limit", 0.0), unit)
            self.sim.command(row, target, max_offline_s=charging_profile.get("max_offline_duration"),
                             lapse_s=schedule.get("duration"))
        return self._call_result.SetChargingProfile(status="Accepted")

    @on("UpdateDynamicSchedule", skip_schema_validation=True)  # answered in _handle_call
    async def on_update(self, charging_profile_id, schedule_update, **_):
        return self._call_result.UpdateDynamicSchedule(status=self._update(charging_profile_id, schedule_update))

    def _update(self, charging_profile_id, schedule_update) -> str:
        """A new setpoint for the EVSE of that profile (schema-checked payload, camelCase keys): its status."""
        self._record("UpdateDynamicSchedule", {"charging_profile_id": charging_profile_id,
                                               "schedule_update": schedule_update})
        evse = self.profile_evse.get(charging_profile_id)
        if self.spec.kind == "rejects" or evse is None or "setpoint" not in schedule_update:
            return "Rejected"
        self.sim.command(self.row_of_evse[evse], om.setpoint_to_kw(schedule_update["setpoint"], "W"))
        return "Accepted"

    @on("TriggerMessage", skip_schema_validation=True)  # checked in _handle_call
    async def on_trigger(self, requested_message, evse=None, **_):
        self._record("TriggerMessage", {"requested_message": requested_message, "evse": evse})
        if requested_message != "TransactionEvent" or not self._triggered(evse):
            return self._call_result.TriggerMessage(status="Rejected")
        return self._call_result.TriggerMessage(status="Accepted")

    @after("TriggerMessage")
    async def after_trigger(self, requested_message, evse=None, **_):
        """The requested messages follow the reply, as a station sends them."""
        if requested_message == "TransactionEvent":
            await self.sim.send_transaction_updates(self, self._triggered(evse))

    def _triggered(self, evse) -> list[tuple[int, int]]:
        return [(e, r) for e, r in self.spec.evses if self.sim.tx_id[r] and (evse is None or evse["id"] == e)]


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class _Station21(_StationMixin, ChargePoint21):
    pass


class _Station201(_StationMixin, ChargePoint201):
    pass


class SimStations:
    """N simulated stations on one asyncio thread, with one vectorised EV model behind all EVSEs.

    ``state`` is the :class:`SimFleetState` (row ``i`` = the roster row of node ``i``);
    ``commands`` the last requests received; ``p_kw`` what each EV delivers now (+ discharge).
    """

    def __init__(self, url: str, specs: list[StationSpec], state: SimFleetState, *,
                 ssl_context: ssl.SSLContext | None = None, latency_s: tuple[float, float] = (0.02, 0.08),
                 ramp_kw_per_s: float = 50.0, meter_interval_s: float = 1.0, tick_s: float = 0.02,
                 disconnect_every_s: float = 20.0, away_s: float = 5.0, seed: int = 0,
                 connect_spread_s: float | None = None):
        self.url = url.rstrip("/")
        self.specs = specs
        self.state = state
        self.ssl_context = ssl_context
        self.latency_s = latency_s
        self.ramp_kw_per_s = ramp_kw_per_s
        self.meter_interval_s = meter_interval_s
        self.tick_s = tick_s
        self.disconnect_every_s = disconnect_every_s
        self.away_s = away_s
        self.rng = random.Random(seed)
        # default: 5 ms per station (a thousand power up over 5 s)
        self.connect_spread_s = len(specs) * 0.005 if connect_spread_s is None else connect_spread_s
        self.meter_timeouts = 0
        self.meter_errors = 0  # MeterValues answered with a CALLERROR
        n = len(state)
        self.target_kw = np.zeros(n)  # what the station was told (+ discharge), after its latency
        self.p_kw = np.zeros(n)  # what the EV delivers now (ramped)
        self.applied_ns = np.zeros(n, dtype=np.int64)  # when the newest target took effect
        self.connected = np.zeros(n, dtype=bool)
        self.offline_since_ns = np.zeros(n, dtype=np.int64)
        self.max_offline_s = np.full(n, np.inf)
        self.lapse_at_ns = np.full(n, np.iinfo(np.int64).max)
        self.tx_id: list[str | None] = [None] * n  # the running transaction per EVSE (survives reconnects)
        self.tx_seq = 0
        self.commands: collections.deque[Command] = collections.deque(maxlen=100_000)
        # (CLOCK_MONOTONIC ns, row, kW) of each command as received and as applied (after the command
        # latency): the latency benchmark reads them (write_trace), tests too. Bounded: ~1 h of a bench.
        self.received: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=1_000_000)
        self.applies: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=1_000_000)
        self.connections: collections.Counter[str] = collections.Counter()
        self.local = None  # v2grt.sim.ocpp_local.LocalResponse: LocalFrequency profiles (ocpp_local.attach)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------------------ physics
    def command(self, row: int, p_kw: float, *, max_offline_s=None, lapse_s=None) -> None:
        """A station was told to go to ``p_kw``: it takes effect after the command latency."""
        delay = self.rng.uniform(*self.latency_s)
        if max_offline_s is not None:
            self.max_offline_s[row] = max_offline_s
        now = time.monotonic_ns()
        self.received.append((now, row, p_kw))
        self.lapse_at_ns[row] = now + int(lapse_s * 1e9) if lapse_s else np.iinfo(np.int64).max

        def take_effect():
            self.target_kw[row] = p_kw
            self.applied_ns[row] = t = time.monotonic_ns()
            self.applies.append((t, row, p_kw))

        self.loop.call_later(delay, take_effect)

    async def _physics(self) -> None:
        t_prev = time.monotonic_ns()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic_ns()
            dt = (now - t_prev) / 1e9
            t_prev = now
            # A profile dropped offline (maxOfflineDuration) or lapsed (2.0.1 duration) -> fallback 0 W.
            dropped = (~self.connected & ((now - self.offline_since_ns) / 1e9 > self.max_offline_s)) | (
                now >= self.lapse_at_ns)
            target = np.where(dropped, 0.0, self.target_kw)
            step = self.ramp_kw_per_s * dt
            self.p_kw += np.clip(target - self.p_kw, -step, step)
            delivered = self.state.step(self.p_kw, dt)
            self.p_kw[:] = np.where(np.abs(delivered - self.p_kw) > 1e-9, delivered, self.p_kw)

    # ------------------------------------------------------------------------------ stations
    async def _station(self, spec: StationSpec) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        v201 = spec.kind == "v201"
        subprotocol = om.OCPP201 if v201 else om.OCPP21
        auth = base64.b64encode(f"{spec.station_id}:{spec.password}".encode()).decode()
        rows = [r for _e, r in spec.evses]
        booted = False
        # Stations power up over a spread, not in the same millisecond (a thousand TLS handshakes, boots and
        # transactions at once time out and reconnect in a storm); reconnects back off with jitter, as
        # OCPP's RetryBackOffRandomRange asks of real ones.
        await asyncio.sleep(self.rng.uniform(0.0, self.connect_spread_s))
        while True:
            try:
                async with connect(f"{self.url}/{spec.station_id}", subprotocols=[subprotocol],
                                   additional_headers={"Authorization": f"Basic {auth}"}, ssl=self.ssl_context,
                                   open_timeout=10, compression=None, logger=_LIB_LOG) as ws:
                    cp = (_Station201 if v201 else _Station21)(self, spec, ws)
                    reader = asyncio.create_task(cp.start())
                    reader.add_done_callback(lambda t: t.cancelled() or t.exception())  # closed: reconnect below
                    self.connections[spec.station_id] += 1
                    self.connected[rows] = True
                    await self._session(cp, spec, v201, boot=not booted)
                    booted = True
                    reader.cancel()
            except (OSError, ConnectionClosed, InvalidStatus, asyncio.TimeoutError) as exc:
                log.debug("station %s: %r", spec.station_id, exc)
            self.connected[rows] = False
            self.offline_since_ns[rows] = time.monotonic_ns()
            await asyncio.sleep(self.away_s if spec.kind == "disconnects" else 1.0 + self.rng.uniform(0.0, 2.0))

    async def _session(self, cp, spec: StationSpec, v201: bool, *, boot: bool) -> None:
        """One connection: BootNotification after power-up only (a reconnect is not a reboot), the
        connectors' status, a transaction for each plugged EV that has none yet, then meter values."""
        call = cp._call
        if boot:
            await cp.call(call.BootNotification(charging_station={"model": "v2grt-sim", "vendorName": "v2grt"},
                                                reason="PowerUp"))
        for evse, row in spec.evses:
            plugged = bool(self.state.online[row])
            await cp.call(call.StatusNotification(timestamp=_now_iso(), connector_status="Occupied" if plugged
                                                  else "Available", evse_id=evse, connector_id=1))
            if not plugged or self.tx_id[row] is not None:
                continue
            self.tx_seq += 1
            self.tx_id[row] = f"{spec.station_id}-{evse}-{self.tx_seq}"
            await cp.call(call.TransactionEvent(
                event_type="Started", timestamp=_now_iso(), trigger_reason="CablePluggedIn", seq_no=0,
                transaction_info={"transactionId": self.tx_id[row]},
                evse={"id": evse, "connectorId": 1}, meter_value=[self._meter(row)]))
            if not v201:
                await cp.call(call.NotifyEVChargingNeeds(evse_id=evse, charging_needs=self._needs(row)))
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.meter_interval_s)
            for evse, row in spec.evses:
                if self.state.online[row]:
                    try:
                        await cp.call_raw("MeterValues", {"evseId": evse, "meterValue": [self._meter(row)]})
                    except asyncio.TimeoutError:  # a station keeps its connection and sends the next ones
                        self.meter_timeouts += 1
                    except OCPPError:  # a CALLERROR: counted, and the next ones go out as usual
                        self.meter_errors += 1
            if spec.kind == "disconnects" and time.monotonic() - started > self.disconnect_every_s:
                await cp._connection.close()
                return

    async def send_transaction_updates(self, cp, rows) -> None:
        """TransactionEvent Updated (trigger ``Trigger``) with meter values for each (evse, row)."""
        for evse, row in rows:
            try:
                await cp.call(cp._call.TransactionEvent(
                    event_type="Updated", timestamp=_now_iso(), trigger_reason="Trigger", seq_no=1,
                    transaction_info={"transactionId": self.tx_id[row]}, evse={"id": evse, "connectorId": 1},
                    meter_value=[self._meter(row)]))
            except Exception as exc:  # the connection went away: the next connection asks again
                log.debug("station %s: %r", cp.id, exc)
                return

    def _meter(self, row: int) -> dict:
        p = float(self.p_kw[row])
        return {"timestamp": _now_iso(), "sampledValue": [
            {"measurand": "SoC", "value": round(float(self.state.soc[row]) * 100.0, 2),
             "unitOfMeasure": {"unit": "Percent"}},
            {"measurand": "Power.Active.Import", "value": round(max(-p, 0.0) * 1000.0, 1)},
            {"measurand": "Power.Active.Export", "value": round(max(p, 0.0) * 1000.0, 1)}]}

    def _needs(self, row: int, minimum_soc: float = 0.2) -> dict:
        p_dis, p_chg = self.state.bms_limits()
        dis = min(float(p_dis[row]), float(self.state.p_dis_max_kw[row]))
        chg = min(float(p_chg[row]), float(self.state.p_chg_max_kw[row]))
        usable_kwh = float(self.state.capacity_kwh[row] * self.state.soh[row])
        to_min_wh = (minimum_soc - float(self.state.soc[row])) * usable_kwh * 1000.0
        return {"requestedEnergyTransfer": "AC_BPT", "controlMode": "DynamicControl",
                "availableEnergyTransfer": ["AC_BPT", "AC_three_phase"],
                "v2xChargingParameters": {"maxChargePower": round(chg * 1000.0), "maxDischargePower":
                                          round(dis * 1000.0), "evMinV2XEnergyRequest": round(to_min_wh),
                                          "targetSoC": 80}}

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> SimStations:
        self._thread = threading.Thread(target=self._run, name="ocpp-stations", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        return self

    def _run(self) -> None:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._physics())]
        tasks += [asyncio.create_task(self._station(s)) for s in self.specs]
        self._ready.set()
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10.0)
            self._thread = None

    def write_trace(self, path: str | Path) -> int:
        """Write every command received and applied as CSV ``event,t_ns,row,p_kw`` (event ``recv`` or
        ``apply``, t_ns CLOCK_MONOTONIC, row of the roster's gateway rows, kW + discharge); the count."""
        rows = [("recv", *r) for r in list(self.received)] + [("apply", *r) for r in list(self.applies)]
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["event", "t_ns", "row", "p_kw"])
            w.writerows(rows)
        return len(rows)

    def run_forever(self, stop) -> None:
        """Run until ``stop`` (an object with is_set()) is set; the CLI's main loop."""
        self.start()
        while not stop.is_set():
            time.sleep(0.1)
        self.stop()


# ------------------------------------------------------------------------------ site files
def specs_from_fleet(fleet, passwords: dict[str, str], kinds: dict[str, str] | None = None) -> list[StationSpec]:
    """One StationSpec per station of the fleet's ``<station>:<evse>`` ids, rows in roster order."""
    by_station: dict[str, StationSpec] = {}
    for row, nid in enumerate(fleet.node_ids[: fleet.n_rows]):
        parsed = om.split_node_id(nid)
        if parsed is None:
            raise ValueError(f"roster node {nid!r}: expected <station>:<evse> (e.g. CS001:1)")
        station, evse = parsed
        if station not in passwords:
            raise ValueError(f"station {station!r}: no password in the passwords file")
        spec = by_station.setdefault(station, StationSpec(station, passwords[station],
                                                          (kinds or {}).get(station, "normal")))
        spec.evses.append((evse, row))
    return list(by_station.values())


def write_site(directory: str | Path, *, n_stations: int, evses_per_station: int = 2, gateway_id: str = "ocpp1",
               prefix: str = "CS", seed: int = 0, soc: float = 0.6, capacity_kwh: float = 60.0,
               p_max_kw: float = 11.0) -> dict[str, Path]:
    """Write a roster (``<station>:<evse>`` rows under ``gateway_id``), the gateway's credentials file
    (hashes) and the simulator's passwords file (plain) into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stations = [f"{prefix}{i:04d}" for i in range(1, n_stations + 1)]
    passwords = {s: secrets.token_urlsafe(24) for s in stations}
    paths = {"roster": directory / "roster.csv", "credentials": directory / "credentials.csv",
             "passwords": directory / "passwords.csv"}
    with open(paths["roster"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["node_id", "gateway_id", "site_id", "soc", "soh", "capacity_kwh", "p_dis_max_kw", "p_chg_max_kw",
                    "temp_c"])
        for s in stations:
            for e in range(1, evses_per_station + 1):
                w.writerow([om.node_id(s, e), gateway_id, "site1", f"{soc + rng.uniform(-0.1, 0.1):.3f}", "0.95",
                            capacity_kwh, p_max_kw, p_max_kw, "25.0"])
    with open(paths["credentials"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["station_id", "password_hash"])
        for s in stations:
            w.writerow([s, om.hash_password(s, passwords[s])])
    with open(paths["passwords"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["station_id", "password"])
        for s in stations:
            w.writerow([s, passwords[s]])
    paths["passwords"].chmod(0o600)
    return paths


def load_passwords(path: str | Path) -> dict[str, str]:
    """The simulator's ``station_id,password`` file (written by :func:`write_site`)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != ["station_id", "password"]:
        raise ValueError(f"{path}: line 1: expected the header station_id,password")
    return {r[0]: r[1] for r in rows[1:] if len(r) == 2}


__all__ = ["KINDS", "Command", "SimStations", "StationSpec", "load_passwords", "specs_from_fleet", "write_site"]
