"""The OCPP 2.1 gateway on loopback: real websockets, the real `ocpp` ChargePoint classes on both
ends (v2grt.sim.ocpp_stations), TLS with a certificate made here, and a real in-process aggregator
publishing over ZeroMQ to a real GatewayCore."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
import time

import _ocpp
import numpy as np
import pytest
import zmq
from _ocpp import GW, make_site, tls_contexts

from v2grt.codes import Reason
from v2grt.fleet import Fleet
from v2grt.gateway import ocpp_mapping as om
from v2grt.gateway.core import GatewayCore, GatewayError
from v2grt.gateway.ocpp import OcppSettings, OcppVehicles
from v2grt.gateway.sim import gateway_fleet
from v2grt.sim.battery import SimFleetState
from v2grt.sim.ocpp_stations import SimStations, specs_from_fleet
from v2grt.testing import wait_until


@pytest.fixture
def site(tmp_path):
    """Three stations of two EVSEs under gateway ocpp1: roster, credentials (hashes), passwords (plain)."""
    return make_site(tmp_path, 3)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (cryptography), its server context and a client context."""
    return tls_contexts(tmp_path_factory.mktemp("tls"))


def start_gateway(paths, fleet, tls_pair=None, **overrides) -> OcppVehicles:
    """The shared start, with a 0.2 kW deadband and a 2 s resync so the tests see both in seconds."""
    return _ocpp.start_gateway(paths, fleet, tls_pair, **{"deadband_kw": 0.2, "resync_s": 2.0, **overrides})


def start_stations(gw, fleet, passwords, tls_pair=None, kinds=None, **kw) -> SimStations:
    scheme = "wss" if tls_pair else "ws"
    state = SimFleetState.from_fleet(fleet, 0, unreachable_fraction=0.0, hot_fraction=0.0, low_soh_fraction=0.0)
    return SimStations(f"{scheme}://127.0.0.1:{gw.port}/ocpp", specs_from_fleet(fleet, passwords, kinds), state,
                       ssl_context=tls_pair[1] if tls_pair else None, **kw).start()


def updates(sims, station=None, since_ns=0):
    """(t_ns, setpoint W) of the UpdateDynamicSchedules the simulated stations received."""
    return [(c.t_ns, c.payload["schedule_update"]["setpoint"]) for c in list(sims.commands)
            if c.action == "UpdateDynamicSchedule" and c.t_ns >= since_ns
            and (station is None or c.station_id == station)]


