"""The field manual's commands: `v2g-aggregator` starts the scheduler, `v2g-cli` talks to a running one.

    v2g-aggregator --config /etc/v2g/primary_config.yaml [--daemonize] [--allow-root]
    v2g-cli --status [--json]
    v2g-cli --emergency-stop            (latched until v2g-cli --reset)
    v2g-cli --test-discharge --unit-id EV_NODE_01 [--kw 5] [--seconds 10]
    v2g-cli --reload [--profile FILE]
    v2g-cli --telemetry-profile optimized
    v2g-cli --handover [--to NAME]       (high availability: to the leader; NAME a standby's ha.name)

The same operations are `v2grt` subcommands: status, estop, reset, test-discharge, reload,
telemetry-profile, handover (and `v2grt run` for the aggregator in the foreground).

Exit codes (all commands): 0 success; 1 the operation failed at run time (the aggregator did not answer,
a socket or the log could not be opened, a test discharge aborted or the vehicle did not deliver);
2 bad usage or invalid input (the file, key or value is named on stderr); 3 refused by a safety rule
(a vehicle excluded from a test discharge, a second scheduler for the same fleet, running as root
without --allow-root).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from v2grt.cli import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_REFUSED, CliError

#: Where the packaged service keeps its config (the field manual's path).
DEFAULT_CONFIG = "/etc/v2g/primary_config.yaml"
DEFAULT_TIMEOUT_S = 5.0

#: Wire error codes of a control reply -> exit code (anything else: EXIT_FAILED).
_EXIT_BY_WIRE_CODE = {"NODE_EXCLUDED": EXIT_REFUSED, "REFUSED": EXIT_REFUSED, "BAD_ARG": EXIT_INVALID,
                      "BAD_PROFILE": EXIT_INVALID, "UNKNOWN_NODE": EXIT_INVALID, "FORBIDDEN": EXIT_REFUSED}

_EPILOG = __doc__.split("\n\n")[-1]


# ============================================================================ v2g-aggregator
def aggregator_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="v2g-aggregator", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start the V2G aggregator (the fleet's scheduler): the same as `v2grt run`. In the "
                    "foreground it logs to stderr; as a service (--daemonize, or started by systemd) to "
                    "the config's log.file (/var/log/v2g/engine.log). SIGTERM stops it cleanly (every "
                    "gateway is sent 0 kW), SIGHUP reloads the discharge profile. The recommended way to "
                    "run it is the shipped systemd unit (configs/v2grt.service).")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    ap.add_argument("--daemonize", action="store_true",
                    help="detach into the background; exits 0 once the first cycle has run, else with the "
                         "start-up error's code; stdout/stderr go to the log")
    ap.add_argument("--pidfile", help="with --daemonize: write the daemon's pid here (default "
                                      "<state_dir>/<fleet_id>.pid); removed on exit")
    ap.add_argument("--allow-root", action="store_true",
                    help="run even as root (not recommended: the service needs only CAP_SYS_NICE and "
                         "CAP_IPC_LOCK)")
    ap.add_argument("--log-file", help="write engine.log here (default: log.file as a service, else stderr)")
    ap.add_argument("--json-logs", action="store_true", help="JSON lines instead of text (or log.format: json)")
    return ap


def aggregator_main(argv: list[str] | None = None) -> int:
    """Entry point of `v2g-aggregator`."""
    from v2grt.config import ConfigError, load_config
    from v2grt.service import ServiceRefused, refuse_root

    args = aggregator_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        refuse_root(args.allow_root)
    except ConfigError as exc:
        print(f"v2g-aggregator: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ServiceRefused as exc:
        print(f"v2g-aggregator: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if args.daemonize:
        return _daemonize(cfg, args)
    import faulthandler

    faulthandler.enable()  # the watchdog's SIGABRT leaves every thread's traceback in the journal
    try:
        return _run(cfg, args)
    except KeyboardInterrupt:
        return 130


def _run(cfg, args, ready=None) -> int:
    """run_aggregator with start-up errors mapped to exit codes; returns (code)."""
    code, message = _start(cfg, args, ready)
    if message:
        print(f"v2g-aggregator: {message}", file=sys.stderr)
    return code


def _start(cfg, args, ready) -> tuple[int, str | None]:
    from v2grt.config import ConfigError
    from v2grt.io.bus import BusError
    from v2grt.service import ServiceRefused, run_aggregator
    from v2grt.state import SchedulerConflict

    try:
        return run_aggregator(cfg, log_path=args.log_file, json_logs=args.json_logs, ready=ready,
                              allow_root=args.allow_root, service=True if args.daemonize else None,
                              exit_after=True), None
    except ConfigError as exc:
        return EXIT_INVALID, str(exc)
    except (SchedulerConflict, ServiceRefused) as exc:
        return EXIT_REFUSED, str(exc)
    except (BusError, OSError) as exc:
        return EXIT_FAILED, str(exc)


def _daemonize(cfg, args) -> int:
    """Double fork; the parent waits on a pipe for the daemon's verdict and exits with it.

    The daemon reports "OK" once its first cycle has run (after the fleet lock, the epoch and the
    pidfile), or "ERR <code> <message>" if start-up failed; the parent prints it and exits with that
    code, so `v2g-aggregator --daemonize && echo started` means what it says.
    """
    pidfile = Path(args.pidfile or Path(cfg.state_dir).expanduser() / f"{cfg.fleet_id}.pid").absolute()
    log_path = str(Path(args.log_file or cfg.resolve(cfg.log.file)).expanduser().absolute())
    args.log_file = log_path
    if cfg.path is not None:
        cfg.path = cfg.path.absolute()  # the daemon chdirs to /: relative paths stay relative to the file
    cfg.state_dir = str(Path(cfg.state_dir).expanduser().absolute())  # ... and this one to where we started
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return _await_daemon(r, log_path, pidfile)
    # --- intermediate child: new session, so the daemon has no controlling terminal
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    # --- the daemon
    reported = False

    def report(line: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            try:
                os.write(w, line.encode()[:4000] + b"\n")
                os.close(w)
            except OSError:
                pass

    try:
        os.chdir("/")
        os.umask(0o027)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    except OSError as exc:
        report(f"ERR {EXIT_FAILED} log file {log_path}: cannot open ({exc.strerror}); create "
               f"{Path(log_path).parent} writable by the service account, or pass --log-file")
        os._exit(EXIT_FAILED)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    import faulthandler

    faulthandler.enable()  # a fatal signal leaves its traceback in the log

    def ready(agg) -> None:
        _write_pidfile(pidfile)
        report(f"OK {os.getpid()} {agg.epoch}")

    try:
        code, message = _start(cfg, args, ready)
        if message:  # one write: stderr is unbuffered and the log's writer thread shares the file
            sys.stderr.write(f"v2g-aggregator: {message}\n")
        report(f"ERR {code or EXIT_FAILED} {message or 'the aggregator stopped during start-up; see the log'}")
        return code
    finally:
        _remove_pidfile(pidfile)


def _await_daemon(fd: int, log_path: str, pidfile: Path) -> int:
    import select

    from v2grt.service import STARTUP_TIMEOUT_S

    buf = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S + 15.0
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                print(f"v2g-aggregator: the daemon did not report start-up in time; see {log_path}", file=sys.stderr)
                return EXIT_FAILED
            chunk = pipe.read(4096)
            if not chunk:
                break
            buf += chunk
    line = buf.decode(errors="replace").strip()
    if line.startswith("OK "):
        _, pid, epoch = line.split()
        print(f"v2g-aggregator: started, pid {pid}, epoch {epoch}; pidfile {pidfile}; log {log_path}")
        return EXIT_OK
    if line.startswith("ERR "):
        _, code, message = line.split(" ", 2)
        print(f"v2g-aggregator: start-up failed: {message}", file=sys.stderr)
        return int(code)
    print(f"v2g-aggregator: the daemon exited during start-up; see {log_path}", file=sys.stderr)
    return EXIT_FAILED


def _write_pidfile(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_pidfile(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


# ================================================================================== v2g-cli
def connect_endpoint(bound: str) -> str:
    """The address a client on this host connects to for an endpoint the aggregator binds."""
    for wildcard, local in (("tcp://*:", "tcp://127.0.0.1:"), ("tcp://0.0.0.0:", "tcp://127.0.0.1:"),
                            ("tcp://[::]:", "tcp://[::1]:")):
        if bound.startswith(wildcard):
            return local + bound[len(wildcard):]
    return bound


def control_endpoint(endpoint: str | None, config: str | None) -> str:
    """--endpoint, else bus.control of --config, else of /etc/v2g/primary_config.yaml if present, else
    the default tcp://127.0.0.1:5562.

    Only bus.control is read from the config, without validating the rest: an e-stop must get through
    even while the file on disk (or the discharge profile it names) is being edited and is broken.
    """
    import yaml

    from v2grt.config import BusConfig

    if endpoint:
        return endpoint
    if config is None and Path(DEFAULT_CONFIG).exists():
        config = DEFAULT_CONFIG
    if config is None:
        return connect_endpoint(BusConfig().control)
    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise CliError(f"--config {config}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise CliError(f"--config {config}: invalid YAML ({exc}); pass --endpoint instead") from None
    bus_section = data.get("bus") if isinstance(data, dict) else None
    control = (bus_section or {}).get("control", BusConfig().control) if isinstance(bus_section or {}, dict) else None
    if not isinstance(control, str) or not control:
        raise CliError(f"--config {config}: bus.control={control!r} is not a ZeroMQ endpoint; pass --endpoint")
    return connect_endpoint(control)


class Session:
    """One control connection to a running aggregator; `call` returns the result map or raises CliError."""

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S, curve: dict | None = None):
        import zmq

        from v2grt.io.bus import BusError, ControlClient

        self.ctx = zmq.Context()
        try:
            self.client = ControlClient(self.ctx, endpoint, timeout_ms=int(timeout_s * 1000), curve=curve)
        except BusError as exc:
            self.ctx.term()
            raise CliError(str(exc)) from None
        self.endpoint = endpoint

    def call(self, cmd: str, **args) -> dict:
        from v2grt.io.bus import ControlRefused, ControlTimeout
        from v2grt.io.wire import WireError

        try:
            reply = self.client.call(cmd, **args)
        except ControlTimeout as exc:
            raise CliError(exc.message, EXIT_FAILED) from None
        except ControlRefused as exc:  # the key, its role or this address is not authorized
            raise CliError(f"{exc.code}: {exc.message}", EXIT_REFUSED) from None
        except WireError as exc:  # refused before sending: a bad argument
            raise CliError(exc.message, EXIT_INVALID) from None
        if not reply.ok:
            raise CliError(f"{reply.error_code}: {reply.error_message}",
                           _EXIT_BY_WIRE_CODE.get(reply.error_code, EXIT_FAILED))
        return reply.result or {}

    def close(self) -> None:
        self.client.close()
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _session(args) -> Session:
    from v2grt.security.cli import client_curve_from_args  # --client-key/--server-key: security.enabled

    return Session(control_endpoint(args.endpoint, args.config), args.timeout, client_curve_from_args(args))


# ------------------------------------------------------------------------------ the operations
def cmd_status(args) -> int:
    """Print the fleet's state: frequency, target, delivered, available, vehicles by reason, loop, alarms."""
    with _session(args) as s:
        st = s.call("status")
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return EXIT_OK


