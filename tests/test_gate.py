"""The receive gate alone: windows opened by cycles, the budget per window, waiting, release, counters."""

from __future__ import annotations

import threading
import time

import pytest

from v2grt.gate import ReceiveGate

PERIOD_NS = 100_000_000


def burn_cpu(ns: int) -> None:
    """Spend ``ns`` of this thread's CPU time (the gate charges CPU time, not wall time)."""
    end = time.thread_time_ns() + ns
    while time.thread_time_ns() < end:
        pass


def open_gate(gate: ReceiveGate) -> int:
    """A cycle whose deadline was just now has published: the window runs until the next deadline's guard."""
    deadline = time.monotonic_ns()
    gate.cycle_done(deadline, deadline + 1_000_000)
    return deadline


def test_the_budget_runs_out_within_a_window_and_a_cycle_renews_it():
    """After budget_fraction of a period of CPU the gate refuses until the next cycle, which opens a fresh budget."""
    gate = ReceiveGate(1_000_000_000, 0.005)  # 5 ms of a 1 s period: the window outlasts a slow CI's burn
    open_gate(gate)
    admitted = 0
    while gate.admit():
        admitted += 1
        burn_cpu(1_000_000)
    assert 5 <= admitted <= 6 and gate.refused
    assert gate.max_window_busy_ns >= 5_000_000
    open_gate(gate)
    assert gate.admit()
    gate.idle()
    assert gate.exhausted == 1 and gate.busy_ns >= 5_000_000


def test_no_message_is_admitted_within_the_guard_before_a_deadline():
    """The window closes guard_ns before the next deadline, whatever budget is left."""
    gate = ReceiveGate(PERIOD_NS, 1.0, guard_ns=2_000_000)
    now = time.monotonic_ns()
    gate.cycle_done(now - PERIOD_NS + 1_000_000, now)  # the next deadline is 1 ms away: inside the guard
    assert not gate.admit() and gate.refused


def test_a_late_cycle_opens_the_window_until_the_next_deadline_still_ahead():
    """A cycle that overran its next deadline opens the window to the one after (the loop skips periods)."""
    gate = ReceiveGate(PERIOD_NS, 1.0)
    now = time.monotonic_ns()
    gate.cycle_done(now - 150_000_000, now)  # deadline 150 ms ago: the next one still ahead is in 50 ms
    assert gate.admit()
    assert gate._open_until_ns == now + 50_000_000 - gate.guard_ns


def test_wait_returns_when_the_next_cycle_publishes():
    """A refused bus thread waits (GIL released) until cycle_done from another thread, then it is admitted."""
    gate = ReceiveGate(PERIOD_NS, 0.01)
    open_gate(gate)
    while gate.admit():
        burn_cpu(500_000)
    timer = threading.Timer(0.05, open_gate, args=(gate,))
    timer.start()
    t0 = time.monotonic()
    gate.wait()
    waited_s = time.monotonic() - t0
    timer.join()
    assert 0.03 < waited_s < 0.9
    assert gate.admit() and gate.throttled_ns > 0


def test_release_opens_the_gate_for_good():
    """After release() (the aggregator stopping) every message is admitted and wait() does not block."""
    gate = ReceiveGate(PERIOD_NS, 0.05)
    open_gate(gate)
    while gate.admit():
        burn_cpu(1_000_000)
    gate.release()
    t0 = time.monotonic()
    gate.wait()
    assert time.monotonic() - t0 < 0.1
    assert all(gate.admit() for _ in range(100))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_budget_outside_0_to_1_is_refused(fraction):
    """The budget is a fraction of the period in (0, 1]; anything else is an error naming the value."""
    with pytest.raises(ValueError, match=f"budget_fraction={fraction}"):
        ReceiveGate(PERIOD_NS, fraction)
