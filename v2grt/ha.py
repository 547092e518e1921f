"""The elector thread: drives v2grt.leadership's Election against etcd and publishes a LeaderView.

One thread owns the etcd client. It grants a lease, renews it every quarter TTL (a keep-alive's SEND
time is what counts), and campaigns on the fleet's leader key with a create-if-absent transaction
(Kubernetes' and Patroni's pattern). The control thread only reads ``Elector.view``, one immutable
object replaced whole, and decides with ``view.may_publish(now)``: a hung elector, a hung etcd or a
lost network cannot keep a leader publishing past its lease (docs/ha.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time

from v2grt.etcd import EtcdClient, EtcdError, KeyValue, tls_context
from v2grt.events import EventLog
from v2grt.leadership import LEADER, Election, LeaderView

log = logging.getLogger("v2grt.ha")

#: A planned handover (v2g-cli --handover) that has not completed within this is abandoned; the leader keeps leading.
HANDOVER_TIMEOUT_S = 2.0
#: How often the leader reads the handover key while it waits for the standby's confirmation.
HANDOVER_POLL_S = 0.005
#: After handing over, the old leader asks for a new lease (and campaigns) only this much later: the standby it
#: named must win the key, not the old leader's own next poll.
HANDOVER_HOLDOFF_S = 1.0


def leader_key(key_prefix: str, fleet_id: str) -> str:
    return f"{key_prefix}{fleet_id}/leader"


class HandoverError(RuntimeError):
    """A handover that cannot start (not the leader, no such standby, one under way); the message says why."""


@dataclasses.dataclass
class _Handover:
    """The leader's side of one planned handover: offered -> confirmed (ready) -> resigned after a publish."""

    to: str
    epoch: int
    value: str  # the handover key's value as the leader wrote it
    deadline_ns: int
    state: str = "requested"  # requested, offered, ready
    next_ns: int = 0


def _offer_value(to: str, frm: str, epoch: int, ready: bool = False) -> str:
    """The handover key's value (JSON, one spelling: both sides compare it byte for byte)."""
    doc = {"epoch": epoch, "from": frm, "to": to, **({"ready": True} if ready else {})}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


