"""Tests for v2grt.services: built-in grid-service curves, custom curves, responders."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from v2grt.config import build_service, config_from_dict
from v2grt.services import (
    _ALIASES,
    _CONFIG_KEYS,
    META_FIELDS,
    SERVICES,
    STEP_HZ,
    CurveResponder,
    ServiceCurve,
    ServiceError,
    TriggerResponder,
    get_service,
    service_names,
)

ALL_NAMES = service_names()
NOMINALS = (50.0, 60.0)
approx = pytest.approx


def frequencies(nominal_hz: float):
    """Frequencies around a nominal, wide enough to cover every knee and both saturated ends."""
    return st.floats(min_value=nominal_hz - 4.0, max_value=nominal_hz + 4.0, allow_nan=False)


# -- knee points of each built-in, pinned to the grid codes' numbers ------------------------------------


def test_fcr_knees():
    """ENTSO-E FCR is full at -+200 mHz, linear through 50 Hz outside the +-10 mHz band, 0 inside."""
    c = get_service("fcr")
    assert c.nominal_hz == 50.0
    assert c.fraction_at(49.8) == 1.0
    assert c.fraction_at(49.7) == 1.0
    assert c.fraction_at(49.9) == approx(0.5, abs=1e-3)
    assert c.fraction_at(49.99) == approx(0.05, abs=1e-12)
    assert c.fraction_at(49.9905) == 0.0
    assert c.fraction_at(50.0) == 0.0
    assert c.fraction_at(50.0095) == 0.0
    assert c.fraction_at(50.01) == approx(-0.05, abs=1e-12)
    assert c.fraction_at(50.1) == approx(-0.5, abs=1e-3)
    assert c.fraction_at(50.2) == -1.0
    assert c.fraction_at(50.3) == -1.0


def test_fcr_metadata():
    """FCR carries SO GL's 30 s full activation and the 15 min LER endurance lower bound."""
    c = get_service("fcr")
    assert c.full_activation_s == 30.0
    assert c.endurance_s == 900.0
    assert c.trigger_hz is None


def test_fcr_n_knees():
    """Nordic FCR-N is 0 at 50.0 Hz and full at 49.9 / 50.1 Hz, linear with no deadband."""
    c = get_service("fcr_n")
    assert c.fraction_at(50.0) == approx(0.0, abs=1e-12)
    assert c.fraction_at(49.9) == 1.0
    assert c.fraction_at(50.1) == -1.0
    assert c.fraction_at(49.95) == approx(0.5, abs=1e-9)
    assert c.fraction_at(50.001) == approx(-0.01, abs=1e-9)
    assert c.fraction_at(49.0) == 1.0
    assert c.endurance_s == 3600.0


def test_fcr_d_up_knees():
    """FCR-D up is 0 at and above 49.9 Hz and full at 49.5 Hz and below."""
    c = get_service("fcr_d_up")
    assert c.fraction_at(50.0) == 0.0
    assert c.fraction_at(49.9) == 0.0
    assert c.fraction_at(49.7) == approx(0.5, abs=1e-9)
    assert c.fraction_at(49.5) == 1.0
    assert c.fraction_at(49.0) == 1.0
    assert c.fraction_at(50.5) == 0.0
    assert (c.endurance_s, c.ramp_check_s, c.ramp_check_fraction) == (1200.0, 7.5, 0.86)


def test_fcr_d_down_knees():
    """FCR-D down mirrors up: 0 at and below 50.1 Hz, full charge at 50.5 Hz and above."""
    c = get_service("fcr_d_down")
    assert c.fraction_at(50.0) == 0.0
    assert c.fraction_at(50.1) == 0.0
    assert c.fraction_at(50.3) == approx(-0.5, abs=1e-9)
    assert c.fraction_at(50.5) == -1.0
    assert c.fraction_at(51.0) == -1.0
    assert c.fraction_at(49.5) == 0.0
    assert c.endurance_s == 1200.0


def test_dc_knees():
    """GB Dynamic Containment: 0 within +-15 mHz, 5 % at +-200 mHz, 100 % at +-500 mHz."""
    c = get_service("dc")
    assert c.fraction_at(50.0) == 0.0
    assert c.fraction_at(49.985) == approx(0.0, abs=1e-12)
    assert c.fraction_at(50.015) == approx(0.0, abs=1e-12)
    assert c.fraction_at(49.8) == approx(0.05, abs=1e-12)
    assert c.fraction_at(50.2) == approx(-0.05, abs=1e-12)
    assert c.fraction_at(49.5) == approx(1.0, abs=1e-12)
    assert c.fraction_at(50.5) == approx(-1.0, abs=1e-12)
    assert c.fraction_at(49.65) == approx(0.525, abs=1e-9)  # halfway between the knee and full
    assert c.fraction_at(49.0) == 1.0
    assert (c.start_s, c.full_activation_s, c.endurance_s) == (0.5, 1.0, 900.0)


