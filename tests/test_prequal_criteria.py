"""The prequalification criteria and sequences on hand-made signals whose verdict is known in advance."""

from __future__ import annotations

import numpy as np
import pytest

from v2grt.prequal import criteria
from v2grt.prequal.sequence import sequence
from v2grt.services import get_service

CAP_KW = 1000.0
DT_S = 0.05  # the journal's 20 Hz cycle records


def by_name(spec_list, name):
    return next(s for s in spec_list if s.name == name)


def axis(spec) -> np.ndarray:
    return np.arange(-spec.pre_s, spec.duration_s, DT_S)


def delayed(spec, curve, t, delay_s: float, rise_s: float = 0.0) -> np.ndarray:
    """The required response, arriving ``delay_s`` late and ramping over ``rise_s`` (a first-order fleet)."""
    ideal = criteria.required_kw(spec, curve, CAP_KW, t - delay_s)
    if rise_s <= 0:
        return ideal
    out = np.empty_like(ideal)
    y = ideal[0]
    for i, target in enumerate(ideal):
        y += (target - y) * min(1.0, DT_S / rise_s)
        out[i] = y
    return out


def checks(spec, curve, t, p, **kw) -> dict[str, criteria.Check]:
    return {c.name: c for c in criteria.evaluate(spec, curve, CAP_KW, t, p, **kw)}


# ----------------------------------------------------------------------------------------- sequences
def test_dc_sequence_has_the_four_steps_and_quick_shortens_only_the_holds():
    """DC: steps of -0.2, +0.2, -0.5, +0.5 Hz from 50 Hz, each judged on start, full and steady delivery;
    --quick keeps the tests and checks and shortens the holds."""
    full, quick = sequence("dc"), sequence("dc", quick=True)
    assert [round(s.f_to_hz - s.f_from_hz, 3) for s in full] == [-0.2, 0.2, -0.5, 0.5]
    assert [s.checks for s in quick] == [s.checks for s in full] == [("start", "full", "steady")] * 4
    assert all(q.hold_s < f.hold_s for q, f in zip(quick, full, strict=True))
    assert full[0].hold_s == 30.0


def test_fcr_d_ramp_programme_is_0_24_hz_per_s_from_49_9_to_49_0():
    """The FCR-D up ramp: 49.9 Hz before t = 0, 0.24 Hz/s down, 49.0 Hz from 3.75 s, nominal after the hold."""
    ramp = by_name(sequence("fcr_d_up"), "fcr_d_up_ramp")
    assert ramp.frequency_at(-0.5) == pytest.approx(49.9)
    assert ramp.frequency_at(1.0) == pytest.approx(49.66)
    assert ramp.ramp_end_s() == pytest.approx(3.75)
    assert ramp.frequency_at(3.75) == pytest.approx(49.0)
    assert ramp.frequency_at(5.0) == pytest.approx(49.0)
    assert ramp.frequency_at(ramp.hold_s + 0.1) == 50.0


def test_ffr_alias_and_unknown_services():
    """`ffr` is Fingrid's 49.7 Hz level; a service without a sequence (fcr_n) is refused by name."""
    assert [s.name for s in sequence("ffr")] == ["ffr_49.7_trigger", "ffr_49.7_no_trigger"]
    with pytest.raises(ValueError, match="fcr_n"):
        sequence("fcr_n")


# ----------------------------------------------------------------------------------------- DC steps
@pytest.mark.parametrize("delay_s, rise_s, start_ok, full_ok", [
    (0.2, 0.0, True, True),      # a clean step 0.2 s late
    (0.3, 0.2, True, True),      # late and soft, still full well inside 1 s
    (0.6, 0.0, False, True),     # starts after 0.5 s: the start criterion fails, full (0.6 s) passes
    (0.2, 0.6, True, False),     # starts at once but crawls: 95 % only after ~2 s
])
def test_dc_start_and_full_times_judge_late_or_slow_fleets(delay_s, rise_s, start_ok, full_ok):
    """DC's 0.5 s start and 1 s full delivery, on the -0.5 Hz step, for fleets late or slow by known amounts."""
    curve, spec = get_service("dc"), by_name(sequence("dc"), "dc_step_-0.5hz")
    t = axis(spec)
    c = checks(spec, curve, t, delayed(spec, curve, t, delay_s, rise_s))
    assert c["start"].passed is start_ok and c["full"].passed is full_ok
    assert c["start"].measured == pytest.approx(delay_s, abs=DT_S + 1e-9)
    assert c["steady"].passed  # late, but delivering by the second half of the hold


