"""Tests for v2grt.io.wire: round trips, the documented bytes, validation codes, fuzzing."""

from __future__ import annotations

import math
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v2grt.codes import Reason
from v2grt.fleet import COLUMN_BY_NAME
from v2grt.io import wire
from v2grt.io.wire import WireError
from v2grt.testing import short_ids

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire.md"
IDS3 = ["EV1", "EV2", "EV3"]
EP, T_NS = 1_700_000_000_000_000_000, 1_700_000_004_200_000_000
STATUS = {
    "ep": EP, "seq": 42, "t_ns": T_NS, "f_hz": 49.95, "f_age_ms": 12.5, "target_kw": 4.25,
    "delivered_kw": 4.25, "available_dis_kw": 18.5, "available_chg_kw": 22.0, "n_nodes": 3, "n_active": 2,
    "excluded": {"SOC_BELOW_MINIMUM": 1}, "estop": False, "cycle_p99_ms": 1.8, "deadline_misses": 0,
}


def example_frames() -> dict[str, bytes]:
    """The frames of docs/wire.md section 11, from the inputs stated there."""
    ids = wire.join_ids(IDS3)
    return {
        "setpoint": wire.encode_setpoints("gw1", EP, 42, T_NS, T_NS + 300_000_000, False, ids,
                                          np.array([7.5, -3.25, 0.0]), np.array([0, 0, 9], np.uint8)),
        "telemetry": wire.encode_telemetry("gw1", 7, 1_700_000_004_150_000_000, ids, [0.8, 0.55, 0.19],
                                           [7.5, -3.25, 0.0], [1, 1, 1], [0, 0, 0], temp_c=[25.0, 31.5, 20.0]),
        "status": wire.encode_status(STATUS),
    }


def setpoint_frame(gw="gw1", ep=EP, seq=1, n=3, estop=False, p=None) -> bytes:
    ids = wire.join_ids([f"N{i}" for i in range(n)])
    p = np.linspace(-5, 5, n) if p is None else p
    return wire.encode_setpoints(gw, ep, seq, T_NS, T_NS + 10**9, estop, ids, p, np.zeros(n, np.uint8))


def telemetry_map(**changes) -> dict:
    """A valid telemetry map (every key) with ``changes`` applied; a value of ... deletes the key."""
    n = 3
    f4 = lambda *v: np.array(v, "<f4").tobytes()
    m = {"v": 1, "gw": "gw1", "seq": 7, "t_ns": T_NS, "ids": wire.join_ids(IDS3),
         "soc": f4(0.8, 0.5, 0.2), "p_kw": f4(7.5, -3.0, 0.0), "online": bytes([1, 1, 0]),
         "fault": bytes([0, 0, Reason.OFFLINE]), "soh": f4(0.9, 0.95, 1.0), "temp_c": f4(25, 30, -5),
         "p_dis_max_kw": f4(11, 11, 7.4), "p_chg_max_kw": f4(11, 11, 7.4), "v_dc": f4(400, 800, 350),
         "cycle_count": f4(100, 2000, 0), "cabin_temp_c": f4(20, 21, 22)}
    assert len(m["soc"]) == 4 * n
    for k, v in changes.items():
        if v is ...:
            del m[k]
        else:
            m[k] = v
    return m




def code_of(fn, *args, **kwargs) -> WireError:
    with pytest.raises(WireError) as info:
        fn(*args, **kwargs)
    assert info.value.code in wire.ERROR_CODES
    return info.value


# --- round trips ---------------------------------------------------------------------------------


def test_setpoint_round_trip_keeps_every_field_and_float32_values():
    """Every setpoint field decodes to what was encoded; arrays are read-only float32/uint8 views."""
    ids = wire.join_ids(["a", "b", "c", "d"])
    p = np.array([11.0, -7.4, 0.0, 1e-3])
    frame = wire.encode_setpoints("gw-7", 2**64 - 1, 2**63, T_NS, T_NS + 1, False, ids, p,
                                  np.array([0, 9, 12, 0], np.uint8), slow_n=10)
    msg = wire.decode_setpoints(frame)
    assert (msg.v, msg.gw, msg.ep, msg.seq, msg.t_ns, msg.exp_ns, msg.estop, msg.slow_n) == (
        1, "gw-7", 2**64 - 1, 2**63, T_NS, T_NS + 1, False, 10)
    assert msg.node_ids == ("a", "b", "c", "d") and len(msg) == 4
    np.testing.assert_array_equal(msg.p_kw, p.astype(np.float32))
    assert msg.p_kw.dtype == np.dtype("<f4") and not msg.p_kw.flags.writeable
    assert msg.reasons.tolist() == [0, 9, 12, 0]
    assert not msg.expired(T_NS + 1) and msg.expired(T_NS + 2)