def cmd_estop(args) -> int:
    """Emergency stop: every gateway receives 0 kW with the e-stop flag from the next cycle; latched."""
    with _session(args) as s:
        r = s.call("estop", reason=args.reason)
    print(f"EMERGENCY STOP latched: every gateway receives 0 kW with the e-stop flag from cycle {r['effective_seq']} "
          "on; it holds until `v2g-cli --reset`")
    return EXIT_OK


def cmd_reset(args) -> int:
    """Release a latched emergency stop; dispatch resumes from the next cycle."""
    with _session(args) as s:
        r = s.call("reset", reason=args.reason)
    print("emergency stop released; dispatch resumes from the next cycle" if r.get("was_latched")
          else "no emergency stop was latched; nothing changed")
    return EXIT_OK


def cmd_reload(args) -> int:
    """Reload the discharge profile (validated first; a bad one is refused and the old one stays)."""
    with _session(args) as s:
        kw = {"path": str(Path(args.profile).absolute())} if args.profile else {}
        r = s.call("reload", **kw)
    print(f"discharge profile {r['reloaded']} accepted: minimum_soc {r['minimum_soc']:g}, policy {r['policy']}; "
          "in force from the next cycle")
    return EXIT_OK


def cmd_telemetry_profile(args) -> int:
    """Switch the gateways' telemetry profile (optimized: slow fields every 10th batch)."""
    with _session(args) as s:
        r = s.call("telemetry_profile", name=args.name)
    print(f"telemetry profile {r['telemetry_profile']}: gateways are told with the next setpoints")
    return EXIT_OK


