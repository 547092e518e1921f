"""The OCPP gateway's LocalFrequency mode: stations answer frequency themselves, the central loop re-allocates.

``v2grt gateway ocpp --operation-mode local-frequency --service dc --service-capacity-kw 1760`` installs on
every EVSE that accepts it a Dynamic TxProfile whose period has ``operationMode`` ``LocalFrequency``: a
``v2xFreqWattCurve`` (the service curve scaled to the EVSE's share of the capacity) and a
``v2xBaseline``. The station delivers baseline + curve(f measured at the station), so a frequency step
moves it without a message. At each cycle the gateway sets

    baseline_i = p_i - share_i * fraction(f)

where ``p_i`` is the aggregator's setpoint and ``f`` the frequency that same cycle used (the fleet status
topic's ``f_hz``, paired with the setpoints by epoch and sequence: no wire change). With the response
shared pro rata, a pure frequency step leaves every baseline where it was; the existing deadband and
resync then send only the re-allocations. OCPP 2.1's UpdateDynamicSchedule cannot carry a baseline (its
``scheduleUpdate`` has setpoints and limits only), so a baseline that moved goes out as a SetChargingProfile
that replaces the profile (same id and stack level).

Falls back to ``CentralSetpoint`` per EVSE, counted and logged: a 2.0.1 station (charge limits only),
a station that rejects the LocalFrequency profile (until it reconnects), a node the aggregator
excludes (reason not OK), an e-stop, expired setpoints, and every EVSE while the aggregator publishes
no frequency for the cycle (stale meter, or no status within ``status_timeout_s``): a station must
not answer frequency on its own when the central loop does not count on it.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from v2grt.gateway import ocpp_mapping as om
from v2grt.gateway.core import GatewayError
from v2grt.gateway.ocpp import OcppVehicles, Session21, Session201
from v2grt.services import ServiceCurve

log = logging.getLogger("v2grt.gateway")

MODES = ("central", "local-frequency")

#: What a station holds (``mode_sent``): not known, CentralSetpoint, LocalFrequency.
HELD_NONE, HELD_CENTRAL, HELD_LOCAL = 0, 1, 2

#: (epoch, seq) -> frequency remembered from the status topic: a few seconds of cycles.
_FREQ_MEMORY = 64


@dataclass
class LocalFrequencySettings:
    """The service the stations answer on their own, and how much of it this gateway's EVSEs carry."""

    service: ServiceCurve
    capacity_kw: float  # split over the EVSEs pro rata to their roster rating (evse_shares_kw)
    status_timeout_s: float = 0.5  # setpoints without their cycle's frequency this long: central

    def check(self) -> None:
        s = self.service
        if s.trigger_hz is not None:
            raise GatewayError(f"--service {s.name}: a trigger service (latched, held, released at a rate) cannot "
                               "be a station's frequency-watt curve; use a proportional service (fcr, fcr_n, dc, ...)")
        if len(s.f_hz) > om.MAX_FREQ_WATT_POINTS:
            raise GatewayError(f"--service {s.name}: {len(s.f_hz)} curve points; OCPP's v2xFreqWattCurve takes at "
                               f"most {om.MAX_FREQ_WATT_POINTS}")
        if not (math.isfinite(self.capacity_kw) and 0.0 < self.capacity_kw <= 1e6):
            raise GatewayError(f"--service-capacity-kw {self.capacity_kw!r}: expected 0 < kW <= 1e6 (the service "
                               "capacity this gateway's EVSEs carry, as the aggregator's service.capacity_kw)")
        if not 0.01 <= self.status_timeout_s <= 10.0:
            raise GatewayError(f"status_timeout_s={self.status_timeout_s!r}: expected 0.01..10 s")


