"""Tests for v2grt.io.bus: real ZeroMQ sockets on loopback TCP with ephemeral ports."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from v2grt.codes import Reason
from v2grt.io import bus, wire
from v2grt.testing import steal_port_after_unbind

ANY = "tcp://127.0.0.1:*"
T_NS = 1_700_000_000_000_000_000


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()  # returns at once only if every socket was closed with linger 0


def setpoints(gw: str, seq: int, n: int = 2, ep: int = 1) -> bytes:
    ids = wire.join_ids([f"{gw}_ev{i}" for i in range(n)])
    return wire.encode_setpoints(gw, ep, seq, T_NS, T_NS + 10**9, False, ids, np.full(n, 1.5),
                                 np.zeros(n, np.uint8))


def telemetry(gw: str = "gw1", seq: int = 0, soc: float = 0.5) -> bytes:
    ids = wire.join_ids(["EV1", "EV2"])
    return wire.encode_telemetry(gw, seq, T_NS, ids, [soc, 0.6], [1.0, -2.0], [1, 1], [0, Reason.OFFLINE])


def wait_for(predicate, timeout_s: float = 3.0, step=None):
    """Call ``step`` and poll ``predicate`` until it holds or the deadline passes (slow joiner safe)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step is not None:
            step()
        if predicate():
            return True
    return False


class ServerThread:
    """A ControlServer owned by its own thread (one owner per socket), stopped by an event and joined."""

    def __init__(self, ctx, handler, endpoint=ANY, serving=True):
        self.stop = threading.Event()
        self.serving = threading.Event()
        if serving:
            self.serving.set()
        self.ready: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(ctx, endpoint, handler), daemon=True)
        self.thread.start()
        self.endpoint, self.server = self.ready.get(timeout=5)

    def _run(self, ctx, endpoint, handler):
        with bus.ControlServer(ctx, endpoint, handler) as server:
            self.ready.put((server.endpoint, server))
            while not self.stop.is_set():
                if self.serving.wait(0.02):
                    server.serve_once(timeout_ms=20)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def handler(request: wire.ControlRequest):
    if request.cmd == "status":
        return {"n_nodes": 3}
    if request.cmd == "test_discharge" and request.args["node_id"] == "EV9":
        raise wire.WireError("REFUSED", "node 'EV9' is not in the fleet")
    if request.cmd == "reload":
        raise RuntimeError("profile parser exploded")
    return {"cmd": request.cmd, **request.args}


def test_gateway_subscriber_receives_only_its_own_topic(ctx):
    """A SUB for gw1 gets gw1's setpoints and none of gw10's, which share the prefix 'gw1'."""
    with bus.SetpointPublisher(ctx, ANY) as pub, \
            bus.GatewaySubscriber(ctx, pub.endpoint, "gw1") as sub1, \
            bus.GatewaySubscriber(ctx, pub.endpoint, "gw10") as sub10, \
            bus.StatusSubscriber(ctx, pub.endpoint) as status_sub:
        got1, got10, seq = [], [], iter(range(10**6))

        def step():
            s = next(seq)
            pub.send(setpoints("gw10", s))
            pub.send(setpoints("gw1", s))
            pub.send(wire.encode_status({f.key: 0 if f.kind == "uint" else 0.0 for f in wire.STATUS_FIELDS}
                                        | {"excluded": {}, "estop": False}))
            for sub, got in ((sub1, got1), (sub10, got10)):
                msg = sub.recv(timeout_ms=5)
                if msg is not None:
                    got.append(msg)

        assert wait_for(lambda: len(got1) >= 3 and len(got10) >= 3, step=step)
        assert {m.gw for m in got1} == {"gw1"} and {m.gw for m in got10} == {"gw10"}
        assert all(m.node_ids == ("gw1_ev0", "gw1_ev1") for m in got1)
        assert not sub1.errors and not sub10.errors  # a foreign frame would count TOPIC_MISMATCH
        assert [m.seq for m in got1] == sorted({m.seq for m in got1})  # newest-only, in order
        assert wait_for(lambda: status_sub.recv(timeout_ms=5) is not None, step=step)


