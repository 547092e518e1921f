"""Running the aggregator as a process: lock, epoch, logging, signals, systemd, clean shutdown.

`v2grt run --config FILE` (foreground) is the same code path as the field manual's `v2g-aggregator`.
Signals: SIGTERM and SIGINT stop after the current cycle (every gateway is sent 0 kW); SIGHUP reloads
the discharge profile (validated first; a bad one is refused and the old one stays in force) and, with
security enabled, the authorized keys (docs/security.md: rotation, revocation).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from v2grt.config import Config, load_config
from v2grt.events import EventLog, setup_logging
from v2grt.state import FleetLock, next_epoch

log = logging.getLogger("v2grt.service")

#: Seconds start-up may take until the first cycle has run (fleet load, sockets, first Modbus read).
STARTUP_TIMEOUT_S = 30.0


class SignalFlag:
    """A flag a signal handler may set: set() is one attribute store, no lock.

    threading.Event.set takes a lock; a second signal arriving while the first handler is inside
    set() re-enters it on the same thread and deadlocks the process (seen: a demo gateway that got
    SIGTERM from its dying parent and SIGINT at once never exited). is_set/wait/clear as Event.
    """

    def __init__(self) -> None:
        self._flag = False

    def set(self) -> None:
        self._flag = True

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout_s: float) -> bool:
        """Sleep until set or timeout_s passed (polled every 20 ms: signal latency, not a hot path)."""
        end = time.monotonic() + timeout_s
        while not self._flag:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, 0.02))
        return self._flag


class ServiceRefused(RuntimeError):
    """The service will not start as asked (e.g. as root without --allow-root); exit code 3."""


def under_service_manager(environ=os.environ) -> bool:
    """True when systemd started us ($INVOCATION_ID for any unit, $NOTIFY_SOCKET for Type=notify)."""
    return bool(environ.get("INVOCATION_ID") or environ.get("NOTIFY_SOCKET"))


def refuse_root(allow_root: bool, euid: int | None = None) -> None:
    """Raise ServiceRefused when running as root without `allow_root`: the scheduler runs unprivileged."""
    euid = os.geteuid() if euid is None else euid
    if euid == 0 and not allow_root:
        raise ServiceRefused("refusing to run as root: run as the service account (User=v2g in the systemd unit; "
                             "the real-time steps need only CAP_SYS_NICE and CAP_IPC_LOCK), or pass --allow-root")


def run_aggregator(cfg: Config | str, *, stop: threading.Event | None = None, log_path: str | None = None,
                   json_logs: bool = False, ready=None, allow_root: bool = True, service: bool | None = None,
                   exit_after: bool = False) -> int:
    """Start the aggregator and block until SIGINT/SIGTERM (or `stop` is set); returns an exit code.

    Takes the fleet lock (a second scheduler for the same fleet is refused: IDEMPOTENT_KEY_CONFLICT),
    a new durable epoch, starts every thread and the cycle hooks (per-node engine.log events, the
    Prometheus endpoint when enabled, the systemd watchdog under systemd), and on the way out sends
    every gateway zero setpoints.

    Logs go to `log_path`; else, when running as a service (`service`, default: started by systemd),
    to the config's log.file; else to stderr. `ready(aggregator)` is called once the first cycle has
    run (the point systemd is sent READY=1). Raises ConfigError, SchedulerConflict, ServiceRefused,
    BusError or OSError when start-up fails.

    `exit_after`: the caller is the process's entry point and exits once this returns (v2g-aggregator,
    `v2grt run`). SIGINT, SIGTERM and SIGHUP are then ignored from the end of the shutdown on instead of
    restored: a late signal (a dying parent and Ctrl-C together) must not kill a process that is already
    exiting cleanly with the default action (exit -15), nor raise KeyboardInterrupt in its last steps.
    """
    from v2grt.aggregator import Aggregator
    from v2grt.monitor import NodeMonitor
    from v2grt.notify import Notifier, WatchdogHook, watchdog_interval_ns

    if isinstance(cfg, str):
        cfg = load_config(cfg)
    refuse_root(allow_root)
    if service is None:
        service = under_service_manager()
    if log_path is None and service:
        log_path = str(cfg.resolve(cfg.log.file))
    json_logs = json_logs or cfg.log.format == "json"
    if log_path is not None or json_logs or not logging.getLogger("v2grt").handlers:
        setup_logging(log_path, json_lines=json_logs, level=getattr(logging, cfg.log.level),
                      library_rate_limit_s=cfg.log.rate_limit_s)
    stop = stop or SignalFlag()
    hup = SignalFlag()
    notifier = Notifier.from_env()
    lock = FleetLock(cfg.state_dir, cfg.fleet_id)
    try:
        lock.acquire()
    except Exception as exc:
        log.critical("START_REFUSED %s", exc)  # IDEMPOTENT_KEY_CONFLICT names the pid holding the lock
        raise
    metrics = None
    try:
        # with `ha` the epoch is the leader key's create revision in etcd, taken when elected (docs/ha.md): no
        # host-local epoch is drawn (it would be ignored), and the log says the election decides
        epoch = 0 if cfg.ha is not None else next_epoch(cfg.state_dir, cfg.fleet_id)
        if cfg.metrics.enabled:  # before the aggregator: a busy port fails start-up with nothing to undo
            from v2grt.metrics import MetricsExporter

            metrics = MetricsExporter()
            url = metrics.start_server(cfg.metrics.address, cfg.metrics.port)
            log.info("METRICS_LISTENING url=%s", url)
        events = EventLog(cfg.log.rate_limit_s)
        agg = Aggregator(cfg, epoch=epoch, events=events)
        agg.cycle_hooks.append(NodeMonitor(events, max_lines=cfg.log.max_node_lines))
        if metrics is not None:
            agg.cycle_hooks.append(metrics)
        interval_ns = watchdog_interval_ns() if notifier else None
        if interval_ns:
            stale_ns = int(cfg.meter.stale_after_s * 1e9) if cfg.meter is not None else None
            agg.cycle_hooks.append(WatchdogHook(notifier, interval_ns, stale_ns))
            log.info("WATCHDOG ping every %.3f s after clean cycles with fresh inputs", interval_ns / 1e9)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: hup.set())
        log.info("START fleet_id=%s epoch=%s pid=%d vehicles=%d gateways=%d service=%s capacity_kw=%.1f "
                 "period_s=%g setpoint_ttl_s=%g setpoints=%s telemetry=%s control=%s%s", cfg.fleet_id,
                 epoch if cfg.ha is None else "etcd", os.getpid(), len(agg.fleet), len(agg.fleet.gateway_ids),
                 agg.dispatcher.service.name, agg.dispatcher.capacity_kw, cfg.period_s, cfg.setpoint_ttl_s,
                 agg.publisher.endpoint, agg.telemetry.endpoint, agg.control.endpoint,
                 "" if agg.ha is None else f" ha_name={agg.ha.name} role=standby-until-elected")
        agg.start()
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not agg.first_cycle.wait(0.05):
                if stop.is_set() or not agg.loop.running or time.monotonic() > deadline:
                    break
            if agg.first_cycle.is_set():
                role = "" if agg.ha is None else f", {agg.ha.view.role}"
                log.info("READY first cycle ran (epoch %d%s)", agg.epoch, role)
                if notifier:
                    notifier.notify(f"READY=1\nSTATUS=dispatching fleet {cfg.fleet_id}, epoch {agg.epoch}{role}\n"
                                    f"MAINPID={os.getpid()}")
                if ready is not None:
                    ready(agg)
            elif not stop.is_set() and agg.loop.running:
                log.critical("STARTUP_TIMEOUT no cycle completed within %.0f s", STARTUP_TIMEOUT_S)
                return 1
            while not stop.wait(0.2):
                if not agg.loop.running:
                    log.critical("LOOP_FAILED the control loop stopped: %r", agg.loop.failed)
                    return 1
                if hup.is_set():
                    hup.clear()
                    _reload(agg)
            log.info("STOP signal received: stopping after the current cycle")
            return 0
        finally:
            if notifier:
                notifier.notify("STOPPING=1")
            agg.stop()
            s = agg.stats.summary()
            log.info("STOPPED cycles=%d missed_deadlines=%d budget_overruns=%d total_p99_ms=%.3f",
                     s["cycles"], s["missed_deadlines"], s["budget_overruns"], s["total"]["p99_ms"])
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if exit_after else handler)
    finally:
        if metrics is not None:
            metrics.stop_server()
        if notifier:
            notifier.close()
        lock.release()


def _reload(agg) -> None:
    """SIGHUP: reload the discharge profile; the aggregator logs PROFILE_RELOADED or PROFILE_REJECTED."""
    from v2grt.io.wire import WireError

    if agg.security is not None:  # KEYS_RELOADED, or KEYS_RELOAD_FAILED with the old keys kept
        agg.security.reload_from_signal()
    log.info("SIGHUP received: reloading the discharge profile %s", agg.profile_path)
    try:
        agg.reload_profile()
    except WireError:
        pass  # logged as PROFILE_REJECTED with the reason; the old profile stays in force
