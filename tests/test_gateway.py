"""Reference gateways on loopback: the shared core in a thread with a recording driver, and real
`v2grt gateway sim` processes, against a PUB and a PULL the test binds as the aggregator would."""

from __future__ import annotations

import contextlib
import csv
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from v2grt.codes import Reason
from v2grt.gateway.core import SLOW_KEYS, GatewayCore
from v2grt.io import wire
from v2grt.testing import wait_until, write_ten_vehicle_roster


class RecordingVehicles:
    """A driver that keeps every command it is given and reports fixed telemetry (all keys)."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)
        self.applied: list[tuple[int, np.ndarray]] = []

    def apply(self, p_kw, now_ns):
        self.applied.append((now_ns, p_kw.copy()))

    @property
    def last(self):
        return self.applied[-1][1] if self.applied else None

    def telemetry(self, now_ns):
        n = len(self.node_ids)
        p = self.last if self.last is not None else np.zeros(n)
        values = {"soc": np.full(n, 0.6), "p_kw": p, "online": np.ones(n, np.uint8), "fault": np.zeros(n, np.uint8),
                  "soh": np.full(n, 0.95), "temp_c": np.full(n, 25.0), "p_dis_max_kw": np.full(n, 11.0),
                  "p_chg_max_kw": np.full(n, 11.0), "v_dc": np.full(n, 360.0), "cycle_count": np.full(n, 100.0),
                  "cabin_temp_c": np.full(n, 20.0)}
        return values


@pytest.fixture
def aggregator_side():
    """A PUB for setpoints and a PULL for telemetry on ephemeral loopback ports, as an aggregator binds them."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pub_ep = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    pull_ep = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    yield ctx, pub, pull, pub_ep, pull_ep
    pub.close()
    pull.close()
    ctx.term()


@contextlib.contextmanager
def running_core(ctx, vehicles, pub_ep, pull_ep, **kwargs):
    """A GatewayCore for gw1 created and run on its own thread (its sockets never leave it)."""
    box, stop, ready = {}, threading.Event(), threading.Event()

    def main():
        box["core"] = GatewayCore(ctx, "gw1", vehicles, setpoints=pub_ep, telemetry=pull_ep, **kwargs)
        ready.set()
        box["core"].run(stop)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(20.0)
    try:
        yield box["core"]
    finally:
        stop.set()
        thread.join(3.0)
        assert not thread.is_alive()


def setpoints(ids, p_kw, *, epoch=5, seq=1, ttl_s=0.3, slow_n=1, t_ns=None, estop=False):
    t_ns = time.time_ns() if t_ns is None else t_ns
    return wire.encode_setpoints("gw1", epoch, seq, t_ns, t_ns + int(ttl_s * 1e9), estop, wire.join_ids(ids),
                                 np.full(len(ids), p_kw, np.float32), np.zeros(len(ids), np.uint8), slow_n=slow_n)


def publish_until(pub, frame_of_seq, pred, timeout_s=10.0, first_seq=1):
    """Publish (with rising seq) every 20 ms until pred() holds (PUB drops until the SUB has joined)."""
    seq = first_seq
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        pub.send(frame_of_seq(seq))
        seq += 1
        time.sleep(0.02)
        if pred():
            return seq
    raise AssertionError("the gateway never applied the published setpoints")


IDS = ["EV_A", "EV_B", "EV_C"]


