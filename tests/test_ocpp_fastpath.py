"""The OCPP hot path on both sides (gateway and simulated stations) against the `ocpp` package's own classes."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import numpy as np
import pytest
from _ocpp import make_site, start_gateway
from ocpp.messages import CallResult, unpack

from v2grt.gateway import ocpp_mapping as om
from v2grt.sim.battery import SimFleetState
from v2grt.sim.ocpp_stations import SimStations, specs_from_fleet
from v2grt.testing import wait_until

METER = {"evseId": 1, "meterValue": [{"timestamp": "2026-12-05T03:00:00Z", "sampledValue": [
    {"measurand": "SoC", "value": 55.5, "unitOfMeasure": {"unit": "Percent"}},
    {"measurand": "Power.Active.Export", "value": 2000.0}]}]}


@pytest.fixture
def site(tmp_path):
    """Two stations of two EVSEs under gateway ocpp1: roster, credentials (hashes), passwords (plain)."""
    return make_site(tmp_path, 2)


async def _session(port, station, password, script):
    """Connect as ``station`` (plain ws, Basic auth) and run ``script(ws)``; its result."""
    from websockets.asyncio.client import connect

    auth = base64.b64encode(f"{station}:{password}".encode()).decode()
    async with connect(f"ws://127.0.0.1:{port}/ocpp/{station}", subprotocols=["ocpp2.1"],
                       additional_headers={"Authorization": f"Basic {auth}"}) as ws:
        return await script(ws)


async def _recv_json(ws, timeout_s=2.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def _reply_raw(ws, unique_id: str, timeout_s=2.0) -> str:
    """The next frame that is not a CALL of the gateway's (it asks for transactions: TriggerMessage)."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout_s)
        if json.loads(raw)[0] != 2:
            return raw


def test_meter_values_on_the_fast_path_are_answered_and_read_as_the_package_would(site):
    """MeterValues (the gateway's hot CALL): the reply parses with the package's unpack as a CALLRESULT of the
    station's own message id, escaping included; the values reach the node; a schema violation still gets the
    compiled schema's CALLERROR code, and an id over 36 characters takes the package's path (answered too)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    odd_id = 'm"1\\x'

    async def script(ws):
        out = []
        for uid, payload in ((odd_id, METER), ("bad", {"evseId": "one", "meterValue": METER["meterValue"]}),
                             ("x" * 37, METER)):
            await ws.send(json.dumps([2, uid, "MeterValues", payload]))
            out.append(await _reply_raw(ws, uid))
        return out

    try:
        raw = asyncio.run(_session(gw.port, "CS0001", passwords["CS0001"], script))
        ok = unpack(raw[0])
        assert isinstance(ok, CallResult) and ok.unique_id == odd_id and ok.payload == {}
        e = gw.evses[gw.row_of[("CS0001", 1)]]
        assert e.has_soc and e.soc == pytest.approx(0.555) and e.p_kw == pytest.approx(2.0)
        bad = json.loads(raw[1])
        assert bad[:3] == [4, "bad", "TypeConstraintViolation"]
        assert json.loads(raw[2])[0] in (3, 4) and json.loads(raw[2])[1] == "x" * 37
        assert gw.stats["calls_received"] == 3 and gw.callerrors["TypeConstraintViolation"] == 1
    finally:
        gw.close()


def test_a_reply_resolves_only_the_call_in_flight_and_a_missing_one_times_out(site):
    """The gateway's CALL after a boot (its fallback profile): a reply with another id is counted as
    unsolicited and not taken; the reply with the CALL's id is (no timeout, nothing rejected). On a second
    station that never answers, the CALL times out, is counted, and the fallback counts as rejected."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, call_timeout_s=0.5)
    boot = [2, "b1", "BootNotification", {"chargingStation": {"model": "t", "vendorName": "t"}, "reason": "PowerUp"}]

    async def answers(ws):
        await ws.send(json.dumps(boot))
        frames = [await _recv_json(ws), await _recv_json(ws)]
        call = next(f for f in frames if f[0] == 2)
        assert call[2] == "SetChargingProfile" and call[3]["evseId"] == 0
        await ws.send(json.dumps([3, call[1] + "0", {"status": "Accepted"}]))  # not its id
        await asyncio.sleep(0.1)
        await ws.send(json.dumps([3, call[1], {"status": "Accepted"}]))
        await asyncio.sleep(0.8)  # past the call timeout: it would have fired had the reply not been taken

    async def silent(ws):
        await ws.send(json.dumps(boot))
        await asyncio.sleep(1.0)

    try:
        asyncio.run(_session(gw.port, "CS0001", passwords["CS0001"], answers))
        assert gw.stats["unsolicited_replies"] == 1
        assert gw.stats["call_timeouts"] == 0 and gw.stats["default_profile_rejected"] == 0
        asyncio.run(_session(gw.port, "CS0002", passwords["CS0002"], silent))
        assert gw.stats["call_timeouts"] == 1 and gw.stats["default_profile_rejected"] == 1
    finally:
        gw.close()


