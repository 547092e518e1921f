"""Telemetry onto fleet rows, with work and state bounded by the roster whatever arrives (issue 10).

The aggregator's bus thread shares the GIL with the control thread, so nothing here makes one long
C call over a peer's input: a batch is first held against what its gateway owns in the roster
(:meth:`TelemetryRouter.max_nodes`, used by the decoder before any id is read); then its ids are
matched to rows by the cheapest way that applies:

1. the ids blob is byte for byte the one the aggregator sends that gateway in its setpoints (the
   common case: a gateway reports its vehicles in the order it is commanded): precomputed rows;
2. a blob this gateway sent before (a few per roster gateway, so a gateway splitting its vehicles
   over several batches stays cached): the rows found then;
3. otherwise the ids are checked in chunks of ``wire.IDS_CHUNK_BYTES`` and matched to the
   gateway's roster ids vectorised (rows of 64-bit words, hashed, searched, compared; 8,192 ids a
   numpy call), so no call runs long and the GIL changes hands at the switch interval between them.
   Only ids matching none of the gateway's own are looked up one by one, to tell FOREIGN_NODE from
   UNKNOWN_NODE.

State exists only for roster gateways (the caches) and codes (the counters): an id a peer invents
creates nothing. Vehicles refused are counted in bulk by code, never remembered by id.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from v2grt.codes import Reason
from v2grt.fleet import Fleet
from v2grt.io import wire
from v2grt.io.wire import TelemetryBatch, WireError

#: A batch may name its gateway's roster vehicles plus this margin (10 %, at least 16): room for a few
#: vehicles the roster does not list yet (refused as UNKNOWN_NODE, the rest of the batch used), not
#: for a peer to make the aggregator split a frame full of invented ids.
SPARE_NODES_MIN = 16
SPARE_NODES_FRACTION = 0.1
#: Distinct ids blobs remembered per roster gateway (a gateway may split its vehicles over batches).
BLOBS_PER_GATEWAY = 4
#: Vehicle refusal codes (counted per vehicle and batch, not per frame).
REFUSAL_CODES = ("UNKNOWN_NODE", "FOREIGN_NODE", "INVALID_TELEMETRY")


def batch_limit(owned: int) -> int:
    """The most nodes one batch from a gateway with ``owned`` roster vehicles may name."""
    return owned + max(SPARE_NODES_MIN, int(owned * SPARE_NODES_FRACTION))


@dataclasses.dataclass(frozen=True, slots=True)
class _Gateway:
    blob: bytes  # the ids of this gateway's setpoint frame, in its rows' order
    rows: np.ndarray  # (n,) int64 fleet rows, in the order of ``blob``
    index: int  # the fleet's gateway index
    limit: int  # batch_limit(len(rows))


@dataclasses.dataclass(frozen=True, slots=True)
class _View:
    version: int  # fleet.version when made: rows are valid for it only
    gateways: dict[str, _Gateway]
    row_of: dict[str, int]
    gateway_of_row: np.ndarray  # fleet.gateway
    indexes: dict = dataclasses.field(default_factory=dict)  # gateway id -> _Index, made on first need

    def index(self, gateway_id: str, gw: _Gateway) -> _Index:
        idx = self.indexes.get(gateway_id)
        if idx is None:
            idx = self.indexes[gateway_id] = _build_index(gw)
        return idx


@dataclasses.dataclass(frozen=True, slots=True)
class Routed:
    """Where a batch goes: ``rows`` of the fleet take the batch's entries ``sel`` (None: all, in order).

    ``version`` is the fleet version the rows are valid for; the counts are this batch's refusals.
    """

    version: int
    rows: np.ndarray
    sel: np.ndarray | None
    unknown: int = 0
    foreign: int = 0
    invalid: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Cached:
    version: int
    blob: bytes
    rows: np.ndarray
    sel: np.ndarray
    unknown: int
    foreign: int


class TelemetryRouter:
    """Maps telemetry batches to fleet rows (see the module docstring); counts refused vehicles by code.

    ``set_roster`` is called by the thread that changes the fleet (the control thread, when it lays
    out its setpoint frames); ``max_nodes`` and ``route`` by the one receiving thread. The view is
    swapped whole, so the receiver always reads one consistent roster.
    """

    def __init__(self) -> None:
        self._view: _View | None = None
        self._cache: dict[str, list[_Cached]] = {}
        #: vehicles refused, by code (UNKNOWN_NODE, FOREIGN_NODE, INVALID_TELEMETRY), summed over batches
        self.refused_nodes: collections.Counter[str] = collections.Counter()
        self.fast = self.cached = self.slow = 0  # batches per path (benchmarks, tests)

    # ------------------------------------------------------------------ control thread
    def set_roster(self, fleet: Fleet, gateways: list[tuple[str, bytes, np.ndarray]]) -> None:
        """Take the roster as laid out for setpoints: (gateway id, ids blob, rows) per gateway with vehicles."""
        index = fleet._gateway_index
        self._view = _View(fleet.version,
                           {gw: _Gateway(blob, rows, index[gw], batch_limit(len(rows))) for gw, blob, rows in gateways},
                           fleet.row_of, fleet.gateway)
        self._cache = {}  # a receiver still holding the old dict only loses an entry

    # ------------------------------------------------------------------ receiving thread
    def max_nodes(self, gateway_id: str) -> int | None:
        """The most nodes a batch from ``gateway_id`` may name; None for a gateway not in the roster."""
        view = self._view
        gw = None if view is None else view.gateways.get(gateway_id)
        return None if gw is None else gw.limit

    def route(self, batch: TelemetryBatch) -> Routed:
        """The rows ``batch`` updates; refused vehicles counted. Raises WireError to drop the whole batch.

        UNKNOWN_GATEWAY / TOO_MANY_NODES if the decoder was not given :meth:`max_nodes`, BAD_IDS for
        ids that break the wire rules (only ever checked on the slow path: the other two compare
        against blobs already checked).
        """
        view = self._view
        gw = None if view is None else view.gateways.get(batch.gw)
        if gw is None:
            raise WireError("UNKNOWN_GATEWAY", f"telemetry from {batch.gw!r}: not a gateway of the roster")
        if batch.n > gw.limit:
            raise WireError("TOO_MANY_NODES", f"telemetry from {batch.gw!r}: {batch.n} nodes, at most {gw.limit}")
        blob = batch.ids_blob
        if blob == gw.blob:
            self.fast += 1
            routed = Routed(view.version, gw.rows, None)
        else:
            hit = self._lookup(batch.gw, view.version, blob)
            if hit is None:
                self.slow += 1
                hit = self._map(view, gw, batch)
                self._remember(batch.gw, hit)
            else:
                self.cached += 1
            routed = Routed(view.version, hit.rows, hit.sel, hit.unknown, hit.foreign)
        if batch.invalid is not None:
            bad = batch.invalid if routed.sel is None else batch.invalid[routed.sel]
            routed = dataclasses.replace(routed, invalid=int(np.count_nonzero(bad)))
        for code, count in zip(REFUSAL_CODES, (routed.unknown, routed.foreign, routed.invalid)):
            if count:
                self.refused_nodes[code] += count
        return routed

    def _lookup(self, gateway_id: str, version: int, blob: bytes) -> _Cached | None:
        entries = self._cache.get(gateway_id, ())
        for k, entry in enumerate(entries):
            if entry.version == version and entry.blob == blob:
                if k:  # most recent first
                    entries.insert(0, entries.pop(k))
                return entry
        return None

    def _remember(self, gateway_id: str, entry: _Cached) -> None:
        entries = self._cache.setdefault(gateway_id, [])
        entries.insert(0, entry)
        del entries[BLOBS_PER_GATEWAY:]

    @staticmethod
    def _map(view: _View, gw: _Gateway, batch: TelemetryBatch) -> _Cached:
        """The slow path: check the ids (chunked), then match them to the gateway's roster ids vectorised.

        A Python dict lookup per id cost ~1 us each in a random order (60 ms for 50,000 ids, 2.7 ms per
        C call of 2,000); the ids' bytes as rows of 64-bit words, hashed, searched among the gateway's
        sorted hashes and compared word by word cost a few ms in numpy calls of well under 1 ms. Only
        ids that match none of the gateway's own (unknown, or another gateway's) are looked up one by
        one, in a Python loop.
        """
        what = f"telemetry from {batch.gw!r}"
        blob = batch.ids_blob
        for _ids in wire.id_chunks(blob, what):  # the wire's id rules; BAD_IDS drops the batch
            pass
        own = view.index(batch.gw, gw)
        arr, starts, lengths = _spans(blob)
        words = _words(arr, starts, lengths, own.width)
        h = _fold(words, lengths, own.basis)
        order = np.argsort(h, kind="stable")
        pos = np.minimum(np.searchsorted(own.hashes, h[order]), own.hashes.size - 1)
        cand = own.order[pos]
        exact = ((own.hashes[pos] == h[order]) & (own.lengths[cand] == lengths[order])
                 & (own.words[cand] == words[order]).all(axis=1))
        local = np.full(batch.n, -1, np.int64)
        local[order[exact]] = cand[exact]
        sel = np.flatnonzero(local >= 0)
        if sel.size and np.bincount(local[sel], minlength=own.hashes.size).max() > 1:
            raise WireError("BAD_IDS", f"{what}: a node id of this gateway appears more than once")
        unknown = foreign = 0
        seen: set[str] = set()
        get = view.row_of.get
        for i in np.flatnonzero(local < 0).tolist():  # another gateway's (FOREIGN_NODE) or none's (UNKNOWN_NODE)
            s = int(starts[i])
            nid = blob[s:s + int(lengths[i])].decode("utf-8")
            if nid in seen:
                raise WireError("BAD_IDS", f"{what}: node id {nid!r} appears more than once")
            seen.add(nid)
            if get(nid, -1) >= 0:
                foreign += 1
            else:
                unknown += 1
        return _Cached(view.version, blob, gw.rows[local[sel]], sel, unknown, foreign)


_FNV_PRIME = np.uint64(0x100000001B3)
_BASES = (0xCBF29CE484222325, 0x84222325CBF29CE4, 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)
_ROWS_PER_CALL = 8192  # ids gathered per numpy call (an index of 8192 x 64 bytes: 4 MB at most)


@dataclasses.dataclass(frozen=True, slots=True)
class _Index:
    """One gateway's roster ids as word rows, hashed and sorted for the slow path (once per roster view)."""

    width: int  # the longest id, bytes
    words: np.ndarray  # (n, width rounded up to 8 / 8) uint64, zero-padded bytes of each id
    lengths: np.ndarray  # (n,) bytes
    basis: int
    hashes: np.ndarray  # (n,) sorted
    order: np.ndarray  # (n,) the gateway's id position of each sorted hash


