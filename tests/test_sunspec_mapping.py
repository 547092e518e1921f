"""The SunSpec charger mapping, apart from any socket: signs from the shipped model definitions, scale
factors, checked readings, the 704 setpoint block, node states and the devices file."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest

from v2grt.codes import Reason
from v2grt.gateway import sunspec_mapping as sm
from v2grt.io.modbus import decode_point, encode_point, model_points


def _model_json(model_id: int) -> dict:
    ref = resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    return {p["name"]: p for p in json.loads(ref.read_text())["group"]["points"]}


def _regs(model_id: int, names: tuple[str, ...], **values) -> list[int]:
    """The registers of ``names``' span with ``values`` set (others "not implemented")."""
    pts = model_points(model_id)
    first, count = sm.span(model_id, names)
    regs = [0] * count
    for p in pts.values():
        if first <= p.offset and p.offset + p.size <= first + count:
            regs[p.offset - first: p.offset - first + p.size] = encode_point(p, values.get(p.name))
    return regs


SF = sm.ScaleFactors(w_701=1, w_702=0, wset=0, wh=1, pct=-1)


def _reading(**overrides):
    v701 = {"St": 1, "InvSt": sm.INVST_RUNNING, "ConnSt": 1, "Alrm": 0, "W": 740}
    v713 = {"WHAvail": 3600, "SoC": 600, "SoH": 950, "Sta": 0}
    for k, v in overrides.items():
        (v701 if k in v701 else v713)[k] = v
    return sm.decode_reading(_regs(701, sm.POLL_701, **v701), sm.span(701, sm.POLL_701)[0],
                             _regs(713, sm.POLL_713, **v713), sm.span(713, sm.POLL_713)[0], SF)


# ------------------------------------------------------------------------------- signs
def test_the_signs_are_the_ones_the_shipped_models_define():
    """701 W is + for generation and 704 WSet may be negative for charging (pysunspec2's JSON), so both
    map to v2grt's + = discharge without a flip: +7.4 kW discharge is WSet +7400 W, -11 kW charge is -11000 W."""
    m701, m704 = _model_json(701), _model_json(704)
    assert "positive for DER generation and negative for absorption" in m701["W"]["desc"]
    assert "may be negative for charging" in " ".join(m704["WSetEna"]["comments"])
    assert m704["WSet"]["type"] == "int32" and m704["WSet"]["sf"] == "WSet_SF"
    assert sm.kw_to_wset(7.4, 0) == 7400
    assert sm.kw_to_wset(-11.0, 0) == -11000
    assert sm.kw_to_wset(-7.4, -1) == -74000  # 0.1 W resolution
    assert sm.kw_to_wset(7.44, 1) == 744  # 10 W resolution
    assert sm.wset_to_kw(sm.kw_to_wset(-3.3, 0), 0) == -3.3
    assert sm.w_to_kw(740, 1) == 7.4  # generation = discharge, + in v2grt
    assert sm.w_to_kw(-1100, 1) == -11.0  # absorption = charging
    assert str(sm.kw_to_wset(-0.0, 0)) == "0"


@pytest.mark.parametrize("p_kw,sf", [(math.nan, 0), (math.inf, 0), (1000.5, 0), (-2000.0, 0), (900.0, -4)])
def test_a_setpoint_that_cannot_be_written_is_refused(p_kw, sf):
    """NaN, infinity, beyond the wire's 1000 kW or beyond int32 at the device's WSet_SF: MappingError."""
    with pytest.raises(sm.MappingError, match="setpoint"):
        sm.kw_to_wset(p_kw, sf)


@pytest.mark.parametrize("raw", [None, 11, -11])
def test_scale_factors_outside_sunspec_range_are_refused(raw):
    """A scale factor not implemented or outside -10..10 names the model and point."""
    with pytest.raises(sm.MappingError, match="model 704 WSet_SF"):
        sm.check_scale_factors(w_701=0, w_702=0, wset=raw, wh=0, pct=-1)


# ------------------------------------------------------------------------------- readings
def test_a_reading_decodes_power_soc_soh_and_energy():
    """701 W with W_SF, 713 SoC/SoH with Pct_SF and WHAvail with WH_SF become kW (+ discharge), fractions, kWh."""
    r = _reading()
    assert (r.p_kw, r.soc, r.soh, r.wh_avail_kwh) == (7.4, 0.6, 0.95, 36.0)
    assert (r.st, r.inv_st, r.conn_st, r.alarms, r.sta) == (1, sm.INVST_RUNNING, 1, 0, 0)
    assert _reading(SoC=None).soc is None  # no EV behind the charger


@pytest.mark.parametrize("overrides,match", [
    ({"SoC": 2500}, "713 SoC=2500"),
    ({"SoH": 1001}, "713 SoH=1001"),
    ({"W": None}, "701 W is not implemented"),
    ({"InvSt": 9}, "701 InvSt=9"),
    ({"Sta": 7}, "713 Sta=7"),
])
def test_bad_register_values_are_refused_with_their_name(overrides, match):
    """Out-of-range or missing points raise MappingError naming the model, point and raw value."""
    with pytest.raises(sm.MappingError, match=match):
        _reading(**overrides)


