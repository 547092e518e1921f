"""Small helpers for tests and benchmarks: fleets built directly from arrays, a waiting loop, a log
line collector and a small roster file."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from v2grt.fleet import COLUMNS, Fleet
from v2grt.procrig import free_ports  # noqa: F401  (the rigs' helper; tests take it from here too)


def fleet_from_arrays(n_sites: int = 1, **arrays) -> Fleet:
    """A Fleet whose columns are the given arrays (all of one length n); others take their defaults.

    Accepts the roster columns (soc, capacity_kwh, ...) and the state columns (site, fault,
    last_setpoint_kw, last_telemetry_ns, active, online), plus site_export_kw / site_import_kw /
    site_fault of length n_sites. Values are stored as given, unvalidated: this is how tests feed
    the kernel the NaNs and negative capacities a broken gateway could write.
    """
    site_arrays = {k: arrays.pop(k) for k in ("site_export_kw", "site_import_kw", "site_fault") if k in arrays}
    n = len(next(iter(arrays.values()))) if arrays else 0
    fleet = Fleet(capacity=max(n, 1), site_capacity=max(n_sites, 1))
    for s in range(n_sites):
        fleet.site_index(f"site{s + 1}")
    fleet.gateway_index("gw1")
    for col in COLUMNS:
        getattr(fleet, col.name)[:n] = col.default if col.default is not None else 0.0
    fleet.active[:n] = 1
    for name, values in arrays.items():
        getattr(fleet, name)[:n] = values
    for name, values in site_arrays.items():
        getattr(fleet, name)[:n_sites] = values
    width = max(2, len(str(n)))
    fleet.node_ids[:n] = [f"EV_NODE_{i + 1:0{width}d}" for i in range(n)]
    fleet.row_of = {nid: i for i, nid in enumerate(fleet.node_ids[:n])}
    fleet.n_rows = n
    return fleet


def uniform_fleet(n: int, *, soc: float = 0.6, p_kw: float = 11.0, capacity_kwh: float = 60.0) -> Fleet:
    """n identical vehicles on one site: handy where a test wants to reason about totals by hand."""
    return fleet_from_arrays(
        soc=np.full(n, soc), capacity_kwh=np.full(n, capacity_kwh), p_dis_max_kw=np.full(n, p_kw),
        p_chg_max_kw=np.full(n, p_kw),
    )


def wait_until(pred, timeout_s: float = 5.0, what: str = "condition", step_s: float = 0.005):
    """Poll pred() until it returns something truthy and return that; AssertionError naming `what`
    after timeout_s (tests on real sockets and processes wait on events, not on fixed sleeps)."""
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def try_bind(sock, endpoint: str) -> bool:
    """Bind a ZeroMQ socket to ``endpoint``; False if libzmq refuses (e.g. the port is taken)."""
    import zmq

    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        return False
    return True


def steal_port_after_unbind(owner, thief):
    """Make the next unbind of a bus socket owner (v2grt.io.bus) let ``thief`` bind its port in the gap, as
    another process could between a rebind's unbind and bind; returns the original unbind."""
    unbind, endpoint = owner.sock.unbind, owner.endpoint

    def unbind_and_steal(addr):
        unbind(addr)
        wait_until(lambda: try_bind(thief, endpoint), timeout_s=2.0, what=f"the thief to take {endpoint}")

    owner.sock.unbind = unbind_and_steal
    return unbind


