"""`v2grt prequal --service dc|fcr|fcr_d_up|ffr`: the grid operator's test sequence on the live system.

Runs the rig (v2grt.prequal.rig), drives each test's frequency programme into the simulated meter,
then reads the aggregator's journal back and judges the power measured at the site inverters against
each test's criteria (v2grt.prequal.criteria). Writes ``report.json``, one ``<test>.png`` per test and
prints a table. Exit 0 only if every test passes; 1 if one fails; 2 for bad flags; 3 if the rig
could not run. docs/prequal.md describes the tests, their sources and how they are measured.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_RIG = 0, 1, 2, 3


def _series(spec, curve, capacity_kw: float, cycles: dict, t0_ns: int) -> dict[str, np.ndarray]:
    """One test's slice of the journal, on its axis (t = 0 at the step), with the required power."""
    from v2grt.prequal.criteria import required_kw

    t_all = (cycles["t_ns"] - t0_ns) / 1e9
    sel = (t_all >= -spec.pre_s) & (t_all <= spec.duration_s)
    t = t_all[sel]
    t_prog = np.arange(-spec.pre_s, spec.duration_s, 0.01)
    return {
        "t_s": t, "delivered_kw": cycles["site_measured_kw"][sel], "target_kw": cycles["target_kw"][sel],
        "f_used_hz": cycles["f_hz"][sel], "frequency_stale": cycles["frequency_stale"][sel],
        "f_age_ms": cycles["f_age_ms"][sel],
        "required_kw": required_kw(spec, curve, capacity_kw, t),
        "t_prog_s": t_prog, "f_prog_hz": np.array([spec.frequency_at(float(x)) for x in t_prog]),
    }


