"""The receive gate: the control thread's cycle goes first on the GIL, and the bus thread gets a share of each period.

The bus thread decodes in Python on the control thread's interpreter, so every message it decodes while
a cycle runs is GIL time the cycle waits for (issue 10: with each message already bounded to ~1 ms, a
wire flood at 8,000 messages/s still cost 23-45 missed deadlines and setpoint gaps of 403-517 ms). The
gate takes turns instead of contending:

- **closed around the cycle**: from ``guard_ns`` before each deadline until the cycle has published,
  the bus thread starts no message (it waits on an Event, GIL released), so the cycle contends with at
  most the one message started before the gate closed;
- **a budget per period**: after each cycle the bus thread may work ``budget_fraction`` of a period
  (its own CPU time, measured per message: time it waits for the GIL held by other threads, such as
  the Modbus input threads, is not its work); then it waits for the next cycle's end. Beyond the budget
  messages wait in ZeroMQ's queues and senders see backpressure. The budget also bounds the duty
  cycle of a SCHED_FIFO bus thread, which flat out could trip the kernel's RT throttling
  (sched_rt_runtime_us) and throttle the control thread with it.

The bus thread calls ``admit()`` before each message and ``idle()`` before it blocks on its sockets;
when ``admit()`` says no it calls ``wait()``. The control thread calls ``cycle_done()`` at the end of
each cycle. ``release()`` (the aggregator stopping) opens the gate for good. If the control thread
stops calling ``cycle_done()`` without it (a loop that failed, or is stuck), ``wait()`` gives up after
``MAX_WAIT_NS`` and opens one period itself: the bus never stops for good.
"""

from __future__ import annotations

import threading
import time

#: The gate closes this long before each deadline (a message started just before takes ~0.2-1.3 ms;
#: docs/benchmarks.md, "Receive path"), capped at a tenth of the period.
GUARD_NS = 2_000_000
#: The longest the bus thread waits for a cycle to publish before it opens a window itself: long enough
#: that a slow cycle on a loaded host is never mistaken for a dead loop (the gate then fails open in the
#: middle of it), short enough that control requests are still answered within ~1 s if the loop died.
MAX_WAIT_NS = 1_000_000_000


class ReceiveGate:
    """Turns on the GIL between the control thread (cycle_done) and the bus thread (admit, idle, wait)."""

    def __init__(self, period_ns: int, budget_fraction: float, *, guard_ns: int = GUARD_NS):
        if not 0.0 < budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction={budget_fraction}: expected a fraction of the period in (0, 1]")
        self.period_ns = int(period_ns)
        self.budget_fraction = float(budget_fraction)
        self.budget_ns = int(budget_fraction * period_ns)
        self.guard_ns = min(int(guard_ns), self.period_ns // 10)
        self.max_wait_ns = max(MAX_WAIT_NS, 2 * self.period_ns)
        self._released = False
        self._done = threading.Event()
        self._window = 0  # windows opened: bumped by cycle_done (control thread), read by the bus thread
        # Until the first cycle: open, so a bus thread started before the loop is not held.
        self._open_until_ns = time.monotonic_ns() + 2 * self.period_ns
        # bus thread only
        self._used_ns = 0
        self._used_window = 0
        self._busy_since: int | None = None
        self._refused_window = -1
        #: True when the last admit() said no: the bus thread then calls wait().
        self.refused = False
        self._refused_for_budget = False
        #: Counters (read by status and metrics from any thread): windows in which the budget ran out,
        #: seconds the bus thread waited because of it, waits for a cycle, and time decoding in all.
        self.exhausted = 0
        self.throttled_ns = 0
        self.cycle_waits = 0
        self.busy_ns = 0
        self.windows = 0
        #: The largest time decoding in one window (ns) since start: at most budget_ns + one message.
        self.max_window_busy_ns = 0

    # ------------------------------------------------------------------ control thread
    def cycle_done(self, deadline_ns: int, now_ns: int) -> None:
        """The cycle of ``deadline_ns`` has published: open a window until ``guard_ns`` before the next one."""
        period = self.period_ns
        next_deadline = deadline_ns + period
        if now_ns >= next_deadline:  # overran: the loop skips to the next deadline still ahead
            next_deadline += ((now_ns - next_deadline) // period + 1) * period
        self._open_until_ns = next_deadline - self.guard_ns
        self._window += 1
        self._done.set()

    def release(self) -> None:
        """Open the gate for good, budget included (the aggregator is stopping; any thread)."""
        self._released = True
        self._window += 1
        self._done.set()

    # ------------------------------------------------------------------ bus thread
    def admit(self) -> bool:
        """May the bus thread take one more message now? Charges the CPU time since the last admit to the budget."""
        now = time.monotonic_ns()
        self._charge(time.thread_time_ns())
        if (now >= self._open_until_ns or self._used_ns >= self.budget_ns) and not self._released:
            self.refused = True
            self._refused_window = self._window
            self._refused_for_budget = self._used_ns >= self.budget_ns
            return False
        self.refused = False
        self._busy_since = time.thread_time_ns()
        return True

    def idle(self) -> None:
        """The bus thread stops working (it will block on its sockets): the CPU time since admit is charged."""
        self._charge(time.thread_time_ns())

    def wait(self) -> None:
        """Block (GIL released) until the next cycle has published, or ``max_wait_ns``; then a new window."""
        window = self._refused_window
        t0 = time.monotonic_ns()
        self._done.clear()
        if self._window == window:  # else a cycle ended since admit() refused: its window is open
            if not self._done.wait(self.max_wait_ns / 1e9):
                # the control thread did not end a cycle in two periods (stopping, or stuck): fail open
                self._open_until_ns = time.monotonic_ns() + self.period_ns
                self._used_window = -1
        self.refused = False
        waited = time.monotonic_ns() - t0
        if self._refused_for_budget:
            self.throttled_ns += waited
        else:
            self.cycle_waits += 1

    def _charge(self, cpu_ns: int) -> None:
        if self._busy_since is not None:
            spent = cpu_ns - self._busy_since
            self._busy_since = None
            self.busy_ns += spent
            self._used_ns += spent
            if self._used_ns > self.max_window_busy_ns:
                self.max_window_busy_ns = self._used_ns
        if self._used_window != self._window:  # a new window: a fresh budget
            if self._used_ns >= self.budget_ns:
                self.exhausted += 1
            self._used_window = self._window
            self._used_ns = 0
            self.windows += 1

    def snapshot(self) -> dict:
        """Plain counters for the status reply (docs/wire.md 6.1, key ``receive``)."""
        return {"budget": self.budget_fraction, "budget_ms": self.budget_ns / 1e6,
                "busy_s": self.busy_ns / 1e9, "budget_exhausted": self.exhausted,
                "throttled_s": self.throttled_ns / 1e9, "cycle_waits": self.cycle_waits,
                "max_window_busy_ms": self.max_window_busy_ns / 1e6}
