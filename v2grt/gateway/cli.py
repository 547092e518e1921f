"""`v2grt gateway sim` (simulated vehicles), `ocpp` (OCPP 2.1 charging stations), `sunspec` (SunSpec DER chargers).

    v2grt gateway sim --roster fleet.csv --gateway-id gw3 \\
        --setpoints tcp://127.0.0.1:5560 --telemetry tcp://127.0.0.1:5561

It takes the vehicles of its gateway id from the roster, subscribes to its own setpoint topic,
applies the setpoints to the simulated vehicles in real time and pushes their telemetry back every
``--telemetry-interval-s``. SIGTERM or SIGINT stops it cleanly: every vehicle to 0 kW, a last
telemetry batch showing it, then ``--state-out`` is written if given. Also runnable as
``python -m v2grt.gateway.cli sim ...``.

    v2grt gateway ocpp --roster fleet.csv --gateway-id ocpp1 --credentials credentials.csv \
        --tls-cert cert.pem --tls-key key.pem --listen 0.0.0.0:9000

is the same gateway with charging stations behind it instead of simulated vehicles: a CSMS that
stations reach at ``wss://<host>:9000/ocpp/<station id>`` (docs/gateways.md).

    v2grt gateway sunspec --roster fleet.csv --gateway-id sunspec1 --devices devices.csv

drives bidirectional chargers on Modbus TCP read as SunSpec DER devices (701/702/704/713); the
devices file maps each roster node to host, port and unit id (docs/gateways.md).
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import sys

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

log = logging.getLogger("v2grt.gateway")


def _stop_on_signals():
    """A stop flag that SIGINT and SIGTERM set (a SignalFlag, not threading.Event: its set() takes a lock that
    a second signal arriving inside it would deadlock on)."""
    from v2grt.service import SignalFlag

    stop = SignalFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def _run_until_stopped(core, stop) -> None:
    """Run the gateway core until `stop`; it returns with every node at 0 kW and its sockets closed.

    Stopping already: more signals (a dying parent and Ctrl-C together) are ignored from then on. With the
    handler left in place, interpreter shutdown would reset it to the default and a late signal would kill
    the process (exit -15) before its last words (test_gateway.py::test_signal_storm_still_exits).
    """
    core.run(stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _run_gateway(args, load, make_vehicles, *, errors: tuple = (), start, finish, running=None) -> int:
    """What every gateway command does around its own driver, in this order: logging, the stop flag and the
    event log; ``load()``, its inputs (the roster's vehicles of ``--gateway-id`` and whatever else the kind
    reads) or an exit code; the bus key (``--client-key``); the ZeroMQ context; ``make_vehicles(inputs,
    events, ctx)`` and the GatewayCore around it (``errors``: the driver's own start-up errors, besides the
    core's and the bus's); the GATEWAY_START line (``start(vehicles)``: its format and values after the
    gateway id); ``running(vehicles, core)`` if given (what runs beside the core, e.g. a stats thread; it
    returns what to call once the core stopped); the run until SIGTERM/SIGINT; the GATEWAY_STOP line
    (``finish(vehicles, core)``: what the kind does once the core stopped, and the line's text after the
    gateway id); the teardown."""
    import zmq

    from v2grt.cli import CliError
    from v2grt.events import EventLog, setup_logging
    from v2grt.gateway.core import GatewayCore, GatewayError
    from v2grt.io.bus import BusError
    from v2grt.security.cli import client_curve_from_args

    setup_logging(args.log_file, json_lines=args.json_logs)
    stop = _stop_on_signals()
    events = EventLog(interval_s=args.event_interval_s)
    inputs = load()
    if isinstance(inputs, int):
        return inputs
    try:
        curve = client_curve_from_args(args)  # --client-key/--server-key when the aggregator is secured
    except CliError as exc:
        return _fail(str(exc), EXIT_INVALID)
    ctx = zmq.Context()
    vehicles = None
    try:
        try:
            vehicles = make_vehicles(inputs, events, ctx)
            core = GatewayCore(ctx, args.gateway_id, vehicles, setpoints=args.setpoints, telemetry=args.telemetry,
                               telemetry_interval_s=args.telemetry_interval_s, events=events, curve=curve)
        except (GatewayError, BusError, zmq.ZMQError, *errors) as exc:
            return _fail(str(exc), EXIT_INVALID)
        fmt, values = start(vehicles)
        log.info("GATEWAY_START gateway=%s " + fmt, args.gateway_id, *values)
        after = running(vehicles, core) if running is not None else None
        _run_until_stopped(core, stop)  # every node at 0 kW, handed to the vehicles or chargers
        if after is not None:
            after()
        log.info("GATEWAY_STOP gateway=%s %s", args.gateway_id, finish(vehicles, core))
        return EXIT_OK
    finally:
        if vehicles is not None:
            vehicles.close()
        ctx.term()


def _add_bus_endpoints(p) -> None:
    """--setpoints and --telemetry: one aggregator's endpoints, or every aggregator's of an HA fleet (docs/ha.md)."""
    from v2grt.io import bus

    p.add_argument("--setpoints", default=bus.DEFAULT_SETPOINT_CONNECT,
                   help=f"the aggregator's setpoint PUB (default {bus.DEFAULT_SETPOINT_CONNECT}); with several "
                        "aggregators (ha), every one's, comma-separated: setpoints are taken from all, fenced by epoch")
    p.add_argument("--telemetry", default=bus.DEFAULT_TELEMETRY_CONNECT,
                   help=f"the aggregator's telemetry PULL (default {bus.DEFAULT_TELEMETRY_CONNECT}); with several "
                        "aggregators, every one's, comma-separated in the same order: telemetry goes to all")


def _roster_fleet(args):
    """The roster's vehicles of --gateway-id, as a fleet of their own."""
    from v2grt.fleet import Fleet
    from v2grt.gateway.sim import gateway_fleet

    return gateway_fleet(Fleet.from_csv(args.roster), args.gateway_id)