def test_dc_low_and_high_are_the_halves_of_dc():
    """dc_low answers only under-frequency, dc_high only over-frequency, and together they are dc."""
    dc, low, high = get_service("dc"), get_service("dc_low"), get_service("dc_high")
    for f_hz in np.linspace(49.0, 51.0, 401):
        assert low.fraction_at(f_hz) >= 0.0
        assert high.fraction_at(f_hz) <= 0.0
        assert low.fraction_at(f_hz) + high.fraction_at(f_hz) == approx(dc.fraction_at(f_hz), abs=1e-12)
    assert low.fraction_at(49.8) == approx(0.05, abs=1e-12)
    assert low.fraction_at(50.5) == 0.0
    assert high.fraction_at(50.2) == approx(-0.05, abs=1e-12)
    assert high.fraction_at(49.5) == 0.0


@pytest.mark.parametrize(
    ("name", "trigger_hz", "full_activation_s"),
    [("ffr_49.7", 49.7, 1.3), ("ffr_49.6", 49.6, 1.0), ("ffr_49.5", 49.5, 0.7)],
)
def test_ffr_static_step_at_trigger(name, trigger_hz, full_activation_s):
    """Each FFR level is full at and below its trigger, 0 above it, with Fingrid's activation time."""
    c = get_service(name)
    assert c.trigger_hz == approx(trigger_hz, abs=1e-12)
    assert c.full_activation_s == full_activation_s
    assert (c.hold_s, c.release_per_s) == (5.0, 0.18)  # 18 %/s: margin under Fingrid's 20 %/s
    assert c.fraction_at(trigger_hz) == 1.0
    assert c.fraction_at(trigger_hz - 0.2) == 1.0
    assert c.fraction_at(trigger_hz + 0.001) == 0.0
    assert c.fraction_at(50.0) == 0.0


def test_ffr_alias_is_the_49_7_level():
    """'ffr' is Fingrid's 49.7 Hz activation level."""
    assert get_service("ffr") == get_service("ffr_49.7")
    assert get_service("FFR").trigger_hz == approx(49.7, abs=1e-12)


def test_ieee1547_knees_at_60_hz():
    """IEEE 1547 frequency-watt: 0 within 0.036 Hz, 5 % droop of 60 Hz (1/3 per Hz), full at 3.036 Hz."""
    c = get_service("ieee1547")
    assert c.nominal_hz == 60.0
    assert c.fraction_at(60.0) == 0.0
    assert c.fraction_at(60.036) == approx(0.0, abs=1e-12)
    assert c.fraction_at(59.964) == approx(0.0, abs=1e-12)
    assert c.fraction_at(61.036) == approx(-1.0 / 3.0, abs=1e-9)
    assert c.fraction_at(58.964) == approx(1.0 / 3.0, abs=1e-9)
    assert c.fraction_at(63.036) == approx(-1.0, abs=1e-12)
    assert c.fraction_at(56.964) == approx(1.0, abs=1e-12)
    assert c.fraction_at(65.0) == -1.0
    assert c.response_time_s == 5.0


def test_ieee1547_at_50_hz_scales_the_droop():
    """At 50 Hz the IEEE 1547 droop is 5 % of 50 Hz: 0.4 per Hz, full at 2.536 Hz deviation."""
    c = get_service("ieee1547", nominal_hz=50)
    assert c.nominal_hz == 50.0
    assert c.fraction_at(50.036) == approx(0.0, abs=1e-12)
    assert c.fraction_at(51.036) == approx(-0.4, abs=1e-9)
    assert c.fraction_at(48.964) == approx(0.4, abs=1e-9)
    assert c.fraction_at(52.536) == approx(-1.0, abs=1e-12)
    assert c.fraction_at(47.464) == approx(1.0, abs=1e-12)


# -- properties of every built-in ---------------------------------------------------------------------
# Hypothesis's 200 ms deadline per example is a speed assertion: under load a first example took 708 ms (its
# first call also imported libcst) and failed the default run; the properties are what these tests assert.
PROPERTIES = settings(deadline=None)


@pytest.mark.parametrize("nominal_hz", NOMINALS)
@pytest.mark.parametrize("name", ALL_NAMES)
@PROPERTIES
@given(data=st.data())
def test_builtins_are_monotonic_and_bounded(name, nominal_hz, data):
    """Every built-in is non-increasing in frequency and within [-1, 1] at both nominals."""
    c = get_service(name, nominal_hz)
    a = data.draw(frequencies(nominal_hz))
    b = data.draw(frequencies(nominal_hz))
    lo, hi = min(a, b), max(a, b)
    y_lo, y_hi = c.fraction_at(lo), c.fraction_at(hi)
    assert -1.0 <= y_lo <= 1.0
    assert -1.0 <= y_hi <= 1.0
    assert y_lo >= y_hi


