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

from v2grt.journal.cli import add_parser
from v2grt.journal.format import (
    CYCLE_FIELDS,
    CYCLES,
    END,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    N_REASONS,
    REASON_NAMES,
    ROSTER,
    SITES,
    SUFFIX,
    VEHICLES,
    JournalError,
    cycle_dtype,
    frame,
    read_frames,
)
from v2grt.journal.read import (
    Segment,
    convert,
    cycles_table,
    export_cycles,
    export_vehicles,
    parquet_paths,
    read_segment,
    segments_between,
    sites_table,
    vehicle_batches,
    vehicles_schema,
    vehicles_table,
)
from v2grt.journal.writer import Journal, JournalCounters, for_aggregator, journal_dir

__all__ = [
    "CYCLES", "CYCLE_FIELDS", "END", "FORMAT_VERSION", "HEADER", "MAGIC", "N_REASONS", "REASON_NAMES", "ROSTER",
    "SITES", "SUFFIX", "VEHICLES", "Journal", "JournalCounters", "JournalError", "Segment", "add_parser",
    "convert", "cycle_dtype", "cycles_table", "export_cycles", "export_vehicles", "for_aggregator", "frame",
    "journal_dir", "parquet_paths", "read_frames", "read_segment", "segments_between", "sites_table",
    "vehicle_batches", "vehicles_schema", "vehicles_table",
]
