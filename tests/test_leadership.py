"""The pure election state machine (v2grt.leadership), driven by a fake monotonic clock in ns."""

from __future__ import annotations

import pytest

from v2grt.leadership import LEADER, STANDBY, Election, LeaderView

S = 1_000_000_000
LEASE = 42


def elected(ttl_s=1, clock_error=0.01, margin_s=0.1, t0=10 * S) -> Election:
    el = Election(ttl_s, clock_error=clock_error, margin_s=margin_s, poll_s=0.05)
    el.granted(LEASE, ttl_s, sent_ns=t0)
    el.observed("me", LEASE, 7, now_ns=t0 + S // 100)
    return el


def test_surely_valid_ends_ttl_less_clock_error_and_margin_after_the_send():
    """A 1 s lease sent at t0 is surely valid until t0 + 1 s x (1 - 0.01) - 0.1 s, and not one ns longer."""
    el = elected()
    view = el.view()
    until = 10 * S + int(0.99 * S) - S // 10
    assert view.surely_valid_until_ns == until
    assert view.may_publish(until - 1)
    assert not view.may_publish(until)
    assert view.remaining_s(until - S // 2) == pytest.approx(0.5)


def test_a_keepalive_counts_from_its_send_not_from_its_reply():
    """A reply that took 300 ms renews from when the request left; slow etcd shortens the lease, never lengthens it."""
    el = elected()
    el.renew_attempted(10 * S + S // 4)
    el.renewed(1, sent_ns=10 * S + S // 4)  # answered at +550 ms: irrelevant
    assert el.surely_valid_until_ns() == 10 * S + S // 4 + int(0.99 * S) - S // 10
    el.renewed(1, sent_ns=10 * S)  # an older request answered late does not move the deadline back
    assert el.surely_valid_until_ns() == 10 * S + S // 4 + int(0.99 * S) - S // 10


def test_renewals_every_quarter_ttl_and_retries_soon_after_a_failure():
    """The next keep-alive is due ttl/4 after the last success; after a failed one, retry_s after that attempt."""
    el = elected(ttl_s=2)
    assert el.next_renew_ns == 10 * S + S // 2
    el.renew_attempted(10 * S + S // 2)  # it failed (no renewed())
    assert el.next_renew_ns == 10 * S + S // 2 + el.retry_ns
    assert el.retry_ns == S // 10  # ttl / 20


def test_etcd_granting_more_than_asked_is_used():
    """etcd's floor may grant 2 s for a 1 s ask; the deadline follows the granted TTL."""
    el = Election(1, clock_error=0.0, margin_s=0.0, poll_s=0.05)
    el.granted(LEASE, 2, sent_ns=0)
    el.observed("me", LEASE, 3, now_ns=0)
    assert el.view().surely_valid_until_ns == 2 * S


def test_the_key_held_by_another_lease_makes_a_standby_and_ours_a_leader_with_its_create_revision():
    """Leader iff the leader key carries our lease; the epoch is the key's create revision."""
    el = Election(1, clock_error=0.01, margin_s=0.1, poll_s=0.05)
    el.granted(LEASE, 1, sent_ns=0)
    el.observed("other", LEASE + 1, 5, now_ns=1)
    assert (el.role, el.view().epoch, el.holder) == (STANDBY, 0, "other")
    assert not el.view().may_publish(1)
    assert el.next_campaign_ns == 1 + S // 20  # poll again after poll_s
    el.observed("me", LEASE, 9, now_ns=2)
    assert (el.role, el.view().epoch, el.won) == (LEADER, 9, 1)
    el.observed("other", LEASE + 1, 11, now_ns=3)  # someone deleted our key and took it
    assert (el.role, el.lost) == (STANDBY, 1)


def test_a_lease_etcd_reports_gone_drops_leadership_and_asks_for_a_new_one():
    """A keep-alive answered with TTL 0 means the lease (and our key) is gone: standby, no lease, epoch 0."""
    el = elected()
    el.renewed(0, sent_ns=10 * S + S // 4)
    assert (el.role, el.lease_id, el.view().epoch, el.lost) == (STANDBY, 0, 0, 1)
    assert el.next_renew_ns == 0 and not el.view().may_publish(10 * S + S // 4)


def test_a_leader_past_its_deadline_steps_down_and_a_surviving_lease_restores_the_same_epoch():
    """Without renewals the role drops at the deadline; a later renewal proves the key survived and keeps epoch 7."""
    el = elected()
    deadline = el.surely_valid_until_ns()
    el.expire_if_past(deadline - 1)
    assert el.role == LEADER
    el.expire_if_past(deadline)
    assert (el.role, el.lost, el.next_campaign_ns) == (STANDBY, 1, 0)
    el.renewed(1, sent_ns=deadline + S)
    el.observed("me", LEASE, 7, now_ns=deadline + S + 1)
    assert el.view().role == LEADER and el.view().epoch == 7


def test_resigning_leaves_nothing_to_publish():
    """After a resignation (lease revoked) the view is a standby without a lease."""
    el = elected()
    el.resigned()
    assert el.view() == LeaderView()


def test_a_lease_shorter_than_a_second_is_refused():
    """etcd leases are whole seconds: 0 is refused with the expectation named."""
    with pytest.raises(ValueError, match=r"ttl_s=0.*integer >= 1"):
        Election(0, clock_error=0.01, margin_s=0.1, poll_s=0.05)


def test_a_failed_request_holds_off_the_next_grant_and_campaign_for_retry_s():
    """After a refused request no lease is asked for and no campaign is tried before retry_s has passed."""
    el = Election(1, clock_error=0.01, margin_s=0.1, poll_s=0.01)
    el.failed(now_ns=5 * S)
    assert el.next_grant_ns == el.next_campaign_ns == 5 * S + el.retry_ns
    el.granted(LEASE, 1, sent_ns=6 * S)
    el.observed("other", LEASE + 1, 3, now_ns=6 * S)
    el.failed(now_ns=6 * S)  # poll_s (10 ms) is shorter than retry_s (50 ms): the retry wins
    assert el.next_campaign_ns == 6 * S + el.retry_ns
