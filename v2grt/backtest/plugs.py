"""When each vehicle of a backtest is plugged in, and at what SoC it arrives: a daily plug-in pattern (pure).

A fleet of private cars doing V2G plugs in at two kinds of place: at home in the evening until the
next morning, and at work in the morning until the evening. Each vehicle belongs to one segment and
has one session per day in it (or none that day, with probability ``skip``). Times are normal
around the segment's mean (local time, hours); the departure is the first one after the arrival;
the SoC at arrival is normal, clipped to 0.05..0.95.

Where the numbers come from. The shape (a morning arrival peak at workplaces around 08:00-09:00, an
evening one at homes around 17:00-19:00, sessions of 8-14 hours that last far longer than the
charging they need, drivers who arrive with around half a battery because daily trips use 10-20 % of
one) is what published analyses of open charging-session data describe: ElaadNL's open transaction
data of Dutch public chargers, and the INL EV Project / UK "My Electric Avenue" trials for SoC at
plug-in. The exact means, spreads and shares below are this model's round choices within those
descriptions, not a fit to any one data set; change them with ``PlugPattern(...)`` where a fleet's
own session data is known.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Segment:
    """One kind of plug-in place: its share of the fleet, arrival and departure (local time, h), SoC at arrival."""

    name: str
    share: float  # fraction of the fleet
    arrive_h: float  # mean local arrival time, h
    arrive_sd_h: float
    stay_h: float  # mean time plugged in, h
    stay_sd_h: float
    soc_mean: float  # SoC at arrival
    soc_sd: float


#: The default pattern (see the module docstring for where the numbers come from).
HOME = Segment("home", 0.60, 18.5, 1.5, 13.0, 1.5, 0.50, 0.15)
WORK = Segment("work", 0.40, 8.5, 1.0, 8.5, 1.0, 0.60, 0.15)


class PlugError(ValueError):
    """A plug-in pattern that cannot be used as given; the message names the field and value."""


@dataclasses.dataclass(frozen=True)
class PlugPattern:
    """Segments (shares summing to 1), the chance a vehicle stays away on a given day, and a minimum stay."""

    segments: tuple[Segment, ...] = (HOME, WORK)
    skip: float = 0.10  # a vehicle not plugged in that day (travel, a car left at home)
    min_stay_h: float = 1.0

    def __post_init__(self):
        total = sum(s.share for s in self.segments)
        if not self.segments or abs(total - 1.0) > 1e-9:
            raise PlugError(f"segment shares sum to {total}; expected 1")
        for s in self.segments:
            for key in ("arrive_sd_h", "stay_h", "stay_sd_h", "soc_sd"):
                if not (getattr(s, key) >= 0.0 and math.isfinite(getattr(s, key))):
                    raise PlugError(f"segment {s.name!r}: {key}={getattr(s, key)!r}; expected a finite number >= 0")
            if not 0.0 <= s.soc_mean <= 1.0:
                raise PlugError(f"segment {s.name!r}: soc_mean={s.soc_mean!r}; expected 0..1")
        if not 0.0 <= self.skip < 1.0:
            raise PlugError(f"skip={self.skip!r}; expected 0 <= skip < 1")


@dataclasses.dataclass
class Sessions:
    """Plug-in sessions over a window, as flat arrays (one entry per session), seconds from the window's start.

    A vehicle may have several sessions (one per day); they never overlap for one vehicle.
    """

    vehicle: np.ndarray  # int64, row of the vehicle
    arrive_s: np.ndarray  # float64, may be < 0 (plugged in before the window starts)
    depart_s: np.ndarray  # float64, > arrive_s
    soc_arrive: np.ndarray  # float64, 0..1
    segment: np.ndarray  # int64, index into the pattern's segments

    def plugged_at(self, n: int, t_s: float) -> np.ndarray:
        """Bool (n,): which vehicles are plugged in at ``t_s``."""
        out = np.zeros(n, dtype=bool)
        on = (self.arrive_s <= t_s) & (t_s < self.depart_s)
        out[self.vehicle[on]] = True
        return out

    def events(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t_s, session index, +1 arrive / -1 depart) sorted by time, departures first at equal times."""
        k = len(self.vehicle)
        t = np.concatenate([self.arrive_s, self.depart_s])
        idx = np.concatenate([np.arange(k), np.arange(k)])
        kind = np.concatenate([np.ones(k, np.int64), -np.ones(k, np.int64)])
        order = np.lexsort((kind, t))
        return t[order], idx[order], kind[order]


def sessions(n: int, start_local_h: float, duration_s: float, seed: int,
             pattern: PlugPattern | None = None) -> Sessions:
    """Sessions of ``n`` vehicles that touch ``[0, duration_s)`` s, the window starting at local hour ``start_local_h``.

    Each vehicle is assigned a segment by its share; every day from the one before the window to the
    last one it spans, it has one session there (unless skipped that day). A session that would start
    before the previous one of the same vehicle ended starts when that one ends. Reproducible from ``seed``.
    """
    p = pattern or PlugPattern()
    if n < 0 or not (duration_s > 0.0 and math.isfinite(duration_s)):
        raise PlugError(f"n={n}, duration_s={duration_s!r}: expected n >= 0 and a finite duration > 0")
    rng = np.random.default_rng([seed, 2])
    shares = np.array([s.share for s in p.segments])
    seg = rng.choice(len(p.segments), size=n, p=shares / shares.sum())
    start_s = start_local_h * 3600.0
    days = range(-2, int(math.ceil((start_s + duration_s) / 86400.0)) + 1)
    rows, arr, dep, soc, sg = [], [], [], [], []
    last_dep = np.full(n, -np.inf)
    for d in days:
        a_h = np.array([p.segments[k].arrive_h for k in seg]) + rng.standard_normal(n) * np.array(
            [p.segments[k].arrive_sd_h for k in seg])
        stay_h = np.maximum(np.array([p.segments[k].stay_h for k in seg]) + rng.standard_normal(n) * np.array(
            [p.segments[k].stay_sd_h for k in seg]), p.min_stay_h)
        s = np.clip(np.array([p.segments[k].soc_mean for k in seg]) + rng.standard_normal(n) * np.array(
            [p.segments[k].soc_sd for k in seg]), 0.05, 0.95)
        here = rng.random(n) >= p.skip
        a = d * 86400.0 + a_h * 3600.0 - start_s
        a = np.maximum(a, last_dep)
        e = a + stay_h * 3600.0
        keep = here & (e > 0.0) & (a < duration_s) & (e > a)
        last_dep = np.where(here, np.maximum(last_dep, e), last_dep)
        rows.append(np.flatnonzero(keep))
        arr.append(a[keep])
        dep.append(e[keep])
        soc.append(s[keep])
        sg.append(seg[keep])
    return Sessions(np.concatenate(rows).astype(np.int64), np.concatenate(arr), np.concatenate(dep),
                    np.concatenate(soc), np.concatenate(sg).astype(np.int64))


__all__ = ["HOME", "WORK", "PlugError", "PlugPattern", "Segment", "Sessions", "sessions"]
