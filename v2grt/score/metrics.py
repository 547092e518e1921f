"""The scoring formulas, pure: arrays of one journal's cycle records in, numbers out (docs/services.md section 7).

Every function takes numpy arrays on one time base (the cycle records' ``t_s``, seconds, ascending) and
returns arrays or plain numbers; nothing here reads a file or a clock. Powers are kW, + = discharge into
the grid; ``r`` is a required *response* (the service's part, base schedule removed), ``d`` a delivered
power (base included) unless a name says otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from v2grt.services import ServiceCurve


def sample_durations_s(t_s: np.ndarray, period_s: float, max_gap_periods: float = 2.0) -> np.ndarray:
    """How long each record stands for, s: until the next record, at most ``max_gap_periods`` periods.

    A record holds until the next one (the journal records every cycle); a gap longer than two periods
    (a stalled loop, a stopped aggregator) is not covered by the record before it, so it counts as
    neither within tolerance nor available. The last record stands for one period.
    """
    if len(t_s) == 0:
        return np.zeros(0)
    dt = np.diff(t_s, append=t_s[-1] + period_s)
    return np.minimum(dt, max_gap_periods * period_s)


def required_fraction(curve: ServiceCurve, f_hz: np.ndarray, t_s: np.ndarray) -> np.ndarray:
    """The curve's response at each recorded frequency, fraction of capacity (+ discharge); NaN where f is NaN.

    A proportional curve is read off its points (``numpy.interp``, as the aggregator evaluates it,
    docs/services.md section 2). A latching curve (FFR) is replayed through the same
    ``TriggerResponder`` the aggregator runs, at the records' times.
    """
    f_hz = np.asarray(f_hz, np.float64)
    if curve.trigger_hz is None:
        return np.interp(f_hz, curve.f_hz, curve.fraction)  # NaN in, NaN out
    responder = curve.responder()
    out = np.empty(len(f_hz))
    for i, (f, t) in enumerate(zip(f_hz.tolist(), np.asarray(t_s, np.float64).tolist())):
        out[i] = math.nan if math.isnan(f) else responder.step(f, t)
    return out


def _sparse_table(x: np.ndarray, op) -> list[np.ndarray]:
    """Level k holds op over x[i : i + 2**k] (NaNs ignored by fmin/fmax): O(1) range queries after."""
    levels = [x]
    k = 1
    while 2 * k <= len(x):
        prev = levels[-1]
        levels.append(op(prev[:-k], prev[k:]))
        k *= 2
    return levels


def _range_query(levels: list[np.ndarray], op, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """op over x[start[i] : stop[i]] for every i (stop > start), from a sparse table."""
    width = stop - start
    k = np.floor(np.log2(np.maximum(width, 1))).astype(np.int64)
    out = np.empty(len(start))
    for level in np.unique(k):
        sel = k == level
        table = levels[level]
        a = start[sel]
        b = stop[sel] - (1 << int(level))
        out[sel] = op(table[a], table[b])
    return out


def tolerance_band(t_s: np.ndarray, required_kw: np.ndarray, window_s: float, tol_kw: np.ndarray | float):
    """(lo, hi): min and max of ``required_kw`` over ``[t - window_s, t]`` at each record, minus/plus ``tol_kw``.

    The delivered power may lag the requirement by up to ``window_s`` (the service's full-activation
    time; a lag of exactly ``window_s`` is inside, with 1 us of slack for float times), and deviate from
    it by ``tol_kw``. NaN requirements inside a window are ignored; a window
    holding none is NaN. Exact for any record spacing (a sparse table, O(n log n)).
    """
    n = len(t_s)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    start = np.searchsorted(t_s, t_s - window_s - 1e-6, side="left")
    stop = np.arange(1, n + 1)
    lo = _range_query(_sparse_table(required_kw, np.fmin), np.fmin, start, stop)
    hi = _range_query(_sparse_table(required_kw, np.fmax), np.fmax, start, stop)
    return lo - tol_kw, hi + tol_kw


def within_band(d_kw: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(judged, inside): records with a delivered value and a band, and of those, the ones inside it."""
    judged = np.isfinite(d_kw) & np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore"):
        inside = judged & (d_kw >= lo) & (d_kw <= hi)
    return judged, inside


def detect_events(t_s: np.ndarray, r_kw: np.ndarray, threshold_kw: float, merge_s: float) -> list[tuple[int, int]]:
    """Excursions of the required response: [(i0, i1), ...], records i0 <= i < i1.

    An excursion starts at the first record whose ``|r|`` reaches ``threshold_kw`` and ends at the first
    record below it again; two excursions less than ``merge_s`` apart are one (a frequency hovering at
    the threshold is one event, not many). NaN requirements count as below.
    """
    with np.errstate(invalid="ignore"):
        active = np.abs(r_kw) >= threshold_kw
    if not active.any():
        return []
    edges = np.diff(np.r_[0, active.astype(np.int8), 0])
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    runs: list[list[int]] = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        if runs and t_s[a] - t_s[runs[-1][1] - 1] < merge_s:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return [(a, b) for a, b in runs]