@pytest.mark.parametrize("nominal_hz", NOMINALS)
@pytest.mark.parametrize("name", ALL_NAMES)
@PROPERTIES
@given(data=st.data())
def test_builtins_follow_the_sign_convention(name, nominal_hz, data):
    """Under-frequency never asks for charge and over-frequency never asks for discharge."""
    c = get_service(name, nominal_hz)
    d_hz = data.draw(st.floats(min_value=0.0, max_value=4.0))
    assert c.fraction_at(nominal_hz - d_hz) >= 0.0
    assert c.fraction_at(nominal_hz + d_hz) <= 0.0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_builtins_are_zero_at_nominal_and_saturate(name):
    """Every built-in is idle at nominal and reaches full discharge or charge far enough out."""
    c = SERVICES[name]
    nom = c.nominal_hz
    assert c.fraction_at(nom) == approx(0.0, abs=1e-12)
    assert c.fraction_at(nom - 4.0) in (0.0, 1.0)
    assert c.fraction_at(nom + 4.0) in (0.0, -1.0)
    assert (c.fraction_at(nom - 4.0), c.fraction_at(nom + 4.0)) != (0.0, 0.0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_builtins_have_description_and_source(name):
    """Every built-in says what it is and which grid code its numbers come from."""
    c = SERVICES[name]
    assert c.name == name
    assert c.description
    assert c.source


# ieee1547's droop scales with the nominal, so it does not shift: test_ieee1547_at_50_hz_scales_the_droop
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "ieee1547"])
def test_builtins_at_60_hz_shift_by_deviation(name):
    """A 50 Hz built-in asked for at 60 Hz is the same curve moved up by 10 Hz."""
    c50 = get_service(name, 50.0)
    c60 = get_service(name, 60.0)
    assert c60.nominal_hz == 60.0
    np.testing.assert_allclose(c60.f_hz, c50.f_hz + 10.0, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(c60.fraction, c50.fraction)
    for f_hz in np.linspace(48.0, 52.0, 81):
        assert c60.fraction_at(f_hz + 10.0) == approx(c50.fraction_at(f_hz), abs=1e-6)


def test_60_hz_knees_of_dc_and_fcr():
    """DC and FCR at 60 Hz have their knees at 59.8 / 59.5 / 60.2 Hz."""
    dc = get_service("dc", nominal_hz=60.0)
    assert dc.fraction_at(59.8) == approx(0.05, abs=1e-9)
    assert dc.fraction_at(59.5) == approx(1.0, abs=1e-12)
    assert dc.fraction_at(59.985) == approx(0.0, abs=1e-9)
    assert dc.fraction_at(49.8) == 1.0  # a 50 Hz reading on a 60 Hz grid is a huge under-frequency
    fcr = get_service("fcr", 60)
    assert fcr.fraction_at(59.8) == 1.0
    assert fcr.fraction_at(60.2) == -1.0
    assert fcr.fraction_at(60.0) == 0.0
    assert get_service("ffr", 60).trigger_hz == approx(59.7, abs=1e-12)


@PROPERTIES
@given(f_hz=st.floats(min_value=30.0, max_value=80.0, allow_nan=False))
def test_fraction_at_equals_np_interp(f_hz):
    """fraction_at agrees with np.interp over the curve's arrays, the documented oracle."""
    for c in SERVICES.values():
        assert c.fraction_at(f_hz) == approx(float(np.interp(f_hz, c.f_hz, c.fraction)), abs=1e-12)


def test_fraction_at_returns_float_and_propagates_nan():
    """fraction_at returns a plain float, handles infinities and numpy scalars, and passes NaN through."""
    c = get_service("dc")
    y = c.fraction_at(np.float64(49.9))
    assert type(y) is float
    assert c.fraction_at(-math.inf) == 1.0
    assert c.fraction_at(math.inf) == -1.0
    assert math.isnan(c.fraction_at(math.nan))


def test_get_service_is_case_and_separator_insensitive():
    """Names match in any case and with '-' or spaces for '_'."""
    assert get_service("FCR-N") == get_service("fcr_n")
    assert get_service("fcr-d up") == get_service("fcr_d_up")
    assert get_service(" DC_Low ") == get_service("dc_low")
    assert get_service("IEEE-1547") == get_service("ieee1547")


def test_services_mapping_lists_the_builtins():
    """SERVICES holds every built-in at its default nominal and is read-only."""
    assert set(SERVICES) == set(ALL_NAMES)
    assert {"fcr", "fcr_n", "fcr_d_up", "fcr_d_down", "dc", "dc_low", "dc_high", "ieee1547"} <= set(ALL_NAMES)
    assert {"ffr_49.7", "ffr_49.6", "ffr_49.5"} <= set(ALL_NAMES)
    assert SERVICES["ieee1547"].nominal_hz == 60.0
    assert SERVICES["dc"].nominal_hz == 50.0
    with pytest.raises(TypeError):
        SERVICES["dc"] = get_service("fcr")  # type: ignore[index]


def test_curves_are_immutable():
    """A curve's fields and arrays cannot be changed after construction."""
    c = get_service("dc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        c.f_hz[0] = 45.0
    with pytest.raises(ValueError, match="read-only"):
        c.fraction[0] = 0.0
    assert c.f_hz.dtype == np.float64 and c.fraction.dtype == np.float64


def test_points_round_trip():
    """points() gives back pairs that rebuild an equal curve."""
    for c in SERVICES.values():
        meta = {k: getattr(c, k) for k in META_FIELDS}
        again = ServiceCurve.from_points(c.name, c.points(), c.nominal_hz, **meta)
        assert again == c
        assert hash(again) == hash(c)
    assert get_service("dc") != get_service("dc", 60)


def test_override_endurance_with_replace():
    """dataclasses.replace gives a TSO-specific variant and re-validates it."""
    c = dataclasses.replace(get_service("fcr"), endurance_s=1800.0)
    assert c.endurance_s == 1800.0
    assert c.fraction_at(49.8) == 1.0
    with pytest.raises(ServiceError, match="endurance_s=-1"):
        dataclasses.replace(c, endurance_s=-1)


# -- custom curves ------------------------------------------------------------------------------------


def test_from_points_custom_curve():
    """A custom absolute curve interpolates linearly and holds its end values."""
    c = ServiceCurve.from_points("site", [(49.5, 1.0), (50.0, 0.0), (50.5, -1.0)], full_activation_s=10)
    assert c.fraction_at(49.75) == approx(0.5)
    assert c.fraction_at(49.0) == 1.0
    assert c.fraction_at(51.0) == -1.0
    assert c.full_activation_s == 10.0 and isinstance(c.full_activation_s, float)
    assert c.points() == [(49.5, 1.0), (50.0, 0.0), (50.5, -1.0)]


def test_from_points_accepts_an_array():
    """A (n, 2) numpy array is accepted as points."""
    c = ServiceCurve.from_points("arr", np.array([[49.8, 1.0], [50.2, -1.0]]))
    assert c.fraction_at(50.0) == approx(0.0, abs=1e-12)


def test_from_deviation_in_hz_and_mhz_follows_nominal():
    """A curve given by deviations sits around the nominal it is given, in Hz or mHz."""
    dev_hz = [(-0.2, 1.0), (0.2, -1.0)]
    c50 = ServiceCurve.from_deviation("dev", dev_hz, 50.0)
    c60 = ServiceCurve.from_deviation("dev", dev_hz, 60.0)
    cm = ServiceCurve.from_deviation("dev", [(-200, 1.0), (200, -1.0)], 60.0, unit="mHz")
    assert c50.points() == [(49.8, 1.0), (50.2, -1.0)]
    assert c60.fraction_at(59.8) == approx(1.0)
    assert c60.fraction_at(59.9) == approx(0.5)
    assert cm.fraction_at(59.9) == approx(0.5)
    assert cm.nominal_hz == 60.0


def test_from_config_absolute_points():
    """A config with absolute points builds the curve with its nominal and metadata."""
    c = ServiceCurve.from_config(
        {"name": "custom", "nominal_hz": 50, "points": [[49.5, 1.0], [50.5, -1.0]], "endurance_s": 600}
    )
    assert c.name == "custom"
    assert c.fraction_at(50.0) == approx(0.0, abs=1e-12)
    assert c.fraction_at(49.75) == approx(0.5)
    assert c.endurance_s == 600.0


def test_from_config_deviation_points():
    """A config with deviation points in Hz or mHz follows its nominal_hz."""
    c = ServiceCurve.from_config(
        {"name": "d", "nominal_hz": 60, "deviation_points_hz": [[-0.5, 1.0], [0.5, -1.0]]}
    )
    assert c.points() == [(59.5, 1.0), (60.5, -1.0)]
    m = ServiceCurve.from_config({"name": "m", "deviation_points_mhz": [[-500, 1.0], [500, -1.0]]})
    assert m.nominal_hz == 50.0
    assert m.points() == [(49.5, 1.0), (50.5, -1.0)]


def test_from_config_trigger_curve_gets_a_latching_responder():
    """A custom trigger-based curve from config latches and holds like FFR."""
    c = ServiceCurve.from_config(
        {"name": "static", "points": [[49.7, 1.0], [49.71, 0.0]], "trigger_hz": 49.7, "hold_s": 30}
    )
    r = c.responder()
    assert isinstance(r, TriggerResponder)
    assert r.step(49.65, 0.0) == 1.0
    assert r.step(50.0, 29.9) == 1.0
    assert r.step(50.0, 30.1) == 0.0  # no release rate given: drops at once after the hold


# -- errors that name what is wrong -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "match"),
    [
        ([(50.0, 0.0)], r"'bad': points has 1 point\(s\): expected at least 2"),
        ([], r"'bad': points has 0 point\(s\)"),
        ([(50.2, -1.0), (49.8, 1.0)], r"'bad': points\[1\] frequency=49.8 Hz: expected strictly ascending"),
        ([(49.8, 1.0), (49.8, 0.0)], r"points\[1\] frequency=49.8 Hz: expected strictly ascending"),
        ([(49.8, 1.0), (math.nan, 0.0)], r"points\[1\] frequency=nan: expected a finite number"),
        ([(49.8, 1.0), (math.inf, 0.0)], r"points\[1\] frequency=inf: expected a finite number"),
        ([(4.98, 1.0), (50.2, 0.0)], r"points\[0\] frequency=4.98 Hz: expected a frequency in 40.0..70.0 Hz"),
        ([(49.8, 1.0), (502.0, 0.0)], r"points\[1\] frequency=502.0 Hz: expected a frequency in 40.0..70.0"),
        ([(49.8, 1.5), (50.2, 0.0)], r"points\[0\] fraction=1.5: expected a finite number in -1..1"),
        ([(49.8, 1.0), (50.2, math.nan)], r"points\[1\] fraction=nan: expected a finite number in -1..1"),
        ([(49.8, 1.0), (50.2, -1.01)], r"points\[1\] fraction=-1.01"),
        ([(49.8, 1.0), (50.2,)], r"points\[1\]=\(50.2,\): expected a \(frequency, fraction\) pair"),
        ([(49.8, 1.0), (50.2, 0.0, 1.0)], r"points\[1\]=.*: expected a \(frequency, fraction\) pair"),
        ([(49.8, 1.0), ("50.2", 0.0)], r"points\[1\] frequency='50.2': expected a finite number"),
        ([(49.8, 1.0), (50.2, True)], r"points\[1\] fraction=True"),
        ("49.8,1.0", r"points='49.8,1.0': expected a list of \(frequency, fraction\) pairs"),
        (None, r"points=None: expected a list"),
    ],
)
def test_from_points_rejects_bad_points(points, match):
    """Every malformed point list raises a ServiceError naming the curve, the index and the value."""
    with pytest.raises(ServiceError, match=match):
        ServiceCurve.from_points("bad", points)


def test_service_error_is_a_value_error():
    """ServiceError is a ValueError, so generic config handlers catch it."""
    assert issubclass(ServiceError, ValueError)


def test_from_deviation_rejects_bad_deviations():
    """Deviation errors name the deviation key, the value and the absolute frequency it would give."""
    with pytest.raises(ServiceError, match=r"deviation_points_hz\[0\] deviation=-12.0 Hz gives 38.0 Hz"):
        ServiceCurve.from_deviation("x", [(-12.0, 1.0), (0.5, -1.0)], 50.0)
    with pytest.raises(
        ServiceError, match=r"deviation_points_mhz\[1\] deviation=-300.0 mHz: expected strictly"
    ):
        ServiceCurve.from_deviation("x", [(-200, 1.0), (-300, 0.0)], 50.0, unit="mHz")
    with pytest.raises(ServiceError, match=r"unit='kHz': expected 'Hz' or 'mHz'"):
        ServiceCurve.from_deviation("x", [(-0.2, 1.0), (0.2, -1.0)], 50.0, unit="kHz")


@pytest.mark.parametrize("nominal_hz", [55, 0, math.nan, "50", None])
def test_bad_nominal_is_rejected_for_custom_curves(nominal_hz):
    """A custom curve with a nominal other than 50 or 60 Hz is refused with the key named."""
    with pytest.raises(ServiceError, match=r"'x': nominal_hz=.*: expected 50 or 60"):
        ServiceCurve.from_points("x", [(49.8, 1.0), (50.2, -1.0)], nominal_hz)


@pytest.mark.parametrize("nominal_hz", [55, 0, math.nan, "60"])
def test_bad_nominal_is_rejected_for_builtins(nominal_hz):
    """Asking for a built-in at a nominal other than 50 or 60 Hz is refused with the key named."""
    with pytest.raises(ServiceError, match=r"'dc': nominal_hz=.*: expected 50 or 60"):
        get_service("dc", nominal_hz)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"endurance_s": -5}, r"'x': endurance_s=-5: expected a number > 0.0 s"),
        ({"full_activation_s": math.nan}, r"full_activation_s=nan: expected a number or None"),
        ({"hold_s": "5"}, r"hold_s='5': expected a number or None"),
        ({"trigger_hz": 4.97}, r"trigger_hz=4.97: expected a frequency in 40.0..70.0 Hz"),
        ({"ramp_check_fraction": 1.5}, r"ramp_check_fraction=1.5: expected a fraction"),
        ({"release_per_s": 0}, r"release_per_s=0: expected a number > 0.0"),
        ({"description": 3}, r"description=3: expected a string"),
        ({"endurence_s": 900}, r"unknown metadata \['endurence_s'\]"),
        ({"trigger_hz": 50.1}, r"trigger_hz=50.1: the curve's fraction there is 0"),
    ],
)
def test_bad_metadata_is_rejected(meta, match):
    """Out-of-range, mistyped or unknown metadata raises a ServiceError naming the field and value."""
    with pytest.raises(ServiceError, match=match):
        ServiceCurve.from_points("x", [(49.8, 1.0), (50.0, 0.0)], **meta)


