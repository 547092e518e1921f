"""Tests for v2grt.ingest: telemetry mapped to fleet rows with work and state bounded by the roster."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from v2grt import ingest
from v2grt.codes import Reason
from v2grt.fleet import Fleet
from v2grt.io import wire
from v2grt.io.wire import WireError

T_NS = 1_700_000_000_000_000_000


def roster(n: int = 40, gateways: int = 4) -> tuple[Fleet, ingest.TelemetryRouter]:
    """A random fleet and a router that knows it as the aggregator lays it out (ids in row order)."""
    fleet = Fleet.random(n, seed=3, n_gateways=gateways)
    router = ingest.TelemetryRouter()
    layout = []
    for gw in fleet.gateway_ids:
        rows = fleet.gateway_rows(gw)
        layout.append((gw, wire.join_ids(fleet.node_ids[r] for r in rows), rows))
    router.set_roster(fleet, layout)
    return fleet, router


def batch(gw: str, ids, soc=None, strict=True, router=None, **slow) -> wire.TelemetryBatch:
    """A decoded batch for ``ids`` (as the aggregator decodes: ids left to the router)."""
    ids = list(ids)
    n = len(ids)
    soc = np.full(n, 0.5) if soc is None else soc
    frame = wire.encode_telemetry(gw, 1, T_NS, wire.join_ids(ids), soc, np.arange(n, dtype=float), np.ones(n),
                                  np.zeros(n), **slow)
    return wire.decode_telemetry(frame, strict=strict, check_ids=False,
                                 max_nodes=None if router is None else router.max_nodes)


def ids_of(fleet: Fleet, gw: str) -> list[str]:
    return [fleet.node_ids[r] for r in fleet.gateway_rows(gw)]


def test_a_gateway_reporting_in_setpoint_order_is_mapped_by_one_comparison():
    """Ids in the order of the gateway's setpoints take the fast path: its precomputed rows, all entries."""
    fleet, router = roster()
    routed = router.route(batch("gw2", ids_of(fleet, "gw2")))
    assert routed.sel is None and routed.rows.tolist() == fleet.gateway_rows("gw2").tolist()
    assert (router.fast, router.cached, router.slow) == (1, 0, 0)


def test_other_orders_are_mapped_once_then_cached_and_refusals_counted_by_code():
    """A reordered batch with unknown and foreign ids maps its own vehicles only, counts the rest as vehicles."""
    fleet, router = roster()
    own = ids_of(fleet, "gw1")[::-1]
    ids = own + ["NOT_IN_ROSTER_1", "NOT_IN_ROSTER_2"] + ids_of(fleet, "gw2")[:3]
    for _ in range(3):
        routed = router.route(batch("gw1", ids))
    assert [fleet.node_ids[r] for r in routed.rows] == own and routed.sel.tolist() == list(range(len(own)))
    assert (routed.unknown, routed.foreign) == (2, 3)
    assert (router.fast, router.cached, router.slow) == (0, 2, 1)
    assert router.refused_nodes == {"UNKNOWN_NODE": 6, "FOREIGN_NODE": 9}


def test_no_state_for_ids_a_peer_invents():
    """Batches under 200 invented gateway ids leave nothing behind; invented node ids under a roster gateway
    keep at most BLOBS_PER_GATEWAY cache entries (issue 10 item 2: a cache entry per gateway id grew RSS)."""
    _fleet, router = roster()
    for k in range(200):
        with pytest.raises(WireError) as info:
            wire.decode_telemetry(wire.encode_telemetry(f"gw_x{k}", 1, T_NS, b"A", [0.5], [0.0], [1], [0]),
                                  max_nodes=router.max_nodes, check_ids=False)
        assert info.value.code == "UNKNOWN_GATEWAY"
    assert router._cache == {} and not router.refused_nodes
    for k in range(50):
        router.route(batch("gw1", [f"INVENTED_{k}_{i}" for i in range(10)], router=router))
    assert list(router._cache) == ["gw1"] and len(router._cache["gw1"]) == ingest.BLOBS_PER_GATEWAY
    assert router.refused_nodes == {"UNKNOWN_NODE": 500}