def test_gateway_subscriber_fences_an_older_epoch(ctx):
    """Once a newer epoch was accepted, an older aggregator's setpoints are counted and ignored."""
    with bus.SetpointPublisher(ctx, ANY) as pub, bus.GatewaySubscriber(ctx, pub.endpoint, "gw1") as sub:
        got = []

        def step():
            pub.send(setpoints("gw1", len(got) + 100, ep=7))
            msg = sub.recv(timeout_ms=5)
            if msg is not None:
                got.append(msg)

        assert wait_for(lambda: got, step=step)
        pub.send(setpoints("gw1", 10**6, ep=6))
        assert wait_for(lambda: sub.recv(timeout_ms=10) is not None or sub.errors)
        assert sub.errors["IDEMPOTENT_KEY_CONFLICT"] == 1 and sub.fence.epoch == 7


def test_telemetry_batches_arrive_and_bad_frames_are_counted_by_code(ctx):
    """Good batches are returned; garbage, wrong versions and out-of-range values are counted, never raised."""
    with bus.TelemetryReceiver(ctx, ANY) as rx, bus.TelemetryPusher(ctx, rx.endpoint) as tx:
        frames = [telemetry(seq=0), b"\x00garbage", msgpack.packb({"v": 9}), telemetry(seq=1, soc=1.5),
                  msgpack.packb([1, 2]), telemetry(seq=2)]
        assert all(tx.send(f) for f in frames)
        batches = []
        assert wait_for(lambda: batches.extend(rx.poll_batches(64, timeout_ms=20)) or rx.frames == len(frames))
        assert [b.seq for b in batches] == [0, 2] and batches[0].node_ids == ("EV1", "EV2")
        assert rx.errors == {"BAD_MSGPACK": 1, "BAD_VERSION": 1, "OUT_OF_RANGE": 1, "NOT_A_MAP": 1}
        assert any("'soc' node 'EV1'" in m for m in rx.last_errors)


def test_non_strict_receiver_quarantines_nodes_instead_of_dropping_batches(ctx):
    """With strict=False a batch with one bad node is delivered and the node is INVALID_TELEMETRY."""
    with bus.TelemetryReceiver(ctx, ANY, strict=False) as rx, bus.TelemetryPusher(ctx, rx.endpoint) as tx:
        tx.send(telemetry(soc=float("nan")))
        batches = []
        assert wait_for(lambda: batches.extend(rx.poll_batches(8, timeout_ms=20)) or batches)
        assert batches[0].fault.tolist() == [Reason.INVALID_TELEMETRY, Reason.OFFLINE]
        assert batches[0].invalid.tolist() == [True, False]
        assert rx.quarantined_nodes == 1 and not rx.errors  # the frame was used: not a bad frame


def test_multipart_telemetry_is_dropped_whole_and_counted(ctx):
    """A 2-frame message (garbage + a valid batch) applies nothing and counts one MULTIPART (issue 10 item 5)."""
    with bus.TelemetryReceiver(ctx, ANY) as rx, ctx.socket(zmq.PUSH) as tx:
        tx.linger = 0
        tx.connect(rx.endpoint)
        tx.send_multipart([b"\x00garbage", telemetry(seq=1)])
        tx.send_multipart([telemetry(seq=2), telemetry(seq=3), b"x" * 100])
        tx.send(telemetry(seq=4))
        batches = []
        assert wait_for(lambda: batches.extend(rx.poll_batches(8, timeout_ms=20)) or batches)
        assert [b.seq for b in batches] == [4]
        assert rx.errors == {"MULTIPART": 2} and rx.frames == 1
        assert "message of 3 frames" in rx.last_errors[-1]


class RefusingAdmit:
    """An admit() for the receive gate's place that counts its calls and refuses every ``every``-th one."""

    def __init__(self, every: int):
        self.every, self.calls = every, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls % self.every != 0


def test_a_message_of_100000_frames_is_dropped_in_admitted_steps(ctx):
    """Review F2: a PUSH of 100,000 empty frames is dropped DROP_PARTS_PER_ADMIT parts per admit(); refused
    midway, the rest stays queued and is dropped first at the next call; the batch after it still applies."""
    n = 100_000
    with bus.TelemetryReceiver(ctx, ANY) as rx, ctx.socket(zmq.PUSH) as tx:
        tx.linger = 0
        tx.connect(rx.endpoint)
        tx.send_multipart([b""] * n)
        tx.send(telemetry(seq=5))
        admit, batches, calls = RefusingAdmit(every=50), [], 0
        assert wait_for(lambda: batches.extend(rx.poll_batches(64, timeout_ms=20, admit=admit)) or batches,
                        timeout_s=20.0, step=lambda: None)
        assert [b.seq for b in batches] == [5]
        assert rx.errors == {"MULTIPART": 1} and rx.frames == 1
        assert f"message of {n} frames" in rx.last_errors[-1]
        assert admit.calls >= n // bus.DROP_PARTS_PER_ADMIT, admit.calls  # one admit per message before
        calls = admit.calls
    assert calls // 50 >= 2  # refused at least twice in the middle of the message, and resumed


