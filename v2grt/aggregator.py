"""The aggregator process: inputs (Modbus, telemetry, control) on I/O threads, one control thread that
dispatches the fleet every period and publishes one setpoint message per gateway.

Threads and what each owns (pyzmq sockets are single-owner):
- control thread (ControlLoop): the Dispatcher, the fleet arrays; it gathers each cycle's setpoints into
  the laid-out frames and hands the cycle to the publisher thread (with bus.publisher_thread false it also
  owns the setpoint/status PUB socket and sends them itself);
- publisher thread (v2grt.publisher, bus.publisher_thread true, the default): the setpoint/status PUB socket:
  admits subscriptions, re-checks the HA lease at send time, sends the frames and the status, the final zero;
- input thread (InputThread, asyncio + uvloop): the Modbus clients, publishing into Latest cells;
- bus thread: the telemetry PULL and control ROUTER sockets; decodes and validates, and writes each
  batch into the fleet arrays between cycles, under the image lock the control thread holds for its
  cycle (the kernel never sees a half-applied batch); its turns and share of each period are the
  receive gate's (v2grt.gate).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time

import numpy as np
import zmq

from v2grt import ingest, security
from v2grt import journal as journal_mod
from v2grt.codes import Reason, reason_names
from v2grt.config import Config, build_service
from v2grt.dispatch import Dispatcher
from v2grt.events import EventLog
from v2grt.fleet import NEVER_HEARD_NS, Fleet
from v2grt.gate import ReceiveGate
from v2grt.io import bus, wire
from v2grt.io.modbus import InputThread, InverterReader, MeterReader
from v2grt.loop import ControlLoop, CycleStats, CycleTimes, RealtimeConfig, SetupStep, io_priority, set_thread_fifo
from v2grt.monitor import FrequencyAlert
from v2grt.profile import DispatchProfile, ProfileError
from v2grt.publisher import PublisherThread, PublishJob
from v2grt.services import ServiceCurve

log = logging.getLogger("v2grt.aggregator")

_REASON_NAMES = reason_names(range(256))
_NOT_EXCLUDED = frozenset({int(Reason.OK), int(Reason.EMPTY)})  # the status's `excluded` leaves these out

#: The libzmq I/O thread (index in the aggregator's context of two) that carries the setpoint PUB alone.
PUBLISHER_IO_THREAD = 1

#: The `optimized` telemetry profile: slow metrics (cabin temperature, SoH, cycle count, ...) in one
#: batch of 10, fast ones (SoC, power, voltage) in every batch (the field manual's overhead advice).
SLOW_N_OPTIMIZED = 10


@dataclasses.dataclass
class _CycleOut:
    """A handed-over cycle's outputs, written into its frames on the publisher thread (_prepare_frames)."""

    result: object  # DispatchResult: its arrays are the dispatcher's buffers, this cycle's while dispatcher.runs == run
    run: int
    rows: np.ndarray | None  # the fleet row of each node in the frames' order; None: row j is node j
    t_ns: int
    exp_ns: int
    slow_n: int
    now_ns: int  # the cycle's wake-up (the status's meter age)
    delivered_kw: float  # NaN until settled (Aggregator._settle_delivered)


class _ImageLock:
    """The process image's lock (Aggregator._image_lock): whoever takes it first settles the delivered-power sum
    a handed-over cycle still owes (Aggregator._settle_delivered), before anything can change the image."""

    def __init__(self, settle):
        self._lock = threading.Lock()
        self._settle = settle

    def __enter__(self) -> _ImageLock:
        self._lock.acquire()
        try:
            self._settle()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


@dataclasses.dataclass
class _TestDischarge:
    row: int
    node_id: str
    kw: float
    until_ns: int
    soc_before: float


def load_fleet(cfg: Config, now_ns: int) -> Fleet:
    if cfg.fleet.random is not None:
        return Fleet.random(cfg.fleet.random, seed=cfg.fleet.seed, now_ns=now_ns)
    return Fleet.from_csv(cfg.resolve(cfg.fleet.roster), now_ns=now_ns)


def load_service(cfg: Config) -> ServiceCurve:
    return build_service(cfg.service)