def event_timing(t_s: np.ndarray, r_kw: np.ndarray, d_resp_kw: np.ndarray, i0: int, i1: int, window_s: float,
                 start_share: float, full_share: float) -> dict:
    """Response start and full-delivery times of one excursion [i0, i1), s after its first record.

    ``d_resp_kw`` is the delivered response (delivered minus base schedule). The step asked for is
    ``dR = R - r_before``: ``R`` the largest required response (by magnitude) within ``window_s`` of the
    start, ``r_before`` the requirement of the record before. Progress at each record is the delivered
    change since the record before, in dR's direction, over ``|dR|``. The response **starts** at the
    first record whose progress reaches ``start_share`` and is **full** at the first whose progress
    reaches ``full_share``; None when it never does before the excursion ends.
    """
    t0 = t_s[i0]
    w1 = max(i0 + 1, int(np.searchsorted(t_s, t0 + window_s, side="right")))
    seg = r_kw[i0:min(w1, i1)]
    k = int(np.nanargmax(np.abs(seg)))
    big_r = float(seg[k])
    r_before = float(r_kw[i0 - 1]) if i0 > 0 and np.isfinite(r_kw[i0 - 1]) else 0.0
    d_before = float(d_resp_kw[i0 - 1]) if i0 > 0 and np.isfinite(d_resp_kw[i0 - 1]) else 0.0
    d_r = big_r - r_before
    out = {"required_kw": big_r, "step_kw": d_r, "start_s": None, "full_s": None, "peak_progress": None}
    if d_r == 0.0:
        return out
    progress = np.sign(d_r) * (d_resp_kw[i0:i1] - d_before) / abs(d_r)
    finite = np.isfinite(progress)
    if finite.any():
        out["peak_progress"] = float(np.nanmax(progress))
    for key, share in (("start_s", start_share), ("full_s", full_share)):
        hit = np.flatnonzero(finite & (progress >= share))
        if len(hit):
            out[key] = float(t_s[i0 + hit[0]] - t0)
    return out


def response_energy_kwh(r_kw: np.ndarray, d_resp_kw: np.ndarray, dt_s: np.ndarray) -> dict:
    """Energy required and delivered in the required direction, kWh, over the records where both are known.

    required = sum |r| dt; delivered = sum sign(r) x d_resp x dt (a response in the wrong direction
    counts against it); ratio = delivered / required. Split by direction: discharge (r > 0) and
    charge (r < 0).
    """
    ok = np.isfinite(r_kw) & np.isfinite(d_resp_kw) & (r_kw != 0.0)
    sign = np.sign(np.where(ok, r_kw, 0.0))
    req = np.abs(np.where(ok, r_kw, 0.0)) * dt_s / 3600.0
    got = sign * np.where(ok, d_resp_kw, 0.0) * dt_s / 3600.0
    out = {}
    for name, sel in (("total", ok), ("discharge", ok & (sign > 0)), ("charge", ok & (sign < 0))):
        e_req, e_got = float(req[sel].sum()), float(got[sel].sum())
        out[name] = {"required_kwh": e_req, "delivered_kwh": e_got, "ratio": e_got / e_req if e_req > 0 else None}
    return out


def available(curve: ServiceCurve, capacity_kw: np.ndarray, base_kw: np.ndarray, available_dis_kw: np.ndarray,
              available_chg_kw: np.ndarray, published: np.ndarray, estop: np.ndarray,
              f_hz: np.ndarray) -> np.ndarray:
    """Per record: could the fleet deliver the contracted response in every direction the curve asks for?

    True when the cycle published, no e-stop was latched, the frequency was known, and the fleet's
    available discharge covers ``base + capacity x max(fraction)`` (if the curve ever discharges) and its
    available charge covers ``capacity x |min(fraction)| - base`` (if it ever charges). 1 W of slack for
    float sums.
    """
    f_max = max(float(curve.fraction.max()), 0.0)
    f_min = min(float(curve.fraction.min()), 0.0)
    ok = (published != 0) & (estop == 0) & np.isfinite(f_hz)
    with np.errstate(invalid="ignore"):
        if f_max > 0:
            ok &= available_dis_kw >= np.maximum(base_kw + capacity_kw * f_max, 0.0) - 1e-3
        if f_min < 0:
            ok &= available_chg_kw >= np.maximum(capacity_kw * -f_min - base_kw, 0.0) - 1e-3
    return ok


def floor_episodes(node: np.ndarray, t_s: np.ndarray, breaching: np.ndarray, t_end_s,
                   open_: dict | None = None) -> tuple[list[tuple[object, float, float]], dict]:
    """Episodes of one vehicle sample stream (changes only, time-ordered): [(node, t_start, t_end), ...].

    The samples forward-fill (docs/journal.md): a vehicle is breaching from a sample with
    ``breaching`` true until its next sample without. ``open_`` carries episodes still running from a
    previous batch ({node: t_start}); pass the returned dict on with the next batch, and ``t_end_s``
    closes what is still open after the last batch (call with empty arrays).
    """
    open_ = {} if open_ is None else open_
    done: list[tuple[object, float, float]] = []
    if len(node):
        # a vehicle's samples after it starts breaching (here or in an earlier batch) may close its episode
        watch = list(open_) + list(node[breaching])
        cand = np.isin(node, np.asarray(watch, dtype=node.dtype)) if watch else breaching
        for i in np.flatnonzero(cand).tolist():
            n, b = node[i].item() if hasattr(node[i], "item") else node[i], bool(breaching[i])
            t = t_s[i].item()
            if b and n not in open_:
                open_[n] = t
            elif not b and n in open_:
                done.append((n, open_.pop(n), t))
    else:
        done.extend((n, t0, t_end_s) for n, t0 in open_.items())
        open_ = {}
    return done, open_
