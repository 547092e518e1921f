"""The dispatch kernel: the Cython kernel equals its NumPy twin, and both hold the contract's invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from v2grt import reference
from v2grt._buffers import T_FEASIBLE_CHG, T_FEASIBLE_DIS, T_N_CARRYING, T_TARGET, KernelOutput, Workspace
from v2grt.codes import ONE_WAY, Reason
from v2grt.fleet import Fleet
from v2grt.kernel import available_isas, compiled, get_backend
from v2grt.profile import DispatchProfile
from v2grt.testing import fleet_from_arrays, uniform_fleet

BACKENDS = ["cython", "reference"]
TOL_KW = 1e-6


#: Every compiled build this machine runs ("cython:baseline", "cython:avx2"): each must equal the twin.
COMPILED = [f"cython:{isa}" for isa in available_isas()]


def kernel_module(backend):
    """"cython", "reference", or "cython:<isa>" for one particular compiled build."""
    if backend.startswith("cython:"):
        return compiled(backend.split(":", 1)[1])
    return get_backend(backend)


#: kernel.threads: 1, or 2 with chunks small enough for test fleets and no row threshold (tests/test_kernel_threads.py)
THREADS = [1, 2]


def workspace(fleet, threads=1):
    """Fresh kernel scratch; threads=2 runs the chunks of 32 rows on this thread and the worker thread."""
    work = Workspace(fleet.capacity, fleet.site_capacity)
    if threads == 2:
        work.threads, work.chunk_rows, work.parallel_min_rows = 2, 32, 0
    return work


def with_sites_contiguous(fleet, threads):
    """For threads=2: each site's rows made one run (sorted), or the kernel would run one thread (the same
    fleet is then given to the twin too)."""
    if threads == 2:
        n = fleet.n_rows
        fleet.site[:n] = np.sort(fleet.site[:n])
        fleet.version += 1
    return fleet


def run(backend, fleet, profile, request_kw, *, now_ns=0, dt_s=0.1, estop=False, threads=1):
    """One kernel call with fresh buffers; returns the output object."""
    out = KernelOutput(fleet.capacity)
    work = workspace(fleet, threads)
    kernel_module(backend).dispatch(fleet, profile, request_kw, now_ns, dt_s, estop, out, work)
    return out


def tol(out, n):
    return TOL_KW * max(1.0, float(np.abs(out.setpoint_kw[:n]).sum()))


def assert_equals_twin(cy, ref, n):
    """The contract between a compiled build and the twin: reasons, availability and reason counts
    bit for bit; setpoints and totals to float tolerance (sums are taken in another order)."""
    np.testing.assert_array_equal(cy.reason[:n], ref.reason[:n])
    np.testing.assert_array_equal(cy.avail_dis_kw[:n], ref.avail_dis_kw[:n])
    np.testing.assert_array_equal(cy.avail_chg_kw[:n], ref.avail_chg_kw[:n])
    np.testing.assert_array_equal(cy.reason_counts, ref.reason_counts)
    np.testing.assert_array_equal(cy.reason_counts, np.bincount(cy.reason[:n], minlength=256))
    np.testing.assert_allclose(cy.setpoint_kw[:n], ref.setpoint_kw[:n], rtol=1e-9, atol=tol(ref, n))
    np.testing.assert_allclose(cy.totals, ref.totals, rtol=1e-9, atol=tol(ref, n))


# ------------------------------------------------------------------ random fleets for property tests
@st.composite
def fleets(draw, max_n=40):
    """Random and adversarial fleets: values at the limits, faults, stale rows, tight sites, ramps."""
    n = draw(st.integers(1, max_n))
    n_sites = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    soc = rng.choice([0.0, 0.1, 0.2, 0.25, 0.5, 0.8, 0.95, 1.0], n) if draw(st.booleans()) else rng.random(n)
    fleet = fleet_from_arrays(
        n_sites=n_sites,
        soc=soc,
        soh=rng.choice([0.5, 0.69, 0.7, 0.9, 1.0], n),
        capacity_kwh=rng.choice([0.0, 40.0, 60.0, 100.0], n, p=[0.05, 0.3, 0.35, 0.3]),
        p_dis_max_kw=rng.choice([0.0, 7.4, 11.0, 22.0], n, p=[0.05, 0.35, 0.35, 0.25]),
        p_chg_max_kw=rng.choice([0.0, 7.4, 11.0, 22.0], n, p=[0.05, 0.35, 0.35, 0.25]),
        temp_c=rng.choice([-30.0, -20.0, -15.0, 0.0, 25.0, 42.0, 50.0, 51.0], n),
        cycle_count=rng.choice([0.0, 10.0, 500.0, 2999.0, 5000.0], n),
        efficiency=rng.uniform(0.94, 0.985, n),
        online=(rng.random(n) > 0.1).astype(np.uint8),
        # a gateway's fault code is any non-zero uint8, even one that names a kernel reason (SoC limits)
        fault=rng.choice([0, 0, 0, 0, 0, 0, Reason.NODE_UNREACHABLE, Reason.NODE_LOW_THROUGHPUT,
                          Reason.SOC_BELOW_MINIMUM, Reason.SOC_ABOVE_MAXIMUM, 255], n),
        active=(rng.random(n) > 0.05).astype(np.uint8),
        site=rng.integers(0, n_sites, n).astype(np.int32),
        last_setpoint_kw=rng.choice([0.0, 0.0, 3.0, -3.0, 11.0, -11.0], n),
        last_telemetry_ns=rng.choice([0, -6_000_000_000, -10_000_000_000], n, p=[0.9, 0.05, 0.05]),
        site_export_kw=rng.choice([math.inf, 0.0, 5.0, 30.0], n_sites),
        site_import_kw=rng.choice([math.inf, 0.0, 5.0, 30.0], n_sites),
        site_fault=rng.choice([0, 0, 0, Reason.E_INVERTER_PHASE_MISMATCH, Reason.SOC_ABOVE_MAXIMUM], n_sites),
    )
    fleet.last_setpoint_kw[:n] *= fleet.active[:n]  # a free row never carries a setpoint
    # the telemetry epoch anywhere (ticks are relative to it): staleness must not depend on where it is
    fleet.rebase_telemetry(draw(st.sampled_from([0, -5_999_999_999, 10**15 + 1])))
    profile = DispatchProfile(
        policy=draw(st.sampled_from(["merit", "prorata"])),
        node_ramp_kw_per_s=draw(st.sampled_from([math.inf, 20.0, 100.0])),
        fleet_ramp_kw_per_s=draw(st.sampled_from([math.inf, 500.0])),
        soc_taper=draw(st.sampled_from([0.0, 0.1])),
        temp_derate_c=draw(st.sampled_from([0.0, 10.0])),
        hysteresis=draw(st.sampled_from([0.0, 0.02, 0.2])),
    )
    request = draw(st.one_of(st.sampled_from([0.0, 1e9, -1e9, 5.0, -5.0]), st.floats(-500, 500)))
    estop = draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans())
    return fleet, profile, request, estop


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("build", COMPILED)
@SETTINGS
@given(case=fleets())
def test_cython_equals_reference(build, threads, case):
    """On random and adversarial fleets every compiled build, on one thread or two, gives the reference's outputs."""
    fleet, profile, request, estop = case
    with_sites_contiguous(fleet, threads)
    n = fleet.n_rows
    ref = run("reference", fleet, profile, request, estop=estop)
    cy = run(build, fleet, profile, request, estop=estop, threads=threads)
    assert_equals_twin(cy, ref, n)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=fleets())
