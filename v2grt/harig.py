"""The HA rig: etcd, two aggregators, gateways and a simulated meter as separate hosts on one machine.

As root with iproute2, every node (etcd, ``A``, ``B``, the meter, each gateway) is a network namespace
with its own address on a private bridge (``ip netns`` + veth), so the faults of a real multi-host
fleet can be made: kill -9, SIGSTOP/SIGCONT, a node cut off the network and restored, etcd stopped
and restarted. Without root (or without ``ip``) the same processes run on loopback, and the faults
that need namespaces raise :class:`Unsupported` naming why.

Used by tests/test_ha_rig.py, ``v2grt bench failover`` and ``v2grt demo --ha``. Each gateway is a real
:class:`~v2grt.gateway.core.GatewayCore` over simulated vehicles that also records every setpoint
message it accepts and the power its vehicles deliver (``python -m v2grt.harig gateway``), so what is
measured is what a gateway did, read back with :func:`read_record` and reduced by :func:`measure`.

Cutting a node removes its veth from the bridge (``ip link set ... nomaster``): a switch port gone
dead, packets dropped in silence both ways, no reset and no error, so TCP peers time out as across a
real partition. (netem and iptables are the usual tools; the kernels this was built on had neither.)
Powers are kW, positive = discharge into the grid.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from v2grt import procrig

NS = 1_000_000_000

#: Ports each node uses in namespace mode (every node has an address of its own).
ETCD_PORTS = (2379, 2380)
METER_PORT, INVERTER_PORT = 1502, 1503
SETPOINT_PORT, TELEMETRY_PORT, CONTROL_PORT = 5560, 5561, 5562

AGGREGATORS = ("A", "B")
#: close(): SIGTERM to every process at once, SIGKILL to those still running this long after
TERM_TIMEOUT_S = 5.0
FLEET_ID = "rig"

#: A prefix every rig's names start with: v2g<pid>x<k>..., so a rig left by a killed process is found.
_NAME = re.compile(r"^v2g(\d+)x\d")


class RigError(RuntimeError):
    """The rig cannot be set up or a fault cannot be made; the message says what failed."""


class Unsupported(RigError):
    """A fault this rig cannot make (loopback mode): the message is the reason, for a skip."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and out.returncode:
        raise RigError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out


def namespaces_available() -> tuple[bool, str]:
    """(True, "") if this process can make network namespaces, else (False, why not)."""
    if os.geteuid() != 0:
        return False, f"network namespaces need root (euid is {os.geteuid()})"
    if shutil.which("ip") is None:
        return False, "no `ip` on PATH (install iproute2)"
    probe = f"v2g{os.getpid()}x9probe"
    try:
        _run("ip", "netns", "add", probe)
    except RigError as exc:
        return False, f"`ip netns add` refused: {exc}"
    _run("ip", "netns", "del", probe, check=False)
    return True, ""


