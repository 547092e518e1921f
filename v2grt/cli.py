"""Command-line entry points: `v2grt` (subcommands), and the field manual's `v2g-aggregator` and `v2g-cli`.

Exit codes (all commands): 0 success; 1 the operation failed at run time (e.g. the aggregator did not
answer); 2 bad usage or invalid input (file, key, value named on stderr); 3 refused by a safety rule
(e.g. a vehicle excluded from a test discharge, a second scheduler for the same fleet).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_REFUSED = 0, 1, 2, 3

#: Modules that add subcommands (operator tools, demo, gateways, keys, simulators), each with add_parser(sub).
PLUGIN_MODULES = ("v2grt.operator", "v2grt.demo", "v2grt.gateway.cli", "v2grt.security.cli", "v2grt.sim.cli",
                  "v2grt.journal", "v2grt.score", "v2grt.backtest.cli", "v2grt.prequal")


class CliError(Exception):
    """An error to print as one line on stderr, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_INVALID):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------- v2grt dispatch
def _load_fleet(spec: str):
    """A fleet from a roster CSV path, or `random:N[:SEED]` for a synthetic one."""
    from v2grt import Fleet

    if spec.startswith("random:"):
        parts = spec.split(":")
        try:
            n = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else 0
        except (IndexError, ValueError):
            raise CliError(f"--fleet {spec!r}: expected random:N or random:N:SEED with integers") from None
        return Fleet.random(n, seed=seed)
    from v2grt.roster import RosterError

    try:
        return Fleet.from_csv(spec)
    except FileNotFoundError:
        raise CliError(f"--fleet {spec!r}: no such file") from None
    except RosterError as exc:
        raise CliError(str(exc)) from None


def cmd_dispatch(args) -> int:
    """One dispatch: what would the fleet do now, at this frequency?"""
    from v2grt import Dispatcher, DispatchProfile
    from v2grt.codes import reason_names
    from v2grt.profile import ProfileError
    from v2grt.services import ServiceError

    fleet = _load_fleet(args.fleet)
    try:
        profile = DispatchProfile.from_json(args.profile) if args.profile else DispatchProfile()
        overrides = {k: v for k, v in (("minimum_soc", args.minimum_soc), ("policy", args.policy)) if v is not None}
        if overrides:
            profile = profile.replace(**overrides)
        d = Dispatcher(fleet, profile, service=args.service, capacity_kw=args.capacity_kw,
                       nominal_hz=args.nominal_hz)
        # A one-shot dispatch has no history: telemetry counts as fresh, there is no ramp to respect.
        r = d.step(args.frequency, now_ns=0, base_kw=args.base_kw)
    except (ProfileError, ServiceError, ValueError) as exc:
        raise CliError(str(exc)) from None

    summary = {"fleet": args.fleet, "vehicles": len(fleet), "service": d.service.name,
               "capacity_kw": d.capacity_kw, "policy": profile.policy, "minimum_soc": profile.minimum_soc,
               **r.summary()}
    if args.out:
        n = fleet.n_rows
        names = reason_names(r.reasons)
        with open(args.out, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["node_id", "setpoint_kw", "reason"])
            for row in range(n):
                if fleet.active[row]:
                    w.writerow([fleet.node_ids[row], f"{r.setpoints_kw[row]:.4f}", names[row]])
        summary["out"] = args.out
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return EXIT_OK


