"""OCPP 2.1 <-> v2grt: the pure mapping tables, the one sign/unit converter, and the small policies.

Nothing here touches a socket or a clock; the OCPP gateway (``v2grt.gateway.ocpp``) and the
station simulator (``v2grt.sim.ocpp_stations``) both call it, so the two ends cannot disagree.

Signs. v2grt: kW, **+ = discharge into the grid**. OCPP 2.1 ``setpoint``: W (or A), **negative =
discharging**; ``limit`` (charging) >= 0; ``dischargeLimit`` <= 0. Meter values: ``Power.Active.Import``
is what the EV draws from the grid, ``Power.Active.Export`` what it feeds in, both >= 0, so
v2grt's power is export - import. :func:`kw_to_setpoint` and :func:`setpoint_to_kw` are the only
place the sign flips.

Payload dicts built here use the JSON schema's camelCase names (tests validate them against the
schemas that ship inside ``ocpp``): the package's dataclass camel-casing gets some V2X names wrong
(notes/ocpp-2.1.md, pitfall 1). Dicts parsed here are what ``ocpp``'s routing hands a handler:
snake_case keys (``sampled_value``, ``unit_of_measure``, ``v2x_charging_parameters``).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from v2grt.codes import Reason

#: Subprotocols in order of preference. 2.0.1 stations get the charge-only subset (no setpoint,
#: no discharge): a charge limit re-sent as a SetChargingProfile.
SUBPROTOCOLS: tuple[str, ...] = ("ocpp2.1", "ocpp2.0.1")
OCPP21, OCPP201 = SUBPROTOCOLS

#: OCPP 2.0.1 part 4 (OCPP-J) 3.1.1: the identity in the URL is at most 48 characters (our node id
#: ``<station>:<evse>`` then fits the wire protocol's 64). Characters: the spec's unreserved set.
MAX_STATION_ID_CHARS = 48
_STATION_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789*-_=:+|@.")
MAX_EVSE_ID = 999

#: Charging profile ids a station holds for us (unique per station): the fallback TxDefaultProfile,
#: and one TxProfile per EVSE.
DEFAULT_PROFILE_ID = 90_000
TX_PROFILE_ID_BASE = 100_000

#: |power| accepted from a station or sent to one, kW (the wire protocol's range).
MAX_ABS_KW = 1000.0
#: Nominal voltage and phases used only when a station's profile unit is A (setpoint per phase).
DEFAULT_VOLTAGE_V = 230.0
DEFAULT_PHASES = 3


class MappingError(ValueError):
    """A station's value that cannot be mapped; the message names the field and the value."""

    #: OCPP CALLERROR code to answer with.
    code = "PropertyConstraintViolation"


# ------------------------------------------------------------------------------- ids
def valid_station_id(station_id: str) -> bool:
    """True if ``station_id`` is 1..48 characters of OCPP's identity set (no '/', no space)."""
    return (isinstance(station_id, str) and 0 < len(station_id) <= MAX_STATION_ID_CHARS
            and all(c in _STATION_ID_CHARS for c in station_id))


def node_id(station_id: str, evse_id: int) -> str:
    """The v2grt node id of one EVSE: ``<station>:<evse>`` (what an operator's roster lists)."""
    return f"{station_id}:{evse_id}"


def split_node_id(node: str) -> tuple[str, int] | None:
    """(station id, evse id) of a node id made by :func:`node_id`, or None if it is not one."""
    station, sep, evse = node.rpartition(":")
    if not sep or not evse.isdigit() or not valid_station_id(station):
        return None
    evse_id = int(evse)
    return (station, evse_id) if 1 <= evse_id <= MAX_EVSE_ID and str(evse_id) == evse else None


def station_id_from_path(path: str) -> str | None:
    """The station identity from a websocket request path (``/ocpp/CS001`` -> ``CS001``), or None."""
    from urllib.parse import unquote

    path = path.split("?", 1)[0].rstrip("/")
    station = unquote(path.rsplit("/", 1)[-1]) if path else ""
    return station if valid_station_id(station) else None


