"""The OCPP gateway's LocalFrequency mode: the pure mapping (curve scaling, signs, baselines) against the
schemas shipped in `ocpp`, and on loopback with real websockets, the real `ocpp` ChargePoint classes on
both ends, a real SunSpec meter and a real aggregator: stations answer a frequency step on their own,
and a 2.0.1-only station or one that rejects LocalFrequency falls back to CentralSetpoint."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import zmq
from _ocpp import GW, make_site
from ocpp.charge_point import camel_to_snake_case
from ocpp.messages import get_validator

from v2grt.gateway import ocpp_mapping as m
from v2grt.gateway.core import GatewayCore, GatewayError
from v2grt.gateway.ocpp import OcppSettings
from v2grt.gateway.ocpp_local import HELD_CENTRAL, HELD_LOCAL, LocalFrequencySettings, LocalFrequencyVehicles
from v2grt.services import get_service
from v2grt.sim import ocpp_local as sl
from v2grt.sim.battery import SimFleetState
from v2grt.sim.ocpp_stations import SimStations, specs_from_fleet
from v2grt.testing import wait_until

DC = get_service("dc")  # GB Dynamic Containment: full discharge at 49.5 Hz, full charge at 50.5 Hz


def valid(action: str, payload: dict, version: str = "2.1") -> dict:
    """Validate a request payload against the schema of `version` shipped with `ocpp`; return it."""
    get_validator(2, action, version).validate(payload)
    return payload


# ------------------------------------------------------------------------------- the pure mapping
def test_the_curve_is_the_service_scaled_to_the_evse_with_the_ocpp_sign():
    """v2xFreqWattCurve is the service curve times the EVSE's share in W, negative (discharging) below nominal."""
    curve = m.freq_watt_curve(DC.f_hz, DC.fraction, 8.8)
    assert [p["frequency"] for p in curve] == DC.f_hz.tolist()
    assert m.freq_watt_w(curve, 49.5) == -8800.0  # full discharge: negative in OCPP
    assert m.freq_watt_w(curve, 50.5) == 8800.0
    assert m.freq_watt_w(curve, 49.0) == -8800.0 and m.freq_watt_w(curve, 51.0) == 8800.0  # ends hold
    assert m.freq_watt_w(curve, 50.0) == 0.0
    assert m.freq_watt_w(curve, 49.8) == pytest.approx(-0.05 * 8800.0)  # the DC knee
    for f in (49.6, 49.9, 49.99, 50.1, 50.3):  # the curve matches the service everywhere, sign flipped
        assert m.setpoint_to_kw(m.freq_watt_w(curve, f)) == pytest.approx(8.8 * DC.fraction_at(f), abs=1e-3)


def test_curves_are_bounded_by_the_schema_and_checked():
    """More than 20 points, unordered frequencies, fractions beyond 1 or a bad share are MappingErrors."""
    f = np.linspace(49.0, 51.0, 21)
    with pytest.raises(m.MappingError, match=r"1\.\.20"):
        m.freq_watt_curve(f, np.zeros(21), 1.0)
    with pytest.raises(m.MappingError, match="strictly ascending"):
        m.freq_watt_curve([50.1, 50.0], [0.0, 0.0], 1.0)
    with pytest.raises(m.MappingError, match=r"-1\.\.1"):
        m.freq_watt_curve([49.0, 51.0], [1.5, -1.0], 1.0)
    with pytest.raises(m.MappingError, match="share_kw=nan"):
        m.freq_watt_curve([49.0, 51.0], [1.0, -1.0], float("nan"))


