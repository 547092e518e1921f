"""v2g-aggregator as a service, run as real processes: one scheduler per fleet, durable epochs and fencing,
--daemonize with its pidfile, root refusal, config errors, and systemd's notify protocol and watchdog
checked against a real AF_UNIX datagram socket bound here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import types

import pytest
import zmq
from _plant import (
    V2G_AGGREGATOR,
    V2G_CLI,
    V2GRT,
    clean_env,
    log_lines,
    logging_restored,
    run,
    short_dir,
    start_aggregator,
    stop_process,
    wait_for_log,
    wait_until,
    write_config,
)

from v2grt.aggregator import Aggregator
from v2grt.config import load_config
from v2grt.io import bus
from v2grt.notify import Notifier, WatchdogHook, watchdog_interval_ns
from v2grt.service import ServiceRefused, refuse_root, run_aggregator
from v2grt.sim.sunspec import SimServerThread, SunSpecMeter


@pytest.fixture
def sockets():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def meter():
    m = SunSpecMeter(203, f_hz=50.0)
    sim = SimServerThread([m]).start()
    yield m, sim.port(m)
    sim.stop()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a container's pid 1 may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class NotifySocket:
    """systemd's side of sd_notify: a bound AF_UNIX datagram socket collecting what the service sends."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Every message that arrives within `seconds` (also kept in `received` with its arrival time)."""
        out, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.received.append((time.monotonic(), data))
            out.append(data)
        return out

    def wait_for(self, text: str, timeout_s: float) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for msg in self.collect(min(0.2, end - time.monotonic())):
                if text in msg:
                    return msg
        raise AssertionError(f"no {text!r} from the service within {timeout_s} s")

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------------------------------- root
def test_refuse_root_unless_allowed():
    """Root is refused without allow_root; root with it, and any other user, may run."""
    with pytest.raises(ServiceRefused, match="--allow-root"):
        refuse_root(False, euid=0)
    refuse_root(True, euid=0)
    refuse_root(False, euid=1000)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root to see the refusal")
def test_console_scripts_refuse_root(tmp_path, sockets):
    """As root, v2g-aggregator and v2grt run exit 3 naming --allow-root, and take no lock."""
    cfg = write_config(tmp_path, sockets)
    for cmd in ([V2G_AGGREGATOR, "--config", str(cfg)], [V2GRT, "run", "--config", str(cfg)]):
        r = run(*cmd)
        assert r.returncode == 3 and "refusing to run as root" in r.stderr and "--allow-root" in r.stderr
    assert not (tmp_path / "state" / "plant.epoch").exists()


