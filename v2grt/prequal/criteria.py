"""Criterion evaluators: one test's measured power against its rule, as named pass/fail checks.

Pure functions over arrays (no I/O, no clock), so they are checked on hand-made signals. Inputs are
on the test's own axis: ``t_s`` (s, t = 0 at the step or the start of the ramp) and ``p_kw`` the
power delivered at the site meters (kW, + = discharge into the grid), as the aggregator's journal
recorded it each cycle. The required power comes from the programmed frequency and the service's
curve (or its trigger latch, for FFR), times the contracted capacity.

Thresholds that are v2grt's, not the rules' (docs/prequal.md says so next to each):

- the response has *started* when the change from the pre-step baseline reaches START_FRACTION of
  the required change, and is *full* at FULL_FRACTION of it (a measured signal never reaches 100 %
  exactly; the rules name the times, not the threshold);
- *steady* delivery: the mean |delivered - required| over the second half of the hold is within
  ``tolerance`` of the contracted capacity (3 % by default, the band of `v2grt demo`'s report).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from v2grt.prequal.sequence import TestSpec
from v2grt.services import FFR_RELEASE_LIMIT_PER_S, ServiceCurve, TriggerResponder

START_FRACTION = 0.05
FULL_FRACTION = 0.95
DEFAULT_TOLERANCE = 0.03
#: FCR-D upwards ramp test (Nordic 2023): at 7.5 s from the ramp's start, >= 86 % of the steady-state
#: change, and the energy delivered by then >= 3.2 s times that change.
FCR_D_CHECK_S = 7.5
FCR_D_MIN_FRACTION = 0.86
FCR_D_MIN_ENERGY_S = 3.2
_GRID_S = 0.01  # the FFR latch is stepped on this grid; 10 ms is below the 50 ms cycle


@dataclasses.dataclass
class Check:
    """One criterion of one test: the rule's limit next to the measured value."""

    name: str
    criterion: str  # for people: "response starts within 0.5 s of the step"
    limit: float | None
    measured: float | None  # None: the event never happened (e.g. never reached full)
    unit: str
    passed: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def required_kw(spec: TestSpec, curve: ServiceCurve, capacity_kw: float, t_s: np.ndarray) -> np.ndarray:
    """What the rule asks at each ``t_s``: the curve (or FFR's latch) at the programmed frequency x capacity."""
    t_s = np.asarray(t_s, dtype=np.float64)
    if curve.trigger_hz is None:
        f = np.array([spec.frequency_at(float(t)) for t in t_s])
        return np.interp(f, curve.f_hz, curve.fraction) * capacity_kw
    lo = min(-spec.pre_s, float(t_s.min()) if t_s.size else 0.0)
    hi = max(spec.duration_s, float(t_s.max()) if t_s.size else 0.0)
    grid = np.arange(math.floor(lo / _GRID_S), math.ceil(hi / _GRID_S) + 1) * _GRID_S  # t = 0 on the grid
    full = curve.fraction_at(curve.trigger_hz)
    latch = TriggerResponder(curve.trigger_hz, full, curve.hold_s or 0.0, curve.release_per_s or math.inf)
    y = np.array([latch.step(spec.frequency_at(float(t)), float(t)) for t in grid])
    # the latch's value holds until its next step (a step at t = 0 is full from t = 0, not ramped in over 10 ms)
    idx = np.clip(np.searchsorted(grid, t_s + 1e-9, side="right") - 1, 0, len(grid) - 1)
    return y[idx] * capacity_kw


def baseline_kw(t_s: np.ndarray, p_kw: np.ndarray) -> float:
    """Mean delivered power before t = 0 (0 if nothing was recorded then)."""
    before = p_kw[t_s < 0.0]
    return float(np.mean(before)) if before.size else 0.0