def test_the_simulated_station_speaks_to_the_packages_own_csms_classes(site):
    """A CSMS built on the package's ChargePoint with its own jsonschema checks on: the simulator's fast-path
    MeterValues pass them (one refused with a CALLERROR is counted at once and the next ones still go), its
    fast-path UpdateDynamicSchedule replies pass them (Accepted with a profile, Rejected without), the
    setpoint is applied with the right sign, and a request breaking the schema is answered with a CALLERROR
    by the package's path."""
    from ocpp.exceptions import OCPPError, PropertyConstraintViolationError
    from ocpp.routing import on
    from ocpp.v21 import ChargePoint, call, call_result
    from websockets.asyncio.server import serve

    _paths, fleet, passwords = site
    spec = specs_from_fleet(fleet, passwords)[:1]  # one station, two EVSEs
    meters: list[dict] = []
    results: dict = {}
    done = threading.Event()

    class Csms(ChargePoint):
        @on("BootNotification")
        def boot(self, **_):
            return call_result.BootNotification(current_time="2026-12-05T03:00:00Z", interval=60, status="Accepted")

        @on("StatusNotification")
        def status(self, **_):
            return call_result.StatusNotification()

        @on("TransactionEvent")
        def tx(self, **_):
            return call_result.TransactionEvent()

        @on("NotifyEVChargingNeeds")
        def needs(self, **_):
            return call_result.NotifyEVChargingNeeds(status="Accepted")

        @on("MeterValues")
        def meter(self, evse_id, meter_value, **_):
            meters.append({"evse_id": evse_id, "meter_value": meter_value})
            if len(meters) == 1:  # the first one refused: the station counts the CALLERROR and goes on
                raise PropertyConstraintViolationError(description="refused once")
            return call_result.MeterValues()

    async def handler(ws):
        cp = Csms(spec[0].station_id, ws)
        reader = asyncio.create_task(cp.start())
        try:
            while len(meters) < 3:
                await asyncio.sleep(0.05)
            update = call.UpdateDynamicSchedule(charging_profile_id=om.tx_profile_id(1),
                                                schedule_update=om.schedule_update(-5.0))
            results["before_profile"] = (await cp.call(update)).status
            profile = om.dynamic_profile(1, "T1", 0.0, max_offline_s=3)
            results["profile"] = (await cp.call(call.SetChargingProfile(evse_id=1, charging_profile=profile))).status
            results["after_profile"] = (await cp.call(update)).status
            try:
                await cp.call(call.UpdateDynamicSchedule(charging_profile_id="seven", schedule_update={}),
                              skip_schema_validation=True, suppress=False)
            except OCPPError as exc:
                results["bad"] = type(exc).__name__
        finally:
            reader.cancel()
            done.set()

    async def csms():
        async with serve(handler, "127.0.0.1", 0, subprotocols=["ocpp2.1"]) as server:
            results["port"] = server.sockets[0].getsockname()[1]
            started.set()
            while not done.is_set():
                await asyncio.sleep(0.05)

    started = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(csms()), daemon=True)
    thread.start()
    assert started.wait(5.0)
    state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0, low_soh_fraction=0.0)
    state.online[:] = True
    sims = SimStations(f"ws://127.0.0.1:{results['port']}/ocpp", spec, state, meter_interval_s=0.1,
                       latency_s=(0.0, 0.0), connect_spread_s=0.0).start()
    try:
        assert done.wait(15.0)
        assert results["before_profile"] == "Rejected" and results["profile"] == "Accepted"
        assert results["after_profile"] == "Accepted"
        assert results.get("bad") == "TypeConstraintViolationError"  # the CALLERROR, raised by call
        assert len(meters) >= 3 and {m["evse_id"] for m in meters} <= {1, 2}
        assert sims.meter_errors == 1 and sims.meter_timeouts == 0  # raised at once, not waited out
        row = dict(spec[0].evses)[1]
        wait_until(lambda: sims.target_kw[row] == pytest.approx(-5.0), 2.0)  # charge 5 kW: setpoint +5000 W
        assert np.isfinite(sims.target_kw).all()
    finally:
        sims.stop()
        thread.join(5.0)