def sweep_stale() -> list[str]:
    """Remove namespaces and links left by rigs whose process is gone (a killed test run); returns their names."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    removed = []
    names = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", _run("ip", "-o", "link", check=False).stdout, re.M)]
    for name in names + links:
        m = _NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            kind = ("netns", "del", name) if name in names else ("link", "del", name)
            if _run("ip", *kind, check=False).returncode == 0:
                removed.append(name)
    return removed


@dataclasses.dataclass
class Node:
    """One host of the rig: its namespace (None on loopback), address and the host side of its veth."""

    name: str
    addr: str
    ns: str | None = None
    host_if: str | None = None
    cut: bool = False

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns) if self.ns else ()


@dataclasses.dataclass
class Proc:
    name: str
    node: Node
    popen: subprocess.Popen
    log: Path
    stopped: bool = False  # SIGSTOPped by the rig


@dataclasses.dataclass
class RigConfig:
    """What the rig runs: sizes, timing, the service and the frequency the meter shows."""

    gateways: int = 2
    vehicles: int = 40
    period_s: float = 0.05
    lease_ttl_s: int = 1
    poll_s: float = 0.02
    telemetry_interval_s: float = 0.1
    setpoint_ttl_s: float | None = None  # None: 3 periods (the aggregator's default)
    service: str = "dc"
    capacity_kw: float = 200.0
    f_hz: float = 49.6  # below the DC deadband: the fleet discharges, so power through a gap shows
    seed: int = 1
    mode: str = "auto"  # auto: namespaces when possible; netns: required; loopback: never


class Rig:
    """etcd, aggregators A and B, a meter and ``gateways`` gateways; see the module docstring.

    ``with Rig(workdir, RigConfig()) as rig:`` starts everything and tears everything down (processes,
    namespaces, the bridge) on exit, also on an exception; ``close()`` is registered with atexit too.
    """

    _count = 0

    def __init__(self, workdir, cfg: RigConfig | None = None):
        self.cfg = cfg or RigConfig()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        Rig._count += 1
        self.tag = f"v2g{os.getpid()}x{Rig._count % 10}"
        self.nodes: dict[str, Node] = {}
        self.procs: dict[str, Proc] = {}
        self.bridge: str | None = None
        self.etcd = None
        self.gateway_ids: list[str] = [f"gw{i + 1}" for i in range(self.cfg.gateways)]
        self.ports: dict[str, int] = {}
        self.reason = ""  # why loopback, when it is
        self._closed = False
        mode = self.cfg.mode
        if mode not in ("auto", "netns", "loopback"):
            raise RigError(f"mode={mode!r}: expected auto, netns or loopback")
        ok, why = namespaces_available() if mode != "loopback" else (False, "loopback asked for")
        if mode == "netns" and not ok:
            raise RigError(f"namespace mode asked for but unavailable: {why}")
        self.netns = ok
        self.reason = why

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Rig:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout_s: float = 60.0) -> Rig:
        """Network, etcd, meter, both aggregators (A first, so it leads), gateways; returns when A publishes."""
        atexit.register(self.close)
        sweep_stale()
        self._network()
        self._write_roster()
        self.start_etcd()
        self._start_meter()
        for name in AGGREGATORS:
            self._write_aggregator_config(name)
        self.start_aggregator("A")
        self.wait_leader(timeout_s, expect="A")
        self.start_aggregator("B")
        for agg in AGGREGATORS:
            self.start_tap(agg)
        for gw in self.gateway_ids:
            self.start_gateway(gw)
        self.wait_flowing(timeout_s)
        self.wait_warm("B", timeout_s)
        return self

    def close(self) -> None:
        """Every process killed (SIGCONT first), the namespaces and the bridge removed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # all asked at once (SIGCONT first: a SIGSTOPped one), then waited for together, then killed
        procrig.stop([proc.popen for proc in self.procs.values()], TERM_TIMEOUT_S)
        if self.etcd is not None:
            self.etcd.stop()
        if self.netns:
            for node in self.nodes.values():
                if node.ns:
                    _run("ip", "netns", "del", node.ns, check=False)
                if node.host_if:
                    _run("ip", "link", "del", node.host_if, check=False)
            if self.bridge:
                _run("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # ------------------------------------------------------------------------------ the network
    def _network(self) -> None:
        names = ["etcd", "meter", *AGGREGATORS, *self.gateway_ids]
        if not self.netns:
            for name in names:
                self.nodes[name] = Node(name, "127.0.0.1")
            ports = procrig.free_ports(3 * len(AGGREGATORS) + 2)
            for name in AGGREGATORS:
                for key in ("setpoints", "telemetry", "control"):
                    self.ports[f"{name}.{key}"] = ports.pop()
            self.ports["meter"], self.ports["inverter"] = ports.pop(), ports.pop()
            return
        subnet = self._subnet()
        self.bridge = f"{self.tag}b"
        _run("ip", "link", "add", "name", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{subnet}.254/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(names, start=1):
            node = Node(name, f"{subnet}.{i}", ns=f"{self.tag}-{name}", host_if=f"{self.tag}h{i}")
            self.nodes[name] = node
            inner = f"{self.tag}n{i}"
            _run("ip", "netns", "add", node.ns)
            _run("ip", "link", "add", node.host_if, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", node.ns)
            _run("ip", "-n", node.ns, "link", "set", inner, "name", "eth0")
            _run("ip", "-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _run("ip", "-n", node.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", node.ns, "link", "set", "lo", "up")
            _run("ip", "link", "set", node.host_if, "master", self.bridge, "up")
        for name in AGGREGATORS:
            self.ports.update({f"{name}.setpoints": SETPOINT_PORT, f"{name}.telemetry": TELEMETRY_PORT,
                               f"{name}.control": CONTROL_PORT})
        self.ports["meter"], self.ports["inverter"] = METER_PORT, INVERTER_PORT

    def _subnet(self) -> str:
        """10.231.X: the first X no address on this host uses (rigs of other processes may run alongside)."""
        used = _run("ip", "-4", "-o", "addr", check=False).stdout
        for k in range(256):
            x = (os.getpid() + k) % 250 + 1
            if f" 10.231.{x}." not in used:
                return f"10.231.{x}"
        raise RigError("no free 10.231.X.0/24 subnet for the rig's bridge")

    # ------------------------------------------------------------------------------ processes
    def spawn(self, name: str, node: str, argv: list[str]) -> Proc:
        """Run ``argv`` on ``node`` (in its namespace), output to <workdir>/<name>.log."""
        from v2grt.bench._common import child_env  # children import the v2grt this process imported

        n = self.nodes[node]
        log = self.dir / f"{name}.log"
        # SIGKILL with the rig's process: not even a killed test run leaves one behind
        popen = procrig.start([*n.prefix, *argv], log, env={**child_env(), "PYTHONUNBUFFERED": "1"},
                              die_with=signal.SIGKILL, append=True)
        proc = Proc(name, n, popen, log)
        self.procs[name] = proc
        return proc

    def endpoint(self, agg: str, key: str) -> str:
        return f"tcp://{self.nodes[agg].addr}:{self.ports[f'{agg}.{key}']}"

    def start_etcd(self) -> None:
        """Start etcd (again after ``stop_etcd``: same address, same data)."""
        from v2grt.testing import EtcdMember

        if self.etcd is None:
            node = self.nodes["etcd"]
            self.etcd = EtcdMember(self.dir / "etcd", host=node.addr, prefix=node.prefix,
                                   ports=ETCD_PORTS if self.netns else None)
        self.etcd.start()

    def stop_etcd(self) -> None:
        """kill -9 of etcd (its data stays: ``start_etcd`` restarts it)."""
        self.etcd.stop()

    def _start_meter(self) -> None:
        node = self.nodes["meter"]
        self.spawn("meter", "meter", [sys.executable, "-m", "v2grt.sim.sunspec", "--host", node.addr,
                                      "--meter-port", str(self.ports["meter"]),
                                      "--inverter-port", str(self.ports["inverter"]), "--f-hz", str(self.cfg.f_hz)])

    def _write_roster(self) -> None:
        from v2grt.fleet import Fleet
        from v2grt.roster import write_roster

        fleet = Fleet.random(self.cfg.vehicles, seed=self.cfg.seed, n_gateways=self.cfg.gateways, offline_fraction=0)
        self.roster = self.dir / "roster.csv"
        write_roster(fleet, self.roster)

    def _write_aggregator_config(self, name: str) -> Path:
        import yaml

        c = self.cfg
        other = next(a for a in AGGREGATORS if a != name)
        d = self.dir / name
        d.mkdir(exist_ok=True)
        data = {
            "fleet_id": FLEET_ID, "period_s": c.period_s, "budget_s": c.period_s, "state_dir": str(d / "state"),
            "realtime": {"mlockall": False, "gc_freeze": False},
            "meter": {"host": self.nodes["meter"].addr, "port": self.ports["meter"], "poll_interval_s": 0.02,
                      "timeout_s": 0.5, "stale_after_s": 2.0},
            "inverters": [],
            "bus": {"setpoints": self.endpoint(name, "setpoints"), "telemetry": self.endpoint(name, "telemetry"),
                    "control": self.endpoint(name, "control"), "setpoint_ttl_s": c.setpoint_ttl_s},
            "service": {"name": c.service, "capacity_kw": c.capacity_kw},
            "fleet": {"roster": str(self.roster)},
            "log": {"file": str(d / "engine.log")},
            "ha": {"etcd": [self.etcd.url], "lease_ttl_s": c.lease_ttl_s, "name": name, "poll_s": c.poll_s,
                   "peers": [self.endpoint(other, "control")]},
        }
        path = d / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_aggregator(self, name: str) -> Proc:
        """``v2grt run`` of aggregator ``name`` on its node (again after a kill: a new process, a standby)."""
        old = self.procs.get(name)
        if old is not None and old.popen.poll() is None:
            raise RigError(f"aggregator {name} is still running (pid {old.popen.pid})")
        d = self.dir / name
        return self.spawn(name, name, [sys.executable, "-m", "v2grt.cli", "run", "--config", str(d / "config.yaml"),
                                       "--allow-root", "--log-file", str(d / "engine.log")])

    def start_gateway(self, gw: str) -> Proc:
        argv = [sys.executable, "-m", "v2grt.harig", "gateway", "--roster", str(self.roster), "--gateway-id", gw,
                "--record", str(self.record_path(gw)), "--telemetry-interval-s", str(self.cfg.telemetry_interval_s)]
        for agg in AGGREGATORS:
            argv += ["--setpoints", self.endpoint(agg, "setpoints"), "--telemetry", self.endpoint(agg, "telemetry")]
        return self.spawn(f"gateway-{gw}", gw, argv)

    def record_path(self, gw: str) -> Path:
        return self.dir / f"{gw}.rec"

    def start_tap(self, agg: str) -> Proc:
        """A subscriber on ``agg``'s own node recording every setpoint frame it sends (unfenced): what a leader
        published, seen even while its node is cut off."""
        gw = self.gateway_ids[0]
        return self.spawn(f"tap-{agg}", agg, [sys.executable, "-m", "v2grt.harig", "tap", "--connect",
                                              self.endpoint(agg, "setpoints"), "--gateway-id", gw,
                                              "--record", str(self.tap_path(agg))])

    def tap_path(self, agg: str) -> Path:
        return self.dir / f"{agg}.tap"

    def taps(self) -> dict[str, np.ndarray]:
        """Per aggregator, the frames it sent as (receive monotonic ns, epoch, seq, send UTC ns) rows."""
        return {agg: read_record(self.tap_path(agg)).accepted for agg in AGGREGATORS}

    # ------------------------------------------------------------------------------ faults
    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to process ``name`` (kill -9: SIGKILL, waited for)."""
        proc = self.procs[name]
        proc.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.popen.wait(10)
        proc.stopped = sig == signal.SIGSTOP or (proc.stopped and sig != signal.SIGCONT)

    def cut(self, node: str) -> None:
        """Cut ``node`` off the network: its veth leaves the bridge; packets are dropped in silence both ways."""
        n = self._need_netns(node, "cutting a node off the network")
        _run("ip", "link", "set", n.host_if, "nomaster")
        n.cut = True

    def restore(self, node: str) -> None:
        n = self._need_netns(node, "restoring a node's network")
        _run("ip", "link", "set", n.host_if, "master", self.bridge)
        n.cut = False

    def _need_netns(self, node: str, what: str) -> Node:
        if not self.netns:
            raise Unsupported(f"{what} needs network namespaces; this rig runs on loopback: {self.reason}")
        return self.nodes[node]

    # ------------------------------------------------------------------------------ observing
    def leader(self) -> str | None:
        """The leader key's holder as etcd has it now (None: no leader, or etcd unreachable)."""
        from v2grt.etcd import EtcdClient, EtcdError
        from v2grt.ha import leader_key

        try:
            kv = EtcdClient([self.etcd.url], timeout_s=0.5).get(leader_key("/v2grt/fleets/", FLEET_ID))
        except EtcdError:
            return None
        return None if kv is None else kv.value

    def status(self, agg: str, timeout_ms: int = 1000) -> dict | None:
        """The aggregator's status reply over its control socket, or None (no answer in time)."""
        try:
            return self.control(agg, "status", timeout_ms=timeout_ms)
        except RigError:
            return None

    def control(self, agg: str, cmd: str, timeout_ms: int = 1000, **args) -> dict:
        """One control request to ``agg`` (as v2g-cli sends it); its result, or RigError naming the refusal."""
        import zmq

        from v2grt.io import bus

        client = bus.ControlClient(zmq.Context.instance(), self.endpoint(agg, "control"), timeout_ms=timeout_ms)
        try:
            reply = client.call(cmd, **args)
        except Exception as exc:
            raise RigError(f"{cmd} to aggregator {agg}: {type(exc).__name__}: {exc}") from None
        finally:
            client.close()
        if not reply.ok:
            raise RigError(f"{cmd} to aggregator {agg} refused: {reply.error_code}: {reply.error_message}")
        return reply.result

    def wait_leader(self, timeout_s: float = 30.0, expect: str | None = None, not_: str | None = None) -> str:
        from v2grt.testing import wait_until

        def ok():
            holder = self.leader()
            if holder is None or (expect and holder != expect) or (not_ and holder == not_):
                return None
            st = self.status(holder, timeout_ms=300)
            return holder if st and st.get("ha", {}).get("role") == "leader" else None

        return wait_until(ok, timeout_s, f"a leader{' ' + expect if expect else ''} (etcd {self.etcd.url})", 0.05)

    def records(self) -> dict[str, GatewayRecord]:
        return {gw: read_record(self.record_path(gw)) for gw in self.gateway_ids}

    def wait_flowing(self, timeout_s: float = 30.0, since_ns: int | None = None, epoch: int | None = None) -> None:
        """Until every gateway has accepted a frame (after ``since_ns``; of ``epoch`` if given)."""
        from v2grt.testing import wait_until

        since = since_ns or 0

        def ok():
            for rec in self.records().values():
                a = rec.accepted
                sel = a[a[:, 0] > since] if len(a) else a
                if epoch is not None and len(sel):
                    sel = sel[sel[:, 1] == epoch]
                if not len(sel):
                    return False
            return True

        wait_until(ok, timeout_s, "every gateway to accept setpoints", 0.05)

    def wait_warm(self, agg: str, timeout_s: float = 30.0) -> None:
        """Until ``agg`` answers its status and has heard every vehicle (a warm standby)."""
        from v2grt.testing import wait_until

        def ok():
            st = self.status(agg, timeout_ms=300)
            return st is not None and st.get("never_heard") == 0

        wait_until(ok, timeout_s, f"aggregator {agg} to answer and hear every vehicle", 0.1)

    def settle(self, timeout_s: float = 60.0) -> str:
        """Undo every fault (restore cut nodes, SIGCONT, etcd back, dead aggregators restarted), then wait for a
        leader, a warm standby and setpoints at every gateway; returns the leader's name."""
        for node in self.nodes.values():
            if node.cut:
                self.restore(node.name)
        for proc in self.procs.values():
            if proc.stopped:
                self.signal(proc.name, signal.SIGCONT)
        if self.etcd.proc is None or self.etcd.proc.poll() is not None:
            self.start_etcd()
        for agg in AGGREGATORS:
            if self.procs[agg].popen.poll() is not None:
                self.start_aggregator(agg)
        leader = self.wait_leader(timeout_s)
        for agg in AGGREGATORS:
            if agg != leader:
                self.wait_warm(agg, timeout_s)
        self.wait_candidates(leader, timeout_s)
        self.wait_flowing(timeout_s, since_ns=time.monotonic_ns())
        return leader

    def wait_candidates(self, leader: str, timeout_s: float = 30.0) -> None:
        """Until the leader's status lists every aggregator as a candidate in etcd (a standby that just resigned
        registers again after a hold-off; a handover asked before that is refused)."""
        from v2grt.testing import wait_until

        def ok():
            st = self.status(leader, timeout_ms=300)
            cands = (st or {}).get("ha", {}).get("candidates")
            return st is not None and (cands is None or set(AGGREGATORS) <= set(cands))

        wait_until(ok, timeout_s, f"every aggregator registered as a candidate (asked {leader})", 0.05)

    def other(self, agg: str) -> str:
        return next(a for a in AGGREGATORS if a != agg)

    def wait_epoch_past(self, epoch: int, timeout_s: float, since_ns: int = 0) -> int:
        """Until every gateway accepted a frame of an epoch above ``epoch`` (after ``since_ns``); returns it."""
        from v2grt.testing import wait_until

        def ok():
            newest = []
            for rec in self.records().values():
                a = rec.accepted
                a = a[(a[:, 0] > since_ns) & (a[:, 1] > epoch)] if len(a) else a
                if not len(a):
                    return None
                newest.append(int(a[-1, 1]))
            return max(newest)

        return wait_until(ok, timeout_s, f"every gateway to accept an epoch above {epoch}", 0.02)

    def epoch_at_gateways(self) -> int:
        """The newest epoch any gateway accepted."""
        return max(int(r.accepted[-1, 1]) for r in self.records().values() if len(r.accepted))


# ------------------------------------------------------------------------------------------ faults
# Each makes one fault on a settled rig (Rig.settle), waits for the fleet to come back and returns the
# measures of measure() plus its own; the rig is left to settle() again. Times: monotonic, s.

def _now() -> int:
    return time.monotonic_ns()


def _tail_s(rig: Rig) -> float:
    return max(0.3, 6 * rig.cfg.period_s)  # frames of the new leader after the gap, so the gap is closed


def fault_kill9(rig: Rig) -> dict:
    """kill -9 of the leader: the standby takes over once the lease expired at etcd."""
    old, epoch = rig.wait_leader(), rig.epoch_at_gateways()
    t0 = _now()
    rig.signal(old, signal.SIGKILL)
    new_epoch = rig.wait_epoch_past(epoch, 10 * rig.cfg.lease_ttl_s + 10, t0)
    time.sleep(_tail_s(rig))
    t1 = _now()
    return {"fault": "kill9", "old": old, "new": rig.leader(), "old_epoch": epoch, "new_epoch": new_epoch,
            **measure(rig.records(), t0, t1, rig.cfg.period_s), "published": published(rig.taps(), t0 - NS, t1)}


def fault_sigstop(rig: Rig, hold_s: float | None = None) -> dict:
    """SIGSTOP of the leader past its lease, the standby takes over, then SIGCONT: the woken process must
    send nothing a gateway accepts (``accepted_after_wake``) and, self-fenced, nothing at all (``sent_after_wake``)."""
    hold_s = hold_s if hold_s is not None else rig.cfg.lease_ttl_s + 1.0
    old, epoch = rig.wait_leader(), rig.epoch_at_gateways()
    t0 = _now()
    rig.signal(old, signal.SIGSTOP)
    new_epoch = rig.wait_epoch_past(epoch, 10 * rig.cfg.lease_ttl_s + 10, t0)
    time.sleep(max(0.0, hold_s - (_now() - t0) / NS))
    t_cont, t_cont_utc = _now(), time.time_ns()
    rig.signal(old, signal.SIGCONT)
    time.sleep(1.0)  # the woken process runs its cycles (and its elector learns it lost)
    t1 = _now()
    recs = rig.records()
    late = sum(int(((r.accepted[:, 0] > t_cont) & (r.accepted[:, 1] == epoch)).sum()) for r in recs.values()
               if len(r.accepted))
    tap = rig.taps()[old]
    # stamped after the wake = published after it (a frame queued before the stop may leave after it, stamped before)
    sent = int(((tap[:, 3] > t_cont_utc) & (tap[:, 1] == epoch)).sum()) if len(tap) else 0
    return {"fault": "sigstop", "old": old, "new": rig.leader(), "old_epoch": epoch, "new_epoch": new_epoch,
            "hold_s": hold_s, **measure(recs, t0, t1, rig.cfg.period_s), "accepted_after_wake": late,
            "sent_after_wake": sent, "published": published(rig.taps(), t0 - NS, t1)}


def fault_cut_leader(rig: Rig, hold_s: float | None = None) -> dict:
    """The leader's node cut off the network: it stops publishing by itself (its tap, on its own node, shows
    when: ``stopped_after_s``), the standby takes over; restored after ``hold_s``, it rejoins as a standby."""
    hold_s = hold_s if hold_s is not None else rig.cfg.lease_ttl_s + 1.5
    old, epoch = rig.wait_leader(), rig.epoch_at_gateways()
    t0 = _now()
    rig.cut(old)
    new_epoch = rig.wait_epoch_past(epoch, 10 * rig.cfg.lease_ttl_s + 10, t0)
    time.sleep(max(0.0, hold_s - (_now() - t0) / NS))
    rig.restore(old)
    time.sleep(_tail_s(rig))
    t1 = _now()
    tap = rig.taps()[old]
    mine = tap[(tap[:, 0] >= t0) & (tap[:, 1] == epoch)] if len(tap) else tap
    stopped = (int(mine[-1, 0]) - t0) / NS if len(mine) else 0.0
    return {"fault": "cut_leader", "old": old, "new": rig.leader(), "old_epoch": epoch, "new_epoch": new_epoch,
            "hold_s": hold_s, "stopped_after_s": stopped, **measure(rig.records(), t0, t1, rig.cfg.period_s),
            "published": published(rig.taps(), t0 - NS, t1)}


def fault_etcd_restart(rig: Rig, down_s: float | None = None) -> dict:
    """etcd killed, restarted ``down_s`` later with its data: the leader stops within its lease
    (``stopped_after_s``), nobody publishes while etcd is away (``frames_while_down``), one leads after."""
    down_s = down_s if down_s is not None else rig.cfg.lease_ttl_s + 1.0
    old, epoch = rig.wait_leader(), rig.epoch_at_gateways()
    t0 = _now()
    rig.stop_etcd()
    time.sleep(down_s)
    t_up = _now()
    rig.start_etcd()
    new = rig.wait_leader(30.0)
    rig.wait_flowing(30.0, since_ns=_now())
    time.sleep(_tail_s(rig))
    t1 = _now()
    recs = rig.records()
    before_up = [r.accepted[(r.accepted[:, 0] >= t0) & (r.accepted[:, 0] < t_up)] for r in recs.values()
                 if len(r.accepted)]
    last = max((int(a[-1, 0]) for a in before_up if len(a)), default=t0)
    grace = t0 + int(rig.cfg.lease_ttl_s * NS)
    while_down = sum(int((a[:, 0] > grace).sum()) for a in before_up)
    return {"fault": "etcd_restart", "old": old, "new": new, "old_epoch": epoch, "new_epoch": rig.epoch_at_gateways(),
            "down_s": down_s, "stopped_after_s": (last - t0) / NS, "frames_while_down": while_down,
            **measure(recs, t0, t1, rig.cfg.period_s), "published": published(rig.taps(), t0 - NS, t1)}


def fault_cut_gateway(rig: Rig, gw: str | None = None, hold_s: float = 1.0) -> dict:
    """A gateway's node cut off for ``hold_s`` and restored: its setpoints expire (0 kW) and resume
    (``recovered_after_s`` from the restore); the other gateways and the leader are untouched."""
    gw = gw or rig.gateway_ids[0]
    old, epoch = rig.wait_leader(), rig.epoch_at_gateways()
    t0 = _now()
    rig.cut(gw)
    time.sleep(hold_s)
    t_r = _now()
    rig.restore(gw)
    from v2grt.testing import wait_until

    def back():
        a = read_record(rig.record_path(gw)).accepted
        a = a[a[:, 0] > t_r] if len(a) else a
        return int(a[0, 0]) if len(a) else None

    t_back = wait_until(back, 30.0, f"gateway {gw} to accept setpoints again", 0.02)
    time.sleep(_tail_s(rig))
    t1 = _now()
    recs = rig.records()
    m = measure(recs, t0, t1, rig.cfg.period_s)
    others = {g: v for g, v in m["gap_s"].items() if g != gw}
    return {"fault": "cut_gateway", "gateway": gw, "old": old, "new": rig.leader(), "old_epoch": epoch,
            "new_epoch": rig.epoch_at_gateways(), "hold_s": hold_s, "recovered_after_s": (t_back - t_r) / NS,
            "gap_others_max_s": max(others.values()) if others else None, **m,
            "power_cut": fleet_power({gw: recs[gw]}, t0, t1), "published": published(rig.taps(), t0 - NS, t1)}


def fault_handover(rig: Rig) -> dict:
    """A planned handover (what `v2g-cli --handover` asks the leader): the standby leads from the cycle after the
    leader's last publish; goal: a gap at the gateways of at most one period (``gap_periods``)."""
    old, epoch = rig.wait_leader(), rig.epoch_at_gateways()
    t0 = _now()
    asked = rig.control(old, "handover")
    new_epoch = rig.wait_epoch_past(epoch, 10.0, t0)
    time.sleep(_tail_s(rig))
    t1 = _now()
    m = measure(rig.records(), t0, t1, rig.cfg.period_s)
    return {"fault": "handover", "old": old, "new": rig.leader(), "to": asked.get("to"), "old_epoch": epoch,
            "new_epoch": new_epoch, **m, "gap_periods": (m["switch_max_s"] or m["gap_max_s"]) / rig.cfg.period_s,
            "published": published(rig.taps(), t0 - NS, t1)}


FAULTS = {"handover": fault_handover, "kill9": fault_kill9, "sigstop": fault_sigstop, "cut_leader": fault_cut_leader,
          "etcd_restart": fault_etcd_restart, "cut_gateway": fault_cut_gateway}
#: The faults that need network namespaces (cutting a node off).
NETNS_FAULTS = ("cut_leader", "cut_gateway")


# ------------------------------------------------------------------------------------------ records
@dataclasses.dataclass
class GatewayRecord:
    """What one rig gateway did: ``accepted`` rows (receive monotonic ns, epoch, seq, send UTC ns) and
    ``power`` rows (monotonic ns, sum of its vehicles' delivered kW), both in time order."""

    accepted: np.ndarray
    power: np.ndarray


def read_record(path) -> GatewayRecord:
    """Parse a gateway's record file (lines ``a T EP SEQ TNS`` and ``p T KW``); a half-written last line is skipped."""
    acc, pw = [], []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        text = ""
    lines = text.split("\n")[:-1]  # a last line without its newline is still being written: skipped
    for line in lines:
        f = line.split()
        try:
            if f[0] == "a" and len(f) == 5:
                acc.append((int(f[1]), int(f[2]), int(f[3]), int(f[4])))
            elif f[0] == "p" and len(f) == 3:
                pw.append((int(f[1]), float(f[2])))
        except (ValueError, IndexError):
            continue
    return GatewayRecord(np.array(acc, dtype=np.int64).reshape(-1, 4), np.array(pw, dtype=float).reshape(-1, 2))


def measure(records: dict[str, GatewayRecord], t0_ns: int, t1_ns: int, period_s: float) -> dict:
    """The measures of one fault over the window [t0_ns, t1_ns] (monotonic), from the gateways' records.

    - ``gap_s``: per gateway, the longest time between two setpoint messages it accepted in the window
      (across a failover: the old leader's last frame to the new leader's first); ``gap_max_s`` over all.
    - ``switch_s``: per gateway that saw the epoch change, the time from the last frame of one epoch to the
      first of the next (a planned handover's gap); ``steady_p99_s``: the p99 time between frames in the
      second before ``t0_ns`` (the period and its jitter, to read a switch against).
    - ``double_leader``: frames accepted (by any gateway) of an epoch, sent at or after the first frame of a
      newer epoch was sent (two leaders publishing at once, as the fleet saw it); must be 0.
    - ``stale_after_newer``: frames a gateway accepted of an older epoch after one of a newer (the fence's job).
    - ``epochs``: the epochs accepted in the window, in order.
    - power: the fleet's delivered kW (sum of the gateways') ``p_before_kw`` (mean over the second before
      ``t0_ns``), ``p_min_kw`` in the window and ``p_zero_s``, how long it sat at 0 kW there.
    """
    gaps, switches, steady, frames = {}, {}, [], []
    stale = 0
    for gw, rec in records.items():
        a = rec.accepted
        w = a[(a[:, 0] >= t0_ns - int(2 * period_s * NS)) & (a[:, 0] <= t1_ns)] if len(a) else a
        if len(w) >= 2:
            gaps[gw] = float(np.diff(w[:, 0]).max()) / NS
            change = np.flatnonzero(np.diff(w[:, 1]) != 0)
            if len(change):
                switches[gw] = float((w[change + 1, 0] - w[change, 0]).max()) / NS
        else:
            gaps[gw] = (t1_ns - t0_ns) / NS  # nothing (or one frame) in the window: the whole window is a gap
        before = a[(a[:, 0] >= t0_ns - NS) & (a[:, 0] < t0_ns), 0] if len(a) else a
        if len(before) >= 2:
            steady.append(np.diff(before))
        if len(w):
            stale += int((w[:, 1] < np.maximum.accumulate(w[:, 1])).sum())
            frames.append(w)
    allf = np.concatenate(frames) if frames else np.zeros((0, 4), np.int64)
    double = 0
    epochs = sorted(set(allf[:, 1].tolist()))
    for ep in epochs[:-1]:
        first_newer = allf[allf[:, 1] > ep, 3].min()
        double += int((allf[allf[:, 1] == ep, 3] >= first_newer).sum())
    order = allf[np.argsort(allf[:, 0], kind="stable"), 1] if len(allf) else allf[:, 1]
    seen: list[int] = []
    for ep in order.tolist():
        if not seen or seen[-1] != ep:
            seen.append(ep)
    steady_ns = np.concatenate(steady) if steady else np.zeros(0)
    out = {"gap_s": gaps, "gap_max_s": max(gaps.values()) if gaps else None,
           "switch_s": switches, "switch_max_s": max(switches.values()) if switches else None,
           "steady_p99_s": float(np.percentile(steady_ns, 99)) / NS if len(steady_ns) else None,
           "double_leader": double, "stale_after_newer": stale, "epochs": seen}
    out.update(fleet_power(records, t0_ns, t1_ns))
    return out


def published(taps: dict[str, np.ndarray], t0_ns: int, t1_ns: int) -> dict:
    """From the aggregators' taps, per epoch sent in [t0_ns, t1_ns] (receive time): who sent it and the send
    stamps (UTC ns) of its first and last frame; ``overlap_s``: the largest time an older epoch's last frame
    was sent after a newer epoch's first (> 0: two leaders published at once; must be < 0)."""
    spans: dict[int, dict] = {}
    for agg, rows in taps.items():
        w = rows[(rows[:, 0] >= t0_ns) & (rows[:, 0] <= t1_ns)] if len(rows) else rows
        for ep in sorted(set(w[:, 1].tolist())):
            t = w[w[:, 1] == ep, 3]
            spans[ep] = {"by": agg, "first_ns": int(t.min()), "last_ns": int(t.max()), "frames": int(len(t))}
    eps = sorted(spans)
    overlaps = [(spans[a]["last_ns"] - spans[b]["first_ns"]) / NS for a, b in itertools.pairwise(eps)]
    return {"epochs": spans, "overlap_s": max(overlaps) if overlaps else None}


def fleet_power(records: dict[str, GatewayRecord], t0_ns: int, t1_ns: int, step_s: float = 0.01) -> dict:
    """The fleet's delivered kW as a step function per gateway summed on a ``step_s`` grid (see measure)."""
    grid = np.arange(t0_ns - NS, t1_ns, int(step_s * NS))
    total = np.zeros(len(grid))
    for rec in records.values():
        p = rec.power
        if not len(p):
            continue
        idx = np.searchsorted(p[:, 0], grid, side="right") - 1
        total += np.where(idx >= 0, p[np.maximum(idx, 0), 1], 0.0)
    before = total[grid < t0_ns]
    during = total[grid >= t0_ns]
    return {"p_before_kw": float(before.mean()) if len(before) else None,
            "p_min_kw": float(during.min()) if len(during) else None,
            "p_zero_s": float((np.abs(during) < 1e-6).sum() * step_s)}


# ------------------------------------------------------------------------------------------ the gateway
class _RecordingCore:
    """Mixin over GatewayCore: appends every accepted message and every applied power to a record file."""

    def _open_record(self, path) -> None:
        self._rec = open(path, "a", buffering=1 << 16)
        self._rec_flushed = time.monotonic_ns()

    def _accept(self, msg, now_ns: int) -> None:
        super()._accept(msg, now_ns)
        self._rec.write(f"a {now_ns} {msg.ep} {msg.seq} {msg.t_ns}\n")

    def step(self, timeout_ms: int = 0) -> None:
        super().step(timeout_ms)
        now = time.monotonic_ns()
        self._rec.write(f"p {now} {self.vehicles.delivered_kw:.3f}\n")
        if now - self._rec_flushed > 50_000_000:  # readers see it within ~50 ms
            self._rec.flush()
            self._rec_flushed = now


def tap_main(argv: list[str]) -> int:
    """``python -m v2grt.harig tap``: record every setpoint frame of one topic from one aggregator (no fence)."""
    import argparse
    import threading

    import zmq

    from v2grt.io import wire

    ap = argparse.ArgumentParser(prog="python -m v2grt.harig tap")
    ap.add_argument("--connect", required=True)
    ap.add_argument("--gateway-id", required=True)
    ap.add_argument("--record", required=True)
    args = ap.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.SUBSCRIBE, wire.setpoint_topic(args.gateway_id))
    sock.connect(args.connect)
    flushed = time.monotonic_ns()
    with open(args.record, "a", buffering=1 << 16) as out:
        while not stop.is_set():
            if sock.poll(50):
                frame = sock.recv()
                now = time.monotonic_ns()
                try:
                    m = wire.decode_setpoints(frame)
                except wire.WireError:
                    continue
                out.write(f"a {now} {m.ep} {m.seq} {m.t_ns}\n")
            if time.monotonic_ns() - flushed > 50_000_000:
                out.flush()
                flushed = time.monotonic_ns()
    sock.close()
    ctx.term()
    return 0


def gateway_main(argv: list[str]) -> int:
    """``python -m v2grt.harig gateway``: a sim gateway connected to every aggregator, recording (see module)."""
    import argparse
    import threading

    import zmq

    from v2grt.events import EventLog, setup_logging
    from v2grt.fleet import Fleet
    from v2grt.gateway.core import GatewayCore
    from v2grt.gateway.sim import SimVehicles, gateway_fleet

    ap = argparse.ArgumentParser(prog="python -m v2grt.harig gateway")
    ap.add_argument("--roster", required=True)
    ap.add_argument("--gateway-id", required=True)
    ap.add_argument("--setpoints", action="append", required=True, help="every aggregator's setpoint PUB")
    ap.add_argument("--telemetry", action="append", required=True, help="every aggregator's telemetry PULL")
    ap.add_argument("--record", required=True)
    ap.add_argument("--telemetry-interval-s", type=float, default=0.1)
    args = ap.parse_args(argv)
    setup_logging(None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet = gateway_fleet(Fleet.from_csv(args.roster), args.gateway_id)
    ctx = zmq.Context()

    class Vehicles(SimVehicles):
        delivered_kw = 0.0

        def apply(self, p_kw, now_ns):
            super().apply(p_kw, now_ns)
            self.delivered_kw = float(self.state.p_kw.sum())

    class Core(_RecordingCore, GatewayCore):
        pass

    vehicles = Vehicles(fleet, gateway_id=args.gateway_id, seed=1, unreachable_fraction=0.0, low_soh_fraction=0.0,
                        hot_fraction=0.0, unplug_rate_per_h=0.0, plug_rate_per_h=0.0, ctx=ctx,
                        events=EventLog(interval_s=60.0))
    # every aggregator of the fleet: setpoints from all behind one fence, each telemetry batch to all (ha-warm)
    core = Core(ctx, args.gateway_id, vehicles, setpoints=args.setpoints, telemetry=args.telemetry,
                telemetry_interval_s=args.telemetry_interval_s)
    core._open_record(args.record)
    try:
        core.run(stop)
    finally:
        core._rec.close()
        vehicles.close()
        ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        return gateway_main(argv[1:])
    if argv[:1] == ["tap"]:
        return tap_main(argv[1:])
    print("usage: python -m v2grt.harig gateway|tap ... (internal: the rig's gateways and taps)", file=sys.stderr)
    return 2


__all__ = ["FAULTS", "NETNS_FAULTS", "GatewayRecord", "Rig", "RigConfig", "RigError", "Unsupported", "measure",
           "namespaces_available", "published", "read_record", "sweep_stale"]

if __name__ == "__main__":
    sys.exit(main())
