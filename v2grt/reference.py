"""The dispatch kernel in plain NumPy: slow and obvious, the specification the Cython kernel must equal.

Same names and docstrings as v2grt._core. Where _core is clever (histogram ranking, counting sort,
early exits) this twin is direct (a full lexsort, group-wise cumulative sums), so a property test that
the two agree checks the cleverness against the obvious.
"""

from __future__ import annotations

import math

import numpy as np

from v2grt._buffers import (
    MIN_SETPOINT_KW,
    T_ALLOCATED,
    T_AVAIL_CHG,
    T_AVAIL_DIS,
    T_FEASIBLE_CHG,
    T_FEASIBLE_DIS,
    T_N_CARRYING,
    T_REQUEST,
    T_TARGET,
)
from v2grt.codes import Reason
from v2grt.profile import RANK_BUCKETS

BACKEND = "reference"

#: The precision of the per-vehicle arithmetic (availability, windows, rank score): the fleet's measured
#: columns are float32 (v2grt.fleet), and so are the compiled kernel's block arithmetic and these. Every
#: profile value that meets a column is rounded to float32 once (``_f32``), as the kernel holds it, so the
#: two compute the same operations in the same order and agree bit for bit; sums over vehicles are in
#: float64 in both (in another order, so they agree to rounding).
F32 = np.float32


def _f32(x):
    """A profile value as the kernel's block arithmetic holds it (float32; inf stays inf)."""
    with np.errstate(over="ignore"):
        return np.float32(x)


