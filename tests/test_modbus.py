"""SunSpec simulators and the Modbus input side, against each other on loopback with real pymodbus servers."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import sys
import threading
import time

import pytest
from pymodbus.client import AsyncModbusTcpClient
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from v2grt.io.modbus import (
    INVST_FAULT,
    INVST_RUNNING,
    InputThread,
    InverterReader,
    Latest,
    MeterReader,
    SunSpecError,
    aligned_poll_ns,
    block_decoder,
    decode_point,
    discover,
    encode_point,
    model_length,
    model_points,
    within,
)
from v2grt.sim.sunspec import (
    ALRM_MANUFACTURER,
    PHASE_MISMATCH_TEXT,
    RegisterDevice,
    SimServerThread,
    SunSpecInverter,
    SunSpecMeter,
)

HOST = "127.0.0.1"
INTERVAL_S = 0.02


@pytest.fixture
def serve():
    """Start SimServerThreads for the test's devices; stop them afterwards."""
    started: list[SimServerThread] = []

    def _serve(*devices):
        sim = SimServerThread(devices).start()
        started.append(sim)
        return sim

    yield _serve
    for sim in started:
        sim.stop()


@pytest.fixture
def poll():
    """Run pollers in an InputThread; stop it afterwards (before the servers go)."""
    threads: list[InputThread] = []

    def _poll(*pollers):
        t = InputThread(pollers).start()
        threads.append(t)
        return t

    yield _poll
    for t in threads:
        t.stop()


def wait_until(pred, timeout_s: float = 10.0, what: str = "condition") -> float:
    """Poll ``pred`` until true and return the seconds it took; fail after ``timeout_s`` (long: it only
    decides how long a failing test takes, and a loaded machine must not fail a passing one)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.002)
    return time.monotonic() - t0


def with_client(port: int, fn):
    """Run ``await fn(client)`` with a connected pymodbus async client on a fresh loop."""

    async def main():
        client = AsyncModbusTcpClient(HOST, port=port, timeout=1, retries=0, reconnect_delay=0)
        assert await client.connect()
        try:
            return await fn(client)
        finally:
            client.close()

    return asyncio.run(main())


def sunspec2_scan(port: int) -> SunSpecModbusClientDeviceTCP:
    """pysunspec2's own client: scan the device and read every model."""
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr=HOST, ipport=port, timeout=2)
    dev.scan()
    return dev


def sunspec2_addresses(dev: SunSpecModbusClientDeviceTCP) -> dict[int, int]:
    """pysunspec2's model addresses (of the ID register) turned into first-point addresses."""
    return {k: v[0].model_addr + 2 for k, v in dev.models.items() if isinstance(k, int)}


def meter_reader(port: int, **kw) -> MeterReader:
    kw.setdefault("interval_s", INTERVAL_S)
    kw.setdefault("timeout_s", 0.05)
    kw.setdefault("backoff_min_s", 0.02)
    kw.setdefault("backoff_max_s", 0.16)
    return MeterReader(HOST, port, **kw)


# -- pysunspec2 against the simulators, and discover() against pysunspec2 --------------------------------


@pytest.mark.parametrize("model", [203, 213])
def test_pysunspec2_scans_simulated_meter(serve, model):
    """pysunspec2's client finds model 1 and the meter model, with the standard length and our values."""
    meter = SunSpecMeter(model, f_hz=49.95, p_kw=-12.0, sn="M-42")
    sim = serve(meter)
    dev = sunspec2_scan(sim.port(meter))
    assert sorted(k for k in dev.models if isinstance(k, int)) == [1, model]
    assert dev.models[1][0].SN.value == "M-42"
    m = dev.models[model][0]
    assert m.len == model_length(model)
    assert m.Hz.cvalue == pytest.approx(49.95, abs=1e-4)
    assert m.W.cvalue == pytest.approx(-12000.0, abs=1e-3)


