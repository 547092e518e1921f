"""Tests of the frequency traces (v2grt.sim.traces): the real sample files, quirks, synthetic and scripted traces."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v2grt.sim import traces
from v2grt.sim.traces import (
    DEFAULT_SAMPLE_TRACE,
    SAMPLE_TRACES,
    Trace,
    TraceError,
    fcr_d_ramp_trace,
    load_trace,
    ramp_trace,
    sample_trace_path,
    step_trace,
    synthetic_trace,
)

CE_1S, DEV_10S = SAMPLE_TRACES
SHA256 = {
    CE_1S: "9c78aa8a87f67136cfbbab07d1bda63ddeb7924780132d942080c74d6885e288",
    DEV_10S: "05a4a495e63844c61d9561fb1a99c1648ffc82b556e9c76248c166acf5bb2ad6",
}


def write(tmp_path: Path, text: str | bytes, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


@pytest.fixture(scope="module")
def ce_1s() -> Trace:
    return load_trace(sample_trace_path(CE_1S))


@pytest.fixture(scope="module")
def dev_10s() -> Trace:
    return load_trace(sample_trace_path(DEV_10S))


# ------------------------------------------------------------------------------- sample files
@pytest.mark.parametrize("name", SAMPLE_TRACES)
def test_sample_files_are_unchanged_copies(name):
    """The packaged sample files are byte-for-byte the published files (hashes from v2grt/data/README.md)."""
    path = sample_trace_path(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[name]
    assert SHA256[name] in (path.parent / "README.md").read_text(encoding="utf-8")


def test_default_sample_is_the_continental_europe_1s_file():
    """sample_trace_path() with no name gives the CE 1 s PMU file, the demo's default."""
    assert DEFAULT_SAMPLE_TRACE == "frequency_ce_2019-03-19_1s.csv"
    assert sample_trace_path() == sample_trace_path(CE_1S)
    assert sample_trace_path().read_bytes().startswith(b"\xef\xbb\xbfTime;")


def test_unknown_sample_name_lists_the_known_ones():
    """An unknown sample name is a TraceError listing the available files."""
    with pytest.raises(TraceError, match=DEV_10S):
        sample_trace_path("frequency.csv")


