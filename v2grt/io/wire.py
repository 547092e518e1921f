"""The wire codec: ZeroMQ frame bytes <-> setpoint, telemetry, control and status messages (no sockets).

docs/wire.md is the protocol; this module is its executable form. Everything here is pure: bytes in,
messages out, or a :class:`WireError` with a stable code. Per-node numbers travel as packed
little-endian arrays inside msgpack ``bin`` (DESIGN.md section 6: 10,000 msgpack tuples cost 3.7 ms
to pack, two packed arrays 11 us), so encoding and decoding never loop over nodes in Python.

Units and signs (DESIGN.md section 4): kW, positive power is DISCHARGE into the grid, negative is
charging; SoC and SoH are fractions 0..1; temperatures degC; times UTC wall-clock nanoseconds.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import msgpack
import numpy as np

from v2grt.codes import Reason

#: The protocol's major version, key ``v`` of every message. Adding keys does not change it (receivers
#: ignore keys they do not know); removing, retyping or re-meaning a key does.
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

#: Largest frame any decoder accepts (the sockets in bus.py also set ZMQ_MAXMSGSIZE to it). 4 MiB holds
#: a setpoint message for ~160,000 nodes with 20-character ids.
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_ID_CHARS = 64  # node and gateway ids: the fleet table's rule (fleet._check_id)
MAX_STR_BYTES = 4096  # any msgpack str (keys, ids, error messages)
MAX_MAP_LEN = 64  # entries in any msgpack map
MAX_ARRAY_LEN = 256  # no message has arrays; a cap keeps a hostile header from allocating
P_LIMIT_KW = 1000.0  # |setpoint| and |measured power| per node, kW (the fleet's p_*_max_kw range)
U64_MAX = 2**64 - 1
I64_MAX = 2**63 - 1

SETPOINT_TOPIC_PREFIX = b"sp/"
STATUS_TOPIC = b"status\x00"

#: Stable error codes (the ``code`` of WireError and of control error replies), documented in wire.md.
ERROR_CODES: dict[str, str] = {
    "TOO_LARGE": "frame larger than MAX_FRAME_BYTES; refused before unpacking",
    "BAD_MSGPACK": "not one complete msgpack object (truncated, trailing bytes, over a size limit, bad UTF-8)",
    "NOT_A_MAP": "the msgpack object is not a map",
    "BAD_VERSION": "key v missing, not an integer, or a major version this receiver does not support",
    "MISSING_FIELD": "a required key is absent",
    "BAD_FIELD": "a key has the wrong msgpack type",
    "LENGTH_MISMATCH": "a bin's length is not a multiple of its item size, or arrays disagree on the node count",
    "OUT_OF_RANGE": "a value is outside its documented range (NaN and infinities included)",
    "BAD_IDS": "ids not valid UTF-8, or an id empty, too long, unprintable, with a space, or repeated",
    "UNKNOWN_GATEWAY": "telemetry from a gateway id the aggregator's roster does not know; dropped before its ids",
    "TOO_MANY_NODES": "a telemetry batch names more nodes than its gateway may send (roster count + margin)",
    "MULTIPART": "a message of more frames than its socket accepts (one; control: envelope + request); dropped whole",
    "UNKNOWN_TOPIC": "a PUB frame whose topic is not sp/<gateway>\\0 or status\\0",
    "TOPIC_MISMATCH": "the gw key differs from the gateway named in the topic",
    "IDEMPOTENT_KEY_CONFLICT": "setpoint epoch older than the newest seen: another (stale) aggregator",
    "STALE_SEQUENCE": "setpoint sequence not newer than the last accepted one of the same epoch",
    "UNKNOWN_CMD": "control request with a cmd this aggregator does not know",
    "BAD_ARG": "control request argument missing, unknown, of the wrong type or out of range",
    "REFUSED": "the aggregator understood the control request but will not do it (message says why)",
    "UNKNOWN_NODE": "control: a node id that is not in the aggregator's fleet",
    "NODE_EXCLUDED": "control: the node is excluded now (its reason named) or has no discharge availability",
    "NOT_READY": "control: the aggregator has not run its first cycle yet; ask again",
    "BAD_PROFILE": "control reload: the discharge profile is invalid; the previous one stays in force",
    "FORBIDDEN": "security: the sender's authenticated key may not do this (its role, its gateway, or revoked)",
    "INTERNAL": "the aggregator failed while handling a control request (a bug; see its log)",
    "TIMEOUT": "client side: the aggregator did not answer a control request in time",
    "HANDSHAKE_REFUSED": "client side: the aggregator refused this key in the CURVE handshake; nothing was delivered",
}


class WireError(ValueError):
    """A frame or message that does not follow docs/wire.md; ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------------
# helpers