def test_power_beyond_the_wire_range_is_refused():
    """701 W = 32000 is 320 kW at W_SF 1 (accepted) but 3.2 MW at W_SF 2: refused, named."""
    assert _reading(W=32000).p_kw == 320.0
    with pytest.raises(sm.MappingError, match="701 W=32000"):
        sm.decode_reading(_regs(701, sm.POLL_701, W=32000), sm.span(701, sm.POLL_701)[0],
                          _regs(713, sm.POLL_713, SoC=500), sm.span(713, sm.POLL_713)[0],
                          sm.ScaleFactors(w_701=2, w_702=0, wset=0, wh=0, pct=-1))


def test_ratings_cap_the_roster_limits():
    """702 WMaxRtg caps both directions, WChaRteMaxRtg / WDisChaRteMaxRtg their own; missing ones cap nothing."""
    first, _count = sm.span(702, ("WMaxRtg", "WChaRteMaxRtg", "WDisChaRteMaxRtg"))
    regs = _regs(702, ("WMaxRtg", "WChaRteMaxRtg", "WDisChaRteMaxRtg"), WMaxRtg=1100, WChaRteMaxRtg=1100,
                 WDisChaRteMaxRtg=700)
    ratings = sm.decode_ratings(regs, first, 1)
    assert ratings == sm.Ratings(11.0, 11.0, 7.0)
    assert ratings.limits(22.0, 22.0) == (7.0, 11.0)
    assert sm.Ratings(None, None, None).limits(11.0, 5.0) == (11.0, 5.0)
    assert sm.clamp_kw(9.0, 7.0, 11.0) == 7.0 and sm.clamp_kw(-20.0, 7.0, 11.0) == -11.0


# ------------------------------------------------------------------------------- the setpoint block
def test_the_setpoint_block_enables_watts_and_the_reversion_to_zero():
    """One contiguous write: WSetEna ENABLED, WSetMod WATTS, WSet, reversion enabled to 0 W after revert_s."""
    first, regs = sm.setpoint_registers(-7.4, 0, 2)
    pts = model_points(704)
    assert first == pts["WSetEna"].offset

    def g(name):
        return decode_point(regs, pts[name], -first)

    assert (g("WSetEna"), g("WSetMod"), g("WSet"), g("WSetRvrt"), g("WSetEnaRvrt"), g("WSetRvrtTms")) == (
        1, 1, -7400, 0, 1, 2)
    for bad in (0, 1.5, sm.MAX_REVERT_S + 1):
        with pytest.raises(sm.MappingError, match="WSetRvrtTms"):
            sm.setpoint_registers(1.0, 0, bad)


# ------------------------------------------------------------------------------- node states
def test_node_states():
    """Disconnected -> OFFLINE; a refused poll -> INVALID_TELEMETRY; no fresh poll -> TIMEOUT_BMS_RESPONSE;
    fault/error -> NODE_UNREACHABLE; temperature alarm -> THERMAL_LIMIT; off -> OFFLINE; no EV -> offline, OK."""
    ok = _reading()

    def state(reading=ok, connected=True, fresh=True, invalid=False):
        return sm.node_online_fault(connected=connected, fresh=fresh, invalid=invalid, reading=reading)

    assert state() == (1, Reason.OK)
    assert state(connected=False) == (0, Reason.OFFLINE)
    assert state(invalid=True) == (1, Reason.INVALID_TELEMETRY)
    assert state(fresh=False) == (1, Reason.TIMEOUT_BMS_RESPONSE)
    assert state(reading=None) == (1, Reason.TIMEOUT_BMS_RESPONSE)
    assert state(_reading(InvSt=sm.INVST_FAULT)) == (1, Reason.NODE_UNREACHABLE)
    assert state(_reading(Sta=sm.STA_ERROR)) == (1, Reason.NODE_UNREACHABLE)
    assert state(_reading(Alrm=sm.ALRM_OVER_TEMP)) == (1, Reason.THERMAL_LIMIT)
    assert state(_reading(ConnSt=0)) == (0, Reason.OFFLINE)
    assert state(_reading(St=0)) == (0, Reason.OFFLINE)
    assert state(_reading(SoC=None)) == (0, Reason.OK)


# ------------------------------------------------------------------------------- the devices file
def test_devices_file_round_trip(tmp_path):
    """write_devices then load_devices gives the same addresses."""
    devices = {"SS0001": sm.DeviceAddress("10.0.0.5", 502, 1), "SS0002": sm.DeviceAddress("10.0.0.5", 502, 2)}
    assert sm.load_devices(sm.write_devices(tmp_path / "d.csv", devices)) == devices


@pytest.mark.parametrize("body,match", [
    ("node,host,port,unit\n", "line 1: header"),
    ("node_id,host,port,unit_id\nA,h,70000,1\n", "line 2: port '70000' of 'A'"),
    ("node_id,host,port,unit_id\nA,h,502,0\n", "line 2: unit_id '0' of 'A'"),
    ("node_id,host,port,unit_id\nA,h,502,1\nA,h,502,2\n", "line 3: node_id 'A' listed twice"),
    ("node_id,host,port,unit_id\nA,h,502,1\nB,h,502,1\n", "line 3: 'B' is at h:502 unit 1, already given to 'A'"),
    ("node_id,host,port,unit_id\nA,h,502\n", "line 2: 3 columns"),
])
def test_devices_file_errors_name_the_line(tmp_path, body, match):
    """Every bad row of the devices file is named with its line and value."""
    path = tmp_path / "devices.csv"
    path.write_text(body)
    with pytest.raises(sm.MappingError, match=match):
        sm.load_devices(path)
