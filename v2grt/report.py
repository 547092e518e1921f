"""The demo's report: how well the fleet followed the service, as numbers (report.json) and one picture.

Pure functions over what the demo recorded (no sockets, no processes), so they can be checked on
their own. Powers are kW, positive = discharge into the grid; times are seconds since the run began.

How delivery is judged (docs/demo.md says the same for readers of the picture):

- *required response*: the service curve at the frequency the meter showed, times the contracted
  capacity (plus the base schedule): what the grid code asks for, before any fleet limit;
- *target*: what the aggregator dispatched that cycle (the required response clamped to what the
  fleet could give), from its status topic;
- *delivered*: the sum of the site inverters' measured output (the simulated vehicles' actual
  power), sampled one control period after each target so that the cycle's own setpoints count;
- *tolerance band*: the lowest and highest required response over the service's full-activation
  time before each instant (a response may lag by that much), widened by ``tolerance`` of the
  contracted capacity on both sides. For GB Dynamic Containment that is 1 s and 3 %: a
  simplification of the service's performance envelope, not its settlement formula.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from v2grt.services import ServiceCurve

#: Share of the contracted capacity the delivered power may deviate from the envelope (GB DC: 3 %).
DEFAULT_TOLERANCE = 0.03
#: Envelope width when a service states no full-activation time, s.
DEFAULT_WINDOW_S = 1.0


@dataclasses.dataclass
class Recording:
    """What the demo recorded during a run (arrays of one length per group, times in s since the start)."""

    # one sample per aggregator status message (one per cycle heard)
    t_s: np.ndarray
    f_agg_hz: np.ndarray  # the frequency the aggregator used, NaN when it had none
    target_kw: np.ndarray
    delivered_tel_kw: np.ndarray  # the aggregator's own sum of telemetry p_kw
    available_dis_kw: np.ndarray
    available_chg_kw: np.ndarray
    n_active: np.ndarray
    # what the simulated meter showed
    meter_t_s: np.ndarray
    meter_f_hz: np.ndarray
    # site-power reports: time, gateway index, that gateway's total output (kW)
    site_t_s: np.ndarray
    site_gw: np.ndarray
    site_kw: np.ndarray
    n_gateways: int
    # the service
    curve: ServiceCurve
    capacity_kw: float
    base_kw: float = 0.0
    period_s: float = 0.1
    tolerance: float = DEFAULT_TOLERANCE


def held(t_events: np.ndarray, values: np.ndarray, t_query: np.ndarray, before: float = 0.0) -> np.ndarray:
    """The newest value at or before each query time (``before`` where none is yet); events ascending."""
    idx = np.searchsorted(t_events, t_query, side="right") - 1
    out = np.where(idx >= 0, values[np.maximum(idx, 0)] if len(values) else before, before)
    return out.astype(np.float64)


def metered_kw(rec: Recording, t_query: np.ndarray) -> np.ndarray:
    """Fleet output at each query time: the sum over gateways of each one's newest site-power report."""
    total = np.zeros(len(t_query))
    for g in range(rec.n_gateways):
        mine = rec.site_gw == g
        total += held(rec.site_t_s[mine], rec.site_kw[mine], t_query)
    return total


def required_kw(curve: ServiceCurve, f_hz: np.ndarray, capacity_kw: float, base_kw: float = 0.0) -> np.ndarray:
    """``base_kw + curve(f_hz) * capacity_kw`` (the static curve; the end values hold beyond its ends)."""
    return base_kw + np.interp(f_hz, curve.f_hz, curve.fraction) * capacity_kw


def deadband_hz(curve: ServiceCurve) -> tuple[float, float] | None:
    """The frequency range around nominal where the curve asks for nothing, or None if it has none."""
    zero = curve.f_hz[curve.fraction == 0.0]
    below, above = zero[zero <= curve.nominal_hz], zero[zero >= curve.nominal_hz]
    if not (below.size and above.size) or below.min() >= above.max():
        return None
    return float(below.min()), float(above.max())


def tolerance_band(t_s: np.ndarray, required: np.ndarray, window_s: float, tol_kw: float):
    """(lo, hi): min and max of ``required`` over ``(t - window_s, t]`` at each sample, minus/plus ``tol_kw``."""
    start = np.searchsorted(t_s, t_s - window_s, side="right")
    lo = np.empty(len(t_s))
    hi = np.empty(len(t_s))
    for i, s in enumerate(start.tolist()):
        w = required[s:i + 1]
        lo[i] = w.min()
        hi[i] = w.max()
    return lo - tol_kw, hi + tol_kw


