"""engine.log from the cycle: per-node exclusions as they happen, and the grid frequency alert.

Two small controllers that ride on the control thread:

- NodeMonitor, a cycle hook: at most once per `interval_s` it compares this cycle's reasons array with
  the one it saw last (one vectorised compare, ~0.5 ms at a million nodes) and logs every node that
  entered one of the field manual's exclusion codes, with that exact code: at most `max_lines` lines per
  pass, the rest counted in one NODE_EVENTS summary line. Repeats per (code, node) are rate-limited by
  the EventLog; every transition is counted, so the status and the metrics see all of them.
- FrequencyAlert, called from the aggregator's service-fraction phase: GRID_FREQUENCY_ALERT when the
  frequency leaves the alert band, the configured throttling applied while it lasts, and
  GRID_FREQUENCY_NORMAL when it comes back inside the band (less a hysteresis, so it does not flap).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from v2grt.codes import Reason
from v2grt.events import EventLog
from v2grt.fleet import NEVER_HEARD_NS

#: Node codes of DESIGN.md section 8 that the monitor logs one line per node for.
NODE_CODES = (Reason.TIMEOUT_BMS_RESPONSE, Reason.THERMAL_LIMIT, Reason.NODE_UNREACHABLE,
              Reason.NODE_LOW_THROUGHPUT, Reason.SOH_BELOW_THRESHOLD)
#: Site-wide code: the aggregator logs it once per site when the inverter reports it (not per node);
#: the monitor only counts the nodes it excluded, in the summary line.
SITE_CODES = (Reason.E_INVERTER_PHASE_MISMATCH,)

_WHAT = {
    Reason.TIMEOUT_BMS_RESPONSE: "telemetry older than the profile's stale_after_s: node excluded",
    Reason.THERMAL_LIMIT: "outside the temperature window or the BMS reports a thermal limit: node excluded",
    Reason.NODE_UNREACHABLE: "gateway or charger rejects discharge: node excluded",
    Reason.NODE_LOW_THROUGHPUT: "node link under 10 kbit/s: node dropped from the active pool",
    Reason.SOH_BELOW_THRESHOLD: "battery health below the profile's soh_threshold: node excluded",
}


class NodeMonitor:
    """Cycle hook: log per-node transitions into the section 8 codes, cheaply and boundedly.

    Parameters
    ----------
    events : EventLog
        Where lines go and where every transition is counted (the status's ``events``).
    interval_s : float
        Seconds between passes; the cycles in between cost one clock read.
    max_lines : int
        Per-node lines per pass; the rest are counted and summarised in one NODE_EVENTS line.
    """

    def __init__(self, events: EventLog, *, interval_s: float = 1.0, max_lines: int = 20):
        self.events = events
        self.interval_ns = int(interval_s * 1e9)
        self.max_lines = max_lines
        self._next_ns = 0
        self._prev: np.ndarray = np.zeros(0, np.uint8)
        self._prev_derated: np.ndarray = np.zeros(0, bool)
        self._logged = np.zeros(256, bool)
        self._logged[list(NODE_CODES)] = True
        self._watched = self._logged.copy()
        self._watched[list(SITE_CODES)] = True
        self.passes = 0

    def __call__(self, agg, result, times) -> None:
        now = time.monotonic_ns()
        if now < self._next_ns:
            return
        self._next_ns = now + self.interval_ns
        if result.estop:
            return  # every node reads EMERGENCY_STOP: compare again against the pre-stop picture after reset
        self.check(agg.fleet, result.reasons, agg.dispatcher.profile)

    def check(self, fleet, reasons: np.ndarray, profile) -> int:
        """One pass over the reasons (uint8, one per fleet row); returns the number of node events."""
        self.passes += 1
        n = len(reasons)
        prev = self._prev
        if len(prev) != n:  # first pass or the fleet grew: new rows compare against OK
            grown = np.zeros(n, np.uint8)
            m = min(n, len(prev))
            grown[:m] = prev[:m]
            prev = grown
            d = np.zeros(n, bool)
            d[:m] = self._prev_derated[:m]
            self._prev_derated = d
        changed = np.flatnonzero(reasons != prev)
        new = reasons[changed]
        entered = changed[self._watched[new]]
        # A vehicle not heard from since start is waiting, not failing: the aggregator announces those
        # once (AWAITING_TELEMETRY, never_heard in the status), not one TIMEOUT line per vehicle, which
        # would also rate-limit away the line for the real timeout when one goes silent later.
        waiting = ((reasons[entered] == Reason.TIMEOUT_BMS_RESPONSE)
                   & (fleet.last_telemetry_ns[entered] == NEVER_HEARD_NS))
        entered = entered[~waiting]
        # THERMAL_LIMIT also when the node stays available but is derated inside temp_derate_c of an edge
        temp = fleet.temp_c[:n]
        derated = (reasons == Reason.OK) & ((temp < profile.temp_min_c + profile.temp_derate_c)
                                            | (temp > profile.temp_max_c - profile.temp_derate_c))
        newly_derated = np.flatnonzero(derated & ~self._prev_derated)
        self._prev = reasons.copy()
        self._prev_derated = derated
        total = len(entered) + len(newly_derated)
        if not total:
            return 0

        # Counted in bulk, logged for at most max_lines rows: a gateway dying can take 50,000 nodes out in
        # one pass, and a Python loop over all of them would cost the cycle its deadline.
        entered_codes = reasons[entered]
        by_code = {Reason(int(c)).name: int(k) for c, k in zip(*np.unique(entered_codes, return_counts=True))}
        if len(newly_derated):
            by_code["THERMAL_LIMIT"] = by_code.get("THERMAL_LIMIT", 0) + len(newly_derated)
        loggable = entered[self._logged[entered_codes]]  # site-wide codes: logged once per site by the aggregator
        lines = 0
        for row in loggable[: self.max_lines]:
            lines += 1
            self._emit_node(fleet, row, Reason(int(reasons[row])), temp)
        for row in newly_derated[: max(0, self.max_lines - lines)]:
            lines += 1
            node = fleet.node_ids[row]
            self.events.emit("THERMAL_LIMIT", logging.WARNING, key=node, node=node,
                             site=fleet.site_ids[fleet.site[row]], temp_c=float(temp[row]), action="derated",
                             message=f"Thermal limit reached on Node {node}: power derated near the "
                                     "temperature window's edge")
        skipped = loggable[self.max_lines:]
        for c, k in zip(*np.unique(reasons[skipped], return_counts=True)):
            self.events.count(Reason(int(c)).name, int(k))
        self.events.count("THERMAL_LIMIT", max(0, len(newly_derated) - max(0, self.max_lines - min(len(loggable),
                                                                                               self.max_lines))))
        if lines < total:
            self.events.emit("NODE_EVENTS", logging.WARNING, key="summary", nodes=total, logged=lines,
                             **{k: v for k, v in sorted(by_code.items())},
                             message="node exclusions this pass, by code (per-node lines are bounded per pass; "
                                     "site-wide exclusions are logged once per site); v2g-cli --status shows all")
        return total

    def _emit_node(self, fleet, row: int, code: Reason, temp: np.ndarray) -> None:
        node = fleet.node_ids[row]
        fields = {"node": node, "gateway": fleet.gateway_ids[fleet.gateway[row]],
                  "site": fleet.site_ids[fleet.site[row]]}
        if code == Reason.THERMAL_LIMIT:
            fields["temp_c"] = float(temp[row])
            message = f"Thermal limit reached on Node {node}: node excluded"
        elif code == Reason.SOH_BELOW_THRESHOLD:
            fields["soh"] = float(fleet.soh[row])
            message = _WHAT[code]
        elif code == Reason.TIMEOUT_BMS_RESPONSE:
            last = int(fleet.last_telemetry_ns[row])
            fields["age_s"] = (time.monotonic_ns() - last) / 1e9 if last > 0 else math.inf
            message = _WHAT[code]
        else:
            message = _WHAT[code]
        self.events.emit(code.name, logging.WARNING, key=node, message=message, **fields)


#: Frequencies closer than this are equal: 49.80 - 50.0 is -0.20000000000000284 in binary floating point,
#: and "more than 0.2 Hz" must not fire at exactly 49.80 Hz. A millionth of a Hz is far below any grid
#: meter's resolution (1 mHz at best) and far above the float error (~1e-14 Hz).
F_TOLERANCE_HZ = 1e-6


class FrequencyAlert:
    """GRID_FREQUENCY_ALERT outside `nominal_hz +- band_hz`, and the throttling configured for it.

    The service curves already saturate at +-1 of the contracted capacity; in alert the response is
    further capped at `response_limit` (1 = no cap) and the fleet ramp may be lifted to
    `fleet_ramp_kw_per_s` so the fleet follows a fast excursion. Runs on the control thread.
    """

    def __init__(self, cfg, nominal_hz: float, events: EventLog, dispatcher):
        self.band_hz = float(cfg.band_hz)
        self.hysteresis_hz = float(cfg.hysteresis_hz)
        self.response_limit = float(cfg.response_limit)
        self.fleet_ramp_kw_per_s = cfg.fleet_ramp_kw_per_s
        self.nominal_hz = float(nominal_hz)
        self.events = events
        self.dispatcher = dispatcher
        self.active = False
        self.alerts = 0
        self._since_ns = 0
        self._f_extreme = 0.0
        self._base_ramp: float | None = None

    def apply(self, f_hz: float, fraction: float, now_ns: int) -> float:
        """The response to deliver for `fraction` at `f_hz` (throttled while in alert)."""
        dev = abs(f_hz - self.nominal_hz)
        if not self.active:
            if dev - self.band_hz > F_TOLERANCE_HZ:  # more than band_hz: exactly 49.80 at 0.2 does not fire
                self._enter(f_hz, fraction, now_ns)
        elif dev - (self.band_hz - self.hysteresis_hz) <= F_TOLERANCE_HZ:
            self._leave(f_hz, now_ns)
        else:
            if dev > abs(self._f_extreme - self.nominal_hz):
                self._f_extreme = f_hz
            if self.fleet_ramp_kw_per_s is not None and \
                    self.dispatcher.profile.fleet_ramp_kw_per_s != self._alert_ramp():
                self._base_ramp = self.dispatcher.profile.fleet_ramp_kw_per_s  # a reload landed mid-alert
                self._set_ramp(self._alert_ramp())
        if self.active and self.response_limit < 1.0:
            lim = self.response_limit
            return lim if fraction > lim else (-lim if fraction < -lim else fraction)
        return fraction

    def _alert_ramp(self) -> float:
        base = self._base_ramp if self._base_ramp is not None else 0.0
        return max(float(self.fleet_ramp_kw_per_s), base)  # only ever faster than the profile's

    def _set_ramp(self, ramp: float) -> None:
        self.dispatcher.set_profile(self.dispatcher.profile.replace(fleet_ramp_kw_per_s=ramp))

    def _enter(self, f_hz: float, fraction: float, now_ns: int) -> None:
        self.active = True
        self.alerts += 1
        self._since_ns = now_ns
        self._f_extreme = f_hz
        lim = self.response_limit
        applied = max(-lim, min(lim, fraction))
        saturated = abs(fraction) >= 1.0 - 1e-9  # the curves saturate at +-1 of the contracted capacity
        throttled = applied != fraction
        what = [f"frequency {f_hz:.3f} Hz is more than {self.band_hz:g} Hz from {self.nominal_hz:g} Hz",
                f"response {fraction:+.3g} of capacity, "
                + ("saturated at the curve's limit" if saturated else "below the curve's limit of 1")]
        if throttled:
            what.append(f"throttled to {applied:+.3g} (response_limit {lim:g})")
        elif lim < 1.0:
            what.append(f"not throttled: within response_limit {lim:g}")
        else:
            what.append("no response limit configured")
        if self.fleet_ramp_kw_per_s is not None:
            self._base_ramp = self.dispatcher.profile.fleet_ramp_kw_per_s
            self._set_ramp(self._alert_ramp())
            what.append(f"fleet ramp {self._alert_ramp():g} kW/s (profile {self._base_ramp:g})")
        lo, hi = self.nominal_hz - self.band_hz, self.nominal_hz + self.band_hz
        self.events.emit("GRID_FREQUENCY_ALERT", logging.WARNING, key="frequency", f_hz=f_hz,
                         band_hz=f"{lo:g}..{hi:g}", response=fraction, applied=applied, response_limit=lim,
                         fleet_ramp_kw_per_s=self._alert_ramp() if self.fleet_ramp_kw_per_s is not None else "profile",
                         saturated="yes" if saturated else "no", throttled="yes" if throttled else "no",
                         message="; ".join(what))

    def _leave(self, f_hz: float, now_ns: int) -> None:
        self.active = False
        if self.fleet_ramp_kw_per_s is not None and self._base_ramp is not None \
                and self.dispatcher.profile.fleet_ramp_kw_per_s == self._alert_ramp():  # else a reload set it
            self._set_ramp(self._base_ramp)
        self.events.emit("GRID_FREQUENCY_NORMAL", logging.INFO, key="frequency", f_hz=f_hz,
                         duration_s=(now_ns - self._since_ns) / 1e9, f_extreme_hz=self._f_extreme)

    def state(self) -> dict:
        """For the status: whether an alert is on, since when, the band and the throttling."""
        return {"active": self.active, "alerts": self.alerts,
                "since_s": (time.monotonic_ns() - self._since_ns) / 1e9 if self.active else None,
                "band_hz": [self.nominal_hz - self.band_hz, self.nominal_hz + self.band_hz],
                "response_limit": self.response_limit, "fleet_ramp_kw_per_s": self.fleet_ramp_kw_per_s}
