"""The OCPP 2.1 gateway: a CSMS for bidirectional charging stations behind one v2grt gateway id.

Charging stations connect over websockets (subprotocol ``ocpp2.1``; ``ocpp2.0.1`` gets the
charge-only subset), authenticated per station id with HTTP Basic auth over TLS (security
profile 2). Each EVSE listed in the roster as ``<station>:<evse>`` under this gateway's id is a
node: it is online while a transaction runs and its SoC is known. :class:`OcppVehicles` is the
:class:`~v2grt.gateway.core.Vehicles` driver that :class:`~v2grt.gateway.core.GatewayCore` runs
(fencing, expiry, e-stop and telemetry batches stay there); this module owns the OCPP side:

- an asyncio thread with the WebSocket server (websockets' sans-I/O protocol on our own I/O layer,
  :mod:`v2grt.gateway.ocpp_io`) and one ``ocpp`` ChargePoint session per station;
- at transaction start a Dynamic / CentralSetpoint TxProfile with ``maxOfflineDuration`` (and,
  once per boot, a 0 W TxDefaultProfile to fall back to);
- each cycle's setpoints go out as UpdateDynamicSchedule when they moved more than the deadband,
  when they become exactly 0 (expiry, e-stop) and at least every resync interval;
- every station message is validated (the schemas, then ranges); a bad one is answered with a
  CALLERROR and counted by error code; a station over its message rate gets CALLERRORs and is
  disconnected when it keeps going. State is only ever keyed by ids from the credentials file.

Powers are kW, + = discharge into the grid; the conversion to OCPP's signs is in
:mod:`v2grt.gateway.ocpp_mapping`. docs/gateways.md has the tables, the failsafe chain and limits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime
import http
import itertools
import json
import logging
import math
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from ocpp.charge_point import camel_to_snake_case, remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.exceptions import (
    GenericError,
    NotSupportedError,
    OCPPError,
    PropertyConstraintViolationError,
    UnknownCallErrorCodeError,
)
from ocpp.exceptions import NotImplementedError as OcppNotImplemented
from ocpp.messages import Call, CallError, CallResult, MessageType, unpack
from ocpp.routing import on
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v21.enums import Action as Action21
from ocpp.v201 import ChargePoint as ChargePoint201
from websockets.protocol import State as _WsState

from v2grt.events import EventLog
from v2grt.gateway import ocpp_mapping as om
from v2grt.gateway import ocpp_schema
from v2grt.gateway.core import GC_YOUNG_THRESHOLD, GatewayError, tune_gc
from v2grt.gateway.ocpp_io import StationConnection, StationServer

log = logging.getLogger("v2grt.gateway")

#: The ``ocpp`` package logs every message at INFO and every bad one with a traceback at ERROR:
#: at a thousand stations, or one hostile one, that is a flood. Its records go here, quiet by
#: default; the gateway counts and logs (rate-limited) what matters itself.
_LIB_LOG = logging.getLogger("v2grt.gateway.ocpp.lib")
_LIB_LOG.setLevel(logging.CRITICAL)


class _LibLogger:
    """What ``ocpp`` logs for a session: messages dropped, the first tracebacks of failed handlers kept
    (a failing handler is our bug; a hostile station cannot make more than ``limit`` of them)."""

    limit = 20

    def __init__(self):
        self.tracebacks = 0

    def info(self, *args, **kwargs):
        pass

    debug = warning = info

    def error(self, msg, *args, **kwargs):
        if self.tracebacks < self.limit:
            self.tracebacks += 1
            log.warning("OCPP_HANDLER_ERROR " + msg, *args, exc_info=True)

    exception = error


_HANDLER_LOG = _LibLogger()

#: Actions a station may send that the gateway answers (everything else: CALLERROR NotImplemented).
HANDLED_ACTIONS = ("BootNotification", "Heartbeat", "StatusNotification", "TransactionEvent", "MeterValues",
                   "NotifyEVChargingNeeds")

#: The rate limit charges a message one token plus one per full MESSAGE_COST_BYTES: the work a frame costs (TLS,
#: unmasking, UTF-8, JSON, the schema) grows with its size, and a station's real messages are a few hundred bytes.
#: Counted by messages alone, ten stations sending 60 KB frames at 18/s each (under 20/s) took 62 % of a core
#: and pushed the honest stations' update p99 to 481 ms (bench ocppfuzz).
MESSAGE_COST_BYTES = 4096

#: OCPP-J RPC framework error codes (OCPP 2.0.1/2.1 part 4; 1.6's FormationViolation and the ocpp
#: library's OccurenceConstraintViolation spelling too): the keys of ``callerrors``. Any other code is
#: counted as "Other", so no counter key comes from a string the gateway did not choose (DESIGN.md 12).
RPC_ERROR_CODES = frozenset({
    "FormatViolation", "FormationViolation", "GenericError", "InternalError", "MessageTypeNotSupported",
    "NotImplemented", "NotSupported", "OccurrenceConstraintViolation", "OccurenceConstraintViolation",
    "PropertyConstraintViolation", "ProtocolError", "RpcFrameworkError", "SecurityError", "TypeConstraintViolation"})


@dataclass
class OcppSettings:
    """How the CSMS side listens and controls; docs/gateways.md explains each choice."""

    credentials: dict[str, str]  # station id -> sha256 hash (ocpp_mapping.load_credentials)
    host: str = "0.0.0.0"
    port: int = 9000
    ssl_context: ssl.SSLContext | None = None  # None only with allow_plaintext (security profile 1, labs)
    allow_plaintext: bool = False
    deadband_kw: float = 0.5
    resync_s: float = 5.0
    max_offline_s: int = 3  # maxOfflineDuration: whole seconds, >= 1
    call_timeout_s: float = 5.0
    rate_per_s: float = 20.0
    burst: float = 40.0
    heartbeat_s: int = 60
    max_message_bytes: int = 65_536
    accept_201: bool = True
    tick_s: float = 0.1  # the resync/install scan; setpoints themselves go out when they arrive
    meter_stale_s: float = 10.0  # no meter values for this long: the node's values are not trusted
    use_uvloop: bool = True  # the server's loop on uvloop when installed (a pyproject dependency)
    open_timeout_s: float = 10.0  # TCP accept to WebSocket open (TLS and HTTP handshakes), as websockets' default
    ping_interval_s: float = 20.0  # keepalive: a ping this often, the connection failed (1011) without a pong
    ping_timeout_s: float = 20.0

    def check(self) -> None:
        problems = []
        if self.ssl_context is None and not self.allow_plaintext:
            problems.append("no TLS certificate: give --tls-cert/--tls-key (security profile 2), or "
                            "--allow-plaintext for a lab (profile 1: passwords travel in clear)")
        if not self.credentials:
            problems.append("the credentials file lists no station")
        if not (isinstance(self.max_offline_s, int) and 1 <= self.max_offline_s <= 3600):
            problems.append(f"max_offline_s={self.max_offline_s!r}: expected whole seconds 1..3600")
        for name, lo, hi in (("deadband_kw", 0.0, 100.0), ("resync_s", 0.1, 3600.0), ("call_timeout_s", 0.1, 60.0),
                             ("rate_per_s", 0.1, 1e4), ("burst", 1.0, 1e5), ("tick_s", 0.005, 5.0),
                             ("meter_stale_s", 0.1, 3600.0), ("open_timeout_s", 0.05, 600.0),
                             ("ping_interval_s", 0.05, 3600.0), ("ping_timeout_s", 0.05, 3600.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and lo <= value <= hi):
                problems.append(f"{name}={value!r}: expected {lo:g}..{hi:g}")
        if problems:
            raise GatewayError("; ".join(problems))


@dataclass
class Evse:
    """One roster node's OCPP state (written on the asyncio thread, read under the lock)."""

    station_id: str
    evse_id: int
    capacity_kwh: float
    roster_dis_kw: float
    roster_chg_kw: float
    soc: float
    connector_status: str | None = None
    transaction_id: str | None = None
    has_soc: bool = False
    meter_ns: int = 0  # CLOCK_MONOTONIC of the last meter values
    p_kw: float = 0.0
    needs: om.EvNeeds | None = None
    min_soc: float | None = None
    profile_installed: bool = False
    profile_refused: bool = False
    profile_retry_ns: int = 0
    update_rejects: int = 0
    charge_only: bool = False  # its station speaks 2.0.1: no discharge whatever the EV says
    # the last limits() and what they came from (the roster's ratings are fixed): an EvLimits built per call cost
    # ~1-3 us (a frozen dataclass), 4,000 calls a second at 2,000 EVSEs (each update, each telemetry batch)
    _limits: om.EvLimits | None = field(default=None, repr=False, compare=False)
    _limits_of: tuple = field(default=(), repr=False, compare=False)

    def limits(self) -> om.EvLimits:
        """What this EV may do now, kW: the roster's rating, the EV's own limits, its minimum SoC."""
        blocked = bool(self.charge_only or (self.min_soc is not None and self.soc <= self.min_soc))
        of = self._limits_of
        if of and of[0] is self.needs and of[1] is blocked:  # EvNeeds is frozen: the same object, the same limits
            return self._limits
        self._limits = limits = self._new_limits(blocked)
        self._limits_of = (self.needs, blocked)
        return limits

    def _new_limits(self, blocked: bool) -> om.EvLimits:
        dis, chg = self.roster_dis_kw, self.roster_chg_kw
        if self.needs is not None:
            if self.needs.limits.p_dis_max_kw is not None:
                dis = min(dis, self.needs.limits.p_dis_max_kw)
            if self.needs.limits.p_chg_max_kw is not None:
                chg = min(chg, self.needs.limits.p_chg_max_kw)
        if blocked:
            dis = 0.0  # a 2.0.1 station, or the EV's own minimum SoC (from evMinV2XEnergyRequest) is reached
        return om.EvLimits(p_chg_max_kw=chg, p_dis_max_kw=dis)