def derive(rec: Recording) -> dict[str, np.ndarray]:
    """The per-sample series of the report (on the status time grid), also written as timeseries.csv."""
    t = rec.t_s
    f_meter = np.interp(t, rec.meter_t_s, rec.meter_f_hz) if len(rec.meter_t_s) else np.full(len(t), np.nan)
    req = required_kw(rec.curve, f_meter, rec.capacity_kw, rec.base_kw)
    window_s = rec.curve.full_activation_s or DEFAULT_WINDOW_S
    lo, hi = tolerance_band(t, req, window_s, rec.tolerance * rec.capacity_kw)
    return {
        "t_s": t, "f_meter_hz": f_meter, "f_aggregator_hz": rec.f_agg_hz, "required_kw": req,
        "target_kw": rec.target_kw, "delivered_kw": metered_kw(rec, t + rec.period_s),
        "delivered_now_kw": metered_kw(rec, t), "delivered_telemetry_kw": rec.delivered_tel_kw,
        "band_lo_kw": lo, "band_hi_kw": hi, "available_dis_kw": rec.available_dis_kw,
        "available_chg_kw": rec.available_chg_kw, "n_active": rec.n_active.astype(np.float64),
    }


def tracking_summary(rec: Recording, s: dict[str, np.ndarray]) -> dict:
    """Tracking error against the target and time inside the tolerance band (see the module docstring)."""
    t = s["t_s"]
    n = len(t)
    if n < 2:
        return {"samples": n}
    # the last period has no "one period later" delivered value yet
    ok = t + rec.period_s <= max(t[-1], rec.site_t_s.max() if len(rec.site_t_s) else t[-1])
    err = s["delivered_kw"][ok] - s["target_kw"][ok]
    inside = (s["band_lo_kw"] <= s["delivered_now_kw"]) & (s["delivered_now_kw"] <= s["band_hi_kw"])
    dt = np.diff(t)
    d = s["delivered_now_kw"]
    seg = (d[1:] + d[:-1]) / 2.0 * dt  # trapezoids, kW*s
    cap = rec.capacity_kw or math.nan
    return {
        "samples": int(n),
        "mae_kw": float(np.mean(np.abs(err))) if err.size else None,
        "rmse_kw": float(np.sqrt(np.mean(err ** 2))) if err.size else None,
        "max_abs_error_kw": float(np.max(np.abs(err))) if err.size else None,
        "mae_pct_of_capacity": float(100.0 * np.mean(np.abs(err)) / cap) if err.size else None,
        "mean_abs_target_kw": float(np.mean(np.abs(s["target_kw"]))),
        "mean_abs_required_kw": float(np.mean(np.abs(s["required_kw"]))),
        "within_tolerance_share": float(np.mean(inside)),
        "tolerance_kw": float(rec.tolerance * rec.capacity_kw),
        "tolerance_window_s": float(rec.curve.full_activation_s or DEFAULT_WINDOW_S),
        "energy_kwh": {"net_discharged": float(seg.sum() / 3600.0),
                       "discharged": float(np.clip(seg, 0.0, None).sum() / 3600.0),
                       "charged": float(-np.clip(seg, None, 0.0).sum() / 3600.0)},
    }


# ------------------------------------------------------------------------------------- per protocol
#: An applied setpoint counts for latency when it moved at least this much from the device's previous
#: one: above both protocol gateways' deadbands (OCPP 0.5 kW, SunSpec 0.2 kW), whose smaller moves wait
#: for the gateway's refresh by design (docs/gateways.md) and would time the refresh, not the path.
LATENCY_MIN_MOVE_KW = 1.0
#: Two setpoints within this are the same (OCPP rounds to 1 W, 704 WSet to 1 W, the wire carries float32).
SETPOINT_MATCH_KW = 0.002