# ------------------------------------------------------------------------------- signs and units
def kw_to_setpoint(p_kw: float, unit: str = "W", *, voltage_v: float = DEFAULT_VOLTAGE_V,
                   phases: int = DEFAULT_PHASES) -> float:
    """v2grt kW (+ discharge) -> OCPP ``setpoint`` (negative = discharging) in W, or A per phase.

    Rounded to 1 W or 0.1 A; never -0.0 (a station may parse it oddly, and 0 means 0).
    """
    if unit == "W":
        value = round(-p_kw * 1000.0)
    elif unit == "A":
        value = round(-p_kw * 1000.0 / (voltage_v * phases), 1)
    else:
        raise MappingError(f"chargingRateUnit={unit!r}: expected 'W' or 'A'")
    return float(value) + 0.0


def setpoint_to_kw(setpoint: float, unit: str = "W", *, voltage_v: float = DEFAULT_VOLTAGE_V,
                   phases: int = DEFAULT_PHASES) -> float:
    """OCPP ``setpoint`` (W or A per phase, negative = discharging) -> v2grt kW (+ discharge)."""
    if unit == "W":
        return -setpoint / 1000.0 + 0.0
    if unit == "A":
        return -setpoint * voltage_v * phases / 1000.0 + 0.0
    raise MappingError(f"chargingRateUnit={unit!r}: expected 'W' or 'A'")


def magnitude_to_rate(p_kw: float, unit: str, *, voltage_v: float = DEFAULT_VOLTAGE_V,
                      phases: int = DEFAULT_PHASES) -> float:
    """A power magnitude (kW, >= 0) in the profile's unit (W, or A per phase), for ``limit``."""
    return -kw_to_setpoint(abs(p_kw), unit, voltage_v=voltage_v, phases=phases) + 0.0


@dataclass(frozen=True)
class EvLimits:
    """What the EV and charger allow now, kW magnitudes (>= 0) at the grid; None = not told."""

    p_chg_max_kw: float | None = None
    p_dis_max_kw: float | None = None

    def clamp(self, p_kw: float) -> float:
        """``p_kw`` (+ discharge) limited to ``[-p_chg_max_kw, p_dis_max_kw]``."""
        if self.p_dis_max_kw is not None:
            p_kw = min(p_kw, self.p_dis_max_kw)
        if self.p_chg_max_kw is not None:
            p_kw = max(p_kw, -self.p_chg_max_kw)
        return p_kw + 0.0


def schedule_update(p_kw: float, limits: EvLimits = EvLimits(), unit: str = "W") -> dict:
    """``scheduleUpdate`` of an UpdateDynamicSchedule: the setpoint and the limits that frame it.

    ``limit`` (charge, >= 0) and ``dischargeLimit`` (<= 0) are the EV's own limits when known, so a
    station never reads a setpoint outside what the EV allows.
    """
    out = {"setpoint": kw_to_setpoint(limits.clamp(p_kw), unit)}
    if limits.p_chg_max_kw is not None:
        out["limit"] = magnitude_to_rate(limits.p_chg_max_kw, unit)
    if limits.p_dis_max_kw is not None:
        out["dischargeLimit"] = -magnitude_to_rate(limits.p_dis_max_kw, unit) + 0.0
    return out


def tx_profile_id(evse_id: int) -> int:
    return TX_PROFILE_ID_BASE + evse_id