def cmd_handover(args) -> int:
    """Hand leadership to a standby (high availability, docs/ha.md): ask the leader, then follow its status until
    the handover is done or abandoned (the leader then leads on). Exit 0 done, 1 abandoned, 3 refused."""
    with _session(args) as s:
        r = s.call("handover", **({"to": args.to} if args.to else {}))
        print(f"handover from {r['from']} (epoch {r['epoch']}) to {r['to']} started")
        deadline = time.monotonic() + float(r.get("timeout_s", 2.0)) + args.timeout
        h: dict = {}
        while time.monotonic() < deadline:
            time.sleep(0.05)
            h = (s.call("status").get("ha") or {}).get("handover") or {}
            if h.get("epoch") == r["epoch"] and h.get("to") == r["to"] and h.get("state") not in (None, "requested"):
                break
    state = h.get("state") or "no outcome reported in time"
    if state == "done":
        print(f"leadership handed over: {r['from']} published its last cycle and resigned; {r['to']} leads from "
              "its next cycle with a new epoch (v2g-cli --status at it shows the epoch)")
        return EXIT_OK
    print(f"handover to {r['to']}: {state}", file=sys.stderr)
    return EXIT_FAILED


def cmd_test_discharge(args) -> int:
    """Discharge one vehicle for a while and report what its telemetry showed."""
    if args.seconds <= 0 or args.kw <= 0:
        raise CliError(f"--kw {args.kw:g} --seconds {args.seconds:g}: both must be > 0")
    with _session(args) as s:
        before = s.call("status").get("last_test_discharge")
        try:
            r = s.call("test_discharge", node_id=args.unit_id, kw=float(args.kw), seconds=float(args.seconds))
        except CliError as exc:
            if exc.code == EXIT_REFUSED:
                raise CliError(f"test discharge of {args.unit_id} refused: {exc}", EXIT_REFUSED) from None
            raise
        if not args.json:
            print(f"test discharge of {args.unit_id}: {args.kw:g} kW for {args.seconds:g} s "
                  f"(available now {r['kw_available']:.2f} kW, SoC {r['soc_before']:.3f})", flush=True)
        samples, outcome = [], None
        t0 = time.monotonic()
        poll_s = min(0.5, max(args.seconds / 10, 0.05))
        deadline = t0 + args.seconds + args.timeout + 2.0
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            st = s.call("status")
            td = st.get("test_discharge")
            if td and td.get("node_id") == args.unit_id:
                samples.append((time.monotonic() - t0, td))
            last = st.get("last_test_discharge")
            if last and last != before and last.get("node_id") == args.unit_id:
                outcome = last
                break
    report = _test_report(args, r, samples, outcome)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format_test(report))
    return report["exit_code"]


