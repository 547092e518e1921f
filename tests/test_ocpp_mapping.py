"""The pure OCPP mapping: the one sign/unit converter, payloads valid against the schemas shipped in
`ocpp`, meter values and charging needs as `ocpp`'s routing hands them over, node states, and the
credential and rate rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ocpp.charge_point import camel_to_snake_case
from ocpp.messages import get_validator

from v2grt.codes import Reason
from v2grt.gateway import ocpp_mapping as m


def valid(action: str, payload: dict, version: str = "2.1") -> dict:
    """Validate a request payload against the schema of `version` shipped with `ocpp`; return it."""
    get_validator(2, action, version).validate(payload)
    return payload


# ------------------------------------------------------------------------------- signs and units
@pytest.mark.parametrize("p_kw, watts", [(7.4, -7400.0), (-11.0, 11000.0), (0.0, 0.0), (0.0004, 0.0)])
def test_kw_to_setpoint_flips_the_sign(p_kw, watts):
    """+ discharge in v2grt is a negative OCPP setpoint, in W, never -0.0."""
    sp = m.kw_to_setpoint(p_kw)
    assert sp == watts
    assert math.copysign(1.0, sp) == (-1.0 if p_kw >= 0.0005 else 1.0)  # 0 is +0.0, never -0.0


def test_setpoint_round_trips_in_watts_and_amps():
    """setpoint_to_kw undoes kw_to_setpoint in W exactly and in A to the 0.1 A rounding."""
    for p_kw in (-22.0, -3.3, 0.0, 1.25, 11.0):
        assert m.setpoint_to_kw(m.kw_to_setpoint(p_kw, "W"), "W") == pytest.approx(p_kw, abs=1e-3)
        amps = m.kw_to_setpoint(p_kw, "A")
        assert amps == pytest.approx(-p_kw * 1000 / 690, abs=0.051)
        assert m.setpoint_to_kw(amps, "A") == pytest.approx(p_kw, abs=0.07)
    with pytest.raises(m.MappingError, match="chargingRateUnit='VA'"):
        m.kw_to_setpoint(1.0, "VA")


def test_schedule_update_clamps_to_the_ev_and_signs_the_limits():
    """A setpoint beyond the EV's limits is clamped; limit >= 0 and dischargeLimit <= 0 in W."""
    limits = m.EvLimits(p_chg_max_kw=7.0, p_dis_max_kw=5.0)
    up = valid("UpdateDynamicSchedule", {"chargingProfileId": 1, "scheduleUpdate": m.schedule_update(9.0, limits)})
    assert up["scheduleUpdate"] == {"setpoint": -5000.0, "limit": 7000.0, "dischargeLimit": -5000.0}
    assert m.schedule_update(-9.0, limits)["setpoint"] == 7000.0
    assert m.schedule_update(2.5)["setpoint"] == -2500.0 and "limit" not in m.schedule_update(2.5)
    assert m.schedule_update(3.0, m.EvLimits(p_chg_max_kw=11.0, p_dis_max_kw=0.0))["setpoint"] == 0.0


def test_dynamic_profile_is_schema_valid_with_its_failsafe():
    """The transaction profile is Dynamic / CentralSetpoint with the offline failsafe set."""
    prof = m.dynamic_profile(2, "tx-1", -3.0, max_offline_s=3, limits=m.EvLimits(11.0, 11.0))
    valid("SetChargingProfile", {"evseId": 2, "chargingProfile": prof})
    assert prof["chargingProfileKind"] == "Dynamic" and prof["chargingProfilePurpose"] == "TxProfile"
    assert prof["maxOfflineDuration"] == 3 and prof["invalidAfterOfflineDuration"] is True
    period = prof["chargingSchedule"][0]["chargingSchedulePeriod"][0]
    assert period["operationMode"] == "CentralSetpoint" and period["setpoint"] == 3000.0
    assert period["dischargeLimit"] == -11000.0


