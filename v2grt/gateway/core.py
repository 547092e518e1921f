"""The protocol side every gateway shares: fenced, expiring setpoints in; telemetry batches out.

A gateway is one thread that owns two sockets (pyzmq sockets are single-owner): the SUB for its
own setpoint topic and the PUSH to the aggregator's telemetry PULL. What sits behind it (simulated
vehicles, chargers over OCPP, a Modbus inverter) is a :class:`Vehicles` driver. The core keeps the
obligations of docs/wire.md section 4.3 so that no driver has to:

1. newest only: the SUB queue is drained and only the newest admitted message counts;
2. absolute setpoints: every node the gateway controls gets its ``p_kw``, or 0 kW if the message
   does not name it;
3. e-stop: 0 kW for every node while the newest accepted message has ``estop`` set;
4. expiry: a message holds until the earlier of its ``exp_ns`` (UTC) and local monotonic receive
   time + (``exp_ns`` - ``t_ns``); after that every node is held at 0 kW until a newer one arrives;
5. fencing: an older epoch is refused and logged as ``IDEMPOTENT_KEY_CONFLICT`` (wire.SetpointFence), one
   fence across every aggregator the gateway listens to (high availability: docs/ha.md).

Telemetry goes out every ``telemetry_interval_s``: SoC, power, online, fault and voltage (``v_dc``)
in every batch, the slow keys (SoH, temperatures, BMS limits, cycle count) only in batches whose
``seq % slow_n == 0``, ``slow_n`` being what the newest setpoint message asked for (the telemetry
profile, wire.md 5.2). Powers are kW, positive = discharge into the grid.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import zmq

from v2grt.events import EventLog
from v2grt.io import bus, wire

log = logging.getLogger("v2grt.gateway")

#: Keys sent in every batch besides the four required ones: the field manual's "SoC, power and
#: voltage at high rate". Every other optional key is slow (wire.SLOW_TELEMETRY_KEYS minus these).
FAST_OPTIONAL_KEYS: tuple[str, ...] = ("v_dc",)
SLOW_KEYS: tuple[str, ...] = tuple(k for k in wire.SLOW_TELEMETRY_KEYS if k not in FAST_OPTIONAL_KEYS)
REQUIRED_KEYS: tuple[str, ...] = tuple(f.key for f in wire.TELEMETRY_ARRAYS if f.required)

#: One batch per round keeps the slow-key rule of wire.md 5.2 (seq % slow_n) exact. A full batch is
#: ~36 bytes a node, so 50,000 nodes (1.8 MB) stay well under the 4 MiB frame limit.
MAX_GATEWAY_NODES = 50_000

#: The loop wakes at least this often (ms) even when nothing arrives: a stop request or an expiry
#: is noticed within this time.
MAX_WAIT_MS = 100


#: The collector's youngest-generation threshold in a gateway process (CPython's default: 700 allocations).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """For a process that is a gateway or a simulator of devices (their CLIs call it; a library must not): what is
    alive after start-up is frozen (never scanned again) and the youngest generation collected every 10,000 net
    allocations, not 700.

    At 2,000 EVSEs the collector took 5.5-6.5 % of the gateway's asyncio thread (gc.callbacks, 10 s windows,
    docs/benchmarks.md), full collections of ~170,000 objects 0.1-0.9 s each, a stall of every station; yet a
    forced full collection every 10 s in steady state found no cyclic garbage at all. With this: ~0.5 %.
    Cycles are still collected (the older generations' thresholds are CPython's), only less often. The SunSpec
    gateway and the simulators call it too: a collection there stalls every charger's write behind it."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class GatewayError(ValueError):
    """A gateway that cannot start as configured; the message names what is wrong."""


class Vehicles(Protocol):
    """What a gateway drives: a fixed list of nodes, commanded together, reporting together."""

    node_ids: list[str]

    def apply(self, p_kw: np.ndarray, now_ns: int) -> None:
        """Command every node to ``p_kw`` (kW, + discharge, shape (n,), in node_ids order) from now on.

        Called on every wake of the gateway loop (on each setpoint message, and at least every
        ``MAX_WAIT_MS``), with the setpoints in force: 0 for every node when they expired.
        ``now_ns`` is CLOCK_MONOTONIC.
        """

    def telemetry(self, now_ns: int) -> dict[str, np.ndarray]:
        """Per-node measurements keyed as wire.TELEMETRY_ARRAYS (the four required keys at least)."""

    # Optional, looked up with getattr (a driver without them is unchanged):
    # ``setpoints_accepted(ep, seq, ok)`` before the apply of each accepted message: its epoch and
    # sequence (to pair it with the status topic's frequency of the same cycle) and, per node, whether
    # it was named with reason OK and no e-stop; ``setpoints_expired()`` when the setpoints lapse and when
    # the gateway stops (before the apply of the zeros).


