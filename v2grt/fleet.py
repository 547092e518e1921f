"""The fleet table: one row per vehicle, a structure of numpy arrays the kernel reads directly.

Node ids are strings to people (``EV_NODE_01``) and row numbers to the kernel. Rows are reused
when vehicles leave and the arrays grow geometrically when the fleet outgrows them, so a vehicle
joining costs amortised O(1) and a control cycle never reallocates. Gateways and sites are small
tables of their own, referenced by index from each row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from v2grt.codes import Reason


@dataclasses.dataclass(frozen=True)
class Column:
    """One per-node column: its dtype, default, and the inclusive range a valid value lies in."""

    name: str
    dtype: str
    default: float | int | None  # None: required when loading a roster
    lo: float = -math.inf
    hi: float = math.inf
    unit: str = ""
    doc: str = ""


#: The per-node columns of DESIGN.md section 5, in roster (CSV) order. node_id, gateway_id and
#: site_id are strings held outside the arrays (see Fleet.node_ids, gateway_ids, site_ids).
#: The measured quantities are float32: 24 bits of mantissa are 6e-8 of a SoC, 0.01 K of a temperature,
#: 0.06 W of a 1 MW rating, far finer than any BMS or charger reports them (the wire carries them as float32
#: already). The kernel streams these columns every cycle and computes with them in float32, eight lanes per
#: AVX2 operation (v2grt.reference does the same arithmetic in NumPy float32); docs/architecture.md.
COLUMNS: tuple[Column, ...] = (
    Column("online", "uint8", 1, 0, 1, "", "1 if plugged in and the charger answers"),
    Column("soc", "float32", None, 0.0, 1.0, "fraction", "state of charge"),
    Column("soh", "float32", 1.0, 0.0, 1.0, "fraction", "state of health (usable / nominal capacity)"),
    Column("capacity_kwh", "float32", None, 0.0, 1000.0, "kWh", "nominal battery capacity"),
    Column("p_dis_max_kw", "float32", None, 0.0, 1000.0, "kW", "max discharge at the grid (>= 0)"),
    Column("p_chg_max_kw", "float32", None, 0.0, 1000.0, "kW", "max charge at the grid (>= 0, a magnitude)"),
    Column("temp_c", "float32", 25.0, -60.0, 100.0, "degC", "battery temperature"),
    Column("cycle_count", "float32", 0.0, 0.0, 1e6, "cycles", "equivalent full cycles so far"),
    Column("efficiency", "float32", 0.96, 0.5, 1.0, "fraction", "one-way inverter+charger efficiency"),
)

COLUMN_BY_NAME = {c.name: c for c in COLUMNS}

#: Columns the kernel and the I/O side keep that do not come from a roster.
STATE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("active", "uint8"),  # 1 if the row holds a vehicle
    ("gateway", "int32"),  # index into Fleet.gateway_ids
    ("site", "int32"),  # index into Fleet.site_ids
    ("fault", "uint8"),  # a Reason set by the I/O side (NODE_UNREACHABLE, ...); 0 = none
    # CLOCK_MONOTONIC ns of the newest telemetry, exact: read it as fleet.last_telemetry_ns (TelemetryTimes),
    # which also keeps telemetry_tick, the kernel's copy, in step on every write
    ("_telemetry_ns", "int64"),
    ("telemetry_tick", "int32"),  # the same time in TELEMETRY_TICK_NS ticks since telemetry_epoch_ns (the kernel's)
    ("last_setpoint_kw", "float32"),  # what the previous cycle asked (+ discharge); the wire carries float32 too
    ("p_actual_kw", "float64"),  # measured power the gateway last reported (+ discharge)
)

SITE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("site_export_kw", "float64", math.inf),  # max total discharge of the site's nodes (>= 0)
    ("site_import_kw", "float64", math.inf),  # max total charge of the site's nodes (>= 0, magnitude)
    ("site_fault", "uint8", 0),  # a Reason (E_INVERTER_PHASE_MISMATCH) excluding every node of the site
)

_MIN_CAPACITY = 64

#: ``last_telemetry_ns`` of a vehicle nothing has been heard from since this process started (DESIGN.md
#: section 12, "heard before dispatched"): its tick is TICK_NEVER, below every staleness threshold, so the
#: kernel excludes it as TIMEOUT_BMS_RESPONSE at any clock. -2**62, not INT64_MIN: differences with any
#: CLOCK_MONOTONIC time in 0..2**62-1 ns (146 years of uptime) stay inside int64 for the tools that take them.
NEVER_HEARD_NS = -(2**62)

#: The kernel reads telemetry times as int32 ticks of 1 ms since the fleet's ``telemetry_epoch_ns`` (4 bytes a
#: vehicle and cycle instead of 8; issue 14), and judges staleness in whole ticks: a vehicle is stale when
#: now's tick minus its telemetry's tick exceeds ``stale_after_s`` in whole ticks (``stale_tick``). The profile
#: allows stale_after_s >= 10 ms, so a tick is at most a tenth of the shortest limit; the exact ns time stays
#: in the fleet for everything else (status, monitor, tools).
TELEMETRY_TICK_NS = 1_000_000
TICK_NEVER = -(2**31)  # NEVER_HEARD_NS
TICK_OLDEST = -(2**31) + 1  # any time further before the epoch (~24.8 days): stale for every profile
#: A time this many ticks (~12.4 days) after the epoch moves the epoch to it (``Fleet.rebase_telemetry``): one
#: O(rows) pass (5-20 ms at 1,000,000 vehicles on the 2-core test VM under load), once in ~12 days of a running
#: aggregator, under the image lock like every telemetry write (so that one cycle starts that much later).
#: Stored ticks stay below 2**30, far from int32's top.
TICK_REBASE = 2**30
_TICK_TOP = 2**31 - 1


def telemetry_ticks(t_ns, epoch_ns: int) -> np.ndarray:
    """int32 ticks of CLOCK_MONOTONIC ns times since ``epoch_ns`` (floor), NEVER_HEARD_NS (or less) to
    TICK_NEVER, earlier than int32 reaches to TICK_OLDEST, later to int32's top (the caller rebases first)."""
    t = np.asarray(t_ns, dtype=np.int64)
    never = t <= NEVER_HEARD_NS
    with np.errstate(over="ignore"):
        d = (np.where(never, epoch_ns, t) - np.int64(epoch_ns)) // TELEMETRY_TICK_NS
    return np.where(never, TICK_NEVER, np.clip(d, TICK_OLDEST, _TICK_TOP)).astype(np.int32)


