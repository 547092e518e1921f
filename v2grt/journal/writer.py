"""The journal's two sides in the aggregator: `Journal.record` on the control thread (a record and a stripe
of the vehicles into preallocated rings) and the writer thread (frames, fsync, rotation, retention,
the Parquet child, the full-disk alarm)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from v2grt.config import JournalConfig
from v2grt.journal.format import (
    _SITES_HEAD,
    _VEH_HEAD,
    CYCLES,
    END,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    REASON_NAMES,
    ROSTER,
    SITES,
    SUFFIX,
    VEHICLES,
    cycle_dtype,
    frame,
)
from v2grt.journal.read import parquet_paths
from v2grt.kernel import get_backend

log = logging.getLogger("v2grt.journal")


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
                 inverter_names: list[str], inverter_sites: list[str], events=None, meta: dict | None = None,
                 kernel=None):
        self.cfg = cfg
        self.dir = Path(directory)
        self.fleet = fleet
        self.epoch = epoch  # the open segment's epoch (each cycle records the aggregator's; a change starts a segment)
        self.fleet_id = fleet_id
        self.period_s = period_s
        self.events = events
        self.meta = meta or {}
        self.inverter_names = list(inverter_names)
        self.inverter_sites = list(inverter_sites)
        self.dtype = cycle_dtype(len(inverter_names))
        n_ring = max(64, int(math.ceil(cfg.buffer_s / period_s)))
        self._ring = np.zeros(n_ring, self.dtype)
        self._n_ring = n_ring
        self._w = 0  # records written into the ring (control thread only increments)
        # bus.publisher_thread: the newest record's `published` flag is decided by the publisher thread after its
        # sends (publish_outcome); the writer takes no record from that one on until it is (v2grt.publisher)
        self._undecided = -1  # the record index awaiting its outcome; -1: none
        # (index, seq, sent, delivered_kw): an outcome ahead of its record()
        self._early: tuple[int, int, bool, float] | None = None
        self._outcome_lock = threading.Lock()
        self._r = 0  # records taken by the writer
        self._inv = np.full(len(inverter_names), np.nan)
        # the record fill and the stripe copy, compiled (v2grt._core.JournalTap; the NumPy twin with the reference
        # backend): ~2 us and ~10 us at 5,000 rows, where the Python tuple into the structured ring and three
        # memoryview copies were ~23 and ~26 us p50 in the cycle at 100,000 vehicles (docs/benchmarks.md)
        self._tap = (kernel if kernel is not None else get_backend()).JournalTap(self._ring, self._inv)
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
        # The writer passes in the control thread's sleep, not into its next cycle (a writer holding the GIL
        # when the control thread wakes costs it up to the switch interval, 0.5 ms). It is not woken by
        # record(): any wake-up (Event.set, ~10 us; an eventfd write, ~8 us p50 / 14 us p99 under load: the
        # syscall wakes a thread on the other core) costs the control thread more than the copy itself. It
        # times itself instead: half a period after the cycle that ends a flush interval, from the newest
        # record()'s clock, which is in the middle of the control thread's sleep whenever a cycle's work
        # is under half its period.
        self._t_record_ns = 0  # perf_counter_ns() at the newest record() (CLOCK_MONOTONIC)
        self._every = max(1, int(round(cfg.flush_interval_s / period_s)))
        self._thread: threading.Thread | None = None
        self._sync = False  # started without a writer thread: record_cycle writes (see start)
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
        # float32 as the segment stores them: the tap casts while it copies (half the bytes written)
        self._v_sp = np.zeros((self._vslots, rows), np.float32)
        self._v_p = np.zeros((self._vslots, rows), np.float32)
        self._v_reason = np.zeros((self._vslots, rows), np.uint8)
        self._v_meta = np.full((self._vslots, 5), -1, np.int64)  # t_ns, seq, row0, row1, fleet version
        if getattr(self, "_tap", None) is not None:
            self._tap.bind_slots(self._v_sp, self._v_p, self._v_reason, self._v_meta)

    # ----------------------------------------------------------------- control thread
    def record(self, agg, result, times) -> None:
        """Copy this cycle into the ring (and one stripe of the vehicles); O(1) but for the stripe."""
        t0 = time.perf_counter_ns()
        for k, (reader, _site) in enumerate(agg.inverters):
            sample, _t = reader.latest.read()
            self._inv[k] = sample.p_kw if sample is not None else math.nan
        age_ms = agg.status.get("input_age_ms")
        test = agg._test
        self.record_cycle(result, t_ns=time.time_ns(), epoch=agg.epoch, seq=agg.seq, published=agg.published,
                          f_age_ms=math.nan if age_ms is None or agg.meter is None else age_ms,
                          frequency_stale=agg._f_stale, capacity_kw=agg.dispatcher.capacity_kw,
                          # the status message's sum; a cycle handed to the publisher thread owes it (NaN here) and
                          # gets it with its `published` flag (publish_outcome)
                          delivered_kw=math.nan if agg._owed is not None else agg.delivered_kw,
                          inverter_kw=self._inv, test_row=-1 if test is None else test.row,
                          test_kw=math.nan if test is None else test.kw,
                          work_ms=(times.inputs_ns + times.kernel_ns + times.publish_ns) / 1e6)
        self._t_record_ns = t0
        self.cost_ns[self.calls % len(self.cost_ns)] = time.perf_counter_ns() - t0
        self.calls += 1

    def record_cycle(self, result, *, t_ns: int, epoch: int, seq: int, published: bool, f_age_ms: float,
                     frequency_stale: bool, capacity_kw: float, delivered_kw: float, inverter_kw: np.ndarray,
                     test_row: int = -1, test_kw: float = math.nan, work_ms: float = math.nan) -> None:
        """One cycle's record from explicit values (``record`` reads them off the aggregator; the backtest
        passes simulated time and its simulated meters). ``inverter_kw``: one per configured inverter, kW."""
        inv = self._inv
        if inverter_kw is not inv:  # the tap reads the inverters from its own buffer
            inv[:] = inverter_kw
        with self._outcome_lock:  # uncontended but for the publisher thread's publish_outcome (~0.1 us)
            w = self._w
            early, self._early = self._early, None
            # the publisher thread decided before this record existed; only for the cycle it was handed (a cycle
            # that raised between its hand-over and its record() leaves an outcome that is not the next one's)
            if early is not None and early[0] == w and early[1] == seq and published:
                published = early[2]
                if not math.isnan(early[3]):
                    delivered_kw = early[3]
            self._tap.record(w % self._n_ring, t_ns, epoch, seq, published, result.frequency_hz, f_age_ms,
                             frequency_stale, result.service_fraction, capacity_kw, result.request_kw,
                             result.target_kw, result.allocated_kw, delivered_kw, result.feasible_dis_kw,
                             result.feasible_chg_kw, result.n_carrying, result.estop, test_row, test_kw, work_ms,
                             result.nodes_per_reason)
            self._w = w + 1
        if self.cfg.vehicles:
            self._record_stripe(result, self.fleet.n_rows, t_ns, seq)
        # The writer thread wakes itself half a period after a flush interval's last cycle (no wake-up from here:
        # an Event.set() cost 10/33 us p50/p99 in the cycle); without one (start(thread=False), the backtest) the
        # caller's thread writes every `_every` records itself.
        if self._sync and self._w % self._every == 0:
            self._guarded(self._pass)

    def expect_outcome(self) -> int:
        """Control thread, before handing a cycle to the publisher thread: the index of the record the cycle's
        record() will write, held back from the writer until publish_outcome() decides its `published` flag."""
        self._undecided = self._w
        return self._w

    def publish_outcome(self, w: int, seq: int, sent: bool, delivered_kw: float = math.nan) -> None:
        """Publisher thread, after the cycle's sends (or its refusal): record ``w``'s `published` flag and its
        `delivered_kw` (the sum the cycle owed, computed off the control thread; NaN: keep the recorded one)."""
        with self._outcome_lock:
            if self._w > w:  # recorded already: set the flag in the ring, where the writer has not taken it yet
                k = w % self._n_ring
                self._ring["published"][k] = sent
                if not math.isnan(delivered_kw):
                    self._ring["delivered_kw"][k] = delivered_kw
            else:  # record() has not run yet: it takes the outcome
                self._early = (w, seq, sent, delivered_kw)
            if self._undecided == w:
                self._undecided = -1

    def _record_stripe(self, result, n: int, t_ns: int, seq: int) -> None:
        fleet = self.fleet
        if fleet.version != self._version:  # churn (rare): the writer needs the new row -> id map
            self._take_roster(n)
        if n == 0:
            return
        if self._vw - self._vr >= self._vslots:  # writer stalled: skip this stripe (the next sweep has it)
            return
        a = self._stripe_k * self._vrows
        if a >= n:
            self._stripe_k, a = 0, 0
        b = min(n, a + self._vrows)
        self._tap.stripe(self._vw % self._vslots, a, b, t_ns, seq, self._version, result.setpoints_kw,
                         fleet.p_actual_kw, result.reasons)
        self._vw += 1
        self._stripe_k = 0 if b >= n else self._stripe_k + 1

    def _take_roster(self, n: int) -> None:
        """The row -> id map for the writer: O(n) (~10 ms at 1M vehicles), so start() takes it before the first
        cycle; record() takes it again only after churn (Fleet.add/remove, rare; no hook there to take it sooner)."""
        fleet = self.fleet
        self._version = fleet.version
        self._roster = (fleet.version, list(fleet.node_ids[:n]), fleet.site[:n].copy(), list(fleet.site_ids))
        if -(-max(n, 1) // self._stripes) > self._vrows:
            # the fleet outgrew the stripe slots (rare: churn): new arrays; the writer skips the
            # stripes in flight, whose fleet version no longer matches the roster
            self._size_vehicle_slots(n)
        self._stripe_k = 0

    def cost_samples_ns(self) -> np.ndarray:
        """The control-thread cost of the newest record() calls (up to 4096), ns."""
        k = min(self.calls, len(self.cost_ns))
        idx = (np.arange(self.calls - k, self.calls)) % len(self.cost_ns)
        return self.cost_ns[idx]

    def snapshot(self) -> dict:
        """The status reply's `journal` map (docs/wire.md 6.1). Read on the bus thread without a lock: each
        value is one attribute read of what the writer thread set, so a reply may be a pass behind."""
        c, fh, seg = self.counters, self._fh, self._seg_path
        return {"enabled": True, "dir": str(self.dir),
                "segment": seg.name if fh is not None and seg is not None else None,  # None: none open
                "records": c.records, "vehicle_rows": c.vehicle_rows, "dropped": c.dropped,
                "segments": c.segments, "write_errors": c.write_errors, "write_failing": c.failing,
                "last_error": c.last_error}

    # ----------------------------------------------------------------- writer thread
    def start(self, *, thread: bool = True, every: int | None = None) -> None:
        """Call before the loop's first cycle: the roster is taken here, not under the cycle's image lock.

        ``thread=False`` (the backtest, in simulated time): no writer thread; ``record_cycle`` writes every
        ``every`` records (default: a ``flush_interval_s``'s worth; at most half the ring and the vehicle
        stripe slots) itself, and ``stop`` drains and seals, all on the caller's thread."""
        if every is not None:
            # at most half the ring, and at most the vehicle stripe slots (a stripe finding them full is skipped)
            limit = min(len(self._ring) // 2, self._vslots if self.cfg.vehicles else len(self._ring))
            self._every = max(1, min(int(every), limit))
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.vehicles:
            self._take_roster(self.fleet.n_rows)
        self._recover()
        if not thread:
            self._sync = True
            return
        self._thread = threading.Thread(target=self._main, name="v2grt-journal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Drain what the control thread recorded and seal the segment; call after the loop's last cycle.

        A Parquet conversion still running goes on in its own process (or is redone at the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        elif self._sync:
            self._sync = False
            self._guarded(self._pass)
            self._guarded(self._seal)
            self._guarded(lambda: self._maintain(final=True))

    def _main(self) -> None:
        try:
            os.nice(5)  # Linux: per thread; the control thread keeps its priority
        except OSError:
            pass
        while not self._stop.is_set():
            self._stop.wait(self._until_next_pass_s())
            self._guarded(self._pass)
        self._guarded(lambda: self._pass(final=True))  # stop() comes after the publisher's last outcome
        self._guarded(self._seal)
        self._guarded(lambda: self._maintain(final=True))

    def _until_next_pass_s(self) -> float:
        """Seconds until half a period after the cycle that closes the next flush interval, counted from the newest
        record(); a flush interval from now if the loop is not recording (not started, stalled)."""
        period_ns = int(self.period_s * 1e9)
        now = time.perf_counter_ns()
        target = self._t_record_ns + (self._every - 1) * period_ns + period_ns // 2
        if target <= now:  # passed it (a slow pass, or the loop stalled): the same phase, the next period
            target += ((now - target) // period_ns + 1) * period_ns
        if target - now > 2 * self._every * period_ns:
            target = now + self._every * period_ns
        return (target - now) / 1e9

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

    def _pass(self, final: bool = False) -> None:
        w, vw = self._w, self._vw
        undecided = self._undecided  # read after _w: set before the record it names is counted in _w
        # Its `published` flag is not known yet: up to it, the rest next pass. Held back for at most half the ring
        # (a publisher thread stuck that long): then written as handed over (1), rather than lost to an overrun.
        if 0 <= undecided < w and not final and w - undecided < self._n_ring // 2:
            w = undecided
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
            # a new segment at the rotation time, and whenever the epoch changes (HA: elected, or a new
            # leader's epoch): each segment holds one epoch, the one its name and header carry
            if self._fh is None or (len(cycles) and (cycles["t_ns"][0] >= self._seg_end_ns
                                                     or cycles["epoch"][0] != self.epoch)) or (
                    not len(cycles) and stripes and stripes[0][0][0] >= self._seg_end_ns):
                self._seal()
                t_first = int(cycles["t_ns"][0]) if len(cycles) else int(stripes[0][0][0])
                self._open(t_first, int(cycles["epoch"][0]) if len(cycles) else self.epoch)
            end_ns = self._seg_end_ns
            k = int(np.searchsorted(cycles["t_ns"], end_ns)) if len(cycles) else 0
            other = np.flatnonzero(cycles["epoch"][:k] != self.epoch)
            if len(other):  # the epoch changes here: the rest, and the stripes from its time on, go to the next
                k = int(other[0])
                end_ns = int(cycles["t_ns"][k])
            if k:
                self._append(frame(CYCLES, cycles[:k].tobytes()))
                self.counters.records += k
                cycles = cycles[k:]
            while stripes and stripes[0][0][0] < end_ns:
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

    def _open(self, t_ns: int, epoch: int) -> None:
        self.epoch = epoch
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
                   meta={"service": agg.dispatcher.service.name, "capacity_kw": agg.dispatcher.capacity_kw,
                         "nominal_hz": agg.dispatcher.service.nominal_hz},
                   kernel=agg.dispatcher.kernel)
