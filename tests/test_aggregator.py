"""The aggregator end to end on loopback: a real SunSpec meter over Modbus TCP, real ZeroMQ sockets,
the control thread running at a fixed period."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from v2grt.aggregator import PUBLISHER_IO_THREAD, Aggregator
from v2grt.codes import Reason
from v2grt.config import config_from_dict
from v2grt.fleet import Fleet
from v2grt.gate import MAX_WAIT_NS
from v2grt.io import bus, wire
from v2grt.sim.sunspec import SimServerThread, SunSpecMeter
from v2grt.testing import LogLines, short_ids, wait_until

PERIOD_S = 0.02




@pytest.fixture
def meter():
    m = SunSpecMeter(203, f_hz=50.0)
    sim = SimServerThread([m]).start()
    yield m, sim
    sim.stop()


@pytest.fixture
def make_aggregator(meter):
    """Start an aggregator on ephemeral ports against the simulated meter; stopped afterwards."""
    started = []
    m, sim = meter

    def _make(fleet=None, before_start=None, **overrides):
        data = {
            "fleet_id": "test", "period_s": PERIOD_S, "budget_s": PERIOD_S,
            "realtime": {"mlockall": False, "gc_freeze": False},
            "meter": {"host": "127.0.0.1", "port": sim.port(m), "poll_interval_s": 0.005, "timeout_s": 0.05,
                      "stale_after_s": 0.2, "on_stale": "rampout", "rampout_s": 0.2},
            "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*",
                    "control": "tcp://127.0.0.1:*", "setpoint_ttl_s": 0.2},
            "service": {"name": "dc", "capacity_kw": 1000.0},
            "fleet": {"random": 200},
        }
        for key, value in overrides.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        cfg = config_from_dict(data)
        fleet = fleet or Fleet.random(200, seed=1, n_gateways=10, now_ns=time.monotonic_ns())
        agg = Aggregator(cfg, epoch=7, fleet=fleet)
        if before_start is not None:
            before_start(agg)
        agg.start()
        started.append(agg)
        assert agg.first_cycle.wait(20.0)
        return agg

    yield _make
    for agg in started:
        agg.stop()


def endpoints(agg):
    return agg.publisher.endpoint, agg.telemetry.endpoint, agg.control.endpoint


def keep_fresh(agg):
    """Telemetry timestamps as if every vehicle had just reported (the test has no gateways)."""
    agg.fleet.last_telemetry_ns[: agg.fleet.n_rows] = time.monotonic_ns() + 3_600_000_000_000


def test_loop_keeps_its_period_without_drift(make_aggregator):
    """Every cycle runs for a deadline on the absolute period grid; an overrun skips whole periods (counted as
    missed) instead of drifting the grid or bursting to catch up, so cycles + missed periods = elapsed / period.
    (How late a cycle wakes is latency, not behaviour: `v2grt bench loop` measures it.)"""
    period_ns = int(PERIOD_S * 1e9)
    seen = []  # (deadline_ns, cycle end ns, missed_deadlines before this cycle)

    def spy(agg):
        cycle = agg.loop.cycle

        def recorded(deadline_ns, woke_ns):
            missed = agg.stats.missed_deadlines
            if len(seen) == 10:
                time.sleep(3.5 * PERIOD_S)  # one overrun of 3.5 periods: the loop must skip, not catch up
            times = cycle(deadline_ns, woke_ns)
            seen.append((deadline_ns, time.monotonic_ns(), missed))
            return times

        agg.loop.cycle = recorded

    agg = make_aggregator(before_start=spy)
    wait_until(lambda: len(seen) >= 60, timeout_s=30.0, what="60 cycles")
    snap = seen[:60]
    deadlines = np.array([d for d, _, _ in snap], np.int64)
    ends = np.array([e for _, e, _ in snap], np.int64)
    missed = np.array([m for _, _, m in snap], np.int64)
    assert np.all(deadlines % period_ns == 0), "a deadline off the period grid: the loop drifted"
    gaps = np.diff(deadlines) // period_ns
    assert np.all(gaps >= 1)
    assert np.all(deadlines[1:] >= ends[:-1]), "a cycle ran for a deadline already past: the loop caught up"
    # every grid point from the first deadline to the last either ran a cycle or was counted as missed
    assert np.array_equal(gaps - 1, np.diff(missed))
    assert len(snap) + int(missed[-1] - missed[0]) == (deadlines[-1] - deadlines[0]) // period_ns + 1
    assert gaps[10] >= 4  # the 3.5-period overrun of cycle 10 skipped at least 3 periods
    assert agg.stats.errors == 0


def test_one_off_work_is_done_before_the_first_cycle(make_aggregator):
    """The kernel's buffers and every gateway's frame layout are made before the loop's first
    deadline (at 100,000 vehicles each cost ~100 ms inside the first cycle), not by it."""
    seen = {}

    def spy(agg):
        prepare, rebuild = agg.dispatcher.prepare, agg._rebuild_layouts
        agg.dispatcher.prepare = lambda: (seen.setdefault("prepare", agg.stats.cycles), prepare())
        agg._rebuild_layouts = lambda: (seen.setdefault("layouts", agg.stats.cycles), rebuild())

    agg = make_aggregator(before_start=spy)
    assert seen == {"prepare": 0, "layouts": 0}
    assert agg.dispatcher._out.capacity == agg.fleet.capacity


def test_frequency_step_at_meter_changes_setpoints(make_aggregator, meter):
    """Under-frequency at the Modbus meter makes the fleet discharge, over-frequency charge, within cycles."""
    m, _ = meter
    agg = make_aggregator()
    keep_fresh(agg)
    pub, _, _ = endpoints(agg)
    with bus.StatusSubscriber(zmq.Context.instance(), pub) as status:
        m.set_frequency(49.5)  # DC: 100 % at -500 mHz
        st = wait_until(lambda: (s := status.recv(100)) and s["f_hz"] is not None and abs(s["f_hz"] - 49.5) < 0.01
                        and s, what="status at 49.5 Hz")
        assert st["target_kw"] == pytest.approx(1000.0, rel=1e-6)
        m.set_frequency(50.5)
        st = wait_until(lambda: (s := status.recv(100)) and s["f_hz"] and s["f_hz"] > 50.4 and s,
                        what="status at 50.5 Hz")
        assert st["target_kw"] == pytest.approx(-1000.0, rel=1e-6)


def record_requests(agg) -> list:
    """Per cycle from now on: (monotonic ns after the cycle's dispatch, request_kw, the meter's newest sample ns)."""
    rows = []
    agg.cycle_hooks.append(lambda a, r, t: rows.append((time.monotonic_ns(), r.request_kw, a.meter.latest.read()[1])))
    return rows


def test_dead_meter_ramps_out_and_recovers(make_aggregator, meter):
    """A silent meter raises GRID_FREQUENCY_STALE, ramps the response down steadily to 0 over rampout_s (not
    at once), and recovery restores it."""
    m, sim = meter
    stale_s, rampout_s, full_kw = 0.2, 1.5, 1000.0
    agg = make_aggregator(meter={"stale_after_s": stale_s, "rampout_s": rampout_s})
    m.set_frequency(49.5)  # GB DC: 100 % of 1000 kW
    wait_until(lambda: agg.last_result is not None and agg.last_result.request_kw == full_kw, what="full response")
    rows = record_requests(agg)
    sim.stop_device(m)
    wait_until(lambda: agg.events.counts["GRID_FREQUENCY_STALE"] >= 1, what="stale alarm")
    wait_until(lambda: rows and rows[-1][1] == 0.0, timeout_s=10.0, what="response ramped out")
    assert agg.loop.running and agg.stats.errors == 0
    snap = list(rows)
    t_last = snap[-1][2]  # the meter's last sample: the ramp runs from t_last + stale_s to + rampout_s
    kw = np.array([r for _, r, _ in snap])
    assert np.all(np.diff(kw) <= 0.0), "the response rose while the meter was silent"
    # A cycle that woke `age` after the last sample asks full * (1 - (age - stale) / rampout); the hook reads
    # the clock after the cycle woke, so its age bounds the cycle's from above and the request from below.
    ramp = [(t, r) for t, r, _ in snap if 0.0 < r < full_kw]
    assert len(ramp) >= 3, "no ramp: the response dropped at once"
    for t, r in ramp:
        assert r >= full_kw * (1.0 - ((t - t_last) / 1e9 - stale_s) / rampout_s) - 1e-6, (t - t_last, r)
    t_zero = next(t for t, r, _ in snap if r == 0.0)
    assert (t_zero - t_last) / 1e9 >= stale_s + rampout_s, "reached 0 before rampout_s had passed"
    sim.start_device(m)
    wait_until(lambda: agg.events.counts["GRID_FREQUENCY_RESTORED"] >= 1, timeout_s=10.0, what="restored")
    wait_until(lambda: agg.last_result.request_kw == full_kw, what="response back")


def test_dead_meter_with_on_stale_freeze_holds_the_last_response(make_aggregator, meter):
    """With on_stale: freeze a silent meter raises GRID_FREQUENCY_STALE and the response holds its last value
    (no ramp) until the meter answers again."""
    m, sim = meter
    agg = make_aggregator(meter={"stale_after_s": 0.2, "on_stale": "freeze", "rampout_s": 0.2})
    m.set_frequency(49.5)
    wait_until(lambda: agg.last_result is not None and agg.last_result.request_kw == 1000.0, what="full response")
    rows = record_requests(agg)
    sim.stop_device(m)
    wait_until(lambda: agg.events.counts["GRID_FREQUENCY_STALE"] >= 1, what="stale alarm")
    n_stale = len(rows)
    time.sleep(1.0)  # five times rampout_s: a ramp would have reached 0 long ago
    held = [r for _, r, _ in list(rows)[n_stale:]]
    assert held and all(r == 1000.0 for r in held), held
    assert agg.last_result.frequency_hz != agg.last_result.frequency_hz  # NaN: no frequency is claimed
    m.set_frequency(50.5)
    sim.start_device(m)
    wait_until(lambda: agg.events.counts["GRID_FREQUENCY_RESTORED"] >= 1, timeout_s=10.0, what="restored")
    wait_until(lambda: agg.last_result.request_kw == -1000.0, what="the response follows the meter again")


def test_gateway_receives_only_its_own_topic(make_aggregator):
    """A subscriber for gw1 never receives gw10's messages, and gets absolute setpoints for its nodes."""
    agg = make_aggregator()
    pub, _, _ = endpoints(agg)
    with bus.GatewaySubscriber(zmq.Context.instance(), pub, "gw1") as sub:
        msgs = [wait_until(lambda: sub.recv(100), what="gw1 setpoint") for _ in range(5)]
    assert all(msg.gw == "gw1" for msg in msgs)
    rows = agg.fleet.gateway_rows("gw1")
    assert list(msgs[-1].node_ids) == [agg.fleet.node_ids[r] for r in rows]
    assert msgs[-1].ep == 7 and msgs[-1].seq > msgs[0].seq


