"""The SunSpec DER gateway on loopback: simulated chargers on real pymodbus servers (scanned by pysunspec2),
the gateway's pymodbus clients, a real in-process aggregator publishing over ZeroMQ to a real GatewayCore,
and the gateway as a real process that is killed."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq

from tests._plant import V2GRT, clean_env
from v2grt.codes import Reason
from v2grt.fleet import Fleet
from v2grt.gateway import sunspec_mapping as sm
from v2grt.gateway.core import GatewayCore, GatewayError
from v2grt.gateway.sim import gateway_fleet
from v2grt.gateway.sunspec import SunSpecChargers, SunSpecSettings
from v2grt.sim.battery import SimFleetState
from v2grt.sim.sunspec_chargers import SimChargers, grouped_layout, write_site
from v2grt.testing import wait_until

GW = "sunspec1"


@pytest.fixture
def site(tmp_path):
    """Four chargers under gateway sunspec1 (roster), simulated two unit ids per server on ephemeral ports."""
    paths = write_site(tmp_path / "site", n_devices=4, gateway_id=GW, base_port=0, units_per_server=2)
    fleet = gateway_fleet(Fleet.from_csv(paths["roster"]), GW)
    state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0, low_soh_fraction=0.0)
    sim = SimChargers(state, grouped_layout(4, units_per_server=2)).start()
    node_ids = list(fleet.node_ids[: fleet.n_rows])
    devices = sim.devices_map(node_ids)
    sm.write_devices(paths["devices"], devices)  # the bound ports
    try:
        yield paths, fleet, sim, devices
    finally:
        sim.stop()


def start_gateway(fleet, devices, **overrides) -> SunSpecChargers:
    settings = SunSpecSettings(**{"poll_s": 0.05, "timeout_s": 0.2, "revert_s": 1, "stale_s": 1.0,
                                  "backoff_max_s": 0.5, **overrides})
    return SunSpecChargers(fleet, devices, settings, gateway_id=GW).start()


def wset_kw(sim, row) -> float:
    """WSet as the charger's registers hold it, kW (+ = inject)."""
    d = sim.devices[row]
    return sm.wset_to_kw(d.get_point(704, "WSet"), d.get_point(704, "WSet_SF"))


def aggregator(tmp_path, roster, meter_port, **bus):
    from v2grt.aggregator import Aggregator
    from v2grt.config import config_from_dict

    cfg = config_from_dict({
        "fleet_id": "sunspectest", "period_s": 0.1, "budget_s": 0.1, "state_dir": str(tmp_path / "state"),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": {"host": "127.0.0.1", "port": meter_port, "poll_interval_s": 0.02},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
                "setpoint_ttl_s": 0.3, **bus},
        "service": {"name": "dc", "capacity_kw": 30.0},
        "fleet": {"roster": str(roster)},
    })
    agg = Aggregator(cfg, epoch=3)
    agg.start()
    return agg


# ------------------------------------------------------------------------------ the simulator
def test_simulated_chargers_scan_as_sunspec_with_pysunspec2(site):
    """pysunspec2 finds 'SunS', models 1, 701, 702, 704, 713 on every unit id, with ratings, SoC and a 701 W
    that is positive while the charger discharges (its reading of the sign, not ours)."""
    from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

    _paths, fleet, sim, devices = site
    sim.target_kw[1] = 5.0  # as if commanded: discharge
    wait_until(lambda: sim.p_kw[1] > 4.9, 3.0, "charger 1 discharging")
    for row, nid in enumerate(fleet.node_ids[: fleet.n_rows]):
        a = devices[nid]
        d = SunSpecModbusClientDeviceTCP(slave_id=a.unit_id, ipaddr=a.host, ipport=a.port, timeout=2)
        try:
            d.scan()
            assert [m for m in d.models if isinstance(m, int)] == [1, 701, 702, 704, 713]
            assert d.models[1][0].SN.cvalue == f"{row + 1:06d}"
            assert d.models[702][0].WDisChaRteMaxRtg.cvalue == 11000
            assert d.models[713][0].SoC.cvalue == pytest.approx(sim.state.soc[row] * 100.0, abs=0.1)
            if row == 1:
                assert d.models[701][0].W.cvalue == pytest.approx(5000.0, abs=20)
        finally:
            d.close()
    assert sorted({(devices[n].port, devices[n].unit_id) for n in devices})[0][1] == 1
    assert len({devices[n].port for n in devices}) == 2  # two servers, two unit ids each


