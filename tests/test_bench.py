"""Smoke tests of the benchmarks: each runs at a tiny size with --json and reports the documented shape.

Benchmarks are not timed tests: these assert structure and counts, never a latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def bench(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "bench", *args, "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_cyclictest_histogram_is_parsed_into_percentiles():
    """cyclictest's --histfile (1 us buckets, overflow and max trailers) gives nearest-rank percentiles."""
    from bench_loop import histogram_percentiles, parse_histogram

    lines = ["# Histogram"] + [f"{us:06d} {count:06d}" for us, count in [(0, 0), (10, 900), (20, 90), (30, 0),
                                                                         (40, 9)]]
    lines += ["# Total: 000001000", "# Min Latencies: 00010", "# Avg Latencies: 00011", "# Max Latencies: 00250",
              "# Histogram Overflows: 00001", "# Histogram Overflow at cycle number:", "# Thread 0: 17"]
    p = histogram_percentiles(parse_histogram("\n".join(lines)))
    assert p == {"n": 1000, "p50_us": 10, "p99_us": 20, "p999_us": 40, "max_us": 250, "mean_us": pytest.approx(11.41)}


def test_bench_loop_json():
    """bench loop reports v2grt's lateness per period and, with cyclictest installed, the p99 ratio."""
    r = bench("loop", "--periods-ms", "10", "--seconds", "0.6", "--rounds", "1", "--priority", "0")
    row = r["results"][0]
    assert row["period_ms"] == 10.0 and row["v2grt"]["n"] >= 20
    assert {"p50_us", "p99_us", "p999_us", "max_us"} <= row["v2grt"].keys()
    if r["cyclictest"]["path"]:
        assert row["cyclictest"]["n"] == 60 and row["p99_ratio"] > 0
    else:
        assert "rt-tests" in r["cyclictest"]["hint"]


def test_bench_cycle_json():
    """bench cycle runs the real aggregator and reports every phase and the delivered setpoint frames."""
    r = bench("cycle", "--nodes", "2000", "--gateways", "4", "--cycles", "5", "--period-ms", "20", "--priorities", "0")
    row = r["results"][0]
    assert (row["nodes"], row["gateways"]) == (2000, 4) and row["cycles"] >= 5
    assert {"total", "kernel", "publish", "inputs", "lateness"} <= row["phases"].keys()
    assert row["setpoint_frames_received"] > 0 and row["publish_breakdown_p50_ms"]["frames_ms"] > 0


def test_bench_e2e_json():
    """bench e2e times frequency steps at the Modbus meter to the gateway and splits the latency."""
    r = bench("e2e", "--configs", "20/5", "--trials", "4", "--nodes", "1000", "--gateways", "4")
    row = r["results"][0]
    assert row["arrived"] == 4 and row["latency"]["n"] == 4
    assert row["split_mean_ms"].keys() == {"meter", "wait", "cycle", "delivery"}


def test_bench_soak_json():
    """bench soak counts cycles, deadlines and telemetry batches sent, received and rejected."""
    r = bench("soak", "--duration", "1.5", "--nodes", "1000", "--gateways", "4", "--rate", "4000",
              "--period-ms", "20")
    assert r["cycles"] > 0 and r["cycle_errors"] == 0
    assert r["telemetry"]["batches_sent"] > 0 and r["telemetry"]["frames_received"] > 0
    assert r["telemetry"]["rejected"] == 0


def test_bench_fuzz_smoke_json():
    """bench fuzz --smoke attacks a real `v2grt run` with every kind and reports goals, refusals and survival."""
    from bench_fuzz import KINDS

    r = bench("fuzz", "--smoke")
    agg = r["aggregator"]
    assert agg["survived"] and agg["exit_code"] == 0, (agg["exit_code"], agg.get("stderr_last_line"))
    assert r["sent"]["total"] == r["config"]["messages"] == 3000
    assert all(r["sent"]["by_kind"][k] > 0 for k in KINDS), r["sent"]["by_kind"]
    assert r["sent"]["bytes_by_kind"]["huge_ids"] >= 3_700_000 * r["sent"]["by_kind"]["huge_ids"]
    assert r["goals"].keys() == {"missed_deadlines", "interarrival_p99_ms", "interarrival_max_ms", "rss_growth_bytes",
                                 "engine_log_bytes", "messages_sent", "aggregator_survived"}
    delta = r["aggregator"]["status_delta"]
    assert delta["cycles"] > 0 and sum(delta["telemetry_errors"].values()) > 0
    assert r["setpoints"]["quiet"]["messages"] > 0 and r["setpoints"]["attack"]["messages"] > 0
    assert r["aggregator"]["rss_after_bytes"] > 0 and r["engine_log"]["bytes"] >= 0
    assert r["control_probe"]["timeouts"] == 0 and r["aggregator"]["receive_after"]["busy_s"] > 0


def test_bench_fuzz_reads_the_status_keys_that_exist():
    """status_delta diffs each error map by code and marks one this version's status reply lacks as None."""
    from bench_fuzz import status_delta

    before = {"loop": {"cycles": 10, "missed_deadlines": 1, "budget_overruns": 0, "errors": 0},
              "telemetry_errors": {"BAD_MSGPACK": 5}, "events": {"UNKNOWN_NODE": 2}}
    after = {"loop": {"cycles": 30, "missed_deadlines": 4, "budget_overruns": 2, "errors": 0},
             "telemetry_errors": {"BAD_MSGPACK": 9, "MULTIPART": 3}, "control_errors": {"UNKNOWN_CMD": 7},
             "events": {"UNKNOWN_NODE": 2, "INVALID_TELEMETRY": 1}}
    d = status_delta(before, after)
    assert (d["cycles"], d["missed_deadlines"], d["budget_overruns"]) == (20, 3, 2)
    assert d["telemetry_errors"] == {"BAD_MSGPACK": 4, "MULTIPART": 3}
    assert d["control_errors"] == {"UNKNOWN_CMD": 7} and d["telemetry_refused_nodes"] is None
    assert d["events"] == {"INVALID_TELEMETRY": 1}
