"""Faults on the HA rig (v2grt.harig): etcd, aggregators A and B, the meter and two gateways as separate hosts.

As root the rig puts each in a network namespace of its own (CI runs as root); otherwise it runs on
loopback and the faults that cut a node off the network skip, saying why. One rig serves the module:
each test makes its fault on a settled rig (a leader, a warm standby, setpoints at every gateway) and
the next test settles it again. ``V2GRT_RIG_MODE=loopback`` forces the loopback rig (as a machine
without namespaces runs it). Each test prints its measures (run with -s); `v2grt bench failover`
repeats them for percentiles. Safety is asserted exactly (no frame of two leaders accepted, no stale
epoch after a newer one); times only as generous liveness bounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from v2grt import harig
from v2grt.harig import GatewayRecord, Rig, RigConfig, measure, published, read_record

TTL_S = 1


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    # V2GRT_RIG_MODE=loopback runs the loopback rig as root too (what a machine without namespaces runs)
    mode = os.environ.get("V2GRT_RIG_MODE", "auto")
    with Rig(tmp_path_factory.mktemp("rig"), RigConfig(lease_ttl_s=TTL_S, mode=mode)) as r:
        yield r


def show(result: dict) -> None:
    print("\n" + json.dumps({k: v for k, v in result.items() if k != "published"}, default=str))


def assert_one_leader_at_a_time(r: dict) -> None:
    assert r["double_leader"] == 0, r  # no gateway accepted a frame of a leader that had been succeeded
    assert r["stale_after_newer"] == 0, r
    overlap = r["published"]["overlap_s"]
    assert overlap is None or overlap < 0, r["published"]  # the old leader's last frame left before the new one's first


# ------------------------------------------------------------------------------------------- measures (pure)
def rec(rows, power=()) -> GatewayRecord:
    return GatewayRecord(np.array(rows, dtype=np.int64).reshape(-1, 4), np.array(power, dtype=float).reshape(-1, 2))


def test_measure_finds_the_gap_the_switch_and_frames_of_a_leader_already_succeeded():
    """Epoch 5 until 1.0 s, epoch 7 from 2.0 s at gw1; gw2 accepts one epoch-5 frame sent after epoch 7's first."""
    ms = 1_000_000
    gw1 = [(t * ms, 5, t, 10_000 * ms + t * ms) for t in range(0, 1001, 50)]
    gw1 += [(t * ms, 7, t, 10_000 * ms + t * ms) for t in range(2000, 2501, 50)]
    gw2 = [(100 * ms, 5, 1, 10_100 * ms), (2100 * ms, 7, 2, 12_100 * ms), (2150 * ms, 5, 3, 12_150 * ms)]
    m = measure({"gw1": rec(gw1, [(-1000 * ms, 10.0), (1200 * ms, 0.0), (2000 * ms, 10.0)]), "gw2": rec(gw2)},
                500 * ms, 2500 * ms, 0.05)
    assert m["gap_s"]["gw1"] == pytest.approx(1.0) and m["switch_s"]["gw1"] == pytest.approx(1.0)
    assert m["steady_p99_s"] == pytest.approx(0.05)  # gw1's frames every 50 ms in the second before t0
    assert m["double_leader"] == 1  # gw2's epoch-5 frame sent at 12.150 s, after epoch 7's first (12.000 s)
    assert m["stale_after_newer"] == 1  # and gw2 took it after an epoch-7 one
    assert m["epochs"] == [5, 7, 5, 7]  # accepted, all gateways merged in receive order
    assert m["p_before_kw"] == pytest.approx(10.0) and m["p_min_kw"] == 0.0
    assert m["p_zero_s"] == pytest.approx(0.8, abs=0.02)


def test_published_says_when_two_leaders_sent_at_once():
    """Taps of A and B: a positive overlap_s when A's last frame was sent after B's first, negative otherwise."""
    ms = 1_000_000
    a = np.array([(0, 3, 1, 1000 * ms), (0, 3, 2, 1500 * ms)], dtype=np.int64)
    b = np.array([(0, 4, 1, 1400 * ms), (0, 4, 2, 1600 * ms)], dtype=np.int64)
    assert published({"A": a, "B": b}, -1, 1)["overlap_s"] == pytest.approx(0.1)
    b[:, 3] += 200 * ms
    p = published({"A": a, "B": b}, -1, 1)
    assert p["overlap_s"] == pytest.approx(-0.1) and p["epochs"][4]["by"] == "B"


