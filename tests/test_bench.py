"""Smoke tests of the benchmarks (v2grt.bench): each runs at a tiny size with --json and reports the documented
shape, from this checkout and from a wheel installed into a fresh venv (the deployment host has no checkout).

Benchmarks are not timed tests: these assert structure and counts, never a latency.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from v2grt import bench as benchmarks

ROOT = Path(__file__).resolve().parent.parent


def bench(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "bench", *args, "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_cyclictest_histogram_is_parsed_into_percentiles():
    """cyclictest's --histfile (1 us buckets, overflow and max trailers) gives nearest-rank percentiles."""
    from v2grt.bench.bench_loop import histogram_percentiles, parse_histogram

    lines = ["# Histogram"] + [f"{us:06d} {count:06d}" for us, count in [(0, 0), (10, 900), (20, 90), (30, 0),
                                                                         (40, 9)]]
    lines += ["# Total: 000001000", "# Min Latencies: 00010", "# Avg Latencies: 00011", "# Max Latencies: 00250",
              "# Histogram Overflows: 00001", "# Histogram Overflow at cycle number:", "# Thread 0: 17"]
    p = histogram_percentiles(parse_histogram("\n".join(lines)))
    assert p == {"n": 1000, "p50_us": 10, "p99_us": 20, "p999_us": 40, "max_us": 250, "mean_us": pytest.approx(11.41)}


def test_bench_loop_json():
    """bench loop --smoke reports v2grt's lateness per period and, with cyclictest installed, the p99 ratio."""
    r = bench("loop", "--smoke")
    row = r["results"][0]
    assert row["period_ms"] == 10.0 and row["v2grt"]["n"] >= 20
    assert {"p50_us", "p99_us", "p999_us", "max_us"} <= row["v2grt"].keys()
    if r["cyclictest"]["path"]:
        assert row["cyclictest"]["n"] == 60 and row["p99_ratio"] > 0
    else:
        assert "rt-tests" in r["cyclictest"]["hint"]


def test_bench_cycle_json():
    """bench cycle --smoke runs the real aggregator and reports every phase and the delivered setpoint frames."""
    r = bench("cycle", "--smoke")
    row = r["results"][0]
    assert (row["nodes"], row["gateways"]) == (2000, 4) and row["cycles"] >= 5
    assert {"total", "kernel", "publish", "inputs", "lateness"} <= row["phases"].keys()
    assert row["setpoint_frames_received"] > 0 and row["publish_breakdown_p50_ms"]["frames_ms"] > 0
    # the publisher thread (the default): the deadline-to-last-frame time beside the control thread's cost
    assert row["publisher_thread"] and row["phases"]["wire"]["n"] >= 5


def test_bench_e2e_json():
    """bench e2e --smoke times frequency steps at the Modbus meter to the gateway and splits the latency."""
    r = bench("e2e", "--smoke")
    row = r["results"][0]
    assert row["arrived"] == 4 and row["latency"]["n"] == 4
    # with the publisher thread (the default) the time after the control thread's hand-over is split apart
    assert row["publisher_thread"] and row["split_n"] > 0
    assert row["split_mean_ms"].keys() == {"meter", "wait", "cycle", "queue", "send", "delivery", "last_frame"}
    assert all(row["split_mean_ms"][k] is not None for k in ("queue", "send", "delivery", "last_frame"))


def test_bench_sends_json():
    """bench sends --smoke sends a cycle's frames both ways, interleaved, and every frame reaches the subscriber."""
    r = bench("sends", "--smoke")
    x = r["result"]
    assert x["sends"].keys() == {"reference", "cython"} and x["sends"]["cython"]["n"] == 3
    assert x["frames_received"] == x["frames_expected"] == 2 * 3 * 10 and x["frames_refused"] == 0


