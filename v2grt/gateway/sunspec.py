"""The SunSpec DER gateway: bidirectional chargers on Modbus TCP behind one v2grt gateway id.

Each roster node of this gateway is one charger (one Modbus unit id at one host and port, from the
devices file; docs/gateways.md). The charger is read as SunSpec: 'SunS' at 40000, model 1, then
701 (measured W, state, alarms), 702 (ratings), 704 (the active-power setpoint and its reversion
timer) and 713 (SoC, SoH, energy available, status). :class:`SunSpecChargers` is the
:class:`~v2grt.gateway.core.Vehicles` driver that :class:`~v2grt.gateway.core.GatewayCore` runs
(fencing, expiry, e-stop and telemetry batches stay there); this module owns the Modbus side:

- one asyncio (uvloop) thread, :class:`v2grt.io.modbus.InputThread`, with one
  :class:`ChargerPoller` per device: its own pymodbus client, discovery on every (re)connection,
  capped exponential backoff, a timeout on every request (all from ``SunSpecPoller``);
- on each connection two tasks share the client: a reader polls 701 and 713 every ``poll_s``; a
  writer writes the setpoint block of 704 as soon as the gateway hands it a new setpoint (past the
  deadband, or exactly 0; one loop wake for a whole setpoint message), behind at most the one read
  in flight, and re-writes it every ``revert_s / 3`` while it is not 0: every write sets
  ``WSetRvrtTms`` = ``revert_s``, so a charger that stops hearing the gateway goes to ``WSetRvrt`` =
  0 W by itself within ``revert_s``;
- values are checked by :mod:`v2grt.gateway.sunspec_mapping`; a refused poll is counted
  (``invalid``) and its node reports ``INVALID_TELEMETRY`` until a valid poll arrives.

Powers are kW, + = discharge into the grid; SunSpec's signs (the same for 701 W and 704 WSet) are
converted in :mod:`v2grt.gateway.sunspec_mapping` only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from pymodbus.exceptions import ModbusException

from v2grt.codes import Reason
from v2grt.events import EventLog
from v2grt.gateway import sunspec_mapping as sm
from v2grt.gateway.core import GatewayError
from v2grt.io.modbus import InputThread, SunSpecError, SunSpecPoller, decode_point, model_points

log = logging.getLogger("v2grt.gateway")


@dataclass
class SunSpecSettings:
    """How the gateway polls and writes; docs/gateways.md explains each choice."""

    poll_s: float = 1.0  # 701 + 713 read per device this often
    timeout_s: float = 0.5  # per Modbus request
    revert_s: int = 2  # WSetRvrtTms written with every setpoint: whole seconds, >= 1
    deadband_kw: float = 0.2  # a setpoint that moved less is not written at once (the refresh takes it)
    stale_s: float = 5.0  # no valid poll for this long: TIMEOUT_BMS_RESPONSE
    backoff_max_s: float = 2.0
    use_uvloop: bool = True

    def check(self) -> None:
        problems = []
        if not (isinstance(self.revert_s, int) and 1 <= self.revert_s <= sm.MAX_REVERT_S):
            problems.append(f"revert_s={self.revert_s!r}: WSetRvrtTms is whole seconds 1..{sm.MAX_REVERT_S}")
        for name, lo, hi in (("poll_s", 0.005, 60.0), ("timeout_s", 0.01, 30.0), ("deadband_kw", 0.0, 100.0),
                             ("stale_s", 0.05, 3600.0), ("backoff_max_s", 0.05, 600.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and lo <= value <= hi):
                problems.append(f"{name}={value!r}: expected {lo:g}..{hi:g}")
        if not problems and self.revert_s / 3.0 <= self.timeout_s:
            problems.append(f"revert_s={self.revert_s} with timeout_s={self.timeout_s:g}: the refresh every "
                            "revert_s/3 must leave room for a timed-out write (raise revert_s or lower timeout_s)")
        if problems:
            raise GatewayError("; ".join(problems))


class ChargerPoller(SunSpecPoller):
    """One charger: discover 701/702/704/713, poll 701 + 713, write the 704 setpoint when asked.

    ``want_kw`` is set by the gateway thread (a float store: atomic under the GIL), then ``wake()``;
    the poller writes it on its own loop. ``latest`` holds the newest valid :class:`sm.Reading`.
    """

    kind = "charger"

    def __init__(self, node_id: str, host: str, port: int, *, settings: SunSpecSettings, device_id: int = 1):
        super().__init__(host, port, device_id=device_id, name=f"charger {node_id} ({host}:{port} unit {device_id})",
                         interval_s=settings.poll_s, timeout_s=settings.timeout_s,
                         backoff_max_s=settings.backoff_max_s)
        self.node_id = node_id
        self.settings = settings
        self.sf: sm.ScaleFactors | None = None
        self.ratings = sm.Ratings(None, None, None)
        self.want_kw = 0.0
        self.written_kw: float | None = None  # on this connection; None: write at once
        self.written_ns = 0
        self.invalid_ns = 0  # CLOCK_MONOTONIC of the newest refused poll
        self.setup_refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._first_701, self._count_701 = sm.span(701, sm.POLL_701)
        self._first_713, self._count_713 = sm.span(713, sm.POLL_713)

    # -------------------------------------------------------------------------- from the gateway thread
    def wake(self) -> None:
        """Write ``want_kw`` now (thread-safe; a no-op while not connected: the connect writes it)."""
        loop, ev = self._loop, self._wake
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass  # the loop is shutting down

    # -------------------------------------------------------------------------- SunSpecPoller hooks
    async def _setup(self) -> None:
        missing = [m for m in sm.REQUIRED_MODELS if m not in self.models]
        if missing:
            raise SunSpecError(f"{self.name}: models {missing} missing (found {sorted(self.models)}); a charger "
                               f"must present {list(sm.REQUIRED_MODELS)}")
        # Scale factors are static (the models' "static": "S"): read once per connection.
        raw = {}
        for mid, names in ((701, ("W_SF",)), (702, ("W_SF",)), (704, ("WSet_SF",)), (713, ("WH_SF", "Pct_SF"))):
            pts = model_points(mid)
            for n in names:
                p = pts[n]
                raw[(mid, n)] = decode_point(await self.read(self.models[mid] + p.offset, 1), p, -p.offset)
        first, count = sm.span(702, ("WMaxRtg", "WChaRteMaxRtg", "WDisChaRteMaxRtg"))
        regs_702 = await self.read(self.models[702] + first, count)
        try:
            self.sf = sm.check_scale_factors(w_701=raw[(701, "W_SF")], w_702=raw[(702, "W_SF")],
                                             wset=raw[(704, "WSet_SF")], wh=raw[(713, "WH_SF")],
                                             pct=raw[(713, "Pct_SF")])
            self.ratings = sm.decode_ratings(regs_702, first, self.sf.w_702)
        except sm.MappingError as exc:
            self.setup_refused += 1
            self.counters.invalid += 1
            raise SunSpecError(f"{self.name}: {exc}") from None
        self.written_kw = None  # a new connection (perhaps a rebooted charger): write again at once

    async def _poll(self) -> sm.Reading | None:
        regs_701 = await self.read(self.models[701] + self._first_701, self._count_701)
        regs_713 = await self.read(self.models[713] + self._first_713, self._count_713)
        try:
            return sm.decode_reading(regs_701, self._first_701, regs_713, self._first_713, self.sf) if self.sf else None
        except sm.MappingError as exc:
            self.counters.invalid += 1
            self.invalid_ns = time.monotonic_ns()
            self._error(f"refused: {exc}")
            self._warn(self.counters.last_error)
            return None

    # -------------------------------------------------------------------------- the loop of one connection
    async def _write_due(self, now_ns: int) -> bool:
        """Write ``want_kw`` if it differs from what this connection wrote, or the refresh is due. True if written."""
        want = self.want_kw
        refresh_ns = self.settings.revert_s * 1e9 / 3.0
        if want == self.written_kw and (want == 0.0 or now_ns - self.written_ns < refresh_ns):
            return False
        first, regs = sm.setpoint_registers(want, self.sf.wset, self.settings.revert_s)
        try:
            await self.write(self.models[704] + first, regs)
        except (asyncio.TimeoutError, OSError, ModbusException, SunSpecError) as exc:
            self.counters.write_failures += 1
            self.written_kw = None  # unknown what the charger holds now: write again
            self._error(f"setpoint write failed: {exc or type(exc).__name__}")
            raise
        self.counters.writes_ok += 1
        self.written_kw, self.written_ns = want, time.monotonic_ns()
        return True

    async def _poll_connected(self) -> bool:
        """The writer and the reader of this connection as two tasks, until the connection fails.

        The writer sends a setpoint as soon as it is handed over (and the refresh when due); the reader polls
        on its fixed grid. pymodbus sends one request at a time per client, in the order they are asked for,
        so a write waits for at most the one read in flight, never for a whole poll (two reads) as when one
        task did both. True if a request succeeded (the backoff starts over).
        """
        loop = asyncio.get_running_loop()
        self._loop, self._wake = loop, asyncio.Event()
        self._wake.set()  # the first write goes out at once on every connection
        self._failures, self._any_ok = 0, False
        tasks = {asyncio.ensure_future(self._write_loop()), asyncio.ensure_future(self._read_loop())}
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a bug in either is raised here (InputThread._guard logs it and restarts)
            return self._any_ok
        finally:
            self._wake = None
            pending = {t for t in tasks if not t.done()}
            while pending:  # cancel until done (asyncio.wait_for can swallow a cancellation before 3.12)
                for t in pending:
                    t.cancel()
                _done, pending = await asyncio.wait(pending, timeout=0.2)

    def _failed(self, exc: BaseException) -> bool:
        """Count a failed request; True when this connection is to be given up."""
        self._failures += 1
        if isinstance(exc, asyncio.TimeoutError):
            self.counters.timeouts += 1
            self._error(f"no answer within {self.timeout_s} s")
        else:
            client = self._client
            if not isinstance(exc, (OSError, ModbusException, SunSpecError)) and client is not None \
                    and client.connected:
                raise exc  # not SunSpecPoller's "connection closed" either: a bug
            self.counters.errors += 1
            self._error(str(exc) or type(exc).__name__)
            if client is None or not client.connected:
                return True
        return self._failures >= self.max_failures

    async def _write_loop(self) -> None:
        """Write when woken (a new setpoint), when the refresh is due, or a poll interval after a failed write."""
        loop = asyncio.get_running_loop()
        wake = self._wake
        refresh_s = self.settings.revert_s / 3.0
        retry_at = None
        # One refresh/retry timer, armed only when none would fire by the time due: a timer that fires early just
        # wakes a check that writes nothing. Creating and cancelling a uvloop timer on every wake (~6 us) was on
        # the path of a setpoint message's 100 writes, each one delaying every write after it.
        timer, timer_at = None, math.inf

        def fire() -> None:
            nonlocal timer, timer_at
            # Told by the timer itself: uvloop may run it a little before its time by loop.time() (millisecond
            # rounding), so "timer_at <= loop.time()" can miss that it fired and leave no timer: no refresh.
            timer, timer_at = None, math.inf
            wake.set()

        try:
            while True:
                if self.written_kw is None:
                    due = retry_at  # None: wait for a wake (at connect the event is already set)
                elif self.written_kw != 0.0:
                    due = loop.time() + max(refresh_s - (time.monotonic_ns() - self.written_ns) / 1e9, 0.0)
                else:
                    due = None  # 0 holds without a refresh (the reversion value is 0 too)
                if not wake.is_set():
                    if due is not None and timer_at > due:
                        if timer is not None:
                            timer.cancel()
                        timer, timer_at = loop.call_at(due, fire), due
                    await wake.wait()
                wake.clear()
                try:
                    if await self._write_due(time.monotonic_ns()):
                        self._failures, self._any_ok = 0, True
                    retry_at = None
                except Exception as exc:
                    if self._failed(exc):
                        return
                    retry_at = loop.time() + self.interval_s
        finally:
            if timer is not None:
                timer.cancel()

    async def _read_loop(self) -> None:
        """Poll 701 + 713 on a fixed grid (overruns skip slots, never bunch up); after a failure, one interval on."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while True:
            delay = next_poll - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                reading = await self._poll()
            except Exception as exc:
                if self._failed(exc):
                    return
                next_poll = loop.time() + self.interval_s
                continue
            if reading is not None:
                self.counters.reads_ok += 1
                self.latest.publish(reading, time.monotonic_ns())
            self._failures, self._any_ok = 0, True
            next_poll += self.interval_s
            now = loop.time()
            if next_poll < now:
                next_poll += math.ceil((now - next_poll) / self.interval_s) * self.interval_s


