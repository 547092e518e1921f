"""Grid-frequency traces for the simulated meter, demos and backtests: real CSV exports, synthetic and scripted.

A :class:`Trace` is two float64 arrays, seconds from the start and frequency in Hz, plus what the
loader had to skip to get them. :func:`load_trace` reads real exports as published (byte-order
mark, ``;`` or ``,``, header or none, ISO-8601 times, ``null`` samples, gaps, two phases, mHz
deviations); :func:`synthetic_trace` makes a statistically plausible Continental Europe trace;
:func:`step_trace`, :func:`ramp_trace` and :func:`fcr_d_ramp_trace` script the test signals of the
grid codes. Everything here is an edge of the system (files, test setup): nothing is called inside
a control cycle except :meth:`Trace.at`, which allocates nothing for a scalar time.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

#: Sample files shipped in v2grt/data (see v2grt/data/README.md for provenance).
SAMPLE_TRACES: tuple[str, ...] = (
    "frequency_ce_2019-03-19_1s.csv",
    "frequency_deviation_2018-01-05_10s.csv",
)
#: The demo's default: 11 h of Continental Europe frequency at 1 s from a PMU.
DEFAULT_SAMPLE_TRACE = SAMPLE_TRACES[0]

KINDS = ("auto", "hz", "mhz")

#: Tokens taken as a missing sample (compared lower-case, stripped). The published PMU export writes
#: ``null``; other exporters leave the field empty or write NaN.
NULL_TOKENS = frozenset({"", "null", "nan", "none", "na", "n/a"})

#: A step longer than this many median steps is a gap (a missing sample or more). 1.5 counts a
#: single missing second of a 1 s trace and tolerates timestamp jitter of a few hundred ms.
GAP_FACTOR = 1.5

#: Frequencies further than this fraction from nominal are rejected as not a grid frequency: the
#: largest deviations on record in synchronous areas are a few Hz (Italy 2003: 47.5 Hz before
#: collapse), while a 60 Hz file read as 50 Hz (+20 %) or a mHz file read as Hz must fail loudly.
PLAUSIBLE_FRACTION = 0.10

#: Auto-detection: a headerless column whose valid samples all lie in this band is absolute Hz (50
#: and 60 Hz grids alike); otherwise values within +-1000 are a deviation in mHz.
_HZ_BAND = (40.0, 70.0)
_MHZ_LIMIT = 1000.0


class TraceError(ValueError):
    """A trace file or script that cannot be read as given; the message names file, line, column, value."""


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """A frequency trace: ``f_hz[i]`` measured at ``t_s[i]`` seconds from the start.

    Attributes
    ----------
    t_s : ndarray, shape (n,), float64, s
        Strictly increasing. The time axis is the real one: gaps in a file stay gaps, bridged
        only when :meth:`at` interpolates across them.
    f_hz : ndarray, shape (n,), float64, Hz
        Absolute frequency (deviation files are converted with ``nominal_hz``).
    source : str
        Where it came from: a file path, or a description of the generator and its parameters.
    n_null : int
        Samples skipped as missing (``null`` or empty fields) in the source; for a two-phase file,
        counted per phase field.
    n_gaps : int
        Steps in the source longer than ``GAP_FACTOR`` median steps.
    dt_s : float, s
        Median step of the source.
    start : datetime or None
        Wall-clock time of ``t_s == 0`` when the source had one (time-zone aware if it had an offset).
    nominal_hz : float, Hz
    kind : str
        ``"hz"`` or ``"mhz"``: what the source's values were (after detection).

    Arrays are read-only; :meth:`resample` returns a new trace.
    """

    t_s: np.ndarray
    f_hz: np.ndarray
    source: str
    n_null: int = 0
    n_gaps: int = 0
    dt_s: float = math.nan
    start: _dt.datetime | None = None
    nominal_hz: float = 50.0
    kind: str = "hz"

    def __post_init__(self):
        t = np.ascontiguousarray(self.t_s, dtype=np.float64)
        f = np.ascontiguousarray(self.f_hz, dtype=np.float64)
        if t.ndim != 1 or t.shape != f.shape or t.size < 2:
            raise TraceError(f"{self.source}: t_s and f_hz must be 1-D of the same length >= 2, "
                             f"got shapes {t.shape} and {f.shape}")
        if not (np.isfinite(t).all() and np.isfinite(f).all()):
            raise TraceError(f"{self.source}: t_s and f_hz must be finite")
        steps = np.diff(t)
        if not (steps > 0.0).all():
            i = int(np.argmin(steps > 0.0))
            raise TraceError(f"{self.source}: t_s must increase strictly; sample {i + 1} at {t[i + 1]!r} s "
                             f"follows {t[i]!r} s")
        t = t.copy() if t is self.t_s else t
        f = f.copy() if f is self.f_hz else f
        t.flags.writeable = False
        f.flags.writeable = False
        object.__setattr__(self, "t_s", t)
        object.__setattr__(self, "f_hz", f)
        if math.isnan(self.dt_s):
            object.__setattr__(self, "dt_s", float(np.median(steps)))

    def __len__(self) -> int:
        return int(self.t_s.size)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last sample, s."""
        return float(self.t_s[-1] - self.t_s[0])

    @property
    def period_s(self) -> float:
        """Length of one loop of :meth:`at` with ``looped=True``: the duration plus one median step."""
        return self.duration_s + self.dt_s

    @functools.cached_property
    def _wrapped(self) -> tuple[np.ndarray, np.ndarray]:
        # The loop closes over one median step from the last sample back to the first, so a demo
        # replaying 11 h of data does not jump at the seam.
        t = np.append(self.t_s, self.t_s[-1] + self.dt_s)
        f = np.append(self.f_hz, self.f_hz[0])
        return t, f

    def at(self, t_s, *, looped: bool = False):
        """Frequency in Hz at time(s) ``t_s`` (s, same origin as ``self.t_s``), linearly interpolated.

        Before the first and after the last sample the end values are held, unless ``looped``:
        then time wraps with period :attr:`period_s`, interpolating from the last sample back to
        the first over one median step. A scalar ``t_s`` gives a float, an array an array.
        """
        if looped:
            t0 = self.t_s[0]
            tw, fw = self._wrapped
            x = t0 + np.mod(np.asarray(t_s, dtype=np.float64) - t0, self.period_s)
            out = np.interp(x, tw, fw)
        else:
            out = np.interp(t_s, self.t_s, self.f_hz)
        return float(out) if np.ndim(out) == 0 else out

    def resample(self, dt_s: float) -> Trace:
        """The trace on a uniform grid from its first sample, step ``dt_s`` s (linear interpolation).

        Gaps are bridged linearly. ``n_null`` and ``n_gaps`` still describe the source data; ``dt_s``
        becomes the new step.
        """
        if not (dt_s > 0.0 and math.isfinite(dt_s)):
            raise TraceError(f"{self.source}: resample dt_s={dt_s!r} must be a finite number > 0 (s)")
        n = math.floor(self.duration_s / dt_s + 1e-9) + 1
        if n < 2:
            raise TraceError(f"{self.source}: resample dt_s={dt_s!r} s is longer than the trace "
                             f"({self.duration_s} s)")
        t = self.t_s[0] + dt_s * np.arange(n, dtype=np.float64)
        return dataclasses.replace(self, t_s=t, f_hz=np.interp(t, self.t_s, self.f_hz),
                                   source=f"{self.source} resampled at {dt_s:g} s", dt_s=float(dt_s))

    def deviation_mhz(self) -> np.ndarray:
        """``(f_hz - nominal_hz) * 1000``: the deviation in mHz, as service curves and reports use it."""
        return (self.f_hz - self.nominal_hz) * 1000.0