def test_setpoint_zero_nodes_round_trip():
    """A gateway with no vehicles still gets a (heartbeat) message with empty arrays."""
    msg = wire.decode_setpoints(wire.encode_setpoints("gw1", 1, 0, 0, 0, True, b"", [], []))
    assert len(msg) == 0 and msg.node_ids == () and msg.estop


def test_telemetry_round_trip_with_and_without_slow_fields():
    """Required arrays always decode; optional ones are None when absent and equal when present."""
    ids = wire.join_ids(IDS3)
    base = (ids, [0.5, 0.6, 0.7], [1.0, -2.0, 0.0], [1, 1, 0], [0, 0, Reason.OFFLINE])
    fast = wire.decode_telemetry(wire.encode_telemetry("gw1", 3, T_NS, *base))
    assert fast.node_ids == tuple(IDS3) and fast.temp_c is None and fast.soh is None
    np.testing.assert_array_equal(fast.p_kw, np.float32([1.0, -2.0, 0.0]))
    assert fast.fault.tolist() == [0, 0, 2] and fast.quarantined == 0
    slow = {k: [1.0, 2.0, 3.0] for k in ("soh",)} | {"temp_c": [20, 21, 22], "v_dc": [400, 401, 402],
                                                      "p_dis_max_kw": [11, 11, 11], "p_chg_max_kw": [7, 7, 7],
                                                      "cycle_count": [1, 2, 3], "cabin_temp_c": [5, 6, 7]}
    slow["soh"] = [0.9, 0.8, 0.7]
    full = wire.decode_telemetry(wire.encode_telemetry("gw1", 4, T_NS, *base, **slow))
    for key, values in slow.items():
        np.testing.assert_allclose(getattr(full, key), values, rtol=1e-6)


def test_control_request_and_reply_round_trip():
    """Requests keep cmd, typed args and id; replies keep ok/result or the error code and message."""
    req = wire.decode_request(wire.encode_request("test_discharge", {"node_id": "EV1", "kw": 5, "seconds": 30},
                                                  id=17))
    assert req == wire.ControlRequest("test_discharge", {"node_id": "EV1", "kw": 5.0, "seconds": 30.0}, 17)
    assert isinstance(req.args["kw"], float)
    ok = wire.decode_reply(wire.encode_reply({"estop": True}, id=17))
    assert ok.ok and ok.result == {"estop": True} and ok.id == 17
    err = wire.decode_reply(wire.encode_reply(error=WireError("REFUSED", "node 'EV9' unknown"), id="x"))
    assert (err.ok, err.error_code, err.error_message, err.id) == (False, "REFUSED", "node 'EV9' unknown", "x")


def test_status_round_trip_including_nil_frequency():
    """The status decodes to the dict encoded (plus v); f_hz and f_age_ms may be nil."""
    assert wire.decode_status(wire.encode_status(STATUS)) == {"v": 1, **STATUS}
    stale = STATUS | {"f_hz": None, "f_age_ms": None}
    assert wire.decode_status(wire.encode_status(stale))["f_hz"] is None


def test_join_and_split_ids_are_inverse_and_reject_bad_ids():
    """ids blobs round-trip (UTF-8 included) and empty, spaced, NUL-bearing or repeated ids are refused."""
    ids = ["EV_1", "Zoé-2", "車3"]
    assert wire.split_ids(wire.join_ids(ids)) == ids
    assert wire.join_ids([]) == b"" and wire.split_ids(b"") == []
    for bad in (["a", ""], ["a b"], ["a\x00b"], ["x" * 65], ["a", "a"]):
        assert code_of(wire.join_ids, bad).code == "BAD_IDS"
    for blob in (b"a\x00", b"\x00a", b"a\x00\x00b", b"a\x00a", b"\xff\xfe", b"a b"):
        assert code_of(wire.split_ids, blob).code == "BAD_IDS"


# --- the documented bytes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["setpoint", "telemetry", "status"])
def test_documented_example_is_exactly_what_the_encoder_produces(name):
    """docs/wire.md's annotated hex for each example equals annotate(encoder output), bytes and lines."""
    doc = DOC.read_text()
    block = re.search(rf"<!-- wire-example: {name} -->\n```text\n(.*?)\n```", doc, re.DOTALL)
    assert block, f"docs/wire.md lacks the {name} example"
    frame = example_frames()[name]
    hex_in_doc = "".join(re.match(r"[0-9a-f]{4}  ((?:[0-9a-f]{2} ?)+)", line).group(1).replace(" ", "")
                         for line in block.group(1).splitlines())
    assert hex_in_doc == frame.hex()
    assert block.group(1) == wire.annotate(frame)
    assert f"{len(frame)} bytes" in doc


