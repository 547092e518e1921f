"""The engine.log controllers of v2grt.monitor on small fleets: per-node transitions (bounded, counted,
rate-limited) and the grid frequency alert with its throttling."""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest

from v2grt.codes import Reason
from v2grt.dispatch import Dispatcher
from v2grt.events import EventLog
from v2grt.monitor import FrequencyAlert, NodeMonitor
from v2grt.profile import DispatchProfile
from v2grt.testing import LogLines, uniform_fleet


@pytest.fixture
def events():
    logger = logging.getLogger("test.monitor")
    logger.propagate = False
    handler = LogLines()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    ev = EventLog(interval_s=60.0, logger=logger)
    ev.lines = handler.lines
    return ev


def test_each_node_code_logged_once_with_its_node(events):
    """A node entering a section 8 code is logged with that exact code and node; staying in it is silent."""
    fleet = uniform_fleet(6)
    mon = NodeMonitor(events)
    profile = DispatchProfile()
    reasons = np.zeros(6, np.uint8)
    assert mon.check(fleet, reasons, profile) == 0
    codes = [Reason.TIMEOUT_BMS_RESPONSE, Reason.THERMAL_LIMIT, Reason.NODE_UNREACHABLE, Reason.NODE_LOW_THROUGHPUT,
             Reason.SOH_BELOW_THRESHOLD]
    reasons[:5] = codes
    assert mon.check(fleet, reasons, profile) == 5
    for i, code in enumerate(codes):
        assert any(ln.startswith(f"{code.name} node={fleet.node_ids[i]} ") for ln in events.lines), code.name
    assert any("Thermal limit reached on Node EV_NODE_02" in ln for ln in events.lines)
    n = len(events.lines)
    assert mon.check(fleet, reasons, profile) == 0 and len(events.lines) == n
    assert all(events.counts[c.name] == 1 for c in codes)


def test_lines_per_pass_are_bounded_with_a_summary(events):
    """A whole gateway timing out gives max_lines lines and one NODE_EVENTS summary, and counts every node."""
    fleet = uniform_fleet(50)
    mon = NodeMonitor(events, max_lines=5)
    mon.check(fleet, np.full(50, Reason.TIMEOUT_BMS_RESPONSE, np.uint8), DispatchProfile())
    per_node = [ln for ln in events.lines if ln.startswith("TIMEOUT_BMS_RESPONSE ")]
    summary = [ln for ln in events.lines if ln.startswith("NODE_EVENTS ")]
    assert len(per_node) == 5 and len(summary) == 1
    assert "nodes=50" in summary[0] and "TIMEOUT_BMS_RESPONSE=50" in summary[0]
    assert events.counts["TIMEOUT_BMS_RESPONSE"] == 50


def test_flapping_node_is_rate_limited_but_counted(events):
    """A node flapping in and out of a code logs one line per interval, and every entry is counted."""
    fleet = uniform_fleet(2)
    mon = NodeMonitor(events)
    r = np.zeros(2, np.uint8)
    for _ in range(4):
        r[0] = Reason.NODE_UNREACHABLE
        mon.check(fleet, r, DispatchProfile())
        r[0] = Reason.OK
        mon.check(fleet, r, DispatchProfile())
    assert len([ln for ln in events.lines if ln.startswith("NODE_UNREACHABLE")]) == 1
    assert events.counts["NODE_UNREACHABLE"] == 4


def test_site_fault_is_summarised_not_logged_per_node(events):
    """Nodes excluded by their site's inverter are counted in the summary; the site line is the aggregator's."""
    fleet = uniform_fleet(8)
    mon = NodeMonitor(events)
    mon.check(fleet, np.full(8, Reason.E_INVERTER_PHASE_MISMATCH, np.uint8), DispatchProfile())
    assert not any(ln.startswith("E_INVERTER_PHASE_MISMATCH") for ln in events.lines)
    assert any("E_INVERTER_PHASE_MISMATCH=8" in ln for ln in events.lines if ln.startswith("NODE_EVENTS"))
    assert events.counts["E_INVERTER_PHASE_MISMATCH"] == 0


def test_derating_near_the_temperature_edge_is_a_thermal_limit(events):
    """A node still available but inside temp_derate_c of the hot edge logs THERMAL_LIMIT action=derated."""
    fleet = uniform_fleet(3)
    fleet.temp_c[:3] = [20.0, 45.0, 20.0]  # window -20..50 with 10 degC derating: 45 is derated
    NodeMonitor(events).check(fleet, np.zeros(3, np.uint8), DispatchProfile())
    assert [ln for ln in events.lines if ln.startswith("THERMAL_LIMIT")] == [
        ln for ln in events.lines if "node=EV_NODE_02" in ln and "action=derated" in ln]
    assert events.counts["THERMAL_LIMIT"] == 1