class LogLines(logging.Handler):
    """Collects the messages of the records it handles (engine.log lines of an EventLog, in tests)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def write_ten_vehicle_roster(path) -> Path:
    """A roster CSV of ten plugged-in vehicles, eight on gw1 and two on gw2, all on site1: full enough
    to discharge (SoC 0.7), not hot, not worn. Returns the path."""
    from v2grt.roster import write_roster

    fleet = Fleet(capacity=16)
    for i in range(10):
        fleet.add(f"EV_{i:02d}", "gw1" if i < 8 else "gw2", "site1", soc=0.7, soh=0.95, capacity_kwh=60.0,
                  p_dis_max_kw=11.0, p_chg_max_kw=11.0, temp_c=22.0, online=1)
    write_roster(fleet, path)
    return Path(path)


def write_test_pki(directory) -> dict[str, Path]:
    """A CA and two certificates it signed, for 127.0.0.1: a server's and a client's (PEM; keys mode 0600), in
    ``directory``, for TLS tests (etcd with ``--client-cert-auth``). Keys of the result: ``ca``, ``server_cert``,
    ``server_key``, ``client_cert``, ``client_key``. Needs ``cryptography`` (the test extra)."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Path] = {}

    def write_key(name: str, key) -> None:
        path = d / f"{name}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        os.chmod(path, 0o600)
        out[f"{name}_key"] = path

    def build(subject: str, issuer_name, issuer_key, key, *, ca: bool, usage=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), False)
            b = b.add_extension(x509.ExtendedKeyUsage(usage), False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "v2grt-test-ca")])
    ca_cert = build("v2grt-test-ca", ca_name, ca_key, ca_key, ca=True)
    out["ca"] = d / "ca.pem"
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    # etcd 3.4's JSON gateway dials etcd's own gRPC port with the server certificate as a client certificate when
    # --client-cert-auth is on, so the server's must allow client use too (else every request: 503 "connection closed")
    for name, usage in (("server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        ("client", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(f"v2grt-test-{name}", ca_name, ca_key, key, ca=False, usage=usage)
        out[f"{name}_cert"] = d / f"{name}.pem"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(name, key)
    return out


class EtcdMember:
    """A single-member etcd (Debian's etcd-server) on loopback: ephemeral ports, its own data dir; for HA tests.

    ``heartbeat_ms`` 50 and ``election_ms`` 500 let etcd grant a 1 s lease as asked (with its defaults the
    floor is 2 s: docs/ha.md). Raises RuntimeError naming the fix when the ``etcd`` binary is missing:
    HA tests fail rather than skip (CI installs etcd-server, .ci/run).
    """

    def __init__(self, data_dir, *, heartbeat_ms: int = 50, election_ms: int = 500, tls: dict | None = None,
                 host: str = "127.0.0.1", ports: tuple[int, int] | None = None, prefix: tuple[str, ...] = ()):
        import shutil

        self.binary = shutil.which("etcd")
        if self.binary is None:
            raise RuntimeError("etcd is not installed (no `etcd` on PATH): the HA tests need a real etcd member; "
                               "install it with `apt-get install -y etcd-server` (what .ci/run does)")
        self.data_dir = str(data_dir)
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        #: write_test_pki's files: clients over https only, with a certificate signed by its CA (--client-cert-auth)
        self.tls = tls
        # host: the address it listens on; ports: (client, peer), fixed, else free loopback ports picked at the
        # first start and kept, so a restart (stop, start) comes back at the same URL with the same data.
        # prefix: a command prefix, e.g. ("ip", "netns", "exec", NS) to run it in a network namespace (v2grt.harig)
        self.host, self.ports, self.prefix = host, ports, tuple(prefix)
        self.proc = None
        self.url = ""

    def start(self, timeout_s: float = 20.0) -> EtcdMember:
        import socket
        import subprocess

        for _attempt in range(3):  # a free port picked here may be taken before etcd binds it: try again
            ports = self.ports
            if ports is None:
                picked = []
                for _ in range(2):
                    with socket.socket() as s:
                        s.bind((self.host, 0))
                        picked.append(s.getsockname()[1])
                ports = (picked[0], picked[1])
            client = f"{'https' if self.tls else 'http'}://{self.host}:{ports[0]}"
            peer = f"http://{self.host}:{ports[1]}"
            tls_args = [] if not self.tls else [
                "--cert-file", str(self.tls["server_cert"]), "--key-file", str(self.tls["server_key"]),
                "--trusted-ca-file", str(self.tls["ca"]), "--client-cert-auth"]
            self.proc = subprocess.Popen(
                [*self.prefix, self.binary, "--name", "v2grt-test", "--data-dir", self.data_dir,
                 "--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer,
                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"v2grt-test={peer}",
                 "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
                 *tls_args], stdout=subprocess.DEVNULL, stderr=open(f"{self.data_dir}.log", "ab"))
            self.url = client
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.healthy():
                    self.ports = ports
                    return self
                time.sleep(0.05)
            self.stop()
            if self.ports is not None:
                break  # fixed ports: picking again would not help
        raise RuntimeError(f"etcd did not become healthy at {self.url} within {timeout_s} s "
                           f"(log: {self.data_dir}.log)")

    def healthy(self) -> bool:
        import http.client
        import urllib.parse

        u = urllib.parse.urlsplit(self.url)
        try:
            if self.tls:
                from v2grt.etcd import tls_context

                context = tls_context(str(self.tls["ca"]), str(self.tls["client_cert"]), str(self.tls["client_key"]))
                conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=0.5, context=context)
            else:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=0.5)
            conn.request("GET", "/health")
            ok = b'"true"' in conn.getresponse().read()
            conn.close()
            return ok
        except OSError:
            return False

    def pause(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def short_ids(n: int) -> bytes:
    """An ids blob of ``n`` distinct 1-4 character ids (base 62), NUL-joined: the most ids a 4 MiB frame can
    carry (hostile-input tests and `v2grt bench ingest`)."""
    digits = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for i in range(n):
        s = bytearray()
        while True:
            s.append(digits[i % 62])
            i //= 62
            if not i:
                break
        out.append(bytes(s))
    return b"\x00".join(out)


def self_signed_cert(directory, host: str = "127.0.0.1", common_name: str = "v2grt-test-csms") -> tuple[Path, Path]:
    """A self-signed EC certificate for ``host`` (an IP address; its own CA) valid one day, as PEM files cert.pem
    and key.pem in ``directory``, the key created with mode 0600 (never readable by others, not even for a
    moment). For the OCPP gateway's TLS in tests, `v2grt bench e2e --protocol ocpp` and `v2grt demo`; needs
    ``cryptography``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path