def _counters(*parts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in {k: v for part in parts for k, v in part.items()}.items())


def cmd_sim(args) -> int:
    """Run one simulated gateway until SIGTERM/SIGINT."""
    from v2grt.fleet import FleetError
    from v2grt.gateway.core import GatewayError
    from v2grt.gateway.sim import SimVehicles
    from v2grt.roster import RosterError
    from v2grt.sim.battery import SimError

    def load():
        try:
            return _roster_fleet(args)
        except FileNotFoundError:
            return _fail(f"--roster {args.roster!r}: no such file", EXIT_INVALID)
        except (RosterError, FleetError, GatewayError) as exc:
            return _fail(str(exc), EXIT_INVALID)

    def make_vehicles(fleet, events, ctx):
        return SimVehicles(fleet, gateway_id=args.gateway_id, seed=args.seed,
                           unreachable_fraction=args.unreachable_fraction,
                           low_soh_fraction=args.low_soh_fraction, hot_fraction=args.hot_fraction,
                           unplug_rate_per_h=args.unplug_rate_per_h, plug_rate_per_h=args.plug_rate_per_h,
                           events=events, ctx=ctx, site_power=args.site_power)

    def start(vehicles):
        s = vehicles.state
        return ("vehicles=%d online=%d firmware_rejects_discharge=%d setpoints=%s telemetry=%s "
                "telemetry_interval_s=%g", (len(vehicles.node_ids), int(s.online.sum()),
                                            int(s.firmware_rejects_discharge.sum()), args.setpoints, args.telemetry,
                                            args.telemetry_interval_s))

    def finish(vehicles, core):
        if args.state_out:
            vehicles.write_state(args.state_out)
        return f"{_counters(core.counters())} plug_events={vehicles.plug_events} state_out={args.state_out or '-'}"

    return _run_gateway(args, load, make_vehicles, errors=(SimError,), start=start, finish=finish)