def dynamic_profile(evse_id: int, transaction_id: str, p_kw: float, *, max_offline_s: int,
                    limits: EvLimits = EvLimits(), unit: str = "W") -> dict:
    """The ``chargingProfile`` installed at transaction start (OCPP 2.1): Dynamic, CentralSetpoint.

    ``maxOfflineDuration`` with ``invalidAfterOfflineDuration``: a station that loses the gateway
    for longer drops this profile and falls back to :func:`default_profile` (0 W) on its own.
    """
    period = {"startPeriod": 0, "operationMode": "CentralSetpoint", **schedule_update(p_kw, limits, unit)}
    return {"id": tx_profile_id(evse_id), "stackLevel": 1, "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Dynamic", "transactionId": transaction_id,
            "maxOfflineDuration": int(max_offline_s), "invalidAfterOfflineDuration": True,
            "chargingSchedule": [{"id": tx_profile_id(evse_id), "chargingRateUnit": unit,
                                  "chargingSchedulePeriod": [period]}]}


def default_profile(unit: str = "W") -> dict:
    """The station-wide TxDefaultProfile (evseId 0, stack 0): 0 W, what a station falls back to."""
    return {"id": DEFAULT_PROFILE_ID, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": [{"id": DEFAULT_PROFILE_ID, "chargingRateUnit": unit, "startSchedule":
                                  "2020-01-01T00:00:00Z", "chargingSchedulePeriod": [{"startPeriod": 0,
                                                                                      "limit": 0.0}]}]}


def charge_limit_profile(evse_id: int, transaction_id: str, p_kw: float, *, duration_s: int,
                         limits: EvLimits = EvLimits(), unit: str = "W") -> dict:
    """OCPP 2.0.1's charge-only subset: a Relative TxProfile whose ``limit`` is the charge asked for.

    Discharge (``p_kw`` > 0) becomes a limit of 0: the station stops charging, it cannot export.
    ``duration`` makes the limit lapse on its own (back to :func:`default_profile`, 0 W) if the
    gateway stops re-sending it: 2.0.1 has no ``maxOfflineDuration``.
    """
    charge_kw = max(0.0, -limits.clamp(p_kw))
    return {"id": tx_profile_id(evse_id), "stackLevel": 1, "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Relative", "transactionId": transaction_id,
            "chargingSchedule": [{"id": tx_profile_id(evse_id), "chargingRateUnit": unit,
                                  "duration": int(duration_s),
                                  "chargingSchedulePeriod": [{"startPeriod": 0,
                                                              "limit": magnitude_to_rate(charge_kw, unit)}]}]}


# ------------------------------------------------------------------------------- LocalFrequency
#: OCPP 2.1 operation modes the gateway installs (OperationModeEnumType).
CENTRAL_SETPOINT = "CentralSetpoint"
LOCAL_FREQUENCY = "LocalFrequency"
#: V2XFreqWattPointType list: the schema's maxItems.
MAX_FREQ_WATT_POINTS = 20


def evse_shares_kw(rating_kw: np.ndarray, capacity_kw: float) -> np.ndarray:
    """Each EVSE's share of ``capacity_kw`` (the service capacity this gateway's EVSEs carry), pro rata to
    its rating (kW, >= 0): the scale of its own frequency-watt curve. Shares sum to ``capacity_kw``."""
    rating_kw = np.asarray(rating_kw, dtype=np.float64)
    if not (math.isfinite(capacity_kw) and capacity_kw >= 0.0):
        raise MappingError(f"capacity_kw={capacity_kw!r}: expected a finite number >= 0 kW")
    if rating_kw.size and not (np.isfinite(rating_kw).all() and (rating_kw >= 0.0).all()):
        raise MappingError("EVSE ratings: expected finite kW >= 0 for every EVSE")
    total = float(rating_kw.sum())
    return rating_kw * (capacity_kw / total) if total > 0.0 else np.zeros_like(rating_kw)


