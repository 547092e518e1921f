"""Child processes of a rig on one machine: free ports, a child with its log, readiness, a clean stop.

`v2grt demo`, `v2grt prequal` (v2grt/prequal/rig.py) and the HA rig (v2grt/harig.py) start real
processes (aggregators, gateways, device simulators) and must stop every one of them, also when they
fail or are killed. This is the one way they do it:

- :func:`start`: a process with stdout and stderr into its log file, optionally in a session of its
  own (a terminal's Ctrl-C reaches only the rig, which stops its children in order) and dying with
  the rig (``die_with``: a parent-death signal, so not even a rig killed with SIGKILL leaves one).
- :func:`v2grt_argv` / :class:`Children`: ``v2grt ARGS`` as such a child (``python -m v2grt.procrig
  --child-of PID -- ARGS``, which sets the parent-death signal itself and closes the race with a
  parent that died before it could).
- :func:`check` / :func:`wait_for`: a child that exited is an error naming it and quoting its log's
  tail; waiting for readiness checks the children on every poll, so a crash is reported at once.
- :func:`stop`: SIGCONT (a SIGSTOPped child cannot handle SIGTERM) and SIGTERM to all at once, then
  up to ``timeout_s`` for all, then SIGKILL (the child's process group if it leads one), and reaped.

It also holds the two timings a rig that simulates its devices on a loaded host needs
(RIG_SETPOINT_TTL_S, RIG_METER_TIMEOUT_S), so the rigs that share a host's starvation share them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

#: SIGTERM, then SIGKILL after this long (an aggregator seals its journal and sends its final zero).
TERM_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h

#: Setpoint expiry (``bus.setpoint_ttl_s``) of a rig whose simulated gateways share two cores with everything
#: else: at the default (3 periods; 150 ms at prequal's 50 ms) a starved gateway dropped its site to 0 kW for
#: a moment (seen at load 20: 2.5 MW dips in a 10 MW hold). A real gateway has a host of its own; the rigs
#: count the expiries they still see (prequal's "rig faults", docs/prequal.md).
RIG_SETPOINT_TTL_S = 0.5
#: Meter timeout (``meter.timeout_s``) of a rig whose simulated meter is served by the rig's own process,
#: which a loaded host starves longer than a real meter ever takes: at the shipped 0.05 s a starved answer
#: dropped the connection and its backoff left the frequency stale for 3.5 s (load 23). Used by prequal,
#: whose tests read the frequency the aggregator used; the demo keeps the shipped 0.05 s.
RIG_METER_TIMEOUT_S = 0.25


class ChildError(RuntimeError):
    """A child process exited, or the rig's wait ran out; the message says which child and where its log is."""


@dataclasses.dataclass
class Child:
    """One child process of a rig: its name (for messages and stop order), process and log file."""

    name: str
    proc: subprocess.Popen
    log: Path
    cpu_at_start_s: float = 0.0  # for rigs that report each child's CPU over a window


