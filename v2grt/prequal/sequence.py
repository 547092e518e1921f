"""The grid operators' test sequences, as data: which frequency to apply when, and what each test checks.

Pure: no clock, no I/O. A test is a frequency programme on its own time axis (t = 0 at the step, or
at the start of the ramp) and the names of the checks that judge it (v2grt.prequal.criteria). Each
test names the rule it comes from; docs/prequal.md has the table and says where a number is v2grt's
own because the public text gives none (hold times, mostly).

Frequencies in Hz, times in s, powers as fractions of the contracted capacity (+ = discharge).
"""

from __future__ import annotations

import dataclasses
import math

from v2grt.services import get_service

#: Services `v2grt prequal` has a sequence for (canonical names; `ffr` is `ffr_49.7`).
SERVICES = ("dc", "fcr", "fcr_d_up", "ffr_49.7", "ffr_49.6", "ffr_49.5")

SRC_DC = ("NESO, Dynamic Containment technical requirements (service specification: initiation time 0.5 s, "
          "full delivery 1 s, deadband +-0.015 Hz, 5 % at +-0.2 Hz, 100 % at +-0.5 Hz)")
SRC_FCR = ("Regulation (EU) 2017/1485 (SO GL) Art. 154-155 and Annex V: Continental Europe full activation "
           "at +-200 mHz within 30 s; test by frequency step as the German TSOs' PQ conditions "
           "(regelleistung.net, 2022)")
SRC_FCR_D = ("Nordic TSOs, Technical Requirements for Frequency Containment Reserve Provision in the Nordic "
             "Synchronous Area (26 May 2023): FCR-D upwards step and ramp tests, dynamic performance")
SRC_FFR = ("Fingrid, The technical requirements and the prequalification process of Fast Frequency Reserve "
           "(FFR): full activation within 1.3 / 1.0 / 0.7 s at 49.7 / 49.6 / 49.5 Hz, support >= 5 s with "
           "deactivation <= 20 %/s of capacity")


@dataclasses.dataclass(frozen=True)
class TestSpec:
    """One test of a sequence: a frequency programme and the checks that judge it.

    Programme, on the test's own axis: ``pre_s`` at ``f_from_hz`` (the baseline), then at t = 0 a
    step to ``f_to_hz`` (``ramp_hz_per_s`` None) or a ramp towards it at that rate, held until
    ``hold_s`` after t = 0, then ``f_after_hz`` (nominal) for ``after_s``.
    """

    __test__ = False  # not a pytest class, whatever its name

    name: str
    title: str
    kind: str  # "step", "ramp", "ffr_trigger", "ffr_no_trigger"
    f_from_hz: float
    f_to_hz: float
    hold_s: float
    after_s: float
    pre_s: float
    f_after_hz: float
    checks: tuple[str, ...]
    source: str
    hold_source: str  # where hold_s comes from: the rule, or v2grt's choice (and why)
    ramp_hz_per_s: float | None = None

    @property
    def duration_s(self) -> float:
        """From t = 0 to the end of the test (the pre-step baseline not included)."""
        return self.hold_s + self.after_s

    def frequency_at(self, t_s: float) -> float:
        """The frequency to apply at ``t_s`` on the test's axis (negative: the baseline)."""
        if t_s < 0.0:
            return self.f_from_hz
        if t_s >= self.hold_s:
            return self.f_after_hz
        if self.ramp_hz_per_s is None:
            return self.f_to_hz
        step = math.copysign(self.ramp_hz_per_s * t_s, self.f_to_hz - self.f_from_hz)
        f = self.f_from_hz + step
        return max(f, self.f_to_hz) if self.f_to_hz < self.f_from_hz else min(f, self.f_to_hz)

    def ramp_end_s(self) -> float:
        """When the frequency reaches ``f_to_hz`` (0 for a step)."""
        if self.ramp_hz_per_s is None:
            return 0.0
        return abs(self.f_to_hz - self.f_from_hz) / self.ramp_hz_per_s


def _canonical(service: str) -> str:
    name = get_service(service).name
    if name not in SERVICES:
        raise ValueError(f"--service {service!r}: no prequalification sequence for {name!r}; expected one of "
                         "dc, fcr, fcr_d_up, ffr (ffr_49.7), ffr_49.6, ffr_49.5")
    return name


