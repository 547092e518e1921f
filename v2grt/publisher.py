"""The publisher thread: the only thread that touches the setpoint/status PUB socket (bus.publisher_thread).

The control thread hands each cycle over as it is (the kernel's result, the frame layout's rows, the header
fields) and goes back to sleep. This thread lays the cycle out in every gateway's frame (``prepare(job)``:
wire.SetpointFrames.write, one compiled pass that gathers, converts, checks and writes the frames, and the
status fields), sends every frame in one compiled call without the GIL (bus.SetpointPublisher.send_frames),
then the status message. At 100,000 vehicles and 1,000 gateways that is ~0.3 ms of memory-bound filling and
~0.6 ms of libzmq a cycle that do not run on the control thread (docs/benchmarks.md, "The publisher thread").

Guarantees, each kept from the publish-on-the-control-thread path:
- **One owner.** Subscriptions are admitted (security), the cycle's frames, the status message, the final
  zero at shutdown and a revocation's rebind of the socket all run here; the control thread only hands over.
- **One buffer, never overwritten while in use.** There is one frame buffer; the control thread hands a
  cycle over only while this thread is idle. Busy at the next cycle (it was starved for a whole period),
  the control thread skips that cycle's publish and counts it (``busy_skips``, PUBLISHER_BUSY): a second
  buffer would only queue an older cycle behind a starved thread, and waiting would put the lateness back
  on the control thread; a skipped cycle is covered by the setpoints' expiry like a lost frame.
- **The frames are the cycle's own.** The kernel's output arrays are read here, after the hand-over, and the
  next cycle's kernel writes them again. ``prepare(job)`` returns False when a kernel run began since the
  hand-over (the dispatcher's run count, compared after the frames were written: a starved thread could
  have read a mix of two cycles): nothing of that cycle is sent (``stale``, PUBLISHER_STALE).
- **No wild value leaves.** The frames are checked as they are written (NaN, |p| > 1000 kW, an unknown
  Reason, power under an e-stop): a wild cycle sends nothing and is counted (``refused``, SETPOINTS_REFUSED,
  CRITICAL: a kernel bug). The control thread raises it as a cycle error in its next cycle (CYCLE_ERROR),
  so max_consecutive_errors in a row stop the loop, as when it writes the frames itself (bus.publisher_thread
  false: the same check raises in the cycle).
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
    """One cycle handed over: its frames (the layout to write, or written already), what to write in them,
    its status fields, and when its period began."""

    epoch: int
    seq: int
    frames: wire.SetpointFrames | None  # None: upkeep only (admit, rebind), nothing sent
    status: dict | None  # the status message's fields (prepare() may set them); None: none (the final zero)
    start_ns: int  # the cycle's deadline (its wake-up for an off-grid cycle), CLOCK_MONOTONIC
    journal_w: int = -1  # the journal record whose `published` flag this job decides; -1: none
    final: bool = False  # the final zero at shutdown: sent without the lease check (no HA then)
    cycle: object = None  # what prepare(job) writes into the frames here; None: they are written already
    # CLOCK_MONOTONIC ns, 0 until they happen: handed over, this thread took it up, its first frame about to be
    # queued (frames and status fields written, the lease checked), its last frame queued (`v2grt bench e2e`)
    t_submit_ns: int = 0
    t_start_ns: int = 0
    t_send_ns: int = 0
    t_wire_ns: int = 0


class PublisherThread:
    """Owns ``publisher`` (bus.SetpointPublisher) once started; ``submit()`` hands it one cycle at a time.

    ``prepare(job)`` (lay a handed-over cycle out in its frames; False: its inputs changed under it),
    ``may_send(job)`` (self-fencing), ``before_status(job)`` (after the frames, before the status is encoded)
    and ``on_done(job, sent)`` are called on this thread; ``on_idle()``
    runs after each cycle's sends while the thread still owns the socket (security: drop a revoked key's
    connections). The control thread reads ``busy`` without a lock: it is set by submit() on the control
    thread and cleared here only after every use of the frame buffer is over.
    """

    def __init__(self, publisher, *, prepare=None, may_send=None, on_done=None, on_idle=None, before_status=None,
                 events=None, name: str = "v2grt-publisher"):
        self.publisher = publisher
        self.prepare = prepare or (lambda job: True)
        self.before_status = before_status or (lambda job: None)
        self.may_send = may_send or (lambda job: True)
        self.on_done = on_done or (lambda job, sent: None)
        self.on_idle = on_idle or (lambda: None)
        self.events = events
        self.busy = False
        self.busy_skips = 0  # cycles the control thread did not hand over: this thread was still sending
        self.stale = 0  # cycles handed over but not sent: the next kernel run began before they were laid out
        self.refused = 0  # cycles not sent: a wild value (SETPOINTS_REFUSED)
        self.fenced = 0  # cycles refused at send time (the lease was no longer surely valid)
        self.errors = 0  # cycles that raised here otherwise (PUBLISHER_ERROR): a send error, or a bug
        self.frames_sent = 0  # setpoint frames queued to ZeroMQ (the status messages not counted)
        self.last_send_ns = 0  # the last cycle sent: this thread's own time for it (layout, sends, status), ns
        self.last_to_wire_ns = 0  # the last cycle sent: its deadline to its last setpoint frame queued, ns
        #: per cycle: the cycle's start (deadline) to the last setpoint frame queued to ZeroMQ, ns
        self.to_wire_ns = np.zeros(RING, np.int64)
        #: per cycle: this thread's own time for the cycle (admit, layout, frames, status), ns
        self.send_ns = np.zeros(RING, np.int64)
        #: per cycle: the hand-over (submit) to this thread starting the cycle, ns
        self.queue_ns = np.zeros(RING, np.int64)
        self.sent_cycles = 0
        self._counts_lock = threading.Lock()  # sent_cycles and frames_sent, read together by snapshot()
        self._job: PublishJob | None = None
        # A plain lock as a binary semaphore, released by submit(): one futex wake-up, where Event.set() (a
        # Condition in Python) cost the control thread 28 us p50 at 100,000 vehicles (its caches cold from the
        # kernel). Held: nothing to do.
        self._wake = threading.Lock()
        self._wake.acquire()
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
        job.t_submit_ns = time.monotonic_ns()
        self._signal()

    def _signal(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:  # released already, not yet taken: the thread wakes once and finds the newest state
            pass

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
        self._signal()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def snapshot(self) -> dict:
        """The counters for the status reply and the metrics (plain types; cycles and frames sent as one pair, the
        others each a whole int read without a lock)."""
        with self._counts_lock:
            cycles_sent, frames_sent = self.sent_cycles, self.frames_sent
        return {"thread": True, "cycles_sent": cycles_sent, "frames_sent": frames_sent,
                "frames_dropped": self.publisher.dropped, "busy_skips": self.busy_skips, "stale": self.stale,
                "refused": self.refused, "fenced": self.fenced, "errors": self.errors,
                "last_send_ms": self.last_send_ns / 1e6, "last_to_wire_ms": self.last_to_wire_ns / 1e6}

    def samples(self, what: str = "to_wire") -> np.ndarray:
        """The newest per-cycle times (up to RING) of the cycles sent, oldest first, ns: ``to_wire``, ``send``
        or ``queue`` (the hand-over to this thread starting the cycle)."""
        ring = {"to_wire": self.to_wire_ns, "send": self.send_ns, "queue": self.queue_ns}[what]
        k = min(self.sent_cycles, RING)
        return ring[np.arange(self.sent_cycles - k, self.sent_cycles) % RING]

    # ------------------------------------------------------------------ this thread
    def _main(self) -> None:
        while True:
            self._wake.acquire()
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
        t0 = job.t_start_ns = time.monotonic_ns()
        pub = self.publisher
        pub.admit_subscriptions()  # security: each subscription checked against its key; else no-op
        if job.frames is None:  # a cycle that publishes nothing (an HA standby): the socket's upkeep only
            self.on_idle()
            return
        if job.cycle is not None:
            try:
                current = self.prepare(job)
            except wire.WireError as exc:  # a wild value (a kernel bug): the cycle is not sent
                self.refused += 1
                if self.events is not None:
                    self.events.emit("SETPOINTS_REFUSED", logging.CRITICAL, key="publisher", seq=job.seq,
                                     error=str(exc), message="a setpoint failed the wire's checks: nothing sent "
                                                             "for this cycle")
                self._not_sent(job)
                return
            if not current:
                self.stale += 1
                if self.events is not None:
                    self.events.emit("PUBLISHER_STALE", logging.WARNING, key="publisher", seq=job.seq,
                                     stale=self.stale, message="the publisher thread laid this cycle out after the "
                                     "next cycle's dispatch had begun (starved for a period): nothing sent for it")
                self._not_sent(job)
                return
        if not job.final and not self.may_send(job):
            self.fenced += 1
            if self.events is not None:  # counted in the status reply's `events` (as PUBLISHER_BUSY, PUBLISHER_ERROR)
                self.events.emit("PUBLISH_FENCED_AT_SEND", logging.WARNING, key="publisher", seq=job.seq,
                                 message="the lease was no longer surely valid when the frames were to be sent: "
                                         "nothing sent for this cycle")
            self._not_sent(job)
            return
        job.t_send_ns = time.monotonic_ns()
        n_frames = pub.send_frames(job.frames)
        t_wire = job.t_wire_ns = time.monotonic_ns()
        if job.status is not None:
            self.before_status(job)  # fields the frames need not wait for (the delivered power's sum)
            pub.send(wire.encode_status(job.status))
        k = self.sent_cycles % RING
        self.last_to_wire_ns = self.to_wire_ns[k] = t_wire - job.start_ns
        self.last_send_ns = self.send_ns[k] = time.monotonic_ns() - t0
        self.queue_ns[k] = t0 - job.t_submit_ns
        with self._counts_lock:  # the pair moves together: a reader never sees this cycle's frames without it
            self.sent_cycles += 1
            self.frames_sent += n_frames
        self._done(job, True)
        self.on_idle()

    def _not_sent(self, job: PublishJob) -> None:
        """A cycle not sent (its event emitted): decide its journal flag, then the socket's upkeep."""
        self._done(job, False)
        self.on_idle()

    def _done(self, job: PublishJob, sent: bool) -> None:
        if not job.final:
            self.on_done(job, sent)