# ------------------------------------------------------------------------------------------- core
def test_expired_setpoints_fall_back_to_zero_at_their_expiry(aggregator_side):
    """Setpoints hold until their expiry, and every command after it is 0 kW (the aggregator went quiet)."""
    ctx, pub, _pull, pub_ep, pull_ep = aggregator_side
    cars = RecordingVehicles(IDS)
    ttl_ns = 300_000_000
    with running_core(ctx, cars, pub_ep, pull_ep) as core:
        seq, end = 1, time.monotonic() + 10.0
        while not (cars.last is not None and (cars.last == 5.0).all()):
            assert time.monotonic() < end, "the gateway never applied the published setpoints"
            t_before = time.monotonic_ns()
            frame = setpoints(IDS, 5.0, seq=seq, ttl_s=ttl_ns / 1e9)  # t_ns read here, between the two
            t_after = time.monotonic_ns()
            pub.send(frame)
            seq += 1
            time.sleep(0.02)
        # no more messages from here on: the aggregator "died". The last message expires between
        # t_before + ttl and t_after + ttl (its exp_ns on the wall clock; its receive time + ttl is later).
        expires_ns = (t_before + ttl_ns, t_after + ttl_ns)
        wait_until(lambda: cars.applied[-1][0] > expires_ns[1] and (cars.last == 0.0).all(), 10.0,
                   "fall back to 0 kW")
        applied = list(cars.applied)
    at_5 = [bool((p == 5.0).all()) for _, p in applied]
    t_hold = max(t for i, (t, _) in enumerate(applied) if at_5[i] and (i == 0 or not at_5[i - 1]))  # last rise
    margin_ns = 50_000_000  # a wake's clock reads: monotonic for `now`, the wall clock a little later
    held = [p for t, p in applied if t_hold <= t < expires_ns[0] - margin_ns]
    after = [p for t, p in applied if t > expires_ns[1]]
    assert held and all((p == 5.0).all() for p in held), "fell to 0 kW before the setpoints expired"
    assert after and all((p == 0.0).all() for p in after), "kept a setpoint past its expiry"
    assert core.expiries == 1


def test_setpoints_already_expired_on_the_wall_clock_are_never_applied(aggregator_side):
    """A message whose exp_ns is in the past (UTC) counts as expired on arrival: the vehicles stay at 0 kW."""
    ctx, pub, _pull, pub_ep, pull_ep = aggregator_side
    cars = RecordingVehicles(IDS)
    with running_core(ctx, cars, pub_ep, pull_ep) as core:
        stale_t = time.time_ns() - 10**9
        publish_until(pub, lambda s: setpoints(IDS, 5.0, seq=s, t_ns=stale_t, ttl_s=0.3),
                      lambda: core.accepted >= 3)
        assert all((p == 0.0).all() for _t, p in cars.applied)


def test_older_epoch_is_rejected_and_counted_as_idempotent_key_conflict(aggregator_side):
    """Once epoch 5 is heard, epoch 4 (a stale scheduler) moves nothing and is counted; epoch 6 takes over."""
    ctx, pub, _pull, pub_ep, pull_ep = aggregator_side
    cars = RecordingVehicles(IDS)
    with running_core(ctx, cars, pub_ep, pull_ep) as core:
        publish_until(pub, lambda s: setpoints(IDS, 3.0, epoch=5, seq=s, ttl_s=2.0), lambda: (cars.last == 3.0).all())
        for seq in range(1000, 1005):
            pub.send(setpoints(IDS, 7.0, epoch=4, seq=seq, ttl_s=2.0))
            time.sleep(0.02)
        wait_until(lambda: core.rejected["IDEMPOTENT_KEY_CONFLICT"] == 5, 10.0, "five rejections")
        assert not any((p == 7.0).any() for _t, p in cars.applied)
        assert core.events.counts["IDEMPOTENT_KEY_CONFLICT"] >= 1  # logged (rate-limited), with the count
        publish_until(pub, lambda s: setpoints(IDS, 2.0, epoch=6, seq=s, ttl_s=2.0), lambda: (cars.last == 2.0).all())
        assert core.epoch == 6