# ------------------------------------------------------------------------------ against a real aggregator
def test_frequency_step_reaches_the_chargers_as_wset_with_the_sunspec_sign(site, tmp_path):
    """Under-frequency at the aggregator's meter reaches the simulated chargers as a positive WSet (inject)
    and they discharge; over-frequency gives a negative WSet (charge); when the aggregator dies the
    gateway's own expiry writes WSet 0."""
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    paths, fleet, sim, devices = site
    meter = SunSpecMeter(213, f_hz=50.0)
    msim = SimServerThread([meter]).start()
    agg = aggregator(tmp_path, paths["roster"], msim.port(meter))
    gw = start_gateway(fleet, devices)
    ctx = zmq.Context()
    core = GatewayCore(ctx, GW, gw, setpoints=agg.publisher.endpoint, telemetry=agg.telemetry.endpoint,
                       telemetry_interval_s=0.1)
    stop = threading.Event()
    runner = threading.Thread(target=core.run, args=(stop,), daemon=True)
    runner.start()
    try:
        # Heard before dispatched: the chargers' SoC reaches the aggregator through the gateway first.
        wait_until(lambda: int(agg.fleet.online[: agg.fleet.n_rows].sum()) == 4, 10.0, "four chargers online")
        meter.set_frequency(49.5)  # GB DC: full discharge
        t_step = time.monotonic_ns()
        wait_until(lambda: any(w.p_kw > 1.0 and w.t_ns > t_step for w in list(sim.writes)), 5.0,
                   "a discharge WSet at a charger")
        wait_until(lambda: float(sim.p_kw.sum()) > 20.0, 5.0, "the simulated chargers exporting")
        assert all(wset_kw(sim, r) >= 0.0 for r in range(4))
        assert all(sim.devices[r].get_point(701, "W") >= 0 for r in range(4))  # 701 W + = generation
        wait_until(lambda: float(agg.fleet.p_actual_kw[: agg.fleet.n_rows].sum()) > 20.0, 5.0,
                   "measured discharge back at the aggregator (701 W)")
        meter.set_frequency(50.5)  # full charge
        t_step = time.monotonic_ns()
        wait_until(lambda: any(w.p_kw < -1.0 and w.t_ns > t_step for w in list(sim.writes)), 5.0,
                   "a charge WSet (negative)")
        wait_until(lambda: float(sim.p_kw.sum()) < -20.0, 5.0, "the simulated chargers charging")
        assert any(sim.devices[r].get_point(704, "WSet") < 0 for r in range(4))
        assert all(w.revert_s == 1 and w.revert_kw == 0.0 for w in list(sim.writes))  # every write arms it

        # A charger that stops answering leaves the aggregator's pool with a reason, and the rest carry on.
        row = agg.fleet.row_of[fleet.node_ids[3]]
        sim.set_kind(3, "silent")
        wait_until(lambda: agg.fleet.online[row] == 0, 5.0, "the silent charger offline at the aggregator")
        wait_until(lambda: agg.status_report()["nodes_by_reason"].get("OFFLINE", 0) >= 1, 2.0, "OFFLINE counted")
        # Its reversion timer (1 s after the last write it took) brings it to 0 W while nobody reaches it;
        # the gateway may notice the silence sooner than that, so wait for the reversion itself.
        wait_until(lambda: sim.reversions[3] >= 1, 5.0, "the silent charger reverting on its own")
        sim.set_kind(3, "normal")
        wait_until(lambda: agg.fleet.online[row] == 1, 8.0, "back in the pool once it answers again")

        # The aggregator dies without a last word: the gateway's expiry writes 0 itself.
        assert sim.reversions[3] >= 1  # the silent one had reverted on its own while nobody reached it
        reversions = sim.reversions.copy()
        agg.stop(final_zero=False)
        t_dead = time.monotonic_ns()
        wait_until(lambda: all(wset_kw(sim, r) == 0.0 for r in range(4)), 3.0, "WSet 0 on expiry")
        first_zero = min(w.t_ns for w in list(sim.writes) if w.t_ns > t_dead and w.p_kw == 0.0)
        assert (first_zero - t_dead) / 1e9 < 0.3 + 0.4  # ttl + a gateway wake + one write, on a loaded machine
        assert core.expiries >= 1
        assert (sim.reversions == reversions).all()  # the gateway wrote the zeros; no charger reverted on its own
    finally:
        stop.set()
        runner.join(5.0)
        gw.close()
        agg.stop()
        ctx.term()
        msim.stop()