def test_bad_name_is_rejected():
    """An empty or non-string curve name is refused."""
    with pytest.raises(ServiceError, match=r"name='': expected a non-empty string"):
        ServiceCurve.from_points("", [(49.8, 1.0), (50.2, -1.0)])
    with pytest.raises(ServiceError, match=r"name=7"):
        ServiceCurve.from_points(7, [(49.8, 1.0), (50.2, -1.0)])  # type: ignore[arg-type]


def test_direct_construction_validates():
    """Building ServiceCurve directly runs the same checks as from_points."""
    with pytest.raises(ServiceError, match=r"expected two 1-D arrays of the same length"):
        ServiceCurve("x", np.array([49.8, 50.2]), np.array([1.0]))
    with pytest.raises(ServiceError, match=r"points\[1\] frequency=49.7 Hz: expected strictly ascending"):
        ServiceCurve("x", np.array([49.8, 49.7]), np.array([1.0, 0.0]))
    c = ServiceCurve("ok", [49.8, 50.2], [1.0, -1.0])  # type: ignore[arg-type]
    assert c.f_hz.flags.writeable is False


def test_unknown_service_lists_known_names():
    """An unknown service name raises a ServiceError that lists every built-in."""
    with pytest.raises(ServiceError, match=r"unknown service 'fcr_x'") as err:
        get_service("fcr_x")
    for name in ALL_NAMES:
        assert repr(name) in str(err.value)
    with pytest.raises(ServiceError, match=r"service name=None: expected a string"):
        get_service(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"name": "c", "pionts": [[49.5, 1.0], [50.5, -1.0]]}, r"'c': unknown key\(s\) \['pionts'\]"),
        ({"name": "c"}, r"'c': expected exactly one of the keys \['points', .*got none"),
        (
            {
                "name": "c",
                "points": [[49.5, 1.0], [50.5, -1.0]],
                "deviation_points_hz": [[-0.5, 1.0], [0.5, -1.0]],
            },
            r"expected exactly one of the keys .*got \['points', 'deviation_points_hz'\]",
        ),
        ({"points": [[49.5, 1.0], [50.5, -1.0]]}, r"key 'name'=None: expected a non-empty string"),
        ({"name": "", "points": [[49.5, 1.0], [50.5, -1.0]]}, r"key 'name'='': expected a non-empty string"),
        ({"name": "c", "nominal_hz": 55, "points": [[49.5, 1.0], [50.5, -1.0]]}, r"'c': nominal_hz=55"),
        ({"name": "c", "points": [[49.5, 1.0], [49.5, -1.0]]}, r"'c': points\[1\] frequency=49.5 Hz"),
        (
            {"name": "c", "deviation_points_hz": [[-0.5, 2.0], [0.5, -1.0]]},
            r"deviation_points_hz\[0\] fraction=2.0",
        ),
        ({"name": "c", "points": [[49.5, 1.0], [50.5, -1.0]], "hold_s": -1}, r"'c': hold_s=-1"),
        ([["name", "c"]], r"service config: expected a mapping"),
    ],
)
def test_from_config_rejects_bad_config(config, match):
    """Every bad config raises a ServiceError naming the curve and the offending key."""
    with pytest.raises(ServiceError, match=match):
        ServiceCurve.from_config(config)