def first_reach_s(t_s: np.ndarray, dp_kw: np.ndarray, level_kw: float) -> float | None:
    """First t >= 0 at which ``dp_kw`` reaches ``level_kw`` (in the direction of its sign), or None."""
    sign = 1.0 if level_kw >= 0.0 else -1.0
    hit = np.flatnonzero((t_s >= 0.0) & (sign * dp_kw >= abs(level_kw)))
    return float(t_s[hit[0]]) if hit.size else None


def _time_check(name: str, what: str, t: float | None, limit_s: float) -> Check:
    return Check(name, f"{what} within {limit_s:g} s", limit_s, t, "s", t is not None and t <= limit_s)


def evaluate(spec: TestSpec, curve: ServiceCurve, capacity_kw: float, t_s, p_kw, *,
             tolerance: float = DEFAULT_TOLERANCE) -> list[Check]:
    """Every check ``spec.checks`` names, on the delivered power ``p_kw`` at times ``t_s`` (test axis)."""
    t_s = np.asarray(t_s, dtype=np.float64)
    p_kw = np.asarray(p_kw, dtype=np.float64)
    ok = np.isfinite(t_s) & np.isfinite(p_kw)
    t_s, p_kw = t_s[ok], p_kw[ok]
    cap = float(capacity_kw)
    req = required_kw(spec, curve, cap, t_s)
    p0 = baseline_kw(t_s, p_kw)
    dp = p_kw - p0
    req_from = required_kw(spec, curve, cap, np.array([-spec.pre_s / 2]))[0]
    req_to = required_kw(spec, curve, cap, np.array([max(spec.hold_s - 1e-3, 0.0)]))[0]
    dp_req = req_to - req_from
    hold = (t_s >= 0.0) & (t_s < spec.hold_s)
    out: list[Check] = []
    for name in spec.checks:
        if name == "start":
            limit = curve.start_s or 0.5
            t = first_reach_s(t_s[hold], dp[hold], START_FRACTION * dp_req)
            out.append(_time_check(name, f"response starts ({START_FRACTION:.0%} of the required change)", t,
                                   limit))
        elif name == "full":
            limit = curve.full_activation_s or 1.0
            t = first_reach_s(t_s[hold], dp[hold], FULL_FRACTION * dp_req)
            out.append(_time_check(name, f"full response ({FULL_FRACTION:.0%} of the required change)", t, limit))
        elif name == "steady":
            win = (t_s >= spec.hold_s / 2.0) & (t_s < spec.hold_s)
            err = float(np.mean(np.abs(p_kw[win] - req[win]))) / cap if win.any() and cap > 0 else None
            out.append(Check(name, f"mean |delivered - required| over the second half of the hold <= "
                                   f"{tolerance:.0%} of capacity", tolerance, err, "of capacity",
                             err is not None and err <= tolerance))
        elif name in ("ramp_7_5s", "ramp_energy"):
            ss = steady_state_kw(t_s, dp, spec.hold_s)
            if name == "ramp_7_5s":
                at = float(np.interp(FCR_D_CHECK_S, t_s, dp)) if t_s.size else math.nan
                frac = at / ss if ss is not None and ss > 0 and math.isfinite(at) else None
                out.append(Check(name, f"at {FCR_D_CHECK_S:g} s from the ramp's start >= {FCR_D_MIN_FRACTION:.0%} "
                                       "of the steady-state change", FCR_D_MIN_FRACTION, frac, "of steady state",
                                 frac is not None and frac >= FCR_D_MIN_FRACTION))
            else:
                e = energy_kws(t_s, dp, 0.0, FCR_D_CHECK_S)
                e_s = e / ss if ss is not None and ss > 0 and e is not None else None
                out.append(Check(name, f"energy over 0..{FCR_D_CHECK_S:g} s >= {FCR_D_MIN_ENERGY_S:g} s x the "
                                       "steady-state change", FCR_D_MIN_ENERGY_S, e_s, "s x steady state",
                                 e_s is not None and e_s >= FCR_D_MIN_ENERGY_S))
        elif name == "ffr_full":
            limit = curve.full_activation_s or 1.3
            t = first_reach_s(t_s, dp, FULL_FRACTION * cap)
            out.append(_time_check(name, f"full activation ({FULL_FRACTION:.0%} of capacity) after the step "
                                         f"through {curve.trigger_hz:.1f} Hz", t, limit))
        elif name == "ffr_support":
            limit = curve.hold_s or 5.0
            held = support_s(t_s, dp, FULL_FRACTION * cap)
            out.append(Check(name, f"full activation held >= {limit:g} s", limit, held, "s",
                             held is not None and held >= limit))
        elif name == "ffr_release":
            # the rule's limit, not the curve's own rate (which releases slower, for margin)
            limit = FFR_RELEASE_LIMIT_PER_S + tolerance
            rate = max_drop_per_s(t_s, dp, cap)
            out.append(Check(name, f"deactivation <= {FFR_RELEASE_LIMIT_PER_S:.0%} of capacity per s "
                                   f"(+{tolerance:.0%} measurement tolerance), over any 1 s", limit, rate,
                             "of capacity per s", rate is not None and rate <= limit))
        elif name == "ffr_quiet":
            peak = float(np.max(np.abs(dp[hold]))) / cap if hold.any() and cap > 0 else None
            out.append(Check(name, f"no activation above the trigger: |change| <= {tolerance:.0%} of capacity",
                             tolerance, peak, "of capacity", peak is not None and peak <= tolerance))
        else:
            raise ValueError(f"test {spec.name}: unknown check {name!r}")
    return out