def test_ce_1s_file_loads_with_its_quirks(ce_1s):
    """The two-phase 1 s file: 19,305 rows, 469 null samples skipped, gaps counted, range 49.930..50.107 Hz."""
    assert len(ce_1s) == 19305  # no row has both phases null, so every row gives a sample
    assert ce_1s.n_null == 469
    assert ce_1s.dt_s == 1.0
    assert ce_1s.n_gaps == 5914  # steps over 1.5 s: the file is "1 s" with many short gaps
    assert ce_1s.kind == "hz"
    assert round(float(ce_1s.f_hz.min()), 3) == 49.930
    assert round(float(ce_1s.f_hz.max()), 3) == 50.107
    assert ce_1s.start == dt.datetime(2019, 3, 19, 1, 2, 2, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert ce_1s.t_s[0] == 0.0
    assert ce_1s.duration_s == 11 * 3600 + 4 * 60 + 35  # 01:02:02 to 12:06:37
    assert np.all(np.diff(ce_1s.t_s) >= 1.0)


def test_two_phase_rows_average_the_valid_phases(ce_1s):
    """A row's frequency is the mean of its valid phases, or the one valid phase where the other is null."""
    # Rows 2-3 of the file: both phases valid.
    assert ce_1s.f_hz[0] == pytest.approx((49.962967 + 49.963089) / 2, abs=1e-12)
    # 2019-03-19T01:02:58+01:00;49.986916;null -> phase A only
    i = int(np.flatnonzero(ce_1s.t_s == 56.0)[0])
    assert ce_1s.f_hz[i] == pytest.approx(49.986916, abs=1e-12)
    # 2019-03-19T01:04:56+01:00;null;49.964497 -> phase B only
    i = int(np.flatnonzero(ce_1s.t_s == 174.0)[0])
    assert ce_1s.f_hz[i] == pytest.approx(49.964497, abs=1e-12)


def test_deviation_file_is_detected_as_mhz(dev_10s):
    """The headerless 10 s file is a deviation in mHz: 5,000 rows, -51.2..+60.7 mHz -> 49.9488..50.0607 Hz."""
    assert len(dev_10s) == 5000  # the shared README's 4,999 is wc -l: no newline after the last row
    assert dev_10s.kind == "mhz"
    assert dev_10s.n_null == 0 and dev_10s.n_gaps == 0
    assert dev_10s.dt_s == 10.0
    assert float(dev_10s.f_hz.min()) == pytest.approx(49.9488, abs=1e-9)
    assert float(dev_10s.f_hz.max()) == pytest.approx(50.0607, abs=1e-9)
    assert dev_10s.f_hz[0] == pytest.approx(50.0248, abs=1e-12)  # first row: 24.8 mHz
    assert dev_10s.start == dt.datetime(2018, 1, 5) and dev_10s.start.tzinfo is None
    assert dev_10s.duration_s == 49990.0
    np.testing.assert_allclose(dev_10s.deviation_mhz()[:3], [24.8, 12.0, 5.1], atol=1e-9)


def test_kind_and_nominal_override_detection():
    """kind= overrides detection and nominal_hz= sets the base of a deviation file."""
    at_60 = load_trace(sample_trace_path(DEV_10S), kind="mhz", nominal_hz=60.0)
    assert float(at_60.f_hz.min()) == pytest.approx(59.9488, abs=1e-9)
    assert at_60.nominal_hz == 60.0
    with pytest.raises(TraceError, match=r":1: column 2: 24\.8 read as hz is 24\.8000 Hz, outside 45\.\.55"):
        load_trace(sample_trace_path(DEV_10S), kind="hz")


# ------------------------------------------------------------------------------------ quirks
def test_bom_and_header_are_handled(tmp_path):
    """A UTF-8 BOM before the header neither breaks header detection nor the first time."""
    body = "Time;Freq\n2020-01-01T00:00:00+00:00;50.01\n2020-01-01T00:00:01+00:00;50.02\n"
    with_bom = load_trace(write(tmp_path, b"\xef\xbb\xbf" + body.encode(), "bom.csv"))
    without = load_trace(write(tmp_path, body, "plain.csv"))
    np.testing.assert_array_equal(with_bom.f_hz, [50.01, 50.02])
    np.testing.assert_array_equal(with_bom.t_s, without.t_s)
    assert with_bom.start == without.start


def test_gaps_are_counted_and_the_time_axis_kept(tmp_path):
    """Missing seconds stay missing: the time axis is the real one and each long step is one gap."""
    rows = [(0, 50.0), (1, 50.01), (2, 50.02), (5, 50.03), (6, 50.04), (10, 50.05)]
    text = "".join(f"2020-01-01 00:00:{s:02d},{(f - 50) * 1000:.1f}\n" for s, f in rows)
    trace = load_trace(write(tmp_path, text))
    np.testing.assert_array_equal(trace.t_s, [0, 1, 2, 5, 6, 10])
    assert trace.n_gaps == 2
    assert trace.dt_s == 1.0
    assert trace.at(3.5) == pytest.approx(50.025)  # bridged linearly inside the gap


def test_null_and_empty_samples_are_skipped_and_counted(tmp_path):
    """null and empty phase fields are skipped (counted per field); a row with no valid phase is dropped."""
    text = ("time;f_a_Hz;f_b_Hz\n"
            "2020-01-01T00:00:00Z;50.000;50.002\n"
            "2020-01-01T00:00:01Z;null;50.010\n"
            "2020-01-01T00:00:02Z;;\n"
            "2020-01-01T00:00:03Z;49.990;NULL\n"
            "2020-01-01T00:00:04Z;49.980;49.982\n")
    trace = load_trace(write(tmp_path, text))
    assert trace.n_null == 4
    np.testing.assert_array_equal(trace.t_s, [0.0, 1.0, 3.0, 4.0])
    np.testing.assert_allclose(trace.f_hz, [50.001, 50.010, 49.990, 49.981], atol=1e-12)
    assert trace.n_gaps == 1  # the dropped all-null row leaves a gap
    assert trace.start.utcoffset() == dt.timedelta(0)


def test_headerless_hz_file_is_not_taken_for_mhz(tmp_path):
    """Values near 50 with no header are absolute Hz, not a 50 mHz deviation (the Hz band is checked first)."""
    text = "2020-01-01 00:00:00;49,98\n2020-01-01 00:00:01;50,01\n"  # decimal commas, as in EU exports
    trace = load_trace(write(tmp_path, text))
    assert trace.kind == "hz"
    np.testing.assert_allclose(trace.f_hz, [49.98, 50.01])


def test_header_unit_decides_the_kind(tmp_path):
    """A column named in mHz is a deviation even where its values would pass for Hz."""
    text = "time,deviation_mHz\n2020-01-01 00:00:00,50.0\n2020-01-01 00:00:10,45.0\n"
    trace = load_trace(write(tmp_path, text))
    assert trace.kind == "mhz"
    np.testing.assert_allclose(trace.f_hz, [50.05, 50.045])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("2020-01-01 00:00:00,10.0\n2020-01-01 00:00:10,abc\n2020-01-01 00:00:20,5.0\n",
         r":2: column 2: 'abc' is not a number"),
        (("Time;Freq\n2020-01-01T00:00:00+01:00;50.0\n2020-01-01T00:00:01+01:00;50.0\n"
          "2020-01-01T25:00:02+01:00;50.0\n"),
         r":4: column 1 \('Time'\): '2020-01-01T25:00:02\+01:00' is not a time"),
        ("2020-01-01 00:00:00,10.0\n2020-01-01 00:00:10,11.0,12.0\n", r":2: found 3 fields"),
        ("2020-01-01 00:00:00,10.0\n2020-01-01 00:00:10,inf\n", r":2: column 2: 'inf' is not a number"),
        ("2020-01-01 00:00:00,10.0\n2020-01-01 00:00:10,11.0\n2020-01-01 00:00:05,12.0\n",
         r":3: column 1: time 5 s after the first does not increase \(line 2 was at 10 s\)"),
        ("2020-01-01T00:00:00+00:00,10.0\n2020-01-01 00:00:10,11.0\n",
         r":2: column 1: '2020-01-01 00:00:10' mixes times with and without a UTC offset"),
        ("2020-01-01 00:00:00,10.0\n2020-01-01 00:00:10,5000\n", r"cannot tell the unit"),
    ],
)
def test_bad_row_names_file_line_column_and_value(tmp_path, text, where):
    """An unparsable or inconsistent row is a TraceError naming the file, line, column and value."""
    path = write(tmp_path, text)
    with pytest.raises(TraceError, match=where) as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_non_utf8_file_is_a_trace_error(tmp_path):
    """A Latin-1 export is refused with the line and byte, not a UnicodeDecodeError."""
    path = write(tmp_path, "Zeit;Frequenz\n2020-01-01 00:00:00;50,0 Hz \xb1\n".encode("latin-1"))
    with pytest.raises(TraceError, match=r":2: byte 0xb1"):
        load_trace(path)


