"""Running the aggregator as a process: lock, epoch, logging, signals, clean shutdown.

`v2grt run --config FILE` (foreground) is the same code path as the field manual's `v2g-aggregator`.
"""

from __future__ import annotations

import logging
import signal
import threading

from v2grt.config import Config, load_config
from v2grt.events import setup_logging
from v2grt.state import FleetLock, next_epoch

log = logging.getLogger("v2grt.service")


def run_aggregator(cfg: Config | str, *, stop: threading.Event | None = None, log_path: str | None = None,
                   json_logs: bool = False, ready=None) -> int:
    """Start the aggregator and block until SIGINT/SIGTERM (or `stop` is set); returns an exit code.

    Takes the fleet lock (a second scheduler for the same fleet is refused: IDEMPOTENT_KEY_CONFLICT),
    a new durable epoch, starts every thread, and on the way out sends every gateway zero setpoints.
    `ready(aggregator)` is called once the first cycle has run (the systemd READY=1 point).
    """
    from v2grt.aggregator import Aggregator

    if isinstance(cfg, str):
        cfg = load_config(cfg)
    if log_path is not None or json_logs or not logging.getLogger("v2grt").handlers:
        setup_logging(log_path, json_lines=json_logs)
    stop = stop or threading.Event()
    lock = FleetLock(cfg.state_dir, cfg.fleet_id)
    lock.acquire()
    try:
        epoch = next_epoch(cfg.state_dir, cfg.fleet_id)
        agg = Aggregator(cfg, epoch=epoch)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
        log.info("START fleet_id=%s epoch=%d vehicles=%d gateways=%d service=%s capacity_kw=%.1f period_s=%g "
                 "setpoints=%s telemetry=%s control=%s", cfg.fleet_id, epoch, len(agg.fleet),
                 len(agg.fleet.gateway_ids), agg.dispatcher.service.name, agg.dispatcher.capacity_kw, cfg.period_s,
                 agg.publisher.endpoint, agg.telemetry.endpoint, agg.control.endpoint)
        agg.start()
        try:
            if agg.first_cycle.wait(10.0) and ready is not None:
                ready(agg)
            while not stop.wait(0.2):
                if not agg.loop.running:
                    log.critical("LOOP_FAILED the control loop stopped: %r", agg.loop.failed)
                    return 1
            log.info("STOP signal received: stopping after the current cycle")
            return 0
        finally:
            agg.stop()
            s = agg.stats.summary()
            log.info("STOPPED cycles=%d missed_deadlines=%d budget_overruns=%d total_p99_ms=%.3f",
                     s["cycles"], s["missed_deadlines"], s["budget_overruns"], s["total"]["p99_ms"])
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        lock.release()
