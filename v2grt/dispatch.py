"""The Dispatcher: a fleet, a profile and a grid service in; one setpoint per vehicle out, each step."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from v2grt._buffers import (
    T_ALLOCATED,
    T_AVAIL_CHG,
    T_AVAIL_DIS,
    T_FEASIBLE_CHG,
    T_FEASIBLE_DIS,
    T_N_CARRYING,
    T_REQUEST,
    T_TARGET,
    KernelOutput,
    Workspace,
)
from v2grt.codes import reason_names
from v2grt.fleet import Fleet
from v2grt.kernel import get_backend
from v2grt.profile import DispatchProfile, ProfileError
from v2grt.services import ServiceCurve, get_service

#: Frequencies outside this band are not grid frequency but a broken meter or a unit error (mHz, 60/50).
F_PLAUSIBLE_HZ = (40.0, 70.0)


@dataclasses.dataclass
class DispatchResult:
    """One cycle's outcome. Arrays are views of the dispatcher's buffers: valid until the next step()
    (call copy() to keep them). Power in kW, + discharge into the grid."""

    setpoints_kw: np.ndarray  # float64 (n_rows,), aligned with fleet rows
    available_dis_kw: np.ndarray  # float32 (n_rows,), >= 0
    available_chg_kw: np.ndarray  # float32 (n_rows,), >= 0 (magnitude)
    reasons: np.ndarray  # uint8 (n_rows,), v2grt.codes.Reason
    nodes_per_reason: np.ndarray  # int64 (256,): rows per reason code, counted by the kernel
    frequency_hz: float
    service_fraction: float  # -1..1 of the contracted capacity, + discharge
    request_kw: float
    target_kw: float
    allocated_kw: float
    feasible_dis_kw: float
    feasible_chg_kw: float
    total_available_dis_kw: float
    total_available_chg_kw: float
    n_carrying: int
    estop: bool

    def copy(self) -> DispatchResult:
        return dataclasses.replace(
            self,
            setpoints_kw=self.setpoints_kw.copy(),
            available_dis_kw=self.available_dis_kw.copy(),
            available_chg_kw=self.available_chg_kw.copy(),
            reasons=self.reasons.copy(),
            nodes_per_reason=self.nodes_per_reason.copy(),
        )

    def reason_counts(self) -> dict[str, int]:
        """Nodes by reason name (free rows left out), e.g. {"OK": 9500, "SOC_BELOW_MINIMUM": 310}."""
        codes = np.flatnonzero(self.nodes_per_reason)
        return {name: int(self.nodes_per_reason[code]) for code, name in zip(codes, reason_names(codes))
                if name != "EMPTY"}

    def summary(self) -> dict:
        """The fleet summary an operator reads: target, allocated, availability, exclusions."""
        return {
            "frequency_hz": self.frequency_hz,
            "service_fraction": self.service_fraction,
            "request_kw": self.request_kw,
            "target_kw": self.target_kw,
            "allocated_kw": self.allocated_kw,
            "feasible_dis_kw": self.feasible_dis_kw,
            "feasible_chg_kw": self.feasible_chg_kw,
            "available_dis_kw": self.total_available_dis_kw,
            "available_chg_kw": self.total_available_chg_kw,
            "nodes_carrying": self.n_carrying,
            "nodes_by_reason": self.reason_counts(),
            "estop": self.estop,
        }


class Dispatcher:
    """Dispatch a fleet every step: service response to frequency, limits, ranking, allocation.

    Parameters
    ----------
    fleet : Fleet
    profile : DispatchProfile or dict, optional
        Battery limits and policy. A dict may also carry ``service``, ``capacity_kw`` and
        ``nominal_hz`` (the keys a discharge profile and a service contract share in config).
    service : str or ServiceCurve
        A built-in service name (see v2grt.services) or a curve. Default GB Dynamic Containment.
    capacity_kw : float, optional
        Contracted capacity: the response at fraction 1. Default: what the fleet can deliver both
        ways now (see deliverable_kw), so a full response is feasible.
    backend : "cython" or "reference", optional
        Default $V2GRT_BACKEND or "cython"; the compiled kernel must be built.
    period_s : float
        Nominal cycle period, used as dt for ramp limits on the first step.
    kernel_threads : 1 or 2
        kernel.threads: 2 runs the compiled kernel's big passes on the calling thread and one worker thread
        where that is safe and pays (Workspace.kernel_mode() says what the last run did).
    """

    def __init__(self, fleet: Fleet, profile: DispatchProfile | dict | None = None, *,
                 service: str | ServiceCurve = "dc", capacity_kw: float | None = None,
                 nominal_hz: float | None = None, backend: str | None = None, period_s: float = 0.1,
                 kernel_threads: int = 1):
        if isinstance(profile, dict):
            profile = dict(profile)
            service = profile.pop("service", service)
            capacity_kw = profile.pop("capacity_kw", capacity_kw)
            nominal_hz = profile.pop("nominal_hz", nominal_hz)
            profile = DispatchProfile.from_dict(profile)
        self.fleet = fleet
        self.profile = profile or DispatchProfile()
        self.service = service if isinstance(service, ServiceCurve) else get_service(service, nominal_hz)
        self._responder = self.service.responder()
        self.kernel = get_backend(backend)
        self.backend = self.kernel.BACKEND
        self.kernel_isa = getattr(self.kernel, "ISA", None)  # which compiled build: "baseline" or "avx2"
        self.period_s = period_s
        if kernel_threads not in (1, 2):
            raise ValueError(f"kernel_threads={kernel_threads!r}: expected 1 or 2")
        self.kernel_threads = kernel_threads
        self._estop = False
        self._last_ns: int | None = None
        self._out: KernelOutput | None = None
        self._work: Workspace | None = None
        #: kernel runs into the output buffers so far, counted before each run writes them: a reader of a
        #: result's arrays on another thread (the publisher thread) compares it after reading (v2grt.publisher)
        self.runs = 0
        self._ensure_buffers()
        if capacity_kw is None:
            capacity_kw = self.deliverable_kw()
        if not (capacity_kw >= 0.0 and math.isfinite(capacity_kw)):
            raise ProfileError(f"capacity_kw={capacity_kw!r}: the contracted capacity must be a finite number >= 0 kW")
        self.capacity_kw = float(capacity_kw)

    # ------------------------------------------------------------ e-stop
    @property
    def estop(self) -> bool:
        return self._estop

    def emergency_stop(self) -> None:
        """Latch the emergency stop: every node to 0 kW from the next step until reset().

        A stopped cycle also makes the service forget its latch (FFR's hold and release, see
        run_kernel), so a reset never brings back an activation from before or during the stop.
        """
        self._estop = True

    def reset(self) -> None:
        """Release a latched emergency stop: the next step answers from the frequency then, latching
        afresh if the service's trigger still holds."""
        self._estop = False

    def set_profile(self, profile: DispatchProfile) -> None:
        """Swap the profile between steps (a reload); validated already by construction."""
        self.profile = profile

    # ------------------------------------------------------------ stepping
    def _ensure_buffers(self) -> None:
        f = self.fleet
        if self._out is None or self._out.capacity != f.capacity:
            self._out = KernelOutput(f.capacity)
        if self._work is None or not self._work.fits(f.capacity, f.site_capacity):
            self._work = Workspace(f.capacity, f.site_capacity)
            self._work.threads = self.kernel_threads

    def kernel_mode(self) -> dict:
        """How the last kernel run went: {"threads", "chunks", "worker_chunks", "why"} (v2grt._buffers)."""
        return self._work.kernel_mode()

    def prepare(self) -> None:
        """Allocate the kernel's buffers for the fleet as it is and touch every page, so the first
        cycle does not (at 100,000 vehicles that first call took ~100 ms instead of ~1 ms)."""
        self._ensure_buffers()
        for buffers in (self._out, self._work):
            for arr in vars(buffers).values():
                if isinstance(arr, np.ndarray):
                    arr.fill(0)

    def deliverable_kw(self) -> float:
        """What the fleet can hold both ways: min(feasible discharge, feasible charge), kW, ramps aside.

        The default contracted capacity, so that a full response is deliverable in either direction.
        A dry run of the kernel (the fleet is not changed), judged at the newest telemetry time and
        with ramp limits lifted (dt = inf): capacity is about steady state, not the first cycle.
        """
        n = self.fleet.n_rows
        now_ns = int(self.fleet.last_telemetry_ns[:n].max()) if n else 0
        self.runs += 1
        self.kernel.dispatch(self.fleet, self.profile, 0.0, now_ns, math.inf, False, self._out, self._work)
        t = self._out.totals
        return float(min(t[T_FEASIBLE_DIS], t[T_FEASIBLE_CHG]))

    def service_fraction(self, frequency_hz: float, now_s: float) -> float:
        """The service's response (-1..1, + discharge) to a frequency at a time (stateful for FFR)."""
        return self._responder.step(frequency_hz, now_s)

    def step(self, frequency_hz: float, now_s: float | None = None, base_kw: float = 0.0, *,
             now_ns: int | None = None, request_kw: float | None = None) -> DispatchResult:
        """Run one cycle.

        Parameters
        ----------
        frequency_hz : float
            Grid frequency now.
        now_s, now_ns : optional
            CLOCK_MONOTONIC time of the cycle (seconds or ns); default: now. Compared with the
            fleet's last_telemetry_ns for staleness.
        base_kw : float
            Base schedule (peak shaving, market position), + discharge; the service response adds to it.
        request_kw : float, optional
            Skip the service curve and ask for this many kW (frequency is then only reported).
        """
        if now_ns is None:
            now_ns = time.monotonic_ns() if now_s is None else int(round(now_s * 1e9))
        if not (F_PLAUSIBLE_HZ[0] <= frequency_hz <= F_PLAUSIBLE_HZ[1]):
            raise ValueError(f"frequency_hz={frequency_hz!r}: not a grid frequency (expected "
                             f"{F_PLAUSIBLE_HZ[0]}..{F_PLAUSIBLE_HZ[1]} Hz)")
        if not math.isfinite(base_kw):
            raise ValueError(f"base_kw={base_kw!r}: expected a finite number of kW (+ discharge)")
        dt_s = self.period_s if self._last_ns is None else max((now_ns - self._last_ns) / 1e9, 0.0)
        self._last_ns = now_ns
        fraction = self.service_fraction(frequency_hz, now_ns / 1e9)
        if request_kw is None:
            request_kw = base_kw + fraction * self.capacity_kw
        return self.run_kernel(request_kw, now_ns, dt_s, frequency_hz=frequency_hz, fraction=fraction)

    def run_kernel(self, request_kw: float, now_ns: int, dt_s: float, *, frequency_hz: float = math.nan,
                   fraction: float = math.nan, pin: tuple[int, float] | None = None) -> DispatchResult:
        """The kernel with a ready request (the control loop's entry point): setpoints for this cycle,
        and the fleet's last_setpoint_kw updated to them. ``pin=(row, kw)`` holds one node at kw (limited
        to its availability) outside the ranking, the others filling the rest of the target."""
        self._ensure_buffers()
        fleet, out = self.fleet, self._out
        pin_row, pin_kw = (-1, 0.0) if pin is None else (int(pin[0]), float(pin[1]))
        estop = self._estop  # read once: the kernel, the result and the latch below agree on it
        self.runs += 1
        self.kernel.dispatch(fleet, self.profile, float(request_kw), int(now_ns), float(dt_s), estop,
                             out, self._work, pin_row, pin_kw)
        if estop:
            # An operator resetting an e-stop expects the fleet to answer the frequency as it is then, not
            # to jump back to a full FFR response latched before (or during) the stop. Forgetting the latch
            # after every stopped cycle, here on the control thread, does that however the reset (sent from
            # the bus thread) falls between service_fraction and this call: the first cycle run without the
            # stop steps a responder with no latch, and latches again if the trigger still holds.
            self._responder.reset()
        n = fleet.n_rows
        store = getattr(self.kernel, "store_setpoints", None)
        if store is not None:  # the compiled kernel: on its two threads when it ran two
            store(out, fleet.last_setpoint_kw, n, self._work)
        else:
            np.copyto(fleet.last_setpoint_kw[:n], out.setpoint_kw[:n])
        t = out.totals
        return DispatchResult(
            setpoints_kw=out.setpoint_kw[:n],
            available_dis_kw=out.avail_dis_kw[:n],
            available_chg_kw=out.avail_chg_kw[:n],
            reasons=out.reason[:n],
            nodes_per_reason=out.reason_counts,
            frequency_hz=frequency_hz,
            service_fraction=fraction,
            request_kw=float(t[T_REQUEST]),
            target_kw=float(t[T_TARGET]),
            allocated_kw=float(t[T_ALLOCATED]),
            feasible_dis_kw=float(t[T_FEASIBLE_DIS]),
            feasible_chg_kw=float(t[T_FEASIBLE_CHG]),
            total_available_dis_kw=float(t[T_AVAIL_DIS]),
            total_available_chg_kw=float(t[T_AVAIL_CHG]),
            n_carrying=int(t[T_N_CARRYING]),
            estop=estop,
        )