# -- responders ---------------------------------------------------------------------------------------


def test_curve_responder_is_fraction_at():
    """A proportional curve's responder returns fraction_at whatever the time."""
    c = get_service("dc")
    r = c.responder()
    assert isinstance(r, CurveResponder)
    for t_s, f_hz in enumerate(np.linspace(49.3, 50.7, 57)):
        assert r.step(f_hz, float(t_s)) == c.fraction_at(f_hz)
    r.reset()
    assert r.step(49.8, 0.0) == approx(0.05, abs=1e-12)


def test_curve_responder_refuses_hold_overrides():
    """Hold and release overrides are refused for a curve without a trigger."""
    with pytest.raises(ServiceError, match=r"'dc': hold_s/release_per_s apply only to trigger-based"):
        get_service("dc").responder(hold_s=5.0)


def test_ffr_responder_triggers_holds_and_releases():
    """FFR latches full at 49.7 Hz, holds 5 s after recovery, then ramps out at 18 %/s (under Fingrid's 20 %/s)."""
    r = get_service("ffr").responder()
    assert isinstance(r, TriggerResponder)
    assert (r.hold_s, r.release_per_s) == (5.0, 0.18)
    assert r.step(49.80, 0.0) == 0.0  # above the trigger: nothing
    assert r.step(49.71, 0.1) == 0.0
    assert r.step(49.70, 0.2) == 1.0  # reaches the trigger: full
    assert r.step(49.65, 0.3) == 1.0
    assert r.step(49.90, 0.4) == 1.0  # recovered, hold runs until 0.3 + 5 s
    assert r.step(50.00, 5.2) == 1.0
    assert r.step(50.00, 5.3) == approx(1.0)  # hold ends: ramp starts from full
    assert r.step(50.00, 6.3) == approx(0.82)
    assert r.step(50.00, 7.8) == approx(0.55)
    assert r.step(50.00, 10.3) == approx(0.10)
    assert r.step(50.00, 5.3 + 1 / 0.18) == approx(0.0, abs=1e-12)
    assert r.step(50.00, 11.0) == 0.0
    assert r.step(50.00, 100.0) == 0.0