def test_local_frequency_profile_is_schema_valid_with_baseline_limits_and_failsafe():
    """The LocalFrequency profile passes SetChargingProfile's 2.1 schema; baseline and limits in W with OCPP signs;
    UpdateDynamicSchedule's schema has no v2xBaseline, which is why baselines go out as SetChargingProfile."""
    curve = m.freq_watt_curve(DC.f_hz, DC.fraction, 8.8)
    prof = m.local_frequency_profile(2, "tx-1", 2.2, curve, max_offline_s=3, limits=m.EvLimits(11.0, 7.0))
    valid("SetChargingProfile", {"evseId": 2, "chargingProfile": prof})
    assert prof["id"] == m.tx_profile_id(2) and prof["stackLevel"] == 1  # replaces the CentralSetpoint one
    assert prof["chargingProfileKind"] == "Dynamic" and prof["maxOfflineDuration"] == 3
    assert prof["invalidAfterOfflineDuration"] is True
    period = prof["chargingSchedule"][0]["chargingSchedulePeriod"][0]
    assert period["operationMode"] == "LocalFrequency" and "setpoint" not in period
    assert period["v2xBaseline"] == -2200.0  # + 2.2 kW discharge in v2grt
    assert period["limit"] == 11000.0 and period["dischargeLimit"] == -7000.0
    with pytest.raises(Exception, match="v2xBaseline"):
        valid("UpdateDynamicSchedule", {"chargingProfileId": 1, "scheduleUpdate": {"v2xBaseline": -2200.0}})


def test_baselines_make_the_station_agree_with_the_central_loop_and_hold_through_a_step():
    """baseline + curve(f) is the aggregator's setpoint at the frequency it used; after a pro-rata frequency step
    the station's own answer is the new setpoint with the baseline unchanged."""
    share = m.evse_shares_kw(np.array([11.0, 11.0, 22.0]), 35.2)
    assert share.tolist() == pytest.approx([8.8, 8.8, 17.6])
    base_kw = np.array([1.0, -2.0, 0.0])  # the schedule part of each setpoint
    p_at = {f: base_kw + share * DC.fraction_at(f) for f in (49.5, 49.9, 50.5)}
    b = m.local_baselines_kw(p_at[49.9], share, DC.fraction_at(49.9))
    assert b == pytest.approx(base_kw)
    limits = m.EvLimits(30.0, 30.0)
    for row in range(3):
        curve = m.freq_watt_curve(DC.f_hz, DC.fraction, float(share[row]))
        baseline_w = m.kw_to_setpoint(float(b[row]))
        for f in (49.5, 49.9, 50.5):  # a station sees the step before any message: same answer as central
            assert m.local_frequency_kw(baseline_w, curve, f, limits) == pytest.approx(p_at[f][row], abs=2e-3)
    # the EV's limits hold: 1 + 17.6 would be beyond a 10 kW discharge limit
    curve = m.freq_watt_curve(DC.f_hz, DC.fraction, 17.6)
    assert m.local_frequency_kw(m.kw_to_setpoint(1.0), curve, 49.5, m.EvLimits(10.0, 10.0)) == 10.0


def test_the_simulator_reads_what_the_gateway_writes():
    """A station parses the gateway's profile (as `ocpp` routes it, snake_case) back to the same baseline, curve
    and limits; a CentralSetpoint period is not a LocalFrequency one."""
    curve = m.freq_watt_curve(DC.f_hz, DC.fraction, 8.8)
    prof = m.local_frequency_profile(1, "tx", -3.0, curve, max_offline_s=3, limits=m.EvLimits(11.0, 5.0))
    lp = sl.parse_local_period(camel_to_snake_case(prof))
    assert lp.baseline_w == 3000.0 and lp.curve == curve and lp.limits == m.EvLimits(11.0, 5.0)
    assert m.local_frequency_kw(lp.baseline_w, lp.curve, 49.5, lp.limits) == pytest.approx(5.0)  # -3 + 8.8, capped
    assert sl.parse_local_period(camel_to_snake_case(m.dynamic_profile(1, "tx", 2.0, max_offline_s=3))) is None


def test_trigger_services_and_bad_capacities_are_refused():
    """A latched trigger service (FFR) cannot be a frequency-watt curve; the capacity must be positive."""
    with pytest.raises(GatewayError, match="trigger service"):
        LocalFrequencySettings(get_service("ffr"), 100.0).check()
    with pytest.raises(GatewayError, match="--service-capacity-kw"):
        LocalFrequencySettings(DC, 0.0).check()
    LocalFrequencySettings(get_service("fcr"), 100.0).check()