class GatewayCore:
    """One gateway's sockets and rules around a :class:`Vehicles` driver; ``run(stop)`` is the loop.

    ``setpoints`` and ``telemetry``: the endpoints of every aggregator of the fleet, a list or one string
    with commas (``tcp://a:5560,tcp://b:5560``), the i-th of each being the i-th aggregator's (docs/wire.md
    2.1): setpoints are subscribed from all behind one fence (bus.SetpointFanIn), every telemetry batch
    goes to all (bus.TelemetryFanOut), so standbys hear every vehicle. Create, run and close on one
    thread. Counters (``accepted``, ``expiries``, ``batches_sent``, ``rejected`` by wire error code) are
    for logs and tests.
    """

    def __init__(self, ctx: zmq.Context, gateway_id: str, vehicles: Vehicles, *, setpoints: str | Sequence[str],
                 telemetry: str | Sequence[str],
                 telemetry_interval_s: float = 1.0, events: EventLog | None = None, curve: dict | None = None):
        if not (0.01 <= telemetry_interval_s <= 60.0):
            raise GatewayError(f"telemetry_interval_s={telemetry_interval_s!r}: expected 0.01..60 s")
        n = len(vehicles.node_ids)
        if n > MAX_GATEWAY_NODES:
            raise GatewayError(f"gateway {gateway_id!r}: {n} vehicles; at most {MAX_GATEWAY_NODES} per gateway "
                               "(split them across gateways)")
        try:
            self.ids_blob = wire.join_ids(vehicles.node_ids)
            wire.setpoint_topic(gateway_id)
        except wire.WireError as exc:
            raise GatewayError(f"gateway {gateway_id!r}: {exc.message}") from None
        self.gateway_id = gateway_id
        self.vehicles = vehicles
        self.n = n
        self.row_of = {nid: i for i, nid in enumerate(vehicles.node_ids)}
        self.interval_ns = round(telemetry_interval_s * 1e9)
        self.events = events or EventLog()
        # Every aggregator of the fleet (docs/wire.md 2.1): the i-th setpoint and telemetry endpoints are one
        # aggregator's; curve: this gateway's key pair (authorized as gateway:<gateway_id> at each aggregator),
        # and the aggregators' public keys, one for all or one per endpoint (bus.curves_for).
        try:
            sp_eps = bus.split_endpoints(setpoints, "setpoints (--setpoints)")
            tel_eps = bus.split_endpoints(telemetry, "telemetry (--telemetry)")
            if len(sp_eps) != len(tel_eps):
                raise bus.BusError(f"{len(sp_eps)} setpoint endpoints (--setpoints) but {len(tel_eps)} telemetry "
                                   "endpoints (--telemetry): expected one of each per aggregator, in the same order")
            curves = bus.curves_for(curve, len(sp_eps))
        except bus.BusError as exc:
            raise GatewayError(f"gateway {gateway_id!r}: {exc}") from None
        self.sub = bus.SetpointFanIn(ctx, sp_eps, gateway_id, curves=curves)
        try:
            self.pusher = bus.TelemetryFanOut(ctx, tel_eps, curves=curves)
        except bus.BusError:
            self.sub.close()
            raise
        self.p_kw = np.zeros(n)  # the setpoints in force, kW, + discharge
        self.slow_n = 1
        self.seq = 0
        self.accepted = 0
        self.expiries = 0
        self.batches_sent = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.epoch: int | None = None
        self._valid_mono_ns = 0  # monotonic end of the newest message's validity
        self._valid_wall_ns = 0  # its exp_ns (UTC)
        self._holding = False  # True while a message's setpoints are in force
        self._estop = False
        self._maps: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._closed = False

    # ------------------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then bring every node to 0 kW and report it (see ``close``)."""
        next_tel = time.monotonic_ns()
        try:
            while not stop.is_set():
                now = time.monotonic_ns()
                due = next_tel if not self._holding else min(next_tel, self._valid_mono_ns)
                wait_ms = int(min(max(due - now, 0) // 1_000_000 + 1, MAX_WAIT_MS))
                self.step(wait_ms)
                now = time.monotonic_ns()
                if now >= next_tel:
                    self.send_telemetry(now)
                    next_tel = max(next_tel + self.interval_ns, now)  # a late wake never bursts
        finally:
            self.close()

    def step(self, timeout_ms: int = 0) -> None:
        """One wake: take the newest admitted setpoints (waiting up to ``timeout_ms``), expire, apply."""
        msg = self.sub.recv(timeout_ms)
        now = time.monotonic_ns()
        self._count_rejections()
        if msg is not None:
            self._accept(msg, now)
        if self._holding and (now > self._valid_mono_ns or time.time_ns() > self._valid_wall_ns):
            self._expire()
        self.vehicles.apply(self.p_kw, now)

    def _accept(self, msg: wire.SetpointMsg, now_ns: int) -> None:
        src, dst = self._map(msg)
        self.p_kw[:] = 0.0  # nodes not named in the message get 0 kW (wire.md 4.3, 2)
        if not msg.estop:
            self.p_kw[dst] = msg.p_kw[src]
        if msg.estop != self._estop:
            self._estop = msg.estop
            self.events.emit("EMERGENCY_STOP" if msg.estop else "EMERGENCY_STOP_CLEARED",
                             logging.CRITICAL if msg.estop else logging.WARNING, key=self.gateway_id,
                             gateway=self.gateway_id, epoch=msg.ep, seq=msg.seq)
        if not self._holding and self.accepted:
            self.events.emit("SETPOINTS_RESUMED", logging.INFO, key=self.gateway_id, gateway=self.gateway_id,
                             epoch=msg.ep, seq=msg.seq)
        if self.epoch is not None and msg.ep > self.epoch:
            self.events.emit("EPOCH_ADVANCED", logging.WARNING, key=self.gateway_id, gateway=self.gateway_id,
                             old=self.epoch, new=msg.ep, msg="a newer aggregator instance took over")
        self.epoch = msg.ep
        self.slow_n = msg.slow_n
        accepted = getattr(self.vehicles, "setpoints_accepted", None)
        if accepted is not None:  # an optional driver hook (the OCPP gateway's LocalFrequency mode)
            ok = np.zeros(self.n, dtype=bool)  # named, reason OK and no e-stop: the node may answer frequency
            if not msg.estop:
                ok[dst] = msg.reasons[src] == 0
            accepted(msg.ep, msg.seq, ok)
        self._valid_mono_ns = now_ns + (msg.exp_ns - msg.t_ns)
        self._valid_wall_ns = msg.exp_ns
        self._holding = True
        self.accepted += 1

    def _map(self, msg: wire.SetpointMsg) -> tuple[np.ndarray, np.ndarray]:
        """(index in the message, our node index) of the nodes we control, cached per ids blob."""
        cached = self._maps.get(msg.ids_blob)
        if cached is None:
            pairs = [(i, self.row_of[nid]) for i, nid in enumerate(msg.node_ids) if nid in self.row_of]
            unknown = len(msg) - len(pairs)
            if unknown:  # ignored by rule (wire.md 4.3, 2); named once so a roster mismatch is seen
                self.events.emit("UNKNOWN_NODE", logging.WARNING, key=self.gateway_id, gateway=self.gateway_id,
                                 nodes=unknown, msg="setpoints name nodes this gateway does not control")
            arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
            cached = (arr[:, 0].copy(), arr[:, 1].copy())
            if len(self._maps) >= 8:  # the roster changes rarely; keep the cache small
                self._maps.clear()
            self._maps[msg.ids_blob] = cached
        return cached

    def _expire(self) -> None:
        self.p_kw[:] = 0.0
        expired = getattr(self.vehicles, "setpoints_expired", None)
        if expired is not None:  # the optional hook's counterpart: nothing may answer frequency now
            expired()
        self._holding = False
        self.expiries += 1
        self.events.emit("SETPOINT_EXPIRED", logging.WARNING, key=self.gateway_id, gateway=self.gateway_id,
                         epoch=self.epoch, nodes=self.n,
                         msg="no valid setpoint within the expiry window: every vehicle to 0 kW")

    def _count_rejections(self) -> None:
        errors = self.sub.errors
        for code, count in errors.items():
            new = count - self.rejected[code]
            if new > 0:
                self.rejected[code] = count
                level = logging.ERROR if code == "IDEMPOTENT_KEY_CONFLICT" else logging.WARNING
                detail = self.sub.last_errors[-1] if self.sub.last_errors else ""
                self.events.emit(code, level, key=self.gateway_id, gateway=self.gateway_id, count=new,
                                 total=count, msg=detail[:300])

    # ------------------------------------------------------------------------------ telemetry
    def send_telemetry(self, now_ns: int) -> bool:
        """Push one batch of every node; slow keys only when ``seq % slow_n == 0``. False if dropped."""
        values = self.vehicles.telemetry(now_ns)
        keys = FAST_OPTIONAL_KEYS + (SLOW_KEYS if self.seq % self.slow_n == 0 else ())
        optional = {k: values[k] for k in keys if k in values}
        frame = wire.encode_telemetry(self.gateway_id, self.seq, time.time_ns(), self.ids_blob,
                                      *(values[k] for k in REQUIRED_KEYS), **optional)
        self.seq += 1
        sent = self.pusher.send(frame)
        self.batches_sent += sent
        return sent

    # ------------------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Every node to 0 kW, one last batch showing it, then close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.p_kw[:] = 0.0
            self._holding = False
            stopped = getattr(self.vehicles, "setpoints_expired", None)
            if stopped is not None:  # these zeros are final: no node may answer frequency on its own
                stopped()
            now = time.monotonic_ns()
            self.vehicles.apply(self.p_kw, now)
            self.send_telemetry(now)
            # linger=0 would drop the last batch still queued: give it a moment to leave.
            self.pusher.close(linger_ms=200)
        finally:
            self.pusher.close()
            self.sub.close()

    def counters(self) -> dict[str, int]:
        """Plain counters for the stop log line and tests."""
        return {"accepted": self.accepted, "expiries": self.expiries, "batches_sent": self.batches_sent,
                "batches_dropped": self.pusher.dropped, "received": self.sub.received,
                **{f"rejected_{code}": count for code, count in sorted(self.rejected.items())}}


__all__ = ["FAST_OPTIONAL_KEYS", "MAX_GATEWAY_NODES", "SLOW_KEYS", "GatewayCore", "GatewayError", "Vehicles"]