class Aggregator:
    """Wire config, fleet, inputs, bus and the control loop together; start(), stop().

    `epoch` is normally the next durable epoch (v2grt.state); tests and benchmarks may pass one. With an
    `ha` section the epoch comes from the etcd election instead (v2grt.ha) and `epoch` is ignored: the cycle
    runs in full either way, setpoints go out only while this process leads with a surely valid lease.
    """

    def __init__(self, cfg: Config, *, epoch: int, fleet: Fleet | None = None, ctx: zmq.Context | None = None,
                 events: EventLog | None = None, backend: str | None = None):
        self.cfg = cfg
        self.epoch = epoch
        self.events = events or EventLog()
        #: high availability (docs/ha.md): the elector thread and its LeaderView; None without `ha`
        self.ha = None
        if cfg.ha is not None:
            from v2grt.ha import Elector

            self.ha = Elector.from_config(cfg, events=self.events)
            self.epoch = 0  # until elected: the leader key's create revision
        now = time.monotonic_ns()
        self.fleet = fleet if fleet is not None else load_fleet(cfg, now)
        self.profile_path = cfg.resolve(cfg.discharge_profile)
        profile = DispatchProfile.from_json(self.profile_path) if self.profile_path else DispatchProfile()
        self.dispatcher = Dispatcher(self.fleet, profile, service=load_service(cfg),
                                     capacity_kw=cfg.service.capacity_kw, backend=backend, period_s=cfg.period_s,
                                     kernel_threads=cfg.kernel.threads)
        # Heard before dispatched (DESIGN.md section 12): the roster (or a fleet handed in) gives identity,
        # ratings and site, never freshness. Marked after the Dispatcher sized the default capacity from the
        # roster as the fleet will be once heard; until its first valid telemetry each vehicle is
        # TIMEOUT_BMS_RESPONSE (0 kW). After a restart the roster's static SoC once drove +10 kW per vehicle
        # for stale_after_s (issue 10, item 6).
        self._never_heard = self.fleet.mark_never_heard()
        self.period_ns = int(round(cfg.period_s * 1e9))
        self.ttl_ns = int(round(cfg.setpoint_ttl_s * 1e9))  # bus.setpoint_ttl_s, or 3 periods when unset

        # inputs
        self.meter: MeterReader | None = None
        pollers = []
        if cfg.meter is not None:
            m = cfg.meter
            # polls phase-locked to the loop's deadlines (k * period_s on CLOCK_MONOTONIC), each period's last one
            # meter.poll_lead_s before the deadline: the cycle's sample is ~2 ms old instead of 0..5 ms + a round trip
            lock = {} if m.poll_lead_s is None else {"cycle_period_s": cfg.period_s, "lead_s": m.poll_lead_s}
            self.meter = MeterReader(m.host, m.port, device_id=m.device_id, interval_s=m.poll_interval_s,
                                     timeout_s=m.timeout_s, name=f"meter {m.host}:{m.port}", **lock)
            pollers.append(self.meter)
        self.inverters: list[tuple[InverterReader, int]] = []
        for inv in cfg.inverters:
            reader = InverterReader(inv.host, inv.port, device_id=inv.device_id, name=f"inverter {inv.name}",
                                    interval_s=max(cfg.period_s, 0.05), timeout_s=0.2)
            self.inverters.append((reader, self.fleet.site_index(inv.site)))
            pollers.append(reader)
        # worker_threads (the field manual's knob) sizes the I/O side: the pollers are dealt round-robin
        # onto that many input threads, each one asyncio (uvloop) loop polling its devices concurrently.
        n_threads = min(cfg.worker_threads, len(pollers))
        self.input_threads = [InputThread(pollers[k::n_threads], name=f"v2grt-input-{k}") for k in range(n_threads)]

        # bus
        self._own_ctx = ctx is None
        zmq_before = bus.libzmq_io_threads()
        # Two libzmq I/O threads: the setpoint PUB's connections on their own (PUBLISHER_IO_THREAD), so setpoints
        # never queue behind the reading of a telemetry flood (bench fuzz, 8,000 msg/s, 58 MB/s: setpoints
        # left the aggregator on time, stamped gaps p99 103 ms, but reached the gateway with p99 135 ms).
        self.ctx = ctx or zmq.Context(io_threads=2)
        pub_io = PUBLISHER_IO_THREAD if self.ctx.get(zmq.IO_THREADS) > PUBLISHER_IO_THREAD else None
        # security.enabled: CURVE on every socket; the ZAP thread (keys, roles, allowlist) starts before any bind
        self.security = security.server_for(cfg, self.ctx, self.events)
        self.publisher = bus.SetpointPublisher(self.ctx, cfg.bus.setpoints, sndhwm=cfg.bus.setpoint_hwm,
                                               io_thread=pub_io, **security.bus_options(self.security, "setpoints"))
        # that I/O thread's native id, for SCHED_FIFO beside the bus thread (_io_thread_priorities)
        self._pub_io_tid = self._find_io_thread(zmq_before, pub_io) if self._own_ctx else None
        # Roster-bounded ingest (v2grt.ingest): the decoder refuses unknown gateways and oversized batches
        # before reading ids; the router maps ids to rows. telemetry_strict false (the default): one
        # vehicle's NaN quarantines that vehicle (INVALID_TELEMETRY), not its whole gateway.
        self.router = ingest.TelemetryRouter()
        self.telemetry = bus.TelemetryReceiver(self.ctx, cfg.bus.telemetry, strict=cfg.bus.telemetry_strict,
                                               max_nodes=self._max_nodes, check_ids=False,
                                               accept=self._accept_batch,
                                               **security.bus_options(self.security, "telemetry"))
        self.control = bus.ControlServer(self.ctx, cfg.bus.control, self._handle_control,
                                         **security.bus_options(self.security, "control"))
        # The control thread's cycle goes first on the GIL; the bus thread receives after it, for at most
        # bus.receive_budget of each period (v2grt.gate; issue 10: 23-45 missed deadlines at 8,000 msg/s without).
        self.gate = ReceiveGate(self.period_ns, cfg.bus.receive_budget)
        self._wake_addr = f"inproc://v2grt-bus-wake-{id(self)}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.linger = 0
        self._wake_rx.bind(self._wake_addr)
        self._bus_thread = threading.Thread(target=self._bus_main, name="v2grt-bus", daemon=True)
        self._stopping = threading.Event()

        # cross-thread hand-over (deque appends/pops are atomic)
        self._commands: collections.deque = collections.deque()
        # The process image's lock: the control thread holds it for its whole cycle, the bus thread while it
        # writes one telemetry batch into the fleet arrays, so the kernel never sees a half-applied batch.
        # With the receive gate the bus thread writes only between cycles (at most one batch begun before
        # the gate closed is waited for); applied there, not at the cycle's start, a batch costs the bus
        # thread's budget and not the cycle's time (bench fuzz: the inputs phase was 4-9 ms at 8,000 msg/s,
        # and its variation was the jitter of the setpoints, p99 104 ms at a 100 ms period).
        #
        # It also carries the sum of the vehicles' reported power (status, journal) of a cycle handed to the
        # publisher thread: that cycle owes it (_owed) and whoever takes the lock next computes it first, on the
        # image as the cycle left it (the publisher thread after the cycle's frames, or the bus thread before its
        # first batch, or the next cycle's start if neither came): ~25-74 us at 100,000 vehicles that were on the
        # control thread in every cycle (docs/benchmarks.md, "bench cycle").
        self._owed: _CycleOut | None = None
        self._image_lock = _ImageLock(self._settle_delivered)

        # control-thread state
        self.stats = CycleStats()
        self.loop = ControlLoop(self.period_ns, self._cycle, budget_ns=int(round(cfg.budget_s * 1e9)),
                                realtime=RealtimeConfig(**dataclasses.asdict(cfg.realtime)), stats=self.stats,
                                on_setup=self._log_setup)
        if self.ha is not None:  # a planned handover to this standby: publish from a cycle at once (docs/ha.md)
            self.ha.on_prepare = lambda until_ns: self.loop.expect_wake(until_ns, wait_s=1.5 * cfg.period_s)
            self.ha.on_won = self.loop.wake
        self.seq = 0
        # Every gateway's frame, laid out once per fleet membership (ids included) and refilled each cycle;
        # _rows_all lists the fleet rows in the frames' gateway order.
        self._frames: wire.SetpointFrames | None = None
        self._rows_all = np.zeros(0, np.int64)
        self._rows_in_order = False  # _rows_all is 0, 1, 2, ...: the gather is a plain copy
        self._layout_version = -1
        self._p99_cache: float | None = None
        self._last_fraction = 0.0
        self._f_stale = False
        self._last_cycle_ns: int | None = None
        self._test: _TestDischarge | None = None
        self._inverter_fault = {site: False for _, site in self.inverters}
        self.last_result = None
        self.delivered_kw = 0.0  # sum of the vehicles' reported power this cycle, kW (+ discharge)
        self.published = False  # this cycle's setpoints went out (False: a standby, or fenced by its lease)
        self.status: dict = {}
        self.first_cycle = threading.Event()
        self.telemetry_profile = "default"
        self.slow_n = 1  # setpoints tell gateways to send slow telemetry keys every slow_n-th batch
        #: Called on the control thread at the end of every cycle as hook(aggregator, result, times):
        #: metrics, watchdog, per-node event logging. Keep them cheap: they are inside the cycle.
        self.cycle_hooks: list = []
        #: bus.publisher_thread: the thread that owns the setpoint PUB (v2grt.publisher); None: this control thread
        self.sender: PublisherThread | None = None
        if cfg.bus.publisher_thread:
            self.sender = PublisherThread(self.publisher, prepare=self._prepare_frames, may_send=self._may_send,
                                          on_done=self._publish_done, on_idle=self._publisher_upkeep,
                                          before_status=self._finish_status, events=self.events)
        elif self.security is not None:  # drops revoked keys' connections to the setpoint PUB (its owner's job)
            self.cycle_hooks.append(self.security.on_cycle)
        #: the publisher thread's `refused` count already raised here as a cycle error (_raise_if_refused)
        self._refused_seen = 0
        self._cycle_start_ns = 0  # this cycle's deadline (its wake-up if off the grid): the to-wire time's origin
        #: control-thread publishing (bus.publisher_thread false): deadline to the last frame sent, ns (a ring)
        self.to_wire_ns = np.zeros(4096, np.int64)
        self.to_wire_count = 0
        self.frames_sent = 0  # ... and the setpoint frames it queued
        self.last_to_wire_ns = 0
        #: GRID_FREQUENCY_ALERT and its throttling, applied in the service-fraction phase (v2grt.monitor).
        self.alert = (FrequencyAlert(cfg.alert, self.dispatcher.service.nominal_hz, self.events, self.dispatcher)
                      if cfg.alert.band_hz is not None else None)
        self.last_test: dict | None = None  # how the last test discharge ended (v2g-cli --test-discharge)
        #: The dispatch journal (v2grt.journal): record() copies each cycle into a ring on this thread; its
        #: writer thread appends the segments. None when journal.enabled is false.
        self.journal = journal_mod.for_aggregator(self) if cfg.journal.enabled else None

    @staticmethod
    def _find_io_thread(before: dict[int, str], index: int | None, timeout_s: float = 0.5) -> int | None:
        """The native id of the new libzmq I/O thread ``ZMQbg/IO/<index>`` (not in ``before``), or None.

        A new thread names itself once it runs, so it is looked for again for up to ``timeout_s``."""
        if index is None:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            found = [tid for tid, name in bus.libzmq_io_threads().items()
                     if tid not in before and name == f"ZMQbg/IO/{index}"]
            if found or time.monotonic() > deadline:
                return found[0] if len(found) == 1 else None
            time.sleep(0.001)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # One-off work before the first deadline, not inside it: the kernel's buffers and every
        # gateway's frame layout (at 100,000 vehicles each cost ~100 ms in the first cycle; docs/demo.md).
        self.dispatcher.prepare()
        if self.fleet.n_rows:
            self._rebuild_layouts()
        never_heard = self.never_heard()
        if never_heard:
            self.events.emit("AWAITING_TELEMETRY", logging.INFO, key="start", vehicles=never_heard,
                             gateways=len(self.fleet.gateway_ids),
                             message="no vehicle is dispatched before its first valid telemetry: "
                                     "TIMEOUT_BMS_RESPONSE (0 kW) until then; v2g-cli --status shows never_heard")
        if self.journal is not None:
            self.journal.start()
            log.info("JOURNAL dir=%s rotate_s=%g vehicles=%s parquet=%s", self.journal.dir, self.cfg.journal.rotate_s,
                     self.cfg.journal.vehicles, self.cfg.journal.parquet)
        else:
            log.warning("JOURNAL_DISABLED no dispatch journal: journal.enabled is false (docs/journal.md)")
        for thread in self.input_threads:
            thread.start()
        self._bus_thread.start()
        if self.sender is not None:
            self.sender.start()  # owns the setpoint PUB from here on (thread start: a full memory barrier)
        if self.ha is not None:
            self.ha.start()
        self.loop.start()

    def stop(self, final_zero: bool = True) -> None:
        """Stop the loop, tell every gateway 0 kW (e-stop cleared), stop the I/O threads, close sockets."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self.loop.stop()
            if self.sender is not None:  # the last cycle's frames go out (and decide its journal record) first
                self.sender.wait_idle()
            if self.journal is not None:
                self.journal.stop()  # drains the ring, seals the segment: after the loop's last cycle
            self.gate.release()  # no more cycles: the bus thread must not wait for one to see its stop
            if self.ha is not None:
                # No final zero under HA: the standby takes over at its next poll once the lease is revoked,
                # and the gateways hold the last setpoints (3 periods) across that gap instead of dropping
                # the fleet to 0 kW for it (docs/ha.md).
                self.ha.stop(resign=True)
            elif final_zero:
                self._publish_final_zero()  # after the last cycle's frames: the publisher was idle above
            if self.sender is not None:
                self.sender.stop()  # the final zero sent; the sockets below are closed once it has ended
            if self._bus_thread.is_alive():
                wake = self.ctx.socket(zmq.PAIR)
                try:
                    wake.linger = 0
                    wake.connect(self._wake_addr)
                    wake.send(b"stop")  # in-band stop for the bus thread's poller
                    self._bus_thread.join(5.0)
                finally:
                    wake.close()
            for thread in self.input_threads:
                thread.stop()
            time.sleep(0.05)  # linger=0 drops unsent frames: give the final zeros a moment on the wire
        finally:
            # Sockets close whatever failed above: an open socket would block Context.term() forever.
            for sock in (self.publisher, self.telemetry, self.control):
                sock.close()
            self._wake_rx.close(0)
            if self.security is not None:
                self.security.stop()  # its ZAP socket would block Context.term() too
            if self._own_ctx:
                self.ctx.term()

    def _log_setup(self, steps) -> None:
        """On the control thread once its real-time setup is done: the I/O threads follow it (appended to
        `steps`, the loop's setup_report), then every step is logged."""
        steps.extend(self._io_thread_priorities(steps))
        for s in steps:
            log.info("RT_SETUP step=%s granted=%s detail=%r", s.step, s.granted, s.detail)
        log.info("KERNEL backend=%s isa=%s threads=%d", self.dispatcher.backend, self.dispatcher.kernel_isa,
                 self.cfg.kernel.threads)

    def _io_thread_priorities(self, steps) -> list[SetupStep]:
        """SCHED_FIFO just below the control thread for the threads that feed it (Modbus input, bus), when
        the control thread has it: at SCHED_OTHER under a SCHED_FIFO control thread, the meter poller fell
        behind (sample age p99 ~15 ms, max 23 ms at a 5 ms poll; issue 10, item 8)."""
        threads = [(t.name, t.native_id) for t in self.input_threads] + [(self._bus_thread.name,
                                                                          self._bus_thread.native_id)]
        if self.sender is not None:  # the thread that sends the setpoints (v2grt.publisher)
            threads.append((self.sender.name, self.sender.native_id))
        if self._pub_io_tid is not None:  # libzmq's I/O thread that writes the setpoints to the gateways
            threads.append(("zmq-io-setpoints", self._pub_io_tid))
        if not any(s.step == "sched_fifo" and s.granted for s in steps):
            return [SetupStep("sched_fifo_io", False, "the control thread is not SCHED_FIFO: "
                              f"{', '.join(name for name, _ in threads)} stay SCHED_OTHER")]
        priority = io_priority(self.loop.realtime.sched_fifo_priority)
        return [set_thread_fifo(tid, priority, name) if tid is not None
                else SetupStep(f"sched_fifo:{name}", False, "thread not running")
                for name, tid in threads]

    # ------------------------------------------------------------------------------ the cycle
    def _cycle(self, deadline_ns: int, woke_ns: int) -> CycleTimes:
        t0 = woke_ns
        # to-wire times are counted from the deadline; an off-grid cycle (a handover's wake) from its wake-up
        self._cycle_start_ns = deadline_ns if 0 <= woke_ns - deadline_ns < self.period_ns else woke_ns
        try:
            with self._image_lock:  # no telemetry batch is written into the fleet while the cycle reads it
                input_age_ns = self._read_inputs(woke_ns)
                t1 = time.monotonic_ns()
                result = self._dispatch(woke_ns)
                t2 = time.monotonic_ns()
                self._publish(result, woke_ns)
                t3 = time.monotonic_ns()
                times = CycleTimes(input_age_ns=input_age_ns, inputs_ns=t1 - t0, kernel_ns=t2 - t1,
                                   publish_ns=t3 - t2)
                self._record(result, input_age_ns)
                if self.journal is not None:
                    self.journal.record(self, result, times)
                for hook in self.cycle_hooks:
                    hook(self, result, times)
                self._raise_if_refused()
        finally:
            # the bus thread's turn until the next deadline, also after a cycle that raised: else the gate stays
            # closed for gate.MAX_WAIT_NS (1 s) and an e-stop waits that long (review F5)
            self.gate.cycle_done(deadline_ns, time.monotonic_ns())
        if not self.first_cycle.is_set():
            self.first_cycle.set()
        return times

    def _raise_if_refused(self) -> None:
        """A wild value the publisher thread refused (SETPOINTS_REFUSED) is a kernel bug, and counts as one here too:
        raised as this cycle's error once the cycle is whole (published, recorded, journalled), so the loop's
        max_consecutive_errors in a row stop it (LOOP_FAILED), as the same check does when this thread writes the
        frames itself (bus.publisher_thread false)."""
        sender = self.sender
        if sender is None or sender.refused == self._refused_seen:
            return
        n, self._refused_seen = sender.refused - self._refused_seen, sender.refused
        raise wire.WireError("OUT_OF_RANGE", f"the publisher thread refused {n} cycle(s) of setpoints by cycle seq "
                             f"{self.seq} (SETPOINTS_REFUSED in engine.log names the vehicle and value: a wild value "
                             f"out of the dispatch; expected finite setpoints within the wire's limits)")

    # phase 1: read inputs (telemetry is already in the fleet arrays: _accept_batch, under the image lock)
    def _read_inputs(self, now_ns: int) -> int:
        fleet = self.fleet
        while self._commands:
            self._commands.popleft()(now_ns)
        for reader, site in self.inverters:
            sample, _t = reader.latest.read()
            fault = bool(sample is not None and sample.cannot_sync)
            if fault != self._inverter_fault[site]:
                self._inverter_fault[site] = fault
                fleet.site_fault[site] = Reason.E_INVERTER_PHASE_MISMATCH if fault else 0
                self.events.emit("E_INVERTER_PHASE_MISMATCH" if fault else "E_INVERTER_PHASE_CLEARED",
                                 logging.ERROR if fault else logging.INFO, key=reader.name,
                                 inverter=reader.name, site=fleet.site_ids[site])
        if self.meter is None:
            return 0
        _sample, t = self.meter.latest.read()
        return now_ns - t if t is not None else -1

    # phase 2: dispatch
    def _dispatch(self, now_ns: int):
        fraction, f_hz = self._service_fraction(now_ns)
        request_kw = self.cfg.service.base_kw + fraction * self.dispatcher.capacity_kw
        dt_s = self.cfg.period_s if self._last_cycle_ns is None else (now_ns - self._last_cycle_ns) / 1e9
        self._last_cycle_ns = now_ns
        t = self._test
        pin = (t.row, t.kw) if t is not None and now_ns < t.until_ns else None
        result = self.dispatcher.run_kernel(request_kw, now_ns, dt_s, frequency_hz=f_hz, fraction=fraction, pin=pin)
        if t is not None:
            self._end_test_discharge_if_due(result, now_ns)
        self.last_result = result
        return result

    def _service_fraction(self, now_ns: int) -> tuple[float, float]:
        """The service response to the newest frequency; frozen or ramped out when the meter is stale."""
        if self.meter is None:
            return 0.0, math.nan
        m = self.cfg.meter
        sample, t = self.meter.latest.read()
        age_s = math.inf if t is None else (now_ns - t) / 1e9
        if sample is not None and age_s <= m.stale_after_s:
            if self._f_stale:
                self._f_stale = False
                self.events.emit("GRID_FREQUENCY_RESTORED", logging.INFO, key="meter", f_hz=sample.f_hz)
            self._last_fraction = self.dispatcher.service_fraction(sample.f_hz, now_ns / 1e9)
            if self.alert is not None:
                self._last_fraction = self.alert.apply(sample.f_hz, self._last_fraction, now_ns)
            return self._last_fraction, sample.f_hz
        if not self._f_stale:
            self._f_stale = True
            self.events.emit("GRID_FREQUENCY_STALE", logging.ERROR, key="meter", age_s=age_s, action=m.on_stale,
                             last_error=self.meter.counters.last_error or "none")
        if m.on_stale == "freeze":
            return self._last_fraction, math.nan
        over_s = age_s - m.stale_after_s if math.isfinite(age_s) else math.inf
        keep = max(0.0, 1.0 - over_s / m.rampout_s) if m.rampout_s > 0 else 0.0
        return self._last_fraction * keep, math.nan

    def _end_test_discharge_if_due(self, result, now_ns: int) -> None:
        """The kernel held the test vehicle at its kW (pin) this cycle; end the test when its time is
        up or the vehicle became ineligible (then the kernel has already dispatched it as any other)."""
        t = self._test
        if now_ns >= t.until_ns or result.reasons[t.row] != Reason.OK or result.estop:
            if now_ns < t.until_ns:
                self.events.emit("TEST_DISCHARGE_ABORTED", logging.WARNING, key=t.node_id, node=t.node_id,
                                 reason=_REASON_NAMES[result.reasons[t.row]])
            else:
                self.events.emit("TEST_DISCHARGE_DONE", logging.INFO, key=t.node_id, node=t.node_id,
                                 soc_before=t.soc_before, soc_after=float(self.fleet.soc[t.row]))
            self.last_test = {"node_id": t.node_id, "kw": t.kw, "end_seq": self.seq,
                              "outcome": "aborted" if now_ns < t.until_ns else "done",
                              "reason": _REASON_NAMES[result.reasons[t.row]], "soc_before": t.soc_before,
                              "soc_after": float(self.fleet.soc[t.row])}
            self._test = None

    # phase 3: publish
    def _publish(self, result, now_ns: int) -> None:
        self.published = False  # until this cycle's setpoints are sent (the journal records it)
        sender = self.sender
        if sender is not None and sender.busy:
            # Still sending the previous cycle (starved for a whole period): its frame buffer is in use, so this
            # cycle is not handed over (v2grt.publisher: one buffer, skip and count). The gateways hold the
            # previous setpoints until their expiry, as for a lost frame.
            self.delivered_kw = self._delivered_sum()  # this cycle's journal record (rare: here, not deferred)
            sender.busy_skips += 1
            self.events.emit("PUBLISHER_BUSY", logging.WARNING, key="publisher", skipped=sender.busy_skips,
                             message="the publisher thread was still sending the previous cycle: this cycle's "
                                     "setpoints were not published")
            return
        if sender is None:
            self.publisher.admit_subscriptions()  # security: each subscription checked against its key; else no-op
        if self.fleet.version != self._layout_version or self._frames is None:
            self._rebuild_layouts()
        if self.ha is not None:
            # Self-fencing (docs/ha.md): read the clock now, after dispatch, and publish only while the lease
            # is surely valid; ha.margin_s covers the sends below. A standby publishes no status topic either:
            # a subscriber connected to every aggregator must not read a standby's numbers as the fleet's
            # (its role and numbers are in the status reply, v2g-cli --status). The publisher thread asks again
            # right before it sends (_may_send).
            view = self.ha.view
            if self.ha.resigning or not view.may_publish(time.monotonic_ns()):  # resigning: handed over
                self.delivered_kw = self._delivered_sum()  # a standby's journal records this cycle's sum too
                if sender is not None:  # the socket's upkeep (subscriptions, a revocation's rebind) goes on
                    sender.submit(PublishJob(self.epoch, self.seq, None, None, self._cycle_start_ns))
                return
            if view.epoch != self.epoch:
                self.epoch, self.seq = view.epoch, 0
        self.seq += 1
        t_ns = time.time_ns()
        frames = self._frames
        rows = None if self._rows_in_order else self._rows_all
        if sender is not None:
            # Handed over as it is: the publisher thread writes the frames and the status fields from this result
            # (_prepare_frames), and sends nothing if the next cycle's kernel began first. At 100,000 vehicles and
            # 1,000 gateways this phase was 0.41 ms p50 with the compiled writing still here (memory-bound: the
            # caches are cold from the kernel) and is 0.10 ms without it (docs/benchmarks.md, "The publisher thread").
            # `published` stays True in this cycle's journal record unless the publisher thread does not send it
            # (stale, a wild value, the lease at send time, a failure): it then sets the flag to 0 (_publish_done).
            # The delivered-power sum is owed (see _image_lock): the status gets it on the publisher thread after
            # the frames (_finish_status), the journal record with its `published` flag (_publish_done).
            w = self.journal.expect_outcome() if self.journal is not None else -1
            self.published = True
            cycle = _CycleOut(result, self.dispatcher.runs, rows, t_ns, t_ns + self.ttl_ns, self.slow_n, now_ns,
                              math.nan)
            self._owed = cycle
            sender.submit(PublishJob(self.epoch, self.seq, frames, None, self._cycle_start_ns, journal_w=w,
                                     cycle=cycle))
            return
        # One compiled pass writes the whole cycle into every gateway's frame (the gather by row, or a plain copy
        # when the roster is already in gateway order, float32, the checks, the header). A wild value raises
        # here, on this thread, before a frame can be sent (CYCLE_ERROR).
        self.delivered_kw = self._delivered_sum()
        frames.write(result.setpoints_kw, result.reasons, rows, self.epoch, self.seq, t_ns, t_ns + self.ttl_ns,
                     result.estop, slow_n=self.slow_n)
        status = self._status_fields(result, t_ns, now_ns, self.epoch, self.seq, self.delivered_kw)
        self.frames_sent += self.publisher.send_frames(frames)
        self.last_to_wire_ns = time.monotonic_ns() - self._cycle_start_ns
        self.to_wire_ns[self.to_wire_count % len(self.to_wire_ns)] = self.last_to_wire_ns
        self.to_wire_count += 1
        self.published = True
        self.publisher.send(wire.encode_status(status))
        if self.ha is not None and self.ha.handover_ready:  # a planned handover: this was the last publish
            self.ha.resign_after_publish()

    # the publisher thread's callbacks (v2grt.publisher): on that thread
    def _prepare_frames(self, job: PublishJob) -> bool:
        """Write a handed-over cycle into its frames and its status fields; False: the kernel ran again since the
        hand-over, so what was read may mix two cycles (nothing of it is to be sent)."""
        c = job.cycle
        r = c.result
        try:
            job.frames.write(r.setpoints_kw, r.reasons, c.rows, job.epoch, job.seq, c.t_ns, c.exp_ns, r.estop,
                             slow_n=c.slow_n)
            job.status = self._status_fields(r, c.t_ns, c.now_ns, job.epoch, job.seq, c.delivered_kw)
        except wire.WireError:
            if self.dispatcher.runs != c.run:  # a "wild" value read from a half-written next cycle: stale
                return False
            raise
        # compared after the reads: a run counted before it wrote the arrays (Dispatcher.runs), and each thread
        # passed the GIL in between, so a run that overlapped any read is seen here
        return self.dispatcher.runs == c.run

    def _delivered_sum(self) -> float:
        """The vehicles' reported power summed over the image as it is now, kW (+ discharge)."""
        return float(self.fleet.p_actual_kw[: self.fleet.n_rows].sum())

    def _settle_delivered(self) -> None:
        """Whoever takes the image lock (so the image is still the owing cycle's): the owed cycle's sum."""
        c = self._owed
        if c is not None:
            c.delivered_kw = self.delivered_kw = self._delivered_sum()
            self._owed = None  # after the value: _delivered_of reads it without the lock once this is not c

    def _delivered_of(self, c: _CycleOut) -> float:
        """Publisher thread: a handed-over cycle's delivered-power sum, settled now if no thread took the image
        since (no new cycle can owe one while this thread still has this cycle: it is `busy`)."""
        if self._owed is c:
            with self._image_lock:  # settles it
                pass
        return c.delivered_kw

    def _finish_status(self, job: PublishJob) -> None:
        """Publisher thread, after the cycle's frames and before its status: the status's delivered power."""
        if job.cycle is not None and job.status is not None:
            job.status["delivered_kw"] = self._delivered_of(job.cycle)

    def _may_send(self, job: PublishJob) -> bool:
        """Self-fencing at send time (docs/ha.md): the lease of the frames' epoch is surely valid now."""
        if self.ha is None:
            return True
        view = self.ha.view
        return not self.ha.resigning and view.epoch == job.epoch and view.may_publish(time.monotonic_ns())

    def _publish_done(self, job: PublishJob, sent: bool) -> None:
        """After the job's last frame and status were queued (sent) or refused: the journal record's
        `published` flag, then a planned handover's resignation (after the last frames actually sent)."""
        if not sent:
            self.published = False
        delivered_kw = self._delivered_of(job.cycle) if job.cycle is not None else math.nan
        if self.journal is not None and job.journal_w >= 0:
            self.journal.publish_outcome(job.journal_w, job.seq, sent, delivered_kw)
        if sent and self.ha is not None and self.ha.handover_ready:
            self.ha.resign_after_publish()

    def _publisher_upkeep(self) -> None:
        """After each cycle, while the publisher thread owns the socket: drop a revoked key's connections."""
        if self.security is not None:
            self.security.on_cycle(self)

    def _rebuild_layouts(self) -> None:
        fleet = self.fleet
        gateways, rows = [], []
        for gw in fleet.gateway_ids:
            gw_rows = fleet.gateway_rows(gw)
            if len(gw_rows):
                gateways.append((gw, wire.join_ids(fleet.node_ids[r] for r in gw_rows)))
                rows.append(gw_rows)
        self._frames = wire.SetpointFrames(gateways, backend=self.dispatcher.backend)
        self._rows_all = np.ascontiguousarray(np.concatenate(rows) if rows else np.zeros(0), np.int64)
        self._rows_in_order = bool(np.array_equal(self._rows_all, np.arange(len(self._rows_all))))
        self._layout_version = fleet.version
        # telemetry in the order of these frames' ids is mapped by a bytes comparison (v2grt.ingest)
        self.router.set_roster(fleet, [(gw, blob, r) for (gw, blob), r in zip(gateways, rows)])

    def _publish_final_zero(self) -> None:
        """The last word to every gateway: 0 kW, e-stop cleared, so they stop at once (not at expiry).

        With the publisher thread, after it has sent the last cycle (stop() waited for it), and by it."""
        if self._frames is None:
            self._rebuild_layouts()
        self.seq += 1
        t_ns = time.time_ns()
        frames = self._frames
        # 0 kW for every vehicle, each with the reason its frame carried last (none before a first cycle: OK)
        frames.write(np.zeros(frames.n_nodes), frames.frame_reasons(), None, self.epoch, self.seq, t_ns,
                     t_ns + self.ttl_ns, False, slow_n=self.slow_n)
        if self.sender is not None and self.sender.running:
            self.sender.submit(PublishJob(self.epoch, self.seq, frames, None, time.monotonic_ns(), final=True))
            if not self.sender.wait_idle():
                log.error("SHUTDOWN the publisher thread did not send the final zero setpoints within 5 s")
                return
        else:  # no publisher thread, or it never started (stop() without start()): this thread is the owner
            self.publisher.send_frames(frames)
        log.info("SHUTDOWN final zero setpoints sent to %d gateways (seq %d)", len(self._frames), self.seq)

    def _status_fields(self, result, t_ns: int, now_ns: int, epoch: int, seq: int, delivered_kw: float) -> dict:
        """The status message's fields (the publisher thread builds them with the cycle's own numbers)."""
        # The kernel counts the rows per reason as it writes them (a bincount of 1M codes here took
        # ~2 ms), so the status is exact every cycle.
        counts = result.nodes_per_reason
        # plain ints: comparing numpy integers with the Reason enum cost ~60 us for six codes (this machine)
        excluded = {_REASON_NAMES[k]: int(counts[k]) for k in np.flatnonzero(counts).tolist() if k not in _NOT_EXCLUDED}
        _sample, t = self.meter.latest.read() if self.meter else (None, None)
        return {
            "ep": epoch, "seq": seq, "t_ns": t_ns,
            "f_hz": None if math.isnan(result.frequency_hz) else float(result.frequency_hz),
            "f_age_ms": None if t is None else max(0.0, (now_ns - t) / 1e6),
            "target_kw": result.target_kw,
            "delivered_kw": delivered_kw,
            "available_dis_kw": result.feasible_dis_kw,
            "available_chg_kw": result.feasible_chg_kw,
            "n_nodes": len(self.fleet),
            "n_active": result.n_carrying,
            "excluded": excluded,
            "estop": result.estop,
            "cycle_p99_ms": self._recent_p99_ms(),
            "deadline_misses": self.stats.missed_deadlines + self.stats.budget_overruns,
        }

    def _recent_p99_ms(self) -> float:
        """p99 of the newest 1000 cycle totals, recomputed every 100 cycles (off the hot path)."""
        n = self.stats.cycles
        if n == 0:
            return 0.0
        if n % 100 == 1 or self._p99_cache is None:
            size = self.stats.size
            newest = (np.arange(n - min(n, 1000), n)) % size  # ring positions, oldest first
            self._p99_cache = float(np.percentile(self.stats.rings["total"][newest], 99) / 1e6)
        return self._p99_cache

    # phase 4: record
    def _record(self, result, input_age_ns: int) -> None:
        self.status = {"seq": self.seq, "request_kw": result.request_kw, "target_kw": result.target_kw,
                       "allocated_kw": result.allocated_kw, "frequency_hz": result.frequency_hz,
                       "input_age_ms": input_age_ns / 1e6 if input_age_ns >= 0 else None,
                       "frequency_stale": self._f_stale}

    # ------------------------------------------------------------------------------ bus thread
    def _bus_main(self) -> None:
        poller = zmq.Poller()
        poller.register(self.telemetry.sock, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        gate = self.gate
        while True:
            try:
                gate.idle()  # blocking on the sockets is not receiving: not charged to the budget
                events = dict(poller.poll(1000 if self.security is None else self.security.bus_poll_ms(1000)))
                if self._wake_rx in events:
                    return
                # Every message is admitted by the gate (v2grt.gate): none starts while a cycle runs or once this
                # period's receive budget is spent; then the rest stay queued until the next cycle has published.
                # Control first: an e-stop must not wait behind a telemetry backlog (the ROUTER fair-queues its
                # connections, so a flooding client delays it by at most one request).
                if self.control.sock in events:
                    self.control.serve_once(timeout_ms=0, admit=gate.admit)
                if self.telemetry.sock in events and not gate.refused:
                    self.telemetry.poll_batches(max_frames=64, timeout_ms=0, admit=gate.admit)  # via _accept_batch
                if self.security is not None:
                    self.security.bus_tick(self.telemetry, self.control)
                if gate.refused:
                    gate.wait()
            except Exception as exc:  # a bug must not end the thread: telemetry and control (e-stop) stop with it
                if self.events.emit("BUS_THREAD_ERROR", logging.CRITICAL, key=type(exc).__name__,
                                    error=f"{type(exc).__name__}: {exc}",
                                    message="the bus thread caught this and goes on; report it with the traceback"):
                    log.critical("BUS_THREAD_ERROR traceback", exc_info=True)
                time.sleep(0.01)  # an error that repeats at once must not spin a core

    def _max_nodes(self, gateway_id: str) -> int | None:
        """The decoder's limit for a batch from ``gateway_id``; None (refused) for a gateway not in the roster."""
        limit = self.router.max_nodes(gateway_id)
        if limit is None:  # one line per interval for every unknown gateway together: the ids are the peer's
            self.events.emit("UNKNOWN_GATEWAY", logging.WARNING, gateway=gateway_id,
                             message="telemetry from a gateway id not in the roster; batch dropped")
        return limit

    def _accept_batch(self, batch, t_recv: int) -> None:
        """Map a batch to rows (v2grt.ingest) and write it into the fleet between cycles; WireError drops it
        (counted)."""
        routed = self.router.route(batch)
        if routed.unknown:
            self._telemetry_error("UNKNOWN_NODE", batch.gw, routed.unknown)
        if routed.foreign:
            self._telemetry_error("FOREIGN_NODE", batch.gw, routed.foreign)
        if len(routed.rows):
            with self._image_lock:
                if routed.version == self.fleet.version:  # else rows were mapped for a fleet changed since
                    ingest.apply(self.fleet, routed, batch, t_recv)

    def _telemetry_error(self, code: str, gateway_id: str, count: int) -> None:
        # keyed by gateway: route() only gets here for roster gateways, so the keys are bounded by the roster
        self.events.emit(code, logging.WARNING, key=gateway_id, gateway=gateway_id, nodes=count,
                         message="telemetry for nodes this gateway does not own" if code == "FOREIGN_NODE"
                         else "telemetry for node ids not in the roster")

    # ------------------------------------------------------------------------------ control commands
    def _handle_control(self, req: wire.ControlRequest) -> dict:
        """Runs on the bus thread; state changes are queued to the control thread's next cycle."""
        cmd, args = req.cmd, req.args
        if cmd == "status":  # with security, the allowlist and refusals go to operator keys only
            report = self.status_report()
            return report if self.security is None else self.security.status_for(report, self.control.caller)
        if cmd == "estop":
            self.dispatcher.emergency_stop()  # a bool the next kernel call reads: effective next cycle
            self.events.emit("EMERGENCY_STOP", logging.CRITICAL, key="estop", reason=args.get("reason", ""))
            # The flag is read by the next kernel call; if this lands between that call and its publish, the
            # cycle after carries it: seq + 2 is the first cycle guaranteed to be stopped.
            return {"estop": True, "effective_seq": self.seq + 2}
        if cmd == "reset":
            was = self.dispatcher.estop
            self.dispatcher.reset()
            self.events.emit("EMERGENCY_STOP_RESET", logging.WARNING, key="estop", was_latched=was,
                             reason=args.get("reason", ""))
            return {"estop": False, "was_latched": was}
        if cmd == "reload":
            return self._reload(args.get("path"))
        if cmd == "test_discharge":
            return self._start_test_discharge(args["node_id"], args["kw"], args["seconds"])
        if cmd == "telemetry_profile":
            self.telemetry_profile = args["name"]
            self.slow_n = SLOW_N_OPTIMIZED if args["name"] == "optimized" else 1
            self.events.emit("TELEMETRY_PROFILE", logging.INFO, key="profile", profile=args["name"])
            return {"telemetry_profile": args["name"]}
        if cmd == "handover":  # operator keys only: moves the leadership (docs/ha.md, planned handover)
            if self.ha is None:
                raise wire.WireError("REFUSED", "handover: this aggregator has no `ha` section: it is the only one "
                                                "of its fleet")
            from v2grt.ha import HandoverError

            try:
                return self.ha.request_handover(args.get("to"))
            except HandoverError as exc:
                raise wire.WireError("REFUSED", str(exc)) from None
        if cmd == "keys_reload":  # operator keys only (security.ServerSecurity.authorize_control)
            if self.security is None:
                raise wire.WireError("REFUSED", "keys_reload: security is not enabled in this aggregator's config")
            return self.security.keys_reload_command()
        raise wire.WireError("UNKNOWN_CMD", f"command {cmd!r} is not handled by this aggregator")

    def reload_profile(self, path=None) -> dict:
        """Validate a discharge profile and swap it in between cycles; the old one stays on error."""
        return self._reload(path)

    def _reload(self, path) -> dict:
        path = path or self.profile_path
        if path is None:
            raise wire.WireError("BAD_ARG", "reload: no discharge_profile is configured and no path was given")
        try:
            profile = DispatchProfile.from_json(path)
        except ProfileError as exc:
            self.events.emit("PROFILE_REJECTED", logging.ERROR, key="profile", error=str(exc))
            raise wire.WireError("BAD_PROFILE", f"{exc}; the previous profile stays in force") from None
        self._commands.append(lambda now_ns: self.dispatcher.set_profile(profile))
        self.events.emit("PROFILE_RELOADED", logging.INFO, key="profile", path=str(path),
                         minimum_soc=profile.minimum_soc, policy=profile.policy)
        return {"reloaded": str(path), "minimum_soc": profile.minimum_soc, "policy": profile.policy}

    def _start_test_discharge(self, node_id: str, kw: float, seconds: float) -> dict:
        fleet, result = self.fleet, self.last_result
        row = fleet.row_of.get(node_id)
        if row is None:
            raise wire.WireError("UNKNOWN_NODE", f"test_discharge: node {node_id!r} is not in the fleet")
        if result is None:
            raise wire.WireError("NOT_READY", "test_discharge: no cycle has run yet")
        reason = int(result.reasons[row])
        if reason != Reason.OK:
            raise wire.WireError("NODE_EXCLUDED", f"test_discharge: node {node_id!r} is excluded: "
                                                  f"{_REASON_NAMES[reason]}; refusing to discharge it")
        avail = float(result.available_dis_kw[row])
        if avail <= 0.0:
            raise wire.WireError("NODE_EXCLUDED", f"test_discharge: node {node_id!r} has no discharge "
                                                  f"availability now (SoC {fleet.soc[row]:.3f})")
        test = _TestDischarge(row, node_id, kw, 0, float(fleet.soc[row]))

        def begin(now_ns, test=test):
            test.until_ns = now_ns + int(seconds * 1e9)
            self._test = test

        self._commands.append(begin)
        self.events.emit("TEST_DISCHARGE", logging.INFO, key=node_id, node=node_id, kw=kw, seconds=seconds)
        return {"node_id": node_id, "kw_requested": kw, "kw_available": avail, "seconds": seconds,
                "soc_before": test.soc_before}

    def node_report(self, node_id: str) -> dict:
        fleet, row = self.fleet, self.fleet.row_of[node_id]
        r = self.last_result
        return {"node_id": node_id, "soc": float(fleet.soc[row]), "p_actual_kw": float(fleet.p_actual_kw[row]),
                "setpoint_kw": float(fleet.last_setpoint_kw[row]),
                "reason": _REASON_NAMES[r.reasons[row]] if r is not None else None,
                "telemetry_age_s": None if fleet.last_telemetry_ns[row] == NEVER_HEARD_NS
                else (time.monotonic_ns() - int(fleet.last_telemetry_ns[row])) / 1e9}

    def never_heard(self) -> int:
        """Vehicles with no valid telemetry since this aggregator started (0 kW until they report).

        Counted on demand (status requests, the bus thread), never per cycle; the count only falls
        (a heard vehicle stays heard), so once it reaches 0 it is not counted again."""
        if self._never_heard:
            self._never_heard = self.fleet.count_never_heard()
        return self._never_heard

    def to_wire_ring(self) -> tuple[np.ndarray, int]:
        """The per-cycle deadline-to-last-frame times (ns) of whichever thread sends, as a ring and the number of
        cycles sent so far (the newest at ``(count - 1) % len(ring)``)."""
        if self.sender is not None:
            return self.sender.to_wire_ns, self.sender.sent_cycles
        return self.to_wire_ns, self.to_wire_count

    def publisher_snapshot(self) -> dict:
        """Who sends the setpoints and how it goes: the status reply's `publisher` map and the metrics
        (docs/wire.md 6.1). Counts since start; read without a lock (each a whole int or float)."""
        if self.sender is not None:
            return self.sender.snapshot()
        return {"thread": False, "cycles_sent": self.to_wire_count, "frames_sent": self.frames_sent,
                "frames_dropped": self.publisher.dropped, "busy_skips": 0, "stale": 0, "refused": 0, "fenced": 0,
                "errors": 0, "last_send_ms": None, "last_to_wire_ms": self.last_to_wire_ns / 1e6}

    def status_report(self) -> dict:
        """Everything `v2g-cli --status` shows: fleet, timing, alarms, counters (plain types only)."""
        r = self.last_result
        out = {"epoch": self.epoch, "fleet_id": self.cfg.fleet_id, "service": self.dispatcher.service.name,
               "capacity_kw": self.dispatcher.capacity_kw, "vehicles": len(self.fleet), **self.status,
               "estop": self.dispatcher.estop, "telemetry_profile": self.telemetry_profile,
               "kernel": {"backend": self.dispatcher.backend, "isa": self.dispatcher.kernel_isa,
                          "threads": self.cfg.kernel.threads, "mode": self.dispatcher.kernel_mode()},
               "loop": self.stats.summary(), "events": dict(self.events.counts),
               "telemetry_errors": dict(self.telemetry.errors),  # frames dropped, by code
               "telemetry_refused_nodes": dict(self.router.refused_nodes),  # vehicles refused, by code
               "control_errors": dict(self.control.errors),  # control requests refused, by code
               "setpoints_dropped": self.publisher.dropped, "never_heard": self.never_heard(),
               "publisher": self.publisher_snapshot(),
               "receive": self.gate.snapshot()}  # the bus thread's share of the periods (v2grt.gate)
        if r is not None:
            out.update(r.summary())
            out["delivered_kw"] = float(self.fleet.p_actual_kw[: self.fleet.n_rows].sum())
        if self.meter is not None:
            out["meter"] = self.meter.counters.snapshot()
        if self._test is not None:
            out["test_discharge"] = self.node_report(self._test.node_id)
        if self.last_test is not None:
            out["last_test_discharge"] = self.last_test
        if self.alert is not None:
            out["frequency_alert"] = self.alert.state()
        if self.security is not None:
            out["security"] = self.security.snapshot()
        out["journal"] = self.journal.snapshot() if self.journal is not None else {"enabled": False}
        if self.ha is not None:
            out["ha"] = self.ha.snapshot(time.monotonic_ns())
        return _plain(out)


def _plain(obj):
    """Only msgpack-able plain types (NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