# ------------------------------------------------------------------------------ on loopback
@pytest.fixture
def site(tmp_path):
    """Three stations of two EVSEs (11 kW each) under gateway ocpp1."""
    return make_site(tmp_path, 3)


@contextlib.contextmanager
def local_rig(site, tmp_path, kinds, capacity_kw, f_hz=49.7):
    """A real aggregator (GB DC, pro rata), its SunSpec meter, the LocalFrequency gateway under a GatewayCore and
    the simulated stations measuring the meter's frequency; yields (meter, aggregator, gateway, stations, the
    function that stops the GatewayCore)."""
    from v2grt.aggregator import Aggregator
    from v2grt.config import config_from_dict
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    paths, fleet, passwords = site
    meter = SunSpecMeter(213, f_hz=f_hz)
    msim = SimServerThread([meter]).start()
    (tmp_path / "profile.json").write_text('{"policy": "prorata"}')
    cfg = config_from_dict({
        "fleet_id": "lftest", "period_s": 0.1, "budget_s": 0.1, "state_dir": str(tmp_path / "state"),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": {"host": "127.0.0.1", "port": msim.port(meter), "poll_interval_s": 0.02},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
                "setpoint_ttl_s": 0.3},
        "service": {"name": "dc", "capacity_kw": capacity_kw},
        "discharge_profile": str(tmp_path / "profile.json"),
        "fleet": {"roster": str(paths["roster"])},
    })
    agg = Aggregator(cfg, epoch=7)
    agg.start()
    settings = OcppSettings(m.load_credentials(paths["credentials"]), host="127.0.0.1", port=0,
                            allow_plaintext=True, deadband_kw=0.5, resync_s=30.0)
    gw = LocalFrequencyVehicles(fleet, settings, LocalFrequencySettings(DC, capacity_kw), gateway_id=GW).start()
    ctx = zmq.Context()
    gw.listen_status(ctx, [agg.publisher.endpoint], None)
    state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0, low_soh_fraction=0.0)
    sims = SimStations(f"ws://127.0.0.1:{gw.port}/ocpp", specs_from_fleet(fleet, passwords, kinds), state,
                       latency_s=(0.005, 0.01), meter_interval_s=0.2)
    local = sl.attach(sims, f"127.0.0.1:{msim.port(meter)}")
    sims.start()
    core = GatewayCore(ctx, GW, gw, setpoints=agg.publisher.endpoint, telemetry=agg.telemetry.endpoint,
                       telemetry_interval_s=0.1)
    stop = threading.Event()
    runner = threading.Thread(target=core.run, args=(stop,), daemon=True)
    runner.start()

    def stop_core():
        stop.set()
        runner.join(5.0)

    try:
        wait_until(lambda: int(agg.fleet.online[: agg.fleet.n_rows].sum()) == 6, 15.0, "six EVSEs online")
        yield meter, agg, gw, sims, stop_core
    finally:
        stop.set()
        runner.join(5.0)
        gw.close()
        sims.stop()
        local.feed.stop()
        agg.stop()
        ctx.term()
        msim.stop()


def after(sims, n_cmds, station):
    """The requests ``station`` received after the first ``n_cmds`` of the simulator."""
    return [c for c in list(sims.commands)[n_cmds:] if c.station_id == station]


