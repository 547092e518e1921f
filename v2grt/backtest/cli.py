"""`v2grt backtest`: run the live dispatcher over a frequency trace in simulated time, journal it, score it, report.

    v2grt backtest --trace FILE --service dc --vehicles 10000 --hours 5 [--compare policy=merit,prorata]
                   [--out DIR] [--price-eur-per-mw-h X]

docs/backtest.md has every option, the plug-in pattern and the delay model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class _Progress:
    """A progress bar on stderr, drawn at most 5 times a second; silent when stderr is not a terminal."""

    def __init__(self, label: str, sim_s_per_step: float, enabled: bool | None = None):
        self.label = label
        self.dt = sim_s_per_step
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self.next = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter() - self.t0
        if now < self.next and done < total:
            return
        self.next = now + 0.2
        width = 30
        fill = int(width * done / total)
        speed = done * self.dt / now if now > 0 else 0.0
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {100 * done / total:5.1f} % "
                         f"{done * self.dt / 3600:.2f} h simulated, {speed:,.0f}x real time ")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def parse_value(text: str):
    """A profile value from the command line: a number (inf too) or a word (policy names)."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_assignments(items: list[str], flag: str, many: bool) -> list[tuple[str, list]]:
    out = []
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE{',VALUE...' if many else ''}")
        vals = [parse_value(v) for v in values.split(",")] if many else [parse_value(values)]
        out.append((key.strip(), vals))
    return out


def variants(compare: list[tuple[str, list]]) -> list[tuple[str, dict]]:
    """(label, profile overrides) for every combination of the --compare values, in the order given."""
    if not compare:
        return [("base", {})]
    keys = [k for k, _ in compare]
    out = []
    for combo in itertools.product(*[v for _, v in compare]):
        label = ",".join(f"{k}={_show(v)}" for k, v in zip(keys, combo))
        out.append((label, dict(zip(keys, combo))))
    return out


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _score(journal_dir: Path, service: str, **opts) -> dict:
    """v2grt.score's verdict on the journal (docs/services.md section 7), read back from the segments as any
    journal is."""
    from v2grt.score import score_journal

    return score_journal(journal_dir, service, **opts)


def _score_row(score: dict) -> dict:
    """The few numbers of a score a comparison table needs."""
    t = score["total"]
    e = t["energy"][score["delivered_source"]]["total"]
    return {"within_tolerance_share": t["tolerance"]["share"], "energy_ratio": e["ratio"],
            "events": t["events"]["count"], "events_full_ok": t["events"]["full_ok"],
            "availability_share": t["availability"]["share"], "soc_floor_breaches": t["soc_floor"]["breaches"]}