def test_doc_lists_every_error_code_and_reason_code_with_its_value():
    """Every wire error code and every Reason (value and name) appears in docs/wire.md's tables."""
    doc = DOC.read_text()
    for code in wire.ERROR_CODES:
        assert f"| `{code}` |" in doc, code
    for reason in Reason:
        assert f"| {int(reason)} | `{reason.name}` |" in doc, reason


def test_every_error_code_raised_in_the_sources_is_documented():
    """No WireError anywhere in the package (codec, bus, the aggregator's control handler) uses an undocumented code."""
    package = Path(wire.__file__).parents[1]
    used = set()
    for path in package.rglob("*.py"):
        used |= set(re.findall(r'(?:WireError|ControlTimeout|ControlRefused)\("([A-Z_]+)"', path.read_text()))
    assert used and used <= set(wire.ERROR_CODES), used - set(wire.ERROR_CODES)


def test_telemetry_ranges_agree_with_the_fleet_table():
    """The wire's per-node ranges equal the fleet table's column ranges, so nothing accepted is refused later."""
    for field in wire.TELEMETRY_ARRAYS:
        col = COLUMN_BY_NAME.get(field.key)
        if col is not None:
            assert (field.lo, field.hi) == (col.lo, col.hi), field.key


# --- topics ----------------------------------------------------------------------------------------


def test_gw1_topic_is_not_a_prefix_of_gw10_topic_at_the_byte_level():
    """sp/gw1\\0 does not prefix sp/gw10\\0's frame (a ZMQ SUB filter is a byte prefix)."""
    gw1, gw10 = wire.setpoint_topic("gw1"), wire.setpoint_topic("gw10")
    assert gw1 == b"sp/gw1\x00" and gw10 == b"sp/gw10\x00"
    assert not setpoint_frame("gw10").startswith(gw1)
    assert not setpoint_frame("gw1").startswith(gw10)
    assert setpoint_frame("gw1").startswith(gw1)
    assert not wire.encode_status(STATUS).startswith(b"sp/")


@settings(deadline=None)  # a per-example deadline is a speed assertion (docs/testing.md)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Cn", "Co", "Cf")),
               min_size=1, max_size=20),
       st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Cn", "Co", "Cf")),
               min_size=1, max_size=20))
def test_no_gateway_topic_prefixes_another(a, b):
    """For any two distinct valid gateway ids, neither topic is a byte prefix of the other."""
    if a == b or not (a.isprintable() and b.isprintable()):
        return
    ta, tb = wire.setpoint_topic(a), wire.setpoint_topic(b)
    assert not tb.startswith(ta) and not ta.startswith(tb)


# --- validation, one code per failure ---------------------------------------------------------------


def test_setpoint_validation_codes():
    """Each broken setpoint rule raises its own code and the message names the field."""
    good = setpoint_frame()
    topic = b"sp/gw1\x00"
    body = msgpack.unpackb(good[len(topic):])

    def with_(**ch):
        m = dict(body)
        for k, v in ch.items():
            if v is ...:
                del m[k]
            else:
                m[k] = v
        return topic + msgpack.packb(m)

    cases = [
        (b"xx/gw1\x00" + good[len(topic):], "UNKNOWN_TOPIC", "topic"),
        (b"sp/gw1" + good[len(topic):].replace(b"\x00", b"\x01"), "UNKNOWN_TOPIC", "topic"),
        (with_(gw="gw2"), "TOPIC_MISMATCH", "'gw'"),
        (with_(v=2), "BAD_VERSION", "'v'"),
        (with_(ep=...), "MISSING_FIELD", "'ep'"),
        (with_(ep=-1), "OUT_OF_RANGE", "'ep'"),
        (with_(seq="1"), "BAD_FIELD", "'seq'"),
        (with_(estop=0), "BAD_FIELD", "'estop'"),
        (with_(exp_ns=T_NS - 1), "OUT_OF_RANGE", "'exp_ns'"),
        (with_(p_kw=body["p_kw"][:-1]), "LENGTH_MISMATCH", "'p_kw'"),
        (with_(rs=b"\x00\x00"), "LENGTH_MISMATCH", "'rs'"),
        (with_(p_kw=np.float32([0, np.nan, 0]).tobytes()), "OUT_OF_RANGE", "'p_kw' node 'N1'"),
        (with_(p_kw=np.float32([0, 0, 1000.5]).tobytes()), "OUT_OF_RANGE", "'p_kw' node 'N2'"),
        (with_(rs=bytes([0, 13, 0])), "OUT_OF_RANGE", "'rs' node 'N1'"),
        (with_(ids=b"N0\x00N0\x00N1"), "BAD_IDS", "'N0'"),
        (with_(p_kw=[1.0, 2.0, 3.0]), "BAD_FIELD", "expected bin"),
    ]
    for frame, code, needle in cases:
        err = code_of(wire.decode_setpoints, frame)
        assert err.code == code, (needle, err)
        assert needle in err.message, (needle, err.message)


