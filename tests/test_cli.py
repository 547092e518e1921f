"""The command line, run as a real process: v2grt dispatch and v2grt bench."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def v2grt(*args, check=False):
    return subprocess.run([sys.executable, "-m", "v2grt.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=check)


def test_dispatch_random_fleet_prints_summary():
    """The README's first command prints target, availability and exclusions for 10,000 vehicles."""
    proc = v2grt("dispatch", "--fleet", "random:10000", "--frequency", "49.8")
    assert proc.returncode == 0, proc.stderr
    assert "10000 vehicles" in proc.stdout and "target" in proc.stdout and "SOC_BELOW_MINIMUM" in proc.stdout


def test_dispatch_json_and_csv_agree(tmp_path):
    """--json gives the summary and --out writes one row per vehicle whose setpoints sum to the target."""
    out = tmp_path / "setpoints.csv"
    proc = v2grt("dispatch", "--fleet", "configs/fleet_example.csv", "--frequency", "49.7", "--service", "fcr",
                 "--capacity-kw", "60", "--policy", "prorata", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["target_kw"] == 60.0 and summary["policy"] == "prorata"
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and rows[0].keys() == {"node_id", "setpoint_kw", "reason"}
    assert abs(sum(float(r["setpoint_kw"]) for r in rows) - 60.0) < 1e-2
    assert all(float(r["setpoint_kw"]) == 0.0 for r in rows if r["reason"] == "OFFLINE")


def test_dispatch_over_frequency_charges():
    """Over-frequency gives a negative (charging) target, per the sign convention."""
    proc = v2grt("dispatch", "--fleet", "random:500", "--frequency", "50.3", "--json")
    assert json.loads(proc.stdout)["target_kw"] < 0


def test_dispatch_bad_inputs_name_the_problem(tmp_path):
    """Bad frequency, service, SoC floor and roster each exit 2 with a message naming what is wrong."""
    cases = [
        (["--fleet", "random:10", "--frequency", "4980"], "frequency_hz=4980.0"),
        (["--fleet", "random:10", "--frequency", "49.9", "--service", "nope"], "nope"),
        (["--fleet", "random:10", "--frequency", "49.9", "--minimum-soc", "1.5"], "minimum_soc=1.5"),
        (["--fleet", str(tmp_path / "missing.csv"), "--frequency", "49.9"], "no such file"),
        (["--fleet", "random:x", "--frequency", "49.9"], "random:N"),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("node_id,gateway_id,site_id,soc,capacity_kwh,p_dis_max_kw,p_chg_max_kw\nEV1,gw1,s1,1.7,60,11,11\n")
    cases.append((["--fleet", str(bad), "--frequency", "49.9"], "bad.csv:2: soc='1.7'"))
    for args, expected in cases:
        proc = v2grt("dispatch", *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def bench_kernel_json() -> dict:
    proc = v2grt("bench", "kernel", "--sizes", "1000", "--cycles", "20", "--ref-cycles", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bench_kernel_json_reports_ratios():
    """v2grt bench kernel --json reports Cython, reference and roofline side by side, with ratios."""
    result = bench_kernel_json()
    row = result["results"][0]
    assert row["nodes"] == 1000 and row["reference_over_cython"] > 0.0
    assert {"p50_ms", "p99_ms", "max_ms"} <= row["cython"].keys()
    assert result["machine"]["cores"] >= 1


@pytest.mark.perf
def test_bench_kernel_finds_the_twin_slower_than_cython():
    """On a quiet machine the NumPy twin takes longer per cycle than the Cython kernel at 1,000 vehicles."""
    assert bench_kernel_json()["results"][0]["reference_over_cython"] > 1.0


def test_every_deferred_import_in_the_package_resolves():
    """Imports inside functions (the CLI defers most of them) name modules and attributes that exist: a moved
    name otherwise fails only when that one command runs."""
    import ast
    import importlib
    from pathlib import Path

    import v2grt

    root = Path(v2grt.__file__).parent
    missing = []
    for path in sorted(root.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("v2grt"):
                    module = importlib.import_module(node.module)
                    missing += [f"{path.relative_to(root.parent)}:{node.lineno}: {node.module}.{a.name}"
                                for a in node.names if not hasattr(module, a.name)
                                and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []
