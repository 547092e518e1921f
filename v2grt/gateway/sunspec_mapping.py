"""SunSpec DER charger <-> v2grt: the pure point tables, the one sign/scale converter per point, node states.

Nothing here touches a socket or a clock; the SunSpec gateway (``v2grt.gateway.sunspec``) and the
charger simulator (``v2grt.sim.sunspec_chargers``) both call it, so the two ends cannot disagree.
Point offsets, types and "not implemented" values come from pysunspec2's model definitions through
:mod:`v2grt.io.modbus` (``model_points``, ``decode_point``, ``encode_point``); nothing is typed in by hand.

Signs, from the SunSpec model definitions shipped in pysunspec2 (quoted in the tests):

- 701 ``W``: "Active power is positive for DER generation and negative for absorption": **+ = discharge
  into the grid**, the v2grt sign. No flip.
- 704 ``WSet``/``WSetRvrt``: "Set Active Power Level (may be negative for charging)" (the comment on
  ``WSetEna``): **+ = inject = discharge**, negative = charging. No flip.
- 702 ``WMaxRtg``, ``WChaRteMaxRtg``, ``WDisChaRteMaxRtg``: uint16 magnitudes (>= 0) in W, with 702's
  own ``W_SF``.
- 713 ``SoC``, ``SoH``: uint16 percent with ``Pct_SF``; ``WHAvail``: uint16 Wh with ``WH_SF``.

Every value is ``raw * 10**SF``; an SF outside SunSpec's -10..10 or "not implemented" makes the
point unusable. :func:`w_to_kw` and :func:`kw_to_wset` are the only place a power is converted.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

from v2grt.codes import Reason
from v2grt.io.modbus import Point, decode_point, encode_point, model_points

#: Models a charger must present after model 1 (common).
REQUIRED_MODELS: tuple[int, ...] = (701, 702, 704, 713)

#: 701 enumerations (model_701.json).
ST_OFF, ST_ON = 0, 1
INVST_OFF, INVST_SLEEPING, INVST_STARTING, INVST_RUNNING, INVST_THROTTLED, INVST_SHUTTING_DOWN, INVST_FAULT, \
    INVST_STANDBY = range(8)
CONNST_DISCONNECTED, CONNST_CONNECTED = 0, 1
#: 701 Alrm bits (model_701.json): OVER_TEMP and UNDER_TEMP map to THERMAL_LIMIT.
ALRM_OVER_TEMP = 1 << 7
ALRM_UNDER_TEMP = 1 << 13
#: 713 Sta (model_713.json).
STA_OK, STA_WARNING, STA_ERROR = 0, 1, 2
#: 704 WSetMod WATTS, and the ENABLED value of the *Ena enums.
WSETMOD_WATTS = 1
ENABLED = 1

#: |power| accepted from a device or written to one, kW (the wire protocol's range).
MAX_ABS_KW = 1000.0
#: SunSpec scale factors are -10..10 (SunSpec Information Model, sunssf).
SF_RANGE = (-10, 10)
#: WSetRvrtTms is uint32 whole seconds; 0 means no reversion, which the gateway never writes.
MAX_REVERT_S = 3600

#: The 701 points read each poll (one request), the 713 points (one request), the 704 points written.
POLL_701: tuple[str, ...] = ("St", "InvSt", "ConnSt", "Alrm", "W")
POLL_713: tuple[str, ...] = ("WHAvail", "SoC", "SoH", "Sta")
WRITE_704: tuple[str, ...] = ("WSetEna", "WSetMod", "WSet", "WSetRvrt", "WSetPct", "WSetPctRvrt", "WSetEnaRvrt",
                              "WSetRvrtTms")


class MappingError(ValueError):
    """A device's value that cannot be used; the message names the model, point and value."""


# ------------------------------------------------------------------------------- layout
def span(model_id: int, names: tuple[str, ...]) -> tuple[int, int]:
    """(offset of the first point, register count) covering ``names`` of one model: one request."""
    pts = model_points(model_id)
    sel = [pts[n] for n in names]
    first = min(p.offset for p in sel)
    return first, max(p.offset + p.size for p in sel) - first


def _value(regs, model_id: int, name: str, first: int):
    p: Point = model_points(model_id)[name]
    return decode_point(regs, p, -first)


# ------------------------------------------------------------------------------- the converters
def scale_factor(model_id: int, name: str, raw) -> int:
    """A scale factor as read, checked: MappingError if not implemented or outside -10..10."""
    if raw is None or not (SF_RANGE[0] <= raw <= SF_RANGE[1]):
        raise MappingError(f"model {model_id} {name}={raw!r}: expected a scale factor -10..10 "
                           "(0x8000 = not implemented)")
    return int(raw)


