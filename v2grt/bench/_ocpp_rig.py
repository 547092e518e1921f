"""What the OCPP benches share: a site on disk, `v2grt gateway ocpp` and `v2grt sim ocpp-stations` as real
processes on loopback, and the CPU time of a process from /proc."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from v2grt.bench._common import child_env

GATEWAY_ID = "ocpp1"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def online_heard(fleet, n: int) -> int:
    """EVSEs of the first ``n`` rows online as the gateway reported them: a roster row starts online (the
    roster's default) and never heard, so counting ``online`` alone passed before any station connected and
    a short run stepped the meter at stations not there yet."""
    from v2grt.fleet import NEVER_HEARD_NS

    return int(((fleet.online[:n] == 1) & (fleet.last_telemetry_ns[:n] != NEVER_HEARD_NS)).sum())


def uptime() -> str:
    """The load averages as `uptime` prints them (the machine is shared: every result carries them)."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


class Rig:
    """A site of ``stations`` x ``evses`` under gateway ocpp1, the gateway and the stations as processes.

    ``write_site()`` makes roster, credentials and passwords (and a TLS certificate unless ``plaintext``);
    ``start_gateway(setpoints, telemetry)`` then ``start_stations()``; ``stop()`` sends SIGTERM to all and
    waits (their trace files are written on the way out). Logs are ``gateway.log`` and ``stations.log`` in
    ``directory``.
    """

    def __init__(self, directory: Path, *, stations: int, evses: int, plaintext: bool = False):
        self.dir = Path(directory)
        self.stations, self.evses, self.plaintext = stations, evses, plaintext
        self.paths: dict[str, Path] = {}
        self.cert: Path | None = None
        self.gateway: subprocess.Popen | None = None
        self.sims: list[subprocess.Popen] = []
        self.shards: list[tuple[Path, Path]] = []  # (roster, passwords) of each simulator process
        self.port: int | None = None
        self.exit_codes: dict[str, int | None] = {}

    def write_site(self) -> Rig:
        from v2grt.sim.ocpp_stations import write_site

        self.paths = write_site(self.dir / "site", n_stations=self.stations, evses_per_station=self.evses,
                                gateway_id=GATEWAY_ID)
        if not self.plaintext:
            try:
                from v2grt.testing import self_signed_cert
            except ImportError:  # pragma: no cover - cryptography missing
                raise RuntimeError("TLS needs the `cryptography` package (pip install cryptography), or run "
                                   "with --plaintext") from None
            self.cert, self.key = self_signed_cert(self.dir / "tls")
        return self

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "v2grt.cli"]

    def start_gateway(self, setpoints: str, telemetry: str, *extra: str, timeout_s: float = 30.0) -> int:
        """`v2grt gateway ocpp` on 127.0.0.1 (an ephemeral port, read from its GATEWAY_START line); the port."""
        log_path = self.dir / "gateway.log"
        tls = ["--allow-plaintext"] if self.plaintext else ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        self.gateway = subprocess.Popen(
            [*self._cli(), "gateway", "ocpp", "--roster", str(self.paths["roster"]), "--gateway-id", GATEWAY_ID,
             "--credentials", str(self.paths["credentials"]), "--listen", "127.0.0.1:0", *tls,
             "--setpoints", setpoints, "--telemetry", telemetry, "--log-file", str(log_path), *extra],
            env=child_env(), stdout=subprocess.DEVNULL, stderr=open(self.dir / "gateway.stderr", "w"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log_path.read_text() if log_path.exists() else ""
            m = re.search(r"GATEWAY_START .* listen=[^ ]*:(\d+) ", text)
            if m:
                self.port = int(m.group(1))
                return self.port
            if self.gateway.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"v2grt gateway ocpp did not start (exit {self.gateway.poll()}): "
                           f"{(self.dir / 'gateway.stderr').read_text()[-2000:]} {log_path}")

    def start_stations(self, *extra: str, processes: int = 1, trace: bool = False) -> None:
        """`v2grt sim ocpp-stations` as ``processes`` processes, each with every ``processes``-th station (a
        station is its own device: one simulator process for hundreds of them would make the simulator's event
        loop part of what is measured). With ``trace``, process k writes ``stations{k}.trace`` on exit."""
        scheme = "ws" if self.plaintext else "wss"
        tls = [] if self.plaintext else ["--ca-cert", str(self.cert)]
        self.shards = shard_site(self.paths, max(1, min(processes, self.stations)), self.dir)
        for k, (roster, passwords) in enumerate(self.shards):
            tr = ["--trace-file", str(self.dir / f"stations{k}.trace")] if trace else []
            self.sims.append(subprocess.Popen(
                [*self._cli(), "sim", "ocpp-stations", "--url", f"{scheme}://127.0.0.1:{self.port}/ocpp",
                 "--roster", str(roster), "--gateway-id", GATEWAY_ID, "--passwords", str(passwords), "--seed", str(k),
                 "--log-file", str(self.dir / f"stations{k}.log"), *tls, *tr, *extra],
                env=child_env(), stdout=subprocess.DEVNULL, stderr=open(self.dir / f"stations{k}.stderr", "w")))

    def station_traces(self) -> list[tuple[Path, list[str]]]:
        """(trace file, node id of each of its rows) per simulator process: its rows are its own roster's."""
        out = []
        for k, (roster, _pw) in enumerate(self.shards):
            with open(roster, newline="") as fh:
                ids = [r[0] for r in list(csv.reader(fh))[1:]]
            out.append((self.dir / f"stations{k}.trace", ids))
        return out

    def sims_cpu_s(self) -> float:
        return sum(process_cpu_s(p.pid) for p in self.sims)

    def alive(self) -> None:
        """RuntimeError naming the process that died, with its last words."""
        procs = [("gateway", self.gateway)] + [(f"stations{k}", p) for k, p in enumerate(self.sims)]
        for name, proc in procs:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the {name} process exited ({proc.returncode}): "
                                   f"{(self.dir / f'{name}.stderr').read_text()[-2000:]}")

    def stop(self) -> dict:
        """SIGTERM to the gateway (it brings every EVSE to 0 kW), then to the stations; their exit codes
        (``stations``: one per simulator process)."""
        codes = []
        for proc in [self.gateway, *self.sims]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if proc is self.gateway:  # its last zeros reach the stations before they go
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        pass
        for proc in [self.gateway, *self.sims]:
            if proc is None:
                continue
            try:
                codes.append(proc.wait(30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait(5))
        if self.gateway is not None:
            self.exit_codes = {"gateway": codes[0], "stations": codes[1:]}
        self.gateway, self.sims = None, []
        return self.exit_codes

    def gateway_counters(self) -> dict[str, int]:
        """The counters of the gateway's GATEWAY_STOP line (after stop())."""
        text = (self.dir / "gateway.log").read_text() if (self.dir / "gateway.log").exists() else ""
        line = next((ln for ln in reversed(text.splitlines()) if "GATEWAY_STOP" in ln), "")
        return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)\b", line)}


def shard_site(paths: dict, shards: int, directory: Path) -> list[tuple[Path, Path]]:
    """Split the roster and passwords by station into ``shards`` (roster, passwords) pairs, one per simulator."""
    with open(paths["roster"], newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    stations = list(dict.fromkeys(r[0].rpartition(":")[0] for r in body))
    with open(paths["passwords"], newline="") as fh:
        pw = list(csv.reader(fh))
    out = []
    for k in range(shards):
        mine = set(stations[k::shards])
        roster, passwords = directory / f"roster{k}.csv", directory / f"passwords{k}.csv"
        with open(roster, "w", newline="") as fh:
            csv.writer(fh).writerows([header] + [r for r in body if r[0].rpartition(":")[0] in mine])
        with open(passwords, "w", newline="") as fh:
            csv.writer(fh).writerows([pw[0]] + [r for r in pw[1:] if r[0] in mine])
        passwords.chmod(0o600)
        out.append((roster, passwords))
    return out
