"""The field manual's commands through the real console scripts (v2g-cli, v2grt) against a running
v2g-aggregator process: a simulated SunSpec meter and site inverter over Modbus TCP, three gateways
following their setpoints over ZeroMQ, engine.log read back from disk."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import threading
import time
import types

import numpy as np
import pytest
import zmq
from _plant import (
    GATEWAYS,
    V2G_CLI,
    V2GRT,
    SimGateway,
    log_lines,
    run,
    short_dir,
    start_aggregator,
    stop_process,
    wait_for_log,
    wait_until,
    write_config,
    write_profile,
)

from v2grt.codes import Reason
from v2grt.fleet import Fleet
from v2grt.gateway.core import GatewayCore
from v2grt.gateway.sim import SimVehicles, gateway_fleet
from v2grt.io import bus
from v2grt.sim.sunspec import SimServerThread, SunSpecInverter, SunSpecMeter


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    """One v2g-aggregator process with its meter, inverter and gateways, shared by this module's tests."""
    d = tmp_path_factory.mktemp("plant")
    sockets = short_dir()
    meter, inverter = SunSpecMeter(203, f_hz=50.0), SunSpecInverter(name="inv2")
    sim = SimServerThread([meter, inverter]).start()
    cfg = write_config(d, sockets, meter_port=sim.port(meter), inverter_port=sim.port(inverter))
    log = d / "engine.log"
    proc = start_aggregator(cfg, "--log-file", str(log))
    try:
        wait_for_log(log, "READY first cycle ran", timeout_s=20)
        gateways = {gw: SimGateway(gw, f"ipc://{sockets}/sp", f"ipc://{sockets}/tel") for gw in GATEWAYS}
        for g in gateways.values():
            g.start()
        p = types.SimpleNamespace(dir=d, cfg=cfg, log=log, proc=proc, meter=meter, inverter=inverter,
                                  gateways=gateways, profile=d / "profile.json", sockets=sockets)
        p.cli = lambda *args, **kw: run(V2G_CLI, *args, "--config", str(cfg), **kw)
        client = bus.ControlClient(zmq.Context.instance(), f"ipc://{sockets}/ctl", timeout_ms=5000)
        p.status = lambda: client.call("status").result  # polling: cheaper than a v2g-cli process each time
        wait_until(lambda: p.status().get("nodes_by_reason", {}).get("OK", 0) >= 8, timeout_s=5,
                   what="gateways reporting")
        yield p
    finally:
        if "client" in locals():
            client.close()
        for g in locals().get("gateways", {}).values():
            g.stop()
        stop_process(proc)
        sim.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def reasons(p) -> dict:
    return p.status().get("nodes_by_reason", {})