def scaled(raw: int | float, sf: int) -> float:
    """raw * 10**sf, exact for decimals (4987 with -2 is 49.87, not 49.870000000000005)."""
    return raw * 10.0**sf if sf >= 0 else raw / 10.0**-sf


def w_to_kw(raw: int, w_sf: int) -> float:
    """701 ``W`` (+ = generation) -> v2grt kW (+ = discharge into the grid): the same sign, W -> kW."""
    return scaled(raw, w_sf) / 1000.0


def kw_to_wset(p_kw: float, wset_sf: int) -> int:
    """v2grt kW (+ = discharge) -> 704 ``WSet`` raw (+ = inject, negative = charging): the same sign.

    Rounded to the device's resolution (10**WSet_SF W); never -0. MappingError if not finite, beyond
    the wire's 1000 kW or beyond int32 at that scale factor.
    """
    if not (math.isfinite(p_kw) and abs(p_kw) <= MAX_ABS_KW):
        raise MappingError(f"setpoint {p_kw!r} kW: expected a finite power within +-{MAX_ABS_KW:g} kW")
    raw = round(p_kw * 1000.0 / 10.0**wset_sf) if wset_sf >= 0 else round(p_kw * 1000.0 * 10.0**-wset_sf)
    if not (-(2**31) < raw < 2**31):
        raise MappingError(f"setpoint {p_kw!r} kW does not fit 704 WSet (int32) at WSet_SF={wset_sf}")
    return int(raw) + 0


def wset_to_kw(raw: int, wset_sf: int) -> float:
    """704 ``WSet``/``WSetRvrt`` raw -> kW, + = discharge (the device side of :func:`kw_to_wset`)."""
    return scaled(raw, wset_sf) / 1000.0


def rating_to_kw(raw, w_sf: int, name: str) -> float | None:
    """702 rating (uint16 magnitude with 702 ``W_SF``) -> kW >= 0; None when not implemented."""
    if raw is None:
        return None
    kw = scaled(raw, w_sf) / 1000.0
    if not 0.0 <= kw <= MAX_ABS_KW:
        raise MappingError(f"model 702 {name}={raw} (W_SF {w_sf}) = {kw:g} kW: expected 0..{MAX_ABS_KW:g} kW")
    return kw


# ------------------------------------------------------------------------------- what a device presents
@dataclass(frozen=True)
class ScaleFactors:
    """The static scale factors of one charger (read once per connection, checked)."""

    w_701: int
    w_702: int
    wset: int
    wh: int
    pct: int


@dataclass(frozen=True)
class Ratings:
    """702 ratings, kW magnitudes (None where the device leaves a point out)."""

    p_max_kw: float | None
    p_chg_max_kw: float | None
    p_dis_max_kw: float | None

    def limits(self, roster_dis_kw: float, roster_chg_kw: float) -> tuple[float, float]:
        """(discharge, charge) kW limits: the roster's, capped by the device's ratings (WMaxRtg caps both)."""
        dis, chg = roster_dis_kw, roster_chg_kw
        for cap in (self.p_max_kw, self.p_dis_max_kw):
            if cap is not None:
                dis = min(dis, cap)
        for cap in (self.p_max_kw, self.p_chg_max_kw):
            if cap is not None:
                chg = min(chg, cap)
        return max(dis, 0.0), max(chg, 0.0)


@dataclass(frozen=True)
class Reading:
    """One poll of a charger: 701 state and power, 713 battery. ``soc`` None: no EV (713 SoC not implemented)."""

    p_kw: float  # + = discharge into the grid
    soc: float | None  # 0..1
    soh: float | None  # 0..1
    wh_avail_kwh: float | None
    st: int | None
    inv_st: int | None
    conn_st: int | None
    alarms: int
    sta: int | None


def check_scale_factors(*, w_701, w_702, wset, wh, pct) -> ScaleFactors:
    """The five static scale factors as decoded (None = not implemented), checked: MappingError names a bad one."""
    return ScaleFactors(w_701=scale_factor(701, "W_SF", w_701), w_702=scale_factor(702, "W_SF", w_702),
                        wset=scale_factor(704, "WSet_SF", wset), wh=scale_factor(713, "WH_SF", wh),
                        pct=scale_factor(713, "Pct_SF", pct))


def decode_ratings(regs, first: int, w_sf: int) -> Ratings:
    """702 WMaxRtg, WChaRteMaxRtg, WDisChaRteMaxRtg -> kW (regs[0] = the point at offset ``first``)."""
    return Ratings(*(rating_to_kw(_value(regs, 702, n, first), w_sf, n)
                     for n in ("WMaxRtg", "WChaRteMaxRtg", "WDisChaRteMaxRtg")))


def _enum(model_id: int, name: str, raw, hi: int) -> int | None:
    if raw is not None and not 0 <= raw <= hi:
        raise MappingError(f"model {model_id} {name}={raw}: expected 0..{hi}")
    return raw


