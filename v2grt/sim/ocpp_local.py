"""Simulated stations' LocalFrequency: each EVSE delivers v2xBaseline + v2xFreqWattCurve(f) on its own.

A real station measures the grid frequency at its own terminals. The simulated ones read the frequency
the simulated grid meter shows (``v2grt sim ocpp-stations --frequency-from HOST:PORT``, the SunSpec meter
the aggregator reads too): ONE poller per simulator process, every ``--frequency-poll-ms`` (20 ms), whose
samples every station of the process shares. A sample that changed the frequency re-evaluates each EVSE
in LocalFrequency at once, and a changed power goes through :meth:`SimStations.command`: the station's
usual command latency, then its ramp, exactly as a setpoint from the gateway would (so the e2e bench
compares like with like). The failsafe is unchanged: offline longer than the profile's
``maxOfflineDuration``, the EV falls back to 0 kW (SimStations' physics).

Without ``--frequency-from`` a station has no frequency to answer and rejects LocalFrequency profiles
(the gateway then falls back to CentralSetpoint for it); kind ``no_lf`` rejects them whatever it has.
The curve, baseline and signs are evaluated by ``ocpp_mapping.local_frequency_kw``, the function the
gateway's tests check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from v2grt.gateway import ocpp_mapping as om

#: Powers closer than this (kW) to what the EVSE was last told are not re-commanded.
CHANGE_KW = 1e-3


@dataclass
class LocalProfile:
    """What one EVSE in LocalFrequency holds (OCPP signs: W, negative = discharging)."""

    baseline_w: float
    curve: list[dict]  # [{"frequency": Hz, "power": W}]
    limits: om.EvLimits


def parse_local_period(charging_profile: dict) -> LocalProfile | None:
    """The LocalProfile of a schema-valid TxProfile (snake_case keys, as ``ocpp`` routes it), or None if the
    period is not a LocalFrequency one a station can follow (no curve, or a unit other than W)."""
    schedule = charging_profile["charging_schedule"][0]
    period = schedule["charging_schedule_period"][0]
    curve = period.get("v2x_freq_watt_curve")
    if period.get("operation_mode") != om.LOCAL_FREQUENCY or not curve or schedule["charging_rate_unit"] != "W":
        return None
    limit, dis = period.get("limit"), period.get("discharge_limit")
    # magnitudes through the one converter (W -> kW; the sign does not matter for a limit)
    limits = om.EvLimits(p_chg_max_kw=None if limit is None else abs(om.setpoint_to_kw(limit)),
                         p_dis_max_kw=None if dis is None else abs(om.setpoint_to_kw(dis)))
    return LocalProfile(float(period.get("v2x_baseline", 0.0)), [dict(p) for p in curve], limits)


class _NotifyingLatest:
    """A modbus.Latest that also calls ``on_sample`` (from the poller's thread) on every sample."""

    def __init__(self, inner, on_sample):
        self._inner, self._on_sample = inner, on_sample

    def publish(self, value, t_mono_ns: int) -> None:
        self._inner.publish(value, t_mono_ns)
        self._on_sample()

    def read(self):
        return self._inner.read()

    def age_s(self, now_ns: int | None = None) -> float:
        return self._inner.age_s(now_ns)


class FrequencyFeed:
    """The simulated meter's frequency, polled on a thread of its own (v2grt.io.modbus.MeterReader)."""

    def __init__(self, host: str, port: int, *, interval_s: float = 0.02):
        from v2grt.io.modbus import InputThread, MeterReader

        self.reader = MeterReader(host, port, interval_s=interval_s, timeout_s=max(0.1, 2 * interval_s))
        self.listeners: list = []
        self.reader.latest = _NotifyingLatest(self.reader.latest, self._notify)
        self.thread = InputThread([self.reader], name="sim-frequency")

    def _notify(self) -> None:
        for fn in self.listeners:
            fn()

    def f_hz(self) -> float | None:
        sample, _t = self.reader.latest.read()
        return None if sample is None else float(sample.f_hz)

    def start(self) -> FrequencyFeed:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.thread.stop()


class LocalResponse:
    """The EVSEs of one SimStations in LocalFrequency, re-evaluated on every new frequency sample."""

    def __init__(self, sim, feed: FrequencyFeed | None):
        self.sim = sim
        self.feed = feed
        self.profiles: dict[int, LocalProfile] = {}  # row -> its LocalFrequency profile
        self.told_kw: dict[int, float] = {}
        self.f_hz: float | None = None
        self.responses = 0  # commands the stations gave themselves
        if feed is not None:
            feed.listeners.append(self._sample)

    def install(self, kind: str, row: int, charging_profile: dict) -> str:
        """SetChargingProfile with a LocalFrequency period for EVSE ``row``: the station's status."""
        profile = parse_local_period(charging_profile)
        if profile is None or self.feed is None or kind in ("no_lf", "rejects"):
            return "Rejected"
        self.profiles[row] = profile
        self.told_kw.pop(row, None)
        f = self.feed.f_hz()
        # Before the first sample there is no frequency to answer: the baseline alone (the curve's 0).
        kw = (om.local_frequency_kw(profile.baseline_w, profile.curve, f, profile.limits) if f is not None
              else profile.limits.clamp(om.setpoint_to_kw(profile.baseline_w, "W")))
        self.told_kw[row] = kw
        self.sim.command(row, kw, max_offline_s=charging_profile.get("max_offline_duration"))
        return "Accepted"

    def clear(self, row: int) -> None:
        """The EVSE got a profile of another mode: it follows setpoints again."""
        self.profiles.pop(row, None)
        self.told_kw.pop(row, None)

    def _sample(self) -> None:  # the poller's thread: hand over to the stations' loop
        loop = self.sim.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._respond)
            except RuntimeError:
                pass

    def _respond(self) -> None:
        f = self.feed.f_hz()
        if f is None or f == self.f_hz or not math.isfinite(f):
            return
        self.f_hz = f
        for row, profile in self.profiles.items():
            kw = om.local_frequency_kw(profile.baseline_w, profile.curve, f, profile.limits)
            if abs(kw - self.told_kw.get(row, math.inf)) > CHANGE_KW:
                self.told_kw[row] = kw
                self.responses += 1
                self.sim.command(row, kw)


def attach(sim, frequency_from: str | None, *, poll_ms: float = 20.0) -> LocalResponse:
    """Give ``sim`` (SimStations) its LocalResponse, with a FrequencyFeed from ``HOST:PORT`` if given (started)."""
    feed = None
    if frequency_from:
        host, _, port = frequency_from.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--frequency-from {frequency_from!r}: expected HOST:PORT of a SunSpec meter")
        feed = FrequencyFeed(host, int(port), interval_s=poll_ms / 1000.0).start()
    sim.local = LocalResponse(sim, feed)
    return sim.local


def wait_for_frequency(feed: FrequencyFeed, timeout_s: float = 5.0) -> bool:
    """True once the feed has a sample (tests and the CLI's start line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if feed.f_hz() is not None:
            return True
        time.sleep(0.01)
    return False


__all__ = ["CHANGE_KW", "FrequencyFeed", "LocalProfile", "LocalResponse", "attach", "parse_local_period",
           "wait_for_frequency"]
