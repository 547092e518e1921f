"""`v2grt prequal` end to end: the real aggregator and gateway processes, the simulated SunSpec meter and site
inverters on loopback, the journal read back; a healthy fleet passes, a fleet too small for its contract fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_demo import wait_gone

from v2grt.journal import SUFFIX, read_segment

pytestmark = pytest.mark.slow

VEHICLES, GATEWAYS = 120, 2


def prequal(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "prequal", "--quick", "--vehicles", str(VEHICLES),
                           "--gateways", str(GATEWAYS), "--seed", "3", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    path = out / "report.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def check_structure(out: Path, report: dict, service: str, n_tests: int) -> None:
    assert report["service"] == service and report["quick"] is True
    assert report["vehicles"] == VEHICLES and report["gateways"] == GATEWAYS
    assert report["capacity_kw"] > 500.0  # 120 vehicles of 7.4-22 kW, the aggregator's default contract
    assert "site inverters" in report["measured_at"]
    assert len(report["tests"]) == n_tests
    for test in report["tests"]:
        assert test["source"] and test["hold_source"] and test["samples"] > 20
        assert test["checks"], test["name"]
        for c in test["checks"]:
            assert set(c) == {"name", "criterion", "limit", "measured", "unit", "passed"}
        png = (out / test["png"]).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
    segs = sorted(Path(report["journal"]).glob(f"*{SUFFIX}"))
    cycles = np.concatenate([read_segment(p).cycles for p in segs])
    # the evidence: the journal holds the inverters' measured power during the tests, not only setpoints
    assert np.isfinite(cycles["site_measured_kw"]).mean() > 0.9
    assert np.nanmax(np.abs(cycles["site_measured_kw"])) > 0.5 * report["capacity_kw"]


def test_dc_quick_a_healthy_fleet_passes_every_test(tmp_path):
    """DC's four steps (+-0.2, +-0.5 Hz): exit 0, every check passes, with the rule's limits (0.5 s, 1 s, 3 %)
    next to the measured values in report.json, the table and a PNG per test; no process left behind."""
    out = tmp_path / "pq"
    proc, report = prequal(out, "--service", "dc", "--unreachable-fraction", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_structure(out, report, "dc", 4)
    assert report["passed"] and all(t["passed"] for t in report["tests"])
    limits = {c["name"]: c["limit"] for c in report["tests"][0]["checks"]}
    assert limits == {"start": 0.5, "full": 1.0, "steady": 0.03}
    for test in report["tests"]:
        full = next(c for c in test["checks"] if c["name"] == "full")
        assert 0.0 < full["measured"] <= 1.0
    assert "ALL PASS" in proc.stdout and "dc_step_-0.5hz" in proc.stdout
    assert wait_gone(str(out)) == []


def test_ffr_quick_a_healthy_fleet_passes_trigger_support_release_and_no_trigger(tmp_path):
    """FFR (Fingrid 49.7 Hz): full within 1.3 s of a 1 s dip, held >= 5 s by the latch, released at <= 20 %/s,
    and no activation for a dip that stays above the trigger."""
    out = tmp_path / "pq"
    proc, report = prequal(out, "--service", "ffr", "--unreachable-fraction", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_structure(out, report, "ffr_49.7", 2)
    checks = {c["name"]: c for t in report["tests"] for c in t["checks"]}
    assert set(checks) == {"ffr_full", "ffr_support", "ffr_release", "ffr_quiet"}
    assert checks["ffr_support"]["measured"] >= 5.0
    assert 0.1 < checks["ffr_release"]["measured"] <= 0.23  # it did release, no faster than the rule allows


def test_a_fleet_too_small_for_its_contract_fails(tmp_path):
    """Contracted at 3x what the fleet can hold: the -0.5 Hz step's full delivery never comes and steady
    delivery is short by two thirds: exit 1 and FAIL in the table (the criteria can fail)."""
    out = tmp_path / "pq"
    probe, _ = prequal(tmp_path / "probe", "--service", "dc", "--only", "nothing")  # exits 2 naming the tests
    assert probe.returncode == 2 and "dc_step_-0.5hz" in probe.stderr
    proc, report = prequal(out, "--service", "dc", "--only", "dc_step_-0.5hz", "--capacity-kw", "4000")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert report["capacity_kw"] == 4000.0 and not report["passed"]
    checks = {c["name"]: c for c in report["tests"][0]["checks"]}
    assert checks["start"]["passed"]  # it does respond, at once ...
    assert checks["full"]["measured"] is None and not checks["full"]["passed"]  # ... but never in full
    assert checks["steady"]["measured"] > 0.3 and not checks["steady"]["passed"]
    assert "FAIL" in proc.stdout