def test_estop_cycles_are_skipped(events):
    """During an e-stop every node reads EMERGENCY_STOP: no pass runs, so after the reset a node still in its
    pre-stop code brings no new line, and one that entered a code during the stop is logged once."""
    fleet = uniform_fleet(4)
    mon = NodeMonitor(events, interval_s=0.0)
    agg = types.SimpleNamespace(fleet=fleet, dispatcher=types.SimpleNamespace(profile=DispatchProfile()))
    before = np.array([Reason.OK, Reason.THERMAL_LIMIT, Reason.OK, Reason.OK], np.uint8)
    mon(agg, types.SimpleNamespace(estop=False, reasons=before), None)
    assert mon.passes == 1 and events.counts["THERMAL_LIMIT"] == 1
    stopped = types.SimpleNamespace(estop=True, reasons=np.full(4, Reason.EMERGENCY_STOP, np.uint8))
    for _ in range(3):
        mon(agg, stopped, None)
    assert mon.passes == 1
    n_lines = len(events.lines)
    after = np.array([Reason.OK, Reason.THERMAL_LIMIT, Reason.NODE_UNREACHABLE, Reason.OK], np.uint8)
    mon(agg, types.SimpleNamespace(estop=False, reasons=after), None)  # reset
    assert mon.passes == 2
    new = events.lines[n_lines:]
    assert [ln.split()[0] for ln in new] == ["NODE_UNREACHABLE"] and "node=EV_NODE_03" in new[0], new
    assert events.counts["THERMAL_LIMIT"] == 1 and events.counts["NODE_UNREACHABLE"] == 1


def alert_for(events, **cfg):
    fleet = uniform_fleet(10)
    d = Dispatcher(fleet, DispatchProfile(fleet_ramp_kw_per_s=10.0))
    c = types.SimpleNamespace(band_hz=0.2, hysteresis_hz=0.02, response_limit=1.0, fleet_ramp_kw_per_s=None)
    vars(c).update(cfg)
    return FrequencyAlert(c, 50.0, events, d), d


def test_alert_throttles_the_response_while_outside_the_band(events):
    """Outside 50 +- 0.2 Hz the response is capped at response_limit both ways; inside it is untouched."""
    alert, _ = alert_for(events, response_limit=0.6)
    assert alert.apply(50.1, 0.3, 0) == 0.3 and not alert.active
    assert alert.apply(49.7, 1.0, 1) == 0.6 and alert.active
    assert alert.apply(49.75, -1.0, 2) == -0.6
    line = next(ln for ln in events.lines if ln.startswith("GRID_FREQUENCY_ALERT"))
    assert "f_hz=49.7 " in line and "response=1 applied=0.6 response_limit=0.6" in line and "49.8..50.2" in line
    assert events.counts["GRID_FREQUENCY_ALERT"] == 1


def test_alert_clears_with_hysteresis(events):
    """The alert stays on just inside the band edge and clears only inside band - hysteresis."""
    alert, _ = alert_for(events)
    alert.apply(50.3, -1.0, 0)
    alert.apply(50.19, -1.0, int(1e9))  # inside the band but within the hysteresis
    assert alert.active
    alert.apply(50.17, -0.9, int(3e9))
    assert not alert.active
    line = next(ln for ln in events.lines if ln.startswith("GRID_FREQUENCY_NORMAL"))
    assert "duration_s=3" in line and "f_extreme_hz=50.3" in line


def test_alert_lifts_the_fleet_ramp_and_survives_a_reload(events):
    """A faster alert ramp replaces the profile's during the alert, also after a reload, and is undone after."""
    alert, d = alert_for(events, fleet_ramp_kw_per_s=500.0)
    alert.apply(49.5, 1.0, 0)
    assert d.profile.fleet_ramp_kw_per_s == 500.0
    d.set_profile(DispatchProfile(fleet_ramp_kw_per_s=20.0, minimum_soc=0.3))  # a reload lands mid-alert
    alert.apply(49.5, 1.0, 1)
    assert d.profile.fleet_ramp_kw_per_s == 500.0 and d.profile.minimum_soc == 0.3
    alert.apply(50.0, 0.0, 2)
    assert d.profile.fleet_ramp_kw_per_s == 20.0 and d.profile.minimum_soc == 0.3