def test_a_record_with_a_half_written_last_line_reads_the_rest(tmp_path):
    """A gateway record read while it is written: complete lines count, a torn one is skipped."""
    path = tmp_path / "gw.rec"
    path.write_text("a 10 3 1 99\np 11 4.5\na 12 3 2 1")
    r = read_record(path)
    assert r.accepted.tolist() == [[10, 3, 1, 99]] and r.power.tolist() == [[11.0, 4.5]]


# ------------------------------------------------------------------------------------------- the rig itself
def test_a_loopback_rig_refuses_to_cut_a_node_and_says_why(tmp_path):
    """Without namespaces a cut is Unsupported, naming the reason (what a skip prints)."""
    r = Rig(tmp_path, RigConfig(mode="loopback"))
    with pytest.raises(harig.Unsupported, match=r"needs network namespaces.*loopback asked for"):
        r.cut("A")
    r.close()


def _names(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out += subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [w for w in out.replace(":", " ").split() if w.startswith(tag)]


def test_a_rig_that_fails_to_start_leaves_no_namespace_or_link(tmp_path, monkeypatch):
    """The network is made, then etcd fails: leaving the `with` removes every namespace, veth and the bridge."""
    ok, why = harig.namespaces_available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    r = Rig(tmp_path, RigConfig(mode="netns"))
    made = []

    def fail():
        made.extend(_names(r.tag))
        raise harig.RigError("etcd would not start (made to fail by the test)")

    monkeypatch.setattr(r, "start_etcd", fail)
    with pytest.raises(harig.RigError, match="made to fail"):
        with r:
            pass
    assert len(made) >= 2 * len(r.nodes) + 1, made  # a namespace and a veth per node, and the bridge
    assert _names(r.tag) == []


def test_a_rig_left_by_a_dead_process_is_swept(tmp_path):
    """Namespaces and links named for a process that no longer exists are removed by sweep_stale()."""
    ok, why = harig.namespaces_available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"v2g{dead.pid}x1"
    subprocess.run(["ip", "netns", "add", f"{tag}-etcd"], check=True)
    subprocess.run(["ip", "link", "add", f"{tag}b", "type", "bridge"], check=True)
    try:
        assert sorted(n for n in harig.sweep_stale() if n.startswith(tag)) == [f"{tag}-etcd", f"{tag}b"]
        assert _names(tag) == []
    finally:
        subprocess.run(["ip", "netns", "del", f"{tag}-etcd"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{tag}b"], capture_output=True)


# ------------------------------------------------------------------------------------------- faults
def test_a_planned_handover_moves_leadership_to_the_standby_with_no_frame_of_two_leaders(rig):
    """The control command `v2g-cli --handover` sends, to the leader: the standby leads with a newer epoch, every
    gateway switches once, the old leader's last frame left before the new one's first."""
    rig.settle()
    r = harig.fault_handover(rig)
    show(r)
    assert r["new"] == r["to"] == rig.other(r["old"]) and r["new_epoch"] > r["old_epoch"]
    assert r["epochs"] == [r["old_epoch"], r["new_epoch"]] and set(r["switch_s"]) == set(rig.gateway_ids)
    assert_one_leader_at_a_time(r)
    assert r["switch_max_s"] < 1.0  # liveness (the goal, <= 1 period, is `v2grt bench failover`'s)


def test_kill9_of_the_leader_the_standby_takes_over_with_a_newer_epoch(rig):
    """kill -9 of the leader process: the standby leads with a higher epoch, every gateway follows it, never both."""
    rig.settle()
    r = harig.fault_kill9(rig)
    show(r)
    assert r["new"] == rig.other(r["old"]) and r["new_epoch"] > r["old_epoch"]
    assert r["epochs"] == [r["old_epoch"], r["new_epoch"]]
    assert_one_leader_at_a_time(r)
    assert r["p_before_kw"] > 10.0  # the fleet was discharging: the power through the gap means something
    assert r["gap_max_s"] < TTL_S + 2.0  # liveness (the goal, p99 <= 1.5 s, is `v2grt bench failover`'s)


def test_a_sigstopped_leader_woken_after_the_takeover_sends_nothing_a_gateway_accepts(rig):
    """SIGSTOP of the leader past its lease, the standby takes over, SIGCONT: no frame of the old epoch is
    accepted after the wake, and the woken process sends none at all (its lease is not surely valid)."""
    rig.settle()
    r = harig.fault_sigstop(rig)
    show(r)
    assert r["new"] == rig.other(r["old"]) and r["new_epoch"] > r["old_epoch"]
    assert r["accepted_after_wake"] == 0 and r["sent_after_wake"] == 0
    assert_one_leader_at_a_time(r)
    st = rig.status(r["old"])
    assert st is not None and st["ha"]["role"] == "standby", st and st["ha"]


def test_a_leader_cut_off_the_network_stops_publishing_and_the_standby_takes_over(rig):
    """The leader's namespace cut off: its own tap shows it stopped before its lease could expire; the standby
    leads; restored, the old leader comes back as a standby."""
    if not rig.netns:
        pytest.skip(f"cutting a node off needs network namespaces: {rig.reason}")
    rig.settle()
    r = harig.fault_cut_leader(rig)
    show(r)
    assert r["new"] == rig.other(r["old"]) and r["new_epoch"] > r["old_epoch"]
    assert 0 < r["stopped_after_s"] < TTL_S  # self-fenced: stopped by itself, before etcd could expire its lease
    assert_one_leader_at_a_time(r)
    rig.settle()
    assert rig.leader() == r["new"] and rig.status(r["old"])["ha"]["role"] == "standby"


def test_etcd_stopped_and_restarted_the_leader_stops_within_its_lease_and_one_leads_after(rig):
    """etcd killed for TTL + 1 s: the leader stops within its lease, nobody publishes while etcd is away,
    and after the restart one aggregator leads with an epoch no older than before."""
    rig.settle()
    r = harig.fault_etcd_restart(rig)
    show(r)
    assert r["stopped_after_s"] < TTL_S and r["frames_while_down"] == 0
    assert r["new"] in harig.AGGREGATORS and r["new_epoch"] >= r["old_epoch"]
    assert_one_leader_at_a_time(r)
    assert r["gap_max_s"] >= r["down_s"] - TTL_S  # the fleet really went without setpoints


def test_a_gateway_cut_off_goes_to_0_kw_and_resumes_when_restored(rig):
    """gw1's namespace cut for 1 s: its vehicles drop to 0 kW on expiry, it resumes after the restore; gw2 and
    the leader carry on untouched."""
    if not rig.netns:
        pytest.skip(f"cutting a node off needs network namespaces: {rig.reason}")
    rig.settle()
    r = harig.fault_cut_gateway(rig, "gw1", hold_s=1.0)
    show(r)
    assert r["gap_s"]["gw1"] >= 1.0 and r["gap_others_max_s"] < 0.5
    assert r["power_cut"]["p_before_kw"] > 0 and r["power_cut"]["p_min_kw"] == 0.0  # expired to 0 kW
    assert r["new"] == r["old"] and r["epochs"] == [r["old_epoch"]]
    assert_one_leader_at_a_time(r)


def test_the_rig_runs_its_processes_on_their_own_nodes(rig):
    """Each aggregator's process is in its own network namespace, with its node's address (netns mode)."""
    if not rig.netns:
        pytest.skip(f"needs network namespaces: {rig.reason}")
    rig.settle()
    inodes = {}
    for agg in harig.AGGREGATORS:
        pid = rig.procs[agg].popen.pid
        inodes[agg] = subprocess.run(["readlink", f"/proc/{pid}/ns/net"], capture_output=True, text=True).stdout
        assert rig.nodes[agg].addr in subprocess.run(["ip", "-n", rig.nodes[agg].ns, "-4", "addr"],
                                                     capture_output=True, text=True).stdout
    assert len(set(inodes.values())) == 2 and "" not in inodes.values()