def test_setpoint_encoder_refuses_what_the_decoder_would():
    """The encoder refuses NaN or oversized setpoints, unknown reasons, wrong lengths and estop with power."""
    ids = wire.join_ids(IDS3)
    ok = (np.zeros(3), np.zeros(3, np.uint8))
    assert code_of(wire.encode_setpoints, "gw1", 1, 1, 0, 1, False, ids, [0, np.inf, 0], ok[1]).code == \
        "OUT_OF_RANGE"
    assert code_of(wire.encode_setpoints, "gw1", 1, 1, 0, 1, False, ids, ok[0], [0, 0, 99]).code == \
        "OUT_OF_RANGE"
    assert code_of(wire.encode_setpoints, "gw1", 1, 1, 0, 1, False, ids, np.zeros(2), ok[1]).code == \
        "LENGTH_MISMATCH"
    assert code_of(wire.encode_setpoints, "gw1", 1, 1, 0, 1, True, ids, [0, 1, 0], ok[1]).code == "OUT_OF_RANGE"
    assert code_of(wire.encode_setpoints, "gw1", -1, 1, 0, 1, False, ids, *ok).code == "OUT_OF_RANGE"
    assert code_of(wire.encode_setpoints, "gw 1", 1, 1, 0, 1, False, ids, *ok).code == "BAD_FIELD"


@pytest.mark.parametrize(("changes", "code", "needle"), [
    ({"v": ...}, "BAD_VERSION", "'v'"),
    ({"v": 2}, "BAD_VERSION", "'v'=2"),
    ({"v": True}, "BAD_VERSION", "'v'"),
    ({"gw": ...}, "MISSING_FIELD", "'gw'"),
    ({"gw": 7}, "BAD_FIELD", "'gw'"),
    ({"gw": ""}, "BAD_FIELD", "gateway id"),
    ({"seq": -1}, "OUT_OF_RANGE", "'seq'"),
    ({"seq": 1.0}, "BAD_FIELD", "'seq'"),
    ({"t_ns": 2**63}, "OUT_OF_RANGE", "'t_ns'"),
    ({"ids": "EV1"}, "BAD_FIELD", "'ids'"),
    ({"ids": b"EV1\x00EV2"}, "LENGTH_MISMATCH", "'ids' holds 2 ids: expected 3"),
    ({"ids": b"EV1\x00EV2\x00"}, "BAD_IDS", "empty node id"),
    ({"ids": b"E" * 800}, "LENGTH_MISMATCH", "'ids' has 800 bytes"),
    ({"ids": b"EV1\x00EV1\x00EV3"}, "BAD_IDS", "'EV1'"),
    ({"ids": b"EV1\x00\xc3\x28\x00EV3"}, "BAD_IDS", "UTF-8"),
    ({"soc": ...}, "MISSING_FIELD", "'soc'"),
    ({"soc": b"\x00" * 11}, "LENGTH_MISMATCH", "'soc'"),
    ({"online": b"\x01\x01"}, "LENGTH_MISMATCH", "'online'"),
    ({"temp_c": b"\x00" * 16}, "LENGTH_MISMATCH", "'temp_c'"),
    ({"soc": np.float32([0.5, 1.01, 0.5]).tobytes()}, "OUT_OF_RANGE", "'soc' node 'EV2'"),
    ({"soc": np.float32([0.5, 0.5, np.nan]).tobytes()}, "OUT_OF_RANGE", "'soc' node 'EV3'"),
    ({"p_kw": np.float32([-1000.5, 0, 0]).tobytes()}, "OUT_OF_RANGE", "'p_kw' node 'EV1'"),
    ({"temp_c": np.float32([25, 101, 25]).tobytes()}, "OUT_OF_RANGE", "'temp_c' node 'EV2'"),
    ({"cabin_temp_c": np.float32([-61, 0, 0]).tobytes()}, "OUT_OF_RANGE", "'cabin_temp_c'"),
    ({"p_dis_max_kw": np.float32([-1, 0, 0]).tobytes()}, "OUT_OF_RANGE", "'p_dis_max_kw'"),
    ({"p_chg_max_kw": np.float32([np.inf, 0, 0]).tobytes()}, "OUT_OF_RANGE", "'p_chg_max_kw'"),
    ({"soh": np.float32([0, 0, -0.1]).tobytes()}, "OUT_OF_RANGE", "'soh'"),
    ({"v_dc": np.float32([0, 1501, 0]).tobytes()}, "OUT_OF_RANGE", "'v_dc'"),
    ({"cycle_count": np.float32([0, -1, 0]).tobytes()}, "OUT_OF_RANGE", "'cycle_count'"),
    ({"online": bytes([1, 2, 0])}, "OUT_OF_RANGE", "'online' node 'EV2'"),
    ({"fault": bytes([0, 0, 200])}, "OUT_OF_RANGE", "'fault' node 'EV3'"),
    ({"fault": [0, 0, 0]}, "BAD_FIELD", "'fault'"),
])
def test_telemetry_validation_codes(changes, code, needle):
    """Each broken telemetry rule raises its own stable code, and the message names field and node."""
    err = code_of(wire.decode_telemetry, msgpack.packb(telemetry_map(**changes)))
    assert err.code == code
    assert needle in err.message