def _wake_all(pollers: list[ChargerPoller]) -> None:
    """On the input loop: wake each poller's writer (one call for a whole setpoint message, not one per device)."""
    for p in pollers:
        if p._wake is not None:
            p._wake.set()


class SunSpecChargers:
    """The roster nodes of one gateway, each a SunSpec charger on Modbus TCP (a GatewayCore driver).

    ``start()`` runs the pollers on their asyncio thread; ``close()`` writes the last setpoints (0 kW
    after GatewayCore.close) within ``flush_s`` and stops the thread.
    """

    def __init__(self, fleet, devices: dict[str, sm.DeviceAddress], settings: SunSpecSettings, *, gateway_id: str,
                 events: EventLog | None = None):
        settings.check()
        self.settings = settings
        self.gateway_id = gateway_id
        self.events = events or EventLog()
        n = fleet.n_rows
        self.node_ids: list[str] = list(fleet.node_ids[:n])
        missing = [nid for nid in self.node_ids if nid not in devices]
        if missing:
            raise GatewayError(f"gateway {gateway_id!r}: {len(missing)} roster node(s) have no row in the devices "
                               f"file (e.g. {missing[0]!r}); add node_id,host,port,unit_id for each")
        extra = sorted(set(devices) - set(self.node_ids))
        if extra:
            log.warning("SUNSPEC_DEVICE_NOT_IN_ROSTER gateway=%s devices=%d e.g.=%s msg=%s", gateway_id, len(extra),
                        extra[0], "devices-file rows without a roster row under this gateway are not polled")
        self.n = n
        self.roster_dis_kw = np.array(fleet.p_dis_max_kw[:n], dtype=float)
        self.roster_chg_kw = np.array(fleet.p_chg_max_kw[:n], dtype=float)
        self.roster_soc = np.array(fleet.soc[:n], dtype=float)
        self.pollers = [ChargerPoller(nid, devices[nid].host, devices[nid].port, device_id=devices[nid].unit_id,
                                      settings=settings) for nid in self.node_ids]
        self.dis_kw = self.roster_dis_kw.copy()  # limits in force: roster capped by the 702 ratings
        self.chg_kw = self.roster_chg_kw.copy()
        self.handed_kw = np.full(n, np.nan)  # what each poller was last woken for
        self.inputs = InputThread(self.pollers, name=f"sunspec-{gateway_id}", use_uvloop=settings.use_uvloop)
        self._started = False
        self._was_connected = np.zeros(n, dtype=bool)
        self._announced = np.zeros(n, dtype=np.uint8)

    # ------------------------------------------------------------------------------ Vehicles (gateway thread)
    def apply(self, p_kw: np.ndarray, now_ns: int) -> None:
        """Hand the setpoints in force (kW, + discharge) to the pollers: those that moved past the deadband,
        or became exactly 0, are woken to write at once; the others go out with the next refresh."""
        target = np.clip(p_kw, -self.chg_kw, self.dis_kw)
        target = np.where(target == 0.0, 0.0, target)  # no -0.0
        handed = self.handed_kw
        due = np.isnan(handed) | (np.abs(target - handed) > self.settings.deadband_kw) | (
            (target == 0.0) & (handed != 0.0))
        for i, poller in enumerate(self.pollers):
            poller.want_kw = float(target[i])
        rows = np.flatnonzero(due).tolist()
        if rows:
            handed[rows] = target[rows]
            self.inputs.call_soon_threadsafe(_wake_all, [self.pollers[i] for i in rows])

    def telemetry(self, now_ns: int) -> dict[str, np.ndarray]:
        """Per node: the newest valid reading, online/fault from sunspec_mapping.node_online_fault."""
        n = self.n
        soc, p_kw = self.roster_soc.copy(), np.zeros(n)
        soh = np.full(n, np.nan)
        online, fault = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        stale_ns = round(self.settings.stale_s * 1e9)
        for i, poller in enumerate(self.pollers):
            reading, t_ns = poller.latest.read()
            fresh = t_ns is not None and now_ns - t_ns <= stale_ns
            invalid = poller.invalid_ns > (t_ns or 0)
            online[i], fault[i] = sm.node_online_fault(connected=poller.connected, fresh=fresh, invalid=invalid,
                                                       reading=reading)
            self.dis_kw[i], self.chg_kw[i] = poller.ratings.limits(self.roster_dis_kw[i], self.roster_chg_kw[i])
            if reading is not None:
                if reading.soc is not None:
                    soc[i] = self.roster_soc[i] = reading.soc
                if reading.soh is not None:
                    soh[i] = reading.soh
                if reading.wh_avail_kwh == 0.0:
                    self.dis_kw[i] = 0.0  # nothing left to give, whatever the SoC says
                p_kw[i] = reading.p_kw if online[i] else 0.0
            # Connected but not read yet is TIMEOUT_BMS_RESPONSE for a moment at every connect: not an event.
            self._announce(i, poller, int(fault[i]) if reading is not None or fault[i] != Reason.TIMEOUT_BMS_RESPONSE
                           else int(self._announced[i]))
        out = {"soc": soc, "p_kw": p_kw, "online": online, "fault": fault, "p_dis_max_kw": self.dis_kw.copy(),
               "p_chg_max_kw": self.chg_kw.copy()}
        if not np.isnan(soh).any():  # a slow key goes out only for batches where every node has it
            out["soh"] = soh
        return out

    def _announce(self, i: int, poller: ChargerPoller, fault: int) -> None:
        if poller.connected != self._was_connected[i]:
            self._was_connected[i] = poller.connected
            self.events.emit("SUNSPEC_DEVICE_CONNECTED" if poller.connected else "SUNSPEC_DEVICE_LOST",
                             logging.INFO if poller.connected else logging.WARNING, key=poller.node_id,
                             gateway=self.gateway_id, node=poller.node_id, device=f"{poller.host}:{poller.port}",
                             unit=poller.device_id, msg=poller.counters.last_error[:200] or "-")
        if fault != self._announced[i]:
            self._announced[i] = fault
            if fault in (Reason.INVALID_TELEMETRY, Reason.TIMEOUT_BMS_RESPONSE, Reason.NODE_UNREACHABLE):
                self.events.emit(Reason(fault).name, logging.WARNING, key=poller.node_id, gateway=self.gateway_id,
                                 node=poller.node_id, msg=poller.counters.last_error[:200] or "-")

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> SunSpecChargers:
        try:
            self.inputs.start()
            self._started = True
        except RuntimeError as exc:
            raise GatewayError(f"gateway {self.gateway_id!r}: the Modbus thread did not start: {exc}") from None
        return self

    def close(self, flush_s: float = 2.0) -> None:
        """Let every connected charger take its last setpoint (bounded by ``flush_s``), then stop."""
        if not self._started:
            return
        self._started = False
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline:
            pending = [p for p in self.pollers if p.connected and p.written_kw != p.want_kw]
            if not pending:
                break
            for p in pending:
                p.wake()
            time.sleep(0.01)
        self.inputs.stop()

    def counters(self) -> dict[str, int]:
        """Sums over the devices, for the stop line and tests."""
        keys = ("reads_ok", "timeouts", "errors", "invalid", "connects", "connect_failures", "reconnects",
                "writes_ok", "write_failures")
        out = {f"modbus_{k}": sum(getattr(p.counters, k) for p in self.pollers) for k in keys}
        out["devices_connected"] = sum(p.connected for p in self.pollers)
        return out


__all__ = ["ChargerPoller", "SunSpecChargers", "SunSpecSettings"]
