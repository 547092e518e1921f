"""v2grt.prequal.report: the terminal table names the rig's faults next to the verdicts."""

from __future__ import annotations

from v2grt.prequal import report


def summary(meter_age_max_ms: float) -> dict:
    check = {"name": "ffr_release", "criterion": "deactivation <= 20% of capacity per s", "limit": 0.23,
             "measured": 0.269, "unit": "of capacity per s", "passed": False}
    return {"service": "ffr_49.7", "vehicles": 1000, "gateways": 4, "capacity_kw": 10049.5, "quick": False,
            "rig": {"aggregator_cycles": 1114, "aggregator_missed_deadlines": 0, "gateway_setpoint_expiries": 0},
            "passed": False, "tests": [{"name": "ffr_49.7_trigger", "frequency_stale_cycles": 0,
                                        "meter_age_max_ms": meter_age_max_ms, "passed": False, "checks": [check]}]}


def test_a_rig_stall_is_named_next_to_the_verdict():
    """A test whose cycles used a 479 ms old meter reading is listed as a rig stall; one at 8 ms is not."""
    stalled = report.render_table(summary(479.5))
    assert "rig stall" in stalled and "ffr_49.7_trigger 480 ms" in stalled and "FAIL: 1 of 1 tests" in stalled
    assert "rig stall" not in report.render_table(summary(8.0))