def test_telemetry_ignores_unknown_keys_and_accepts_every_valid_key():
    """A newer gateway's extra keys are ignored (forward compatible); every key of a full valid map decodes to
    the values sent, with its wire dtype."""
    m = telemetry_map(future_key={"x": [1, 2]}, humidity=b"\x00")
    batch = wire.decode_telemetry(msgpack.packb(m))
    assert (batch.v, batch.gw, batch.seq, batch.t_ns) == (1, "gw1", 7, T_NS)
    assert batch.node_ids == tuple(IDS3) and batch.ids_blob == m["ids"] and batch.quarantined == 0
    assert {f.key for f in wire.TELEMETRY_ARRAYS} == {k for k in m if k not in ("v", "gw", "seq", "t_ns", "ids",
                                                                                 "future_key", "humidity")}
    for field in wire.TELEMETRY_ARRAYS:
        got = getattr(batch, field.key)
        assert got is not None, field.key
        np.testing.assert_array_equal(got, np.frombuffer(m[field.key], field.dtype), err_msg=field.key)
        assert got.dtype == np.dtype(field.dtype), field.key
    assert not any(hasattr(batch, k) for k in ("future_key", "humidity"))


def test_non_strict_telemetry_quarantines_only_the_bad_node():
    """strict=False marks the bad node invalid and INVALID_TELEMETRY, keeps the others, and changes no value."""
    frame = msgpack.packb(telemetry_map(temp_c=np.float32([25, np.nan, 30]).tobytes(),
                                        p_kw=np.float32([1, 2000, 3]).tobytes()))
    assert code_of(wire.decode_telemetry, frame).code == "OUT_OF_RANGE"
    batch = wire.decode_telemetry(frame, strict=False)
    assert batch.quarantined == 1 and batch.invalid.tolist() == [False, True, False]
    assert batch.fault.tolist() == [0, Reason.INVALID_TELEMETRY, Reason.OFFLINE]
    assert batch.p_kw.tolist() == [1, 2000, 3] and np.isnan(batch.temp_c[1]) and batch.soc[1] == np.float32(0.5)
    assert not batch.fault.flags.writeable and not batch.invalid.flags.writeable
    assert wire.decode_telemetry(msgpack.packb(telemetry_map()), strict=False).invalid is None


def test_telemetry_sizes_are_checked_before_any_id_is_split(monkeypatch):
    """A 3.5 MB ids blob behind empty arrays (issue 10: 760,000 ids) is LENGTH_MISMATCH without a split;
    an unknown gateway and too many nodes are refused from the header and the arrays' lengths alone."""
    splits = []
    real = wire.id_chunks
    monkeypatch.setattr(wire, "id_chunks", lambda blob, what: (splits.append(len(blob)), real(blob, what))[1])
    ids = short_ids(760_000)
    hostile = msgpack.packb(telemetry_map(ids=ids, soc=b"", p_kw=b"", online=b"", fault=b"", soh=..., temp_c=...,
                                          p_dis_max_kw=..., p_chg_max_kw=..., v_dc=..., cycle_count=...,
                                          cabin_temp_c=...))
    assert len(hostile) > 3_500_000
    assert code_of(wire.decode_telemetry, hostile).code == "LENGTH_MISMATCH"
    known = {"gw1": 2}
    frame = msgpack.packb(telemetry_map())
    assert code_of(wire.decode_telemetry, frame, max_nodes=known.get).code == "TOO_MANY_NODES"
    assert code_of(wire.decode_telemetry, msgpack.packb(telemetry_map(gw="gw9")),
                   max_nodes=known.get).code == "UNKNOWN_GATEWAY"
    assert splits == []
    batch = wire.decode_telemetry(frame, max_nodes={"gw1": 3}.get, check_ids=False)
    assert splits == [] and batch.node_ids is None and len(batch) == 3
    assert wire.decode_telemetry(frame).node_ids == tuple(IDS3) and splits == [len(wire.join_ids(IDS3))]