def test_malformed_frames_are_counted_and_the_loop_goes_on(make_aggregator):
    """Garbage telemetry and control frames are counted by code and dropped; cycles keep coming."""
    agg = make_aggregator()
    _, tel, ctl = endpoints(agg)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(tel)
    good = wire.encode_telemetry("gw1", 1, time.time_ns(), wire.join_ids(["EV_NODE_001"]), np.array([0.5]),
                                 np.array([0.0]), np.array([1], np.uint8), np.array([0], np.uint8))
    garbage = [b"", b"\xc1", good[:-3], msgpack.packb({"v": 99}), msgpack.packb([1, 2, 3]), b"\x00" * 5_000_000]
    for frame in garbage * 20:
        push.send(frame)
    c0 = agg.stats.cycles
    wait_until(lambda: sum(agg.telemetry.errors.values()) >= len(garbage) * 20 - 20, what="errors counted")
    assert {"BAD_MSGPACK", "BAD_VERSION"} <= set(agg.telemetry.errors)
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(ctl)
    dealer.send_multipart([b"", b"\x93not-a-request"])
    assert dealer.poll(2000)
    reply = wire.decode_reply(dealer.recv_multipart()[-1])
    assert not reply.ok and reply.error_code
    wait_until(lambda: agg.stats.cycles > c0 + 10, what="cycles continue")
    assert agg.stats.errors == 0
    push.close()
    dealer.close()


