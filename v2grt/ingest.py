"""Telemetry onto fleet rows, with work and state bounded by the roster whatever arrives (issue 10).

The aggregator's bus thread shares the GIL with the control thread, so nothing here makes one long
C call over a peer's input: a batch is first held against what its gateway owns in the roster
(:meth:`TelemetryRouter.max_nodes`, used by the decoder before any id is read); then its ids are
matched to rows by the cheapest way that applies:

1. the ids blob is byte for byte the one the aggregator sends that gateway in its setpoints (the
   common case: a gateway reports its vehicles in the order it is commanded): precomputed rows;
2. a blob this gateway sent before (a few per roster gateway, so a gateway splitting its vehicles
   over several batches stays cached): the rows found then;
3. otherwise the ids are split, checked and looked up in chunks of ``wire.IDS_CHUNK_BYTES``
   (about 0.2 ms of C a chunk), so the GIL changes hands at the switch interval between chunks.

State exists only for roster gateways (the caches) and codes (the counters): an id a peer invents
creates nothing. Vehicles refused are counted in bulk by code, never remembered by id.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

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
        """The slow path: split, check and look up the ids chunk by chunk (each chunk ~0.2 ms of C)."""
        what = f"telemetry from {batch.gw!r}"
        rows = np.empty(batch.n, np.int64)
        get, pos, seen = view.row_of.get, 0, set()
        for ids in wire.id_chunks(batch.ids_blob, what):
            k = len(ids)
            rows[pos:pos + k] = np.fromiter(map(get, ids, itertools.repeat(-1, k)), np.int64, k)
            pos += k
            seen.update(ids)
            if len(seen) != pos:
                raise WireError("BAD_IDS", f"{what}: a node id appears more than once (within the first {pos})")
        known = rows >= 0
        own = known & (view.gateway_of_row[np.where(known, rows, 0)] == gw.index)
        sel = np.flatnonzero(own)
        n_known = int(np.count_nonzero(known))
        return _Cached(view.version, bytes(batch.ids_blob), rows[sel], sel, batch.n - n_known, n_known - sel.size)


_SLOW_COLUMNS = ("soh", "temp_c", "p_dis_max_kw", "p_chg_max_kw", "cycle_count")


def apply(fleet: Fleet, routed: Routed, batch: TelemetryBatch, t_recv_ns: int) -> None:
    """Write a routed batch into the fleet table (the control thread's swap point).

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