def test_bench_qualify_json(tmp_path):
    """bench qualify --smoke measures all four parts, inspects the host, gives a verdict and writes json and png."""
    out = tmp_path / "q"
    r = bench("qualify", "--smoke", "--out", str(out))
    assert r["smoke"] and r["sentence"].startswith("SMOKE RUN, NOT A QUALIFICATION")
    assert (r["target"]["vehicles"], r["target"]["gateways"]) == (1000, 4)
    assert r["loop"]["v2grt"]["n"] > 0 and r["kernel"]["kernel"]["n"] == 20 and r["kernel"]["kernel_over_roofline"] > 0
    assert r["cycle"]["phases"]["total"]["n"] >= 5 and r["cycle"]["setpoint_frames_received"] > 0
    assert r["e2e"]["arrived"] == 3
    assert {f["check"] for f in r["host"]} >= {"preemption", "sched_fifo", "cpu_isolation", "irq_affinity", "smt",
                                                "cpu_governor", "rt_throttling", "memlock"}
    assert r["verdict"] in ("HOLDS", "HOLDS, NARROWLY", "DOES NOT HOLD") and len(r["rules"]) == 4
    assert json.loads((out / "qualify.json").read_text())["verdict"] == r["verdict"]
    assert (out / "qualify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qualify_reads_size_gateways_and_realtime_from_the_config(tmp_path):
    """The target is the roster's rows and gateway ids, the config's period, poll, journal and real-time settings."""
    from v2grt.bench.bench_qualify import target_from_config
    from v2grt.fleet import Fleet

    roster = ROOT / "tests" / "data" / "roster_small.csv"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"period_s: 0.05\nbudget_s: 0.04\nfleet: {{roster: {roster}}}\n"
                   "realtime: {sched_fifo_priority: 60, cpu_affinity: [1]}\nmeter: {poll_interval_s: 0.002}\n")
    fleet = Fleet.from_csv(roster)
    t = target_from_config(str(cfg), None, None)
    assert (t["vehicles"], t["gateways"]) == (len(fleet), len(fleet.gateway_ids))
    assert (t["period_ms"], t["budget_ms"], t["poll_ms"]) == (50.0, 40.0, 2.0)
    assert (t["sched_fifo_priority"], t["cpu_affinity"], t["journal"]) == (60, [1], False)
    cfg.write_text("fleet: {random: 12000}\n")
    assert target_from_config(str(cfg), None, None)["gateways"] == 24  # one per 500, as Fleet.random makes them


def test_qualify_verdict_names_the_rule_that_fails():
    """A missed deadline, or a p99 eating the budget, turns the verdict; a thin margin says narrowly."""
    from v2grt.bench.bench_qualify import verdict

    target = {"period_ms": 100.0, "budget_ms": 100.0, "vehicles": 10, "gateways": 1}
    loop = {"v2grt": {"p99_us": 200, "max_us": 900}}
    e2e = {"latency": {"p99_ms": 80.0}, "timeouts": 0}

    def cycle(p99, mx, missed=0):
        return {"phases": {"total": {"p99_ms": p99, "max_ms": mx}}, "missed_deadlines": missed}

    assert verdict(target, loop, cycle(5.0, 9.0), e2e)["verdict"] == "HOLDS"
    assert verdict(target, loop, cycle(80.0, 90.0), e2e)["verdict"] == "HOLDS, NARROWLY"
    tight = verdict(target, loop, cycle(5.0, 9.0), {"latency": {"p99_ms": 109.0}, "timeouts": 0})
    assert tight["verdict"] == "HOLDS, NARROWLY" and tight["margin_e2e"] == pytest.approx(0.1)
    bad = verdict(target, loop, cycle(5.0, 9.0, missed=1), e2e)
    assert bad["verdict"] == "DOES NOT HOLD" and not bad["rules"][0]["met"] and all(r["met"] for r in bad["rules"][1:])
    slow = verdict(target, loop, cycle(5.0, 9.0), {"latency": {"p99_ms": 130.0}, "timeouts": 0})
    assert slow["verdict"] == "DOES NOT HOLD" and not slow["rules"][3]["met"]