def test_a_killed_gateway_process_leaves_the_chargers_to_revert_on_their_own(site, tmp_path):
    """`v2grt gateway sunspec` as a real process discharges the chargers; after SIGKILL nobody writes again
    and every charger goes to WSetRvrt 0 W by its own reversion timer, within WSetRvrtTms (1 s) of its last write."""
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    paths, _fleet, sim, _devices = site
    meter = SunSpecMeter(213, f_hz=49.5)
    msim = SimServerThread([meter]).start()
    agg = aggregator(tmp_path, paths["roster"], msim.port(meter))
    log_path = tmp_path / "gateway.log"
    proc = subprocess.Popen(
        [V2GRT, "gateway", "sunspec", "--roster", str(paths["roster"]), "--gateway-id", GW,
         "--devices", str(paths["devices"]), "--setpoints", agg.publisher.endpoint, "--telemetry",
         agg.telemetry.endpoint, "--telemetry-interval-s", "0.1", "--poll-s", "0.1", "--timeout-s", "0.2",
         "--revert-s", "1", "--log-file", str(log_path)], env=clean_env(), start_new_session=True)
    try:
        wait_until(lambda: float(sim.p_kw.sum()) > 20.0, 15.0, "the chargers discharging under the gateway")
        time.sleep(1.2)  # past one reversion period: only the gateway's refreshes keep them discharging
        assert sim.reversions.sum() == 0 and float(sim.p_kw.sum()) > 20.0
        proc.send_signal(signal.SIGKILL)
        proc.wait(5.0)
        t_kill = time.monotonic_ns()
        busy = np.flatnonzero(sim.target_kw > 0.5)  # the merit order may leave one charger at 0
        assert busy.size >= 2
        wait_until(lambda: (sim.target_kw == 0.0).all() and (np.abs(sim.p_kw) < 1e-9).all(), 3.0,
                   "every charger at 0 by its own reversion")
        assert (sim.reversions[busy] == 1).all()
        assert max(w.t_ns for w in list(sim.writes)) <= t_kill  # nobody wrote after the kill
        for row in busy.tolist():  # WSetRvrtTms after its own last write, within a physics tick
            last = max(w.t_ns for w in list(sim.writes) if w.row == row)
            assert 0.99 <= (sim.applied_ns[row] - last) / 1e9 <= 1.0 + 0.1
        assert (sim.applied_ns[busy] - t_kill).max() / 1e9 <= 1.0 + 0.1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5.0)
        agg.stop()
        msim.stop()


