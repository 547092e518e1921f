"""The simulation-only site-power link: simulated devices tell the demo what they deliver and apply.

Simulated vehicles and chargers push, to a ZeroMQ PULL the demo binds, each site's measured output
(the "physics" behind the demo's simulated site inverters, whose 701 ``W`` is the sum of their
vehicles' output) and what they were commanded, so the demo can time setpoint publish to applied.
It stands in for electricity and for a test rig's probes: it is not part of the wire protocol
(docs/wire.md) and no real gateway sends it. Frames are msgpack maps:

``{"v": 1, "gw": gateway id, "t_ns": UTC ns, "sites": {site id: kW, ...}}`` plus, optionally,

- ``"p_set_kw"``: the sum of the setpoints the gateway's vehicles run at now (``v2grt gateway sim``,
  which applies a whole setpoint message at once);
- ``"applied"``: ``[[node id, UTC ns, kW], ...]``, devices whose new setpoint took effect since the
  previous frame (the simulated OCPP stations and SunSpec chargers, after their command latency);
- ``"reached"``: how many devices have been commanded at least once (their gateway reached them);
- ``"soc"``: ``{node id: soc}``, in the last frame a device simulator sends as it stops.

Powers are kW, positive = discharge into the grid.
"""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import zmq

SITE_POWER_VERSION = 1


def encode(gateway_id: str, sites: dict[str, float], **extra) -> bytes:
    """One frame, stamped now (UTC ns); ``extra`` keys as listed in the module docstring."""
    return msgpack.packb({"v": SITE_POWER_VERSION, "gw": gateway_id, "t_ns": time.time_ns(), "sites": sites,
                          **extra})


def decode(frame: bytes) -> dict:
    """A frame as a dict with ``gw`` (str), ``t_ns`` (int) and ``sites`` ({str: float}); ValueError if not one."""
    m = msgpack.unpackb(frame)
    if not isinstance(m, dict) or m.get("v") != SITE_POWER_VERSION or not isinstance(m.get("gw"), str):
        raise ValueError("not a site-power frame of version 1")
    m["sites"] = {str(k): float(v) for k, v in m["sites"].items()}
    m["t_ns"] = int(m["t_ns"])
    return m


def per_site_kw(site: np.ndarray, site_ids: list[str], p_kw: np.ndarray) -> dict[str, float]:
    """``{site id: sum of p_kw over the rows at that site}`` for the sites that have rows."""
    totals = np.bincount(site, weights=p_kw, minlength=len(site_ids))
    return {site_ids[s]: float(totals[s]) for s in np.unique(site).tolist()}


class DevicePowerPusher(threading.Thread):
    """Every ``interval_s``, pushes a device simulator's output per site and the setpoints newly applied.

    ``sim`` is a :class:`~v2grt.sim.ocpp_stations.SimStations` or
    :class:`~v2grt.sim.sunspec_chargers.SimChargers`: it reads their ``p_kw`` (delivered now),
    ``target_kw`` and ``applied_ns`` (CLOCK_MONOTONIC of the newest target taking effect), which their
    own thread writes; a read between two writes costs at most one interval. ``stop()`` sends a last
    frame with every device's SoC.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, gateway_id: str, node_ids: list[str], site: np.ndarray,
                 site_ids: list[str], sim, *, interval_s: float = 0.05):
        super().__init__(name="site-power", daemon=True)
        self.gateway_id = gateway_id
        self.node_ids = node_ids
        self.site = np.asarray(site, dtype=np.int64)
        self.site_ids = site_ids
        self.sim = sim
        self.interval_s = interval_s
        self._halt = threading.Event()
        self._seen_ns = np.zeros(len(node_ids), dtype=np.int64)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 500)  # the last frame (SoCs) must leave
        self.sock.setsockopt(zmq.SNDHWM, 64)
        self.sock.connect(endpoint)

    def _frame(self, **extra) -> bytes:
        applied_ns = np.array(self.sim.applied_ns)
        new = np.flatnonzero(applied_ns != self._seen_ns)
        self._seen_ns[new] = applied_ns[new]
        to_utc = time.time_ns() - time.monotonic_ns()
        target = self.sim.target_kw
        applied = [[self.node_ids[i], int(applied_ns[i]) + to_utc, float(target[i])] for i in new.tolist()]
        return encode(self.gateway_id, per_site_kw(self.site, self.site_ids, np.array(self.sim.p_kw)),
                      applied=applied, reached=int(np.count_nonzero(applied_ns)), **extra)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self.sock.send(self._frame(), zmq.NOBLOCK)
            except zmq.Again:
                pass  # nobody listening (yet): the next frame carries fresh values

    def stop(self) -> None:
        """Stop, send the last frame (with every device's SoC) and close the socket."""
        self._halt.set()
        self.join(5.0)
        soc = {nid: float(s) for nid, s in zip(self.node_ids, self.sim.state.soc[: len(self.node_ids)], strict=True)}
        try:
            self.sock.send(self._frame(soc=soc), zmq.NOBLOCK)
        except zmq.Again:
            pass
        self.sock.close()


__all__ = ["SITE_POWER_VERSION", "DevicePowerPusher", "decode", "encode", "per_site_kw"]
