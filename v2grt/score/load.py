"""Reading a journal directory into a Series (the scorer's edge: files in, arrays out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from v2grt.codes import Reason
from v2grt.journal.format import HEADER, JournalError, read_frames
from v2grt.journal.read import export_cycles, export_vehicles, segments_between
from v2grt.score.metrics import floor_episodes
from v2grt.score.series import Series

T_MIN_NS, T_MAX_NS = 0, (1 << 63) - 1

#: A vehicle counts as discharging above this reported or dispatched power, kW (telemetry noise floor).
DISCHARGING_KW = 0.01


def _first_header(paths: list[Path]) -> dict:
    for p in paths:
        for kind, payload in read_frames(p):
            if kind == HEADER:
                return json.loads(payload)
            break
    return {}


def load_series(journal_dir: str | Path, t0_ns: int | None = None, t1_ns: int | None = None, *,
                vehicles: bool = True) -> Series:
    """The cycle records of ``[t0_ns, t1_ns)`` of a journal directory, and its SoC-floor episodes.

    Reads the raw segments (the open one included) through v2grt.journal's readers. The per-vehicle
    samples are streamed (never held whole): only the episodes in which a vehicle's reason was
    SOC_BELOW_MINIMUM while its setpoint or reported power was a discharge (> 0.01 kW) are kept.

    Raises
    ------
    JournalError
        The directory does not exist or holds no cycle record in the interval (the message names both).
    """
    d = Path(journal_dir)
    if not d.is_dir():
        raise JournalError(f"{d}: no such journal directory")
    t0 = T_MIN_NS if t0_ns is None else int(t0_ns)
    t1 = T_MAX_NS if t1_ns is None else int(t1_ns)
    table = export_cycles(d, t0, t1)
    if table is None or table.num_rows == 0:
        raise JournalError(f"{d}: no cycle records in the interval asked for")
    col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    order = np.argsort(col["t_ns"], kind="stable")
    t_ns = col["t_ns"][order]
    keep = np.r_[True, np.diff(t_ns) > 0]  # an HA standby and a leader never share a directory; be safe
    idx = order[keep]
    cap = col["capacity_kw"][idx].astype(np.float64)
    fraction = col["service_fraction"][idx].astype(np.float64)
    base = col["request_kw"][idx] - np.nan_to_num(fraction) * cap
    header = _first_header(segments_between(d, t0, t1))
    episodes = []
    if vehicles:
        episodes = _floor_episodes(d, t0, t1, int(t_ns[-1]))
    n_below = col.get(f"n_{Reason.SOC_BELOW_MINIMUM.name}")
    return Series(
        t_ns=t_ns[keep].astype(np.int64), f_hz=col["f_hz"][idx].astype(np.float64), capacity_kw=cap, base_kw=base,
        delivered_measured_kw=col["site_measured_kw"][idx].astype(np.float64),
        delivered_reported_kw=col["delivered_kw"][idx].astype(np.float64),
        available_dis_kw=col["available_dis_kw"][idx].astype(np.float64),
        available_chg_kw=col["available_chg_kw"][idx].astype(np.float64),
        published=col["published"][idx].astype(np.int8), estop=col["estop"][idx].astype(np.int8),
        period_s=_period_s(header, t_ns[keep]),
        service_fraction=fraction, target_kw=col["target_kw"][idx].astype(np.float64),
        n_soc_below_minimum=None if n_below is None else n_below[idx].astype(np.int64),
        floor_episodes=episodes, header=header)


def _period_s(header: dict, t_ns: np.ndarray) -> float:
    """The control period the journal's header states, else the median record spacing, else 0.1 s."""
    if header.get("period_s"):
        return float(header["period_s"])
    return float(np.median(np.diff(t_ns))) / 1e9 if len(t_ns) > 1 else 0.1


def _floor_episodes(d: Path, t0: int, t1: int, t_last_ns: int) -> list:
    """(node_id, t_start_ns, t_end_ns) of every run of samples 'at or below the floor while discharging'."""
    below = Reason.SOC_BELOW_MINIMUM.name
    open_: dict = {}
    out: list = []
    for batch in export_vehicles(d, t0, t1):
        reason = batch.column("reason")
        codes = reason.indices.to_numpy(zero_copy_only=False)
        names = reason.dictionary.to_pylist()
        code_below = names.index(below) if below in names else -1
        sp = batch.column("setpoint_kw").to_numpy(zero_copy_only=False)
        p = batch.column("p_kw").to_numpy(zero_copy_only=False)
        breaching = (codes == code_below) & ((sp > DISCHARGING_KW) | (p > DISCHARGING_KW))
        if not breaching.any() and not open_:
            continue
        node_col = batch.column("node_id")
        ids = node_col.dictionary.to_pylist()
        rows = node_col.indices.to_numpy(zero_copy_only=False)
        cand = np.isin(rows, rows[breaching])  # every sample of a vehicle that breaches in this batch
        if open_:
            where = {nid: i for i, nid in enumerate(ids)}
            cand |= np.isin(rows, [where[n] for n in open_ if n in where])
        sel = np.flatnonzero(cand)
        node = np.asarray([ids[r] for r in rows[sel].tolist()], dtype=object)
        t_ns = batch.column("t_ns").to_numpy()[sel]
        done, open_ = floor_episodes(node, t_ns, breaching[sel], t_last_ns, open_)
        out.extend(done)
    done, _ = floor_episodes(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, bool), t_last_ns, open_)
    out.extend(done)
    return [(n, int(a), int(b)) for n, a, b in out]