def _show(value: Any) -> str:
    """A short, safe rendering of a received value for error messages."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<bin of {len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_buffer(frame: Any, what: str) -> memoryview:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        view = memoryview(frame)
    elif hasattr(frame, "buffer"):  # a zmq.Frame received with copy=False
        view = memoryview(frame.buffer)
    else:
        raise WireError("BAD_MSGPACK", f"{what}: expected a bytes frame, got {type(frame).__name__}")
    if view.nbytes > MAX_FRAME_BYTES:
        raise WireError("TOO_LARGE", f"{what}: frame of {view.nbytes} bytes exceeds the limit of "
                                     f"{MAX_FRAME_BYTES} bytes")
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except TypeError:
        raise WireError("BAD_MSGPACK", f"{what}: expected a contiguous bytes buffer") from None


def _unpack_map(view: memoryview, what: str) -> dict:
    try:
        obj = msgpack.unpackb(view, raw=False, strict_map_key=True, max_str_len=MAX_STR_BYTES,
                              max_bin_len=MAX_FRAME_BYTES, max_array_len=MAX_ARRAY_LEN,
                              max_map_len=MAX_MAP_LEN, max_ext_len=0)
    except Exception as exc:
        raise WireError("BAD_MSGPACK", f"{what}: not a complete msgpack object "
                                       f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise WireError("NOT_A_MAP", f"{what}: expected a msgpack map, got {type(obj).__name__} {_show(obj)}")
    return obj


def _version(m: dict, what: str) -> int:
    v = m.get("v")
    if type(v) is not int or v not in SUPPORTED_VERSIONS:
        raise WireError("BAD_VERSION", f"{what}: field 'v'={_show(v)}: expected one of "
                                       f"{sorted(SUPPORTED_VERSIONS)} (protocol major version)")
    return v


def _get(m: dict, key: str, what: str) -> Any:
    try:
        return m[key]
    except KeyError:
        raise WireError("MISSING_FIELD", f"{what}: required field {key!r} is missing") from None


def _uint(m: dict, key: str, what: str, hi: int = U64_MAX, default: int | None = None) -> int:
    value = m.get(key, default) if default is not None else _get(m, key, what)
    if type(value) is not int:
        raise WireError("BAD_FIELD", f"{what}: field {key!r}={_show(value)}: expected an unsigned integer")
    if not 0 <= value <= hi:
        raise WireError("OUT_OF_RANGE", f"{what}: field {key!r}={value}: expected 0..{hi}")
    return value


def _float(m: dict, key: str, what: str, lo: float, hi: float, unit: str, *, nil_ok: bool = False):
    value = _get(m, key, what)
    if value is None and nil_ok:
        return None
    if type(value) not in (float, int):
        raise WireError("BAD_FIELD", f"{what}: field {key!r}={_show(value)}: expected a number"
                                     f"{' or nil' if nil_ok else ''} ({unit})")
    if not lo <= value <= hi:  # NaN fails both
        raise WireError("OUT_OF_RANGE", f"{what}: field {key!r}={value!r}: expected a finite value in "
                                        f"{lo:g}..{hi:g} {unit}")
    return float(value)


def _typed(m: dict, key: str, what: str, kind: type, kind_name: str, *, required: bool = True):
    if key not in m and not required:
        return None
    value = _get(m, key, what)
    if type(value) is not kind:
        raise WireError("BAD_FIELD", f"{what}: field {key!r}={_show(value)}: expected {kind_name}")
    return value


def _valid_id(value: Any) -> bool:
    # Mirrors fleet._check_id so anything the wire accepts the fleet table accepts.
    return (isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable()
            and " " not in value)


def _check_gateway_id(value: Any, what: str) -> str:
    if not _valid_id(value):
        raise WireError("BAD_FIELD", f"{what}: gateway id {_show(value)}: expected a non-empty printable "
                                     f"string of at most {MAX_ID_CHARS} characters without spaces")
    return value


# ---------------------------------------------------------------------------------------------------
# node ids: UTF-8, joined by NUL, no trailing NUL; an empty blob is zero nodes

MAX_ID_BYTES = 4 * MAX_ID_CHARS  # UTF-8: at most 4 bytes a character

#: Bytes of an ids blob handled per C call when ids are split and checked (about 1,500 20-character
#: ids, ~0.1 ms). Receivers share the control thread's interpreter: a Python-level loop over chunks
#: hands the GIL over at the switch interval, one call over a whole blob does not (splitting and
#: checking 760,000 ids in one go held it for 90 ms; issue 10).
IDS_CHUNK_BYTES = 32 * 1024
_NUL_WINDOW_BYTES = 1 << 20  # NULs are counted in 1 MiB windows: ~0.1 ms each, vectorised

# A gateway resends the same ids blob every cycle: parsing and checking 10,000 ids costs ~1 ms, a
# dict hit ~0.1 ms. A gateway hears one aggregator about its own ids, so a few entries suffice; the
# bound keeps a peer that varies its ids from growing the cache. Shared by threads (dict operations
# are atomic; a lost entry only costs a parse).
_ids_cache: dict[bytes, tuple[str, ...]] = {}
_IDS_CACHE_ENTRIES = 8


def join_ids(node_ids: Iterable[str]) -> bytes:
    """Join node ids into the ``ids`` blob (UTF-8, separated by NUL). Cache it: it changes with the roster."""
    ids = list(node_ids)
    for i, nid in enumerate(ids):
        if not _valid_id(nid):
            raise WireError("BAD_IDS", f"node id {_show(nid)} at index {i}: expected a non-empty printable "
                                       f"string of at most {MAX_ID_CHARS} characters without spaces")
    if len(set(ids)) != len(ids):
        raise WireError("BAD_IDS", f"node ids repeat: {_first_duplicate(ids)!r} appears more than once")
    return "\x00".join(ids).encode("utf-8")


def _first_duplicate(ids: list[str]) -> str:
    seen: set[str] = set()
    for nid in ids:
        if nid in seen:
            return nid
        seen.add(nid)
    return ""


def _count_nuls(blob: bytes) -> int:
    """NUL bytes in ``blob``, counted vectorised in bounded windows (bytes.count runs at ~2 GB/s)."""
    arr = np.frombuffer(blob, np.uint8)
    return sum(int(np.count_nonzero(arr[i:i + _NUL_WINDOW_BYTES] == 0))
               for i in range(0, arr.size, _NUL_WINDOW_BYTES))


def _count_ids(blob: bytes) -> int:
    return _count_nuls(blob) + 1 if blob else 0


def check_ids_shape(blob: bytes, n: int, what: str) -> None:
    """Raise LENGTH_MISMATCH unless ``blob`` can hold exactly ``n`` ids; no id is looked at.

    O(1) on the length (each id is 1..MAX_ID_BYTES bytes, NUL-separated), then one vectorised count
    of the NULs: this is what a receiver checks before any per-id work, so a frame of 760,000 ids
    that claims 0 nodes costs microseconds.
    """
    size = len(blob)
    if n == 0:
        if size:
            raise WireError("LENGTH_MISMATCH", f"{what}: field 'ids' has {size} bytes but the arrays hold 0 "
                                               "nodes: expected an empty bin")
        return
    lo, hi = 2 * n - 1, n * (MAX_ID_BYTES + 1) - 1
    if not lo <= size <= hi:
        raise WireError("LENGTH_MISMATCH", f"{what}: field 'ids' has {size} bytes: {n} nodes (from the arrays) "
                                           f"need {lo}..{hi} (1..{MAX_ID_BYTES} bytes an id, NUL between)")
    nuls = _count_nuls(blob)
    if nuls != n - 1:
        raise WireError("LENGTH_MISMATCH", f"{what}: field 'ids' holds {nuls + 1} ids: expected {n}, the node "
                                           "count of the arrays")


def id_chunks(blob: bytes, what: str) -> Iterator[list[str]]:
    """The ids of ``blob`` in order, as lists of about IDS_CHUNK_BYTES each, every id checked.

    Raises BAD_IDS for invalid UTF-8 or an id that is empty, too long, unprintable or has a space
    (repeats are the caller's: see :func:`_parse_ids`). Each chunk is one bounded C call (decode,
    split, checks), so a caller looping over chunks never holds the GIL for long.
    """
    size = len(blob)
    if not size:
        return
    if blob[-1] == 0:
        raise WireError("BAD_IDS", f"{what}: field 'ids' ends with NUL: an empty node id (no trailing NUL allowed)")
    pos = index = 0
    while pos < size:
        end = blob.find(b"\x00", pos + IDS_CHUNK_BYTES) if pos + IDS_CHUNK_BYTES < size else -1
        if end < 0:
            end = size
        try:
            text = blob[pos:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("BAD_IDS", f"{what}: field 'ids' is not valid UTF-8 ({exc})") from None
        ids = text.split("\x00")
        # Whole-chunk checks run in C; the per-id loop below runs only to name the culprit.
        if not (" " not in text and "" not in ids and max(map(len, ids)) <= MAX_ID_CHARS
                and text.replace("\x00", "").isprintable()):
            for i, nid in enumerate(ids):
                if not _valid_id(nid):
                    raise WireError("BAD_IDS", f"{what}: node id {_show(nid)} at index {index + i}: expected a "
                                               f"non-empty printable string of at most {MAX_ID_CHARS} characters "
                                               "without spaces or NUL")
        yield ids
        index += len(ids)
        pos = end + 1


def _parse_ids(blob: bytes, what: str, *, cache: bool = False) -> tuple[str, ...]:
    """Split and check every id of ``blob`` (in chunks), repeats included; ``cache``: the setpoint path's."""
    if cache:
        hit = _ids_cache.get(blob)
        if hit is not None:
            return hit
    out: list[str] = []
    seen: set[str] = set()
    for ids in id_chunks(blob, what):
        out += ids
        seen.update(ids)
        if len(seen) != len(out):
            raise WireError("BAD_IDS", f"{what}: node id {_first_duplicate(out)!r} appears more than once")
    parsed = tuple(out)
    if cache:
        if len(_ids_cache) >= _IDS_CACHE_ENTRIES:
            _ids_cache.clear()
        _ids_cache[bytes(blob)] = parsed
    return parsed


def split_ids(blob: bytes) -> list[str]:
    """Split (and validate) an ``ids`` blob into node ids; inverse of :func:`join_ids`."""
    return list(_parse_ids(bytes(blob), "ids"))


def id_at(blob: bytes, i: int) -> str:
    """The ``i``-th id of a blob whose shape was checked (for error messages; no full split)."""
    arr = np.frombuffer(blob, np.uint8)
    start, seen = 0, 0  # NULs seen before the window
    if i > 0:
        for w in range(0, arr.size, IDS_CHUNK_BYTES):
            nul = np.flatnonzero(arr[w:w + IDS_CHUNK_BYTES] == 0)
            if seen + nul.size >= i:
                start = w + int(nul[i - seen - 1]) + 1
                break
            seen += nul.size
    end = blob.find(b"\x00", start)
    return bytes(blob[start:end if end >= 0 else len(blob)]).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------
# per-node arrays

