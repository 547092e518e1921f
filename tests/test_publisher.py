"""The publisher thread (v2grt.publisher, bus.publisher_thread) in a real Aggregator on loopback sockets: it alone
touches the setpoint PUB, a cycle's frame buffer is never rewritten while it sends, it fences itself at send
time and decides the journal's `published` flag, and a planned handover resigns after the frames went out."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from v2grt import journal
from v2grt.aggregator import Aggregator
from v2grt.config import ConfigError, config_from_dict
from v2grt.fleet import Fleet
from v2grt.io import bus, wire
from v2grt.leadership import LEADER, LeaderView
from v2grt.testing import wait_until

PERIOD_S = 0.02
GATEWAYS = 8


def make(tmp_path=None, publisher_thread: bool = True, **sections) -> Aggregator:
    """An aggregator on ephemeral ports with no meter (every setpoint 0 kW), 200 vehicles on 8 gateways."""
    data = {"fleet_id": "test", "period_s": PERIOD_S, "budget_s": PERIOD_S,
            "realtime": {"mlockall": False, "gc_freeze": False},
            "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*",
                    "control": "tcp://127.0.0.1:*", "setpoint_ttl_s": 0.2, "publisher_thread": publisher_thread},
            "service": {"name": "dc", "capacity_kw": 1000.0}, "fleet": {"random": 200}, "meter": None}
    if tmp_path is not None:
        data["journal"] = {"enabled": True, "dir": str(tmp_path / "j"), "parquet": False}
    data.update(sections)
    fleet = Fleet.random(200, seed=1, n_gateways=GATEWAYS, now_ns=time.monotonic_ns())
    return Aggregator(config_from_dict(data), epoch=7, fleet=fleet)


class _Elector:
    """What the aggregator reads of v2grt.ha.Elector; the test replaces `view` whole, as the elector thread does.
    resign_after_publish() notes how many frames the socket had sent when it was called, and on which thread."""

    def __init__(self, agg: Aggregator):
        self.agg = agg
        self.view = LeaderView()
        self.resigning = self.handover_ready = False
        self.resigned_at: tuple[int, int] | None = None  # (frames sent by then, thread ident)

    def start(self) -> None:
        pass

    def stop(self, resign: bool = True) -> None:
        pass

    def snapshot(self, now_ns: int) -> dict:
        return {"role": self.view.role, "epoch": self.view.epoch}

    def resign_after_publish(self) -> None:
        if self.handover_ready:
            self.handover_ready, self.resigning = False, True
            self.resigned_at = (self.agg.publisher.sent, threading.get_ident())


def leading(epoch: int) -> LeaderView:
    return LeaderView(role=LEADER, epoch=epoch, surely_valid_until_ns=time.monotonic_ns() + 10**12, lease_id=1,
                      ttl_s=2)


def test_only_the_publisher_thread_touches_the_setpoint_socket():
    """Every send and subscription check on the setpoint PUB, the final zero at shutdown included, runs on the
    publisher thread, and a gateway receives its frames and then the final zero."""
    agg = make()
    callers: set[int] = set()
    send, send_frames, admit = agg.publisher.send, agg.publisher.send_frames, agg.publisher.admit_subscriptions

    def traced(fn):
        def call(*a):
            callers.add(threading.get_ident())
            return fn(*a)
        return call

    agg.publisher.send, agg.publisher.send_frames, agg.publisher.admit_subscriptions = map(traced, (send, send_frames,
                                                                                                 admit))
    agg.start()
    try:
        with bus.GatewaySubscriber(zmq.Context.instance(), agg.publisher.endpoint, "gw2") as sub:
            wait_until(lambda: sub.recv(100) is not None, 10.0, what="a setpoint message")
            seq = agg.seq
            agg.stop()
            last = None
            while (msg := sub.recv(300)) is not None:
                last = msg
    finally:
        agg.stop()
    assert callers == {agg.sender._thread.ident}
    assert last is not None and last.seq > seq and np.all(last.p_kw == 0.0) and not last.estop  # the final zero


def test_a_busy_publisher_makes_the_cycle_skip_and_its_frames_keep_their_header():
    """While the publisher thread is held with a cycle in hand, the next cycles are not handed over (counted,
    PUBLISHER_BUSY) and every frame of the held cycle still carries its own seq when it is sent: the buffer it
    reads is not rewritten by a later cycle."""
    agg = make()
    hold = threading.Event()
    seqs: list[int] = []
    send_frames = agg.publisher.send_frames

    def held_send_frames(frames):
        if hold.is_set():
            before = [wire.decode_setpoints(f).seq for f in frames.frames()]
            time.sleep(8 * PERIOD_S)  # this thread is stuck with a cycle in hand for 8 periods
            seqs.extend(before + [wire.decode_setpoints(f).seq for f in frames.frames()])
            hold.clear()
        return send_frames(frames)

    agg.publisher.send_frames = held_send_frames
    agg.start()
    try:
        assert agg.first_cycle.wait(10.0)
        hold.set()
        wait_until(lambda: not hold.is_set(), 10.0, what="the held cycle sent")
        agg.sender.wait_idle()
    finally:
        agg.stop()
    assert len(seqs) == 2 * GATEWAYS and len(set(seqs)) == 1, seqs
    assert agg.sender.busy_skips >= 3
    assert agg.events.counts["PUBLISHER_BUSY"] >= 1


def test_a_cycles_delivered_power_is_its_own_image_though_summed_off_the_control_thread(tmp_path):
    """The sum of the vehicles' reported power, which a cycle handed to the publisher thread owes (summed off the
    control thread), is the image as that cycle read it in its status and its journal record, though telemetry is
    written into the fleet while the publisher thread still holds the cycle; the next cycles carry the new sum."""
    agg = make(tmp_path)
    n = agg.fleet.n_rows
    agg.fleet.p_actual_kw[:n] = 1.0
    held, release = threading.Event(), threading.Event()
    held_seq: list[int] = []
    send_frames = agg.publisher.send_frames

    def held_send_frames(frames):
        if not held_seq and agg.first_cycle.is_set():
            held_seq.append(wire.decode_setpoints(next(iter(frames.frames()))).seq)
            held.set()
            release.wait(5.0)  # this thread holds the cycle while "telemetry" comes in
        return send_frames(frames)

    agg.publisher.send_frames = held_send_frames
    agg.start()
    statuses: dict[int, float] = {}
    try:
        with bus.StatusSubscriber(zmq.Context.instance(), agg.publisher.endpoint) as sub:
            assert held.wait(10.0)
            with agg._image_lock:  # as the bus thread writes a telemetry batch between cycles
                agg.fleet.p_actual_kw[:n] = 2.0
            release.set()

            def take() -> bool:
                m = sub.recv(100, max_frames=1)  # each status in turn, not the newest only
                if m is not None:
                    statuses[m["seq"]] = m["delivered_kw"]
                return bool(statuses) and max(statuses) > held_seq[0] + 2

            wait_until(take, 10.0, what="the held cycle's status and later ones")
    finally:
        agg.stop()
    (seq,) = held_seq
    assert statuses[seq] == 1.0 * n and statuses[max(statuses)] == 2.0 * n
    c = np.concatenate([s.cycles for s in (journal.read_segment(p) for p in (tmp_path / "j").glob("*.v2j"))])
    assert c["delivered_kw"][(c["seq"] == seq) & (c["published"] == 1)].tolist() == [1.0 * n]
    assert not np.isnan(c["delivered_kw"]).any() and c["delivered_kw"][-1] == 2.0 * n


@pytest.mark.parametrize("after_record", [False, True])
def test_a_lease_lost_between_hand_over_and_send_sends_nothing_and_journals_published_0(tmp_path, after_record):
    """HA self-fencing at send time: a cycle handed over while leading, whose lease is gone when the publisher
    thread is about to send, sends no frame and no status, and its journal record says `published` 0, whether
    the refusal comes before the control thread wrote that record or after (then the flag is set in the ring)."""
    agg = make(tmp_path)
    agg.ha, agg.epoch = _Elector(agg), 0
    lose = threading.Event()
    admit = agg.publisher.admit_subscriptions

    def admit_then_lose(*a):  # on the publisher thread, right before it asks may_send()
        if lose.is_set():
            lose.clear()
            if after_record:  # the control thread has written this cycle's record (published 1, undecided)
                j = agg.journal
                w = j._undecided
                wait_until(lambda: j._w > w >= 0, 1.0, what="the handed-over cycle's record")
            agg.ha.view = LeaderView()  # the elector thread's view: no longer leading
        return admit(*a)

    agg.publisher.admit_subscriptions = admit_then_lose
    agg.ha.view = leading(5)
    agg.start()
    try:
        with bus.GatewaySubscriber(zmq.Context.instance(), agg.publisher.endpoint, "gw1") as sub:
            wait_until(lambda: (m := sub.recv(100)) is not None and m.ep == 5, 10.0, what="frames of epoch 5")
            lose.set()
            wait_until(lambda: agg.sender.fenced == 1, 10.0, what="a cycle fenced at send time")
            fenced_seq = agg.seq
            time.sleep(5 * PERIOD_S)
            seen = []
            while (m := sub.recv(50)) is not None:
                seen.append(m.seq)
    finally:
        agg.stop()
    assert seen == [] or max(seen) < fenced_seq  # nothing of the fenced cycle, nothing after it
    assert agg.events.counts["PUBLISH_FENCED_AT_SEND"] == 1
    c = np.concatenate([s.cycles for s in (journal.read_segment(p) for p in (tmp_path / "j").glob("*.v2j"))])
    c = c[c["epoch"] == 5]
    assert int(c["published"][c["seq"] == fenced_seq][0]) == 0  # the fenced cycle's record (standbys' repeat its seq)
    assert set(c["published"][c["seq"] < fenced_seq]) == {1}


def test_a_planned_handover_resigns_on_the_publisher_thread_after_the_last_frames_went_out():
    """With a handover confirmed, the leader's next cycle is sent in full (every gateway's frame and the status)
    and only then does it resign, on the publisher thread; no later cycle is published."""
    agg = make()
    agg.ha, agg.epoch = _Elector(agg), 0
    agg.ha.view = leading(3)
    agg.start()
    try:
        wait_until(lambda: agg.seq >= 3, 10.0, what="three published cycles")
        agg.sender.wait_idle()
        agg.ha.handover_ready = True
        wait_until(lambda: agg.ha.resigned_at is not None, 10.0, what="the resignation")
        sent_then, thread = agg.ha.resigned_at
        seq = agg.seq
        time.sleep(5 * PERIOD_S)
        assert agg.seq == seq and agg.publisher.sent == sent_then  # nothing published after it
    finally:
        agg.stop()
    assert thread == agg.sender._thread.ident
    assert sent_then % (GATEWAYS + 1) == 0  # whole cycles only: each one's frames and its status


def test_publisher_thread_is_a_bool_and_false_sends_on_the_control_thread():
    """bus.publisher_thread must be true or false; with false there is no publisher thread and the control
    thread sends the frames itself."""
    with pytest.raises(ConfigError, match="publisher_thread"):
        make(publisher_thread="yes")
    agg = make(publisher_thread=False)
    callers: set[int] = set()
    send_frames = agg.publisher.send_frames
    agg.publisher.send_frames = lambda frames: callers.add(threading.get_ident()) or send_frames(frames)
    agg.start()
    try:
        wait_until(lambda: agg.seq >= 3, 10.0, what="three published cycles")
        control = agg.loop._thread.ident
    finally:
        agg.stop()
    assert agg.sender is None and control in callers


@pytest.mark.parametrize("interleaved", [False, True])
def test_each_gateway_gets_its_own_vehicles_setpoints_whether_or_not_the_roster_is_in_gateway_order(interleaved):
    """A roster in gateway order is copied into the frames, an interleaved one gathered: either way the frames
    a gateway receives carry exactly the kernel's setpoints and reasons of its own vehicles, in its id order."""
    fleet = Fleet.random(200, seed=1, n_gateways=GATEWAYS, now_ns=time.monotonic_ns())
    if interleaved:
        fleet.gateway[:200] = np.arange(200) % GATEWAYS
    data = {"fleet_id": "test", "period_s": PERIOD_S, "budget_s": PERIOD_S, "meter": None,
            "realtime": {"mlockall": False, "gc_freeze": False},
            "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
                    "setpoint_ttl_s": 0.2},
            "service": {"name": "dc", "capacity_kw": 1000.0, "base_kw": 300.0},  # a steady 300 kW discharge
            "fleet": {"random": 200}}
    agg = Aggregator(config_from_dict(data), epoch=7, fleet=fleet)
    fleet.last_telemetry_ns[:200] = time.monotonic_ns() + 3_600_000_000_000  # heard: the kernel dispatches them
    frames = []
    send_frames = agg.publisher.send_frames

    def keep(laid_out):
        frames.extend(laid_out.frames())
        return send_frames(laid_out)

    agg.publisher.send_frames = keep
    agg.start()
    try:
        wait_until(lambda: len(frames) >= 3 * GATEWAYS, 10.0, what="three cycles of frames")
        agg.loop.stop()  # the last cycle's result stays: its frames were gathered from it
        agg.sender.wait_idle()
    finally:
        agg.stop(final_zero=False)
    assert agg._rows_in_order is not interleaved
    sp, reasons = agg.last_result.setpoints_kw, agg.last_result.reasons
    last = [m for m in map(wire.decode_setpoints, frames) if m.seq == agg.seq]
    assert len(last) == GATEWAYS and sp[:200].any()
    for msg in last:
        rows = np.array([fleet.row_of[i] for i in msg.node_ids])
        assert set(rows) == set(fleet.gateway_rows(msg.gw))
        assert np.array_equal(msg.p_kw, sp[rows].astype(np.float32)) and np.array_equal(msg.reasons, reasons[rows])