class Elector:
    """Campaign for ``key`` as ``name``; ``view`` says, at any time, whether this process may publish."""

    def __init__(self, client: EtcdClient, key: str, name: str, election: Election, *,
                 events: EventLog | None = None, peers: list[str] | None = None, clock=time.monotonic_ns,
                 period_s: float = 0.1):
        self.client = client
        self.key = key
        base = key.rsplit("/", 1)[0] + "/"
        self.handover_key = base + "handover"  # a planned handover's offer (the leader's lease) and its answer
        self.candidates_prefix = base + "candidates/"  # <prefix>/<name> per live candidate (its own lease)
        self.candidate_key = self.candidates_prefix + name
        self.name = name
        self.election = election
        self.events = events or EventLog()
        self.peers = list(peers or [])
        self.clock = clock
        self.period_s = period_s
        self.view = LeaderView()
        self.renew_failures = 0
        self.etcd_errors = 0
        self.last_error = ""
        #: Live candidates (names under candidates_prefix) as the last campaign transaction read them.
        self.candidates: list[str] = []
        self.leader_epoch = 0  # the leader key's create revision as last read (whoever holds it), 0: none
        #: Hooks the aggregator sets (docs/ha.md, planned handover): on_prepare(until_ns) when this standby is about
        #: to take over (its loop sleeps in slices until then), on_won() once it has (its loop runs a cycle at once).
        self.on_prepare = None
        self.on_won = None
        #: Set by the control thread right after the publish that is its last before a handover; from then it
        #: publishes nothing, and the elector revokes the lease. Read by the control thread before publishing.
        self.resigning = False
        #: Set by the elector once the standby confirmed a handover: the control thread resigns after its next publish.
        self.handover_ready = False
        self.last_handover: dict | None = None
        self._handover: _Handover | None = None
        self._handover_lock = threading.Lock()  # handover_ready -> resigning, against an abort by the elector
        self._offer_seen = 0  # mod revision of the last handover offer this standby acted on
        self._registered = False  # our candidate key is in etcd under the current lease
        self._handed_over = False
        self._stop = threading.Event()
        self._kick = threading.Event()  # wakes the elector thread early: stop, a handover request, a resignation
        self._thread = threading.Thread(target=self._run, name="v2grt-elector", daemon=True)

    @classmethod
    def from_config(cls, cfg, events: EventLog | None = None) -> Elector:
        """From a Config with an ``ha`` section (v2grt.config.HAConfig)."""
        ha = cfg.ha
        election = Election(ha.lease_ttl_s, clock_error=ha.clock_error,
                            margin_s=cfg.budget_s if ha.margin_s is None else ha.margin_s, poll_s=ha.poll_s)
        # A request may take a quarter TTL: a keep-alive that hangs longer is retried, not waited for.
        context = None
        if ha.etcd[0].startswith("https:"):  # files checked by the config (v2grt.config._check_ha)
            context = tls_context(*(str(cfg.resolve(f)) if f else None
                                    for f in (ha.tls_ca_file, ha.tls_cert_file, ha.tls_key_file)))
        client = EtcdClient(ha.etcd, timeout_s=min(0.5, ha.lease_ttl_s / 4), ssl_context=context)
        name = ha.name or f"{socket.gethostname()}:{os.getpid()}"
        return cls(client, leader_key(ha.key_prefix, cfg.fleet_id), name, election, events=events, peers=ha.peers,
                   period_s=cfg.period_s)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, resign: bool = True) -> None:
        """Stop campaigning; with ``resign`` revoke the lease so a standby may win at once (key deleted)."""
        self._stop.set()
        self._kick.set()
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
            if self._handover is not None:
                due.append(self._handover.next_ns)
            wait_s = (min(due) - now) / 1e9
            self._kick.wait(min(max(wait_s, 0.001), 0.5))
            self._kick.clear()

    def step(self) -> None:
        """One round: get a lease if we have none, renew it when due, campaign when due; then publish the view."""
        el, clock = self.election, self.clock
        before = el.role
        try:
            # first: once the control thread has published its last cycle, the revoke must not wait behind a
            # keep-alive that fails (etcd away: it is retried at every step until it goes through or the lease ends)
            if self._handover is not None and (self.resigning or clock() >= self._handover.next_ns):
                self._lead_handover(clock())
            if not el.lease_id:
                if clock() >= el.next_grant_ns:
                    sent = clock()
                    lease_id, ttl_s = self.client.grant(el.ask_ttl_s)
                    el.granted(lease_id, ttl_s, sent)
                    self._registered = False
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
            if el.lease_id and not self._registered:  # a candidate the others (and a handover) can name
                created, kv = self.client.create_or_get(self.candidate_key, self.name, el.lease_id)
                self._registered = True
                if not created and kv is not None and kv.lease != el.lease_id:
                    # another live aggregator has this ha.name: a handover to it, and the `leader` shown, would
                    # be ambiguous. Said once per lease; leadership itself is still decided by the leases.
                    self.events.emit("HA_NAME_TAKEN", logging.ERROR, key=self.candidate_key, name=self.name,
                                     message="another aggregator of this fleet is registered under the same ha.name:"
                                             " give each its own (a handover names its target by it)")
            if el.lease_id and clock() >= el.next_campaign_ns:
                c = self.client.campaign(self.key, self.name, el.lease_id, also=(self.handover_key,),
                                         prefix=self.candidates_prefix)
                kv = c.holder
                self.leader_epoch = kv.create_revision if kv is not None else 0
                if kv is None:
                    el.observed(None, 0, 0, clock())
                else:
                    el.observed(kv.value, kv.lease, kv.create_revision, clock())
                if not c.created:
                    self.candidates = sorted(k.value for k in c.under_prefix)
                    offer = c.also.get(self.handover_key)
                    if offer is not None and el.role != LEADER and kv is not None:
                        self._take_over(offer, kv, c.revision)
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
        handed_over, self._handed_over = self._handed_over, False
        if el.role != before:
            if el.role == LEADER:
                self.events.emit("LEADERSHIP_WON", logging.WARNING, key=self.key, name=self.name, epoch=el.epoch,
                                 message="this aggregator leads the fleet: publishing setpoints from its next cycle")
            elif not handed_over:
                self.events.emit("LEADERSHIP_LOST", logging.ERROR, key=self.key, name=self.name,
                                 holder=el.holder or "none",
                                 message="stopped publishing setpoints: the lease is not surely valid or "
                                         "another aggregator holds the leader key")

    # ------------------------------------------------------------------------------ planned handover
    def request_handover(self, to: str | None = None) -> dict:
        """Start handing leadership to the standby ``to`` (any registered standby if None); any thread (the bus
        thread's control handler). Returns at once: the elector thread carries it out (docs/ha.md)."""
        with self._handover_lock:
            v = self.view
            if v.role != LEADER or not v.may_publish(self.clock()):
                raise HandoverError(f"handover: {self.name} is not the leader (role {v.role}, leader "
                                    f"{v.holder or 'none'}); send the request to the leader's control endpoint")
            if self._handover is not None:
                raise HandoverError(f"handover: one to {self._handover.to!r} is under way already")
            standbys = [c for c in self.candidates if c != self.name]
            if to is None:
                if not standbys:
                    raise HandoverError("handover: no standby is registered in etcd (ha candidates: "
                                        f"{self.candidates or 'none'}); start one with the same fleet_id and ha.etcd")
                to = standbys[0]
            elif to not in standbys:
                raise HandoverError(f"handover: to={to!r} is not a registered standby; standbys now: "
                                    f"{standbys or 'none'} (their ha.name)")
            self._handover = _Handover(to, v.epoch, _offer_value(to, self.name, v.epoch),
                                       self.clock() + int(HANDOVER_TIMEOUT_S * 1e9))
            self.last_handover = {"to": to, "from": self.name, "epoch": v.epoch, "state": "requested",
                                  "t_ns": time.time_ns()}
        self._kick.set()
        self.events.emit("HANDOVER_REQUESTED", logging.WARNING, key=self.key, name=self.name, to=to, epoch=v.epoch,
                         message="planned handover: resigning after the next publish once the standby confirms")
        return {"to": to, "from": self.name, "epoch": v.epoch, "timeout_s": HANDOVER_TIMEOUT_S}

    def resign_after_publish(self) -> None:
        """Control thread, right after a publish: if a handover is confirmed, that publish was this leader's last."""
        with self._handover_lock:
            if self.handover_ready:
                self.handover_ready = False
                self.resigning = True
        if self.resigning:
            self._kick.set()

    def _lead_handover(self, now_ns: int) -> None:
        """The leader's side, one step: offer, wait for the standby's confirmation, resign after the next publish."""
        h, el = self._handover, self.election
        h.next_ns = now_ns + int(HANDOVER_POLL_S * 1e9)
        if self.resigning:  # the control thread has published its last frames: let the standby in
            try:
                self.client.revoke(el.lease_id)
                outcome = "done"
            except EtcdError as exc:  # the lease expires by itself within its TTL: a failover, not a handover
                outcome = f"resigned, but the revoke failed ({exc}): the standby takes over when the lease expires"
            el.resigned()
            el.next_grant_ns = now_ns + int(HANDOVER_HOLDOFF_S * 1e9)
            self.view = el.view()  # first no lease to publish with, then the flag down
            self.resigning = False
            self._handed_over = True  # step() says HANDOVER_DONE, not LEADERSHIP_LOST
            self._end_handover(outcome, logging.WARNING)
            return
        if el.role != LEADER or el.epoch != h.epoch:
            self._abort_handover("this aggregator stopped leading meanwhile")
            return
        if now_ns >= h.deadline_ns:
            self._abort_handover(f"{h.to} did not confirm within {HANDOVER_TIMEOUT_S:g} s")
            return
        if h.state == "requested":
            if not self.client.put_if(self.handover_key, h.value, lease_id=el.lease_id,
                                      create_revision_of=(self.key, h.epoch)):
                self._abort_handover("the leader key is no longer this leader's")
                return
            h.state = "offered"
        elif h.state == "offered":
            kv = self.client.get(self.handover_key)
            if kv is not None and kv.value == _offer_value(h.to, self.name, h.epoch, ready=True):
                h.state = "ready"
                self.handover_ready = True  # the control thread resigns after its next publish
            elif kv is None or kv.value != h.value:
                self._abort_handover(f"the handover key changed under it ({kv.value if kv else 'deleted'!r})")

    def _abort_handover(self, why: str) -> None:
        with self._handover_lock:
            if self.resigning:  # the control thread has stopped publishing already: finish instead
                return
            self.handover_ready = False
        h = self._handover
        try:
            self.client.delete_if(self.handover_key, h.value)
            self.client.delete_if(self.handover_key, _offer_value(h.to, self.name, h.epoch, ready=True))
        except EtcdError:
            pass  # it is bound to our lease: it goes when the lease does
        self._end_handover(f"aborted: {why}; {self.name} keeps leading", logging.ERROR)

    def _end_handover(self, outcome: str, level: int) -> None:
        h, self._handover = self._handover, None
        self.last_handover = {"to": h.to, "from": self.name, "epoch": h.epoch, "state": outcome,
                              "t_ns": time.time_ns()}
        self.events.emit("HANDOVER_DONE" if outcome == "done" else "HANDOVER_FAILED", level, key=self.key,
                         name=self.name, to=h.to, epoch=h.epoch, outcome=outcome)

    def _take_over(self, offer: KeyValue, holder: KeyValue, revision: int) -> None:
        """The standby's side: a handover offered to us: confirm once etcd watches the leader key for us, campaign
        the moment the leader's key is deleted, and have the loop publish at once (on_won)."""
        try:
            doc = json.loads(offer.value)
        except ValueError:
            return
        if (not isinstance(doc, dict) or doc.get("to") != self.name or doc.get("ready")
                or doc.get("epoch") != holder.create_revision or offer.mod_revision == self._offer_seen):
            return
        self._offer_seen = offer.mod_revision
        el, clock = self.election, self.clock
        sent = clock()  # a fresh lease for the wait: this thread renews nothing while it watches
        el.renew_attempted(sent)
        el.renewed(self.client.keepalive(el.lease_id), sent)
        if not el.lease_id:
            return
        window_ns = min(el.surely_valid_until_ns() - clock() - int(0.05e9),
                        int((2 * self.period_s + 0.5) * 1e9))
        if window_ns <= 0:
            return
        if self.on_prepare is not None:
            self.on_prepare(clock() + window_ns + int(self.period_s * 1e9))
        ready = _offer_value(self.name, doc.get("from", ""), holder.create_revision, ready=True)

        def confirm() -> bool:
            return self.client.put_if(self.handover_key, ready, value_is=offer.value)

        t0 = clock()
        if not self.client.watch_delete(self.key, revision + 1, window_ns / 1e9, on_watching=confirm):
            log.warning("HANDOVER_NOT_TAKEN %s: the leader's key was not deleted within %.3f s of the offer",
                        self.name, (clock() - t0) / 1e9)
            return
        c = self.client.campaign(self.key, self.name, el.lease_id)
        kv = c.holder
        if kv is not None:
            el.observed(kv.value, kv.lease, kv.create_revision, clock())
            self.leader_epoch = kv.create_revision
        self.view = el.view()
        if el.role == LEADER and self.on_won is not None:
            self.on_won()  # publish from a cycle now, not at the next deadline

    def snapshot(self, now_ns: int) -> dict:
        """The status reply's ``ha`` map (docs/wire.md 6.1)."""
        v = self.view
        remaining_s = v.remaining_s(now_ns)
        return {"role": v.role, "epoch": v.epoch, "lease_remaining_s": remaining_s,
                "lease_valid_until_ns": time.time_ns() + int(remaining_s * 1e9) if remaining_s > 0 else None,
                "lease_ttl_s": v.ttl_s, "leader": v.holder, "leader_epoch": self.leader_epoch, "name": self.name,
                "key": self.key, "peers": self.peers, "candidates": self.candidates,
                "etcd": [url for _h, _p, url in self.client.endpoints],
                "won": self.election.won, "lost": self.election.lost, "renew_failures": self.renew_failures,
                "etcd_errors": self.etcd_errors, "last_error": self.last_error, "handover": self.last_handover}