def test_pysunspec2_scans_simulated_inverter(serve):
    """pysunspec2 reads 701 (W, Hz, states) and 704 (setpoint points and scale factors) from the simulator."""
    inv = SunSpecInverter(p_kw=12.3, f_hz=50.012)
    sim = serve(inv)
    dev = sunspec2_scan(sim.port(inv))
    assert sorted(k for k in dev.models if isinstance(k, int)) == [1, 701, 704]
    m701, m704 = dev.models[701][0], dev.models[704][0]
    assert (m701.len, m704.len) == (model_length(701), model_length(704))
    assert m701.W.cvalue == pytest.approx(12300.0)
    assert m701.Hz.cvalue == pytest.approx(50.012)
    assert (m701.St.value, m701.InvSt.value, m701.ConnSt.value, m701.Alrm.value) == (1, INVST_RUNNING, 1, 0)
    assert (m704.WSetEna.value, m704.WSet_SF.value) == (0, 0)


def test_discover_agrees_with_pysunspec2(serve):
    """discover() returns the same first-point addresses as pysunspec2's independent scan, for all devices."""
    devices = [SunSpecMeter(203), SunSpecMeter(213), SunSpecInverter()]
    sim = serve(*devices)
    for d in devices:
        port = sim.port(d)
        found = with_client(port, discover)
        assert found == sunspec2_addresses(sunspec2_scan(port)) == d.models
        assert found[1] == 40004  # 'SunS' (2) + model 1 header (2)


def test_garbage_device_error_names_address(serve, poll):
    """A device without 'SunS' gives an error naming the device, register 40000 and what was found there."""
    junk = RegisterDevice([0x1234, 0xABCD] + [0] * 100, name="junk")
    sim = serve(junk)
    port = sim.port(junk)
    with pytest.raises(SunSpecError) as err:
        with_client(port, discover)
    text = str(err.value)
    assert f"{HOST}:{port}" in text and "register 40000" in text and "0x1234 0xABCD" in text
    reader = meter_reader(port)
    poll(reader)
    wait_until(lambda: reader.counters.connect_failures >= 2, what="repeated discovery failures")
    assert "no 'SunS' marker at register 40000" in reader.counters.last_error
    assert reader.latest.read() == (None, None) and reader.counters.reads_ok == 0


def test_truncated_chain_error_names_address(serve):
    """A model chain that runs off the end of the map is reported with the address of the missing header."""
    meter = SunSpecMeter(203)
    broken = RegisterDevice(meter.registers()[:70], name="truncated")  # SunS + model 1, then nothing
    sim = serve(broken)
    with pytest.raises(SunSpecError, match=r"at 40070 failed with Modbus exception 2"):
        with_client(sim.port(broken), discover)


def test_meter_reader_refuses_a_device_without_meter_model(serve, poll):
    """A MeterReader pointed at an inverter says which models it found instead of reading garbage."""
    inv = SunSpecInverter()
    sim = serve(inv)
    reader = meter_reader(sim.port(inv))
    poll(reader)
    wait_until(lambda: reader.counters.connect_failures >= 1, what="a discovery failure")
    assert "no meter model" in reader.counters.last_error and "[1, 701, 704]" in reader.counters.last_error
    assert reader.counters.reads_ok == 0


# -- the meter poller ----------------------------------------------------------------------------------


def test_frequency_change_reaches_latest_cell_with_scale_factor(serve, poll):
    """A new frequency on a 203 meter appears in the cell within a few polls, exact to Hz_SF=-2."""
    meter = SunSpecMeter(203, f_hz=50.0, p_kw=3.0)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    wait_until(lambda: reader.latest.read()[0] is not None, what="first sample")
    assert reader.latest.read()[0] == (50.0, 3.0, 203)
    meter.set_frequency(49.873)
    wait_until(lambda: reader.latest.read()[0].f_hz != 50.0, what="new frequency")
    sample, t_ns = reader.latest.read()
    assert sample.f_hz == 49.87  # int16 Hz at Hz_SF=-2: 4987 / 100, the nearest double
    assert abs(sample.f_hz - 49.873) <= 0.005
    assert t_ns <= time.monotonic_ns()


@pytest.mark.perf
def test_frequency_change_reaches_the_cell_within_a_few_polls(serve, poll):
    """On a quiet machine a new frequency is in the cell within 15 polls, and the cell stays young."""
    meter = SunSpecMeter(203, f_hz=50.0)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    wait_until(lambda: reader.latest.read()[0] is not None, what="first sample")
    meter.set_frequency(49.873)
    took = wait_until(lambda: reader.latest.read()[0].f_hz != 50.0, what="new frequency")
    assert took < 15 * INTERVAL_S, f"took {took:.3f} s"
    assert 0 <= reader.latest.age_s() < 1.0