def test_too_few_samples_is_a_trace_error(tmp_path):
    """A file with one valid sample cannot make a trace."""
    with pytest.raises(TraceError, match="1 valid sample"):
        load_trace(write(tmp_path, "2020-01-01 00:00:00,1.0\n2020-01-01 00:00:01,null\n"))


# ----------------------------------------------------------------------------------- at/resample
def test_at_interpolates_and_holds_the_ends():
    """at() interpolates linearly between samples and holds the first and last values outside."""
    trace = Trace(t_s=np.array([0.0, 10.0, 20.0]), f_hz=np.array([50.0, 50.1, 49.9]), source="test")
    assert trace.at(5.0) == pytest.approx(50.05)
    assert trace.at(15.0) == pytest.approx(50.0)
    assert trace.at(-3.0) == 50.0 and trace.at(99.0) == 49.9
    assert isinstance(trace.at(5.0), float)
    np.testing.assert_allclose(trace.at(np.array([0.0, 10.0, 20.0])), [50.0, 50.1, 49.9])


def test_at_looped_wraps_around():
    """With looped=True time wraps at duration + one step, closing the loop back to the first value."""
    trace = Trace(t_s=np.array([0.0, 10.0, 20.0]), f_hz=np.array([50.0, 50.1, 49.9]), source="test")
    assert trace.period_s == 30.0
    assert trace.at(35.0, looped=True) == pytest.approx(trace.at(5.0))
    assert trace.at(25.0, looped=True) == pytest.approx(49.95)  # halfway from the last back to the first
    assert trace.at(30.0 * 1000 + 10.0, looped=True) == pytest.approx(50.1)
    assert trace.at(-5.0, looped=True) == pytest.approx(49.95)
    assert trace.at(25.0) == 49.9  # not looped: held