# ----------------------------------------------------------------------------------------- files
def sample_trace_path(name: str = DEFAULT_SAMPLE_TRACE) -> Path:
    """Path of a sample trace shipped in ``v2grt/data`` (one of :data:`SAMPLE_TRACES`).

    The files are package data next to this package (``Path(__file__)``, not importlib.resources):
    the loader needs a real file, and v2grt is installed unzipped.
    """
    if name not in SAMPLE_TRACES:
        raise TraceError(f"sample trace {name!r}: unknown; expected one of {list(SAMPLE_TRACES)}")
    path = Path(__file__).resolve().parent.parent / "data" / name
    if not path.is_file():
        raise TraceError(f"sample trace {name!r}: {path} is missing (package data not installed?)")
    return path


def load_trace(path: str | Path, *, kind: str = "auto", nominal_hz: float = 50.0) -> Trace:
    """Read a frequency trace from a CSV export exactly as published.

    Format, as real exports come:

    - UTF-8, with or without a byte-order mark; ``\\n``, ``\\r\\n`` or ``\\r`` line ends; blank lines
      ignored.
    - Separator ``;``, tab or ``,``, whichever the first line uses (in that order of preference). In
      a ``;`` or tab file a decimal comma (``49,98``) is read as a decimal point.
    - A header line or none: the first line is a header when its first field is not a time and its
      other fields are not numbers.
    - First column: time, ISO-8601 with or without an offset (``2019-03-19T01:02:02+01:00``,
      ``...Z``) or ``YYYY-MM-DD HH:MM:SS``. Times must increase strictly and be all with or all
      without an offset. Gaps are kept (the time axis is real) and counted in ``n_gaps``.
    - Further columns: frequency samples. Missing samples (``null``, empty, NaN; see
      :data:`NULL_TOKENS`) are skipped and counted in ``n_null``. With several columns (a PMU's
      phases) the frequency of a row is the **mean of its valid columns**: the phases of one bus see
      the same system frequency (in the shipped 1 s file they differ by at most 2.6 mHz, p99
      1.4 mHz), and averaging keeps every row where one phase is ``null`` instead of dropping them
      (264 rows of phase A in that file). A row with no valid column is dropped.
    - Units, by ``kind``: ``"hz"`` absolute frequency; ``"mhz"`` deviation from ``nominal_hz`` in
      mHz; ``"auto"`` (default) decides from a header (a column name with ``mHz`` -> mhz, else with
      ``Hz`` -> hz) or, with no unit in the header, from the values: all within 40..70 -> Hz, else
      all within +-1000 -> mHz deviation. (Checking the Hz band first keeps a headerless Hz file,
      whose values are also within +-1000, from being read as a 50 mHz deviation.)

    Every value must then be within 10 % of ``nominal_hz`` (see :data:`PLAUSIBLE_FRACTION`).

    Raises
    ------
    TraceError
        For anything else, naming file, line, column and value and what was expected: an
        unparsable time or number, a wrong number of fields, time going backwards, a value that is
        not a plausible frequency, or fewer than two valid samples.
    """
    if kind not in KINDS:
        raise TraceError(f"{path}: kind={kind!r}: expected one of {list(KINDS)}")
    if not (nominal_hz > 0.0 and math.isfinite(nominal_hz)):
        raise TraceError(f"{path}: nominal_hz={nominal_hz!r}: expected a frequency > 0 (Hz), e.g. 50 or 60")
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TraceError(f"{path}:{line}: byte {raw[exc.start]:#04x} at offset {exc.start} is not UTF-8; "
                         "expected a UTF-8 text CSV") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")

    first = next((i for i, s in enumerate(lines) if s.strip()), None)
    if first is None:
        raise TraceError(f"{path}: empty file; expected time and frequency columns")
    sep = next((c for c in (";", "\t", ",") if c in lines[first]), ",")
    decimal_comma = sep != ","
    head = [s.strip() for s in lines[first].split(sep)]
    n_cols = len(head)
    if n_cols < 2:
        raise TraceError(f"{path}:{first + 1}: found 1 column {lines[first]!r}; expected a time and at least "
                         "one frequency column separated by ';', tab or ','")
    names: list[str] | None = None
    if _parse_time(head[0]) is None and not any(_is_number(s, decimal_comma) for s in head[1:]):
        names = head
        first += 1
    col_name = (lambda c: f"column {c + 1} ({names[c]!r})") if names else (lambda c: f"column {c + 1}")

    times: list[float] = []
    rows: list[list[float]] = []
    line_nos: list[int] = []
    n_null = 0
    t_origin: _dt.datetime | None = None
    nan = math.nan
    for idx in range(first, len(lines)):
        line = lines[idx]
        if not line.strip():
            continue
        line_no = idx + 1
        fields = line.split(sep)
        if len(fields) != n_cols:
            raise TraceError(f"{path}:{line_no}: found {len(fields)} fields in {line!r}; expected {n_cols} "
                             f"separated by {sep!r}")
        stamp = _parse_time(fields[0].strip())
        if stamp is None:
            raise TraceError(f"{path}:{line_no}: {col_name(0)}: {fields[0]!r} is not a time; expected ISO-8601 "
                             "such as 2019-03-19T01:02:02+01:00 or 2018-01-05 00:00:00")
        if t_origin is None:
            t_origin = stamp
        try:
            t = (stamp - t_origin).total_seconds()
        except TypeError:
            raise TraceError(f"{path}:{line_no}: {col_name(0)}: {fields[0]!r} mixes times with and without a "
                             f"UTC offset (the first time was {t_origin.isoformat()!r})") from None
        values = []
        n_valid = 0
        for c in range(1, n_cols):
            token = fields[c].strip()
            if token.lower() in NULL_TOKENS:
                n_null += 1
                values.append(nan)
                continue
            v = _to_float(token, decimal_comma)
            if v is None:
                raise TraceError(f"{path}:{line_no}: {col_name(c)}: {fields[c]!r} is not a number; expected a "
                                 "frequency (Hz or mHz) or null")
            values.append(v)
            n_valid += 1
        if n_valid == 0:
            continue
        times.append(t)
        rows.append(values)
        line_nos.append(line_no)

    if len(times) < 2:
        raise TraceError(f"{path}: {len(times)} valid sample(s); a trace needs at least 2")
    t_s = np.asarray(times, dtype=np.float64)
    steps = np.diff(t_s)
    bad = np.flatnonzero(steps <= 0.0)
    if bad.size:
        i = int(bad[0]) + 1
        raise TraceError(f"{path}:{line_nos[i]}: {col_name(0)}: time {t_s[i]:g} s after the first does not "
                         f"increase (line {line_nos[i - 1]} was at {t_s[i - 1]:g} s); expected strictly "
                         "increasing times")
    values = np.asarray(rows, dtype=np.float64)  # (n, n_cols - 1), NaN where null

    if kind == "auto":
        kind = _detect_kind(path, names, values)
    f = values if kind == "hz" else nominal_hz + values / 1000.0
    lo, hi = nominal_hz * (1.0 - PLAUSIBLE_FRACTION), nominal_hz * (1.0 + PLAUSIBLE_FRACTION)
    with np.errstate(invalid="ignore"):
        implausible = np.argwhere(~np.isnan(f) & ~((f >= lo) & (f <= hi)))
    if implausible.size:
        r, c = (int(x) for x in implausible[0])
        raise TraceError(f"{path}:{line_nos[r]}: {col_name(c + 1)}: {float(values[r, c])!r} read as {kind} is "
                         f"{f[r, c]:.4f} Hz, outside {lo:g}..{hi:g} Hz (nominal_hz={nominal_hz:g} +-"
                         f"{PLAUSIBLE_FRACTION:.0%}); pass kind= or nominal_hz= if the detection is wrong")
    valid = ~np.isnan(f)
    f_hz = np.where(valid, f, 0.0).sum(axis=1) / valid.sum(axis=1)

    dt_s = float(np.median(steps))
    n_gaps = int(np.count_nonzero(steps > GAP_FACTOR * dt_s))
    return Trace(t_s=t_s, f_hz=f_hz, source=str(path), n_null=n_null, n_gaps=n_gaps, dt_s=dt_s,
                 start=t_origin, nominal_hz=float(nominal_hz), kind=kind)