def test_help_and_exit_codes_are_documented():
    """Every console script and operator subcommand answers --help and documents its exit codes."""
    for cmd in ([V2G_CLI], [V2GRT.replace("v2grt", "v2g-aggregator")], [V2GRT, "status"], [V2GRT, "estop"],
                [V2GRT, "reset"], [V2GRT, "test-discharge"], [V2GRT, "reload"], [V2GRT, "telemetry-profile"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0, (cmd, r.stderr)
        assert "Exit codes" in r.stdout and "3 refused" in r.stdout, cmd


def test_status_table_and_json(plant):
    """--status prints frequency, power, vehicles by reason and loop timing; --json and `v2grt status` agree."""
    r = plant.cli("--status")
    assert r.returncode == 0, r.stderr
    for text in ("fleet plant", "50.000 Hz", "target", "delivered", "available up", "SOC_BELOW_MINIMUM",
                 "missed deadlines", "alarms"):
        assert text in r.stdout, text
    st = json.loads(plant.cli("--status", "--json").stdout)
    assert st["vehicles"] == 12 and st["fleet_id"] == "plant" and st["epoch"] >= 1
    assert sum(st["nodes_by_reason"].values()) == 12 and st["loop"]["cycles"] > 0
    assert st["kernel"]["backend"] == "cython" and st["kernel"]["isa"] in ("baseline", "avx2")
    assert f"kernel cython/{st['kernel']['isa']}" in r.stdout
    r2 = run(V2GRT, "status", "--json", "--config", str(plant.cfg))
    assert r2.returncode == 0 and json.loads(r2.stdout)["vehicles"] == 12


def test_cli_without_aggregator_fails_with_exit_1(tmp_path):
    """v2g-cli against an endpoint nobody serves says so and exits 1 after --timeout."""
    r = run(V2G_CLI, "--status", "--endpoint", f"ipc://{tmp_path}/nobody", "--timeout", "0.3")
    assert r.returncode == 1 and "did not answer" in r.stderr


class WeakCharger:
    """A fault-injecting driver: simulated vehicles (v2grt.gateway.sim, the battery model) behind chargers of
    which the one of ``node`` delivers only ``share`` of its command; telemetry reports what was delivered."""

    def __init__(self, vehicles: SimVehicles, node: str, share: float):
        self.vehicles, self.share = vehicles, share
        self.node_ids = vehicles.node_ids
        self.row = self.node_ids.index(node)

    def apply(self, p_kw, now_ns):
        p = p_kw.copy()
        p[self.row] *= self.share
        self.vehicles.apply(p, now_ns)

    def telemetry(self, now_ns):
        return self.vehicles.telemetry(now_ns)


@contextlib.contextmanager
def real_gateway(plant, gateway_id: str, make_driver):
    """Swap the plant's simulated gateway for the real GatewayCore around ``make_driver(vehicles)`` (the
    gateway's vehicles simulated from the roster); put a fresh simulated one back afterwards."""
    plant.gateways[gateway_id].stop()
    fleet = gateway_fleet(Fleet.from_csv(plant.dir / "roster.csv"), gateway_id)
    vehicles = SimVehicles(fleet, gateway_id=gateway_id, unreachable_fraction=0.0, low_soh_fraction=0.0,
                           hot_fraction=0.0, unplug_rate_per_h=0.0, plug_rate_per_h=0.0)
    box, stop, ctx = {}, threading.Event(), zmq.Context()

    def main():
        box["core"] = GatewayCore(ctx, gateway_id, make_driver(vehicles), setpoints=f"ipc://{plant.sockets}/sp",
                                  telemetry=f"ipc://{plant.sockets}/tel", telemetry_interval_s=0.05)
        box["core"].run(stop)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        wait_until(lambda: "core" in box and box["core"].batches_sent >= 5, what=f"{gateway_id} reporting")
        yield vehicles
    finally:
        stop.set()
        thread.join(5.0)
        ctx.term()
        plant.gateways[gateway_id] = SimGateway(gateway_id, f"ipc://{plant.sockets}/sp", f"ipc://{plant.sockets}/tel")
        plant.gateways[gateway_id].start()
    assert not thread.is_alive()


def test_test_discharge_reports_requested_delivered_and_soc(plant):
    """The report's delivered power and SoC come from the vehicle's telemetry, not from its setpoint: through a
    real gateway, a healthy vehicle delivers what it is asked and its SoC falls; one behind a charger that gives
    40 % of its command is reported at 40 % and fails."""
    with real_gateway(plant, "gw1", lambda vehicles: WeakCharger(vehicles, "EV_NODE_04", 0.4)) as vehicles:
        r = plant.cli("--test-discharge", "--unit-id", "EV_NODE_01", "--kw", "5", "--seconds", "1.5", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert rep["outcome"] == "done" and rep["verdict"] == "OK"
        assert rep["kw_requested"] == 5.0 and rep["kw_commanded"] == pytest.approx(5.0, rel=0.05)
        assert rep["kw_delivered"] == pytest.approx(5.0, rel=0.1)
        assert rep["soc_after"] < rep["soc_before"]
        assert vehicles.state.soc[0] < 0.80  # EV_NODE_01's simulated battery gave the energy
        r = run(V2GRT, "test-discharge", "--unit-id", "EV_NODE_04", "--kw", "3", "--seconds", "1",
                "--config", str(plant.cfg))
        assert r.returncode == 1, r.stdout + r.stderr
        assert re.search(r"requested\s+3\.00 kW", r.stdout)
        commanded, delivered = (float(re.search(rf"{what}\s+(-?\d+\.\d\d) kW", r.stdout).group(1))
                                for what in ("commanded", "delivered"))
        assert commanded == pytest.approx(3.0, rel=0.05), r.stdout
        assert 0.3 < delivered < 1.5, r.stdout  # 40 % of 3 kW: what the charger gave, not the setpoint
        assert "SoC" in r.stdout and "FAILED: the vehicle's telemetry shows less than half" in r.stdout
    wait_until(lambda: reasons(plant).get("OK", 0) >= 8, what="the simulated gw1 back")


def test_test_discharge_refuses_an_excluded_vehicle(plant):
    """A vehicle under the SoC floor is refused with its reason and exit code 3; an unknown id is exit 2."""
    r = plant.cli("--test-discharge", "--unit-id", "EV_NODE_02")
    assert r.returncode == 3
    assert "refused" in r.stderr and "SOC_BELOW_MINIMUM" in r.stderr
    r = plant.cli("--test-discharge", "--unit-id", "EV_NODE_99")
    assert r.returncode == 2 and "EV_NODE_99" in r.stderr
    r = plant.cli("--test-discharge")
    assert r.returncode == 2 and "--unit-id" in r.stderr


def test_emergency_stop_reaches_every_gateway_and_holds_until_reset(plant):
    """--emergency-stop flags every gateway's next message and holds 0 kW until --reset releases it."""
    plant.meter.set_frequency(49.5)  # full discharge under GB DC
    try:
        gws = plant.gateways.values()
        wait_until(lambda: all(g.messages and g.messages[-1][2].sum() > 0 for g in gws), timeout_s=5,
                   what="every gateway discharging")
        r = plant.cli("--emergency-stop", "--reason", "test")
        assert r.returncode == 0, r.stderr
        effective = int(re.search(r"from cycle (\d+)", r.stdout).group(1))
        wait_until(lambda: all(g.messages[-1][0] >= effective + 10 for g in gws), timeout_s=10,
                   what="ten cycles of e-stop at every gateway")
        for g in gws:
            after = [m for m in list(g.messages) if m[0] >= effective]
            # every message of the cycle it named and later is flagged (a gateway keeps only the newest of
            # what queued up, so which seq it saw first depends on load, not on the aggregator)
            assert after and all(estop for _, estop, _, _ in after), g.gateway_id
            assert all(np.all(p == 0.0) for seq, _, p, _ in after if seq > effective), g.gateway_id
        assert plant.status()["estop"] is True
        r = plant.cli("--reset")
        assert r.returncode == 0 and "released" in r.stdout
        wait_until(lambda: all(not g.messages[-1][1] for g in gws), timeout_s=10, what="e-stop released")
        wait_until(lambda: sum(g.messages[-1][2].sum() for g in gws) > 0, timeout_s=10, what="discharge resumes")
        assert "EMERGENCY_STOP" in plant.log.read_text()
    finally:
        plant.meter.set_frequency(50.0)


def test_reload_good_bad_and_sighup(plant):
    """A good profile reloads between cycles; a bad one is refused naming the key and the old one stays;
    SIGHUP re-reads the configured file, in force only when valid."""
    base = reasons(plant).get("SOC_BELOW_MINIMUM", 0)
    good = write_profile(plant.dir / "good.json", minimum_soc=0.25)
    r = plant.cli("--reload", "--profile", str(good))
    assert r.returncode == 0 and "minimum_soc 0.25" in r.stdout, r.stderr
    wait_until(lambda: reasons(plant).get("SOC_BELOW_MINIMUM", 0) == base + 1, what="EV_NODE_03 under 0.25")
    bad = plant.dir / "bad.json"
    bad.write_text('{"minimum_soc": 2}')
    r = plant.cli("--reload", "--profile", str(bad))
    assert r.returncode == 2
    assert "minimum_soc=2" in r.stderr and "previous profile stays in force" in r.stderr
    time.sleep(0.3)
    assert reasons(plant).get("SOC_BELOW_MINIMUM", 0) == base + 1
    # SIGHUP re-reads the configured file: a floor of 0.90, which neither the start-up profile (0.20) nor
    # --reload (0.25) had, puts every vehicle (SoC 0.1-0.8) under it; then a broken edit must be refused.
    try:
        write_profile(plant.profile, minimum_soc=0.90, maximum_soc=1.0)
        plant.proc.send_signal(signal.SIGHUP)
        line = wait_for_log(plant.log, "minimum_soc=0.9")
        assert " PROFILE_RELOADED " in line and str(plant.profile) in line
        wait_until(lambda: reasons(plant).get("OK", 0) == 0 and reasons(plant).get("SOC_BELOW_MINIMUM", 0) >= 8,
                   what="every vehicle under the SIGHUP profile's 0.90 floor")
        plant.profile.write_text('{"minimum_soc": 0.2, "temp_min_c": 30}')
        plant.proc.send_signal(signal.SIGHUP)
        line = wait_for_log(plant.log, "temp_min_c=30")
        assert " PROFILE_REJECTED " in line
        time.sleep(0.2)
        assert reasons(plant).get("OK", 0) == 0 and plant.proc.poll() is None  # the 0.90 floor stays in force
    finally:
        write_profile(plant.profile, minimum_soc=0.20)
        plant.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reasons(plant).get("SOC_BELOW_MINIMUM", 0) == base, what="SIGHUP back to 0.20")


def test_telemetry_profile_switches_gateways(plant):
    """--telemetry-profile optimized tells every gateway to send slow fields every 10th batch; default undoes it."""
    r = plant.cli("--telemetry-profile", "optimized")
    assert r.returncode == 0, r.stderr
    gws = plant.gateways.values()
    wait_until(lambda: all(g.messages[-1][3] == 10 for g in gws), timeout_s=10, what="slow_n 10")
    assert plant.status()["telemetry_profile"] == "optimized"
    r = run(V2GRT, "telemetry-profile", "default", "--config", str(plant.cfg))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: all(g.messages[-1][3] == 1 for g in gws), timeout_s=10, what="slow_n 1")


def test_grid_frequency_alert_throttles_and_clears(plant):
    """Frequency outside the alert band logs GRID_FREQUENCY_ALERT with the throttle, caps the target, then clears."""
    plant.meter.set_frequency(49.0)
    try:
        line = wait_for_log(plant.log, "GRID_FREQUENCY_ALERT")
        assert "f_hz=49" in line and "response_limit=0.5" in line and "band_hz=49.4..50.6" in line
        st = wait_until(lambda: (s := plant.status())["frequency_alert"]["active"] and s, what="alert in status")
        wait_until(lambda: plant.status()["target_kw"] == pytest.approx(20.0), what="target capped at 50 %")
        assert "GRID_FREQUENCY_ALERT" in plant.cli("--status").stdout
        assert st["events"]["GRID_FREQUENCY_ALERT"] >= 1
    finally:
        plant.meter.set_frequency(50.0)
    line = wait_for_log(plant.log, "GRID_FREQUENCY_NORMAL")
    assert "f_extreme_hz=49" in line
    wait_until(lambda: plant.status()["target_kw"] == 0.0, what="target back to 0")


def test_each_section8_code_is_logged_when_its_situation_happens(plant):
    """Faults, heat, health, silence and a phase-mismatched inverter each log their exact code, once per node."""
    gw1, gw2 = plant.gateways["gw1"], plant.gateways["gw2"]
    before = len(log_lines(plant.log))
    try:
        gw2.set("EV_NODE_05", fault=Reason.NODE_UNREACHABLE)
        gw2.set("EV_NODE_06", fault=Reason.NODE_LOW_THROUGHPUT)
        gw2.set("EV_NODE_07", temp_c=60.0)
        gw1.set("EV_NODE_04", soh=0.5)
        gw2.silent.add("EV_NODE_08")
        plant.inverter.set_cannot_sync(True)
        expected = {
            "NODE_UNREACHABLE": "node=EV_NODE_05",
            "NODE_LOW_THROUGHPUT": "node=EV_NODE_06",
            "THERMAL_LIMIT": "Thermal limit reached on Node EV_NODE_07",
            "SOH_BELOW_THRESHOLD": "node=EV_NODE_04",
            "TIMEOUT_BMS_RESPONSE": "node=EV_NODE_08",
            "E_INVERTER_PHASE_MISMATCH": "site=site2",
        }
        for code, text in expected.items():
            wait_until(lambda code=code, text=text: any(
                f" {code} " in ln and text in ln for ln in log_lines(plant.log)[before:]), timeout_s=30,
                what=f"{code} with {text}")
        by_reason = reasons(plant)
        assert by_reason["E_INVERTER_PHASE_MISMATCH"] == 4 and by_reason["TIMEOUT_BMS_RESPONSE"] == 1
        # a flapping vehicle: every transition counted, one line per rate-limit interval
        n0 = plant.status()["events"]["NODE_UNREACHABLE"]
        for fault in (0, Reason.NODE_UNREACHABLE, 0, Reason.NODE_UNREACHABLE):
            gw2.set("EV_NODE_05", fault=fault)
            time.sleep(1.15)  # the monitor looks once a second
        assert plant.status()["events"]["NODE_UNREACHABLE"] >= n0 + 2
        lines = [ln for ln in log_lines(plant.log, "NODE_UNREACHABLE") if "node=EV_NODE_05" in ln]
        assert len(lines) == 1, lines
        events = plant.status()["events"]
        assert all(events.get(code, 0) >= 1 for code in expected)
    finally:
        for node in ("EV_NODE_05", "EV_NODE_06"):
            gw2.set(node, fault=0)
        gw2.set("EV_NODE_07", temp_c=20.0)
        gw1.set("EV_NODE_04", soh=0.95)
        gw2.silent.discard("EV_NODE_08")
        plant.inverter.set_cannot_sync(False)
    wait_for_log(plant.log, "E_INVERTER_PHASE_CLEARED")
    wait_until(lambda: reasons(plant).get("OK", 0) >= 10, what="vehicles back")


def test_status_table_says_how_many_vehicles_were_never_heard():
    """The status table names the vehicles still waiting for their first telemetry, and says nothing once none wait."""
    from v2grt.operator import format_status

    st = {"vehicles": 12, "nodes_by_reason": {"OK": 3, "TIMEOUT_BMS_RESPONSE": 9}, "never_heard": 8}
    assert "of TIMEOUT_BMS_RESPONSE, 8 never heard since start" in format_status(st)
    assert "never heard" not in format_status({**st, "never_heard": 0})


def test_status_table_has_a_journal_line_and_alarms_a_failing_journal():
    """The status table says where the journal writes and how much, that it is off, or that it is failing."""
    from v2grt.operator import format_status

    jn = {"enabled": True, "dir": "/var/lib/v2g/journal/f1", "segment": "f1-20261204T220000Z-e3.v2j",
          "records": 1200, "vehicle_rows": 40, "dropped": 0, "segments": 1, "write_errors": 0,
          "write_failing": False, "last_error": ""}
    text = format_status({"journal": jn})
    assert "  journal        f1-20261204T220000Z-e3.v2j in /var/lib/v2g/journal/f1: 1200 records, 0 dropped" in text
    assert "JOURNAL_WRITE_FAILED" not in text
    failing = format_status({"journal": {**jn, "segment": None, "dropped": 7, "write_errors": 2,
                                         "write_failing": True, "last_error": "No space left on device"}})
    assert "WRITE FAILING (No space left on device): 1200 records, 7 dropped, 2 write errors" in failing
    assert "JOURNAL_WRITE_FAILED: the dispatch journal cannot write (No space left on device)" in failing
    assert "  journal        off (journal.enabled is false" in format_status({"journal": {"enabled": False}})
    assert "journal" not in format_status({})  # an aggregator older than the journal


def test_status_table_has_a_setpoints_line_from_the_publisher_counters():
    """The status table says which thread sends the setpoints, how many, how long the last took, and what was not
    sent and why; a reply without the `publisher` map (an older aggregator) gets no such line."""
    from v2grt.operator import format_status

    pub = {"thread": True, "cycles_sent": 1200, "frames_sent": 9600, "frames_dropped": 0, "busy_skips": 0,
           "stale": 0, "refused": 0, "fenced": 0, "errors": 0, "last_send_ms": 0.912, "last_to_wire_ms": 3.25}
    text = format_status({"publisher": pub})
    assert ("  setpoints      sent by the publisher thread: 1200 cycles, 9600 frames; last cycle deadline to last "
            "frame 3.250 ms, its sends 0.912 ms\n") in text + "\n"
    worse = format_status({"publisher": {**pub, "busy_skips": 2, "stale": 1, "frames_dropped": 5}})
    assert "; not sent: 2 skipped (publisher busy), 1 stale, 5 frames dropped" in worse
    control = format_status({"publisher": {**pub, "thread": False, "last_send_ms": None}})
    assert "sent by the control thread: 1200 cycles" in control and "its sends" not in control
    assert "setpoints " not in format_status({})


def test_status_table_shows_leadership_when_the_reply_has_ha():
    """With an `ha` map the status table gives the role, epoch, lease left and the leader; without one, no ha line."""
    from v2grt.operator import format_status

    ha = {"role": "standby", "epoch": 0, "lease_remaining_s": 0.0, "lease_ttl_s": 3.0, "leader": "agg-a",
          "name": "agg-b", "renew_failures": 0, "etcd_errors": 0, "last_error": ""}
    text = format_status({"ha": ha})
    assert "  ha             standby (this is agg-b), epoch 0, lease 0.0 s of 3 s left, leader agg-a\n" in text
    leading = format_status({"ha": {**ha, "role": "leader", "epoch": 12, "lease_remaining_s": 2.46,
                                    "leader": "agg-b", "etcd_errors": 2}})
    assert "leader (this is agg-b), epoch 12, lease 2.5 s of 3 s left, leader agg-b; 2 etcd errors" in leading
    assert "leader none" in format_status({"ha": {**ha, "leader": None}})
    assert "  ha " not in format_status({})