# ------------------------------------------------------------------------------ against a real aggregator
def test_frequency_step_reaches_the_stations_with_the_ocpp_sign(site, tls, tmp_path):
    """Under-frequency at the aggregator's meter reaches the simulated stations as UpdateDynamicSchedule
    with a negative setpoint (discharge) and their EVs export; over-frequency gives a positive one."""
    from v2grt.aggregator import Aggregator
    from v2grt.config import config_from_dict
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    paths, fleet, passwords = site
    meter = SunSpecMeter(213, f_hz=50.0)
    msim = SimServerThread([meter]).start()
    cfg = config_from_dict({
        "fleet_id": "ocpptest", "period_s": 0.1, "budget_s": 0.1, "state_dir": str(tmp_path / "state"),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": {"host": "127.0.0.1", "port": msim.port(meter), "poll_interval_s": 0.02},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
                "setpoint_ttl_s": 0.3},
        "service": {"name": "dc", "capacity_kw": 30.0},
        "fleet": {"roster": str(paths["roster"])},
    })
    agg = Aggregator(cfg, epoch=5)
    agg.start()
    gw = start_gateway(paths, fleet, tls)
    sims = start_stations(gw, fleet, passwords, tls)
    ctx = zmq.Context()
    core = GatewayCore(ctx, GW, gw, setpoints=agg.publisher.endpoint, telemetry=agg.telemetry.endpoint,
                       telemetry_interval_s=0.1)
    stop = threading.Event()
    runner = threading.Thread(target=core.run, args=(stop,), daemon=True)
    runner.start()
    try:
        # Heard before dispatched: the stations' SoC reaches the aggregator through the gateway first.
        wait_until(lambda: int(agg.fleet.online[: agg.fleet.n_rows].sum()) == 6, 10.0, "six EVSEs online")
        meter.set_frequency(49.5)  # GB DC: full discharge
        t_step = time.monotonic_ns()
        wait_until(lambda: any(sp < -1000.0 for _t, sp in updates(sims, since_ns=t_step)), 5.0,
                   "a discharge setpoint (negative W) at a station")
        wait_until(lambda: float(sims.p_kw.sum()) > 20.0, 5.0, "the simulated EVs exporting")
        assert all(sp <= 0.0 for _t, sp in updates(sims, since_ns=t_step + 1_000_000_000))
        meter.set_frequency(50.5)  # full charge
        t_step = time.monotonic_ns()
        wait_until(lambda: any(sp > 1000.0 for _t, sp in updates(sims, since_ns=t_step)), 5.0,
                   "a charge setpoint (positive W)")
        wait_until(lambda: float(sims.p_kw.sum()) < -20.0, 5.0, "the simulated EVs charging")
        wait_until(lambda: float(agg.fleet.p_actual_kw[: agg.fleet.n_rows].sum()) < -20.0, 5.0,
                   "measured charging back at the aggregator (Power.Active.Import)")

        # The aggregator dies without a last word: the gateway's expiry sends 0 itself.
        agg.stop(final_zero=False)
        t_dead = time.monotonic_ns()
        wait_until(lambda: {sp for _t, sp in updates(sims, since_ns=t_dead)} >= {0.0}
                   and all(abs(sims.target_kw) < 1e-9), 3.0, "UpdateDynamicSchedule setpoint 0 on expiry")
        first_zero = min(t for t, sp in updates(sims, since_ns=t_dead) if sp == 0.0)
        assert (first_zero - t_dead) / 1e9 < 0.3 + 0.4  # ttl + scan + one call on a loaded machine
        assert core.expiries >= 1
    finally:
        stop.set()
        runner.join(5.0)
        gw.close()
        sims.stop()
        agg.stop()
        ctx.term()
        msim.stop()


