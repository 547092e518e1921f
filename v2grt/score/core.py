"""score_series (pure: a Series in, a JSON-ready dict out) and score_journal (reads the directory first).

Each number's formula and the grid-code rule it comes from are in docs/services.md section 7.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np

from v2grt.score import metrics
from v2grt.score.series import Series
from v2grt.services import ServiceCurve, ServiceError, get_service

#: Share of the contracted capacity delivered power may deviate from the envelope (as the demo report, GB DC 3 %).
DEFAULT_TOLERANCE = 0.03
#: Lag the envelope allows when a service states no full-activation time, s (the demo report's convention).
DEFAULT_WINDOW_S = 1.0
#: An excursion: the required response reaches this share of the contracted capacity.
DEFAULT_EVENT_THRESHOLD = 0.10
#: Excursions closer than this are one, s.
DEFAULT_MERGE_S = 1.0
#: Response "started" at this share of the step asked for, "full" at this share.
DEFAULT_START_SHARE = 0.10
DEFAULT_FULL_SHARE = 0.95
#: An episode at or below the SoC floor while discharging is a breach when it lasts longer than this, s:
#: the one setpoint round trip plus one telemetry interval in which the aggregator has already cut the
#: vehicle to 0 kW but the power it reports is still the old one.
DEFAULT_FLOOR_GRACE_S = 2.0
#: Events listed one by one in the JSON (all are counted).
MAX_LISTED = 1000

_REG_NAMES = ("reg", "regulation", "pjm_reg")


def iso(t_ns: int) -> str:
    """UTC ISO 8601 with milliseconds and a Z."""
    t = _dt.datetime.fromtimestamp(t_ns // 10**9, _dt.timezone.utc).replace(tzinfo=None)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{(t_ns % 10**9) // 10**6:03d}Z"


def parse_duration_s(text: str | float | int) -> float:
    """'30min', '1h', '15 min', '300s', '300' (s) -> seconds; ValueError naming the text otherwise."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        units = (("min", 60.0), ("h", 3600.0), ("ms", 1e-3), ("s", 1.0), ("m", 60.0))
        mult = 1.0
        for suffix, m in units:
            if s.endswith(suffix):
                s, mult = s[: -len(suffix)], m
                break
        try:
            value = float(s) * mult
        except ValueError:
            raise ValueError(f"duration {text!r}: expected a number with a unit, e.g. 30min, 1h, 300s") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"duration {text!r}: expected > 0")
    return value


def _curve(service: str | ServiceCurve, nominal_hz: float | None) -> ServiceCurve:
    if isinstance(service, ServiceCurve):
        return service
    return get_service(service, nominal_hz)


def _nan_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _delivered_source(series: Series, delivered: str) -> str:
    if delivered not in ("auto", "measured", "reported"):
        raise ValueError(f"delivered={delivered!r}: expected auto, measured or reported")
    if delivered != "auto":
        return delivered
    return "measured" if np.isfinite(series.delivered_measured_kw).any() else "reported"


