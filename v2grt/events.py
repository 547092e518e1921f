"""engine.log events: one line per event with the field manual's code, rate-limited per code and node,
and counted so status and metrics can show them.

    2026-11-26T08:30:00.123Z WARNING TIMEOUT_BMS_RESPONSE node=EV_NODE_17 age_s=6.2
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import logging.handlers
import queue
import threading
import time
from pathlib import Path

log = logging.getLogger("v2grt.engine")


#: Operator actions and their outcomes: an audit trail, every one logged (never rate-limited).
AUDIT_CODES = frozenset({"EMERGENCY_STOP", "EMERGENCY_STOP_RESET", "PROFILE_RELOADED", "PROFILE_REJECTED",
                         "TELEMETRY_PROFILE", "TEST_DISCHARGE", "TEST_DISCHARGE_DONE", "TEST_DISCHARGE_ABORTED",
                         # v2grt.security: who ran which command, key reloads and the drops they cause
                         "CONTROL_COMMAND", "KEYS_RELOADED", "KEYS_RELOAD_FAILED", "KEYS_REVOKED_DISCONNECT"})


class EventLog:
    """Emit coded events; the same (code, key) is logged at most once per `interval_s`.

    Suppressed repeats are counted and reported on the next line that gets through
    (``suppressed=N``), so a flapping vehicle cannot flood the log and nothing is silently lost.
    Operator actions (AUDIT_CODES) are always logged. Thread-safe: the control thread and the I/O
    threads both emit.
    """

    def __init__(self, interval_s: float = 60.0, logger: logging.Logger = log):
        self.interval_ns = int(interval_s * 1e9)
        self.logger = logger
        self.counts: collections.Counter[str] = collections.Counter()
        self._last: dict[tuple[str, str], int] = {}
        self._suppressed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()

    def emit(self, code: str, level: int = logging.WARNING, key: str = "", message: str = "", **fields) -> bool:
        """Count the event and log it unless (code, key) was logged within the interval; True if logged."""
        now = time.monotonic_ns()
        k = (code, key)
        with self._lock:
            self.counts[code] += 1
            last = self._last.get(k)
            if last is not None and now - last < self.interval_ns and code not in AUDIT_CODES:
                self._suppressed[k] += 1
                return False
            self._last[k] = now
            suppressed = self._suppressed.pop(k, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.logger.log(level, "%s", _line(code, message, fields), extra={"code": code, "fields": fields})
        return True

    def count(self, code: str, n: int = 1) -> None:
        """Count `n` occurrences of `code` without a line (the ones a summary line stands for)."""
        if n:
            with self._lock:
                self.counts[code] += n

    def snapshot(self) -> dict[str, int]:
        """Events by code so far (a copy, safe to read from any thread)."""
        with self._lock:
            return dict(self.counts)


def _line(code: str, message: str, fields: dict) -> str:
    parts = [code]
    parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
    if message:
        parts.append(f'msg="{message}"')
    return " ".join(parts)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return f'"{s}"' if (" " in s or not s) else s


class TextFormatter(logging.Formatter):
    """`2026-11-26T08:30:00.123Z LEVEL message`, UTC."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{ts} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, code, fields, msg."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": record.created, "level": record.levelname, "logger": record.name,
               "code": getattr(record, "code", None), **getattr(record, "fields", {}), "msg": record.getMessage()}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never blocks the caller, counts what a full queue drops."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1


#: Records waiting for the writer thread; beyond this a burst is dropped (and counted), not waited on.
LOG_QUEUE_SIZE = 10_000

_listener: logging.handlers.QueueListener | None = None

#: Libraries whose records go to engine.log (else Python's last-resort handler prints them on stderr,
#: outside the log: pymodbus's "received pdu without a corresponding request" under load), at WARNING or
#: above whatever log.level says: pymodbus at DEBUG logs every frame, 200 a second at a 5 ms poll.
LIBRARY_LOGGERS = ("pymodbus",)
_library_state: dict[str, tuple[list, bool, int]] = {}