def test_ffr_responder_holds_while_frequency_stays_low():
    """The response stays full as long as the frequency sits at or below the trigger."""
    r = get_service("ffr_49.6").responder()
    for i in range(600):  # 60 s at 100 ms
        assert r.step(49.55, i * 0.1) == 1.0
    assert r.step(49.9, 60.0) == 1.0
    assert r.step(49.9, 64.8) == 1.0
    assert r.step(49.9, 64.9 + 1 / 0.18 + 0.1) == 0.0  # hold ended 64.9 s; 100 % at 18 %/s


def test_ffr_responder_retriggers_during_release():
    """A second dip during the ramp-out latches full again and re-arms the hold."""
    r = get_service("ffr").responder()
    r.step(49.6, 0.0)
    assert r.step(50.0, 6.0) == approx(0.82)
    assert r.step(49.7, 6.1) == 1.0
    assert r.step(50.0, 11.0) == 1.0
    assert r.step(50.0, 12.1) == approx(0.82)


def test_ffr_responder_long_support_override():
    """Long support (30 s hold, no rate limit) holds 30 s and then drops to 0 at once."""
    r = get_service("ffr").responder(hold_s=30.0, release_per_s=math.inf)
    assert r.step(49.6, 0.0) == 1.0
    assert r.step(50.0, 0.1) == 1.0
    assert r.step(50.0, 29.9) == 1.0
    assert r.step(50.0, 30.0) == 0.0


