"""Scoring a journal (v2grt.score): each formula on hand-made signals whose score is known, the journal reader on a
hand-written segment, PJM's composite score, and `v2grt score` end to end on a real aggregator's journal."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from _plant import GATEWAYS, V2GRT, SimGateway, logging_restored, run, short_dir, write_config

from v2grt import journal
from v2grt.aggregator import Aggregator
from v2grt.codes import Reason
from v2grt.config import load_config
from v2grt.score import Series, load_series, score_regulation, score_series
from v2grt.score.metrics import tolerance_band
from v2grt.score.pjm import period_scores
from v2grt.services import get_service
from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

PERIOD_S = 0.1
T0_NS = 1_780_000_200 * 10**9  # a 30-minute boundary (1,780,000,200 = 988,889 x 1800)
CAP_KW = 100.0


def _series(f_hz, delivered_kw, *, period_s=PERIOD_S, base_kw=0.0, available_kw=1e6, episodes=(), t0_ns=T0_NS):
    """A Series of len(f_hz) records one period apart from t0_ns; the delivered power is both columns."""
    n = len(f_hz)
    t_ns = t0_ns + np.arange(n, dtype=np.int64) * int(round(period_s * 1e9))
    d = np.asarray(delivered_kw, float)
    return Series(t_ns=t_ns, f_hz=np.asarray(f_hz, float), capacity_kw=np.full(n, CAP_KW),
                  base_kw=np.full(n, base_kw), delivered_measured_kw=d, delivered_reported_kw=d.copy(),
                  available_dis_kw=np.broadcast_to(np.asarray(available_kw, float), (n,)).copy(),
                  available_chg_kw=np.full(n, 1e6), published=np.ones(n, np.int8), estop=np.zeros(n, np.int8),
                  period_s=period_s, floor_episodes=list(episodes))


def _dc_step(n=600, at=100, until=300, f_low=49.5):
    """DC: nominal, a step to f_low at record `at`, back at `until`; and the response DC asks for, kW."""
    f = np.full(n, 50.0)
    f[at:until] = f_low
    r = np.interp(f, get_service("dc").f_hz, get_service("dc").fraction) * CAP_KW
    return f, r


def test_a_perfect_follower_is_within_tolerance_all_the_time_and_starts_at_once():
    """Delivered = required in the same record: 100 % within tolerance, energy ratio 1, start and full at 0 s."""
    f, r = _dc_step()
    s = score_series(_series(f, r), "dc", settlement_period_s=1800)
    tot = s["total"]
    assert tot["tolerance"]["share"] == 1.0 and tot["tolerance"]["judged_s"] == pytest.approx(60.0)
    assert tot["energy"]["measured"]["total"]["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert tot["energy"]["measured"]["total"]["required_kwh"] == pytest.approx(CAP_KW * 20.0 / 3600.0)
    (ev,) = s["events"]
    assert (ev["start_s"], ev["full_s"], ev["start_ok"], ev["full_ok"]) == (0.0, 0.0, True, True)
    assert ev["required_kw"] == CAP_KW and ev["duration_s"] == pytest.approx(20.0)
    assert tot["availability"]["share"] == 1.0 and tot["soc_floor"]["breaches"] == 0


@pytest.mark.parametrize("delay_records, start_ok, full_ok", [(3, True, True), (15, False, False), (7, False, True)])
def test_a_delayed_follower_has_its_known_start_and_full_times(delay_records, start_ok, full_ok):
    """Delivered = required shifted by k records: start and full both k x 0.1 s, judged against DC's 0.5 s / 1 s."""
    f, r = _dc_step()
    d = np.r_[np.zeros(delay_records), r[:-delay_records]]
    s = score_series(_series(f, d), "dc")
    (ev,) = s["events"]
    assert ev["start_s"] == pytest.approx(delay_records * PERIOD_S, abs=1e-9)
    assert ev["full_s"] == pytest.approx(delay_records * PERIOD_S, abs=1e-9)
    assert (ev["start_ok"], ev["full_ok"]) == (start_ok, full_ok)
    # inside the 1 s band lag: a delay up to 1 s is within tolerance, beyond it the lagging records are not
    share = s["total"]["tolerance"]["share"]
    assert share == 1.0 if delay_records * PERIOD_S <= 1.0 else share == pytest.approx(1 - 2 * 5 / 600)


