"""`v2grt gateway sim`: a reference gateway process driving simulated vehicles.

    v2grt gateway sim --roster fleet.csv --gateway-id gw3 \\
        --setpoints tcp://127.0.0.1:5560 --telemetry tcp://127.0.0.1:5561

It takes the vehicles of its gateway id from the roster, subscribes to its own setpoint topic,
applies the setpoints to the simulated vehicles in real time and pushes their telemetry back every
``--telemetry-interval-s``. SIGTERM or SIGINT stops it cleanly: every vehicle to 0 kW, a last
telemetry batch showing it, then ``--state-out`` is written if given. Also runnable as
``python -m v2grt.gateway.cli sim ...``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

log = logging.getLogger("v2grt.gateway")


def cmd_sim(args) -> int:
    """Run one simulated gateway until SIGTERM/SIGINT."""
    import zmq

    from v2grt.events import EventLog, setup_logging
    from v2grt.fleet import Fleet, FleetError
    from v2grt.gateway.core import GatewayCore, GatewayError
    from v2grt.gateway.sim import SimVehicles, gateway_fleet
    from v2grt.io.bus import BusError
    from v2grt.roster import RosterError
    from v2grt.service import SignalFlag
    from v2grt.sim.battery import SimError

    setup_logging(args.log_file, json_lines=args.json_logs)
    stop = SignalFlag()  # not threading.Event: its set() takes a lock a second signal would deadlock on
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    events = EventLog(interval_s=args.event_interval_s)
    try:
        fleet = gateway_fleet(Fleet.from_csv(args.roster), args.gateway_id)
    except FileNotFoundError:
        return _fail(f"--roster {args.roster!r}: no such file", EXIT_INVALID)
    except (RosterError, FleetError, GatewayError) as exc:
        return _fail(str(exc), EXIT_INVALID)
    from v2grt.cli import CliError
    from v2grt.security import client_curve_from_args

    try:
        curve = client_curve_from_args(args)  # --client-key/--server-key when the aggregator is secured
    except CliError as exc:
        return _fail(str(exc), EXIT_INVALID)
    ctx = zmq.Context()
    vehicles = None
    try:
        try:
            vehicles = SimVehicles(fleet, gateway_id=args.gateway_id, seed=args.seed,
                                   unreachable_fraction=args.unreachable_fraction,
                                   low_soh_fraction=args.low_soh_fraction, hot_fraction=args.hot_fraction,
                                   unplug_rate_per_h=args.unplug_rate_per_h, plug_rate_per_h=args.plug_rate_per_h,
                                   events=events, ctx=ctx, site_power=args.site_power)
            core = GatewayCore(ctx, args.gateway_id, vehicles, setpoints=args.setpoints, telemetry=args.telemetry,
                               telemetry_interval_s=args.telemetry_interval_s, events=events, curve=curve)
        except (SimError, GatewayError, BusError, zmq.ZMQError) as exc:
            return _fail(str(exc), EXIT_INVALID)
        s = vehicles.state
        log.info("GATEWAY_START gateway=%s vehicles=%d online=%d firmware_rejects_discharge=%d setpoints=%s "
                 "telemetry=%s telemetry_interval_s=%g", args.gateway_id, len(vehicles.node_ids), int(s.online.sum()),
                 int(s.firmware_rejects_discharge.sum()), args.setpoints, args.telemetry, args.telemetry_interval_s)
        core.run(stop)  # returns with every vehicle at 0 kW and the sockets closed
        # Stopping already: more signals (a dying parent and Ctrl-C together) are ignored. With the handler
        # left in place, interpreter shutdown would reset it to the default and a late one kill the process.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if args.state_out:
            vehicles.write_state(args.state_out)
        counters = " ".join(f"{k}={v}" for k, v in core.counters().items())
        log.info("GATEWAY_STOP gateway=%s %s plug_events=%d state_out=%s", args.gateway_id, counters,
                 vehicles.plug_events, args.state_out or "-")
        return EXIT_OK
    finally:
        if vehicles is not None:
            vehicles.close()
        ctx.term()


def _fail(message: str, code: int) -> int:
    print(f"v2grt gateway: {message}", file=sys.stderr)
    return code


def _add_sim(gsub) -> None:
    from v2grt.io import bus

    p = gsub.add_parser("sim", help="simulated vehicles behind one gateway (battery, thermal and plug models)",
                        description=cmd_sim.__doc__ + " Powers are kW, positive = discharge into the grid.")
    p.add_argument("--roster", required=True, help="roster CSV; the gateway drives the rows with its gateway id")
    p.add_argument("--gateway-id", required=True, help="this gateway's id (its setpoint topic is sp/<id>)")
    p.add_argument("--setpoints", default=bus.DEFAULT_SETPOINT_CONNECT,
                   help=f"the aggregator's setpoint PUB (default {bus.DEFAULT_SETPOINT_CONNECT})")
    p.add_argument("--telemetry", default=bus.DEFAULT_TELEMETRY_CONNECT,
                   help=f"the aggregator's telemetry PULL (default {bus.DEFAULT_TELEMETRY_CONNECT})")
    p.add_argument("--telemetry-interval-s", type=float, default=1.0,
                   help="seconds between telemetry batches (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated faults and plug events")
    p.add_argument("--unreachable-fraction", type=float, default=0.01,
                   help="share of vehicles whose firmware rejects discharge (NODE_UNREACHABLE), default 0.01")
    p.add_argument("--low-soh-fraction", type=float, default=0.002,
                   help="share of vehicles with a worn pack, SoH 0.60-0.72 (default 0.002)")
    p.add_argument("--hot-fraction", type=float, default=0.002,
                   help="share of vehicles with a hot pack, 48-56 degC (default 0.002)")
    p.add_argument("--unplug-rate-per-h", type=float, default=None,
                   help="rate at which a plugged-in vehicle leaves, per hour (default 0.1)")
    p.add_argument("--plug-rate-per-h", type=float, default=None,
                   help="rate at which an absent vehicle comes back, per hour (default 0.5)")
    p.add_argument("--state-out", help="write every vehicle's final state (CSV) here on shutdown")
    p.add_argument("--site-power", help="simulation only: push each site's measured output (kW) to this "
                                        "ZeroMQ endpoint after every step (the demo's site inverters)")
    p.add_argument("--event-interval-s", type=float, default=60.0,
                   help="log the same event code for the same node at most this often (default 60)")
    p.add_argument("--log-file", help="write the gateway log here instead of stderr")
    p.add_argument("--json-logs", action="store_true", help="JSON lines instead of text")
    from v2grt.security import add_client_key_options

    add_client_key_options(p)  # the key pair must be authorized as gateway:<--gateway-id>
    p.set_defaults(func=cmd_sim)


def add_parser(sub) -> None:
    """Register `v2grt gateway ...` on the v2grt command line."""
    p = sub.add_parser("gateway", help="reference gateways (simulated vehicles)",
                       description="Reference gateways: subscribe to setpoints, drive vehicles, push telemetry.")
    gsub = p.add_subparsers(dest="gateway_command", required=True, metavar="KIND")
    _add_sim(gsub)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt gateway")
    gsub = ap.add_subparsers(dest="gateway_command", required=True, metavar="KIND")
    _add_sim(gsub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