def steady_state_kw(t_s: np.ndarray, dp_kw: np.ndarray, hold_s: float) -> float | None:
    """Mean change over the last quarter of the hold (at least its last 1 s), or None without samples."""
    win = (t_s >= hold_s - max(1.0, hold_s / 4.0)) & (t_s < hold_s)
    return float(np.mean(dp_kw[win])) if win.any() else None


def energy_kws(t_s: np.ndarray, dp_kw: np.ndarray, t0_s: float, t1_s: float) -> float | None:
    """Integral of ``dp_kw`` over [t0_s, t1_s] (kW s), the samples linearly interpolated; None without any."""
    if t_s.size < 2 or t_s[0] > t0_s or t_s[-1] < t1_s:
        return None
    grid = np.linspace(t0_s, t1_s, max(2, int((t1_s - t0_s) / 0.005) + 1))
    y = np.interp(grid, t_s, dp_kw)
    return float(np.sum((y[1:] + y[:-1]) / 2.0 * np.diff(grid)))


def support_s(t_s: np.ndarray, dp_kw: np.ndarray, level_kw: float) -> float | None:
    """How long ``dp_kw`` stays >= ``level_kw`` from its first reaching it (s), or None if it never does."""
    t_full = first_reach_s(t_s, dp_kw, level_kw)
    if t_full is None:
        return None
    after = t_s >= t_full
    below = np.flatnonzero(after & (dp_kw < level_kw))
    t_end = float(t_s[below[0]]) if below.size else float(t_s[-1])
    return t_end - t_full


def max_drop_per_s(t_s: np.ndarray, dp_kw: np.ndarray, capacity_kw: float) -> float | None:
    """The largest fall of ``dp_kw`` over any 1 s window, as a share of capacity (per s); None if too short."""
    if t_s.size < 2 or t_s[-1] - t_s[0] < 1.0 or capacity_kw <= 0:
        return None
    starts = t_s[t_s <= t_s[-1] - 1.0]
    drop = np.interp(starts, t_s, dp_kw) - np.interp(starts + 1.0, t_s, dp_kw)
    return float(max(drop.max(), 0.0)) / capacity_kw


__all__ = ["DEFAULT_TOLERANCE", "FULL_FRACTION", "START_FRACTION", "Check", "baseline_kw", "energy_kws",
           "evaluate", "first_reach_s", "max_drop_per_s", "required_kw", "steady_state_kw", "support_s"]