def test_nodes_missing_from_the_message_get_zero_and_estop_zeroes_all(aggregator_side):
    """Absolute setpoints: a node the message does not name gets 0 kW; an e-stop message zeroes every node."""
    ctx, pub, _pull, pub_ep, pull_ep = aggregator_side
    cars = RecordingVehicles(IDS)
    with running_core(ctx, cars, pub_ep, pull_ep):
        publish_until(pub, lambda s: setpoints(["EV_C", "EV_A", "EV_OTHER"], 4.0, seq=s, ttl_s=2.0),
                      lambda: cars.last is not None and cars.last[0] == 4.0)
        np.testing.assert_array_equal(cars.last, [4.0, 0.0, 4.0])
        frame = wire.encode_setpoints("gw1", 5, 10_000, time.time_ns(), time.time_ns() + 2 * 10**9, True,
                                      wire.join_ids(IDS), np.zeros(3, np.float32), np.zeros(3, np.uint8))
        pub.send(frame)
        wait_until(lambda: (cars.last == 0.0).all(), 10.0, "e-stop to zero")


def test_slow_keys_only_in_every_slow_nth_batch(aggregator_side):
    """With slow_n = 3 in the setpoints, SoH and friends ride only in batches whose seq % 3 == 0; SoC, power,
    online, fault and voltage ride in every batch."""
    ctx, pub, pull, pub_ep, pull_ep = aggregator_side
    cars = RecordingVehicles(IDS)
    batches = []
    with running_core(ctx, cars, pub_ep, pull_ep, telemetry_interval_s=0.03) as core:
        publish_until(pub, lambda s: setpoints(IDS, 1.0, seq=s, ttl_s=2.0, slow_n=3), lambda: core.slow_n == 3)
        start_seq = core.seq
        while len([b for b in batches if b.seq >= start_seq]) < 9:
            assert pull.poll(2000), "no telemetry batch"
            batches.append(wire.decode_telemetry(pull.recv()))
    later = [b for b in batches if b.seq >= start_seq]
    for b in later:
        assert b.soc is not None and b.p_kw is not None and b.v_dc is not None
        for key in SLOW_KEYS:
            assert (getattr(b, key) is not None) == (b.seq % 3 == 0), (key, b.seq)
    assert sum(b.soh is not None for b in later) >= 3


# --------------------------------------------------------------------------------- real processes
@pytest.fixture
def roster(tmp_path):
    """Eight plugged-in vehicles on gw1 (and two on gw2), full enough to discharge, not hot, not worn."""
    return write_ten_vehicle_roster(tmp_path / "roster.csv")


def start_gateway(roster, pub_ep, pull_ep, tmp_path, *extra):
    log = tmp_path / "gw1.log"
    cmd = [sys.executable, "-m", "v2grt.cli", "gateway", "sim", "--roster", str(roster), "--gateway-id", "gw1",
           "--setpoints", pub_ep, "--telemetry", pull_ep, "--telemetry-interval-s", "0.1",
           "--unplug-rate-per-h", "0", "--state-out", str(tmp_path / "state.csv"), "--log-file", str(log), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), log


def gw1_ids():
    return [f"EV_{i:02d}" for i in range(8)]


def feed_and_collect(pub, pull, p_kw, pred, timeout_s=30.0):
    """Publish p_kw to every gw1 vehicle at 10 Hz; return the first decoded telemetry batch satisfying pred.
    The timeout includes the gateway process's start (8 s were not enough under two busy loops)."""
    seq, end = 1, time.monotonic() + timeout_s
    while time.monotonic() < end:
        pub.send(setpoints(gw1_ids(), p_kw, seq=seq, ttl_s=1.0))
        seq += 1
        if pull.poll(100):
            batch = wire.decode_telemetry(pull.recv())
            if pred(batch):
                return batch
    raise AssertionError("no telemetry batch as expected")


@pytest.fixture
def gateway_process(aggregator_side, roster, tmp_path):
    procs = []

    def _start(*extra):
        _ctx, _pub, _pull, pub_ep, pull_ep = aggregator_side
        proc, log = start_gateway(roster, pub_ep, pull_ep, tmp_path, *extra)
        procs.append(proc)
        return proc, log

    yield _start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def test_gateway_process_telemetry_reaches_the_pull_socket_and_decodes(aggregator_side, gateway_process):
    """A real `v2grt gateway sim` pushes valid batches of exactly its own vehicles, delivering the setpoint."""
    _ctx, pub, pull, _pub_ep, _pull_ep = aggregator_side
    proc, _log = gateway_process("--unreachable-fraction", "0")
    batch = feed_and_collect(pub, pull, 4.0, lambda b: (np.abs(b.p_kw - 4.0) < 1e-3).all())
    assert batch.gw == "gw1"
    assert list(batch.node_ids) == gw1_ids()
    assert ((batch.soc > 0.6) & (batch.soc <= 0.7)).all()
    assert (batch.online == 1).all() and (batch.fault == Reason.OK).all()
    assert proc.poll() is None


