"""The dispatch journal: framing and its torn-tail rule, a real aggregator killed with SIGKILL mid-write and
read back, a full disk (a real tiny tmpfs) alarmed while the loop goes on, rotation, retention, Parquet,
`v2grt journal export`, the config section, and docs/journal.md pinned to the code's schema."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from _plant import (
    GATEWAYS,
    V2GRT,
    VEHICLES,
    SimGateway,
    logging_restored,
    run,
    short_dir,
    start_aggregator,
    stop_process,
    wait_until,
    write_config,
)

from v2grt import journal, reference
from v2grt.aggregator import Aggregator
from v2grt.config import ConfigError, config_from_dict, load_config
from v2grt.kernel import available_isas, compiled
from v2grt.leadership import LEADER, LeaderView
from v2grt.sim.sunspec import SimServerThread, SunSpecInverter, SunSpecMeter

DOCS = Path(__file__).resolve().parent.parent / "docs" / "journal.md"


@pytest.fixture
def sockets():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def meter():
    m = SunSpecMeter(203, f_hz=49.8)  # DC: a discharge response, so setpoints and reported power are non-zero
    sim = SimServerThread([m]).start()
    yield m, sim.port(m)
    sim.stop()


@pytest.fixture
def inverter():
    inv = SunSpecInverter(p_kw=37.0)  # site2's meter, as the grid operator reads it
    sim = SimServerThread([inv]).start()
    yield inv, sim.port(inv)
    sim.stop()


def _gateways(cfg):
    gws = [SimGateway(g, cfg.bus.setpoints, cfg.bus.telemetry) for g in GATEWAYS]
    for g in gws:
        g.start()
    return gws


def _segment_bytes(tmp_path: Path) -> tuple[Path, list[int]]:
    """A segment of a header and three CYCLES frames written by hand; the byte offset after each frame."""
    path = tmp_path / "t.v2j"
    dtype = journal.cycle_dtype(0)
    recs = np.zeros(3, dtype)
    recs["seq"] = [1, 2, 3]
    ends = []
    with open(path, "wb") as fh:
        fh.write(journal.MAGIC)
        header = {"dtype": dtype.descr, "segment_start_ns": 0, "segment_end_ns": 1}
        fh.write(journal.frame(journal.HEADER, json.dumps(header).encode()))
        ends.append(fh.tell())
        for r in recs:
            fh.write(journal.frame(journal.CYCLES, np.array([r], dtype).tobytes()))
            ends.append(fh.tell())
    return path, ends



def clear_of_the_hourly_rotation(run_s: float = 10.0) -> None:
    """Wait, if need be, until a run of `run_s` seconds cannot cross a UTC hour, where the journal starts a new
    segment (rotate_s 3600, aligned to the clock): the tests that read one segment would see two."""
    left_s = 3600.0 - time.time() % 3600.0
    if left_s < run_s:
        time.sleep(left_s + 0.5)

def test_a_torn_or_corrupt_frame_is_never_read(tmp_path):
    """Cut at every byte of the last frame, or one flipped bit, leaves exactly the whole frames before it."""
    path, ends = _segment_bytes(tmp_path)
    data = path.read_bytes()
    assert list(journal.read_segment(path).cycles["seq"]) == [1, 2, 3]
    for cut in range(ends[-2], ends[-1]):
        path.write_bytes(data[:cut])
        assert list(journal.read_segment(path).cycles["seq"]) == [1, 2]
    flipped = bytearray(data)
    flipped[ends[1] + 12] ^= 0x01  # inside the second record's payload
    path.write_bytes(bytes(flipped))
    assert list(journal.read_segment(path).cycles["seq"]) == [1]


def test_kill9_of_a_real_aggregator_loses_no_more_than_a_second(tmp_path, sockets, meter):
    """SIGKILL of v2g-aggregator while it journals: the segment reads back whole up to <= 1 s before the kill,
    every cycle once and in order, every vehicle sampled; the next start converts it to Parquet."""
    _m, port = meter
    jdir = tmp_path / "journal"
    cfg_path = write_config(tmp_path, sockets, meter_port=port, journal={"enabled": True, "dir": str(jdir)})
    cfg = load_config(cfg_path)
    proc = start_aggregator(cfg_path)
    gws = _gateways(cfg)
    try:
        wait_until(lambda: list(jdir.glob("*.v2j")), 15.0, what="a journal segment")
        time.sleep(3.0)
        proc.send_signal(signal.SIGKILL)
        t_kill_ns = time.time_ns()
        proc.wait(10)
    finally:
        for g in gws:
            g.stop()
        if proc.poll() is None:
            proc.kill()
    (seg_path,) = jdir.glob("*.v2j")
    seg = journal.read_segment(seg_path)
    c = seg.cycles
    assert not seg.sealed  # no END frame: the process never got to seal it
    assert len(c) >= 40  # 3 s at 50 ms
    # one record per cycle; seq moves on with each cycle handed to the wire: a cycle skipped because the publisher
    # thread was still sending (PUBLISHER_BUSY, seen under load) repeats the previous seq with published 0
    d = np.diff(c["seq"])
    assert np.all((d == 1) | ((d == 0) & (c["published"][1:] == 0))), "a cycle record missing or duplicated"
    assert np.all(np.diff(c["t_ns"]) > 0)
    assert t_kill_ns - c["t_ns"][-1] <= 1_000_000_000, "more than 1 s of records lost"
    assert np.all(c["epoch"] == c["epoch"][0]) and np.all(np.abs(c["f_hz"][-10:] - 49.8) < 1e-6)
    assert c["allocated_kw"][-1] > 0 and c["delivered_kw"][-1] > 0  # a discharge response, reported back
    seen = set(journal.vehicles_table(seg).column("node_id").to_pylist())
    assert seen == set(VEHICLES)

    # the next aggregator writes a new segment and converts the crashed one, torn tail left out
    proc = start_aggregator(cfg_path)
    try:
        paths = journal.parquet_paths(seg_path)
        wait_until(lambda: paths["cycles"].exists(), 30.0, what="the crashed segment's Parquet")
        table = pq.read_table(paths["cycles"])
        assert table.column("seq").to_pylist() == list(c["seq"])
        assert len(list(jdir.glob("*.v2j"))) == 2
    finally:
        stop_process(proc)


def test_full_disk_raises_an_alarm_and_the_loop_goes_on(tmp_path, sockets):
    """On a 256 kB tmpfs the journal fills the disk: JOURNAL_WRITE_FAILED is counted and shown as a metric,
    the cycles keep running, and writing resumes in a new segment once space is freed."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = load_config(write_config(tmp_path, sockets, journal={
            "enabled": True, "dir": str(tiny), "parquet": False, "max_age_h": None, "max_size_gb": None}))
        from v2grt.metrics import MetricsExporter

        with logging_restored():
            agg = Aggregator(cfg, epoch=1)
            metrics = MetricsExporter(interval_s=0.05)
            agg.cycle_hooks.append(metrics)
            agg.start()
            try:
                ballast = tiny / "ballast"
                ballast.write_bytes(b"\0" * 200_000)  # the journal gets ~50 kB
                wait_until(lambda: agg.journal.counters.failing, 20.0, what="JOURNAL_WRITE_FAILED")
                jn = agg.status_report()["journal"]  # what v2g-cli --status shows meanwhile
                assert jn["write_failing"] is True and jn["write_errors"] >= 1 and jn["last_error"]
                c0 = agg.stats.cycles
                time.sleep(0.5)
                assert agg.stats.cycles - c0 >= 5  # the loop goes on
                assert agg.events.counts["JOURNAL_WRITE_FAILED"] >= 1
                wait_until(lambda: metrics._snap is not None and metrics._snap.gauges["journal_write_failing"] == 1,
                           5.0, what="the journal_write_failing gauge")
                ballast.unlink()
                wait_until(lambda: not agg.journal.counters.failing, 5.0, what="the journal writing again")
            finally:
                agg.stop()
        segs = sorted(tiny.glob("*.v2j"))
        assert len(segs) >= 2  # the failed segment is closed, never appended to; writing went on in a new one
        for p in segs:
            journal.read_segment(p)  # each reads up to its last whole frame
        assert agg.events.counts["JOURNAL_WRITE_RESTORED"] >= 1
    finally:
        subprocess.run(["umount", "-l", str(tiny)], capture_output=True)