# ------------------------------------------------------------------------------ the station side alone
def test_profiles_deadband_resync_and_misbehaving_stations(site):
    """A 2.1 station gets the 0 W fallback and a Dynamic CentralSetpoint profile; small moves stay in the
    deadband until the resync; a station rejecting profiles reports NODE_UNREACHABLE; a 2.0.1 station
    gets charge limits only and advertises no discharge; closing the gateway sends the last zeros first."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, deadband_kw=0.5, resync_s=1.0)
    sims = start_stations(gw, fleet, passwords, kinds={"CS0002": "rejects", "CS0003": "v201"})
    try:
        wait_until(lambda: gw.controllable.sum() == 4 and gw.telemetry(0)["fault"][2:4].tolist() == [6, 6], 10.0,
                   "profiles accepted on CS0001 and CS0003, refused on CS0002")
        tel = gw.telemetry(0)
        assert tel["online"].tolist() == [1] * 6
        assert tel["fault"].tolist() == [0, 0, Reason.NODE_UNREACHABLE, Reason.NODE_UNREACHABLE, 0, 0]
        assert tel["p_dis_max_kw"][4:].tolist() == [0.0, 0.0]  # 2.0.1: charge-only
        profiles = [c for c in sims.commands if c.action == "SetChargingProfile" and c.station_id == "CS0001"]
        assert profiles[0].payload["charging_profile"]["charging_profile_purpose"] == "TxDefaultProfile"
        tx = profiles[1].payload["charging_profile"]
        assert tx["charging_profile_kind"] == "Dynamic" and tx["max_offline_duration"] == 3
        assert tx["charging_schedule"][0]["charging_schedule_period"][0]["operation_mode"] == "CentralSetpoint"

        t0 = time.monotonic_ns()
        gw.apply(np.array([5.0, 5.0, 5.0, 5.0, -4.0, -4.0]), 0)
        wait_until(lambda: len(updates(sims, "CS0001", t0)) >= 2, 3.0, "two updates on CS0001")
        assert {sp for _t, sp in updates(sims, "CS0001", t0)} == {-5000.0}
        wait_until(lambda: np.allclose(sims.target_kw, [5, 5, 0, 0, -4, -4]), 3.0, "targets taken")
        t1 = time.monotonic_ns()
        gw.apply(np.array([5.3, 5.3, 5.0, 5.0, -4.0, -4.0]), 0)  # inside the 0.5 kW deadband
        time.sleep(0.4)
        assert updates(sims, "CS0001", t1) == []
        wait_until(lambda: len(updates(sims, "CS0001", t1)) >= 2, 2.5, "the resync sends the small move")
        assert {sp for _t, sp in updates(sims, "CS0001", t1)} == {-5300.0}
        limits = [c.payload["charging_profile"] for c in sims.commands
                  if c.station_id == "CS0003" and c.action == "SetChargingProfile" and c.t_ns >= t0]
        assert limits and all(p["charging_profile_kind"] == "Relative" for p in limits)
        assert limits[-1]["charging_schedule"][0]["charging_schedule_period"][0]["limit"] == 4000.0
        assert gw.counters()["profiles_rejected"] >= 2
        assert gw.counters()["profiles_installed"] == 4  # once per transaction, not again while in flight
        t2 = time.monotonic_ns()
        gw.apply(np.zeros(6), 0)  # what GatewayCore.close does, then the process closes the CSMS
        gw.close()
        assert [sp for _t, sp in updates(sims, "CS0001", t2)] == [0.0, 0.0]  # flushed before the sockets closed
    finally:
        sims.stop()
        gw.close()


def test_a_station_that_disconnects_goes_offline_and_falls_back_to_zero(site):
    """A station that drops its connection shows OFFLINE, and its EVs go to 0 kW on their own once
    maxOfflineDuration passes (the profile is invalid offline), then come back when it reconnects."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, max_offline_s=1)
    sims = start_stations(gw, fleet, passwords, kinds={"CS0001": "disconnects"}, disconnect_every_s=1.5,
                          away_s=2.5, meter_interval_s=0.3)
    try:
        wait_until(lambda: gw.controllable[:2].all(), 10.0, "CS0001 controlled")
        gw.apply(np.full(6, 6.0), 0)
        wait_until(lambda: sims.p_kw[0] > 5.0, 3.0, "CS0001 exporting")
        wait_until(lambda: gw.telemetry(0)["fault"][0] == Reason.OFFLINE, 5.0, "CS0001 offline at the gateway")
        assert gw.telemetry(0)["online"][:2].tolist() == [0, 0]
        wait_until(lambda: abs(sims.p_kw[0]) < 1e-6, 3.0, "CS0001's EV at 0 kW after maxOfflineDuration")
        assert sims.p_kw[2] > 5.0  # the others keep going
        wait_until(lambda: gw.controllable[:2].all() and sims.p_kw[0] > 5.0, 8.0, "back after reconnecting")
        assert sims.connections["CS0001"] >= 2
    finally:
        sims.stop()
        gw.close()


# ------------------------------------------------------------------------------ hostile input and security
async def _raw_session(port, station, password, frames, ssl_ctx=None, subprotocol="ocpp2.1"):
    """Connect as `station`, send each raw frame, collect one reply per frame (None if none came)."""
    from websockets.asyncio.client import connect

    auth = base64.b64encode(f"{station}:{password}".encode()).decode()
    scheme = "wss" if ssl_ctx else "ws"
    replies = []
    async with connect(f"{scheme}://127.0.0.1:{port}/ocpp/{station}", subprotocols=[subprotocol],
                       additional_headers={"Authorization": f"Basic {auth}"}, ssl=ssl_ctx) as ws:
        for frame in frames:
            await ws.send(frame)
            try:
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 2.0)))
            except asyncio.TimeoutError:
                replies.append(None)
    return replies