# ------------------------------------------------------------------------------ the device side alone
def test_silent_and_bad_chargers_map_to_reason_codes_and_never_stop_the_others(site):
    """A charger reporting SoC 250 % is refused and counted (INVALID_TELEMETRY) while the others keep being
    written; one that stops answering goes TIMEOUT_BMS_RESPONSE then OFFLINE; both recover when healed."""
    _paths, fleet, sim, devices = site
    gw = start_gateway(fleet, devices)
    try:
        wait_until(lambda: gw.telemetry(time.monotonic_ns())["online"].tolist() == [1, 1, 1, 1], 5.0, "all online")
        sim.set_kind(1, "bad")
        wait_until(lambda: gw.telemetry(time.monotonic_ns())["fault"][1] == Reason.INVALID_TELEMETRY, 3.0,
                   "INVALID_TELEMETRY for the bad charger")
        assert gw.counters()["modbus_invalid"] >= 1
        gw.apply(np.array([3.0, 3.0, 3.0, 3.0]), 0)
        wait_until(lambda: [wset_kw(sim, r) for r in range(4)] == [3.0] * 4, 3.0, "everyone written, the bad one too")
        sim.set_kind(3, "silent")
        wait_until(lambda: gw.telemetry(time.monotonic_ns())["fault"][3] == Reason.OFFLINE, 5.0,
                   "OFFLINE for the silent charger (its connection given up after 3 timeouts)")
        tel = gw.telemetry(time.monotonic_ns())
        assert tel["online"][3] == 0 and tel["p_kw"][3] == 0.0
        assert gw.counters()["modbus_timeouts"] >= 3
        wait_until(lambda: sim.reversions[3] >= 1, 3.0, "the silent charger reverted on its own")
        assert tel["fault"][[0, 2]].tolist() == [0, 0]
        sim.set_kind(1, "normal")
        sim.set_kind(3, "normal")
        wait_until(lambda: gw.telemetry(time.monotonic_ns())["fault"].tolist() == [0, 0, 0, 0], 8.0,
                   "both healed")
        wait_until(lambda: wset_kw(sim, 3) == 3.0 and sim.target_kw[3] == 3.0, 3.0,
                   "the reconnected charger written again at once")
    finally:
        gw.apply(np.zeros(4), 0)
        gw.close()
    assert [wset_kw(sim, r) for r in range(4)] == [0.0] * 4  # close flushed the zeros


def test_a_setpoint_is_written_while_a_poll_is_under_way_not_after_it(tmp_path):
    """A setpoint handed over while the charger is slow to answer a poll's first read (701) goes out as soon as
    that read is answered, before the poll's second read (713): a write waits for one request, not a poll."""
    import asyncio

    paths = write_site(tmp_path / "site", n_devices=1, gateway_id=GW, base_port=0)
    fleet = gateway_fleet(Fleet.from_csv(paths["roster"]), GW)
    state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0, low_soh_fraction=0.0)
    sim = SimChargers(state, grouped_layout(1))
    dev = sim.devices[0]
    models = sorted((addr, mid) for mid, addr in dev.models.items())
    seen: list[tuple[int, bool]] = []  # (model, is a write) of each request, in the order the charger got them
    armed, in_slow_read = threading.Event(), threading.Event()
    action = dev._action

    async def slow_701(fc, start, address, count, current, set_values):
        mid = max((m for a, m in models if a <= address), default=0)
        seen.append((mid, set_values is not None))
        if mid == 701 and set_values is None and armed.is_set():
            armed.clear()
            in_slow_read.set()
            await asyncio.sleep(0.3)  # the charger takes its time over this read
        return await action(fc, start, address, count, current, set_values)

    dev._action = slow_701
    sim.start()
    gw = start_gateway(fleet, sim.devices_map(list(fleet.node_ids[:1])), poll_s=0.5, timeout_s=0.9, revert_s=3)
    try:
        wait_until(lambda: gw.pollers[0].written_kw == 0.0 and gw.counters()["modbus_reads_ok"] >= 1, 5.0,
                   "connected, written and polled")
        armed.set()
        assert in_slow_read.wait(3.0), "no poll reached the charger"
        mark = len(seen)
        gw.apply(np.array([4.0]), time.monotonic_ns())
        wait_until(lambda: wset_kw(sim, 0) == 4.0, 3.0, "the setpoint at the charger")
        wait_until(lambda: len(seen) >= mark + 2, 3.0, "the poll's second read")
        assert seen[mark:mark + 2] == [(704, True), (713, False)]
    finally:
        gw.close()
        sim.stop()