def _percent(name: str, raw, pct_sf: int) -> float | None:
    if raw is None:
        return None
    pct = scaled(raw, pct_sf)
    if not 0.0 <= pct <= 100.0:
        raise MappingError(f"model 713 {name}={raw} (Pct_SF {pct_sf}) = {pct:g} %: expected 0..100 %")
    return pct / 100.0


def decode_reading(regs_701, first_701: int, regs_713, first_713: int, sf: ScaleFactors) -> Reading:
    """One poll's registers (701 from ``first_701``, 713 from ``first_713``) -> a checked :class:`Reading`.

    MappingError (naming the model, point and raw value) for: 701 ``W`` not implemented or beyond
    +-1000 kW, an enum outside its symbols, SoC or SoH outside 0..100 %, WHAvail beyond 10 MWh.
    """
    raw_w = _value(regs_701, 701, "W", first_701)
    if raw_w is None:
        raise MappingError("model 701 W is not implemented (0x8000): a charger must report its power")
    p_kw = w_to_kw(raw_w, sf.w_701)
    if abs(p_kw) > MAX_ABS_KW:
        raise MappingError(f"model 701 W={raw_w} (W_SF {sf.w_701}) = {p_kw:g} kW: expected within "
                           f"+-{MAX_ABS_KW:g} kW")
    raw_wh = _value(regs_713, 713, "WHAvail", first_713)
    wh_kwh = None if raw_wh is None else scaled(raw_wh, sf.wh) / 1000.0
    if wh_kwh is not None and not 0.0 <= wh_kwh <= 10_000.0:
        raise MappingError(f"model 713 WHAvail={raw_wh} (WH_SF {sf.wh}) = {wh_kwh:g} kWh: expected 0..10000 kWh")
    return Reading(
        p_kw=p_kw,
        soc=_percent("SoC", _value(regs_713, 713, "SoC", first_713), sf.pct),
        soh=_percent("SoH", _value(regs_713, 713, "SoH", first_713), sf.pct),
        wh_avail_kwh=wh_kwh,
        st=_enum(701, "St", _value(regs_701, 701, "St", first_701), 1),
        inv_st=_enum(701, "InvSt", _value(regs_701, 701, "InvSt", first_701), 7),
        conn_st=_enum(701, "ConnSt", _value(regs_701, 701, "ConnSt", first_701), 1),
        alarms=_value(regs_701, 701, "Alrm", first_701) or 0,
        sta=_enum(713, "Sta", _value(regs_713, 713, "Sta", first_713), 2),
    )


def setpoint_registers(p_kw: float, wset_sf: int, revert_s: int) -> tuple[int, list[int]]:
    """(offset of WSetEna in 704, registers) for one atomic write of WSetEna..WSetRvrtTms.

    WSetEna ENABLED, WSetMod WATTS, ``WSet`` = :func:`kw_to_wset`, reversion enabled to ``WSetRvrt``
    0 W after ``WSetRvrtTms`` = ``revert_s`` whole seconds (1..3600): a device that hears nothing
    more from the gateway goes to 0 on its own. WSetPct/WSetPctRvrt are written 0 (ignored in WATTS
    mode) so the block is one contiguous request.
    """
    if not (isinstance(revert_s, int) and 1 <= revert_s <= MAX_REVERT_S):
        raise MappingError(f"revert_s={revert_s!r}: WSetRvrtTms is whole seconds 1..{MAX_REVERT_S}")
    first, template, (lo, hi) = _setpoint_template(revert_s)
    regs = list(template)
    regs[lo:hi] = encode_point(model_points(704)["WSet"], kw_to_wset(p_kw, wset_sf))
    return first, regs


@functools.lru_cache(maxsize=16)
def _setpoint_template(revert_s: int) -> tuple[int, tuple[int, ...], tuple[int, int]]:
    """The 704 block of setpoint_registers with WSet 0, and where WSet sits in it: every write but the WSet
    registers is the same (encoding all eight points per write was a tenth of the gateway's Modbus thread)."""
    values = {"WSetEna": ENABLED, "WSetMod": WSETMOD_WATTS, "WSet": 0, "WSetRvrt": 0,
              "WSetPct": 0, "WSetPctRvrt": 0, "WSetEnaRvrt": ENABLED, "WSetRvrtTms": revert_s}
    pts = model_points(704)
    first, count = span(704, WRITE_704)
    regs = [0] * count
    for name, v in values.items():
        q = pts[name]
        regs[q.offset - first: q.offset - first + q.size] = encode_point(q, v)
    q = pts["WSet"]
    return first, tuple(regs), (q.offset - first, q.offset - first + q.size)


def clamp_kw(p_kw: float, p_dis_max_kw: float, p_chg_max_kw: float) -> float:
    """``p_kw`` within [-p_chg_max_kw, p_dis_max_kw] (magnitudes >= 0): a device never reads more than it may do."""
    return min(max(p_kw, -p_chg_max_kw), p_dis_max_kw) + 0.0