def test_firmware_rejecting_vehicles_report_node_unreachable(aggregator_side, gateway_process, tmp_path):
    """Asked to discharge, the vehicles whose firmware rejects it deliver 0 kW and report NODE_UNREACHABLE."""
    _ctx, pub, pull, _pub_ep, _pull_ep = aggregator_side
    proc, log = gateway_process("--unreachable-fraction", "0.25", "--seed", "3")
    batch = feed_and_collect(pub, pull, 5.0, lambda b: (b.fault == Reason.NODE_UNREACHABLE).sum() == 2)
    rejecting = batch.fault == Reason.NODE_UNREACHABLE
    assert (batch.p_kw[rejecting] == 0.0).all()
    assert (np.abs(batch.p_kw[~rejecting] - 5.0) < 1e-3).all()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    with open(tmp_path / "state.csv", newline="") as fh:
        state = {row["node_id"]: row for row in csv.DictReader(fh)}
    flagged = {nid for nid, row in state.items() if row["firmware_rejects_discharge"] == "1"}
    assert flagged == {batch.node_ids[i] for i in np.flatnonzero(rejecting)}
    assert log.read_text().count("NODE_UNREACHABLE") == 2


def test_sigterm_brings_the_gateway_to_zero_and_exits_cleanly(aggregator_side, gateway_process, tmp_path):
    """SIGTERM: a last batch at 0 kW, the final state written, exit code 0."""
    _ctx, pub, pull, _pub_ep, _pull_ep = aggregator_side
    proc, log = gateway_process("--unreachable-fraction", "0")
    feed_and_collect(pub, pull, 3.0, lambda b: (np.abs(b.p_kw - 3.0) < 1e-3).all())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0  # a hung gateway would never exit; how fast it exits is not asserted here
    last = None
    while pull.poll(300):
        last = wire.decode_telemetry(pull.recv())
    assert last is not None and (last.p_kw == 0.0).all()
    with open(tmp_path / "state.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(float(r["p_kw"]) == 0.0 for r in rows)
    assert "GATEWAY_STOP gateway=gw1" in log.read_text()


def test_signal_storm_still_exits(aggregator_side, gateway_process):
    """SIGTERM/SIGINT back to back (a dying parent plus Ctrl-C) until the gateway has gone, through its whole
    shutdown: it still stops cleanly, exit code 0 (not killed by a late signal)."""
    _ctx, pub, pull, _pub_ep, _pull_ep = aggregator_side
    proc, log = gateway_process("--unreachable-fraction", "0")
    feed_and_collect(pub, pull, 3.0, lambda b: (np.abs(b.p_kw - 3.0) < 1e-3).all())
    end = time.monotonic() + 10.0
    while proc.poll() is None and time.monotonic() < end:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGINT)
        time.sleep(0.0005)
    assert proc.wait(10) == 0
    assert "GATEWAY_STOP gateway=gw1" in log.read_text()


def test_signal_flag_is_reentrant():
    """SignalFlag.set can run inside itself (a handler interrupting a handler) without a lock to deadlock on."""
    from v2grt.service import SignalFlag

    flag = SignalFlag()
    old = signal.signal(signal.SIGUSR1, lambda *_: (flag.set(), signal.raise_signal(signal.SIGUSR2)))
    old2 = signal.signal(signal.SIGUSR2, lambda *_: flag.set())
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert flag.wait(1.0) and flag.is_set()
        flag.clear()
        assert not flag.wait(0.05)
    finally:
        signal.signal(signal.SIGUSR1, old)
        signal.signal(signal.SIGUSR2, old2)


