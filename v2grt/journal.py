"""The dispatch journal: every control cycle as evidence, written off the control thread, crash-safe.

Shape (docs/journal.md has the schema with units and signs):

- The control thread calls ``Journal.record(agg, result, times)`` once per cycle. It copies one
  fixed-size record into a preallocated ring (a numpy structured array) and a stripe of the fleet's
  per-vehicle columns (setpoint, reported power, reason) into a preallocated slot, so that every
  vehicle is sampled once per ``vehicle_interval_s`` without ever copying the whole fleet in one cycle
  (at 100,000 vehicles a whole copy is ~0.2 ms; a tenth of it is ~20 us). Nothing it does grows with
  the fleet except that stripe; nothing it does touches a file.
- A writer thread drains the rings every ``flush_interval_s`` into frames appended to the open
  segment file, flushes them to the OS at once (a kill -9 of the process loses nothing the writer has
  written) and fsyncs at least every ``fsync_interval_s`` (<= 1 s: what a host crash may lose).
- Frames are length-prefixed and CRC32-checked; a reader stops at the first torn or invalid frame, so
  a write cut short by kill -9 or a full disk is never read as a record. A segment is never appended to
  after its writer is gone: a new process (or a write error) starts a new segment.
- Segments rotate on the UTC clock (hourly by default); sealed segments are converted to Parquet by a
  low-priority child process (``python -m v2grt.journal convert``); retention removes the oldest
  segments by age and total size.
- A write error (ENOSPC, EIO, any OSError) raises JOURNAL_WRITE_FAILED in engine.log and the
  ``v2grt_journal_write_failing`` gauge; the loop goes on and the writer tries a new segment next pass.

Segment file: the 8 bytes MAGIC, then frames ``<u32 payload length><u32 crc32(kind + payload)><u8 kind>
<payload>``, little-endian. Kinds: HEADER (JSON), ROSTER (JSON), CYCLES (raw records of the header's
dtype), VEHICLES (one stripe, changes only), SITES (per-site totals after each sweep), END (JSON).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from v2grt.codes import Reason
from v2grt.config import JournalConfig

log = logging.getLogger("v2grt.journal")

MAGIC = b"V2GJRNL1"
FORMAT_VERSION = 1
SUFFIX = ".v2j"
_FRAME = struct.Struct("<IIB")  # payload length, crc32 of kind byte + payload, kind
_MAX_FRAME = 1 << 30
HEADER, ROSTER, CYCLES, VEHICLES, SITES, END = 1, 2, 3, 4, 5, 6
_VEH_HEAD = struct.Struct("<qqII")  # t_ns, seq, version, count
_SITES_HEAD = struct.Struct("<qqI")  # t_ns, seq, n_sites

#: Reason codes counted per cycle (the record's reasons[] column); codes above are summed into the last.
N_REASONS = 16
REASON_NAMES = [Reason(c).name if c in Reason._value2member_map_ else f"CODE_{c}" for c in range(N_REASONS)]

#: The per-cycle record, in order, with unit and sign (docs/journal.md is pinned to this by a test).
#: + = discharge into the grid for every power.
CYCLE_FIELDS: list[tuple[str, str, str]] = [
    ("t_ns", "int64", "UTC wall-clock time of the cycle's publish, ns since the Unix epoch"),
    ("epoch", "int64", "the scheduler's fencing epoch"),
    ("seq", "int64", "setpoint message sequence number of this cycle (as on the wire)"),
    ("f_hz", "float64", "grid frequency the cycle used, Hz; NaN when the meter is stale or absent"),
    ("f_age_ms", "float64", "age of the meter sample when the cycle read it, ms; NaN when there is none"),
    ("frequency_stale", "uint8", "1 while the frequency is stale (response frozen or ramping out)"),
    ("service_fraction", "float64", "service response, -1..1 of capacity (+ discharge)"),
    ("capacity_kw", "float64", "contracted capacity, kW"),
    ("request_kw", "float64", "base schedule + response, kW (+ discharge)"),
    ("target_kw", "float64", "request after the fleet's limits and ramps, kW (+ discharge)"),
    ("allocated_kw", "float64", "sum of the vehicles' setpoints sent this cycle, kW (+ discharge)"),
    ("delivered_kw", "float64", "sum of the vehicles' reported power, kW (+ discharge)"),
    ("site_measured_kw", "float64", "sum of the site inverters' measured W, kW (+ injection); NaN: none configured"),
    ("available_dis_kw", "float64", "discharge the fleet can deliver now, kW (>= 0)"),
    ("available_chg_kw", "float64", "charge the fleet can absorb now, kW (>= 0, magnitude)"),
    ("n_carrying", "int32", "vehicles with a non-zero setpoint"),
    ("estop", "uint8", "1 while the emergency stop is latched (every setpoint 0)"),
    ("test_row", "int32", "fleet row of a test discharge in progress (ROSTER frame), -1: none"),
    ("test_kw", "float64", "its pinned setpoint, kW (+ discharge); NaN: none"),
    ("cycle_work_ms", "float64", "inputs + kernel + publish time of this cycle, ms"),
]


def cycle_dtype(n_inverters: int) -> np.dtype:
    fields = [(name, kind) for name, kind, _ in CYCLE_FIELDS]
    fields.append(("reasons", "int32", (N_REASONS,)))
    if n_inverters:
        fields.append(("inverter_kw", "float64", (n_inverters,)))
    return np.dtype(fields)


class JournalError(Exception):
    """A journal file or directory that cannot be read as asked; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ framing
