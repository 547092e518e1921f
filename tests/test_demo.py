"""`v2grt demo` end to end at small scale: real processes (aggregator, gateways of every protocol, simulated
stations and chargers), real Modbus, websockets and ZeroMQ on loopback; the report it writes, and that no
process it started outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

VEHICLES, GATEWAYS = 400, 2
#: the mix: 40 EVSEs behind OCPP (20 stations, two of them misbehaving), 40 chargers behind SunSpec
OCPP_VEHICLES = SUNSPEC_VEHICLES = 40
MIX = ["--ocpp-vehicles", str(OCPP_VEHICLES), "--sunspec-vehicles", str(SUNSPEC_VEHICLES)]
#: processes a mixed demo starts: the sim gateways, two per other protocol (gateway + devices), the aggregator
MIX_CHILDREN = GATEWAYS + 2 + 2 + 1


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (every child of a demo names its out dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def demo_cmd(out: Path, duration: float, *extra: str) -> list[str]:
    """The demo with the default mix of protocols at small scale (``extra``: more flags, e.g. --protocols sim)."""
    return [sys.executable, "-m", "v2grt.cli", "demo", "--vehicles", str(VEHICLES), "--gateways", str(GATEWAYS),
            *MIX, "--duration", str(duration), "--no-live", "--seed", "7", "--out", str(out), *extra]


def wait_gone(marker: str, timeout_s: float = 5.0) -> list[int]:
    end = time.monotonic() + timeout_s
    while (left := processes_mentioning(marker)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def run_demo(out: Path, duration: float, *extra: str) -> tuple[dict, str]:
    """Run a demo to the end (exit 0 asserted); its report.json and what it printed."""
    proc = subprocess.run(demo_cmd(out, duration, *extra), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "everything is up" in proc.stdout
    return json.loads((out / "report.json").read_text()), proc.stdout


def test_small_demo_runs_dispatches_and_leaves_no_process(tmp_path):
    """--protocols sim (the demo as it was: sim gateways only), 400 vehicles, 2 gateways, 8 s: exit 0, a PNG
    and a JSON whose numbers show the fleet carrying the service's power, every vehicle accounted for, a clean
    stop and no process left behind."""
    out = tmp_path / "demo-out"
    s, _ = run_demo(out, 8, "--protocols", "sim")
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 20_000 < len(png) < 300_000
    assert s["vehicles"] == VEHICLES and s["gateways"] == GATEWAYS and not s["interrupted"]
    assert list(s["protocols"]) == ["sim"] and s["protocols"]["sim"]["vehicles"] == VEHICLES
    assert not (out / "ocpp").exists() and not (out / "sunspec").exists()
    assert s["duration_s"] > 7.5  # ran its whole duration (load can only make it longer)
    assert s["cycles"] > 0 and s["status_samples"] > 0
    assert s["capacity_kw"] > 1000.0  # sized to the fleet: 400 vehicles of 7.4-22 kW
    tr = s["tracking"]
    assert tr["mean_abs_target_kw"] > 0.0  # the replayed frequency asked for a response ...
    assert tr["energy_kwh"]["discharged"] + tr["energy_kwh"]["charged"] > 0.0  # ... and the vehicles moved energy
    assert sum(s["vehicles_by_reason"].values()) == VEHICLES
    assert s["soc"]["vehicles_after"] == VEHICLES  # every gateway wrote its final state
    assert (out / "timeseries.csv").read_text().count("\n") == s["status_samples"] + 1
    assert "SHUTDOWN final zero setpoints sent" in (out / "engine.log").read_text()
    assert wait_gone(str(out)) == []


@pytest.mark.perf
def test_small_demo_meets_its_budget_and_tracks_the_service(tmp_path):
    """On a quiet machine the demo runs 10 cycles a second inside the 100 ms budget with no deadline missed,
    and the fleet stays inside the service's tolerance band 95 % of the time."""
    s, _ = run_demo(tmp_path / "demo-out", 8, "--protocols", "sim")
    assert s["cycles"] >= 75 and s["status_samples"] >= 60  # 10 cycles a second, heard by the demo
    assert s["deadline_misses"] == 0 and s["cycle_ms"]["p99"] < 100.0
    tr = s["tracking"]
    assert tr["within_tolerance_share"] >= 0.95
    assert tr["mae_kw"] < 0.25 * tr["tolerance_kw"]


