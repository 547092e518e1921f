"""engine.log events: one line per event with the field manual's code, rate-limited per code and node,
and counted so status and metrics can show them.

    2026-11-26T08:30:00.123Z WARNING TIMEOUT_BMS_RESPONSE node=EV_NODE_17 age_s=6.2
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

log = logging.getLogger("v2grt.engine")


class EventLog:
    """Emit coded events; the same (code, key) is logged at most once per `interval_s`.

    Suppressed repeats are counted and reported on the next line that gets through
    (``suppressed=N``), so a flapping vehicle cannot flood the log and nothing is silently lost.
    Thread-safe: the control thread and the I/O threads both emit.
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
            if last is not None and now - last < self.interval_ns:
                self._suppressed[k] += 1
                return False
            self._last[k] = now
            suppressed = self._suppressed.pop(k, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.logger.log(level, "%s", _line(code, message, fields), extra={"code": code, "fields": fields})
        return True


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


def setup_logging(path: str | None = None, *, json_lines: bool = False, level: int = logging.INFO) -> None:
    """Log to a file (the service's engine.log) or stderr (foreground), as text or JSON lines."""
    handler: logging.Handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger("v2grt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