def test_a_control_request_of_100000_frames_is_dropped_in_admitted_steps(ctx):
    """Review F2 on the control ROUTER: a DEALER's request of 100,000 frames is dropped in admitted steps,
    resumed after a refusal, never answered; the next request is."""
    n = 100_000
    srv = bus.ControlServer(ctx, ANY, handler)
    with srv, ctx.socket(zmq.DEALER) as dealer:
        dealer.linger = 0
        dealer.connect(srv.endpoint)
        dealer.send_multipart([b""] * n + [wire.encode_request("status", id=1)])
        dealer.send_multipart([b"", wire.encode_request("status", id=2)])
        admit = RefusingAdmit(every=50)
        assert wait_for(lambda: dealer.poll(0), timeout_s=20.0,
                        step=lambda: srv.serve_once(timeout_ms=20, admit=admit))
        assert wire.decode_reply(dealer.recv_multipart()[-1]).id == 2
        assert srv.errors == {"MULTIPART": 1} and f"message of {n + 2} frames" in srv.last_errors[-1]  # + identity
        assert admit.calls >= n // bus.DROP_PARTS_PER_ADMIT and admit.calls // 50 >= 2, admit.calls


def test_multipart_setpoints_and_status_are_dropped_whole_and_counted(ctx):
    """A gateway's and a status subscriber's SUB drop a multipart message whole; single frames still apply."""
    status = wire.encode_status({f.key: 0 if f.kind == "uint" else 0.0 for f in wire.STATUS_FIELDS}
                                | {"excluded": {}, "estop": False})
    with bus.SetpointPublisher(ctx, ANY) as pub, bus.GatewaySubscriber(ctx, pub.endpoint, "gw1") as sub, \
            bus.StatusSubscriber(ctx, pub.endpoint) as status_sub:
        got, statuses, seq = [], [], iter(range(1, 10**6))

        def step():
            pub.sock.send_multipart([setpoints("gw1", 10**6), b"junk"])  # would be the newest if applied
            pub.sock.send_multipart([status, b"junk"])
            pub.send(setpoints("gw1", next(seq)))
            pub.send(status)
            if (msg := sub.recv(timeout_ms=5)) is not None:
                got.append(msg)
            if (st := status_sub.recv(timeout_ms=5)) is not None:
                statuses.append(st)

        assert wait_for(lambda: len(got) >= 2 and statuses, step=step)
        assert all(m.seq < 10**6 for m in got) and sub.fence.seq < 10**6
        assert set(sub.errors) == {"MULTIPART"} and set(status_sub.errors) == {"MULTIPART"}


def test_oversized_frame_is_refused_by_the_socket_and_later_frames_still_arrive(ctx):
    """A frame over MAX_FRAME_BYTES never reaches the decoder (ZMQ_MAXMSGSIZE); the gateway reconnects."""
    with bus.TelemetryReceiver(ctx, ANY) as rx, bus.TelemetryPusher(ctx, rx.endpoint) as tx:
        tx.send(b"\x00" * (wire.MAX_FRAME_BYTES + 1))
        batches = []
        assert wait_for(lambda: (tx.send(telemetry(seq=5)), batches.extend(rx.poll_batches(8, 20)))
                        and batches, timeout_s=5)
        assert batches[0].seq == 5 and not rx.errors