def test_invariants(backend, case):
    """Conservation, availability, site limits, SoC floor, one direction, excluded nodes at zero."""
    fleet, profile, request, estop = case
    n = fleet.n_rows
    out = run(backend, fleet, profile, request, estop=estop)
    sp, reason = out.setpoint_kw[:n], out.reason[:n]
    target = out.totals[T_TARGET]
    eps = tol(out, n)
    assert abs(sp.sum() - target) <= eps  # conservation
    assert -out.totals[T_FEASIBLE_CHG] - eps <= target <= out.totals[T_FEASIBLE_DIS] + eps
    assert np.all(sp <= out.avail_dis_kw[:n] + eps) and np.all(sp >= -out.avail_chg_kw[:n] - eps)
    assert not (np.any(sp > eps) and np.any(sp < -eps)), "no node charges while another discharges"
    # in double, as the kernel compares (a float32 column against a Python float compares in float32 in NumPy 2)
    soc = fleet.soc[:n].astype(np.float64)
    assert np.all(sp[soc <= profile.minimum_soc] <= eps), "no discharge at or below the SoC floor"
    assert np.all(sp[soc >= profile.maximum_soc] >= -eps), "no charge at or above the SoC ceiling"
    hard = ~np.isin(reason, [Reason.OK, *ONE_WAY])
    assert np.all(sp[hard] == 0.0) and np.all(out.avail_dis_kw[:n][hard] == 0.0)
    site = fleet.site[:n]
    per_site = np.bincount(site, weights=sp, minlength=fleet.n_sites)
    assert np.all(per_site <= fleet.site_export_kw[: fleet.n_sites] + eps)
    assert np.all(per_site >= -fleet.site_import_kw[: fleet.n_sites] - eps)
    ramp = profile.node_ramp_kw_per_s * 0.1
    last = fleet.last_setpoint_kw[:n]
    if math.isfinite(ramp):  # |power| may rise by at most ramp*dt; falling is never limited
        same_way = np.where(np.sign(sp) == np.sign(last), np.abs(last), 0.0)
        assert np.all(np.abs(sp) <= same_way + ramp + eps)
    if estop:
        assert np.all(sp == 0.0) and np.all(reason[fleet.active[:n] == 1] == Reason.EMERGENCY_STOP)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=fleets())
