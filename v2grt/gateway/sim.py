"""The simulated gateway's vehicles: v2grt.sim.battery models stepped in real time behind one gateway.

Each wake of the gateway loop steps the battery, thermal and plug models by the time since the
previous wake, at the power now commanded (so the power reported is what the vehicles deliver
now; the energy of one interval, at most one control period, is booked at the new power instead of
the old). Vehicles unplug and come back (``SimFleetState.churn``); a few have firmware that rejects
discharge (they report ``NODE_UNREACHABLE`` once asked to discharge), a few have worn packs and a
few are hot, as ``SimFleetState.from_fleet`` sets them up from the seed.

Optionally each step's measured output per site, and the sum of the setpoints applied, are pushed
to a simulation-only endpoint (``site_power``, v2grt.sim.site_power): the demo uses it as the
"physics" behind its simulated site inverters, whose measured ``W`` is the sum of their vehicles'
output, and to time setpoint publish to applied. That link is not part of the wire protocol.
Powers are kW, positive = discharge into the grid.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import zmq

from v2grt.codes import Reason
from v2grt.events import EventLog
from v2grt.fleet import COLUMNS, Fleet
from v2grt.sim import site_power
from v2grt.sim.battery import SimFleetState

log = logging.getLogger("v2grt.gateway")

#: Columns of the state file written at shutdown (one row per vehicle).
STATE_COLUMNS = ("node_id", "gateway_id", "site_id", "online", "soc", "soh", "temp_c", "cycle_count", "p_kw",
                 "fault", "firmware_rejects_discharge")


def gateway_fleet(fleet: Fleet, gateway_id: str) -> Fleet:
    """The vehicles of one gateway as a fleet of their own (rows in roster order); GatewayError if none."""
    from v2grt.gateway.core import GatewayError

    rows = fleet.gateway_rows(gateway_id)
    if not len(rows):
        known = ", ".join(g for g in fleet.gateway_ids if len(fleet.gateway_rows(g))) or "none"
        raise GatewayError(f"gateway {gateway_id!r} has no vehicles in the roster (gateways there: {known})")
    sub = Fleet(capacity=len(rows), site_capacity=max(1, fleet.n_sites))
    for r in rows.tolist():
        sub.add(fleet.node_ids[r], gateway_id, fleet.site_ids[fleet.site[r]],
                **{c.name: getattr(fleet, c.name)[r].item() for c in COLUMNS})
    return sub


class SimVehicles:
    """A gateway's simulated vehicles (the :class:`~v2grt.gateway.core.Vehicles` of ``v2grt gateway sim``).

    ``fleet`` holds exactly this gateway's vehicles (see :func:`gateway_fleet`); vehicle ``i`` is row
    ``i``. ``site_power``: a ZeroMQ endpoint to push per-site output to after every step, or None.
    """

    def __init__(self, fleet: Fleet, *, gateway_id: str, seed: int = 0, unreachable_fraction: float = 0.01,
                 low_soh_fraction: float = 0.002, hot_fraction: float = 0.002, unplug_rate_per_h: float | None = None,
                 plug_rate_per_h: float | None = None, events: EventLog | None = None,
                 ctx: zmq.Context | None = None, site_power: str | None = None):
        rates = {k: v for k, v in (("unplug_rate_per_h", unplug_rate_per_h), ("plug_rate_per_h", plug_rate_per_h))
                 if v is not None}
        self.state = SimFleetState.from_fleet(fleet, seed, unreachable_fraction=unreachable_fraction,
                                              low_soh_fraction=low_soh_fraction, hot_fraction=hot_fraction, **rates)
        n = fleet.n_rows
        self.gateway_id = gateway_id
        self.node_ids: list[str] = list(fleet.node_ids[:n])
        self.site_ids: list[str] = list(fleet.site_ids)
        self.site = np.array(fleet.site[:n], dtype=np.int64)
        self.events = events or EventLog()
        self.rng = np.random.default_rng([seed, 1])  # churn: its own stream, apart from from_fleet's
        self.plug_events = 0
        self._t_ns: int | None = None
        self._announced_reject = np.zeros(n, dtype=bool)
        self._announced_hot = np.zeros(n, dtype=bool)
        self._site_sock: zmq.Socket | None = None
        if site_power is not None:
            if ctx is None:
                raise ValueError("site_power needs a zmq context")
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 16)
            sock.connect(site_power)
            self._site_sock = sock

    # ------------------------------------------------------------------------------ Vehicles
    def apply(self, p_kw: np.ndarray, now_ns: int) -> None:
        """Step the models from the previous call to now at ``p_kw`` (kW, + discharge), then churn plugs."""
        dt_s = 1e-3 if self._t_ns is None else max((now_ns - self._t_ns) / 1e9, 1e-6)
        self._t_ns = now_ns
        delivered = self.state.step(p_kw, dt_s)
        self._announce_rejections()
        changed = self.state.churn(dt_s, self.rng)
        if changed.size:
            self.plug_events += int(changed.size)
            for i in changed.tolist():
                plugged = bool(self.state.online[i])
                self.events.emit("VEHICLE_PLUGGED_IN" if plugged else "VEHICLE_UNPLUGGED", logging.INFO,
                                 key=self.node_ids[i], node=self.node_ids[i], gateway=self.gateway_id,
                                 soc=float(self.state.soc[i]))
            delivered[changed] = self.state.p_kw[changed]  # 0 for the ones that just left
            self._announced_reject[changed] = False
        if self._site_sock is not None:
            self._send_site_power(delivered, p_kw)

    def telemetry(self, now_ns: int) -> dict[str, np.ndarray]:
        """What the vehicles report now (SimFleetState.telemetry); thermal limits are logged as they trip."""
        values = self.state.telemetry()
        hot = values["fault"] == Reason.THERMAL_LIMIT
        for i in np.flatnonzero(hot & ~self._announced_hot).tolist():
            self.events.emit("THERMAL_LIMIT", logging.WARNING, key=self.node_ids[i], node=self.node_ids[i],
                             gateway=self.gateway_id, temp_c=float(self.state.temp_c[i]),
                             msg=f"Thermal limit reached on Node {self.node_ids[i]}")
        self._announced_hot[:] = hot
        return values

    # ------------------------------------------------------------------------------ helpers
    def _announce_rejections(self) -> None:
        new = self.state.discharge_rejected & ~self._announced_reject
        if new.any():
            for i in np.flatnonzero(new).tolist():
                self.events.emit("NODE_UNREACHABLE", logging.WARNING, key=self.node_ids[i], node=self.node_ids[i],
                                 gateway=self.gateway_id, msg="charger firmware rejects discharge")
            self._announced_reject |= new

    def _send_site_power(self, delivered: np.ndarray, p_set_kw: np.ndarray) -> None:
        frame = site_power.encode(self.gateway_id, site_power.per_site_kw(self.site, self.site_ids, delivered),
                                  p_set_kw=float(p_set_kw.sum()))
        try:
            self._site_sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # nobody listening (yet): the next step sends a fresh value

    def write_state(self, path: str | Path) -> None:
        """Write every vehicle's state now as CSV (STATE_COLUMNS), e.g. at shutdown for the demo's report."""
        s = self.state
        fault = self.state.telemetry()["fault"]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(STATE_COLUMNS)
            for i, nid in enumerate(self.node_ids):
                w.writerow([nid, self.gateway_id, self.site_ids[self.site[i]], int(s.online[i]),
                            f"{s.soc[i]:.6f}", f"{s.soh[i]:.6f}", f"{s.temp_c[i]:.3f}", f"{s.cycle_count[i]:.4f}",
                            f"{s.p_kw[i]:.4f}", Reason(int(fault[i])).name, int(s.firmware_rejects_discharge[i])])

    def close(self) -> None:
        if self._site_sock is not None:
            self._site_sock.close(0)
            self._site_sock = None


__all__ = ["STATE_COLUMNS", "SimVehicles", "gateway_fleet"]