class OcppVehicles:
    """The roster's ``<station>:<evse>`` nodes of one gateway, driven over OCPP (a GatewayCore driver).

    ``start()`` binds the WebSocket server (ocpp_io) on its own asyncio thread; ``close()`` brings every
    node to 0 kW on the stations (best effort, bounded) and stops it. Counters for logs and tests:
    ``callerrors`` (sent, by OCPP error code), ``refused`` (connections, by cause), and the plain
    integers of :meth:`counters`.
    """

    def __init__(self, fleet, settings: OcppSettings, *, gateway_id: str, events: EventLog | None = None):
        settings.check()
        self.settings = settings
        self.gateway_id = gateway_id
        self.events = events or EventLog()
        n = fleet.n_rows
        self.node_ids: list[str] = list(fleet.node_ids[:n])
        self.evses: list[Evse] = []
        self.row_of: dict[tuple[str, int], int] = {}
        bad = []
        for row, nid in enumerate(self.node_ids):
            parsed = om.split_node_id(nid)
            if parsed is None:
                bad.append(nid)
                continue
            self.row_of[parsed] = row
            self.evses.append(Evse(parsed[0], parsed[1], float(fleet.capacity_kwh[row]),
                                   float(fleet.p_dis_max_kw[row]), float(fleet.p_chg_max_kw[row]),
                                   float(fleet.soc[row])))
        if bad:
            raise GatewayError(f"gateway {gateway_id!r}: {len(bad)} roster node id(s) are not <station>:<evse> "
                               f"(e.g. {bad[0]!r}); an OCPP gateway's nodes are named CS001:1, CS001:2, ...")
        unknown_stations = sorted({e.station_id for e in self.evses} - set(settings.credentials))
        if unknown_stations:
            log.warning("OCPP_NO_CREDENTIALS gateway=%s stations=%d e.g.=%s msg=%s", gateway_id,
                        len(unknown_stations), unknown_stations[0],
                        "roster stations without credentials can never connect")
        self.n = n
        self.station_rows: dict[str, list[int]] = {}
        for (station, _evse), row in self.row_of.items():
            self.station_rows.setdefault(station, []).append(row)
        self._install_sessions: set[_SessionMixin] = set()  # stations with an EVSE in a transaction, no profile
        self.lock = threading.Lock()
        self.target_kw = np.zeros(n)
        self.sent_kw = np.full(n, np.nan)
        self.sent_ns = np.zeros(n, dtype=np.int64)
        self.controllable = np.zeros(n, dtype=bool)
        self.sessions: dict[str, _SessionMixin] = {}
        self.buckets: dict[str, om.TokenBucket] = {}  # each station's rate limit, across its connections
        self.callerrors: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()
        # With trace on (the latency benchmark): (handed over ns, sent ns, row, kW) of every setpoint
        # update, CLOCK_MONOTONIC; bounded, written by write_trace.
        self.trace: collections.deque[tuple[int, int, int, float]] | None = None
        self.calls_trace: collections.deque[int] | None = None  # receive times of station CALLs, with trace
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self.server: StationServer | None = None
        # (deadline on the loop's clock, future) of every CALL in flight, in the order sent: all share one
        # timeout, so the deadlines ascend and the ticker expires from the left (a timer per CALL, created
        # and cancelled 2,000 times a second at 2,000 EVSEs, cost more than this)
        self.call_deadlines: collections.deque[tuple[float, asyncio.Future]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------------ Vehicles (gateway thread)
    def apply(self, p_kw: np.ndarray, now_ns: int) -> None:
        """Take the setpoints in force (kW, + discharge); the asyncio thread sends what is due."""
        with self.lock:
            self.target_kw[:] = p_kw
        self._wake_scan()

    def _wake_scan(self) -> None:
        """Have the asyncio thread scan for due updates (from any thread)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._scan, False)
            except RuntimeError:
                pass  # the loop is shutting down

    def telemetry(self, now_ns: int) -> dict[str, np.ndarray]:
        """Per node: the station's last SoC and power, online/fault from ocpp_mapping.node_online_fault."""
        n = self.n
        soc, p_kw = np.empty(n), np.empty(n)
        online, fault = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        dis, chg = np.empty(n), np.empty(n)
        fresh_after_ns = time.monotonic_ns() - round(self.settings.meter_stale_s * 1e9)
        with self.lock:
            for i, e in enumerate(self.evses):
                connected = e.station_id in self.sessions
                online[i], fault[i] = om.node_online_fault(
                    connected=connected, connector_status=e.connector_status,
                    in_transaction=e.transaction_id is not None, has_soc=e.has_soc,
                    profile_refused=e.profile_refused, meter_fresh=e.meter_ns >= fresh_after_ns)
                soc[i] = e.soc
                p_kw[i] = e.p_kw if online[i] else 0.0
                lim = e.limits()
                dis[i], chg[i] = lim.p_dis_max_kw, lim.p_chg_max_kw
        return {"soc": soc, "p_kw": p_kw, "online": online, "fault": fault, "p_dis_max_kw": dis,
                "p_chg_max_kw": chg}

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 10.0) -> OcppVehicles:
        """Bind the WebSocket server on its asyncio thread; GatewayError if it cannot."""
        self._thread = threading.Thread(target=self._run_loop, name=f"ocpp-{self.gateway_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise GatewayError(f"OCPP server on {self.settings.host}:{self.settings.port} did not start in "
                               f"{timeout_s:g} s")
        if self._error is not None:
            raise GatewayError(f"OCPP server on {self.settings.host}:{self.settings.port}: {self._error}")
        return self

    def close(self, flush_s: float = 2.0) -> None:
        """Send what is still due (0 kW after GatewayCore.close), then close every station and the server."""
        loop = self.loop
        if loop is None or self._thread is None:
            return
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline and not loop.is_closed():
            pending = asyncio.run_coroutine_threadsafe(self._pending_count(), loop)
            try:
                if pending.result(timeout=max(deadline - time.monotonic(), 0.01)) == 0:
                    break
            except Exception:
                break
            time.sleep(0.02)
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10.0)
        self._thread = None

    async def _pending_count(self) -> int:
        self._scan()
        return sum(len(s.pending_update) + len(s.pending_install) + s.busy for s in self.sessions.values())

    def _run_loop(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory(self.settings.use_uvloop)) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s = self.settings
        for version in ("2.1", "2.0.1"):  # compiled now, not at the first message of a busy moment
            ocpp_schema.precompile(version, HANDLED_ACTIONS)
            ocpp_schema.precompile(version, ("SetChargingProfile", "TriggerMessage"), response=True)
        ocpp_schema.precompile("2.1", ("UpdateDynamicSchedule",), response=True)
        subprotocols = list(om.SUBPROTOCOLS if s.accept_201 else om.SUBPROTOCOLS[:1])
        # websockets' sans-I/O protocol on our own socket glue (ocpp_io; docs/architecture.md says why)
        server = StationServer(self._serve_station, s.host, s.port, ssl_context=s.ssl_context,
                               subprotocols=subprotocols, process_request=self._authenticate,
                               max_size=s.max_message_bytes, max_queue=8, open_timeout_s=s.open_timeout_s,
                               ping_interval_s=s.ping_interval_s, ping_timeout_s=s.ping_timeout_s, logger=_LIB_LOG)
        await server.start()
        self.server = server
        self.port = server.port
        self._ready.set()
        ticker = asyncio.create_task(self._ticker())
        await self._stop.wait()
        ticker.cancel()
        # every station at once: one after the other, each close handshake took about a second on a
        # loaded machine (100 stations: 100 s, and the demo killed the gateway after 10)
        await asyncio.gather(*(session.ws.close(1001, "gateway stopping")
                               for session in list(self.sessions.values())), return_exceptions=True)
        await server.close(1001, "gateway stopping")

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            self._expire_calls(self.loop.time())
            self._scan()

    def _expire_calls(self, now: float) -> None:
        """Fail the CALLs in flight past their deadline (asyncio.TimeoutError); drop those answered."""
        deadlines = self.call_deadlines
        while deadlines:
            deadline, fut = deadlines[0]
            if not fut.done():
                if deadline > now:
                    return
                fut.set_exception(asyncio.TimeoutError())
            deadlines.popleft()

    # ------------------------------------------------------------------------------ handshake
    def _authenticate(self, connection, request):
        """process_request: the path names a station with credentials; Basic auth with its own id."""
        station = om.station_id_from_path(request.path)
        if station is None or station not in self.settings.credentials:
            return self._refuse(connection, "UNKNOWN_STATION", http.HTTPStatus.NOT_FOUND, "unknown station\n")
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            username, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            username = password = ""
        if scheme.lower() != "basic" or not om.check_password(self.settings.credentials, station, username, password):
            response = self._refuse(connection, "BAD_CREDENTIALS", http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="v2grt-ocpp"'
            return response
        bucket = self.buckets.get(station)
        if bucket is not None and bucket.in_debt(time.monotonic_ns()):
            # cut off for flooding and not yet paid back (at most burst / rate, 2 s at the defaults): a session
            # per reconnect cost the gateway ~5 ms each, 55 % of a core at 114 a second (bench ocppfuzz)
            return self._refuse(connection, "RATE_LIMITED", http.HTTPStatus.TOO_MANY_REQUESTS, "rate limited\n")
        connection.station_id = station
        return None

    def _refuse(self, connection, cause: str, status, text: str):
        self.refused[cause] += 1  # counted in bulk: never keyed by an id a stranger can invent
        self.events.emit("OCPP_CONNECTION_REFUSED", logging.WARNING, key=cause, gateway=self.gateway_id,
                         cause=cause, total=self.refused[cause], peer=str(connection.remote_address[0]))
        return connection.respond(status, text)

    async def _serve_station(self, ws: StationConnection) -> None:
        station = ws.station_id
        version = ws.subprotocol
        if version not in om.SUBPROTOCOLS:
            self.refused["NO_SUBPROTOCOL"] += 1
            await ws.close(1002, "subprotocol ocpp2.1 or ocpp2.0.1 required")
            return
        cls = self._session_class(version)
        session = cls(station, ws, self)
        # its pings are charged from now on, while it may wait below for its old connection to end (no session
        # reads it yet: a flooder cut off and reconnecting had its pings answered without limit for that second)
        ws.on_control = session._on_control_frame
        old = self.sessions.get(station)
        if old is not None:  # the station reconnected before we noticed the old socket die
            self.stats["replaced_connections"] += 1
            await old.ws.close(1000, "replaced by a new connection")
            await old.done.wait()
        with self.lock:
            self.sessions[station] = session
            self._install_sessions.add(session)  # transactions running from before a reconnect
            for row in session.rows:
                self.evses[row].charge_only = version == om.OCPP201
        self.stats["connections"] += 1
        self.events.emit("OCPP_STATION_CONNECTED", logging.INFO, key=station, gateway=self.gateway_id,
                         station=station, subprotocol=version)
        sender = asyncio.create_task(session.sender())
        try:
            await session.start()
        except Exception as exc:  # ConnectionClosed ends every session; anything else is logged, not raised
            from websockets.exceptions import ConnectionClosed

            if not isinstance(exc, ConnectionClosed):
                log.error("OCPP_SESSION_ERROR gateway=%s station=%s error=%r", self.gateway_id, station, exc)
        finally:
            sender.cancel()
            with self.lock:
                if self.sessions.get(station) is session:
                    del self.sessions[station]
                for row in self._rows_of(station):
                    self.controllable[row] = False
                    self.sent_kw[row] = np.nan
                    self.evses[row].profile_installed = False
            session.done.set()
            self.events.emit("OCPP_STATION_DISCONNECTED", logging.WARNING, key=station, gateway=self.gateway_id,
                             station=station, close_code=ws.close_code)

    def _session_class(self, version: str) -> type:
        """The session class of a station speaking ``version`` (the LocalFrequency mode has its own 2.1 one)."""
        return Session21 if version == om.OCPP21 else Session201

    def _rows_of(self, station: str) -> list[int]:
        return self.station_rows.get(station, [])

    # ------------------------------------------------------------------------------ control
    def _scan(self, installs: bool = True) -> None:
        """Hand every due setpoint (ocpp_mapping.due_rows) and, with ``installs``, every missing profile
        to its station, and wake the stations that got work. Installs look only at the stations listed
        in ``_install_sessions`` (an EVSE with a transaction and no profile): a loop over every EVSE at
        every tick and every TransactionEvent cost O(stations^2) while a thousand stations connect."""
        now = time.monotonic_ns()
        woken = set()
        with self.lock:
            due = self._due_rows(now)
            for row in due.tolist():
                e = self.evses[row]
                session = self.sessions.get(e.station_id)
                if session is not None:
                    session.pending_update.add(row)
                    # Marked sent when handed over, so the scan does not hand it over again while
                    # the station answers; the sender always sends the newest target.
                    self.sent_kw[row] = self.target_kw[row]
                    self.sent_ns[row] = now
                    woken.add(session)
            for session in list(self._install_sessions) if installs else ():
                if self.sessions.get(session.id) is not session:
                    self._install_sessions.discard(session)
                    continue
                missing = False
                for row in session.rows:
                    e = self.evses[row]
                    if e.transaction_id is not None and not e.profile_installed:
                        missing = True
                        if (now >= e.profile_retry_ns and row not in session.pending_install
                                and row != session.installing):
                            session.pending_install.add(row)
                            woken.add(session)
                if not missing:
                    self._install_sessions.discard(session)
            for session in woken:
                session.wake.set()

    def _due_rows(self, now_ns: int) -> np.ndarray:
        """ocpp_mapping.due_rows over the targets (under the lock; the LocalFrequency mode refines it)."""
        s = self.settings
        return om.due_rows(self.target_kw, self.sent_kw, self.sent_ns, self.controllable, now_ns,
                           deadband_kw=s.deadband_kw, resync_ns=round(s.resync_s * 1e9))

    def count_callerror(self, code: str, station: str, detail: str) -> None:
        key = code if code in RPC_ERROR_CODES else "Other"  # bounded keys, whatever the frame carried
        self.callerrors[key] += 1
        self.events.emit("OCPP_CALLERROR", logging.WARNING, key=station, gateway=self.gateway_id, station=station,
                         error=code[:60], total=self.callerrors[key], msg=detail[:200])

    def write_trace(self, path) -> int:
        """Write what was traced (``trace`` on) as CSV ``event,t_handed_ns,t_sent_ns,row,p_kw``: ``update`` rows for
        setpoint updates, ``call`` rows (t_sent_ns = received) for CALLs from stations; the count."""
        import csv

        rows = [("update", *r) for r in list(self.trace or ())]
        rows += [("call", 0, t, -1, 0.0) for t in list(self.calls_trace or ())]
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["event", "t_handed_ns", "t_sent_ns", "row", "p_kw"])
            w.writerows(rows)
        return len(rows)

    def counters(self) -> dict[str, int]:
        """Plain counters for the stop log line and tests."""
        return {**self.stats, **{f"callerror_{k}": v for k, v in sorted(self.callerrors.items())},
                **{f"refused_{k}": v for k, v in sorted(self.refused.items())}}