def test_merit_order(backend, case):
    """Under merit order, a node carries load only if every better-ranked node is at its limit."""
    fleet, profile, request, estop = case
    profile = profile.replace(policy="merit")
    fleet.site_export_kw[:] = math.inf  # site caps change the order by design; tested separately
    fleet.site_import_kw[:] = math.inf
    n = fleet.n_rows
    out = run(backend, fleet, profile, request, estop=estop)
    sp = out.setpoint_kw[:n]
    target = out.totals[T_TARGET]
    if target == 0.0:
        return
    discharging = target > 0
    ok = out.reason[:n] == Reason.OK
    ok |= np.isin(out.reason[:n], list(ONE_WAY))
    avail = out.avail_dis_kw[:n] if discharging else out.avail_chg_kw[:n]
    last = fleet.last_setpoint_kw[:n]
    ramp = profile.node_ramp_kw_per_s * 0.1
    window = np.minimum(avail, np.maximum(last if discharging else -last, 0.0) + ramp)
    with np.errstate(invalid="ignore"):
        f_temp = reference.temperature_factor(fleet.temp_c[:n], profile)
    q = reference.rank_buckets(fleet, profile, slice(0, n), f_temp, discharging)
    key = q * (n + 1) + (n - np.arange(n))  # larger = better: bucket, then lower row
    take = np.abs(sp)
    eps = tol(out, n)
    carrying = np.flatnonzero(ok & (take > eps))
    if len(carrying):
        worst = carrying[np.argmin(key[carrying])]
        better = ok & (key > key[worst]) & (window > 0)
        assert np.all(take[better] >= window[better] - eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bit_for_bit(backend):
    """The same inputs give bit-identical outputs, run after run."""
    fleet = Fleet.random(5000, seed=7)
    fleet.set_site_limits("site3", export_kw=20.0)
    profile = DispatchProfile()
    first = run(backend, fleet, profile, 12_345.0)
    for _ in range(3):
        again = run(backend, fleet, profile, 12_345.0)
        assert again.setpoint_kw.tobytes() == first.setpoint_kw.tobytes()
        assert again.totals.tobytes() == first.totals.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_binding_site_limit_path_matches_greedy(backend):
    """When a site limit binds, the site gives exactly its limit and better-ranked nodes elsewhere fill first."""
    n = 10
    fleet = fleet_from_arrays(
        n_sites=2, soc=np.linspace(0.9, 0.45, n), capacity_kwh=np.full(n, 60.0),
        p_dis_max_kw=np.full(n, 10.0), p_chg_max_kw=np.full(n, 10.0),
        site=np.array([0] * 5 + [1] * 5, np.int32), site_export_kw=[15.0, math.inf],
    )
    out = run(backend, fleet, DispatchProfile(), 40.0)
    sp = out.setpoint_kw[:n]
    assert sp[:5].sum() == pytest.approx(15.0)  # site 1 capped at 15 kW: best node full, next 5 kW
    np.testing.assert_allclose(sp[:5], [10.0, 5.0, 0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(sp[5:], [10.0, 10.0, 5.0, 0.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prorata_shares_equally(backend):
    """Pro-rata gives every eligible node the same fraction of its availability."""
    fleet = uniform_fleet(8)
    fleet.p_dis_max_kw[:4] = 22.0
    out = run(backend, fleet, DispatchProfile(policy="prorata"), 60.0)
    sp, avail = out.setpoint_kw[:8], out.avail_dis_kw[:8]
    np.testing.assert_allclose(sp / avail, np.full(8, 60.0 / avail.sum()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_availability_is_nonlinear_in_soc_and_temperature(backend):
    """Availability is zero at the floor, tapers above it, and derates near the temperature edges."""
    soc = np.array([0.15, 0.20, 0.25, 0.30, 0.60, 0.60, 0.60, 0.60])
    temp = np.array([25.0, 25.0, 25.0, 25.0, 25.0, -15.0, 45.0, 55.0])
    fleet = fleet_from_arrays(soc=soc, temp_c=temp, capacity_kwh=np.full(8, 80.0),
                              p_dis_max_kw=np.full(8, 10.0), p_chg_max_kw=np.full(8, 10.0),
                              efficiency=np.full(8, 1.0))
    out = run(backend, fleet, DispatchProfile(endurance_s=60.0), 0.0)
    a = out.avail_dis_kw[:8]
    assert a[0] == 0.0 and a[1] == 0.0
    assert out.reason[0] == Reason.SOC_BELOW_MINIMUM
    assert a[2] == pytest.approx(5.0) and a[3] == pytest.approx(10.0)  # linear taper over 0.1 of SoC
    assert a[5] == pytest.approx(5.0) and a[6] == pytest.approx(5.0)  # 5 degC inside a 10 degC band
    assert a[7] == 0.0 and out.reason[7] == Reason.THERMAL_LIMIT


@pytest.mark.parametrize("backend", BACKENDS + COMPILED)
def test_a_vehicle_reporting_exactly_a_threshold_is_at_it(backend):
    """The fleet holds SoC and SoH in float32 and both backends compare them with the profile's thresholds
    rounded to float32: a SoC of exactly the floor (0.2, stored 0.2000000030) is at the floor, one of exactly
    the ceiling (0.95, stored 0.9499999881) at the ceiling, an SoH of exactly the threshold (0.7) passes."""
    p = DispatchProfile()
    fleet = fleet_from_arrays(soc=[p.minimum_soc, p.maximum_soc, 0.6], soh=[1.0, 1.0, p.soh_threshold],
                              capacity_kwh=[60.0] * 3, p_dis_max_kw=[11.0] * 3, p_chg_max_kw=[11.0] * 3)
    assert fleet.soc.dtype == np.float32
    assert float(fleet.soc[0]) != p.minimum_soc and float(fleet.soc[1]) != p.maximum_soc  # rounded
    out = run(backend, fleet, p, 0.0)
    assert out.reason[:3].tolist() == [Reason.SOC_BELOW_MINIMUM, Reason.SOC_ABOVE_MAXIMUM, Reason.OK]
    assert out.avail_dis_kw[0] == 0.0 and out.avail_chg_kw[1] == 0.0 and out.avail_dis_kw[2] > 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_endurance_bounds_availability(backend):
    """A node offers only the power it can sustain for the endurance time, losses counted."""
    fleet = fleet_from_arrays(soc=[0.30], capacity_kwh=[50.0], soh=[0.8], efficiency=[0.95],
                              p_dis_max_kw=[22.0], p_chg_max_kw=[22.0])
    out = run(backend, fleet, DispatchProfile(endurance_s=3600.0), 0.0)
    # (0.30 - 0.20) * 50 kWh * 0.8 SoH = 4 kWh above the floor, 95 % reaches the grid, over 1 h
    assert out.avail_dis_kw[0] == pytest.approx(4.0 * 0.95)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_are_excluded_with_a_reason(backend):
    """NaN, negative capacity and SoC outside 0..1 written by a broken gateway exclude the node, never crash."""
    fleet = fleet_from_arrays(soc=[math.nan, 0.6, 1.5, 0.6, 0.6], capacity_kwh=[60.0, -5.0, 60.0, 60.0, 60.0],
                              p_dis_max_kw=[11.0, 11.0, 11.0, math.inf, 11.0], p_chg_max_kw=np.full(5, 11.0),
                              temp_c=[25.0, 25.0, 25.0, 25.0, math.nan])
    out = run(backend, fleet, DispatchProfile(), 100.0)
    assert list(out.reason[:5]) == [Reason.INVALID_TELEMETRY] * 5
    assert np.all(out.setpoint_kw[:5] == 0.0) and out.totals[T_TARGET] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("request_kw", [math.nan, math.inf, -math.inf])
def test_non_finite_request_gives_zero(backend, request_kw):
    """A NaN or infinite request dispatches nothing rather than saturating the fleet."""
    out = run(backend, uniform_fleet(4), DispatchProfile(), request_kw)
    assert np.all(out.setpoint_kw[:4] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_telemetry_excludes(backend):
    """A node whose telemetry is older than stale_after_s is excluded as TIMEOUT_BMS_RESPONSE."""
    fleet = uniform_fleet(3)
    fleet.last_telemetry_ns[:3] = [0, -4_000_000_000, -6_000_000_000]
    out = run(backend, fleet, DispatchProfile(stale_after_s=5.0), 30.0, now_ns=0)
    assert list(out.reason[:3]) == [Reason.OK, Reason.OK, Reason.TIMEOUT_BMS_RESPONSE]
    assert out.setpoint_kw[2] == 0.0


@pytest.mark.parametrize("backend", BACKENDS + COMPILED)
def test_staleness_is_judged_in_whole_ticks_of_one_ms(backend):
    """Telemetry exactly stale_after_s old is fresh and one tick older stale; within a tick the age is the
    same (the kernel reads 1 ms ticks since the fleet's epoch, not ns), however far the epoch is from 0."""
    for epoch_ns in (0, 7 * 10**15 + 123):
        fleet = uniform_fleet(4)
        fleet.rebase_telemetry(epoch_ns)
        now_ns = epoch_ns + 10_000_000_000
        fleet.last_telemetry_ns[:4] = [now_ns - 5_000_000_000, now_ns - 5_000_000_001 - 999_999,
                                       now_ns - 5_001_000_000, now_ns - 4_999_999_999]
        out = run(backend, fleet, DispatchProfile(stale_after_s=5.0), 30.0, now_ns=now_ns)
        ok, stale = Reason.OK, Reason.TIMEOUT_BMS_RESPONSE
        assert list(out.reason[:4]) == [ok, stale, stale, ok], epoch_ns


@pytest.mark.parametrize("backend", BACKENDS + COMPILED)
def test_moving_the_telemetry_epoch_changes_no_reason(backend):
    """A rebase of the telemetry epoch (as a running aggregator does every ~12 days) leaves every row's
    staleness as it was, on each side of the limit."""
    fleet = uniform_fleet(3)
    fleet.last_telemetry_ns[:3] = [0, -4_000_000_000, -6_000_000_000]
    before = run(backend, fleet, DispatchProfile(stale_after_s=5.0), 30.0, now_ns=0).reason[:3].copy()
    fleet.rebase_telemetry(3 * 10**14 + 17)
    after = run(backend, fleet, DispatchProfile(stale_after_s=5.0), 30.0, now_ns=0).reason[:3]
    assert list(before) == list(after) == [Reason.OK, Reason.OK, Reason.TIMEOUT_BMS_RESPONSE]


@pytest.mark.parametrize("backend", BACKENDS + COMPILED)
@pytest.mark.parametrize("now_ns", [0, 1, 10**18, 2**62 - 1])
def test_never_heard_is_stale_at_any_clock_without_overflow(backend, now_ns):
    """A row marked NEVER_HEARD_NS is TIMEOUT_BMS_RESPONSE at every monotonic time below 2**62 ns, even
    with the longest stale_after_s a profile allows (a wrapped difference would read as fresh)."""
    fleet = uniform_fleet(2)
    fleet.mark_never_heard()
    fleet.last_telemetry_ns[0] = now_ns  # heard just now
    out = run(backend, fleet, DispatchProfile(stale_after_s=3600.0), 30.0, now_ns=now_ns)
    assert list(out.reason[:2]) == [Reason.OK, Reason.TIMEOUT_BMS_RESPONSE]
    assert out.setpoint_kw[1] == 0.0 and out.setpoint_kw[0] > 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["all_at_floor", "all_offline", "zero_capacity", "one_node", "empty"])
def test_adversarial_fleets(backend, what):
    """Degenerate fleets give zero (or the one node's share) with reasons, and conserve power."""
    n = {"one_node": 1, "empty": 0}.get(what, 50)
    fleet = uniform_fleet(n) if n else Fleet()
    if what == "all_at_floor":
        fleet.soc[:n] = 0.2
    elif what == "all_offline":
        fleet.online[:n] = 0
    elif what == "zero_capacity":
        fleet.capacity_kwh[:n] = 0.0
    out = run(backend, fleet, DispatchProfile(), 1e6)
    assert np.all(out.setpoint_kw[:n] == 0.0) == (what != "one_node")
    assert out.setpoint_kw[:n].sum() == pytest.approx(out.totals[T_TARGET])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ramp_limits_across_steps(backend):
    """Node and fleet ramp limits hold step after step, and a fall to zero is immediate."""
    from v2grt import Dispatcher

    fleet = uniform_fleet(20)
    profile = DispatchProfile(node_ramp_kw_per_s=20.0, fleet_ramp_kw_per_s=100.0)
    d = Dispatcher(fleet, profile, backend=backend, capacity_kw=200.0)
    prev = np.zeros(20)
    for k in range(1, 15):
        r = d.step(50.0, now_s=k * 0.1, request_kw=200.0)
        assert abs(r.allocated_kw - prev.sum()) <= 100.0 * 0.1 + 1e-9
        assert np.all(np.abs(r.setpoints_kw) <= np.abs(prev) + 20.0 * 0.1 + 1e-9)
        prev = r.setpoints_kw.copy()
    assert prev.sum() == pytest.approx(140.0)  # 14 steps of 10 kW
    fleet.online[:20] = 0
    r = d.step(50.0, now_s=1.6, request_kw=200.0)
    assert np.all(r.setpoints_kw == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hysteresis_prevents_flapping(backend):
    """Nodes carrying load keep it when idle nodes overtake them by less than the hysteresis band."""
    n = 40
    soc = np.linspace(0.60, 0.62, n)

    def carrying_after_perturbation(hysteresis):
        fleet = uniform_fleet(n)
        fleet.soc[:n] = soc
        fleet.p_dis_max_kw[:n] = fleet.p_chg_max_kw[:n] = 10.0
        profile = DispatchProfile(hysteresis=hysteresis)
        out = run(backend, fleet, profile, 100.0)  # 10 of 40 nodes carry
        first = set(np.flatnonzero(out.setpoint_kw[:n] > 0))
        fleet.last_setpoint_kw[:n] = out.setpoint_kw[:n]
        fleet.soc[:n] = soc[::-1]  # the idle nodes now rank higher, by at most 0.02 SoC
        out = run(backend, fleet, profile, 100.0)
        return first, set(np.flatnonzero(out.setpoint_kw[:n] > 0))

    first, second = carrying_after_perturbation(0.05)
    assert first == second and len(first) == 10
    first, second = carrying_after_perturbation(0.0)
    assert first.isdisjoint(second)


def test_dispatcher_estop_latches_until_reset():
    """An emergency stop drives every node to 0 at once and holds until reset()."""
    from v2grt import Dispatcher

    fleet = uniform_fleet(10)
    d = Dispatcher(fleet, DispatchProfile(), service="fcr", capacity_kw=50.0)
    assert d.step(49.8, now_s=0.0).allocated_kw == pytest.approx(50.0)
    d.emergency_stop()
    for k in range(1, 4):
        r = d.step(49.8, now_s=k * 0.1)
        assert np.all(r.setpoints_kw == 0.0) and r.estop
    d.reset()
    assert d.step(49.8, now_s=0.5).allocated_kw == pytest.approx(50.0)


def test_dispatcher_estop_reset_forgets_the_ffr_latch():
    """After an e-stop is reset FFR answers the frequency then: no full response held over from before or
    during the stop, and a fresh latch (with its hold) if the trigger still holds."""
    from v2grt import Dispatcher

    d = Dispatcher(uniform_fleet(10), DispatchProfile(), service="ffr_49.7", capacity_kw=50.0)
    assert d.step(49.6, now_s=0.0).allocated_kw == pytest.approx(50.0)  # latched: 5 s hold from here
    d.emergency_stop()
    assert d.step(50.0, now_s=0.1).allocated_kw == 0.0
    d.reset()
    r = d.step(50.0, now_s=0.2)  # well inside the pre-stop hold
    assert r.service_fraction == 0.0 and r.allocated_kw == 0.0
    d.emergency_stop()
    d.step(49.6, now_s=0.3)  # a dip during the stop latches nothing for after it
    d.reset()
    assert d.step(50.0, now_s=0.4).service_fraction == 0.0
    d.emergency_stop()
    d.step(49.6, now_s=0.5)
    d.reset()
    assert d.step(49.6, now_s=0.6).allocated_kw == pytest.approx(50.0)  # the trigger still holds: latched again
    r = d.step(50.0, now_s=0.7)  # and held as usual
    assert r.service_fraction == 1.0 and r.allocated_kw == pytest.approx(50.0)


def test_dispatcher_rejects_implausible_frequency():
    """A NaN or mHz-scaled frequency is refused with a message naming the value and range."""
    from v2grt import Dispatcher

    d = Dispatcher(uniform_fleet(2), service="dc", capacity_kw=10.0)
    for bad in (math.nan, 0.0, 49800.0):
        with pytest.raises(ValueError, match="frequency_hz"):
            d.step(bad, now_s=0.0)


def test_unknown_policy_is_refused():
    """An unknown policy name is a ProfileError naming the key and the allowed values."""
    from v2grt import ProfileError

    with pytest.raises(ProfileError, match=r"policy='fastest'.*merit"):
        DispatchProfile(policy="fastest")


def test_profile_json_errors_name_file_and_key(tmp_path):
    """A discharge profile with a bad value or unknown key names the file, key, value and range."""
    from v2grt import ProfileError

    path = tmp_path / "discharge_profile.json"
    path.write_text('{"minimum_soc": 1.4}')
    with pytest.raises(ProfileError, match=r"discharge_profile.json: minimum_soc=1.4 outside 0.0..1.0"):
        DispatchProfile.from_json(path)
    path.write_text('{"minimum_SOC": 0.3}')
    with pytest.raises(ProfileError, match=r"unknown key.*minimum_SOC"):
        DispatchProfile.from_json(path)
    path.write_text('{"minimum_soc": 0.3,}')
    with pytest.raises(ProfileError, match="line 1"):
        DispatchProfile.from_json(path)


def test_reference_backend_is_chosen_only_when_asked(monkeypatch):
    """The default backend is the compiled one; the twin runs only when named or set in the environment."""
    from v2grt import Dispatcher

    assert Dispatcher(uniform_fleet(1), capacity_kw=1.0).backend == "cython"
    assert Dispatcher(uniform_fleet(1), capacity_kw=1.0, backend="reference").backend == "reference"
    monkeypatch.setenv("V2GRT_BACKEND", "reference")
    assert Dispatcher(uniform_fleet(1), capacity_kw=1.0).backend == "reference"


def test_import_without_compiled_core_fails_clearly(tmp_path):
    """Importing v2grt from a tree without the built extension says how to build it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import v2grt

    src = Path(v2grt.__file__).parent
    shutil.copytree(src, tmp_path / "v2grt", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # -S: no site-packages, so the editable install's finder cannot redirect to the built tree
    proc = subprocess.run([sys.executable, "-S", "-c", "import v2grt"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    assert "pip install -e ." in proc.stderr and "V2GRT_BACKEND=reference" in proc.stderr


def test_million_node_smoke():
    """A million-node fleet dispatches on both backends with the same totals."""
    fleet = Fleet.random(1_000_000, seed=3)
    profile = DispatchProfile()
    cy = run("cython", fleet, profile, 2e6)
    ref = run("reference", fleet, profile, 2e6)
    np.testing.assert_allclose(cy.totals, ref.totals, rtol=1e-9)
    assert cy.totals[T_TARGET] == pytest.approx(2e6)


@pytest.mark.parametrize("backend", ["cython", "reference"])
def test_fill_leaves_no_float_residue_setpoints(backend):
    """When a binding site uses up the target, the next node gets exactly 0, not the ~1e-16 kW that
    `target - (a + b - b)` leaves: a sliver would count as carrying and earn hysteresis next cycle."""
    fleet = fleet_from_arrays(
        n_sites=2, soc=[0.9, 0.5], p_dis_max_kw=[11.0, 3.7], capacity_kwh=[60.0, 60.0], site=[0, 1],
        site_export_kw=[5.0, 30.0],
    )
    profile = DispatchProfile(soc_taper=0.0, temp_derate_c=0.0)
    out = run(backend, fleet, profile, 5.0)
    assert out.setpoint_kw[:2].tolist() == [5.0, 0.0]
    assert out.totals[T_N_CARRYING] == 1


@SETTINGS
@given(case=fleets())
def test_compiled_builds_are_bit_identical(case):
    """The baseline and AVX2 builds of the kernel give the same bytes (no FMA contraction, the same
    summation order): which one a CPU picks never changes a setpoint."""
    if len(COMPILED) < 2:
        pytest.skip(f"only {COMPILED} runs on this CPU")
    fleet, profile, request, estop = case
    outs = [run(build, fleet, profile, request, estop=estop) for build in COMPILED]
    for other in outs[1:]:
        for name in ("setpoint_kw", "avail_dis_kw", "avail_chg_kw", "reason", "totals", "reason_counts"):
            assert getattr(other, name).tobytes() == getattr(outs[0], name).tobytes(), name


def test_kernel_isa_selection(monkeypatch):
    """The best build the CPU runs by default; $V2GRT_KERNEL_ISA pins one; a wrong or unusable
    choice is an error that names it."""
    from v2grt import kernel

    monkeypatch.delenv(kernel.ISA_ENV_VAR, raising=False)
    assert compiled().ISA == available_isas()[-1]
    assert get_backend("cython") is compiled()
    monkeypatch.setenv(kernel.ISA_ENV_VAR, "baseline")
    assert get_backend("cython").ISA == "baseline"
    monkeypatch.setenv(kernel.ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match=r"'sse9': expected one of \['baseline', 'avx2'\]"):
        compiled()
    monkeypatch.setenv(kernel.ISA_ENV_VAR, "avx2")
    monkeypatch.setattr(kernel, "cpu_supports", lambda isa: isa == "baseline")
    with pytest.raises(ValueError, match="'avx2' requested but this CPU lacks it"):
        compiled()
    monkeypatch.delenv(kernel.ISA_ENV_VAR)
    assert compiled().ISA == "baseline"  # an AVX2-less CPU runs the portable build


# ------------------------------------------------------------------ a pinned node (test discharge)
def _three_nodes(**site_limits):
    """Three healthy 11 kW nodes on one site, ranked 0 > 1 > 2 by SoC."""
    return fleet_from_arrays(n_sites=1, soc=[0.9, 0.7, 0.5], p_dis_max_kw=[11.0] * 3, p_chg_max_kw=[11.0] * 3,
                             capacity_kwh=[60.0] * 3, site=[0, 0, 0], **site_limits)


PLAIN = DispatchProfile(soc_taper=0.0, temp_derate_c=0.0)


def run_pinned(backend, fleet, request_kw, pin_row, pin_kw, profile=PLAIN):
    out = KernelOutput(fleet.capacity)
    work = Workspace(fleet.capacity, fleet.site_capacity)
    kernel_module(backend).dispatch(fleet, profile, request_kw, 0, 0.1, False, out, work, pin_row, pin_kw)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_pinned_node_counts_toward_the_target(backend):
    """A node held at 5 kW while the fleet discharges 20 kW: the others fill 15, the total is 20."""
    out = run_pinned(backend, _three_nodes(), 20.0, 2, 5.0)
    assert out.setpoint_kw[:3].tolist() == [11.0, 4.0, 5.0]
    assert out.totals[T_TARGET] == 20.0 and out.totals[T_N_CARRYING] == 3
    assert out.setpoint_kw[:3].sum() == pytest.approx(20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pin_is_limited_to_availability_and_widens_the_fleet(backend):
    """Asked for 50 kW, an 11 kW node gives 11; with it the fleet can give 33, not 22."""
    out = run_pinned(backend, _three_nodes(), 100.0, 0, 50.0)
    assert out.setpoint_kw[:3].tolist() == [11.0, 11.0, 11.0]
    assert out.totals[T_TARGET] == 33.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_pin_against_the_target_or_without_one_is_kept(backend):
    """No target: only the pinned node moves. A charging fleet: the others charge the whole target,
    the pinned node still discharges (the documented exception to one direction per cycle)."""
    out = run_pinned(backend, _three_nodes(), 0.0, 1, 5.0)
    assert out.setpoint_kw[:3].tolist() == [0.0, 5.0, 0.0]
    out = run_pinned(backend, _three_nodes(), -15.0, 1, 5.0)
    assert out.setpoint_kw[1] == 5.0
    assert out.setpoint_kw[[0, 2]].sum() == pytest.approx(-15.0) and np.all(out.setpoint_kw[[0, 2]] <= 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pin_takes_its_share_of_the_site_limit(backend):
    """A 12 kW export limit with one node pinned at 5: the others may add only 7."""
    out = run_pinned(backend, _three_nodes(site_export_kw=[12.0]), 30.0, 2, 5.0)
    assert out.setpoint_kw[2] == 5.0
    assert out.setpoint_kw[:3].sum() == pytest.approx(12.0)
    assert out.totals[T_TARGET] == pytest.approx(12.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pin_on_an_excluded_node_is_ignored(backend):
    """An offline node stays at 0 kW with its reason, pinned or not; a row out of range is no pin."""
    fleet = _three_nodes()
    fleet.online[1] = 0
    out = run_pinned(backend, fleet, 20.0, 1, 5.0)
    assert out.setpoint_kw[1] == 0.0 and out.reason[1] == Reason.OFFLINE
    assert out.setpoint_kw[:3].sum() == pytest.approx(20.0)
    out = run_pinned(backend, _three_nodes(), 20.0, 7, 5.0)
    assert out.setpoint_kw[:3].tolist() == [11.0, 9.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS + COMPILED)
@pytest.mark.parametrize("request_kw, pin_kw", [(20.0, 5.0), (-15.0, 5.0), (0.0, -4.0), (20.0, 0.0)])
def test_allocated_total_is_the_sum_of_the_setpoints_pin_included(backend, request_kw, pin_kw):
    """T_ALLOCATED is what was set, the pinned node included, on every path: the merit fill without a binding
    site (where the kernel takes it from its bucket sums, not from the setpoints) and no target at all."""
    from v2grt._buffers import T_ALLOCATED

    out = run_pinned(backend, _three_nodes(), request_kw, 2, pin_kw)
    assert out.totals[T_ALLOCATED] == pytest.approx(out.setpoint_kw[:3].sum(), rel=1e-12, abs=1e-12)
    assert out.setpoint_kw[2] == pin_kw


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("build", COMPILED)
@SETTINGS
@given(case=fleets(), pin_row=st.integers(-1, 40), pin_kw=st.floats(-30.0, 30.0))
def test_pinned_cython_equals_reference(build, threads, case, pin_row, pin_kw):
    """With a pinned node, on random and adversarial fleets, every compiled build (one thread or two) gives
    the twin's outputs."""
    fleet, profile, request, estop = case
    with_sites_contiguous(fleet, threads)
    n = fleet.n_rows
    ref, cy = (KernelOutput(fleet.capacity) for _ in range(2))
    for backend, out in (("reference", ref), (build, cy)):
        kernel_module(backend).dispatch(fleet, profile, request, 0, 0.1, estop, out,
                                        workspace(fleet, threads if backend == build else 1), pin_row, pin_kw)
    assert_equals_twin(cy, ref, n)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("build", COMPILED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fleets(max_n=600))
def test_cython_equals_reference_across_blocks(build, threads, case):
    """Fleets longer than a block (128 rows): block edges, partial last blocks and site runs that
    cross a block edge (and, on two threads, chunk edges) give the twin's outputs too."""
    fleet, profile, request, estop = case
    with_sites_contiguous(fleet, threads)
    n = fleet.n_rows
    ref = run("reference", fleet, profile, request, estop=estop)
    cy = run(build, fleet, profile, request, estop=estop, threads=threads)
    assert_equals_twin(cy, ref, n)


@pytest.mark.parametrize("policy", ["merit", "prorata"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliver_windows_are_no_capacity(backend, policy):
    """A thousand nodes parked a hair above the SoC floor (windows of ~1e-7 kW) add nothing to what
    the fleet promises: the target is what the one real node can give, and it is delivered."""
    n = 1001
    soc = np.full(n, 0.2 + 4e-9)
    soc[0] = 0.9
    fleet = fleet_from_arrays(soc=soc, p_dis_max_kw=np.full(n, 11.0), capacity_kwh=np.full(n, 60.0))
    out = run(backend, fleet, DispatchProfile(soc_taper=0.0, temp_derate_c=0.0, policy=policy), 20.0)
    assert out.totals[T_TARGET] == 11.0
    assert abs(out.setpoint_kw[:n].sum() - out.totals[T_TARGET]) <= 1e-9
    assert out.totals[T_N_CARRYING] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_reason_counts_at_the_edges(backend):
    """An empty fleet counts nothing; an e-stop counts every active row as EMERGENCY_STOP and free
    rows as EMPTY; rows with no valid site are INVALID_TELEMETRY."""
    out = run(backend, fleet_from_arrays(), PLAIN, 10.0)
    assert out.reason_counts.sum() == 0
    fleet = _three_nodes()
    fleet.active[2] = 0
    out = run(backend, fleet, PLAIN, 10.0, estop=True)
    assert out.reason_counts[Reason.EMERGENCY_STOP] == 2 and out.reason_counts[Reason.EMPTY] == 1
    fleet = _three_nodes()
    fleet.site[:3] = [0, -1, 5]
    out = run(backend, fleet, PLAIN, 10.0)
    assert out.reason_counts[Reason.INVALID_TELEMETRY] == 2 and out.reason_counts[Reason.OK] == 1


def test_workspace_refuses_a_bucket_count_the_kernel_cannot_hold():
    with pytest.raises(ValueError, match=r"buckets=0: expected 2\.\.65536"):
        Workspace(10, 1, buckets=0)
    with pytest.raises(ValueError, match="buckets=70000"):
        Workspace(10, 1, buckets=70000)


def test_compiled_builds_vectorise_the_block_arithmetic():
    """The kernel's speed rests on GCC vectorising pass 1's block arithmetic, and a harmless-looking
    edit (a select on a loop-invariant int, an integer select under a double mask) has turned it
    scalar without any other test noticing (1M nodes: 9 -> 15 ms). Packed-single arithmetic (the block
    computes in float32) in the built extension says whether it still is: 116 instructions in either
    build when vectorised, 0 when built with -fno-tree-vectorize. Likewise pass 2's fill, which GCC 12
    stopped vectorising when it inlined it (1M nodes: +1.5 ms)."""
    import re
    import shutil
    import subprocess

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    for isa in available_isas():
        path = compiled(isa).__file__
        asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
        packed = len(re.findall(r"\tv?(?:mul|div|min|max|add|sub)ps\s", asm))
        assert packed >= 40, (f"{path}: {packed} packed-single instructions: the block arithmetic is no "
                              "longer vectorised (CFLAGS=-fopt-info-vec-optimized pip install -e . -v shows why)")
        # Pass 2's merit fill widens float32 windows to float64 setpoints, eight (SSE2: four) at a time:
        # 8 (SSE2) or 12 (AVX2) packed conversions when it vectorises, 4 when GCC inlined it and did not.
        widened = len(re.findall(r"\tv?cvtps2pd\s", asm))
        assert widened >= 6, (f"{path}: {widened} packed float-to-double conversions: pass 2's fill is no "
                              "longer vectorised (setup.py KERNEL_FLAGS)")


def test_every_build_comes_from_the_kernel_source_in_this_tree():
    """Each compiled build carries the digest of the _kernel.pxi it was built from: all builds agree,
    and (in a source checkout) match the file, so an edit that was not rebuilt cannot be tested as if
    it ran."""
    import hashlib
    from pathlib import Path

    digests = {isa: compiled(isa).SOURCE_DIGEST for isa in available_isas()}
    assert len(set(digests.values())) == 1, digests
    source = Path(compiled("baseline").__file__).with_name("_kernel.pxi")
    if source.exists():
        assert digests["baseline"] == hashlib.sha256(source.read_bytes()).hexdigest()[:16], \
            "the compiled kernel is older than v2grt/_kernel.pxi: rebuild with `pip install -e .`"


def test_a_build_from_another_source_is_not_used(monkeypatch):
    """A leftover AVX2 module from another version is skipped, with a warning, not run."""
    from v2grt import kernel

    if "avx2" not in available_isas():
        pytest.skip("no AVX2 build on this CPU")
    monkeypatch.setattr(compiled("avx2"), "SOURCE_DIGEST", "0" * 16)
    assert available_isas() == ["baseline"]
    assert compiled().ISA == "baseline"
    monkeypatch.setenv(kernel.ISA_ENV_VAR, "avx2")
    with pytest.raises(ValueError, match="'avx2' requested but that build is missing, broken or from another source"):
        compiled()
