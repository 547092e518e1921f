"""What `v2grt bench ocppfuzz` found in the OCPP gateway, one test per failure: the real gateway (OcppVehicles and
its WebSocket server) on loopback, attacked with a real websockets client or a raw socket."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time

import pytest
from _ocpp import auth_header, expect_switching_protocols, make_site, start_gateway

from v2grt.bench._ocpp_attack import basic, upgrade_request, ws_frame
from v2grt.testing import wait_until

HUGE = 10 ** 400  # an integer JSON allows and no double holds


@pytest.fixture
def site(tmp_path):
    """Two stations of two EVSEs under gateway ocpp1: roster, credentials (hashes), passwords (plain)."""
    return make_site(tmp_path, 2)


async def _connect(port, station, password):
    from websockets.asyncio.client import connect

    return await connect(f"ws://127.0.0.1:{port}/ocpp/{station}", subprotocols=["ocpp2.1"],
                         additional_headers=auth_header(station, password), max_size=None)


async def _next(ws, timeout_s: float = 5.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


def _meter(value, measurand="SoC") -> dict:
    return {"evseId": 1, "meterValue": [{"timestamp": "2026-12-05T10:00:00Z",
                                         "sampledValue": [{"measurand": measurand, "value": value}]}]}


def _needs(**v2x) -> dict:
    return {"evseId": 1, "chargingNeeds": {"requestedEnergyTransfer": "DC_BPT", "v2xChargingParameters": v2x}}


def test_numbers_beyond_a_double_get_property_constraint_violation_not_an_internal_error(site):
    """Integers too big for a double (valid JSON, valid for the schema's "number") in MeterValues and
    NotifyEVChargingNeeds, and a negative evMaxPower, are refused as PropertyConstraintViolation naming the
    field; none reaches a handler as an OverflowError (InternalError, a traceback of the gateway's 20)."""
    from v2grt.gateway.ocpp import _HANDLER_LOG

    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    dc = {"evMaxCurrent": 100, "evMaxVoltage": 400}

    def dc_needs(ev_max_power):
        return {"evseId": 1, "chargingNeeds": {"requestedEnergyTransfer": "DC",
                                               "dcChargingParameters": {**dc, "evMaxPower": ev_max_power}}}

    calls = [("MeterValues", _meter(HUGE)), ("MeterValues", _meter(-HUGE, "Power.Active.Import")),
             ("NotifyEVChargingNeeds", _needs(maxDischargePower=HUGE)),
             ("NotifyEVChargingNeeds", _needs(maxChargePower=HUGE)),
             ("NotifyEVChargingNeeds", _needs(evMinV2XEnergyRequest=-HUGE)),
             ("NotifyEVChargingNeeds", dc_needs(HUGE)), ("NotifyEVChargingNeeds", dc_needs(-5000))]

    async def run():
        ws = await _connect(gw.port, "CS0001", passwords["CS0001"])
        try:
            replies = []
            for i, (action, payload) in enumerate(calls):
                await ws.send(json.dumps([2, f"m{i}", action, payload]))
                replies.append(await _next(ws))
            return replies
        finally:
            await ws.close()

    tracebacks = _HANDLER_LOG.tracebacks
    try:
        replies = asyncio.run(run())
        assert [r[0] for r in replies] == [4] * len(calls), replies
        assert [r[2] for r in replies] == ["PropertyConstraintViolation"] * len(calls), [r[2:4] for r in replies]
        assert "SoC" in replies[0][3] and "maxDischargePower" in replies[2][3] and "evMaxPower" in replies[6][3]
        assert gw.callerrors["InternalError"] == 0 and _HANDLER_LOG.tracebacks == tracebacks
        assert gw.evses[gw.row_of[("CS0001", 1)]].limits().p_chg_max_kw >= 0.0
    finally:
        gw.close()


_BOOT = {"chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"}


async def _boot_and_answer(ws, i: int, answer) -> list:
    """A BootNotification; its CALLRESULT, then the gateway's SetChargingProfile (the 0 W fallback) answered with
    ``answer(call id)``. The gateway's CALL, or None if none came within 3 s."""
    await ws.send(json.dumps([2, f"b{i}", "BootNotification", _BOOT]))
    assert (await _next(ws))[:2] == [3, f"b{i}"]
    try:
        call = await _next(ws, 3.0)
    except asyncio.TimeoutError:
        return None
    await ws.send(json.dumps(answer(call[1])))
    return call


def test_a_callerror_with_an_invented_code_does_not_end_the_stations_sender(site):
    """A station answering the gateway's CALL with a CALLERROR whose code OCPP does not define is counted like
    any CALLERROR, and the gateway's next CALL to it still goes out (the package's to_exception raised
    UnknownCallErrorCodeError, which ended the station's sender task: no setpoint reached it again)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)

    async def run():
        ws = await _connect(gw.port, "CS0001", passwords["CS0001"])
        try:
            first = await _boot_and_answer(ws, 1, lambda uid: [4, uid, "InventedCode", "no", {}])
            second = await _boot_and_answer(ws, 2, lambda uid: [3, uid, {"status": "Accepted"}])
            return first, second
        finally:
            await ws.close()

    try:
        first, second = asyncio.run(run())
        assert first is not None and first[2] == "SetChargingProfile"
        assert second is not None and second[2] == "SetChargingProfile", "no CALL after the invented code"
        assert gw.stats["callerrors_received"] == 1 and gw.stats["default_profile_rejected"] == 1
    finally:
        gw.close()


def test_bad_replies_are_counted_each_but_logged_once_per_station_and_interval(site, caplog):
    """Replies that break their schema and CALLERRORs from a station are counted one by one, but logged at most
    once per station per event interval: a station answering every CALL badly must not fill the gateway's log."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    answers = [lambda uid: [3, uid, {"status": "Bogus"}], lambda uid: [4, uid, "GenericError", "no", {}]]

    async def run():
        ws = await _connect(gw.port, "CS0002", passwords["CS0002"])
        try:
            calls = [await _boot_and_answer(ws, i, answers[i % 2]) for i in range(8)]
            for _ in range(500):  # the last reply is handled by the station's sender task: wait for it, then close
                if gw.stats["bad_replies"] + gw.stats["callerrors_received"] == 8:
                    break
                await asyncio.sleep(0.01)
            return calls
        finally:
            await ws.close()

    try:
        with caplog.at_level(logging.WARNING):
            calls = asyncio.run(run())
        assert all(c is not None for c in calls)
        assert gw.stats["bad_replies"] == 4 and gw.stats["callerrors_received"] == 4
        lines = [r.getMessage() for r in caplog.records if "OCPP_BAD_REPLY" in r.getMessage()
                 or "OCPP_CALLERROR_RECEIVED" in r.getMessage()]
        assert len(lines) <= 2, lines
    finally:
        gw.close()


def _raw_station(port: int, station: str, password: str) -> socket.socket:
    """A plain socket through the upgrade (101 checked), frames built by the bench's attacker (masked)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    sock.sendall(upgrade_request(port, station, basic(station, password)))
    return expect_switching_protocols(sock)


def _read_messages(sock: socket.socket, n: int, timeout_s: float = 5.0) -> list:
    """The next ``n`` text messages the gateway sends (JSON), fewer if it stops sending for ``timeout_s``."""
    buf, out = b"", []
    sock.settimeout(timeout_s)
    while len(out) < n:
        while True:  # whole frames in buf first
            if len(buf) < 2:
                break
            size, at = buf[1] & 0x7F, 2
            if size == 126:
                size, at = struct.unpack("!H", buf[2:4])[0], 4
            if len(buf) < at + size:
                break
            if buf[0] & 0x0F == 0x1:
                out.append(json.loads(buf[at:at + size]))
            buf = buf[at + size:]
        if len(out) >= n:
            break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        buf += chunk
    return out


def test_a_rate_limited_recursion_bomb_gets_its_callerror_and_the_frames_after_it_are_read(site):
    """A frame of 3,000 '[' from a station over its rate limit is answered CALLERROR GenericError like any
    rate-limited frame, and the frame that came in the same read is answered too: finding the message id for
    the CALLERROR raised RecursionError in the read callback, which dropped the rest of the read (and wrote a
    traceback to stderr per frame: a way to fill the disk)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, rate_per_s=0.1, burst=3.0)
    sock = _raw_station(gw.port, "CS0001", passwords["CS0001"])
    try:
        sock.sendall(b"".join(ws_frame(json.dumps([2, f"h{i}", "Heartbeat", {}]).encode()) for i in range(3)))
        assert [m[:2] for m in _read_messages(sock, 3)] == [[3, "h0"], [3, "h1"], [3, "h2"]]
        sock.sendall(ws_frame(b"[" * 3000) + ws_frame(json.dumps([2, "h4", "Heartbeat", {}]).encode()))
        replies = _read_messages(sock, 2)
        assert [(m[0], m[1], m[2]) for m in replies] == [(4, "-1", "GenericError"), (4, "h4", "GenericError")]
        assert gw.stats["rate_limited"] == 2 and gw._thread.is_alive()
    finally:
        sock.close()
        gw.close()


async def _send_all_then_read(ws, frames: list[str], timeout_s: float = 3.0) -> tuple[list, int | None]:
    """Send every frame, then read replies until the gateway closes or stays silent; (replies, close code)."""
    for frame in frames:
        try:
            await ws.send(frame)
        except Exception:  # closed by the gateway while sending: what it sent is read below
            break
    replies = []
    try:
        while True:
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), timeout_s)))
    except Exception:
        pass
    return replies, ws.close_code