def score_series(series: Series, service: str | ServiceCurve, *, settlement_period_s: float = 1800.0,
                 capacity_kw: float | None = None, nominal_hz: float | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, window_s: float | None = None,
                 delivered: str = "auto", event_threshold: float = DEFAULT_EVENT_THRESHOLD,
                 merge_s: float = DEFAULT_MERGE_S, start_share: float = DEFAULT_START_SHARE,
                 full_share: float = DEFAULT_FULL_SHARE, floor_grace_s: float = DEFAULT_FLOOR_GRACE_S,
                 t0_ns: int | None = None, t1_ns: int | None = None, keep_series: bool = False) -> dict:
    """Score a frequency service on one Series, per settlement period and in total (docs/services.md section 7).

    Parameters
    ----------
    series : Series
        The cycle records (and SoC-floor episodes) to score.
    service : str or ServiceCurve
        A built-in name (``dc``, ``fcr``, ``fcr_n``, ``fcr_d_up``, ``ffr``, ...) or a curve.
    settlement_period_s : float
        Length of a settlement period, s; periods are aligned to the UTC clock (30 min: hh:00, hh:30).
    capacity_kw : float or None
        Contracted capacity, kW; None takes each record's ``capacity_kw``.
    tolerance : float
        Band half-width, share of the contracted capacity.
    window_s : float or None
        Lag the band allows, s; None: the curve's ``full_activation_s``, else 1 s.
    delivered : {"auto", "measured", "reported"}
        Which delivered power is judged: the site inverters' (the grid operator's view) or the vehicles'
        reports; auto: measured when the journal has any. Both are reported.
    keep_series : bool
        Add the per-record arrays under ``"_series"`` (for the picture; not JSON).
    """
    curve = _curve(service, nominal_hz)
    if series.t_ns.size == 0:
        raise ValueError("nothing to score: the series has no records")
    source = _delivered_source(series, delivered)
    other = "reported" if source == "measured" else "measured"
    t_ns = series.t_ns
    t_s = series.t_s
    dt = metrics.sample_durations_s(t_s, series.period_s)
    cap = series.capacity_kw if capacity_kw is None else np.full(len(t_s), float(capacity_kw))
    base = series.base_kw
    frac = metrics.required_fraction(curve, series.f_hz, t_s)
    r = frac * cap
    req = base + r
    win = float(window_s if window_s is not None else (curve.full_activation_s or DEFAULT_WINDOW_S))
    lo, hi = metrics.tolerance_band(t_s, req, win, tolerance * cap)
    d = series.delivered_kw(source)
    d2 = series.delivered_kw(other)
    judged, inside = metrics.within_band(d, lo, hi)
    judged2, inside2 = metrics.within_band(d2, lo, hi)
    avail = metrics.available(curve, cap, base, series.available_dis_kw, series.available_chg_kw, series.published,
                              series.estop, series.f_hz)
    cap_ref = float(np.nanmedian(cap)) if np.isfinite(cap).any() else 0.0
    events = metrics.detect_events(t_s, r, event_threshold * cap_ref, merge_s) if cap_ref > 0 else []
    d_resp = d - base
    d2_resp = d2 - base

    period_ns = int(round(settlement_period_s * 1e9))
    lo_ns = t_ns[0] if t0_ns is None else max(int(t0_ns), int(t_ns[0]))
    end_ns = int(t_ns[-1]) + int(round(dt[-1] * 1e9))
    hi_ns = end_ns if t1_ns is None else min(int(t1_ns), end_ns)
    pidx = t_ns // period_ns

    ev_rows = []
    for i0, i1 in events:
        tm = metrics.event_timing(t_s, r, d_resp, i0, i1, win, start_share, full_share)
        tm2 = metrics.event_timing(t_s, r, d2_resp, i0, i1, win, start_share, full_share)
        ev = {"t_start": iso(int(t_ns[i0])), "t_start_ns": int(t_ns[i0]),
              "duration_s": float(t_s[i1 - 1] - t_s[i0] + dt[i1 - 1]),
              "required_kw": tm["required_kw"], "step_kw": tm["step_kw"],
              "start_s": tm["start_s"], "full_s": tm["full_s"], "peak_progress": tm["peak_progress"],
              f"start_s_{other}": tm2["start_s"], f"full_s_{other}": tm2["full_s"],
              "start_ok": None if curve.start_s is None else (
                  tm["start_s"] is not None and tm["start_s"] <= curve.start_s),
              "full_ok": None if curve.full_activation_s is None else (
                  tm["full_s"] is not None and tm["full_s"] <= curve.full_activation_s),
              "period": int(pidx[i0])}
        ev_rows.append(ev)

    grace_ns = int(round(floor_grace_s * 1e9))
    episodes = [(n, a, b) for n, a, b in series.floor_episodes if a < hi_ns and b > lo_ns]

    def summary(sel: np.ndarray, p_lo: int, p_hi: int) -> dict:
        span_s = max(0.0, (p_hi - p_lo) / 1e9)
        js, ins = float(dt[sel & judged].sum()), float(dt[sel & inside].sum())
        js2, ins2 = float(dt[sel & judged2].sum()), float(dt[sel & inside2].sum())
        en = metrics.response_energy_kwh(np.where(sel, r, np.nan), np.where(sel, d_resp, np.nan), dt)
        en2 = metrics.response_energy_kwh(np.where(sel, r, np.nan), np.where(sel, d2_resp, np.nan), dt)
        av_s = float(dt[sel & avail].sum())
        evs = [e for e in ev_rows if p_lo <= e["t_start_ns"] < p_hi]
        eps = [e for e in episodes if p_lo <= e[1] < p_hi]
        breaches = [e for e in eps if e[2] - e[1] > grace_ns]
        req_sel = np.abs(r[sel & np.isfinite(r)])
        below = series.n_soc_below_minimum
        return {
            "start": iso(p_lo), "end": iso(p_hi), "span_s": span_s, "recorded_s": float(dt[sel].sum()),
            "records": int(sel.sum()),
            "no_frequency_s": float(dt[sel & ~np.isfinite(series.f_hz)].sum()),
            "required": {"mean_abs_kw": _nan_none(req_sel.mean()) if req_sel.size else None,
                         "max_abs_kw": _nan_none(req_sel.max()) if req_sel.size else None},
            "tolerance": {"judged_s": js, "within_s": ins, "share": ins / js if js > 0 else None,
                          f"judged_s_{other}": js2, f"within_s_{other}": ins2,
                          f"share_{other}": ins2 / js2 if js2 > 0 else None},
            "energy": {source: en, other: en2},
            "events": {"count": len(evs),
                       "start_ok": sum(1 for e in evs if e["start_ok"]) if curve.start_s is not None else None,
                       "full_ok": sum(1 for e in evs if e["full_ok"]) if curve.full_activation_s is not None else None,
                       "start_s_max": max((e["start_s"] for e in evs if e["start_s"] is not None), default=None),
                       "full_s_max": max((e["full_s"] for e in evs if e["full_s"] is not None), default=None),
                       "never_full": sum(1 for e in evs if e["full_s"] is None)},
            "availability": {"available_s": av_s, "share": av_s / span_s if span_s > 0 else None},
            "soc_floor": {"breaches": len(breaches), "touches": len(eps),
                          "vehicles_breaching": len({e[0] for e in breaches}),
                          "max_vehicles_at_floor": int(below[sel].max()) if below is not None and sel.any() else None},
        }

    periods = []
    for k in range(int(lo_ns // period_ns), int((hi_ns - 1) // period_ns) + 1):
        p_lo, p_hi = max(k * period_ns, lo_ns), min((k + 1) * period_ns, hi_ns)
        sel = (pidx == k) & (t_ns >= lo_ns) & (t_ns < hi_ns)
        periods.append({"index": k, **summary(sel, p_lo, p_hi)})
    in_range = (t_ns >= lo_ns) & (t_ns < hi_ns)
    total = summary(in_range, lo_ns, hi_ns)
    breaches = [e for e in episodes if e[2] - e[1] > grace_ns]
    out = {
        "service": curve.name, "service_description": curve.description, "source_rule": curve.source,
        "nominal_hz": curve.nominal_hz,
        "curve_points": [[float(f), float(y)] for f, y in zip(curve.f_hz, curve.fraction)],
        "from": iso(lo_ns), "to": iso(hi_ns), "period_s": series.period_s,
        "settlement_period_s": float(settlement_period_s), "delivered_source": source,
        "capacity_kw": cap_ref,
        "parameters": {"tolerance": tolerance, "tolerance_kw": tolerance * cap_ref, "window_s": win,
                       "event_threshold": event_threshold, "merge_s": merge_s, "start_share": start_share,
                       "full_share": full_share, "floor_grace_s": floor_grace_s,
                       "start_limit_s": curve.start_s, "full_activation_limit_s": curve.full_activation_s},
        "total": total,
        "periods": periods,
        "events": [{k: v for k, v in e.items() if k != "t_start_ns"} for e in ev_rows[:MAX_LISTED]],
        "soc_floor_breaches": [{"node_id": n, "start": iso(a), "duration_s": (b - a) / 1e9}
                               for n, a, b in breaches[:MAX_LISTED]],
    }
    if keep_series:
        out["_series"] = {"t_ns": t_ns, "f_hz": series.f_hz, "required_kw": req, "band_lo_kw": lo, "band_hi_kw": hi,
                          "delivered_kw": d, f"delivered_{other}_kw": d2, "target_kw": series.target_kw,
                          "available": avail}
    return out


def score_journal(journal_dir: str | Path, service: str, **opts) -> dict:
    """Score a journal directory for a service; JSON-ready (docs/services.md section 7).

    ``service``: a built-in curve name, or ``reg`` for a regulation signal (PJM composite score; the
    signal from ``signal=`` a CSV file, else the journal's base schedule). ``opts``: ``t0_ns``/``t1_ns``
    (UTC ns, [from, to)), ``settlement_period_s`` (default 1800, 3600 for reg) and the keyword arguments
    of :func:`score_series` / :func:`v2grt.score.pjm.score_regulation`. ``keep_series=True`` adds the
    arrays the picture draws under ``"_series"`` (not JSON).
    """
    from v2grt.score.load import load_series

    t0, t1 = opts.pop("t0_ns", None), opts.pop("t1_ns", None)
    is_reg = isinstance(service, str) and service.strip().lower() in _REG_NAMES
    series = load_series(journal_dir, t0, t1, vehicles=not is_reg)
    if is_reg:
        from v2grt.score.pjm import score_regulation

        out = score_regulation(series, t0_ns=t0, t1_ns=t1, **opts)
    else:
        try:
            curve = _curve(service, opts.pop("nominal_hz", None))
        except ServiceError as exc:
            raise ValueError(str(exc)) from None
        out = score_series(series, curve, t0_ns=t0, t1_ns=t1, **opts)
    out["journal"] = str(journal_dir)
    out["journal_service"] = series.header.get("service")
    return out