def test_stations_answer_a_frequency_step_before_the_gateway_sends_anything(site, tmp_path):
    """2.1 stations take LocalFrequency profiles and, on a frequency step, change their power on their own with no
    message from the gateway; a 2.0.1 station and one that rejects LocalFrequency fall back to CentralSetpoint
    (counted) and follow the step through the central loop, whose re-allocation then moves the baselines;
    expiry puts every EVSE back on CentralSetpoint at 0 kW."""
    with local_rig(site, tmp_path, {"CS0002": "no_lf", "CS0003": "v201"}, 33.0) as (meter, agg, gw, sims, _stop_core):
        # CS0002 holds a CentralSetpoint profile twice: first because no cycle's frequency had come yet, then
        # after it refused LocalFrequency; the second is the one meant (lf_capable falls before it is sent)
        wait_until(lambda: (gw.mode_sent[:2] == HELD_LOCAL).all() and (gw.mode_sent[2:4] == HELD_CENTRAL).all()
                   and not gw.lf_capable[2:4].any(), 10.0, "CS0001 in LocalFrequency, CS0002 (rejects it) in "
                   "CentralSetpoint after its refusal")
        assert gw.counters()["local_frequency_fallbacks"] == 4  # CS0002's two EVSEs and CS0003's (2.0.1) two
        assert gw.evses[0].profile_installed and not gw.evses[2].profile_refused
        wait_until(lambda: sims.p_kw[:2].min() > 1.5, 5.0, "CS0001 discharging 37 % of its share at 49.7 Hz")

        # The gateway is held still through the step (its lock: no scan, no send), so nothing it decides after the
        # step reaches CS0001 and what moves CS0001 can only be the station itself. Left running, a message from
        # the gateway sometimes reached CS0001 before its own answer (a re-allocation after CS0002's fallback, or
        # the aggregator's read + cycle beating the station's poll + command latency), which the design allows:
        # "the gateway spoke first" failed 1 run in 20 with both cores loaded.
        n_cmds, own = len(sims.commands), sims.local.responses
        with gw.lock:
            t_step = time.monotonic_ns()
            meter.set_frequency(49.5)
            wait_until(lambda: (sims.target_kw[:2] > 5.0).all(), 2.0, "CS0001's EVSEs at their full share on "
                       "their own")
            first_local = min(t for t, row, kw in list(sims.applies) if t >= t_step and row < 2 and kw > 5.0)
            assert sims.local.responses - own >= 2 and min(sims.local.told_kw[0], sims.local.told_kw[1]) > 5.0
        assert (first_local - t_step) / 1e9 < 0.5
        # CS0002 (CentralSetpoint) follows through the central loop, with UpdateDynamicSchedule
        wait_until(lambda: (sims.target_kw[2:4] > 5.0).all(), 3.0, "CS0002 discharging after the central update")
        assert any(c.action == "UpdateDynamicSchedule" for c in after(sims, n_cmds, "CS0002"))
        # The 2.0.1 station cannot discharge, so the central loop gives CS0001 and CS0002 more than their shares:
        # CS0001's new baseline comes as a LocalFrequency SetChargingProfile (never UpdateDynamicSchedule).
        wait_until(lambda: after(sims, n_cmds, "CS0001"), 3.0, "the re-allocated baselines")
        cs1 = after(sims, n_cmds, "CS0001")
        assert {c.action for c in cs1} == {"SetChargingProfile"}
        period = cs1[-1].payload["charging_profile"]["charging_schedule"][0]["charging_schedule_period"][0]
        assert period["operation_mode"] == "LocalFrequency" and period["v2x_baseline"] < -1000.0  # discharging

        agg.stop(final_zero=False)  # the aggregator dies: expiry, CentralSetpoint at 0 kW everywhere
        wait_until(lambda: (gw.mode_sent[:2] == HELD_CENTRAL).all() and np.allclose(sims.target_kw, 0.0), 3.0,
                   "every EVSE at 0 kW in CentralSetpoint after expiry")
        meter.set_frequency(49.6)
        time.sleep(0.3)
        assert np.allclose(sims.target_kw, 0.0)  # no station answers frequency on its own any more