def test_dc_full_time_is_the_first_sample_at_95_percent():
    """A step to exactly the required power at 0.70 s is measured as full at 0.70 s (on the 50 ms grid)."""
    curve, spec = get_service("dc"), by_name(sequence("dc"), "dc_step_+0.5hz")
    t = axis(spec)
    p = np.where((t >= 0.70 - 1e-9) & (t < spec.hold_s), -CAP_KW, 0.0)  # + 0.5 Hz: full charge
    c = checks(spec, curve, t, p)
    assert c["full"].measured == pytest.approx(0.70) and c["start"].measured == pytest.approx(0.70)
    assert c["full"].passed and not c["start"].passed  # nothing at all until 0.7 s > 0.5 s


@pytest.mark.parametrize("share, passed", [(0.98, True), (0.90, False)])
def test_steady_delivery_within_the_tolerance_of_capacity(share, passed):
    """A fleet delivering 98 % of the full response is within 3 % of capacity; 90 % is not (error 10 %)."""
    curve, spec = get_service("dc"), by_name(sequence("dc"), "dc_step_-0.5hz")
    t = axis(spec)
    c = checks(spec, curve, t, share * criteria.required_kw(spec, curve, CAP_KW, t))
    assert c["steady"].measured == pytest.approx(1.0 - share, abs=1e-9)
    assert c["steady"].passed is passed


def test_a_dead_fleet_never_starts():
    """No response at all: start and full are 'never' (None) and fail; steady fails by the whole response."""
    curve, spec = get_service("dc"), by_name(sequence("dc"), "dc_step_-0.2hz")
    t = axis(spec)
    c = checks(spec, curve, t, np.zeros_like(t))
    assert c["start"].measured is None and c["full"].measured is None
    assert not (c["start"].passed or c["full"].passed)
    assert c["steady"].measured == pytest.approx(0.05) and not c["steady"].passed  # 5 % at -0.2 Hz


# ----------------------------------------------------------------------------------------- FCR-D ramp
def test_fcr_d_ramp_ideal_follower_delivers_the_known_energy():
    """A fleet that follows the curve exactly: 100 % at 7.5 s, and the energy by 7.5 s is 1.667 / 2 + 5.833
    = 6.667 s x the full change (full is reached at 49.5 Hz, 1.667 s into the ramp)."""
    curve, spec = get_service("fcr_d_up"), by_name(sequence("fcr_d_up"), "fcr_d_up_ramp")
    t = np.arange(-spec.pre_s, spec.duration_s, 0.005)
    c = checks(spec, curve, t, criteria.required_kw(spec, curve, CAP_KW, t))
    assert c["ramp_7_5s"].measured == pytest.approx(1.0)
    assert c["ramp_energy"].measured == pytest.approx(0.4 / 0.24 / 2 + (7.5 - 0.4 / 0.24), abs=0.01)
    assert c["ramp_7_5s"].passed and c["ramp_energy"].passed and c["steady"].passed


def test_fcr_d_ramp_a_5_s_delay_passes_the_7_5_s_point_but_not_the_energy():
    """5 s late: at 7.5 s the response is full (the ideal's 2.5 s), but by then only 0.833 + 0.833 = 1.667 s
    x dP was delivered, under the 3.2 s the rule asks: the two criteria judge different things."""
    curve, spec = get_service("fcr_d_up"), by_name(sequence("fcr_d_up"), "fcr_d_up_ramp")
    t = np.arange(-spec.pre_s, spec.duration_s, 0.005)
    c = checks(spec, curve, t, delayed(spec, curve, t, 5.0))
    assert c["ramp_7_5s"].passed
    assert c["ramp_energy"].measured == pytest.approx(2 * 0.4 / 0.24 / 2, abs=0.01)
    assert not c["ramp_energy"].passed