def test_status_reply_shows_the_journal(tmp_path, sockets):
    """`v2g-cli --status` (the control socket's status reply and its text) names the journal's directory, open
    segment and counts; every key of the `journal` map is documented in docs/wire.md 6.1."""
    import zmq

    from v2grt.io import bus
    from v2grt.operator import format_status

    jdir = tmp_path / "j"
    cfg = load_config(write_config(tmp_path, sockets, journal={"enabled": True, "dir": str(jdir), "parquet": False}))
    with logging_restored():
        agg = Aggregator(cfg, epoch=3)
        agg.start()
        try:
            with bus.ControlClient(zmq.Context.instance(), cfg.bus.control) as cli:
                wait_until(lambda: cli.call("status").result["journal"]["records"] >= 5, 10.0, what="records counted")
                st = cli.call("status").result
        finally:
            agg.stop()
    jn = st["journal"]
    assert jn["enabled"] is True and jn["dir"] == str(jdir) and jn["write_failing"] is False
    assert jn["segment"] in {p.name for p in jdir.glob("*.v2j")} and jn["dropped"] == 0 and jn["last_error"] == ""
    assert f"  journal        {jn['segment']} in {jdir}: {jn['records']} records, 0 dropped" in format_status(st)
    doc = (DOCS.parent / "wire.md").read_text()
    section = doc[doc.index("### 6.1 The status reply"):doc.index("## 7. Fleet status")]
    assert [key for key in jn if f"`{key}`" not in section] == []