class TelemetryTimes:
    """``fleet.last_telemetry_ns``: the newest telemetry's CLOCK_MONOTONIC ns per row, indexed like an array.

    Reads give int64 ns (slices as read-only views); every write (``fleet.last_telemetry_ns[rows] = t_ns``)
    stores the ns and the kernel's int32 tick together (Fleet.stamp_telemetry), so the two never disagree.
    """

    __slots__ = ("_fleet",)

    def __init__(self, fleet: Fleet):
        self._fleet = fleet

    def __getitem__(self, index):
        value = self._fleet._telemetry_ns[index]
        if isinstance(value, np.ndarray):
            value = value.view()
            value.flags.writeable = False  # a write through it would bypass the kernel's tick
        return value

    def __setitem__(self, index, t_ns) -> None:
        self._fleet.stamp_telemetry(index, t_ns)

    def __len__(self) -> int:
        return len(self._fleet._telemetry_ns)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)

    def __repr__(self) -> str:
        return f"TelemetryTimes({self._fleet._telemetry_ns!r})"


class FleetError(ValueError):
    """A vehicle or site that cannot be added as given; the message names node, field and value."""


class Fleet:
    """A fleet of vehicles as a structure of arrays (capacity rows, of which ``n_rows`` are in use).

    Arrays are attributes named after the columns (``fleet.soc``, ``fleet.p_dis_max_kw``, ...), each
    of length ``capacity``; rows ``>= n_rows`` and rows with ``active == 0`` hold no vehicle. Units
    follow DESIGN.md: kW (positive = discharge into the grid), kWh, degC, fractions 0..1.
    """

    def __init__(self, capacity: int = _MIN_CAPACITY, site_capacity: int = 16):
        self.capacity = 0
        self.telemetry_epoch_ns = 0  # CLOCK_MONOTONIC ns of telemetry_tick 0 (moved by rebase_telemetry)
        self._telemetry_times = TelemetryTimes(self)
        self.n_rows = 0
        self.version = 0  # bumped on every add/remove: layouts cached per gateway compare it
        self.node_ids: list[str | None] = []
        self.row_of: dict[str, int] = {}
        self._free_rows: list[int] = []
        self.gateway_ids: list[str] = []
        self._gateway_index: dict[str, int] = {}
        self.site_ids: list[str] = []
        self._site_index: dict[str, int] = {}
        self.site_capacity = 0
        self._grow(max(int(capacity), 1))
        self._grow_sites(max(int(site_capacity), 1))

    # ----------------------------------------------------------------- size
    def __len__(self) -> int:
        """Number of vehicles in the fleet (active rows)."""
        return len(self.row_of)

    @property
    def n_sites(self) -> int:
        return len(self.site_ids)

    # ------------------------------------------------------------- telemetry times
    @property
    def last_telemetry_ns(self) -> TelemetryTimes:
        """CLOCK_MONOTONIC ns of each row's newest telemetry (NEVER_HEARD_NS: none since start); see
        TelemetryTimes. The kernel reads ``telemetry_tick`` instead."""
        return self._telemetry_times

    def stamp_telemetry(self, index, t_ns) -> None:
        """Set rows' telemetry time (ns, scalar or per row) and their kernel tick; moves the epoch first
        when a time is TICK_REBASE ticks or more past it."""
        t = np.asarray(t_ns, dtype=np.int64)
        if t.ndim == 0:  # the ingest's case, one receive time per batch: the tick once, in Python ints
            newest = int(t) if t > NEVER_HEARD_NS else None
            self._telemetry_ns[index] = t
            if newest is None:
                self.telemetry_tick[index] = TICK_NEVER
                return
            tick = (newest - self.telemetry_epoch_ns) // TELEMETRY_TICK_NS
            if tick >= TICK_REBASE:
                self.rebase_telemetry(newest)
            else:
                self.telemetry_tick[index] = max(tick, TICK_OLDEST)
            return
        heard = t[t > NEVER_HEARD_NS]
        newest = int(heard.max()) if heard.size else None
        self._telemetry_ns[index] = t
        if newest is not None and (newest - self.telemetry_epoch_ns) // TELEMETRY_TICK_NS >= TICK_REBASE:
            self.rebase_telemetry(newest)
        else:
            self.telemetry_tick[index] = telemetry_ticks(t, self.telemetry_epoch_ns)

    def rebase_telemetry(self, epoch_ns: int) -> None:
        """Move the telemetry epoch to ``epoch_ns`` and recompute every row's tick from its exact time."""
        self.telemetry_epoch_ns = int(epoch_ns)
        self.telemetry_tick[:] = telemetry_ticks(self._telemetry_ns, self.telemetry_epoch_ns)

    def stale_tick(self, now_ns: int, stale_after_s: float) -> int:
        """The staleness threshold for ``now_ns``: a row whose ``telemetry_tick`` is below it is stale.

        now's tick minus stale_after_s in whole ticks, kept inside (TICK_NEVER, int32 top], so a never-heard
        row is stale at any clock and a clock beyond int32's ticks makes every row stale. One definition for
        the kernel and its twin."""
        stale_ticks = int(stale_after_s * 1e9) // TELEMETRY_TICK_NS
        now_tick = (int(now_ns) - self.telemetry_epoch_ns) // TELEMETRY_TICK_NS
        return min(max(now_tick - stale_ticks, TICK_OLDEST), _TICK_TOP)

    def _grow(self, new_capacity: int) -> None:
        """Reallocate every per-node array to new_capacity rows (geometric growth by the caller)."""
        old = self.capacity
        for col in COLUMNS:
            arr = np.zeros(new_capacity, dtype=col.dtype)
            if old:
                arr[:old] = getattr(self, col.name)
            setattr(self, col.name, arr)
        for name, dtype in STATE_COLUMNS:
            arr = np.zeros(new_capacity, dtype=dtype)
            if old:
                arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        self.telemetry_tick[old:] = telemetry_ticks(0, self.telemetry_epoch_ns)  # as the new rows' 0 ns
        self.node_ids.extend([None] * (new_capacity - old))
        self.capacity = new_capacity

    def _grow_sites(self, new_capacity: int) -> None:
        old = self.site_capacity
        for name, dtype, default in SITE_COLUMNS:
            arr = np.full(new_capacity, default, dtype=dtype)
            if old:
                arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        self.site_capacity = new_capacity

    def reserve(self, n: int) -> None:
        """Make room for n vehicles in all, so adding them reallocates nothing."""
        if n > self.capacity:
            self._grow(n)

    # ------------------------------------------------------ gateways, sites
    def gateway_index(self, gateway_id: str) -> int:
        """Index of a gateway, registering it on first sight."""
        idx = self._gateway_index.get(gateway_id)
        if idx is None:
            _check_id("gateway_id", gateway_id)
            idx = len(self.gateway_ids)
            self.gateway_ids.append(gateway_id)
            self._gateway_index[gateway_id] = idx
        return idx

    def site_index(self, site_id: str) -> int:
        """Index of a site, registering it (with no limits) on first sight."""
        idx = self._site_index.get(site_id)
        if idx is None:
            _check_id("site_id", site_id)
            idx = len(self.site_ids)
            if idx >= self.site_capacity:
                self._grow_sites(2 * self.site_capacity)
            self.site_ids.append(site_id)
            self._site_index[site_id] = idx
        return idx

    def set_site_limits(self, site_id: str, export_kw: float = math.inf, import_kw: float = math.inf) -> None:
        """Cap the total discharge (export_kw) and charge (import_kw, a magnitude) of a site's nodes."""
        for name, value in (("export_kw", export_kw), ("import_kw", import_kw)):
            if not (value >= 0.0):  # also rejects NaN
                raise FleetError(f"site {site_id!r}: {name}={value!r} must be a number >= 0 (kW)")
        s = self.site_index(site_id)
        self.site_export_kw[s] = export_kw
        self.site_import_kw[s] = import_kw

    # ------------------------------------------------------------- vehicles
    def add(self, node_id: str, gateway_id: str, site_id: str, *, now_ns: int = 0, **values) -> int:
        """Add a vehicle and return its row; values are columns of COLUMNS (defaults where omitted).

        Raises FleetError naming the node, field and value if anything is out of range; the fleet is
        unchanged then.
        """
        # All three ids first: a bad site_id must not leave a new gateway registered behind it.
        for field, value in (("node_id", node_id), ("gateway_id", gateway_id), ("site_id", site_id)):
            _check_id(field, value)
        if node_id in self.row_of:
            raise FleetError(f"node {node_id!r}: already in the fleet (row {self.row_of[node_id]})")
        checked = validate_node(node_id, values)
        g = self.gateway_index(gateway_id)
        s = self.site_index(site_id)
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            if self.n_rows >= self.capacity:
                self._grow(max(2 * self.capacity, _MIN_CAPACITY))
            row = self.n_rows
            self.n_rows += 1
        for name, value in checked.items():
            getattr(self, name)[row] = value
        self.active[row] = 1
        self.gateway[row] = g
        self.site[row] = s
        self.fault[row] = 0
        self.last_telemetry_ns[row] = now_ns
        self.last_setpoint_kw[row] = 0.0
        self.node_ids[row] = node_id
        self.row_of[node_id] = row
        self.version += 1
        return row

    def remove(self, node_id: str) -> int:
        """Take a vehicle out of the fleet; its row is cleared and reused by the next add()."""
        try:
            row = self.row_of.pop(node_id)
        except KeyError:
            raise FleetError(f"node {node_id!r}: not in the fleet") from None
        self.active[row] = 0
        self.online[row] = 0
        self.last_setpoint_kw[row] = 0.0
        self.fault[row] = 0
        self.node_ids[row] = None
        self._free_rows.append(row)
        self.version += 1
        return row

    def mark_never_heard(self) -> int:
        """Forget every row's telemetry time (NEVER_HEARD_NS): a started aggregator dispatches a vehicle
        only after its first valid telemetry. Returns the number of vehicles now waiting for it."""
        self.last_telemetry_ns[:] = NEVER_HEARD_NS
        return len(self)

    def count_never_heard(self) -> int:
        """Vehicles (active rows) with no telemetry since mark_never_heard(); O(n_rows), off the hot path."""
        n = self.n_rows
        return int(np.count_nonzero((self.last_telemetry_ns[:n] == NEVER_HEARD_NS) & (self.active[:n] == 1)))

    def rows(self, node_ids: Iterable[str]) -> np.ndarray:
        """Row numbers of the given node ids (KeyError names the first unknown id)."""
        try:
            return np.fromiter((self.row_of[n] for n in node_ids), dtype=np.int64)
        except KeyError as exc:
            raise FleetError(f"node {exc.args[0]!r}: not in the fleet") from None

    def gateway_rows(self, gateway_id: str) -> np.ndarray:
        """Rows of the active vehicles behind one gateway, ascending."""
        g = self._gateway_index.get(gateway_id, -1)
        n = self.n_rows
        return np.flatnonzero((self.gateway[:n] == g) & (self.active[:n] == 1))

    def column(self, name: str) -> np.ndarray:
        """A view of a column over the rows in use (length n_rows)."""
        return getattr(self, name)[: self.n_rows]

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_csv(cls, path: str | Path, *, now_ns: int = 0) -> Fleet:
        """Load a roster CSV (columns node_id, gateway_id, site_id and those of COLUMNS).

        Every bad row is reported (file, line, column, reason) in one RosterError; nothing is
        half-loaded. See v2grt.roster for the format.

        ``now_ns`` stamps every row as if it had reported then: right for the offline tools (``v2grt
        dispatch``, a Dispatcher on a roster), which dispatch the roster as a snapshot of the fleet. A
        running aggregator does not trust it: Aggregator marks every row NEVER_HEARD_NS and waits for
        each vehicle's own telemetry, since a roster gives identity, ratings and site, never freshness.
        """
        from v2grt.roster import load_roster

        return load_roster(path, now_ns=now_ns, fleet_cls=cls)

    @classmethod
    def random(
        cls,
        n: int,
        seed: int = 0,
        *,
        n_gateways: int | None = None,
        n_sites: int | None = None,
        now_ns: int = 0,
        offline_fraction: float = 0.02,
    ) -> Fleet:
        """A realistic synthetic fleet of n vehicles, reproducible from seed.

        Capacities 40-100 kWh (a mix of city cars, mid-size and large packs), bidirectional chargers
        of 7.4, 11 and 22 kW (AC wallboxes and DC depot units), SoC spread around 0.6, SoH mostly
        0.85-1.0 with a tail of worn packs, temperatures around 20 degC with a few hot and cold ones,
        cycle counts 0-1500, inverter efficiency 94-98.5 %, and offline_fraction unplugged.
        Vehicles are spread over n_gateways gateways (default: one per 500 vehicles) and n_sites
        sites (default: one per 50 vehicles) in contiguous blocks, as depots are.

        Every row is stamped as heard at ``now_ns``: a snapshot to dispatch offline (benchmarks, the
        Dispatcher's examples). An Aggregator given this fleet marks every row NEVER_HEARD_NS at
        construction, as it does a roster's (see from_csv).
        """
        if n < 0:
            raise FleetError(f"n={n}: a fleet size must be >= 0")
        rng = np.random.default_rng(seed)
        n_gateways = n_gateways or max(1, math.ceil(n / 500))
        n_sites = n_sites or max(1, math.ceil(n / 50))
        fleet = cls(capacity=max(n, 1), site_capacity=n_sites)
        fleet.gateway_ids = [f"gw{i + 1}" for i in range(n_gateways)]
        fleet._gateway_index = {g: i for i, g in enumerate(fleet.gateway_ids)}
        fleet.site_ids = [f"site{i + 1}" for i in range(n_sites)]
        fleet._site_index = {s: i for i, s in enumerate(fleet.site_ids)}

        capacity_kwh = rng.choice([40.0, 52.0, 58.0, 64.0, 77.0, 82.0, 100.0], size=n)
        charger_kw = rng.choice([7.4, 11.0, 22.0], size=n, p=[0.45, 0.40, 0.15])
        soh = np.clip(rng.beta(18.0, 1.6, size=n), 0.55, 1.0)
        fleet.online[:n] = (rng.random(n) >= offline_fraction).astype(np.uint8)
        fleet.soc[:n] = np.clip(rng.normal(0.6, 0.18, size=n), 0.05, 1.0)
        fleet.soh[:n] = soh
        fleet.capacity_kwh[:n] = capacity_kwh
        fleet.p_dis_max_kw[:n] = charger_kw
        fleet.p_chg_max_kw[:n] = charger_kw
        fleet.temp_c[:n] = np.clip(rng.normal(22.0, 9.0, size=n), -25.0, 55.0)
        fleet.cycle_count[:n] = np.round(rng.gamma(2.0, 150.0, size=n), 1)
        fleet.efficiency[:n] = rng.uniform(0.94, 0.985, size=n)
        fleet.active[:n] = 1
        fleet.gateway[:n] = (np.arange(n) * n_gateways // max(n, 1)).astype(np.int32)
        fleet.site[:n] = (np.arange(n) * n_sites // max(n, 1)).astype(np.int32)
        fleet.last_telemetry_ns[:n] = now_ns
        width = max(2, len(str(n)))
        fleet.node_ids[:n] = [f"EV_NODE_{i + 1:0{width}d}" for i in range(n)]
        fleet.row_of = {nid: i for i, nid in enumerate(fleet.node_ids[:n])}
        fleet.n_rows = n
        return fleet


def _check_id(field: str, value) -> None:
    if not isinstance(value, str) or not value or len(value) > 64 or not value.isprintable() or " " in value:
        raise FleetError(f"{field}={value!r}: expected a non-empty printable string of at most 64 characters "
                         "without spaces")


def validate_node(node_id: str, values: Mapping[str, object]) -> dict[str, float]:
    """Check one vehicle's column values; return them typed, with defaults filled in.

    Raises FleetError naming the node, the field, the value and the allowed range.
    """
    unknown = set(values) - set(COLUMN_BY_NAME)
    if unknown:
        raise FleetError(f"node {node_id!r}: unknown field(s) {sorted(unknown)}; expected some of "
                         f"{[c.name for c in COLUMNS]}")
    out: dict[str, float] = {}
    for col in COLUMNS:
        raw = values.get(col.name, col.default)
        if raw is None:
            raise FleetError(f"node {node_id!r}: field {col.name!r} is required ({col.doc}, {col.unit})")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise FleetError(f"node {node_id!r}: field {col.name!r}={raw!r} is not a number") from None
        if not (col.lo <= value <= col.hi):  # NaN fails both comparisons
            raise FleetError(f"node {node_id!r}: field {col.name!r}={raw!r} outside {col.lo}..{col.hi}"
                             f"{' ' + col.unit if col.unit else ''}")
        if col.dtype == "uint8" and value not in (0.0, 1.0):
            raise FleetError(f"node {node_id!r}: field {col.name!r}={raw!r} must be 0 or 1")
        out[col.name] = value
    return out


__all__ = ["COLUMNS", "COLUMN_BY_NAME", "Column", "Fleet", "FleetError", "Reason", "validate_node"]