# ------------------------------------------------------------------------------- node states
def node_online_fault(*, connected: bool, fresh: bool, invalid: bool, reading: Reading | None) -> tuple[int, int]:
    """(online, fault) of one charger for the wire (docs/gateways.md has the same table).

    ``connected``: the Modbus connection is up and the models were discovered; ``fresh``: a reading
    newer than the stale limit; ``invalid``: the newest poll answered with values refused by
    :func:`decode_reading`.
    """
    if not connected:
        return 0, Reason.OFFLINE
    if invalid:
        return 1, Reason.INVALID_TELEMETRY
    if not fresh or reading is None:
        return 1, Reason.TIMEOUT_BMS_RESPONSE
    if reading.inv_st == INVST_FAULT or reading.sta == STA_ERROR:
        return 1, Reason.NODE_UNREACHABLE
    if reading.alarms & (ALRM_OVER_TEMP | ALRM_UNDER_TEMP):
        return 1, Reason.THERMAL_LIMIT
    if reading.st == ST_OFF or reading.conn_st == CONNST_DISCONNECTED or reading.inv_st == INVST_OFF:
        return 0, Reason.OFFLINE
    if reading.soc is None:
        return 0, Reason.OK  # no EV behind the charger (713 SoC not implemented)
    return 1, Reason.OK


# ------------------------------------------------------------------------------- the devices file
@dataclass(frozen=True)
class DeviceAddress:
    """Where one node's charger answers: Modbus TCP host, port and unit id."""

    host: str
    port: int
    unit_id: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port} unit {self.unit_id}"


DEVICES_HEADER = ["node_id", "host", "port", "unit_id"]


def load_devices(path: str | Path) -> dict[str, DeviceAddress]:
    """``node_id,host,port,unit_id`` rows -> {node id: address}; every bad row named (file, line, value).

    A node listed twice, or two nodes on the same host, port and unit id, are refused.
    """
    out: dict[str, DeviceAddress] = {}
    seen: dict[tuple[str, int, int], str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header != DEVICES_HEADER:
            raise MappingError(f"{path}: line 1: header {header!r}: expected {DEVICES_HEADER}")
        for line, row in enumerate(rows, start=2):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                raise MappingError(f"{path}: line {line}: {len(row)} columns, expected 4 ({','.join(DEVICES_HEADER)})")
            node, host, port, unit = (c.strip() for c in row)
            if not node or not host:
                raise MappingError(f"{path}: line {line}: node_id and host must not be empty")
            if not (port.isdigit() and 1 <= int(port) <= 65535):
                raise MappingError(f"{path}: line {line}: port {port!r} of {node!r}: expected 1..65535")
            if not (unit.isdigit() and 1 <= int(unit) <= 247):
                raise MappingError(f"{path}: line {line}: unit_id {unit!r} of {node!r}: expected 1..247 "
                                   "(Modbus unit ids)")
            if node in out:
                raise MappingError(f"{path}: line {line}: node_id {node!r} listed twice")
            key = (host, int(port), int(unit))
            if key in seen:
                raise MappingError(f"{path}: line {line}: {node!r} is at {host}:{port} unit {unit}, already "
                                   f"given to {seen[key]!r}")
            seen[key] = node
            out[node] = DeviceAddress(host, int(port), int(unit))
    return out


def write_devices(path: str | Path, devices: dict[str, DeviceAddress]) -> Path:
    """Write a devices file that :func:`load_devices` reads back."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(DEVICES_HEADER)
        for node, a in devices.items():
            w.writerow([node, a.host, a.port, a.unit_id])
    return Path(path)


__all__ = [
    "ALRM_OVER_TEMP",
    "ALRM_UNDER_TEMP",
    "CONNST_CONNECTED",
    "CONNST_DISCONNECTED",
    "DEVICES_HEADER",
    "ENABLED",
    "INVST_FAULT",
    "INVST_RUNNING",
    "INVST_STANDBY",
    "MAX_ABS_KW",
    "MAX_REVERT_S",
    "POLL_701",
    "POLL_713",
    "REQUIRED_MODELS",
    "STA_ERROR",
    "STA_OK",
    "ST_ON",
    "WRITE_704",
    "WSETMOD_WATTS",
    "DeviceAddress",
    "MappingError",
    "Ratings",
    "Reading",
    "ScaleFactors",
    "check_scale_factors",
    "clamp_kw",
    "decode_ratings",
    "decode_reading",
    "kw_to_wset",
    "load_devices",
    "node_online_fault",
    "rating_to_kw",
    "scale_factor",
    "scaled",
    "setpoint_registers",
    "span",
    "w_to_kw",
    "write_devices",
    "wset_to_kw",
]