_KNOWN_REASON = np.zeros(256, dtype=bool)
_KNOWN_REASON[[int(r) for r in Reason]] = True
_MAX_REASON = max(Reason)
_REASONS_CONTIGUOUS = bool(_KNOWN_REASON[:_MAX_REASON + 1].all())  # then one max() checks an array


def _reasons_ok(arr: np.ndarray) -> bool:
    return arr.size == 0 or bool(arr.max() <= _MAX_REASON if _REASONS_CONTIGUOUS else _KNOWN_REASON[arr].all())


@dataclasses.dataclass(frozen=True)
class ArrayField:
    """One per-node array: msgpack key, little-endian dtype, inclusive valid range, unit, meaning."""

    key: str
    dtype: str
    lo: float
    hi: float
    unit: str
    doc: str
    required: bool = True


#: Telemetry arrays, in the order the encoder writes them. Ranges are part of the protocol; the tests
#: check they agree with the fleet table's columns (v2grt.fleet.COLUMNS).
TELEMETRY_ARRAYS: tuple[ArrayField, ...] = (
    ArrayField("soc", "<f4", 0.0, 1.0, "fraction", "state of charge"),
    ArrayField("p_kw", "<f4", -P_LIMIT_KW, P_LIMIT_KW, "kW", "measured power, + = discharge into the grid"),
    ArrayField("online", "u1", 0, 1, "0/1", "1 if plugged in and the charger answers"),
    ArrayField("fault", "u1", 0, 255, "Reason", "a Reason code (table in wire.md), 0 = no fault"),
    ArrayField("soh", "<f4", 0.0, 1.0, "fraction", "state of health", False),
    ArrayField("temp_c", "<f4", -60.0, 100.0, "degC", "battery temperature", False),
    ArrayField("p_dis_max_kw", "<f4", 0.0, P_LIMIT_KW, "kW", "BMS discharge limit at the grid, >= 0", False),
    ArrayField("p_chg_max_kw", "<f4", 0.0, P_LIMIT_KW, "kW", "BMS charge limit at the grid, >= 0 (magnitude)",
               False),
    ArrayField("v_dc", "<f4", 0.0, 1500.0, "V", "battery (DC link) voltage", False),
    ArrayField("cycle_count", "<f4", 0.0, 1e6, "cycles", "equivalent full cycles so far", False),
    ArrayField("cabin_temp_c", "<f4", -60.0, 100.0, "degC", "vehicle cabin temperature", False),
)
TELEMETRY_ARRAY_BY_KEY = {f.key: f for f in TELEMETRY_ARRAYS}
SLOW_TELEMETRY_KEYS = tuple(f.key for f in TELEMETRY_ARRAYS if not f.required)

SETPOINT_ARRAYS: tuple[ArrayField, ...] = (
    ArrayField("p_kw", "<f4", -P_LIMIT_KW, P_LIMIT_KW, "kW", "setpoint, + = discharge into the grid, absolute"),
    ArrayField("rs", "u1", 0, 255, "Reason", "why the node carries no (or one-way) power; 0 = OK"),
)


def _node_count(m: dict, field: ArrayField, what: str) -> int:
    """The node count a message's first required array implies (O(1)); the other arrays must agree."""
    raw = _get(m, field.key, what)
    itemsize = np.dtype(field.dtype).itemsize
    if type(raw) is not bytes:
        raise WireError("BAD_FIELD", f"{what}: field {field.key!r}={_show(raw)}: expected bin "
                                     f"(packed {field.dtype} array)")
    if len(raw) % itemsize:
        raise WireError("LENGTH_MISMATCH", f"{what}: field {field.key!r} has {len(raw)} bytes: expected a "
                                           f"multiple of {itemsize} (one {field.dtype} per node)")
    return len(raw) // itemsize


def _array(m: dict, field: ArrayField, n: int, what: str) -> np.ndarray:
    raw = _get(m, field.key, what)
    if type(raw) is not bytes:
        raise WireError("BAD_FIELD", f"{what}: field {field.key!r}={_show(raw)}: expected bin "
                                     f"(packed {field.dtype} array)")
    itemsize = np.dtype(field.dtype).itemsize
    if len(raw) != n * itemsize:
        raise WireError("LENGTH_MISMATCH", f"{what}: field {field.key!r} has {len(raw)} bytes: expected "
                                           f"{n} nodes x {itemsize} bytes = {n * itemsize}")
    return np.frombuffer(raw, dtype=field.dtype)


def _bad_mask(arr: np.ndarray, field: ArrayField) -> np.ndarray | None:
    """Mask of invalid entries, or None when all are valid (the common case costs two reductions)."""
    if arr.size == 0:
        return None
    if field.unit == "Reason":
        return None if _reasons_ok(arr) else ~_KNOWN_REASON[arr]
    if field.lo <= arr.min() and arr.max() <= field.hi:  # NaN makes min/max NaN and fails
        return None
    return ~((arr >= field.lo) & (arr <= field.hi))


def _range_error(field: ArrayField, arr: np.ndarray, bad: np.ndarray, ids_blob: bytes,
                 what: str) -> WireError:
    i = int(np.flatnonzero(bad)[0])
    expect = "a known Reason code (wire.md)" if field.unit == "Reason" else \
        f"a finite value in {field.lo:g}..{field.hi:g} {field.unit}"
    return WireError("OUT_OF_RANGE", f"{what}: field {field.key!r} node {id_at(ids_blob, i)!r} (index {i}) = "
                                     f"{arr[i].item()!r}: expected {expect} ({int(bad.sum())} bad of {arr.size})")


