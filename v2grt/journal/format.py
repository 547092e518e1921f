"""The journal's on-disk format: the cycle record's schema (units and signs), and the CRC-checked frames
of a segment file and their reader (docs/journal.md, "Segment format")."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from v2grt.codes import Reason

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
    ("epoch", "int64", "the scheduler's fencing epoch this cycle (HA: 0 until first elected)"),
    ("seq", "int64", "setpoint message sequence number of this cycle (as on the wire)"),
    ("published", "uint8", "1: this cycle's setpoints went out (with bus.publisher_thread: set once that thread has "
                           "queued every frame and the status); 0: not (an HA standby, fenced by its lease, also at "
                           "send time, or the publisher thread still busy with the previous cycle)"),
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
