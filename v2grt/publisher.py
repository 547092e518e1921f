"""The publisher thread: the only thread that touches the setpoint/status PUB socket (bus.publisher_thread).

The control thread writes a cycle into every gateway's laid-out frame (wire.SetpointFrames.write: gather,
checks, header, in one compiled pass without the GIL, raising on a wild value before anything is handed
over), then hands the cycle over here and goes back to sleep; this thread sends every frame in one compiled
call without the GIL (bus.SetpointPublisher.send_frames), then the status message. At 100,000 vehicles and
1,000 gateways the sends are ~0.6 ms of libzmq that no longer run on the control thread (docs/benchmarks.md).

Guarantees, each kept from the publish-on-the-control-thread path:
- **One owner.** Subscriptions are admitted (security), the cycle's frames, the status message, the final
  zero at shutdown and a revocation's rebind of the socket all run here; the control thread only hands over.
- **One buffer, never overwritten while in use.** There is one set of frame arrays; the control thread
  hands a cycle over only while this thread is idle. Busy at the next cycle (it was starved for a whole
  period), the control thread skips that cycle's publish and counts it (``busy_skips``, PUBLISHER_BUSY):
  a second buffer would only queue an older cycle behind a starved thread, and waiting would put the
  lateness back on the control thread; a skipped cycle is covered by the setpoints' expiry like a lost frame.
- **Self-fencing at send time** (docs/ha.md): ``may_send()`` is asked right before the first frame, with the
  lease's epoch the frames carry; a refused cycle sends nothing, not even its status.
- **The outcome is the journal's.** ``on_done(job, sent)`` runs after the last frame and the status were
  queued to ZeroMQ (or after the refusal): it sets the journal's ``published`` flag for that cycle and, on
  a planned handover, resigns (so the resignation follows the last frames actually sent).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np

from v2grt.io import wire

log = logging.getLogger("v2grt.publisher")

#: per-cycle send timings kept (ring), for `v2grt bench cycle`
RING = 4096


@dataclasses.dataclass
class PublishJob:
    """One cycle handed over: its frames (the laid-out buffer, written by SetpointFrames.write on the control
    thread), its status fields, and when its period began."""

    epoch: int
    seq: int
    frames: wire.SetpointFrames | None  # None: upkeep only (admit, rebind), nothing sent
    status: dict | None  # the status message's fields; None: none (the final zero)
    start_ns: int  # the cycle's deadline (its wake-up for an off-grid cycle), CLOCK_MONOTONIC
    journal_w: int = -1  # the journal record whose `published` flag this job decides; -1: none
    final: bool = False  # the final zero at shutdown: sent without the lease check (no HA then)


class PublisherThread:
    """Owns ``publisher`` (bus.SetpointPublisher) once started; ``submit()`` hands it one cycle at a time.

    ``may_send(job)`` (self-fencing) and ``on_done(job, sent)`` are called on this thread; ``on_idle()``
    runs after each cycle's sends while the thread still owns the socket (security: drop a revoked key's
    connections). The control thread reads ``busy`` without a lock: it is set by submit() on the control
    thread and cleared here only after every use of the frame buffer is over.
    """

    def __init__(self, publisher, *, may_send=None, on_done=None, on_idle=None, events=None,
                 name: str = "v2grt-publisher"):
        self.publisher = publisher
        self.may_send = may_send or (lambda job: True)
        self.on_done = on_done or (lambda job, sent: None)
        self.on_idle = on_idle or (lambda: None)
        self.events = events
        self.busy = False
        self.busy_skips = 0  # cycles the control thread did not hand over: this thread was still sending
        self.fenced = 0  # cycles refused at send time (the lease was no longer surely valid)
        self.errors = 0  # cycles that raised here (PUBLISHER_ERROR): a send error, or a bug
        self.frames_sent = 0  # setpoint frames queued to ZeroMQ (the status messages not counted)
        self.last_send_ns = 0  # the last cycle sent: this thread's own time for it, ns
        self.last_to_wire_ns = 0  # the last cycle sent: its deadline to its last setpoint frame queued, ns
        #: per cycle: the cycle's start (deadline) to the last setpoint frame queued to ZeroMQ, ns
        self.to_wire_ns = np.zeros(RING, np.int64)
        #: per cycle: this thread's own time for the cycle (admit, frames, status), ns
        self.send_ns = np.zeros(RING, np.int64)
        self.sent_cycles = 0
        self._job: PublishJob | None = None
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def name(self) -> str:
        return self._thread.name

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: PublishJob) -> None:
        """Control thread: hand one cycle over (only while not ``busy``; the caller checks and counts)."""
        self.busy = True
        self._job = job
        self._wake.set()

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Block until the cycle handed over is done (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self.busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return not self.busy
                self._idle.wait(left)
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Let the cycle in hand finish, then end the thread; the socket is the caller's to close after."""
        self.wait_idle(timeout_s)
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def snapshot(self) -> dict:
        """The counters for the status reply and the metrics (plain types; read without a lock, each a whole int)."""
        return {"thread": True, "cycles_sent": self.sent_cycles, "frames_sent": self.frames_sent,
                "frames_dropped": self.publisher.dropped, "busy_skips": self.busy_skips, "fenced": self.fenced,
                "errors": self.errors, "last_send_ms": self.last_send_ns / 1e6,
                "last_to_wire_ms": self.last_to_wire_ns / 1e6}

    def samples(self, what: str = "to_wire") -> np.ndarray:
        """The newest per-cycle times (up to RING), oldest first, ns: ``to_wire`` or ``send``."""
        ring = self.to_wire_ns if what == "to_wire" else self.send_ns
        k = min(self.sent_cycles, RING)
        return ring[np.arange(self.sent_cycles - k, self.sent_cycles) % RING]

    # ------------------------------------------------------------------ this thread
    def _main(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            job = self._job
            if job is None:
                if self._stop:
                    return
                continue
            self._job = None
            try:
                self._send(job)
            except Exception as exc:  # a bug must not end the thread: every later cycle would go unsent
                self.errors += 1
                if self.events is None or self.events.emit(
                        "PUBLISHER_ERROR", logging.CRITICAL, key=type(exc).__name__,
                        error=f"{type(exc).__name__}: {exc}",
                        message="the publisher thread caught this and goes on; report it with the traceback"):
                    log.critical("PUBLISHER_ERROR traceback", exc_info=True)
                self._done(job, False)
            finally:
                with self._idle:
                    self.busy = False
                    self._idle.notify_all()

    def _send(self, job: PublishJob) -> None:
        t0 = time.monotonic_ns()
        pub = self.publisher
        pub.admit_subscriptions()  # security: each subscription checked against its key; else no-op
        if job.frames is None:  # a cycle that publishes nothing (an HA standby): the socket's upkeep only
            self.on_idle()
            return
        if not job.final and not self.may_send(job):
            self.fenced += 1
            if self.events is not None:  # counted in the status reply's `events` (as PUBLISHER_BUSY, PUBLISHER_ERROR)
                self.events.emit("PUBLISH_FENCED_AT_SEND", logging.WARNING, key="publisher", seq=job.seq,
                                 message="the lease was no longer surely valid when the frames were to be sent: "
                                         "nothing sent for this cycle")
            self._done(job, False)
            self.on_idle()
            return
        self.frames_sent += pub.send_frames(job.frames)
        t_wire = time.monotonic_ns()
        if job.status is not None:
            pub.send(wire.encode_status(job.status))
        k = self.sent_cycles % RING
        self.last_to_wire_ns = self.to_wire_ns[k] = t_wire - job.start_ns
        self.last_send_ns = self.send_ns[k] = time.monotonic_ns() - t0
        self.sent_cycles += 1
        self._done(job, True)
        self.on_idle()

    def _done(self, job: PublishJob, sent: bool) -> None:
        if not job.final:
            self.on_done(job, sent)