def dispatch(fleet, profile, request_kw, now_ns, dt_s, estop, out, work, pin_row=-1, pin_kw=0.0):
    """Turn a fleet request into one setpoint per node for this cycle.

    Parameters
    ----------
    fleet : Fleet
        The fleet table; rows ``[0, fleet.n_rows)`` and sites ``[0, fleet.n_sites)`` are read.
        Nothing in it is modified.
    profile : DispatchProfile
        Battery limits, ranking weights and policy.
    request_kw : float
        kW asked of the fleet (base schedule + service response); + discharge into the grid.
    now_ns : int
        CLOCK_MONOTONIC ns of this cycle: a row whose ``fleet.telemetry_tick`` is below
        ``fleet.stale_tick(now_ns, profile.stale_after_s)`` is stale (its telemetry is more than
        stale_after_s old, in whole ticks of 1 ms).
    dt_s : float
        Seconds since the previous cycle, for ramp limits.
    estop : bool
        Emergency stop: every node to 0 kW with reason EMERGENCY_STOP.
    out : KernelOutput
        Caller-owned outputs (capacity >= n_rows): ``setpoint_kw`` (+ discharge), ``avail_dis_kw``,
        ``avail_chg_kw`` (magnitudes), ``reason`` (uint8 Reason), ``totals`` (T_* indices) and
        ``reason_counts`` (rows per reason code).
    work : Workspace
        Caller-owned scratch space.
    pin_row, pin_kw : int, float
        One node held at pin_kw this cycle (a test discharge), outside the ranking; -1: none.

    Notes
    -----
    Availability per node is ``min(p_max * f_soc * f_temp, energy above the floor * efficiency /
    endurance)``, zero for excluded nodes; the window a node may take this cycle is that availability
    cut by the node ramp (only rises of |power| are limited). The target is the request limited by the
    fleet ramp, then clamped to ``[-feasible_chg, feasible_dis]``, where feasible sums each site's
    windows capped by the site limit. Under ``merit`` the target is filled greedily in rank order
    (rank bucket descending, then row ascending), each node taking ``min(window, site remainder,
    target remainder)``; under ``prorata`` every node takes the same fraction of its site-capped window.
    All nodes move in the target's direction: none charges while another discharges.

    A pinned node, if it is not excluded, gets ``pin_kw`` limited to its availability (not to its
    ramp window) and is left out of the ranking; that power takes its share of its site's limit in its
    direction, widens what the fleet can give that way, and counts toward the target when it goes the
    target's way (the others fill the rest). The one exception to the one-direction rule: a pin
    against the target's direction is kept, and the fleet total then misses the target by it.
    """
    n = fleet.n_rows
    n_sites = fleet.n_sites
    p = profile
    sl = slice(0, n)
    active = fleet.active[sl]
    site = fleet.site[sl].astype(np.int64)
    soc = fleet.soc[sl]
    soh = fleet.soh[sl]
    capacity_kwh = fleet.capacity_kwh[sl]
    p_dis_max_kw = fleet.p_dis_max_kw[sl]
    p_chg_max_kw = fleet.p_chg_max_kw[sl]
    temp_c = fleet.temp_c[sl]
    cycle_count = fleet.cycle_count[sl]
    efficiency = fleet.efficiency[sl]
    last_kw = fleet.last_setpoint_kw[sl]

    # -- exclusions, first applicable reason wins --------------------------------------------------
    site_ok = (site >= 0) & (site < n_sites)
    site_fault = np.where(site_ok, fleet.site_fault[np.clip(site, 0, max(n_sites - 1, 0))] if n_sites else 0, 0)
    # Every value finite (one sum: NaN or inf anywhere, or an overflowing sum, makes total - total NaN)
    # and in range; the same definition as _core (in float32, as the columns), so both exclude exactly the
    # same rows.
    with np.errstate(invalid="ignore", over="ignore"):
        total = soc + soh + capacity_kwh + p_dis_max_kw + p_chg_max_kw + temp_c + efficiency + cycle_count
        valid = (
            site_ok
            & (total - total == 0.0)
            & (soc >= 0.0) & (soc <= 1.0)
            & (soh >= 0.0) & (soh <= 1.0)
            & (capacity_kwh > 0.0)
            & (p_dis_max_kw >= 0.0) & (p_chg_max_kw >= 0.0)
            & (efficiency > 0.0) & (efficiency <= 1.0)
            & (cycle_count >= 0.0)
        )
    soh_threshold, temp_min_c, temp_max_c = _f32(p.soh_threshold), _f32(p.temp_min_c), _f32(p.temp_max_c)
    minimum_soc, maximum_soc = _f32(p.minimum_soc), _f32(p.maximum_soc)
    stale = fleet.telemetry_tick[sl] < fleet.stale_tick(now_ns, p.stale_after_s)
    reason = np.select(
        [
            active == 0,
            np.full(n, bool(estop)),
            fleet.online[sl] == 0,
            fleet.fault[sl] != 0,
            site_fault != 0,
            ~valid,
            stale,
            soh < soh_threshold,
            (temp_c < temp_min_c) | (temp_c > temp_max_c),
        ],
        [
            Reason.EMPTY,
            Reason.EMERGENCY_STOP,
            Reason.OFFLINE,
            fleet.fault[sl],
            site_fault,
            Reason.INVALID_TELEMETRY,
            Reason.TIMEOUT_BMS_RESPONSE,
            Reason.SOH_BELOW_THRESHOLD,
            Reason.THERMAL_LIMIT,
        ],
        default=Reason.OK,
    ).astype(np.uint8)
    ok = reason == Reason.OK

    # -- availability: tapered near the SoC limits and the temperature edges, bounded by endurance ----
    # float32 throughout, in the kernel's operation order (see F32).
    zero = F32(0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        f_temp = temperature_factor(temp_c, p)
        f_soc_dis = _taper(soc - minimum_soc, p.soc_taper)
        f_soc_chg = _taper(maximum_soc - soc, p.soc_taper)
        usable_kwh = capacity_kwh * soh
        per_endurance = _f32(3600.0 / p.endurance_s)
        p_energy_dis_kw = np.maximum((soc - minimum_soc) * usable_kwh * efficiency * per_endurance, zero)
        p_energy_chg_kw = np.maximum((maximum_soc - soc) * usable_kwh / efficiency * per_endurance, zero)
        avail_dis = np.where(ok, np.minimum(p_dis_max_kw * f_soc_dis * f_temp, p_energy_dis_kw), zero)
        avail_chg = np.where(ok, np.minimum(p_chg_max_kw * f_soc_chg * f_temp, p_energy_chg_kw), zero)
    reason[ok & (avail_dis == 0.0) & (soc <= minimum_soc)] = Reason.SOC_BELOW_MINIMUM
    reason[ok & (avail_chg == 0.0) & (soc >= maximum_soc)] = Reason.SOC_ABOVE_MAXIMUM

    # -- ramp windows: a node's |power| may rise by ramp*dt; it may always fall, at once --------------
    ramp_kw = _f32(_ramp(p.node_ramp_kw_per_s, dt_s))
    hi = np.minimum(avail_dis, np.maximum(last_kw, zero) + ramp_kw)
    lo = np.minimum(avail_chg, np.maximum(-last_kw, zero) + ramp_kw)
    # a window of a mW or less is no window, and no capacity: gone before the site sums see it
    min_kw = _f32(MIN_SETPOINT_KW)
    hi = np.where(hi > min_kw, hi, zero)
    lo = np.where(lo > min_kw, lo, zero)
    # From here on float64, as the kernel's allocation: the windows' values are exact in it.
    hi, lo = hi.astype(np.float64), lo.astype(np.float64)
    export_kw = fleet.site_export_kw[:n_sites].copy()
    import_kw = fleet.site_import_kw[:n_sites].copy()

    # -- a pinned node: fixed power, out of the ranking, its share of its site's limit taken ----------
    pinned = 0.0
    pin_ok = 0 <= pin_row < n and bool(ok[pin_row])
    if pin_ok:
        pinned = min(max(pin_kw, -float(avail_chg[pin_row])), float(avail_dis[pin_row]))
        pinned = pinned if abs(pinned) > MIN_SETPOINT_KW else 0.0
        hi[pin_row] = lo[pin_row] = 0.0
        s = site[pin_row]
        if pinned > 0.0:
            export_kw[s] = max(export_kw[s] - pinned, 0.0)
        elif pinned < 0.0:
            import_kw[s] = max(import_kw[s] + pinned, 0.0)
    ranked = ok.copy()
    if pin_ok:
        ranked[pin_row] = False

    site_hi = np.bincount(site[ranked], weights=hi[ranked], minlength=n_sites)[:n_sites]
    site_lo = np.bincount(site[ranked], weights=lo[ranked], minlength=n_sites)[:n_sites]
    feasible_dis = float(np.minimum(export_kw, site_hi).sum())
    feasible_chg = float(np.minimum(import_kw, site_lo).sum())

    # -- target: the request, limited by the fleet ramp, clamped to what the fleet can give ----------
    prev_kw = float(last_kw.sum(dtype=np.float64))
    if estop or not math.isfinite(request_kw):
        target = 0.0
    else:
        fleet_ramp_kw = _ramp(p.fleet_ramp_kw_per_s, dt_s)
        target = min(max(request_kw, prev_kw - fleet_ramp_kw), prev_kw + fleet_ramp_kw)
        # never flips the sign; a pin widens what the fleet can give in its direction
        target = min(max(target, -(feasible_chg + max(-pinned, 0.0))), feasible_dis + max(pinned, 0.0))

    # -- allocation --------------------------------------------------------------------------------
    setpoint = np.zeros(n)
    remaining = 0.0
    if target != 0.0:
        # the ranked nodes fill what the pin, going the target's way, leaves
        remaining = max(abs(target) - max(pinned * math.copysign(1.0, target), 0.0), 0.0)
    if remaining > MIN_SETPOINT_KW:
        discharging = target > 0.0
        window = hi if discharging else lo
        site_window = site_hi if discharging else site_lo
        site_cap = export_kw if discharging else import_kw
        take = np.zeros(n)
        part = np.flatnonzero(ranked & (window > 0.0))
        if p.policy == "prorata":
            with np.errstate(divide="ignore", invalid="ignore"):
                site_scale = np.where(site_window > site_cap, site_cap / site_window, 1.0)
            eff = window[part] * site_scale[site[part]]
            fraction = min(remaining / eff.sum(), 1.0) if len(part) else 0.0
            take[part] = eff * fraction
        else:
            q = rank_buckets(fleet, profile, sl, f_temp, discharging)
            order = part[np.lexsort((part, -q[part].astype(np.int64)))]  # best bucket first, then row
            # Greedy fill in that order, each node taking min(window, site remainder, fleet remainder),
            # written as group-wise cumulative sums: first cap every node by what its site has left
            # after the better-ranked nodes of the same site ...
            by_site = order[np.argsort(site[order], kind="stable")]
            w = window[by_site]
            before = np.cumsum(w) - w
            first_of_site = np.r_[True, site[by_site][1:] != site[by_site][:-1]]
            group_start = np.maximum.accumulate(np.where(first_of_site, np.arange(len(by_site)), 0))
            before_in_site = before - before[group_start]
            eff = np.zeros(n)
            eff[by_site] = np.clip(site_cap[site[by_site]] - before_in_site, 0.0, w)
            # ... then fill the fleet target in rank order over those effective windows.
            e = eff[order]
            take[order] = np.clip(remaining - (np.cumsum(e) - e), 0.0, e)
        take[take <= MIN_SETPOINT_KW] = 0.0  # float residue of the fill, not power
        setpoint = take if discharging else -take
    if pin_ok:
        setpoint[pin_row] = pinned

    out.setpoint_kw[:n] = setpoint
    out.avail_dis_kw[:n] = avail_dis
    out.avail_chg_kw[:n] = avail_chg
    out.reason[:n] = reason
    out.reason_counts[:] = np.bincount(reason, minlength=len(out.reason_counts))
    t = out.totals
    t[T_REQUEST] = request_kw
    t[T_TARGET] = target
    t[T_ALLOCATED] = setpoint.sum()
    t[T_FEASIBLE_DIS] = feasible_dis
    t[T_FEASIBLE_CHG] = feasible_chg
    t[T_AVAIL_DIS] = avail_dis.sum(dtype=np.float64)
    t[T_AVAIL_CHG] = avail_chg.sum(dtype=np.float64)
    t[T_N_CARRYING] = np.count_nonzero(setpoint)


def rank_buckets(fleet, profile, sl, f_temp, discharging):
    """Rank bucket per node (higher = dispatched first), as _core computes it bit for bit (in float32).

    score = w_soc * (soc if discharging else 1 - soc) + w_cycles * (1 - min(cycles / cycles_ref, 1))
            + w_soh * soh + w_temp * f_temp + (hysteresis if already carrying load that way),
    quantised to RANK_BUCKETS levels over [0, 1 + hysteresis].
    """
    p = profile
    soc = fleet.soc[sl]
    last_kw = fleet.last_setpoint_kw[sl]
    carrying = last_kw > 0.0 if discharging else last_kw < 0.0
    one = F32(1.0)
    soc_term = soc if discharging else one - soc
    wear = one - np.minimum(fleet.cycle_count[sl] * _f32(1.0 / p.cycles_ref), one)
    score = (_f32(p.w_soc) * soc_term + _f32(p.w_cycles) * wear + _f32(p.w_soh) * fleet.soh[sl]
             + _f32(p.w_temp) * f_temp)
    score = np.where(carrying, score + _f32(p.hysteresis), score)
    scale = _f32((RANK_BUCKETS - 1) / (1.0 + p.hysteresis))
    with np.errstate(invalid="ignore"):
        q = np.nan_to_num(score * scale, nan=0.0)
    return np.clip(q, 0, RANK_BUCKETS - 1).astype(np.int64)


def temperature_factor(temp_c, profile):
    """1 inside the comfortable window, tapering linearly to 0 over temp_derate_c at each edge."""
    p = profile
    return (_taper(temp_c - _f32(p.temp_min_c), p.temp_derate_c)
            * _taper(_f32(p.temp_max_c) - temp_c, p.temp_derate_c))


def _taper(x, band):
    """0 at x <= 0, rising linearly to 1 at x >= band (a step at 0 when band is 0).

    Multiplies by the reciprocal of band, as _core does, so both round alike.
    """
    zero, one = F32(0.0), F32(1.0)
    if band > 0.0:
        return np.minimum(np.maximum(x * _f32(1.0 / band), zero), one)
    return np.where(x > zero, one, zero)


def _ramp(rate_kw_per_s, dt_s):
    """kW a ramp rate allows in dt_s (inf stays inf, even for dt_s == 0)."""
    if math.isinf(rate_kw_per_s):
        return math.inf
    return 0.0 if rate_kw_per_s == 0.0 else rate_kw_per_s * max(dt_s, 0.0)  # not 0 * inf = NaN


def stream_roofline(fleet, out):
    """Read every column the kernel reads and write every per-node output once, doing no real work.

    A measuring stick for benchmarks (see _core.stream_roofline); NumPy streams one column at a time.
    """
    n = fleet.n_rows
    names = ("soc", "soh", "capacity_kwh", "p_dis_max_kw", "p_chg_max_kw", "temp_c", "cycle_count", "efficiency",
             "last_setpoint_kw", "telemetry_tick", "active", "online", "fault", "site")
    acc = float(sum(getattr(fleet, name)[:n].sum() for name in names))
    for arr in (out.setpoint_kw, out.avail_dis_kw, out.avail_chg_kw, out.reason):
        arr[:n] = 0
    return acc


class JournalTap:
    """The dispatch journal's per-cycle copy on the control thread, in NumPy (the specification of
    v2grt._core.JournalTap: same methods, same bytes in the ring and the slots).

    ``record`` writes one cycle record into a slot of the journal's ring (a structured array of
    ``v2grt.journal.cycle_dtype``); ``stripe`` copies one stripe of the vehicles' setpoint, reported power
    (float64 in, float32 out) and reason into a slot, with its meta row (t_ns, seq, a, b, version).
    """

    def __init__(self, ring, inv):
        self.ring = ring
        self.inv = inv
        self.has_inv = "inverter_kw" in ring.dtype.fields

    def bind_slots(self, v_sp, v_p, v_reason, v_meta):
        """The stripe slots: float32 (slots, rows) x 2, uint8 (slots, rows), int64 (slots, 5)."""
        self.v_sp, self.v_p, self.v_reason, self.v_meta = v_sp, v_p, v_reason, v_meta

    def record(self, slot, t_ns, epoch, seq, published, f_hz, f_age_ms, frequency_stale, service_fraction,
               capacity_kw, request_kw, target_kw, allocated_kw, delivered_kw, available_dis_kw, available_chg_kw,
               n_carrying, estop, test_row, test_kw, cycle_work_ms, counts):
        """Write one record into ring[slot]; site_measured_kw = sum of ``inv`` (NaN with no inverter);
        reasons = counts[:16] (int64 in, int32 out). Returns nothing."""
        inv = self.inv
        n_reasons = self.ring.dtype.fields["reasons"][0].shape[0]
        rec = (t_ns, epoch, seq, published, f_hz, f_age_ms, frequency_stale, service_fraction, capacity_kw,
               request_kw, target_kw, allocated_kw, delivered_kw, inv.sum() if len(inv) else math.nan,
               available_dis_kw, available_chg_kw, n_carrying, estop, test_row, test_kw, cycle_work_ms,
               np.asarray(counts[:n_reasons]).astype(np.int32))
        self.ring[slot] = rec + (inv,) if self.has_inv else rec

    def stripe(self, slot, a, b, t_ns, seq, version, setpoints_kw, p_kw, reasons):
        """Copy rows [a, b) of the three columns into slot ``slot`` (setpoint and power as float32) and its
        meta row (t_ns, seq, a, b, version)."""
        m = b - a
        self.v_sp[slot, :m] = setpoints_kw[a:b]
        self.v_p[slot, :m] = p_kw[a:b]
        self.v_reason[slot, :m] = reasons[a:b]
        self.v_meta[slot] = (t_ns, seq, a, b, version)