def cmd_ocpp(args) -> int:
    """Run the OCPP 2.1 gateway (a CSMS for the roster's <station>:<evse> nodes) until SIGTERM/SIGINT."""
    from v2grt.fleet import FleetError
    from v2grt.gateway import ocpp_mapping as om
    from v2grt.gateway.core import GatewayError
    from v2grt.gateway.ocpp import OcppSettings, OcppVehicles, server_ssl_context, tune_gc
    from v2grt.gateway.ocpp_local import local_settings_from_args
    from v2grt.roster import RosterError

    host, _, port = args.listen.rpartition(":")

    def load():
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            return _fail(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9000", EXIT_INVALID)
        if bool(args.tls_cert) != bool(args.tls_key):
            return _fail("--tls-cert and --tls-key go together", EXIT_INVALID)
        try:
            fleet = _roster_fleet(args)
            credentials = om.load_credentials(args.credentials)
            tls = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
            local = local_settings_from_args(args)
        except FileNotFoundError as exc:
            return _fail(f"{exc.filename!r}: no such file", EXIT_INVALID)
        except (RosterError, FleetError, GatewayError, om.MappingError) as exc:
            return _fail(str(exc), EXIT_INVALID)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a bad certificate or key
            return _fail(f"--tls-cert {args.tls_cert!r} / --tls-key {args.tls_key!r}: {exc}", EXIT_INVALID)
        return fleet, credentials, tls, local

    def make_vehicles(inputs, events, ctx):
        import ocpp.messages

        fleet, credentials, tls, local = inputs
        # ocpp validates every payload on a thread-pool worker by default: a thread hop per message that
        # buys nothing under the GIL. Inline, 100 simulated stations x 2 EVSEs cost 14-17 % of a core
        # instead of 17-23 % (three runs each, loaded 2-core box). A process-wide switch of the library,
        # so set here, where the process is this gateway's own.
        ocpp.messages.ASYNC_VALIDATION = False
        settings = OcppSettings(credentials, host=host, port=int(port), ssl_context=tls,
                                allow_plaintext=args.allow_plaintext, deadband_kw=args.deadband_kw,
                                resync_s=args.resync_s, max_offline_s=args.max_offline_s,
                                call_timeout_s=args.call_timeout_s, rate_per_s=args.rate_per_s, burst=args.burst,
                                accept_201=not args.no_ocpp201, meter_stale_s=args.meter_stale_s)
        if local is None:
            vehicles = OcppVehicles(fleet, settings, gateway_id=args.gateway_id, events=events).start()
        else:
            vehicles = _local_frequency_vehicles(args, fleet, settings, local, events, ctx)
        if args.trace_file:  # benches: every sent update and answered call, written at exit (bench e2e --protocol ocpp)
            vehicles.trace = collections.deque(maxlen=1_000_000)
            vehicles.calls_trace = collections.deque(maxlen=1_000_000)
        tune_gc()  # this process is the gateway's own: the collector's settings are its to choose
        return vehicles

    def start(vehicles):
        return ("kind=ocpp nodes=%d stations=%d listen=%s:%d tls=%s setpoints=%s telemetry=%s deadband_kw=%g "
                "resync_s=%g max_offline_s=%d operation_mode=%s service=%s", (
                    len(vehicles.node_ids), len({e.station_id for e in vehicles.evses}), host, vehicles.port,
                    vehicles.settings.ssl_context is not None, args.setpoints, args.telemetry, args.deadband_kw,
                    args.resync_s, args.max_offline_s, args.operation_mode, args.service or "-"))

    def finish(vehicles, core):
        vehicles.close()  # sends what is still due (the zeros), then closes every station
        if args.trace_file:
            vehicles.write_trace(args.trace_file)
        return f"kind=ocpp {_counters(core.counters(), vehicles.counters())}"

    def running(vehicles, core):
        _realtime(args.sched_fifo_priority)  # the websockets thread too: set_process_fifo covers every thread
        return None

    return _run_gateway(args, load, make_vehicles, start=start, finish=finish, running=running)


def _local_frequency_vehicles(args, fleet, settings, local, events, ctx):
    """The OCPP driver of --operation-mode local-frequency, listening to the status topic of every aggregator
    (the frequency of each cycle) with the same endpoints and key as the setpoints."""
    from v2grt.gateway.ocpp_local import LocalFrequencyVehicles
    from v2grt.io import bus
    from v2grt.security.cli import client_curve_from_args

    endpoints = bus.split_endpoints(args.setpoints, "setpoints (--setpoints)")
    curves = bus.curves_for(client_curve_from_args(args), len(endpoints))
    vehicles = LocalFrequencyVehicles(fleet, settings, local, gateway_id=args.gateway_id, events=events).start()
    try:
        return vehicles.listen_status(ctx, endpoints, curves)
    except Exception:
        vehicles.close(0.0)
        raise


def cmd_sunspec(args) -> int:
    """Run the SunSpec DER gateway (chargers on Modbus TCP, one per roster node) until SIGTERM/SIGINT."""
    from v2grt.fleet import FleetError
    from v2grt.gateway import sunspec_mapping as sm
    from v2grt.gateway.core import GatewayError, tune_gc
    from v2grt.gateway.sunspec import SunSpecChargers, SunSpecSettings
    from v2grt.roster import RosterError

    def load():
        try:
            return _roster_fleet(args), sm.load_devices(args.devices)
        except FileNotFoundError as exc:
            return _fail(f"{exc.filename!r}: no such file", EXIT_INVALID)
        except (RosterError, FleetError, GatewayError, sm.MappingError) as exc:
            return _fail(str(exc), EXIT_INVALID)

    def make_vehicles(inputs, events, ctx):
        fleet, devices = inputs
        settings = SunSpecSettings(poll_s=args.poll_s, timeout_s=args.timeout_s, revert_s=args.revert_s,
                                   deadband_kw=args.deadband_kw, stale_s=args.stale_s)
        vehicles = SunSpecChargers(fleet, devices, settings, gateway_id=args.gateway_id, events=events).start()
        tune_gc()  # as the OCPP gateway: a collection would hold every charger's write behind it
        return vehicles

    def start(vehicles):
        return ("kind=sunspec devices=%d setpoints=%s telemetry=%s poll_s=%g revert_s=%d deadband_kw=%g",
                (len(vehicles.node_ids), args.setpoints, args.telemetry, args.poll_s, args.revert_s,
                 args.deadband_kw))

    def running(vehicles, core):
        stats_stop = _log_stats(args.gateway_id, args.stats_interval_s, core, vehicles)
        _realtime(args.sched_fifo_priority)
        return stats_stop.set

    def finish(vehicles, core):
        vehicles.close()  # writes what is still due (the zeros), then stops the Modbus thread
        return f"kind=sunspec {_counters(core.counters(), vehicles.counters())}"

    return _run_gateway(args, load, make_vehicles, start=start, finish=finish, running=running)


def _realtime(priority: int) -> None:
    """SCHED_FIFO for every thread of the gateway (0: leave them SCHED_OTHER); each thread's outcome logged as
    RT_SETUP, as the aggregator logs its own."""
    if not priority:
        return
    from v2grt.loop import set_process_fifo

    for step in set_process_fifo(priority):
        log.info("RT_SETUP step=%s granted=%s detail=%s", step.step, step.granted, step.detail)


def _log_stats(gateway_id: str, interval_s: float, core, vehicles):
    """Every ``interval_s`` (0: never) a GATEWAY_STATS line with the counters so far and CLOCK_MONOTONIC, from a
    thread of its own; returns the Event that stops it. Rates over a window are the difference of two lines
    (v2grt bench gateway --protocol sunspec reads them)."""
    import threading
    import time

    done = threading.Event()

    def loop():
        while not done.wait(interval_s):
            counters = " ".join(f"{k}={v}" for k, v in {**core.counters(), **vehicles.counters()}.items())
            log.info("GATEWAY_STATS gateway=%s t_mono_ns=%d %s", gateway_id, time.monotonic_ns(), counters)

    if interval_s > 0:
        threading.Thread(target=loop, name="stats", daemon=True).start()
    return done


def cmd_ocpp_password(args) -> int:
    """Print a credentials-file row for a station: the password is read from stdin (one line)."""
    from v2grt.gateway import ocpp_mapping as om

    if not om.valid_station_id(args.station_id):
        return _fail(f"station id {args.station_id!r}: expected 1..48 characters of A-Z a-z 0-9 *-_=:+|@.",
                     EXIT_INVALID)
    password = sys.stdin.readline().rstrip("\n")
    if not 16 <= len(password) <= 40:
        return _fail(f"password of {len(password)} characters: OCPP's BasicAuthPassword is 16..40", EXIT_INVALID)
    print(f"{args.station_id},{om.hash_password(args.station_id, password)}")
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"v2grt gateway: {message}", file=sys.stderr)
    return code