def test_ffr_trigger_levels_are_distinct():
    """A dip to 49.6 Hz triggers the 49.7 and 49.6 levels but not the 49.5 level."""
    assert get_service("ffr_49.7").responder().step(49.6, 0.0) == 1.0
    assert get_service("ffr_49.6").responder().step(49.6, 0.0) == 1.0
    assert get_service("ffr_49.5").responder().step(49.6, 0.0) == 0.0


def test_ffr_responder_ignores_nan_and_resets():
    """NaN neither triggers nor re-arms the hold, and reset() drops a latched activation."""
    r = get_service("ffr").responder()
    assert r.step(math.nan, 0.0) == 0.0
    assert r.step(49.6, 1.0) == 1.0
    assert r.step(math.nan, 5.9) == 1.0
    assert r.step(math.nan, 7.0) == approx(0.82)  # NaN did not extend the hold past 6.0 s
    r.step(49.6, 8.0)
    r.reset()
    assert r.step(50.0, 8.1) == 0.0


def test_ffr_responders_are_independent():
    """Each responder() call returns a fresh state machine."""
    c = get_service("ffr")
    a, b = c.responder(), c.responder()
    assert a.step(49.6, 0.0) == 1.0
    assert b.step(50.0, 0.1) == 0.0


def test_ffr_responder_rejects_bad_overrides():
    """Out-of-range hold or release overrides raise a ServiceError naming the value."""
    c = get_service("ffr")
    with pytest.raises(ServiceError, match=r"'ffr_49.7': hold_s=-1.0"):
        c.responder(hold_s=-1.0)
    with pytest.raises(ServiceError, match=r"release_per_s=0.0"):
        c.responder(release_per_s=0.0)


