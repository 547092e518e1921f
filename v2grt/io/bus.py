"""ZeroMQ socket owners for the wire protocol: setpoint/status PUB, telemetry PULL, control ROUTER, clients.

Each object owns one socket and must be used by one thread only (pyzmq sockets are not thread-safe);
shut one down from its owner thread with ``close()`` or a ``with`` block. Every socket has
``linger=0`` (a stopping aggregator must not hang on unsent setpoints: gateways fall back to 0 kW on
expiry anyway), ZMTP heartbeats except on the aggregator's receivers and the gateways' setpoint SUBs
(RECEIVER_HEARTBEATS; elsewhere a dead peer is noticed in HEARTBEAT_TIMEOUT_MS, not at the next TCP
timeout) and ZMQ_MAXMSGSIZE (a peer sending a frame over wire.MAX_FRAME_BYTES is disconnected before
the frame is buffered). Receivers decode with :mod:`v2grt.io.wire` and count bad frames by error
code instead of raising: garbage on the network must never stop the control loop.

Security (issue 6, docs/security.md): every constructor takes ``curve=`` (see ``_apply_security``);
the aggregator-side receivers take an ``authorize`` hook that sees each message's ZAP metadata
(``frame.get("User-Id")``) and may refuse it with a WireError (counted like a bad frame), the setpoint
publisher a ``subscribe_policy`` that admits each subscription per peer (XPUB manual mode), and every
bound socket can ``rebind()`` to drop its live connections (CURVE authenticates at connect time only).
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from v2grt.io import wire
from v2grt.io.wire import (
    ControlReply,
    ControlRequest,
    SetpointFence,
    SetpointMsg,
    TelemetryBatch,
    WireError,
)

log = logging.getLogger(__name__)

#: Aggregator-side bind endpoints (docs/wire.md section 2), equal to config.BusConfig's defaults:
#: loopback only, because without security.enabled the bus is unauthenticated (bind 0.0.0.0 by choice).
DEFAULT_SETPOINT_ENDPOINT = "tcp://127.0.0.1:5560"  # PUB: setpoints (sp/<gw>\0) and fleet status (status\0)
DEFAULT_TELEMETRY_ENDPOINT = "tcp://127.0.0.1:5561"  # PULL: gateway telemetry batches
DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5562"  # ROUTER: v2g-cli control requests

#: Client-side connect endpoints for a client on the aggregator's host.
DEFAULT_SETPOINT_CONNECT = "tcp://127.0.0.1:5560"
DEFAULT_TELEMETRY_CONNECT = "tcp://127.0.0.1:5561"
DEFAULT_CONTROL_CONNECT = "tcp://127.0.0.1:5562"

HEARTBEAT_IVL_MS = 1000  # send a ZMTP PING after this much silence
HEARTBEAT_TIMEOUT_MS = 3000  # drop the connection if no traffic at all this long after a PING
HEARTBEAT_TTL_MS = 3000  # ask the peer to drop us after this long without our traffic
#: The aggregator's receivers (telemetry PULL, control ROUTER) and the gateways' setpoint SUBs
#: (GatewaySubscriber, so SetpointFanIn and gateway/core.py) send no ZMTP heartbeats. libzmq 4.3.5
#: aborts the process (`Assertion failed: !_io_error (src/stream_engine_base.cpp:310)`) when a peer
#: disconnects while its receive pipe is full (input stopped by backpressure: the engine marks an I/O
#: error and waits for the pipe to drain) and this socket's heartbeat timer fires before it drains:
#: the timer's PING write asserts on the pending error. Reproduced in tests/test_bus.py in one second
#: with a heartbeat of 1 s; seen once in a "before" run of `v2grt bench fuzz`; libzmq issues 3937,
#: 4364, 4767, PR 4830 (unmerged). Under overload a full queue is the normal state (the receive
#: budget, docs/operations.md), so the timer must not exist. Nothing is lost: a receiver has nothing
#: to send to a dead peer (a control reply to a gone client is dropped anyway); peers still ping it
#: and get PONGs (a PING decoded from the backlog after such a disconnect could in principle take the
#: same path; not reproduced: peers pinging every 100 ms did not abort it). A gateway starved of CPU
#: is the same case on the other side: its SUB's pipe full (RCVHWM 4), an aggregator going away, and
#: the SUB's own timer aborts the gateway (reproduced in tests/test_bus.py with SetpointFanIn). A dead
#: aggregator is noticed instead by the setpoint expiry (`exp_ns`, bus.setpoint_ttl_s: 0 kW three
#: periods after the last setpoint by default, docs/wire.md 4.3 item 4, far sooner than a heartbeat
#: timeout of HEARTBEAT_TIMEOUT_MS), and its dead connection is
#: dropped by TCP keepalive (SUB_KEEPALIVE_*: the kernel's timer, none in libzmq's engine), so a
#: gateway reconnects to an aggregator host that died without a FIN; the setpoint PUB keeps its
#: heartbeats (the gateways answer its PINGs).
RECEIVER_HEARTBEATS = False
#: TCP keepalive on the gateways' setpoint SUBs (seconds): probes after this much silence on the wire,
#: this far apart, this many unanswered drop the connection (about 4 s after an aggregator host dies
#: silently, near HEARTBEAT_TIMEOUT_MS). A live aggregator is never silent that long (it publishes every
#: period, or pings every HEARTBEAT_IVL_MS as a standby) and a SIGSTOPped one's kernel still answers.
SUB_KEEPALIVE_IDLE_S = 1
SUB_KEEPALIVE_INTVL_S = 1
SUB_KEEPALIVE_CNT = 3
#: First reconnect after a connection drops (libzmq's default 100 ms, plus a random 0 to 100 %).
#: A revocation drops every connection of the setpoint PUB (docs/security.md): at 100 ms the others
#: missed the next cycle and paused 2 to 3 periods (bench_security: 199 to 311 ms at a 100 ms period);
#: at 10 ms they are back for it, about one period. Back-off to RECONNECT_IVL_MAX_MS still applies.
RECONNECT_IVL_MS = 10
RECONNECT_IVL_MAX_MS = 2000  # back off reconnects to a missing aggregator (default 100 ms, no backoff)
#: After a ZAP refusal libzmq 4.3.5 stops reconnecting for good (measured: one HANDSHAKE_FAILED_AUTH,
#: then silence), so a CURVE client recreates its socket itself (``_Owner.heal``): first after this,
#: doubling up to RECONNECT_IVL_MAX_MS while the refusals go on; each retry costs the aggregator's ZAP
#: thread one decision.
REFUSED_RETRY_FIRST_MS = 250
#: Parts of a multipart message dropped per ``admit()`` of the receive gate. libzmq queues a message of
#: any number of frames (only each frame's size is bounded, MAXMSGSIZE): one PUSH of 300,000 empty frames
#: (600 KB on the wire) cost the bus thread 1.2 s of CPU behind one admit (review F2); 256 parts are
#: ~1 ms at most.
DROP_PARTS_PER_ADMIT = 256

#: Setpoint PUB send queue per subscriber connection. libzmq keeps one queue per connection and a
#: GatewaySubscriber's connection carries only its own topic, so this is messages per gateway: 4
#: cycles. Beyond it PUB drops new messages for that subscriber silently (they are absolute
#: setpoints; the gateway's expiry covers the gap).
SETPOINT_SNDHWM = 4
TELEMETRY_RCVHWM = 1000  # frames queued at the aggregator across all gateways
TELEMETRY_SNDHWM = 16  # batches a gateway queues while the aggregator is away (older ones are stale)
LAST_ERRORS = 8  # error messages a receiver keeps for the status page


_MONITOR_IDS = itertools.count(1)


def libzmq_io_threads() -> dict[int, str]:
    """This process's libzmq I/O threads, native id -> name (``ZMQbg/IO/<n>``: n is the thread's index in
    its context, the bit of ZMQ_AFFINITY that selects it). Linux /proc; {} where it cannot be read."""
    out = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm", encoding="ascii", errors="replace") as f:
                    name = f.read().strip()
            except OSError:  # the thread ended meanwhile
                continue
            if name.startswith("ZMQbg/IO/"):
                out[int(tid)] = name
    except OSError:
        return {}
    return out


class BusError(RuntimeError):
    """A socket could not be set up (bind/connect failed, bad security keys); names role and endpoint."""


def _apply_security(sock: zmq.Socket, curve: Mapping[str, bytes] | None, *, server: bool) -> None:
    """Configure CURVE on ``sock`` before bind/connect; the one place security is set up.

    Server: ``{"secret_key": z85}``, optionally ``"zap_domain": str``. Client: ``{"server_key": z85,
    "public_key": z85, "secret_key": z85}`` (keys from ``zmq.curve_keypair()``; v2grt.security loads
    them from key files). Without ``zap_domain`` this is encryption only: any client that knows the
    server's public key may connect. With it, every handshake is decided by the context's ZAP handler
    (v2grt.security.Authenticator: key, role, address allowlist) and ZMQ_ZAP_ENFORCE_DOMAIN makes the
    socket fail closed: without a running handler libzmq would otherwise accept any client key.
    """
    if curve is None:
        return
    if not zmq.has("curve"):
        raise BusError("CURVE requested but this libzmq was built without CURVE support")
    needed = ("secret_key",) if server else ("server_key", "public_key", "secret_key")
    missing = [k for k in needed if not curve.get(k)]
    if missing:
        raise BusError(f"CURVE {'server' if server else 'client'} keys missing: {missing}; expected {needed}")
    if server:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve["secret_key"])
        if curve.get("zap_domain"):
            sock.setsockopt(zmq.ZAP_DOMAIN, str(curve["zap_domain"]).encode())
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    else:
        if not isinstance(curve["server_key"], (bytes, str)):  # several (bus.curves_for): one per socket
            raise BusError("CURVE client: several aggregator public keys given for one socket; a socket connects "
                           "to one aggregator and takes its key (--server-key FILE)")
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve["server_key"])
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve["public_key"])
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve["secret_key"])


class _Owner:
    """One socket, configured the house way, bound or connected; closed by ``close()`` or ``with``."""

    role = "socket"

    def __init__(self, ctx: zmq.Context, kind: int, endpoint: str, *, bind: bool,
                 curve: Mapping[str, bytes] | None, sndhwm: int | None = None, rcvhwm: int | None = None,
                 options: Mapping[int, int] | None = None, heartbeats: bool = True):
        self._spec = (ctx, kind, endpoint, bind, curve, sndhwm, rcvhwm, options, heartbeats)
        #: A connecting CURVE socket watches its handshakes (heal): refusals seen, the last ZAP status code,
        #: handshakes completed and when the last one was noticed.
        self.refusals = 0
        self.last_refusal: int | None = None
        self.handshakes = 0
        self.last_handshake_ns: int | None = None
        self._monitor: zmq.Socket | None = None
        self._reopen_at_ns: int | None = None
        self._retry_ms = REFUSED_RETRY_FIRST_MS
        #: (parts read, parts accepted) of a multipart message being dropped when the gate refused midway
        self._dropping: tuple[int, int] | None = None
        #: True while rebind() has dropped the listener and not yet bound the endpoint again: no peer can connect
        self.unbound = False
        self._open()
        #: The endpoint actually bound or connected (with the port resolved for ``tcp://host:*``).
        self.endpoint: str = self.sock.get(zmq.LAST_ENDPOINT).decode()

    def _open(self) -> None:
        ctx, kind, endpoint, bind, curve, sndhwm, rcvhwm, options, heartbeats = self._spec
        self._dropping = None  # a new socket: nothing half-read
        self.sock = ctx.socket(kind)
        try:
            self.sock.setsockopt(zmq.LINGER, 0)
            if heartbeats:
                self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
                self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
                self.sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
            self.sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            self.sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
            if sndhwm is not None:
                self.sock.setsockopt(zmq.SNDHWM, sndhwm)
            if rcvhwm is not None:
                self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
            for option, value in (options or {}).items():
                self.sock.setsockopt(option, value)
            _apply_security(self.sock, curve, server=bind)
            if curve is not None and not bind:  # before connect, so the first handshake is seen
                # a name of our own: pyzmq's default is per file descriptor, which a remade socket may reuse
                # while libzmq still holds the old monitor's endpoint
                self._monitor = self.sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED,
                    addr=f"inproc://v2grt-monitor-{next(_MONITOR_IDS)}")
            (self.sock.bind if bind else self.sock.connect)(endpoint)
        except (zmq.ZMQError, BusError) as exc:
            self._close_monitor()
            self.sock.close(0)
            verb = "bind" if bind else "connect"
            raise BusError(f"{self.role}: cannot {verb} to {endpoint!r}: {exc}") from exc

    def close(self) -> None:
        """Close the socket at once (linger 0). Idempotent."""
        self._close_monitor()
        self.sock.close(0)

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close(0)  # before the socket: its monitor PAIR then has no peer to wait for
            self._monitor = None

    def _handshake_refused(self, quiet: bool = False) -> bool:
        """Read the handshake events queued on the monitor (never blocks); True if one was a ZAP refusal.

        ``quiet``: the caller reports the refusal itself (ControlRefused), so no log line."""
        refused = False
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._retry_ms = REFUSED_RETRY_FIRST_MS
                self.handshakes += 1
                self.last_handshake_ns = time.monotonic_ns()  # when read: at the owner's next heal()
                continue
            refused = True
            self.refusals += 1
            self.last_refusal = event["value"]  # the ZAP status code: 400 refused, 500 handler error
            if self._reopen_at_ns is None:
                first = self._retry_ms == REFUSED_RETRY_FIRST_MS  # first of a run of refusals: say it once
                log.log(logging.WARNING if first and not quiet else logging.DEBUG,
                        "%s: the aggregator at %s refused this key in the CURVE handshake (ZAP %s); recreating "
                        "the socket in %d ms (is the key authorized for this role and address?)",
                        self.role, self.endpoint, self.last_refusal, self._retry_ms)
                self._reopen_at_ns = time.monotonic_ns() + self._retry_ms * 1_000_000
                self._retry_ms = min(2 * self._retry_ms, RECONNECT_IVL_MAX_MS)
        return refused

    def heal(self) -> bool:
        """A connecting CURVE socket that the aggregator refused (ZAP) is closed and made again after a
        back-off (REFUSED_RETRY_FIRST_MS doubling to RECONNECT_IVL_MAX_MS); True when it was remade.

        libzmq 4.3.5 never retries after a ZAP refusal, so without this a gateway started before its
        key was authorized would stay dark until restarted. Messages queued in the old socket are
        dropped (stale by then), and ``sock`` is a new object: re-register it in a Poller. Owner
        thread only; costs one poll of the monitor when nothing happened.
        """
        if self._monitor is None:
            return False
        self._handshake_refused()
        if self._reopen_at_ns is None or time.monotonic_ns() < self._reopen_at_ns:
            return False
        self._reopen_at_ns = None
        self.close()
        try:
            self._open()
        except BusError as exc:  # e.g. out of file descriptors: try again at the next back-off
            self._reopen_at_ns = time.monotonic_ns() + self._retry_ms * 1_000_000
            log.error("%s: cannot recreate the socket after a refusal: %s", self.role, exc)
            return False
        return True

    def _drain(self, timeout_ms: int, max_frames: int, admit: Callable[[], bool] | None = None):
        """Wait up to ``timeout_ms`` for a message, then yield up to ``max_frames`` queued one-frame ones.

        A multipart message is dropped whole, every part received and discarded, and counted as
        MULTIPART (wire.md section 1: a message is one frame): applying one of its frames would act on
        half of what a peer sent. ``admit()`` is asked before each message and every DROP_PARTS_PER_ADMIT
        parts dropped; False leaves the rest queued (a message cut short is dropped on first at the next call).
        """
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return
        for _ in range(max_frames):
            if admit is not None and not admit():
                return
            if self._dropping is not None:  # the gate refused in the middle of a multipart message last time
                if not self._drop_rest(*self._dropping, admit=admit):
                    return
                continue
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if frame.more:
                if not self._drop_rest(1, 1, admit=admit):
                    return
                continue
            yield frame

    def _drop_rest(self, parts: int, accepted: int, admit: Callable[[], bool] | None = None) -> bool:
        """Receive and drop what is left of a multipart message of which ``parts`` were read; count it; True.

        libzmq queues a message whole, so its other parts are already here; each recv is one short call, but
        a message may have hundreds of thousands: ``admit()`` is asked every DROP_PARTS_PER_ADMIT parts, and
        when it refuses this returns False with the rest still queued, to be dropped first by the next call
        (``_dropping``; RCVMORE stays set between calls on the owner thread).
        """
        self._dropping = None
        since_admit = 0
        while self.sock.get(zmq.RCVMORE):
            if since_admit >= DROP_PARTS_PER_ADMIT:
                since_admit = 0
                if admit is not None and not admit():
                    self._dropping = (parts, accepted)
                    return False
            self.sock.recv(zmq.NOBLOCK, copy=False)
            parts += 1
            since_admit += 1
        self._count_bad(WireError("MULTIPART", f"{self.role}: message of {parts} frames: expected at most "
                                               f"{accepted} (docs/wire.md sections 1 and 6); dropped whole"))
        return True

    def _count_bad(self, exc: WireError) -> None:
        """A bad frame: counted by its code, its message kept among the last few (``errors``, ``last_errors``)."""
        self.errors[exc.code] += 1
        self.last_errors.append(str(exc))

    def rebind(self, timeout_s: float = 0.0) -> int:
        """Drop every live connection of this bound socket: unbind, bind the same endpoint again; ns taken.

        libzmq ties accepted connections to their listener, so the unbind closes them all; peers
        reconnect on their own (RECONNECT_IVL) and go through the handshake, and ZAP, again. The
        listener closes asynchronously in libzmq's I/O thread, so the port may still be taken (measured
        0.1 to 9 ms on loopback, under load): the bind is retried for up to ``timeout_s`` (0: once, no
        sleep). If it still fails this raises BusError and the socket stays unbound (``unbound``); the
        next call only tries the bind again (an endpoint no longer bound is not unbound twice: libzmq
        would say ENOENT). Owner thread only.
        """
        t0 = time.monotonic_ns()
        if not self.unbound:
            try:
                self.sock.unbind(self.endpoint)
            except zmq.ZMQError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: not bound (any more): nothing to drop, bind below
                    raise BusError(f"{self.role}: cannot unbind {self.endpoint!r} to drop its connections: "
                                   f"{exc}; still bound") from exc
            self.unbound = True
        deadline = t0 + int(timeout_s * 1e9)
        while True:
            try:
                self.sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EADDRINUSE and time.monotonic_ns() < deadline:
                    time.sleep(0.0005)
                    continue
                raise BusError(f"{self.role}: cannot bind {self.endpoint!r} again after dropping its connections: "
                               f"{exc}; unbound until rebind() succeeds") from exc
            self.unbound = False
            return time.monotonic_ns() - t0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# aggregator side


SubscribePolicy = Callable[[zmq.Frame, bytes], bool]


_LIBZMQ_SEND_FNS: list = []  # [] not looked up yet; [None] not found; [(zmq_send, zmq_errno)]


def _libzmq_send_fns() -> tuple[int, int] | None:
    """The addresses of zmq_send and zmq_errno in the libzmq that pyzmq itself runs on, or None (logged once).

    Looked up through pyzmq's backend module (dlsym on its handle searches the libraries it was linked with),
    so a socket handle from pyzmq is only ever passed to the library that made it. None (a pyzmq whose
    backend is not the Cython module, or a libzmq linked in without exported symbols): send_frames falls back
    to one pyzmq send per frame, the same messages, slower."""
    if not _LIBZMQ_SEND_FNS:
        found = None
        try:
            import ctypes

            import zmq.backend.cython._zmq as backend

            lib = ctypes.CDLL(backend.__file__)
            found = (ctypes.cast(lib.zmq_send, ctypes.c_void_p).value,
                     ctypes.cast(lib.zmq_errno, ctypes.c_void_p).value)
            if not all(found):
                found = None
        except (ImportError, OSError, AttributeError) as exc:
            log.warning("LIBZMQ_SEND_NOT_FOUND zmq_send of pyzmq's libzmq not found (%s: %s): setpoint frames are "
                        "sent one pyzmq call each", type(exc).__name__, exc)
        _LIBZMQ_SEND_FNS.append(found)
    return _LIBZMQ_SEND_FNS[0]


class SetpointPublisher(_Owner):
    """Binds the PUB socket that carries every gateway's setpoints and the fleet status.

    With ``subscribe_policy`` the socket is an XPUB in manual mode: a peer's subscription takes effect
    only once the owner thread has passed it to ``policy(frame, topic)`` in ``admit_subscriptions()``
    (the frame carries the peer's ZAP User-Id), so an authenticated gateway cannot read another
    gateway's setpoints. SUB peers see no difference.
    """

    role = "setpoint PUB"

    def __init__(self, ctx: zmq.Context, endpoint: str, *,
                 sndhwm: int = SETPOINT_SNDHWM, curve: Mapping[str, bytes] | None = None,
                 subscribe_policy: SubscribePolicy | None = None, io_thread: int | None = None):
        kind, options = (zmq.PUB, {}) if subscribe_policy is None else (zmq.XPUB, {zmq.XPUB_MANUAL: 1})
        if io_thread is not None:  # its connections on this libzmq I/O thread of the context (ZMQ_AFFINITY)
            options[zmq.AFFINITY] = 1 << io_thread
        super().__init__(ctx, kind, endpoint, bind=True, curve=curve, sndhwm=sndhwm, options=options)
        self.sent = 0
        self.dropped = 0
        self.subscribe_policy = subscribe_policy
        self.subscriptions = 0  # admitted
        self.refused_subscriptions = 0

    def admit_subscriptions(self, max_msgs: int = 64) -> int:
        """Apply or refuse pending subscriptions (XPUB manual mode only); never blocks; returns how many.

        An (un)subscription applies to the pipe of the message just received, so each is decided
        before the next recv. Unsubscriptions are not applied: libzmq sends them unpaired when a peer
        disconnects (its subscriptions go with it), and applied to the wrong pipe they would cut off a
        gateway; a SUB that unsubscribes explicitly keeps its topic until it reconnects.
        """
        if self.subscribe_policy is None or not self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            return 0
        done = 0
        for _ in range(max_msgs):
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            data = frame.bytes
            if data[:1] != b"\x01":
                continue
            topic = data[1:]
            if self.subscribe_policy(frame, topic):
                self.sock.setsockopt(zmq.SUBSCRIBE, topic)
                self.subscriptions += 1
            else:
                self.refused_subscriptions += 1
            done += 1
        return done

    def send_frames(self, frames: wire.SetpointFrames) -> int:
        """Queue every gateway's frame of a laid-out cycle (wire.SetpointFrames.write), one message each, never
        blocking; returns how many were queued (the rest were refused: ``dropped``, as for send()).

        With the compiled frames (backend "cython") this is one call without the GIL into the libzmq pyzmq
        runs on (v2grt.io._frames.send): the same messages as a send() per frame; 1,000 frames in 0.6 ms p50
        against 5-11 ms one pyzmq send each (`v2grt bench sends`, docs/benchmarks.md "The publisher thread").
        """
        fns = _libzmq_send_fns() if frames.backend == "cython" else None
        if fns is None:
            return sum(self.send(frame) for frame in frames.frames())
        sent, dropped, err = wire.compiled_frames().send(self.sock.underlying, fns[0], fns[1], frames.buffer,
                                                         frames.f0, frames.f1)
        self.sent += sent
        self.dropped += dropped
        if err:
            raise zmq.ZMQError(err)
        return sent

    def send(self, frame: bytes) -> bool:
        """Queue one frame without ever blocking; False (and ``dropped`` + 1) if it was refused.

        PUB drops silently for a subscriber whose queue is full, so ``dropped`` counts only what the
        socket refused as a whole (zmq.Again); per-subscriber drops are covered by the expiry.
        """
        try:
            # copy=False: pyzmq still copies under zmq.COPY_THRESHOLD (64 KiB); big gateways go zero-copy
            self.sock.send(frame, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True


class TelemetryReceiver(_Owner):
    """Binds the PULL socket gateways push telemetry to; decodes, validates, counts bad frames.

    Hooks, each run per batch on the owner thread in this order: ``max_nodes(gw)`` inside the
    decoder (the most nodes a batch from ``gw`` may name, None for a gateway to refuse:
    UNKNOWN_GATEWAY), ``authorize(frame, batch)`` (security), ``accept(batch, t_recv_ns)`` (the
    consumer: maps ids to its rows). The last two refuse a batch by raising WireError, counted like
    a bad frame. ``check_ids=False`` leaves splitting the ids to ``accept``.
    """

    role = "telemetry PULL"

    def __init__(self, ctx: zmq.Context, endpoint: str, *,
                 rcvhwm: int = TELEMETRY_RCVHWM, strict: bool = True,
                 curve: Mapping[str, bytes] | None = None,
                 authorize: Callable[[zmq.Frame, TelemetryBatch], None] | None = None,
                 max_nodes: wire.MaxNodes | None = None, check_ids: bool = True,
                 accept: Callable[[TelemetryBatch, int], None] | None = None):
        super().__init__(ctx, zmq.PULL, endpoint, bind=True, curve=curve, rcvhwm=rcvhwm,
                         heartbeats=RECEIVER_HEARTBEATS)
        self.strict = strict
        #: authorize(frame, batch) raises WireError (e.g. FORBIDDEN) to drop a batch its sender may not send
        self.authorize = authorize
        self.max_nodes = max_nodes
        self.check_ids = check_ids
        self.accept = accept
        self.frames = 0  # one-frame messages decoded (multipart ones are counted in errors only)
        self.quarantined_nodes = 0  # nodes marked INVALID_TELEMETRY in batches that were decoded
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_errors: collections.deque[str] = collections.deque(maxlen=LAST_ERRORS)

    def poll_batches(self, max_frames: int = 256, timeout_ms: int = 0,
                     admit: Callable[[], bool] | None = None) -> list[TelemetryBatch]:
        """Wait up to ``timeout_ms`` for a frame, then take up to ``max_frames``; return the valid batches.

        ``admit()``, if given, is asked before each frame (the aggregator's receive gate); False stops here
        and leaves the rest queued.

        Bad frames are counted in ``errors[code]`` (frames, not nodes) and their messages kept in
        ``last_errors``; this never raises for anything a peer sent. A batch with quarantined nodes
        (non-strict) is not a bad frame: it is returned, and its nodes counted in ``quarantined_nodes``.
        """
        batches: list[TelemetryBatch] = []
        t_recv_ns = time.monotonic_ns()
        for frame in self._drain(timeout_ms, max_frames, admit):
            self.frames += 1
            try:
                batch = wire.decode_telemetry(frame.buffer, strict=self.strict, max_nodes=self.max_nodes,
                                              check_ids=self.check_ids)
                if self.authorize is not None:
                    self.authorize(frame, batch)
                if self.accept is not None:
                    self.accept(batch, t_recv_ns)
            except WireError as exc:
                self._count_bad(exc)
                continue
            if batch.quarantined:
                self.quarantined_nodes += batch.quarantined
                self.last_errors.append(f"INVALID_TELEMETRY: telemetry from {batch.gw!r} seq {batch.seq}: "
                                        f"{batch.quarantined} node(s) quarantined (a value out of range)")
            batches.append(batch)
        return batches


Handler = Callable[[ControlRequest], Mapping[str, Any] | None]


class ControlServer(_Owner):
    """Binds the ROUTER socket for v2g-cli; ``serve_once`` answers pending requests with ``handler``.

    ``handler(request)`` returns the ``result`` map of an ok reply, or raises WireError (code REFUSED,
    BAD_ARG, ...) for an error reply. Any other exception is a bug: it is logged with its traceback
    and answered with INTERNAL so the client is not left waiting, and the server goes on.
    """

    role = "control ROUTER"
    MAX_ENVELOPE = 8  # routing frames echoed back (identity, REQ_CORRELATE id, empty delimiter)

    def __init__(self, ctx: zmq.Context, endpoint: str, handler: Handler, *,
                 curve: Mapping[str, bytes] | None = None,
                 authorize: Callable[[zmq.Frame, ControlRequest], None] | None = None):
        super().__init__(ctx, zmq.ROUTER, endpoint, bind=True, curve=curve, heartbeats=RECEIVER_HEARTBEATS)
        self.handler = handler
        #: authorize(frame, request) raises WireError (e.g. FORBIDDEN) to answer an error instead of running it
        self.authorize = authorize
        self.served = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_errors: collections.deque[str] = collections.deque(maxlen=LAST_ERRORS)
        #: The ZAP User-Id (e.g. ``operator:alice``) of the request the handler is answering, None on a
        #: socket without ZAP: lets the handler shape its answer to the caller (owner thread only).
        self.caller: str | None = None

    def serve_once(self, timeout_ms: int = 0, max_requests: int = 16,
                   admit: Callable[[], bool] | None = None) -> int:
        """Wait up to ``timeout_ms`` for requests, answer up to ``max_requests``; return how many.

        ``admit()``, if given, is asked before each request; False stops here and leaves the rest queued.
        """
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return 0
        answered = 0
        for _ in range(max_requests):
            if admit is not None and not admit():
                break
            try:
                frames = self._recv_request(admit)
            except zmq.Again:
                break
            if frames is None:  # too many frames: dropped whole and counted, not answered
                if self._dropping is not None:  # the gate refused in the middle of dropping it
                    break
                continue
            # Everything before the last frame is the routing envelope (REQ: identity, empty;
            # REQ_CORRELATE adds a request id; a DEALER may omit the empty frame): echo it verbatim.
            envelope, payload = [f.bytes for f in frames[:-1]], frames[-1]
            reply = self._answer(payload.bytes, payload if self.authorize is not None else None)
            try:
                self.sock.send_multipart([*envelope, reply], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # peer gone or its queue full; ROUTER would drop it anyway
                self._count_bad(WireError("INTERNAL", f"reply not sent: {exc}"))
            answered += 1
        return answered

    def _recv_request(self, admit: Callable[[], bool] | None = None) -> list[zmq.Frame] | None:
        """One queued message as frames, or None if it had more than MAX_ENVELOPE + 1 (then dropped whole).

        Read part by part, so a message of a million frames is never held as a list; its dropping is
        admitted in steps (``_drop_rest``): None with ``_dropping`` set means the gate refused midway.
        """
        if self._dropping is not None:
            self._drop_rest(*self._dropping, admit=admit)
            return None
        frames = [self.sock.recv(zmq.NOBLOCK, copy=False)]
        while frames[-1].more:
            if len(frames) > self.MAX_ENVELOPE:
                self._drop_rest(len(frames), self.MAX_ENVELOPE + 1, admit=admit)
                return None
            frames.append(self.sock.recv(zmq.NOBLOCK, copy=False))
        return frames

    def _answer(self, payload: bytes, frame: zmq.Frame | None = None) -> bytes:
        try:
            request = wire.decode_request(payload)
        except WireError as exc:
            self._count_bad(exc)
            return wire.encode_reply(error=exc, id=wire.request_id_of(payload))
        try:
            if self.authorize is not None:
                self.authorize(frame, request)
            self.caller = _user_id(frame)
            result = self.handler(request)
        except WireError as exc:  # the handler refusing: REFUSED, BAD_ARG, ...
            self._count_bad(exc)
            return wire.encode_reply(error=exc, id=request.id)
        except Exception as exc:  # answered and logged: a handler bug must not stop the aggregator
            log.exception("control handler failed on %s", request)
            return self._internal(request, f"{type(exc).__name__}: {exc}")
        finally:
            self.caller = None
        try:
            reply = wire.encode_reply(result, id=request.id)
        except WireError as exc:
            log.error("control handler result for %s cannot be sent: %s", request, exc)
            return self._internal(request, exc.message)
        self.served += 1
        return reply

    def _internal(self, request: ControlRequest, detail: str) -> bytes:
        err = WireError("INTERNAL", f"{request.cmd}: {detail}")
        self._count_bad(err)
        return wire.encode_reply(error=err, id=request.id)


def _user_id(frame: zmq.Frame | None) -> str | None:
    """The ZAP User-Id libzmq attached to a message, or None (no frame kept, or no ZAP on the socket)."""
    if frame is None:
        return None
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


# ---------------------------------------------------------------------------------------------------
# client side (gateways, v2g-cli, other control systems)


class GatewaySubscriber(_Owner):
    """A gateway's SUB socket: its own topic only, epoch/sequence fenced, newest message first.

    ``fence``: share one SetpointFence among the subscribers to every aggregator of a fleet
    (SetpointFanIn), so that the newest-epoch rule holds across them; default: a fence of its own.
    """

    role = "setpoint SUB"

    def __init__(self, ctx: zmq.Context, endpoint: str, gateway_id: str, *,
                 rcvhwm: int = SETPOINT_SNDHWM, curve: Mapping[str, bytes] | None = None,
                 fence: SetpointFence | None = None):
        topic = wire.setpoint_topic(gateway_id)  # validates the id before any socket exists
        super().__init__(ctx, zmq.SUB, endpoint, bind=False, curve=curve, rcvhwm=rcvhwm,
                         options={zmq.SUBSCRIBE: topic, zmq.TCP_KEEPALIVE: 1,
                                  zmq.TCP_KEEPALIVE_IDLE: SUB_KEEPALIVE_IDLE_S,
                                  zmq.TCP_KEEPALIVE_INTVL: SUB_KEEPALIVE_INTVL_S,
                                  zmq.TCP_KEEPALIVE_CNT: SUB_KEEPALIVE_CNT},
                         heartbeats=RECEIVER_HEARTBEATS)  # libzmq 3937: see RECEIVER_HEARTBEATS
        self.gateway_id = gateway_id
        self.fence = fence if fence is not None else SetpointFence()
        self.received = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_errors: collections.deque[str] = collections.deque(maxlen=LAST_ERRORS)

    def recv(self, timeout_ms: int = 0, max_frames: int = 64) -> SetpointMsg | None:
        """Wait up to ``timeout_ms``; return the newest admitted of up to ``max_frames`` queued, or None.

        Older queued messages are skipped (setpoints are absolute: only the newest matters). Bad or
        fenced frames are counted by code in ``errors``; never raises for what the network delivers.
        The caller still owes the expiry rule: hold 0 kW once ``msg.expired(now)`` or ``msg.estop``.
        """
        self.heal()  # a refused key: try again after a back-off (libzmq would not)
        newest: SetpointMsg | None = None
        for frame in self._drain(timeout_ms, max_frames):
            self.received += 1
            try:
                msg = wire.decode_setpoints(frame.buffer)
                if msg.gw != self.gateway_id:  # cannot pass the SUB filter; guards a misconfigured proxy
                    raise WireError("TOPIC_MISMATCH", f"setpoints for {msg.gw!r} on {self.gateway_id!r}'s "
                                                      "subscriber")
                self.fence.admit(msg)
            except WireError as exc:
                self._count_bad(exc)
                continue
            newest = msg
        return newest


class StatusSubscriber(_Owner):
    """A SUB socket for the fleet status topic (``status\\0``), newest message first."""

    role = "status SUB"

    def __init__(self, ctx: zmq.Context, endpoint: str, *,
                 curve: Mapping[str, bytes] | None = None):
        super().__init__(ctx, zmq.SUB, endpoint, bind=False, curve=curve, rcvhwm=16,
                         options={zmq.SUBSCRIBE: wire.STATUS_TOPIC})
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_errors: collections.deque[str] = collections.deque(maxlen=LAST_ERRORS)

    def recv(self, timeout_ms: int = 0, max_frames: int = 64) -> dict[str, Any] | None:
        """Wait up to ``timeout_ms``; return the newest valid status of up to ``max_frames``, or None."""
        self.heal()
        newest = None
        for frame in self._drain(timeout_ms, max_frames):
            try:
                newest = wire.decode_status(frame.buffer)
            except WireError as exc:
                self._count_bad(exc)
        return newest


class TelemetryPusher(_Owner):
    """A gateway's PUSH socket to the aggregator's telemetry PULL."""

    role = "telemetry PUSH"

    def __init__(self, ctx: zmq.Context, endpoint: str, *,
                 sndhwm: int = TELEMETRY_SNDHWM, curve: Mapping[str, bytes] | None = None):
        super().__init__(ctx, zmq.PUSH, endpoint, bind=False, curve=curve, sndhwm=sndhwm)
        self.sent = 0
        self.dropped = 0

    def send(self, frame: bytes) -> bool:
        """Queue one batch without blocking; False (and ``dropped`` + 1) if the queue is full."""
        self.heal()
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True


# ---------------------------------------------------------------------------------------------------
# a gateway connected to every aggregator of its fleet (high availability, docs/wire.md 2.1)

#: The most aggregators one gateway connects to: a fleet's leader and its standbys (docs/ha.md).
MAX_AGGREGATORS = 8
_ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")


def split_endpoints(value: str | Sequence[str], what: str) -> list[str]:
    """The aggregators' endpoints from ``"tcp://a:5560,tcp://b:5560"`` (a CLI value) or a list; BusError when
    one is empty, not ``scheme://address``, repeated, or there are more than MAX_AGGREGATORS. ``what`` names
    the option in the message (e.g. ``--setpoints``)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or items == [""]:
        raise BusError(f"{what}: no endpoint given; expected one ZeroMQ endpoint per aggregator, comma-separated "
                       "(e.g. tcp://10.0.1.1:5560,tcp://10.0.1.2:5560)")
    if len(items) > MAX_AGGREGATORS:
        raise BusError(f"{what}: {len(items)} endpoints; at most {MAX_AGGREGATORS} aggregators per fleet")
    out: list[str] = []
    for i, ep in enumerate(items):
        ep = ep.strip() if isinstance(ep, str) else ep
        scheme, sep, address = ep.partition("://") if isinstance(ep, str) else ("", "", "")
        if not sep or scheme not in _ENDPOINT_SCHEMES or not address:
            raise BusError(f"{what}: endpoint {i + 1} of {len(items)}, {ep!r}, is not a ZeroMQ endpoint; expected "
                           f"{'/'.join(_ENDPOINT_SCHEMES)}://address (one per aggregator, comma-separated)")
        if ep in out:
            raise BusError(f"{what}: endpoint {ep!r} is listed twice; each aggregator once")
        out.append(ep)
    return out


def curves_for(curve: Mapping[str, Any] | None, n: int, what: str = "--server-key") -> list[Mapping[str, Any] | None]:
    """One client ``curve=`` mapping per aggregator, in the order of the endpoints.

    Each aggregator has its own server key pair, so ``curve["server_key"]`` may be a sequence of ``n``
    public keys, the i-th for the i-th endpoint (``--server-key a.key,b.key``); one key (bytes) serves
    every aggregator (a key pair copied to each host). The gateway's own key pair is the same for all; it
    must be authorized as ``gateway:<id>`` at each aggregator (docs/security.md).
    """
    if curve is None:
        return [None] * n
    server = curve.get("server_key")
    if isinstance(server, (bytes, str)) or server is None:
        return [curve] * n
    keys = list(server)
    if len(keys) != n:
        raise BusError(f"{what}: {len(keys)} aggregator public keys for {n} aggregator endpoints; expected one key "
                       "for all or one per endpoint, in the same order")
    return [{**curve, "server_key": key} for key in keys]


class SetpointFanIn:
    """A gateway's setpoint subscriptions to every aggregator of its fleet: one SUB each, one fence for all.

    Only the leader publishes (docs/ha.md); a gateway cannot know which aggregator that is, so it
    listens to all. The shared SetpointFence admits a message only if its (epoch, seq) is newer than
    every message admitted before from any aggregator: once a newer leader's epoch is heard, no frame
    of an older one is ever applied again. ``recv`` has GatewaySubscriber's contract; ``source`` is the
    index (in ``endpoints``) of the aggregator the newest admitted message came from. Owner thread only.
    """

    role = "setpoint SUB"

    def __init__(self, ctx: zmq.Context, endpoints: Sequence[str], gateway_id: str, *,
                 rcvhwm: int = SETPOINT_SNDHWM, curves: Sequence[Mapping[str, Any] | None] | None = None):
        curves = list(curves) if curves is not None else [None] * len(endpoints)
        if len(curves) != len(endpoints):
            raise BusError(f"{self.role}: {len(curves)} CURVE settings for {len(endpoints)} endpoints")
        self.fence = SetpointFence()
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_errors: collections.deque[str] = collections.deque(maxlen=LAST_ERRORS)
        self.subs: list[GatewaySubscriber] = []
        try:
            for endpoint, curve in zip(endpoints, curves):
                sub = GatewaySubscriber(ctx, endpoint, gateway_id, rcvhwm=rcvhwm, curve=curve, fence=self.fence)
                sub.errors, sub.last_errors = self.errors, self.last_errors  # counted together
                self.subs.append(sub)
        except BusError:
            self.close()
            raise
        self.endpoints = [s.endpoint for s in self.subs]
        self.source: int | None = None

    @property
    def received(self) -> int:
        return sum(s.received for s in self.subs)

    def recv(self, timeout_ms: int = 0, max_frames: int = 64) -> SetpointMsg | None:
        """Wait up to ``timeout_ms`` for any aggregator; the newest admitted message of up to ``max_frames`` queued
        at each, or None. The fence admits only ever newer (epoch, seq), so the last admitted is the newest."""
        if len(self.subs) == 1:
            msg = self.subs[0].recv(timeout_ms, max_frames)
            if msg is not None:
                self.source = 0
            return msg
        for sub in self.subs:
            sub.heal()  # before polling: a remade socket is polled, not the closed one
        if not zmq.zmq_poll([(s.sock, zmq.POLLIN) for s in self.subs], timeout_ms):
            return None
        newest = None
        for i, sub in enumerate(self.subs):
            msg = sub.recv(0, max_frames)
            if msg is not None:
                newest, self.source = msg, i
        return newest

    def close(self) -> None:
        for sub in self.subs:
            sub.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TelemetryFanOut:
    """A gateway's telemetry PUSH sockets, one per aggregator of its fleet: every batch goes to each.

    One PUSH connected to several aggregators would deal the batches out round-robin; a standby must
    hear every vehicle to be warm (docs/ha.md). An aggregator that is down or slow fills only its own
    queue (TELEMETRY_SNDHWM) and drops there; ``dropped`` counts batch copies refused, ``dropped_by``
    per endpoint. ``send`` is True if at least one aggregator's queue took the batch. Owner thread only.
    """

    role = "telemetry PUSH"

    def __init__(self, ctx: zmq.Context, endpoints: Sequence[str], *, sndhwm: int = TELEMETRY_SNDHWM,
                 curves: Sequence[Mapping[str, Any] | None] | None = None):
        curves = list(curves) if curves is not None else [None] * len(endpoints)
        if len(curves) != len(endpoints):
            raise BusError(f"{self.role}: {len(curves)} CURVE settings for {len(endpoints)} endpoints")
        self.pushers: list[TelemetryPusher] = []
        try:
            for endpoint, curve in zip(endpoints, curves):
                self.pushers.append(TelemetryPusher(ctx, endpoint, sndhwm=sndhwm, curve=curve))
        except BusError:
            self.close()
            raise
        self.endpoints = [p.endpoint for p in self.pushers]

    @property
    def sent(self) -> int:
        return sum(p.sent for p in self.pushers)

    @property
    def dropped(self) -> int:
        return sum(p.dropped for p in self.pushers)

    @property
    def dropped_by(self) -> dict[str, int]:
        return {p.endpoint: p.dropped for p in self.pushers}

    def send(self, frame: bytes) -> bool:
        """Queue ``frame`` to every aggregator without blocking."""
        ok = False
        for pusher in self.pushers:
            ok |= pusher.send(frame)
        return ok

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; ``linger_ms`` > 0 gives batches still queued that long to leave."""
        for pusher in self.pushers:
            pusher._close_monitor()
            pusher.sock.close(linger=linger_ms)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ControlTimeout(WireError):
    """The aggregator did not answer a control request in time (code TIMEOUT)."""


class ControlRefused(WireError):
    """The aggregator refused this client's key in the CURVE handshake (code HANDSHAKE_REFUSED): the request
    was never delivered. The socket is made again for the next call."""


class ControlClient(_Owner):
    """v2g-cli's REQ socket (REQ_RELAXED + REQ_CORRELATE: after a timeout the next call just works)."""

    role = "control REQ"

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_ms: int = 2000, *,
                 curve: Mapping[str, bytes] | None = None):
        super().__init__(ctx, zmq.REQ, endpoint, bind=False, curve=curve,
                         options={zmq.REQ_RELAXED: 1, zmq.REQ_CORRELATE: 1})
        self.timeout_ms = timeout_ms
        self._next_id = 1

    def call(self, cmd: str, **args: Any) -> ControlReply:
        """Send ``cmd`` with ``args`` and wait for the reply.

        Raises WireError (UNKNOWN_CMD, BAD_ARG) before sending if the request is invalid, and
        ControlTimeout if no reply arrives within ``timeout_ms``. An error reply is returned, not
        raised: check ``reply.ok``.
        """
        rid = self._next_id
        self._next_id += 1
        frame = wire.encode_request(cmd, args, id=rid)
        # refused already (last call, or since the connect): this call is the retry, on a new socket
        if self._monitor is not None and (self._handshake_refused(quiet=True) or self._reopen_at_ns is not None):
            self._reopen_at_ns = time.monotonic_ns()
        self.heal()
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            raise self._timeout(cmd) from None
        if not self._wait_reply(cmd):
            raise self._timeout(cmd)
        reply = wire.decode_reply(self.sock.recv())
        if reply.id is not None and reply.id != rid:
            raise WireError("BAD_FIELD", f"reply id {reply.id!r} does not match request id {rid}")
        return reply

    def _wait_reply(self, cmd: str) -> bool:
        """Wait up to ``timeout_ms`` for the reply; ControlRefused as soon as the handshake is refused."""
        if self._monitor is None:
            return bool(self.sock.poll(self.timeout_ms, zmq.POLLIN))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + self.timeout_ms / 1e3
        while (left_ms := (deadline - time.monotonic()) * 1e3) > 0:
            ready = dict(poller.poll(left_ms))
            if self.sock in ready:
                return True
            if self._monitor in ready and self._handshake_refused(quiet=True):
                raise ControlRefused("HANDSHAKE_REFUSED", f"the aggregator at {self.endpoint} refused this key in the "
                                     f"CURVE handshake (ZAP {self.last_refusal}), so {cmd!r} was not delivered: "
                                     "is its public key authorized (`v2grt keys list`), with a role allowed on the "
                                     "control socket, and this host's address in security.allow?")
        return False

    def _timeout(self, cmd: str) -> ControlTimeout:
        return ControlTimeout("TIMEOUT", f"the aggregator at {self.endpoint} did not answer {cmd!r} within "
                                         f"{self.timeout_ms} ms: is v2g-aggregator running and its control "
                                         "endpoint this one?")


__all__ = [
    "DEFAULT_CONTROL_CONNECT", "DEFAULT_CONTROL_ENDPOINT", "DEFAULT_SETPOINT_CONNECT",
    "DEFAULT_SETPOINT_ENDPOINT", "DEFAULT_TELEMETRY_CONNECT", "DEFAULT_TELEMETRY_ENDPOINT", "MAX_AGGREGATORS",
    "BusError", "ControlClient", "ControlRefused", "ControlServer", "ControlTimeout", "GatewaySubscriber",
    "SetpointFanIn", "SetpointPublisher", "StatusSubscriber", "TelemetryFanOut", "TelemetryPusher",
    "TelemetryReceiver", "curves_for", "split_endpoints",
]