def test_telemetry_updates_fleet_and_foreign_nodes_are_refused(make_aggregator):
    """A telemetry batch updates its gateway's nodes at the next cycle; nodes of another gateway are refused."""
    agg = make_aggregator()
    _, tel, _ = endpoints(agg)
    fleet = agg.fleet
    own = [fleet.node_ids[r] for r in fleet.gateway_rows("gw1")[:3]]
    foreign = [fleet.node_ids[r] for r in fleet.gateway_rows("gw2")[:2]]
    with bus.TelemetryPusher(zmq.Context.instance(), tel) as push:
        ids = own + foreign
        n = len(ids)
        push.send(wire.encode_telemetry("gw1", 1, time.time_ns(), wire.join_ids(ids), np.full(n, 0.1),
                                        np.full(n, 2.5), np.ones(n, np.uint8), np.zeros(n, np.uint8)))
        wait_until(lambda: agg.router.refused_nodes["FOREIGN_NODE"] == 2, what="foreign nodes counted")
    rows = fleet.rows(own)
    wait_until(lambda: np.allclose(fleet.soc[rows], 0.1), what="soc applied")
    wait_until(lambda: all(agg.last_result.reasons[r] == Reason.SOC_BELOW_MINIMUM for r in rows), what="excluded")
    assert not np.allclose(fleet.soc[fleet.rows(foreign)], 0.1)
    assert np.allclose(fleet.p_actual_kw[rows], 2.5)


def test_emergency_stop_latches_until_reset(make_aggregator, meter):
    """An e-stop over the control socket zeroes every gateway with the flag set, from the cycle it names until
    reset, which releases every gateway."""
    m, _ = meter
    agg = make_aggregator(service={"capacity_kw": 100_000.0})  # more than the fleet has: every gateway carries
    keep_fresh(agg)
    m.set_frequency(49.5)
    pub, _, ctl = endpoints(agg)
    ctx = zmq.Context.instance()
    gateways = [gw for gw in agg.fleet.gateway_ids if len(agg.fleet.gateway_rows(gw))]
    assert len(gateways) == 10

    def next_message(sub, pred, what):
        return wait_until(lambda: (s := sub.recv(100)) and pred(s) and s, what=what)

    with contextlib.ExitStack() as stack:
        subs = {gw: stack.enter_context(bus.GatewaySubscriber(ctx, pub, gw)) for gw in gateways}
        cli = stack.enter_context(bus.ControlClient(ctx, ctl))
        for gw, sub in subs.items():
            next_message(sub, lambda s: s.p_kw.sum() > 0, f"{gw} discharging")
        reply = cli.call("estop", reason="test")
        assert reply.ok
        effective = reply.result["effective_seq"]
        latched = {gw: [] for gw in gateways}  # every message from the e-stop's cycle on, until the reset

        def collect(gw, until_seq):
            while (msg := subs[gw].recv(100 if until_seq else 0)) is not None:
                if msg.seq >= effective:
                    latched[gw].append(msg)
                if until_seq and msg.seq >= until_seq:
                    return True
            return not until_seq

        for gw in gateways:
            wait_until(lambda gw=gw: collect(gw, effective + 10), what=f"{gw}: ten cycles of e-stop")
        for gw in gateways:
            collect(gw, None)  # and what is queued since
        assert cli.call("reset").ok
        for gw, sub in subs.items():
            msg = next_message(sub, lambda s: not s.estop, f"{gw} released")
            assert all(x.estop and np.all(x.p_kw == 0.0) for x in latched[gw]), gw
            assert msg.seq > max((x.seq for x in latched[gw]), default=effective)
            next_message(sub, lambda s: not s.estop and s.p_kw.sum() > 0, f"{gw} discharging again")