def _build_index(gw: _Gateway) -> _Index:
    arr, starts, lengths = _spans(gw.blob)
    width = int(lengths.max())
    words = _words(arr, starts, lengths, width)
    for basis in _BASES:  # equal hashes of two of the gateway's own ids would hide one: take another basis
        h = _fold(words, lengths, basis)
        order = np.argsort(h, kind="stable")
        hashes = h[order]
        if not (hashes[1:] == hashes[:-1]).any():
            break
    return _Index(width, words, lengths, basis, hashes, order)


def _spans(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blob as uint8, and each id's start and length in bytes (vectorised)."""
    arr = np.frombuffer(blob, np.uint8)
    if not arr.size:
        return arr, np.zeros(0, np.int64), np.zeros(0, np.int64)
    nul = np.flatnonzero(arr == 0)
    starts = np.concatenate(([0], nul + 1))
    return arr, starts, np.concatenate((nul, [arr.size])) - starts


def _words(arr: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Each id's first ``width`` bytes, zero-padded to a multiple of 8, as a row of uint64 words."""
    wp = max(8, -(-width // 8) * 8)
    out = np.zeros((starts.size, wp), np.uint8)
    cols = np.arange(wp)
    last = max(arr.size - 1, 0)
    for a in range(0, starts.size, _ROWS_PER_CALL):
        s, n = starts[a:a + _ROWS_PER_CALL], lengths[a:a + _ROWS_PER_CALL]
        block = arr[np.minimum(s[:, None] + cols, last)]
        block[cols >= np.minimum(n, width)[:, None]] = 0
        out[a:a + _ROWS_PER_CALL] = block
    return out.view(np.uint64)


def _fold(words: np.ndarray, lengths: np.ndarray, basis: int) -> np.ndarray:
    """A 64-bit hash of each row of words and its length (FNV-style, a word at a time)."""
    h = (np.uint64(basis) ^ lengths.astype(np.uint64)) * _FNV_PRIME
    for k in range(words.shape[1]):
        h = (h ^ words[:, k]) * _FNV_PRIME
    return h


_SLOW_COLUMNS = ("soh", "temp_c", "p_dis_max_kw", "p_chg_max_kw", "cycle_count")


def apply(fleet: Fleet, routed: Routed, batch: TelemetryBatch, t_recv_ns: int) -> None:
    """Write a routed batch into the fleet table (between cycles, under the aggregator's image lock).

    A quarantined vehicle (``batch.invalid``) gets fault INVALID_TELEMETRY and nothing else of the
    batch: its stored values keep their last valid ones, and it counts as not heard from. Its
    ``online`` flag is set so the kernel's reason chain, which tests OFFLINE before a fault, reports
    the quarantine; the next valid batch for it rewrites both.
    """
    rows, sel = routed.rows, routed.sel
    if batch.invalid is not None:
        bad = batch.invalid if sel is None else batch.invalid[sel]
        if bad.any():
            fleet.fault[rows[bad]] = Reason.INVALID_TELEMETRY
            fleet.online[rows[bad]] = 1
            keep = ~bad
            rows = rows[keep]
            sel = np.flatnonzero(keep) if sel is None else sel[keep]

    def values(arr: np.ndarray) -> np.ndarray:
        return arr if sel is None else arr[sel]

    fleet.soc[rows] = values(batch.soc)
    fleet.online[rows] = values(batch.online)
    fleet.fault[rows] = values(batch.fault)
    fleet.p_actual_kw[rows] = values(batch.p_kw)
    fleet.last_telemetry_ns[rows] = t_recv_ns
    for name in _SLOW_COLUMNS:
        arr = getattr(batch, name)
        if arr is not None:
            getattr(fleet, name)[rows] = values(arr)


__all__ = ["REFUSAL_CODES", "Routed", "TelemetryRouter", "apply", "batch_limit"]