def _print_summary(s: dict) -> None:
    direction = "discharge" if s["target_kw"] > 0 else ("charge" if s["target_kw"] < 0 else "idle")
    print(f"fleet {s['fleet']}: {s['vehicles']} vehicles, service {s['service']} at {s['capacity_kw']:.0f} kW, "
          f"policy {s['policy']}, minimum SoC {s['minimum_soc']:.2f}")
    print(f"  frequency      {s['frequency_hz']:.3f} Hz  -> response {100 * s['service_fraction']:+.1f} %")
    print(f"  request        {s['request_kw']:12.1f} kW   (+ discharge into the grid)")
    print(f"  target         {s['target_kw']:12.1f} kW   ({direction})")
    print(f"  allocated      {s['allocated_kw']:12.1f} kW   over {s['nodes_carrying']} vehicles")
    print(f"  available up   {s['feasible_dis_kw']:12.1f} kW   (discharge)")
    print(f"  available down {s['feasible_chg_kw']:12.1f} kW   (charge)")
    print("  vehicles by state:")
    for name, count in sorted(s["nodes_by_reason"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:<26} {count:8d}")
    if s.get("out"):
        print(f"  setpoints written to {s['out']}")


# --------------------------------------------------------------------------------- v2grt run, config
def cmd_run(args) -> int:
    """Start the aggregator in the foreground (Ctrl-C or SIGTERM stops it cleanly)."""
    from v2grt.config import ConfigError
    from v2grt.service import ServiceRefused, run_aggregator
    from v2grt.state import SchedulerConflict

    try:
        return run_aggregator(args.config, log_path=args.log_file, json_logs=args.json_logs,
                              allow_root=args.allow_root, exit_after=True)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    except (SchedulerConflict, ServiceRefused) as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None


def cmd_config_check(args) -> int:
    """Validate a config file (and the discharge profile and roster it names) without starting."""
    from v2grt.config import ConfigError, load_config

    try:
        cfg = load_config(args.file)
        if cfg.fleet.roster is not None:
            from v2grt import Fleet
            from v2grt.roster import RosterError

            try:
                Fleet.from_csv(cfg.resolve(cfg.fleet.roster))
            except RosterError as exc:
                raise ConfigError(f"{args.file}: fleet.roster: {exc}") from None
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    print(f"{args.file}: OK")
    return EXIT_OK


# ------------------------------------------------------------------------------------- v2grt bench
def cmd_bench(args) -> int:
    """Run benchmark NAME (module v2grt.bench.bench_NAME) with the options after its name."""
    from v2grt import bench

    return int(bench.load(args.name).main(args.rest) or 0)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="v2grt", description="Real-time dispatcher for vehicle-to-grid fleets.",
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dispatch", help="one dispatch of a fleet at a frequency (what would the fleet do now?)",
                       description=cmd_dispatch.__doc__)
    p.add_argument("--fleet", required=True, help="roster CSV, or random:N[:SEED] for a synthetic fleet")
    p.add_argument("--frequency", type=float, required=True, help="grid frequency, Hz")
    p.add_argument("--service", default="dc", help="service curve name (default dc: GB Dynamic Containment)")
    p.add_argument("--capacity-kw", type=float, default=None,
                   help="contracted capacity, kW (default: the fleet's total discharge rating)")
    p.add_argument("--nominal-hz", type=float, default=None, help="50 or 60 (default: the service's own)")
    p.add_argument("--base-kw", type=float, default=0.0, help="base schedule, kW (+ discharge)")
    p.add_argument("--policy", choices=["merit", "prorata"], default=None)
    p.add_argument("--minimum-soc", type=float, default=None, help="SoC floor, 0..1 (default 0.20)")
    p.add_argument("--profile", help="discharge_profile.json to start from")
    p.add_argument("--out", help="write node_id,setpoint_kw,reason rows to this CSV")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_dispatch)

    p = sub.add_parser("run", help="start the aggregator in the foreground", description=cmd_run.__doc__)
    p.add_argument("--config", required=True, help="YAML config (see configs/default.yaml)")
    p.add_argument("--log-file", help="write engine.log here instead of stderr")
    p.add_argument("--json-logs", action="store_true", help="JSON lines instead of text")
    p.add_argument("--allow-root", action="store_true", help="run even as root (refused otherwise)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("check", help="validate a config without starting", description=cmd_config_check.__doc__)
    c.add_argument("file")
    c.set_defaults(func=cmd_config_check)

    from v2grt import bench

    names = bench.names()
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(names),
                       description="Benchmarks print a table, or one JSON object with --json; --smoke runs one at "
                                   "a tiny size in a few seconds (docs/benchmarks.md).")
    p.add_argument("name", choices=names)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see --help after the name)")
    p.set_defaults(func=cmd_bench)

    # Each room registers its own subcommands: add_parser(sub) in the module that implements them.
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"v2grt {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
