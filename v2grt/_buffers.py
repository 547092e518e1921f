"""Caller-owned kernel outputs and scratch space, sized to the fleet's capacity once, reused every cycle."""

from __future__ import annotations

import numpy as np

from v2grt.profile import RANK_BUCKETS

#: Indices into KernelOutput.totals (float64[N_TOTALS]).
T_REQUEST = 0  # kW asked for (base schedule + service response), before limits
T_TARGET = 1  # kW after the fleet ramp limit and clamping to what the fleet can give
T_ALLOCATED = 2  # kW: sum of the setpoints (equals T_TARGET to float tolerance)
T_FEASIBLE_DIS = 3  # kW the fleet could discharge this cycle (availability, ramp and site limits)
T_FEASIBLE_CHG = 4  # kW (magnitude) the fleet could charge this cycle
T_AVAIL_DIS = 5  # kW: sum of per-node discharge availability (before ramp and site limits)
T_AVAIL_CHG = 6  # kW: sum of per-node charge availability (magnitude)
T_N_CARRYING = 7  # nodes with a non-zero setpoint
N_TOTALS = 8
#: KernelOutput.reason_counts has a slot for every uint8 reason code (gateways' fault codes included).
N_REASON_SLOTS = 256

#: The kernel's chunks of rows (Workspace.chunk_rows): about n / CHUNK_ROWS of them, at most MAX_CHUNKS. The
#: same chunks for one thread or two, so both give the same bytes; fewer than PARALLEL_MIN_ROWS rows run on
#: one thread whatever kernel.threads says (the hand-off does not pay there; docs/benchmarks.md).
CHUNK_ROWS = 8192
MAX_CHUNKS = 32  # also store_setpoints' (_kernel.pxi's COPY_CHUNKS, COPY_CHUNK_MIN_ROWS; checked at import)
PARALLEL_MIN_ROWS = 50_000

#: kW. A window or take at or below this is no power: float residue of the fill (a target minus a
#: sum of windows leaves ~1e-16 of it) or a node at the very edge of its taper. Both backends treat it
#: as 0, so no node is set to a sliver that would make it "carrying" (and ranked up by hysteresis)
#: next cycle. 1 mW is far below any charger's resolution.
MIN_SETPOINT_KW = 1e-6


class KernelOutput:
    """What one dispatch cycle produces: per-node arrays of the fleet's capacity, and fleet totals.

    ``setpoint_kw`` (float64, + discharge), ``avail_dis_kw`` and ``avail_chg_kw`` (float32, >= 0:
    the kernel computes them in float32, docs/architecture.md),
    ``reason`` (uint8, v2grt.codes.Reason), ``totals`` (float64[N_TOTALS], see the T_* indices),
    ``reason_counts`` (int64[N_REASON_SLOTS]: rows per reason code, free rows under EMPTY).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.setpoint_kw = np.zeros(capacity, np.float64)
        self.avail_dis_kw = np.zeros(capacity, np.float32)
        self.avail_chg_kw = np.zeros(capacity, np.float32)
        self.reason = np.zeros(capacity, np.uint8)
        self.totals = np.zeros(N_TOTALS, np.float64)
        self.reason_counts = np.zeros(N_REASON_SLOTS, np.int64)


class Workspace:
    """Scratch arrays the kernel needs (ranking buckets, per-site sums, a counting-sort order)."""

    def __init__(self, capacity: int, site_capacity: int, buckets: int = RANK_BUCKETS):
        if not 2 <= buckets <= 65536:  # the kernel keeps a bucket in a uint16
            raise ValueError(f"Workspace buckets={buckets}: expected 2..65536 (default {RANK_BUCKETS})")
        self.capacity = capacity
        self.site_capacity = site_capacity
        self.buckets = buckets
        self.window_kw = np.zeros(capacity, np.float32)  # ramp-limited window in the target's direction
        self.q = np.zeros(capacity, np.uint16)  # rank bucket per node, in the target's direction
        self.order = np.zeros(capacity, np.int32)  # counting-sort order (only when a site limit binds)
        self.site_hi_kw = np.zeros(site_capacity, np.float64)
        self.site_lo_kw = np.zeros(site_capacity, np.float64)
        self.site_rem_kw = np.zeros(site_capacity, np.float64)
        self.hist_kw = np.zeros(buckets, np.float64)  # sum of windows per rank bucket
        self.count = np.zeros(buckets + 1, np.int64)  # nodes per bucket (counting sort)
        # Chunks of rows (docs/architecture.md, "The kernel on two threads"): the same for any thread count,
        # each with its own histogram, reason counts and sums (chunk 0 uses hist_kw and the output's counts),
        # merged in chunk order.
        self.threads = 1  # 2: pass 1 and the merit fill on this thread and one worker thread (kernel.threads)
        self.chunk_rows = CHUNK_ROWS
        self.parallel_min_rows = PARALLEL_MIN_ROWS
        self.chunk_bounds = np.zeros(MAX_CHUNKS + 1, np.intp)
        self.chunk_hist_kw = np.zeros((MAX_CHUNKS - 1) * buckets, np.float64)
        self.chunk_counts = np.zeros((MAX_CHUNKS - 1) * N_REASON_SLOTS, np.int64)
        self.chunk_sums_kw = np.zeros(2 * MAX_CHUNKS, np.float64)
        self.chunk_carrying = np.zeros(MAX_CHUNKS, np.int64)
        self.site_seen = np.zeros(max(site_capacity, 1), np.uint8)  # the contiguity check's scratch
        self.sites_key = None  # (fleet, version, rows, sites) the cached contiguity was checked for
        self.sites_contiguous = 0
        #: the last run: threads used, chunks, chunks the worker ran, sites contiguous (1/0; -1 not checked,
        #: -2 the worker thread could not be started, -3 the caller may use one CPU only); see kernel_mode()
        self.kernel_stats = np.zeros(4, np.int64)
        self.teams = {}  # the worker thread per compiled build (its Team), started by the first 2-thread run

    def kernel_mode(self) -> dict:
        """How the last kernel run went: threads used and why (for status, metrics and benchmarks)."""
        used, chunks, worker, contiguous = (int(x) for x in self.kernel_stats)
        if used == 0:
            why = "no compiled kernel run yet"
        elif used == 2:
            why = "two threads"
        elif self.threads < 2:
            why = "kernel.threads is 1"
        elif contiguous == 0:
            why = "sites not contiguous: one thread (a site's rows in several runs)"
        elif contiguous == -2:
            why = "the worker thread could not be started: one thread"
        elif contiguous == -3:
            why = "the calling thread may run on one CPU only (realtime.cpu_affinity): one thread"
        else:
            why = f"fewer than {self.parallel_min_rows} rows or one chunk: one thread"
        return {"threads": used, "chunks": chunks, "worker_chunks": worker, "why": why}

    def fits(self, capacity: int, site_capacity: int) -> bool:
        return self.capacity >= capacity and self.site_capacity >= site_capacity