def _loop_factory(use_uvloop: bool):
    """uvloop's event loop when asked and installed, else asyncio's (None: asyncio.Runner's default)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: the OCPP gateway runs on the default asyncio loop")
        else:
            return uvloop.new_event_loop
    return None


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: camelCase key -> the ocpp package's snake_case of it. Its conversion runs two regular expressions per
#: key of every message (15 % of the gateway's busy time at 200 stations); the keys repeat. Bounded: a
#: station can invent keys inside customData, and those are converted without being remembered.
_SNAKE_KEYS: dict[str, str] = {}
_SNAKE_KEYS_MAX = 4096


def _snake(data):
    """ocpp.charge_point.camel_to_snake_case, with the key conversions remembered (same result)."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            snake = _SNAKE_KEYS.get(key)
            if snake is None:
                snake = next(iter(camel_to_snake_case({key: None})))
                if len(_SNAKE_KEYS) < _SNAKE_KEYS_MAX:
                    _SNAKE_KEYS[key] = snake
            out[snake] = _snake(value)
        return out
    if isinstance(data, list):
        return [_snake(v) for v in data]
    return data


def _result_payload(response) -> dict:
    """A handler's reply dataclass as the schema's camelCase dict ({} at once when every field is None)."""
    if all(v is None for v in vars(response).values()):
        return {}
    return snake_to_camel_case(remove_nones(serialize_as_dict(response)))