def _parse_time(token: str) -> _dt.datetime | None:
    if not token or not token[0].isdigit():
        return None
    if token[-1] in "Zz":  # fromisoformat takes 'Z' only from Python 3.11
        token = token[:-1] + "+00:00"
    try:
        return _dt.datetime.fromisoformat(token)
    except ValueError:
        return None


def _to_float(token: str, decimal_comma: bool) -> float | None:
    if decimal_comma and "," in token and "." not in token:
        token = token.replace(",", ".")
    try:
        v = float(token)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _is_number(token: str, decimal_comma: bool) -> bool:
    return token.lower() in NULL_TOKENS or _to_float(token, decimal_comma) is not None


def _detect_kind(path: Path, names: Sequence[str] | None, values: np.ndarray) -> str:
    if names:
        units = " ".join(names[1:]).lower()
        if "mhz" in units:
            return "mhz"
        if "hz" in units:
            return "hz"
    v = values[~np.isnan(values)]
    if ((v >= _HZ_BAND[0]) & (v <= _HZ_BAND[1])).all():
        return "hz"
    if (np.abs(v) <= _MHZ_LIMIT).all():
        return "mhz"
    raise TraceError(f"{path}: cannot tell the unit: values span {v.min():g}..{v.max():g}, neither all within "
                     f"{_HZ_BAND[0]:g}..{_HZ_BAND[1]:g} (Hz) nor within +-{_MHZ_LIMIT:g} (mHz deviation); "
                     "pass kind='hz' or kind='mhz'")