def _packed(arr: Any, dtype: str, n: int, key: str, what: str) -> np.ndarray:
    try:
        out = np.ascontiguousarray(arr, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError("BAD_FIELD", f"{what}: {key} cannot be packed as {dtype}: {exc}") from None
    if out.shape != (n,):
        raise WireError("LENGTH_MISMATCH", f"{what}: {key} has shape {out.shape}: expected ({n},) "
                                           "(one value per node id)")
    return out


# ---------------------------------------------------------------------------------------------------
# setpoints: aggregator PUB -> gateway SUB


_topic_cache: dict[str, bytes] = {}


def setpoint_topic(gateway_id: str) -> bytes:
    """The topic (and SUB filter) of a gateway's setpoints: ``b"sp/" + id + b"\\0"``."""
    topic = _topic_cache.get(gateway_id)
    if topic is None:
        _check_gateway_id(gateway_id, "setpoint topic")
        topic = SETPOINT_TOPIC_PREFIX + gateway_id.encode("utf-8") + b"\x00"
        if len(_topic_cache) < 100_000:
            _topic_cache[gateway_id] = topic
    return topic


@dataclasses.dataclass(frozen=True, slots=True)
class SetpointMsg:
    """One gateway's setpoints for one cycle. Arrays are read-only views of the decoded bins (no copy)."""

    v: int
    gw: str
    ep: int  # epoch (fencing token), uint64
    seq: int  # per-epoch sequence, +1 per cycle
    t_ns: int  # UTC ns when published
    exp_ns: int  # UTC ns after which the gateway falls back to 0 kW
    estop: bool  # every setpoint 0, stop discharge at once
    slow_n: int  # send the slow telemetry fields every slow_n-th batch (1 = profile default)
    ids_blob: bytes
    p_kw: np.ndarray  # (n,) float32, kW, + = discharge, absolute
    reasons: np.ndarray  # (n,) uint8 Reason codes

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Node ids in array order (cached for the last few distinct ids blobs)."""
        return _parse_ids(self.ids_blob, "setpoints", cache=True)

    def __len__(self) -> int:
        return self.p_kw.shape[0]

    def expired(self, now_ns: int) -> bool:
        """True once UTC ``now_ns`` is past ``exp_ns``: the gateway must hold every node at 0 kW."""
        return now_ns > self.exp_ns


def encode_setpoints(gateway_id: str, epoch: int, seq: int, t_ns: int, exp_ns: int, estop: bool,
                     ids_blob: bytes, p_kw: np.ndarray, reasons: np.ndarray, *, slow_n: int = 1) -> bytes:
    """Encode one gateway's setpoints as one frame: topic ``sp/<gw>\\0`` then a msgpack map.

    ``p_kw`` (kW, + = discharge, absolute) is sent as float32 LE and ``reasons`` as uint8, in the order
    of ``ids_blob`` (from :func:`join_ids`, cached by the caller). ``slow_n`` tells the gateway how
    often to include the slow telemetry fields (1: every batch). Cost is O(n) in C, no Python per node.
    """
    what = f"setpoints for {gateway_id!r}"
    topic = setpoint_topic(gateway_id)
    n = _count_ids(ids_blob)
    p = _packed(p_kw, "<f4", n, "p_kw", what)
    r = _packed(reasons, "u1", n, "reasons", what)
    for key, value, hi in (("epoch", epoch, U64_MAX), ("seq", seq, U64_MAX), ("t_ns", t_ns, I64_MAX),
                           ("exp_ns", exp_ns, I64_MAX), ("slow_n", slow_n, 1_000_000)):
        if type(value) is not int or not 0 <= value <= hi:
            raise WireError("OUT_OF_RANGE", f"{what}: {key}={_show(value)}: expected an integer 0..{hi}")
    if exp_ns < t_ns or slow_n < 1:
        raise WireError("OUT_OF_RANGE", f"{what}: exp_ns={exp_ns} before t_ns={t_ns}, or slow_n={slow_n} < 1")
    _check_setpoints(p, r, estop, what)
    return topic + msgpack.packb({
        "v": VERSION, "gw": gateway_id, "ep": epoch, "seq": seq, "t_ns": t_ns, "exp_ns": exp_ns,
        "estop": bool(estop), "slow_n": slow_n, "ids": ids_blob, "p_kw": memoryview(p), "rs": memoryview(r),
    })


class SetpointFrames:
    """Every gateway's setpoint frame laid out once in one buffer, refilled each cycle (the aggregator's path).

    ``gateways`` is a list of (gateway_id, ids_blob). Each cycle ``write`` takes the kernel's setpoints
    (kW, + discharge) and reasons by fleet row, with ``rows`` listing the fleet row of each node in the
    frames' gateway order (the ``starts`` offsets; None: row j is node j), checks every value and lays the
    whole cycle out in the buffer; then each gateway's frame is ``buffer[f0[k]:f1[k]]`` (``spans``).
    A frame decodes to exactly what :func:`encode_setpoints` gives for the same inputs; the bytes
    differ only in fixed-width integer forms (uint64, uint32, bin32), so values sit at fixed offsets.

    ``backend="cython"`` (the default) writes the cycle in one compiled pass without the GIL
    (v2grt.io._frames: gather, float32 conversion, the checks, the header, every frame's slices), and
    bus.SetpointPublisher.send_frames sends every frame in one compiled call; ``"reference"`` is the NumPy
    twin, byte for byte the same buffer (tests/test_wire.py). As for the kernel (v2grt.kernel), the
    compiled path is never left silently: without the built module, ``"cython"`` raises ImportError.
    ``v2grt bench cycle --nodes 100000 --gateways 1000`` times it (docs/benchmarks.md).
    """

    def __init__(self, gateways: list[tuple[str, bytes]], *, backend: str | None = None):
        from v2grt import kernel

        self.backend = backend or kernel.default_backend()
        if self.backend not in kernel.BACKENDS:
            raise ValueError(f"SetpointFrames backend {self.backend!r}: expected one of {list(kernel.BACKENDS)}")
        self._c = None
        if self.backend == "cython":
            self._c = compiled_frames()
        pk = msgpack.packb
        counts = [_count_ids(ids_blob) for _, ids_blob in gateways]
        self.gateway_ids = [gw for gw, _ in gateways]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # node offsets per gateway
        self.n_nodes = int(self.starts[-1])
        # The six per-cycle fields are the same bytes for every gateway: one block, written once a cycle.
        self._common = bytearray(
            pk("ep") + b"\xcf" + bytes(8) + pk("seq") + b"\xcf" + bytes(8) + pk("t_ns") + b"\xcf" + bytes(8)
            + pk("exp_ns") + b"\xcf" + bytes(8) + pk("estop") + b"\xc2" + pk("slow_n") + b"\xce" + bytes(4))
        c = self._common
        # offsets of the values (after each key and its one-byte type marker)
        self._c_ep, self._c_seq, self._c_t, self._c_exp, self._c_slow = (
            c.index(pk(key)) + len(pk(key)) + 1 for key in ("ep", "seq", "t_ns", "exp_ns", "slow_n"))
        self._c_estop = c.index(pk("estop")) + len(pk("estop"))  # the bool is its own marker
        parts: list[bytes] = []
        layout = []  # (frame start, common offset, p offset, r offset, frame end) per gateway
        pos = 0
        for (gw, ids_blob), n in zip(gateways, counts):
            head = setpoint_topic(gw) + b"\x8b" + pk("v") + pk(VERSION) + pk("gw") + pk(gw)
            ids = pk("ids") + b"\xc6" + struct.pack(">I", len(ids_blob)) + ids_blob
            p_hdr = pk("p_kw") + b"\xc6" + struct.pack(">I", 4 * n)
            r_hdr = pk("rs") + b"\xc6" + struct.pack(">I", n)
            off_common = pos + len(head)
            off_p = off_common + len(c) + len(ids) + len(p_hdr)
            off_r = off_p + 4 * n + len(r_hdr)
            end = off_r + n
            parts += [head, bytes(c), ids, p_hdr, bytes(4 * n), r_hdr, bytes(n)]
            layout.append((pos, off_common, off_p, off_r, end))
            pos = end
        self._buf = bytearray(b"".join(parts))
        self._mv = memoryview(self._buf)
        cols = np.array(layout, np.int64).reshape(-1, 5).T.copy()
        self.f0, self._off_common, self._off_p, self._off_r, self.f1 = cols  # each int64 (gateways,)
        self._no_rows = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.gateway_ids)

    @property
    def buffer(self) -> bytearray:
        """The laid-out frames, back to back (frame k is ``buffer[f0[k]:f1[k]]``)."""
        return self._buf

    def write(self, setpoints_kw: np.ndarray, reasons: np.ndarray, rows: np.ndarray | None, epoch: int, seq: int,
              t_ns: int, exp_ns: int, estop: bool, *, slow_n: int = 1) -> None:
        """Lay this cycle out in every gateway's frame: node j of the frames gets ``setpoints_kw[rows[j]]`` (as
        float32) and ``reasons[rows[j]]`` (rows None: row j), and every frame the header fields.

        Raises WireError before the buffer may be sent if a value is wild (NaN, |p| > 1000 kW, an unknown
        Reason, power under an e-stop): a kernel bug must never reach a gateway as a setpoint. The frames are
        then partly written and must not be sent (the caller raises with them).
        """
        if not (0 <= epoch <= U64_MAX and 0 <= seq <= U64_MAX and 0 <= t_ns <= exp_ns <= I64_MAX
                and 1 <= slow_n <= 1_000_000):
            raise WireError("OUT_OF_RANGE", f"setpoints: epoch={epoch} seq={seq} t_ns={t_ns} exp_ns={exp_ns} "
                                            f"slow_n={slow_n}: out of range")
        c = self._common
        struct.pack_into(">Q", c, self._c_ep, epoch)
        struct.pack_into(">Q", c, self._c_seq, seq)
        struct.pack_into(">Q", c, self._c_t, t_ns)
        struct.pack_into(">Q", c, self._c_exp, exp_ns)
        c[self._c_estop] = 0xC3 if estop else 0xC2
        struct.pack_into(">I", c, self._c_slow, slow_n)
        if self._c is None:
            p, r = self._gather(setpoints_kw, reasons, rows)
            _check_setpoints(p, r, estop, "setpoints")
            self._lay_out_reference(p, r)
            return
        gather = rows is not None
        bad = self._c.fill(setpoints_kw, reasons, rows if gather else self._no_rows, gather, self._buf, self.starts,
                           self._off_common, self._off_p, self._off_r, c, _KNOWN_REASON_U8, P_LIMIT_KW, estop)
        if bad >= 0:  # the twin's checks name the value and what was expected
            _check_setpoints(*self._gather(setpoints_kw, reasons, rows), estop, "setpoints")
            raise WireError("OUT_OF_RANGE", f"setpoints: node {bad} (row {rows[bad] if gather else bad}) is wild")

    def _gather(self, setpoints_kw, reasons, rows) -> tuple[np.ndarray, np.ndarray]:
        """The cycle's values in the frames' node order, as they go on the wire: float32 kW and uint8 reasons."""
        n = self.n_nodes
        if rows is None:
            if len(setpoints_kw) < n or len(reasons) < n:
                raise ValueError(f"setpoints: {len(setpoints_kw)} setpoints and {len(reasons)} reasons for "
                                 f"{n} nodes in the frames")
            return np.asarray(setpoints_kw[:n], "<f4"), np.asarray(reasons[:n], "u1")
        return np.asarray(np.take(setpoints_kw, rows), "<f4"), np.asarray(np.take(reasons, rows), "u1")

    def _lay_out_reference(self, p: np.ndarray, r: np.ndarray) -> None:
        """The twin of the compiled pass's writes to the buffer (after its checks), one gateway at a time."""
        buf, c, pb, rb = self._buf, self._common, memoryview(p).cast("B"), memoryview(r)
        n_common = len(c)
        for k in range(len(self.gateway_ids)):
            a, b = int(self.starts[k]), int(self.starts[k + 1])
            oc, op, orr = int(self._off_common[k]), int(self._off_p[k]), int(self._off_r[k])
            buf[oc:oc + n_common] = c
            buf[op:op + 4 * (b - a)] = pb[4 * a:4 * b]
            buf[orr:orr + (b - a)] = rb[a:b]

    def frame_reasons(self) -> np.ndarray:
        """The reasons in the frames now, in the frames' node order (uint8): the final zero keeps them."""
        out = np.zeros(self.n_nodes, np.uint8)
        for k in range(len(self.gateway_ids)):
            a, b = int(self.starts[k]), int(self.starts[k + 1])
            out[a:b] = np.frombuffer(self._buf, np.uint8, b - a, int(self._off_r[k]))
        return out

    def frames(self) -> Iterator[bytes]:
        """Each gateway's frame as it is in the buffer now (a copy each), in gateway order."""
        mv = self._mv
        for f0, f1 in zip(self.f0.tolist(), self.f1.tolist()):
            yield bytes(mv[f0:f1])


