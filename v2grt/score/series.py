"""What the scorer reads: a journal's cycle records as columns, and its per-vehicle SoC-floor episodes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Series:
    """One journal interval as the scorer reads it: arrays of one length n, ascending in ``t_ns``.

    Powers in kW, + = discharge into the grid. Build one by hand in tests, or with
    :func:`v2grt.score.load_series` from a journal directory.
    """

    t_ns: np.ndarray  # int64, UTC ns of each cycle record
    f_hz: np.ndarray  # the frequency the cycle used; NaN when stale or absent
    capacity_kw: np.ndarray  # contracted capacity each cycle
    base_kw: np.ndarray  # the base schedule each cycle: request_kw - service_fraction x capacity_kw
    delivered_measured_kw: np.ndarray  # site inverters' measured power (the grid operator's view); NaN: none
    delivered_reported_kw: np.ndarray  # the vehicles' reported power
    available_dis_kw: np.ndarray
    available_chg_kw: np.ndarray
    published: np.ndarray  # 1: this cycle's setpoints went out
    estop: np.ndarray
    period_s: float
    service_fraction: np.ndarray | None = None  # what the aggregator answered, -1..1 (for the picture and reg)
    target_kw: np.ndarray | None = None
    n_soc_below_minimum: np.ndarray | None = None  # vehicles with reason SOC_BELOW_MINIMUM each cycle
    #: per-vehicle episodes "at or below the SoC floor while discharging": (node_id, t_start_ns, t_end_ns)
    floor_episodes: list = dataclasses.field(default_factory=list)
    header: dict = dataclasses.field(default_factory=dict)  # the first segment's header (service, capacity, ...)

    def __post_init__(self) -> None:
        n = len(self.t_ns)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and len(v) != n:
                raise ValueError(f"Series.{f.name} has {len(v)} values: expected {n}, one per t_ns")
        if n > 1 and np.any(np.diff(self.t_ns) <= 0):
            raise ValueError("Series.t_ns: expected strictly ascending times (one record per cycle)")

    @property
    def t_s(self) -> np.ndarray:
        """Seconds since the first record (float64: exact to well under a microsecond over days)."""
        return (self.t_ns - (self.t_ns[0] if len(self.t_ns) else 0)) / 1e9

    def delivered_kw(self, source: str) -> np.ndarray:
        """The delivered power column: ``measured`` (site inverters) or ``reported`` (vehicles)."""
        if source == "measured":
            return self.delivered_measured_kw
        if source == "reported":
            return self.delivered_reported_kw
        raise ValueError(f"delivered source {source!r}: expected 'measured' or 'reported'")

    def slice(self, mask: np.ndarray) -> Series:
        """The records where ``mask`` is true (episodes kept whole: they are filtered by time where used)."""
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[mask] if isinstance(v, np.ndarray) else v
        return Series(**kw)