def test_over_frequency_trigger_latches_charge():
    """A trigger on the charge side latches at or above the trigger and releases symmetrically."""
    c = ServiceCurve.from_points(
        "high_static", [(50.3 - STEP_HZ, 0.0), (50.3, -1.0)], trigger_hz=50.3, hold_s=2.0, release_per_s=0.5
    )
    r = c.responder()
    assert r.step(50.2, 0.0) == 0.0
    assert r.step(50.3, 1.0) == -1.0
    assert r.step(50.0, 2.9) == -1.0
    assert r.step(50.0, 4.0) == approx(-0.5)
    assert r.step(50.0, 6.0) == 0.0


# -- docs/services.md: the tables and examples an integrator reads ----------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "services.md"


def _doc_table(marker: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table right after `<!-- marker -->`, header first."""
    block = re.search(rf"<!-- {re.escape(marker)} -->\n((?:\|.*\|\n?)+)", DOC.read_text())
    assert block, f"docs/services.md lacks the table <!-- {marker} -->"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.group(1).splitlines()]
    return [rows[0]] + rows[2:]  # drop the |---| line


def _doc_table_after(header_start: str) -> list[list[str]]:
    """Body rows of the table whose header line starts with header_start."""
    lines = DOC.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    body = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip().strip("|").split("|")])
    return body


def _doc_number(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_documented_points_are_the_curve_s_points_at_50_and_60_hz(name):
    """docs/services.md's point table of each built-in lists exactly its points at both nominals."""
    rows = _doc_table(f"service-points: {name}")[1:]
    for nominal_hz, column in ((50.0, 1), (60.0, 2)):
        points = get_service(name, nominal_hz).points()
        assert len(rows) == len(points), (name, nominal_hz)
        for row, (f_hz, fraction) in zip(rows, points):
            assert float(row[column]) == approx(f_hz, abs=1e-9), (name, nominal_hz, row)
            assert float(row[3]) == approx(fraction, abs=1e-12), (name, row)


def test_doc_has_a_point_table_for_every_builtin_and_no_other():
    """Every canonical service name has a point table and the summary row names it; no table for another name."""
    doc = DOC.read_text()
    assert sorted(re.findall(r"<!-- service-points: (\S+) -->", doc)) == sorted(ALL_NAMES)
    summary = [row[0] for row in _doc_table_after("| service | grid service |")]
    for name in ALL_NAMES:
        assert any(f"`{name}`" in cell for cell in summary), name
    for alias, canonical in _ALIASES.items():
        assert f"`{alias}` = `{canonical}`" in doc, alias


def test_documented_timing_data_is_the_curve_s_metadata():
    """docs/services.md's timing table gives every built-in's nominal and numeric metadata as the code has it."""
    header, *rows = _doc_table("service-metadata")
    keys = [h.strip("`") for h in header[2:]]
    assert set(keys) == set(META_FIELDS) - {"description", "source"}
    assert [row[0].strip("`") for row in rows] == ALL_NAMES
    for row in rows:
        curve = get_service(row[0].strip("`"))
        assert float(row[1]) == curve.nominal_hz
        for key, cell in zip(keys, row[2:]):
            assert _doc_number(cell) == (None if getattr(curve, key) is None else approx(getattr(curve, key))), (
                curve.name, key)


def test_documented_curve_keys_are_the_config_keys():
    """The key table of a custom curve lists exactly the keys ServiceCurve.from_config accepts."""
    documented = set()
    for row in _doc_table("service-curve-keys")[1:]:
        documented |= {k.strip().strip("`") for k in row[0].split(",")}
    assert documented == set(_CONFIG_KEYS)


def _doc_example(name: str):
    block = re.search(rf"<!-- services-example: {name} -->\n```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert block, f"docs/services.md lacks the example {name}"
    data = yaml.safe_load(block.group(1))
    return build_service(config_from_dict({**data, "fleet": {"random": 1}}).service)


def test_documented_custom_curve_examples_load_and_respond_as_described():
    """Each YAML example of docs/services.md section 6 is a valid config giving the curve the text describes."""
    points = _doc_example("custom-points")
    assert (points.name, points.fraction_at(49.7), points.fraction_at(50.0)) == ("site_fr", approx(0.5), 0.0)
    deviation = _doc_example("custom-deviation")
    assert (deviation.nominal_hz, deviation.fraction_at(59.5), deviation.fraction_at(60.5)) == (60.0, 1.0, -1.0)
    r = _doc_example("custom-trigger").responder()
    assert r.step(50.4, 0.0) == -1.0
    assert r.step(50.0, 9.9) == -1.0
    assert r.step(50.0, 12.5) == approx(-0.5)
    assert r.step(50.0, 15.0) == 0.0