def freq_watt_curve(f_hz, fraction, share_kw: float) -> list[dict]:
    """``v2xFreqWattCurve`` of one EVSE: the service curve (``f_hz`` ascending, ``fraction`` of capacity,
    + = discharge, as :class:`v2grt.services.ServiceCurve`) scaled to ``share_kw``.

    ``power`` is W and, as every OCPP setpoint, negative = discharging (the schema: "to charge
    (positive) or discharge (negative)"); the sign flips in :func:`kw_to_setpoint`. At most 20
    points (the schema's maxItems); a station holds the end values beyond the first and last point,
    as the service curve does.
    """
    f = [float(x) for x in f_hz]
    y = [float(x) for x in fraction]
    if not 1 <= len(f) <= MAX_FREQ_WATT_POINTS or len(f) != len(y):
        raise MappingError(f"v2xFreqWattCurve: {len(f)} frequencies and {len(y)} values: expected the same "
                           f"number, 1..{MAX_FREQ_WATT_POINTS}")
    if any(not b > a for a, b in itertools.pairwise(f)) or not all(math.isfinite(x) and 0 < x < 100 for x in f):
        raise MappingError(f"v2xFreqWattCurve: frequencies {f!r}: expected strictly ascending Hz in 0..100")
    if not all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in y):
        raise MappingError(f"v2xFreqWattCurve: fractions {y!r}: expected -1..1 of the EVSE's share")
    if not (math.isfinite(share_kw) and 0.0 <= share_kw <= MAX_ABS_KW):
        raise MappingError(f"share_kw={share_kw!r}: expected 0..{MAX_ABS_KW:g} kW")
    return [{"frequency": fi, "power": kw_to_setpoint(share_kw * yi)} for fi, yi in zip(f, y)]


def freq_watt_w(curve: list[dict], f_hz: float) -> float:
    """The curve's power at ``f_hz`` (W, OCPP sign): linear between points, the end values beyond them."""
    if not curve:
        return 0.0
    pts = sorted((float(p["frequency"]), float(p["power"])) for p in curve)
    return float(np.interp(f_hz, [p[0] for p in pts], [p[1] for p in pts]))


def local_frequency_profile(evse_id: int, transaction_id: str, baseline_kw: float, curve: list[dict], *,
                            max_offline_s: int, limits: EvLimits = EvLimits()) -> dict:
    """The ``chargingProfile`` of an EVSE that answers frequency itself: Dynamic, ``LocalFrequency``.

    The station delivers ``v2xBaseline + v2xFreqWattCurve(f_local)`` (W, negative = discharging),
    within ``limit`` (charge, >= 0) and ``dischargeLimit`` (<= 0), the EV's own limits. Same id,
    stack level and failsafe (``maxOfflineDuration``) as :func:`dynamic_profile`, so either replaces the
    other. W only: the schema gives the curve's power in W whatever ``chargingRateUnit`` says.
    """
    if not (math.isfinite(baseline_kw) and abs(baseline_kw) <= 2 * MAX_ABS_KW):
        raise MappingError(f"v2xBaseline: {baseline_kw!r} kW: expected |value| <= {2 * MAX_ABS_KW:g} kW")
    period = {"startPeriod": 0, "operationMode": LOCAL_FREQUENCY, "v2xBaseline": kw_to_setpoint(baseline_kw),
              "v2xFreqWattCurve": curve}
    if limits.p_chg_max_kw is not None:
        period["limit"] = magnitude_to_rate(limits.p_chg_max_kw, "W")
    if limits.p_dis_max_kw is not None:
        period["dischargeLimit"] = -magnitude_to_rate(limits.p_dis_max_kw, "W") + 0.0
    return {"id": tx_profile_id(evse_id), "stackLevel": 1, "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Dynamic", "transactionId": transaction_id,
            "maxOfflineDuration": int(max_offline_s), "invalidAfterOfflineDuration": True,
            "chargingSchedule": [{"id": tx_profile_id(evse_id), "chargingRateUnit": "W",
                                  "chargingSchedulePeriod": [period]}]}


def local_baselines_kw(p_kw: np.ndarray, share_kw: np.ndarray, fraction: float) -> np.ndarray:
    """``v2xBaseline`` per EVSE (kW, + discharge) so that baseline + curve(f) equals the aggregator's setpoint
    ``p_kw`` at the frequency it used (``fraction`` = the service curve there): ``p_kw - share_kw * fraction``.

    A pure frequency change moves ``p_kw`` and the curve alike (when the aggregator shares the response
    pro rata, as the curves do): the baselines stay, and nothing needs to be sent.
    """
    return np.asarray(p_kw, dtype=np.float64) - np.asarray(share_kw, dtype=np.float64) * fraction


