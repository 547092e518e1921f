"""Simulated vehicles: vectorised battery, thermal and plug models over a whole fleet (numpy, no per-vehicle loop).

One :class:`SimFleetState` holds every simulated vehicle as arrays (vehicle ``i`` is row ``i`` of
the :class:`~v2grt.fleet.Fleet` it was built from). :meth:`SimFleetState.step` applies a setpoint
per vehicle for ``dt_s`` seconds the way a car would: clipped by what its BMS allows (open-circuit
voltage, internal resistance, temperature), its charger, its firmware and its plug, then
integrated into SoC, pack temperature, cycle count and health. :meth:`SimFleetState.telemetry`
returns what a gateway would put on the wire.

Units: kW (**positive = discharge into the grid**, negative = charging), kWh, degC, V, ohm, A, s;
SoC and SoH are fractions 0..1. Powers named ``p_*_kw`` are at the grid side of the charger unless
they say ``batt`` (the cell side).

The model, in one paragraph. Each pack is ``n_cells_series`` NMC cells in series with an
open-circuit voltage ``OCV(soc)`` (:func:`ocv_cell_v`) and a DC resistance that rises at low
temperature (Arrhenius), low SoC and with ageing (:func:`r_pack_ohm`). The BMS allows the
discharge power that keeps the terminal voltage above ``V_CELL_MIN_V`` per cell (and a C-rate
cap), the charge power that keeps it under ``V_CELL_MAX_V`` (and a lithium-plating cap below
10 C), both derated linearly from 45 C to zero at 60 C. SoC moves by grid energy over the one-way
efficiency; the pack is one thermal mass heated by ``I**2 R`` and cooled towards ambient.
Simplifications, stated plainly: efficiencies are taken as the whole grid-to-cell chain (so
energy bookkeeping follows them exactly; ``I**2 R`` only places heat in the pack), no calendar
ageing, no cell imbalance, one lumped temperature per pack.
"""

from __future__ import annotations

import math

import numpy as np

from v2grt.codes import Reason

# ------------------------------------------------------------------------------- cell electrics
#: Open-circuit voltage of an NMC/graphite cell (NMC622/811 class, e.g. LG M50 and large-format
#: pouch cells measured at C/20): 3.0 V empty, ~3.72 V at half charge, 4.2 V full; steep below
#: 10 % SoC, which is why available discharge power collapses there. Mean over SoC 3.74 V.
OCV_SOC = np.array([0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95, 1.0])
OCV_CELL_V = np.array([3.00, 3.25, 3.40, 3.48, 3.53, 3.57, 3.62, 3.67, 3.72, 3.79, 3.88, 3.96, 4.06, 4.12, 4.20])
#: Under-load cut-off an EV BMS holds (cell datasheets allow 2.5-2.75 V; automotive packs stop
#: around 3.0 V to protect life), and the charge limit of NMC.
V_CELL_MIN_V = 3.0
V_CELL_MAX_V = 4.2
#: Mean of the OCV curve over SoC (energy / charge): converts kWh to Ah for n_s cells in series.
V_CELL_NOM_V = 3.74

#: Cell DC resistance (10 s pulse, 25 C, 50 % SoC) times cell capacity, ohm*Ah: large-format NMC
#: cells of 50-100 Ah measure 0.8-1.8 mOhm, i.e. 0.08-0.1 ohm*Ah. A pack of n_s cells in series
#: of Q Ah then has n_s * 0.09 / Q ohm (60 kWh, 96 s: 0.049 ohm of cells).
R_CELL_OHM_AH = 0.09
#: Busbars, welds, fuses and contactors add 10-20 % to the cells' resistance.
R_PACK_OVERHEAD = 1.15
#: Arrhenius rise of resistance at low temperature. Only part of a cell's resistance is thermally
#: activated (charge transfer, electrolyte); the ohmic part (current collectors, tabs) is not. With
#: 60 % activated at 35 kJ/mol, R(-20 C) = 7.8 x R(25 C), R(-15 C) = 5.7 x, R(0 C) = 2.5 x,
#: R(45 C) = 0.66 x: NMC 10 s DCIR data show 5-10 x at -20 C and ~0.6-0.7 x at 45 C.
R_ACTIVATION_J_PER_MOL = 35e3
R_ACTIVATED_SHARE = 0.6
GAS_CONSTANT_J_PER_MOL_K = 8.314
T_REF_K = 298.15
#: Resistance rises below 20 % SoC (solid-state diffusion in the depleted anode): x2 at empty.
R_LOW_SOC = 0.20
R_LOW_SOC_GAIN = 1.0
#: Resistance growth with capacity fade: +50 % at SoH 0.8 (automotive NMC reaches 1.3-2 x at end
#: of life).
R_GROWTH_PER_SOH_LOSS = 2.5

#: C-rate caps the BMS holds regardless of voltage headroom: ~3C discharge (an 82 kWh pack gives
#: ~250 kW peak) and ~2C charge (400 V packs fast-charge at 1.5-2C peak).
C_RATE_DIS_MAX = 3.0
C_RATE_CHG_MAX = 2.0
#: Charge allowed at low temperature (fraction of the voltage-limited power): lithium plating on
#: graphite below ~10 C; BMSs allow a trickle below 0 C and nothing at -20 C.
CHG_COLD_TEMP_C = np.array([-20.0, 0.0, 10.0])
CHG_COLD_FACTOR = np.array([0.0, 0.15, 1.0])