def test_control_round_trip_and_error_replies(ctx):
    """A client gets results, REFUSED from the handler, INTERNAL for a handler crash, BAD_ARG locally."""
    srv = ServerThread(ctx, handler)
    try:
        with bus.ControlClient(ctx, srv.endpoint, timeout_ms=2000) as client:
            assert client.call("status").result == {"n_nodes": 3}
            reply = client.call("test_discharge", node_id="EV1", kw=5, seconds=10)
            assert reply.ok and reply.result == {"cmd": "test_discharge", "node_id": "EV1", "kw": 5.0,
                                                 "seconds": 10.0}
            refused = client.call("test_discharge", node_id="EV9", kw=5, seconds=10)
            assert (refused.ok, refused.error_code) == (False, "REFUSED") and "EV9" in refused.error_message
            crashed = client.call("reload")
            assert crashed.error_code == "INTERNAL" and "exploded" in crashed.error_message
            with pytest.raises(wire.WireError) as info:
                client.call("test_discharge", node_id="EV1", kw=-5, seconds=10)
            assert info.value.code == "BAD_ARG" and "'kw'" in info.value.message
            assert client.call("status").ok  # the socket is still usable
    finally:
        srv.close()
    assert srv.server.served == 3 and srv.server.errors == {"REFUSED": 1, "INTERNAL": 1}


def test_malformed_control_requests_are_answered_with_an_error_code(ctx):
    """Garbage, unknown commands and a DEALER without delimiter all get an error reply, not silence."""
    srv = ServerThread(ctx, handler)
    try:
        with ctx.socket(zmq.REQ) as req, ctx.socket(zmq.DEALER) as dealer:
            for s in (req, dealer):
                s.linger = 0
                s.connect(srv.endpoint)
            for payload, code in [(b"\xc1garbage", "BAD_MSGPACK"),
                                  (msgpack.packb({"v": 1, "cmd": "self_destruct", "id": 4}), "UNKNOWN_CMD"),
                                  (msgpack.packb({"v": 1, "cmd": "estop", "args": {"why": "x"}}), "BAD_ARG")]:
                req.send(payload)
                assert req.poll(2000), code
                reply = wire.decode_reply(req.recv())
                assert (reply.ok, reply.error_code) == (False, code)
                if code == "UNKNOWN_CMD":
                    assert reply.id == 4 and "self_destruct" in reply.error_message
            dealer.send_multipart([b""] * 9 + [wire.encode_request("status", id=98)])  # 11 frames at the ROUTER
            dealer.send(wire.encode_request("status", id=99))  # no empty delimiter frame
            assert dealer.poll(2000)
            reply = wire.decode_reply(dealer.recv_multipart()[-1])
            assert reply.ok and reply.id == 99  # the 11-frame message got no answer
            dealer.send_multipart([b""] * 7 + [wire.encode_request("status", id=100)])  # 9: the most accepted
            assert dealer.poll(2000)
            assert wire.decode_reply(dealer.recv_multipart()[-1]).id == 100
    finally:
        srv.close()
    assert srv.server.errors == {"BAD_MSGPACK": 1, "UNKNOWN_CMD": 1, "BAD_ARG": 1, "MULTIPART": 1}


def test_client_timeout_names_the_endpoint_and_the_client_can_retry(ctx):
    """No answer gives ControlTimeout naming the endpoint; once the server answers, the same client works."""
    srv = ServerThread(ctx, handler, serving=False)  # bound, but not answering yet
    try:
        with bus.ControlClient(ctx, srv.endpoint, timeout_ms=150) as client:
            t0 = time.monotonic()
            with pytest.raises(bus.ControlTimeout) as info:
                client.call("status")
            assert time.monotonic() - t0 < 10.0  # gave up (after 150 ms; the bound tells a hang from load)
            assert info.value.code == "TIMEOUT"
            assert f"the aggregator at {srv.endpoint} did not answer 'status' within 150 ms" in str(info.value)
            srv.serving.set()  # now it answers both requests; REQ_CORRELATE discards the stale reply
            client.timeout_ms = 2000
            reply = client.call("status")
            assert reply.ok and reply.id == 2 and reply.result == {"n_nodes": 3}
    finally:
        srv.close()
    assert srv.server.served == 2


