"""Reading segments back: cycle records, per-vehicle samples streamed in bounded batches, per-site totals,
as pyarrow Tables; Parquet conversion of a segment; one interval of a journal directory."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from v2grt.codes import Reason
from v2grt.journal.format import (
    _SITES_HEAD,
    _VEH_HEAD,
    CYCLE_FIELDS,
    CYCLES,
    END,
    HEADER,
    N_REASONS,
    REASON_NAMES,
    ROSTER,
    SITES,
    SUFFIX,
    VEHICLES,
    JournalError,
    read_frames,
)


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
