"""The elector thread: drives v2grt.leadership's Election against etcd and publishes a LeaderView.

One thread owns the etcd client. It grants a lease, renews it every quarter TTL (a keep-alive's SEND
time is what counts), and campaigns on the fleet's leader key with a create-if-absent transaction
(Kubernetes' and Patroni's pattern). The control thread only reads ``Elector.view``, one immutable
object replaced whole, and decides with ``view.may_publish(now)``: a hung elector, a hung etcd or a
lost network cannot keep a leader publishing past its lease (docs/ha.md).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from v2grt.etcd import EtcdClient, EtcdError
from v2grt.events import EventLog
from v2grt.leadership import LEADER, Election, LeaderView

log = logging.getLogger("v2grt.ha")


def leader_key(key_prefix: str, fleet_id: str) -> str:
    return f"{key_prefix}{fleet_id}/leader"


class Elector:
    """Campaign for ``key`` as ``name``; ``view`` says, at any time, whether this process may publish."""

    def __init__(self, client: EtcdClient, key: str, name: str, election: Election, *,
                 events: EventLog | None = None, peers: list[str] | None = None, clock=time.monotonic_ns):
        self.client = client
        self.key = key
        self.name = name
        self.election = election
        self.events = events or EventLog()
        self.peers = list(peers or [])
        self.clock = clock
        self.view = LeaderView()
        self.renew_failures = 0
        self.etcd_errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="v2grt-elector", daemon=True)

    @classmethod
    def from_config(cls, cfg, events: EventLog | None = None) -> Elector:
        """From a Config with an ``ha`` section (v2grt.config.HAConfig)."""
        ha = cfg.ha
        election = Election(ha.lease_ttl_s, clock_error=ha.clock_error,
                            margin_s=cfg.budget_s if ha.margin_s is None else ha.margin_s, poll_s=ha.poll_s)
        # A request may take a quarter TTL: a keep-alive that hangs longer is retried, not waited for.
        client = EtcdClient(ha.etcd, timeout_s=min(0.5, ha.lease_ttl_s / 4))
        name = ha.name or f"{socket.gethostname()}:{os.getpid()}"
        return cls(client, leader_key(ha.key_prefix, cfg.fleet_id), name, election, events=events, peers=ha.peers)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, resign: bool = True) -> None:
        """Stop campaigning; with ``resign`` revoke the lease so a standby may win at once (key deleted)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.view = LeaderView(holder=self.view.holder)  # publish nothing from here on
        el = self.election
        if resign and el.lease_id:
            try:
                self.client.revoke(el.lease_id)
                self.events.emit("LEADERSHIP_RESIGNED", logging.INFO, key=self.key, name=self.name,
                                 epoch=el.epoch, message="lease revoked: a standby may take over at once")
            except EtcdError as exc:
                log.warning("HA_RESIGN_FAILED %s: the lease expires by itself within its TTL", exc)
            el.resigned()
            self.view = LeaderView()

    # ------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        el = self.election
        while not self._stop.is_set():
            self.step()
            now = self.clock()
            due = [el.next_campaign_ns, el.next_renew_ns if el.lease_id else el.next_grant_ns]
            if el.role == LEADER:
                due.append(el.surely_valid_until_ns())  # wake to step down on time (role in the status)
            wait_s = (min(due) - now) / 1e9
            self._stop.wait(min(max(wait_s, 0.001), 0.5))

    def step(self) -> None:
        """One round: get a lease if we have none, renew it when due, campaign when due; then publish the view."""
        el, clock = self.election, self.clock
        before = el.role
        try:
            if not el.lease_id:
                if clock() >= el.next_grant_ns:
                    sent = clock()
                    lease_id, ttl_s = self.client.grant(el.ask_ttl_s)
                    el.granted(lease_id, ttl_s, sent)
            elif clock() >= el.next_renew_ns:
                sent = clock()
                el.renew_attempted(sent)
                try:
                    ttl_s = self.client.keepalive(el.lease_id)
                except Exception:  # no answer, or one we cannot read: the lease is not renewed
                    self.renew_failures += 1
                    raise
                el.renewed(ttl_s, sent)
                if el.role == LEADER or not el.lease_id:
                    el.next_campaign_ns = 0  # a leader checks the key is still its own at every renewal
            if el.lease_id and clock() >= el.next_campaign_ns:
                _created, kv = self.client.create_or_get(self.key, self.name, el.lease_id)
                if kv is None:
                    el.observed(None, 0, 0, clock())
                else:
                    el.observed(kv.value, kv.lease, kv.create_revision, clock())
        except EtcdError as exc:
            el.failed(clock())
            self.etcd_errors += 1
            self.last_error = str(exc)
            self.events.emit("ETCD_UNREACHABLE", logging.ERROR, key=self.key, error=str(exc),
                             message="cannot reach etcd: a leader keeps publishing only while its lease is "
                                     "surely valid")
        except Exception as exc:
            # An unexpected reply (KeyError, ValueError...) must not end the thread: a dead elector never
            # renews, campaigns or takes over again. Treated as a failed request: back off, count, log
            # (rate-limited); the surely-valid deadline below still applies.
            el.failed(clock())
            self.etcd_errors += 1
            self.last_error = f"unexpected etcd reply: {type(exc).__name__}: {exc}"
            self.events.emit("ETCD_UNREACHABLE", logging.ERROR, key=self.key, error=self.last_error,
                             message="etcd's reply could not be read: a leader keeps publishing only while "
                                     "its lease is surely valid")
        el.expire_if_past(clock())
        self.view = el.view()
        if el.role != before:
            if el.role == LEADER:
                self.events.emit("LEADERSHIP_WON", logging.WARNING, key=self.key, name=self.name, epoch=el.epoch,
                                 message="this aggregator leads the fleet: publishing setpoints from its next cycle")
            else:
                self.events.emit("LEADERSHIP_LOST", logging.ERROR, key=self.key, name=self.name,
                                 holder=el.holder or "none",
                                 message="stopped publishing setpoints: the lease is not surely valid or "
                                         "another aggregator holds the leader key")

    def snapshot(self, now_ns: int) -> dict:
        """The status reply's ``ha`` map (docs/wire.md 6.1)."""
        v = self.view
        return {"role": v.role, "epoch": v.epoch, "lease_remaining_s": v.remaining_s(now_ns),
                "lease_ttl_s": v.ttl_s, "leader": v.holder, "name": self.name, "key": self.key,
                "peers": self.peers, "etcd": [url for _h, _p, url in self.client.endpoints],
                "won": self.election.won, "lost": self.election.lost, "renew_failures": self.renew_failures,
                "etcd_errors": self.etcd_errors, "last_error": self.last_error}