# ---------------------------------------------------------------------------------- thermal
#: Pack heat capacity per kWh: packs weigh 6-7.5 kg/kWh (Model 3 LR 480 kg / 82 kWh, Leaf 303 kg /
#: 40 kWh) at ~1000 J/(kg K) (cells 1000-1100, aluminium housing 900): 6.5 kJ/(K kWh), a 60 kWh
#: pack 390 kJ/K.
C_TH_J_PER_K_PER_KWH = 6500.0
#: Conductance to ambient while plugged in, coolant pump running, no chiller: 3.5 W/(K kWh), a
#: 60 kWh pack 210 W/K, time constant 31 min. So 150 kW sustained from a 60 kWh pack at 40 C
#: (~8 kW of I**2 R) passes 50 C in ~10 min, while 11 kW AC V2G (~60 W) warms it by 0.3 K.
G_TH_W_PER_K_PER_KWH = 3.5
#: BMS derating: full power up to 45 C, linear to 0 at 60 C (NMC operating limit 55-60 C); the
#: THERMAL_LIMIT flag goes up over 50 C, where the field manual's "Thermal limit reached" appears.
T_DERATE_START_C = 45.0
T_CUTOFF_C = 60.0
THERMAL_LIMIT_C = 50.0
#: Cabin air relaxes to ambient (plus a per-vehicle offset: sun, garage) in ~20 min, parked.
CABIN_TAU_S = 1200.0

# ---------------------------------------------------------------------------------- ageing
#: Capacity fade per equivalent full cycle at 25 C: automotive NMC reaches 80 % after ~2000 EFC
#: (1000-3000 in published cycling data at moderate C-rates), 1e-4 per EFC if linear.
SOH_FADE_PER_EFC = 1e-4
#: Cycle ageing doubles per 10 K above 25 C (Arrhenius rule of thumb for SEI growth).
AGEING_DOUBLING_K = 10.0

# ---------------------------------------------------------------------------------- plugs
#: Default churn: plugged sessions of ~10 h (depot and workplace charging) and ~2 h away.
UNPLUG_RATE_PER_H = 0.1
PLUG_RATE_PER_H = 0.5
#: SoC a vehicle used while unplugged, drawn uniformly from 0 to this (a commute is 5-20 %).
TRIP_SOC_MAX = 0.3


#: The state step() changes (besides the work arrays): what step_rows() writes back for the rows it stepped.
_STEPPED = ("soc", "temp_c", "cabin_temp_c", "cycle_count", "soh", "p_kw", "v_dc", "discharge_rejected")


class SimError(ValueError):
    """A simulated-fleet input that cannot be used as given; the message names field, vehicle and value."""


# The OCV breakpoints are all multiples of 0.01 SoC, so a uniform 101-entry table with linear
# interpolation is the same curve as np.interp over OCV_SOC, at a tenth of the cost for a fleet
# (np.interp's binary search mispredicts on every vehicle: 2 ms per 100k against 0.15 ms).
_OCV_STEPS = 100
_OCV_TABLE_V = np.interp(np.linspace(0.0, 1.0, _OCV_STEPS + 1), OCV_SOC, OCV_CELL_V)
_OCV_SLOPE_V = np.diff(_OCV_TABLE_V)
assert np.allclose(np.round(OCV_SOC * _OCV_STEPS), OCV_SOC * _OCV_STEPS), "OCV_SOC off the 0.01 grid"
#: The cold-charge curve is convex, so it is the larger of its two segments' lines (no np.interp).
_CHG_COLD_SLOPES = np.diff(CHG_COLD_FACTOR) / np.diff(CHG_COLD_TEMP_C)
assert _CHG_COLD_SLOPES[0] <= _CHG_COLD_SLOPES[1], "CHG_COLD_* must stay convex for _limits_into"


def ocv_cell_v(soc) -> np.ndarray:
    """Open-circuit voltage of one NMC cell at ``soc`` (fraction, clipped to 0..1), V.

    Equals ``np.interp(soc, OCV_SOC, OCV_CELL_V)``.
    """
    soc = np.asarray(soc, dtype=np.float64)
    out, x = np.empty(soc.shape), np.empty(soc.shape)
    _ocv_into(soc, out, x, np.empty(soc.shape, dtype=np.intp))
    return out


def _ocv_into(soc: np.ndarray, out: np.ndarray, x: np.ndarray, idx: np.ndarray) -> None:
    np.clip(soc, 0.0, 1.0, out=x)
    x *= _OCV_STEPS
    np.copyto(idx, x, casting="unsafe")  # truncation = floor, x >= 0
    np.minimum(idx, _OCV_STEPS - 1, out=idx)
    x -= idx  # fraction within the cell of the table
    np.take(_OCV_SLOPE_V, idx, out=out)
    out *= x
    np.take(_OCV_TABLE_V, idx, out=x)
    out += x


def r_temp_factor(temp_c) -> np.ndarray:
    """Resistance relative to 25 C: ``(1 - s) + s * exp(Ea / R * (1 / T - 1 / T_ref))``, s the activated share.

    Temperature is clipped to -40..80 C, the range the fit means anything over.
    """
    temp_c = np.asarray(temp_c, dtype=np.float64)
    out = np.empty(temp_c.shape)
    _r_temp_factor_into(temp_c, out)
    return out