def sequence(service: str, *, quick: bool = False) -> list[TestSpec]:
    """The test sequence of ``service``; ``quick`` shortens the holds (for tests), never the criteria."""
    name = _canonical(service)
    curve = get_service(name)
    nom = curve.nominal_hz
    if name == "dc":
        hold, after, pre = (3.0, 2.0, 1.5) if quick else (30.0, 30.0, 10.0)
        hold_src = ("v2grt: NESO's public text gives the times to start and to full delivery, not a hold; "
                    "30 s shows steady delivery well past the 1 s full-delivery time")
        return [TestSpec(f"dc_step_{d:+.1f}hz", f"DC: frequency step {d:+.1f} Hz, held", "step", nom, nom + d,
                         hold, after, pre, nom, ("start", "full", "steady"), SRC_DC, hold_src)
                for d in (-0.2, +0.2, -0.5, +0.5)]
    if name == "fcr":
        hold, after, pre = (6.0, 3.0, 2.0) if quick else (120.0, 60.0, 10.0)
        hold_src = ("v2grt: four times SO GL's 30 s full-activation time, so a slow response is seen to settle; "
                    "the 15-min endurance of a limited energy reservoir is not tested here")
        return [TestSpec(f"fcr_step_{d:+.1f}hz", f"FCR: frequency step {d:+.1f} Hz (full activation), held",
                         "step", nom, nom + d, hold, after, pre, nom, ("full", "steady"), SRC_FCR, hold_src)
                for d in (-0.2, +0.2)]
    if name == "fcr_d_up":
        hold, after, pre = (5.0, 3.0, 2.0) if quick else (60.0, 30.0, 10.0)
        ramp_hold = 10.0 if quick else 60.0  # the 7.5 s check needs at least 7.5 s; steady state after it
        hold_src = ("v2grt: the Nordic requirements ask the tests to reach steady state; 60 s is v2grt's "
                    "choice for a fleet that settles in about a second")
        tests = [TestSpec(f"fcr_d_up_step_{d:+.1f}hz", f"FCR-D up: frequency step 50.0 -> {nom + d:.1f} Hz, held",
                          "step", nom, nom + d, hold, after, pre, nom, ("steady",), SRC_FCR_D, hold_src)
                 for d in (-0.2, -0.5)]
        tests.append(TestSpec(
            "fcr_d_up_ramp", "FCR-D up: ramp 49.9 -> 49.0 Hz at 0.24 Hz/s, held at 49.0 Hz", "ramp",
            nom - 0.1, nom - 1.0, ramp_hold, after, pre, nom, ("ramp_7_5s", "ramp_energy", "steady"), SRC_FCR_D,
            "the ramp and its 7.5 s check are the rule's; the hold after it is " + hold_src.split(": ", 1)[1],
            ramp_hz_per_s=0.24))
        return tests
    # FFR (Fingrid): a dip through the trigger that recovers after 1 s, so the 5 s support must come from
    # the latch, not from the frequency; and a dip that stays above the trigger, which must not activate.
    trig = curve.trigger_hz
    assert trig is not None
    after = 12.0 if quick else 20.0  # 5 s support + 5 s release at 20 %/s + margin
    pre = 1.5 if quick else 10.0
    return [
        TestSpec(f"{name}_trigger", f"FFR: dip to {trig - 0.1:.2f} Hz for 1 s (through the {trig:.1f} Hz trigger)",
                 "ffr_trigger", nom, trig - 0.1, 1.0, after, pre, nom, ("ffr_full", "ffr_support", "ffr_release"),
                 SRC_FFR, "v2grt: a 1 s dip, so the support duration is the latch's, not the frequency's"),
        TestSpec(f"{name}_no_trigger", f"FFR: dip to {trig + 0.05:.2f} Hz (above the trigger) for 3 s",
                 "ffr_no_trigger", nom, trig + 0.05, 3.0, 3.0 if quick else 10.0, pre, nom, ("ffr_quiet",), SRC_FFR,
                 "v2grt: 3 s, longer than every activation time"),
    ]


__all__ = ["SERVICES", "TestSpec", "sequence"]