def test_bench_e2e_ocpp_json():
    """bench e2e --protocol ocpp --smoke runs the gateway and stations as processes and times every phase to the
    stations' own application of each step."""
    r = bench("e2e", "--protocol", "ocpp", "--smoke")
    row = r["results"][0]
    assert r["protocol"] == "ocpp" and row["exit_codes"] == {"gateway": 0, "stations": [0]}
    assert row["steps_timed"] == 4 and row["latency"]["n"] >= 4 and row["sent_not_applied"] == 0
    assert row["phases"].keys() == {"meter_to_publish", "publish_to_send", "send_to_receive", "receive_to_apply"}
    assert all(p["n"] == row["latency"]["n"] for p in row["phases"].values())
    assert row["gateway_counters"]["updates_sent"] > 0
    if os.geteuid() == 0:  # --gateway-priority granted (the smoke asks 1): every gateway thread says so (RT_SETUP)
        assert r["config"]["gateway_priority"] == 1 and row["gateway_threads_fifo"] >= 3


def test_bench_gateway_ocpp_json():
    """bench gateway --protocol ocpp --smoke reads the gateway process's CPU while every EVSE is online and the
    updates the load asks for go out."""
    r = bench("gateway", "--protocol", "ocpp", "--smoke")
    (row,) = r["results"]
    assert (row["stations"], row["nodes"], row["rate_per_s"]) == (4, 8, 2.0) and row["online_at_end"] == 8
    # the window is what the loop really measured: under load a late set_frequency call can start it late
    assert row["gateway_cpu_percent"] >= 0 and row["measure_s"] > 1.0 and row["updates_per_s"] >= 0
    assert row["gateway_counters"]["updates_sent"] > 0 and row["gateway_counters"]["calls_received"] > 0
    assert row["exit_codes"] == {"gateway": 0, "stations": [0]}


def test_bench_e2e_sunspec_json():
    """bench e2e --protocol sunspec --smoke steps the meter through real aggregator, gateway and charger processes
    and splits each charger's latency into phases that add up to its total."""
    r = bench("e2e", "--protocol", "sunspec", "--smoke")
    (row,) = r["results"]
    assert r["protocol"] == "sunspec" and row["steps"] == 4 and row["missing"] == 0 and row["steps_unanswered"] == 0
    per = row["per_charger"]
    assert per["total"]["n"] >= 4 * 3 and row["last_charger"]["total"]["n"] == 4  # every step moves the chargers
    assert per["total"]["mean_ms"] == pytest.approx(sum(per[k]["mean_ms"] for k in (
        "meter_to_publish", "publish_to_write", "write_to_applied")))
    assert row["exit_codes"] == [{"gateway": 0, "sim": 0, "aggregator": 0}]
    assert row["gateway_counters"][0]["modbus_writes_ok"] > 0 and row["cpu_percent_of_a_core"]["gateway"] > 0
    if os.geteuid() == 0:  # --sched-fifo-priority granted: every thread of the gateway says so (RT_SETUP)
        assert (row["gateway_priority"], row["sim_priority"]) == (1, 1) and row["gateway_threads_fifo"][0] >= 3


def test_bench_gateway_sunspec_json():
    """bench gateway --protocol sunspec --smoke runs a real gateway process against simulated chargers and reports
    its CPU, the polls it kept up and whether it held the size."""
    r = bench("gateway", "--protocol", "sunspec", "--smoke")
    (row,) = r["results"]
    assert r["protocol"] == "sunspec" and row["devices"] == 8 and row["gateway_exit"] == 0
    assert row["window_s"] > 1.0 and row["polls_per_device_s"] > 0.5 and row["writes_per_s"] > 0
    assert row["gateway_cpu_pct"] > 0 and row["counters"]["devices_connected_min"] == 8
    assert r["goal"]["met"] is None  # 1,000 devices were not measured