def test_estop_reset_over_control_forgets_the_ffr_latch(make_aggregator, meter):
    """An e-stop and reset over the control socket drop a latched FFR activation: the fleet answers the
    frequency at the reset (0 when it has recovered) instead of finishing the pre-stop hold, and latches again
    at the next dip."""
    m, _ = meter
    agg = make_aggregator(service={"name": "ffr_49.7", "capacity_kw": 500.0})
    keep_fresh(agg)
    m.set_frequency(49.6)
    wait_until(lambda: agg.last_result.service_fraction == 1.0 and agg.last_result.allocated_kw > 0,
               what="FFR latched")  # held for 5 s from the last cycle at the trigger
    with bus.ControlClient(zmq.Context.instance(), agg.control.endpoint) as cli:
        assert cli.call("estop", reason="test").ok
        m.set_frequency(50.0)
        wait_until(lambda: agg.last_result.estop and agg.last_result.frequency_hz == 50.0, what="stopped at 50 Hz")
        assert cli.call("reset").ok
    wait_until(lambda: not agg.last_result.estop, what="released")
    seq = agg.seq
    wait_until(lambda: agg.seq >= seq + 5, what="five cycles after the reset")
    r = agg.last_result
    assert r.service_fraction == 0.0 and r.allocated_kw == 0.0  # without the fix: 1.0 until the hold ends
    m.set_frequency(49.6)
    wait_until(lambda: agg.last_result.service_fraction == 1.0, what="FFR latched again")


def test_shutdown_sends_final_zero(make_aggregator, meter):
    """Stopping the aggregator sends every gateway 0 kW with the e-stop flag cleared."""
    m, _ = meter
    agg = make_aggregator()
    keep_fresh(agg)
    m.set_frequency(49.5)
    pub, _, _ = endpoints(agg)
    with bus.GatewaySubscriber(zmq.Context.instance(), pub, "gw2") as sub:
        wait_until(lambda: (s := sub.recv(100)) and s.p_kw.sum() > 0, what="discharging")
        agg.stop()
        last = None
        while (msg := sub.recv(300)) is not None:
            last = msg
    assert last is not None and not last.estop and np.all(last.p_kw == 0.0)


def test_reload_rejects_bad_profile_and_keeps_old(make_aggregator, tmp_path):
    """A bad discharge profile is refused over the control socket and the old one stays in force."""
    agg = make_aggregator()
    _, _, ctl = endpoints(agg)
    bad = tmp_path / "bad.json"
    bad.write_text('{"minimum_soc": 2}')
    good = tmp_path / "good.json"
    good.write_text('{"minimum_soc": 0.35}')
    with bus.ControlClient(zmq.Context.instance(), ctl) as cli:
        reply = cli.call("reload", path=str(bad))
        assert not reply.ok and "minimum_soc=2" in reply.error_message
        assert agg.dispatcher.profile.minimum_soc == 0.2
        assert cli.call("reload", path=str(good)).ok
    wait_until(lambda: agg.dispatcher.profile.minimum_soc == 0.35, what="profile swapped")


def test_after_a_restart_only_vehicles_heard_since_are_dispatched(tmp_path):
    """After a restart, the vehicles of gateways that never report get 0 kW (TIMEOUT_BMS_RESPONSE) from the
    first cycle, although the roster says they are full, while a gateway that reports is dispatched."""
    from _plant import GATEWAYS, SimGateway, short_dir, write_config

    from v2grt.config import load_config
    from v2grt.events import EventLog

    sockets = short_dir()
    # No meter: a base schedule asks the whole fleet's discharge (12 x 11 kW) from the first cycle on,
    # so without the rule every roster row with SoC above the floor would carry power in cycle 1.
    cfg = load_config(write_config(tmp_path, sockets, service={"name": "dc", "capacity_kw": 0.0, "base_kw": 130.0}))
    sp, tel = f"ipc://{sockets}/sp", f"ipc://{sockets}/tel"
    gateways = {gw: SimGateway(gw, sp, tel) for gw in GATEWAYS}
    first = Aggregator(cfg, epoch=1)
    first.start()
    for g in gateways.values():
        g.start()
    try:
        assert first.first_cycle.wait(3.0)
        wait_until(lambda: first.never_heard() == 0 and first.last_result.n_carrying >= 8, timeout_s=5.0,
                   what="all three gateways heard and dispatched before the restart")
    finally:
        first.stop(final_zero=False)  # as if killed
    for gw in ("gw2", "gw3"):
        gateways[gw].stop()  # these never connect to the new process

    lines = LogLines()
    logger = logging.getLogger("test.restart")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    before = len(gateways["gw1"].messages)
    second = Aggregator(cfg, epoch=2, events=EventLog(interval_s=0.0, logger=logger))
    silent_rows = np.flatnonzero(np.isin(second.fleet.gateway[:12], [second.fleet.gateway_index(g)
                                                                      for g in ("gw2", "gw3")]))
    gw1_rows = second.fleet.gateway_rows("gw1")
    cycles = []  # per cycle: max |kW| and the set of reasons of the silent gateways' vehicles, gw1's total kW

    def record(agg, result, times):
        cycles.append((float(np.abs(result.setpoints_kw[silent_rows]).max()),
                       set(result.reasons[silent_rows].tolist()), float(result.setpoints_kw[gw1_rows].sum())))

    second.cycle_hooks.append(record)
    second.start()
    try:
        assert second.first_cycle.wait(3.0)
        wait_until(lambda: cycles and cycles[-1][2] > 20.0, timeout_s=5.0, what="gw1's vehicles dispatched")
        time.sleep(0.5)
        status = second.status_report()
    finally:
        second.stop()
        gateways["gw1"].stop()
    assert len(silent_rows) == 8
    assert [c[0] for c in cycles] == [0.0] * len(cycles), "a vehicle nobody has heard from carried power"
    assert all(c[1] == {Reason.TIMEOUT_BMS_RESPONSE} for c in cycles)
    assert max(m[2].sum() for m in gateways["gw1"].messages[before:]) > 20.0  # the reporting gateway got power
    assert status["never_heard"] == 8
    assert status["nodes_by_reason"]["TIMEOUT_BMS_RESPONSE"] == 8
    assert any(line.startswith("AWAITING_TELEMETRY vehicles=12 ") for line in lines.lines), lines.lines