def frame(kind: int, payload: bytes | memoryview) -> bytes:
    body = bytes([kind]) + bytes(payload)
    return _FRAME.pack(len(body) - 1, zlib.crc32(body), kind) + body[1:]


def read_frames(path: str | Path):
    """Yield (kind, payload) of every whole, valid frame; stop at the first torn or corrupt one.

    The reader's promise: a frame whose length or CRC does not check out, and everything after it in
    this segment, is never returned (a writer never appends after a failed write: it starts a segment).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            return
        while True:
            head = fh.read(_FRAME.size)
            if len(head) < _FRAME.size:
                return
            n, crc, kind = _FRAME.unpack(head)
            if n > _MAX_FRAME:
                return
            payload = fh.read(n)
            if len(payload) < n or zlib.crc32(bytes([kind]) + payload) != crc:
                return
            yield kind, payload


# ------------------------------------------------------------------------------------------ the journal
@dataclasses.dataclass
class JournalCounters:
    records: int = 0  # cycle records written
    vehicle_rows: int = 0  # per-vehicle rows written (changes only)
    dropped: int = 0  # cycle records lost: ring overrun or write error
    write_errors: int = 0
    failing: bool = False
    segments: int = 0
    converted: int = 0
    removed: int = 0
    last_error: str = ""


class Journal:
    """The control thread's side (record) and the writer thread (start, stop) of one aggregator's journal."""

    def __init__(self, cfg: JournalConfig, directory: Path, *, fleet, epoch: int, fleet_id: str, period_s: float,
                 inverter_names: list[str], inverter_sites: list[str], events=None, meta: dict | None = None):
        self.cfg = cfg
        self.dir = Path(directory)
        self.fleet = fleet
        self.epoch = epoch
        self.fleet_id = fleet_id
        self.period_s = period_s
        self.events = events
        self.meta = meta or {}
        self.inverter_names = list(inverter_names)
        self.inverter_sites = list(inverter_sites)
        self.dtype = cycle_dtype(len(inverter_names))
        n_ring = max(64, int(math.ceil(cfg.buffer_s / period_s)))
        self._ring = np.zeros(n_ring, self.dtype)
        self._w = 0  # records written into the ring (control thread only increments)
        self._r = 0  # records taken by the writer
        self._inv = np.full(len(inverter_names), np.nan)
        # per-vehicle stripes
        self._stripes = max(1, int(round(cfg.vehicle_interval_s / period_s)))
        self._stripe_k = 0
        self._vslots = 0
        self._vw = 0
        self._vr = 0
        self._version = -1
        self._roster: tuple | None = None  # (version, node_ids, site, site_ids), handed to the writer
        if cfg.vehicles:
            self._size_vehicle_slots(fleet.n_rows)
        # control-thread cost of record(), ns (the bench's journal column)
        self.cost_ns = np.zeros(4096, np.int64)
        self.calls = 0
        self.counters = JournalCounters()
        self._stop = threading.Event()
        # The writer passes right after a cycle, woken by record() every _every cycles: it runs in the
        # control thread's sleep, not into its next cycle (a writer holding the GIL when the control
        # thread wakes costs the control thread up to the switch interval, 0.5 ms).
        self._wake = threading.Event()
        self._every = max(1, int(round(cfg.flush_interval_s / period_s)))
        self._thread: threading.Thread | None = None
        self._fh = None
        self._seg_path: Path | None = None
        self._seg_end_ns = 0
        self._last_fsync = 0.0
        self._written_roster = -1
        self._last_sp = self._last_p = self._last_reason = None
        self._site_of_row = None
        self._n_sites = 0
        self._converter: subprocess.Popen | None = None
        self._to_convert: list[Path] = []
        self._converting: Path | None = None
        self._next_retention = 0.0

    def _size_vehicle_slots(self, n_rows: int) -> None:
        """Preallocate the stripe slots: ~5 s of stripes (at least 4), each of ceil(n / stripes) rows."""
        rows = max(1, -(-max(n_rows, 1) // self._stripes))
        self._vslots = max(4, int(math.ceil(min(self.cfg.buffer_s, 5.0) / self.period_s)))
        self._vrows = rows
        # float64 as the fleet's columns: a plain memcpy on the control thread, cast to float32 by the writer
        self._v_sp = np.zeros((self._vslots, rows), np.float64)
        self._v_p = np.zeros((self._vslots, rows), np.float64)
        self._v_reason = np.zeros((self._vslots, rows), np.uint8)
        self._v_meta = np.full((self._vslots, 5), -1, np.int64)  # t_ns, seq, row0, row1, fleet version

    # ----------------------------------------------------------------- control thread
    def record(self, agg, result, times) -> None:
        """Copy this cycle into the ring (and one stripe of the vehicles); O(1) but for the stripe."""
        t0 = time.perf_counter_ns()
        fleet = self.fleet
        n = fleet.n_rows
        for k, (reader, _site) in enumerate(agg.inverters):
            sample, _t = reader.latest.read()
            self._inv[k] = sample.p_kw if sample is not None else math.nan
        status = agg.status
        age_ms = status.get("input_age_ms")
        test = agg._test
        t_ns = time.time_ns()
        counts = result.nodes_per_reason
        inv = self._inv
        # one tuple assignment in CYCLE_FIELDS order (~1.5 us; field by field it was ~11 us)
        rec = (t_ns, self.epoch, agg.seq, result.frequency_hz,
               math.nan if age_ms is None or agg.meter is None else age_ms, agg._f_stale, result.service_fraction,
               agg.dispatcher.capacity_kw, result.request_kw, result.target_kw, result.allocated_kw,
               agg.delivered_kw,  # the status message's sum of reported power, computed once per cycle
               inv.sum() if len(inv) else math.nan, result.feasible_dis_kw, result.feasible_chg_kw,
               result.n_carrying, result.estop, -1 if test is None else test.row,
               math.nan if test is None else test.kw,
               (times.inputs_ns + times.kernel_ns + times.publish_ns) / 1e6, counts[:N_REASONS])
        self._ring[self._w % len(self._ring)] = rec + (inv,) if len(inv) else rec
        self._w += 1
        if self.cfg.vehicles:
            self._record_stripe(result, n, t_ns, agg.seq)
        if self._w % self._every == 0:
            self._wake.set()
        self.cost_ns[self.calls % len(self.cost_ns)] = time.perf_counter_ns() - t0
        self.calls += 1

    def _record_stripe(self, result, n: int, t_ns: int, seq: int) -> None:
        fleet = self.fleet
        if fleet.version != self._version:  # churn (rare): the writer needs the new row -> id map
            self._version = fleet.version
            self._roster = (fleet.version, list(fleet.node_ids[:n]), fleet.site[:n].copy(), list(fleet.site_ids))
            if -(-max(n, 1) // self._stripes) > self._vrows:
                # the fleet outgrew the stripe slots (rare: churn): new arrays; the writer skips the
                # stripes in flight, whose fleet version no longer matches the roster
                self._size_vehicle_slots(n)
            self._stripe_k = 0
        if n == 0:
            return
        if self._vw - self._vr >= self._vslots:  # writer stalled: skip this stripe (the next sweep has it)
            return
        a = self._stripe_k * self._vrows
        if a >= n:
            self._stripe_k, a = 0, 0
        b = min(n, a + self._vrows)
        i = self._vw % self._vslots
        m = b - a
        # memoryview copies: a memcpy that keeps the GIL. numpy releases the GIL for copies this size, and
        # getting it back from the bus or writer thread cost up to the 0.5 ms switch interval (p99 0.35 ms).
        memoryview(self._v_sp[i])[:m] = memoryview(result.setpoints_kw)[a:b]
        memoryview(self._v_p[i])[:m] = memoryview(fleet.p_actual_kw)[a:b]
        memoryview(self._v_reason[i])[:m] = memoryview(result.reasons)[a:b]
        meta = self._v_meta[i]
        meta[0], meta[1], meta[2], meta[3], meta[4] = t_ns, seq, a, b, self._version
        self._vw += 1
        self._stripe_k = 0 if b >= n else self._stripe_k + 1

    def cost_samples_ns(self) -> np.ndarray:
        """The control-thread cost of the newest record() calls (up to 4096), ns."""
        k = min(self.calls, len(self.cost_ns))
        idx = (np.arange(self.calls - k, self.calls)) % len(self.cost_ns)
        return self.cost_ns[idx]

    # ----------------------------------------------------------------- writer thread
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._thread = threading.Thread(target=self._main, name="v2grt-journal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Drain what the control thread recorded and seal the segment; call after the loop's last cycle.

        A Parquet conversion still running goes on in its own process (or is redone at the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def _main(self) -> None:
        try:
            os.nice(5)  # Linux: per thread; the control thread keeps its priority
        except OSError:
            pass
        while not self._stop.is_set():
            # woken by record(); the timeout keeps writing (and fsyncing) if the loop itself stalls
            self._wake.wait(max(1.0, 2 * self.cfg.flush_interval_s))
            self._wake.clear()
            self._guarded(self._pass)
        self._guarded(self._pass)
        self._guarded(self._seal)
        self._guarded(lambda: self._maintain(final=True))

    def _guarded(self, step) -> None:
        """A bug in the writer must not end the journal silently: logged with its traceback, counted."""
        try:
            step()
        except Exception as exc:
            self.counters.write_errors += 1
            self.counters.failing = True
            self.counters.last_error = repr(exc)
            log.exception("JOURNAL_WRITER_ERROR")
            self._event("JOURNAL_WRITE_FAILED", logging.ERROR, error=repr(exc),
                        message="the journal writer raised; see the traceback above")

    def _pass(self) -> None:
        w, vw = self._w, self._vw
        lost = w - self._r - len(self._ring)
        if lost > 0:
            self.counters.dropped += lost
            self._r = w - len(self._ring)
            self._event("JOURNAL_OVERRUN", logging.ERROR, dropped=lost,
                        message="the journal writer fell behind the ring; records dropped")
        idx = np.arange(self._r, w) % len(self._ring)
        cycles = self._ring[idx]  # a copy: the control thread may overwrite the ring from here on
        stripes = [(self._v_meta[i % self._vslots].copy(), i % self._vslots) for i in range(self._vr, vw)]
        try:
            self._write(cycles, stripes)
            if self.counters.failing:
                self.counters.failing = False
                self._event("JOURNAL_WRITE_RESTORED", logging.INFO, path=str(self._seg_path))
        except OSError as exc:
            self._write_failed(exc, len(cycles))
        self._r, self._vr = w, vw
        self._maintain()

    def _write(self, cycles: np.ndarray, stripes: list) -> None:
        while len(cycles) or stripes:
            if self._fh is None or (len(cycles) and cycles["t_ns"][0] >= self._seg_end_ns) or (
                    not len(cycles) and stripes and stripes[0][0][0] >= self._seg_end_ns):
                self._seal()
                t_first = int(cycles["t_ns"][0]) if len(cycles) else int(stripes[0][0][0])
                self._open(t_first)
            k = int(np.searchsorted(cycles["t_ns"], self._seg_end_ns)) if len(cycles) else 0
            if k:
                self._append(frame(CYCLES, cycles[:k].tobytes()))
                self.counters.records += k
                cycles = cycles[k:]
            while stripes and stripes[0][0][0] < self._seg_end_ns:
                meta, i = stripes.pop(0)
                self._write_stripe(meta, i)
        now = time.monotonic()
        if self._fh is not None and now - self._last_fsync >= self.cfg.fsync_interval_s:
            os.fsync(self._fh.fileno())
            self._last_fsync = now

    def _write_stripe(self, meta, i: int) -> None:
        t_ns, seq, a, b, version = (int(x) for x in meta)
        if self._roster is None or version != self._roster[0]:
            return  # a stripe of a fleet layout that has since changed
        if self._written_roster != version:
            self._write_roster()
        m = b - a
        sp = self._v_sp[i, :m].astype(np.float32)
        p = self._v_p[i, :m].astype(np.float32)
        reason = self._v_reason[i, :m]
        changed = ((sp != self._last_sp[a:b]) | (p != self._last_p[a:b]) | (reason != self._last_reason[a:b]))
        rows = np.flatnonzero(changed)
        if len(rows):
            payload = b"".join((_VEH_HEAD.pack(t_ns, seq, version, len(rows)), (rows + a).astype("<u4").tobytes(),
                                sp[rows].tobytes(), p[rows].tobytes(),
                                reason[rows].tobytes()))
            self._append(frame(VEHICLES, payload))
            self.counters.vehicle_rows += len(rows)
            self._last_sp[a:b] = sp
            self._last_p[a:b] = p
            self._last_reason[a:b] = reason
        if b >= len(self._last_sp):  # a sweep is complete: per-site totals of the newest samples
            sites = self._site_of_row
            w_sp = np.bincount(sites, weights=np.nan_to_num(self._last_sp), minlength=self._n_sites)
            w_p = np.bincount(sites, weights=np.nan_to_num(self._last_p), minlength=self._n_sites)
            self._append(frame(SITES, _SITES_HEAD.pack(t_ns, seq, self._n_sites) + w_sp.astype("<f8").tobytes()
                               + w_p.astype("<f8").tobytes()))

    def _write_roster(self) -> None:
        version, node_ids, site, site_ids = self._roster
        doc = {"version": version, "node_ids": node_ids, "site": site.tolist(), "site_ids": site_ids}
        self._append(frame(ROSTER, json.dumps(doc, separators=(",", ":")).encode()))
        self._written_roster = version
        n = len(node_ids)
        # NaN never equals itself: each vehicle's first sample in a segment is always written
        self._last_sp = np.full(n, np.nan, np.float32)
        self._last_p = np.full(n, np.nan, np.float32)
        self._last_reason = np.zeros(n, np.uint8)
        self._site_of_row = np.asarray(site, np.int64)
        self._n_sites = len(site_ids)

    def _open(self, t_ns: int) -> None:
        rotate_ns = int(self.cfg.rotate_s * 1e9)
        start = t_ns - t_ns % rotate_ns
        self._seg_end_ns = start + rotate_ns
        stamp = _dt.datetime.fromtimestamp(t_ns / 1e9, _dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        base = f"{self.fleet_id}-{stamp}Z-e{self.epoch}"
        path = self.dir / f"{base}{SUFFIX}"
        k = 1
        while path.exists():  # never append to a file another writer (or a failed write) left
            path = self.dir / f"{base}-{k}{SUFFIX}"
            k += 1
        fh = open(path, "xb", buffering=0)
        self._fh, self._seg_path = fh, path
        self.counters.segments += 1
        header = {"format": FORMAT_VERSION, "fleet_id": self.fleet_id, "epoch": self.epoch,
                  "period_s": self.period_s, "created_t_ns": time.time_ns(), "segment_start_ns": start,
                  "segment_end_ns": self._seg_end_ns, "dtype": self.dtype.descr, "reason_names": REASON_NAMES,
                  "inverters": [{"name": n, "site": s} for n, s in zip(self.inverter_names, self.inverter_sites)],
                  "vehicle_interval_s": self.cfg.vehicle_interval_s if self.cfg.vehicles else None,
                  **self.meta}
        try:
            self._append(MAGIC)
            self._append(frame(HEADER, json.dumps(header).encode()))
        except OSError:
            # a full disk fails here on every retry: leave no headerless file behind (it holds no record)
            self._fh = None
            fh.close()
            path.unlink(missing_ok=True)
            raise
        self._written_roster = -1
        self._last_fsync = time.monotonic()

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # FileIO.write may write less than asked
            n = self._fh.write(view)
            view = view[n:]

    def _seal(self) -> None:
        if self._fh is None:
            return
        fh, path = self._fh, self._seg_path
        self._fh = None
        try:
            fh.write(frame(END, json.dumps({"records": self.counters.records, "t_ns": time.time_ns()}).encode()))
            os.fsync(fh.fileno())
        except OSError as exc:
            self._write_failed(exc, 0)
        finally:
            try:
                fh.close()
            except OSError:
                pass
        self._to_convert.append(path)

    def _write_failed(self, exc: OSError, records: int) -> None:
        """Count and alarm; close the segment (a torn frame may end it) so the next pass starts a new one."""
        self.counters.write_errors += 1
        self.counters.dropped += records
        self.counters.failing = True
        self.counters.last_error = f"{exc.strerror or exc}"
        self._event("JOURNAL_WRITE_FAILED", logging.ERROR, path=str(self._seg_path or self.dir), errno=exc.errno,
                    error=exc.strerror or str(exc), dropped=records,
                    message="the dispatch journal cannot write; the loop goes on without evidence until it can")
        fh, self._fh = self._fh, None
        if self._seg_path is not None and self._seg_path.exists() and self._seg_path not in self._to_convert:
            self._to_convert.append(self._seg_path)  # its valid frames are evidence too
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def _event(self, code: str, level: int, message: str = "", **fields) -> None:
        if self.events is not None:
            self.events.emit(code, level, key="journal", message=message, **fields)
        else:
            log.log(level, "%s %s %s", code, fields, message)

    # ----------------------------------------------------------------- conversion, retention
    def _recover(self) -> None:
        """Segments left without Parquet (a crash, a stop during conversion) are converted as they are."""
        if self.cfg.parquet:
            for path in sorted(self.dir.glob(f"*{SUFFIX}")):
                if not parquet_paths(path)["cycles"].exists():
                    self._to_convert.append(path)

    def _maintain(self, final: bool = False) -> None:
        if self._converter is not None and self._converter.poll() is not None:
            if self._converter.returncode == 0:
                self.counters.converted += 1
            else:
                self._event("JOURNAL_CONVERT_FAILED", logging.WARNING, path=str(self._converting),
                            code=self._converter.returncode)
            self._converter = None
        if self._converter is None and self._to_convert and self.cfg.parquet:
            self._converting = self._to_convert.pop(0)
            # a child process at low priority: the conversion never holds this process's GIL or a core the
            # control thread needs (it nices itself: preexec_fn is not safe in a threaded parent)
            self._converter = subprocess.Popen([sys.executable, "-m", "v2grt.journal", "convert",
                                                str(self._converting)], stdout=subprocess.DEVNULL)
        elif not self.cfg.parquet:
            self._to_convert.clear()
        now = time.monotonic()
        if final or now >= self._next_retention:
            self._next_retention = now + 60.0
            self._retention()

    def _retention(self) -> None:
        cfg = self.cfg
        if cfg.max_age_h is None and cfg.max_size_gb is None:
            return
        segs = sorted((p for p in self.dir.glob(f"*{SUFFIX}") if p != self._seg_path), key=lambda p: p.stat().st_mtime)
        files = {p: [p, *(q for q in parquet_paths(p).values() if q.exists())] for p in segs}
        size = sum(q.stat().st_size for fs in files.values() for q in fs)
        if self._seg_path is not None and self._seg_path.exists():
            size += self._seg_path.stat().st_size
        now = time.time()
        for p in segs:
            too_old = cfg.max_age_h is not None and now - p.stat().st_mtime > cfg.max_age_h * 3600
            too_big = cfg.max_size_gb is not None and size > cfg.max_size_gb * 1e9
            if not (too_old or too_big):
                break
            if self._converter is not None and p == self._converting:
                continue
            for q in files[p]:
                size -= q.stat().st_size
                q.unlink(missing_ok=True)
            self.counters.removed += 1
            log.info("JOURNAL_RETENTION removed %s (%s)", p.name, "age" if too_old else "size")


# ------------------------------------------------------------------------------------------ reading
@dataclasses.dataclass
class Segment:
    path: Path
    header: dict
    cycles: np.ndarray
    rosters: dict  # version -> {"node_ids", "site", "site_ids"}
    sites: list  # (t_ns, seq, setpoint_kw per site, p_kw per site)
    sealed: bool
    vehicle_rows: int  # per-vehicle samples in the segment (read them with vehicle_batches)


def read_segment(path: str | Path) -> Segment:
    """Every valid frame of a segment but the per-vehicle ones (its torn tail, if any, left out).

    Per-vehicle samples can be ~100,000 a second: they are streamed by vehicle_batches, never held whole."""
    path = Path(path)
    header, dtype, chunks, rosters, sites, sealed, n_veh = None, None, [], {}, [], False, 0
    for kind, payload in read_frames(path):
        if kind == HEADER:
            header = json.loads(payload)
            dtype = np.dtype([tuple(f) if len(f) == 2 else (f[0], f[1], tuple(f[2])) for f in header["dtype"]])
        elif kind == CYCLES and dtype is not None:
            chunks.append(np.frombuffer(payload, dtype))
        elif kind == ROSTER:
            doc = json.loads(payload)
            rosters[doc["version"]] = doc
        elif kind == VEHICLES:
            n_veh += _VEH_HEAD.unpack_from(payload)[3]
        elif kind == SITES:
            t_ns, seq, n = _SITES_HEAD.unpack_from(payload)
            o = _SITES_HEAD.size
            sites.append((t_ns, seq, np.frombuffer(payload, "<f8", n, o), np.frombuffer(payload, "<f8", n, o + 8 * n)))
        elif kind == END:
            sealed = True
    if header is None:
        raise JournalError(f"{path}: not a v2grt journal segment (no valid header frame)")
    cycles = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    return Segment(path, header, cycles, rosters, sites, sealed, n_veh)


def parquet_paths(seg: Path) -> dict[str, Path]:
    stem = seg.name[: -len(SUFFIX)]
    return {t: seg.with_name(f"{stem}.{t}.parquet") for t in ("cycles", "vehicles", "sites")}


def cycles_table(seg: Segment):
    """The per-cycle records as a pyarrow Table: the scalar fields, reason counts as n_<REASON>,
    inverter_<name>_kw per configured inverter, and test_node (the id of test_row)."""
    import pyarrow as pa

    c = seg.cycles
    cols = {"time": pa.array(c["t_ns"], pa.timestamp("ns", tz="UTC"))}
    for name, _kind, _doc in CYCLE_FIELDS:
        cols[name] = c[name]
    for code, rname in enumerate(REASON_NAMES):
        if rname != "EMPTY" and (rname in Reason.__members__ or c["reasons"][:, code].any()):
            cols[f"n_{rname}"] = c["reasons"][:, code]
    for k, inv in enumerate(seg.header.get("inverters", [])):
        cols[f"inverter_{inv['name']}_kw"] = c["inverter_kw"][:, k]
    ids = seg.rosters[max(seg.rosters)]["node_ids"] if seg.rosters else None
    cols["test_node"] = pa.array([None if r < 0 or ids is None else ids[r] for r in c["test_row"]], pa.string())
    return pa.table(cols)


_ALL_REASON_NAMES = REASON_NAMES + [f"CODE_{c}" for c in range(N_REASONS, 256)]


def vehicles_schema():
    import pyarrow as pa

    dict_str = pa.dictionary(pa.int32(), pa.string())
    return pa.schema([("time", pa.timestamp("ns", tz="UTC")), ("t_ns", pa.int64()), ("seq", pa.int64()),
                      ("node_id", dict_str), ("site_id", dict_str), ("setpoint_kw", pa.float32()),
                      ("p_kw", pa.float32()), ("reason", dict_str)])


def vehicle_batches(seg: Segment, only: set[str] | None = None, t0_ns: int | None = None,
                    t1_ns: int | None = None, batch_rows: int = 1 << 20):
    """Per-vehicle samples, changes only, as pyarrow RecordBatches of about batch_rows rows (memory stays
    bounded whatever the segment's size): time, t_ns, seq, node_id, site_id, setpoint_kw, p_kw, reason.
    node_id, site_id and reason are dictionary-encoded (indices into the roster's ids)."""
    import pyarrow as pa

    schema = vehicles_schema()
    reason_dict = pa.array(_ALL_REASON_NAMES, pa.string())
    rosters = {}
    for v, doc in seg.rosters.items():
        keep = None if only is None else np.isin(np.asarray(doc["node_ids"], dtype=object), list(only))
        rosters[v] = (pa.array(doc["node_ids"], pa.string()), pa.array(doc["site_ids"], pa.string()),
                      np.asarray(doc["site"], np.int32), keep)
    parts: list = []
    n = 0
    version = None

    def flush():
        t, seq, rows, sp, p, reason = (np.concatenate([x[k] for x in parts]) for k in range(6))
        ids, site_ids, site_of_row, _keep = rosters[version]
        return pa.RecordBatch.from_arrays([
            pa.array(t, pa.timestamp("ns", tz="UTC")), pa.array(t), pa.array(seq),
            pa.DictionaryArray.from_arrays(pa.array(rows, pa.int32()), ids),
            pa.DictionaryArray.from_arrays(pa.array(site_of_row[rows], pa.int32()), site_ids),
            pa.array(sp), pa.array(p),
            pa.DictionaryArray.from_arrays(pa.array(reason.astype(np.int32)), reason_dict)], schema=schema)

    for kind, payload in read_frames(seg.path):
        if kind != VEHICLES:
            continue
        t_ns, seq, v, count = _VEH_HEAD.unpack_from(payload)
        if v not in rosters or (t0_ns is not None and t_ns < t0_ns) or (t1_ns is not None and t_ns >= t1_ns):
            continue
        o = _VEH_HEAD.size
        rows = np.frombuffer(payload, "<u4", count, o).astype(np.int32)
        sp = np.frombuffer(payload, "<f4", count, o + 4 * count)
        p = np.frombuffer(payload, "<f4", count, o + 8 * count)
        reason = np.frombuffer(payload, "u1", count, o + 12 * count)
        keep = rosters[v][3]
        if keep is not None:
            sel = keep[rows]
            rows, sp, p, reason = rows[sel], sp[sel], p[sel], reason[sel]
        if parts and (v != version or n >= batch_rows):
            yield flush()
            parts, n = [], 0
        version = v
        parts.append((np.full(len(rows), t_ns, np.int64), np.full(len(rows), seq, np.int64), rows, sp, p, reason))
        n += len(rows)
    if parts:
        yield flush()


def vehicles_table(seg: Segment, only: set[str] | None = None):
    """All per-vehicle samples of a segment as one Table (small segments, tests); see vehicle_batches."""
    import pyarrow as pa

    return pa.Table.from_batches(list(vehicle_batches(seg, only)), schema=vehicles_schema())


def sites_table(seg: Segment):
    """Per-site totals after each sweep of the vehicles: time, site_id, setpoint_kw, p_kw."""
    import pyarrow as pa

    site_ids = seg.rosters[max(seg.rosters)]["site_ids"] if seg.rosters else []
    t, sid, sp, p = [], [], [], []
    for t_ns, _seq, w_sp, w_p in seg.sites:
        for k in range(len(w_sp)):
            t.append(t_ns)
            sid.append(site_ids[k] if k < len(site_ids) else str(k))
            sp.append(w_sp[k])
            p.append(w_p[k])
    t = np.asarray(t, np.int64)
    return pa.table({"time": pa.array(t, pa.timestamp("ns", tz="UTC")), "t_ns": t,
                     "site_id": pa.array(sid, pa.string()), "setpoint_kw": np.asarray(sp, np.float64),
                     "p_kw": np.asarray(p, np.float64)})


def convert(path: str | Path) -> dict[str, Path]:
    """Write a segment's cycles, vehicles and sites as Parquet beside it (each via a temp file + rename).
    The vehicles are streamed in row groups: memory stays bounded for any fleet and segment length."""
    import pyarrow.parquet as pq

    path = Path(path)
    seg = read_segment(path)
    out = parquet_paths(path)
    tmp = out["vehicles"].with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, vehicles_schema(), compression="zstd") as w:
        for batch in vehicle_batches(seg):
            w.write_batch(batch)
    os.replace(tmp, out["vehicles"])
    for name, table in (("sites", sites_table(seg)), ("cycles", cycles_table(seg))):
        tmp = out[name].with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out[name])  # cycles last: its presence marks the segment converted
    return out


