"""Durable per-fleet state: the one-scheduler lock and the monotonically increasing epoch."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class SchedulerConflict(RuntimeError):
    """Another scheduler holds this fleet (IDEMPOTENT_KEY_CONFLICT)."""


class FleetLock:
    """An exclusive flock on `<state_dir>/<fleet_id>.lock`, holding the owner's pid.

    The kernel releases an flock when its process dies, so a crashed scheduler never leaves a stale
    lock behind; a second scheduler on the same host is refused at once, naming the holder's pid.
    """

    def __init__(self, state_dir: str | Path, fleet_id: str):
        self.path = Path(state_dir).expanduser() / f"{fleet_id}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, f"state_dir {self.path.parent}: cannot create the fleet lock "
                                     f"{self.path.name} ({exc.strerror}); the service account needs write "
                                     "access there") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SchedulerConflict(f"IDEMPOTENT_KEY_CONFLICT fleet lock {self.path} is held by pid {holder}: "
                                    "one scheduler per fleet; stop that one first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def next_epoch(state_dir: str | Path, fleet_id: str) -> int:
    """Read, increment and durably store `<state_dir>/<fleet_id>.epoch`; returns the new epoch.

    Written to a temporary file, fsynced and renamed, so a crash leaves either the old or the new
    value, never a torn one. Call it while holding the FleetLock.
    """
    path = Path(state_dir).expanduser() / f"{fleet_id}.epoch"
    try:
        previous = int(path.read_text().strip())
    except FileNotFoundError:
        previous = 0
    except ValueError:
        raise ValueError(f"{path}: does not hold an integer epoch; fix or remove it (the next epoch must "
                         "exceed every epoch gateways have seen)") from None
    epoch = previous + 1
    tmp = path.with_suffix(".epoch.tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{epoch}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return epoch