def test_bad_messages_get_callerrors_are_counted_and_do_not_stop_the_gateway(site, tls):
    """Garbage, a schema violation, an unknown and an unhandled action, an impossible SoC: each gets a
    CALLERROR with its code, counted; replies to nothing are dropped (not queued); a Heartbeat afterwards
    is answered normally."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, tls)
    meter = {"evseId": 1, "meterValue": [{"timestamp": "2026-12-04T21:00:00Z",
                                          "sampledValue": [{"measurand": "SoC", "value": 250}]}]}
    frames = ["not json", json.dumps([2, "m1", "BootNotification", {"reason": "PowerUp"}]),
              json.dumps([2, "m2", "FlyToTheMoon", {}]), json.dumps([2, "m3", "Authorize", {"idToken": {
                  "idToken": "x", "type": "Central"}}]),
              json.dumps([2, "m4", "MeterValues", meter]), json.dumps([7, "m5"]),
              *[json.dumps([3, f"r{i}", {"status": "Accepted"}]) for i in range(3)],  # replies to nothing
              json.dumps([2, "m6", "Heartbeat", {}])]
    try:
        replies = asyncio.run(_raw_session(gw.port, "CS0001", passwords["CS0001"], frames, tls[1]))
        codes = [r[2] if r and r[0] == 4 else r and r[0] for r in replies]
        assert codes[0] in ("FormatViolation", "FormationViolation") and replies[0][1] == "-1"
        assert codes[1] == "OccurrenceConstraintViolation" or codes[1] == "ProtocolError"
        assert codes[2] == "NotSupported" and codes[3] == "NotImplemented"
        assert codes[4] == "PropertyConstraintViolation" and "SoC" in replies[4][3]
        assert codes[5] == "PropertyConstraintViolation" and replies[5][1] == "m5"
        assert replies[6:9] == [None, None, None] and gw.stats["unsolicited_replies"] == 3  # dropped, not queued
        assert replies[9][0] == 3 and replies[9][1] == "m6" and "currentTime" in replies[9][2]
        assert sum(gw.callerrors.values()) == 6
        assert gw.callerrors["NotImplemented"] == 1 and gw.callerrors["PropertyConstraintViolation"] == 2
        assert gw._thread.is_alive()
    finally:
        gw.close()


def test_callerror_counters_are_keyed_by_ocpp_rpc_error_codes_only(site):
    """A CALLERROR code outside OCPP's RPC error-code set is counted as "Other": 1,000 invented codes
    create one counter key, not 1,000 (state keyed only by known identities, DESIGN.md 12)."""
    paths, fleet, _passwords = site
    gw = start_gateway(paths, fleet)
    try:
        for i in range(1000):
            gw.count_callerror(f"Invented{i}" + "x" * 500, "CS0001", "detail")
        gw.count_callerror("SecurityError", "CS0001", "detail")
        assert dict(gw.callerrors) == {"Other": 1000, "SecurityError": 1}
        keys = {k for k in gw.counters() if k.startswith("callerror_")}
        assert keys == {"callerror_Other", "callerror_SecurityError"}
    finally:
        gw.close()


def test_unknown_stations_and_wrong_passwords_are_refused(site, tls):
    """An unknown station id (404), a wrong password, another station's password and no TLS are refused
    before the websocket opens; the refusals are counted by cause, not by id."""
    from websockets.exceptions import InvalidStatus

    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, tls)
    try:
        def status_of(station, password, ssl_ctx=tls[1]):
            try:
                asyncio.run(_raw_session(gw.port, station, password, [], ssl_ctx))
            except InvalidStatus as exc:
                return exc.response.status_code
            return 101

        assert status_of("CS9999", passwords["CS0001"]) == 404
        assert status_of("CS0001", "wrong-password-123456") == 401
        assert status_of("CS0001", passwords["CS0002"]) == 401
        assert status_of("CS0001", passwords["CS0001"]) == 101
        with pytest.raises((ssl.SSLError, OSError)):
            asyncio.run(_raw_session(gw.port, "CS0001", passwords["CS0001"], [], ssl.create_default_context()))
        assert gw.refused["UNKNOWN_STATION"] == 1 and gw.refused["BAD_CREDENTIALS"] == 2
    finally:
        gw.close()


def test_a_flooding_station_is_rate_limited_then_disconnected(site):
    """Past its burst a station gets CALLERROR GenericError; one that keeps flooding is disconnected (1008)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, rate_per_s=5.0, burst=5.0)

    async def flood():
        from websockets.asyncio.client import connect

        auth = base64.b64encode(f"CS0002:{passwords['CS0002']}".encode()).decode()
        async with connect(f"ws://127.0.0.1:{gw.port}/ocpp/CS0002", subprotocols=["ocpp2.1"],
                           additional_headers={"Authorization": f"Basic {auth}"}) as ws:
            for i in range(30):
                await ws.send(json.dumps([2, f"h{i}", "Heartbeat", {}]))
            replies = []
            try:
                while True:
                    replies.append(json.loads(await asyncio.wait_for(ws.recv(), 2.0)))
            except Exception:
                pass
            return replies, ws.close_code

    try:
        replies, close_code = asyncio.run(flood())
        assert [r[0] for r in replies[:5]] == [3] * 5
        assert any(r[0] == 4 and r[2] == "GenericError" for r in replies)
        assert close_code == 1008
        assert gw.stats["rate_limit_disconnects"] == 1
    finally:
        gw.close()