# ------------------------------------------------------------------------------------- synthetic
#: Synthetic-trace defaults, fitted to the shipped 1 s Continental Europe file (std 19.7 mHz;
#: autocorrelation 0.95 at 10 s, 0.76 at 60 s, 0.28 at 300 s): a slow OU component (load and
#: generation imbalance worked off by FCR/aFRR over minutes) plus a fast one (load noise and
#: measurement jitter). Together: std ~21 mHz, autocorrelation ~0.92 / 0.75 / 0.34.
SLOW_SIGMA_HZ, SLOW_TAU_S = 0.020, 300.0
FAST_SIGMA_HZ, FAST_TAU_S = 0.006, 10.0
#: Excursions: a sudden loss of generation (or load) arrested by FCR within seconds and restored by
#: aFRR over minutes. Amplitudes 50-150 mHz are the size of the largest routine CE events (a
#: ~1 GW unit trip against ~20 GW/Hz network power frequency characteristic); rate 0.5 per hour
#: makes one or two per demo run without dominating the statistics.
EXCURSION_RATE_PER_H = 0.5
EXCURSION_HZ = (0.050, 0.150)
EXCURSION_FALL_S = 4.0  # time constant to the nadir: CE RoCoF of ~10-40 mHz/s after a large trip
EXCURSION_RECOVER_S = 120.0  # aFRR full activation within 5 min (ENTSO-E SOGL), so ~2 min constant