def test_the_rate_limit_charges_a_frame_by_its_size(site):
    """A message costs one token per started 4 KiB: a station sending 60 KB frames at the default limit (20
    messages/s, burst 40) is rate-limited after two and disconnected (1008) after a few, instead of having
    every one parsed and schema-checked (bench ocppfuzz: 18 such frames/s per station passed the message
    limit and took 62 % of a core at ten stations, honest updates' p99 481 ms)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    pad = "x" * 60_000
    frames = [json.dumps([2, f"h{i}", "Heartbeat", {"customData": {"vendorId": "v", "pad": pad}}]) for i in range(12)]

    async def run():
        ws = await _connect(gw.port, "CS0001", passwords["CS0001"])
        try:
            return await _send_all_then_read(ws, frames)
        finally:
            await ws.close()

    try:
        replies, close_code = asyncio.run(run())
        limited = [r for r in replies if r[0] == 4 and r[2] == "GenericError" and "rate limit" in r[3]]
        assert len(replies) - len(limited) <= 3 and limited, [r[:3] for r in replies]
        assert close_code == 1008 and gw.stats["rate_limit_disconnects"] == 1
    finally:
        gw.close()


def test_a_station_disconnected_for_flooding_keeps_its_debt_and_is_refused_429_until_it_paid(site):
    """The rate limit's bucket belongs to the station, not to one connection: a flooder disconnected with 1008
    that reconnects at once is refused in the upgrade (HTTP 429, counted as refused_RATE_LIMITED) while it is in
    debt. A fresh bucket per connection gave it a fresh burst on every reconnect, and each accepted reconnect
    cost the gateway a session (bench ocppfuzz: 114 reconnects/s of ping flooders took 55 % of a core)."""
    from websockets.exceptions import InvalidStatus

    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, rate_per_s=0.5, burst=5.0)
    beats = [json.dumps([2, f"h{i}", "Heartbeat", {}]) for i in range(12)]

    async def run():
        ws = await _connect(gw.port, "CS0002", passwords["CS0002"])
        first = await _send_all_then_read(ws, beats)
        await ws.close()
        try:
            ws = await _connect(gw.port, "CS0002", passwords["CS0002"])
        except InvalidStatus as exc:
            return first, exc.response.status_code
        await ws.close()
        return first, 101

    try:
        (first, code1), status = asyncio.run(run())
        assert [r[0] for r in first[:5]] == [3] * 5 and code1 == 1008
        assert status == 429 and gw.refused["RATE_LIMITED"] == 1
    finally:
        gw.close()

def test_a_ping_flood_counts_against_the_stations_rate_limit(site):
    """Pings (and unsolicited pongs) cost a token each: a station sending 200 pings at once is disconnected with
    1008 like any flood, and its socket closed within a second, not after a close handshake it may never answer
    (pings bypassed the limit: 50,000 pings/s from ten stations took 49 % of a core and pushed the honest
    stations' update p99 to 793 ms, and no station was ever disconnected)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    sock = _raw_station(gw.port, "CS0001", passwords["CS0001"])
    try:
        sock.sendall(b"".join(ws_frame(b"p" * 100, opcode=0x9) for _ in range(200)))
        sock.settimeout(2.0)
        data, eof = b"", False
        try:
            while chunk := sock.recv(65536):
                data += chunk
            eof = True
        except ConnectionResetError:
            eof = True
        except TimeoutError:
            pass
        frames = []  # (opcode, payload) of what the gateway sent: pongs, then (after the fix) its close
        while len(data) >= 2:
            size, at = data[1] & 0x7F, 2
            if size == 126:
                size, at = struct.unpack("!H", data[2:4])[0], 4
            frames.append((data[0] & 0x0F, data[at:at + size]))
            data = data[at + size:]
        closes = [struct.unpack("!H", p[:2])[0] for op, p in frames if op == 0x8]
        assert closes == [1008], closes  # (the pongs of one read are websockets' own, written before we see it)
        assert eof, "the flooder's socket is still open 2 s after its 1008: its bytes are still being read"
        assert gw.stats["rate_limit_disconnects"] == 1
    finally:
        sock.close()
        gw.close()


def test_a_flooder_reconnecting_is_charged_while_its_old_connection_ends(site):
    """A station cut off for flooding that reconnects once it has paid its debt has its new connection's pings
    charged from the upgrade: while the new connection waited for the old one to end (up to a second) no session
    read it, and its pings were answered without limit (bench ocppfuzz: 35 % of a core with ping floods)."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, rate_per_s=100.0, burst=40.0)  # the debt is paid in 0.4 s, the cut takes 1 s
    first = _raw_station(gw.port, "CS0001", passwords["CS0001"])
    try:
        first.sendall(b"".join(ws_frame(b"p" * 100, opcode=0x9) for _ in range(100)))  # debt: cut
        wait_until(lambda: gw.stats["rate_limit_disconnects"] == 1, 5.0, "the first connection cut")
        time.sleep(0.5)  # paid back: the upgrade is accepted while the first connection still ends
        second = _raw_station(gw.port, "CS0001", passwords["CS0001"])
        try:
            pongs = 0
            for _ in range(10):  # one read each: 20 pings every 0.1 s for a second
                try:
                    second.sendall(b"".join(ws_frame(b"q" * 100, opcode=0x9) for _ in range(20)))
                except OSError:
                    break
                time.sleep(0.1)
            second.settimeout(2.0)
            data = b""
            try:
                while chunk := second.recv(65536):
                    data += chunk
            except (TimeoutError, ConnectionResetError):
                pass
            pongs = data.count(b"\x8a\x64q")  # a pong frame (unmasked, 100 bytes) echoing "q..."
            assert pongs <= 100, pongs  # charged at 100/s with 40 of burst: cut again within the second
        finally:
            second.close()
    finally:
        first.close()
        gw.close()

