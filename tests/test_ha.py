"""High availability against a real etcd member (v2grt.etcd, v2grt.ha, the aggregator's `ha` section).

Every test starts its own single-member etcd on loopback (v2grt.testing.EtcdMember, 1 s leases) and
fails, not skips, when etcd is missing. A leader is cut off from etcd by a TCP proxy the test owns
(CutProxy), so its lease really expires at etcd while the standby still reaches it.
"""

from __future__ import annotations

import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from v2grt.aggregator import Aggregator
from v2grt.config import ConfigError, config_from_dict
from v2grt.etcd import EtcdClient, EtcdError
from v2grt.fleet import Fleet
from v2grt.ha import Elector, leader_key
from v2grt.io import bus, wire
from v2grt.leadership import LEADER, Election, LeaderView
from v2grt.testing import EtcdMember, wait_until

TTL_S = 1
MARGIN_S = 0.1
CLOCK_ERROR = 0.01
KEY = leader_key("/v2grt/fleets/", "test")


@pytest.fixture
def etcd(tmp_path):
    with EtcdMember(tmp_path / "etcd") as member:
        yield member


class CutProxy(threading.Thread):
    """A TCP forwarder to ``target`` on an ephemeral loopback port; ``cut()`` black-holes it (a partition:
    connections are accepted, nothing is forwarded, so clients time out), ``heal()`` restores it."""

    def __init__(self, target_url: str):
        super().__init__(daemon=True)
        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut_off = threading.Event()

    def cut(self) -> None:
        self.cut_off.set()

    def heal(self) -> None:
        self.cut_off.clear()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=1.0)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.cut_off.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