def _test_report(args, started: dict, samples: list, outcome: dict | None) -> dict:
    settled = [td for t, td in samples if t >= args.seconds / 4] or [td for _, td in samples]
    delivered = [td["p_actual_kw"] for td in settled]
    commanded = [td["setpoint_kw"] for td in settled]
    rep = {
        "unit_id": args.unit_id, "kw_requested": float(args.kw), "seconds": float(args.seconds),
        "kw_available_at_start": started["kw_available"],
        "kw_commanded": sum(commanded) / len(commanded) if commanded else None,
        "kw_delivered": sum(delivered) / len(delivered) if delivered else None,
        "kw_delivered_peak": max((td["p_actual_kw"] for _, td in samples), default=None),
        "samples": len(samples),
        "soc_before": started["soc_before"],
        "soc_after": outcome["soc_after"] if outcome else (samples[-1][1]["soc"] if samples else None),
        "outcome": outcome["outcome"] if outcome else "unknown",
        "reason": outcome["reason"] if outcome else None,
    }
    if rep["outcome"] == "aborted":
        rep["exit_code"], rep["verdict"] = EXIT_FAILED, f"ABORTED: the vehicle became {rep['reason']}"
    elif outcome is None:
        rep["exit_code"], rep["verdict"] = EXIT_FAILED, "UNKNOWN: the aggregator reported no end of the test"
    elif rep["kw_delivered"] is None or rep["kw_commanded"] is None or \
            rep["kw_delivered"] < 0.5 * rep["kw_commanded"]:
        rep["exit_code"] = EXIT_FAILED
        rep["verdict"] = "FAILED: the vehicle's telemetry shows less than half the commanded power"
    else:
        rep["exit_code"], rep["verdict"] = EXIT_OK, "OK"
    return rep