class StatusFrequency:
    """The frequency each cycle used, from the aggregators' fleet status topic, on a thread of its own.

    One StatusSubscriber per aggregator (the same endpoints and key as the setpoints; docs/wire.md 7:
    ``ep``, ``seq``, ``f_hz``); each status received calls ``on_status(ep, seq, f_hz or None)``.
    """

    def __init__(self, ctx, endpoints: list[str], curves: list | None, on_status):
        self.ctx, self.endpoints, self.curves, self.on_status = ctx, endpoints, curves, on_status
        self.received = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ocpp-status", daemon=True)

    def start(self) -> StatusFrequency:
        self._thread.start()
        self._ready.wait(5.0)
        if self._error is not None:
            raise GatewayError(f"status topic {self.endpoints}: {self._error}")
        return self

    def _run(self) -> None:
        from v2grt.io import bus

        subs = []
        try:
            for k, endpoint in enumerate(self.endpoints):
                subs.append(bus.StatusSubscriber(self.ctx, endpoint, curve=self.curves[k] if self.curves else None))
        except Exception as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            for sub in subs:
                sub.close()
            return
        self._ready.set()
        wait_ms = max(1, 20 // len(subs))
        try:
            while not self._stop.is_set():
                for sub in subs:
                    status = sub.recv(wait_ms)
                    if status is not None:
                        self.received += 1
                        self.on_status(int(status["ep"]), int(status["seq"]), status.get("f_hz"))
        finally:
            for sub in subs:
                sub.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


class LocalFrequencyVehicles(OcppVehicles):
    """OcppVehicles whose 2.1 stations answer frequency locally (module docstring); the rest as central.

    ``target_kw`` (what the scan, the deadband and the resync work on) holds the baseline of an EVSE in
    LocalFrequency and the setpoint of one in CentralSetpoint; ``central_kw`` the aggregator's setpoints.
    """

    def __init__(self, fleet, settings, lf: LocalFrequencySettings, *, gateway_id: str, events=None):
        lf.check()
        super().__init__(fleet, settings, gateway_id=gateway_id, events=events)
        self.lf = lf
        n = self.n
        rating = np.minimum(fleet.p_dis_max_kw[:n], fleet.p_chg_max_kw[:n]).astype(np.float64)
        try:
            self.share_kw = om.evse_shares_kw(rating, lf.capacity_kw)
            self.curves = [om.freq_watt_curve(lf.service.f_hz, lf.service.fraction, float(s)) for s in self.share_kw]
        except om.MappingError as exc:  # e.g. a capacity that gives one EVSE more than the wire's 1000 kW
            raise GatewayError(f"gateway {gateway_id!r}: --service-capacity-kw {lf.capacity_kw:g} over "
                               f"{n} EVSEs: {exc}") from None
        self.central_kw = np.zeros(n)
        self.ok = np.zeros(n, dtype=bool)  # named with reason OK, no e-stop (GatewayCore's hook)
        self.lf_capable = np.ones(n, dtype=bool)  # False: 2.0.1, or refused LocalFrequency
        self.want_lf = np.zeros(n, dtype=bool)  # the mode target_kw is computed for
        self.mode_sent = np.zeros(n, dtype=np.int8)  # what the station holds (HELD_*)
        self.cur_key: tuple[int, int] | None = None  # (ep, seq) of the setpoints in force; None: expired
        self.cur_key_ns = 0
        self.freq: collections.OrderedDict[tuple[int, int], float | None] = collections.OrderedDict()
        self.fraction = math.nan  # the service's fraction at the frequency of the last baselines
        self.status: StatusFrequency | None = None

    def listen_status(self, ctx, endpoints: list[str], curves: list | None) -> LocalFrequencyVehicles:
        """Subscribe to every aggregator's status topic (the frequency of each cycle)."""
        self.status = StatusFrequency(ctx, endpoints, curves, self._on_status).start()
        return self

    # ------------------------------------------------------------------------------ GatewayCore thread
    def setpoints_accepted(self, ep: int, seq: int, ok: np.ndarray) -> None:
        with self.lock:
            self.cur_key, self.cur_key_ns = (ep, seq), time.monotonic_ns()
            self.ok[:] = ok

    def setpoints_expired(self) -> None:
        with self.lock:
            self.cur_key = None

    def apply(self, p_kw: np.ndarray, now_ns: int) -> None:
        with self.lock:
            self.central_kw[:] = p_kw
            self._recompute()
        self._wake_scan()

    # ------------------------------------------------------------------------------ status thread
    def _on_status(self, ep: int, seq: int, f_hz) -> None:
        f = float(f_hz) if isinstance(f_hz, (int, float)) and math.isfinite(f_hz) else None
        with self.lock:
            self.freq[(ep, seq)] = f
            while len(self.freq) > _FREQ_MEMORY:
                self.freq.popitem(last=False)
            if self.cur_key != (ep, seq):
                return
            self._recompute()
        self._wake_scan()

    # ------------------------------------------------------------------------------ the one rule (under the lock)
    def _recompute(self) -> None:
        """target_kw and want_lf from the setpoints in force and their cycle's frequency (module docstring)."""
        key = self.cur_key
        if key is not None and key in self.freq and self.freq[key] is not None:
            self.fraction = self.lf.service.fraction_at(self.freq[key])
            want = self.ok & self.lf_capable & (self.share_kw > 0.0)
            target = np.where(want, om.local_baselines_kw(self.central_kw, self.share_kw, self.fraction),
                              self.central_kw)
        elif key is not None and key not in self.freq and (
                time.monotonic_ns() - self.cur_key_ns < self.lf.status_timeout_s * 1e9):
            # This cycle's frequency is on its way (another socket): the baselines stay, the stations answer
            # on their own meanwhile; an EVSE no longer OK goes central at once.
            want = self.want_lf & self.ok & self.lf_capable
            target = np.where(want, self.target_kw, self.central_kw)
        else:  # expired, the aggregator had no frequency, or no status came: the stations must not answer alone
            if self.want_lf.any() and key is not None:
                self.stats["local_frequency_suspended"] += 1
            want = np.zeros(self.n, dtype=bool)
            target = self.central_kw
        switched = want != self.want_lf
        if switched.any():
            self.sent_kw[switched] = np.nan  # a mode change always goes out (not hidden by the deadband)
            self.want_lf[:] = want
        self.target_kw[:] = target

    def _due_rows(self, now_ns: int) -> np.ndarray:
        s = self.settings
        return om.due_rows(self.target_kw, self.sent_kw, self.sent_ns, self.controllable, now_ns,
                           deadband_kw=s.deadband_kw, resync_ns=round(s.resync_s * 1e9), zero_rows=~self.want_lf)

    # ------------------------------------------------------------------------------ sessions
    def _session_class(self, version: str) -> type:
        return SessionLocal21 if version == om.OCPP21 else SessionLocal201

    def refuse_local(self, station: str, row: int, why: str) -> None:
        """EVSE ``row`` cannot do LocalFrequency (until its station reconnects): CentralSetpoint from now on."""
        with self.lock:
            if not self.lf_capable[row]:
                return
            self.lf_capable[row] = False
            self._recompute()
        self.stats["local_frequency_fallbacks"] += 1
        node = self.node_ids[row]
        self.events.emit("OCPP_LOCAL_FREQUENCY_FALLBACK", logging.WARNING, key=node, gateway=self.gateway_id,
                         node=node, why=why, total=self.stats["local_frequency_fallbacks"],
                         msg="this EVSE runs CentralSetpoint: it follows frequency only through the central loop")

    def close(self, flush_s: float = 2.0) -> None:
        """Every EVSE back to CentralSetpoint at its target (0 kW after GatewayCore.close), sent, then stop."""
        with self.lock:
            self.cur_key = None
            self._recompute()
        super().close(flush_s)
        if self.status is not None:
            self.status.close()

    def counters(self) -> dict[str, int]:
        with self.lock:
            held = {"evses_local_frequency": int((self.mode_sent == HELD_LOCAL).sum())}
        return {**super().counters(), **held,
                "status_received": self.status.received if self.status is not None else 0}


class SessionLocal21(Session21):
    """A 2.1 station under the LocalFrequency mode: the profile of the EVSE's mode, SetChargingProfile for
    every LocalFrequency change (UpdateDynamicSchedule has no v2xBaseline), UpdateDynamicSchedule otherwise."""

    def __init__(self, station_id, ws, gw):
        super().__init__(station_id, ws, gw)
        self._sending: dict[int, int] = {}  # row -> HELD_* of the profile or update in flight
        self._last_reply: dict | None = None
        with gw.lock:
            for row in self.rows:
                gw.lf_capable[row] = True  # a reconnected station is asked again (its firmware may be new)
                gw.mode_sent[row] = HELD_NONE

    def _mode_value(self, evse_id: int) -> tuple[int, bool, float]:
        row = self.gw.row_of[(self.id, evse_id)]
        with self.gw.lock:
            return row, bool(self.gw.want_lf[row]), float(self.gw.target_kw[row])

    async def _request(self, action, payload):
        self._last_reply = reply = await super()._request(action, payload)
        return reply

    def _profile(self, evse_id, tx, p_kw, limits):
        row, local, value = self._mode_value(evse_id)
        self._sending[row] = HELD_LOCAL if local else HELD_CENTRAL
        if local:
            self.gw.stats["local_frequency_profiles_sent"] += 1
            return om.local_frequency_profile(evse_id, tx, value, self.gw.curves[row],
                                              max_offline_s=self.gw.settings.max_offline_s, limits=limits)
        return super()._profile(evse_id, tx, value, limits)

    def _update_payload(self, evse_id, tx, p_kw, limits):
        row, local, value = self._mode_value(evse_id)
        if local or self.gw.mode_sent[row] != HELD_CENTRAL:
            return "SetChargingProfile", {"evseId": evse_id, "chargingProfile": self._profile(evse_id, tx, value,
                                                                                            limits)}
        self._sending[row] = HELD_CENTRAL
        return super()._update_payload(evse_id, tx, value, limits)

    def _settle(self, row: int, accepted: bool) -> bool:
        """Book what the station now holds; True if it refused a LocalFrequency profile (then falls back)."""
        held = self._sending.pop(row, None)
        if held is None:
            return False
        if accepted:
            self.gw.mode_sent[row] = held
            return False
        self.gw.mode_sent[row] = HELD_NONE
        refused = self._last_reply is not None and self._last_reply.get("status") != "Accepted"
        if held == HELD_LOCAL and refused:  # an answer, not a timeout: a timeout is retried as it was
            self.gw.refuse_local(self.id, row, f"SetChargingProfile LocalFrequency {self._last_reply.get('status')}")
            return True
        return False

    async def _install(self, row: int) -> None:
        await super()._install(row)
        e = self.gw.evses[row]
        if self._settle(row, e.profile_installed):
            with self.gw.lock:
                e.profile_retry_ns = 0
            await super()._install(row)  # at once, as CentralSetpoint
            self._settle(row, e.profile_installed)

    async def _update(self, row: int) -> None:
        e = self.gw.evses[row]
        self._sending.pop(row, None)
        await super()._update(row)
        self._settle(row, e.update_rejects == 0)


class SessionLocal201(Session201):
    """A 2.0.1 station under the LocalFrequency mode: charge limits as ever; its EVSEs counted and logged."""

    def __init__(self, station_id, ws, gw):
        super().__init__(station_id, ws, gw)
        for row in self.rows:
            gw.refuse_local(station_id, row, "the station speaks ocpp2.0.1 (no V2X)")


def local_settings_from_args(args) -> LocalFrequencySettings | None:
    """LocalFrequencySettings from ``--operation-mode``, ``--service``, ``--nominal-hz``, ``--service-capacity-kw``
    (None for central); GatewayError naming the option when they do not fit together."""
    if args.operation_mode == "central":
        return None
    from v2grt.services import ServiceError, get_service

    if not args.service or args.service_capacity_kw is None:
        raise GatewayError("--operation-mode local-frequency needs --service NAME (the curve the stations answer) "
                           "and --service-capacity-kw KW (the capacity this gateway's EVSEs carry)")
    try:
        service = get_service(args.service, args.nominal_hz)
    except ServiceError as exc:
        raise GatewayError(f"--service: {exc}") from None
    lf = LocalFrequencySettings(service, float(args.service_capacity_kw), status_timeout_s=args.status_timeout_s)
    lf.check()
    return lf


def add_local_frequency_options(p) -> None:
    """The `v2grt gateway ocpp` options of this mode."""
    p.add_argument("--operation-mode", choices=MODES, default="central",
                   help="central (default): every setpoint from the aggregator (CentralSetpoint); local-frequency: "
                        "2.1 stations answer frequency themselves with the service's curve (LocalFrequency, "
                        "docs/gateways.md), the aggregator's setpoints move their baselines")
    p.add_argument("--service", help="local-frequency: the service curve the stations get (v2grt.services: fcr, "
                                     "fcr_n, dc, ...; the aggregator's service.name)")
    p.add_argument("--nominal-hz", type=float, default=None, help="local-frequency: the curve's nominal (50/60 Hz)")
    p.add_argument("--service-capacity-kw", type=float, default=None,
                   help="local-frequency: the service capacity this gateway's EVSEs carry (kW), split over them "
                        "pro rata to their roster rating min(p_dis_max_kw, p_chg_max_kw)")
    p.add_argument("--status-timeout-s", type=float, default=0.5,
                   help="local-frequency: setpoints whose cycle's frequency (the status topic) has not come after "
                        "this long turn every EVSE to CentralSetpoint (default 0.5 s)")


__all__ = ["HELD_CENTRAL", "HELD_LOCAL", "HELD_NONE", "MODES", "LocalFrequencySettings", "LocalFrequencyVehicles",
           "SessionLocal21", "SessionLocal201", "StatusFrequency", "add_local_frequency_options",
           "local_settings_from_args"]