def test_alert_never_slows_a_faster_profile_ramp(events):
    """An alert ramp slower than the profile's leaves the profile's in force."""
    alert, d = alert_for(events, fleet_ramp_kw_per_s=5.0)
    alert.apply(49.5, 1.0, 0)
    assert d.profile.fleet_ramp_kw_per_s == 10.0
    alert.apply(50.0, 0.0, 1)
    assert d.profile.fleet_ramp_kw_per_s == 10.0 and not math.isnan(alert.state()["band_hz"][0])


def test_mass_exclusion_is_counted_in_full_and_logged_within_the_bound(events):
    """20,000 nodes going stale at once are all counted, with at most max_lines node lines and a summary."""
    n = 20_000
    fleet = uniform_fleet(n)
    mon = NodeMonitor(events, max_lines=25)
    profile = DispatchProfile()
    reasons = np.zeros(n, np.uint8)
    mon.check(fleet, reasons, profile)
    reasons[:] = Reason.TIMEOUT_BMS_RESPONSE
    reasons[:100] = Reason.SOH_BELOW_THRESHOLD
    assert mon.check(fleet, reasons, profile) == n
    assert events.counts["TIMEOUT_BMS_RESPONSE"] == n - 100 and events.counts["SOH_BELOW_THRESHOLD"] == 100
    node_lines = [ln for ln in events.lines if ln.startswith(("TIMEOUT_BMS_RESPONSE", "SOH_BELOW_THRESHOLD"))]
    assert len(node_lines) == 25
    assert any(ln.startswith("NODE_EVENTS") and "TIMEOUT_BMS_RESPONSE=19900" in ln for ln in events.lines)


def test_vehicles_never_heard_are_not_logged_as_timeouts_until_heard(events):
    """Vehicles waiting for their first telemetry are not TIMEOUT_BMS_RESPONSE lines (the aggregator says
    AWAITING_TELEMETRY once); one that was heard and then falls silent is logged with its node."""
    fleet = uniform_fleet(3)
    fleet.mark_never_heard()
    mon = NodeMonitor(events)
    waiting = np.full(3, Reason.TIMEOUT_BMS_RESPONSE, np.uint8)
    assert mon.check(fleet, waiting, DispatchProfile()) == 0
    assert events.lines == [] and events.counts["TIMEOUT_BMS_RESPONSE"] == 0
    fleet.last_telemetry_ns[1] = 10**9  # EV_NODE_02 reported, then fell silent
    mon.check(fleet, np.array([Reason.TIMEOUT_BMS_RESPONSE, Reason.OK, Reason.OK], np.uint8), DispatchProfile())
    assert mon.check(fleet, waiting, DispatchProfile()) == 1
    assert len(events.lines) == 1 and events.lines[0].startswith("TIMEOUT_BMS_RESPONSE node=EV_NODE_02 ")


@pytest.mark.parametrize("f_hz", [49.8, 50.2])
def test_alert_band_edge_is_not_an_alert(events, f_hz):
    """"More than band_hz": exactly 49.80 or 50.20 Hz with band 0.2 does not fire; a millihertz further does."""
    alert, _ = alert_for(events)
    assert alert.apply(f_hz, 0.25, 0) == 0.25 and not alert.active
    assert events.counts["GRID_FREQUENCY_ALERT"] == 0
    alert.apply(f_hz + (0.001 if f_hz > 50 else -0.001), 0.25, 1)
    assert alert.active and events.counts["GRID_FREQUENCY_ALERT"] == 1


@pytest.mark.parametrize(("fraction", "limit", "says", "not_says"), [
    (0.25, 1.0, ["response +0.25 of capacity, below the curve's limit", "no response limit configured",
                 "saturated=no throttled=no"], ["saturated at"]),
    (0.25, 0.5, ["below the curve's limit", "not throttled: within response_limit 0.5", "throttled=no"],
     ["throttled to"]),
    (1.0, 0.6, ["response +1 of capacity, saturated at the curve's limit", "throttled to +0.6 (response_limit 0.6)",
                "saturated=yes throttled=yes"], ["below the curve"]),
])
def test_alert_line_says_what_the_response_was(events, fraction, limit, says, not_says):
    """The alert line gives the actual response, whether it was saturated and whether it was throttled."""
    alert, _ = alert_for(events, response_limit=limit)
    alert.apply(49.75, fraction, 0)
    line = next(ln for ln in events.lines if ln.startswith("GRID_FREQUENCY_ALERT"))
    assert "frequency 49.750 Hz is more than 0.2 Hz from 50 Hz" in line
    assert all(s in line for s in says), line
    assert not any(s in line for s in not_says), line
