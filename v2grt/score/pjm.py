"""Regulation-signal scoring: PJM's performance score (accuracy, delay, precision; docs/services.md section 7.6).

PJM Manual 12 (Balancing Operations) section 4.5.6 scores a regulating resource against its normalised
regulation signal on 10 s samples, in 5-minute windows averaged over the hour:

- **accuracy**: the largest correlation between the signal and the response shifted by a delay
  ``delta`` of 0..5 min (10 s steps), clipped at 0. Where the signal hardly moves in a window (standard
  deviation under 0.01), ``max(0, 1 - |slope(signal) - slope(response)|)`` of their least-squares lines;
- **delay**: ``|(delta* - 5 min) / 5 min|`` at the delay ``delta*`` of that largest correlation;
- **precision**: ``1 - mean(|response - signal|) / mean(|signal|)`` over the window, the mean of |signal|
  taken over the hour (the manual's "hourly average regulation signal"), clipped at 0;
- **composite**: the mean of the three; a resource qualifies at >= 0.75.

GMLC's battery_interface (``RegService.perf_score``) implements the same, with the precision normalised
by each 5-minute window's own mean |signal| instead of the hour's; both agree when the signal's level is
steady. Pure functions: arrays in, numbers out.
"""

from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path

import numpy as np

from v2grt.score.series import Series

SAMPLE_S = 10.0  # PJM scores on 10 s samples of the 2 s signal
WINDOW_S = 300.0  # 5-minute windows
MAX_DELAY_S = 300.0  # delays searched 0..5 min
PASS_SCORE = 0.75
FLAT_STD = 0.01  # below this standard deviation a window's signal counts as constant (GMLC's threshold)
FLAT_RESPONSE_STD = 1e-5  # a response this flat has no correlation with a moving signal


def held(t_events_ns: np.ndarray, values: np.ndarray, t_query_ns: np.ndarray) -> np.ndarray:
    """The newest value at or before each query time (NaN where there is none yet)."""
    idx = np.searchsorted(t_events_ns, t_query_ns, side="right") - 1
    out = np.full(len(t_query_ns), np.nan)
    ok = idx >= 0
    out[ok] = values[idx[ok]]
    return out


def window_scores(x: np.ndarray, y_ext: np.ndarray, mean_abs_signal: float, sample_s: float = SAMPLE_S,
                  max_delay_s: float = MAX_DELAY_S) -> dict:
    """Accuracy, delay and precision of one window.

    ``x``: the signal's samples in the window (n); ``y_ext``: the response from the window's first sample
    on, as far past its end as recorded (up to n + max_delay_s / sample_s samples): the delayed
    correlations need it. ``mean_abs_signal``: the hour's mean |signal| (precision's denominator).
    """
    n = len(x)
    y = y_ext[:n]
    shifts = int(round(max_delay_s / sample_s))
    if np.std(x) < FLAT_STD:
        axis = np.arange(n, dtype=np.float64)
        slope_x = np.polyfit(axis, x, 1)[0]
        slope_y = np.polyfit(axis, y, 1)[0]
        accuracy, best = max(0.0, 1.0 - abs(slope_x - slope_y)), 0
    else:
        corr = []
        for j in range(shifts + 1):
            y_j = y_ext[j:j + n]
            if len(y_j) < n or not np.isfinite(y_j).all():
                break
            corr.append(0.0 if np.std(y_j) < FLAT_RESPONSE_STD else float(np.corrcoef(x, y_j)[0, 1]))
        if not corr or max(corr) <= 0.0:
            accuracy, best = 0.0, shifts
        else:
            best = int(np.argmax(corr))
            accuracy = corr[best]
    delay = abs((best * sample_s - max_delay_s) / max_delay_s)
    precision = max(0.0, 1.0 - float(np.mean(np.abs(y - x))) / mean_abs_signal) if mean_abs_signal > 0 else None
    return {"accuracy": float(accuracy), "delay": float(delay), "precision": precision, "delay_s": best * sample_s}


