"""One backtest run: the live Dispatcher and the simulated vehicles stepped in simulated time over a trace.

Each step of ``period_s`` is the live control cycle's phases, with the network taken out:

1. plug events up to now (v2grt.backtest.plugs): arrivals set their SoC, departures go offline;
2. telemetry into the fleet table, as a gateway's batch writes it (v2grt.ingest.apply): SoC, online,
   fault, reported power and the receive time every step; SoH, temperature, cycle count and the BMS
   limits every ``slow_every`` steps (the `optimized` telemetry profile's slow keys);
3. ``Dispatcher.step`` (the live dispatcher, profile, service curve and compiled kernel);
4. the cycle into the journal (v2grt.journal's writer and format, in simulated UTC time);
5. the setpoints through the gateway/charger delay model (v2grt.backtest.delay) into the battery and
   thermal models (v2grt.sim.battery.SimFleetState.step), which give what each vehicle delivered.

Powers are kW, + = discharge into the grid.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from v2grt.backtest.delay import DelayModel
from v2grt.backtest.plugs import PlugPattern, Sessions, sessions
from v2grt.codes import Reason
from v2grt.config import JournalConfig
from v2grt.dispatch import Dispatcher
from v2grt.fleet import Fleet
from v2grt.journal import Journal
from v2grt.profile import DispatchProfile
from v2grt.services import get_service
from v2grt.sim.battery import THERMAL_LIMIT_C, SimFleetState
from v2grt.sim.traces import Trace

#: CLOCK_MONOTONIC of the first step (any value > the staleness limit works: the kernel compares differences).
_MONO0_NS = 10**12
#: Default dead time from a setpoint leaving the aggregator to the charger acting on it, s: the live path
#: (publish and gateway hop, measured p99 under one period plus 10 ms: docs/benchmarks.md "e2e") plus a
#: charger control loop of ~0.1-0.2 s (ISO 15118-20 / OCPP 2.1 bidirectional chargers answer within 0.1-1 s;
#: GB DC asks for a start within 0.5 s). A model choice: set --delay-s from a charger's own step test.
DEFAULT_DELAY_S = 0.25
#: Default time for a charger to ramp through its full rating, s (power electronics ramp in ~0.1-0.5 s).
DEFAULT_RAMP_S = 0.5


class BacktestError(ValueError):
    """A backtest that cannot run as asked; the message names the option and the value."""


@dataclasses.dataclass
class Settings:
    """What one backtest variant runs (the CLI's flags; docs/backtest.md)."""

    trace: Trace
    service: str = "dc"
    vehicles: int = 10_000
    hours: float = 5.0
    trace_start_s: float = 0.0
    period_s: float | None = None  # None: the trace's median step, at most 1 s (1 s for the CE trace)
    seed: int = 0
    profile: dict = dataclasses.field(default_factory=dict)  # DispatchProfile keys
    capacity_kw: float | None = None  # None: the least the plugged-in fleet holds both ways over the window
    base_kw: float = 0.0
    delay_s: float = DEFAULT_DELAY_S
    ramp_s: float = DEFAULT_RAMP_S  # 0: outputs step at once
    plugs: bool = True  # the daily plug-in pattern; False: the fleet's own online flags throughout
    roster: Path | None = None  # a roster CSV instead of Fleet.random(vehicles, seed)
    vehicle_interval_s: float = 60.0  # the journal's per-vehicle sampling (changes only)
    sample_s: float = 60.0  # the SoC / reason time series of the report
    slow_every: int = 10  # steps between slow telemetry (SoH, temperature, BMS limits)


@dataclasses.dataclass
class Result:
    """What a run produced: the summary (JSON-ready), per-step and sampled series, per-vehicle wear."""

    summary: dict
    steps: dict  # per step: t_s, f_hz, required_kw, target_kw, measured_kw (at the cycle), delivered_kw (mean)
    samples: dict  # every sample_s: t_s, soc percentiles, plugged, reasons
    wear: dict  # per vehicle: throughput_kwh, efc, carried (bool)
    journal_dir: Path
    step_ns: np.ndarray  # wall time of each step (kernel, vehicles, journal), ns
    kernel_ns: np.ndarray  # of which Dispatcher.step, ns


def build_fleet(s: Settings) -> Fleet:
    if s.roster is not None:
        fleet = Fleet.from_csv(s.roster, now_ns=_MONO0_NS)
    else:
        if not 1 <= s.vehicles <= 1_000_000:
            raise BacktestError(f"--vehicles {s.vehicles}: expected 1..1,000,000")
        groups = max(1, math.ceil(s.vehicles / 500))
        fleet = Fleet.random(s.vehicles, seed=s.seed, n_gateways=groups, n_sites=groups, now_ns=_MONO0_NS)
    return fleet


def _local_start_h(trace: Trace, offset_s: float) -> float:
    """Local hour of day at the window's start (the trace's own clock and offset; 0 h if it has none)."""
    if trace.start is None:
        return (offset_s / 3600.0) % 24.0
    t = trace.start + _dt.timedelta(seconds=offset_s)
    return t.hour + t.minute / 60.0 + t.second / 3600.0


def _utc0_ns(trace: Trace, offset_s: float) -> int:
    if trace.start is None:
        start = _dt.datetime(2019, 1, 1, tzinfo=_dt.timezone.utc)
    else:
        start = trace.start if trace.start.tzinfo else trace.start.replace(tzinfo=_dt.timezone.utc)
    return int(round((start.timestamp() + offset_s) * 1e9))


class Backtest:
    """Set up one variant (fleet, vehicles, sessions, dispatcher, journal); ``run()`` steps it to the end."""

    def __init__(self, s: Settings, journal_dir: Path, *, pattern: PlugPattern | None = None):
        self.s = s
        # default: the trace's step, at most 1 s (a coarser trace is interpolated, as the demo's meter does: a 10 s
        # step would put 10 s between a setpoint and the meter reading that shows it)
        self.period_s = float(s.period_s or min(s.trace.dt_s, 1.0))
        if not (0.01 <= self.period_s <= 60.0):
            raise BacktestError(f"--period-s {self.period_s}: expected 0.01..60 s")
        if not (0.0 < s.hours and math.isfinite(s.hours)):
            raise BacktestError(f"--hours {s.hours}: expected a number of hours > 0")
        self.duration_s = s.hours * 3600.0
        self.t0_s = float(s.trace.t_s[0] + s.trace_start_s)
        if s.trace_start_s < 0 or self.t0_s + self.duration_s > s.trace.t_s[-1] + 1e-6:
            raise BacktestError(f"--hours {s.hours} from --trace-start-s {s.trace_start_s:g}: the trace "
                                f"{s.trace.source} holds {s.trace.duration_s / 3600.0:.2f} h")
        self.steps = int(round(self.duration_s / self.period_s))
        self.curve = get_service(s.service)
        self.profile = DispatchProfile().replace(**s.profile)
        self.fleet = fleet = build_fleet(s)
        n = self.n = fleet.n_rows
        # the vehicles: the fleet's rows through the battery/thermal model, churn off (the plug pattern plugs)
        self.sim = SimFleetState.from_fleet(fleet, s.seed, unplug_rate_per_h=0.0, plug_rate_per_h=0.0)
        self._mask = np.zeros(n, bool)
        self.sessions: Sessions | None = None
        if s.plugs:
            self.sessions = sessions(n, _local_start_h(s.trace, s.trace_start_s), self.duration_s, s.seed, pattern)
            plugged = self.sessions.plugged_at(n, 0.0)
            at_start = (self.sessions.arrive_s <= 0.0) & (self.sessions.depart_s > 0.0)
            self.sim.soc[self.sessions.vehicle[at_start]] = self.sessions.soc_arrive[at_start]
            self.sim.online[:] = plugged & self.sim.active
        self._tel_slow()
        fleet.last_telemetry_ns[:n] = _MONO0_NS
        self.capacity_kw = s.capacity_kw if s.capacity_kw is not None else self._default_capacity()
        self.dispatcher = Dispatcher(fleet, self.profile, service=self.curve, capacity_kw=self.capacity_kw,
                                     period_s=self.period_s)
        rate = np.maximum(self.sim.p_dis_max_kw, self.sim.p_chg_max_kw) / s.ramp_s if s.ramp_s > 0 else math.inf
        self.delay = DelayModel(n, self.period_s, s.delay_s, rate)
        # one simulated site meter (inverter) per site: its measured power is its vehicles' output now
        self.site_of_row = np.asarray(fleet.site[:n], np.int64)
        self.n_sites = fleet.n_sites
        self.journal_dir = Path(journal_dir)
        shutil.rmtree(self.journal_dir, ignore_errors=True)  # a run's journal holds that run only
        # hourly segments on the simulated UTC clock as live; no retention, no Parquet child during the run
        # (`v2grt journal convert` converts them after); a ring of 600 s of records for the writer's passes
        cfg = JournalConfig(enabled=True, dir=str(self.journal_dir), rotate_s=3600.0, flush_interval_s=1.0,
                            vehicles=True, vehicle_interval_s=max(s.vehicle_interval_s, self.period_s),
                            max_age_h=None, max_size_gb=None, parquet=False, buffer_s=600.0)
        self.journal = Journal(cfg, self.journal_dir, fleet=fleet, epoch=1, fleet_id="backtest",
                               period_s=self.period_s, inverter_names=[f"inv-{x}" for x in fleet.site_ids],
                               inverter_sites=list(fleet.site_ids),
                               meta={"service": self.curve.name, "capacity_kw": self.capacity_kw, "backtest": {
                                   "trace": str(s.trace.source), "trace_start_s": s.trace_start_s,
                                   "delay_s": s.delay_s, "ramp_s": s.ramp_s, "seed": s.seed,
                                   "profile": self.profile.to_dict(), "plugs": s.plugs}})
        self.utc0_ns = _utc0_ns(s.trace, s.trace_start_s)

    # ------------------------------------------------------------------------------ telemetry
    def _tel_fast(self, rows: np.ndarray | None = None) -> None:
        """What every telemetry batch carries (SoC, online, fault, power), written as v2grt.ingest.apply writes
        it, for ``rows`` (None: all). Each step only the vehicles the battery model stepped or the plug
        pattern moved change: the others' values are those already in the table."""
        f, sim = self.fleet, self.sim
        sl = slice(0, self.n) if rows is None else rows
        f.soc[sl] = sim.soc[sl]
        f.online[sl] = sim.online[sl]
        f.p_actual_kw[sl] = sim.p_kw[sl]
        # fault as SimFleetState.telemetry() reports it (OFFLINE over THERMAL_LIMIT over NODE_UNREACHABLE)
        on = sim.online[sl]
        fault = np.where(~on, np.uint8(Reason.OFFLINE), np.where(
            sim.temp_c[sl] > THERMAL_LIMIT_C, np.uint8(Reason.THERMAL_LIMIT),
            np.where(sim.discharge_rejected[sl], np.uint8(Reason.NODE_UNREACHABLE), np.uint8(0))))
        f.fault[sl] = fault

    def _tel_slow(self) -> None:
        """The slow keys (SoH, temperature, cycle count, BMS limits), and the fast ones of every vehicle."""
        f, sim, n = self.fleet, self.sim, self.n
        p_dis, p_chg = sim.bms_limits()
        f.p_dis_max_kw[:n] = np.minimum(p_dis, sim.p_dis_max_kw)
        f.p_chg_max_kw[:n] = np.minimum(p_chg, sim.p_chg_max_kw)
        f.soh[:n] = sim.soh
        f.temp_c[:n] = sim.temp_c
        f.cycle_count[:n] = sim.cycle_count
        self._tel_fast()

    def _default_capacity(self) -> float:
        """The least the fleet can hold both ways at any quarter hour of the window (plugged as the sessions
        say, SoC as at arrival): what an aggregator could offer for the whole window."""
        probe = Dispatcher(self.fleet, self.profile, service=self.curve, capacity_kw=0.0, period_s=self.period_s)
        if self.sessions is None:
            return probe.deliverable_kw()
        n, online, soc = self.n, self.fleet.online[: self.n].copy(), self.fleet.soc[: self.n].copy()
        best = math.inf
        order = np.argsort(self.sessions.arrive_s, kind="stable")  # later sessions win: the newest SoC
        try:
            for t in np.arange(0.0, self.duration_s + 1.0, 900.0):
                plugged = self.sessions.plugged_at(n, t) & self.sim.active
                on = order[(self.sessions.arrive_s[order] <= t) & (self.sessions.depart_s[order] > t)]
                self.fleet.soc[self.sessions.vehicle[on]] = self.sessions.soc_arrive[on]
                self.fleet.online[:n] = plugged
                best = min(best, probe.deliverable_kw())
        finally:
            self.fleet.online[:n] = online
            self.fleet.soc[:n] = soc
        return float(best)

    # ------------------------------------------------------------------------------ plug events
    def _plug(self, rows_on: np.ndarray, soc_on: np.ndarray, rows_off: np.ndarray) -> None:
        sim = self.sim
        if len(rows_off):
            sim.online[rows_off] = False
            sim.p_kw[rows_off] = 0.0
            self.delay.forget(rows_off)
        if len(rows_on):
            keep = sim.active[rows_on]  # a free roster row never plugs in
            rows_on, soc_on = rows_on[keep], soc_on[keep]
            sim.online[rows_on] = True
            sim.soc[rows_on] = soc_on
            sim.p_kw[rows_on] = 0.0
            sim.discharge_rejected[rows_on] = False
            self.delay.forget(rows_on)

    # ------------------------------------------------------------------------------ the run
    def run(self, progress: Callable[[int, int], None] | None = None) -> Result:
        s, sim, fleet, n, P = self.s, self.sim, self.fleet, self.n, self.period_s
        steps = self.steps
        t_rel = np.arange(steps) * P
        f_hz = s.trace.at(self.t0_s + t_rel)
        f_hz = f_hz + (self.curve.nominal_hz - s.trace.nominal_hz)
        floor = self.profile.minimum_soc
        period_ns = int(round(P * 1e9))
        # plug events as (time, session, kind), consumed in order
        if self.sessions is not None:
            ev_t, ev_i, ev_kind = self.sessions.events()
            ev_row, ev_soc = self.sessions.vehicle[ev_i], self.sessions.soc_arrive[ev_i]
            e = int(np.searchsorted(ev_t, 0.0, side="right"))  # events up to t = 0 are in the start state
        else:
            ev_t = np.zeros(0)
            e = 0
        sample_every = max(1, int(round(s.sample_s / P)))
        n_samples = steps // sample_every + 1
        q = (0, 1, 5, 25, 50, 75, 95, 100)
        samp = {"t_s": np.zeros(n_samples), "soc_pct": np.zeros((n_samples, len(q))), "plugged": np.zeros(n_samples),
                "reasons": np.zeros((n_samples, 256), np.int64), "carrying": np.zeros(n_samples)}
        out = {k: np.zeros(steps) for k in ("target_kw", "measured_kw", "delivered_kw", "request_kw", "fraction",
                                            "available_dis_kw", "available_chg_kw")}
        throughput_kwh = np.zeros(n)
        carried = np.zeros(n, bool)
        efc0 = sim.cycle_count.copy()
        breaches = 0
        breach_vehicles = np.zeros(n, bool)
        min_soc_discharging = math.inf
        site_kw = np.zeros(self.n_sites)
        kernel_ns = np.zeros(steps, np.int64)
        step_ns = np.zeros(steps, np.int64)  # wall time of each whole step (the bench's tails)
        soc_min_plugged = math.inf
        h = P / 3600.0
        journal = self.journal
        # Warm-up: one cycle at the first sample, not journaled, whose setpoints every charger is taken to hold
        # already (the fleet was answering the service before the window began; a run from 0 kW would score a
        # first-step miss that no running fleet has).
        r0 = self.dispatcher.step(float(f_hz[0]), now_ns=_MONO0_NS - period_ns, base_kw=s.base_kw)
        self.delay.settle(r0.setpoints_kw)
        np.copyto(sim.p_kw, self.delay.p_kw)
        stepped = np.flatnonzero(sim.p_kw)  # vehicles with power now (the battery model steps them)
        self._tel_fast(stepped)
        # a writer pass every 30 s of simulated time, not every step (the journal caps it at its stripe slots)
        journal.start(thread=False, every=max(1, int(round(30.0 / P))))
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        k_s = 0
        t_prev = time.perf_counter_ns()
        try:
            for k in range(steps):
                t = k * P
                now_ns = _MONO0_NS + k * period_ns
                if e < len(ev_t) and ev_t[e] <= t:
                    e1 = int(np.searchsorted(ev_t, t, side="right"))
                    kind = ev_kind[e:e1]
                    rows, socs = ev_row[e:e1], ev_soc[e:e1]
                    # in time order: a vehicle's departure and a later arrival in one step resolve to plugged
                    for j in range(len(kind)):  # few per step (at 10,000 vehicles ~1 a second at the peaks)
                        if kind[j] > 0:
                            self._plug(rows[j:j + 1], socs[j:j + 1], rows[:0])
                        else:
                            self._plug(rows[:0], socs[:0], rows[j:j + 1])
                    e = e1
                    stepped = np.union1d(stepped, rows)  # their telemetry changed too
                if k % s.slow_every == 0 and k:
                    self._tel_slow()
                else:
                    self._tel_fast(stepped)
                fleet.last_telemetry_ns[:n] = now_ns  # every vehicle reports every step (a batch a second)
                t_k = time.perf_counter_ns()
                r = self.dispatcher.step(float(f_hz[k]), now_ns=now_ns, base_kw=s.base_kw)
                kernel_ns[k] = time.perf_counter_ns() - t_k
                # every non-zero output is a vehicle stepped last step (the others stayed at 0 kW)
                site_kw[:] = np.bincount(self.site_of_row[stepped], weights=self.delay.p_kw[stepped],
                                         minlength=self.n_sites)
                measured = float(site_kw.sum())
                journal.record_cycle(r, t_ns=self.utc0_ns + k * period_ns, epoch=1, seq=k + 1, published=True,
                                     f_age_ms=0.0, frequency_stale=False, capacity_kw=self.capacity_kw,
                                     delivered_kw=float(fleet.p_actual_kw[stepped].sum()), inverter_kw=site_kw,
                                     work_ms=math.nan)  # no real cycle here: the journal stays deterministic
                out["target_kw"][k] = r.target_kw
                out["request_kw"][k] = r.request_kw
                out["fraction"][k] = r.service_fraction
                out["measured_kw"][k] = measured
                out["available_dis_kw"][k] = r.feasible_dis_kw
                out["available_chg_kw"][k] = r.feasible_chg_kw
                if k % sample_every == 0:
                    on = sim.online
                    samp["t_s"][k_s] = t
                    samp["soc_pct"][k_s] = np.percentile(sim.soc[on], q) if on.any() else np.nan
                    samp["plugged"][k_s] = on.sum()
                    samp["reasons"][k_s] = r.nodes_per_reason
                    samp["carrying"][k_s] = r.n_carrying
                    if on.any():
                        soc_min_plugged = min(soc_min_plugged, float(sim.soc[on].min()))
                    k_s += 1
                # the setpoints through the gateway/charger delay into the batteries
                p_mean = self.delay.advance(r.setpoints_kw)
                # the battery model over the vehicles with power now or asked for; the rest only cool (step_rows)
                stepped = np.flatnonzero((p_mean != 0.0) | (sim.p_kw != 0.0))
                delivered = sim.step_rows(p_mean, P, stepped)
                d_s = delivered[stepped]
                limited = d_s != p_mean[stepped]  # the BMS, plug or firmware held the output: it holds it now
                if limited.any():
                    self.delay.p_kw[stepped[limited]] = d_s[limited]
                np.copyto(sim.p_kw, self.delay.p_kw)  # telemetry reports the output at the step's end
                out["delivered_kw"][k] = d_s.sum()
                throughput_kwh[stepped] += np.abs(d_s) * h
                dis = d_s > 1e-9
                if dis.any():
                    soc_dis = sim.soc[stepped[dis]]
                    low = soc_dis < floor
                    if low.any():
                        breaches += int(low.sum())
                        breach_vehicles[stepped[dis][low]] = True
                    min_soc_discharging = min(min_soc_discharging, float(soc_dis.min()))
                carried[stepped[d_s != 0.0]] = True
                t_now = time.perf_counter_ns()
                step_ns[k] = t_now - t_prev
                t_prev = t_now
                if progress is not None:
                    progress(k + 1, steps)
        finally:
            journal.stop()
        wall_s = time.perf_counter() - wall0
        cpu_s = time.process_time() - cpu0
        for key in samp:
            samp[key] = samp[key][:k_s]
        efc = sim.cycle_count - efc0
        t_steps = np.arange(steps) * P
        steps_out = {"t_s": t_steps, "f_hz": f_hz, **out}
        summary = {
            "service": self.curve.name, "vehicles": int(n), "hours": s.hours, "period_s": P, "steps": steps,
            "trace": str(s.trace.source), "trace_start_s": s.trace_start_s,
            "start_utc": _dt.datetime.fromtimestamp(self.utc0_ns / 1e9, _dt.timezone.utc).isoformat(),
            "capacity_kw": self.capacity_kw, "base_kw": s.base_kw, "delay_s": s.delay_s, "ramp_s": s.ramp_s,
            "plugs": s.plugs, "seed": s.seed, "profile": self.profile.to_dict(),
            "wall_s": wall_s, "speed_x": self.duration_s / wall_s if wall_s > 0 else None,
            "cpu_s": cpu_s, "speed_cpu_x": self.duration_s / cpu_s if cpu_s > 0 else None,
            "kernel_ms": {"p50": float(np.percentile(kernel_ns, 50) / 1e6),
                          "p99": float(np.percentile(kernel_ns, 99) / 1e6)},
            "energy_kwh": {"net_discharged": float(out["delivered_kw"].sum() * h),
                           "target_net": float(out["target_kw"].sum() * h),
                           "throughput": float(throughput_kwh.sum())},
            "soc": {"minimum_soc": floor,
                    "min_plugged_sampled": soc_min_plugged if math.isfinite(soc_min_plugged) else None,
                    "min_while_discharging": min_soc_discharging if math.isfinite(min_soc_discharging) else None,
                    "floor_breaches": breaches, "floor_breach_vehicles": int(breach_vehicles.sum())},
            "journal": {"dir": str(self.journal_dir), "records": journal.counters.records,
                        "vehicle_rows": journal.counters.vehicle_rows, "segments": journal.counters.segments,
                        "dropped": journal.counters.dropped},
        }
        wear = {"throughput_kwh": throughput_kwh, "efc": efc, "carried": carried, "active": sim.active.copy()}
        return Result(summary, steps_out, samp, wear, self.journal_dir, step_ns, kernel_ns)


__all__ = ["DEFAULT_DELAY_S", "DEFAULT_RAMP_S", "Backtest", "BacktestError", "Result", "Settings", "build_fleet"]