def test_publisher_never_blocks_without_subscribers_or_with_a_stalled_one(ctx):
    """send() returns at once with no subscriber and with one that never reads (HWM full)."""
    with bus.SetpointPublisher(ctx, ANY, sndhwm=2) as pub:
        frame = setpoints("gw1", 0, n=5000)  # ~100 kB, fills TCP buffers quickly
        t0 = time.monotonic()
        for _ in range(2000):
            pub.send(frame)
        assert time.monotonic() - t0 < 20.0  # a blocking send would hang for ever; ~0.1 s on a quiet machine
        with ctx.socket(zmq.SUB) as stalled:
            stalled.linger = 0
            stalled.rcvhwm = 1
            stalled.setsockopt(zmq.SUBSCRIBE, wire.setpoint_topic("gw1"))
            stalled.connect(pub.endpoint)
            assert wait_for(lambda: stalled.poll(10), step=lambda: pub.send(frame))  # connected and flowing
            t0 = time.monotonic()
            for _ in range(2000):  # ~200 MB offered to a reader that never reads
                pub.send(frame)
            assert time.monotonic() - t0 < 20.0
        assert pub.sent >= 4000 and pub.dropped == 0  # PUB drops per subscriber, silently


def test_telemetry_pusher_drops_instead_of_blocking_when_the_aggregator_is_away(ctx, tmp_path):
    """With no aggregator, send() queues up to the HWM and then returns False immediately."""
    # An ipc path in this test's own directory: nothing else can bind it (a freed TCP port could be taken by
    # another socket on a busy machine, which then drains the queue and the test flakes).
    with bus.TelemetryPusher(ctx, f"ipc://{tmp_path / 'nobody-listens'}", sndhwm=4) as tx:
        # a pusher that blocked would wait 1 s per send past the HWM (46 s here) instead of hanging for ever
        tx.sock.setsockopt(zmq.SNDTIMEO, 1000)
        t0 = time.monotonic()
        results = [tx.send(telemetry(seq=i)) for i in range(50)]
        assert time.monotonic() - t0 < 5.0
        assert results[0] and not results[-1] and tx.dropped == results.count(False) > 0


def test_bind_conflict_is_a_bus_error_naming_role_and_endpoint(ctx):
    """Binding a second aggregator to a used port fails with BusError naming the socket and endpoint."""
    with bus.SetpointPublisher(ctx, ANY) as pub, \
            pytest.raises(bus.BusError, match=r"setpoint PUB: cannot bind to 'tcp://127\.0\.0\.1:\d+'"):
        bus.SetpointPublisher(ctx, pub.endpoint)


def test_a_rebind_that_cannot_bind_says_so_and_the_next_one_binds(ctx):
    """Review F1: when another socket takes the port between unbind and bind, rebind() raises BusError naming the
    endpoint within its timeout and marks the socket unbound; the next rebind() binds it again (no second
    unbind: libzmq's ENOENT escaped as a bare ZMQError) and subscribers are served again."""
    with bus.SetpointPublisher(ctx, ANY) as pub, ctx.socket(zmq.PUB) as thief:
        thief.linger = 0
        unbind = steal_port_after_unbind(pub, thief)
        t0 = time.monotonic()
        with pytest.raises(bus.BusError, match=pub.endpoint):
            pub.rebind(timeout_s=0.005)
        assert pub.unbound and time.monotonic() - t0 < 1.0
        pub.sock.unbind = unbind
        with pytest.raises(bus.BusError, match="unbound until rebind"):  # the port is still taken
            pub.rebind()
        thief.unbind(pub.endpoint)
        assert pub.rebind(timeout_s=2.0) > 0 and not pub.unbound
        with bus.GatewaySubscriber(ctx, pub.endpoint, "gw1") as sub:
            assert wait_for(lambda: sub.recv(10) is not None, step=lambda: pub.send(setpoints("gw1", 1)))