class FaultyMember:
    """A loopback HTTP server standing in for one etcd member: answers every POST with ``status`` and ``body``
    (a partitioned member's 503, a malformed 200), or, once ``forward_to`` is set, relays it to a real member."""

    def __init__(self, status: int = 503, body: bytes = b'{"error":"etcdserver: no leader","code":14,'
                                                          b'"message":"etcdserver: no leader"}'):
        self.status, self.body, self.forward_to = status, body, ""
        self.requests = 0
        member = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                request = self.rfile.read(int(self.headers["Content-Length"]))
                member.requests += 1
                status, body = member.status, member.body
                if member.forward_to:
                    host, port = member.forward_to.removeprefix("http://").split(":")
                    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
                    conn.request("POST", self.path, body=request, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    status, body = resp.status, resp.read()
                    conn.close()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def candidate(url: str, name: str, events=None) -> Elector:
    election = Election(TTL_S, clock_error=CLOCK_ERROR, margin_s=MARGIN_S, poll_s=0.02)
    return Elector(EtcdClient([url], timeout_s=TTL_S / 4), KEY, name, election, events=events)


class Watch(threading.Thread):
    """Samples every elector's may_publish every ms: first and last instant each one could publish."""

    def __init__(self, electors: list[Elector]):
        super().__init__(daemon=True)
        self.electors = electors
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.both = 0  # samples where two could publish at once
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            now = time.monotonic_ns()
            publishing = [e.name for e in self.electors if e.view.may_publish(now)]
            self.both += len(publishing) > 1
            for name in publishing:
                self.first.setdefault(name, now)
                self.last[name] = now
            time.sleep(0.001)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def leader_of(electors: list[Elector]) -> Elector:
    wait_until(lambda: any(e.view.may_publish(time.monotonic_ns()) for e in electors), 10.0, "a leader")
    return next(e for e in electors if e.view.role == LEADER)


# ------------------------------------------------------------------------------------------- etcd client
def test_the_etcd_client_grants_renews_creates_once_and_revokes(etcd):
    """Against etcd 3.4's JSON gateway: a 1 s lease, a keep-alive, create-if-absent once, revoke deletes the key."""
    c = EtcdClient([etcd.url])
    lease, ttl = c.grant(1)
    assert ttl == 1  # heartbeat 50 ms / election 500 ms: granted as asked
    assert c.keepalive(lease) == 1
    created, kv = c.create_or_get("/k", "a", lease)
    assert created and kv.lease == lease and kv.create_revision > 0
    other, _ = c.grant(1)
    created2, kv2 = c.create_or_get("/k", "b", other)
    assert not created2 and (kv2.value, kv2.lease, kv2.create_revision) == ("a", lease, kv.create_revision)
    c.revoke(lease)
    assert c.get("/k") is None and c.keepalive(lease) == 0


def test_the_etcd_client_names_every_endpoint_that_failed():
    """No etcd at the URLs: EtcdError names each URL and what went wrong; a bad URL is refused up front."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EtcdError, match=rf"no endpoint answered.*127.0.0.1:{port}.*ConnectionRefused"):
        EtcdClient([f"http://127.0.0.1:{port}"], timeout_s=0.2).grant(1)
    with pytest.raises(ValueError, match=r"'ftp://x:1'.*expected http://host:port or https://host:port"):
        EtcdClient(["ftp://x:1"])


def test_a_member_answering_503_listed_first_does_not_block_the_healthy_one(etcd):
    """A partitioned member's HTTP 503 moves each call on to the next endpoint; only all failing raises, naming each."""
    sick, sick2 = FaultyMember(), FaultyMember()
    try:
        c = EtcdClient([sick.url, etcd.url], timeout_s=0.5)
        lease, ttl = c.grant(1)
        assert ttl == 1 and sick.requests == 1
        c._first = 0  # ask the sick member first again for every call, not only the first one
        assert c.keepalive(lease) == 1 and sick.requests == 2
        c._first = 0
        created, kv = c.create_or_get("/k", "a", lease)
        assert created and kv.lease == lease and sick.requests == 3
        with pytest.raises(EtcdError, match=rf"no endpoint answered \({sick.url}: HTTP 503: 'etcdserver: no leader'; "
                                            rf"{sick2.url}: HTTP 503"):
            EtcdClient([sick.url, sick2.url], timeout_s=0.5).grant(1)
    finally:
        sick.close()
        sick2.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from v2grt.testing import write_test_pki

    return write_test_pki(tmp_path_factory.mktemp("pki"))


def test_the_etcd_client_speaks_tls_with_a_client_certificate_and_is_refused_without_one(pki, tmp_path):
    """etcd with --client-cert-auth on https: with the CA and a client certificate the client leases, campaigns,
    watches and revokes; without a client certificate every call fails naming the URL (a TLS alert)."""
    from v2grt.etcd import tls_context

    with EtcdMember(tmp_path / "etcd", tls=pki) as member:
        assert member.url.startswith("https://127.0.0.1:")
        c = EtcdClient([member.url], ssl_context=tls_context(str(pki["ca"]), str(pki["client_cert"]),
                                                             str(pki["client_key"])))
        lease, _ttl = c.grant(1)
        created, kv = c.create_or_get("/k", "a", lease)
        assert created and c.keepalive(lease) == 1
        revoker = threading.Timer(0.2, lambda: c.revoke(lease))
        revoker.start()
        assert c.watch_delete("/k", kv.create_revision + 1, 2.0)  # the stream over TLS sees the deletion
        revoker.join()
        anonymous = EtcdClient([member.url], timeout_s=0.5, ssl_context=tls_context(str(pki["ca"])))
        with pytest.raises(EtcdError, match=rf"no endpoint answered \({member.url}: SSL\w*Error"):
            anonymous.grant(1)
        with pytest.raises(EtcdError, match=r"CERTIFICATE_VERIFY_FAILED"):  # etcd's certificate, no CA trusted
            EtcdClient([member.url], timeout_s=0.5).grant(1)


def test_an_elector_from_an_ha_config_with_tls_leads_through_etcd_over_https(pki, tmp_path):
    """`ha` with https:// URLs and tls_ca_file, tls_cert_file, tls_key_file: Elector.from_config leads."""
    with EtcdMember(tmp_path / "etcd", tls=pki) as member:
        cfg = config_from_dict({**BASE, "period_s": 0.05, "budget_s": 0.05, "ha": {
            "etcd": [member.url], "lease_ttl_s": 1, "name": "tls", "poll_s": 0.02, "tls_ca_file": str(pki["ca"]),
            "tls_cert_file": str(pki["client_cert"]), "tls_key_file": str(pki["client_key"])}})
        e = Elector.from_config(cfg)
        e.start()
        try:
            wait_until(lambda: e.view.may_publish(time.monotonic_ns()), 10.0, "the TLS elector leads")
            assert e.client.tls and e.etcd_errors == 0
        finally:
            e.stop()


def test_the_ha_tls_keys_are_validated_naming_key_file_and_expectation(pki, tmp_path):
    """https with a key readable by others, a certificate without its key, tls_* with http://, a missing file:
    each refused naming the key and what is expected."""
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki["client_key"].read_bytes())
    loose.chmod(0o644)
    https = {"etcd": ["https://127.0.0.1:2379"]}
    cases = [
        ({**https, "tls_cert_file": str(pki["client_cert"]), "tls_key_file": str(loose)},
         r"ha\.tls_key_file=.*has mode 0644; a private key must be readable by its owner only \(chmod 0600\)"),
        ({**https, "tls_cert_file": str(pki["client_cert"])}, r"ha\.tls_cert_file is set without ha\.tls_key_file"),
        ({"etcd": ["http://127.0.0.1:2379"], "tls_ca_file": str(pki["ca"])},
         r"ha\.tls_ca_file is set but ha\.etcd uses http://; expected https://"),
        ({"etcd": ["http://a:2379", "https://b:2379"]}, r"mixes http:// and https://"),
        ({**https, "tls_ca_file": str(tmp_path / "nope.pem")}, r"ha\.tls_ca_file=.*cannot read .*nope\.pem"),
    ]
    for ha, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**BASE, "ha": ha})
    assert config_from_dict({**BASE, "ha": {**https, "tls_ca_file": str(pki["ca"])}}).ha.tls_ca_file