def synthetic_trace(duration_s: float, dt_s: float, seed: int, nominal_hz: float = 50.0, *,
                    excursion_rate_per_h: float = EXCURSION_RATE_PER_H) -> Trace:
    """A realistic frequency trace, reproducible from ``seed``.

    Two Ornstein-Uhlenbeck processes around ``nominal_hz`` (slow: sigma 20 mHz, tau 300 s; fast:
    6 mHz, 10 s; fitted to the shipped CE file, see the module constants), plus excursions at
    ``excursion_rate_per_h`` (Poisson): 50-150 mHz, two in three under-frequency (unit trips are
    more common than load trips), falling with a 4 s time constant and recovering over ~2 min.
    Samples at ``0, dt_s, ...`` up to ``duration_s``. The OU steps are exact (AR(1) with
    ``a = exp(-dt/tau)``), so the statistics do not depend on ``dt_s``.
    """
    for name, value in (("duration_s", duration_s), ("dt_s", dt_s), ("nominal_hz", nominal_hz)):
        if not (value > 0.0 and math.isfinite(value)):
            raise TraceError(f"synthetic_trace: {name}={value!r} must be a finite number > 0")
    if not (excursion_rate_per_h >= 0.0 and math.isfinite(excursion_rate_per_h)):
        raise TraceError(f"synthetic_trace: excursion_rate_per_h={excursion_rate_per_h!r} must be >= 0")
    n = math.floor(duration_s / dt_s + 1e-9) + 1
    if n < 2:
        raise TraceError(f"synthetic_trace: duration_s={duration_s!r} shorter than dt_s={dt_s!r}")
    rng = np.random.default_rng(seed)
    t = dt_s * np.arange(n, dtype=np.float64)
    dev = np.zeros(n)
    for sigma, tau in ((SLOW_SIGMA_HZ, SLOW_TAU_S), (FAST_SIGMA_HZ, FAST_TAU_S)):
        a = math.exp(-dt_s / tau)
        e = rng.standard_normal(n) * (sigma * math.sqrt(1.0 - a * a))
        dev += _ar1(e, a, x0=rng.standard_normal() * sigma)
    n_events = rng.poisson(excursion_rate_per_h * duration_s / 3600.0)
    for t0, amp, sign in zip(rng.uniform(0.0, duration_s, n_events),
                             rng.uniform(*EXCURSION_HZ, n_events),
                             np.where(rng.random(n_events) < 2.0 / 3.0, -1.0, 1.0), strict=True):
        i0 = math.ceil(t0 / dt_s)
        i1 = min(n, i0 + math.ceil(8.0 * EXCURSION_RECOVER_S / dt_s) + 1)
        tau_t = t[i0:i1] - t0
        dev[i0:i1] += sign * amp * -np.expm1(-tau_t / EXCURSION_FALL_S) * np.exp(-tau_t / EXCURSION_RECOVER_S)
    return Trace(t_s=t, f_hz=nominal_hz + dev, dt_s=float(dt_s), nominal_hz=float(nominal_hz),
                 source=f"synthetic_trace(duration_s={duration_s:g}, dt_s={dt_s:g}, seed={seed}, "
                        f"nominal_hz={nominal_hz:g}, excursion_rate_per_h={excursion_rate_per_h:g})")