# ----------------------------------------------------------------------------- config errors
def test_config_errors_name_file_key_and_value(tmp_path, sockets):
    """A bad value stops config check and v2g-aggregator with exit 2, naming the file, key and value."""
    cfg = write_config(tmp_path, sockets, alert={"response_limit": 2})
    for cmd in ([V2GRT, "config", "check", str(cfg)], [V2G_AGGREGATOR, "--config", str(cfg), "--allow-root"]):
        r = run(*cmd)
        assert r.returncode == 2 and str(cfg) in r.stderr and "alert.response_limit=2" in r.stderr, r.stderr
    cfg = write_config(tmp_path, sockets, fleet_id="p2")  # then a typo in the discharge profile it names
    (tmp_path / "profile.json").write_text('{"minimum_soc": 0.2, "polcy": "merit"}')
    r = run(V2GRT, "config", "check", str(cfg))
    assert r.returncode == 2 and "discharge_profile" in r.stderr and "polcy" in r.stderr
    r = run(V2GRT, "config", "check", str(cfg.parent.parent / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = run(V2GRT, "config", "check", "configs/default.yaml")
    assert r.returncode == 0 and "OK" in r.stdout


# -------------------------------------------------------------------------- one per fleet
def test_second_scheduler_is_refused_naming_the_pid(tmp_path, sockets):
    """While one v2g-aggregator holds a fleet, a second one (either command) exits 3 naming the holder's pid."""
    cfg = write_config(tmp_path, sockets)
    first = start_aggregator(cfg, "--json-logs", stderr_path=tmp_path / "first.stderr")
    try:
        wait_until(lambda: "READY" in (tmp_path / "first.stderr").read_text(), timeout_s=20, what="first READY")
        for cmd in ([V2G_AGGREGATOR, "--config", str(cfg), "--allow-root"],
                    [V2GRT, "run", "--config", str(cfg), "--allow-root"]):
            r = run(*cmd)
            assert r.returncode == 3, r.stderr
            assert "IDEMPOTENT_KEY_CONFLICT" in r.stderr and f"pid {first.pid}" in r.stderr
        assert first.poll() is None
        # the foreground service logs JSON lines to stderr when asked (no systemd in this environment)
        records = [json.loads(ln) for ln in (tmp_path / "first.stderr").read_text().splitlines() if ln.startswith("{")]
        assert any(r["msg"].startswith("START fleet_id=plant epoch=1") for r in records)
    finally:
        assert stop_process(first) == 0


def test_epochs_increase_across_restarts(tmp_path, sockets):
    """Each start takes a new durable epoch, one above the last, and stamps it on every setpoint."""
    cfg = write_config(tmp_path, sockets)
    seen = []
    ctx = zmq.Context.instance()
    for _ in range(2):
        proc = start_aggregator(cfg)
        try:
            with bus.GatewaySubscriber(ctx, f"ipc://{sockets}/sp", "gw2") as sub:
                msg = wait_until(lambda sub=sub: sub.recv(100), timeout_s=20, what="a setpoint")
            seen.append(msg.ep)
            assert int((tmp_path / "state" / "plant.epoch").read_text()) == msg.ep
        finally:
            assert stop_process(proc) == 0
    assert seen[1] == seen[0] + 1


def test_stale_epoch_is_fenced(tmp_path, sockets):
    """Gateways that saw the new epoch reject a zombie scheduler's older one (IDEMPOTENT_KEY_CONFLICT)."""
    cfg = write_config(tmp_path, sockets)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "plant.epoch").write_text("41\n")
    proc = start_aggregator(cfg)  # takes epoch 42
    zcfg = load_config(cfg)
    zcfg.bus.setpoints, zcfg.bus.telemetry, zcfg.bus.control = (f"ipc://{sockets}/zsp", f"ipc://{sockets}/ztel",
                                                                f"ipc://{sockets}/zctl")
    zombie = Aggregator(zcfg, epoch=41)  # another host that missed the restart: no lock here to stop it
    zombie.start()
    try:
        ctx = zmq.Context.instance()
        with bus.GatewaySubscriber(ctx, f"ipc://{sockets}/sp", "gw1") as sub:
            sub.sock.connect(f"ipc://{sockets}/zsp")
            wait_until(lambda: (m := sub.recv(100)) and m.ep == 42, timeout_s=20, what="epoch 42")
            admitted = [m for _ in range(20) if (m := sub.recv(100)) is not None]
            assert admitted and all(m.ep == 42 for m in admitted)
            assert sub.errors["IDEMPOTENT_KEY_CONFLICT"] > 0
    finally:
        zombie.stop()
        assert stop_process(proc) == 0


# ------------------------------------------------------------------------------- daemonize
def test_signal_storm_through_shutdown_still_exits_cleanly(tmp_path, sockets):
    """SIGTERM/SIGINT back to back (a dying parent plus Ctrl-C) until v2g-aggregator has gone, through its whole
    shutdown: it still stops cleanly, exit code 0 and STOPPED logged (not killed by a late signal)."""
    import contextlib

    cfg = write_config(tmp_path, sockets)
    log = tmp_path / "storm.stderr"  # engine.log: stderr in the foreground
    proc = start_aggregator(cfg, stderr_path=log)
    try:
        wait_for_log(log, "READY", timeout_s=20)
        end = time.monotonic() + 10.0
        while proc.poll() is None and time.monotonic() < end:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGINT)
            time.sleep(0.0005)
        assert proc.wait(10) == 0, log.read_text()[-2000:]
    finally:
        stop_process(proc)
    assert log_lines(log, "STOPPED")