def test_ocpp_password_prints_a_credentials_row_the_gateway_loads(tmp_path):
    """`v2grt gateway ocpp-password` hashes a password from stdin into a row load_credentials accepts."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "v2grt.cli", "gateway", "ocpp-password", "CS-7"],
                          input="a-long-enough-password\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "c.csv"
    path.write_text("station_id,password_hash\n" + proc.stdout)
    assert om.check_password(om.load_credentials(path), "CS-7", "CS-7", "a-long-enough-password")
    short = subprocess.run([sys.executable, "-m", "v2grt.cli", "gateway", "ocpp-password", "CS-7"],
                           input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "16..40" in short.stderr


def test_gateway_refuses_plaintext_unless_asked_and_roster_ids_must_name_evses(site, tmp_path):
    """Without a certificate the gateway does not start unless plaintext is explicit; a roster id that is
    not <station>:<evse> is named."""
    paths, fleet, _ = site
    with pytest.raises(GatewayError, match="--tls-cert"):
        OcppVehicles(fleet, OcppSettings(om.load_credentials(paths["credentials"])), gateway_id=GW)
    from v2grt.testing import write_ten_vehicle_roster

    other = gateway_fleet(Fleet.from_csv(write_ten_vehicle_roster(tmp_path / "r.csv")), "gw1")
    with pytest.raises(GatewayError, match="not <station>:<evse>"):
        OcppVehicles(other, OcppSettings(om.load_credentials(paths["credentials"]), allow_plaintext=True),
                     gateway_id="gw1")


# ------------------------------------------------------------------------------ the command line
def test_gateway_and_stations_as_processes_follow_a_real_aggregator(tmp_path):
    """`v2grt sim ocpp-stations --write-site`, then `v2grt gateway ocpp` and `v2grt sim ocpp-stations`
    as real processes: the aggregator hears the EVSEs, sees the station that rejects profiles as
    NODE_UNREACHABLE, dispatches the others at under-frequency, measures the export; SIGTERM stops both."""
    import signal
    import subprocess
    import sys

    from v2grt.aggregator import Aggregator
    from v2grt.config import config_from_dict
    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    site_dir = tmp_path / "site"
    cli = [sys.executable, "-m", "v2grt.cli"]
    made = subprocess.run([*cli, "sim", "ocpp-stations", "--write-site", str(site_dir), "--stations", "2",
                           "--evses", "2", "--gateway-id", GW], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    meter = SunSpecMeter(213, f_hz=49.5)
    msim = SimServerThread([meter]).start()
    cfg = config_from_dict({
        "fleet_id": "ocppcli", "period_s": 0.1, "budget_s": 0.1, "state_dir": str(tmp_path / "state"),
        "realtime": {"mlockall": False, "gc_freeze": False},
        "meter": {"host": "127.0.0.1", "port": msim.port(meter), "poll_interval_s": 0.02},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
                "setpoint_ttl_s": 0.3},
        "service": {"name": "dc", "capacity_kw": 20.0},
        "fleet": {"roster": str(site_dir / "roster.csv")},
    })
    agg = Aggregator(cfg, epoch=9)
    agg.start()
    port = _free_port()
    gw_log = tmp_path / "gw.log"
    gw = subprocess.Popen([*cli, "gateway", "ocpp", "--roster", str(site_dir / "roster.csv"), "--gateway-id", GW,
                           "--credentials", str(site_dir / "credentials.csv"), "--allow-plaintext",
                           "--listen", f"127.0.0.1:{port}", "--setpoints", agg.publisher.endpoint,
                           "--telemetry", agg.telemetry.endpoint, "--telemetry-interval-s", "0.2",
                           "--log-file", str(gw_log)], stderr=subprocess.PIPE, text=True)
    stations = None
    try:
        wait_until(lambda: "GATEWAY_START" in (gw_log.read_text() if gw_log.exists() else ""), 20.0, "gateway up")
        stations = subprocess.Popen([*cli, "sim", "ocpp-stations", "--url", f"ws://127.0.0.1:{port}/ocpp",
                                     "--roster", str(site_dir / "roster.csv"), "--gateway-id", GW,
                                     "--passwords", str(site_dir / "passwords.csv"), "--meter-interval-s", "0.3",
                                     "--kinds", "rejects=1"],
                                    stderr=subprocess.PIPE, text=True)
        n = agg.fleet.n_rows
        wait_until(lambda: int(agg.fleet.online[:n].sum()) == 4, 20.0, "four EVSEs heard")
        wait_until(lambda: float(agg.fleet.p_actual_kw[:n].sum()) > 15.0, 10.0, "measured export near 20 kW")
        rows = [agg.fleet.row_of[f"CS0001:{e}"] for e in (1, 2)]  # --kinds rejects=1: the first station
        assert agg.fleet.fault[rows].tolist() == [Reason.NODE_UNREACHABLE] * 2
    finally:
        for proc in (stations, gw):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        codes = [p.wait(15) for p in (stations, gw) if p is not None]
        agg.stop()
        msim.stop()
    assert codes == [0, 0]
    assert "GATEWAY_STOP gateway=ocpp1 kind=ocpp" in gw_log.read_text()
    assert "updates_sent=" in gw_log.read_text() or "profiles_installed=" in gw_log.read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_transaction_joins_and_leaves_and_the_evs_minimum_soc_blocks_discharge(site):
    """With a real `ocpp` 2.1 client: a node is online once its transaction started and a SoC came; an
    EV at its own minimum SoC (evMinV2XEnergyRequest >= 0) advertises no discharge and a discharge
    request reaches it as setpoint 0; without meter values the node turns TIMEOUT_BMS_RESPONSE;
    TransactionEvent Ended takes the node offline."""
    from ocpp.routing import on
    from ocpp.v21 import ChargePoint, call, call_result
    from websockets.asyncio.client import connect

    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, deadband_kw=0.1, meter_stale_s=1.5)
    received = []

    class Station(ChargePoint):
        @on("SetChargingProfile")
        def on_profile(self, evse_id, charging_profile, **_):
            received.append(("SetChargingProfile", charging_profile))
            return call_result.SetChargingProfile(status="Accepted")

        @on("UpdateDynamicSchedule")
        def on_update(self, charging_profile_id, schedule_update, **_):
            received.append(("UpdateDynamicSchedule", schedule_update))
            return call_result.UpdateDynamicSchedule(status="Accepted")

    def soc_meter(pct):
        return [{"timestamp": "2026-12-04T21:00:00Z", "sampledValue": [{"measurand": "SoC", "value": pct}]}]

    async def session():
        auth = base64.b64encode(f"CS0001:{passwords['CS0001']}".encode()).decode()
        async with connect(f"ws://127.0.0.1:{gw.port}/ocpp/CS0001", subprotocols=["ocpp2.1"],
                           additional_headers={"Authorization": f"Basic {auth}"}) as ws:
            cp = Station("CS0001", ws)
            reader = asyncio.create_task(cp.start())
            await cp.call(call.BootNotification(charging_station={"model": "t", "vendorName": "t"}, reason="PowerUp"))
            await cp.call(call.TransactionEvent(event_type="Started", timestamp="2026-12-04T21:00:00Z",
                                                trigger_reason="CablePluggedIn", seq_no=0,
                                                transaction_info={"transactionId": "T1"}, evse={"id": 1}))
            await asyncio.sleep(0.3)
            assert gw.telemetry(0)["online"][0] == 0  # no SoC yet: nothing to dispatch
            await cp.call(call.MeterValues(evse_id=1, meter_value=soc_meter(25)))
            await cp.call(call.NotifyEVChargingNeeds(evse_id=1, charging_needs={
                "requestedEnergyTransfer": "AC_BPT", "v2xChargingParameters": {
                    "maxChargePower": 7000, "maxDischargePower": 7000, "evMinV2XEnergyRequest": 600}}))
            tel = gw.telemetry(0)
            assert tel["online"][0] == 1 and tel["soc"][0] == 0.25
            assert tel["p_dis_max_kw"][0] == 0.0 and tel["p_chg_max_kw"][0] == 7.0  # 25 % + 0.6 kWh/60 kWh = 26 %
            for _ in range(50):
                if gw.controllable[0]:
                    break
                await asyncio.sleep(0.05)
            gw.apply(np.array([6.0, 0, 0, 0, 0, 0]), 0)
            await asyncio.sleep(0.5)
            gw.apply(np.array([-6.0, 0, 0, 0, 0, 0]), 0)
            await asyncio.sleep(1.6)
            stale = gw.telemetry(0)  # connected, in a transaction, but no meter values for over 1.5 s
            assert (stale["online"][0], stale["fault"][0]) == (1, Reason.TIMEOUT_BMS_RESPONSE)
            await cp.call(call.TransactionEvent(event_type="Ended", timestamp="2026-12-04T21:01:00Z",
                                                trigger_reason="EVDeparted", seq_no=1,
                                                transaction_info={"transactionId": "T1"}))
            tel = gw.telemetry(0)
            reader.cancel()
            return tel

    try:
        tel = asyncio.run(session())
        assert tel["online"][0] == 0 and tel["fault"][0] == 0
        profile = next(p for a, p in received if a == "SetChargingProfile" and p["charging_profile_purpose"]
                       == "TxProfile")
        assert profile["transaction_id"] == "T1" and profile["charging_profile_kind"] == "Dynamic"
        assert profile["charging_schedule"][0]["charging_schedule_period"][0]["discharge_limit"] == -11000.0  # roster
        last = [u for a, u in received if a == "UpdateDynamicSchedule"][-1]
        assert last == {"setpoint": 6000.0, "limit": 7000.0, "discharge_limit": 0.0}  # the charge, the EV's limits
        assert all(u["setpoint"] >= 0.0 for a, u in received if a == "UpdateDynamicSchedule")  # never discharge
        assert not gw.controllable[0]
    finally:
        gw.close()


def test_a_restarted_gateway_learns_running_transactions_with_trigger_message(site):
    """Stations keep their transactions across a gateway restart (a reconnect is not a reboot): the new
    gateway asks with TriggerMessage(TransactionEvent), re-installs the profiles and controls again."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    port = gw.port
    sims = start_stations(gw, fleet, passwords)
    try:
        wait_until(lambda: gw.controllable.all(), 10.0, "all six EVSEs controlled")
        started = sum(1 for c in sims.commands if c.action == "TriggerMessage")
        gw.close()
        gw = start_gateway(paths, fleet, port=port)
        wait_until(lambda: gw.controllable.all(), 15.0, "controlled again by the restarted gateway")
        assert gw.telemetry(0)["online"].tolist() == [1] * 6
        assert sum(1 for c in sims.commands if c.action == "TriggerMessage") >= started + 3
        assert gw.counters()["triggers_accepted"] == 3 and sims.tx_seq == 6  # no transaction restarted
        gw.apply(np.full(6, 3.0), 0)
        wait_until(lambda: np.allclose(sims.target_kw, 3.0), 3.0, "setpoints applied after the restart")
    finally:
        sims.stop()
        gw.close()