def _unique_id(raw: Any) -> str:
    """The message id of a raw frame if it has one (for the CALLERROR), else "-1" (OCPP-J 4.2.3).

    RecursionError too: 60,000 '[' (under the frame limit) is past json's nesting limit, and this runs in the
    read callback for a rate-limited frame, where an exception dropped the rest of the read (bench ocppfuzz)."""
    try:
        msg = json.loads(raw)
        if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], str) and len(msg[1]) <= 36:
            return msg[1]
    except (ValueError, TypeError, RecursionError):
        pass
    return "-1"


def _hot_frame(raw) -> tuple | None:
    """The two frames a station sends most, recognised without the package's unpack: a CALLRESULT
    ``(3, id, payload)`` and a MeterValues CALL ``(2, id, "MeterValues", payload)``; None for anything else
    (that goes the package's way: its unpack, its error codes). The shapes are the ones unpack accepts:
    a JSON array of a message type, a string id of at most 36 characters and an object payload."""
    try:
        msg = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None  # orjson refuses some JSON the package takes (NaN, huge integers): the package decides
    if type(msg) is not list or len(msg) not in (3, 4) or type(msg[0]) is not int or type(msg[1]) is not str \
            or len(msg[1]) > 36 or type(msg[-1]) is not dict:
        return None
    if len(msg) == 3 and msg[0] == MessageType.CallResult:
        return msg
    if len(msg) == 4 and msg[0] == MessageType.Call and msg[2] == "MeterValues":
        return msg
    return None