def test_a_half_power_follower_delivers_half_the_energy_and_never_full():
    """Delivered = required / 2: energy ratio exactly 0.5; the response starts at once and is never full;
    outside the band once the band's 1 s lag has passed."""
    f, r = _dc_step()
    s = score_series(_series(f, r / 2), "dc")
    tot = s["total"]
    assert tot["energy"]["measured"]["total"]["ratio"] == pytest.approx(0.5, abs=1e-12)
    (ev,) = s["events"]
    assert ev["start_s"] == 0.0 and ev["full_s"] is None and ev["full_ok"] is False
    assert ev["peak_progress"] == pytest.approx(0.5)
    # the 40 s at nominal, and the step's first 1 s (the band's lag still holds 0 kW, so half is between); not the rest
    assert tot["tolerance"]["within_s"] == pytest.approx(41.0)
    assert tot["events"]["never_full"] == 1


def test_an_fcr_ramp_with_a_base_schedule_scores_the_response_not_the_base():
    """FCR with base 30 kW: a follower of base + response is 100 % in tolerance; delivering the base alone scores
    energy ratio 0, and falls out of the band once FCR's 30 s lag no longer reaches back before the ramp."""
    f = np.r_[np.full(100, 50.0), np.linspace(50.0, 49.8, 100), np.full(600, 49.8)]  # 10 s, ramp 10 s, 60 s
    r = np.interp(f, get_service("fcr").f_hz, get_service("fcr").fraction) * CAP_KW
    good = score_series(_series(f, 30.0 + r, base_kw=30.0), "fcr")
    assert good["total"]["tolerance"]["share"] == 1.0
    assert good["total"]["energy"]["measured"]["total"]["ratio"] == pytest.approx(1.0)
    lazy = score_series(_series(f, np.full(len(f), 30.0), base_kw=30.0), "fcr")
    assert lazy["total"]["energy"]["measured"]["total"]["ratio"] == 0.0
    # in band while [t - 30 s, t] still holds a record asking <= 3 kW (before ~10.5 s): until ~40.5 s of 80 s
    assert lazy["total"]["tolerance"]["within_s"] == pytest.approx(40.5, abs=0.3)
    assert good["parameters"]["window_s"] == 30.0  # FCR's full activation time is the band's lag


def test_availability_counts_the_time_the_fleet_could_give_its_capacity():
    """Available discharge under the 100 kW capacity for 2 s of 60 s (DC asks both ways): availability 58/60."""
    f, r = _dc_step()
    avail = np.full(600, 150.0)
    avail[200:220] = 80.0
    s = score_series(_series(f, r, available_kw=avail), "dc")
    assert s["total"]["availability"]["available_s"] == pytest.approx(58.0)
    assert s["total"]["availability"]["share"] == pytest.approx(58.0 / 60.0)


def test_settlement_periods_split_on_the_utc_clock():
    """Two minutes of records scored in 1-minute periods: two periods of 60 s each, each with its own event."""
    f = np.full(1200, 50.0)
    f[100:200] = 49.5
    f[700:800] = 49.5
    r = np.interp(f, get_service("dc").f_hz, get_service("dc").fraction) * CAP_KW
    s = score_series(_series(f, r), "dc", settlement_period_s=60)
    assert [p["span_s"] for p in s["periods"]] == [60.0, 60.0]
    assert [p["events"]["count"] for p in s["periods"]] == [1, 1]
    assert s["periods"][1]["start"].endswith(":01:00.000Z") or s["periods"][1]["start"].endswith(":31:00.000Z")


