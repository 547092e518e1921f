"""The control loop's grid of deadlines and its early wake (v2grt.loop.ControlLoop), on the real clock."""

from __future__ import annotations

import itertools
import time

from v2grt.loop import ControlLoop, CycleTimes, RealtimeConfig
from v2grt.testing import wait_until

PERIOD_NS = 200_000_000  # long enough that a cycle run on wake() cannot be taken for one of the grid


def loop_recording(starts: list[tuple[int, int]]) -> ControlLoop:
    def cycle(deadline_ns: int, woke_ns: int) -> CycleTimes:
        starts.append((deadline_ns, woke_ns))
        return CycleTimes()

    return ControlLoop(PERIOD_NS, cycle, realtime=RealtimeConfig(mlockall=False, gc_freeze=False,
                                                                sched_fifo_priority=0, switch_interval_s=0.0))


def test_a_wake_inside_an_expect_window_runs_a_cycle_at_once_and_the_grid_goes_on():
    """wake() within expect_wake's window: a cycle within a few ms (not at the next deadline), then the grid again."""
    starts: list[tuple[int, int]] = []
    loop = loop_recording(starts)
    loop.start()
    try:
        wait_until(lambda: len(starts) >= 1, 5.0, "a first cycle")
        assert loop.expect_wake(time.monotonic_ns() + 10**9, wait_s=2 * PERIOD_NS / 1e9)  # after the sleep begun
        n = len(starts)
        time.sleep(0.01)
        t_wake = time.monotonic_ns()
        loop.wake()
        wait_until(lambda: len(starts) > n, 1.0, "the woken cycle")
        woken_after_ms = (starts[n][1] - t_wake) / 1e6
        wait_until(lambda: len(starts) > n + 1, 1.0, "the next cycle of the grid")
    finally:
        loop.stop()
    assert loop.off_grid_cycles == 1
    assert woken_after_ms < 20, woken_after_ms  # a 1 ms slice, plus scheduling on a loaded machine
    deadline_before, deadline_after = starts[n - 1][0], starts[n + 1][0]
    assert deadline_after == deadline_before + PERIOD_NS  # the grid did not move
    assert starts[n][0] == deadline_before  # the woken cycle counts as the grid's previous deadline's


def test_a_wake_outside_an_expect_window_changes_nothing():
    """wake() with no expect_wake window (or after it ended): cycles stay on the grid, none runs early."""
    starts: list[tuple[int, int]] = []
    loop = loop_recording(starts)
    loop.start()
    try:
        wait_until(lambda: len(starts) >= 1, 5.0, "a first cycle")
        loop.expect_wake(time.monotonic_ns() - 1)  # a window already over
        time.sleep(0.02)
        n = len(starts)
        loop.wake()
        time.sleep(0.1)
        early = len(starts) > n and starts[n][1] - starts[n - 1][1] < PERIOD_NS // 2
        wait_until(lambda: len(starts) >= n + 2, 2.0, "two more cycles")
    finally:
        loop.stop()
    assert not early and loop.off_grid_cycles == 0
    # on the grid (a loaded machine may skip a deadline: a multiple of the period, never less)
    assert all(b[0] > a[0] and (b[0] - a[0]) % PERIOD_NS == 0 for a, b in itertools.pairwise(starts))