def run(args) -> dict:
    """Run every variant and write the report; returns report.json's content."""
    from v2grt.backtest import report
    from v2grt.backtest.engine import Backtest, Settings
    from v2grt.profile import DispatchProfile
    from v2grt.sim.traces import load_trace, sample_trace_path

    trace = load_trace(sample_trace_path() if args.trace in (None, "", "sample") else args.trace)
    base_profile = DispatchProfile.from_json(args.profile).to_dict() if args.profile else {}
    for key, vals in parse_assignments(args.set, "--set", many=False):
        base_profile[key] = vals[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for label, overrides in variants(parse_assignments(args.compare, "--compare", many=True)):
        profile = {**base_profile, **overrides}
        DispatchProfile().replace(**profile)  # validated before any work: the error names key and range
        s = Settings(trace=trace, service=args.service, vehicles=args.vehicles, hours=args.hours,
                     trace_start_s=args.trace_start_s, period_s=args.period_s, seed=args.seed, profile=profile,
                     capacity_kw=args.capacity_kw, base_kw=args.base_kw, delay_s=args.delay_s, ramp_s=args.ramp_s,
                     plugs=not args.no_plugs, roster=Path(args.roster) if args.roster else None,
                     vehicle_interval_s=args.vehicle_interval_s)
        safe = "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in label)
        bt = Backtest(s, out / "journal" / safe)
        progress = _Progress(f"backtest {label}", bt.period_s, enabled=None if args.progress is None else args.progress)
        res = bt.run(progress)
        summary = res.summary
        summary["label"] = label
        summary["tolerance"] = args.tolerance_pct / 100.0
        trk = report.tracking(res.steps, bt.curve, bt.capacity_kw, s.base_kw, summary["tolerance"])
        summary["tracking"] = {k: v for k, v in trk.items() if not k.startswith("_")}
        summary["wear"] = report.wear(res.wear)
        summary["revenue"] = report.revenue(args.price_eur_per_mw_h, bt.capacity_kw, s.hours,
                                            trk["within_tolerance_share"])
        summary["vehicles_by_reason"] = {"t_s": res.samples["t_s"].tolist(), **report.reasons_over_time(res.samples)}
        summary["soc_over_time"] = {"t_s": res.samples["t_s"].tolist(),
                                    "percentiles": list(report.SOC_PERCENTILES),
                                    "soc": np.round(res.samples["soc_pct"], 5).tolist(),
                                    "plugged": res.samples["plugged"].astype(int).tolist()}
        summary["score"] = _score(res.journal_dir, bt.curve.name, tolerance=summary["tolerance"])
        results.append({"label": label, "summary": summary, "steps": res.steps, "samples": res.samples,
                        "wear": res.wear, "tracking": trk})
    doc = {"variants": [r["summary"] for r in results],
           "compare": [{"label": r["label"],
                        "within_tolerance_share": r["summary"]["tracking"]["within_tolerance_share"],
                        "floor_breaches": r["summary"]["soc"]["floor_breaches"],
                        "min_soc_while_discharging": r["summary"]["soc"]["min_while_discharging"],
                        "efc_mean": (r["summary"]["wear"]["efc"] or {}).get("mean"),
                        "efc_max": (r["summary"]["wear"]["efc"] or {}).get("max"),
                        "vehicles_carrying_any": r["summary"]["wear"]["vehicles_carrying_any"],
                        "throughput_kwh": r["summary"]["energy_kwh"]["throughput"],
                        "speed_x": r["summary"]["speed_x"], "speed_cpu_x": r["summary"]["speed_cpu_x"],
                        "score": _score_row(r["summary"]["score"])} for r in results],
           "files": {"json": "report.json", "png": "report.png", "journals": "journal/<variant>/"}}
    doc = _strict(doc)
    (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if not args.no_png:
        report.plot(out / "report.png", results)
    return doc


def _strict(obj):
    """JSON that every parser reads: numpy values as plain ones, NaN as null, an infinite profile value
    (``node_ramp_kw_per_s: inf``, no limit) as the string "inf"."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, (np.generic, Path)):
        return _strict(_plain(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _print(doc: dict, out: Path) -> None:
    for v, row in zip(doc["variants"], doc["compare"], strict=True):
        t, soc, e, sc = v["tracking"], v["soc"], v["energy_kwh"], row["score"]
        print(f"{v['label']}: {v['vehicles']:,} vehicles, {v['service']}, {v['hours']:g} h in {v['wall_s']:.1f} s "
              f"({v['speed_x']:,.0f}x real time); capacity {v['capacity_kw'] / 1e3:,.2f} MW; in tolerance "
              f"{100 * t['within_tolerance_share']:.3f} % of steps ({t['steps_outside']} outside); SoC floor breaches "
              f"{soc['floor_breaches']}; min SoC while discharging {soc['min_while_discharging']}; net "
              f"{e['net_discharged']:+,.1f} kWh, throughput {e['throughput']:,.1f} kWh; EFC mean "
              f"{(v['wear']['efc'] or {}).get('mean', math.nan):.5f}")
        share = sc["within_tolerance_share"]
        print(f"  score (v2grt.score): within tolerance {100 * share if share is not None else math.nan:.3f} %, "
              f"energy delivered/required {sc['energy_ratio'] if sc['energy_ratio'] is not None else math.nan:.4f}, "
              f"{sc['events']} events ({sc['events_full_ok']} full in time), SoC floor breaches "
              f"{sc['soc_floor_breaches']}")
    print(f"report: {out / 'report.json'}, {out / 'report.png'}")


def cmd_backtest(args) -> int:
    """Run the live dispatcher over a frequency trace in simulated time; journal, score and report it."""
    from v2grt.backtest.engine import BacktestError
    from v2grt.profile import ProfileError
    from v2grt.roster import RosterError
    from v2grt.services import ServiceError
    from v2grt.sim.traces import TraceError

    try:
        doc = run(args)
    except (BacktestError, ProfileError, ServiceError, TraceError, RosterError, ValueError, OSError) as exc:
        print(f"v2grt backtest: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(doc, indent=1, allow_nan=False))
    else:
        _print(doc, Path(args.out))
    return EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    from v2grt.backtest.engine import DEFAULT_DELAY_S, DEFAULT_RAMP_S

    p.add_argument("--trace", default=None, help="frequency trace CSV (default: the shipped Continental Europe 1 s "
                                                 "PMU recording, v2grt/data)")
    p.add_argument("--trace-start-s", type=float, default=0.0, help="where in the trace to start, s (default 0)")
    p.add_argument("--service", default="dc", help="service curve: dc (default), fcr, fcr_n, fcr_d_up, ffr, ...")
    p.add_argument("--vehicles", type=int, default=10_000, help="a random fleet of this size (default 10,000)")
    p.add_argument("--roster", default=None, help="a roster CSV instead of a random fleet")
    p.add_argument("--hours", type=float, default=5.0, help="simulated hours (default 5)")
    p.add_argument("--period-s", type=float, default=None,
                   help="control period, s (default: the trace's step, at most 1 s; 1 s for the shipped trace)")
    p.add_argument("--capacity-kw", type=float, default=None,
                   help="contracted capacity, kW (default: the least the plugged-in fleet holds both ways at any "
                        "quarter hour of the window)")
    p.add_argument("--base-kw", type=float, default=0.0, help="base schedule, kW (+ discharge), default 0")
    p.add_argument("--profile", default=None, help="a discharge_profile.json for every variant")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a profile key for every variant (repeatable)")
    p.add_argument("--compare", action="append", metavar="KEY=V1,V2",
                   help="run one variant per value of a profile key, side by side (repeatable: every combination)")
    p.add_argument("--delay-s", type=float, default=DEFAULT_DELAY_S,
                   help=f"setpoint to charger dead time, s (default {DEFAULT_DELAY_S:g})")
    p.add_argument("--ramp-s", type=float, default=DEFAULT_RAMP_S,
                   help=f"time a charger takes to ramp through its full rating, s (default {DEFAULT_RAMP_S:g}; "
                        "0: steps at once)")
    p.add_argument("--no-plugs", action="store_true",
                   help="no daily plug-in pattern: the fleet stays plugged in as the roster says")
    p.add_argument("--seed", type=int, default=0, help="seed of the fleet, its faults and the plug-in pattern")
    p.add_argument("--vehicle-interval-s", type=float, default=60.0,
                   help="the journal's per-vehicle sampling interval, s (default 60; the live default is 1)")
    p.add_argument("--tolerance-pct", type=float, default=3.0, help="tolerance band, %% of capacity (default 3)")
    p.add_argument("--price-eur-per-mw-h", type=float, default=None, help="availability price: adds revenue")
    p.add_argument("--out", default="backtest-out", help="report and journals (default ./backtest-out)")
    p.add_argument("--no-png", action="store_true", help="JSON only (no picture)")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def add_parser(sub) -> None:
    """Register `v2grt backtest` on the v2grt command line."""
    p = sub.add_parser("backtest", help="the live dispatcher over a frequency trace in simulated time: journal, "
                                        "score, SoC, wear, revenue", description=cmd_backtest.__doc__
                       + " See docs/backtest.md.")
    add_arguments(p)
    p.set_defaults(func=cmd_backtest)


__all__ = ["add_parser", "cmd_backtest", "parse_assignments", "run", "variants"]