def test_ctrl_c_mid_run_stops_every_child_and_still_reports(tmp_path):
    """SIGINT to the demo mid-run: exit code 130, the report of what ran is written, no child outlives it."""
    out = tmp_path / "demo-out"
    proc = subprocess.Popen(demo_cmd(out, 60), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        end = time.monotonic() + 60
        while "everything is up" not in line and time.monotonic() < end:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        children = [pid for pid in processes_mentioning(str(out)) if pid != proc.pid]
        assert len(children) == MIX_CHILDREN
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(str(out)) == []
    s = json.loads((out / "report.json").read_text())
    assert s["interrupted"] and 1.5 < s["duration_s"] < 60.0  # stopped after its 2 s, before its 60 s
    assert (out / "report.png").exists()


def test_children_stop_even_when_the_demo_is_killed(tmp_path):
    """SIGKILL to the demo (no chance to clean up): its children get the parent-death SIGTERM and stop cleanly."""
    out = tmp_path / "demo-out"
    proc = subprocess.Popen(demo_cmd(out, 60), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        end = time.monotonic() + 60
        while "everything is up" not in proc.stdout.readline():
            assert proc.poll() is None and time.monotonic() < end
        assert len([pid for pid in processes_mentioning(str(out)) if pid != proc.pid]) == MIX_CHILDREN
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(str(out), 10.0) == []
    assert "SHUTDOWN final zero setpoints sent" in (out / "engine.log").read_text()  # a clean stop, not a kill


def test_mixed_demo_reports_delivered_power_and_latency_per_protocol(tmp_path):
    """The default mix at small scale (320 vehicles behind 2 sim gateways, 40 behind OCPP over TLS, 40 behind
    SunSpec), FCR for 10 s: every protocol's row shows vehicles dispatched, its sites delivering what its
    setpoints asked, and a publish-to-applied latency in the range its devices' command latency allows."""
    out = tmp_path / "demo-out"
    s, printed = run_demo(out, 10, "--service", "fcr")
    rows = s["protocols"]
    assert list(rows) == ["sim", "ocpp", "sunspec"]
    assert [rows[p]["vehicles"] for p in rows] == [VEHICLES - OCPP_VEHICLES - SUNSPEC_VEHICLES, OCPP_VEHICLES,
                                                   SUNSPEC_VEHICLES]
    assert s["vehicles"] == VEHICLES and s["gateway_processes"] == GATEWAYS + 2
    for name, row in rows.items():
        assert row["dispatched_vehicles"] > 0, name
        assert row["setpoint_mean_abs_kw"] > 1.0 and row["delivered_max_abs_kw"] > 1.0, (name, row)
        # delivered tracks its own setpoints: the error is a fraction of what was asked (ramps, command latency)
        assert row["mae_kw"] < 0.5 * row["setpoint_mean_abs_kw"], (name, row)
        lat = row["latency_ms"]
        assert lat["samples"] > 0, (name, lat)
        assert 0.0 < lat["p50"] <= lat["p99"] < 5000.0, (name, lat)
        assert name in printed
    # the simulated stations and chargers add command latency the sim gateways do not have (20-80, 5-20 ms)
    assert rows["ocpp"]["latency_ms"]["p50"] > rows["sim"]["latency_ms"]["p50"]
    assert rows["sunspec"]["latency_ms"]["p50"] > rows["sim"]["latency_ms"]["p50"]
    assert s["soc"]["vehicles_after"] == VEHICLES  # the device simulators' last frames carry their SoC
    header = (out / "timeseries.csv").read_text().splitlines()[0].split(",")
    assert {f"{k}_{p}_kw" for k in ("setpoint", "delivered") for p in rows} <= set(header)
    # the OCPP side is set up as an operator must: TLS with a private key only its owner reads
    assert (out / "ocpp" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert "tls=True" in (out / "logs" / "gateway-ocpp1.log").read_text()
    for gw in ("gw1", "gw2", "ocpp1", "sunspec1"):  # every gateway stopped cleanly, none was killed
        assert "GATEWAY_STOP" in (out / "logs" / f"gateway-{gw}.log").read_text(), gw
    assert wait_gone(str(out)) == []


def test_protocol_flags_are_checked_before_anything_starts(tmp_path):
    """An unknown protocol, or a fleet that leaves the sim gateways nothing, exits 2 naming the flag."""
    for extra, flag in ((["--protocols", "sim,modbus"], "--protocols"),
                        (["--vehicles", "80"], "--vehicles")):
        proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "demo", "--out", str(tmp_path / "o"), *MIX, *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr


def test_the_recorder_keeps_only_the_demos_own_sites_and_vehicles_from_site_power_frames():
    """Site-power frames over a real ZeroMQ PUSH/PULL pair: an unknown gateway's frame is counted as bad; a site
    or vehicle id the demo does not have is dropped, so its tables cannot grow with ids a sender chose."""
    import zmq

    from v2grt.demo import _Recorder
    from v2grt.sim import site_power

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    rec = _Recorder(ctx, "tcp://127.0.0.1:1", pull, {"gw1": 0}, known_sites=frozenset({"depot"}),
                    known_nodes=frozenset({"EV1"}))
    try:
        push.send(site_power.encode("gw1", {"depot": 5.0, "made_up": 1e6}, soc={"EV1": 0.5, "EV_X": 0.9}))
        push.send(site_power.encode("gw_unknown", {"depot": 7.0}))
        deadline = time.monotonic() + 5.0
        while (rec.gw_seen != {"gw1"} or rec.bad_site_frames < 1) and time.monotonic() < deadline:
            if pull.poll(100):
                rec._site_frames(time.monotonic())
        assert rec.site_kw == {"depot": 5.0} and rec.gw_kw == {"gw1": 5.0}
        assert rec.final_soc == {"EV1": 0.5} and rec.bad_site_frames == 1
    finally:
        push.close(0)
        pull.close(0)
        rec.status_sub.close()
        ctx.term()