def test_sunspec_benches_put_their_simulators_on_free_ports(tmp_path):
    """Without --base-port the SunSpec benches' simulators get ports that are free at the start, one per server
    and grouped as write_site grouped them (two runs at once no longer both take 17000/20000 and up); with one,
    write_site's ports stay."""
    import socket

    from v2grt.bench.gateway_sunspec import place_on_ports
    from v2grt.gateway import sunspec_mapping as sm
    from v2grt.sim.sunspec_chargers import write_site

    given = write_site(tmp_path / "given", n_devices=5, units_per_server=2, base_port=20000)
    assert place_on_ports(given["devices"], 20000) == [20000, 20001, 20002]
    paths = write_site(tmp_path / "free", n_devices=5, units_per_server=2, base_port=1)
    ports = place_on_ports(paths["devices"], None)
    devs = sm.load_devices(paths["devices"])
    assert [devs[f"SS000{i}"].port for i in range(1, 6)] == [ports[0], ports[0], ports[1], ports[1], ports[2]]
    assert len(set(ports)) == 3 and min(ports) >= 1024
    for port in ports:  # free now: each can be bound
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_simulator_port_is_named_in_the_benchs_error(tmp_path):
    """A simulated charger's port already taken stops the SunSpec bench with an error that names host and port."""
    import socket

    from v2grt.bench._common import child_env
    from v2grt.bench.gateway_sunspec import wait_sims_serving
    from v2grt.sim.sunspec_chargers import write_site

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        paths = write_site(tmp_path / "site", n_devices=1, gateway_id="ss1", base_port=port)
        with open(tmp_path / "sim.stderr", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "v2grt.cli", "sim", "sunspec-chargers", "--roster",
                                     str(paths["roster"]), "--devices", str(paths["devices"]), "--gateway-id", "ss1",
                                     "--log-file", str(tmp_path / "sim.log")],
                                    stdout=subprocess.DEVNULL, stderr=err, env=child_env())
        try:
            with pytest.raises(RuntimeError, match=f"simulator 0 exited.*127\\.0\\.0\\.1:{port}"):
                wait_sims_serving([(tmp_path / "sim.log", tmp_path / "sim.stderr", proc)], 60)
        finally:
            proc.kill()
            proc.wait()


