"""A small plant for the operator and service tests: a roster, configs, a simulated SunSpec meter and
inverter, gateways that follow their setpoints over real ZeroMQ sockets, and the console scripts run
as real processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

from v2grt.events import shutdown_logging
from v2grt.io import bus, wire
from v2grt.testing import wait_until

BIN = Path(sys.executable).parent
V2G_AGGREGATOR = str(BIN / "v2g-aggregator")
V2G_CLI = str(BIN / "v2g-cli")
V2GRT = str(BIN / "v2grt")

#: 12 vehicles behind 3 gateways on 2 sites. node -> (gateway, site, soc, soh, temp_c)
VEHICLES = {
    "EV_NODE_01": ("gw1", "site1", 0.80, 0.97, 20.0),
    "EV_NODE_02": ("gw1", "site1", 0.10, 0.95, 20.0),  # under minimum_soc: excluded from discharge
    "EV_NODE_03": ("gw1", "site1", 0.22, 0.95, 20.0),  # just above the 0.20 floor
    "EV_NODE_04": ("gw1", "site1", 0.70, 0.95, 20.0),
    "EV_NODE_05": ("gw2", "site1", 0.65, 0.95, 20.0),
    "EV_NODE_06": ("gw2", "site1", 0.60, 0.95, 20.0),
    "EV_NODE_07": ("gw2", "site1", 0.75, 0.95, 20.0),
    "EV_NODE_08": ("gw2", "site1", 0.66, 0.95, 20.0),
    "EV_NODE_09": ("gw3", "site2", 0.70, 0.95, 20.0),
    "EV_NODE_10": ("gw3", "site2", 0.72, 0.95, 20.0),
    "EV_NODE_11": ("gw3", "site2", 0.74, 0.95, 20.0),
    "EV_NODE_12": ("gw3", "site2", 0.76, 0.95, 20.0),
}
GATEWAYS = ("gw1", "gw2", "gw3")
CAPACITY_KWH = 60.0
P_MAX_KW = 11.0


def short_dir() -> Path:
    """A short directory for ipc:// sockets (a socket path must stay under ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="v2g-", dir="/tmp"))


def write_roster(path: Path) -> Path:
    lines = ["node_id,gateway_id,site_id,soc,soh,capacity_kwh,p_dis_max_kw,p_chg_max_kw,temp_c"]
    for node, (gw, site, soc, soh, temp) in VEHICLES.items():
        lines.append(f"{node},{gw},{site},{soc},{soh},{CAPACITY_KWH},{P_MAX_KW},{P_MAX_KW},{temp}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_profile(path: Path, **overrides) -> Path:
    import json

    profile = {"minimum_soc": 0.20, "stale_after_s": 1.0, **overrides}
    path.write_text(json.dumps(profile))
    return path


def write_config(directory: Path, sockets: Path, *, fleet_id: str = "plant", meter_port: int | None = None,
                 inverter_port: int | None = None, **sections) -> Path:
    """A config for the plant; sections override or extend (dicts are merged one level deep)."""
    data = {
        "fleet_id": fleet_id, "period_s": 0.05, "budget_s": 0.05,
        "state_dir": str(directory / "state"),
        "discharge_profile": str(write_profile(directory / "profile.json")),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": None if meter_port is None else {
            # a meter answer may take 0.5 s and the frequency stays fresh for 1 s: margins a loaded CI machine
            # needs (at 0.05 / 0.3 s the plant's meter went stale under load, failing tests about other things)
            "host": "127.0.0.1", "port": meter_port, "poll_interval_s": 0.01, "timeout_s": 0.5,
            "stale_after_s": 1.0, "on_stale": "rampout", "rampout_s": 0.5},
        "inverters": [] if inverter_port is None else [
            {"name": "inv2", "site": "site2", "host": "127.0.0.1", "port": inverter_port}],
        "bus": {"setpoints": f"ipc://{sockets}/sp", "telemetry": f"ipc://{sockets}/tel",
                "control": f"ipc://{sockets}/ctl", "setpoint_ttl_s": 0.3},
        "service": {"name": "dc", "capacity_kw": 40.0},
        "fleet": {"roster": str(write_roster(directory / "roster.csv"))},
        "log": {"file": str(directory / "engine.log"), "rate_limit_s": 60.0},
        "alert": {"band_hz": 0.6, "response_limit": 0.5},
    }
    for key, value in sections.items():
        data[key] = {**(data.get(key) or {}), **value} if isinstance(value, dict) else value
    path = directory / f"{fleet_id}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def logging_restored():
    """Run an aggregator in this process (its setup_logging rewires the "v2grt" logger), then put the
    logger back as it was, so caplog in later tests still sees v2grt's records."""
    logger = logging.getLogger("v2grt")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    try:
        yield
    finally:
        shutdown_logging()
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def clean_env(**extra) -> dict:
    """The environment without systemd's variables (the test runner may itself run under systemd)."""
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                            "WATCHDOG_PID")}
    env.update(extra)
    return env


