"""The score's picture (PNG), in the demo report's style (v2grt/report.py): one page per score."""

from __future__ import annotations

import numpy as np

from v2grt.report import deadband_hz
from v2grt.services import get_service

MAX_POINTS = 20000  # a day at 20 Hz is 1.7 M records: draw every k-th


def _every(n: int) -> int:
    return max(1, -(-n // MAX_POINTS))


def plot_score(path, score: dict) -> None:
    """Frequency; required, band, delivered (measured and reported) and target; per settlement period the
    share within tolerance and the availability; each excursion's start and full-delivery time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    if score["service"] == "reg":
        return _plot_reg(path, score)
    s = score["_series"]
    k = _every(len(s["t_ns"]))
    t0 = s["t_ns"][0]
    t = (s["t_ns"][::k] - t0) / 1e9
    tot = score["total"]
    src = score["delivered_source"]
    other = "reported" if src == "measured" else "measured"
    fig = plt.figure(figsize=(12, 10.5), dpi=90)
    gs = GridSpec(4, 2, figure=fig, height_ratios=[0.9, 1.6, 1.0, 1.0], hspace=0.45, wspace=0.22,
                  left=0.07, right=0.98, top=0.89, bottom=0.06)
    share = tot["tolerance"]["share"]
    avail = tot["availability"]["share"]
    en = tot["energy"][src]["total"]["ratio"]
    pct = lambda x: "-" if x is None else f"{100 * x:.2f} %"
    fig.suptitle(
        f"v2grt score: {score['service']} ({score['service_description']})\n"
        f"{score['from']} to {score['to']}, {len(score['periods'])} settlement period(s) of "
        f"{score['settlement_period_s'] / 60:g} min\nwithin tolerance {pct(share)}, availability {pct(avail)}, "
        f"energy delivered/required {'-' if en is None else f'{en:.3f}'}, "
        f"{tot['events']['count']} excursion(s), {tot['soc_floor']['breaches']} SoC-floor breach(es)", fontsize=11)

    ax_f = fig.add_subplot(gs[0, :])
    ax_f.plot(t, s["f_hz"][::k], color="#1f4e79", lw=1.0, label="grid meter (journal f_hz)")
    ax_f.axhline(score["nominal_hz"], color="0.6", lw=0.7, ls=":")
    try:
        db = deadband_hz(get_service(score["service"], score["nominal_hz"]))
    except ValueError:
        db = None
    if db:
        ax_f.axhspan(db[0], db[1], color="0.85", alpha=0.6, lw=0, label=f"deadband of {score['service']}: no response")
    ax_f.set_ylabel("frequency, Hz")
    ax_f.legend(loc="upper right", fontsize=8)
    ax_f.grid(alpha=0.3)
    ax_f.set_title("Grid frequency the aggregator recorded each cycle", fontsize=9, loc="left")

    ax_p = fig.add_subplot(gs[1, :], sharex=ax_f)
    hi_abs = np.nanmax(np.abs(np.r_[s["band_hi_kw"], s["band_lo_kw"], 1.0]))
    scale, unit = (1e3, "MW") if hi_abs >= 2e3 else (1.0, "kW")
    p = score["parameters"]
    ax_p.fill_between(t, s["band_lo_kw"][::k] / scale, s["band_hi_kw"][::k] / scale, color="#9ecae1", alpha=0.45,
                      lw=0, label=f"tolerance band (+-{100 * p['tolerance']:g} % of capacity, {p['window_s']:g} s lag)")
    ax_p.plot(t, s["required_kw"][::k] / scale, color="k", lw=1.0, ls="--", label="required (curve x capacity + base)")
    if s.get("target_kw") is not None:
        ax_p.plot(t, s["target_kw"][::k] / scale, color="#ff7f0e", lw=1.0, label="target (aggregator)")
    ax_p.plot(t, s["delivered_kw"][::k] / scale, color="#2ca02c", lw=1.2,
              label="delivered (site inverters)" if src == "measured" else "delivered (vehicles' reports)")
    d2 = s[f"delivered_{other}_kw"][::k]
    if np.isfinite(d2).any():
        ax_p.plot(t, d2 / scale, color="#2ca02c", lw=0.8, ls=":", alpha=0.8,
                  label="delivered (vehicles' reports)" if other == "reported" else "delivered (site inverters)")
    ax_p.set_ylabel(f"power, {unit} (+ discharge)")
    ax_p.set_xlabel("time since the first record, s")
    ax_p.grid(alpha=0.3)
    ax_p.legend(loc="upper right", fontsize=8, ncol=2)
    ax_p.set_title(f"Fleet response; contracted capacity {score['capacity_kw'] / 1e3:,.3f} MW", fontsize=9, loc="left")

    ax_b = fig.add_subplot(gs[2, :])
    per = score["periods"]
    x = np.arange(len(per))
    tol = [100 * (q["tolerance"]["share"] or 0.0) for q in per]
    av = [100 * (q["availability"]["share"] or 0.0) for q in per]
    ax_b.bar(x - 0.2, tol, width=0.4, color="#2ca02c", alpha=0.7, label="within tolerance")
    ax_b.bar(x + 0.2, av, width=0.4, color="#9467bd", alpha=0.7, label="available")
    ax_b.set_xticks(x, [q["start"][11:16] for q in per], fontsize=8)
    ax_b.set_ylim(0, 105)
    ax_b.set_ylabel("% of the period")
    ax_b.legend(loc="lower right", fontsize=8)
    ax_b.grid(alpha=0.3, axis="y")
    ax_b.set_title("Per settlement period (UTC start)", fontsize=9, loc="left")

    ax_e = fig.add_subplot(gs[3, 0])
    ev = score["events"]
    if ev:
        xs = np.arange(len(ev))
        st = [e["start_s"] if e["start_s"] is not None else np.nan for e in ev]
        fu = [e["full_s"] if e["full_s"] is not None else np.nan for e in ev]
        ax_e.plot(xs, st, "o", color="#1f77b4", ms=4, label=f"start ({100 * p['start_share']:g} % of the step)")
        ax_e.plot(xs, fu, "s", color="#d62728", ms=4, label=f"full ({100 * p['full_share']:g} %)")
        if p.get("start_limit_s") is not None:
            ax_e.axhline(p["start_limit_s"], color="#1f77b4", ls="--", lw=0.8,
                         label=f"start limit {p['start_limit_s']:g} s")
        if p.get("full_activation_limit_s") is not None:
            ax_e.axhline(p["full_activation_limit_s"], color="#d62728", ls="--", lw=0.8,
                         label=f"full limit {p['full_activation_limit_s']:g} s")
        ax_e.legend(fontsize=8)
    else:
        ax_e.text(0.5, 0.5, "no excursion reached the event threshold", ha="center", va="center",
                  transform=ax_e.transAxes, fontsize=9)
    ax_e.set_xlabel("excursion")
    ax_e.set_ylabel("s after the excursion began")
    ax_e.grid(alpha=0.3)
    ax_e.set_title("Response start and full-delivery times", fontsize=9, loc="left")

    ax_s = fig.add_subplot(gs[3, 1])
    br = [q["soc_floor"]["breaches"] for q in per]
    to = [q["soc_floor"]["touches"] for q in per]
    ax_s.bar(x - 0.2, to, width=0.4, color="0.6", label="at floor while discharging (any length)")
    ax_s.bar(x + 0.2, br, width=0.4, color="#d62728", label=f"breaches (> {p['floor_grace_s']:g} s)")
    ax_s.set_xticks(x, [q["start"][11:16] for q in per], fontsize=8)
    ax_s.set_ylabel("episodes")
    ax_s.legend(fontsize=8)
    ax_s.grid(alpha=0.3, axis="y")
    ax_s.set_title("SoC floor, per settlement period", fontsize=9, loc="left")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_reg(path, score: dict) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    s = score["_series"]
    k = _every(len(s["t_ns"]))
    t = (s["t_ns"][::k] - s["t_ns"][0]) / 1e9 if len(s["t_ns"]) else np.zeros(0)
    tot = score["total"]
    fig = plt.figure(figsize=(12, 8), dpi=90)
    gs = GridSpec(2, 1, figure=fig, height_ratios=[1.6, 1.0], hspace=0.35, left=0.07, right=0.98, top=0.9, bottom=0.07)
    comp = tot["composite"]
    fig.suptitle(f"v2grt score: regulation signal, PJM performance score\n{score['from']} to {score['to']}; composite "
                 f"{'-' if comp is None else f'{comp:.3f}'} "
                 f"({'pass' if tot['pass'] else 'fail'} at >= {score['parameters']['pass_score']}); accuracy "
                 f"{tot['accuracy'] or 0:.3f}, delay {tot['delay'] or 0:.3f}, precision {tot['precision'] or 0:.3f}",
                 fontsize=11)
    ax = fig.add_subplot(gs[0])
    ax.plot(t, s["signal"][::k], color="k", lw=1.0, ls="--", label=f"signal ({score['signal_source']})")
    ax.plot(t, s["response"][::k], color="#2ca02c", lw=1.2, label=f"response ({score['delivered_source']})")
    ax.set_ylabel("normalised, -1..1 (+ discharge)")
    ax.set_xlabel(f"time since the first sample, s ({score['parameters']['sample_s']:g} s samples)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"Regulation capacity {score['regulation_capacity_kw']:,.1f} kW", fontsize=9, loc="left")
    ax_b = fig.add_subplot(gs[1])
    per = score["periods"]
    x = np.arange(len(per))
    for off, key, color in ((-0.3, "accuracy", "#1f77b4"), (-0.1, "delay", "#ff7f0e"), (0.1, "precision", "#9467bd"),
                            (0.3, "composite", "#2ca02c")):
        ax_b.bar(x + off, [q[key] or 0.0 for q in per], width=0.2, color=color, label=key)
    ax_b.axhline(score["parameters"]["pass_score"], color="#d62728", lw=1.0, label="pass")
    ax_b.set_xticks(x, [q["start"][11:16] for q in per], fontsize=8)
    ax_b.set_ylim(0, 1.05)
    ax_b.legend(fontsize=8, ncol=5)
    ax_b.grid(alpha=0.3, axis="y")
    ax_b.set_title("Per settlement period (UTC start)", fontsize=9, loc="left")
    fig.savefig(path, dpi=90)
    plt.close(fig)
