"""`v2grt demo --ha` end to end at small scale: etcd, two aggregators, a meter and gateways on the HA rig
(network namespaces as root, else loopback), the leader killed midway, the gap reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_ha_kills_the_leader_midway_and_reports_the_gap(tmp_path):
    """A 8 s HA demo: exit 0, the other aggregator took over with a newer epoch, no frame of two leaders
    accepted, the killed one back as the standby, and no namespace or process left behind."""
    out = tmp_path / "demo-ha"
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "demo", "--ha", "--vehicles", "40", "--gateways", "2",
                           "--duration", "8", "--out", str(out), "--no-live"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["new"] != r["old"] and r["new_epoch"] > r["old_epoch"]
    assert r["double_leader"] == 0 and r["stale_after_newer"] == 0
    assert set(r["gap_s"]) == {"gw1", "gw2"} and 0 < r["gap_max_s"] < 10
    assert r["restarted_role"] == "standby"
    assert f"took over: setpoint gap at the gateways {r['gap_max_s']:.3f} s" in proc.stdout
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if r["netns"] else ""
    assert not [line for line in left.splitlines() if line.startswith(r["rig_tag"] + "-")], left
