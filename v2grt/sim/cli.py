"""`v2grt sim ...`: simulators that stand in for field equipment (OCPP 2.1 stations, SunSpec DER chargers).

    v2grt sim ocpp-stations --write-site site/ --stations 50 --evses 2 --gateway-id ocpp1
    v2grt sim ocpp-stations --url wss://127.0.0.1:9000/ocpp --roster site/roster.csv \\
        --gateway-id ocpp1 --passwords site/passwords.csv --ca-cert cert.pem --kinds rejects=1,v201=1

The first writes a roster of ``<station>:<evse>`` nodes, the gateway's credentials file (hashes)
and the simulator's passwords file; the second runs the stations until SIGTERM/SIGINT.

    v2grt sim sunspec-chargers --write-site site/ --chargers 20 --gateway-id sunspec1 --base-port 15020
    v2grt sim sunspec-chargers --roster site/roster.csv --devices site/devices.csv --gateway-id sunspec1

The same for SunSpec DER chargers on Modbus TCP: a roster and the devices file (node -> host, port,
unit id), then the chargers served where the devices file says.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

log = logging.getLogger("v2grt.sim")


def _kinds(spec: str | None, stations: list[str]) -> dict[str, str]:
    """``rejects=1,v201=2`` -> the first station(s) of the list get those kinds, in that order."""
    from v2grt.sim.ocpp_stations import KINDS

    out: dict[str, str] = {}
    if not spec:
        return out
    it = iter(stations)
    for part in spec.split(","):
        kind, _, count = part.partition("=")
        if kind not in KINDS or not count.isdigit():
            raise ValueError(f"--kinds {part!r}: expected KIND=COUNT with KIND one of {', '.join(KINDS)}")
        for _ in range(int(count)):
            station = next(it, None)
            if station is None:
                raise ValueError(f"--kinds {spec!r}: more misbehaving stations than stations")
            out[station] = kind
    return out


def cmd_ocpp_stations(args) -> int:
    """Simulated OCPP 2.1 charging stations (ocpp ChargePoint clients) with EVs from the battery model."""
    import ssl

    from v2grt.events import setup_logging
    from v2grt.fleet import Fleet
    from v2grt.gateway.sim import gateway_fleet
    from v2grt.service import SignalFlag
    from v2grt.sim.battery import SimFleetState
    from v2grt.sim.ocpp_stations import SimStations, load_passwords, specs_from_fleet, write_site

    if args.write_site:
        paths = write_site(args.write_site, n_stations=args.stations, evses_per_station=args.evses,
                           gateway_id=args.gateway_id, seed=args.seed)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return EXIT_OK
    if not (args.url and args.roster and args.passwords):
        print("v2grt sim ocpp-stations: --url, --roster and --passwords are required (or --write-site)",
              file=sys.stderr)
        return EXIT_INVALID
    setup_logging(args.log_file, json_lines=False)
    try:
        fleet = gateway_fleet(Fleet.from_csv(args.roster), args.gateway_id)
        passwords = load_passwords(args.passwords)
        stations = list(dict.fromkeys(nid.rpartition(":")[0] for nid in fleet.node_ids[: fleet.n_rows]))
        specs = specs_from_fleet(fleet, passwords, _kinds(args.kinds, stations))
        ctx = None
        if args.url.startswith("wss://"):
            ctx = ssl.create_default_context(cafile=args.ca_cert) if args.ca_cert else ssl.create_default_context()
        lo, _, hi = args.latency_ms.partition(":")
        latency = (float(lo) / 1000.0, float(hi or lo) / 1000.0)
    except Exception as exc:  # every input problem is a usage error here, named
        print(f"v2grt sim ocpp-stations: {exc}", file=sys.stderr)
        return EXIT_INVALID
    import ocpp.messages

    # The package validates on a thread-pool worker by default: a thread hop per message for nothing
    # under the GIL (the gateway's CLI does the same); this process is the simulator's own.
    ocpp.messages.ASYNC_VALIDATION = False
    state = SimFleetState.from_fleet(fleet, args.seed, unreachable_fraction=0.0)
    sims = SimStations(args.url, specs, state, ssl_context=ctx, latency_s=latency,
                       ramp_kw_per_s=args.ramp_kw_per_s, meter_interval_s=args.meter_interval_s, seed=args.seed)
    from v2grt.sim import ocpp_local

    try:
        local = ocpp_local.attach(sims, args.frequency_from, poll_ms=args.frequency_poll_ms)
    except ValueError as exc:
        print(f"v2grt sim ocpp-stations: {exc}", file=sys.stderr)
        return EXIT_INVALID
    stop = SignalFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    log.info("SIM_OCPP_START stations=%d evses=%d url=%s kinds=%s frequency_from=%s", len(specs), fleet.n_rows,
             args.url, args.kinds or "-", args.frequency_from or "-")
    if args.sched_fifo_priority:  # before the stations' thread starts: it inherits the policy
        from v2grt.loop import set_process_fifo

        for step in set_process_fifo(args.sched_fifo_priority):
            log.info("RT_SETUP step=%s granted=%s detail=%s", step.step, step.granted, step.detail)
    try:
        with _site_power(args, fleet, sims):
            sims.run_forever(stop)
    finally:
        if local.feed is not None:
            local.feed.stop()
    if args.trace_file:
        sims.write_trace(args.trace_file)
    log.info("SIM_OCPP_STOP connections=%d commands=%d meter_timeouts=%d local_responses=%d",
             sum(sims.connections.values()), len(sims.commands), sims.meter_timeouts, local.responses)
    return EXIT_OK


@contextlib.contextmanager
def _site_power(args, fleet, sims):
    """With ``--site-power``: push the devices' output per site and their applied setpoints (simulation only)."""
    if not args.site_power:
        yield
        return
    import zmq

    from v2grt.sim.site_power import DevicePowerPusher

    ctx = zmq.Context()
    pusher = DevicePowerPusher(ctx, args.site_power, args.gateway_id, list(fleet.node_ids[: fleet.n_rows]),
                               fleet.site[: fleet.n_rows], list(fleet.site_ids), sims)
    pusher.start()
    try:
        yield
    finally:
        pusher.stop()  # after the devices stopped: its last frame carries their final SoC
        ctx.term()


def _add_ocpp_stations(ssub) -> None:
    p = ssub.add_parser("ocpp-stations", help="simulated OCPP 2.1 charging stations with EVs",
                        description=cmd_ocpp_stations.__doc__ + " Powers are kW, + = discharge into the grid.")
    p.add_argument("--url", help="the gateway's websocket URL without the station id, e.g. wss://host:9000/ocpp")
    p.add_argument("--roster", help="roster CSV with <station>:<evse> nodes")
    p.add_argument("--gateway-id", default="ocpp1", help="the gateway whose roster rows to simulate (ocpp1)")
    p.add_argument("--passwords", help="CSV station_id,password (written by --write-site)")
    p.add_argument("--ca-cert", help="PEM CA certificate to trust for wss:// (default: the system's)")
    p.add_argument("--kinds", help="misbehaving stations, e.g. rejects=1,disconnects=1,v201=1 (the first stations)")
    p.add_argument("--latency-ms", default="20:80", help="command latency range MIN:MAX in ms (default 20:80)")
    p.add_argument("--ramp-kw-per-s", type=float, default=50.0, help="power ramp of each EVSE (default 50 kW/s)")
    p.add_argument("--meter-interval-s", type=float, default=1.0, help="MeterValues period (default 1 s)")
    p.add_argument("--seed", type=int, default=0, help="seed of latencies and the site's SoCs")
    p.add_argument("--write-site", metavar="DIR", help="write roster.csv, credentials.csv and passwords.csv "
                                                       "for --stations x --evses nodes into DIR, then exit")
    p.add_argument("--stations", type=int, default=10, help="with --write-site: stations (default 10)")
    p.add_argument("--evses", type=int, default=2, help="with --write-site: EVSEs per station (default 2)")
    p.add_argument("--site-power", help="simulation only: push each site's measured output (kW) and the setpoints "
                                        "applied to this ZeroMQ endpoint (the demo's site inverters)")
    p.add_argument("--frequency-from", metavar="HOST:PORT",
                   help="the SunSpec meter whose frequency the stations measure (one poller per process, shared by "
                        "its stations): stations then accept LocalFrequency profiles; without it they reject them")
    p.add_argument("--frequency-poll-ms", type=float, default=20.0,
                   help="poll interval of --frequency-from (default 20 ms)")
    p.add_argument("--sched-fifo-priority", type=int, default=0, choices=range(0, 100), metavar="0..99",
                   help="SCHED_FIFO at this priority for every thread of the simulator (default 0: SCHED_OTHER); "
                        "benches: below the gateway's, so the load generator does not starve what it measures")
    p.add_argument("--log-file", help="write the log here instead of stderr")
    p.add_argument("--trace-file", help="on exit, write every setpoint received and applied (CSV event,t_ns,row,"
                                        "p_kw; CLOCK_MONOTONIC): what `v2grt bench e2e --protocol ocpp` reads")
    p.set_defaults(func=cmd_ocpp_stations)


def cmd_sunspec_chargers(args) -> int:
    """Simulated SunSpec DER chargers (pymodbus servers, models 1/701/702/704/713) with EVs from the battery model."""
    from v2grt.events import setup_logging
    from v2grt.fleet import Fleet
    from v2grt.gateway import sunspec_mapping as sm
    from v2grt.gateway.sim import gateway_fleet
    from v2grt.service import SignalFlag
    from v2grt.sim.battery import SimFleetState
    from v2grt.sim.sunspec_chargers import SimChargers, layout_from_devices, write_site

    if args.write_site:
        paths = write_site(args.write_site, n_devices=args.chargers, gateway_id=args.gateway_id, host=args.host,
                           base_port=args.base_port, units_per_server=args.units_per_server, seed=args.seed)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return EXIT_OK
    if not (args.roster and args.devices):
        print("v2grt sim sunspec-chargers: --roster and --devices are required (or --write-site)",
              file=sys.stderr)
        return EXIT_INVALID
    setup_logging(args.log_file, json_lines=False)
    try:
        fleet = gateway_fleet(Fleet.from_csv(args.roster), args.gateway_id)
        node_ids = list(fleet.node_ids[: fleet.n_rows])
        layout = layout_from_devices(sm.load_devices(args.devices), node_ids)
        kinds = _kinds_by_row(args.kinds, len(node_ids))
        lo, _, hi = args.latency_ms.partition(":")
        latency = (float(lo) / 1000.0, float(hi or lo) / 1000.0)
        state = SimFleetState.from_fleet(fleet, args.seed, unreachable_fraction=0.0)
        sims = SimChargers(state, layout, kinds=kinds, latency_s=latency, ramp_kw_per_s=args.ramp_kw_per_s,
                           tick_s=args.tick_s, seed=args.seed)
    except Exception as exc:  # every input problem is a usage error here, named
        print(f"v2grt sim sunspec-chargers: {exc}", file=sys.stderr)
        return EXIT_INVALID
    stop = SignalFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        sims.start()
    except RuntimeError as exc:
        print(f"v2grt sim sunspec-chargers: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from v2grt.gateway.core import tune_gc

    tune_gc()  # the simulator stands for chargers with CPUs of their own: no collector pause across all of them
    if args.sched_fifo_priority:
        from v2grt.loop import set_process_fifo

        for step in set_process_fifo(args.sched_fifo_priority):
            log.info("RT_SETUP step=%s granted=%s detail=%s", step.step, step.granted, step.detail)
    log.info("SIM_SUNSPEC_START chargers=%d servers=%d kinds=%s", len(node_ids), len(layout), args.kinds or "-")
    with _site_power(args, fleet, sims):
        while not stop.is_set():
            time.sleep(0.1)
        sims.stop()
    if args.trace_out:
        sims.save_trace(args.trace_out)
    log.info("SIM_SUNSPEC_STOP writes=%d reversions=%d", len(sims.writes), int(sims.reversions.sum()))
    return EXIT_OK


def _kinds_by_row(spec: str | None, n: int) -> dict[int, str]:
    """``silent=1,bad=2`` -> the first charger(s) get those kinds, in that order."""
    from v2grt.sim.sunspec_chargers import KINDS

    out: dict[int, str] = {}
    row = 0
    for part in (spec or "").split(",") if spec else []:
        kind, _, count = part.partition("=")
        if kind not in KINDS or not count.isdigit():
            raise ValueError(f"--kinds {part!r}: expected KIND=COUNT with KIND one of {', '.join(KINDS)}")
        for _ in range(int(count)):
            if row >= n:
                raise ValueError(f"--kinds {spec!r}: more misbehaving chargers than chargers")
            out[row] = kind
            row += 1
    return out


def _add_sunspec_chargers(ssub) -> None:
    p = ssub.add_parser("sunspec-chargers", help="simulated SunSpec DER chargers (Modbus TCP) with EVs",
                        description=cmd_sunspec_chargers.__doc__ + " Powers are kW, + = discharge into the grid.")
    p.add_argument("--roster", help="roster CSV; the chargers of --gateway-id are simulated")
    p.add_argument("--devices", help="CSV node_id,host,port,unit_id (written by --write-site): where to serve")
    p.add_argument("--gateway-id", default="sunspec1", help="the gateway whose roster rows to simulate (sunspec1)")
    p.add_argument("--kinds", help="misbehaving chargers, e.g. silent=1,bad=1 (the first chargers)")
    p.add_argument("--latency-ms", default="5:20", help="write-to-apply latency range MIN:MAX in ms (default 5:20)")
    p.add_argument("--ramp-kw-per-s", type=float, default=50.0, help="power ramp of each charger (default 50 kW/s)")
    p.add_argument("--tick-s", type=float, default=0.02,
                   help="the physics step: power, battery and registers move this often (default 0.02 s; a "
                        "written setpoint takes effect on its own timer, not on the tick)")
    p.add_argument("--seed", type=int, default=0, help="seed of latencies and the site's SoCs")
    p.add_argument("--write-site", metavar="DIR", help="write roster.csv and devices.csv for --chargers chargers "
                                                       "into DIR, then exit")
    p.add_argument("--chargers", type=int, default=10, help="with --write-site: chargers (default 10)")
    p.add_argument("--host", default="127.0.0.1", help="with --write-site: the chargers' host (127.0.0.1)")
    p.add_argument("--base-port", type=int, default=15020, help="with --write-site: first TCP port (15020)")
    p.add_argument("--units-per-server", type=int, default=1,
                   help="with --write-site: unit ids per TCP port (default 1: one server per charger)")
    p.add_argument("--site-power", help="simulation only: push each site's measured output (kW) and the setpoints "
                                        "applied to this ZeroMQ endpoint (the demo's site inverters)")
    p.add_argument("--sched-fifo-priority", type=int, default=0, choices=range(0, 100), metavar="0..99",
                   help="SCHED_FIFO for every thread (default 0: off): chargers are devices with CPUs of their own; "
                        "on a shared host this keeps other users' load out of their answers (benchmarks)")
    p.add_argument("--trace-out", metavar="FILE.npz",
                   help="at exit, write the setpoint writes received and the targets taken, with their "
                        "CLOCK_MONOTONIC times (the last 100,000 of each; v2grt bench e2e --protocol sunspec)")
    p.add_argument("--log-file", help="write the log here instead of stderr")
    p.set_defaults(func=cmd_sunspec_chargers)


def add_parser(sub) -> None:
    """Register `v2grt sim ...` on the v2grt command line."""
    p = sub.add_parser("sim", help="simulators of field equipment (OCPP stations, SunSpec DER chargers)",
                       description="Simulators that stand in for field equipment.")
    ssub = p.add_subparsers(dest="sim_command", required=True, metavar="KIND")
    _add_ocpp_stations(ssub)
    _add_sunspec_chargers(ssub)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt sim")
    ssub = ap.add_subparsers(dest="sim_command", required=True, metavar="KIND")
    _add_ocpp_stations(ssub)
    _add_sunspec_chargers(ssub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