class LibraryRecords(logging.Filter):
    """One engine.log line per library record, rate-limited per message like EventLog.

    The line reads ``PYMODBUS msg="..."``: pymodbus appends its last 20 raw frames to an error
    (``\n>>>>> send: ...``) unless it logs at DEBUG; they are cut to ``frames=N``. The same message
    (digits ignored) is let through once per `interval_s` and its repeats counted (``suppressed=N``),
    with at most MAX_KEYS distinct messages tracked (the rest share one key). pymodbus's own
    "Repeating...." marker only counts as a repeat.
    """

    MAX_KEYS = 64

    def __init__(self, interval_s: float = 60.0):
        super().__init__()
        self.interval_ns = int(interval_s * 1e9)
        self._last: dict[str, int] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._prev_key = ""
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        first, sep, frames = text.partition("\n>>>>> ")
        now = time.monotonic_ns()
        with self._lock:
            if first == "Repeating....":
                self._suppressed[self._prev_key] += 1
                return False
            key = "".join("#" if c.isdigit() else c for c in first[:80])
            if key not in self._last and len(self._last) >= self.MAX_KEYS:
                key = "(other)"
            self._prev_key = key
            last = self._last.get(key)
            if last is not None and now - last < self.interval_ns:
                self._suppressed[key] += 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        library = record.name.split(".")[0]
        fields = {"logger": record.name}
        if sep:
            fields["frames"] = frames.count("\n>>>>> ") + 1
        if suppressed:
            fields["suppressed"] = suppressed
        record.msg, record.args = _line(library.upper(), first, fields), None
        record.code, record.fields = library.upper(), fields
        record.exc_info = record.exc_info if record.levelno >= logging.ERROR else None
        return True


def setup_logging(path: str | Path | None = None, *, json_lines: bool = False, level: int = logging.INFO,
                  library_rate_limit_s: float = 60.0) -> None:
    """Log to a file (the service's engine.log) or stderr (foreground), as text or JSON lines.

    The libraries of LIBRARY_LOGGERS (pymodbus) log there too, at WARNING or above, one line per record,
    each message at most once per `library_rate_limit_s` (see LibraryRecords).

    The file is written by a writer thread behind a bounded queue: the control thread emits events
    inside its cycle and must never wait on a disk (a slow or full disk costs log lines, counted in
    ``_DroppingQueueHandler.dropped``, not deadlines). The log's directory is created if missing.
    Raises OSError naming the path if the file cannot be opened.
    """
    global _listener
    shutdown_logging()
    if path:
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # reopened when logrotate moves the file away (no copytruncate, no restart needed)
            handler: logging.Handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise OSError(exc.errno, f"log file {path}: cannot open ({exc.strerror}); create {path.parent} "
                                     "writable by the service account, or set log.file / --log-file") from None
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    q: queue.Queue = queue.Queue(LOG_QUEUE_SIZE)
    _listener = logging.handlers.QueueListener(q, handler, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger("v2grt")
    root.handlers[:] = [_DroppingQueueHandler(q)]
    root.setLevel(level)
    root.propagate = False
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        _library_state[name] = (lib.handlers[:], lib.propagate, lib.level)
        lib_handler = _DroppingQueueHandler(q)
        lib_handler.addFilter(LibraryRecords(library_rate_limit_s))
        lib.handlers[:] = [lib_handler]
        lib.setLevel(max(level, logging.WARNING))
        lib.propagate = False


def shutdown_logging() -> None:
    """Write out what is queued and stop the writer thread (idempotent; also run at exit)."""
    global _listener
    listener, _listener = _listener, None
    for name, (handlers, propagate, level) in list(_library_state.items()):
        lib = logging.getLogger(name)
        lib.handlers[:], lib.propagate = handlers, propagate
        lib.setLevel(level)
        del _library_state[name]
    if listener is not None:
        listener.stop()  # drains the queue, then joins the thread
        for h in listener.handlers:
            h.close()


atexit.register(shutdown_logging)