def test_sockets_carry_linger_heartbeat_hwm_and_size_options(ctx):
    """Every socket has linger 0 and MAXMSGSIZE, heartbeats except the aggregator's receivers and the gateway's
    SUB (which has TCP keepalive instead); the setpoint PUB its small SNDHWM."""
    with bus.SetpointPublisher(ctx, ANY) as pub, bus.GatewaySubscriber(ctx, pub.endpoint, "gw1") as sub, \
            bus.TelemetryReceiver(ctx, ANY) as pull, bus.ControlServer(ctx, ANY, handler) as router:
        for s in (pub.sock, sub.sock, pull.sock, router.sock):
            assert s.getsockopt(zmq.LINGER) == 0
            assert s.getsockopt(zmq.MAXMSGSIZE) == wire.MAX_FRAME_BYTES
        assert pub.sock.getsockopt(zmq.HEARTBEAT_IVL) == bus.HEARTBEAT_IVL_MS
        assert pub.sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == bus.HEARTBEAT_TIMEOUT_MS
        for s in (pull.sock, router.sock, sub.sock):  # RECEIVER_HEARTBEATS: libzmq issue 3937
            assert s.getsockopt(zmq.HEARTBEAT_IVL) == 0
            assert s.getsockopt(zmq.HEARTBEAT_TIMEOUT) in (-1, 0)  # libzmq: -1 = "as the interval", i.e. none
        assert (sub.sock.getsockopt(zmq.TCP_KEEPALIVE), sub.sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE),
                sub.sock.getsockopt(zmq.TCP_KEEPALIVE_INTVL), sub.sock.getsockopt(zmq.TCP_KEEPALIVE_CNT)) == (
            1, bus.SUB_KEEPALIVE_IDLE_S, bus.SUB_KEEPALIVE_INTVL_S, bus.SUB_KEEPALIVE_CNT)
        assert pub.sock.getsockopt(zmq.SNDHWM) == bus.SETPOINT_SNDHWM


def test_every_gateway_fan_in_socket_runs_without_heartbeats_and_with_keepalive(ctx):
    """SetpointFanIn's SUB to each aggregator (what gateway/core.py runs) has no ZMTP heartbeat and has keepalive."""
    with bus.SetpointPublisher(ctx, ANY) as a, bus.SetpointPublisher(ctx, ANY) as b, \
            bus.SetpointFanIn(ctx, [a.endpoint, b.endpoint], "gw1") as fan:
        assert len(fan.subs) == 2
        for sub in fan.subs:
            assert sub.sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
            assert sub.sock.getsockopt(zmq.TCP_KEEPALIVE) == 1


STALLED_RECEIVER = """
import sys, time, zmq
from v2grt.io import bus
ctx = zmq.Context()
with bus.TelemetryReceiver(ctx, "tcp://127.0.0.1:*", rcvhwm=10) as pull:
    print(pull.endpoint, flush=True)
    time.sleep(float(sys.argv[1]))  # never reads: every peer's pipe fills and its input stops
    n = 0
    while pull.sock.poll(200):
        pull.sock.recv()
        n += 1
print(n, flush=True)
"""


def test_a_full_telemetry_queue_survives_its_peers_disconnecting(ctx):
    """libzmq 4.3.5 aborts a receiver whose peer disconnects while its pipe is full once the receiver's own
    heartbeat timer fires (`Assertion failed: !_io_error`, seen in a bench fuzz run; libzmq issue 3937): the
    aggregator's receivers send no heartbeats, so a stalled TelemetryReceiver outlives six such peers.
    With heartbeats on this receiver (1 s) the child process aborted (SIGABRT) in every try."""
    child = subprocess.Popen([sys.executable, "-c", STALLED_RECEIVER, "2.5"], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.PIPE)
    try:
        endpoint = child.stdout.readline().strip()
        assert endpoint.startswith("tcp://"), child.stderr.read()
        for _ in range(6):  # each fills its pipe, then goes away with its input stopped at the receiver
            push = ctx.socket(zmq.PUSH)
            push.linger = 0
            push.setsockopt(zmq.SNDHWM, 10)
            push.connect(endpoint)
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                try:
                    push.send(b"x" * 2000, zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.001)
            time.sleep(0.05)
            push.close()
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0, f"the receiver process ended with {child.returncode}: {err.strip()[-300:]}"
    assert int(out.split()[-1]) > 0  # it still received afterwards


STALLED_GATEWAY = """
import sys, time, zmq
from v2grt.io import bus
ctx = zmq.Context()
with bus.SetpointFanIn(ctx, sys.argv[2].split(","), "gw1") as fan:
    print("up", flush=True)
    time.sleep(float(sys.argv[1]))  # a gateway starved of CPU: never reads, each SUB's pipe fills, input stops
    n = 0
    for sub in fan.subs:
        while sub.sock.poll(200):
            sub.sock.recv()
            n += 1
print(n, flush=True)
"""