@dataclasses.dataclass
class SetpointLog:
    """One gateway's setpoint messages as the demo received them, and what its devices applied.

    ``values`` holds one column per node (``columns`` maps node id to column), or a single column
    with the message's sum for a gateway that applies whole messages at once (``v2grt gateway sim``,
    whose ``applied`` entries then carry the sum it runs at, node id ``""``).
    """

    pub_t_ns: np.ndarray  # (m,) int64, the message's t_ns (UTC, the aggregator's publish time)
    values: np.ndarray  # (m, k) kW, + discharge
    columns: dict[str, int]
    applied: list[tuple[str, int, float]]  # (node id, UTC ns, kW) as the devices applied them


def publish_to_applied_ms(log: SetpointLog, *, since_ns: int = 0, until_ns: int = 2**63 - 1,
                          min_move_kw: float = LATENCY_MIN_MOVE_KW,
                          match_kw: float = SETPOINT_MATCH_KW) -> tuple[np.ndarray, int]:
    """(latencies in ms, count unmatched) from each setpoint's first publish to a device applying it.

    For every setpoint applied between ``since_ns`` and ``until_ns`` (UTC) that moved at least
    ``min_move_kw`` from that device's previous one (over all of ``log.applied``: a device re-applying
    the value it holds, as the gateways' refreshes make it, is no move):
    the newest message at or before the apply time that asked for that value (within ``match_kw``),
    then the first message of the unbroken run asking for it: the time from that message's publish
    to the apply. Unmatched: no such message (the gateway clamped the value to the EV's limits, or
    the run began before the demo listened).
    """
    out: list[float] = []
    unmatched = 0
    previous: dict[str, float] = {}
    t_pub = log.pub_t_ns
    for node, t_ns, kw in log.applied:
        before = previous.get(node, 0.0)
        previous[node] = kw
        col = log.columns.get(node)
        if col is None or abs(kw - before) < min_move_kw or not since_ns <= t_ns <= until_ns:
            continue
        k = int(np.searchsorted(t_pub, t_ns, side="right")) - 1
        if k < 0:
            continue  # applied before the first message the demo heard: not ours to time
        close = np.abs(log.values[: k + 1, col] - kw) <= match_kw
        hits = np.flatnonzero(close)
        if not hits.size:
            unmatched += 1
            continue
        k1 = int(hits[-1])
        breaks = np.flatnonzero(~close[: k1 + 1])
        if not breaks.size:
            unmatched += 1  # asked for since before the demo listened: its first publish is unknown
            continue
        out.append((t_ns - int(t_pub[breaks[-1] + 1])) / 1e6)
    return np.asarray(out, dtype=np.float64), unmatched


def percentiles_ms(samples: np.ndarray) -> dict:
    """p50, p99, max and the count (None for an empty sample)."""
    if not len(samples):
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    return {"p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99)),
            "max": float(samples.max()), "samples": int(len(samples))}


def protocol_series(rec: Recording, groups: dict[str, list[int]], sp_t_s: np.ndarray, sp_gw: np.ndarray,
                    sp_kw: np.ndarray, sp_carrying: np.ndarray) -> dict[str, np.ndarray]:
    """Per protocol, on the status grid: its setpoints' sum (as published), what its sites delivered
    (now and one period later) and how many of its vehicles had a non-zero setpoint.

    ``groups``: protocol -> gateway indexes; ``sp_*``: one entry per setpoint message received.
    """
    t = rec.t_s
    out: dict[str, np.ndarray] = {}
    for name, gws in groups.items():
        setpoint = np.zeros(len(t))
        carrying = np.zeros(len(t))
        delivered = np.zeros(len(t))
        later = np.zeros(len(t))
        for g in gws:
            mine = sp_gw == g
            setpoint += held(sp_t_s[mine], sp_kw[mine], t)
            carrying += held(sp_t_s[mine], sp_carrying[mine], t)
            site = rec.site_gw == g
            delivered += held(rec.site_t_s[site], rec.site_kw[site], t)
            later += held(rec.site_t_s[site], rec.site_kw[site], t + rec.period_s)
        out[f"setpoint_{name}_kw"] = setpoint
        out[f"delivered_{name}_kw"] = delivered
        out[f"delivered_later_{name}_kw"] = later
        out[f"carrying_{name}"] = carrying
    return out