def test_input_and_bus_threads_run_just_below_a_sched_fifo_control_thread(make_aggregator):
    """With SCHED_FIFO granted to the control thread (priority 10), the Modbus input, bus and publisher threads
    and the setpoint PUB's libzmq I/O thread get SCHED_FIFO 9, each step reported; without it they stay SCHED_OTHER and
    the report says why."""
    agg = make_aggregator(realtime={"sched_fifo_priority": 10})
    report = {s.step: s for s in agg.loop.setup_report}
    if not report["sched_fifo"].granted:
        pytest.skip(f"SCHED_FIFO not granted here: {report['sched_fifo'].detail}")
    threads = [*agg.input_threads, agg._bus_thread, agg.sender]  # the sender: the setpoint PUB's owner
    assert len(threads) >= 2
    for t in threads:
        assert report[f"sched_fifo:{t.name}"].granted, report[f"sched_fifo:{t.name}"].detail
        assert os.sched_getscheduler(t.native_id) == os.SCHED_FIFO
        assert os.sched_getparam(t.native_id).sched_priority == 9
    # the libzmq I/O thread that carries the setpoint PUB alone (reading a telemetry flood is the other's work)
    assert report["sched_fifo:zmq-io-setpoints"].granted, report["sched_fifo:zmq-io-setpoints"].detail
    assert bus.libzmq_io_threads()[agg._pub_io_tid] == f"ZMQbg/IO/{PUBLISHER_IO_THREAD}"
    assert os.sched_getparam(agg._pub_io_tid).sched_priority == 9
    assert agg.publisher.sock.getsockopt(zmq.AFFINITY) == 1 << PUBLISHER_IO_THREAD
    plain = make_aggregator()
    step = {s.step: s for s in plain.loop.setup_report}["sched_fifo_io"]
    assert not step.granted and "not SCHED_FIFO" in step.detail
    assert os.sched_getscheduler(plain._bus_thread.native_id) == os.SCHED_OTHER


def test_setup_report_names_the_kernel_build_after_the_rt_steps(make_aggregator):
    """engine.log gets the RT_SETUP lines and then `KERNEL backend=... isa=... threads=...` (operations.md's kernel
    line), and the status shows the kernel's build, its kernel.threads and how the last run went."""
    lines = LogLines()
    logger = logging.getLogger("v2grt.aggregator")
    logger.addHandler(lines)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        agg = make_aggregator()
        wait_until(lambda: any(m.startswith("KERNEL backend=") for m in lines.lines), timeout_s=5.0,
                   what="the KERNEL line")
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    kernel = next(m for m in lines.lines if m.startswith("KERNEL backend="))
    assert kernel == f"KERNEL backend={agg.dispatcher.backend} isa={agg.dispatcher.kernel_isa} threads=2"
    wait_until(lambda: agg.stats.cycles >= 1, timeout_s=5.0, what="a cycle")
    status = agg.status_report()["kernel"]
    assert status["threads"] == 2 and status["mode"]["threads"] == 1, status  # a small test fleet: one thread
    assert "50000 rows" in status["mode"]["why"], status
    assert lines.lines.index(kernel) > max(i for i, m in enumerate(lines.lines) if m.startswith("RT_SETUP "))


# --- the receive path under hostile input (issue 10) ------------------------------------------------




def push_socket(agg):
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.setsockopt(zmq.SNDHWM, 100_000)
    push.connect(agg.telemetry.endpoint)
    return push


def gw_batch(gw: str, ids: list[str], **values) -> bytes:
    """A telemetry batch for ``ids``: plugged in, SoC 0.6, every slow key at a healthy value, unless ``values``."""
    n = len(ids)
    full = {"soc": np.full(n, 0.6), "p_kw": np.zeros(n), "online": np.ones(n, np.uint8), "fault": np.zeros(n, np.uint8),
            "soh": np.full(n, 0.95), "temp_c": np.full(n, 20.0), "p_dis_max_kw": np.full(n, 11.0),
            "p_chg_max_kw": np.full(n, 11.0), "cycle_count": np.full(n, 10.0)}
    full.update(values)
    full = {k: v for k, v in full.items() if v is not None}
    return wire.encode_telemetry(gw, 1, time.time_ns(), wire.join_ids(ids), **full)


