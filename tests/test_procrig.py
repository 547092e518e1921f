"""v2grt.procrig on real child processes: start with a log, check, wait, stop (in order, SIGCONT, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from v2grt import procrig

# A child that logs its name, then on SIGTERM appends it to the file named by argv[2] and exits 0 (or, with
# argv[3] == "stubborn", ignores SIGTERM).
CHILD = """
import signal, sys, time
name, record = sys.argv[1], sys.argv[2]
def bye(*_):
    with open(record, "a") as fh:
        fh.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[3:] == ["stubborn"] else bye)
print("up", name, flush=True)
while True:
    time.sleep(0.05)
"""


def child(tmp_path, name: str, *extra: str, new_session: bool = True) -> procrig.Child:
    log = tmp_path / f"{name}.out"
    proc = procrig.start([sys.executable, "-c", CHILD, name, str(tmp_path / "stopped.txt"), *extra], log,
                         cwd=tmp_path, new_session=new_session)
    procrig.wait_for(lambda: "up" in log.read_text(), 10.0, f"{name} up")
    return procrig.Child(name, proc, log)


def test_free_ports_are_distinct_and_bindable():
    """Eight ports at once are eight different ports, each free to bind afterwards."""
    import socket

    ports = procrig.free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_cpu_seconds_counts_a_busy_child_and_is_0_for_a_gone_one(tmp_path):
    """A child that spins until it has used 0.5 s of CPU reads >= 0.45 s (clock ticks); a reaped pid reads 0."""
    proc = procrig.start([sys.executable, "-c", "import time\nt = time.process_time()\n"
                          "while time.process_time() - t < 0.5: pass\nprint('done', flush=True)\ntime.sleep(30)"],
                         tmp_path / "busy.out")
    try:
        procrig.wait_for(lambda: "done" in (tmp_path / "busy.out").read_text(), 30.0, "the busy child done")
        assert procrig.cpu_seconds(proc.pid) >= 0.45
    finally:
        procrig.stop([proc], 5.0)
    assert procrig.cpu_seconds(proc.pid) == 0.0


def test_children_stop_in_the_given_order(tmp_path):
    """Children.stop(("aggregator", "gateway-", "")) stops the aggregator, then the gateways, then the rest."""
    kids = procrig.Children(tmp_path, tmp_path)
    kids.all = [child(tmp_path, n) for n in ("devices-x", "gateway-2", "aggregator", "gateway-1")]
    kids.stop(("aggregator", "gateway-", ""))
    order = (tmp_path / "stopped.txt").read_text().split()
    assert order[0] == "aggregator" and set(order[1:3]) == {"gateway-1", "gateway-2"} and order[3] == "devices-x"
    assert all(c.proc.returncode == 0 for c in kids)  # each stopped cleanly, none killed


def test_stop_kills_a_child_that_ignores_sigterm_after_the_timeout_and_says_so(tmp_path):
    """A child that ignores SIGTERM is SIGKILLed after timeout_s (not before), with on_kill told first."""
    stubborn = child(tmp_path, "stubborn", "stubborn")
    told = []
    t0 = time.monotonic()
    procrig.stop([stubborn.proc], timeout_s=0.5, on_kill=told.append)
    assert 0.45 <= time.monotonic() - t0 < 5.0
    assert stubborn.proc.returncode == -signal.SIGKILL and told == [stubborn.proc]


def test_stop_continues_a_sigstopped_child_so_that_it_stops_cleanly(tmp_path):
    """A SIGSTOPped child gets SIGCONT with its SIGTERM and exits 0 on its own, not by SIGKILL."""
    c = child(tmp_path, "paused", new_session=False)
    os.kill(c.proc.pid, signal.SIGSTOP)
    procrig.stop([c.proc], timeout_s=5.0)
    assert c.proc.returncode == 0


def test_hurry_cuts_the_wait_short(tmp_path):
    """With hurry set (a second Ctrl-C) a stubborn child is killed at once, not after timeout_s."""
    c = child(tmp_path, "stubborn", "stubborn")

    class Set:
        def is_set(self) -> bool:
            return True

    t0 = time.monotonic()
    procrig.stop([c.proc], timeout_s=30.0, hurry=Set())
    assert time.monotonic() - t0 < 5.0 and c.proc.returncode == -signal.SIGKILL


def test_a_child_that_exited_is_an_error_naming_it_with_its_log(tmp_path):
    """check() and wait_for() raise the rig's error naming the child, its exit code and its log's last lines."""

    class RigError(RuntimeError):
        pass

    log = tmp_path / "gateway-7.out"
    proc = procrig.start([sys.executable, "-c", "print('bad roster row 12'); raise SystemExit(3)"], log)
    proc.wait(10)
    kids = procrig.Children(tmp_path, tmp_path, error=RigError)
    kids.all.append(procrig.Child("gateway-7", proc, log))
    with pytest.raises(RigError, match=r"gateway-7 exited with code 3; its log .*gateway-7\.out.* ends:\nbad roster"):
        kids.check()
    with pytest.raises(RigError, match="gateway-7 exited with code 3"):
        procrig.wait_for(lambda: False, 10.0, "never", children=kids, error=RigError)


def test_wait_for_times_out_with_what_it_waited_for():
    """wait_for returns the predicate's value, or after timeout_s raises naming what it waited for."""
    assert procrig.wait_for(lambda: 42, 1.0, "the answer") == 42
    with pytest.raises(procrig.ChildError, match=r"the aggregator answering: not so after 0\.1 s"):
        procrig.wait_for(lambda: None, 0.1, "the aggregator answering", step_s=0.01)


def test_a_v2grt_child_dies_with_its_parent(tmp_path):
    """`v2grt gateway sim` started by v2grt_argv (as the demo and prequal start theirs) gets SIGTERM and ends
    when the process that started it is SIGKILLed: no child is left behind."""
    from v2grt.testing import write_ten_vehicle_roster

    roster = write_ten_vehicle_roster(tmp_path / "roster.csv")
    sp, tm = procrig.free_ports(2)
    pid_file = tmp_path / "child.pid"
    argv = procrig.v2grt_argv(["gateway", "sim", "--roster", str(roster), "--gateway-id", "gw1", "--setpoints",
                               f"tcp://127.0.0.1:{sp}", "--telemetry", f"tcp://127.0.0.1:{tm}"], parent_pid=0)
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
from v2grt import procrig
argv = {argv!r}
argv[argv.index("--child-of") + 1] = str(os.getpid())
p = procrig.start(argv, {str(tmp_path / 'child.out')!r}, new_session=True)
open({str(pid_file)!r}, "w").write(str(p.pid))
time.sleep(120)
"""])
    try:
        pid = int(procrig.wait_for(lambda: pid_file.exists() and pid_file.read_text(), 20.0, "the child's pid"))
        procrig.wait_for(lambda: "GATEWAY_START" in (tmp_path / "child.out").read_text(), 60.0, "the gateway up")
        parent.kill()
        parent.wait(10)
        procrig.wait_for(lambda: _gone(pid), 20.0, f"the gateway (pid {pid}) gone")
    finally:
        parent.kill()


def test_a_v2grt_child_whose_rig_is_already_gone_exits_at_once(tmp_path):
    """A child started for a parent that is not its parent (it died before the child could arm the parent-death
    signal) exits with 1 without running the command."""
    proc = procrig.start(procrig.v2grt_argv(["run", "--config", "/nonexistent"], parent_pid=1), tmp_path / "c.out")
    assert proc.wait(30) == 1 and "nonexistent" not in (tmp_path / "c.out").read_text()


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (reaped by init once its parent died)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