def protocol_summary(name: str, s: dict[str, np.ndarray], t_s: np.ndarray, *, vehicles: int, fleet_vehicles: int,
                     dispatched: int, latency_ms: np.ndarray, unmatched: int) -> dict:
    """One protocol's row of report.json (see docs/demo.md)."""
    sp, d, later = s[f"setpoint_{name}_kw"], s[f"delivered_{name}_kw"], s[f"delivered_later_{name}_kw"]
    seg = (d[1:] + d[:-1]) / 2.0 * np.diff(t_s) if len(t_s) > 1 else np.zeros(0)
    err = later - sp
    return {
        "vehicles": int(vehicles), "share_pct": 100.0 * vehicles / max(fleet_vehicles, 1),
        "dispatched_vehicles": int(dispatched),
        "carrying_mean": float(np.mean(s[f"carrying_{name}"])) if len(t_s) else 0.0,
        "carrying_max": int(np.max(s[f"carrying_{name}"])) if len(t_s) else 0,
        "setpoint_mean_abs_kw": float(np.mean(np.abs(sp))) if len(t_s) else 0.0,
        "delivered_mean_abs_kw": float(np.mean(np.abs(d))) if len(t_s) else 0.0,
        "delivered_max_abs_kw": float(np.max(np.abs(d))) if len(t_s) else 0.0,
        "mae_kw": float(np.mean(np.abs(err))) if len(t_s) else None,
        "energy_kwh": {"discharged": float(np.clip(seg, 0.0, None).sum() / 3600.0),
                       "charged": float(-np.clip(seg, None, 0.0).sum() / 3600.0)},
        "latency_ms": {**percentiles_ms(latency_ms), "unmatched": int(unmatched),
                       "min_move_kw": LATENCY_MIN_MOVE_KW},
    }


def write_timeseries(path: str | Path, s: dict[str, np.ndarray]) -> None:
    """The derived series as CSV, one row per status sample."""
    keys = list(s)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(",".join(keys) + "\n")
        for row in zip(*(s[k] for k in keys), strict=True):
            fh.write(",".join("" if not math.isfinite(v) else f"{v:.6g}" for v in map(float, row)) + "\n")


