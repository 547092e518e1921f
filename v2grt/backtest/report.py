"""The backtest's report: a summary per variant (JSON) and one picture with the variants side by side (pure).

Delivery is judged here as the demo judges it (v2grt.report): the required response is the service
curve at the trace's frequency times the contracted capacity (plus the base schedule); a step is in
tolerance when the power the site meters measure at the cycle lies within the lowest and highest
required response over the service's full-activation time before it, widened by ``tolerance`` of the
capacity. The settlement-grade scoring is v2grt.score's (``score`` in the summary), from the journal.
"""

from __future__ import annotations

import math

import numpy as np

from v2grt import report as demo_report
from v2grt.codes import reason_names

#: Percentiles of the plugged-in vehicles' SoC kept every sample (engine.run's ``q``).
SOC_PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 100)


def tracking(steps: dict, curve, capacity_kw: float, base_kw: float, tolerance: float) -> dict:
    """Steps within the tolerance band, and the energy delivered versus required (kWh, + discharge)."""
    t = steps["t_s"]
    req = demo_report.required_kw(curve, steps["f_hz"], capacity_kw, base_kw)
    window_s = curve.full_activation_s or demo_report.DEFAULT_WINDOW_S
    lo, hi = band(t, req, window_s, tolerance * capacity_kw)
    m = steps["measured_kw"]
    inside = (lo <= m) & (m <= hi)
    dt_h = (t[1] - t[0]) / 3600.0 if len(t) > 1 else 0.0
    worst = np.maximum(lo - m, m - hi)
    return {"steps": int(len(t)), "within_tolerance_share": float(inside.mean()) if len(t) else None,
            "steps_outside": int((~inside).sum()), "tolerance_kw": tolerance * capacity_kw,
            "window_s": window_s, "worst_outside_kw": float(max(worst.max(), 0.0)) if len(t) else 0.0,
            "energy_required_kwh": float(req.sum() * dt_h),
            "energy_delivered_kwh": float(steps["delivered_kw"].sum() * dt_h),
            "_inside": inside, "_required_kw": req, "_lo": lo, "_hi": hi}


def band(t_s: np.ndarray, required: np.ndarray, window_s: float, tol_kw: float):
    """v2grt.report.tolerance_band on a uniform grid, vectorised: min/max of ``required`` over ``(t - w, t]``."""
    if len(t_s) < 2:
        return required - tol_kw, required + tol_kw
    dt = t_s[1] - t_s[0]
    w = max(1, int(math.floor(window_s / dt + 1e-9)))  # samples in (t - window, t]
    pad = np.concatenate([np.full(w - 1, required[0]), required])
    view = np.lib.stride_tricks.sliding_window_view(pad, w)
    return view.min(axis=1) - tol_kw, view.max(axis=1) + tol_kw


def wear(w: dict) -> dict:
    """Per-vehicle energy throughput and equivalent full cycles of the run, over the vehicles that took part."""
    active = w["active"]
    thr, efc = w["throughput_kwh"][active], w["efc"][active]
    carried = w["carried"][active]

    def dist(x):
        if not len(x):
            return None
        return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
                "max": float(x.max()), "cv": float(x.std() / x.mean()) if x.mean() > 0 else None}

    return {"vehicles_carrying_any": int(carried.sum()),
            "share_carrying_any": float(carried.mean()) if len(carried) else None,
            "throughput_kwh": dist(thr), "efc": dist(efc), "efc_total": float(efc.sum())}


def reasons_over_time(samples: dict) -> dict:
    """Vehicles by reason name at each sample (EMPTY and all-zero codes left out)."""
    counts = samples["reasons"]
    codes = np.flatnonzero(counts.sum(axis=0))
    return {name: counts[:, c].astype(int).tolist() for c, name in zip(codes, reason_names(codes)) if name != "EMPTY"}


def revenue(price_eur_per_mw_h: float | None, capacity_kw: float, hours: float, share: float | None) -> dict | None:
    """Availability revenue at a price per MW per hour: contracted, and scaled by the share of time in tolerance
    (a simplification: real contracts reduce payment per settlement period by their own performance formula)."""
    if price_eur_per_mw_h is None:
        return None
    contracted = price_eur_per_mw_h * capacity_kw / 1e3 * hours
    return {"price_eur_per_mw_h": price_eur_per_mw_h, "contracted_eur": contracted,
            "performance_scaled_eur": contracted * share if share is not None else None}