# ------------------------------------------------------------------------------------------- election
def test_an_elector_without_etcd_retries_at_its_pace_and_never_leads():
    """etcd refusing at once: the elector asks again every retry_s (not in a tight loop) and stays a standby."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    e = candidate(url, "alone")
    e.start()
    try:
        time.sleep(0.5)
        assert not e.view.may_publish(time.monotonic_ns()) and e.view.role != LEADER
        assert 2 <= e.etcd_errors <= 0.5 / (e.election.retry_ns / 1e9) + 2, e.etcd_errors
    finally:
        e.stop()


def test_an_election_succeeds_through_a_member_answering_503_listed_first(etcd):
    """Candidates listing a 503-answering member first still elect exactly one leader through the healthy one."""
    sick = FaultyMember()
    electors = []
    for name in ("a", "b"):
        election = Election(TTL_S, clock_error=CLOCK_ERROR, margin_s=MARGIN_S, poll_s=0.02)
        electors.append(Elector(EtcdClient([sick.url, etcd.url], timeout_s=TTL_S / 4), KEY, name, election))
    for e in electors:
        e.start()
    try:
        leader = leader_of(electors)
        time.sleep(0.6)  # renewals through the client that skipped the sick member
        assert [e.name for e in electors if e.view.role == LEADER] == [leader.name]
        assert {e.view.holder for e in electors} == {leader.name}
        assert leader.view.may_publish(time.monotonic_ns()) and leader.renew_failures == 0
        assert sick.requests >= 2
    finally:
        for e in electors:
            e.stop()
        sick.close()


def test_an_unreadable_etcd_reply_is_counted_and_the_elector_keeps_running(etcd):
    """A 200 with a malformed body: the elector counts an error, stays alive, stops publishing by its deadline
    while the replies are bad, and leads again once the member answers properly."""
    bad = FaultyMember(200, b'{"header": {}}')  # JSON, but no lease ID, TTL or txn responses
    e = candidate(bad.url, "a")
    e.start()
    try:
        wait_until(lambda: e.etcd_errors >= 2, 5.0, "errors counted")
        assert e._thread.is_alive() and e.view.role != LEADER and not e.view.may_publish(time.monotonic_ns())
        assert "unexpected etcd reply: KeyError" in e.last_error, e.last_error
        bad.forward_to = etcd.url
        wait_until(lambda: e.view.may_publish(time.monotonic_ns()), 5.0, "a leads once the member is healthy")
        errors = e.etcd_errors
        bad.forward_to = ""  # keep-alives and campaigns get unreadable replies again
        t_bad = time.monotonic_ns()
        wait_until(lambda: not e.view.may_publish(time.monotonic_ns()), 5.0, "a stops publishing")
        stopped_s = (time.monotonic_ns() - t_bad) / 1e9
        assert stopped_s < TTL_S, stopped_s  # at its surely-valid deadline, before the lease could expire
        assert e._thread.is_alive() and e.etcd_errors > errors  # (a keep-alive reply without a TTL reads as 0: gone)
        bad.forward_to = etcd.url
        wait_until(lambda: e.view.may_publish(time.monotonic_ns()), 5.0, "a leads again")
    finally:
        e.stop()
        bad.close()


def test_of_three_contending_candidates_exactly_one_leads(etcd):
    """Three electors on one key: exactly one leads, the others see it as holder, never two publish at once."""
    electors = [candidate(etcd.url, n) for n in ("a", "b", "c")]
    watch = Watch(electors)
    for e in electors:
        e.start()
    watch.start()
    try:
        leader = leader_of(electors)
        time.sleep(1.5)  # several renewals and standby polls
        assert [e.name for e in electors if e.view.role == LEADER] == [leader.name]
        assert {e.view.holder for e in electors} == {leader.name}
        assert watch.both == 0 and set(watch.first) == {leader.name}
        assert leader.view.epoch == EtcdClient([etcd.url]).get(KEY).create_revision
    finally:
        watch.stop()
        for e in electors:
            e.stop()


def test_the_epoch_increases_across_leader_changes(etcd):
    """Each resignation hands over to a standby whose epoch (the key's create revision) is higher."""
    electors = [candidate(etcd.url, n) for n in ("a", "b")]
    for e in electors:
        e.start()
    epochs = []
    try:
        for _ in range(4):
            leader = leader_of(electors)
            epochs.append(leader.view.epoch)
            leader.stop(resign=True)
            electors.remove(leader)
            electors.append(candidate(etcd.url, leader.name + "'"))
            electors[-1].start()
    finally:
        for e in electors:
            e.stop()
    assert epochs == sorted(epochs) and len(set(epochs)) == 4, epochs


def test_a_leader_cut_off_from_etcd_stops_before_its_lease_expires_and_the_standby_takes_over(etcd):
    """Partition the leader from etcd: it stops publishing first, the standby starts only after the lease expired."""
    proxy = CutProxy(etcd.url)
    proxy.start()
    a = candidate(proxy.url, "a")
    a.start()
    wait_until(lambda: a.view.may_publish(time.monotonic_ns()), 10.0, "a leads")
    b = candidate(etcd.url, "b")
    b.start()
    watch = Watch([a, b])
    watch.start()
    try:
        wait_until(lambda: b.view.holder == "a", 5.0, "b sees a")
        t_cut = time.monotonic_ns()
        proxy.cut()
        wait_until(lambda: b.view.may_publish(time.monotonic_ns()), 5.0, "b takes over")
        time.sleep(0.05)
        a_sent = a.election.renewed_sent_ns  # a's newest keep-alive etcd answered (all before the cut)
    finally:
        watch.stop()
        a.stop(resign=False)
        b.stop()
        proxy.close()
    a_last, b_first = watch.last["a"], watch.first["b"]
    gap_s, takeover_s = (b_first - a_last) / 1e9, (b_first - t_cut) / 1e9
    print(f"\ncut-off leader: a stopped {(a_last - t_cut) / 1e9:.3f} s after the cut, b started "
          f"{takeover_s:.3f} s after it; nobody published for {gap_s:.3f} s")
    assert watch.both == 0
    assert gap_s > MARGIN_S / 2  # a stopped well before its lease could have expired at etcd
    assert takeover_s < TTL_S + 1.0  # the lease's TTL, etcd's 500 ms expiry scan, a poll
    assert b_first > a_sent + TTL_S * 1_000_000_000  # b only after a's lease could have expired (one clock here)


def test_a_leader_stops_while_etcd_is_stopped_and_nobody_leads_until_etcd_returns(etcd):
    """SIGSTOP of etcd: the leader stops publishing within its lease, no standby starts; after SIGCONT one leads."""
    a, b = candidate(etcd.url, "a"), candidate(etcd.url, "b")
    a.start()
    wait_until(lambda: a.view.may_publish(time.monotonic_ns()), 10.0, "a leads")
    b.start()
    watch = Watch([a, b])
    watch.start()
    old_epoch = a.view.epoch
    try:
        wait_until(lambda: b.view.holder == "a", 5.0, "b sees a")
        t_stop = time.monotonic_ns()
        etcd.pause()
        time.sleep(TTL_S + 0.5)
        stopped_at = watch.last["a"]
        last_renewal_sent_ns = a.election.renewed_sent_ns  # the newest keep-alive etcd answered before it stopped
        assert not a.view.may_publish(time.monotonic_ns()) and not b.view.may_publish(time.monotonic_ns())
        assert "b" not in watch.first  # a standby never starts without winning
        etcd.resume()
        leader = leader_of([a, b])
        new_epoch = leader.view.epoch
        time.sleep(0.3)
        assert sum(e.view.role == LEADER for e in (a, b)) == 1
    finally:
        etcd.resume()
        watch.stop()
        a.stop()
        b.stop()
    # etcd received that keep-alive after it was sent: the lease lives at least TTL from the send
    lease_end_ns = last_renewal_sent_ns + TTL_S * 1_000_000_000
    print(f"\netcd stopped: a stopped publishing {(stopped_at - t_stop) / 1e9:.3f} s after SIGSTOP, "
          f"{(lease_end_ns - stopped_at) / 1e9:.3f} s before its lease could expire; "
          f"after SIGCONT {leader.name} leads with epoch {new_epoch} (was {old_epoch})")
    assert stopped_at - t_stop < TTL_S * 1_000_000_000
    assert lease_end_ns - stopped_at >= MARGIN_S * 1e9  # stopped at least the margin before the lease's end
    assert watch.both == 0
    assert new_epoch >= old_epoch


ELECTOR_PROCESS = textwrap.dedent("""
    import sys, time
    from v2grt.etcd import EtcdClient
    from v2grt.ha import Elector
    from v2grt.leadership import Election
    e = Elector(EtcdClient([sys.argv[1]], timeout_s=0.25), sys.argv[2], "proc",
                Election(1, clock_error=0.01, margin_s=0.1, poll_s=0.02))
    e.start()
    while not e.view.may_publish(time.monotonic_ns()):
        time.sleep(0.005)
    print("LEADER", e.view.epoch, flush=True)
    time.sleep(600)
""")


def test_a_killed_leader_is_replaced_within_the_lease_ttl_and_a_margin(etcd):
    """kill -9 of a leader process: the standby leads within TTL + 1 s, with a higher epoch."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", ELECTOR_PROCESS, etcd.url, KEY], stdout=subprocess.PIPE,
                            text=True, env=env)
    b = candidate(etcd.url, "b")
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "LEADER", line
        b.start()
        wait_until(lambda: b.view.holder == "proc", 5.0, "b sees the leader process")
        t_kill = time.monotonic_ns()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        wait_until(lambda: b.view.may_publish(time.monotonic_ns()), TTL_S + 3.0, "b takes over")
        takeover_s = (time.monotonic_ns() - t_kill) / 1e9
        epoch_b = b.view.epoch
    finally:
        if proc.poll() is None:
            proc.kill()
        b.stop()
    print(f"\nkill -9 of the leader: standby leads after {takeover_s:.3f} s (lease TTL {TTL_S} s)")
    assert takeover_s < TTL_S + 1.0
    assert epoch_b > int(line[1]) > 0


# ------------------------------------------------------------------------------------------- config
BASE = {"fleet": {"random": 10}, "meter": None}


@pytest.mark.parametrize("ha, message", [
    ({}, r"ha\.etcd is required"),
    ({"etcd": "http://127.0.0.1:2379"}, r"ha\.etcd='http://127.0.0.1:2379' must be a list"),
    ({"etcd": ["127.0.0.1:2379"]}, r"ha\.etcd\[0\]='127.0.0.1:2379' is not an etcd client URL; expected http://"),
    ({"etcd": ["http://e:2379"], "peers": ["10.0.0.2:5562"]}, r"ha\.peers\[0\]='10.0.0.2:5562' must be .*tcp://"),
    ({"etcd": ["http://e:2379"], "lease_ttl_s": 0.5}, r"ha\.lease_ttl_s=0.5 is not an integer"),
    ({"etcd": ["http://e:2379"], "lease_ttl_s": 1, "margin_s": 0.9}, r"ha\.lease_ttl_s=1 leaves 0\.090 s"),
    ({"etcd": ["http://e:2379"], "ttl": 2}, r"unknown key\(s\) \['ha\.ttl'\]"),
    ({"etcd": ["http://e:2379"], "key_prefix": "v2grt"}, r"ha\.key_prefix='v2grt' must start and end with '/'"),
])
def test_the_ha_section_is_validated_with_key_value_and_expectation(ha, message):
    """Each bad `ha` value is refused naming its key, the value and what is expected."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, "ha": ha})


def test_without_an_ha_section_nothing_needs_etcd():
    """No `ha`: cfg.ha is None and the aggregator has no elector (the host-local epoch stands)."""
    cfg = config_from_dict(BASE)
    assert cfg.ha is None
    assert config_from_dict({**BASE, "ha": {"etcd": ["http://e:2379"]}}).ha.lease_ttl_s == 2


# ------------------------------------------------------------------------------------------- aggregator
def ha_aggregator(url: str, name: str) -> Aggregator:
    cfg = config_from_dict({
        "fleet_id": "test", "period_s": 0.05, "budget_s": 0.05, "meter": None,
        "realtime": {"mlockall": False, "gc_freeze": False},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"},
        "service": {"name": "dc", "capacity_kw": 100.0}, "fleet": {"random": 40},
        "ha": {"etcd": [url], "lease_ttl_s": TTL_S, "name": name, "poll_s": 0.02, "margin_s": MARGIN_S,
               "peers": ["tcp://127.0.0.1:1"]}})
    agg = Aggregator(cfg, epoch=999, fleet=Fleet.random(40, seed=1, n_gateways=2, now_ns=time.monotonic_ns()))
    agg.start()
    assert agg.first_cycle.wait(20.0)
    return agg


def test_two_aggregators_publish_one_epoch_at_a_time_and_the_gateway_fences_the_old_one(etcd):
    """Two HA aggregators, one gateway subscribed to both: setpoints of one epoch at a time, the standby's
    epoch after the leader is cut off, and a woken stale leader's frames refused (IDEMPOTENT_KEY_CONFLICT)."""
    proxy = CutProxy(etcd.url)
    proxy.start()
    a = ha_aggregator(proxy.url, "a")
    wait_until(lambda: a.ha.view.may_publish(time.monotonic_ns()), 10.0, "a leads")
    b = ha_aggregator(etcd.url, "b")
    gw = a.fleet.gateway_ids[0]
    ctx = zmq.Context()
    sub = bus.GatewaySubscriber(ctx, a.publisher.endpoint, gw)
    sub.sock.connect(b.publisher.endpoint)  # a gateway listens to every aggregator of its fleet
    admitted: list[tuple[int, int]] = []  # (epoch, receive time ns) of every admitted message

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = sub.recv(timeout_ms=10, max_frames=1)
            if msg is not None:
                admitted.append((msg.ep, time.monotonic_ns()))

    try:
        drain(0.5)
        epoch_a = a.ha.view.epoch
        assert {ep for ep, _ in admitted} == {epoch_a} and b.ha.view.role != LEADER
        assert a.status_report()["ha"]["role"] == "leader" and b.status_report()["ha"]["role"] == "standby"
        proxy.cut()
        drain(TTL_S + 1.5)
        epoch_b = b.ha.view.epoch
        assert epoch_b > epoch_a and b.ha.view.may_publish(time.monotonic_ns())
        epochs = [ep for ep, _ in admitted]
        assert epochs == sorted(epochs) and set(epochs) == {epoch_a, epoch_b}  # one epoch at a time, never back
        last_a = max(t for ep, t in admitted if ep == epoch_a)
        first_b = min(t for ep, t in admitted if ep == epoch_b)
        print(f"\nsetpoint gap at the gateway across the failover: {(first_b - last_a) / 1e9:.3f} s")
        # The stale leader wakes up believing it still leads (a SIGSTOPped process whose clock checks were
        # skipped): its frames carry the old epoch and the gateway's fence refuses every one.
        a.ha.stop(resign=False)
        a.ha.view = LeaderView(role=LEADER, epoch=epoch_a, surely_valid_until_ns=time.monotonic_ns() + 10**12,
                               lease_id=1, ttl_s=TTL_S)
        seq_a = a.seq
        wait_until(lambda: a.epoch == epoch_a and a.seq > seq_a + 3, 5.0, "a publishes again")
        before = len(admitted)
        drain(0.5)
        assert {ep for ep, _ in admitted[before:]} == {epoch_b}
        assert sub.errors["IDEMPOTENT_KEY_CONFLICT"] > 0
        st = b.status_report()
        doc = (Path(__file__).parent.parent / "docs" / "wire.md").read_text()
        section = doc[doc.index("### 6.1 The status reply"):doc.index("## 7. Fleet status")]
        assert [key for key in st["ha"] if f"`{key}`" not in section] == []  # every ha key documented
        assert st["epoch"] == epoch_b and st["ha"]["lease_remaining_s"] > 0
        from v2grt.operator import format_status

        assert f"  ha             leader (this is {st['ha']['name']}), epoch {epoch_b}, lease " in format_status(st)
    finally:
        sub.close()
        ctx.term()
        a.stop()
        b.stop()
        proxy.close()


def test_a_sigstopped_leader_process_wakes_up_and_publishes_nothing(etcd, tmp_path):
    """v2g-aggregator A leads; SIGSTOP it past its lease, B (a process too) takes over; after SIGCONT A sends no
    frame, and the gateway subscribed to both accepts epochs in order only."""
    from _plant import short_dir, start_aggregator, stop_process, write_config

    procs, configs = [], {}
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        sockets = short_dir()
        configs[name] = (write_config(d, sockets, ha={"etcd": [etcd.url], "lease_ttl_s": TTL_S, "name": name,
                                                      "poll_s": 0.02}), f"ipc://{sockets}/sp")
    ctx = zmq.Context()
    raw_a = ctx.socket(zmq.SUB)  # every frame A sends, unfenced
    raw_a.linger = 0
    raw_a.setsockopt(zmq.SUBSCRIBE, b"sp/gw1\0")
    raw_a.connect(configs["a"][1])
    sub = bus.GatewaySubscriber(ctx, configs["a"][1], "gw1")
    sub.sock.connect(configs["b"][1])
    admitted: list[int] = []

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = sub.recv(timeout_ms=10, max_frames=1)
            if msg is not None:
                admitted.append(msg.ep)

    try:
        procs.append(start_aggregator(configs["a"][0]))
        wait_until(lambda: sub.recv(timeout_ms=50) is not None, 30.0, "A publishes")
        procs.append(start_aggregator(configs["b"][0]))
        # B has started (its candidate key is in etcd: a loaded machine took over 2 s to start it) and stays a standby
        candidate_b = EtcdClient([etcd.url])
        wait_until(lambda: drain(0.1) or candidate_b.get("/v2grt/fleets/plant/candidates/b") is not None, 30.0,
                   "B registered as a candidate")
        drain(0.5)
        epoch_a = admitted[-1]
        assert set(admitted) == {epoch_a}
        procs[0].send_signal(signal.SIGSTOP)
        t_stop_ns = time.time_ns()
        drain(TTL_S + 2.0)
        epoch_b = admitted[-1]
        assert epoch_b > epoch_a
        t_cont_ns = time.time_ns()
        procs[0].send_signal(signal.SIGCONT)
        drain(1.0)
        frames_a = []
        while raw_a.poll(0):
            frames_a.append(wire.decode_setpoints(raw_a.recv()))
    finally:
        # Sockets first: a SUB whose queue is full (nothing drains it now) aborts the whole process in libzmq 4.3.5
        # when its peer disconnects and its heartbeat timer fires (issue 3937, v2grt.io.bus.RECEIVER_HEARTBEATS);
        # seen here twice as "Fatal Python error: Aborted" while the aggregators were being stopped.
        raw_a.close()
        sub.close()
        ctx.term()
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            stop_process(proc)
    newest_a_ns = max(m.t_ns for m in frames_a if m.ep == epoch_a)
    print(f"\nSIGSTOP of the leader process: its newest frame was stamped {(t_stop_ns - newest_a_ns) / 1e9:.3f} s "
          f"before the stop; after SIGCONT ({(t_cont_ns - t_stop_ns) / 1e9:.1f} s later) it sent nothing")
    assert newest_a_ns < t_stop_ns  # nothing published after waking up: its lease was no longer surely valid
    assert admitted == sorted(admitted) and set(admitted) == {epoch_a, epoch_b}