def test_daemonize_pidfile_log_and_clean_stop(tmp_path, sockets):
    """--daemonize returns 0 once running, writes the pidfile, logs to the log file; SIGTERM removes the pidfile."""
    cfg = write_config(tmp_path, sockets)
    pidfile, log = tmp_path / "run" / "v2g.pid", tmp_path / "engine.log"
    r = run(V2G_AGGREGATOR, "--config", str(cfg), "--daemonize", "--allow-root", "--pidfile", str(pidfile))
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        assert f"pid {pid}" in r.stdout and alive(pid)
        assert "READY first cycle ran" in log.read_text()
        assert run(V2G_CLI, "--status", "--config", str(cfg)).returncode == 0
        # a second daemon for the same fleet reports the refusal through the parent's exit code
        r2 = run(V2G_AGGREGATOR, "--config", str(cfg), "--daemonize", "--allow-root",
                 "--pidfile", str(tmp_path / "other.pid"))
        assert r2.returncode == 3 and f"pid {pid}" in r2.stderr
        assert int(pidfile.read_text()) == pid
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), timeout_s=10, what="daemon gone")
    assert not pidfile.exists()
    assert "STOPPED cycles=" in log.read_text()


def test_daemonize_reports_start_up_failure(tmp_path, sockets):
    """A daemon that cannot start (log path unusable) makes --daemonize exit 1 with the reason."""
    cfg = write_config(tmp_path, sockets)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    r = run(V2G_AGGREGATOR, "--config", str(cfg), "--daemonize", "--allow-root", "--log-file",
            str(blocker / "engine.log"))
    assert r.returncode == 1 and "cannot open" in r.stderr and str(blocker) in r.stderr


# ------------------------------------------------------------------------------- systemd
def test_sd_notify_ready_watchdog_and_stopping(tmp_path, sockets, meter):
    """Under systemd: READY=1 after the first cycle, WATCHDOG=1 while the meter is fresh and none while it is stale,
    STOPPING=1 on SIGTERM, and engine.log written to log.file."""
    m, port = meter
    cfg = write_config(tmp_path, sockets, meter_port=port)
    ns = NotifySocket(tmp_path / "notify")
    env = clean_env(NOTIFY_SOCKET=ns.path, WATCHDOG_USEC="600000", INVOCATION_ID="0123abcd")  # ping every 0.2 s
    proc = start_aggregator(cfg, env=env)
    try:
        assert "READY=1" in ns.wait_for("READY=1", 20)
        t0 = time.monotonic()
        ns.wait_for("WATCHDOG=1", 10.0)
        ns.wait_for("WATCHDOG=1", 10.0)  # pings keep coming while the meter is fresh
        window_s = 2.0
        pings = [x for x in ns.collect(window_s) if x == "WATCHDOG=1"]
        # at most one ping per 0.2 s (WatchdogSec/3) since READY, plus a few a starved reader let queue up;
        # a ping every 50 ms cycle would be ~40 in the window (the exact interval: the hook's own test)
        assert 1 <= len(pings) <= (time.monotonic() - t0) / 0.2 + 3, pings
        m.set_stale(True)  # the meter stops answering: inputs go stale after stale_after_s (1 s)
        # The pings stop once the input is stale: a whole second without one comes within a few seconds. Not timed
        # from the GRID_FREQUENCY_STALE line: under load a slow start may have logged one already, and the line is
        # rate-limited per code (log.rate_limit_s), so the one for this outage may never be written.
        t_quiet = time.monotonic() + 10.0
        while [x for x in ns.collect(1.0) if x == "WATCHDOG=1"]:
            assert time.monotonic() < t_quiet, "WATCHDOG=1 still sent 10 s after the meter stopped answering"
        assert wait_for_log(tmp_path / "engine.log", "GRID_FREQUENCY_STALE", timeout_s=5.0)
        m.set_stale(False)
        ns.wait_for("WATCHDOG=1", 10.0)
        assert stop_process(proc) == 0
        assert "STOPPING=1" in ns.wait_for("STOPPING=1", 10.0)
        log = tmp_path / "engine.log"
        assert any("START fleet_id=plant" in ln for ln in log_lines(log))
        assert "START" not in (cfg.with_suffix(".stderr")).read_text()  # not on stderr under systemd
    finally:
        stop_process(proc)
        ns.close()