def test_segments_rotate_and_retention_removes_the_oldest(tmp_path, sockets):
    """With 1 s segments the writer rotates on the clock, converts sealed ones to Parquet, and a size limit
    removes the oldest segments (with their Parquet) first, never the open one."""
    jdir = tmp_path / "j"
    cfg = load_config(write_config(tmp_path, sockets, journal={"enabled": True, "dir": str(jdir)}))
    cfg.journal.rotate_s = 1.0  # below the config's 60 s floor: set after validation, for the test's speed
    with logging_restored():
        agg = Aggregator(cfg, epoch=2)
        agg.start()
        try:
            wait_until(lambda: len(list(jdir.glob("*.cycles.parquet"))) >= 2, 20.0, what="two converted segments")
            names = sorted(p.name for p in jdir.glob("*.v2j"))
            starts = [journal.read_segment(jdir / n).header["segment_start_ns"] for n in names[:2]]
            assert starts[1] - starts[0] == 1_000_000_000 and starts[0] % 1_000_000_000 == 0
            agg.journal.cfg.max_size_gb = 1e-9  # everything is too much: all but the open segment go
            agg.journal._next_retention = 0.0
            wait_until(lambda: len(list(jdir.glob("*.v2j"))) <= 2, 10.0, what="retention")
        finally:
            agg.stop()
    assert names[0] not in {p.name for p in jdir.glob("*.v2j")}
    assert not journal.parquet_paths(jdir / names[0])["cycles"].exists()
    assert agg.journal.counters.removed >= 1


class _FakeElector:
    """What the aggregator reads of v2grt.ha.Elector: a LeaderView the test replaces whole, as its thread does."""

    def __init__(self):
        self.view = LeaderView()  # standby, never elected
        self.resigning = self.handover_ready = False  # no planned handover under way

    def start(self) -> None:
        pass

    def stop(self, resign: bool = True) -> None:
        pass

    def snapshot(self, now_ns: int) -> dict:
        return {"role": self.view.role, "epoch": self.view.epoch}