def test_trace_arrays_are_read_only_and_validated():
    """A Trace owns read-only arrays and refuses times that do not increase."""
    t = np.array([0.0, 1.0, 2.0])
    trace = Trace(t_s=t, f_hz=np.array([50.0, 50.0, 50.0]), source="test")
    t[1] = 5.0  # the caller's array stays theirs
    assert trace.t_s[1] == 1.0
    with pytest.raises(ValueError):
        trace.f_hz[0] = 1.0
    with pytest.raises(TraceError, match="increase strictly"):
        Trace(t_s=np.array([0.0, 1.0, 1.0]), f_hz=np.array([50.0, 50.0, 50.0]), source="test")


def test_resample_on_a_uniform_grid(ce_1s):
    """resample() puts the trace on a uniform grid over the same span, through the same values."""
    r = ce_1s.resample(0.5)
    assert r.dt_s == 0.5
    assert len(r) == int(ce_1s.duration_s / 0.5) + 1
    np.testing.assert_allclose(np.diff(r.t_s), 0.5)
    np.testing.assert_allclose(r.at(ce_1s.t_s[::97]), ce_1s.f_hz[::97], atol=1e-12)
    assert r.n_null == ce_1s.n_null and "resampled at 0.5 s" in r.source


# ---------------------------------------------------------------------------- synthetic/scripted
def test_synthetic_is_reproducible_and_plausible():
    """Same seed, same trace; the trace wanders ~20 mHz around nominal and stays in a plausible band."""
    a = synthetic_trace(6 * 3600.0, 1.0, seed=7)
    b = synthetic_trace(6 * 3600.0, 1.0, seed=7)
    c = synthetic_trace(6 * 3600.0, 1.0, seed=8)
    np.testing.assert_array_equal(a.f_hz, b.f_hz)
    assert not np.array_equal(a.f_hz, c.f_hz)
    assert len(a) == 6 * 3600 + 1 and a.dt_s == 1.0
    dev = a.f_hz - 50.0
    assert 0.010 < dev.std() < 0.040
    assert abs(dev.mean()) < 0.030
    assert np.all(np.abs(dev) < 0.5)
    assert np.abs(np.diff(dev)).max() < 0.05  # no jumps: frequency moves with the system's inertia
    assert 0.6 < np.corrcoef(dev[:-60], dev[60:])[0, 1] < 0.9  # minutes-long wander, as the CE data