def thread_cpu_s(native_id: int) -> float:
    """CPU time (user + system, s) a thread of this process has used: its load, whatever else the box runs."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_frame_of_760000_ids_is_refused_before_its_ids_are_split(make_aggregator):
    """Issue 10 item 1: ten 3.5 MB frames of 760,000 ids behind empty arrays, under an unknown and a roster
    gateway, are refused by code from sizes alone (no batch reaches the id mapping) for a few ms of the bus
    thread's CPU in all. Before, each was split and put in a set on the bus thread with the GIL held: 2.8 s
    of CPU for the ten here, and 18 missed deadlines of this 20 ms loop (CPU time, not deadlines, is
    asserted: it does not depend on what else a CI box runs)."""
    agg = make_aggregator()
    ids = short_ids(760_000)
    # a new blob each time (one more id), so no cache of parsed ids can stand in for the work
    frames = [msgpack.packb({"v": 1, "gw": ("gw_attacker", "gw1")[k % 2], "seq": 1, "t_ns": 1,
                             "ids": ids + f"\x00more{k}".encode(), "soc": b"", "p_kw": b"", "online": b"",
                             "fault": b""}) for k in range(10)]
    assert len(frames[0]) > 3_500_000
    push = push_socket(agg)
    try:
        cpu0 = thread_cpu_s(agg._bus_thread.native_id)
        for frame in frames:
            push.send(frame)
            time.sleep(0.03)
        wait_until(lambda: sum(agg.telemetry.errors.values()) >= 10, what="frames counted")
        cpu_s = thread_cpu_s(agg._bus_thread.native_id) - cpu0
    finally:
        push.close()
    assert agg.telemetry.errors == {"UNKNOWN_GATEWAY": 5, "LENGTH_MISMATCH": 5}
    assert (agg.router.fast, agg.router.cached, agg.router.slow) == (0, 0, 0)
    assert cpu_s < 0.5, f"the bus thread spent {cpu_s:.2f} s of CPU on ten refused frames"


def test_batches_under_invented_ids_leave_no_state_and_log_one_line_per_code(make_aggregator):
    """Issue 10 items 2 and 3: 120 batches of ~1 MB of ids under a new gateway id each, and 100 batches of invented
    node ids under a roster gateway, are counted in bulk; no cache entry or log key per invented id (RSS grew
    155 MiB, engine.log by one line per gateway id); one engine.log line per code and roster gateway."""
    agg = make_aggregator()
    lines = LogLines()
    logging.getLogger("v2grt.engine").addHandler(lines)
    push = push_socket(agg)
    try:
        ids = short_ids(250_000)
        n = ids.count(b"\x00") + 1
        for k in range(120):
            push.send(msgpack.packb({"v": 1, "gw": f"gw_new_{k}", "seq": 1, "t_ns": 1, "ids": ids,
                                     "soc": bytes(4 * n), "p_kw": bytes(4 * n), "online": bytes(n), "fault": bytes(n)}))
        own = [agg.fleet.node_ids[r] for r in agg.fleet.gateway_rows("gw1")][:5]
        for k in range(100):
            push.send(gw_batch("gw1", own + [f"INVENTED_{k}_{i}" for i in range(10)]))
        wait_until(lambda: agg.telemetry.errors["UNKNOWN_GATEWAY"] == 120 and agg.router.refused_nodes[
            "UNKNOWN_NODE"] == 1000, what="all counted")
    finally:
        push.close()
        logging.getLogger("v2grt.engine").removeHandler(lines)
    assert list(agg.router._cache) == ["gw1"] and len(agg.router._cache["gw1"]) <= 4
    assert {key for code, key in agg.events._last if code in ("UNKNOWN_GATEWAY", "UNKNOWN_NODE")} <= {"", "gw1"}
    assert sum("UNKNOWN_GATEWAY" in line for line in lines.lines) == 1
    assert sum("UNKNOWN_NODE" in line for line in lines.lines) == 1
    assert agg.events.counts["UNKNOWN_GATEWAY"] == 120 and agg.events.counts["UNKNOWN_NODE"] == 100


def test_a_quarantined_vehicle_says_invalid_telemetry_and_keeps_its_values(make_aggregator):
    """Issue 10 item 4: a NaN in a non-strict batch gives INVALID_TELEMETRY (was OFFLINE, the values zeroed), the
    stored SoC and SoH stay (a later batch without soh showed SOH_BELOW_THRESHOLD), a valid batch clears it."""
    agg = make_aggregator()
    fleet = agg.fleet
    rows = fleet.gateway_rows("gw2")[:4]
    ids = [fleet.node_ids[r] for r in rows]
    push = push_socket(agg)
    try:
        push.send(gw_batch("gw2", ids))
        wait_until(lambda: all(agg.last_result.reasons[r] == Reason.OK for r in rows), what="vehicles OK")
        soc = np.full(4, 0.5)
        soc[1] = np.nan
        push.send(gw_batch("gw2", ids, soc=soc, soh=None, temp_c=None, p_dis_max_kw=None, p_chg_max_kw=None,
                           cycle_count=None))
        wait_until(lambda: agg.last_result.reasons[rows[1]] != Reason.OK, what="quarantine applied")
        time.sleep(5 * PERIOD_S)
        assert agg.last_result.reasons[rows[1]] == Reason.INVALID_TELEMETRY
        assert [agg.last_result.reasons[r] for r in rows[[0, 2, 3]]] == [Reason.OK] * 3
        assert fleet.soc[rows[1]] == pytest.approx(0.6) and fleet.soh[rows[1]] == pytest.approx(0.95)
        assert np.allclose(fleet.soc[rows[[0, 2, 3]]], 0.5)
        assert agg.router.refused_nodes["INVALID_TELEMETRY"] == 1 and not agg.telemetry.errors
        push.send(gw_batch("gw2", ids))
        wait_until(lambda: agg.last_result.reasons[rows[1]] == Reason.OK, what="cleared by a valid batch")
    finally:
        push.close()


def test_status_reply_counts_frames_vehicles_and_control_requests_apart(make_aggregator):
    """Issue 10 item 9: telemetry_errors counts frames, telemetry_refused_nodes vehicles, control_errors requests."""
    agg = make_aggregator()
    own = [agg.fleet.node_ids[r] for r in agg.fleet.gateway_rows("gw1")][:3]
    foreign = [agg.fleet.node_ids[r] for r in agg.fleet.gateway_rows("gw2")][:4]
    push = push_socket(agg)
    try:
        for _ in range(2):
            push.send(gw_batch("gw1", own + foreign + ["NOBODY"]))
        push.send(b"\xc1")
        with bus.ControlClient(zmq.Context.instance(), agg.control.endpoint) as cli:
            assert not cli.call("reload", path="/nonexistent/profile.json").ok
            wait_until(lambda: agg.router.refused_nodes["FOREIGN_NODE"] == 8 and agg.telemetry.errors, what="counted")
            st = cli.call("status").result
    finally:
        push.close()
    assert st["telemetry_errors"] == {"BAD_MSGPACK": 1}
    assert st["telemetry_refused_nodes"] == {"FOREIGN_NODE": 8, "UNKNOWN_NODE": 2}
    assert st["control_errors"] == {"BAD_PROFILE": 1}
    assert st["journal"] == {"enabled": False}  # the config has no journal section (test_journal: an enabled one)
    doc = (Path(__file__).parent.parent / "docs" / "wire.md").read_text()
    section = doc[doc.index("### 6.1 The status reply"):doc.index("## 7. Fleet status")]
    assert [key for key in st if f"`{key}`" not in section] == []  # every key documented, with its unit
    assert [key for key in st["loop"] if f"`{key}`" not in section] == []
    assert [key for key in st["publisher"] if f"`{key}`" not in section] == []


def test_strict_telemetry_is_a_config_key_defaulting_to_quarantine(make_aggregator):
    """bus.telemetry_strict (default false) is validated; true drops a batch with a NaN whole (OUT_OF_RANGE)."""
    from v2grt.config import ConfigError

    base = {"fleet": {"random": 10}, "meter": None}
    assert config_from_dict(base).bus.telemetry_strict is False
    with pytest.raises(ConfigError, match=r"bus\.telemetry_strict='yes' must be true or false"):
        config_from_dict({**base, "bus": {"telemetry_strict": "yes"}})
    agg = make_aggregator(bus={"telemetry_strict": True})
    rows = agg.fleet.gateway_rows("gw3")[:3]
    ids = [agg.fleet.node_ids[r] for r in rows]
    push = push_socket(agg)
    try:
        push.send(gw_batch("gw3", ids, soc=np.array([0.5, np.nan, 0.5])))
        wait_until(lambda: agg.telemetry.errors["OUT_OF_RANGE"] == 1, what="batch dropped")
    finally:
        push.close()
    assert not agg.router.refused_nodes and not np.any(agg.fleet.soc[rows] == np.float32(0.5))


FLOOD_SENDER = """
import sys, time, zmq
endpoint, seconds = sys.argv[1], float(sys.argv[2])
push = zmq.Context().socket(zmq.PUSH)
push.linger = 0
push.connect(endpoint)
heavy = b"\\xdd" + (20000).to_bytes(4, "big") + b"\\x01" * 20000  # 20 kB the decoder reads through: ~0.1 ms
frames = [bytes([0xc1]) * 7, b"\\x93\\x01\\x02", b"\\x81\\xa1v\\x02", b"\\xa5hello", heavy]
end = time.monotonic() + seconds
sent = 0
while time.monotonic() < end:
    for frame in frames:
        push.send(frame)  # blocks at the HWM: as fast as the aggregator takes them
    sent += len(frames)