def _format_test(r: dict) -> str:
    def kw(v):
        return "      n/a" if v is None else f"{v:9.2f} kW"

    def soc(v):
        return "  n/a" if v is None else f"{v:.4f}"

    d_soc = (f"  ({r['soc_after'] - r['soc_before']:+.4f})" if r["soc_after"] is not None else "")
    return "\n".join([
        f"  requested  {kw(r['kw_requested'])}",
        f"  commanded  {kw(r['kw_commanded'])}   (the aggregator's setpoint, capped at the vehicle's availability)",
        f"  delivered  {kw(r['kw_delivered'])}   (mean of the vehicle's telemetry once settled; peak "
        f"{'n/a' if r['kw_delivered_peak'] is None else format(r['kw_delivered_peak'], '.2f')} kW, "
        f"{r['samples']} samples)",
        f"  SoC        {soc(r['soc_before'])} -> {soc(r['soc_after'])}{d_soc}",
        f"  result     {r['verdict']}",
    ])


def format_status(st: dict) -> str:
    """The status as an operator's table (`v2g-cli --status`)."""
    def num(v, fmt, unit=""):
        return "n/a" if v is None else f"{format(v, fmt)}{unit}"

    lines = [f"fleet {st.get('fleet_id')}  epoch {st.get('epoch')}  service {st.get('service')}  capacity "
             f"{num(st.get('capacity_kw'), '.1f', ' kW')}  telemetry profile {st.get('telemetry_profile')}"
             + (f"  kernel {k.get('backend')}/{k.get('isa')}" if (k := st.get("kernel")) else "")]
    age = st.get("input_age_ms")
    f_note = ("no meter configured" if "meter" not in st else "meter stale" if st.get("frequency_stale")
              else f"meter sample {age:.0f} ms old" if age is not None else "no meter sample yet")
    frac = st.get("service_fraction")
    row = "  {:<14} {:>14}   {}".format
    lines += [
        row("frequency", num(st.get("frequency_hz"), ".3f", " Hz"), f"({f_note})"),
        row("response", num(None if frac is None else 100 * frac, "+.1f", " %"), "of the contracted capacity"),
        row("target", num(st.get("target_kw"), ".1f", " kW"), "(+ discharge into the grid)"),
        row("allocated", num(st.get("allocated_kw"), ".1f", " kW"), f"over {st.get('nodes_carrying', 0)} vehicles"),
        row("delivered", num(st.get("delivered_kw"), ".1f", " kW"), "(sum of the vehicles' telemetry)"),
        row("available up", num(st.get("feasible_dis_kw"), ".1f", " kW"),
            f"down {num(st.get('feasible_chg_kw'), '.1f', ' kW')}"),
        row("vehicles", st.get("vehicles", 0), "by state and reason:"),
    ]
    for name, count in sorted((st.get("nodes_by_reason") or {}).items(), key=lambda kv: -kv[1]):
        state = "available" if name == "OK" else ("limited" if name.startswith("SOC_") else "excluded")
        lines.append(f"    {state:<10} {name:<28} {count:8d}")
    if st.get("never_heard"):  # after a start: on the roster, no telemetry yet (counted in TIMEOUT_BMS_RESPONSE)
        lines.append(f"               of TIMEOUT_BMS_RESPONSE, {st['never_heard']} never heard since start "
                     "(0 kW until their first telemetry)")
    loop = st.get("loop") or {}
    total, late = loop.get("total") or {}, loop.get("lateness") or {}
    lines.append(f"  loop           cycles {loop.get('cycles', 0)}, missed deadlines "
                 f"{loop.get('missed_deadlines', 0)}, budget overruns {loop.get('budget_overruns', 0)}, "
                 f"errors {loop.get('errors', 0)}")
    lines.append(f"                 cycle p50 {num(total.get('p50_ms'), '.3f')} ms, p99 "
                 f"{num(total.get('p99_ms'), '.3f')} ms, max {num(total.get('max_ms'), '.3f')} ms; "
                 f"wake-up lateness p99 {num(late.get('p99_ms'), '.3f')} ms")
    if (pub := st.get("publisher")) is not None:  # absent in replies from aggregators before the counters
        lines.append("  setpoints      " + _publisher_line(pub))
    if (ha := st.get("ha")) is not None:
        lines.append("  ha             " + _ha_line(ha))
    jn = st.get("journal")
    if jn is not None:  # absent in replies from aggregators older than the dispatch journal
        lines.append("  journal        " + _journal_line(jn))
    alarms = []
    if jn and jn.get("write_failing"):
        alarms.append(f"JOURNAL_WRITE_FAILED: the dispatch journal cannot write ({jn.get('last_error') or '?'})")
    if st.get("estop"):
        alarms.append("EMERGENCY STOP latched (v2g-cli --reset releases it)")
    if st.get("frequency_stale"):
        alarms.append("GRID_FREQUENCY_STALE: the meter's frequency is stale; the response is frozen or ramped out")
    fa = st.get("frequency_alert") or {}
    if fa.get("active"):
        lo, hi = fa["band_hz"]
        alarms.append(f"GRID_FREQUENCY_ALERT: outside {lo:g}..{hi:g} Hz for {fa.get('since_s') or 0:.0f} s "
                      f"(response limit {100 * fa['response_limit']:g} %)")
    if loop.get("missed_deadlines") or loop.get("budget_overruns"):
        alarms.append("deadline misses counted: see loop")
    lines.append("  alarms         " + ("\n                 ".join(alarms) if alarms else "none"))
    td = st.get("test_discharge")
    if td:
        lines.append(f"  test discharge {td['node_id']}: setpoint {td['setpoint_kw']:.2f} kW, reported "
                     f"{td['p_actual_kw']:.2f} kW, SoC {td['soc']:.3f}")
    events = st.get("events") or {}
    if events:
        lines.append("  events         " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
    for key, label in (("telemetry_errors", "bad frames"), ("telemetry_refused_nodes", "refused nodes"),
                       ("control_errors", "bad requests")):
        counts = st.get(key) or {}
        if counts:  # frames, vehicles and control requests, each by code (docs/wire.md 6.1)
            lines.append(f"  {label:<15}" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def _ha_line(ha: dict) -> str:
    """Lines on leadership (docs/ha.md) from the status reply's `ha` map: role, epoch, lease, leader, peers."""
    leader = ha.get("leader")
    lease = f"{ha.get('lease_remaining_s') or 0:.1f} s of {ha.get('lease_ttl_s') or 0:g} s"
    until = ha.get("lease_valid_until_ns")
    if until:
        clock = time.strftime("%H:%M:%S", time.gmtime(until / 1e9))
        lease += f" (surely valid until {clock}.{until // 1_000_000 % 1000:03d} UTC)"
    line = (f"{ha.get('role')} (this is {ha.get('name')}), epoch {ha.get('epoch')}, lease {lease} left, "
            f"leader {leader if leader is not None else 'none'}"
            + (f" (epoch {ha['leader_epoch']})" if leader is not None and ha.get("leader_epoch") else ""))
    trouble = [f"{ha[k]} {label}" for k, label in (("renew_failures", "renew failures"),
                                                   ("etcd_errors", "etcd errors")) if ha.get(k)]
    line += f"; {', '.join(trouble)}" if trouble else ""
    pad = "\n                 "
    candidates = ha.get("candidates")
    if candidates is not None:
        line += f"{pad}candidates in etcd: {', '.join(candidates) or 'none'}"
    if ha.get("peers"):
        line += f"{pad}peers (configured): {', '.join(ha['peers'])}"
    if ha.get("handover"):
        h = ha["handover"]
        line += f"{pad}last handover: {h.get('from')} (epoch {h.get('epoch')}) to {h.get('to')}: {h.get('state')}"
    return line


def _publisher_line(pub: dict) -> str:
    """One line on the setpoint sends from the status reply's `publisher` map."""
    def ms(v):
        return "n/a" if v is None else f"{v:.3f} ms"

    who = "publisher thread" if pub.get("thread") else "control thread"
    line = (f"sent by the {who}: {pub.get('cycles_sent', 0)} cycles, {pub.get('frames_sent', 0)} frames; last cycle "
            f"deadline to last frame {ms(pub.get('last_to_wire_ms'))}"
            + (f", its sends {ms(pub.get('last_send_ms'))}" if pub.get("thread") else ""))
    missed = [f"{pub[k]} {label}" for k, label in (
        ("busy_skips", "skipped (publisher busy)"), ("stale", "stale"), ("refused", "refused (wild values)"),
        ("fenced", "fenced (lease)"), ("errors", "errors"), ("frames_dropped", "frames dropped")) if pub.get(k)]
    return line + (f"; not sent: {', '.join(missed)}" if missed else "")


def _journal_line(jn: dict) -> str:
    """One line on the dispatch journal from the status reply's `journal` map."""
    if not jn.get("enabled"):
        return "off (journal.enabled is false: no record of the dispatch)"
    seg = jn.get("segment")
    where = f"{seg} in {jn.get('dir')}" if seg else f"no segment open, in {jn.get('dir')}"
    counts = f"{jn.get('records', 0)} records, {jn.get('dropped', 0)} dropped"
    if jn.get("write_failing"):
        return f"WRITE FAILING ({jn.get('last_error') or '?'}): {counts}, {jn.get('write_errors', 0)} write errors"
    return f"{where}: {counts}" + (f", {jn['write_errors']} write errors" if jn.get("write_errors") else "")


# ------------------------------------------------------------------------------------ parsers
def _client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("finding the aggregator")
    g.add_argument("--endpoint", help="control endpoint, e.g. tcp://127.0.0.1:5562 (default: bus.control of "
                                      f"--config, or of {DEFAULT_CONFIG} if present, else tcp://127.0.0.1:5562)")
    g.add_argument("--config", help="the aggregator's YAML config, to find its control endpoint")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT_S:g})")
    from v2grt.security.cli import add_client_key_options

    add_client_key_options(p)  # an operator key pair when the aggregator has security.enabled