def write_json(path: str | Path, summary: dict) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, allow_nan=False, default=_plain) + "\n", encoding="utf-8")


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------------------- picture
def plot(path: str | Path, s: dict[str, np.ndarray], summary: dict, *, soc_before: np.ndarray,
         soc_after: np.ndarray, cycle_hist: dict | None, minimum_soc: float = 0.20,
         latency_ms: dict[str, np.ndarray] | None = None) -> None:
    """One page (PNG): frequency; required, target, delivered and the band; tracking error; per protocol,
    delivered against setpoints and the publish-to-applied latency; SoC; cycle times.

    ``cycle_hist``: ``{"le_ms": [...], "counts": [...]}`` non-cumulative counts per bucket upper bound
    (the aggregator's Prometheus histogram), or None; ``summary`` supplies titles and percentile marks,
    and ``summary["protocols"]`` the per-protocol rows (series ``setpoint_<p>_kw``, ``delivered_<p>_kw``
    in ``s``); ``latency_ms``: each protocol's latency samples.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    t = s["t_s"]
    protocols = summary.get("protocols") or {}
    fig = plt.figure(figsize=(12, 13.5), dpi=90)
    gs = GridSpec(5, 2, figure=fig, height_ratios=[1.0, 1.6, 0.8, 1.2, 1.25], hspace=0.48, wspace=0.22,
                  left=0.07, right=0.98, top=0.93, bottom=0.05)
    tr = summary.get("tracking", {})
    cyc = summary.get("cycle_ms", {})
    behind = " + ".join(f"{p} {row['vehicles']:,}" for p, row in protocols.items())
    fig.suptitle(
        f"v2grt demo: {summary['vehicles']:,} simulated vehicles ({behind}) behind {summary['gateway_processes']} "
        f"gateway processes, "
        f"{summary['service_title']}\n"
        f"{summary['duration_s']:.0f} s, frequency trace at {summary['speed']:g}x; "
        f"{summary.get('cycles', 0):,} cycles, p99 {cyc.get('p99', float('nan')):.2f} ms, "
        f"{summary.get('deadline_misses', 0)} deadline misses; "
        f"in tolerance {100 * tr.get('within_tolerance_share', float('nan')):.1f} % of the time",
        fontsize=11)

    ax_f = fig.add_subplot(gs[0, :])
    ax_f.plot(t, s["f_meter_hz"], color="#1f4e79", lw=1.0, label="grid meter (trace)")
    ax_f.set_ylabel("frequency, Hz")
    nominal = summary.get("nominal_hz", 50.0)
    ax_f.axhline(nominal, color="0.6", lw=0.7, ls=":")
    if summary.get("deadband_hz"):
        lo, hi = summary["deadband_hz"]
        ax_f.axhspan(lo, hi, color="0.85", alpha=0.6, lw=0, label=f"deadband of {summary['service']}: no response")
    ax_f.legend(loc="upper right", fontsize=8)
    ax_f.grid(alpha=0.3)
    ax_f.set_title("Grid frequency the simulated meter served over Modbus (SunSpec model 213)", fontsize=9,
                   loc="left")

    ax_p = fig.add_subplot(gs[1, :], sharex=ax_f)
    scale, unit = (1e3, "MW") if np.nanmax(np.abs(np.r_[s["band_hi_kw"], s["band_lo_kw"], 1.0])) >= 2e3 else (1.0, "kW")
    ax_p.fill_between(t, s["band_lo_kw"] / scale, s["band_hi_kw"] / scale, color="#9ecae1", alpha=0.45, lw=0,
                      label=f"tolerance band (+-{100 * summary.get('tolerance', DEFAULT_TOLERANCE):g} % of capacity, "
                            f"{tr.get('tolerance_window_s', DEFAULT_WINDOW_S):g} s lag)")
    ax_p.plot(t, s["required_kw"] / scale, color="k", lw=1.0, ls="--", label="required response")
    ax_p.plot(t, s["target_kw"] / scale, color="#ff7f0e", lw=1.2, label="target (aggregator)")
    ax_p.plot(t, s["delivered_kw"] / scale, color="#2ca02c", lw=1.2, label="delivered (site inverters)")
    ax_p.plot(t, s["delivered_telemetry_kw"] / scale, color="#2ca02c", lw=0.8, ls=":", alpha=0.8,
              label="delivered (gateway telemetry)")
    ax_p.set_ylabel(f"power, {unit} (+ discharge)")
    ax_p.grid(alpha=0.3)
    ax_p.legend(loc="upper right", fontsize=8, ncol=2)
    ax_p.set_title(f"Fleet response; contracted capacity {summary['capacity_kw'] / 1e3:,.1f} MW", fontsize=9,
                   loc="left")

    ax_e = fig.add_subplot(gs[2, :], sharex=ax_f)
    err = s["delivered_kw"] - s["target_kw"]
    ax_e.plot(t, err, color="#d62728", lw=0.8)
    ax_e.axhline(0.0, color="0.5", lw=0.7)
    ax_e.set_ylabel("error, kW")
    ax_e.set_xlabel("time since start, s")
    ax_e.grid(alpha=0.3)
    mae = tr.get("mae_kw")
    ax_e.set_title("Delivered minus target, one control period later"
                   + (f": mean |error| {mae:,.1f} kW ({tr.get('mae_pct_of_capacity', 0):.3f} % of capacity)"
                      if mae is not None else ""), fontsize=9, loc="left")

    _plot_protocols(fig, gs[3, :], ax_f, s, protocols, latency_ms or {})

    ax_s = fig.add_subplot(gs[4, 0])
    bins = np.linspace(0.0, 1.0, 41)
    ax_s.hist(soc_before, bins=bins, histtype="stepfilled", alpha=0.35, color="#1f77b4", label="before")
    ax_s.hist(soc_after, bins=bins, histtype="step", lw=1.5, color="#d62728", label="after")
    ax_s.axvline(minimum_soc, color="0.3", ls="--", lw=0.8)
    ax_s.text(minimum_soc, ax_s.get_ylim()[1] * 0.92, " minimum SoC", fontsize=8, color="0.3")
    ax_s.set_xlabel("state of charge")
    ax_s.set_ylabel("vehicles")
    d_mean = (np.mean(soc_after) - np.mean(soc_before)) if len(soc_after) and len(soc_before) else float("nan")
    ax_s.set_title(f"SoC of every vehicle before and after (mean change {100 * d_mean:+.3f} percentage points)",
                   fontsize=9, loc="left")
    ax_s.legend(fontsize=8)
    ax_s.grid(alpha=0.3)

    ax_c = fig.add_subplot(gs[4, 1])
    budget_ms = summary.get("budget_ms", 100.0)
    if cycle_hist and sum(cycle_hist["counts"]):
        le = np.asarray(cycle_hist["le_ms"], float)
        counts = np.asarray(cycle_hist["counts"], float)
        lo_edges = np.r_[le[0] / 2.0, le[:-1]]
        ax_c.bar(lo_edges, counts, width=le - lo_edges, align="edge", color="#9467bd", alpha=0.7,
                 edgecolor="#5b3a8a", label="cycles per bucket")
        ax_c.set_xscale("log")
        ax_c.set_yscale("log")
        ax_c.set_ylabel("cycles")
    else:
        ax_c.text(0.5, 0.5, "no cycle-time histogram\n(aggregator metrics endpoint unavailable)",
                  ha="center", va="center", transform=ax_c.transAxes, fontsize=9)
        ax_c.set_xscale("log")
    for key, style in (("p50", ":"), ("p99", "--"), ("max", "-.")):
        if cyc.get(key) is not None:
            ax_c.axvline(cyc[key], color="k", ls=style, lw=0.9, label=f"{key} {cyc[key]:.2f} ms")
    ax_c.axvline(budget_ms, color="#d62728", lw=1.2, label=f"budget {budget_ms:g} ms")
    ax_c.set_xlabel("cycle time (inputs + kernel + publish), ms")
    ax_c.set_title("Aggregator cycle times in the run (its Prometheus histogram; marks: whole life)", fontsize=9,
                   loc="left")
    ax_c.legend(fontsize=8, loc="upper right")
    ax_c.grid(alpha=0.3, which="both")

    fig.savefig(path, dpi=90)
    plt.close(fig)


_PROTOCOL_COLOURS = {"sim": "#2ca02c", "ocpp": "#1f77b4", "sunspec": "#9467bd"}


def _plot_protocols(fig, cell, ax_time, s: dict[str, np.ndarray], protocols: dict, latency_ms: dict) -> None:
    """One panel per protocol (its setpoints as published, its sites' delivered power) and one of latencies."""
    from matplotlib.gridspec import GridSpecFromSubplotSpec

    if not protocols:
        return
    sub = GridSpecFromSubplotSpec(1, len(protocols) + 1, subplot_spec=cell, wspace=0.28)
    t = s["t_s"]
    for k, (name, row) in enumerate(protocols.items()):
        ax = fig.add_subplot(sub[0, k], sharex=ax_time)
        colour = _PROTOCOL_COLOURS.get(name, "k")
        ax.plot(t, s[f"setpoint_{name}_kw"], color="#ff7f0e", lw=1.0, label="setpoints")
        ax.plot(t, s[f"delivered_{name}_kw"], color=colour, lw=1.0, label="delivered (sites)")
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_title(f"{name}: {row['vehicles']:,} vehicles ({row['share_pct']:.1f} %), "
                     f"{row['dispatched_vehicles']:,} dispatched", fontsize=8, loc="left")
        ax.set_xlabel("time since start, s", fontsize=8)
        if k == 0:
            ax.set_ylabel("power, kW (+ discharge)")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax = fig.add_subplot(sub[0, len(protocols)])
    for name, row in protocols.items():
        ms = np.sort(np.asarray(latency_ms.get(name, []), float))
        lat = row["latency_ms"]
        if ms.size:
            ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", color=_PROTOCOL_COLOURS.get(name, "k"),
                    label=f"{name}: p50 {lat['p50']:.0f}, p99 {lat['p99']:.0f} ms (n {lat['samples']})")
    ax.set_xscale("log")
    ax.set_xlabel("setpoint publish to applied at the device, ms", fontsize=8)
    ax.set_ylabel("share of moves", fontsize=8)
    ax.set_title(f"Latency of setpoint moves >= {LATENCY_MIN_MOVE_KW:g} kW", fontsize=8, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")


__all__ = ["DEFAULT_TOLERANCE", "LATENCY_MIN_MOVE_KW", "SETPOINT_MATCH_KW", "Recording", "SetpointLog", "deadband_hz",
           "derive", "held", "metered_kw", "percentiles_ms", "plot", "protocol_series", "protocol_summary",
           "publish_to_applied_ms", "required_kw", "tolerance_band", "tracking_summary", "write_json",
           "write_timeseries"]