def _received_past(sub, seq: int, got: list[int]) -> bool:
    """Take what the gateway has received (seqs into ``got``); True once a frame after ``seq`` came."""
    while (m := sub.recv(50)) is not None:
        got.append(m.seq)
        if m.seq > seq:
            return True
    return False


def test_a_cycle_laid_out_after_the_next_dispatch_began_is_not_sent(tmp_path):
    """The publisher thread reads the kernel's output arrays after the hand-over: held until the next cycle's
    kernel has run, it sends nothing of the held cycle (PUBLISHER_STALE, journal `published` 0) instead of frames
    that may mix two cycles under one header; later cycles go out as before."""
    agg = make(tmp_path)
    hold = threading.Event()
    seen: list[tuple[int, bool]] = []
    prepare = agg.sender.prepare

    def held_prepare(job):
        if hold.is_set():
            hold.clear()
            time.sleep(3 * PERIOD_S)  # the next cycles' kernels run meanwhile
            outcome = prepare(job)
            seen.append((job.seq, outcome))
            return outcome
        return prepare(job)

    agg.sender.prepare = held_prepare
    agg.start()
    try:
        with bus.GatewaySubscriber(zmq.Context.instance(), agg.publisher.endpoint, "gw1") as sub:
            wait_until(lambda: sub.recv(100) is not None, 10.0, what="a setpoint message")
            stale_before = agg.sender.stale  # a start on a loaded host can starve the thread too
            hold.set()
            got: list[int] = []
            wait_until(lambda: seen and _received_past(sub, seen[0][0] + 1, got), 10.0,
                       what="the held cycle and two after it")
    finally:
        agg.stop()
    (stale_seq, outcome), = seen
    assert outcome is False and agg.sender.stale >= stale_before + 1
    assert agg.events.counts["PUBLISHER_STALE"] == agg.sender.stale
    assert stale_seq not in got and max(got) > stale_seq
    c = np.concatenate([s.cycles for s in (journal.read_segment(p) for p in (tmp_path / "j").glob("*.v2j"))])
    assert int(c["published"][c["seq"] == stale_seq][0]) == 0
    assert agg.status_report()["publisher"]["stale"] == agg.sender.stale