def operator_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="v2g-cli", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Operate a running V2G aggregator over its control socket.")
    act = ap.add_mutually_exclusive_group(required=True)
    act.add_argument("--status", action="store_true", help="print the fleet's state (a table, or --json)")
    act.add_argument("--emergency-stop", action="store_true",
                     help="halt all discharge at once: every gateway gets 0 kW with the e-stop flag; latched")
    act.add_argument("--reset", action="store_true", help="release a latched emergency stop")
    act.add_argument("--test-discharge", action="store_true",
                     help="discharge one vehicle (--unit-id) and report requested vs delivered power and SoC")
    act.add_argument("--reload", action="store_true",
                     help="reload the discharge profile (the configured one, or --profile); a bad one is refused")
    act.add_argument("--telemetry-profile", choices=["default", "optimized"],
                     help="switch the gateways' telemetry profile (optimized: less overhead)")
    act.add_argument("--handover", action="store_true",
                     help="high availability: hand leadership to a standby (send it to the leader; --to NAME)")
    ap.add_argument("--to", help="--handover: the standby's ha.name (default: any registered standby)")
    ap.add_argument("--json", action="store_true", help="--status / --test-discharge: print JSON")
    ap.add_argument("--unit-id", help="--test-discharge: the vehicle's node id, e.g. EV_NODE_01")
    ap.add_argument("--kw", type=float, default=5.0, help="--test-discharge: power, kW (default 5)")
    ap.add_argument("--seconds", type=float, default=10.0, help="--test-discharge: duration, s (default 10)")
    ap.add_argument("--profile", help="--reload: load this discharge_profile.json instead of the configured one")
    ap.add_argument("--reason", default="v2g-cli", help="--emergency-stop / --reset: a note for engine.log")
    _client_options(ap)
    return ap