def test_synthetic_follows_its_nominal_and_has_excursions():
    """A 60 Hz synthetic trace centres on 60 Hz, and excursions reach beyond the OU wander."""
    t60 = synthetic_trace(3600.0, 0.1, seed=1, nominal_hz=60.0)
    assert abs(np.median(t60.f_hz) - 60.0) < 0.05
    quiet = synthetic_trace(4 * 3600.0, 1.0, seed=3, excursion_rate_per_h=0.0)
    busy = synthetic_trace(4 * 3600.0, 1.0, seed=3, excursion_rate_per_h=20.0)
    assert np.abs(busy.f_hz - 50.0).max() > np.abs(quiet.f_hz - 50.0).max() + 0.02


@settings(max_examples=30, deadline=None)
@given(a=st.floats(0.0, 0.99999), n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_blocked_ar1_equals_the_recursion(a, n, seed):
    """The vectorised AR(1) equals x[k] = a x[k-1] + e[k] evaluated one step at a time."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(n)
    x0 = float(rng.standard_normal())
    want = np.empty(n)
    x = x0
    for k in range(n):
        x = a * x + e[k]
        want[k] = x
    np.testing.assert_allclose(traces._ar1(e, a, x0), want, rtol=1e-9, atol=1e-9)


def test_fcr_d_ramp():
    """The FCR-D up test ramp holds 49.9 Hz, falls at 0.24 Hz/s to 49.0 Hz in 3.75 s and holds; down mirrors it."""
    up = fcr_d_ramp_trace(hold_before_s=10.0, hold_after_s=30.0)
    assert up.at(0.0) == 49.9 and up.at(10.0) == 49.9
    assert up.at(11.0) == pytest.approx(49.9 - 0.24)
    assert up.at(13.75) == pytest.approx(49.0, abs=1e-12)
    assert up.at(40.0) == pytest.approx(49.0) and up.duration_s == pytest.approx(43.75)
    slope = np.diff(up.f_hz) / np.diff(up.t_s)
    ramping = (up.t_s[1:] > 10.0) & (up.t_s[1:] <= 13.75)
    np.testing.assert_allclose(slope[ramping], -0.24, rtol=1e-9)
    down = fcr_d_ramp_trace("down", hold_before_s=10.0, hold_after_s=30.0)
    np.testing.assert_array_equal(down.t_s, up.t_s)
    np.testing.assert_allclose(down.f_hz - 50.0, 50.0 - up.f_hz, atol=1e-9)
    with pytest.raises(TraceError, match="direction"):
        fcr_d_ramp_trace("sideways")


def test_step_trace_holds_each_value_from_its_time():
    """A scripted step trace gives each value from its time on, exactly at the step times."""
    trace = step_trace([(5.0, 49.8), (7.3, 50.2), (7.33, 50.0)], dt_s=0.1, end_s=20.0)
    assert trace.at(0.0) == 49.8  # before the first point: the first value
    assert trace.at(7.3) == 50.2 and trace.at(7.33) == 50.0
    assert trace.at(7.0) == 49.8 and trace.at(19.9) == 50.0
    assert trace.duration_s == pytest.approx(20.0) and trace.dt_s == 0.1
    assert set(np.unique(trace.f_hz)) == {49.8, 50.2, 50.0}


def test_ramp_trace_is_piecewise_linear():
    """A scripted ramp passes through its points and interpolates between them."""
    trace = ramp_trace([(0.0, 50.0), (2.0, 50.2), (4.0, 50.0)], dt_s=0.5, end_s=6.0)
    assert trace.at(1.0) == pytest.approx(50.1)
    assert trace.at(3.0) == pytest.approx(50.1)
    assert trace.at(6.0) == 50.0


@pytest.mark.parametrize(
    ("points", "message"),
    [([], "no points"), ([(1.0, 50.0), (1.0, 50.1)], "does not follow"), ([(0.0, math.nan)], "f_hz=nan"),
     ([(-1.0, 50.0)], "t_s=-1.0")],
)
def test_scripted_trace_rejects_bad_points(points, message):
    """Bad script points are a TraceError naming the point."""
    with pytest.raises(TraceError, match=message):
        step_trace(points)