def run(args) -> int:
    from v2grt.bench._common import machine
    from v2grt.prequal import criteria, report
    from v2grt.prequal.rig import METER_TIMEOUT_S, SETPOINT_TTL_S, Rig, RigError, health, read_cycles
    from v2grt.prequal.sequence import sequence
    from v2grt.services import ServiceError, get_service

    try:
        specs = sequence(args.service, quick=args.quick)
        curve = get_service(args.service)
    except (ValueError, ServiceError) as exc:
        print(f"v2grt prequal: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - {s.name for s in specs}
        if unknown:
            print(f"v2grt prequal: --only {','.join(sorted(unknown))}: not a test of {curve.name}; its tests are "
                  f"{', '.join(s.name for s in specs)}", file=sys.stderr)
            return EXIT_INVALID
        specs = [s for s in specs if s.name in wanted]
    if not specs:
        print("v2grt prequal: --only named no test", file=sys.stderr)
        return EXIT_INVALID
    if not 1 <= args.vehicles <= 100_000 or not 1 <= args.gateways <= min(args.vehicles, 200):
        print(f"v2grt prequal: --vehicles {args.vehicles} / --gateways {args.gateways}: expected 1..100,000 "
              "vehicles and 1..200 gateways, no more gateways than vehicles", file=sys.stderr)
        return EXIT_INVALID
    if not 0.0 <= args.unreachable_fraction <= 1.0:
        print(f"v2grt prequal: --unreachable-fraction {args.unreachable_fraction}: expected 0..1", file=sys.stderr)
        return EXIT_INVALID
    if args.capacity_kw is not None and not args.capacity_kw > 0:
        print(f"v2grt prequal: --capacity-kw {args.capacity_kw}: expected > 0 kW", file=sys.stderr)
        return EXIT_INVALID
    tolerance = args.tolerance_pct / 100.0
    out = Path(args.out).expanduser().resolve()
    total_s = sum(s.pre_s + s.duration_s for s in specs)
    print(f"v2grt prequal: {curve.name}, {len(specs)} tests, about {total_s:.0f} s of test signal after start-up; "
          f"files in {out}", flush=True)
    runs = []
    rig = Rig(out, service=curve.name, vehicles=args.vehicles, gateways=args.gateways,
              capacity_kw=args.capacity_kw, seed=args.seed, unreachable_fraction=args.unreachable_fraction)
    try:
        with rig:
            for spec in specs:
                print(f"  {spec.name}: {spec.title}", flush=True)
                runs.append((spec, rig.drive(spec.frequency_at, spec.pre_s, spec.duration_s)))
            t_end_ns = time.time_ns()
        cycles = read_cycles(rig.journal_dir)
    except RigError as exc:
        print(f"v2grt prequal: {exc}", file=sys.stderr)
        return EXIT_RIG
    except KeyboardInterrupt:
        print("v2grt prequal: interrupted; no report", file=sys.stderr)
        return 130

    caps = cycles["capacity_kw"][np.isfinite(cycles["capacity_kw"])]
    capacity_kw = float(np.median(caps)) if caps.size else float(args.capacity_kw or 0.0)
    tests = []
    for spec, t0_ns in runs:
        s = _series(spec, curve, capacity_kw, cycles, t0_ns)
        checks = criteria.evaluate(spec, curve, capacity_kw, s["t_s"], s["delivered_kw"], tolerance=tolerance)
        test = {"name": spec.name, "title": spec.title, "kind": spec.kind, "source": spec.source,
                "hold_source": spec.hold_source, "f_from_hz": spec.f_from_hz, "f_to_hz": spec.f_to_hz,
                "ramp_hz_per_s": spec.ramp_hz_per_s, "pre_s": spec.pre_s, "hold_s": spec.hold_s,
                "after_s": spec.after_s, "t0_utc_ns": int(t0_ns), "samples": int(len(s["t_s"])),
                # cycles in which the aggregator had no fresh meter reading (the rig's fault, not the fleet's)
                "frequency_stale_cycles": int(np.sum(s["frequency_stale"])),
                # the oldest meter reading a cycle used: the meter and the site inverters are served by this
                # process, so it is also how long the measured (delivered) power could stand still (rig stall)
                "meter_age_max_ms": round(float(np.max(s["f_age_ms"], initial=0.0)), 1),
                "passed": all(c.passed for c in checks), "checks": [c.as_dict() for c in checks],
                "png": f"{spec.name}.png"}
        report.plot_test(out / test["png"], test, s, capacity_kw=capacity_kw, tolerance=tolerance,
                         service=curve.name)
        tests.append(test)
    summary = {
        "service": curve.name, "service_source": curve.source, "vehicles": args.vehicles, "gateways": args.gateways,
        "capacity_kw": capacity_kw, "capacity_from": "--capacity-kw" if args.capacity_kw else
        "the aggregator's default (what the fleet can hold both ways at start)",
        "fleet_rated_dis_kw": rig.fleet_rated_kw, "unreachable_fraction": args.unreachable_fraction,
        "quick": bool(args.quick), "tolerance": tolerance,
        "measured_at": "site inverters (SunSpec 701 W), the journal's site_measured_kw per cycle",
        "period_s": 0.05, "setpoint_ttl_s": SETPOINT_TTL_S, "meter_timeout_s": METER_TIMEOUT_S,
        "rig": health(out, runs[0][1] - int(specs[0].pre_s * 1e9), t_end_ns),
        "journal": str(rig.journal_dir),
        "machine": machine(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "passed": all(t["passed"] for t in tests), "tests": tests,
    }
    report.write(out, summary)
    print(report.render_table(summary))
    print(f"report: {out / 'report.json'} and one PNG per test in {out}")
    return EXIT_OK if summary["passed"] else EXIT_FAILED


def cmd_prequal(args) -> int:
    """Run the grid operator's prequalification tests for a service on the live system; pass/fail per test."""
    return run(args)


def add_parser(sub) -> None:
    """Register `v2grt prequal`."""
    p = sub.add_parser("prequal", help="the grid operator's prequalification tests on the live system, pass/fail",
                       description=cmd_prequal.__doc__ + " See docs/prequal.md.")
    p.add_argument("--service", required=True,
                   help="dc (GB Dynamic Containment), fcr (ENTSO-E CE), fcr_d_up (Nordic), ffr (Fingrid, 49.7 Hz; "
                        "or ffr_49.6, ffr_49.5)")
    p.add_argument("--vehicles", type=int, default=1000, help="simulated vehicles (default 1,000)")
    p.add_argument("--gateways", type=int, default=4, help="gateway processes, one site inverter each (default 4)")
    p.add_argument("--capacity-kw", type=float, default=None,
                   help="contracted capacity, kW (default: what the fleet can hold both ways at start)")
    p.add_argument("--out", default="prequal-out", help="directory for the report, PNGs, journal and logs")
    p.add_argument("--quick", action="store_true",
                   help="short holds and rests (seconds, for tests); the criteria are unchanged")
    p.add_argument("--only", default=None, help="comma-separated test names to run (default: all)")
    p.add_argument("--tolerance-pct", type=float, default=3.0,
                   help="steady-state band, %% of capacity (default 3, as `v2grt demo`)")
    p.add_argument("--unreachable-fraction", type=float, default=0.01,
                   help="share of vehicles whose firmware rejects discharge (default 0.01, as `v2grt gateway sim`); "
                        "the aggregator learns of each from its first telemetry after the refusal")
    p.add_argument("--seed", type=int, default=0, help="seed of the fleet (default 0)")
    p.set_defaults(func=cmd_prequal)


__all__ = ["add_parser", "cmd_prequal", "run"]