def test_a_device_without_the_charger_models_or_with_a_bad_scale_factor_is_refused(site):
    """A SunSpec inverter (701/704 only) and a charger whose WSet_SF is 20 are refused at connect, named,
    counted, OFFLINE; never written; the gateway keeps serving the others."""
    from v2grt.sim.sunspec import SimServerThread, SunSpecInverter

    _paths, fleet, sim, devices = site
    inverter = SunSpecInverter()
    isim = SimServerThread([inverter]).start()
    sim.devices[2].set_points(704, WSet_SF=20)
    devices = dict(devices)
    nid0 = fleet.node_ids[0]
    devices[nid0] = sm.DeviceAddress("127.0.0.1", isim.port(inverter), 1)
    gw = start_gateway(fleet, devices)
    try:
        wait_until(lambda: gw.telemetry(time.monotonic_ns())["fault"].tolist() == [Reason.OFFLINE, 0, Reason.OFFLINE,
                                                                              0], 5.0, "the two good chargers read")
        wait_until(lambda: gw.pollers[0].counters.connect_failures >= 1 and gw.pollers[2].setup_refused >= 1, 3.0,
                   "both refused at connect")
        assert "models [702, 713] missing" in gw.pollers[0].counters.last_error
        assert "WSet_SF=20" in gw.pollers[2].counters.last_error
        assert gw.telemetry(time.monotonic_ns())["online"].tolist() == [0, 1, 0, 1]
        gw.apply(np.array([2.0, 2.0, 2.0, 2.0]), 0)
        wait_until(lambda: wset_kw(sim, 1) == 2.0 and wset_kw(sim, 3) == 2.0, 3.0, "the good ones written")
        assert inverter.setpoint().t_written_ns is None and not any(w.row == 2 for w in list(sim.writes))
    finally:
        gw.close()
        isim.stop()


def test_settings_and_devices_are_checked_before_anything_starts(site):
    """revert_s must be whole seconds >= 1 with room for a timed-out write; every roster node needs a device row."""
    _paths, fleet, _sim, devices = site
    with pytest.raises(GatewayError, match="revert_s=0"):
        start_gateway(fleet, devices, revert_s=0)
    with pytest.raises(GatewayError, match=r"revert_s=1 with timeout_s=0\.5"):
        start_gateway(fleet, devices, timeout_s=0.5)
    missing = {k: v for k, v in devices.items() if k != fleet.node_ids[3]}
    with pytest.raises(GatewayError, match=r"1 roster node.*no row in the devices file.*SS0004"):
        start_gateway(fleet, missing)


def test_cli_writes_a_site_and_refuses_a_bad_devices_file(tmp_path):
    """`v2grt sim sunspec-chargers --write-site` writes roster and devices; the gateway names a bad devices row."""
    out = subprocess.run([V2GRT, "sim", "sunspec-chargers", "--write-site", str(tmp_path / "s"), "--chargers", "3",
                          "--units-per-server", "2", "--base-port", "15500"], capture_output=True, text=True,
                         timeout=60, env=clean_env())
    assert out.returncode == 0, out.stderr
    devices = sm.load_devices(tmp_path / "s" / "devices.csv")
    assert [(a.port, a.unit_id) for a in devices.values()] == [(15500, 1), (15500, 2), (15501, 1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("node_id,host,port,unit_id\nSS0001,127.0.0.1,502,300\n")
    out = subprocess.run([V2GRT, "gateway", "sunspec", "--roster", str(tmp_path / "s" / "roster.csv"), "--gateway-id",
                          "sunspec1", "--devices", str(bad)], capture_output=True, text=True, timeout=60,
                         env=clean_env())
    assert out.returncode == 2
    assert "line 2: unit_id '300' of 'SS0001'" in out.stderr