def test_a_reply_that_breaks_its_schema_is_counted_and_the_setpoint_sent_again(site):
    """A real `ocpp` 2.1 station answering UpdateDynamicSchedule with a status outside the schema: the gateway
    checks the reply (its own CALL path, not ChargePoint.call), counts it as a bad reply and a rejected update,
    and sends the setpoint again at the next scan instead of taking it as applied."""
    from ocpp.routing import on
    from ocpp.v21 import ChargePoint, call, call_result
    from websockets.asyncio.client import connect

    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, deadband_kw=0.1)
    updates = []

    class Station(ChargePoint):
        @on("SetChargingProfile")
        def on_profile(self, evse_id, charging_profile, **_):
            return call_result.SetChargingProfile(status="Accepted")

        @on("UpdateDynamicSchedule", skip_schema_validation=True)  # lets the station send a reply that is not valid
        def on_update(self, charging_profile_id, schedule_update, **_):
            updates.append(schedule_update["setpoint"])
            return call_result.UpdateDynamicSchedule(status="Maybe")

    async def session():
        auth = base64.b64encode(f"CS0001:{passwords['CS0001']}".encode()).decode()
        async with connect(f"ws://127.0.0.1:{gw.port}/ocpp/CS0001", subprotocols=["ocpp2.1"],
                           additional_headers={"Authorization": f"Basic {auth}"}) as ws:
            cp = Station("CS0001", ws)
            reader = asyncio.create_task(cp.start())
            await cp.call(call.BootNotification(charging_station={"model": "t", "vendorName": "t"}, reason="PowerUp"))
            await cp.call(call.TransactionEvent(
                event_type="Started", timestamp="2026-12-04T21:00:00Z", trigger_reason="CablePluggedIn", seq_no=0,
                transaction_info={"transactionId": "T1"}, evse={"id": 1},
                meter_value=[{"timestamp": "2026-12-04T21:00:00Z", "sampledValue": [{"measurand": "SoC",
                                                                                    "value": 50}]}]))
            for _ in range(100):
                if gw.controllable[0]:
                    break
                await asyncio.sleep(0.05)
            assert gw.controllable[0]  # the profile is in
            for _ in range(60):  # the gateway's GatewayCore would call apply every wake; so does this loop
                gw.apply(np.array([5.0, 0, 0, 0, 0, 0]), 0)
                if len(updates) >= 2:
                    break
                await asyncio.sleep(0.05)
            reader.cancel()

    try:
        asyncio.run(session())
        assert updates[:2] == [-5000.0, -5000.0]  # sent again: the first was not taken as applied
        assert gw.stats["bad_replies"] >= 1 and gw.stats["updates_rejected"] >= 1
    finally:
        gw.close()