def test_a_bench_world_keeps_pymodbus_errors_and_their_frames_off_stderr():
    """A process that starts a bench World (it reads the world's meter) prints no pymodbus error with its frame
    dump on stderr, as `bench cycle` did once during a meter reconnect ("Cancel send ...", ">>>>> send: ...")."""
    code = ("from v2grt.bench._common import World\n"
            "from pymodbus.logging import Log\n"
            "w = World()\n"
            "Log.transport_dump(Log.SEND_DATA, b'\\x00\\x41', None)\n"
            "Log.error('Cancel send, because not connected!')\n"
            "w.stop()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Cancel send" not in proc.stderr and ">>>>>" not in proc.stderr


def test_bench_ocpp_schema_json():
    """bench ocpp_schema --smoke times both checks of one MeterValues on the same messages and gives their ratio."""
    r = bench("ocpp_schema", "--smoke")
    assert r["results"]["compiled"]["n"] == r["results"]["ocpp_package"]["n"] == 200 and r["ratio_p50"] > 0


def test_bench_soak_json():
    """bench soak --smoke counts cycles, deadlines and telemetry batches sent, received and rejected."""
    r = bench("soak", "--smoke")
    assert r["cycles"] > 0 and r["cycle_errors"] == 0
    assert r["telemetry"]["batches_sent"] > 0 and r["telemetry"]["frames_received"] > 0
    assert r["telemetry"]["rejected"] == 0


def test_bench_soak_sweep_reports_the_highest_rate_sustained():
    """bench soak --rates runs one soak per rate and names the highest one that held every rule."""
    r = bench("soak", "--smoke", "--rates", "1000,2000")
    assert r["mode"] == "sweep" and [x["rate_asked"] for x in r["results"]] == [1000.0, 2000.0]
    assert all(x["batches_sent"] > 0 and x["cycles"] > 0 for x in r["results"])
    ok = [x["rate_sent"] for x in r["results"] if x["sustained"]["ok"]]
    assert r["highest_sustained_rate"] == (max(ok) if ok else None)


def test_soak_sustained_rules_each_can_fail():
    """A missed deadline, an unapplied batch, a generator short of the rate or a stale meter each fail the rate."""
    from v2grt.bench.bench_soak import sustained

    good = dict(missed=0, overruns=0, sent=1000, received=995, rejected=0, sent_rate=500_000.0, asked_rate=500_000.0,
                gateways=200, meter_age={"max_ms": 60.0})
    assert sustained(**good)["ok"]
    for change, rule in [({"missed": 1}, "no_missed_deadline"), ({"received": 700}, "all_batches_applied"),
                         ({"rejected": 1}, "all_batches_applied"), ({"sent_rate": 400_000.0}, "generator_reached_rate"),
                         ({"meter_age": {"max_ms": 1500.0}}, "meter_stayed_fresh")]:
        r = sustained(**{**good, **change})
        assert not r["ok"] and not r["rules"][rule], change


def test_bench_failover_smoke_json():
    """bench failover --smoke kills the leader once on the HA rig: a gap, no double-leader frame, goals reported."""
    r = bench("failover", "--smoke")
    (row,) = r["results"]
    assert (row["fault"], row["repeats"], row["leader_changed"]) == ("kill9", 1, 1)
    assert row["gap_s"]["n"] == 1 and row["double_leader"] == 0 and row["stale"] == 0
    assert set(r["goals"]) == {"kill9_gap_p99_s", "double_leader"} and r["goals"]["double_leader"]["met"]


def test_bench_fuzz_smoke_json():
    """bench fuzz --smoke attacks a real `v2grt run` with every kind and reports goals, refusals and survival."""
    from v2grt.bench.bench_fuzz import KINDS

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
    from v2grt.bench.bench_fuzz import status_delta

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


def test_bench_ocppfuzz_smoke_json():
    """bench ocppfuzz --smoke attacks a real OCPP gateway with every message and connection kind while honest
    stations run, and reports survival, the honest stations' updates, the gateway's counters and the goals."""
    from v2grt.bench._ocpp_attack import CONNECT_MIX, MESSAGE_MIX

    r = bench("ocppfuzz", "--smoke")
    g = r["gateway"]
    assert g["survived"] and g["exit_codes"]["gateway"] == 0, (g["exit_codes"], g["stderr_tail"])
    sent = r["sent"]["by_kind"]
    assert r["sent"]["messages"] > 100 and sum(sent[k] for k in CONNECT_MIX) > 0 and sent["slowloris"] > 0
    assert sum(1 for k in MESSAGE_MIX if sent[k]) >= len(MESSAGE_MIX) - 3, sent  # a few seconds: most kinds
    assert r["honest"]["online_min_attack"] == r["honest"]["evses"] and r["honest"]["attack"]["updates"] > 0
    assert sum(v for k, v in g["counters"].items() if k.startswith("callerror_")) > 0
    assert g["counters"].get("refused_BAD_CREDENTIALS", 0) + g["counters"].get("refused_UNKNOWN_STATION", 0) > 0
    assert r["goals"].keys() == {"gateway_survived", "honest_evses_dropped", "honest_updates_ratio",
                                 "handed_sent_p99_ms", "rss_growth_bytes", "log_bytes"}
    assert g["stderr_bytes"] == 0, g["stderr_tail"]


# ------------------------------------------------------------------------------ from a wheel, without a checkout
#: Left out of the copy a wheel is built from: what a build makes (a stale build/ would put modules removed from
#: the tree into the wheel, hiding a packaging fault) and what it does not need.
BUILD_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                      ".hypothesis", ".venv", "demo-out", "*.so", "*.c")