def test_ids_are_split_in_bounded_chunks_and_named_by_index():
    """Big blobs split in chunks of about IDS_CHUNK_BYTES; a bad id deep inside is named with its index."""
    ids = [f"EV_NODE_{i:06d}" for i in range(20_000)]
    blob = wire.join_ids(ids)
    chunks = list(wire.id_chunks(blob, "t"))
    assert [i for c in chunks for i in c] == ids
    assert len(chunks) > 5 and max(len("\x00".join(c)) for c in chunks) <= wire.IDS_CHUNK_BYTES + 64
    bad = blob.replace(b"EV_NODE_017000", b"EV_NODE 017000")
    err = code_of(wire.split_ids, bad)
    assert err.code == "BAD_IDS" and "index 17000" in err.message
    assert wire.id_at(blob, 0) == ids[0] and wire.id_at(blob, 17_001) == ids[17_001]
    assert wire.id_at(blob, 19_999) == ids[-1]


def test_frame_size_limits_are_enforced_before_unpacking():
    """A frame over MAX_FRAME_BYTES is TOO_LARGE; a small frame claiming a huge bin or map is BAD_MSGPACK."""
    big = b"\x80" + b"\x00" * wire.MAX_FRAME_BYTES
    for decode in (wire.decode_telemetry, wire.decode_request, wire.decode_reply):
        assert code_of(decode, big).code == "TOO_LARGE"
    assert code_of(wire.decode_setpoints, b"sp/gw1\x00" + big).code == "TOO_LARGE"
    assert code_of(wire.decode_status, wire.STATUS_TOPIC + big).code == "TOO_LARGE"
    assert code_of(wire.decode_telemetry, b"\x81\xa1a\xc6\xff\xff\xff\xff").code == "BAD_MSGPACK"  # bin32 4 GiB
    assert code_of(wire.decode_telemetry, b"\xdf\xff\xff\xff\xff").code == "BAD_MSGPACK"  # map32 4 G entries
    assert code_of(wire.decode_telemetry, msgpack.packb({"v": "x" * 5000})).code == "BAD_MSGPACK"
    assert code_of(wire.decode_telemetry, msgpack.packb([1, 2])).code == "NOT_A_MAP"
    assert code_of(wire.decode_telemetry, "not bytes").code == "BAD_MSGPACK"


def test_control_validation_names_the_command_or_argument():
    """Unknown commands are UNKNOWN_CMD; bad, missing or unknown arguments are BAD_ARG naming the argument."""
    pack = lambda m: msgpack.packb({"v": 1, **m})
    assert code_of(wire.decode_request, pack({"cmd": "shutdown"})).code == "UNKNOWN_CMD"
    assert code_of(wire.encode_request, "shutdown").code == "UNKNOWN_CMD"
    cases = [
        ({"cmd": "test_discharge", "args": {"node_id": "EV1", "kw": 0, "seconds": 5}}, "'kw'"),
        ({"cmd": "test_discharge", "args": {"node_id": "EV1", "kw": -5, "seconds": 5}}, "'kw'"),
        ({"cmd": "test_discharge", "args": {"node_id": "EV1", "kw": "5", "seconds": 5}}, "'kw'"),
        ({"cmd": "test_discharge", "args": {"node_id": "EV1", "kw": 5, "seconds": math.nan}}, "'seconds'"),
        ({"cmd": "test_discharge", "args": {"node_id": "EV1", "kw": 5}}, "'seconds'"),
        ({"cmd": "test_discharge", "args": {"node_id": "E V", "kw": 5, "seconds": 5}}, "'node_id'"),
        ({"cmd": "test_discharge", "args": {"node_id": "EV1", "kw": 5, "seconds": 5, "kW": 1}}, "'kW'"),
        ({"cmd": "telemetry_profile", "args": {"name": "fast"}}, "'name'"),
        ({"cmd": "estop", "args": {"reason": 3}}, "'reason'"),
        ({"cmd": "status", "args": [1]}, "args"),
    ]
    for request, needle in cases:
        err = code_of(wire.decode_request, pack(request))
        assert err.code == "BAD_ARG" and needle in err.message, (request, err)
    assert code_of(wire.decode_request, pack({"cmd": 5})).code == "BAD_FIELD"
    assert code_of(wire.decode_request, pack({"cmd": "status", "id": -3})).code == "BAD_FIELD"
    assert code_of(wire.decode_request, msgpack.packb({"cmd": "status"})).code == "BAD_VERSION"
    assert wire.request_id_of(pack({"cmd": "nope", "id": 9})) == 9
    assert code_of(wire.decode_reply, pack({"ok": 1})).code == "BAD_FIELD"
    assert code_of(wire.decode_reply, pack({"ok": False, "error": {"code": "X"}})).code == "MISSING_FIELD"