def segments_between(directory: str | Path, t0_ns: int, t1_ns: int) -> list[Path]:
    """Segments of a directory that may hold records in [t0_ns, t1_ns), oldest first."""
    out = []
    for p in sorted(Path(directory).glob(f"*{SUFFIX}")):
        try:
            frames = read_frames(p)
            kind, payload = next(frames)
            frames.close()
        except (StopIteration, OSError):
            continue
        if kind != HEADER:
            continue
        h = json.loads(payload)
        if h["segment_start_ns"] < t1_ns and h["segment_end_ns"] > t0_ns:
            out.append(p)
    return out


def export_cycles(directory: str | Path, t0_ns: int, t1_ns: int):
    """The cycle records of [t0_ns, t1_ns) as one pyarrow Table (None: no segment), the open segment included."""
    import pyarrow as pa

    tables = []
    for p in segments_between(directory, t0_ns, t1_ns):
        t = cycles_table(read_segment(p))
        ts = t.column("t_ns").to_numpy()
        tables.append(t.filter(pa.array((ts >= t0_ns) & (ts < t1_ns))))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def export_vehicles(directory: str | Path, t0_ns: int, t1_ns: int, only: set[str] | None = None):
    """The per-vehicle samples of [t0_ns, t1_ns) as a stream of RecordBatches (vehicles_schema())."""
    for p in segments_between(directory, t0_ns, t1_ns):
        yield from vehicle_batches(read_segment(p), only, t0_ns, t1_ns)