def test_ffr_required_response_latches_and_holds_after_the_dip():
    """FFR (49.7 Hz): a 1 s dip to 49.6 Hz asks for full discharge from the dip until 5 s after its last record, then
    the curve's 18 %/s less; a follower of exactly that is always within a 0.1 % band, one that drops after the dip
    is not."""
    f = np.full(300, 50.0)
    f[50:60] = 49.6  # t = 5.0 .. 5.9 s
    t = np.arange(300) * PERIOD_S
    want = np.where(t < 5.0, 0.0, np.clip(1.0 - 0.18 * (t - 10.9), 0.0, 1.0)) * CAP_KW  # hold ends at 5.9 + 5 s
    good = score_series(_series(f, want), "ffr", tolerance=0.001, window_s=0.0)
    assert good["total"]["tolerance"]["share"] == 1.0
    dip_only = np.r_[np.zeros(50), np.full(10, CAP_KW), np.zeros(240)]
    bad = score_series(_series(f, dip_only), "ffr", tolerance=0.001, window_s=0.0)
    assert bad["total"]["tolerance"]["within_s"] == pytest.approx(30.0 - 5.0 - 1 / 0.18 + 0.1, abs=0.05)


def test_the_tolerance_band_equals_a_brute_force_window_min_max():
    """The sparse-table band equals min/max over [t - w, t] by brute force, with uneven spacing and NaNs."""
    rng = np.random.default_rng(7)
    t = np.cumsum(rng.uniform(0.02, 0.3, 400))
    x = rng.normal(size=400)
    x[rng.random(400) < 0.1] = np.nan
    lo, hi = tolerance_band(t, x, 1.3, 0.25)
    for i in range(400):
        w = x[(t >= t[i] - 1.3) & (t <= t[i])]
        w = w[np.isfinite(w)]
        if not len(w):
            assert np.isnan(lo[i]) and np.isnan(hi[i])
        else:
            assert (lo[i], hi[i]) == (w.min() - 0.25, w.max() + 0.25)


def _write_segment(path, cycles: np.ndarray, node_ids, vehicle_frames, header_extra=None):
    """A journal segment written frame by frame in the journal's format (v2grt.journal.format)."""
    header = {"format": journal.FORMAT_VERSION, "fleet_id": "t", "epoch": 1, "period_s": PERIOD_S,
              "segment_start_ns": T0_NS, "segment_end_ns": T0_NS + 3600 * 10**9, "dtype": cycles.dtype.descr,
              "reason_names": journal.REASON_NAMES, "inverters": [], "service": "dc", "capacity_kw": CAP_KW,
              **(header_extra or {})}
    roster = {"version": 0, "node_ids": node_ids, "site": [0] * len(node_ids), "site_ids": ["site1"]}
    with open(path, "wb") as fh:
        fh.write(journal.MAGIC)
        fh.write(journal.frame(journal.HEADER, json.dumps(header).encode()))
        fh.write(journal.frame(journal.ROSTER, json.dumps(roster).encode()))
        fh.write(journal.frame(journal.CYCLES, cycles.tobytes()))
        for t_ns, rows, sp, p, reason in vehicle_frames:
            rows = np.asarray(rows, "<u4")
            payload = b"".join((journal.format._VEH_HEAD.pack(t_ns, 0, 0, len(rows)), rows.tobytes(),
                                np.asarray(sp, "<f4").tobytes(), np.asarray(p, "<f4").tobytes(),
                                np.asarray(reason, "u1").tobytes()))
            fh.write(journal.frame(journal.VEHICLES, payload))
        fh.write(journal.frame(journal.END, b"{}"))