print(sent)
"""


def flood(agg, seconds: float) -> subprocess.Popen:
    """A sender process pushing garbage to ``agg``'s telemetry PULL for ``seconds``, as fast as it is taken: it
    produces faster than the bus thread can decode (a fifth of the frames take ~0.1 ms each to refuse)."""
    return subprocess.Popen([sys.executable, "-c", FLOOD_SENDER, agg.telemetry.endpoint, str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_no_message_is_decoded_while_the_control_thread_runs_its_cycle(make_aggregator, monkeypatch):
    """Issue 10 item 1 (the receive gate): under a flood that saturates the bus thread, no cycle sees more than
    one telemetry decode start inside it (the one begun before the gate closed); without the gate the bus
    thread interleaves dozens of decodes per cycle at the GIL's switch interval."""
    starts, cycles = [], []
    decode = wire.decode_telemetry

    def recording_decode(*args, **kwargs):
        starts.append(time.monotonic_ns())
        return decode(*args, **kwargs)

    def instrument(agg):
        cycle = agg.loop.cycle

        def timed_cycle(deadline_ns, woke_ns):
            t0 = time.monotonic_ns()
            try:
                return cycle(deadline_ns, woke_ns)
            finally:
                cycles.append((t0, ends[-1] if ends else t0))

        ends = []
        agg.cycle_hooks.append(lambda agg, result, times: ends.append(time.monotonic_ns()))  # before the gate opens
        agg.loop.cycle = timed_cycle

    monkeypatch.setattr(wire, "decode_telemetry", recording_decode)
    agg = make_aggregator(before_start=instrument)
    sender = flood(agg, 3.0)
    try:
        wait_until(lambda: len(starts) > 5000, timeout_s=10.0, what="the flood reaches the bus thread")
        n_cycles = len(cycles)
        wait_until(lambda: len(cycles) >= n_cycles + 60, timeout_s=20.0, what="60 cycles under the flood")
    finally:
        sender.wait(20)
    window = [c for c in cycles[n_cycles:] if c[1] > c[0]]
    t = np.array(starts, np.int64)
    inside = [int(np.count_nonzero((t > t0) & (t < t1))) for t0, t1 in window]
    assert len(window) >= 50
    assert max(inside) <= 1, f"decodes started inside cycles: {sorted(inside)[-10:]} (of {len(window)} cycles)"