def _r_temp_factor_into(temp_c: np.ndarray, out: np.ndarray) -> None:
    np.clip(temp_c, -40.0, 80.0, out=out)
    out += 273.15
    np.divide(1.0, out, out=out)
    out -= 1.0 / T_REF_K
    out *= R_ACTIVATION_J_PER_MOL / GAS_CONSTANT_J_PER_MOL_K
    np.exp(out, out=out)
    out *= R_ACTIVATED_SHARE
    out += 1.0 - R_ACTIVATED_SHARE


def r_pack_ohm(r_internal_ohm, soc, temp_c, soh) -> np.ndarray:
    """Pack DC resistance now, ohm: ``r_internal_ohm`` (25 C, 50 % SoC, new) times three factors.

    ``r_temp_factor(temp_c) * (1 + R_LOW_SOC_GAIN * low**2) * (1 + R_GROWTH_PER_SOH_LOSS * (1 - soh))``
    with ``low = clip((R_LOW_SOC - soc) / R_LOW_SOC, 0, 1)``.
    """
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (r_internal_ohm, soc, temp_c, soh)))
    out, tmp = np.empty(arrays[0].shape), np.empty(arrays[0].shape)
    _r_pack_into(*arrays, out, tmp)
    return out


def _r_pack_into(r_internal_ohm, soc, temp_c, soh, out: np.ndarray, tmp: np.ndarray) -> None:
    _r_temp_factor_into(temp_c, out)
    out *= r_internal_ohm
    np.subtract(R_LOW_SOC, soc, out=tmp)
    tmp *= 1.0 / R_LOW_SOC
    np.clip(tmp, 0.0, 1.0, out=tmp)
    np.square(tmp, out=tmp)
    tmp *= R_LOW_SOC_GAIN
    tmp += 1.0
    out *= tmp
    np.subtract(1.0, soh, out=tmp)
    tmp *= R_GROWTH_PER_SOH_LOSS
    tmp += 1.0
    out *= tmp


def default_r_internal_ohm(capacity_kwh, n_cells_series) -> np.ndarray:
    """Pack DC resistance at 25 C, 50 % SoC, new, ohm, from size alone: ``n_s * R_CELL_OHM_AH / Q_ah * overhead``.

    ``Q_ah = capacity_kwh * 1000 / (n_s * V_CELL_NOM_V)``: cells in parallel lower resistance as
    they add capacity.
    """
    n_s = np.asarray(n_cells_series, dtype=np.float64)
    q_ah = np.asarray(capacity_kwh, dtype=np.float64) * 1000.0 / (n_s * V_CELL_NOM_V)
    return n_s * R_CELL_OHM_AH / q_ah * R_PACK_OVERHEAD


# (name, dtype, lo, hi, unit) of the per-vehicle inputs; lo/hi inclusive, None = derived default.
_FIELDS: tuple[tuple[str, str, float, float, str], ...] = (
    ("soc", "float64", 0.0, 1.0, "fraction"),
    ("capacity_kwh", "float64", 1e-3, 1000.0, "kWh"),
    ("soh", "float64", 0.0, 1.0, "fraction"),
    ("cycle_count", "float64", 0.0, 1e7, "EFC"),
    ("temp_c", "float64", -60.0, 100.0, "degC"),
    ("ambient_c", "float64", -60.0, 100.0, "degC"),
    ("cabin_offset_c", "float64", -30.0, 40.0, "K"),
    ("cabin_temp_c", "float64", -60.0, 100.0, "degC"),
    ("n_cells_series", "float64", 1.0, 1000.0, "cells"),
    ("r_internal_ohm", "float64", 1e-6, 100.0, "ohm"),
    ("c_th_j_per_k", "float64", 1.0, 1e9, "J/K"),
    ("r_th_k_per_w", "float64", 1e-6, 100.0, "K/W"),
    ("efficiency_chg", "float64", 0.01, 1.0, "fraction"),
    ("efficiency_dis", "float64", 0.01, 1.0, "fraction"),
    ("p_dis_max_kw", "float64", 0.0, 1e4, "kW"),
    ("p_chg_max_kw", "float64", 0.0, 1e4, "kW"),
    ("online", "bool", 0, 1, ""),
    ("active", "bool", 0, 1, ""),
    ("firmware_rejects_discharge", "bool", 0, 1, ""),
)

#: Telemetry fields, in wire order (see :meth:`SimFleetState.telemetry`).
TELEMETRY_FIELDS = ("soc", "p_kw", "online", "fault", "soh", "temp_c", "p_dis_max_kw", "p_chg_max_kw",
                    "v_dc", "cycle_count", "cabin_temp_c")