def test_under_ha_each_cycle_records_its_epoch_whether_it_published_and_its_delivered_power(tmp_path, sockets):
    """Standby, leader (epoch 7), standby, leader (epoch 9): each record carries the aggregator's epoch of its
    cycle, `published` only while leading, that cycle's reported power; a segment per epoch, named by it."""
    jdir = tmp_path / "j"
    cfg = load_config(write_config(tmp_path, sockets, journal={"enabled": True, "dir": str(jdir), "parquet": False}))
    fleet_kw = {}  # t_ns of each journaled cycle -> the vehicles' reported power summed in that cycle

    def hook(agg, result, times):
        j = agg.journal
        t_ns = int(j._ring[(j._w - 1) % len(j._ring)]["t_ns"])  # the record this cycle just wrote
        fleet_kw[t_ns] = float(agg.fleet.p_actual_kw[: agg.fleet.n_rows].sum())

    def leading(epoch: int) -> LeaderView:
        return LeaderView(role=LEADER, epoch=epoch, surely_valid_until_ns=time.monotonic_ns() + 10**12, lease_id=1,
                          ttl_s=2)

    with logging_restored():
        agg = Aggregator(cfg, epoch=3)
        agg.ha, agg.epoch = _FakeElector(), 0  # as Aggregator does with an `ha` section: epoch 0 until elected
        agg.cycle_hooks.append(hook)
        agg.start()
        try:
            for view, p_kw in [(LeaderView(), 1.0), (leading(7), 2.0), (LeaderView(), 3.0), (leading(9), 4.0)]:
                with agg._image_lock:  # no gateway reports: the test is the only writer of reported power
                    agg.fleet.p_actual_kw[: agg.fleet.n_rows] = p_kw
                agg.ha.view = view
                calls = agg.journal.calls
                wait_until(lambda c=calls: agg.journal.calls >= c + 10, 10.0, what="10 cycles")
        finally:
            agg.stop()
    segs = sorted((journal.read_segment(p) for p in jdir.glob("*.v2j")), key=lambda s: s.cycles["t_ns"][0])
    assert [s.header["epoch"] for s in segs] == [0, 7, 9]
    for s in segs:
        assert set(s.cycles["epoch"]) == {s.header["epoch"]} and s.path.name.endswith(f"-e{s.header['epoch']}.v2j")
    c = np.concatenate([s.cycles for s in segs])
    runs = [(int(e), int(p)) for e, p in zip(c["epoch"], c["published"])]
    runs = [r for i, r in enumerate(runs) if i == 0 or r != runs[i - 1]]
    assert runs == [(0, 0), (7, 1), (7, 0), (9, 1)]
    assert [c["delivered_kw"][i] for i in range(len(c))] == [fleet_kw[int(t)] for t in c["t_ns"]]
    assert 3.0 * agg.fleet.n_rows in set(c["delivered_kw"])  # the standby's own cycles, after it led
    assert journal.cycles_table(segs[1]).column("published").to_pylist()[0] == 1  # Parquet/export carry it


def test_the_roster_is_taken_at_start_not_in_the_first_cycle(tmp_path, sockets):
    """The journal's row -> id list (O(N): ~10 ms at 1M vehicles) is built by start(), off the control thread's
    cycle: no cycle slices the fleet's node ids, and the segment's roster names every vehicle."""
    jdir = tmp_path / "j"
    cfg = load_config(write_config(tmp_path, sockets, journal={"enabled": True, "dir": str(jdir), "parquet": False}))
    sliced_by: list[int] = []  # thread idents that sliced node_ids
    cycle_threads: set[int] = set()

    class Ids(list):
        def __getitem__(self, k):
            if isinstance(k, slice):
                sliced_by.append(threading.get_ident())
            return super().__getitem__(k)

    clear_of_the_hourly_rotation()
    with logging_restored():
        agg = Aggregator(cfg, epoch=4)
        agg.fleet.node_ids = Ids(agg.fleet.node_ids)
        agg.cycle_hooks.append(lambda *_: cycle_threads.add(threading.get_ident()))
        agg.start()
        try:
            wait_until(lambda: agg.journal.calls >= 20, 10.0, what="20 cycles")
        finally:
            agg.stop()
    assert cycle_threads and not cycle_threads & set(sliced_by)
    (seg,) = [journal.read_segment(p) for p in jdir.glob("*.v2j")]
    assert seg.rosters[agg.fleet.version]["node_ids"] == agg.fleet.node_ids[: agg.fleet.n_rows]