def _run(cmd: list, *, cwd: Path, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict:
    """This tree's wheel installed into a fresh venv, run from an empty directory: nothing of the checkout is
    importable there. Built once per session from a copy of the tree (the Cython kernel compiles), without build
    isolation, and the venv sees this environment's site-packages (numpy, pyzmq, ...): no network."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv, cwd = tmp / "src", tmp / "dist", tmp / "venv", tmp / "run"
    shutil.copytree(ROOT, src, symlinks=True, ignore=BUILD_IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist],
         cwd=tmp, timeout=900)
    shutil.rmtree(src)
    (wheel,) = dist.glob("v2grt-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    # The environment's pip, run by the venv's python, installs into the venv; --ignore-installed: this
    # environment's own (editable) v2grt is neither reused nor touched.
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
          wheel], cwd=tmp)
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"bin": venv / "bin", "venv": venv, "cwd": cwd, "env": env}


def installed_v2grt(installed: dict, *args, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """The venv's `v2grt` script with these arguments, from the empty directory."""
    return _run([installed["bin"] / "v2grt", *args], cwd=installed["cwd"], timeout=timeout, env=installed["env"])


@pytest.mark.slow
def test_installed_package_has_every_benchmark_and_the_shipped_configs(installed):
    """The wheel's v2grt is the venv's own, lists the checkout's benchmarks, and carries configs/ as package data."""
    code = ("import json, v2grt, v2grt.bench as b; from importlib import resources; "
            "print(json.dumps({'file': v2grt.__file__, 'names': b.names(), 'configs': sorted(p.name for p in "
            "(resources.files('v2grt') / 'data' / 'configs').iterdir())}))")
    proc = _run([installed["bin"] / "python", "-c", code], cwd=installed["cwd"], env=installed["env"])
    got = json.loads(proc.stdout)
    assert Path(got["file"]).is_relative_to(installed["venv"]), got["file"]
    assert got["names"] == benchmarks.names() and "fuzz" in got["names"]
    assert {"default.yaml", "discharge_profile.json"} <= set(got["configs"])


@pytest.mark.slow
@pytest.mark.parametrize("name", benchmarks.names())
def test_installed_benchmark_smoke_prints_its_json(installed, name):
    """`v2grt bench NAME --smoke --json` from the installed wheel exits 0 and prints one JSON object."""
    proc = installed_v2grt(installed, "bench", name, "--smoke", "--json", timeout=180)
    result = json.loads(proc.stdout)
    assert "machine" in result, sorted(result)
    if "source" in result:  # measured the installed package, not a checkout
        assert Path(result["source"]["package"]).is_relative_to(installed["venv"]), result["source"]


@pytest.mark.slow
def test_installed_benchmark_prints_its_table(installed):
    """Without --json an installed benchmark prints its table (a header over a rule of dashes)."""
    lines = installed_v2grt(installed, "bench", "kernel", "--smoke").stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    assert rule > 0 and "1000" in "\n".join(lines[rule + 1:])


def test_bench_ab_runs_each_tree_in_turn_and_gives_the_ratio():
    """bench ab --smoke runs the kernel smoke from two trees alternately and reports every p50/p99 with a ratio."""
    r = bench("ab", "--smoke")
    assert r["trees"] == ["a", "b"] and [run["tree"] for run in r["runs"]] == ["a", "b"]
    row = next(s for s in r["summary"] if s["metric"] == "results[nodes=1000].cython.p50_ms")
    assert row["ratio_first_over"]["b"] == pytest.approx(row["median"]["a"] / row["median"]["b"])
    assert all(m.endswith(("p50_ms", "p99_ms")) for s in r["runs"] for m in s["metrics"])


def test_bench_ab_flattens_json_by_labels_and_refuses_a_tree_without_v2grt(tmp_path):
    """List items are named by their nodes/name field, booleans are not numbers, and a tree that is not a source
    tree is refused with its path named (exit 2)."""
    from v2grt.bench import bench_ab

    flat = bench_ab.flatten({"results": [{"nodes": 10, "p50_ms": 1.5, "ok": True}, {"x": 2}], "n": 3})
    assert flat == {"results[nodes=10].nodes": 10.0, "results[nodes=10].p50_ms": 1.5, "results[1].x": 2.0, "n": 3.0}
    assert bench_ab.select(flat, ["*p50_ms"]) == {"results[nodes=10].p50_ms": 1.5}
    runs = [{"tree": "old", "metrics": {"m": 4.0}}, {"tree": "new", "metrics": {"m": 2.0}},
            {"tree": "old", "metrics": {"m": 6.0}}, {"tree": "new", "metrics": {"m": 2.0}}]
    (row,) = bench_ab.summarize(["old", "new"], runs)
    assert row["median"] == {"old": 5.0, "new": 2.0} and row["ratio_first_over"] == {"new": 2.5}
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "bench", "ab", "--tree", f"x={tmp_path}", "--tree",
                           f"y={ROOT}", "--", "kernel", "--smoke"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr and "v2grt/__init__.py" in proc.stderr