def test_a_soc_floor_breach_read_from_the_vehicle_samples_is_counted_once(tmp_path):
    """A vehicle at SOC_BELOW_MINIMUM reporting discharge over 4 changing samples (4 s) is one breach; a 1 s touch
    by another is a touch, not a breach (grace 2 s); the cycle records and base schedule are read back."""
    n = 100
    c = np.zeros(n, journal.cycle_dtype(0))
    c["t_ns"] = T0_NS + np.arange(n, dtype=np.int64) * 10**8
    c["f_hz"], c["capacity_kw"], c["published"] = 50.0, CAP_KW, 1
    c["request_kw"] = 20.0  # base schedule 20 kW, no response at nominal
    c["delivered_kw"], c["site_measured_kw"] = 20.0, np.nan
    c["available_dis_kw"] = c["available_chg_kw"] = 500.0
    below, ok = int(Reason.SOC_BELOW_MINIMUM), int(Reason.OK)
    s = 10**9
    frames = [(T0_NS + 1 * s, [0, 1], [0, 0], [5.0, 3.0], [below, below]),  # both at the floor, discharging
              (T0_NS + 2 * s, [0, 1], [0, 0], [4.0, 0.0], [below, below]),  # 1 stops: its touch lasted 1 s
              (T0_NS + 3 * s, [0], [0], [3.0], [below]),
              (T0_NS + 4 * s, [0], [0], [2.0], [below]),
              (T0_NS + 5 * s, [0], [0], [0.0], [ok])]  # 0 stops after 4 s
    d = tmp_path / "j"
    d.mkdir()
    _write_segment(d / "t-20260604T000000Z-e1.v2j", c, ["EV_A", "EV_B"], frames)
    series = load_series(d)
    assert len(series.t_ns) == n and np.all(series.base_kw == 20.0) and np.isnan(series.delivered_measured_kw).all()
    assert sorted(series.floor_episodes) == [("EV_A", T0_NS + s, T0_NS + 5 * s), ("EV_B", T0_NS + s, T0_NS + 2 * s)]
    out = score_series(series, "dc")
    assert out["delivered_source"] == "reported"
    assert (out["total"]["soc_floor"]["breaches"], out["total"]["soc_floor"]["touches"]) == (1, 2)
    assert out["soc_floor_breaches"] == [{"node_id": "EV_A", "start": out["soc_floor_breaches"][0]["start"],
                                          "duration_s": 4.0}]
    assert out["total"]["tolerance"]["share"] == 1.0  # base delivered, nothing asked at nominal


# ------------------------------------------------------------------------------------------ PJM
def _reg(n=360 + 30, delay=0, gain=1.0):
    """An hour and 5 min of 10 s samples of a sinusoidal regulation signal, and a response delayed/scaled."""
    k = np.arange(n + delay)
    x = np.sin(2 * np.pi * k / 37.0) * 0.8
    y = gain * np.r_[np.zeros(delay), x[: n]] if delay else gain * x[:n]
    return x[:n], y[:n]


def test_pjm_scores_a_perfect_follower_one():
    """Response = signal: accuracy, delay and precision 1, composite 1, pass."""
    x, y = _reg()
    sc = period_scores(x[:360], y[:360], y_after=y[360:])
    assert (sc["accuracy"], sc["delay"], sc["precision"], sc["composite"]) == (pytest.approx(1.0),) * 3 + (
        pytest.approx(1.0),)
    assert sc["windows"] == 12 and sc["pass"] is True


def test_pjm_finds_a_known_delay_and_a_known_precision():
    """A 60 s delayed copy: accuracy 1 at delta 60 s, delay score |60 - 300| / 300 = 0.8; a half-gain copy:
    precision exactly 0.5, composite (1 + 1 + 0.5) / 3."""
    x, y = _reg(delay=6)
    sc = period_scores(x[:360], y[:360], y_after=y[360:])
    assert sc["accuracy"] == pytest.approx(1.0) and sc["delay"] == pytest.approx(0.8)
    assert sc["mean_delay_s"] == 60.0 and sc["precision"] < 1.0
    x, y = _reg(gain=0.5)
    sc = period_scores(x[:360], y[:360], y_after=y[360:])
    assert sc["precision"] == pytest.approx(0.5) and sc["composite"] == pytest.approx(2.5 / 3)
    assert sc["pass"] is True