_OPEN = _WsState.OPEN
_EMPTY: dict = {}  # the MeterValues CALLRESULT's payload (never mutated)


async def send_text(ws, data: bytes) -> None:
    """Send ``data`` (UTF-8 JSON) as one text frame on websockets connection ``ws``: what ``ws.send(data,
    text=True)`` does, written at once when nothing can make it wait. ``send`` wraps every message in an async
    context manager that checks the state, writes, then awaits the write buffer's drain; that wrapper cost
    a few per cent of the gateway's CPU at 1,000 stations (docs/benchmarks.md). Any other case (not open, a
    close under way, a fragmented send, the transport's buffer full, another websockets version) takes
    ``send`` itself, so closing and flow control behave as websockets defines them. On the gateway's own
    :class:`~v2grt.gateway.ocpp_io.StationConnection`: its ``send``."""
    if type(ws) is StationConnection:
        await ws.send(data, text=True)
        return
    protocol = getattr(ws, "protocol", None)
    if (protocol is not None and protocol.state is _OPEN and getattr(ws, "paused", True) is False
            and getattr(ws, "send_in_progress", None) is None and getattr(ws, "fragmented_send_waiter", None) is None
            and not protocol.close_expected() and not ws.transport.is_closing()):
        protocol.send_text(data)
        ws.send_data()
        return
    await ws.send(data, text=True)


def _call_error_exception(response) -> OCPPError:
    """The OCPPError of a station's CALLERROR. One whose code OCPP does not define is a GenericError here: the
    package's ``to_exception`` raises UnknownCallErrorCodeError (not an OCPPError) for it, which ended the
    station's sender task, so no setpoint reached that station again (found by `v2grt bench ocppfuzz`)."""
    try:
        return response.to_exception()
    except UnknownCallErrorCodeError:
        return GenericError(description=str(response.error_description)[:200])


def _reraise_closed(exc: BaseException) -> None:
    from websockets.exceptions import ConnectionClosed

    if isinstance(exc, ConnectionClosed):
        raise exc