def period_scores(x: np.ndarray, y: np.ndarray, sample_s: float = SAMPLE_S, window_s: float = WINDOW_S,
                  max_delay_s: float = MAX_DELAY_S, y_after: np.ndarray | None = None) -> dict:
    """PJM's scores of one settlement period (an hour) of 10 s samples: the windows' means and the composite.

    ``x``, ``y``: the signal and the response over the period (NaN: not recorded; a window with any NaN
    is skipped); ``y_after``: the response recorded after the period (up to ``max_delay_s``), for the
    last windows' delayed correlations.
    """
    n_win = int(round(window_s / sample_s))
    y_all = y if y_after is None else np.r_[y, y_after]
    finite_x = x[np.isfinite(x)]
    mean_abs = float(np.mean(np.abs(finite_x))) if finite_x.size else 0.0
    wins = []
    for k in range(len(x) // n_win):
        a = k * n_win
        xs, ys = x[a:a + n_win], y_all[a:a + n_win]
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            continue
        wins.append(window_scores(xs, y_all[a:], mean_abs, sample_s, max_delay_s))
    if not wins:
        return {"windows": 0, "accuracy": None, "delay": None, "precision": None, "composite": None, "pass": None}
    acc = float(np.mean([w["accuracy"] for w in wins]))
    dly = float(np.mean([w["delay"] for w in wins]))
    prec_vals = [w["precision"] for w in wins if w["precision"] is not None]
    prec = float(np.mean(prec_vals)) if prec_vals else None
    comp = (acc + dly + prec) / 3.0 if prec is not None else None
    return {"windows": len(wins), "accuracy": acc, "delay": dly, "precision": prec, "composite": comp,
            "pass": None if comp is None else comp >= PASS_SCORE,
            "mean_delay_s": float(np.mean([w["delay_s"] for w in wins])), "mean_abs_signal": mean_abs}


def read_signal(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A regulation signal file: CSV ``time,signal`` (a header line is skipped), time as ISO 8601 (UTC if no
    zone) or seconds since the Unix epoch, signal normalised to -1..1 (+ = discharge). Returns (t_ns, signal).

    Raises ValueError naming the file, line and value that cannot be read.
    """
    t_out, v_out = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].startswith("#"):
                continue
            try:
                v = float(row[1])
            except (IndexError, ValueError):
                if lineno == 1:
                    continue  # header
                raise ValueError(f"{path}:{lineno}: {row!r}: expected time,signal with a number in -1..1") from None
            if not -1.0 - 1e-9 <= v <= 1.0 + 1e-9:
                raise ValueError(f"{path}:{lineno}: signal={v!r}: expected a normalised value in -1..1")
            try:
                t_ns = int(round(float(row[0]) * 1e9))
            except ValueError:
                try:
                    t = _dt.datetime.fromisoformat(row[0].strip().replace("Z", "+00:00"))
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: time={row[0]!r}: expected ISO 8601 or Unix seconds") from None
                if t.tzinfo is None:
                    t = t.replace(tzinfo=_dt.timezone.utc)
                t_ns = (t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)) // _dt.timedelta(microseconds=1) * 1000
            t_out.append(t_ns)
            v_out.append(v)
    if not t_out:
        raise ValueError(f"{path}: no (time, signal) rows")
    t = np.asarray(t_out, np.int64)
    order = np.argsort(t, kind="stable")
    return t[order], np.asarray(v_out)[order]


def score_regulation(series: Series, *, signal: str | Path | tuple | None = None, capacity_kw: float | None = None,
                     settlement_period_s: float = 3600.0, delivered: str = "auto", sample_s: float = SAMPLE_S,
                     window_s: float = WINDOW_S, max_delay_s: float = MAX_DELAY_S, t0_ns: int | None = None,
                     t1_ns: int | None = None, keep_series: bool = False, **_ignored) -> dict:
    """PJM's composite score of a journal that followed a regulation signal, per settlement period (hour).

    The signal is ``signal`` (a file for :func:`read_signal`, or a ``(t_ns, values)`` pair), else the
    journal's own base schedule divided by the regulation capacity. The response is the delivered power
    minus the frequency response the aggregator ran (``service_fraction x capacity_kw``, 0 without a
    meter), divided by the regulation capacity: ``capacity_kw``, else the largest |base schedule|.
    """
    from v2grt.score.core import _delivered_source, iso

    source = _delivered_source(series, delivered)
    t_ns = series.t_ns
    base = series.base_kw
    reg_cap = float(capacity_kw) if capacity_kw is not None else float(np.nanmax(np.abs(base))) if len(base) else 0.0
    if not reg_cap > 0:
        raise ValueError("regulation capacity is 0: give capacity_kw (--capacity-kw), or a journal whose base "
                         "schedule follows the signal")
    if signal is None:
        sig_t, sig_v, sig_from = t_ns, base / reg_cap, "journal base schedule"
    elif isinstance(signal, tuple):
        sig_t, sig_v, sig_from = np.asarray(signal[0], np.int64), np.asarray(signal[1], np.float64), "arrays"
    else:
        sig_t, sig_v = read_signal(signal)
        sig_from = str(signal)
    fr = np.nan_to_num(series.service_fraction) if series.service_fraction is not None else 0.0
    resp = (series.delivered_kw(source) - fr * series.capacity_kw) / reg_cap
    step_ns = int(round(sample_s * 1e9))
    lo_ns = int(t_ns[0]) if t0_ns is None else max(int(t0_ns), int(t_ns[0]))
    hi_ns = int(t_ns[-1]) + 1 if t1_ns is None else min(int(t1_ns), int(t_ns[-1]) + 1)
    grid = np.arange(-(-lo_ns // step_ns) * step_ns, hi_ns, step_ns, dtype=np.int64)
    x = held(sig_t, sig_v, grid)
    y = held(t_ns, resp, grid)
    gap = grid - t_ns[np.maximum(np.searchsorted(t_ns, grid, side="right") - 1, 0)] > 2 * series.period_s * 1e9
    y[gap] = np.nan  # no record near this sample: not scored
    period_ns = int(round(settlement_period_s * 1e9))
    periods = []
    extra = int(round(max_delay_s / sample_s))
    for k in range(int(grid[0] // period_ns), int(grid[-1] // period_ns) + 1) if len(grid) else []:
        sel = np.flatnonzero(grid // period_ns == k)
        if not len(sel):
            continue
        a, b = sel[0], sel[-1] + 1
        sc = period_scores(x[a:b], y[a:b], sample_s, window_s, max_delay_s, y_after=y[b:b + extra])
        periods.append({"index": k, "start": iso(max(k * period_ns, lo_ns)),
                        "end": iso(min((k + 1) * period_ns, hi_ns)), "samples": int(b - a), **sc})
    scored = [p for p in periods if p["composite"] is not None]
    total_w = sum(p["windows"] for p in scored)

    def wmean(key: str):
        return sum(p[key] * p["windows"] for p in scored) / total_w if total_w else None

    comp = wmean("composite")
    out = {
        "service": "reg",
        "service_description": "regulation signal, PJM performance score (accuracy, delay, precision)",
        "source_rule": "PJM Manual 12: Balancing Operations, section 4.5.6 (performance score); as implemented by "
                       "GMLC battery_interface RegService.perf_score",
        "from": iso(lo_ns), "to": iso(hi_ns), "period_s": series.period_s, "settlement_period_s": settlement_period_s,
        "delivered_source": source, "signal_source": sig_from, "regulation_capacity_kw": reg_cap,
        "parameters": {"sample_s": sample_s, "window_s": window_s, "max_delay_s": max_delay_s,
                       "pass_score": PASS_SCORE},
        "total": {"windows": total_w, "accuracy": wmean("accuracy"), "delay": wmean("delay"),
                  "precision": wmean("precision"), "composite": comp,
                  "pass": None if comp is None else comp >= PASS_SCORE},
        "periods": periods,
    }
    if keep_series:
        out["_series"] = {"t_ns": grid, "signal": x, "response": y}
    return out


__all__ = ["MAX_DELAY_S", "PASS_SCORE", "SAMPLE_S", "WINDOW_S", "held", "period_scores", "read_signal",
           "score_regulation", "window_scores"]

