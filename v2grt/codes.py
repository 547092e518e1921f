"""Per-node reason codes: why a node carries no power this cycle (uint8, shared by kernel, log and wire).

The names are the field manual's engine.log codes where one exists, so an operator grepping the
log, the status table and a gateway's reason column sees the same word. Values are part of the
wire protocol (docs/wire.md): append new codes, never renumber.
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    """Why a node's availability is zero (or limited to one direction)."""

    OK = 0  # available; carries load if the merit order reaches it
    EMPTY = 1  # the row is free (vehicle left); never dispatched
    OFFLINE = 2  # gateway reports the vehicle unplugged or the charger off
    TIMEOUT_BMS_RESPONSE = 3  # telemetry older than the staleness limit
    SOH_BELOW_THRESHOLD = 4  # battery health under the profile's threshold
    THERMAL_LIMIT = 5  # outside the temperature window, or the BMS reported a thermal limit
    NODE_UNREACHABLE = 6  # gateway/charger rejects discharge (old firmware, GB/T, early CCS)
    NODE_LOW_THROUGHPUT = 7  # link under 10 kbit/s: setpoints cannot be trusted to arrive
    E_INVERTER_PHASE_MISMATCH = 8  # the node's site inverter cannot sync to grid phase
    SOC_BELOW_MINIMUM = 9  # at or under minimum_soc: may charge, may not discharge
    EMERGENCY_STOP = 10  # latched e-stop: every node at 0 kW
    INVALID_TELEMETRY = 11  # NaN or out-of-range value in the node's row
    SOC_ABOVE_MAXIMUM = 12  # at or over maximum_soc: may discharge, may not charge


#: Codes that leave one direction open: they are limits, not exclusions.
ONE_WAY = frozenset({Reason.SOC_BELOW_MINIMUM, Reason.SOC_ABOVE_MAXIMUM})


def reason_names(codes) -> list[str]:
    """Map an array of uint8 codes to their names (for CSV output and status tables)."""
    names = {int(r): r.name for r in Reason}
    return [names.get(int(c), f"UNKNOWN_{int(c)}") for c in codes]