def test_a_batch_may_name_its_roster_vehicles_plus_a_margin():
    """TOO_MANY_NODES beyond batch_limit, decided from the arrays' lengths before any id is read."""
    fleet, router = roster(400, 2)
    owned = len(fleet.gateway_rows("gw1"))
    limit = ingest.batch_limit(owned)
    assert limit == owned + 20 and ingest.batch_limit(10) == 26
    ids = ids_of(fleet, "gw1") + [f"NEW_{i}" for i in range(limit - owned)]
    assert router.route(batch("gw1", ids, router=router)).unknown == limit - owned
    with pytest.raises(WireError) as info:
        batch("gw1", ids + ["ONE_TOO_MANY"], router=router)
    assert info.value.code == "TOO_MANY_NODES"


def test_repeated_or_broken_ids_drop_the_batch():
    """The slow path checks the wire's id rules: a repeat or an id with a space is BAD_IDS."""
    fleet, router = roster()
    own = ids_of(fleet, "gw1")
    with pytest.raises(WireError) as info:
        router.route(wire.decode_telemetry(msgpack.packb({
            "v": 1, "gw": "gw1", "seq": 1, "t_ns": T_NS, "ids": wire.join_ids(own[:2]) + b"\x00" + own[0].encode(),
            "soc": np.zeros(3, "<f4").tobytes(), "p_kw": np.zeros(3, "<f4").tobytes(), "online": bytes(3),
            "fault": bytes(3)}), check_ids=False))
    assert info.value.code == "BAD_IDS"
    blob = wire.join_ids(own).replace(own[1].encode(), b"EV NODE")
    n = len(own)
    with pytest.raises(WireError) as info:
        router.route(wire.decode_telemetry(msgpack.packb({
            "v": 1, "gw": "gw1", "seq": 1, "t_ns": T_NS, "ids": blob, "soc": np.zeros(n, "<f4").tobytes(),
            "p_kw": np.zeros(n, "<f4").tobytes(), "online": bytes(n), "fault": bytes(n)}), check_ids=False))
    assert info.value.code == "BAD_IDS" and "index 1" in info.value.message


def test_a_changed_roster_drops_cached_maps():
    """After set_roster the router maps against the new fleet version; a queued older map says its version."""
    fleet, router = roster()
    ids = ids_of(fleet, "gw1")[::-1]
    old = router.route(batch("gw1", ids))
    fleet.remove(ids[0])
    rows = fleet.gateway_rows("gw1")
    router.set_roster(fleet, [("gw1", wire.join_ids(fleet.node_ids[r] for r in rows), rows)])
    new = router.route(batch("gw1", ids))
    assert old.version != new.version == fleet.version
    assert new.unknown == 1 and router.slow == 2


def test_quarantine_writes_the_reason_only_and_keeps_stored_values():
    """A vehicle with a NaN is INVALID_TELEMETRY (online set so OFFLINE cannot mask it), its stored values and
    telemetry time untouched; its neighbours are written; the next valid batch clears it (issue 10 item 4)."""
    fleet, router = roster()
    ids = ids_of(fleet, "gw1")
    rows = fleet.gateway_rows("gw1")
    good = batch("gw1", ids, soc=np.full(len(ids), 0.7), soh=np.full(len(ids), 0.9))
    ingest.apply(fleet, router.route(good), good, 100)
    fleet.online[rows[1]] = 0  # it was unplugged before the broken batch
    soc = np.full(len(ids), 0.4)
    soc[1] = np.nan
    bad = batch("gw1", ids, soc=soc, strict=False)  # no soh in this batch
    routed = router.route(bad)
    assert routed.invalid == 1 and router.refused_nodes == {"INVALID_TELEMETRY": 1}
    ingest.apply(fleet, routed, bad, 200)
    assert fleet.fault[rows[1]] == Reason.INVALID_TELEMETRY and fleet.online[rows[1]] == 1
    assert fleet.soc[rows[1]] == pytest.approx(0.7) and fleet.soh[rows[1]] == pytest.approx(0.9)
    assert fleet.last_telemetry_ns[rows[1]] == 100 and fleet.p_actual_kw[rows[1]] == 1.0
    assert np.allclose(np.delete(fleet.soc[rows], 1), 0.4) and fleet.last_telemetry_ns[rows[0]] == 200
    assert np.allclose(fleet.soh[rows], 0.9)  # a batch without soh leaves every stored soh
    ingest.apply(fleet, router.route(good), good, 300)
    assert fleet.fault[rows[1]] == 0 and fleet.soc[rows[1]] == pytest.approx(0.7)