def test_gateway_without_vehicles_in_the_roster_refuses_to_start(roster, tmp_path):
    """A gateway id the roster does not use is a usage error naming the gateways that exist (exit code 2)."""
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "gateway", "sim", "--roster", str(roster),
                           "--gateway-id", "gw9"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "'gw9' has no vehicles" in proc.stderr and "gw1, gw2" in proc.stderr


def test_gateway_falls_to_zero_within_three_periods_after_the_aggregator_is_killed(roster, tmp_path):
    """kill -9 of a real v2g-aggregator process (default expiry: 3 x period_s = 0.3 s) brings a real gateway
    process's vehicles to 0 kW measured at their site within the expiry plus a margin for a loaded machine."""
    from _plant import log_lines, short_dir, start_aggregator, wait_for_log, write_config

    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    meter = SunSpecMeter(213, f_hz=49.5)  # GB DC: full discharge at -500 mHz
    sim = SimServerThread([meter]).start()
    ctx = zmq.Context()
    site = ctx.socket(zmq.PULL)
    site.linger = 0
    site_ep = f"tcp://127.0.0.1:{site.bind_to_random_port('tcp://127.0.0.1')}"
    sockets = short_dir()
    (tmp_path / "agg").mkdir()  # write_config writes its own roster.csv there
    cfg = write_config(tmp_path / "agg", sockets, fleet_id="gwkill", meter_port=sim.port(meter), period_s=0.1,
                       budget_s=0.1, fleet={"roster": str(roster)}, bus={"setpoint_ttl_s": None})
    log = tmp_path / "agg" / "engine.log"
    agg = start_aggregator(cfg, "--log-file", str(log))
    proc = None
    try:
        wait_for_log(log, "READY first cycle ran", timeout_s=20)
        assert "setpoint_ttl_s=0.3 " in log_lines(log, "START")[0]
        proc, _log = start_gateway(roster, f"ipc://{sockets}/sp", f"ipc://{sockets}/tel", tmp_path,
                                   "--unreachable-fraction", "0", "--site-power", site_ep)

        def site_kw():
            kw = None
            while site.poll(0):
                kw = sum(msgpack.unpackb(site.recv())["sites"].values())
            return kw

        wait_until(lambda: (site_kw() or 0.0) > 30.0, 15.0, "the gateway's vehicles discharging")
        agg.kill()  # SIGKILL: no last word to the gateways
        t_dead = time.monotonic()
        wait_until(lambda: site_kw() == 0.0, 3.0, "0 kW after the aggregator was killed")
        held_s = time.monotonic() - t_dead
        # 0.3 s expiry (from the last setpoint, received up to one period before the kill) plus the
        # gateway's wake and the site report; 1 s is a margin a loaded 2-core machine does not break.
        assert held_s < 1.0, f"the gateway held its last setpoints {held_s:.3f} s after kill -9"
        print(f"kill -9 -> 0 kW at the site: {held_s * 1000:.0f} ms (expiry 300 ms)")
        assert proc.poll() is None  # the gateway lives on, waiting for a scheduler
    finally:
        if agg.poll() is None:
            agg.kill()
        agg.wait(5)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
        site.close()
        ctx.term()
        sim.stop()


def test_a_gateway_given_unmatched_aggregator_lists_refuses_to_start(roster, tmp_path):
    """Two setpoint endpoints but one telemetry endpoint (HA, docs/wire.md 2.1): exit 2 naming both options."""
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "gateway", "sim", "--roster", str(roster),
                           "--gateway-id", "gw1", "--setpoints", "tcp://127.0.0.1:5560,tcp://127.0.0.2:5560",
                           "--telemetry", "tcp://127.0.0.1:5561"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert ("2 setpoint endpoints (--setpoints) but 1 telemetry endpoints (--telemetry): expected one of each per "
            "aggregator, in the same order") in proc.stderr