def test_aligned_poll_grid_ends_each_period_a_lead_before_its_deadline():
    """Each period's polls are laid back from its deadline every interval, the last one a lead before it."""
    ms = 1_000_000

    def slots(interval_ms, period_ms, lead_ms, until_ms):
        out, t = [], -1
        while True:
            t = aligned_poll_ns(t, interval_ms * ms, period_ms * ms, lead_ms * ms)
            if t > until_ms * ms:
                return [x / ms for x in out]
            out.append(t)

    # the period a multiple of the interval: one regular grid, 2 ms before every 5 ms mark
    assert slots(5, 100, 2, 110) == [3.0 + 5 * k for k in range(22)]
    assert 98.0 in slots(5, 100, 2, 110)  # the deadline at 100 ms is led by a poll at 98 ms
    # not a multiple: the period's first gap is the short one, its last poll still 2 ms before the deadline
    assert slots(30, 100, 2, 200) == [8.0, 38.0, 68.0, 98.0, 108.0, 138.0, 168.0, 198.0]
    # a poll that overran skips to the next slot, never repeats one
    assert aligned_poll_ns(98 * ms, 5 * ms, 100 * ms, 2 * ms) == 103 * ms
    assert aligned_poll_ns(int(99.9 * ms), 5 * ms, 100 * ms, 2 * ms) == 103 * ms