def local_frequency_kw(baseline_w: float, curve: list[dict], f_hz: float, limits: EvLimits = EvLimits()) -> float:
    """What a station in ``LocalFrequency`` delivers at ``f_hz``, v2grt kW (+ discharge): baseline + curve(f),
    converted by :func:`setpoint_to_kw` and held within the EV's limits (the period's limit and dischargeLimit)."""
    return limits.clamp(setpoint_to_kw(baseline_w + freq_watt_w(curve, f_hz), "W"))


# ------------------------------------------------------------------------------- when to send
def due_rows(target_kw: np.ndarray, sent_kw: np.ndarray, sent_ns: np.ndarray, controllable: np.ndarray,
             now_ns: int, *, deadband_kw: float, resync_ns: int, zero_rows: np.ndarray | None = None) -> np.ndarray:
    """Rows whose setpoint must go out now (int64, ascending).

    A row is due when it is controllable and: nothing was sent yet (``sent_kw`` NaN); or the target
    moved more than ``deadband_kw`` from what was sent; or the target is exactly 0 and the sent
    value was not (zero always goes out: expiry and e-stop must not hide in the deadband); or
    ``resync_ns`` passed since the last send. ``zero_rows`` (bool, optional): the rows the zero rule
    applies to (LocalFrequency baselines are not setpoints: 0 there is no stop; the mode switch is).
    """
    never = np.isnan(sent_kw)
    moved = np.abs(target_kw - np.where(never, 0.0, sent_kw)) > deadband_kw
    to_zero = (target_kw == 0.0) & (sent_kw != 0.0)
    if zero_rows is not None:
        to_zero &= zero_rows
    stale = (now_ns - sent_ns) >= resync_ns
    return np.flatnonzero(controllable & (never | moved | to_zero | stale))


# ------------------------------------------------------------------------------- station -> v2grt
@dataclass
class MeterReading:
    """What one MeterValues/TransactionEvent told about an EVSE; None where it said nothing."""

    soc: float | None = None  # fraction 0..1
    p_kw: float | None = None  # + discharge
    setpoint_kw: float | None = None  # the station's own Power.Active.Setpoint, + discharge


_POWER_UNITS = {"W": 1e-3, "kW": 1.0}
_LINE_PHASES = frozenset({"L1", "L2", "L3", "L1-N", "L2-N", "L3-N"})