def operator_main(argv: list[str] | None = None) -> int:
    """Entry point of `v2g-cli`."""
    ap = operator_parser()
    args = ap.parse_args(argv)
    if args.test_discharge and not args.unit_id:
        ap.error("--test-discharge needs --unit-id")
    if args.telemetry_profile:
        args.name = args.telemetry_profile
    func = (cmd_status if args.status else cmd_estop if args.emergency_stop else cmd_reset if args.reset
            else cmd_test_discharge if args.test_discharge else cmd_reload if args.reload
            else cmd_handover if args.handover else cmd_telemetry_profile)
    try:
        return func(args)
    except CliError as exc:
        print(f"v2g-cli: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def add_parser(sub) -> None:
    """The same operations as `v2grt` subcommands."""
    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=func.__doc__, epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("status", cmd_status, "print a running aggregator's fleet state")
    p.add_argument("--json", action="store_true", help="print JSON")
    _client_options(p)
    p = add("estop", cmd_estop, "emergency stop: 0 kW everywhere, latched until reset")
    p.add_argument("--reason", default="v2grt estop", help="a note for engine.log")
    _client_options(p)
    p = add("reset", cmd_reset, "release a latched emergency stop")
    p.add_argument("--reason", default="v2grt reset", help="a note for engine.log")
    _client_options(p)
    p = add("test-discharge", cmd_test_discharge, "discharge one vehicle and report what it delivered")
    p.add_argument("--unit-id", required=True, help="the vehicle's node id, e.g. EV_NODE_01")
    p.add_argument("--kw", type=float, default=5.0, help="power, kW (default 5)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration, s (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _client_options(p)
    p = add("reload", cmd_reload, "reload the discharge profile without a restart")
    p.add_argument("--profile", help="load this discharge_profile.json instead of the configured one")
    _client_options(p)
    p = add("telemetry-profile", cmd_telemetry_profile, "switch the gateways' telemetry profile")
    p.add_argument("name", choices=["default", "optimized"])
    _client_options(p)
    p = add("handover", cmd_handover, "high availability: hand leadership to a standby (ask the leader)")
    p.add_argument("--to", help="the standby's ha.name (default: any registered standby)")
    _client_options(p)