def _ar1(e: np.ndarray, a: float, x0: float) -> np.ndarray:
    """``x[k] = a * x[k-1] + e[k]`` with ``x[-1] = x0``, vectorised in blocks.

    Within a block ``x[k] = a**(k+1) * x0 + a**k * cumsum(e * a**-j)[k]``; the block length keeps
    ``a**-B`` under 1e6 so the rescaling loses no precision that matters.
    """
    n = e.size
    out = np.empty(n)
    block = n if a >= 1.0 else max(1, min(n, int(math.log(1e6) / -math.log(a)) if a > 0.0 else 1))
    k = np.arange(block, dtype=np.float64)
    pw = a ** k
    inv = a ** -k if a > 0.0 else np.ones(block)
    x = x0
    for s in range(0, n, block):
        m = min(block, n - s)
        acc = np.cumsum(e[s:s + m] * inv[:m])
        out[s:s + m] = pw[:m] * (a * x + acc)
        x = out[s + m - 1]
    return out


# -------------------------------------------------------------------------------------- scripted
def step_trace(points: Iterable[tuple[float, float]], *, dt_s: float = 0.1, end_s: float | None = None,
               nominal_hz: float = 50.0) -> Trace:
    """Piecewise-constant frequency: ``f_hz`` from each ``(t_s, f_hz)`` point until the next.

    Sampled every ``dt_s`` s (default 0.1 s, one control period) from 0 to ``end_s`` (default: the
    last point plus 10 s), with every point's time and ``end_s`` added as samples; before the first point the
    first value holds. :meth:`Trace.at` is exact at each point and interpolates between samples,
    so it sees a step as a ramp from the sample before it (at most one ``dt_s``), as a real
    frequency (inertia) would.
    """
    return _scripted(points, dt_s, end_s, nominal_hz, "step")


def ramp_trace(points: Iterable[tuple[float, float]], *, dt_s: float = 0.1, end_s: float | None = None,
               nominal_hz: float = 50.0) -> Trace:
    """Piecewise-linear frequency through ``(t_s, f_hz)`` points, held before the first and after the last.

    Sampled every ``dt_s`` s from 0 to ``end_s`` (default: the last point plus 10 s), with every
    point's time and ``end_s`` added as samples so :meth:`Trace.at` is exact at the corners.
    """
    return _scripted(points, dt_s, end_s, nominal_hz, "ramp")