def test_watchdog_stops_while_cycles_miss_deadlines(tmp_path, sockets, monkeypatch):
    """A loop whose cycles overrun stops pinging the watchdog, and pings again once cycles are on time."""
    ns = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    monkeypatch.setenv("WATCHDOG_USEC", "450000")  # ping every 0.15 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = write_config(tmp_path, sockets)
    slow = threading.Event()
    slept = threading.Event()
    started = threading.Event()
    stop = threading.Event()

    def overrun(a, r, t):
        if slow.is_set():
            time.sleep(0.07)  # period is 0.05 s
            slept.set()

    def ready(agg):
        agg.cycle_hooks.append(overrun)  # after the watchdog hook: a ping of this cycle is sent before the sleep
        started.set()

    t = threading.Thread(target=run_aggregator, args=(str(cfg),), daemon=True,
                         kwargs={"stop": stop, "ready": ready, "log_path": str(tmp_path / "engine.log")})
    restored = logging_restored()
    restored.__enter__()
    t.start()
    try:
        assert started.wait(20)
        ns.wait_for("WATCHDOG=1", 10.0)
        slow.set()
        assert slept.wait(10.0)  # from the next cycle on the hook sees the overrun: no ping while they go on
        ns.collect(0.05)  # what earlier cycles sent
        assert [x for x in ns.collect(1.0) if x == "WATCHDOG=1"] == []
        slow.clear()
        ns.wait_for("WATCHDOG=1", 10.0)
    finally:
        stop.set()
        t.join(10)
        restored.__exit__(None, None, None)
        ns.close()
    assert not t.is_alive()


def test_watchdog_hook_pings_only_after_a_clean_interval(tmp_path):
    """The hook pings once per interval of clean, fresh cycles; an overrun or a stale input restarts the interval."""
    ns = NotifySocket(tmp_path / "n")
    now = [0]
    hook = WatchdogHook(Notifier(ns.path), interval_ns=100, stale_after_ns=50, clock=lambda: now[0])
    stats = types.SimpleNamespace(missed_deadlines=0, budget_overruns=0, errors=0)

    def step(dt, age=10):
        now[0] += dt
        return hook.observe(stats, age)

    assert [step(10) for _ in range(10)] == [False] * 10  # 0..100: the first interval is being filled
    assert step(10) is True and ns.collect(0.2) == ["WATCHDOG=1"]
    assert [step(10) for _ in range(9)] == [False] * 9
    stats.budget_overruns += 1
    assert step(10) is False  # an overrun restarts the interval
    assert [step(10) for _ in range(9)] == [False] * 9
    assert step(10) is True
    assert [step(10, age=80) for _ in range(20)] == [False] * 20  # stale meter: no pings at all
    assert step(10, age=-1) is False  # no sample yet counts as stale
    assert [step(10) for _ in range(10)] == [False] * 10 and step(10) is True
    assert hook.pings == 3
    ns.close()


def test_watchdog_interval_from_environment():
    """WatchdogSec arrives as $WATCHDOG_USEC; pings go at a third of it, only for the process it names."""
    assert watchdog_interval_ns({"WATCHDOG_USEC": "3000000"}) == 1_000_000_000
    assert watchdog_interval_ns({}) is None
    assert watchdog_interval_ns({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_ns({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 1_000_000_000


def test_systemd_unit_has_what_the_real_time_service_needs():
    """The shipped unit is Type=notify with a watchdog, restarts on failure, runs unprivileged with the RT caps."""
    from pathlib import Path

    from v2grt.operator import aggregator_parser

    unit: dict[str, list[str]] = {}
    for line in (Path(__file__).resolve().parent.parent / "configs" / "v2grt.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, val = line.partition("=")
            unit.setdefault(key.strip(), []).append(val.strip())
    one = {k: v[-1] for k, v in unit.items()}
    assert one["Type"] == "notify" and one["Restart"] == "on-failure" and one["WatchdogSec"].endswith("s")
    assert set(one["RestartPreventExitStatus"].split()) == {"2", "3"}  # config errors and refusals: no loop
    assert one["User"] not in ("root", "0") and one["NoNewPrivileges"] == "yes"
    assert set(one["AmbientCapabilities"].split()) == {"CAP_SYS_NICE", "CAP_IPC_LOCK"}
    assert int(one["LimitRTPRIO"]) > 0 and one["LimitMEMLOCK"] == "infinity"
    assert {"-/var/lib/v2g", "-/var/log/v2g"} <= set(one["ReadWritePaths"].split())
    assert one.get("RestrictRealtime", "no") == "no"  # SCHED_FIFO is the point
    argv = one["ExecStart"].split()
    assert argv[0].endswith("/v2g-aggregator")
    args = aggregator_parser().parse_args(argv[1:])
    assert args.config == "/etc/v2g/primary_config.yaml" and not args.daemonize and not args.allow_root