_KNOWN_REASON_U8 = np.zeros(256, np.uint8)
_KNOWN_REASON_U8[[int(r) for r in Reason]] = 1


def compiled_frames():
    """v2grt.io._frames, or ImportError saying how to build it (little-endian hosts only: it writes the
    float32 setpoints in the machine's byte order, and the wire's is little-endian)."""
    import sys

    if sys.byteorder != "little":
        raise ImportError("v2grt.io._frames writes float32 in the machine's byte order; this host is big-endian: "
                          "set V2GRT_BACKEND=reference")
    try:
        from v2grt.io import _frames
    except ImportError as exc:
        raise ImportError(f"v2grt.io._frames (the setpoint frames' compiled fill and send) is not built ({exc}). "
                          "Build it with `pip install -e .` (or `python setup.py build_ext --inplace`) from the "
                          "source checkout; to run the NumPy twin on purpose, set V2GRT_BACKEND=reference.") from exc
    return _frames


def _check_setpoints(p: np.ndarray, r: np.ndarray, estop: bool, what: str) -> None:
    """The checks every outgoing setpoint array passes (one pass each, in C)."""
    if len(p) and not (np.abs(p).max() <= P_LIMIT_KW):  # also False for NaN
        i = int(np.flatnonzero(~(np.abs(p) <= P_LIMIT_KW))[0])
        raise WireError("OUT_OF_RANGE", f"{what}: p_kw[{i}]={p[i].item()!r}: expected finite, "
                                        f"|p| <= {P_LIMIT_KW:g} kW")
    if not _reasons_ok(r):
        raise WireError("OUT_OF_RANGE", f"{what}: reasons hold an unknown Reason code "
                                        f"{int(r[~_KNOWN_REASON[r]][0])}")
    if estop and p.any():
        raise WireError("OUT_OF_RANGE", f"{what}: estop is set but some p_kw are non-zero")


def decode_setpoints(frame: bytes) -> SetpointMsg:
    """Decode and validate one setpoint frame (topic + map); raises WireError, nothing else."""
    view = _as_buffer(frame, "setpoints")
    head = bytes(view[:len(SETPOINT_TOPIC_PREFIX) + MAX_ID_CHARS * 4 + 1])
    nul = head.find(b"\x00")
    if not head.startswith(SETPOINT_TOPIC_PREFIX) or nul < 0:
        raise WireError("UNKNOWN_TOPIC", f"setpoints: frame starts {head[:16]!r}: expected the topic "
                                         "b'sp/<gateway id>\\x00'")
    try:
        topic_gw = head[len(SETPOINT_TOPIC_PREFIX):nul].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("UNKNOWN_TOPIC", f"setpoints: topic {head[:nul]!r} is not valid UTF-8") from None
    what = f"setpoints for {topic_gw!r}"
    m = _unpack_map(view[nul + 1:], what)
    v = _version(m, what)
    gw = _typed(m, "gw", what, str, "a str (gateway id)")
    if gw != topic_gw:
        raise WireError("TOPIC_MISMATCH", f"{what}: field 'gw'={gw!r} differs from the topic's gateway")
    ep = _uint(m, "ep", what)
    seq = _uint(m, "seq", what)
    t_ns = _uint(m, "t_ns", what, I64_MAX)
    exp_ns = _uint(m, "exp_ns", what, I64_MAX)
    if exp_ns < t_ns:
        raise WireError("OUT_OF_RANGE", f"{what}: field 'exp_ns'={exp_ns} is before 't_ns'={t_ns}")
    estop = _typed(m, "estop", what, bool, "a bool")
    slow_n = _uint(m, "slow_n", what, 1_000_000, default=1)
    if slow_n < 1:
        raise WireError("OUT_OF_RANGE", f"{what}: field 'slow_n'=0: expected 1..1000000")
    ids_blob = _typed(m, "ids", what, bytes, "bin (node ids joined by NUL)")
    p_field, r_field = SETPOINT_ARRAYS
    n = _node_count(m, p_field, what)
    p = _array(m, p_field, n, what)
    r = _array(m, r_field, n, what)
    check_ids_shape(ids_blob, n, what)
    _parse_ids(ids_blob, what, cache=True)
    for field, arr in ((p_field, p), (r_field, r)):
        bad = _bad_mask(arr, field)
        if bad is not None:
            raise _range_error(field, arr, bad, ids_blob, what)
    return SetpointMsg(v, gw, ep, seq, t_ns, exp_ns, estop, slow_n, ids_blob, p, r)