@pytest.mark.parametrize("version", ["2.1", "2.0.1"])
def test_default_and_charge_only_profiles_are_valid_in_both_versions(version):
    """The 0 W fallback and the 2.0.1 charge limit validate against 2.1 and 2.0.1 schemas."""
    valid("SetChargingProfile", {"evseId": 0, "chargingProfile": m.default_profile()}, version)
    prof = m.charge_limit_profile(1, "tx-9", -4.2, duration_s=10)
    valid("SetChargingProfile", {"evseId": 1, "chargingProfile": prof}, version)
    assert prof["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 4200.0
    discharge = m.charge_limit_profile(1, "tx-9", 6.0, duration_s=10)  # 2.0.1 cannot export: stop charging
    assert discharge["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 0.0


# ------------------------------------------------------------------------------- deadband / resync
def test_due_rows_deadband_resync_and_zero():
    """Sent when never sent, moved past the deadband, going to exactly 0, or the resync is due."""
    target = np.array([1.0, 1.05, 2.0, 0.0, 1.0, 3.0, 0.0])
    sent = np.array([np.nan, 1.0, 1.0, 0.05, 1.0, 1.0, 0.0])
    sent_ns = np.array([0, 900, 900, 900, 0, 900, 900])
    ctl = np.array([True, True, True, True, True, False, True])
    due = m.due_rows(target, sent, sent_ns, ctl, 1000, deadband_kw=0.1, resync_ns=500)
    assert due.tolist() == [0, 2, 3, 4]  # 1: inside the deadband; 5: not controllable; 6: already 0


# ------------------------------------------------------------------------------- station -> v2grt
def snake(payload: dict) -> dict:
    """A payload as `ocpp`'s routing hands it to a handler."""
    return camel_to_snake_case(payload)


def meter(*samples):
    payload = valid("MeterValues", {"evseId": 1, "meterValue": [
        {"timestamp": "2026-12-04T21:00:00Z", "sampledValue": list(samples)}]})
    return snake(payload)["meter_value"]


def test_meter_values_give_soc_and_power_with_the_grid_sign():
    """Export - import is + discharge; SoC percent is a fraction; kW units and multipliers count."""
    r = m.parse_meter_values(meter({"measurand": "SoC", "value": 55, "unitOfMeasure": {"unit": "Percent"}},
                                   {"measurand": "Power.Active.Import", "value": 0},
                                   {"measurand": "Power.Active.Export", "value": 7400}))
    assert r.soc == 0.55 and r.p_kw == pytest.approx(7.4)
    r = m.parse_meter_values(meter({"measurand": "Power.Active.Import", "value": 3.5, "unitOfMeasure": {"unit": "kW"}}))
    assert r.p_kw == pytest.approx(-3.5) and r.soc is None
    r = m.parse_meter_values(meter({"measurand": "Power.Active.Import", "value": 2, "phase": "L1-N",
                                    "unitOfMeasure": {"unit": "W", "multiplier": 3}},
                                   {"measurand": "Power.Active.Import", "value": 2000, "phase": "L2-N"}))
    assert r.p_kw == pytest.approx(-4.0)
    r = m.parse_meter_values(meter({"measurand": "Power.Active.Setpoint", "value": -5000}))
    assert r.setpoint_kw == 5.0 and r.p_kw is None


@pytest.mark.parametrize("sample, field", [
    ({"measurand": "SoC", "value": 140}, "SoC"),
    ({"measurand": "SoC", "value": 50, "unitOfMeasure": {"unit": "Wh"}}, "SoC"),
    ({"measurand": "Power.Active.Export", "value": 5e6}, "Power.Active.Export"),
    ({"measurand": "Power.Active.Import", "value": 1, "unitOfMeasure": {"unit": "A"}}, "Power.Active.Import"),
])
def test_meter_values_out_of_range_are_named(sample, field):
    """A schema-valid but impossible value raises MappingError naming the measurand."""
    with pytest.raises(m.MappingError, match=field):
        m.parse_meter_values(meter(sample))


def test_charging_needs_bidirectional_and_charge_only():
    """BPT requests give both limits in kW; other modes are charge-only (discharge limit 0)."""
    needs = {"requestedEnergyTransfer": "AC_BPT", "controlMode": "DynamicControl",
             "v2xChargingParameters": {"maxChargePower": 11000, "maxDischargePower": 7400, "minDischargePower": 1000,
                                       "evMinV2XEnergyRequest": -12000, "targetSoC": 80}}
    valid("NotifyEVChargingNeeds", {"evseId": 1, "chargingNeeds": needs})
    ev = m.parse_charging_needs(snake(needs))
    assert ev.bidirectional and ev.limits == m.EvLimits(11.0, 7.4)
    assert ev.p_dis_min_kw == 1.0 and ev.min_v2x_energy_kwh == -12.0 and ev.target_soc == 0.8
    assert m.ev_min_soc(0.6, ev.min_v2x_energy_kwh, 60.0) == pytest.approx(0.4)
    only = m.parse_charging_needs(snake({"requestedEnergyTransfer": "AC_three_phase", "v2xChargingParameters": {
        "maxChargePower": 11000, "maxDischargePower": 7400}}))
    assert not only.bidirectional and only.limits.p_dis_max_kw == 0.0
    with pytest.raises(m.MappingError, match="maxDischargePower: -5"):
        m.parse_charging_needs(snake({"requestedEnergyTransfer": "DC_BPT",
                                      "v2xChargingParameters": {"maxDischargePower": -5}}))


@pytest.mark.parametrize("kw, expected", [
    (dict(connected=False, connector_status="Occupied", in_transaction=True, has_soc=True, profile_refused=False),
     (0, Reason.OFFLINE)),
    (dict(connected=True, connector_status="Unavailable", in_transaction=True, has_soc=True, profile_refused=False),
     (0, Reason.OFFLINE)),
    (dict(connected=True, connector_status="Faulted", in_transaction=True, has_soc=True, profile_refused=False),
     (1, Reason.NODE_UNREACHABLE)),
    (dict(connected=True, connector_status="Occupied", in_transaction=False, has_soc=True, profile_refused=False),
     (0, Reason.OK)),
    (dict(connected=True, connector_status="Occupied", in_transaction=True, has_soc=False, profile_refused=False),
     (0, Reason.OK)),
    (dict(connected=True, connector_status="Occupied", in_transaction=True, has_soc=True, profile_refused=True),
     (1, Reason.NODE_UNREACHABLE)),
    (dict(connected=True, connector_status="Occupied", in_transaction=True, has_soc=True, profile_refused=False),
     (1, Reason.OK)),
    (dict(connected=True, connector_status="Occupied", in_transaction=True, has_soc=True, profile_refused=False,
          meter_fresh=False), (1, Reason.TIMEOUT_BMS_RESPONSE)),
])
def test_node_online_fault_table(kw, expected):
    """Disconnect, Unavailable, Faulted, no transaction, a refused profile and stale meter values map as documented."""
    assert m.node_online_fault(**kw) == expected


# ------------------------------------------------------------------------------- ids and security
def test_node_ids_and_paths():
    """<station>:<evse> splits back; the station id comes from the last path segment, checked."""
    assert m.node_id("CS-01", 2) == "CS-01:2" and m.split_node_id("CS-01:2") == ("CS-01", 2)
    assert m.split_node_id("EV_NODE_01") is None and m.split_node_id("CS:0") is None
    assert m.split_node_id("a:b:3") == ("a:b", 3)
    assert m.station_id_from_path("/ocpp/CS-01") == "CS-01"
    assert m.station_id_from_path("/CS%2D01/") == "CS-01"
    assert m.station_id_from_path("/ocpp/a b") is None and m.station_id_from_path("/" + "x" * 49) is None


def test_credentials_file(tmp_path):
    """Hashes load; only the station's own id and password pass; a bad row names file and line."""
    good = tmp_path / "creds.csv"
    good.write_text(f"station_id,password_hash\nCS1,{m.hash_password('CS1', 'secret-0123456789')}\n")
    creds = m.load_credentials(good)
    assert m.check_password(creds, "CS1", "CS1", "secret-0123456789")
    assert not m.check_password(creds, "CS1", "CS1", "secret-012345678")
    assert not m.check_password(creds, "CS1", "CS2", "secret-0123456789")
    assert not m.check_password(creds, "CS2", "CS2", "secret-0123456789")
    bad = tmp_path / "bad.csv"
    bad.write_text("station_id,password_hash\nCS1,plaintext\n")
    with pytest.raises(m.MappingError, match=r"bad.csv: line 2: password_hash of 'CS1'"):
        m.load_credentials(bad)


def test_token_bucket_limits_rate_and_marks_exhaustion():
    """A burst passes, the next message is refused, time refills; a long flood exhausts the bucket."""
    b = m.TokenBucket(rate_per_s=10.0, burst=5, now_ns=0)
    assert all(b.take(0) for _ in range(5)) and not b.take(0)
    assert b.take(200_000_000)  # 0.2 s at 10/s refills 2
    assert not any(b.take(200_000_000) for _ in range(10)) and b.exhausted