def test_status_validation_codes():
    """Status keys are checked by type and range (negative headroom, NaN, wrong types)."""
    for changes, code in [({"available_dis_kw": -1.0}, "OUT_OF_RANGE"), ({"target_kw": math.nan}, "OUT_OF_RANGE"),
                          ({"delivered_kw": math.inf}, "OUT_OF_RANGE"), ({"n_nodes": -1}, "OUT_OF_RANGE"),
                          ({"estop": 1}, "BAD_FIELD"), ({"excluded": {"OFFLINE": -1}}, "OUT_OF_RANGE"),
                          ({"f_hz": "50"}, "BAD_FIELD")]:
        assert code_of(wire.encode_status, STATUS | changes).code == code, changes
        frame = wire.STATUS_TOPIC + msgpack.packb({"v": 1, **STATUS, **changes})
        assert code_of(wire.decode_status, frame).code == code, changes
    assert code_of(wire.encode_status, STATUS | {"typo_kw": 1.0}).code == "BAD_FIELD"
    assert code_of(wire.decode_status, b"stat\x00" + msgpack.packb(STATUS)).code == "UNKNOWN_TOPIC"


# --- fencing ---------------------------------------------------------------------------------------


def test_fence_rejects_older_epochs_and_resets_on_newer_ones():
    """Older epoch -> IDEMPOTENT_KEY_CONFLICT; same epoch not newer -> STALE_SEQUENCE; newer epoch resets seq."""
    fence = wire.SetpointFence()
    msg = lambda ep, seq: wire.decode_setpoints(setpoint_frame(ep=ep, seq=seq))
    fence.admit(msg(5, 100))
    fence.admit(msg(5, 103))  # gaps are fine
    assert code_of(fence.admit, msg(5, 103)).code == "STALE_SEQUENCE"
    assert code_of(fence.admit, msg(4, 10_000)).code == "IDEMPOTENT_KEY_CONFLICT"
    fence.admit(msg(6, 0))  # a new aggregator instance starts its own sequence
    assert (fence.epoch, fence.seq) == (6, 0)
    assert code_of(fence.admit, msg(5, 104)).code == "IDEMPOTENT_KEY_CONFLICT"


# --- fuzzing: only WireError escapes ----------------------------------------------------------------

DECODERS = [wire.decode_setpoints, wire.decode_telemetry, wire.decode_request, wire.decode_reply,
            wire.decode_status]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_wire_errors(decode, frame) -> None:
    try:
        decode(frame)
    except WireError as exc:
        assert exc.code in wire.ERROR_CODES


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"", b"sp/gw1\x00", wire.STATUS_TOPIC]))
def test_fuzz_random_bytes_raise_only_wire_errors(data, prefix):
    """Random bytes (with and without a valid topic) never raise anything but WireError."""
    for decode in DECODERS:
        only_wire_errors(decode, prefix + data)


@FUZZ
@given(st.sampled_from(["setpoint", "telemetry", "status"]), st.data())
def test_fuzz_truncated_and_bit_flipped_frames_raise_only_wire_errors(name, data):
    """Every truncation and random byte corruption of a valid frame decodes or raises WireError only."""
    frame = bytearray(example_frames()[name])
    cut = data.draw(st.integers(0, len(frame)))
    for decode in DECODERS:
        only_wire_errors(decode, bytes(frame[:cut]))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    for decode in DECODERS:
        only_wire_errors(decode, bytes(frame))


@FUZZ
@given(st.sampled_from(["soc", "ids", "v", "gw", "seq", "t_ns", "fault", "online", "temp_c", "p_kw"]),
       msgpack_values)
def test_fuzz_wrong_types_in_known_keys_raise_only_wire_errors(key, value):
    """Any msgpack value in any known key of a telemetry batch or a setpoint map gives WireError or a valid decode."""
    only_wire_errors(wire.decode_telemetry, msgpack.packb(telemetry_map(**{key: value})))
    body = msgpack.unpackb(setpoint_frame()[len(b"sp/gw1\x00"):]) | {key: value}
    only_wire_errors(wire.decode_setpoints, b"sp/gw1\x00" + msgpack.packb(body))


@FUZZ
@given(msgpack_values, st.dictionaries(st.text(max_size=12), msgpack_values, max_size=5))
def test_fuzz_arbitrary_msgpack_objects_raise_only_wire_errors(obj, args):
    """Arbitrary msgpack objects, and requests with arbitrary args, never escape as other exceptions."""
    for decode in DECODERS:
        only_wire_errors(decode, msgpack.packb(obj))
    for cmd in wire.COMMANDS:
        only_wire_errors(wire.decode_request, msgpack.packb({"v": 1, "cmd": cmd, "args": args}))
    only_wire_errors(wire.decode_status, wire.STATUS_TOPIC + msgpack.packb(STATUS | args))


BACKENDS = ["cython", "reference"]