class SimFleetState:
    """Simulated vehicles as a structure of arrays, all of shape ``(n,)``.

    Per-vehicle inputs (each keyword a scalar broadcast to all vehicles, or an array of shape
    ``(n,)``; arrays are copied):

    ========================== ======= ==================================================================
    soc                        0..1    state of charge (fraction of usable energy ``capacity_kwh * soh``)
    capacity_kwh               kWh     nominal energy (new)
    soh                        0..1    state of health: usable / nominal capacity
    cycle_count                EFC     equivalent full cycles so far
    temp_c, ambient_c          degC    pack (lumped) and surroundings
    cabin_temp_c               degC    cabin air (default ``ambient_c + cabin_offset_c``)
    cabin_offset_c             K       where the cabin settles relative to ambient (sun, garage)
    n_cells_series             cells   96 for a 400 V class pack, 192 for 800 V
    r_internal_ohm             ohm     pack DC resistance at 25 C, 50 % SoC, new (default from size)
    c_th_j_per_k, r_th_k_per_w J/K,K/W thermal mass and resistance to ambient (default from size)
    efficiency_chg/_dis        0..1    one-way grid <-> cell efficiency, charging / discharging
    p_dis_max_kw, p_chg_max_kw kW      charger rating at the grid (magnitudes >= 0)
    online                     bool    plugged in and answering
    active                     bool    the row holds a vehicle (False: a free fleet row; never plugs in)
    firmware_rejects_discharge bool    old firmware / GB/T / early CCS: charges, never discharges
    ========================== ======= ==================================================================

    State the model keeps: ``p_kw`` (last delivered, + discharge), ``v_dc`` (last terminal voltage),
    ``discharge_rejected`` (a discharge was refused since plug-in: the gateway reports
    NODE_UNREACHABLE until the vehicle is unplugged), plus ``unplug_rate_per_h``,
    ``plug_rate_per_h`` and ``trip_soc_max`` for :meth:`churn`. ``node_ids`` is optional.
    Arrays may be changed in place between steps (a test heating a pack, a gateway replaying
    telemetry); the thermal time constants ``c_th_j_per_k * r_th_k_per_w`` are read once, here.
    """

    def __init__(self, n: int, *, node_ids: list[str] | None = None,
                 unplug_rate_per_h: float = UNPLUG_RATE_PER_H, plug_rate_per_h: float = PLUG_RATE_PER_H,
                 trip_soc_max: float = TRIP_SOC_MAX, **values):
        if not (isinstance(n, (int, np.integer)) and n >= 0):
            raise SimError(f"n={n!r}: the number of vehicles must be an integer >= 0")
        self.n = int(n)
        known = {f[0] for f in _FIELDS}
        unknown = set(values) - known
        if unknown:
            raise SimError(f"unknown field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        defaults = {
            "soc": 0.5, "capacity_kwh": 60.0, "soh": 1.0, "cycle_count": 0.0, "temp_c": 25.0,
            "ambient_c": None, "cabin_temp_c": None, "cabin_offset_c": 0.0, "n_cells_series": 96.0,
            "r_internal_ohm": None, "c_th_j_per_k": None, "r_th_k_per_w": None,
            "efficiency_chg": 0.95, "efficiency_dis": 0.95, "p_dis_max_kw": 11.0, "p_chg_max_kw": 11.0,
            "online": True, "active": True, "firmware_rejects_discharge": False,
        }
        derived = {
            "ambient_c": lambda: self.temp_c,  # in equilibrium with its surroundings
            "cabin_temp_c": lambda: self.ambient_c + self.cabin_offset_c,
            "r_internal_ohm": lambda: default_r_internal_ohm(self.capacity_kwh, self.n_cells_series),
            "c_th_j_per_k": lambda: C_TH_J_PER_K_PER_KWH * self.capacity_kwh,
            "r_th_k_per_w": lambda: 1.0 / (G_TH_W_PER_K_PER_KWH * self.capacity_kwh),
        }
        for name, dtype, lo, hi, unit in _FIELDS:
            raw = values.get(name, defaults[name])
            if raw is None:
                raw = derived[name]()
            arr = self._field(name, raw, dtype)
            if dtype != "bool":
                ok = (arr >= lo) & (arr <= hi)  # NaN fails
                if not ok.all():
                    i = int(np.argmin(ok))
                    raise SimError(f"vehicle {self._who(i, node_ids)}: {name}={float(arr[i])!r} outside {lo:g}..{hi:g}"
                                   f"{' ' + unit if unit else ''}")
            setattr(self, name, arr)
        if node_ids is not None and len(node_ids) != self.n:
            raise SimError(f"node_ids: {len(node_ids)} ids for {self.n} vehicles")
        self.node_ids = node_ids
        for name, value in (("unplug_rate_per_h", unplug_rate_per_h), ("plug_rate_per_h", plug_rate_per_h),
                            ("trip_soc_max", trip_soc_max)):
            if not (value >= 0.0 and math.isfinite(value)):
                raise SimError(f"{name}={value!r} must be a finite number >= 0")
        self.unplug_rate_per_h = float(unplug_rate_per_h)
        self.plug_rate_per_h = float(plug_rate_per_h)
        self.trip_soc_max = float(min(trip_soc_max, 1.0))
        self.online &= self.active
        self.p_kw = np.zeros(self.n)
        self.v_dc = ocv_cell_v(self.soc) * self.n_cells_series
        self.discharge_rejected = np.zeros(self.n, dtype=bool)
        self._tau_s = self.c_th_j_per_k * self.r_th_k_per_w
        self._alpha_dt: tuple[float, np.ndarray, float] | None = None
        # Work arrays for step() and bms_limits(), allocated once (see _limits_into).
        self._u, self._r, self._p_dis, self._p_chg, self._a, self._b, self._c = np.empty((7, self.n))
        self._idx = np.empty(self.n, dtype=np.intp)
        self._mask = np.empty(self.n, dtype=bool)

    def _field(self, name: str, raw, dtype: str) -> np.ndarray:
        try:
            arr = np.array(np.broadcast_to(np.asarray(raw, dtype=dtype), (self.n,)), dtype=dtype)
        except (TypeError, ValueError):
            shape = np.shape(raw)
            raise SimError(f"{name}: expected a scalar or an array of shape ({self.n},), got "
                           f"{type(raw).__name__} of shape {shape}") from None
        return arr

    def _who(self, i: int, node_ids=None) -> str:
        ids = node_ids if node_ids is not None else getattr(self, "node_ids", None)
        return f"{i} ({ids[i]!r})" if ids is not None and i < len(ids) else str(i)

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------------------ constructors
    @classmethod
    def from_fleet(cls, fleet, seed: int = 0, *, ambient_c=None, unreachable_fraction: float = 0.01,
                   low_soh_fraction: float = 0.002, hot_fraction: float = 0.002,
                   share_800v: float = 0.3, **kwargs) -> SimFleetState:
        """Simulated vehicles for the rows of a :class:`~v2grt.fleet.Fleet` (vehicle ``i`` = row ``i``).

        Copies each row's soc, capacity, soh, temperature, cycle count, charger limits (both
        directions), efficiency (both directions) and online flag; free rows become inactive
        vehicles. Then, reproducibly from ``seed``, over disjoint sets of active vehicles (counts
        ``round(fraction * n_active)``):

        - ``unreachable_fraction`` get firmware that rejects discharge (old firmware, GB/T, early CCS);
        - ``low_soh_fraction`` get a worn pack, SoH 0.60-0.72 (around the default 0.70 threshold);
        - ``hot_fraction`` are hot: pack 48-56 C, ambient 35-42 C (parked in the sun, hot depot).

        These deliberately differ from the roster: the dispatcher has to learn them from telemetry.
        ``ambient_c`` is a scalar or per-row array, or None for each pack in equilibrium with its
        surroundings (ambient = its temperature). ``share_800v`` of packs of 77 kWh and more have
        192 cells in series (800 V class, as Hyundai E-GMP), the rest 96 (400 V class). Pack
        resistance is the size-derived default times a lognormal spread of 8 % (production
        variation). Other keywords go to the constructor (churn rates, ``cabin_offset_c``, ...).
        """
        for name, value in (("unreachable_fraction", unreachable_fraction), ("low_soh_fraction", low_soh_fraction),
                            ("hot_fraction", hot_fraction), ("share_800v", share_800v)):
            if not (0.0 <= value <= 1.0):
                raise SimError(f"{name}={value!r} must be a fraction 0..1")
        n = fleet.n_rows
        rng = np.random.default_rng(seed)

        def col(name):
            return np.array(fleet.column(name), dtype=np.float64)

        active = fleet.column("active") == 1
        capacity = np.where(active, col("capacity_kwh"), 60.0)
        capacity = np.where(capacity > 0.0, capacity, 60.0)  # a free row may hold zeros
        soc, soh, temp = col("soc"), col("soh"), np.clip(col("temp_c"), -60.0, 100.0)
        n_s = np.where((capacity >= 77.0) & (rng.random(n) < share_800v), 192.0, 96.0)
        r_int = default_r_internal_ohm(capacity, n_s) * rng.lognormal(0.0, 0.08, n)
        try:
            ambient = temp.copy() if ambient_c is None else np.broadcast_to(np.asarray(ambient_c, float), (n,)).copy()
        except ValueError:
            raise SimError(f"ambient_c: expected a temperature (degC) or an array of shape ({n},), got shape "
                           f"{np.shape(ambient_c)}") from None
        firmware = np.zeros(n, dtype=bool)

        rows = rng.permutation(np.flatnonzero(active))
        counts = [round(f * rows.size) for f in (unreachable_fraction, low_soh_fraction, hot_fraction)]
        if sum(counts) > rows.size:
            raise SimError(f"unreachable/low-SoH/hot fractions add up to {sum(counts)} vehicles, more than the "
                           f"{rows.size} active rows")
        k0, k1, k2 = np.cumsum(counts)
        firmware[rows[:k0]] = True
        worn = rows[k0:k1]
        soh[worn] = rng.uniform(0.60, 0.72, worn.size)
        hot = rows[k1:k2]
        temp[hot] = rng.uniform(48.0, 56.0, hot.size)
        ambient[hot] = rng.uniform(35.0, 42.0, hot.size)
        eff = np.clip(col("efficiency"), 0.5, 1.0)
        kwargs.setdefault("cabin_offset_c", rng.uniform(-1.0, 8.0, n))
        return cls(
            n, node_ids=list(fleet.node_ids[:n]),
            soc=np.clip(soc, 0.0, 1.0), capacity_kwh=capacity, soh=np.clip(soh, 0.0, 1.0),
            cycle_count=col("cycle_count"), temp_c=temp, ambient_c=ambient, n_cells_series=n_s,
            r_internal_ohm=r_int, efficiency_chg=eff, efficiency_dis=eff,
            p_dis_max_kw=col("p_dis_max_kw"), p_chg_max_kw=col("p_chg_max_kw"),
            online=(fleet.column("online") == 1) & active, active=active,
            firmware_rejects_discharge=firmware, **kwargs,
        )

    # ---------------------------------------------------------------------------- model
    def _limits_into(self) -> None:
        """Battery-side limits now into the work arrays: OCV ``_u`` (V), resistance ``_r`` (ohm),
        BMS discharge ``_p_dis`` and charge ``_p_chg`` (kW, >= 0), before plug and firmware.

        Written with ``out=`` throughout: at 100k vehicles a fresh 800 kB temporary can cost more in
        page faults (0.3-0.6 ms measured on the 2-core target) than its arithmetic (~20 us).
        """
        u, r, p_dis, p_chg, a, b = self._u, self._r, self._p_dis, self._p_chg, self._a, self._b
        n_s, temp = self.n_cells_series, self.temp_c
        _ocv_into(self.soc, u, a, self._idx)
        u *= n_s
        _r_pack_into(self.r_internal_ohm, self.soc, temp, self.soh, r, a)
        # Max power at the voltage floor: I = (U - Vmin) / R, P = Vmin * I. Vmin > U / 2 always
        # here, so this is below the matched-load maximum U**2 / 4R and is the binding limit.
        # Charge mirrors it at the ceiling: P = Vmax * (Vmax - U) / R.
        np.multiply(n_s, V_CELL_MIN_V, out=a)
        np.subtract(u, a, out=p_dis)
        p_dis *= a
        np.multiply(n_s, V_CELL_MAX_V, out=a)
        np.subtract(a, u, out=p_chg)
        p_chg *= a
        np.multiply(r, 1000.0, out=a)  # W -> kW
        p_dis /= a
        p_chg /= a
        np.maximum(p_dis, 0.0, out=p_dis)
        np.maximum(p_chg, 0.0, out=p_chg)
        np.multiply(self.capacity_kwh, C_RATE_DIS_MAX, out=a)
        np.minimum(p_dis, a, out=p_dis)
        np.multiply(self.capacity_kwh, C_RATE_CHG_MAX, out=a)
        np.minimum(p_chg, a, out=p_chg)
        # Thermal derating: clip((T_cut - T) / (T_cut - T_derate), 0, 1), both directions.
        np.subtract(T_CUTOFF_C, temp, out=a)
        a *= 1.0 / (T_CUTOFF_C - T_DERATE_START_C)
        np.clip(a, 0.0, 1.0, out=a)
        p_dis *= a
        p_chg *= a
        # Cold charging: the convex CHG_COLD curve as the larger of its segments' lines, clipped.
        t0, t1 = CHG_COLD_TEMP_C[0], CHG_COLD_TEMP_C[1]
        np.subtract(temp, t0, out=a)
        a *= _CHG_COLD_SLOPES[0]
        a += CHG_COLD_FACTOR[0]
        np.subtract(temp, t1, out=b)
        b *= _CHG_COLD_SLOPES[1]
        b += CHG_COLD_FACTOR[1]
        np.maximum(a, b, out=a)
        np.clip(a, 0.0, 1.0, out=a)
        p_chg *= a

    def bms_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """What each vehicle's BMS reports it can do now, at the grid side: ``(p_dis_max_kw, p_chg_max_kw)``.

        Battery limits (voltage floor/ceiling through the pack resistance, C-rate caps, thermal
        derating, cold-charge limit) converted through the conversion efficiency (discharge x
        ``efficiency_dis``, charge / ``efficiency_chg``); 0 when offline. Not capped by the charger
        rating; :meth:`telemetry` reports the lower of the two. Fresh arrays, magnitudes >= 0, kW.
        """
        self._limits_into()
        p_dis = self._p_dis * self.efficiency_dis
        p_chg = self._p_chg / self.efficiency_chg
        p_dis *= self.online
        p_chg *= self.online
        return p_dis, p_chg

    def step(self, p_request_kw, dt_s: float) -> np.ndarray:
        """Apply ``p_request_kw`` (kW at the grid, + discharge, shape ``(n,)`` or scalar) for ``dt_s`` s.

        Returns the power each vehicle delivered, kW (+ discharge), a fresh array of shape ``(n,)``:
        the request clipped to the BMS limits (:meth:`bms_limits`), the charger ratings and the
        energy left (so SoC ends within 0..1 and energy is conserved exactly); 0 when offline;
        discharge 0 (charging allowed) where firmware rejects discharge, which latches
        ``discharge_rejected``. Then integrates, with the delivered power held over the step:

        - SoC: discharge, cell energy = grid energy / ``efficiency_dis``; charge, cell energy = grid
          energy * ``efficiency_chg``; over usable energy ``capacity_kwh * soh``;
        - pack temperature: ``C_th dT/dt = I**2 R - (T - T_ambient) / R_th``, stepped exactly for a
          constant heat (stable at any ``dt_s``); ``I`` from ``P = (U - I R) I``;
        - cabin temperature towards ``ambient_c + cabin_offset_c``;
        - ``cycle_count += |E_cell| / (2 * capacity_kwh)``, and SoH down by ``SOH_FADE_PER_EFC`` per
          cycle, doubling per ``AGEING_DOUBLING_K`` above 25 C.
        """
        if not (dt_s > 0.0 and math.isfinite(dt_s)):
            raise SimError(f"dt_s={dt_s!r} must be a finite number > 0 (s)")
        p_req = np.asarray(p_request_kw, dtype=np.float64)
        if p_req.shape not in ((), (self.n,)):
            raise SimError(f"p_request_kw: expected a scalar or shape ({self.n},), got shape {p_req.shape}")
        if not np.isfinite(p_req).all():
            i = int(np.argmin(np.isfinite(np.broadcast_to(p_req, (self.n,)))))
            raise SimError(f"p_request_kw: vehicle {self._who(i)} asked "
                           f"{float(np.broadcast_to(p_req, (self.n,))[i])!r} kW; expected a finite power")
        self._limits_into()
        u, r, p_dis, p_chg, a, b, c = self._u, self._r, self._p_dis, self._p_chg, self._a, self._b, self._c
        m, p = self._mask, self.p_kw
        per_h = 3600.0 / dt_s

        # Grid-side limits: the BMS's, capped by the energy the cells hold (or can take) this step,
        # through the efficiency, then by the charger; nothing offline; no discharge where the
        # firmware refuses it.
        np.multiply(self.capacity_kwh, self.soh, out=c)
        np.maximum(c, 1e-12, out=c)  # usable kWh; a dead pack (soh 0) gets 0 kW from the caps below
        np.multiply(self.soc, c, out=a)
        a *= per_h
        np.minimum(p_dis, a, out=p_dis)
        p_dis *= self.efficiency_dis
        np.minimum(p_dis, self.p_dis_max_kw, out=p_dis)
        np.subtract(1.0, self.soc, out=a)
        a *= c
        a *= per_h
        np.minimum(p_chg, a, out=p_chg)
        p_chg /= self.efficiency_chg
        np.minimum(p_chg, self.p_chg_max_kw, out=p_chg)
        p_chg *= self.online
        np.logical_not(self.firmware_rejects_discharge, out=m)
        m &= self.online
        p_dis *= m
        np.greater(p_req, 0.0, out=m)
        m &= self.firmware_rejects_discharge
        m &= self.online
        self.discharge_rejected |= m

        np.negative(p_chg, out=a)
        np.maximum(p_req, a, out=p)
        np.minimum(p, p_dis, out=p)

        # Cell-side energy: grid power through the one-way efficiency, as the kernel counts it.
        np.divide(p, self.efficiency_dis, out=a)
        np.multiply(p, self.efficiency_chg, out=b)
        np.greater(p, 0.0, out=m)
        np.copyto(b, a, where=m)  # b: cell power, kW
        np.multiply(b, 1000.0, out=p_chg)  # p_chg from here: cell power, W
        b *= 1.0 / per_h  # b: cell energy this step, kWh
        np.divide(b, c, out=a)
        self.soc -= a
        np.clip(self.soc, 0.0, 1.0, out=self.soc)

        # Terminal current from P = (U - I R) I as I = 2P / (U + sqrt(U**2 - 4RP)), the form that
        # stays exact as R -> 0 and P -> 0; the limits keep the root real (clipped for rounding).
        np.multiply(r, p_chg, out=a)
        a *= 4.0
        np.multiply(u, u, out=p_dis)
        p_dis -= a
        np.maximum(p_dis, 0.0, out=p_dis)
        np.sqrt(p_dis, out=p_dis)
        p_dis += u
        np.multiply(p_chg, 2.0, out=a)
        a /= p_dis  # a: current, A (+ discharge)
        np.multiply(a, r, out=p_dis)  # I R
        np.subtract(u, p_dis, out=self.v_dc)
        p_dis *= a  # I**2 R heat, W
        # T += (T_ss - T) * (1 - exp(-dt / tau)), T_ss = T_ambient + heat * R_th.
        a_pack, a_cabin = self._alpha(dt_s)
        p_dis *= self.r_th_k_per_w
        p_dis += self.ambient_c
        p_dis -= self.temp_c
        p_dis *= a_pack
        self.temp_c += p_dis
        np.add(self.ambient_c, self.cabin_offset_c, out=a)
        a -= self.cabin_temp_c
        a *= a_cabin
        self.cabin_temp_c += a

        np.abs(b, out=b)
        b /= self.capacity_kwh
        b *= 0.5  # equivalent full cycles this step
        self.cycle_count += b
        np.subtract(self.temp_c, 25.0, out=a)
        np.maximum(a, 0.0, out=a)
        a *= 1.0 / AGEING_DOUBLING_K
        np.exp2(a, out=a)
        a *= b
        a *= SOH_FADE_PER_EFC
        self.soh -= a
        np.maximum(self.soh, 0.0, out=self.soh)
        return p.copy()

    def step_rows(self, p_request_kw: np.ndarray, dt_s: float, rows: np.ndarray) -> np.ndarray:
        """:meth:`step` for ``rows`` only, every other vehicle as :meth:`step` leaves one that was idle and
        asked for 0 kW (its pack and cabin relax towards their ambient; nothing else moves).

        The same result as ``step(p_request_kw, dt_s)`` whenever every vehicle outside ``rows`` asks 0 kW
        and delivered 0 kW last step (then its SoC, voltage, cycle count and health do not change), at
        the cost of the model over ``rows`` plus two relaxations over the fleet: a backtest of 10,000
        vehicles where a tenth carry load steps ~3x faster. ``p_request_kw``: shape (n,) (only ``rows`` read).
        Returns the delivered power of every vehicle (0 outside ``rows``), kW, + discharge.
        """
        rows = np.asarray(rows, dtype=np.intp)
        if not (dt_s > 0.0 and math.isfinite(dt_s)):
            raise SimError(f"dt_s={dt_s!r} must be a finite number > 0 (s)")
        sub = self._subset(rows)
        delivered_rows = sub.step(np.asarray(p_request_kw, dtype=np.float64)[rows], dt_s)
        # the others, as step() moves a vehicle at 0 kW: T += (T_ambient - T) * alpha, cabin likewise
        a_pack, a_cabin = self._alpha(dt_s)
        a = self._a
        np.subtract(self.ambient_c, self.temp_c, out=a)
        a *= a_pack
        self.temp_c += a
        np.add(self.ambient_c, self.cabin_offset_c, out=a)
        a -= self.cabin_temp_c
        a *= a_cabin
        self.cabin_temp_c += a
        self.p_kw.fill(0.0)
        for name in _STEPPED:
            getattr(self, name)[rows] = getattr(sub, name)
        out = np.zeros(self.n)
        out[rows] = delivered_rows
        return out

    def _subset(self, rows: np.ndarray) -> SimFleetState:
        """A gathered copy of ``rows`` (no validation: the values were checked when this state was made)."""
        sub = object.__new__(SimFleetState)
        k = sub.n = len(rows)
        for name, *_ in _FIELDS:
            setattr(sub, name, getattr(self, name)[rows])
        for name in ("p_kw", "v_dc", "discharge_rejected", "_tau_s"):
            setattr(sub, name, getattr(self, name)[rows])
        sub.node_ids = None
        sub.unplug_rate_per_h, sub.plug_rate_per_h, sub.trip_soc_max = (self.unplug_rate_per_h, self.plug_rate_per_h,
                                                                         self.trip_soc_max)
        sub._alpha_dt = None
        sub._u, sub._r, sub._p_dis, sub._p_chg, sub._a, sub._b, sub._c = np.empty((7, k))
        sub._idx = np.empty(k, dtype=np.intp)
        sub._mask = np.empty(k, dtype=bool)
        return sub

    def _alpha(self, dt_s: float) -> tuple[np.ndarray, float]:
        """Exact first-order step fractions ``1 - exp(-dt / tau)`` for pack and cabin, cached per dt."""
        if self._alpha_dt is None or self._alpha_dt[0] != dt_s:
            self._alpha_dt = (dt_s, -np.expm1(-dt_s / self._tau_s), -math.expm1(-dt_s / CABIN_TAU_S))
        return self._alpha_dt[1], self._alpha_dt[2]

    @property
    def thermal_limit(self) -> np.ndarray:
        """Bool per vehicle: pack over ``THERMAL_LIMIT_C`` (50 C), the BMS's thermal-limit flag."""
        return self.temp_c > THERMAL_LIMIT_C

    # ---------------------------------------------------------------------------- wire
    def telemetry(self, rows=None) -> dict[str, np.ndarray]:
        """What the vehicles report, as fresh arrays keyed by :data:`TELEMETRY_FIELDS` (all vehicles, or ``rows``).

        ``p_dis_max_kw`` / ``p_chg_max_kw`` are the lower of the BMS limits and the charger rating
        (0 offline); a vehicle whose firmware rejects discharge still advertises its discharge
        limit, as such chargers do, and is found out when asked. ``fault`` (uint8, a
        :class:`~v2grt.codes.Reason`): OFFLINE when unplugged, else THERMAL_LIMIT over 50 C, else
        NODE_UNREACHABLE once a discharge has been rejected since plug-in, else OK. ``online`` is
        uint8; ``v_dc`` is the pack terminal voltage of the last step (V); ``p_kw`` the last
        delivered power (+ discharge).
        """
        p_dis, p_chg = self.bms_limits()
        np.minimum(p_dis, self.p_dis_max_kw, out=p_dis)
        np.minimum(p_chg, self.p_chg_max_kw, out=p_chg)
        fault = np.zeros(self.n, dtype=np.uint8)
        fault[self.discharge_rejected & self.online] = Reason.NODE_UNREACHABLE
        fault[self.thermal_limit] = Reason.THERMAL_LIMIT
        fault[~self.online] = Reason.OFFLINE
        out = {
            "soc": self.soc, "p_kw": self.p_kw, "online": self.online.astype(np.uint8), "fault": fault,
            "soh": self.soh, "temp_c": self.temp_c, "p_dis_max_kw": p_dis, "p_chg_max_kw": p_chg,
            "v_dc": self.v_dc, "cycle_count": self.cycle_count, "cabin_temp_c": self.cabin_temp_c,
        }
        if rows is None:
            return {k: np.array(v) for k, v in out.items()}
        rows = np.asarray(rows)
        return {k: v[rows] for k, v in out.items()}

    # ---------------------------------------------------------------------------- plugs
    def churn(self, dt_s: float, rng: np.random.Generator) -> np.ndarray:
        """Unplug and plug vehicles over ``dt_s`` s; return the rows that changed (int64, ascending).

        Each plugged vehicle leaves with probability ``1 - exp(-unplug_rate_per_h * dt)``, each
        unplugged one returns with ``1 - exp(-plug_rate_per_h * dt)`` (Poisson arrivals). A
        returning vehicle was driven: its SoC falls by U(0, ``trip_soc_max``) (not below 0), and its
        discharge rejection is forgotten (a new session is negotiated). Inactive rows never plug in.
        """
        if not (dt_s >= 0.0 and math.isfinite(dt_s)):
            raise SimError(f"dt_s={dt_s!r} must be a finite number >= 0 (s)")
        p_unplug = -math.expm1(-self.unplug_rate_per_h * dt_s / 3600.0)
        p_plug = -math.expm1(-self.plug_rate_per_h * dt_s / 3600.0)
        u = rng.random(self.n)
        leave = self.online & (u < p_unplug)
        arrive = self.active & ~self.online & (u < p_plug)
        changed = np.flatnonzero(leave | arrive)
        if changed.size:
            self.online[changed] = ~self.online[changed]
            self.p_kw[changed] = 0.0
            back = np.flatnonzero(arrive)
            self.soc[back] = np.maximum(self.soc[back] - rng.uniform(0.0, self.trip_soc_max, back.size), 0.0)
            self.discharge_rejected[back] = False
            self.v_dc[back] = ocv_cell_v(self.soc[back]) * self.n_cells_series[back]
        return changed


__all__ = [
    "TELEMETRY_FIELDS",
    "THERMAL_LIMIT_C",
    "SimError",
    "SimFleetState",
    "default_r_internal_ohm",
    "ocv_cell_v",
    "r_pack_ohm",
    "r_temp_factor",
]