#: Nordic FCR-D ramp test (ENTSO-E Nordic "Technical requirements for FCR in the Nordic synchronous
#: area", DESIGN.md section 9): 49.9 -> 49.0 Hz at 0.24 Hz/s for FCR-D up; mirrored for down.
FCR_D_RAMP_HZ_PER_S = 0.24


def fcr_d_ramp_trace(direction: str = "up", *, hold_before_s: float = 10.0, hold_after_s: float = 60.0,
                     dt_s: float = 0.1) -> Trace:
    """The FCR-D test ramp: hold 49.9 Hz, ramp to 49.0 Hz at 0.24 Hz/s (3.75 s), hold 49.0 Hz.

    ``direction="down"`` mirrors it (50.1 -> 51.0 Hz). The ramp starts at ``t_s = hold_before_s``;
    the 86 %-at-7.5 s criterion is measured from there.
    """
    if direction not in ("up", "down"):
        raise TraceError(f"fcr_d_ramp_trace: direction={direction!r}: expected 'up' or 'down'")
    f0, f1 = (49.9, 49.0) if direction == "up" else (50.1, 51.0)
    t1 = hold_before_s + round(abs(f1 - f0) / FCR_D_RAMP_HZ_PER_S, 9)  # 3.75 s, not 3.7499999999999996
    return ramp_trace([(hold_before_s, f0), (t1, f1)], dt_s=dt_s, end_s=t1 + hold_after_s, nominal_hz=50.0)


def _scripted(points, dt_s, end_s, nominal_hz, shape) -> Trace:
    pts = [(float(t), float(f)) for t, f in points]
    where = f"{shape}_trace"
    if not pts:
        raise TraceError(f"{where}: no points; expected [(t_s, f_hz), ...]")
    for i, (t, f) in enumerate(pts):
        if not (math.isfinite(t) and t >= 0.0):
            raise TraceError(f"{where}: point {i}: t_s={t!r} must be a finite time >= 0 (s)")
        if not (f > 0.0 and math.isfinite(f)):
            raise TraceError(f"{where}: point {i}: f_hz={f!r} must be a finite frequency > 0 (Hz)")
        if i and t <= pts[i - 1][0]:
            raise TraceError(f"{where}: point {i}: t_s={t!r} does not follow point {i - 1} "
                             f"(t_s={pts[i - 1][0]!r}); expected increasing times")
    if not (dt_s > 0.0 and math.isfinite(dt_s)):
        raise TraceError(f"{where}: dt_s={dt_s!r} must be a finite number > 0 (s)")
    end = pts[-1][0] + 10.0 if end_s is None else float(end_s)
    n = math.floor(end / dt_s + 1e-9) + 1
    if n < 2:
        raise TraceError(f"{where}: end_s={end!r} leaves fewer than 2 samples at dt_s={dt_s!r}")
    pt = np.array([p[0] for p in pts])
    pf = np.array([p[1] for p in pts])
    # The uniform grid plus every breakpoint, so at() is exact at the corners of a script (the end
    # of the FCR-D ramp at 3.75 s falls between 0.1 s samples); a breakpoint within a millionth of
    # a step of a grid sample is that sample.
    t = dt_s * np.arange(n, dtype=np.float64)
    extra = np.append(pt[(pt > 0.0) & (pt < end)], end)
    near = np.abs(extra / dt_s - np.round(extra / dt_s)) < 1e-6
    t = np.union1d(t, extra[~near])
    if shape == "ramp":
        f = np.interp(t, pt, pf)
    else:
        k = np.searchsorted(pt, t + 1e-6 * dt_s, side="right") - 1
        f = pf[np.maximum(k, 0)]
    return Trace(t_s=t, f_hz=f, dt_s=float(dt_s), nominal_hz=float(nominal_hz),
                 source=f"{where}({pts}, dt_s={dt_s:g})")


__all__ = [
    "DEFAULT_SAMPLE_TRACE",
    "FCR_D_RAMP_HZ_PER_S",
    "SAMPLE_TRACES",
    "Trace",
    "TraceError",
    "fcr_d_ramp_trace",
    "load_trace",
    "ramp_trace",
    "sample_trace_path",
    "step_trace",
    "synthetic_trace",
]