def test_a_pro_rata_frequency_step_costs_no_message(site, tmp_path):
    """When every EVSE answers locally and the aggregator shares the response pro rata, a frequency step moves
    every station without one message from the gateway: the baselines stay inside the deadband."""
    with local_rig(site, tmp_path, {}, 33.0) as (meter, _agg, gw, sims, stop_core):
        wait_until(lambda: (gw.mode_sent == HELD_LOCAL).all() and sims.p_kw.min() > 1.5, 10.0,
                   "every EVSE in LocalFrequency, discharging at 49.7 Hz")
        time.sleep(0.3)
        n_cmds = len(sims.commands)
        meter.set_frequency(50.5)
        wait_until(lambda: (sims.p_kw < -5.0).all(), 3.0, "every EV charging at its full share")
        time.sleep(0.5)
        assert list(sims.commands)[n_cmds:] == []
        assert gw.target_kw == pytest.approx(np.zeros(6), abs=0.5)  # baselines: the response is all the curve's
        stop_core()  # GatewayCore.close: its last zeros, final
        wait_until(lambda: (gw.mode_sent == HELD_CENTRAL).all() and np.allclose(sims.target_kw, 0.0), 3.0,
                   "every EVSE in CentralSetpoint at 0 kW when the gateway stops")


def test_a_zero_baseline_is_not_a_stop():
    """due_rows' zero rule (expiry and e-stop always go out) applies only to the rows asked: a LocalFrequency
    baseline that reaches exactly 0 stays in the deadband."""
    target, sent = np.array([0.0, 0.0]), np.array([0.1, 0.1])
    ok = np.ones(2, dtype=bool)
    assert m.due_rows(target, sent, np.zeros(2, np.int64), ok, 1, deadband_kw=0.5, resync_ns=10**12).tolist() == [0, 1]
    assert m.due_rows(target, sent, np.zeros(2, np.int64), ok, 1, deadband_kw=0.5, resync_ns=10**12,
                      zero_rows=np.array([True, False])).tolist() == [0]


def test_bench_e2e_ocpp_runs_both_operation_modes_side_by_side():
    """bench e2e --protocol ocpp --smoke --operation-mode central,local-frequency gives one row per mode: every
    step timed in both, the gateway's phases only for central, and far fewer messages per step locally."""
    import json
    import subprocess
    import sys

    from v2grt.bench._common import child_env

    out = subprocess.run([sys.executable, "-m", "v2grt.cli", "bench", "e2e", "--protocol", "ocpp", "--smoke",
                          "--operation-mode", "central,local-frequency", "--policy", "prorata", "--json"],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    central, local = r["results"]
    assert (central["operation_mode"], local["operation_mode"]) == ("central", "local-frequency")
    assert central["steps_timed"] == local["steps_timed"] == 4 and local["sent_not_applied"] == 0
    assert central["phases"]["publish_to_send"]["n"] > 0 and local["phases"]["publish_to_send"]["n"] == 0
    assert central["messages_per_step"]["p50"] >= 6 and local["messages_per_step"]["p50"] < 6
    assert local["gateway_counters"]["local_frequency_profiles_sent"] >= 6
    assert local["exit_codes"] == {"gateway": 0, "stations": [0]}


def test_the_mode_options_name_what_is_missing():
    """--operation-mode local-frequency without --service or --service-capacity-kw, or with an unknown service, is
    refused naming the option; central needs neither."""
    import argparse

    from v2grt.gateway.ocpp_local import add_local_frequency_options, local_settings_from_args

    ap = argparse.ArgumentParser()
    add_local_frequency_options(ap)
    assert local_settings_from_args(ap.parse_args([])) is None
    with pytest.raises(GatewayError, match="--service NAME"):
        local_settings_from_args(ap.parse_args(["--operation-mode", "local-frequency", "--service", "dc"]))
    with pytest.raises(GatewayError, match="--service: unknown service 'fcr-x'"):
        local_settings_from_args(ap.parse_args(["--operation-mode", "local-frequency", "--service", "fcr-x",
                                                "--service-capacity-kw", "10"]))
    lf = local_settings_from_args(ap.parse_args(["--operation-mode", "local-frequency", "--service", "fcr",
                                                 "--service-capacity-kw", "10"]))
    assert lf.service.name == "fcr" and lf.capacity_kw == 10.0
