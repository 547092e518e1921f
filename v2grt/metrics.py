"""The Prometheus endpoint: an own registry, an HTTP server thread, and a cycle hook that feeds it.

The hook does its work at most once per `interval_s` (every other cycle it reads one clock): it bins
the cycle timings recorded since its last pass straight out of CycleStats' rings (vectorised, so a
cycle's own timings never pass through Python objects), reads the kernel's per-reason counts, and copies a
handful of counters into an immutable snapshot. Scrapes (on the HTTP thread) only read the newest
snapshot, so a scrape never touches arrays the control thread is writing.

Metric names (all prefixed ``v2grt_``; power in kW, + = discharge into the grid):

==========================================  =========  ======================================================
cycle_duration_seconds{phase}               histogram  inputs, kernel, publish and total time of each cycle
cycle_wakeup_lateness_seconds               histogram  how late the loop woke after its deadline
meter_input_age_seconds                     histogram  age of the newest meter sample when a cycle read it
cycles_total                                counter    cycles run
deadline_misses_total{kind}                 counter    missed_deadline (periods skipped), budget_overrun
cycle_errors_total                          counter    cycles that raised
grid_frequency_hz                           gauge      newest frequency (NaN while the meter is stale)
service_fraction                            gauge      service response, -1..1 of capacity
capacity_kw, request_kw, target_kw,         gauge      contracted capacity; base + response; target after the
allocated_kw, delivered_kw                             fleet's limits; sum of setpoints; sum of telemetry
available_discharge_kw, available_charge_kw gauge      what the fleet can give now, each way (magnitudes)
vehicles{state,reason}                      gauge      vehicles by state (available, limited, excluded) and
                                                       reason code
vehicles_carrying                           gauge      vehicles with a non-zero setpoint
estop, frequency_stale, frequency_alert     gauge      1 while latched / stale / in alert
bad_frames_total{source,code}               counter    dropped frames (messages) by wire error code (telemetry, control)
telemetry_refused_nodes_total{code}         counter    vehicles refused from batches that were used: UNKNOWN_NODE,
                                                       FOREIGN_NODE, INVALID_TELEMETRY (one per vehicle and batch)
events_total{code}                          counter    engine.log events by code (rate-limited lines included)
setpoints_dropped_total                     counter    setpoint frames the PUB socket refused
setpoints_to_wire_seconds                   histogram  each cycle sent: its deadline to its last setpoint frame
                                                       queued to ZeroMQ (on whichever thread sends them)
publisher_cycles_total                      counter    cycles whose setpoints were sent
publisher_frames_sent_total                 counter    setpoint frames queued to ZeroMQ
publisher_cycles_not_sent_total{reason}     counter    busy (publisher thread still sending), stale (laid out
                                                       after the next dispatch began), refused (a wild value),
                                                       fenced (HA lease at send time), error
publisher_last_send_seconds                 gauge      the publisher thread's own time for the last cycle sent
                                                       (NaN when the control thread sends)
publisher_last_to_wire_seconds              gauge      the last cycle sent: deadline to its last frame queued
receive_busy_seconds_total                  counter    time the bus thread spent receiving (telemetry, control)
receive_budget_exhausted_total              counter    periods in which bus.receive_budget ran out (overload)
receive_throttled_seconds_total             counter    time the bus thread waited for the next period, its
                                                       budget spent, while messages waited in ZeroMQ's queues
epoch                                       gauge      this scheduler's fencing epoch
journal_write_failing                       gauge      1 while the dispatch journal cannot write (disk full, I/O error)
journal_records_dropped_total               counter    cycle records the journal lost (write error, writer behind)
info{fleet_id,service}                      gauge      1
==========================================  =========  ======================================================
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

import numpy as np
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from v2grt.codes import ONE_WAY, Reason
from v2grt.ingest import REFUSAL_CODES as _REFUSAL_CODES

log = logging.getLogger("v2grt.metrics")

#: Bucket upper bounds (s) for cycle phases: 50 us .. 1 s, dense where a 100 ms budget is decided.
DURATION_BUCKETS_S = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
#: Bucket upper bounds (s) for the meter sample's age: its poll interval up to the stale limit.
AGE_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

_PHASES = ("inputs", "kernel", "publish", "total")
#: Event codes exported from 0 before they first happen, so rate() and alerts see them start (the
#: field manual's section 8 codes and the meter's).
_EVENTS_AT_ZERO = ("TIMEOUT_BMS_RESPONSE", "THERMAL_LIMIT", "NODE_UNREACHABLE", "NODE_LOW_THROUGHPUT",
                   "SOH_BELOW_THRESHOLD", "E_INVERTER_PHASE_MISMATCH", "GRID_FREQUENCY_ALERT",
                   "IDEMPOTENT_KEY_CONFLICT", "GRID_FREQUENCY_STALE", "EMERGENCY_STOP", "JOURNAL_WRITE_FAILED")
_REASON_NAMES = {int(r): r.name for r in Reason}


def _state_of(code: int) -> str:
    if code == Reason.OK:
        return "available"
    return "limited" if code in ONE_WAY else "excluded"


class _Hist:
    """A cumulative histogram fed in bulk from ns samples."""

    def __init__(self, bounds_s):
        self.bounds_ns = np.asarray(bounds_s, float) * 1e9
        self.counts = np.zeros(len(bounds_s) + 1, np.int64)  # last: +Inf
        self.sum_ns = 0.0

    def add(self, samples_ns: np.ndarray) -> None:
        if samples_ns.size:
            # le semantics: a sample equal to a bound falls in that bucket
            idx = np.searchsorted(self.bounds_ns, samples_ns, side="left")
            self.counts += np.bincount(idx, minlength=len(self.counts))
            self.sum_ns += float(samples_ns.sum())


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    hists: dict  # name -> (counts copy, sum_ns)
    gauges: dict
    counters: dict
    vehicles: dict  # (state, reason) -> count
    bad_frames: dict  # (source, code) -> count
    refused_nodes: dict  # code -> vehicles
    events: dict
    info: dict


class MetricsExporter:
    """Cycle hook and Prometheus collector in one: `hook(agg, result, times)` feeds, `collect()` serves."""

    def __init__(self, *, interval_s: float = 1.0):
        self.interval_ns = int(interval_s * 1e9)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._next_ns = 0
        self._seen_cycles = 0
        self.hists = {f"phase:{p}": _Hist(DURATION_BUCKETS_S) for p in _PHASES}
        self.hists["lateness"] = _Hist(DURATION_BUCKETS_S)
        self.hists["input_age"] = _Hist(AGE_BUCKETS_S)
        self.hists["to_wire"] = _Hist(DURATION_BUCKETS_S)
        self._seen_sent = 0  # cycles sent whose to-wire time is in the histogram
        self._snap: _Snapshot | None = None
        self.lost_samples = 0  # cycles that fell out of the stats ring between two passes
        self.server = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- control thread
    def __call__(self, agg, result, times) -> None:
        now = time.monotonic_ns()
        if now < self._next_ns:
            return
        # the first pass at once (a scrape has something to read), then half an interval off the
        # NodeMonitor's passes, so the two never land on the same cycle
        self._next_ns = now + (self.interval_ns if self._next_ns else self.interval_ns // 2)
        self.update(agg, result)

    def update(self, agg, result) -> None:
        """Take everything new since the last pass into a fresh snapshot (one pass: ~0.1 ms)."""
        stats = agg.stats
        self._take_rings(stats)
        pub = agg.publisher_snapshot()
        self._take_to_wire(agg.to_wire_ring()[0], pub["cycles_sent"])  # the histogram counts what the counter does
        fleet = agg.fleet
        n = fleet.n_rows
        counts = result.nodes_per_reason  # counted by the kernel
        vehicles = {}
        for code in np.flatnonzero(counts):
            if code != Reason.EMPTY:
                vehicles[(_state_of(int(code)), _REASON_NAMES.get(int(code), f"UNKNOWN_{code}"))] = int(counts[code])
        delivered = float(fleet.p_actual_kw[:n].sum())
        bad = {("telemetry", k): v for k, v in dict(agg.telemetry.errors).items()}
        bad.update({("control", k): v for k, v in dict(agg.control.errors).items()})
        alert = agg.alert
        journal = getattr(agg, "journal", None)
        gauges = {
            "grid_frequency_hz": float(result.frequency_hz),
            "service_fraction": float(result.service_fraction),
            "capacity_kw": agg.dispatcher.capacity_kw,
            "request_kw": result.request_kw,
            "target_kw": result.target_kw,
            "allocated_kw": result.allocated_kw,
            "delivered_kw": delivered,
            "available_discharge_kw": result.feasible_dis_kw,
            "available_charge_kw": result.feasible_chg_kw,
            "vehicles_carrying": float(result.n_carrying),
            "estop": float(result.estop),
            "frequency_stale": float(bool(agg.status.get("frequency_stale"))),
            "frequency_alert": float(alert is not None and alert.active),
            "epoch": float(agg.epoch),
            "journal_write_failing": float(journal is not None and journal.counters.failing),
            "publisher_last_send_seconds": math.nan if pub["last_send_ms"] is None else pub["last_send_ms"] / 1e3,
            "publisher_last_to_wire_seconds": pub["last_to_wire_ms"] / 1e3,
        }
        counters = {
            "cycles_total": stats.cycles,
            "cycle_errors_total": stats.errors,
            "setpoints_dropped_total": agg.publisher.dropped,
            "journal_records_dropped_total": journal.counters.dropped if journal is not None else 0,
            "receive_busy_seconds_total": agg.gate.busy_ns / 1e9,
            "receive_budget_exhausted_total": agg.gate.exhausted,
            "receive_throttled_seconds_total": agg.gate.throttled_ns / 1e9,
            "deadline_misses_total": {"missed_deadline": stats.missed_deadlines,
                                      "budget_overrun": stats.budget_overruns},
            "publisher_cycles_total": pub["cycles_sent"],
            "publisher_frames_sent_total": pub["frames_sent"],
            "publisher_cycles_not_sent_total": {"busy": pub["busy_skips"], "stale": pub["stale"],
                                                "refused": pub["refused"], "fenced": pub["fenced"],
                                                "error": pub["errors"]},
        }
        self._snap = _Snapshot(
            hists={k: (h.counts.copy(), h.sum_ns) for k, h in self.hists.items()},
            gauges=gauges, counters=counters, vehicles=vehicles, bad_frames=bad,
            refused_nodes=dict(agg.router.refused_nodes),
            events={**dict.fromkeys(_EVENTS_AT_ZERO, 0), **agg.events.snapshot()},
            info={"fleet_id": agg.cfg.fleet_id, "service": agg.dispatcher.service.name})

    def _take_rings(self, stats) -> None:
        end = stats.cycles
        start = self._seen_cycles
        if end - start > stats.size:
            self.lost_samples += end - start - stats.size
            start = end - stats.size
        self._seen_cycles = end
        if end == start:
            return
        a, b = start % stats.size, end % stats.size
        rings = stats.rings

        def take(name):
            r = rings[name]
            return r[a:b] if a < b else np.concatenate([r[a:], r[:b]])

        for p in _PHASES:
            self.hists[f"phase:{p}"].add(take(p))
        self.hists["lateness"].add(np.maximum(take("lateness"), 0))
        age = take("input_age")
        self.hists["input_age"].add(age[age > 0])  # 0: no meter configured; -1: no sample yet

    def _take_to_wire(self, ring: np.ndarray, count: int) -> None:
        """The to-wire times of the cycles sent since the last pass (a ring of ``len(ring)``, ``count`` so far)."""
        start = max(self._seen_sent, count - len(ring))
        self._seen_sent = count
        if count > start:
            self.hists["to_wire"].add(ring[np.arange(start, count) % len(ring)])

    # ----------------------------------------------------------------- HTTP thread
    def collect(self):
        snap = self._snap
        if snap is None:
            return
        dur = HistogramMetricFamily("v2grt_cycle_duration_seconds", "Time spent per cycle, by phase",
                                    labels=["phase"])
        for p in _PHASES:
            counts, sum_ns = snap.hists[f"phase:{p}"]
            _family(dur, counts, sum_ns, DURATION_BUCKETS_S, [p])
        yield dur
        for key, name, doc, bounds in (
                ("lateness", "v2grt_cycle_wakeup_lateness_seconds", "Wake-up lateness after the deadline",
                 DURATION_BUCKETS_S),
                ("to_wire", "v2grt_setpoints_to_wire_seconds", "A cycle's deadline to its last setpoint frame "
                 "queued to ZeroMQ", DURATION_BUCKETS_S),
                ("input_age", "v2grt_meter_input_age_seconds", "Age of the meter sample a cycle used",
                 AGE_BUCKETS_S)):
            fam = HistogramMetricFamily(name, doc)
            counts, sum_ns = snap.hists[key]
            _family(fam, counts, sum_ns, bounds, [])
            yield fam
        c = snap.counters
        yield CounterMetricFamily("v2grt_cycles", "Control cycles run", value=c["cycles_total"])
        yield CounterMetricFamily("v2grt_cycle_errors", "Cycles that raised", value=c["cycle_errors_total"])
        yield CounterMetricFamily("v2grt_setpoints_dropped", "Setpoint frames the PUB socket refused",
                                  value=c["setpoints_dropped_total"])
        yield CounterMetricFamily("v2grt_journal_records_dropped", "Cycle records the journal lost (write error, "
                                  "writer behind)", value=c["journal_records_dropped_total"])
        yield CounterMetricFamily("v2grt_publisher_cycles", "Cycles whose setpoints were sent",
                                  value=c["publisher_cycles_total"])
        yield CounterMetricFamily("v2grt_publisher_frames_sent", "Setpoint frames queued to ZeroMQ",
                                  value=c["publisher_frames_sent_total"])
        not_sent = CounterMetricFamily("v2grt_publisher_cycles_not_sent", "Cycles whose setpoints were not sent, "
                                       "by reason", labels=["reason"])
        for reason, v in c["publisher_cycles_not_sent_total"].items():
            not_sent.add_metric([reason], v)
        yield not_sent
        for key, doc in (("receive_busy_seconds", "Time the bus thread spent receiving telemetry and control"),
                         ("receive_budget_exhausted", "Periods in which bus.receive_budget ran out"),
                         ("receive_throttled_seconds", "Time the bus thread waited with its receive budget spent")):
            yield CounterMetricFamily(f"v2grt_{key}", doc, value=c[f"{key}_total"])
        miss = CounterMetricFamily("v2grt_deadline_misses", "Deadline misses by kind", labels=["kind"])
        for kind, v in c["deadline_misses_total"].items():
            miss.add_metric([kind], v)
        yield miss
        docs = {"grid_frequency_hz": "Grid frequency, Hz (NaN while the meter is stale)",
                "service_fraction": "Service response, -1..1 of capacity (+ discharge)",
                "capacity_kw": "Contracted capacity, kW", "request_kw": "Base schedule + response, kW",
                "target_kw": "Target after the fleet's limits, kW (+ discharge)",
                "allocated_kw": "Sum of setpoints, kW", "delivered_kw": "Sum of reported power, kW",
                "available_discharge_kw": "Deliverable discharge now, kW",
                "available_charge_kw": "Deliverable charge now, kW (magnitude)",
                "vehicles_carrying": "Vehicles with a non-zero setpoint", "estop": "1 while the e-stop is latched",
                "frequency_stale": "1 while the meter's frequency is stale",
                "frequency_alert": "1 while the frequency is outside the alert band",
                "epoch": "This scheduler's fencing epoch",
                "journal_write_failing": "1 while the dispatch journal cannot write (JOURNAL_WRITE_FAILED)",
                "publisher_last_send_seconds": "The publisher thread's own time for the last cycle sent, s (NaN: "
                                               "the control thread sends)",
                "publisher_last_to_wire_seconds": "The last cycle sent: its deadline to its last setpoint frame "
                                                  "queued to ZeroMQ, s"}
        for name, value in snap.gauges.items():
            yield GaugeMetricFamily(f"v2grt_{name}", docs[name], value=value if value is not None else math.nan)
        veh = GaugeMetricFamily("v2grt_vehicles", "Vehicles by state and reason code", labels=["state", "reason"])
        for (state, reason), v in sorted(snap.vehicles.items()):
            veh.add_metric([state, reason], v)
        yield veh
        bad = CounterMetricFamily("v2grt_bad_frames", "Frames dropped, by source and wire error code",
                                  labels=["source", "code"])
        for (source, code), v in sorted(snap.bad_frames.items()):
            bad.add_metric([source, code], v)
        yield bad
        refused = CounterMetricFamily("v2grt_telemetry_refused_nodes", "Vehicles refused from telemetry batches "
                                      "that were used, by code", labels=["code"])
        for code, v in sorted({**dict.fromkeys(_REFUSAL_CODES, 0), **snap.refused_nodes}.items()):
            refused.add_metric([code], v)
        yield refused
        ev = CounterMetricFamily("v2grt_events", "engine.log events by code", labels=["code"])
        for code, v in sorted(snap.events.items()):
            ev.add_metric([code], v)
        yield ev
        info = GaugeMetricFamily("v2grt_info", "Fleet and service", labels=list(snap.info))
        info.add_metric(list(snap.info.values()), 1.0)
        yield info

    # ----------------------------------------------------------------- server
    def start_server(self, address: str, port: int) -> str:
        """Serve /metrics on address:port (port 0: any free port); returns the URL. Raises OSError."""
        from prometheus_client import start_http_server

        try:
            self.server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics endpoint {address}:{port}: cannot listen ({exc.strerror}); "
                                     "set metrics.port to a free port or metrics.enabled: false") from None
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{self.server.server_port}/metrics"

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _family(fam, counts, sum_ns, bounds_s, labels):
    cum = np.cumsum(counts)
    buckets = [(f"{b:g}", int(v)) for b, v in zip(bounds_s, cum[:-1], strict=True)] + [("+Inf", int(cum[-1]))]
    fam.add_metric(labels, buckets, sum_ns / 1e9)