def test_an_evses_limits_follow_each_of_their_inputs():
    """Evse.limits (remembered between calls) always equals the limits built afresh from the EVSE's state: after
    new EV needs, a minimum SoC reached and left, and a 2.0.1 station."""
    from v2grt.gateway.ocpp import Evse

    e = Evse("CS0001", 1, 60.0, 11.0, 7.4, 0.5)
    seen = []

    def check():
        blocked = e.charge_only or (e.min_soc is not None and e.soc <= e.min_soc)
        assert e.limits() == e._new_limits(blocked)
        seen.append(e.limits())

    check()
    check()
    assert e.limits() is seen[0]  # remembered while nothing changed
    e.needs = om.EvNeeds(True, om.EvLimits(p_chg_max_kw=5.0, p_dis_max_kw=3.0), min_v2x_energy_kwh=-6.0)
    check()
    e.min_soc = 0.4
    check()
    e.soc = 0.4  # at the EV's minimum: no discharge
    check()
    assert e.limits().p_dis_max_kw == 0.0
    e.soc = 0.45
    check()
    e.needs = om.EvNeeds(True, om.EvLimits(p_chg_max_kw=None, p_dis_max_kw=9.0))
    check()
    assert e.limits() == om.EvLimits(p_chg_max_kw=7.4, p_dis_max_kw=9.0)
    e.charge_only = True
    check()
    assert e.limits().p_dis_max_kw == 0.0
    e.needs, e.min_soc, e.charge_only = None, None, False
    check()
    assert e.limits() == om.EvLimits(p_chg_max_kw=7.4, p_dis_max_kw=11.0)