def plot(path, variants: list[dict]) -> None:
    """One page: per variant (columns) the response, SoC over time, vehicles by reason, per-vehicle wear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(variants)
    fig, axes = plt.subplots(5, k, figsize=(6.5 * k + 1.0, 15), dpi=90, squeeze=False,
                             gridspec_kw={"height_ratios": [0.8, 1.3, 1.1, 1.1, 1.0], "hspace": 0.45, "wspace": 0.22,
                                          "left": 0.07, "right": 0.98, "top": 0.92, "bottom": 0.04})
    first = variants[0]["summary"]
    fig.suptitle(f"v2grt backtest: {first['vehicles']:,} vehicles, {first['service']} over {first['hours']:g} h of "
                 f"{str(first['trace']).split('/')[-1]}\n"
                 + "   |   ".join(f"{v['label']}: in tolerance "
                                  f"{100 * (v['summary']['tracking']['within_tolerance_share'] or 0):.2f} %, "
                                  f"min SoC discharging {_fmt(v['summary']['soc']['min_while_discharging'])}, "
                                  f"EFC mean {_fmt((v['summary']['wear']['efc'] or {}).get('mean'), 4)}"
                                  for v in variants), fontsize=11)
    for j, v in enumerate(variants):
        s, st, sm, w = v["summary"], v["steps"], v["samples"], v["wear"]
        th = st["t_s"] / 3600.0
        ax = axes[0, j]
        ax.plot(th, st["f_hz"], color="#1f4e79", lw=0.6)
        ax.set_ylabel("frequency, Hz")
        ax.set_title(f"{v['label']}: grid frequency (trace)", fontsize=9, loc="left")
        ax.grid(alpha=0.3)

        ax = axes[1, j]
        scale, unit = (1e3, "MW") if s["capacity_kw"] >= 2e3 else (1.0, "kW")
        tr = v["tracking"]
        ax.fill_between(th, tr["_lo"] / scale, tr["_hi"] / scale, color="#9ecae1", alpha=0.45, lw=0,
                        label=f"tolerance band (+-{100 * s['tolerance']:g} % of capacity, {tr['window_s']:g} s lag)")
        ax.plot(th, tr["_required_kw"] / scale, color="k", lw=0.7, ls="--", label="required response")
        ax.plot(th, st["measured_kw"] / scale, color="#2ca02c", lw=0.7, label="measured (site meters)")
        out = ~tr["_inside"]
        if out.any():
            ax.plot(th[out], st["measured_kw"][out] / scale, "x", color="#d62728", ms=3, label="outside tolerance")
        ax.set_ylabel(f"power, {unit} (+ discharge)")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
        ax.set_title(f"response; capacity {s['capacity_kw'] / 1e3:,.2f} MW; in tolerance "
                     f"{100 * (tr['within_tolerance_share'] or 0):.2f} % of steps", fontsize=9, loc="left")

        ax = axes[2, j]
        ts = sm["t_s"] / 3600.0
        pc = sm["soc_pct"]
        if len(ts):
            ax.fill_between(ts, pc[:, 2], pc[:, 6], color="#1f77b4", alpha=0.2, lw=0, label="5-95 %")
            ax.fill_between(ts, pc[:, 3], pc[:, 5], color="#1f77b4", alpha=0.35, lw=0, label="25-75 %")
            ax.plot(ts, pc[:, 4], color="#1f77b4", lw=1.2, label="median")
            ax.plot(ts, pc[:, 0], color="#d62728", lw=0.8, label="minimum")
        ax.axhline(s["profile"]["minimum_soc"], color="0.3", ls="--", lw=0.8, label="minimum_soc")
        ax.set_ylim(0, 1)
        ax.set_ylabel("SoC (plugged in)")
        ax.legend(fontsize=7, loc="upper right", ncol=3)
        ax.grid(alpha=0.3)
        ax.set_title("SoC distribution of the plugged-in vehicles over time", fontsize=9, loc="left")

        ax = axes[3, j]
        by = reasons_over_time(sm)
        if len(ts) and by:
            ax.stackplot(ts, *[np.asarray(c) for c in by.values()], labels=list(by), alpha=0.8)
            ax.plot(ts, sm["carrying"], color="k", lw=0.8, label="carrying load")
        ax.set_ylabel("vehicles")
        ax.set_xlabel("hours since start")
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        ax.grid(alpha=0.3)
        ax.set_title("vehicles by reason (the kernel's codes)", fontsize=9, loc="left")

        ax = axes[4, j]
        efc = w["efc"][w["active"]]
        ax.hist(efc, bins=50, color="#9467bd", alpha=0.75)
        ax.set_yscale("log")
        ax.set_xlabel("equivalent full cycles in the run, per vehicle")
        ax.set_ylabel("vehicles")
        we = s["wear"]
        ax.set_title(f"wear: {we['vehicles_carrying_any']:,} vehicles carried load; EFC mean "
                     f"{_fmt((we['efc'] or {}).get('mean'), 4)}, max {_fmt((we['efc'] or {}).get('max'), 4)}; "
                     f"throughput mean {_fmt((we['throughput_kwh'] or {}).get('mean'), 2)} kWh", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


__all__ = ["SOC_PERCENTILES", "band", "plot", "reasons_over_time", "revenue", "tracking", "wear"]