class SetpointFence:
    """A gateway's acceptance rule for setpoints (wire.md, "Epochs, sequences, expiry").

    Newest epoch wins: an older epoch is a stale or second aggregator (IDEMPOTENT_KEY_CONFLICT); a
    newer one resets the sequence; within an epoch only a higher ``seq`` is accepted (gaps are fine:
    setpoints are absolute). One fence per gateway, owned by its subscriber thread.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.seq: int | None = None

    def admit(self, msg: SetpointMsg) -> None:
        """Record ``msg`` as the newest, or raise WireError if the gateway must ignore it."""
        if self.epoch is not None:
            if msg.ep < self.epoch:
                raise WireError("IDEMPOTENT_KEY_CONFLICT", f"setpoints for {msg.gw!r}: epoch {msg.ep} older "
                                                           f"than the newest seen, {self.epoch}: ignored")
            if msg.ep == self.epoch and msg.seq <= self.seq:
                raise WireError("STALE_SEQUENCE", f"setpoints for {msg.gw!r}: seq {msg.seq} of epoch {msg.ep} "
                                                  f"not newer than {self.seq}: ignored")
        self.epoch, self.seq = msg.ep, msg.seq


# ---------------------------------------------------------------------------------------------------
# telemetry: gateway PUSH -> aggregator PULL


@dataclasses.dataclass(frozen=True, slots=True)
class TelemetryBatch:
    """One gateway's telemetry batch: ``n`` nodes, arrays (n,) read-only views in the order of ``ids_blob``.

    Optional (slow) arrays are None when the batch does not carry them. ``node_ids`` is the split
    ``ids_blob``, or None when the decoder was told to leave the ids to its caller (``check_ids=False``).
    ``invalid`` (non-strict decoding only) marks the nodes with a bad value, None when there are none:
    their values are as sent (NaN included) and must not be used, their ``fault`` reads INVALID_TELEMETRY.
    """

    v: int
    gw: str
    seq: int
    t_ns: int
    ids_blob: bytes
    n: int
    node_ids: tuple[str, ...] | None
    soc: np.ndarray
    p_kw: np.ndarray
    online: np.ndarray
    fault: np.ndarray
    soh: np.ndarray | None = None
    temp_c: np.ndarray | None = None
    p_dis_max_kw: np.ndarray | None = None
    p_chg_max_kw: np.ndarray | None = None
    v_dc: np.ndarray | None = None
    cycle_count: np.ndarray | None = None
    cabin_temp_c: np.ndarray | None = None
    invalid: np.ndarray | None = None

    @property
    def quarantined(self) -> int:
        """Nodes a non-strict decode marked INVALID_TELEMETRY."""
        return 0 if self.invalid is None else int(np.count_nonzero(self.invalid))

    def __len__(self) -> int:
        return self.n


def encode_telemetry(gateway_id: str, seq: int, t_ns: int, ids_blob: bytes, soc, p_kw, online, fault,
                     **slow) -> bytes:
    """Encode one telemetry batch (a msgpack map, no topic); ``slow`` are the optional arrays by key.

    Checks shapes and key names only; values are judged by the receiver (decode_telemetry), so a
    test gateway can send bad values on purpose.
    """
    what = f"telemetry from {gateway_id!r}"
    _check_gateway_id(gateway_id, what)
    unknown = set(slow) - set(SLOW_TELEMETRY_KEYS)
    if unknown:
        raise WireError("BAD_FIELD", f"{what}: unknown optional field(s) {sorted(unknown)}: expected some of "
                                     f"{list(SLOW_TELEMETRY_KEYS)}")
    n = _count_ids(ids_blob)
    out: dict[str, Any] = {"v": VERSION, "gw": gateway_id, "seq": seq, "t_ns": t_ns, "ids": ids_blob}
    values = {"soc": soc, "p_kw": p_kw, "online": online, "fault": fault, **slow}
    for field in TELEMETRY_ARRAYS:
        if values.get(field.key) is not None:
            out[field.key] = memoryview(_packed(values[field.key], field.dtype, n, field.key, what))
    return msgpack.packb(out)


#: How many nodes a batch from a gateway may name (None: a gateway the receiver does not know).
MaxNodes = Callable[[str], "int | None"]


def decode_telemetry(frame: bytes, *, strict: bool = True, max_nodes: MaxNodes | None = None,
                     check_ids: bool = True) -> TelemetryBatch:
    """Decode and validate one telemetry batch; raises WireError, nothing else.

    Sizes come before any per-node work (docs/wire.md 5.1): the frame size, the node count ``n``
    from the arrays' byte lengths (all must agree), then, with ``max_nodes``, the gateway
    (UNKNOWN_GATEWAY when ``max_nodes(gw)`` is None) and ``n`` against its limit (TOO_MANY_NODES),
    then the ids blob's length and NUL count against ``n``. Only then are ids split and checked,
    in bounded chunks, and only with ``check_ids``: a caller that maps ids itself (v2grt.ingest,
    which recognises the blobs it already checked) passes False and gets ``node_ids`` None.

    ``strict`` (the default): any value out of range rejects the batch (OUT_OF_RANGE). Otherwise
    structural errors still reject it, but a node with a bad value is marked in ``invalid`` and its
    ``fault`` becomes INVALID_TELEMETRY, so one broken BMS does not make the gateway's other vehicles
    stale; its other values are left as sent, for the caller not to store. Unknown keys are ignored
    (forward compatibility).
    """
    view = _as_buffer(frame, "telemetry")
    m = _unpack_map(view, "telemetry")
    gw = m.get("gw")
    what = f"telemetry from {gw!r}" if _valid_id(gw) else "telemetry"
    v = _version(m, what)
    _check_gateway_id(_typed(m, "gw", what, str, "a str (gateway id)"), what)
    seq = _uint(m, "seq", what)
    t_ns = _uint(m, "t_ns", what, I64_MAX)
    ids_blob = _typed(m, "ids", what, bytes, "bin (node ids joined by NUL)")
    n = _node_count(m, TELEMETRY_ARRAYS[0], what)
    arrays: dict[str, np.ndarray] = {}
    for field in TELEMETRY_ARRAYS:
        if field.required or field.key in m:
            arrays[field.key] = _array(m, field, n, what)
    if max_nodes is not None:
        limit = max_nodes(gw)
        if limit is None:
            raise WireError("UNKNOWN_GATEWAY", f"{what}: gateway {gw!r} is not in the roster; batch of {n} "
                                               "nodes dropped")
        if n > limit:
            raise WireError("TOO_MANY_NODES", f"{what}: {n} nodes in one batch: a batch from {gw!r} may name at "
                                              f"most {limit} (its vehicles in the roster, plus a margin)")
    check_ids_shape(ids_blob, n, what)
    node_ids = _parse_ids(ids_blob, what) if check_ids else None
    invalid: np.ndarray | None = None
    for field in TELEMETRY_ARRAYS:
        arr = arrays.get(field.key)
        bad = None if arr is None else _bad_mask(arr, field)
        if bad is not None:
            if strict:
                raise _range_error(field, arr, bad, ids_blob, what)
            invalid = bad if invalid is None else invalid | bad
    if invalid is not None:
        fault = arrays["fault"].copy()
        fault[invalid] = Reason.INVALID_TELEMETRY
        fault.flags.writeable = False
        invalid.flags.writeable = False
        arrays["fault"] = fault
    return TelemetryBatch(v, gw, seq, t_ns, ids_blob, n, node_ids, **arrays, invalid=invalid)


# ---------------------------------------------------------------------------------------------------
# control: v2g-cli REQ/DEALER -> aggregator ROUTER


@dataclasses.dataclass(frozen=True)
class Arg:
    """One control argument: msgpack kind ("str", "id", "float", "enum"), required, range or choices."""

    kind: str
    required: bool = True
    lo: float = -math.inf
    hi: float = math.inf
    unit: str = ""
    choices: tuple[str, ...] = ()
    doc: str = ""


TELEMETRY_PROFILES = ("default", "optimized")

#: Control commands and their arguments. Unknown arguments are refused (BAD_ARG): a misspelt argument
#: of a command that moves power must not be silently ignored.
COMMANDS: dict[str, dict[str, Arg]] = {
    "status": {},
    "estop": {"reason": Arg("str", False, doc="free text for the journal")},
    "reset": {"reason": Arg("str", False, doc="free text for the journal; clears a latched e-stop")},
    "test_discharge": {
        "node_id": Arg("id", doc="the node to discharge"),
        "kw": Arg("float", lo=0.0, hi=P_LIMIT_KW, unit="kW", doc="discharge power, > 0 (discharge into the grid)"),
        "seconds": Arg("float", lo=0.0, hi=3600.0, unit="s", doc="duration, > 0"),
    },
    "reload": {"path": Arg("str", False, doc="discharge profile to load instead of the configured one")},
    "telemetry_profile": {"name": Arg("enum", choices=TELEMETRY_PROFILES, doc="telemetry profile")},
    "keys_reload": {},  # security: re-read the authorized keys; drops connections of revoked keys
    "handover": {"to": Arg("id", False, doc="the standby to hand leadership to (its ha.name); default: any")},
}


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """A validated control request; numbers in ``args`` are floats."""

    cmd: str
    args: dict[str, Any]
    id: int | str | None = None


@dataclasses.dataclass(frozen=True)
class ControlReply:
    """A control reply: ``result`` when ok, else ``error_code`` and ``error_message``."""

    ok: bool
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    id: int | str | None = None


def _check_request_id(rid: Any, what: str) -> int | str | None:
    if rid is None or (type(rid) is int and 0 <= rid <= U64_MAX) or (type(rid) is str and len(rid) <= 64):
        return rid
    raise WireError("BAD_FIELD", f"{what}: field 'id'={_show(rid)}: expected an unsigned integer or a str "
                                 "of at most 64 characters")


def _check_args(cmd: Any, args: Any, what: str) -> dict[str, Any]:
    if cmd not in COMMANDS:
        raise WireError("UNKNOWN_CMD", f"{what}: cmd={_show(cmd)}: expected one of {sorted(COMMANDS)}")
    spec = COMMANDS[cmd]
    if not isinstance(args, Mapping):
        raise WireError("BAD_ARG", f"{what} {cmd}: args={_show(args)}: expected a map")
    unknown = [k for k in args if k not in spec]
    if unknown:
        raise WireError("BAD_ARG", f"{what} {cmd}: unknown argument {_show(unknown[0])}; "
                                   f"expected {sorted(spec) or 'none'}")
    out: dict[str, Any] = {}
    for name, arg in spec.items():
        if name not in args:
            if arg.required:
                raise WireError("BAD_ARG", f"{what} {cmd}: argument {name!r} is required ({arg.doc})")
            continue
        value = args[name]
        if arg.kind == "float":
            if type(value) not in (int, float):
                raise WireError("BAD_ARG", f"{what} {cmd}: argument {name!r}={_show(value)}: expected a "
                                           f"number ({arg.unit})")
            if not arg.lo < value <= arg.hi:
                raise WireError("BAD_ARG", f"{what} {cmd}: argument {name!r}={value!r}: expected "
                                           f"{arg.lo:g} < {name} <= {arg.hi:g} {arg.unit}")
            value = float(value)
        elif arg.kind == "id":
            if not _valid_id(value):
                raise WireError("BAD_ARG", f"{what} {cmd}: argument {name!r}={_show(value)}: expected a node "
                                           f"id (printable, no spaces, at most {MAX_ID_CHARS} characters)")
        elif arg.kind == "enum":
            if value not in arg.choices:
                raise WireError("BAD_ARG", f"{what} {cmd}: argument {name!r}={_show(value)}: expected one of "
                                           f"{list(arg.choices)}")
        elif type(value) is not str:
            raise WireError("BAD_ARG", f"{what} {cmd}: argument {name!r}={_show(value)}: expected a str")
        out[name] = value
    return out


def encode_request(cmd: str, args: Mapping[str, Any] | None = None, *, id: int | str | None = None) -> bytes:
    """Encode a control request, validating ``cmd`` and ``args`` first (a CLI fails before sending)."""
    checked = _check_args(cmd, dict(args or {}), "request")
    msg: dict[str, Any] = {"v": VERSION, "cmd": cmd, "args": checked}
    if _check_request_id(id, "request") is not None:
        msg["id"] = id
    return msgpack.packb(msg)


def decode_request(frame: bytes) -> ControlRequest:
    """Decode and validate a control request; raises WireError (UNKNOWN_CMD, BAD_ARG, ...) only."""
    m = _unpack_map(_as_buffer(frame, "request"), "request")
    _version(m, "request")
    rid = _check_request_id(m.get("id"), "request")
    cmd = _typed(m, "cmd", "request", str, "a str")
    return ControlRequest(cmd, _check_args(cmd, m.get("args", {}), "request"), rid)


def request_id_of(frame: bytes) -> int | str | None:
    """Best-effort ``id`` of a request that failed to decode, so the error reply can echo it."""
    try:
        m = _unpack_map(_as_buffer(frame, "request"), "request")
        return _check_request_id(m.get("id"), "request")
    except WireError:
        return None


def encode_reply(result: Mapping[str, Any] | None = None, *, error: WireError | None = None,
                 id: int | str | None = None) -> bytes:
    """Encode a reply: ``ok`` with ``result`` (a map of msgpack-able values), or the ``error``."""
    msg: dict[str, Any] = {"v": VERSION, "ok": error is None}
    if id is not None:
        msg["id"] = id
    if error is None:
        msg["result"] = dict(result or {})
    else:
        msg["error"] = {"code": error.code, "message": error.message[:MAX_STR_BYTES // 4]}
    try:
        frame = msgpack.packb(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError("BAD_FIELD", f"reply: result is not msgpack-serialisable ({exc})") from None
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError("TOO_LARGE", f"reply: {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    return frame


def decode_reply(frame: bytes) -> ControlReply:
    """Decode and validate a control reply; raises WireError only."""
    m = _unpack_map(_as_buffer(frame, "reply"), "reply")
    _version(m, "reply")
    ok = _typed(m, "ok", "reply", bool, "a bool")
    rid = _check_request_id(m.get("id"), "reply")
    if ok:
        return ControlReply(True, _typed(m, "result", "reply", dict, "a map"), id=rid)
    err = _typed(m, "error", "reply", dict, "a map {code, message}")
    code = _typed(err, "code", "reply error", str, "a str")
    message = _typed(err, "message", "reply error", str, "a str")
    return ControlReply(False, None, code, message, rid)


# ---------------------------------------------------------------------------------------------------
# fleet status: aggregator PUB topic status\0 -> other control systems


@dataclasses.dataclass(frozen=True)
class StatusField:
    """One fleet-status key: kind ("uint", "float", "float_or_nil", "bool", "counts"), range, unit."""

    key: str
    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    unit: str = ""
    doc: str = ""


#: Fleet status keys in wire order (after ``v``); all required.
STATUS_FIELDS: tuple[StatusField, ...] = (
    StatusField("ep", "uint", doc="the aggregator's epoch"),
    StatusField("seq", "uint", doc="cycle sequence within the epoch (the setpoints' seq of this cycle)"),
    StatusField("t_ns", "uint", 0, I64_MAX, "ns", "UTC wall clock when published"),
    StatusField("f_hz", "float_or_nil", 0.0, 100.0, "Hz", "grid frequency used this cycle; nil if stale"),
    StatusField("f_age_ms", "float_or_nil", 0.0, math.inf, "ms", "age of that measurement; nil if none yet"),
    StatusField("target_kw", "float", unit="kW", doc="fleet target after clamping, + = discharge"),
    StatusField("delivered_kw", "float", unit="kW", doc="sum of measured p_kw reported by gateways, + = discharge"),
    StatusField("available_dis_kw", "float", 0.0, math.inf, "kW", "fleet discharge headroom, >= 0"),
    StatusField("available_chg_kw", "float", 0.0, math.inf, "kW", "fleet charge headroom, >= 0 (magnitude)"),
    StatusField("n_nodes", "uint", doc="vehicles in the fleet table"),
    StatusField("n_active", "uint", doc="vehicles carrying a non-zero setpoint this cycle"),
    StatusField("excluded", "counts", doc="map Reason name -> number of nodes excluded for it (non-zero only)"),
    StatusField("estop", "bool", doc="emergency stop latched"),
    StatusField("cycle_p99_ms", "float", 0.0, math.inf, "ms", "p99 cycle time over the recent window"),
    StatusField("deadline_misses", "uint", doc="cycles over budget since start"),
)


def _check_status(m: Mapping[str, Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {"v": VERSION}
    for f in STATUS_FIELDS:
        if f.kind == "uint":
            out[f.key] = _uint(m, f.key, what, int(min(f.hi, U64_MAX)))
        elif f.kind in ("float", "float_or_nil"):
            value = _float(m, f.key, what, f.lo, f.hi, f.unit, nil_ok=f.kind == "float_or_nil")
            if value is not None and not math.isfinite(value):
                raise WireError("OUT_OF_RANGE", f"{what}: field {f.key!r}={value!r}: expected a finite number")
            out[f.key] = value
        elif f.kind == "bool":
            out[f.key] = _typed(m, f.key, what, bool, "a bool")
        else:
            counts = _typed(m, f.key, what, dict, "a map of str -> unsigned integer")
            for name in counts:
                _uint(counts, name, f"{what} {f.key}")
            out[f.key] = dict(counts)
    return out


def encode_status(status: Mapping[str, Any]) -> bytes:
    """Encode the fleet status (keys of STATUS_FIELDS; ``v`` is added) as topic ``status\\0`` + map."""
    unknown = set(status) - {f.key for f in STATUS_FIELDS} - {"v"}
    if unknown:
        raise WireError("BAD_FIELD", f"status: unknown field(s) {sorted(unknown)}")
    return STATUS_TOPIC + msgpack.packb(_check_status(status, "status"))


def decode_status(frame: bytes) -> dict[str, Any]:
    """Decode and validate a fleet-status frame into a dict keyed as on the wire; raises WireError only."""
    view = _as_buffer(frame, "status")
    if bytes(view[:len(STATUS_TOPIC)]) != STATUS_TOPIC:
        raise WireError("UNKNOWN_TOPIC", f"status: frame starts {bytes(view[:16])!r}: expected b'status\\x00'")
    m = _unpack_map(view[len(STATUS_TOPIC):], "status")
    _version(m, "status")
    return _check_status(m, "status")


# ---------------------------------------------------------------------------------------------------
# annotated hex dump (docs/wire.md's worked examples are generated with it)

_ARRAY_DTYPES = {"p_kw": "<f4", "rs": "u1", **{f.key: f.dtype for f in TELEMETRY_ARRAYS}}


def annotate(frame: bytes) -> str:
    """An annotated hex dump of a frame: one line per byte group (offset, hex, meaning)."""
    data = bytes(frame)
    lines: list[str] = []

    def emit(start: int, end: int, note: str) -> None:
        chunk = data[start:end]
        for k in range(0, max(len(chunk), 1), 9):  # 9: a uint64 with its marker fits one line
            lines.append(f"{start + k:04x}  {chunk[k:k + 9].hex(' '):<26}  {note if k == 0 else '...'}".rstrip())

    pos = 0
    if data.startswith((SETPOINT_TOPIC_PREFIX, STATUS_TOPIC)):
        nul = data.index(b"\x00")
        emit(0, nul + 1, f"topic {data[:nul].decode()!r} + NUL")
        pos = nul + 1

    def item(pos: int, key: str | None) -> int:
        b = data[pos]
        fixed = {0xc0: "nil", 0xc2: "false", 0xc3: "true"}
        if b in fixed:
            emit(pos, pos + 1, fixed[b])
            return pos + 1
        if b <= 0x7f:
            emit(pos, pos + 1, f"positive fixint {b}")
            return pos + 1
        if b >= 0xe0:
            emit(pos, pos + 1, f"negative fixint {b - 256}")
            return pos + 1
        if 0x80 <= b <= 0x8f or b in (0xde, 0xdf):
            n, h = (b & 0x0f, 1) if b <= 0x8f else (int.from_bytes(data[pos + 1:pos + (3 if b == 0xde else 5)],
                                                                    "big"), 3 if b == 0xde else 5)
            kind = {1: "fixmap", 3: "map16", 5: "map32"}[h]
            emit(pos, pos + h, f"{kind}, {n} entr{'y' if n == 1 else 'ies'}")
            pos += h
            for _ in range(n):
                k_start = pos
                pos = item(pos, None)
                k = msgpack.unpackb(data[k_start:pos])
                pos = item(pos, k)
            return pos
        if 0xa0 <= b <= 0xbf or b in (0xd9, 0xda, 0xdb):
            h = {0xd9: 2, 0xda: 3, 0xdb: 5}.get(b, 1)
            n = b & 0x1f if h == 1 else int.from_bytes(data[pos + 1:pos + h], "big")
            s = data[pos + h:pos + h + n].decode()
            kind = {1: "fixstr", 2: "str8", 3: "str16", 5: "str32"}[h]
            emit(pos, pos + h + n, f"{kind}({n}) {s!r}" + (" (key)" if key is None else ""))
            return pos + h + n
        if b in (0xc4, 0xc5, 0xc6):
            h = {0xc4: 2, 0xc5: 3, 0xc6: 5}[b]
            n = int.from_bytes(data[pos + 1:pos + h], "big")
            emit(pos, pos + h, f"{ {2: 'bin8', 3: 'bin16', 5: 'bin32'}[h]} header, {n} bytes follow")
            body = pos + h
            if key == "ids" and n:
                parts = data[body:body + n].split(b"\x00")
                for i, nid in enumerate(parts):
                    last = i == len(parts) - 1
                    emit(body, body + len(nid) + (0 if last else 1),
                         f"node id {nid.decode()!r}" + ("" if last else " + NUL"))
                    body += len(nid) + 1
            elif key in _ARRAY_DTYPES:
                dt = np.dtype(_ARRAY_DTYPES[key])
                for i, value in enumerate(np.frombuffer(data[body:body + n], dtype=dt)):
                    label = "float32 LE" if dt.kind == "f" else "uint8"
                    emit(body, body + dt.itemsize, f"{key}[{i}] {label} {value!s}")
                    body += dt.itemsize
            elif n:
                emit(body, body + n, "bytes")
            return pos + h + n
        sizes = {0xca: (4, ">f4", "float32"), 0xcb: (8, ">f8", "float64"), 0xcc: (1, ">u1", "uint8"),
                 0xcd: (2, ">u2", "uint16"), 0xce: (4, ">u4", "uint32"), 0xcf: (8, ">u8", "uint64"),
                 0xd0: (1, ">i1", "int8"), 0xd1: (2, ">i2", "int16"), 0xd2: (4, ">i4", "int32"),
                 0xd3: (8, ">i8", "int64")}
        if b in sizes:
            n, dt, name = sizes[b]
            value = np.frombuffer(data[pos + 1:pos + 1 + n], dtype=dt)[0]
            emit(pos, pos + 1 + n, f"{name} (big-endian) {value!s}")
            return pos + 1 + n
        emit(pos, len(data), f"unannotated type 0x{b:02x}")
        return len(data)

    while pos < len(data):
        pos = item(pos, "")
    return "\n".join(lines)


__all__ = [
    "COMMANDS",
    "ERROR_CODES",
    "MAX_FRAME_BYTES",
    "SETPOINT_ARRAYS",
    "STATUS_FIELDS",
    "STATUS_TOPIC",
    "TELEMETRY_ARRAYS",
    "TELEMETRY_PROFILES",
    "VERSION",
    "ControlReply",
    "ControlRequest",
    "SetpointFence",
    "SetpointFrames",
    "SetpointMsg",
    "TelemetryBatch",
    "WireError",
    "annotate",
    "decode_reply",
    "decode_request",
    "decode_setpoints",
    "decode_status",
    "decode_telemetry",
    "encode_reply",
    "encode_request",
    "encode_setpoints",
    "encode_status",
    "encode_telemetry",
    "join_ids",
    "request_id_of",
    "setpoint_topic",
    "split_ids",
]
