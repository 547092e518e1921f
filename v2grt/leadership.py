"""Leadership as a pure state machine: lease deadlines, the renew schedule and the "surely valid" rule.

No I/O and no clock reads: every method takes the CLOCK_MONOTONIC time (ns) its caller measured. The
etcd side (v2grt.etcd) and the thread that drives both (v2grt.ha) sit around it. docs/ha.md gives
the safety argument these numbers serve.

The rule: a lease renewed by a keep-alive SENT at ``t_sent`` (monotonic, ours) lives at etcd until at
least ``t_sent + ttl`` as measured by etcd, since etcd restarts the TTL when it receives the request,
which is after we sent it. Our clock may run fast or slow against etcd's by at most ``clock_error``
(a fraction), so on our clock the lease is *surely* valid before
``t_sent + ttl * (1 - clock_error) - margin``; ``margin`` covers the time from our check to the last
setpoint frame leaving the process. A leader publishes only before that instant.
"""

from __future__ import annotations

import dataclasses

LEADER = "leader"
STANDBY = "standby"

NS = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class LeaderView:
    """What the control thread reads (one attribute, replaced whole): may I publish, with which epoch."""

    role: str = STANDBY
    epoch: int = 0  # the leader key's create revision while leading, else 0
    surely_valid_until_ns: int = 0  # monotonic; our lease is surely alive at etcd before this
    holder: str | None = None  # the leader key's value (the leader's name) as last read, None: no leader
    lease_id: int = 0
    ttl_s: int = 0  # the TTL etcd granted (it may exceed the asked one: its floor)

    def may_publish(self, now_ns: int) -> bool:
        """Leading, and our lease surely valid at ``now_ns`` (monotonic)."""
        return self.role == LEADER and now_ns < self.surely_valid_until_ns

    def remaining_s(self, now_ns: int) -> float:
        """Seconds our lease is surely valid from ``now_ns``; 0 when it is not (or there is none)."""
        return max(0.0, (self.surely_valid_until_ns - now_ns) / NS) if self.lease_id else 0.0


class Election:
    """One candidate's view of the election for one fleet's leader key (owned by one thread).

    Inputs are facts the etcd edge observed: a lease granted, a keep-alive answered (with the time
    its request was sent), the leader key created by us or held by someone. Outputs: ``view`` (the
    LeaderView to publish) and ``next_renew_ns`` / ``next_campaign_ns`` (when to talk to etcd next).
    """

    def __init__(self, ttl_s: int, *, clock_error: float, margin_s: float, poll_s: float, retry_s: float | None = None):
        if ttl_s < 1:
            raise ValueError(f"lease ttl_s={ttl_s!r}: expected an integer >= 1 s (etcd leases are whole seconds)")
        self.ask_ttl_s = ttl_s
        self.clock_error = clock_error
        self.margin_ns = int(margin_s * NS)
        self.poll_ns = int(poll_s * NS)
        self.lease_id = 0
        self.ttl_s = 0
        self.renewed_sent_ns = 0  # send time of the newest keep-alive (or grant) etcd answered with TTL > 0
        self.last_try_ns = 0  # when the last renewal was attempted (succeeded or not)
        self.role = STANDBY
        self.epoch = 0
        self.holder: str | None = None
        self.next_campaign_ns = 0
        self.next_grant_ns = 0  # when to ask for a lease again (after a failed request)
        self.retry_ns = int((retry_s if retry_s is not None else max(0.02, ttl_s / 20)) * NS)
        self.won = 0  # times this candidate became leader
        self.lost = 0  # times it stopped leading other than by resigning

    # ----------------------------------------------------------------------------- derived times
    def surely_valid_until_ns(self) -> int:
        if not self.lease_id:
            return 0
        return self.renewed_sent_ns + int(self.ttl_s * NS * (1.0 - self.clock_error)) - self.margin_ns

    @property
    def renew_every_ns(self) -> int:
        """A quarter of the TTL: three keep-alives may fail before the surely-valid deadline passes."""
        return (self.ttl_s or self.ask_ttl_s) * NS // 4

    @property
    def next_renew_ns(self) -> int:
        """When to send the next keep-alive: renew_every after the last success, or retry after a failure."""
        if not self.lease_id:
            return 0
        if self.last_try_ns > self.renewed_sent_ns:  # the last attempt failed: retry soon, not at the schedule
            return self.last_try_ns + self.retry_ns
        return self.renewed_sent_ns + self.renew_every_ns

    def view(self) -> LeaderView:
        return LeaderView(self.role, self.epoch if self.role == LEADER else 0, self.surely_valid_until_ns(),
                          self.holder, self.lease_id, self.ttl_s)

    # ----------------------------------------------------------------------------- facts from etcd
    def granted(self, lease_id: int, ttl_s: int, sent_ns: int) -> None:
        """A new lease; it counts as renewed at the grant request's send time."""
        self.lease_id, self.ttl_s = lease_id, ttl_s
        self.renewed_sent_ns = self.last_try_ns = sent_ns
        self.next_campaign_ns = 0  # campaign at once with it

    def failed(self, now_ns: int) -> None:
        """An etcd request failed (timeout, refused): no grant or campaign before retry_s from now.

        A keep-alive has its own retry (next_renew_ns); this keeps an unreachable etcd from being asked
        in a tight loop when its port refuses at once.
        """
        self.next_grant_ns = now_ns + self.retry_ns
        self.next_campaign_ns = max(self.next_campaign_ns, now_ns + self.retry_ns)

    def renew_attempted(self, sent_ns: int) -> None:
        self.last_try_ns = sent_ns

    def renewed(self, ttl_s: int, sent_ns: int) -> None:
        """A keep-alive sent at ``sent_ns`` was answered: TTL > 0 renews, 0 means the lease is gone."""
        if ttl_s <= 0:
            self.lease_gone()
            return
        self.ttl_s = ttl_s
        self.renewed_sent_ns = max(self.renewed_sent_ns, sent_ns)

    def lease_gone(self) -> None:
        """etcd says our lease expired (or was revoked): nothing of ours is left there; grant a new one."""
        if self.role == LEADER:
            self.lost += 1
        self.lease_id, self.ttl_s, self.role, self.epoch = 0, 0, STANDBY, 0

    def observed(self, holder: str | None, holder_lease: int, create_revision: int, now_ns: int) -> None:
        """The leader key as a campaign transaction found or made it: ours (lease matches) or someone's."""
        self.holder = holder
        self.next_campaign_ns = now_ns + self.poll_ns
        if self.lease_id and holder_lease == self.lease_id:
            if self.role != LEADER or self.epoch != create_revision:
                self.won += 1
            self.role, self.epoch = LEADER, create_revision
        else:
            if self.role == LEADER:
                self.lost += 1
            self.role, self.epoch = STANDBY, 0

    def resigned(self) -> None:
        """We revoked our lease (graceful stop): the key went with it."""
        self.lease_id, self.ttl_s, self.role, self.epoch, self.holder = 0, 0, STANDBY, 0, None

    def expire_if_past(self, now_ns: int) -> None:
        """Past the surely-valid deadline a leader no longer counts itself leader until etcd confirms.

        Publishing has already stopped (LeaderView.may_publish); this makes the role honest in the
        status. A later successful keep-alive proves the lease (and so the key) survived, and the next
        campaign transaction, which sees the key still ours, restores leadership with the same epoch.
        """
        if self.role == LEADER and now_ns >= self.surely_valid_until_ns():
            self.role = STANDBY
            self.lost += 1
            self.next_campaign_ns = 0