def _add_sim(gsub) -> None:

    p = gsub.add_parser("sim", help="simulated vehicles behind one gateway (battery, thermal and plug models)",
                        description=cmd_sim.__doc__ + " Powers are kW, positive = discharge into the grid.")
    p.add_argument("--roster", required=True, help="roster CSV; the gateway drives the rows with its gateway id")
    p.add_argument("--gateway-id", required=True, help="this gateway's id (its setpoint topic is sp/<id>)")
    _add_bus_endpoints(p)
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
    from v2grt.security.cli import add_client_key_options

    add_client_key_options(p)  # the key pair must be authorized as gateway:<--gateway-id>
    p.set_defaults(func=cmd_sim)


def _add_ocpp(gsub) -> None:

    p = gsub.add_parser("ocpp", help="OCPP 2.1 charging stations behind one gateway (a CSMS; docs/gateways.md)",
                        description=cmd_ocpp.__doc__ + " Powers are kW, positive = discharge into the grid.")
    p.add_argument("--roster", required=True, help="roster CSV; this gateway's rows are named <station>:<evse>")
    p.add_argument("--gateway-id", required=True, help="this gateway's id (its setpoint topic is sp/<id>)")
    p.add_argument("--credentials", required=True,
                   help="CSV station_id,password_hash (v2grt gateway ocpp-password); other stations are refused")
    p.add_argument("--listen", default="0.0.0.0:9000", help="HOST:PORT of the websocket server (default 0.0.0.0:9000)")
    p.add_argument("--tls-cert", help="PEM certificate chain (security profile 2)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="run without TLS (security profile 1: passwords in clear); labs only")
    _add_bus_endpoints(p)
    p.add_argument("--telemetry-interval-s", type=float, default=1.0,
                   help="seconds between telemetry batches (default 1.0)")
    p.add_argument("--deadband-kw", type=float, default=0.5,
                   help="send a setpoint only when it moved more than this (default 0.5 kW; 0 always goes out)")
    p.add_argument("--resync-s", type=float, default=5.0, help="re-send every setpoint at least this often (5 s)")
    p.add_argument("--max-offline-s", type=int, default=3,
                   help="maxOfflineDuration of the profiles: whole seconds a station may lose us (default 3)")
    p.add_argument("--call-timeout-s", type=float, default=5.0, help="wait this long for a station's reply (5 s)")
    p.add_argument("--rate-per-s", type=float, default=20.0,
                   help="messages a station may send per second (20); one over 4 KiB counts once more per full 4 KiB")
    p.add_argument("--burst", type=float, default=40.0, help="messages a station may send at once (40)")
    p.add_argument("--no-ocpp201", action="store_true", help="refuse stations that only speak ocpp2.0.1")
    from v2grt.gateway.ocpp_local import add_local_frequency_options

    add_local_frequency_options(p)
    p.add_argument("--meter-stale-s", type=float, default=10.0,
                   help="an EVSE without meter values for this long reports TIMEOUT_BMS_RESPONSE (default 10 s)")
    p.add_argument("--event-interval-s", type=float, default=60.0,
                   help="log the same event code for the same key at most this often (default 60)")
    p.add_argument("--log-file", help="write the gateway log here instead of stderr")
    p.add_argument("--json-logs", action="store_true", help="JSON lines instead of text")
    p.add_argument("--sched-fifo-priority", type=int, default=0, choices=range(0, 100), metavar="0..99",
                   help="SCHED_FIFO at this priority for every thread of the gateway (default 0: SCHED_OTHER); "
                        "below the aggregator's (configs/default.yaml: 50) on a shared host (docs/gateways.md)")
    p.add_argument("--trace-file", help="on exit, write the time each setpoint update was handed over and sent "
                                        "(CSV; CLOCK_MONOTONIC): what `v2grt bench e2e --protocol ocpp` reads")
    from v2grt.security.cli import add_client_key_options

    add_client_key_options(p)
    p.set_defaults(func=cmd_ocpp)
    p = gsub.add_parser("ocpp-password", help="a credentials-file row for a station (password on stdin)",
                        description=cmd_ocpp_password.__doc__)
    p.add_argument("station_id", help="the station's identity (the last segment of its URL)")
    p.set_defaults(func=cmd_ocpp_password)


def _add_sunspec(gsub) -> None:

    p = gsub.add_parser("sunspec", help="SunSpec DER chargers on Modbus TCP behind one gateway (docs/gateways.md)",
                        description=cmd_sunspec.__doc__ + " Powers are kW, positive = discharge into the grid.")
    p.add_argument("--roster", required=True, help="roster CSV; the gateway drives the rows with its gateway id")
    p.add_argument("--gateway-id", required=True, help="this gateway's id (its setpoint topic is sp/<id>)")
    p.add_argument("--devices", required=True,
                   help="CSV node_id,host,port,unit_id: where each roster node's charger answers")
    _add_bus_endpoints(p)
    p.add_argument("--telemetry-interval-s", type=float, default=1.0,
                   help="seconds between telemetry batches (default 1.0)")
    p.add_argument("--poll-s", type=float, default=1.0, help="read 701 and 713 of each charger this often (1 s)")
    p.add_argument("--timeout-s", type=float, default=0.5, help="wait this long for each Modbus reply (0.5 s)")
    p.add_argument("--revert-s", type=int, default=2,
                   help="WSetRvrtTms written with every setpoint: whole seconds after which a charger that "
                        "hears nothing more goes to 0 W on its own (default 2; re-written every revert-s/3)")
    p.add_argument("--deadband-kw", type=float, default=0.2,
                   help="write a setpoint at once only when it moved more than this (default 0.2 kW; 0 always "
                        "goes out; smaller moves go out with the refresh)")
    p.add_argument("--stale-s", type=float, default=5.0,
                   help="a charger without a valid poll for this long reports TIMEOUT_BMS_RESPONSE (default 5 s)")
    p.add_argument("--event-interval-s", type=float, default=60.0,
                   help="log the same event code for the same key at most this often (default 60)")
    p.add_argument("--sched-fifo-priority", type=int, default=0, choices=range(0, 100), metavar="0..99",
                   help="SCHED_FIFO at this priority for every thread of the gateway (default 0: SCHED_OTHER); "
                        "below the aggregator's (configs/default.yaml: 50) on a shared host (docs/gateways.md)")
    p.add_argument("--stats-interval-s", type=float, default=0.0,
                   help="log a GATEWAY_STATS line with the Modbus and bus counters this often (default 0: never)")
    p.add_argument("--log-file", help="write the gateway log here instead of stderr")
    p.add_argument("--json-logs", action="store_true", help="JSON lines instead of text")
    from v2grt.security.cli import add_client_key_options

    add_client_key_options(p)
    p.set_defaults(func=cmd_sunspec)


def add_parser(sub) -> None:
    """Register `v2grt gateway ...` on the v2grt command line."""
    p = sub.add_parser("gateway", help="gateways: simulated vehicles, OCPP 2.1 stations, SunSpec DER chargers",
                       description="Reference gateways: subscribe to setpoints, drive vehicles, push telemetry.")
    gsub = p.add_subparsers(dest="gateway_command", required=True, metavar="KIND")
    _add_sim(gsub)
    _add_ocpp(gsub)
    _add_sunspec(gsub)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt gateway")
    gsub = ap.add_subparsers(dest="gateway_command", required=True, metavar="KIND")
    _add_sim(gsub)
    _add_ocpp(gsub)
    _add_sunspec(gsub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
