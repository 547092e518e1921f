"""`v2grt backtest`: the delay model's integral, the plug-in pattern, a journal in the live format, determinism,
--compare, and the backtest against a live demo run (real aggregator and gateway processes) on the same trace slice."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from v2grt import journal
from v2grt.backtest import Backtest, DelayModel, PlugPattern, Settings, ramp_phase, sessions
from v2grt.cli import main
from v2grt.sim.traces import load_trace, sample_trace_path

TRACE = load_trace(sample_trace_path())


def small(tmp_path, name="j", **kw) -> Backtest:
    args = {"trace": TRACE, "service": "fcr", "vehicles": 300, "hours": 0.1, "seed": 5, **kw}
    return Backtest(Settings(**args), tmp_path / name)


# ------------------------------------------------------------------------------------------ the delay model
def test_ramp_phase_integrates_a_ramp_and_hold_exactly():
    """Mean output of a dead time + ramp over a step equals a fine numerical integration of the same path."""
    rng = np.random.default_rng(1)
    p0, target, rate = rng.uniform(-20, 20, 200), rng.uniform(-20, 20, 200), rng.uniform(1.0, 80.0, 200)
    p, energy = p0.copy(), np.zeros(200)
    ramp_phase(p, target, rate, 0.7, energy, np.empty(200))
    t = np.linspace(0.0, 0.7, 70001)
    d = (target - p0)[:, None]
    path = p0[:, None] + np.sign(d) * np.minimum(np.abs(d), rate[:, None] * t[None, :])
    assert np.allclose(energy, np.trapezoid(path, t, axis=1), rtol=0, atol=1e-6)
    assert np.allclose(p, path[:, -1])


def test_a_setpoint_takes_effect_after_the_delay_then_ramps():
    """1 s step, 0.25 s dead time, 10 kW/s: a 0 -> 5 kW setpoint moves nothing for 0.25 s, then ramps 0.5 s."""
    d = DelayModel(1, 1.0, 0.25, 10.0)
    mean = d.advance(np.array([5.0]))
    # 0 for 0.25 s, ramp 0 -> 5 over 0.5 s (1.25 kW s), 5 kW for 0.25 s (1.25 kW s)
    assert mean[0] == pytest.approx(2.5) and d.p_kw[0] == pytest.approx(5.0)
    d = DelayModel(1, 0.1, 0.25, np.inf)  # a delay over two periods: the setpoint of two steps back, 0.05 s in
    means = [d.advance(np.array([4.0]))[0] for _ in range(4)]
    assert means == pytest.approx([0.0, 0.0, 2.0, 4.0])


# ------------------------------------------------------------------------------------------ plug-in pattern
def test_the_plug_in_pattern_has_home_vehicles_in_overnight_and_work_ones_by_day():
    """Night: most home vehicles plugged, no work ones; 11:00: most work ones; sessions of one vehicle never overlap."""
    n = 4000
    s = sessions(n, start_local_h=0.0, duration_s=86400.0, seed=1)
    home = np.zeros(n, bool)
    home[s.vehicle[s.segment == 0]] = True
    night, day = s.plugged_at(n, 3 * 3600.0), s.plugged_at(n, 11 * 3600.0)
    assert night[home].mean() > 0.8 and night[~home].mean() < 0.02
    assert day[~home].mean() > 0.8 and day[home].mean() < 0.05
    for v in np.unique(s.vehicle)[:200]:
        mine = np.flatnonzero(s.vehicle == v)
        order = np.argsort(s.arrive_s[mine])
        assert np.all(s.arrive_s[mine][order][1:] >= s.depart_s[mine][order][:-1])
    assert 0.45 < s.soc_arrive.mean() < 0.6 and PlugPattern().skip == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------ journal, determinism
def test_the_backtest_journal_is_the_live_format_in_simulated_time(tmp_path):
    """One record per step with the trace's UTC time, per-site meters, vehicle frames; the reader reads it."""
    bt = small(tmp_path)
    res = bt.run()
    segs = sorted(res.journal_dir.glob("*.v2j"))
    seg = journal.read_segment(segs[0])
    assert seg.sealed and seg.header["service"] == "fcr" and seg.header["backtest"]["seed"] == 5
    cyc = np.concatenate([journal.read_segment(p).cycles for p in segs])
    assert len(cyc) == bt.steps == 360
    assert cyc["t_ns"][0] == 1552953722 * 10**9  # 2019-03-19T01:02:02+01:00, the trace's first sample
    assert np.all(np.diff(cyc["t_ns"]) == 10**9) and cyc["inverter_kw"].shape[1] == bt.n_sites
    assert np.allclose(cyc["site_measured_kw"][1:], res.steps["measured_kw"][1:])
    # the fleet starts as one already answering the service (warm-up), not from 0 kW
    assert abs(cyc["site_measured_kw"][0] - cyc["target_kw"][0]) < 0.05 * abs(cyc["target_kw"][0])
    assert abs(cyc["target_kw"]).max() > 0 and seg.vehicle_rows > 0
    veh = journal.vehicles_table(seg)
    assert veh.num_rows == seg.vehicle_rows
    first_minute = np.asarray(veh.column("t_ns")) < cyc["t_ns"][0] + 60 * 10**9  # vehicle_interval_s: 60 s
    assert len(set(np.asarray(veh.column("node_id").to_pylist(), object)[first_minute])) == bt.n  # a whole sweep