def test_export_an_interval_as_parquet_and_csv(tmp_path, sockets, meter, inverter):
    """`v2grt journal export` writes the cycle records of an interval (the site inverter's measured power
    included), and per-vehicle samples for chosen ids."""
    _m, port = meter
    _inv, inv_port = inverter
    jdir = tmp_path / "j"
    cfg = load_config(write_config(tmp_path, sockets, meter_port=port, inverter_port=inv_port,
                                   journal={"enabled": True, "dir": str(jdir)}))
    clear_of_the_hourly_rotation()
    with logging_restored():
        agg = Aggregator(cfg, epoch=5)
        agg.start()
        gws = _gateways(cfg)
        try:
            time.sleep(2.5)
        finally:
            agg.stop()
            for g in gws:
                g.stop()
    (seg,) = [journal.read_segment(p) for p in jdir.glob("*.v2j")]
    t = seg.cycles["t_ns"]
    batches = list(journal.vehicle_batches(seg, batch_rows=5))  # streamed in bounded batches, none lost
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == seg.vehicle_rows
    t0, t1 = int(t[10]), int(t[30])
    iso = lambda ns: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}"[:7] + "Z"
    out = tmp_path / "cycles.parquet"
    r = run(V2GRT, "journal", "export", str(jdir), "--from", iso(t0), "--to", iso(t1), "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    want = seg.cycles[(t >= t0 // 1000 * 1000) & (t < t1 // 1000 * 1000)]
    assert got.column("seq").to_pylist() == list(want["seq"])
    assert {"time", "f_hz", "delivered_kw", "n_OK", "test_node"} <= set(got.column_names)
    assert got.column("inverter_inv2_kw").to_pylist()[-1] == pytest.approx(37.0)
    assert got.column("site_measured_kw").to_pylist()[-1] == pytest.approx(37.0)

    out_csv = tmp_path / "v.csv"
    r = run(V2GRT, "journal", "export", str(jdir), "--from", iso(int(t[0])), "--to", iso(int(t[-1]) + 10**9),
            "--vehicles", "EV_NODE_01,EV_NODE_09", "--format", "csv", "--out", str(out_csv))
    assert r.returncode == 0, r.stderr
    v = pcsv.read_csv(out_csv)
    assert set(v.column("node_id").to_pylist()) == {"EV_NODE_01", "EV_NODE_09"}
    assert set(v.column("site_id").to_pylist()) == {"site1", "site2"}

    r = run(V2GRT, "journal", "export", str(jdir), "--from", "2001-01-01T00:00:00Z", "--to", "2001-01-02T00:00:00Z",
            "--out", str(out))
    assert r.returncode == 1 and "no records" in r.stderr
    r = run(V2GRT, "journal", "export", str(jdir), "--from", "yesterday", "--to", "now", "--out", str(out))
    assert r.returncode == 2 and "--from='yesterday'" in r.stderr


def test_config_section_is_validated_with_the_key_named():
    """journal keys out of range or unknown name the key, the value and what is allowed."""
    base = {"fleet": {"random": 10}}
    with pytest.raises(ConfigError, match=r"journal.fsync_interval_s=5 outside 0.01..1.0"):
        config_from_dict({**base, "journal": {"fsync_interval_s": 5}})
    with pytest.raises(ConfigError, match=r"journal.rotate_hours"):
        config_from_dict({**base, "journal": {"rotate_hours": 1}})
    with pytest.raises(ConfigError, match=r"journal.enabled='yes' must be true or false"):
        config_from_dict({**base, "journal": {"enabled": "yes"}})
    cfg = config_from_dict({**base, "journal": {"enabled": True, "max_age_h": None}})
    assert cfg.journal.enabled and cfg.journal.max_age_h is None and cfg.journal.rotate_s == 3600.0
    assert not config_from_dict(base).journal.enabled


def test_shipped_config_journals():
    """configs/default.yaml turns the journal on: an operator starting from it keeps evidence."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
    assert cfg.journal.enabled


def test_docs_schema_matches_the_code():
    """docs/journal.md's cycle table lists every record field of the code, in order, with its type."""
    text = DOCS.read_text()
    section = text.split("## Cycle records", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", section, re.M)
    assert rows[: len(journal.CYCLE_FIELDS)] == [(name, kind) for name, kind, _doc in journal.CYCLE_FIELDS]
    assert [r[0] for r in rows[len(journal.CYCLE_FIELDS):]] == ["reasons", "inverter_kw"]
    for name in ("node_id", "setpoint_kw", "p_kw", "reason", "site_id"):
        assert f"`{name}`" in text


def test_bench_cycle_runs_journal_off_and_on_side_by_side():
    """`v2grt bench cycle` reports the journal's control-thread cost beside the same pair without it."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "bench", "cycle", "--nodes", "2000", "--gateways", "4",
                           "--cycles", "10", "--period-ms", "20", "--priorities", "0", "--json"],
                          capture_output=True, text=True, cwd=root, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    off, on = json.loads(proc.stdout)["results"]
    assert (off["journal"], on["journal"]) == (False, True)
    assert "journal" not in off["phases"] and on["phases"]["journal"]["n"] >= 10
    assert on["journal_counters"]["records"] >= 10 and on["journal_counters"]["dropped"] == 0


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("n_inverters", [0, 2])
def test_the_compiled_tap_writes_what_its_numpy_twin_writes(isa, n_inverters):
    """JournalTap (v2grt._core, each build) fills the ring's record and a stripe slot byte for byte as the NumPy twin
    in v2grt.reference does: every field at its offset, float32 casts, reasons as int32, the inverter sum."""
    rng = np.random.default_rng(3)
    compiled_mod = compiled(isa)
    dtype = journal.cycle_dtype(n_inverters)
    taps = []
    for mod in (compiled_mod, reference):
        ring = np.zeros(4, dtype)
        inv = rng.normal(size=n_inverters) if not taps else taps[0][1][1].copy()
        slots = (np.zeros((3, 50), np.float32), np.zeros((3, 50), np.float32), np.zeros((3, 50), np.uint8),
                 np.full((3, 5), -1, np.int64))
        tap = mod.JournalTap(ring, inv)
        tap.bind_slots(*slots)
        taps.append((tap, (ring, inv), slots))
    counts = rng.integers(0, 10**6, 256)
    sp, p, reasons = rng.normal(size=120) * 11, rng.normal(size=120) * 11, rng.integers(0, 13, 120).astype(np.uint8)
    for tap, _, _ in taps:
        tap.record(2, 1_780_000_000_123_456_789, 7, 12345, True, 49.87, math.nan, False, 0.25, 400.0, 100.0, 99.5,
                   98.25, 97.0, 300.5, 280.25, 17, False, 33, 4.5, 1.25, counts)
        tap.stripe(1, 70, 120, 1_780_000_000_123_456_789, 12345, 3, sp, p, reasons)
    (_, (ring_c, _), slots_c), (_, (ring_r, _), slots_r) = taps
    assert ring_c.tobytes() == ring_r.tobytes()
    assert ring_c[2]["seq"] == 12345 and list(ring_c[2]["reasons"]) == list(counts[:16])
    if n_inverters:
        assert ring_c[2]["site_measured_kw"] == ring_c[2]["inverter_kw"].sum()
    else:
        assert math.isnan(ring_c[2]["site_measured_kw"])
    for a, b in zip(slots_c, slots_r):
        assert a.tobytes() == b.tobytes()
    assert list(slots_c[3][1]) == [1_780_000_000_123_456_789, 12345, 70, 120, 3]
    assert np.array_equal(slots_c[0][1, :50], sp[70:120].astype(np.float32))


def test_a_journal_without_writer_thread_records_simulated_time_into_its_segments(tmp_path):
    """start(thread=False) + record_cycle: records carry the caller's t_ns, segments rotate on it, stop seals."""
    from v2grt.config import JournalConfig
    from v2grt.dispatch import Dispatcher
    from v2grt.testing import uniform_fleet

    fleet = uniform_fleet(8)
    d = Dispatcher(fleet, service="fcr", period_s=1.0)
    cfg = JournalConfig(enabled=True, rotate_s=60.0, parquet=False, max_age_h=None, max_size_gb=None,
                        flush_interval_s=0.1)
    j = journal.Journal(cfg, tmp_path, fleet=fleet, epoch=1, fleet_id="bt", period_s=1.0,
                        inverter_names=["inv-a"], inverter_sites=["site0"])
    j.start(thread=False)
    t0_ns = 1_552_953_722 * 10**9  # 2019-03-19T00:02:02Z: simulated, not the wall clock
    for k in range(150):
        r = d.step(50.05, now_ns=k * 10**9)
        j.record_cycle(r, t_ns=t0_ns + k * 10**9, epoch=1, seq=k + 1, published=True, f_age_ms=0.0,
                       frequency_stale=False, capacity_kw=d.capacity_kw, delivered_kw=0.0,
                       inverter_kw=np.array([1.5]))
    j.stop()
    segs = sorted(tmp_path.glob("*.v2j"))
    assert [s.name for s in segs] == ["bt-20190319T000202Z-e1.v2j", "bt-20190319T000300Z-e1.v2j",
                                      "bt-20190319T000400Z-e1.v2j"]
    cycles = np.concatenate([journal.read_segment(s).cycles for s in segs])
    assert all(journal.read_segment(s).sealed for s in segs)
    assert np.array_equal(cycles["t_ns"], t0_ns + np.arange(150) * 10**9)
    assert np.array_equal(cycles["seq"], np.arange(1, 151)) and np.all(cycles["site_measured_kw"] == 1.5)