def test_the_bus_thread_keeps_to_its_receive_budget_under_a_flood(make_aggregator):
    """Issue 10 item 1 (the receive budget): while a sender process floods cheap garbage faster than the bus
    thread decodes, with bus.receive_budget 0.2 the bus thread's CPU time over 3 s stays near a fifth of it
    (asserted < 0.4), the overload is counted (budget_exhausted, throttled_s) and the loop keeps its cycles.
    Without a budget a saturated bus thread takes a whole core (CPU time ~ elapsed)."""
    agg = make_aggregator(bus={"receive_budget": 0.2})
    sender = flood(agg, 60.0)
    try:
        wait_until(lambda: agg.telemetry.frames > 1000, timeout_s=10.0, what="the flood reaches the bus thread")
        gate = agg.gate
        cycles0, exhausted0 = agg.stats.cycles, gate.exhausted
        cpu0, t0 = thread_cpu_s(agg._bus_thread.native_id), time.monotonic()
        time.sleep(3.0)
        elapsed_s = time.monotonic() - t0
        cpu_s = thread_cpu_s(agg._bus_thread.native_id) - cpu0
        cycles, exhausted = agg.stats.cycles - cycles0, gate.exhausted - exhausted0
    finally:
        sender.kill()
        sender.wait()
    assert cpu_s < 0.4 * elapsed_s, f"bus thread CPU {cpu_s:.2f} s in {elapsed_s:.2f} s (budget 0.2)"
    assert cycles >= 0.5 * elapsed_s / PERIOD_S, f"{cycles} cycles in {elapsed_s:.2f} s at {PERIOD_S} s"
    # The flood must really be over budget for the CPU bound above to mean anything. How often it is depends
    # on how much CPU the sender process gets: quiet, in most periods; at load 15-20 (other test suites on the
    # two cores) in 26 of 131 and 68 of 142. That the budget ran out at all, and was counted, is what shows the
    # gate at work; without a budget it never runs out (the CPU bound then fails instead).
    assert exhausted >= 5, f"the budget ran out in {exhausted} of {cycles} periods under the flood"
    with bus.ControlClient(zmq.Context.instance(), agg.control.endpoint) as cli:
        receive = cli.call("status").result["receive"]
    assert receive["budget_exhausted"] >= exhausted and receive["throttled_s"] > 0, receive
    # CPU ms in one window: the budget (4 ms) plus the batch admitted last, whose decode takes longer in CPU time
    # on a loaded machine (7.4 ms seen at load 8 against the 7 ms this allowed before). Without a budget the
    # window's CPU runs to the period (20 ms), so 10 ms still tells the two apart.
    assert receive["max_window_busy_ms"] < 0.5 * PERIOD_S * 1e3, receive


def test_control_requests_are_answered_within_periods_while_cycles_raise(make_aggregator):
    """Review F5: while every cycle raises (a hook's bug, logged as CYCLE_ERROR), control requests are still
    answered within a few periods: the receive gate opens after each cycle that raised too (without it the bus
    thread waited gate.MAX_WAIT_NS, 1 s, for a cycle to publish)."""
    failing = []

    def buggy_hook(agg, result, times):
        if failing:
            raise RuntimeError("test: a cycle hook's bug")

    def before_start(agg):
        agg.loop.max_consecutive_errors = 10**6  # the loop keeps going: the test is about the gate
        agg.cycle_hooks.append(buggy_hook)

    agg = make_aggregator(before_start=before_start)
    latencies_s = []
    with bus.ControlClient(zmq.Context.instance(), agg.control.endpoint, timeout_ms=5000) as cli:
        errors0 = agg.loop.stats.errors
        failing.append(True)
        try:
            wait_until(lambda: agg.loop.stats.errors >= errors0 + 3, what="three cycles raised")
            for _ in range(5):
                t0 = time.monotonic()
                assert cli.call("status").ok
                latencies_s.append(time.monotonic() - t0)
                time.sleep(0.013)  # off the period grid
        finally:
            failing.clear()
        assert agg.loop.stats.errors >= errors0 + 5  # the requests were answered while cycles raised
    # Without the gate opening after a cycle that raised, every reply waits out MAX_WAIT_NS (1 s). The median
    # of five tells the two apart where the slowest alone did not: one reply took 0.44 s at load 8 (a preempted
    # bus thread), against the 0.2 s (10 periods) this test asked of all five before.
    latency_s = sorted(latencies_s)[len(latencies_s) // 2]
    assert latency_s < 10 * PERIOD_S, f"control replies took {[round(s, 3) for s in latencies_s]} s"
    assert max(latencies_s) < 0.5 * MAX_WAIT_NS / 1e9, f"control replies took {[round(s, 3) for s in latencies_s]} s"


def test_an_exception_on_the_bus_thread_is_logged_and_the_thread_goes_on(make_aggregator, caplog):
    """Review F1: an exception in the bus thread's loop (here, once, from serving a control request) is logged as
    BUS_THREAD_ERROR (CRITICAL, with its traceback) and the thread keeps serving control requests and
    telemetry; before, the thread died and with it every control request, the e-stop included."""
    agg = make_aggregator()
    serve_once = agg.control.serve_once
    raised = []

    def buggy_serve_once(*args, **kwargs):
        if not raised:
            raised.append(True)
            raise RuntimeError("test: a bug on the bus thread")
        return serve_once(*args, **kwargs)

    agg.control.serve_once = buggy_serve_once
    with caplog.at_level(logging.CRITICAL), \
            bus.ControlClient(zmq.Context.instance(), agg.control.endpoint, timeout_ms=5000) as cli:
        assert cli.call("status").ok  # the bus thread raised at its first turn, served it at the next
        assert raised and agg._bus_thread.is_alive()
        assert cli.call("estop", reason="test").ok
    lines = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("BUS_THREAD_ERROR" in r.getMessage() and "RuntimeError" in r.getMessage() for r in lines), lines
    assert any(r.exc_info and "a bug on the bus thread" in str(r.exc_info[1]) for r in lines), lines
