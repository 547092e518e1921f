"""The prequalification report: one JSON document, a terminal table and one PNG per test.

Pure but for the file writes; the picture follows the demo report's style (v2grt/report.py): frequency
on top, required and delivered power below, + = discharge into the grid.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from v2grt.bench._common import table
from v2grt.report import write_json


def _fmt(value, unit: str) -> str:
    if value is None:
        return "never"
    if unit.startswith("of ") and unit != "of steady state":
        return f"{100 * value:.2f} % {unit}"
    if unit == "of steady state":
        return f"{100 * value:.1f} %"
    return f"{value:.3f} {unit}"


def _limit(check: dict) -> str:
    lim, unit = check["limit"], check["unit"]
    if check["name"] in ("start", "full", "ffr_full"):
        return f"<= {lim:g} s"
    if check["name"] == "ffr_support":
        return f">= {lim:g} s"
    if check["name"] == "ramp_7_5s":
        return f">= {100 * lim:.0f} %"
    if check["name"] == "ramp_energy":
        return f">= {lim:g} s x dP"
    return f"<= {100 * lim:.0f} % {unit}" if unit.startswith("of ") else f"{lim:g} {unit}"


#: A meter reading older than this in a cycle (two 50 ms periods; normally 5-10 ms at the 5 ms poll) means
#: the prequal process stalled (seen: 479 ms at load 5, when an FFR release measured 26.9 %/s on a curve of 18).
RIG_STALL_MS = 100.0


def render_table(summary: dict) -> str:
    """The terminal table: test, check, the rule's criterion, the measured value, PASS/FAIL."""
    rows = []
    stale = []
    stalls = []
    for test in summary["tests"]:
        for c in test["checks"]:
            rows.append([test["name"], c["name"], _limit(c), _fmt(c["measured"], c["unit"]),
                         "PASS" if c["passed"] else "FAIL"])
        if test.get("frequency_stale_cycles"):
            stale.append(f"{test['name']} {test['frequency_stale_cycles']}")
        if (test.get("meter_age_max_ms") or 0.0) > RIG_STALL_MS:
            stalls.append(f"{test['name']} {test['meter_age_max_ms']:.0f} ms")
    head = (f"v2grt prequal --service {summary['service']}: {summary['vehicles']:,} vehicles, "
            f"{summary['gateways']} gateways, contracted {summary['capacity_kw']:,.1f} kW"
            f"{' (--quick holds)' if summary['quick'] else ''}; delivered power measured at the site inverters")
    rig = summary.get("rig") or {}
    if rig:
        head += (f"\nrig: {rig.get('aggregator_cycles')} cycles, {rig.get('aggregator_missed_deadlines')} missed "
                 f"deadlines over its life; gateway setpoint expiries during the tests "
                 f"{rig.get('gateway_setpoint_expiries')} (each one drops a site to 0 kW until the next setpoint)")
        if stale:
            head += "; cycles without a fresh meter reading: " + ", ".join(stale)
        if stalls:
            head += ("\nrig stall (this process's meter and site inverters not served; measured power stands still, "
                     "then catches up, which can move a time or rate check): " + ", ".join(stalls))
    verdict = "ALL PASS" if summary["passed"] else (
        f"FAIL: {sum(not t['passed'] for t in summary['tests'])} of {len(summary['tests'])} tests")
    return "\n".join([head, table(["test", "check", "criterion", "measured", "result"], rows), verdict])


def write(out: Path, summary: dict) -> Path:
    path = out / "report.json"
    write_json(path, summary)
    return path


def plot_test(path: Path, test: dict, series: dict[str, np.ndarray], *, capacity_kw: float, tolerance: float,
              service: str) -> None:
    """One PNG: the frequency applied (and the one the aggregator used); required, target and delivered power."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = series["t_s"]
    fig, (ax_f, ax_p) = plt.subplots(2, 1, figsize=(11, 7), dpi=90, sharex=True,
                                     gridspec_kw={"height_ratios": [1.0, 1.7], "hspace": 0.28})
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.08)
    verdict = "PASS" if test["passed"] else "FAIL"
    lines = "; ".join(f"{c['name']} {_fmt(c['measured'], c['unit'])} ({_limit(c)}) "
                      f"{'ok' if c['passed'] else 'FAIL'}" for c in test["checks"])
    fig.suptitle(f"v2grt prequal {service}: {test['title']}: {verdict}\n{lines}", fontsize=10,
                 color="k" if test["passed"] else "#b00000")

    ax_f.plot(series["t_prog_s"], series["f_prog_hz"], color="#1f4e79", lw=1.2, label="test signal (meter)")
    ax_f.plot(t, series["f_used_hz"], color="#ff7f0e", lw=0.9, ls="--", label="frequency the aggregator used")
    ax_f.set_ylabel("frequency, Hz")
    ax_f.grid(alpha=0.3)
    ax_f.legend(loc="upper right", fontsize=8)
    ax_f.set_title("\n".join(textwrap.wrap(test["source"], 150)), fontsize=8, loc="left")

    scale, unit = (1e3, "MW") if capacity_kw >= 2e3 else (1.0, "kW")
    req = series["required_kw"]
    tol = tolerance * capacity_kw
    ax_p.fill_between(t, (req - tol) / scale, (req + tol) / scale, color="#9ecae1", alpha=0.45, lw=0,
                      label=f"required +-{100 * tolerance:g} % of capacity")
    ax_p.plot(t, req / scale, color="k", lw=1.0, ls="--", label="required response")
    ax_p.plot(t, series["target_kw"] / scale, color="#ff7f0e", lw=1.0, label="target (aggregator)")
    ax_p.plot(t, series["delivered_kw"] / scale, color="#2ca02c", lw=1.4, label="delivered (site inverters' meters)")
    for k, c in enumerate(test["checks"]):
        if c["name"] in ("start", "full", "ffr_full") and c["limit"] is not None:
            ax_p.axvline(c["limit"], color="#d62728", lw=0.8, ls=":")
            ax_p.text(c["limit"], 0.97 - 0.06 * k, f" {c['name']} <= {c['limit']:g} s", fontsize=7,
                      color="#d62728", va="top", transform=ax_p.get_xaxis_transform())
        if c["name"] == "ramp_7_5s":
            ax_p.axvline(7.5, color="#d62728", lw=0.8, ls=":")
    ax_p.axvline(0.0, color="0.5", lw=0.7)
    ax_p.set_ylabel(f"power, {unit} (+ discharge)")
    ax_p.set_xlabel("time since the step (or the ramp's start), s")
    ax_p.grid(alpha=0.3)
    ax_p.legend(loc="best", fontsize=8)
    ax_p.set_title(f"contracted capacity {capacity_kw:,.1f} kW; delivered = sum of the site inverters' measured W "
                   "(SunSpec 701) as the journal recorded it each cycle", fontsize=8, loc="left")
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["plot_test", "render_table", "write"]