def test_regulation_from_a_series_reads_the_signal_from_the_base_schedule():
    """A journal whose base schedule follows the signal and whose delivered power follows the base: composite 1;
    an idle fleet (0 kW) scores accuracy and delay 0, precision near 0, and fails."""
    n = 65 * 60 * 10  # 65 min at 0.1 s
    t = np.arange(n) * PERIOD_S
    base = 50.0 * np.sin(2 * np.pi * t / 370.0)
    s = _series(np.full(n, np.nan), base, base_kw=0.0)
    s.base_kw = base.copy()
    out = score_regulation(s, settlement_period_s=3600)
    assert out["regulation_capacity_kw"] == pytest.approx(50.0, rel=1e-3)
    assert out["periods"][0]["composite"] == pytest.approx(1.0, abs=1e-6) and out["total"]["pass"] is True
    s.delivered_measured_kw[:] = 0.0
    s.delivered_reported_kw[:] = 0.0
    bad = score_regulation(s, settlement_period_s=3600)
    p = bad["periods"][0]
    assert (p["accuracy"], p["delay"]) == (0.0, 0.0) and p["precision"] < 0.1 and bad["total"]["pass"] is False


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def sockets():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_v2grt_score_on_a_real_aggregator_journal(tmp_path, sockets):
    """A real aggregator journals 3 s of DC at 49.7 Hz with gateways that follow: `v2grt score` writes score.json
    and score.png, scores every record, finds the excursion and the vehicles' reported energy; a --signal (reg) run
    writes its own score; a bad period is refused with exit 2."""
    meter = SunSpecMeter(203, f_hz=49.7)  # DC asks 37 % of capacity: an excursion
    sim = SimServerThread([meter]).start()
    jdir = tmp_path / "j"
    cfg = load_config(write_config(tmp_path, sockets, meter_port=sim.port(meter),
                                   journal={"enabled": True, "dir": str(jdir), "parquet": False}))
    with logging_restored():
        agg = Aggregator(cfg, epoch=6)
        agg.start()
        gws = [SimGateway(g, cfg.bus.setpoints, cfg.bus.telemetry) for g in GATEWAYS]
        for g in gws:
            g.start()
        try:
            time.sleep(3.0)
        finally:
            agg.stop()
            for g in gws:
                g.stop()
            sim.stop()
    out = tmp_path / "out"
    r = run(V2GRT, "score", str(jdir), "--service", "dc", "--settlement-period", "30min", "--out", str(out))
    assert r.returncode == 0, r.stderr
    score = json.loads((out / "score.json").read_text())
    assert (out / "score.png").stat().st_size > 20_000
    recs = sum(len(journal.read_segment(p).cycles) for p in jdir.glob("*.v2j"))
    assert sum(p["records"] for p in score["periods"]) == recs == score["total"]["records"]
    assert score["service"] == "dc" and score["journal_service"] == "dc" and score["capacity_kw"] == 40.0
    assert score["delivered_source"] == "reported"  # no inverter configured
    en = score["total"]["energy"]["reported"]["total"]
    assert en["required_kwh"] > 0 and 0.5 < en["ratio"] <= 1.01  # the gateways follow their setpoints
    assert score["total"]["events"]["count"] >= 1 and score["total"]["availability"]["share"] > 0.5
    assert "total" in r.stdout and "score.json" in r.stdout

    sig = tmp_path / "signal.csv"  # a constant +0.5 regulation signal over the run, in Unix seconds
    t_first = min(int(journal.read_segment(p).cycles["t_ns"][0]) for p in jdir.glob("*.v2j")) / 1e9
    sig.write_text(f"time,signal\n{t_first - 1:.3f},0.5\n")
    r = run(V2GRT, "score", str(jdir), "--signal", str(sig), "--capacity-kw", "40", "--out", str(tmp_path / "reg"))
    assert r.returncode == 0, r.stderr
    reg = json.loads((tmp_path / "reg" / "score.json").read_text())
    assert reg["service"] == "reg" and reg["signal_source"] == str(sig) and (tmp_path / "reg" / "score.png").exists()
    assert reg["total"]["windows"] == 0  # 3 s holds no whole 5-minute window: scored nothing, said so

    r = run(V2GRT, "score", str(jdir), "--service", "dc", "--settlement-period", "soon", "--out", str(out))
    assert r.returncode == 2 and "--settlement-period" in r.stderr
