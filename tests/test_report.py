"""The demo report's per-protocol numbers (v2grt.report): pure functions over recorded series."""

from __future__ import annotations

import numpy as np
import pytest

from v2grt import report

MS = 1_000_000  # ns


def log_of(values_kw: list[list[float]], applied, period_ms: int = 100) -> report.SetpointLog:
    """Messages every ``period_ms`` from t = 1000 ms, one column per node ``n0``, ``n1``, ..."""
    values = np.array(values_kw, dtype=float)
    pub = (1000 + period_ms * np.arange(len(values))) * MS
    return report.SetpointLog(pub.astype(np.int64), values, {f"n{k}": k for k in range(values.shape[1])},
                              [(node, int(t_ms * MS), kw) for node, t_ms, kw in applied])


def test_latency_runs_from_the_first_publish_of_the_value_applied():
    """A device applying 11 kW 70 ms after the message that first asked for it (and repeated it) times 70 ms."""
    log = log_of([[0.0], [0.0], [11.0], [11.0], [11.0]], [("n0", 1270, 11.0)])
    ms, unmatched = report.publish_to_applied_ms(log)
    assert ms.tolist() == pytest.approx([70.0]) and unmatched == 0


def test_refreshes_and_small_moves_are_not_timed():
    """The same value applied again (a gateway's refresh) and a move under 1 kW are no moves; a big one is."""
    log = log_of([[0.0], [5.0], [5.0], [5.4], [5.4], [9.0]],
                 [("n0", 1130, 5.0), ("n0", 1240, 5.0), ("n0", 1330, 5.4), ("n0", 1520, 9.0)])
    ms, unmatched = report.publish_to_applied_ms(log)
    assert ms.tolist() == pytest.approx([30.0, 20.0]) and unmatched == 0


def test_a_value_never_published_is_counted_unmatched_not_timed():
    """A device applying what no message asked for (its gateway clamped it to the EV's limit) is unmatched."""
    log = log_of([[0.0], [22.0], [22.0]], [("n0", 1150, 11.0)])
    ms, unmatched = report.publish_to_applied_ms(log)
    assert ms.size == 0 and unmatched == 1


def test_moves_outside_the_window_count_as_history_only():
    """Applies before ``since_ns`` are not timed but still set what the device held, so a later refresh is no move."""
    log = log_of([[0.0], [11.0], [11.0], [11.0], [11.0]], [("n0", 1150, 11.0), ("n0", 1450, 11.0)])
    ms, _ = report.publish_to_applied_ms(log, since_ns=1300 * MS)
    assert ms.size == 0
    ms, _ = report.publish_to_applied_ms(log)
    assert ms.tolist() == pytest.approx([50.0])


def test_a_value_asked_for_since_before_the_first_message_is_not_timed():
    """When every message heard already asked for the value, its first publish is unknown: unmatched."""
    log = log_of([[7.0], [7.0]], [("n0", 1150, 7.0)])
    ms, unmatched = report.publish_to_applied_ms(log)
    assert ms.size == 0 and unmatched == 1


def test_percentiles_of_no_samples_are_none():
    """An empty sample has no percentiles (None, not NaN, so report.json stays valid JSON)."""
    assert report.percentiles_ms(np.zeros(0)) == {"p50": None, "p99": None, "max": None, "samples": 0}
