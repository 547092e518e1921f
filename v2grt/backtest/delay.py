"""The gateway/charger delay model of the backtest: a setpoint takes effect after a dead time, then ramps (pure).

A setpoint the dispatcher sends at ``t`` reaches the charger's power stage at ``t + delay_s`` (the
publish, the gateway's hop and the charger's own control loop); from then the charger's output moves
towards it at ``rate_kw_per_s`` (its ramp limit), in a straight line, and holds it. A newer setpoint
replaces an older one the moment it takes effect, whatever the ramp reached.

Within one backtest step ``[t, t + period_s)`` at most one setpoint takes effect (at ``t + delay_s
mod period_s``, the setpoint sent ``floor(delay_s / period_s)`` steps back), so the output over the
step is two straight-line phases, each integrated exactly here. The battery model then takes the
step's mean power (its energy is exact) and the telemetry reports the output at the step's end.
"""

from __future__ import annotations

import math

import numpy as np


def ramp_phase(p_kw: np.ndarray, target_kw: np.ndarray, rate_kw_per_s: np.ndarray | float, length_s: float,
               energy_out: np.ndarray, tmp: np.ndarray) -> None:
    """Move ``p_kw`` towards ``target_kw`` at ``rate_kw_per_s`` for ``length_s`` s, in place; add the phase's
    energy ``integral p dt`` (kW s) to ``energy_out``. ``tmp``: a work array of the same shape.

    Equals, per element: ``tau = |d| / r`` (``d = target - p``); ``u = min(length, tau)``;
    ``energy += p * length + sign(d) * (r u**2 / 2 + |d| max(0, length - tau))``; ``p += sign(d) min(|d|, r length)``.
    An infinite rate steps at once.
    """
    if length_s <= 0.0:
        return
    np.multiply(p_kw, length_s, out=tmp)
    energy_out += tmp
    np.subtract(target_kw, p_kw, out=tmp)  # d
    if np.isscalar(rate_kw_per_s) and math.isinf(rate_kw_per_s):
        tmp *= length_s
        energy_out += tmp
        np.copyto(p_kw, target_kw)
        return
    r = rate_kw_per_s
    d = tmp
    step = np.minimum(np.abs(d), np.multiply(r, length_s))  # |movement| within the phase
    # energy above p: ramp part (step**2 / 2r) plus the held part (|d| reached early: step == |d|)
    with np.errstate(divide="ignore", invalid="ignore"):
        ramp_e = np.where(step > 0.0, step * step / (2.0 * np.asarray(r, dtype=np.float64)), 0.0)
        held_e = np.where(step >= np.abs(d), np.abs(d) * np.maximum(length_s - np.abs(d) / r, 0.0), 0.0)
    sign = np.sign(d)
    energy_out += sign * (ramp_e + held_e)
    p_kw += sign * step


class DelayModel:
    """Each vehicle's charger output under a dead time and a ramp; ``advance`` steps one backtest period.

    Parameters
    ----------
    n : int
        Vehicles.
    period_s : float
        Backtest step, s.
    delay_s : float
        Setpoint to charger dead time, s (>= 0).
    rate_kw_per_s : ndarray (n,) or float
        Ramp limit of each charger's output, kW/s (inf: steps at once).
    """

    def __init__(self, n: int, period_s: float, delay_s: float, rate_kw_per_s):
        if not (delay_s >= 0.0 and math.isfinite(delay_s)):
            raise ValueError(f"delay_s={delay_s!r}: expected a finite number of seconds >= 0")
        if not (period_s > 0.0 and math.isfinite(period_s)):
            raise ValueError(f"period_s={period_s!r}: expected a finite number of seconds > 0")
        self.n = n
        self.period_s = period_s
        self.delay_s = delay_s
        self.rate = rate_kw_per_s
        self.lag_steps = int(math.floor(delay_s / period_s + 1e-9))
        self.switch_s = delay_s - self.lag_steps * period_s
        if self.switch_s < 1e-9:
            self.switch_s = 0.0
        self.p_kw = np.zeros(n)  # output now, kW, + discharge
        # the setpoints sent over the last lag_steps + 1 steps (index k % len): [k] sent this step
        self._sent = np.zeros((self.lag_steps + 2, n))
        self._k = 0
        self._mean = np.zeros(n)

    def advance(self, setpoint_kw: np.ndarray) -> np.ndarray:
        """Send ``setpoint_kw`` now and run one period: returns the mean output over it (kW, a work array,
        valid until the next call); ``p_kw`` is then the output at its end."""
        m = len(self._sent)
        np.copyto(self._sent[self._k % m], setpoint_kw)
        before = self._sent[(self._k - self.lag_steps - 1) % m]  # in force until the switch
        after = self._sent[(self._k - self.lag_steps) % m]  # takes effect at switch_s into the step
        if self._k - self.lag_steps - 1 < 0:
            before = self._zero_row()
        if self._k - self.lag_steps < 0:
            after = self._zero_row()
        # only the chargers whose output is not already where both setpoints want it move this step (in a
        # merit order most vehicles sit at 0 kW): the rest hold, their mean output is their output
        p = self.p_kw
        moving = np.flatnonzero((before != p) | (after != p))
        mean = self._mean
        np.copyto(mean, p)
        if len(moving):
            pm, e, tmp = p[moving], np.zeros(len(moving)), np.empty(len(moving))
            rate = self.rate if np.isscalar(self.rate) else self.rate[moving]
            ramp_phase(pm, before[moving], rate, self.switch_s, e, tmp)
            ramp_phase(pm, after[moving], rate, self.period_s - self.switch_s, e, tmp)
            p[moving] = pm
            mean[moving] = e * (1.0 / self.period_s)
        self._k += 1
        return mean

    def _zero_row(self) -> np.ndarray:
        z = getattr(self, "_zeros", None)
        if z is None:
            z = self._zeros = np.zeros(self.n)
        return z

    def settle(self, setpoint_kw: np.ndarray) -> None:
        """Start in steady state: every charger already at ``setpoint_kw`` and sent it (the fleet followed
        the service before the window began), so the first step does not ramp from 0 kW."""
        np.copyto(self.p_kw, setpoint_kw)
        self._sent[:] = setpoint_kw
        self._k = self.lag_steps + 1

    def forget(self, rows: np.ndarray) -> None:
        """Vehicles that unplugged or arrived: output 0 and nothing pending for them."""
        self.p_kw[rows] = 0.0
        self._sent[:, rows] = 0.0


__all__ = ["DelayModel", "ramp_phase"]
