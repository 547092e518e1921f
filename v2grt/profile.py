"""The discharge profile: how far each battery may be used, and how load is shared across the fleet.

The field manual's `discharge_profile.json` (``minimum_soc`` and friends) is this dataclass as
JSON. Every field is validated on load with an error that names the file, key, value and range, so a
bad reload is refused while the old profile stays in force.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

POLICIES = ("merit", "prorata")

#: Ranking buckets: scores are quantised to this many levels so the merit order is found with a
#: histogram in O(N) instead of a sort (an argsort of a million keys is ~90 ms on the target box).
#: 2048 levels resolve SoC to ~0.0008 (with w_soc 0.6), finer than a BMS reports, and keep the
#: histogram at 16 KiB, half of L1.
RANK_BUCKETS = 2048


class ProfileError(ValueError):
    """A profile value out of range; the message names the source, key, value and allowed range."""


@dataclasses.dataclass(frozen=True)
class Field:
    lo: float
    hi: float
    unit: str
    doc: str


_FIELDS: dict[str, Field] = {
    "minimum_soc": Field(0.0, 1.0, "fraction", "no discharge at or below this SoC (field manual default 0.20)"),
    "maximum_soc": Field(0.0, 1.0, "fraction", "no charge at or above this SoC"),
    "soc_taper": Field(0.0, 1.0, "fraction", "SoC band above minimum_soc (below maximum_soc) over which "
                                             "power tapers linearly from 0 to full"),
    "soh_threshold": Field(0.0, 1.0, "fraction", "nodes with SoH below this are excluded"),
    "temp_min_c": Field(-60.0, 20.0, "degC", "coldest operating temperature; excluded below"),
    "temp_max_c": Field(20.0, 100.0, "degC", "hottest operating temperature; excluded above"),
    "temp_derate_c": Field(0.0, 40.0, "degC", "band inside each temperature edge over which power derates"),
    "endurance_s": Field(1.0, 86400.0, "s", "a node offers only the power it can sustain this long"),
    "stale_after_s": Field(0.01, 3600.0, "s", "telemetry older than this excludes the node"),
    "node_ramp_kw_per_s": Field(0.0, math.inf, "kW/s", "max rise of a node's |power|; falls are never limited"),
    "fleet_ramp_kw_per_s": Field(0.0, math.inf, "kW/s", "max change of the fleet total per second"),
    "hysteresis": Field(0.0, 1.0, "score", "ranking bonus for a node already carrying load in that direction"),
    "w_soc": Field(0.0, 1.0, "weight", "ranking weight of SoC (highest first for discharge)"),
    "w_cycles": Field(0.0, 1.0, "weight", "ranking weight of wear (lowest cycle count first)"),
    "w_soh": Field(0.0, 1.0, "weight", "ranking weight of health (highest first)"),
    "w_temp": Field(0.0, 1.0, "weight", "ranking weight of temperature comfort (furthest from the edges first)"),
    "cycles_ref": Field(1.0, 1e6, "cycles", "cycle count at which the wear term of the score reaches 0"),
}


@dataclasses.dataclass(frozen=True)
class DispatchProfile:
    """Battery limits and load-sharing policy for one fleet (see docs/architecture.md, "The kernel")."""

    minimum_soc: float = 0.20
    maximum_soc: float = 0.95
    soc_taper: float = 0.10
    soh_threshold: float = 0.70
    temp_min_c: float = -20.0
    temp_max_c: float = 50.0
    temp_derate_c: float = 10.0
    endurance_s: float = 900.0  # 15 min: GB DC and the ENTSO-E FCR lower bound
    stale_after_s: float = 5.0
    node_ramp_kw_per_s: float = math.inf
    fleet_ramp_kw_per_s: float = math.inf
    hysteresis: float = 0.02
    w_soc: float = 0.6
    w_cycles: float = 0.2
    w_soh: float = 0.1
    w_temp: float = 0.1
    cycles_ref: float = 3000.0
    policy: str = "merit"

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "profile") -> None:
        """Raise ProfileError naming source, key, value and range for the first bad field."""
        for key, spec in _FIELDS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"{source}: {key}={value!r} is not a number ({spec.doc})")
            if not (spec.lo <= value <= spec.hi):
                raise ProfileError(f"{source}: {key}={value!r} outside {spec.lo}..{spec.hi} {spec.unit} ({spec.doc})")
        if self.policy not in POLICIES:
            raise ProfileError(f"{source}: policy={self.policy!r} unknown; expected one of {list(POLICIES)}")
        if self.maximum_soc <= self.minimum_soc:
            raise ProfileError(f"{source}: maximum_soc={self.maximum_soc} must be above minimum_soc={self.minimum_soc}")
        if self.temp_max_c - self.temp_min_c <= 2 * self.temp_derate_c:
            raise ProfileError(f"{source}: temperature window {self.temp_min_c}..{self.temp_max_c} degC is narrower "
                               f"than twice temp_derate_c={self.temp_derate_c}")
        weights = self.w_soc + self.w_cycles + self.w_soh + self.w_temp
        if abs(weights - 1.0) > 1e-9:
            raise ProfileError(f"{source}: ranking weights w_soc+w_cycles+w_soh+w_temp={weights} must sum to 1")

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> DispatchProfile:
        """Build from a mapping (unknown keys are an error naming them: a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: expected a JSON object of profile keys, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        obj = cls.__new__(cls)
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        values.update(data)
        for k, v in values.items():
            object.__setattr__(obj, k, v)
        obj.validate(source)
        return obj

    @classmethod
    def from_json(cls, path: str | Path) -> DispatchProfile:
        """Load `discharge_profile.json`; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read discharge profile ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})") from None
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes) -> DispatchProfile:
        """A copy with some fields changed (validated)."""
        return DispatchProfile.from_dict({**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