def start_aggregator(config: Path, *args: str, env: dict | None = None, stderr_path: Path | None = None):
    """v2g-aggregator in the foreground as a real process (stderr to a file to read later)."""
    err = open(stderr_path or config.with_suffix(".stderr"), "ab")
    proc = subprocess.Popen([V2G_AGGREGATOR, "--config", str(config), "--allow-root", *args], env=env or clean_env(),
                            stdout=err, stderr=err, start_new_session=True)
    err.close()
    return proc


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run(*cmd: str, timeout_s: float = 30.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, env=env or clean_env())




def log_lines(path: Path, code: str | None = None) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if code is None or f" {code} " in f" {line} "]


def wait_for_log(path: Path, text: str, timeout_s: float = 8.0) -> str:
    return wait_until(lambda: next((ln for ln in log_lines(path) if text in ln), None), timeout_s,
                      what=f"{text!r} in {path}")


class SimGateway(threading.Thread):
    """A gateway that follows its setpoints: reports power = setpoint (0 under e-stop or expiry) and
    integrates SoC `speedup` times faster than real time, so a short test shows a visible SoC change.

    Per-node overrides (fault code, temperature, SoH) and silencing a node are set from the test.
    """

    def __init__(self, gateway_id: str, setpoints: str, telemetry: str, *, interval_s: float = 0.05,
                 speedup: float = 100.0):
        super().__init__(name=f"sim-{gateway_id}", daemon=True)
        self.gateway_id = gateway_id
        self.endpoints = (setpoints, telemetry)
        self.interval_s = interval_s
        self.speedup = speedup
        self.nodes = [n for n, v in VEHICLES.items() if v[0] == gateway_id]
        self.soc = np.array([VEHICLES[n][2] for n in self.nodes])
        self.soh = np.array([VEHICLES[n][3] for n in self.nodes])
        self.temp_c = np.array([VEHICLES[n][4] for n in self.nodes])
        self.fault = np.zeros(len(self.nodes), np.uint8)
        self.p_kw = np.zeros(len(self.nodes))
        self.silent: set[str] = set()
        self.messages: list = []  # (seq, estop, p_kw copy, slow_n) of every admitted setpoint message
        self.fenced = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def set(self, node: str, *, fault: int | None = None, temp_c: float | None = None, soh: float | None = None):
        i = self.nodes.index(node)
        with self._lock:
            if fault is not None:
                self.fault[i] = fault
            if temp_c is not None:
                self.temp_c[i] = temp_c
            if soh is not None:
                self.soh[i] = soh

    def run(self) -> None:
        ctx = zmq.Context()
        sp, tel = self.endpoints
        with bus.GatewaySubscriber(ctx, sp, self.gateway_id) as sub, bus.TelemetryPusher(ctx, tel) as push:
            seq, last = 0, time.monotonic()
            msg = None
            while not self._halt.is_set():
                new = sub.recv(timeout_ms=int(self.interval_s * 1000))
                if new is not None:
                    msg = new
                    self.messages.append((new.seq, new.estop, np.array(new.p_kw, float), new.slow_n))
                now = time.monotonic()
                if now - last < self.interval_s:
                    continue
                dt, last = now - last, now
                with self._lock:
                    live = msg is not None and not msg.estop and not msg.expired(time.time_ns())
                    if live:
                        by_id = dict(zip(msg.node_ids, msg.p_kw, strict=True))
                        self.p_kw[:] = [by_id.get(n, 0.0) if not self.fault[i] else 0.0
                                        for i, n in enumerate(self.nodes)]
                    else:
                        self.p_kw[:] = 0.0
                    self.soc = np.clip(self.soc - self.p_kw * dt * self.speedup / 3600.0 / CAPACITY_KWH, 0, 1)
                    keep = [i for i, n in enumerate(self.nodes) if n not in self.silent]
                    if not keep:
                        continue
                    seq += 1
                    n = len(keep)
                    frame = wire.encode_telemetry(
                        self.gateway_id, seq, time.time_ns(), wire.join_ids(self.nodes[i] for i in keep),
                        self.soc[keep], self.p_kw[keep], np.ones(n, np.uint8), self.fault[keep],
                        soh=self.soh[keep], temp_c=self.temp_c[keep])
                push.send(frame)
            self.fenced = sub.errors.get("IDEMPOTENT_KEY_CONFLICT", 0)
        ctx.term()

    def stop(self) -> None:
        self._halt.set()
        self.join(5.0)