def test_a_coarse_trace_is_stepped_at_most_every_second(tmp_path):
    """The 10 s sample trace runs at a 1 s period (interpolated), the 1 s one at 1 s, an explicit period as given."""
    coarse = load_trace(sample_trace_path("frequency_deviation_2018-01-05_10s.csv"))
    assert Backtest(Settings(trace=coarse, vehicles=20, hours=0.01), tmp_path / "a").period_s == 1.0
    assert small(tmp_path, "b").period_s == 1.0 and small(tmp_path, "c", period_s=0.1).period_s == 0.1


def test_the_same_seed_gives_the_same_journal_and_another_seed_does_not(tmp_path):
    """Two runs with one seed write identical cycle records and vehicle frames; a third seed differs."""
    def frames(seed, name):
        res = small(tmp_path, name, seed=seed).run()
        cyc = b"".join(journal.read_segment(p).cycles.tobytes() for p in sorted(res.journal_dir.glob("*.v2j")))
        veh = b"".join(pl for p in sorted(res.journal_dir.glob("*.v2j")) for k, pl in journal.read_frames(p)
                       if k == journal.VEHICLES)
        return cyc, veh

    a, b, c = frames(5, "a"), frames(5, "b"), frames(6, "c")
    assert a == b and len(a[0]) > 0 and len(a[1]) > 0
    assert a[0] != c[0]


# ------------------------------------------------------------------------------------------ the command
def test_compare_runs_both_policies_into_one_report(tmp_path, capsys):
    """--compare policy=merit,prorata: two variants in report.json and .png, a journal each; prorata spreads wear."""
    out = tmp_path / "out"
    code = main(["backtest", "--service", "fcr", "--vehicles", "400", "--hours", "0.05", "--compare",
                 "policy=merit,prorata", "--out", str(out), "--price-eur-per-mw-h", "12", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    text = (out / "report.json").read_text()
    doc = json.loads(text)
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: the default ramp limit inf is "inf"
    assert [v["label"] for v in doc["variants"]] == ["policy=merit", "policy=prorata"]
    merit, prorata = doc["variants"]
    assert merit["profile"]["policy"] == "merit" and prorata["profile"]["policy"] == "prorata"
    assert prorata["wear"]["vehicles_carrying_any"] > merit["wear"]["vehicles_carrying_any"]
    assert merit["revenue"]["contracted_eur"] == pytest.approx(12 * merit["capacity_kw"] / 1e3 * 0.05)
    for v in doc["variants"]:
        assert (out / "journal" / v["label"]).is_dir() and v["journal"]["records"] == 180
        assert {"soc_over_time", "vehicles_by_reason", "tracking", "wear", "score"} <= set(v)
    assert (out / "report.png").stat().st_size > 10_000
    assert "policy=prorata" in capsys.readouterr().out


def test_a_bad_profile_key_is_refused_naming_it(tmp_path, capsys):
    """--compare with an unknown profile key: exit 2, the error names the key."""
    code = main(["backtest", "--hours", "0.01", "--vehicles", "10", "--compare", "polcy=merit,prorata",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 2 and "polcy" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ against a live run
def _steady_low_window(duration_s: float) -> float:
    """Start (s from the trace's start) of the window whose highest frequency is lowest: an all-discharge FCR slice."""
    grid = TRACE.resample(1.0)
    w = int(duration_s) + 5
    top = np.lib.stride_tricks.sliding_window_view(grid.f_hz, w).max(axis=1)
    return float(grid.t_s[int(np.argmin(top))] - TRACE.t_s[0])


@pytest.mark.slow
def test_the_backtest_delivers_what_a_live_demo_delivers_on_the_same_slice(tmp_path):
    """A 10 s live demo (aggregator and gateway processes, Modbus meter) and the backtest of its roster over the same
    FCR slice deliver the same mean power within 5 %: the backtest's physics and dispatch are the live ones."""
    start_s, duration_s = _steady_low_window(10.0), 10.0
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "demo", "--protocols", "sim", "--vehicles", "200",
                           "--gateways", "2",
                           "--duration", str(duration_s), "--speed", "1", "--service", "fcr", "--no-live", "--seed",
                           "3", "--trace-start-s", str(start_s), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = json.loads((out / "report.json").read_text())
    live_kw = live["energy_kwh"]["net_discharged"] * 3600.0 / live["duration_s"]
    # the live path: a 100 ms cycle, the meter polled every 5 ms, gateways applying each setpoint at once
    bt = Backtest(Settings(trace=TRACE, service="fcr", roster=out / "roster.csv", hours=duration_s / 3600.0,
                           trace_start_s=live["trace_start_s"], period_s=0.1, delay_s=0.05, ramp_s=0.0,
                           plugs=False, capacity_kw=live["capacity_kw"], seed=3), tmp_path / "bt")
    res = bt.run()
    bt_kw = res.summary["energy_kwh"]["net_discharged"] * 3600.0 / duration_s
    assert live_kw > 0.05 * live["capacity_kw"]  # the slice asks for a real discharge
    assert bt_kw == pytest.approx(live_kw, rel=0.05), (bt_kw, live_kw)