def test_a_stalled_gateway_survives_its_aggregators_going_away(ctx):
    """The gateway-side twin of libzmq issue 3937: a SetpointFanIn that stops reading while six aggregators fill
    its queues and go away outlives them (with the SUB's heartbeats on, 1 s, the process aborted with
    `Assertion failed: !_io_error` in every try: 3 of 3 before the SUBs followed RECEIVER_HEARTBEATS)."""
    pubs = []
    try:
        for _ in range(6):
            pub = ctx.socket(zmq.PUB)
            pub.linger = 0
            pub.setsockopt(zmq.SNDHWM, 100_000)
            pubs.append((pub, f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"))
        child = subprocess.Popen([sys.executable, "-c", STALLED_GATEWAY, "2.5", ",".join(e for _, e in pubs)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "up", child.stderr.read()
            time.sleep(0.3)  # every SUB connected and subscribed
            for pub, _ in pubs:  # each fills its subscriber's pipe, then goes away with that input stopped
                end = time.monotonic() + 0.2
                while time.monotonic() < end:
                    pub.send(wire.setpoint_topic("gw1") + b"x" * 2000)
                time.sleep(0.05)
                pub.close()
            out, err = child.communicate(timeout=30)
        finally:
            child.kill()
    finally:
        for pub, _ in pubs:
            pub.close()
    assert child.returncode == 0, f"the gateway process ended with {child.returncode}: {err.strip()[-300:]}"
    assert int(out.split()[-1]) > 0  # what was queued is still read afterwards


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_curve_hook_encrypts_setpoints_end_to_end(ctx):
    """With CURVE keys on both ends setpoints flow; a subscriber without keys gets nothing."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    with bus.SetpointPublisher(ctx, ANY, curve={"secret_key": server_secret}) as pub, \
            bus.GatewaySubscriber(ctx, pub.endpoint, "gw1", curve={
                "server_key": server_public, "public_key": client_public, "secret_key": client_secret}) as sub, \
            bus.GatewaySubscriber(ctx, pub.endpoint, "gw1") as plain:
        got = []
        assert wait_for(lambda: got, step=lambda: (pub.send(setpoints("gw1", len(got) + pub.sent)),
                                                   got.append(m) if (m := sub.recv(5)) else None))
        assert plain.recv(timeout_ms=50) is None
    with pytest.raises(bus.BusError, match="server_key"):
        bus.GatewaySubscriber(ctx, ANY, "gw1", curve={"secret_key": client_secret})


# ------------------------------------------------------------------------------- several aggregators (HA)
def test_a_fan_in_never_applies_an_older_epoch_after_a_newer_one_from_another_aggregator(ctx):
    """Two aggregators' PUBs, one gateway listening to both: epoch 5 until epoch 6 is heard, then never 5 again."""
    with bus.SetpointPublisher(ctx, ANY) as old, bus.SetpointPublisher(ctx, ANY) as new, \
            bus.SetpointFanIn(ctx, [old.endpoint, new.endpoint], "gw1") as sub:
        admitted = []

        def step(*pubs):
            for pub, ep in pubs:
                pub.send(setpoints("gw1", pub.sent + 1, ep=ep))
            msg = sub.recv(timeout_ms=5)
            if msg is not None:
                admitted.append((msg.ep, sub.source))

        assert wait_for(lambda: admitted, step=lambda: step((old, 5)))
        # the stale leader goes on publishing beside the new one, which (a higher epoch) starts later
        assert wait_for(lambda: len([a for a in admitted if a[0] == 6]) >= 20 and sub.errors["IDEMPOTENT_KEY_CONFLICT"],
                        timeout_s=5.0, step=lambda: step((old, 5), (new, 6)))
        epochs = [ep for ep, _ in admitted]
        assert epochs == sorted(epochs) and set(epochs) == {5, 6}  # never back to 5 once 6 was applied
        assert {src for ep, src in admitted if ep == 6} == {1} and {src for ep, src in admitted if ep == 5} == {0}
        assert sub.fence.epoch == 6 and sub.received > len(admitted)


def test_a_fan_out_sends_every_batch_to_every_aggregator_and_a_missing_one_blocks_nothing(ctx):
    """Telemetry to two live aggregators and one that is not there: each live one gets every batch (a single PUSH
    would deal them round-robin); the missing one's copies are dropped and counted on its endpoint only."""
    with socket_path() as away, bus.TelemetryReceiver(ctx, ANY) as a, bus.TelemetryReceiver(ctx, ANY) as b, \
            bus.TelemetryFanOut(ctx, [a.endpoint, b.endpoint, away]) as out:
        got = {a.endpoint: [], b.endpoint: []}

        def step():
            for rx in (a, b):
                got[rx.endpoint] += [batch.seq for batch in rx.poll_batches(timeout_ms=5)]

        assert wait_for(lambda: all(got.values()), step=lambda: (out.send(telemetry(seq=0)), step()))
        first = out.sent
        for seq in range(1, 31):  # at the pace of a gateway (its queue holds 16 per aggregator)
            assert out.send(telemetry(seq=seq))
            time.sleep(0.002)
            step()
        assert wait_for(lambda: all(set(range(1, 31)) <= set(v) for v in got.values()), step=step)
        # the missing one queues its 16 (libzmq keeps a pipe for a connect not yet made), then drops
        assert out.dropped_by[away] > 0 and out.dropped_by[a.endpoint] == out.dropped_by[b.endpoint] == 0
        assert out.sent >= first + 60  # each batch queued at both live aggregators (and some at the missing one)


def socket_path():
    """An ipc:// endpoint in a private directory that nothing binds (a missing aggregator)."""
    import contextlib
    import tempfile

    @contextlib.contextmanager
    def cm():
        with tempfile.TemporaryDirectory(prefix="v2g-", dir="/tmp") as d:
            yield f"ipc://{d}/nobody"

    return cm()


@pytest.mark.parametrize("value, message", [
    ("", r"--setpoints: no endpoint given"),
    ("tcp://a:5560,", r"endpoint 2 of 2, '', is not a ZeroMQ endpoint; expected tcp/ipc/inproc://address"),
    ("a:5560", r"endpoint 1 of 1, 'a:5560', is not a ZeroMQ endpoint"),
    ("tcp://a:5560,tcp://a:5560", r"endpoint 'tcp://a:5560' is listed twice"),
    (",".join(f"tcp://a:{5560 + i}" for i in range(9)), r"9 endpoints; at most 8 aggregators per fleet"),
])
def test_a_list_of_aggregator_endpoints_is_validated_naming_the_option_and_the_endpoint(value, message):
    """Each bad endpoint list is refused naming the option, the endpoint and what is expected."""
    with pytest.raises(bus.BusError, match=message):
        bus.split_endpoints(value, "--setpoints")
    assert bus.split_endpoints("tcp://a:5560, tcp://b:5560", "--setpoints") == ["tcp://a:5560", "tcp://b:5560"]


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_a_gateway_trusts_each_aggregator_by_its_own_server_key(ctx):
    """Two aggregators with their own CURVE key pairs: one fan-in given both public keys in order hears both;
    a key count that does not match the endpoints is refused; keys given the wrong way round hear nothing."""
    (pa, sa), (pb, sb), (pc, sc) = zmq.curve_keypair(), zmq.curve_keypair(), zmq.curve_keypair()
    client = {"public_key": pc, "secret_key": sc}
    with bus.SetpointPublisher(ctx, ANY, curve={"secret_key": sa}) as a, \
            bus.SetpointPublisher(ctx, ANY, curve={"secret_key": sb}) as b:
        eps = [a.endpoint, b.endpoint]
        with pytest.raises(bus.BusError, match=r"3 aggregator public keys for 2 aggregator endpoints"):
            bus.curves_for({**client, "server_key": (pa, pb, pa)}, 2)
        with bus.SetpointFanIn(ctx, eps, "gw1", curves=bus.curves_for({**client, "server_key": (pa, pb)}, 2)) as sub, \
                bus.SetpointFanIn(ctx, eps, "gw1", curves=bus.curves_for({**client, "server_key": (pb, pa)}, 2)) as bad:
            sources = set()

            def step():
                a.send(setpoints("gw1", a.sent + 1, ep=1))
                b.send(setpoints("gw1", b.sent + 1, ep=2))
                if sub.recv(timeout_ms=5) is not None:
                    sources.add(sub.source)

            assert wait_for(lambda: 1 in sources, step=step)  # b's epoch 2; a's 1 is then fenced
            assert sub.fence.epoch == 2
            assert bad.recv(timeout_ms=100) is None and bad.received == 0
        with bus.SetpointFanIn(ctx, [a.endpoint], "gw1", curves=bus.curves_for({**client, "server_key": pa}, 1)) as one:
            assert wait_for(lambda: one.recv(timeout_ms=5) is not None,
                            step=lambda: a.send(setpoints("gw1", a.sent + 1)))