class _SessionMixin:
    """One connected station: its message handlers (shared by 2.1 and 2.0.1) and its sender task."""

    version: str

    def __init__(self, station_id: str, ws, gw: OcppVehicles):
        super().__init__(station_id, ws, response_timeout=gw.settings.call_timeout_s, logger=_HANDLER_LOG)
        self.ws = ws
        self.gw = gw
        self.rows = gw._rows_of(station_id)
        # the station's rate limit outlives its connection: a fresh bucket per connection gave a flooder a fresh
        # burst on every reconnect (bench ocppfuzz); keyed by ids from the credentials file only
        self.bucket = gw.buckets.get(station_id)
        if self.bucket is None:
            self.bucket = gw.buckets[station_id] = om.TokenBucket(gw.settings.rate_per_s, gw.settings.burst,
                                                                  time.monotonic_ns())
        self.pending_update: set[int] = set()
        self.pending_install: set[int] = set()
        self.installing: int | None = None  # the row whose SetChargingProfile is in flight
        self.need_default = False
        self.busy = 0
        # A station that reconnects to a restarted gateway does not re-send its running transactions:
        # meter values for an EVSE without a known transaction make the gateway ask, once per
        # connection (not on every connect: a station without a TriggerMessage handler never answers,
        # and the one CALL in flight would hold up the profiles for the call timeout).
        self.need_trigger = False
        self.triggered = False
        self.closing = False
        self.wake = asyncio.Event()
        self.done = asyncio.Event()
        self.tx_rows: dict[str, int] = {}  # transactionId -> row, bounded by this station's EVSEs
        # The CALL in flight (OCPP-J: at most one): its message id and the future its reply resolves. Ids
        # are this session's random prefix and a counter (unique per connection, as OCPP-J asks; the
        # package's uuid4 per call cost ~2 % of the gateway at 1,000 stations).
        self._call_id: str | None = None
        self._call_fut: asyncio.Future | None = None
        self._id_prefix = f"{secrets.token_hex(4)}-"
        self._id_counter = itertools.count(1)
        self._routing = False  # the session's task is handling a message: later ones wait their turn
        self._prepaid = False  # the next message recv() returns has had its rate-limit token taken

    # ------------------------------------------------------------------------------ receiving
    async def start(self) -> None:
        """Take the station's messages until the connection closes (ConnectionClosed): the hot ones in the
        read callback (:meth:`_on_message_now`), the rest here, one at a time and in order."""
        ws = self._connection
        ws.on_message = self._on_message_now
        ws.on_control = self._on_control_frame
        try:
            while True:
                raw = await ws.recv()
                self._routing = True  # set in the same step recv() returned in: no message can overtake
                try:
                    await self.route_message(raw)
                finally:
                    self._routing = False
        finally:
            ws.on_message = ws.on_control = None

    def _on_message_now(self, raw) -> bool:
        """A message, in the read callback (StationConnection.on_message): the rate limit first, then the two
        hot frames (a MeterValues CALL, a CALLRESULT) answered here without a task switch; False leaves the
        message to :meth:`start` (anything else, or while the task still handles an earlier message)."""
        if self._routing:
            return False
        if self.closing:
            return True  # draining what the flooding station already sent, until the close completes
        if not self._admit(raw):
            return True
        fast = _hot_frame(raw)
        if fast is None:
            self._prepaid = True  # it is the next message recv() returns: the queue was empty
            return False
        if fast[0] == MessageType.CallResult:
            self._resolve(CallResult(fast[1], fast[2]))
        else:
            try:
                self._meter_values(fast[1], fast[3])
            except Exception as exc:  # a bug of ours must not end the station's session
                self.gw.stats["internal_errors"] += 1
                log.error("OCPP_INTERNAL_ERROR gateway=%s station=%s error=%r", self.gw.gateway_id, self.id, exc)
        return True

    def _on_control_frame(self) -> None:
        """A ping or unsolicited pong from the station (StationConnection.on_control): one token, like a message."""
        if not self.closing:
            self._admit(None)

    def _admit(self, raw) -> bool:
        """The message rate limit: False (counted; a CALLERROR, or the close when the station keeps going).
        ``raw`` None: a control frame (one token, no CALLERROR: it has no message id)."""
        if self.bucket.take(time.monotonic_ns(), 1.0 if raw is None else 1.0 + len(raw) // MESSAGE_COST_BYTES):
            return True
        self.gw.stats["rate_limited"] += 1
        if self.bucket.exhausted:
            self.gw.stats["rate_limit_disconnects"] += 1
            self.closing = True
            self.ws.start_close(1008, "message rate limit exceeded")
            # and nothing more read: waiting for its close handshake (10 s) kept reading, decrypting and answering
            # the pings of a flooder that ignores the Close (bench ocppfuzz: 49 % of a core)
            self.ws.cut()
            return False
        if raw is None:
            return False
        self._send_now(json.dumps([MessageType.CallError, _unique_id(raw), "GenericError",
                                   "message rate limit exceeded", {}]))
        return False

    # ------------------------------------------------------------------------------ routing
    async def route_message(self, raw_msg) -> None:
        """Rate limit, then parse; anything unparseable or unhandled gets a CALLERROR, never an exception."""
        try:
            await self._route(raw_msg)
        except Exception as exc:
            from websockets.exceptions import ConnectionClosed

            if isinstance(exc, ConnectionClosed):
                raise
            self.gw.stats["internal_errors"] += 1  # a bug of ours must not end the station's session
            log.error("OCPP_INTERNAL_ERROR gateway=%s station=%s error=%r", self.gw.gateway_id, self.id, exc)

    async def _route(self, raw_msg) -> None:
        if self.closing:
            return  # draining what the flooding station already sent, until the close completes
        if self._prepaid:
            self._prepaid = False  # _on_message_now took its token
        elif not self._admit(raw_msg):
            return
        fast = _hot_frame(raw_msg)
        if fast is not None:  # the hot messages, without the package's unpack and routing (same checks)
            if fast[0] == MessageType.CallResult:
                self._resolve(CallResult(fast[1], fast[2]))
            else:
                self._meter_values(fast[1], fast[3])
            return
        try:
            msg = unpack(raw_msg)
        except OCPPError as exc:
            await self._send_error(_unique_id(raw_msg), exc.code, str(exc.description)[:200])
            return
        except Exception:  # a frame unpack did not foresee
            await self._send_error("-1", "FormatViolation", "not an OCPP-J message")
            return
        if isinstance(msg, Call):
            self.gw.stats["calls_received"] += 1
            if self.gw.calls_trace is not None:
                self.gw.calls_trace.append(time.monotonic_ns())
            if not isinstance(msg.unique_id, str) or not isinstance(msg.payload, dict):
                await self._send_error(_unique_id(raw_msg), "FormatViolation", "message id must be a string "
                                                                                "and the payload an object")
                return
            try:
                await self._handle_call(msg)
            except OCPPError as exc:
                await self._send(msg.create_call_error(exc).to_json())
            except Exception as exc:  # the library failed on a hostile payload
                _reraise_closed(exc)  # the station went away while we answered: not its error
                if _HANDLER_LOG.tracebacks < _HANDLER_LOG.limit:
                    _HANDLER_LOG.error("station %s action %r: %r", self.id, str(msg.action)[:60], exc)
                await self._send(msg.create_call_error(exc).to_json())
        elif isinstance(msg, (CallResult, CallError)):
            self._resolve(msg)

    def _resolve(self, msg) -> None:
        """A CALLRESULT or CALLERROR: the reply to the CALL in flight if its id matches, else counted and dropped
        (an unsolicited reply must not wait anywhere: nothing would ever take it)."""
        fut = self._call_fut
        if fut is not None and msg.unique_id == self._call_id and not fut.done():
            fut.set_result(msg)
        else:
            self.gw.stats["unsolicited_replies"] += 1

    def _meter_values(self, unique_id: str, payload: dict) -> None:
        """MeterValues (every EVSE, every second): what _handle_call does for it, without the package's Call
        object and reply dataclass, and synchronous (the handler never waits); errors as there (CALLERROR with
        the schema's or the mapping's code)."""
        gw = self.gw
        gw.stats["calls_received"] += 1
        if gw.calls_trace is not None:
            gw.calls_trace.append(time.monotonic_ns())
        try:
            if ocpp_schema.check_meter_values(self._ocpp_version, payload):  # the plain shape: keys as sent
                self._on_meter_values(payload["evseId"], payload["meterValue"], camel=True)
            else:
                self._on_meter_values(**_snake(payload))
        except Exception as exc:
            msg = Call(unique_id, "MeterValues", payload)
            if not isinstance(exc, OCPPError) and _HANDLER_LOG.tracebacks < _HANDLER_LOG.limit:
                _HANDLER_LOG.error("station %s action 'MeterValues': %r", self.id, exc)
            self._send_now(msg.create_call_error(exc).to_json())
            return
        self._connection.write_text(orjson.dumps([3, unique_id, _EMPTY]))

    async def _handle_call(self, msg):
        if msg.action not in self.route_map:  # ocpp 2.1.0 would not answer at all (notes, pitfall 2)
            try:
                Action21(msg.action)
            except ValueError:
                raise NotSupportedError(details={"cause": f"{str(msg.action)[:60]} is not an OCPP action"}) from None
            raise OcppNotImplemented(details={"cause": f"{msg.action} is not handled by this CSMS"})
        ocpp_schema.validate(self._ocpp_version, msg.action, msg.payload)  # the package's schemas, compiled
        # Not ChargePoint._handle_call: for every message it inspects the handler's signature and turns the
        # reply dataclass into a dict, strips its Nones and camel-cases it; most replies here are empty
        # (MeterValues, StatusNotification). A handler's exception goes to _route, which answers CALLERROR.
        response = await self.route_map[msg.action]["_on_action"](**_snake(msg.payload))
        await self._send(msg.create_call_result(_result_payload(response)).to_json())

    async def _send_error(self, unique_id: str, code: str, description: str) -> None:
        await self._send(json.dumps([MessageType.CallError, unique_id, code, description, {}]))

    async def _send(self, message: str) -> None:
        """Send (CALLERRORs counted); ConnectionClosed if the connection is not open, as websockets' send."""
        if not self._send_now(message):
            raise self._connection.close_exc
        await self._connection.drain()

    def _send_now(self, message: str) -> bool:
        """Write one frame now (CALLERRORs counted by code); False if the connection is not open."""
        if message.startswith("[4,"):
            try:
                parsed = json.loads(message)
                code, detail = str(parsed[2]), f"{parsed[3]} {parsed[4]}"
            except (ValueError, IndexError):
                code, detail = "InternalError", message
            self.gw.count_callerror(code, self.id, detail)
        return self._connection.write_text(message)

    # ------------------------------------------------------------------------------ helpers
    def _row(self, evse_id) -> int | None:
        row = self.gw.row_of.get((self.id, evse_id)) if isinstance(evse_id, int) else None
        if row is None and isinstance(evse_id, int) and evse_id > 0:
            self.gw.stats["unknown_evse_messages"] += 1
            self.gw.events.emit("UNKNOWN_NODE", logging.WARNING, key=self.id, gateway=self.gw.gateway_id,
                                station=self.id, evse=evse_id,
                                msg="an EVSE the roster does not list under this gateway (add <station>:<evse>)")
        return row

    def _meter(self, row: int, meter_value, camel: bool = False) -> None:
        try:
            reading = om.parse_meter_values(meter_value, camel=camel)
        except om.MappingError as exc:
            raise PropertyConstraintViolationError(description=str(exc)[:200]) from None
        e = self.gw.evses[row]
        with self.gw.lock:
            e.meter_ns = time.monotonic_ns()
            if reading.soc is not None:
                e.soc, e.has_soc = reading.soc, True
                if e.needs is not None and e.min_soc is None:
                    e.min_soc = om.ev_min_soc(e.soc, e.needs.min_v2x_energy_kwh, e.capacity_kwh)
            if reading.p_kw is not None:
                e.p_kw = reading.p_kw

    # ------------------------------------------------------------------------------ handlers
    @on("BootNotification", skip_schema_validation=True)  # checked in _handle_call (ocpp_schema)
    async def on_boot(self, charging_station, reason, **_):
        self.need_default = True
        self.wake.set()
        return self._call_result.BootNotification(current_time=_now_iso(), interval=self.gw.settings.heartbeat_s,
                                                  status="Accepted")

    @on("Heartbeat", skip_schema_validation=True)  # checked in _handle_call (ocpp_schema)
    async def on_heartbeat(self, **_):
        return self._call_result.Heartbeat(current_time=_now_iso())

    @on("StatusNotification", skip_schema_validation=True)  # checked in _handle_call (ocpp_schema)
    async def on_status(self, timestamp, connector_status, evse_id, connector_id, **_):
        row = self._row(evse_id)
        if row is not None:
            with self.gw.lock:
                self.gw.evses[row].connector_status = connector_status
        return self._call_result.StatusNotification()

    @on("TransactionEvent", skip_schema_validation=True)  # checked in _handle_call (ocpp_schema)
    async def on_transaction(self, event_type, timestamp, trigger_reason, seq_no, transaction_info, evse=None,
                             meter_value=None, **_):
        tx = transaction_info["transaction_id"]
        row = self._row(evse["id"]) if evse else self.tx_rows.get(tx)
        if row is None:
            if evse is None:
                raise PropertyConstraintViolationError(description=f"transaction {tx!r}: evse missing and the "
                                                                   "transaction was never started with one")
            return self._call_result.TransactionEvent()
        if meter_value:
            self._meter(row, meter_value)
        e = self.gw.evses[row]
        with self.gw.lock:
            if event_type == "Ended":
                self.tx_rows.pop(tx, None)
                if e.transaction_id == tx:
                    e.transaction_id, e.has_soc, e.needs, e.min_soc, e.p_kw = None, False, None, None, 0.0
                    e.profile_installed = e.profile_refused = False
                    self.gw.controllable[row] = False
                    self.gw.sent_kw[row] = np.nan
            else:
                if e.transaction_id != tx:  # a new transaction (or one the gateway did not see start)
                    for old in [t for t, r in self.tx_rows.items() if r == row]:
                        del self.tx_rows[old]
                    e.transaction_id, e.profile_installed, e.profile_refused, e.profile_retry_ns = tx, False, False, 0
                    self.gw.controllable[row] = False
                self.tx_rows[tx] = row
                self.gw._install_sessions.add(self)
        self.gw._scan()
        return self._call_result.TransactionEvent()

    @on("MeterValues", skip_schema_validation=True)  # checked in _handle_call (ocpp_schema)
    async def on_meter_values(self, evse_id, meter_value, **_):
        self._on_meter_values(evse_id, meter_value)
        return self._call_result.MeterValues()

    def _on_meter_values(self, evse_id, meter_value, camel=False, **_) -> None:
        """MeterValues' work, synchronous: the read callback answers it (_meter_values) without a task;
        ``camel``: ``meter_value`` has the schema's key names (ocpp_mapping.parse_meter_values)."""
        row = self._row(evse_id)
        if row is not None:
            self._meter(row, meter_value, camel)
            if self.gw.evses[row].transaction_id is None and not self.triggered:
                self.need_trigger = self.triggered = True
                self.wake.set()

    @on("NotifyEVChargingNeeds", skip_schema_validation=True)  # checked in _handle_call (ocpp_schema)
    async def on_charging_needs(self, charging_needs, evse_id, **_):
        row = self._row(evse_id)
        if row is None:
            return self._call_result.NotifyEVChargingNeeds(status="Rejected")
        try:
            needs = om.parse_charging_needs(charging_needs)
        except om.MappingError as exc:
            raise PropertyConstraintViolationError(description=str(exc)[:200]) from None
        if self.version == om.OCPP201:
            needs = om.EvNeeds(False, om.EvLimits(needs.limits.p_chg_max_kw, 0.0))  # charge-only subset
        e = self.gw.evses[row]
        with self.gw.lock:
            e.needs = needs
            e.min_soc = om.ev_min_soc(e.soc if e.has_soc else None, needs.min_v2x_energy_kwh, e.capacity_kwh)
        return self._call_result.NotifyEVChargingNeeds(status="Accepted")

    # ------------------------------------------------------------------------------ CSMS -> station
    async def sender(self) -> None:
        """Send what the scan handed over: the fallback profile, transaction profiles, setpoints."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            self.busy = 1
            try:
                if self.need_default:
                    self.need_default = False
                    await self._install_default()
                if self.need_trigger:
                    self.need_trigger = False
                    await self._trigger_transactions()
                while self.pending_install:
                    self.installing = self.pending_install.pop()
                    try:
                        await self._install(self.installing)
                    finally:
                        self.installing = None
                while self.pending_update:
                    await self._update(self.pending_update.pop())
            finally:
                self.busy = 0

    async def _request(self, action: str, payload: dict) -> dict | None:
        """One CALL (a payload of the schema's camelCase names); the reply's payload, checked against the
        schema, or None (counted) on CALLERROR, timeout or a reply that fails its schema.

        Not ``ChargePoint.call``: it converts a dataclass to camelCase and back and checks both payloads
        with jsonschema on every call, most of a setpoint update's cost at hundreds of stations. Ours are
        built with the schema's names (ocpp_mapping, tested against the schemas); replies are still checked.
        Nor the package's reply queue: ``wait_for(queue.get())`` made a task per CALL; the reply resolves the
        CALL's own future (``_resolve``), and the gateway's ticker bounds the wait (``call_deadlines``: the
        timeout is up to one tick late).
        """
        response = None
        try:
            async with self._call_lock:  # OCPP-J: one CALL in flight per station
                unique_id = self._id_prefix + str(next(self._id_counter))
                loop = asyncio.get_running_loop()
                fut = self._call_fut = loop.create_future()
                self._call_id = unique_id
                self.gw.call_deadlines.append((loop.time() + self._response_timeout, fut))
                try:
                    if not self._connection.write_text(orjson.dumps([2, unique_id, action, payload])):
                        raise self._connection.close_exc
                    response = await fut
                finally:
                    if not fut.done():
                        fut.cancel()  # the session ended: the ticker drops it
                    self._call_id = self._call_fut = None
            if response.message_type_id == MessageType.CallError:
                raise _call_error_exception(response)
            ocpp_schema.validate(self._ocpp_version, action, response.payload, response=True)
            return response.payload
        except asyncio.TimeoutError:
            self.gw.stats["call_timeouts"] += 1
        except OCPPError as exc:
            # counted each, logged once per station and interval: a station can answer every CALL badly
            gw = self.gw
            if response is not None and response.message_type_id == MessageType.CallError:
                gw.stats["callerrors_received"] += 1
                gw.events.emit("OCPP_CALLERROR_RECEIVED", logging.WARNING, key=self.id, gateway=gw.gateway_id,
                               station=self.id, action=action, error=str(response.error_code)[:60],
                               total=gw.stats["callerrors_received"])
            else:
                gw.stats["bad_replies"] += 1
                gw.events.emit("OCPP_BAD_REPLY", logging.WARNING, key=self.id, gateway=gw.gateway_id,
                               station=self.id, action=action, total=gw.stats["bad_replies"], msg=str(exc)[:200])
        return None

    async def _install_default(self) -> None:
        reply = await self._request("SetChargingProfile", {"evseId": 0, "chargingProfile": om.default_profile()})
        if reply is None or reply.get("status") != "Accepted":
            self.gw.stats["default_profile_rejected"] += 1
            self.gw.events.emit("OCPP_DEFAULT_PROFILE_REJECTED", logging.WARNING, key=self.id,
                                gateway=self.gw.gateway_id, station=self.id,
                                msg="the station keeps its own fallback when it loses the gateway")

    async def _trigger_transactions(self) -> None:
        reply = await self._request("TriggerMessage", {"requestedMessage": "TransactionEvent"})
        self.gw.stats["triggers_accepted" if reply is not None and reply.get("status") == "Accepted"
                      else "triggers_rejected"] += 1

    async def _install(self, row: int) -> None:
        gw = self.gw
        e = gw.evses[row]
        with gw.lock:
            tx, p_kw, limits = e.transaction_id, float(gw.target_kw[row]), e.limits()
        if tx is None:
            return
        profile = self._profile(e.evse_id, tx, p_kw, limits)
        reply = await self._request("SetChargingProfile", {"evseId": e.evse_id, "chargingProfile": profile})
        ok = reply is not None and reply.get("status") == "Accepted"
        now = time.monotonic_ns()
        with gw.lock:
            if e.transaction_id != tx:
                return
            e.profile_installed = ok
            e.profile_refused = not ok
            gw.controllable[row] = ok
            if ok:
                gw.sent_kw[row] = p_kw
                gw.sent_ns[row] = now
            else:
                e.profile_retry_ns = now + round(gw.settings.resync_s * 1e9)
        gw.stats["profiles_installed" if ok else "profiles_rejected"] += 1
        if not ok:
            gw.events.emit("NODE_UNREACHABLE", logging.WARNING, key=om.node_id(self.id, e.evse_id),
                           gateway=gw.gateway_id, node=om.node_id(self.id, e.evse_id),
                           msg="the station did not accept the charging profile; retried every resync")

    async def _update(self, row: int) -> None:
        gw = self.gw
        e = gw.evses[row]
        with gw.lock:
            if not gw.controllable[row]:
                return
            p_kw, limits, tx = float(gw.target_kw[row]), e.limits(), e.transaction_id
            handed_ns = int(gw.sent_ns[row])
            gw.sent_kw[row] = p_kw
            gw.sent_ns[row] = now = time.monotonic_ns()
        if gw.trace is not None:
            gw.trace.append((handed_ns, now, row, p_kw))
        reply = await self._request(*self._update_payload(e.evse_id, tx, p_kw, limits))
        gw.stats["updates_sent"] += 1
        if reply is None or reply.get("status") != "Accepted":
            gw.stats["updates_rejected"] += 1
            e.update_rejects += 1
            with gw.lock:
                gw.sent_kw[row] = np.nan  # unknown what the station does now: send again at the next scan
        else:
            e.update_rejects = 0


class Session21(_SessionMixin, ChargePoint21):
    """An OCPP 2.1 station: Dynamic profile, CentralSetpoint, UpdateDynamicSchedule."""

    version = om.OCPP21

    def _profile(self, evse_id, tx, p_kw, limits):
        return om.dynamic_profile(evse_id, tx, p_kw, max_offline_s=self.gw.settings.max_offline_s, limits=limits)

    def _update_payload(self, evse_id, tx, p_kw, limits) -> tuple[str, dict]:
        return "UpdateDynamicSchedule", {"chargingProfileId": om.tx_profile_id(evse_id),
                                         "scheduleUpdate": om.schedule_update(p_kw, limits)}


class Session201(_SessionMixin, ChargePoint201):
    """An OCPP 2.0.1 station: charge-only; each change re-sends a Relative TxProfile with a limit."""

    version = om.OCPP201

    def _duration_s(self) -> int:
        s = self.gw.settings
        return math.ceil(s.resync_s + s.max_offline_s)

    def _profile(self, evse_id, tx, p_kw, limits):
        return om.charge_limit_profile(evse_id, tx, p_kw, duration_s=self._duration_s(), limits=limits)

    def _update_payload(self, evse_id, tx, p_kw, limits) -> tuple[str, dict]:
        return "SetChargingProfile", {"evseId": evse_id, "chargingProfile": self._profile(evse_id, tx, p_kw, limits)}


def server_ssl_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files (OCPP security profile 2 requires TLS 1.2 at least)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


__all__ = ["GC_YOUNG_THRESHOLD", "HANDLED_ACTIONS", "Evse", "OcppSettings", "OcppVehicles", "Session21", "Session201",
           "send_text", "server_ssl_context", "tune_gc"]

