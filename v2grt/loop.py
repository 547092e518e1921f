"""The fixed-period control loop: absolute deadlines on CLOCK_MONOTONIC, best-effort real-time setup,
and per-cycle timing in preallocated rings.

The loop owns one thread. It sleeps with clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) to the next
point of a fixed grid (start + k * period), so it never drifts: a late wake-up or an overrun never
moves the grid, it only skips the periods it ran over (counted as missed deadlines).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger("v2grt.loop")

CLOCK_MONOTONIC = 1  # <time.h>; time.monotonic_ns() reads the same clock on Linux
TIMER_ABSTIME = 1
#: Inside an expect_wake window the loop sleeps at most this long at a time, so wake() takes effect within it.
WAKE_SLICE_NS = 1_000_000
MCL_CURRENT, MCL_FUTURE = 1, 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_clock_nanosleep = _libc.clock_nanosleep
_clock_nanosleep.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Timespec), ctypes.c_void_p]
_clock_nanosleep.restype = ctypes.c_int


class AbsoluteSleeper:
    """Sleep until an absolute CLOCK_MONOTONIC time, with no allocation per call.

    ctypes releases the GIL for the call, so other threads run while the loop sleeps; on waking the
    loop needs the GIL back, which is why the real-time setup lowers sys.setswitchinterval.
    """

    def __init__(self):
        self._ts = _Timespec()
        self._ref = ctypes.byref(self._ts)

    def sleep_until(self, deadline_ns: int) -> None:
        self._ts.tv_sec = deadline_ns // 1_000_000_000
        self._ts.tv_nsec = deadline_ns % 1_000_000_000
        while True:
            rc = _clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, self._ref, None)
            if rc != errno.EINTR:  # a signal handler ran: sleep on to the same absolute deadline
                break
        if rc:
            raise OSError(rc, f"clock_nanosleep: {os.strerror(rc)}")


# ----------------------------------------------------------------------------- real-time setup
@dataclasses.dataclass
class RealtimeConfig:
    """Best-effort real-time knobs; each is tried, and reported granted or why not."""

    cpu_affinity: list[int] | None = None  # CPUs for the control thread; None leaves it as is
    sched_fifo_priority: int = 0  # 1..99 to ask for SCHED_FIFO; 0 stays SCHED_OTHER
    mlockall: bool = True  # lock memory so a page fault never stalls a cycle
    gc_freeze: bool = True  # gc.freeze() + gc.disable() once warm: no collector pauses in steady state
    switch_interval_s: float = 0.0005  # GIL hand-over interval (CPython default 5 ms)
    warmup_cycles: int = 20  # cycles before gc is frozen (imports and first allocations settle)


@dataclasses.dataclass
class SetupStep:
    step: str
    granted: bool
    detail: str


def apply_realtime(cfg: RealtimeConfig) -> list[SetupStep]:
    """Apply the process- and thread-wide knobs from the calling (control) thread; never raises."""
    steps: list[SetupStep] = []
    tid = threading.get_native_id()
    if cfg.cpu_affinity:
        try:
            os.sched_setaffinity(tid, cfg.cpu_affinity)
            steps.append(SetupStep("cpu_affinity", True, f"control thread on CPUs {sorted(os.sched_getaffinity(tid))}"))
        except (OSError, ValueError) as exc:
            steps.append(SetupStep("cpu_affinity", False, f"{cfg.cpu_affinity}: {exc}"))
    else:
        steps.append(SetupStep("cpu_affinity", False, "not configured (realtime.cpu_affinity)"))
    if cfg.sched_fifo_priority:
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(cfg.sched_fifo_priority))
            steps.append(SetupStep("sched_fifo", True, f"SCHED_FIFO priority {cfg.sched_fifo_priority}"))
        except (OSError, ValueError) as exc:
            steps.append(SetupStep("sched_fifo", False, f"priority {cfg.sched_fifo_priority}: {exc} "
                                   "(needs CAP_SYS_NICE or LimitRTPRIO in the systemd unit)"))
    else:
        steps.append(SetupStep("sched_fifo", False, "not configured (realtime.sched_fifo_priority)"))
    if cfg.mlockall:
        rc = _libc.mlockall(MCL_CURRENT | MCL_FUTURE)
        if rc == 0:
            steps.append(SetupStep("mlockall", True, "current and future pages locked"))
        else:
            err = ctypes.get_errno()
            steps.append(SetupStep("mlockall", False, f"{os.strerror(err)} (needs CAP_IPC_LOCK or LimitMEMLOCK)"))
    else:
        steps.append(SetupStep("mlockall", False, "disabled in config"))
    if cfg.switch_interval_s:
        sys.setswitchinterval(cfg.switch_interval_s)
        steps.append(SetupStep("switch_interval", True, f"{sys.getswitchinterval() * 1e3:.2f} ms"))
    steps.append(SetupStep("gc_freeze", cfg.gc_freeze,
                           f"after {cfg.warmup_cycles} cycles" if cfg.gc_freeze else "disabled in config"))
    return steps


def set_process_fifo(priority: int) -> list[SetupStep]:
    """SCHED_FIFO at `priority` for every thread this process has now (its own, libzmq's I/O threads, the log
    writer), by /proc/self/task; never raises. For processes with no control thread of their own to protect
    (a protocol gateway, a simulator standing for devices with CPUs of their own), where one priority for all
    keeps a thread from waiting for the GIL behind a lower-priority thread that the scheduler put aside.
    Threads and processes started afterwards inherit it (0: every thread back to SCHED_OTHER)."""
    steps = []
    for task in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            name = open(f"/proc/self/task/{task}/comm").read().strip()
        except OSError:
            continue  # the thread ended meanwhile
        steps.append(set_thread_fifo(int(task), priority, f"{name}[{task}]"))
    return steps


def io_priority(control_priority: int) -> int:
    """The SCHED_FIFO priority of the input and bus threads: just below the control thread's (at least 1),
    so fresh inputs are read ahead of every SCHED_OTHER thread but never preempt a cycle."""
    return max(1, control_priority - 1)


def set_thread_fifo(native_id: int, priority: int, name: str) -> SetupStep:
    """SCHED_FIFO at `priority` for one thread of this process, by its native id (Linux: a thread id is
    a valid pid for sched_setscheduler); never raises. Returns the step, granted or why not.
    `priority` 0: back to SCHED_OTHER."""
    step = f"sched_fifo:{name}"
    try:
        policy = os.SCHED_FIFO if priority else os.SCHED_OTHER
        os.sched_setscheduler(native_id, policy, os.sched_param(priority))
        return SetupStep(step, True, f"SCHED_FIFO priority {priority}")
    except (OSError, ValueError) as exc:
        return SetupStep(step, False, f"priority {priority}: {exc} (needs CAP_SYS_NICE or LimitRTPRIO)")


# ------------------------------------------------------------------------------- cycle statistics
METRICS = ("lateness", "input_age", "inputs", "kernel", "publish", "total")


class CycleStats:
    """Per-cycle timings (ns) in preallocated rings of the last `size` cycles, and counters.

    record() writes a few ints into numpy arrays: no allocation in the cycle. Percentiles are
    computed on demand (status, metrics, benchmarks), off the cycle path.
    """

    def __init__(self, size: int = 1 << 16):
        self.size = size
        self.rings = {m: np.zeros(size, np.int64) for m in METRICS}
        self.cycles = 0
        self.missed_deadlines = 0  # periods skipped because a cycle ran past the next deadline
        self.budget_overruns = 0  # cycles whose total exceeded the budget
        self.errors = 0  # cycles that raised
        self.last_total_ns = 0

    def record(self, lateness_ns, input_age_ns, inputs_ns, kernel_ns, publish_ns, total_ns, budget_ns) -> None:
        k = self.cycles % self.size
        r = self.rings
        r["lateness"][k] = lateness_ns
        r["input_age"][k] = input_age_ns
        r["inputs"][k] = inputs_ns
        r["kernel"][k] = kernel_ns
        r["publish"][k] = publish_ns
        r["total"][k] = total_ns
        self.cycles += 1
        self.last_total_ns = total_ns
        if total_ns > budget_ns:
            self.budget_overruns += 1

    def samples(self, metric: str) -> np.ndarray:
        """The recorded values of one metric (ns), oldest first within the ring."""
        n = min(self.cycles, self.size)
        ring = self.rings[metric]
        if self.cycles <= self.size:
            return ring[:n].copy()
        k = self.cycles % self.size
        return np.concatenate([ring[k:], ring[:k]])

    def percentiles(self, metric: str) -> dict[str, float]:
        """p50/p99/p99.9/max of a metric, in ms."""
        a = self.samples(metric)
        if a.size == 0:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0}
        p50, p99, p999 = np.percentile(a, [50, 99, 99.9]) / 1e6
        return {"p50_ms": float(p50), "p99_ms": float(p99), "p999_ms": float(p999), "max_ms": float(a.max() / 1e6)}

    def summary(self) -> dict:
        return {
            "cycles": self.cycles,
            "missed_deadlines": self.missed_deadlines,
            "budget_overruns": self.budget_overruns,
            "errors": self.errors,
            **{m: self.percentiles(m) for m in METRICS},
        }


# ----------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class CycleTimes:
    """What one cycle reports back to the loop (ns)."""

    input_age_ns: int = 0
    inputs_ns: int = 0
    kernel_ns: int = 0
    publish_ns: int = 0


class ControlLoop:
    """Run cycle(deadline_ns, woke_ns) -> CycleTimes every period_ns on its own thread.

    The grid of deadlines is start + k * period_ns. A cycle that raises is logged with its traceback
    and counted; after max_consecutive_errors in a row the loop stops and `failed` is set, so the
    service exits and systemd restarts it (gateways fall back to 0 kW when setpoints expire).
    """

    def __init__(self, period_ns: int, cycle: Callable[[int, int], CycleTimes], *, budget_ns: int | None = None,
                 realtime: RealtimeConfig | None = None, stats: CycleStats | None = None,
                 max_consecutive_errors: int = 3, name: str = "v2grt-control",
                 on_setup: Callable[[list[SetupStep]], None] | None = None):
        if not (1_000_000 <= period_ns <= 10_000_000_000):
            raise ValueError(f"period_ns={period_ns}: expected 1 ms..10 s")
        self.period_ns = int(period_ns)
        self.budget_ns = int(budget_ns or period_ns)
        self.cycle = cycle
        self.realtime = realtime or RealtimeConfig()
        self.stats = stats or CycleStats()
        self.max_consecutive_errors = max_consecutive_errors
        self.setup_report: list[SetupStep] = []
        self.failed: BaseException | None = None
        self._on_setup = on_setup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.started = threading.Event()
        self._expect_until_ns = 0  # monotonic: until then the loop sleeps in WAKE_SLICE_NS slices (expect_wake)
        self._woken = False
        self._slicing = threading.Event()  # set once a sleep inside the expect_wake window is sliced
        self.off_grid_cycles = 0  # cycles run at once on wake(), between two deadlines of the grid

    def expect_wake(self, until_ns: int, wait_s: float = 0.0) -> bool:
        """From now until ``until_ns`` (monotonic) sleep in slices of WAKE_SLICE_NS, so that ``wake()`` runs a cycle
        within a slice instead of at the next deadline. Any thread. For a planned handover of leadership (docs/ha.md):
        the new leader publishes at once instead of up to a period later; clock_nanosleep cannot be interrupted
        without a signal, and slicing costs ~1,000 short wake-ups a second only inside the window.

        A sleep already begun runs to its deadline: wait up to ``wait_s`` (a period covers it) for the loop to be
        sleeping in slices; True once it is (wake() then takes effect within a slice)."""
        self._slicing.clear()
        self._expect_until_ns = until_ns
        return self._slicing.wait(wait_s) if wait_s > 0 else self._slicing.is_set()

    def wake(self) -> None:
        """Run one cycle now, off the grid, if the loop is inside an ``expect_wake`` window; else nothing. Any thread.
        The grid goes on unchanged after it (the next deadline may then be less than a period away)."""
        self._woken = True

    def _sleep(self, sleeper: AbsoluteSleeper, deadline_ns: int) -> bool:
        """Sleep to ``deadline_ns``; True if ``wake()`` cut the sleep short inside an expect_wake window."""
        while True:
            now = time.monotonic_ns()
            if now >= self._expect_until_ns or now >= deadline_ns:
                sleeper.sleep_until(deadline_ns)
                return False
            self._slicing.set()
            sleeper.sleep_until(min(deadline_ns, now + WAKE_SLICE_NS, self._expect_until_ns))
            if self._woken:
                return True

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the loop to stop after the current cycle and join it."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the loop thread ends (True) or the timeout passes (False)."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        self.setup_report = apply_realtime(self.realtime)
        if self._on_setup:
            self._on_setup(self.setup_report)
        sleeper = AbsoluteSleeper()
        stats, period, budget = self.stats, self.period_ns, self.budget_ns
        gc_frozen = not self.realtime.gc_freeze
        consecutive_errors = 0
        deadline = (time.monotonic_ns() // period + 1) * period  # on the period grid
        self.started.set()
        try:
            while not self._stop.is_set():
                off_grid = self._sleep(sleeper, deadline)
                self._woken = False  # a wake() outside a window, or this one: spent
                woke = time.monotonic_ns()
                # an off-grid cycle belongs to the grid's previous deadline (the receive gate's next one is `deadline`)
                due = deadline - period if off_grid else deadline
                self.off_grid_cycles += off_grid
                try:
                    t = self.cycle(due, woke)
                    consecutive_errors = 0
                except Exception as exc:  # the loop keeps its deadlines; repeated failure stops it
                    stats.errors += 1
                    consecutive_errors += 1
                    log.exception("CYCLE_ERROR cycle %d raised (%d in a row)", stats.cycles, consecutive_errors)
                    if consecutive_errors >= self.max_consecutive_errors:
                        self.failed = exc
                        break
                    t = CycleTimes()
                end = time.monotonic_ns()
                stats.record(0 if off_grid else woke - deadline, t.input_age_ns, t.inputs_ns, t.kernel_ns,
                             t.publish_ns, end - woke, budget)
                if not off_grid:
                    deadline += period
                if end > deadline:  # ran past the next deadline: skip whole periods, stay on the grid
                    missed = (end - deadline) // period + 1
                    stats.missed_deadlines += missed
                    deadline += missed * period
                if not gc_frozen and stats.cycles >= self.realtime.warmup_cycles:
                    gc.collect()
                    gc.freeze()  # everything alive now is never scanned again
                    gc.disable()
                    gc_frozen = True
        finally:
            if gc_frozen and self.realtime.gc_freeze:
                gc.enable()
                gc.unfreeze()