def _frames_for(sizes: dict[str, int], backend: str) -> tuple[wire.SetpointFrames, dict[str, bytes]]:
    ids = {gw: wire.join_ids([f"{gw}_EV_{i:03d}" for i in range(n)]) for gw, n in sizes.items()}
    return wire.SetpointFrames(list(ids.items()), backend=backend), ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather", [False, True])
def test_setpoint_frames_decode_like_encode_setpoints(backend, gather):
    """The aggregator's in-place frames decode to exactly what encode_setpoints gives, cycle after cycle, whether
    the fleet's rows are gathered into gateway order or copied as they are, float64 or float32 setpoints."""
    sizes = {"gw1": 3, "gw10": 300, "gw2": 1, "gw_empty": 0}
    frames, ids = _frames_for(sizes, backend)
    n = sum(sizes.values())
    rng = np.random.default_rng(0)
    rows = rng.permutation(n + 5)[:n] if gather else None  # the fleet has rows no gateway carries
    for seq, dtype in ((1, np.float64), (2, np.float32), (2**40, np.float64)):
        sp = rng.uniform(-22.0, 22.0, n + 5).astype(dtype)  # by fleet row
        rs = rng.choice([0, 3, 9], n + 5).astype(np.uint8)
        frames.write(sp, rs, rows, 9, seq, 10**18, 10**18 + 5 * 10**8, False, slow_n=10)
        p, r = (sp[rows], rs[rows]) if gather else (sp[:n], rs[:n])
        got = [wire.decode_setpoints(f) for f in frames.frames()]
        assert [m.gw for m in got] == list(sizes)
        for k, (gw, blob) in enumerate(ids.items()):
            a, b = frames.starts[k], frames.starts[k + 1]
            want = wire.decode_setpoints(wire.encode_setpoints(gw, 9, seq, 10**18, 10**18 + 5 * 10**8, False,
                                                               blob, p[a:b], r[a:b], slow_n=10))
            for key in ("v", "gw", "ep", "seq", "t_ns", "exp_ns", "estop", "slow_n", "ids_blob"):
                assert getattr(got[k], key) == getattr(want, key), key
            np.testing.assert_array_equal(got[k].p_kw, want.p_kw)
            np.testing.assert_array_equal(got[k].reasons, want.reasons)
        np.testing.assert_array_equal(frames.frame_reasons(), r)


def test_compiled_setpoint_frames_write_the_twins_bytes():
    """The compiled fill leaves the frame buffer byte for byte as the NumPy twin does, for random cycles of a
    fleet in gateway order and of one gathered, with every Reason code and an e-stop's zeros."""
    sizes = {f"gw{k}": int(n) for k, n in enumerate(np.random.default_rng(1).integers(0, 60, 40))}
    fast, _ = _frames_for(sizes, "cython")
    twin, _ = _frames_for(sizes, "reference")
    n = fast.n_nodes
    rng = np.random.default_rng(2)
    codes = np.array([int(c) for c in Reason], np.uint8)
    for cycle in range(20):
        rows = rng.permutation(n) if cycle % 2 else None
        estop = cycle % 5 == 4
        sp = np.zeros(n) if estop else rng.uniform(-1000.0, 1000.0, n)
        rs = rng.choice(codes, n)
        for frames in (fast, twin):
            frames.write(sp, rs, rows, 3, cycle + 1, 10**15 + cycle, 10**15 + 10**9, estop, slow_n=1 + cycle)
        assert bytes(fast.buffer) == bytes(twin.buffer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_setpoint_frames_refuse_wild_values(backend):
    """A NaN, infinite or out-of-range setpoint, an unknown Reason, or power under an e-stop, never leaves as a
    frame: write() raises OUT_OF_RANGE naming the value."""
    frames, _ = _frames_for({"gw1": 2, "gw2": 3}, backend)
    unknown = next(c for c in range(256) if c not in {int(r) for r in Reason})
    for p, r, estop, says in (([0.0, 0.0, 0.0, 0.0, np.nan], 0, False, "p_kw[4]=nan"),
                              ([0.0, 0.0, np.inf, 0.0, 0.0], 0, False, "p_kw[2]=inf"),
                              ([0.0, 5000.0, 0.0, 0.0, 0.0], 0, False, "p_kw[1]=5000.0"),
                              ([0.0, 1000.001, 0.0, 0.0, 0.0], 0, False, "p_kw[1]=1000.0"),
                              ([0.0] * 5, unknown, False, f"unknown Reason code {unknown}"),
                              ([0.0, 0.0, 1.0, 0.0, 0.0], 0, True, "estop is set")):
        with pytest.raises(wire.WireError, match=re.escape(says)) as exc:
            frames.write(np.array(p), np.full(5, r, np.uint8), None, 1, 2, 10, 20, estop)
        assert exc.value.code == "OUT_OF_RANGE"