def journal_dir(cfg) -> Path:
    """The configured journal directory: journal.dir, or <state_dir>/journal/<fleet_id>."""
    if cfg.journal.dir is not None:
        return cfg.resolve(cfg.journal.dir)
    return Path(cfg.resolve(cfg.state_dir)) / "journal" / cfg.fleet_id


def for_aggregator(agg) -> Journal:
    cfg = agg.cfg
    return Journal(cfg.journal, journal_dir(cfg), fleet=agg.fleet, epoch=agg.epoch, fleet_id=cfg.fleet_id,
                   period_s=cfg.period_s, inverter_names=[i.name for i in cfg.inverters],
                   inverter_sites=[i.site for i in cfg.inverters], events=agg.events,
                   meta={"service": agg.dispatcher.service.name, "capacity_kw": agg.dispatcher.capacity_kw})


# ------------------------------------------------------------------------------------------ CLI
def _parse_time(text: str, what: str) -> int:
    from v2grt.cli import CliError

    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"journal export: {what}={text!r} is not an ISO 8601 time (e.g. 2026-12-04T21:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)  # records are UTC; a time without a zone is read as UTC
    # integer arithmetic: a float timestamp in ns since 1970 is only good to ~0.25 us
    return (t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)) // _dt.timedelta(microseconds=1) * 1000