def _finite(value) -> bool:
    """A finite number: JSON allows integers no double holds (10**400, which the schemas' "number" takes), and
    math.isfinite raises OverflowError on them; a station's value must be refused, not fail a handler."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _sample_value(sv: dict, what: str, uom_key: str = "unit_of_measure") -> float:
    value = sv.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise MappingError(f"{what}: value {str(value)[:40]}: expected a finite number")
    uom = sv.get(uom_key) or {}
    mult = uom.get("multiplier", 0)
    if not isinstance(mult, int) or not -3 <= mult <= 3:
        raise MappingError(f"{what}: multiplier {mult!r}: expected an integer -3..3")
    return float(value) * 10.0 ** mult


def parse_meter_values(meter_values: list, *, camel: bool = False) -> MeterReading:
    """SoC, Power.Active.Import/Export and Power.Active.Setpoint from ``meter_value`` (snake_case, as the
    ``ocpp`` package's routing hands it over; with ``camel``, the schema's names as sent: the gateway's plain
    MeterValues skip the key conversion).

    The newest sample of each measurand wins (samples are in the order sent). Power without a
    phase is the total; with phases only, the phases are summed. Units: SoC in Percent; power in W
    or kW with a multiplier. Raises MappingError naming the measurand for a value out of range.
    (OCPP 2.x has no Temperature measurand; 1.6 had one. Battery temperature stays the roster's.)
    """
    sv_key, uom_key = ("sampledValue", "unitOfMeasure") if camel else ("sampled_value", "unit_of_measure")
    soc = None
    power: dict[str, float] = {}
    phase_power: dict[str, float] = {}
    for mv in meter_values or ():
        for sv in mv.get(sv_key) or ():
            measurand = sv.get("measurand", "Energy.Active.Import.Register")
            if measurand == "SoC":
                value = _sample_value(sv, "SoC", uom_key)
                unit = (sv.get(uom_key) or {}).get("unit", "Percent")
                if unit != "Percent" or not 0.0 <= value <= 100.0:
                    raise MappingError(f"SoC: {value!r} {unit}: expected 0..100 Percent")
                soc = value / 100.0
            elif measurand in ("Power.Active.Import", "Power.Active.Export", "Power.Active.Setpoint"):
                unit = (sv.get(uom_key) or {}).get("unit", "W")
                if unit not in _POWER_UNITS:
                    raise MappingError(f"{measurand}: unit {unit!r}: expected W or kW")
                kw = _sample_value(sv, measurand, uom_key) * _POWER_UNITS[unit]
                if not abs(kw) <= MAX_ABS_KW:
                    raise MappingError(f"{measurand}: {kw!r} kW: expected |value| <= {MAX_ABS_KW:g} kW")
                phase = sv.get("phase")
                if phase is None:
                    power[measurand] = kw
                elif phase in _LINE_PHASES:  # N and line-to-line readings carry no power of their own
                    phase_power[measurand] = phase_power.get(measurand, 0.0) + kw
    for m, kw in phase_power.items():
        power.setdefault(m, kw)
    reading = MeterReading(soc=soc)
    if "Power.Active.Import" in power or "Power.Active.Export" in power:
        # Import and export are magnitudes by definition; a signed import (some firmware) is taken as is.
        reading.p_kw = power.get("Power.Active.Export", 0.0) - power.get("Power.Active.Import", 0.0) + 0.0
    if "Power.Active.Setpoint" in power:
        reading.setpoint_kw = -power["Power.Active.Setpoint"] + 0.0  # same sign as the OCPP setpoint
    return reading


@dataclass(frozen=True)
class EvNeeds:
    """An EV's V2X parameters from NotifyEVChargingNeeds (kW magnitudes, kWh)."""

    bidirectional: bool
    limits: EvLimits
    p_chg_min_kw: float | None = None
    p_dis_min_kw: float | None = None
    #: Energy to the EV's own minimum SoC (evMinV2XEnergyRequest): > 0 it must charge that much
    #: first, <= 0 it may give that much. None when the EV did not say.
    min_v2x_energy_kwh: float | None = None
    target_energy_kwh: float | None = None
    target_soc: float | None = None


def _camel(key: str) -> str:
    """The schema's name of a snake_case key, for messages (``max_discharge_power`` -> ``maxDischargePower``)."""
    first, *rest = key.split("_")
    return first + "".join(p[:1].upper() + p[1:] for p in rest)


_BPT = frozenset({"AC_BPT", "DC_BPT", "AC_BPT_DER", "DC_ACDP_BPT"})


def parse_charging_needs(needs: dict) -> EvNeeds:
    """EvNeeds from a NotifyEVChargingNeeds ``charging_needs`` (snake_case, schema-valid).

    Bidirectional when the requested transfer is one of the *_BPT modes; otherwise the EV is
    charge-only and its discharge limit is 0 whatever it sent.
    """
    v2x = needs.get("v2x_charging_parameters") or {}

    def kw(key, params=v2x, where="v2xChargingParameters"):
        value = params.get(key)
        if value is None:
            return None
        if not (_finite(value) and 0.0 <= value <= MAX_ABS_KW * 1000.0):
            raise MappingError(f"{where}.{_camel(key)}: {str(value)[:40]} W: expected 0..{MAX_ABS_KW * 1000:g} W")
        return value / 1000.0

    def kwh(key):
        value = v2x.get(key)
        if value is None:
            return None
        if not (_finite(value) and abs(value) <= 1e7):
            raise MappingError(f"v2xChargingParameters.{_camel(key)}: {str(value)[:40]} Wh: expected a finite energy")
        return value / 1000.0

    bidirectional = needs.get("requested_energy_transfer") in _BPT
    p_chg_max = kw("max_charge_power")
    if p_chg_max is None:  # DC without V2X parameters: the EV's own maximum, range-checked as the V2X ones
        p_chg_max = kw("ev_max_power", needs.get("dc_charging_parameters") or {}, "dcChargingParameters")
    p_dis_max = kw("max_discharge_power") if bidirectional else 0.0
    target = v2x.get("target_soc")  # ocpp's snake-casing of targetSoC
    if target is not None and not (0 <= target <= 100):
        raise MappingError(f"v2xChargingParameters.targetSoC: {target!r}: expected 0..100")
    return EvNeeds(bidirectional=bidirectional, limits=EvLimits(p_chg_max, p_dis_max),
                   p_chg_min_kw=kw("min_charge_power"), p_dis_min_kw=kw("min_discharge_power"),
                   min_v2x_energy_kwh=kwh("ev_min_v2x_energy_request"),
                   target_energy_kwh=kwh("ev_target_energy_request"),
                   target_soc=None if target is None else target / 100.0)


def ev_min_soc(soc: float | None, min_v2x_energy_kwh: float | None, capacity_kwh: float) -> float | None:
    """The EV's own minimum SoC from its energy to minimum at a known SoC: ``soc + E_min / capacity``."""
    if soc is None or min_v2x_energy_kwh is None or not capacity_kwh > 0:
        return None
    return min(max(soc + min_v2x_energy_kwh / capacity_kwh, 0.0), 1.0)


# ------------------------------------------------------------------------------- node state
#: StatusNotification connectorStatus -> (node online allowed, fault reason). ``Occupied``,
#: ``Available`` and ``Reserved`` are no fault; online then follows the transaction.
CONNECTOR_STATUS: dict[str, tuple[bool, int]] = {
    "Available": (True, Reason.OK),
    "Occupied": (True, Reason.OK),
    "Reserved": (True, Reason.OK),
    "Unavailable": (False, Reason.OFFLINE),
    "Faulted": (True, Reason.NODE_UNREACHABLE),
}


def node_online_fault(*, connected: bool, connector_status: str | None, in_transaction: bool, has_soc: bool,
                      profile_refused: bool, meter_fresh: bool = True) -> tuple[int, int]:
    """(online 0/1, fault Reason) of one EVSE as the wire protocol wants them.

    - station not connected: offline, ``OFFLINE`` (the charger is off as far as we can tell);
    - connector ``Unavailable``: offline, ``OFFLINE``;
    - connector ``Faulted``: online with ``NODE_UNREACHABLE`` (so the status shows why);
    - no transaction, or no SoC heard yet: offline, no fault (nothing to dispatch);
    - the station refused our charging profile: online with ``NODE_UNREACHABLE``;
    - no meter values for longer than the gateway's limit (a station that stopped sampling but stays
      connected): online with ``TIMEOUT_BMS_RESPONSE``, the aggregator's own word for stale values.
    The aggregator reports a node that is offline as OFFLINE whatever the fault says.
    """
    if not connected:
        return 0, Reason.OFFLINE
    allowed, fault = CONNECTOR_STATUS.get(connector_status or "Available", (True, Reason.OK))
    if not allowed:
        return 0, fault
    if fault:
        return 1, fault
    if not (in_transaction and has_soc):
        return 0, Reason.OK
    if profile_refused:
        return 1, Reason.NODE_UNREACHABLE
    return 1, (Reason.OK if meter_fresh else Reason.TIMEOUT_BMS_RESPONSE)


# ------------------------------------------------------------------------------- security
def hash_password(station_id: str, password: str) -> str:
    """The credentials-file form of a station's Basic-auth password: ``sha256:<hex>`` of ``id:password``.

    OCPP passwords are 16..40 random characters (BasicAuthPassword), so a salted fast hash is
    enough; the station id is the salt.
    """
    return "sha256:" + hashlib.sha256(f"{station_id}:{password}".encode()).hexdigest()


def load_credentials(path: str | Path) -> dict[str, str]:
    """``station_id,sha256:<hex>`` rows (header ``station_id,password_hash``) -> {station id: hash}.

    Every bad row is named (file, line, value); duplicates are refused.
    """
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header != ["station_id", "password_hash"]:
            raise MappingError(f"{path}: line 1: header {header!r}: expected ['station_id', 'password_hash']")
        for line, row in enumerate(rows, start=2):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise MappingError(f"{path}: line {line}: {len(row)} columns, expected 2")
            station, digest = row
            if not valid_station_id(station):
                raise MappingError(f"{path}: line {line}: station_id {station!r}: expected 1..48 characters "
                                   "of A-Z a-z 0-9 *-_=:+|@.")
            if not (digest.startswith("sha256:") and len(digest) == 71
                    and all(c in "0123456789abcdef" for c in digest[7:])):
                raise MappingError(f"{path}: line {line}: password_hash of {station!r}: expected sha256:<64 hex> "
                                   "(v2grt gateway ocpp-password)")
            if station in out:
                raise MappingError(f"{path}: line {line}: station_id {station!r} listed twice")
            out[station] = digest
    return out


def check_password(credentials: dict[str, str], station_id: str, username: str, password: str) -> bool:
    """True if ``username`` is the station's own id and ``password`` matches its hash (constant time)."""
    expected = credentials.get(station_id)
    if expected is None or username != station_id:
        return False
    return hmac.compare_digest(expected, hash_password(station_id, password))


class TokenBucket:
    """Messages a station may send: ``rate_per_s`` on average, ``burst`` at once. Time is passed in."""

    __slots__ = ("burst", "rate_per_s", "t_ns", "tokens")

    def __init__(self, rate_per_s: float, burst: float, now_ns: int):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.t_ns = now_ns

    def take(self, now_ns: int, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens; False (and the debt grows, to -burst at most) if there were not enough."""
        self.tokens = min(self.burst, self.tokens + (now_ns - self.t_ns) * 1e-9 * self.rate_per_s)
        self.t_ns = now_ns
        self.tokens -= cost
        if self.tokens >= 0.0:
            return True
        self.tokens = max(self.tokens, -self.burst)
        return False

    def in_debt(self, now_ns: int) -> bool:
        """True while the tokens, refilled to ``now_ns``, are below zero (nothing is taken)."""
        return self.tokens + (now_ns - self.t_ns) * 1e-9 * self.rate_per_s < 0.0

    @property
    def exhausted(self) -> bool:
        """True when the debt reached one whole burst: the station ignores our CALLERRORs."""
        return self.tokens <= -self.burst


__all__ = ["CENTRAL_SETPOINT", "CONNECTOR_STATUS", "DEFAULT_PROFILE_ID", "LOCAL_FREQUENCY", "MAX_FREQ_WATT_POINTS",
           "OCPP21", "OCPP201", "SUBPROTOCOLS", "EvLimits", "EvNeeds", "MappingError", "MeterReading", "TokenBucket",
           "charge_limit_profile", "check_password", "default_profile", "due_rows", "dynamic_profile", "ev_min_soc",
           "evse_shares_kw", "freq_watt_curve", "freq_watt_w", "hash_password", "kw_to_setpoint", "load_credentials",
           "local_baselines_kw", "local_frequency_kw", "local_frequency_profile", "magnitude_to_rate", "node_id",
           "node_online_fault", "parse_charging_needs", "parse_meter_values", "schedule_update", "setpoint_to_kw",
           "split_node_id", "station_id_from_path", "tx_profile_id", "valid_station_id"]