# ------------------------------------------------------------------------------------- small helpers
def free_ports(k: int) -> list[int]:
    """k TCP ports on 127.0.0.1 that were free a moment ago (all held at once, so they differ)."""
    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines of a log ("(no log)" if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far, from /proc/PID/stat fields 14 and
    15 (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_flags() -> set[str]:
    """Option strings `v2grt run` accepts here (it may or may not have --allow-root)."""
    from v2grt.cli import build_parser

    ap = build_parser()
    for action in ap._actions:  # argparse has no public way to reach a subparser
        if isinstance(action, argparse._SubParsersAction) and "run" in action.choices:
            return {s for a in action.choices["run"]._actions for s in a.option_strings}
    return set()


def allow_root_args() -> list[str]:
    """``["--allow-root"]`` when running as root and `v2grt run` has the flag: the rig's own aggregator (a
    service runs as its own account)."""
    return ["--allow-root"] if os.geteuid() == 0 and "--allow-root" in run_flags() else []


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when the thread that spawned this process ends (Linux; elsewhere a no-op).

    As a ``preexec_fn``, or first thing in a child (the v2grt entry below)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def v2grt_argv(args: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """The command line of ``v2grt ARGS`` as a child that dies (SIGTERM, its clean stop) with ``parent_pid``."""
    pid = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", "v2grt.procrig", "--child-of", str(pid), "--", *args]


# ------------------------------------------------------------------------------------- processes
def start(argv: Sequence[str], log: Path, *, cwd: Path | None = None, env: dict | None = None,
          new_session: bool = False, die_with: int | None = None, append: bool = False) -> subprocess.Popen:
    """Start ``argv`` with stdin from /dev/null and stdout + stderr into ``log`` (appended to with ``append``).

    ``new_session``: its own session and process group (Ctrl-C in a terminal reaches the rig only, and
    :func:`stop` kills the group). ``die_with``: the parent-death signal, set before exec.
    """
    preexec = (lambda: die_with_parent(die_with)) if die_with is not None else None
    with open(log, "ab" if append else "wb") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=new_session, preexec_fn=preexec)


def check(children: Iterable[Child], error: type[Exception] = ChildError) -> None:
    """Raise ``error`` naming the first child that exited, with its exit code and its log's tail."""
    for c in children:
        rc = c.proc.poll()
        if rc is not None:
            raise error(f"{c.name} exited with code {rc}; its log ({c.log}) ends:\n{tail(c.log)}")


def wait_for(pred: Callable[[], object], timeout_s: float, what: str | Callable[[], str], *,
             children: Iterable[Child] = (), error: type[Exception] = ChildError, step_s: float = 0.05):
    """Poll ``pred()`` until it is truthy and return it; every poll checks ``children`` first (a crash is
    reported at once, with its log), and after ``timeout_s`` ``error`` says what was awaited (``what``, or
    ``what()`` then: the state it was waiting in)."""
    deadline = time.monotonic() + timeout_s
    while True:
        check(children, error)
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(what() if callable(what) else f"{what}: not so after {timeout_s:g} s")
        time.sleep(step_s)


def stop(procs: Iterable[subprocess.Popen], timeout_s: float = TERM_TIMEOUT_S, *, hurry=None,
         on_kill: Callable[[subprocess.Popen], None] | None = None) -> None:
    """SIGCONT and SIGTERM to every running one at once, up to ``timeout_s`` for all of them to exit (less if
    ``hurry.is_set()``), then SIGKILL to the rest (to its process group if it leads one: its own children
    too) after ``on_kill(proc)``; every one reaped."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)  # a SIGSTOPped process would not act on SIGTERM
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if hurry is not None and hurry.is_set():
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            if on_kill is not None:
                on_kill(p)
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
        p.wait()


class Children:
    """The v2grt child processes of one rig, in start order: each in a session of its own, dying with the
    rig, its output in ``logs/<name>.out``, run in ``cwd``. ``error`` is what :meth:`check` raises."""

    def __init__(self, logs: Path, cwd: Path, error: type[Exception] = ChildError):
        self.logs, self.cwd, self.error = Path(logs), Path(cwd), error
        self.all: list[Child] = []

    def spawn(self, name: str, args: Sequence[str]) -> Child:
        """``v2grt ARGS`` as child ``name``."""
        log = self.logs / f"{name}.out"
        child = Child(name, start(v2grt_argv(args), log, cwd=self.cwd, new_session=True), log)
        self.all.append(child)
        return child

    def __iter__(self) -> Iterator[Child]:
        return iter(self.all)

    def named(self, prefix: str) -> list[Child]:
        """The children whose name starts with ``prefix`` ("" = all)."""
        return [c for c in self.all if c.name.startswith(prefix)]

    def check(self) -> None:
        check(self.all, self.error)

    def stop(self, order: Sequence[str] = ("",), *, timeout_s: float = TERM_TIMEOUT_S, hurry=None,
             on_kill: Callable[[Child], None] | None = None) -> None:
        """Stop the running children a group at a time, each group the names starting with the next prefix of
        ``order`` (``("aggregator", "gateway-", "")``: the aggregator, then the gateways, then the rest)."""
        by_proc = {id(c.proc): c for c in self.all}
        kill_hook = (lambda p: on_kill(by_proc[id(p)])) if on_kill is not None else None
        for prefix in order:
            stop([c.proc for c in self.named(prefix) if c.proc.poll() is None], timeout_s, hurry=hurry,
                 on_kill=kill_hook)


# ------------------------------------------------------------------------------------- the child side
def child_main(argv: list[str]) -> int:
    """``python -m v2grt.procrig --child-of PID -- ARGS``: run ``v2grt ARGS``, dying (SIGTERM) with PID.

    PR_SET_PDEATHSIG sends SIGTERM (the children's clean stop) when the rig's thread that spawned us
    ends, so a rig killed with SIGKILL leaves no process behind; the check after it closes the race
    with a rig that died before the call.
    """
    parent = int(argv[1])
    rest = argv[3:] if len(argv) > 2 and argv[2] == "--" else argv[2:]
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:
        return 1
    from v2grt.cli import main

    return main(rest)


__all__ = ["RIG_METER_TIMEOUT_S", "RIG_SETPOINT_TTL_S", "TERM_TIMEOUT_S", "Child", "ChildError", "Children",
           "allow_root_args", "check", "cpu_seconds", "die_with_parent", "free_ports", "run_flags", "start", "stop",
           "tail", "v2grt_argv", "wait_for"]

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-of":
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(f"usage: {sys.argv[0]} is internal; the rigs (v2grt demo, v2grt prequal) run it")