def cmd_export(args) -> int:
    """Write one interval of the journal as Parquet or CSV (cycle records, or per-vehicle samples)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from v2grt.cli import EXIT_OK, CliError

    t0, t1 = _parse_time(args.start, "--from"), _parse_time(args.end, "--to")
    if t1 <= t0:
        raise CliError(f"journal export: --to {args.end} is not after --from {args.start}")
    if not Path(args.dir).is_dir():
        raise CliError(f"journal export: {args.dir}: no such directory")
    rows = 0
    try:
        if args.vehicles is None:
            table = export_cycles(args.dir, t0, t1)
            rows = 0 if table is None else table.num_rows
            if rows:
                (pq.write_table(table, args.out, compression="zstd") if args.format == "parquet"
                 else pcsv.write_csv(table, args.out))
        else:
            only = None if args.vehicles == "*" else set(args.vehicles.split(","))
            schema = vehicles_schema()
            tmp = Path(f"{args.out}.tmp")
            writer = (pq.ParquetWriter(tmp, schema, compression="zstd") if args.format == "parquet"
                      else pcsv.CSVWriter(tmp, schema))
            with writer:
                for batch in export_vehicles(args.dir, t0, t1, only):
                    writer.write_batch(batch)
                    rows += batch.num_rows
            if rows:
                os.replace(tmp, args.out)
            else:
                tmp.unlink(missing_ok=True)
    except JournalError as exc:
        raise CliError(f"journal export: {exc}") from None
    if not rows:
        raise CliError(f"journal export: {args.dir} holds no records between {args.start} and {args.end}", 1)
    print(f"{args.out}: {rows} {'cycle records' if args.vehicles is None else 'vehicle samples'}")
    return EXIT_OK


def cmd_convert(args) -> int:
    """Convert segments to Parquet (the writer does this for sealed segments itself)."""
    for p in args.segments:
        out = convert(p)
        print(" ".join(str(q) for q in out.values()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("journal", help="the dispatch journal: export an interval, convert segments (docs/journal.md)")
    jsub = p.add_subparsers(dest="journal_command", required=True, metavar="ACTION")
    e = jsub.add_parser("export", help="one interval as Parquet or CSV", description=cmd_export.__doc__)
    e.add_argument("dir", help="the journal directory (journal.dir; default <state_dir>/journal/<fleet_id>)")
    e.add_argument("--from", dest="start", required=True, help="start, ISO 8601 (UTC if no zone), inclusive")
    e.add_argument("--to", dest="end", required=True, help="end, ISO 8601 (UTC if no zone), exclusive")
    e.add_argument("--vehicles", nargs="?", const="*", default=None,
                   help="per-vehicle samples instead of cycle records; optionally only these ids (ID,ID,...)")
    e.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    e.add_argument("--out", required=True, help="output file")
    e.set_defaults(func=cmd_export)
    c = jsub.add_parser("convert", help="convert segments to Parquet", description=cmd_convert.__doc__)
    c.add_argument("segments", nargs="+")
    c.set_defaults(func=cmd_convert)


if __name__ == "__main__":  # python -m v2grt.journal convert SEGMENT...: the writer's low-priority child
    if len(sys.argv) >= 3 and sys.argv[1] == "convert":
        try:
            os.nice(15)
        except OSError:
            pass
        try:
            for seg_path in sys.argv[2:]:
                convert(seg_path)
        except (OSError, JournalError) as exc:  # e.g. retention removed the segment first
            sys.exit(f"v2grt.journal convert: {exc}")
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} convert SEGMENT...")