def test_meter_polls_are_phase_locked_to_the_cycle_deadlines(serve, poll):
    """With cycle_period_s the sample a cycle takes at its deadline is about lead_s old at most cycles.

    Two readers of one meter, both polling every 30 ms for 60 ms cycles, one led by 8 ms and one by 28 ms:
    locked, their samples are ~8 and ~28 ms old at each deadline; free-running polls (started together) would
    be equally old whatever the lead. Leads and bounds generous for a loaded machine (at load 9 on two cores a
    3 ms lead missed a quarter of the deadlines: the poll's thread waited that long for a core)."""
    period_ns, interval_s = 60_000_000, 0.03
    meter = SunSpecMeter(213, f_hz=50.0)
    sim = serve(meter)
    readers = {lead_ms: meter_reader(sim.port(meter), interval_s=interval_s, cycle_period_s=period_ns / 1e9,
                                     lead_s=lead_ms / 1e3) for lead_ms in (8, 28)}
    poll(*readers.values())
    wait_until(lambda: all(r.latest.read()[0] is not None for r in readers.values()), what="first samples")
    reads_before, t_start = {k: r.counters.reads_ok for k, r in readers.items()}, time.monotonic_ns()
    deadline = (t_start // period_ns + 1) * period_ns
    ages_ms = {lead_ms: [] for lead_ms in readers}
    for _ in range(30):  # the control loop's cycles: wake at each deadline, take the newest sample
        time.sleep(max(deadline - time.monotonic_ns(), 0) / 1e9)
        for lead_ms, r in readers.items():
            ages_ms[lead_ms].append((time.monotonic_ns() - r.latest.read()[1]) / 1e6)
        deadline += period_ns
    shown = {k: sorted(round(a, 1) for a in v) for k, v in ages_ms.items()}
    assert sum(age <= 15.0 for age in ages_ms[8]) >= 20, f"sample ages at the deadlines (ms, by lead): {shown}"
    assert sum(20.0 <= age <= 40.0 for age in ages_ms[28]) >= 20, f"sample ages (ms, by lead): {shown}"
    for lead_ms, r in readers.items():  # two polls a period, not more: an early timer does not poll a slot twice
        polls = r.counters.reads_ok - reads_before[lead_ms]
        assert polls <= (time.monotonic_ns() - t_start) / 1e9 / interval_s + 2, (lead_ms, polls)


@pytest.mark.parametrize(("model_id", "names", "values"), [
    (704, ("WSetRvrtTms", "WSetEna", "WSet", "WSetRvrt"), (2, 1, -11000, None)),  # any order, with a gap
    (704, ("WSetEna", "WSetMod", "WSet", "WSetRvrt", "WSetEnaRvrt"), (None, 1, 2**31 - 1, -(2**31) + 1, 0)),
    (213, ("Hz", "W"), (49.875, None)),  # float32, NaN = not implemented
])
def test_block_decoder_equals_decode_point_per_point(model_id, names, values):
    """One struct call over a block decodes each point exactly as decode_point does, None for not implemented."""
    pts = model_points(model_id)
    sel = [pts[n] for n in names]
    first = min(p.offset for p in sel) - 3  # the block starts 3 registers before the first point
    regs = [0xABCD] * (max(p.offset + p.size for p in sel) - first + 2)
    for p, v in zip(sel, values):
        regs[p.offset - first : p.offset - first + p.size] = encode_point(p, v)
    decoded = block_decoder(sel, -first)(regs)
    assert decoded == tuple(decode_point(regs, p, -first) for p in sel) == values
    with pytest.raises(SunSpecError, match="need registers"):
        block_decoder(sel, -first)(regs[:5])


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_within_times_out_cancels_and_tells_an_outside_cancel_apart(loop_factory):
    """within returns the result, raises TimeoutError after the timeout (cancelling the request), and leaves a
    cancellation from outside a CancelledError."""
    uvloop = pytest.importorskip("uvloop") if loop_factory == "uvloop" else None

    async def main():
        loop = asyncio.get_running_loop()
        assert await within(asyncio.sleep(0, "ok"), 1.0) == "ok"
        slow = loop.create_future()
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await within(slow, 0.05)
        assert slow.cancelled() and 0.04 <= time.monotonic() - t0 < 1.0
        task = asyncio.create_task(within(loop.create_future(), 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert asyncio.current_task().cancelling() == 0  # nothing left over on this task either

        async def swallows():  # asyncio.wait_for on 3.11 when the response races the cancel: it returns it
            try:
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                return "late"

        assert await within(swallows(), 0.02) == "late"
        assert asyncio.current_task().cancelling() == 0  # the spent cancel taken back
        with pytest.raises(asyncio.TimeoutError):  # so the next timeout is a timeout, not a cancellation
            await within(loop.create_future(), 0.02)
        return True

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        assert runner.run(main())


def test_phase_lock_needs_a_lead_shorter_than_the_period():
    """A lead of a whole period or more is refused, naming both values."""
    with pytest.raises(ValueError, match=r"lead_s=0\.1 with cycle_period_s=0\.1"):
        MeterReader(HOST, 502, cycle_period_s=0.1, lead_s=0.1)


def test_float_meter_keeps_sub_millihertz_resolution(serve, poll):
    """A 213 (float32) meter's frequency arrives to float32 precision, far finer than 203's 10 mHz."""
    meter = SunSpecMeter(213, f_hz=50.0)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    meter.set_frequency(49.8734)
    wait_until(lambda: (reader.latest.read()[0] or (0,))[0] != 50.0 and reader.latest.read()[0] is not None)
    sample = reader.latest.read()[0]
    assert sample.model_id == 213
    assert sample.f_hz == pytest.approx(49.8734, abs=1e-5)


def test_not_implemented_hz_is_an_invalid_sample(serve, poll):
    """Hz = 0x8000 ("not implemented") is counted as invalid and never published; real values resume."""
    meter = SunSpecMeter(203, f_hz=50.05)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    wait_until(lambda: reader.latest.read()[0] is not None)
    meter.set_points(203, Hz=None)
    wait_until(lambda: reader.counters.invalid >= 3, what="invalid samples")
    time.sleep(5 * INTERVAL_S)
    assert reader.latest.read()[0].f_hz == 50.05
    assert reader.latest.age_s() >= 4 * INTERVAL_S
    assert "invalid frequency" in reader.counters.last_error
    meter.set_frequency(49.99)
    wait_until(lambda: reader.latest.read()[0].f_hz == 49.99, what="valid sample after invalid ones")


def test_silent_meter_times_out_then_recovers(serve, poll):
    """A silent meter ages the cell and counts timeouts and reconnects; when it answers, values come back."""
    meter = SunSpecMeter(203, f_hz=50.0)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    wait_until(lambda: reader.counters.reads_ok >= 3)
    meter.set_stale(True)
    wait_until(lambda: reader.counters.reconnects >= 2, what="reconnects of a silent meter")
    assert reader.counters.timeouts >= reader.max_failures
    assert "no answer within 0.05 s" in reader.counters.last_error
    assert reader.latest.age_s() > 0.1
    meter.set_frequency(50.12)
    meter.set_stale(False)
    wait_until(lambda: reader.latest.read()[0].f_hz == 50.12, what="values after the meter answers again")
    assert reader.latest.age_s() < 0.5


def test_stopped_meter_reconnects_with_backoff(serve, poll):
    """A powered-off meter is retried with doubling delays (never faster), and read again once it is back."""
    meter = SunSpecMeter(203, f_hz=50.0)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    wait_until(lambda: reader.counters.reads_ok >= 3)
    before = reader.counters.reconnects
    t0 = time.monotonic()
    meter.stop()
    wait_until(lambda: reader.counters.reconnects - before >= 3, what="retries of a stopped meter")
    time.sleep(1.0)
    attempts, elapsed_s = reader.counters.reconnects - before, time.monotonic() - t0
    # Delays 0.02, 0.04, 0.08 s, then 0.16 s: at most ~3 + elapsed / 0.16 tries (8 in 1 s); load only
    # spaces them further. A fixed 20 ms retry would make elapsed / 0.02 (~55).
    assert 3 <= attempts <= 5 + max(elapsed_s - 0.14, 0.0) / 0.16, (attempts, elapsed_s)
    assert reader.counters.connect_failures >= 3
    assert reader.latest.age_s() > 0.9
    assert not reader.connected
    meter.set_frequency(49.9)
    meter.start()
    wait_until(lambda: reader.latest.read()[0].f_hz == 49.9, what="values after restart")
    assert reader.connected and reader.counters.connects == 2


@pytest.mark.perf
def test_restarted_meter_is_read_again_within_the_backoff_cap(serve, poll):
    """On a quiet machine a meter back after 1 s off is read within 1 s: the backoff is capped at 0.16 s
    (uncapped, the next try after 1 s of doubling could be 1.28 s away)."""
    meter = SunSpecMeter(203, f_hz=50.0)
    sim = serve(meter)
    reader = meter_reader(sim.port(meter))
    poll(reader)
    wait_until(lambda: reader.counters.reads_ok >= 3)
    meter.stop()
    time.sleep(1.0)
    meter.set_frequency(49.9)
    meter.start()
    took = wait_until(lambda: reader.latest.read()[0].f_hz == 49.9, what="values after restart")
    assert took < 1.0, f"took {took:.3f} s with backoff capped at 0.16 s"


def test_meter_update_is_never_torn(serve):
    """While the simulator flips the float32 frequency, every read returns one of the two values whole."""
    a, b = 49.1234, 50.9876
    wa, wb = struct.unpack(">2H", struct.pack(">f", a)), struct.unpack(">2H", struct.pack(">f", b))
    assert wa[0] != wb[0] and wa[1] != wb[1]  # both words differ, so a torn read would show
    meter = SunSpecMeter(213, f_hz=a)
    sim = serve(meter)
    hz_addr = meter.models[213] + 24  # model_213.json: Hz at offset 26 incl. ID and L
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            meter.set_frequency(b)
            meter.set_frequency(a)

    async def reads(client):
        seen = set()
        for _ in range(300):
            rr = await client.read_holding_registers(hz_addr, count=2, device_id=1)
            seen.add(tuple(rr.registers))
        return seen

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        seen = with_client(sim.port(meter), reads)
    finally:
        stop.set()
        flipper.join()
        sys.setswitchinterval(old)
    assert seen <= {wa, wb}, seen


# -- the inverter poller -----------------------------------------------------------------------------------


def test_inverter_measurements_and_cannot_sync_flag(serve, poll):
    """The 701 sample carries W, Hz and state; cannot_sync follows the simulated phase-mismatch fault."""
    inv = SunSpecInverter(p_kw=-5.5, f_hz=49.987)
    sim = serve(inv)
    reader = InverterReader(HOST, sim.port(inv), interval_s=INTERVAL_S, timeout_s=0.05)
    poll(reader)
    wait_until(lambda: reader.latest.read()[0] is not None)
    s = reader.latest.read()[0]
    assert (s.p_kw, s.f_hz, s.inv_st, s.conn_st, s.alarms, s.cannot_sync) == (
        -5.5,
        49.987,
        INVST_RUNNING,
        1,
        0,
        False,
    )
    inv.set_cannot_sync(True)
    wait_until(lambda: reader.latest.read()[0].cannot_sync, what="cannot_sync")
    s = reader.latest.read()[0]
    assert (s.inv_st, s.conn_st, s.p_kw) == (INVST_FAULT, 0, 0.0)
    assert s.alarms & ALRM_MANUFACTURER
    assert inv.get_point(701, "MnAlrmInfo") == PHASE_MISMATCH_TEXT
    inv.set_cannot_sync(False)
    wait_until(lambda: not reader.latest.read()[0].cannot_sync, what="cleared cannot_sync")
    assert reader.latest.read()[0].p_kw == -5.5


def test_inverter_setpoint_written_to_704(serve, poll):
    """A setpoint requested from another thread lands in 704 (W, enable, revert to 0 W after the timer)."""
    inv = SunSpecInverter()
    sim = serve(inv)
    reader = InverterReader(HOST, sim.port(inv), interval_s=INTERVAL_S, timeout_s=0.05)
    poll(reader)
    wait_until(lambda: reader.latest.read()[0] is not None)
    reader.request_setpoint(-7.5, revert_s=1.0)
    wait_until(lambda: reader.counters.writes_ok >= 1, what="setpoint write acknowledged")
    sp = inv.setpoint()
    assert (sp.watts_mode, sp.p_kw, sp.revert_enabled, sp.revert_p_kw, sp.revert_s) == (
        True,
        -7.5,
        True,
        0.0,
        1,
    )
    assert inv.p_target_kw() == -7.5
    assert inv.p_target_kw(sp.t_written_ns + int(1.5e9)) == 0.0  # reversion after WSetRvrtTms
    assert reader.counters.write_failures == 0


def test_simulator_rejects_writes_to_read_only_points(serve):
    """Writing a read-only 701 measurement gets Modbus exception 2 and leaves the value unchanged."""
    inv = SunSpecInverter(p_kw=1.0)
    sim = serve(inv)
    w_addr = inv.models[701] + 8  # model_701.json: W at offset 10 incl. ID and L

    async def write(client):
        return await client.write_registers(w_addr, [999], device_id=1)

    rr = with_client(sim.port(inv), write)
    assert rr.isError() and rr.exception_code == 2
    assert inv.get_point(701, "W") == 100  # 1 kW at W_SF=1


# -- the latest-value cell and the thread --------------------------------------------------------------


def test_latest_cell_pairs_value_and_time():
    """Latest returns (None, None) and infinite age before a publish, then the pair and its age."""
    cell: Latest[float] = Latest()
    assert cell.read() == (None, None) and cell.age_s() == math.inf
    cell.publish(50.01, 1_000_000_000)
    assert cell.read() == (50.01, 1_000_000_000)
    assert cell.age_s(1_250_000_000) == pytest.approx(0.25)


def test_input_thread_polls_concurrently_and_stops_cleanly(serve, monkeypatch, caplog):
    """Three devices poll concurrently on one loop; missing uvloop is logged; stop() joins and closes."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    devices = [SunSpecInverter(p_kw=1.0), SunSpecInverter(p_kw=2.0), SunSpecMeter(213)]
    sim = serve(*devices)
    readers = [
        InverterReader(HOST, sim.port(devices[0]), interval_s=INTERVAL_S),
        InverterReader(HOST, sim.port(devices[1]), interval_s=INTERVAL_S),
        meter_reader(sim.port(devices[2])),
    ]
    with caplog.at_level(logging.WARNING, logger="v2grt.io.modbus"):
        thread = InputThread(readers).start()
    try:
        assert thread.loop_kind == "asyncio"
        assert "uvloop is not installed" in caplog.text
        wait_until(lambda: all(r.counters.reads_ok >= 5 for r in readers), what="all devices polled")
        assert [r.latest.read()[0].p_kw for r in readers[:2]] == [1.0, 2.0]
    finally:
        thread.stop()
    assert not thread._thread and all(not r.connected and r._client is None for r in readers)
    n = [r.counters.reads_ok for r in readers]
    time.sleep(3 * INTERVAL_S)
    assert [r.counters.reads_ok for r in readers] == n  # nothing polls after stop()