@pytest.mark.parametrize("publisher_thread", [True, False])
def test_a_wild_setpoint_is_never_sent_whichever_thread_writes_the_frames(publisher_thread):
    """A NaN out of the kernel: the publisher thread refuses that cycle (SETPOINTS_REFUSED, counted) and the control
    thread, sending itself, raises in the cycle (CYCLE_ERROR); either way no frame of it reaches a gateway and the
    cycles after it are sent."""
    agg = make(publisher_thread=publisher_thread)
    poison = threading.Event()
    wild_seq: list[int] = []
    run_kernel = agg.dispatcher.run_kernel

    def wild(*a, **kw):
        result = run_kernel(*a, **kw)
        if poison.is_set():
            poison.clear()
            result.setpoints_kw[5] = np.nan
            wild_seq.append(agg.seq + 1)  # the seq this cycle publishes under
        return result

    agg.dispatcher.run_kernel = wild
    agg.start()
    try:
        with bus.GatewaySubscriber(zmq.Context.instance(), agg.publisher.endpoint, "gw1") as sub:
            wait_until(lambda: sub.recv(100) is not None, 10.0, what="a setpoint message")
            poison.set()
            got: list[int] = []
            wait_until(lambda: wild_seq and _received_past(sub, wild_seq[0], got), 10.0,
                       what="the wild cycle and one after it")
            wait_until(lambda: agg.stats.errors >= 1, 5.0, what="the refusal counted as a cycle error")
    finally:
        agg.stop()
    assert wild_seq[0] not in got and max(got) > wild_seq[0]
    if publisher_thread:
        assert agg.sender.refused == 1 and agg.events.counts["SETPOINTS_REFUSED"] == 1
    assert agg.stats.errors == 1  # a cycle error on the control thread either way (three in a row stop the loop)


@pytest.mark.parametrize("publisher_thread", [True, False])
def test_wild_setpoints_every_cycle_stop_the_loop_whichever_thread_writes_the_frames(publisher_thread):
    """A kernel that keeps returning NaN: max_consecutive_errors cycle errors in a row stop the loop (LOOP_FAILED),
    whether the publisher thread refuses the frames or the control thread's own check raises."""
    agg = make(publisher_thread=publisher_thread)
    run_kernel = agg.dispatcher.run_kernel

    def wild(*a, **kw):
        result = run_kernel(*a, **kw)
        result.setpoints_kw[5] = np.nan
        return result

    agg.dispatcher.run_kernel = wild
    agg.start()
    try:
        wait_until(lambda: agg.loop.failed is not None, 10.0, what="the loop to stop on repeated wild setpoints")
    finally:
        agg.stop()
    assert isinstance(agg.loop.failed, wire.WireError)
    assert agg.stats.errors >= agg.loop.max_consecutive_errors