def test_fcr_d_ramp_a_slow_fleet_misses_86_percent():
    """A first-order fleet with a 5 s time constant is at ~71 % 7.5 s after the ramp's start: fail."""
    curve, spec = get_service("fcr_d_up"), by_name(sequence("fcr_d_up"), "fcr_d_up_ramp")
    t = axis(spec)
    c = checks(spec, curve, t, delayed(spec, curve, t, 0.0, rise_s=5.0))
    assert 0.6 < c["ramp_7_5s"].measured < 0.8 and not c["ramp_7_5s"].passed


# ----------------------------------------------------------------------------------------- FFR
def test_ffr_required_latch_holds_5_s_then_releases_at_18_percent_per_s():
    """The required FFR response: full from the dip, held 5 s after the last instant at the trigger (0.99 s on
    the latch's 10 ms grid), then down at the curve's 18 %/s: 63.8 % at 8 s, 0 from 11.55 s."""
    curve, spec = get_service("ffr"), by_name(sequence("ffr"), "ffr_49.7_trigger")
    req = criteria.required_kw(spec, curve, CAP_KW, np.array([-0.5, 0.0, 3.0, 5.9, 8.0, 11.6]))
    assert req == pytest.approx([0.0, CAP_KW, CAP_KW, CAP_KW, 0.6382 * CAP_KW, 0.0], abs=0.5)


def test_ffr_a_fleet_following_the_latch_passes():
    """The latch 0.3 s late: full at 0.3 s (<= 1.3 s); >= 95 % until 0.3 + 5.99 + 0.28 s (the release's first
    5 %), i.e. held 6.27 s; released at 18 %/s, judged against the rule's 20 %/s."""
    curve, spec = get_service("ffr"), by_name(sequence("ffr"), "ffr_49.7_trigger")
    t = axis(spec)
    c = checks(spec, curve, t, delayed(spec, curve, t, 0.3))
    assert c["ffr_full"].measured == pytest.approx(0.3, abs=DT_S)
    assert c["ffr_support"].measured == pytest.approx(6.27, abs=DT_S)
    assert c["ffr_release"].measured == pytest.approx(0.18, abs=0.01)
    assert c["ffr_release"].limit == pytest.approx(0.2 + criteria.DEFAULT_TOLERANCE)  # the rule's, not the curve's
    assert all(x.passed for x in c.values())


def test_ffr_a_fleet_that_drops_with_the_frequency_fails_support_and_release():
    """Full at once but dropped to 0 when the frequency recovers (t = 1 s): support 1 s < 5 s, release 100 %/s."""
    curve, spec = get_service("ffr"), by_name(sequence("ffr"), "ffr_49.7_trigger")
    t = axis(spec)
    p = np.where((t >= 0.1) & (t < 1.0), CAP_KW, 0.0)
    c = checks(spec, curve, t, p)
    assert c["ffr_full"].passed
    assert c["ffr_support"].measured == pytest.approx(0.9, abs=DT_S) and not c["ffr_support"].passed
    assert c["ffr_release"].measured == pytest.approx(1.0) and not c["ffr_release"].passed


@pytest.mark.parametrize("blip_share, passed", [(0.0, True), (0.10, False)])
def test_ffr_no_activation_above_the_trigger(blip_share, passed):
    """A dip to 49.75 Hz (above 49.7) must not activate: a 10 % blip fails, nothing passes."""
    curve, spec = get_service("ffr"), by_name(sequence("ffr"), "ffr_49.7_no_trigger")
    t = axis(spec)
    p = np.where((t >= 1.0) & (t < 1.5), blip_share * CAP_KW, 0.0)
    c = checks(spec, curve, t, p)
    assert c["ffr_quiet"].measured == pytest.approx(blip_share) and c["ffr_quiet"].passed is passed


def test_fcr_full_activation_within_30_s():
    """FCR: a fleet reaching full 20 s after the step passes the 30 s rule; one that needs 40 s fails (the hold
    is the rule's default, 120 s)."""
    curve, spec = get_service("fcr"), by_name(sequence("fcr"), "fcr_step_-0.2hz")
    t = axis(spec)
    for delay_s, passed in ((20.0, True), (40.0, False)):
        c = checks(spec, curve, t, delayed(spec, curve, t, delay_s))
        assert c["full"].measured == pytest.approx(delay_s, abs=DT_S) and c["full"].passed is passed
