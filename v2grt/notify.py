"""systemd's notify protocol: READY=1, WATCHDOG=1 only while the loop is healthy, STOPPING=1.

sd_notify is one datagram on the AF_UNIX socket named by $NOTIFY_SOCKET (sd_notify(3)). It is written
here in a dozen lines rather than taken from the `sdnotify` package: that package is the same dozen
lines, is not in the dependency set, and would open a blocking socket, while the watchdog ping is sent
from inside a control cycle and must never wait (the socket here is non-blocking; a full queue at
systemd costs one ping, never a deadline).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("v2grt.notify")


class Notifier:
    """A datagram socket to systemd's $NOTIFY_SOCKET (a path, or an abstract name starting with '@')."""

    def __init__(self, address: str):
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_env(cls, environ=os.environ) -> Notifier | None:
        """The notifier systemd asked for, or None when not started by systemd with Type=notify."""
        address = environ.get("NOTIFY_SOCKET")
        return cls(address) if address else None

    def notify(self, state: str) -> bool:
        """Send one state string (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``); False if it was not sent."""
        try:
            self.sock.sendto(state.encode(), self.address)
        except OSError:  # systemd gone, queue full: the watchdog will tell, the loop must not stop
            self.failed += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self.sock.close()


def watchdog_interval_ns(environ=os.environ) -> int | None:
    """How often to ping: a third of WatchdogSec ($WATCHDOG_USEC), or None when there is no watchdog.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for (sd_watchdog_enabled(3)).
    """
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer: no watchdog pings", usec)
        return None
    return value * 1000 // 3 if value > 0 else None


class WatchdogHook:
    """Cycle hook: WATCHDOG=1 at most every `interval_ns`, and only after a whole clean interval.

    Clean means every cycle of the interval met its deadline (no missed period, no budget overrun, no
    cycle error) and read fresh inputs (the meter's newest sample no older than `stale_after_ns`). Any
    unclean cycle restarts the interval, so a loop that keeps missing deadlines or runs on a dead meter
    stops pinging and systemd restarts it after WatchdogSec; one hiccup only delays a ping (an interval
    is a third of WatchdogSec). Per cycle: a few integer compares; the send is one non-blocking datagram.
    """

    def __init__(self, notifier: Notifier, interval_ns: int, stale_after_ns: int | None, clock=time.monotonic_ns):
        self.notifier = notifier
        self.interval_ns = int(interval_ns)
        self.stale_after_ns = stale_after_ns
        self.clock = clock
        self._window_start: int | None = None
        self._bad = -1
        self.pings = 0

    def __call__(self, agg, result, times) -> None:
        self.observe(agg.stats, times.input_age_ns)

    def observe(self, stats, input_age_ns: int) -> bool:
        """Account one cycle; True if a ping was sent."""
        now = self.clock()
        bad = stats.missed_deadlines + stats.budget_overruns + stats.errors
        fresh = self.stale_after_ns is None or 0 <= input_age_ns <= self.stale_after_ns
        if bad != self._bad or not fresh or self._window_start is None:
            self._bad = bad
            self._window_start = now if fresh else None
            return False
        if now - self._window_start < self.interval_ns:
            return False
        self._window_start = now
        if self.notifier.notify("WATCHDOG=1"):
            self.pings += 1
            return True
        return False
