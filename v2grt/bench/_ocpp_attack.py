"""The attacker of `v2grt bench ocppfuzz`: frames built before the clock starts, sent by a child process at a rate.

Two kinds of attacker in one asyncio process (uvloop when installed):

- **compromised stations** (``lanes``): each lane holds one authenticated connection (TLS, Basic auth) under the id
  of a station that is in the site's credentials and roster but that no simulator runs, and sends messages from
  :func:`build_frames` at ``rate / lanes`` per second. A connection the gateway closes (rate limit 1008, frame too
  big 1009, invalid UTF-8 1007, protocol error 1002) is opened again before the lane's next message. The lane's
  reader answers every CALL the gateway sends it with a CALLERROR under an invented code, a reply that breaks its
  schema, or nothing (in turn), answers pings, and counts what came back;
- **strangers** (``connects_per_s``): new connections without valid credentials (wrong password, no
  Authorization, an unknown station id, an honest station's id with a compromised password, garbage instead of
  the HTTP upgrade, a TLS handshake of garbage, connect-and-close churn), and ``slowloris`` connections that send
  their upgrade one byte a second until the gateway drops them.

Everything here is the attacker's: the gateway is reached only through its socket.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import random
import ssl
import struct
import sys
import time

#: The gateway's frame limit (OcppSettings.max_message_bytes, websockets' max_size)
FRAME_LIMIT = 65_536
MASK = b"\x5a\xa5\x3c\xc3"  # a fixed masking key: the server unmasks whatever key it gets

#: Message kinds (sent on a compromised station's connection) and their default weights.
MESSAGE_MIX = {
    "malformed_json": 10, "binary": 5, "not_array": 5, "bad_type_id": 5, "unknown_action": 5,
    "schema_meter": 10, "schema_tx": 8, "schema_status": 6, "schema_needs": 6, "huge_arrays": 2,
    "unsolicited_replies": 6, "deep_nesting": 2, "duplicate_keys": 4, "invalid_utf8": 2, "oversize": 2,
    "fragmented": 4, "ping_flood": 3, "boot_flood": 1, "valid": 8,
}
#: Connection kinds (a new connection each) and their default weights.
CONNECT_MIX = {"wrong_password": 3, "no_auth": 2, "unknown_station": 2, "honest_id": 2, "garbage_upgrade": 2,
               "tls_garbage": 2, "churn": 4}
KINDS = (*MESSAGE_MIX, *CONNECT_MIX, "slowloris")

#: CALLERROR codes counted by name (what the gateway sends); anything else as "Other"
KNOWN_CODES = frozenset({"FormatViolation", "FormationViolation", "GenericError", "InternalError",
                         "MessageTypeNotSupported", "NotImplemented", "NotSupported", "OccurrenceConstraintViolation",
                         "OccurenceConstraintViolation", "PropertyConstraintViolation", "ProtocolError",
                         "RpcFrameworkError", "SecurityError", "TypeConstraintViolation"})


# ---------------------------------------------------------------------------------------------------
# frames


def ws_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One client frame (masked, as RFC 6455 requires of a client)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65_536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    if not n:
        return head + MASK
    key = (MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + MASK + masked


def _text(obj) -> bytes:
    return ws_frame(obj.encode() if isinstance(obj, str) else json.dumps(obj).encode())


def _ts() -> str:
    return "2026-12-05T10:00:00.000Z"


def _meter(sampled: list, evse_id=1) -> dict:
    return {"evseId": evse_id, "meterValue": [{"timestamp": _ts(), "sampledValue": sampled}]}


def _call(action: str, payload, uid: str = "a1") -> list:
    return [2, uid, action, payload]


def _tx(event="Updated", tx="TX-A", evse=1, **extra) -> dict:
    p = {"eventType": event, "timestamp": _ts(), "triggerReason": "MeterValuePeriodic", "seqNo": 1,
         "transactionInfo": {"transactionId": tx}, "evse": {"id": evse}}
    p.update(extra)
    return p


def build_frames(seed: int = 11) -> dict[str, list[bytes]]:
    """Every message kind's variants, each the bytes of one or more whole client frames (masked)."""
    rng = random.Random(seed)
    huge_int = "1" + "0" * 400  # beyond a double; Python's json takes it, orjson refuses it
    soc = {"measurand": "SoC", "unitOfMeasure": {"unit": "Percent"}, "value": 55}
    power = {"measurand": "Power.Active.Export", "unitOfMeasure": {"unit": "W"}, "value": 3000}

    def raw_meter(value_text: str, measurand="SoC") -> bytes:
        return ws_frame(f'[2,"m1","MeterValues",{{"evseId":1,"meterValue":[{{"timestamp":"{_ts()}",'
                        f'"sampledValue":[{{"measurand":"{measurand}","value":{value_text}}}]}}]}}]'.encode())

    malformed_json = [ws_frame(t) for t in (
        b"not json", b"[2,", b"{]", b"[2, \"a\", \"Heartbeat\", {}", b"\x00\x01\x02", b"", b"[,]", b"[2,'a','b',{}]",
        b"[2,\"a\",\"Heartbeat\",{}]]]", b"[2,\"a\",\"Heartbeat\",{\"x\":}]", b"nul", b"tru", b"[1e]",
        bytes(rng.randrange(32, 127) for _ in range(300)))]
    binary = [ws_frame(b, opcode=0x2) for b in (
        b"\x93\x02\xa1a\xa9Heartbeat", json.dumps(_call("Heartbeat", {})).encode(), os.urandom(200), b"")]
    not_array = [_text(t) for t in ('{"a":1}', "42", '"MeterValues"', "null", "[]", "true", '{"2":"a"}')]
    bad_type_id = [_text(t) for t in (
        [7, "a", {}], ["2", "a", "Heartbeat", {}], [2.5, "a", "Heartbeat", {}], [-1], [2], [2, "a"], [3], [4, "a"],
        [2, 17, "Heartbeat", {}], [2, "a" * 37, "Heartbeat", {}], [2, "a", 5, {}], [2, "a", "Heartbeat", []],
        [2, "a", "Heartbeat", "x"], [2, None, None, None], [True, "a", "Heartbeat", {}], [3, "a", []], [5, "a", {}])]
    unknown_action = [_text(c) for c in (
        _call("FlyToTheMoon", {}), _call("Authorize", {"idToken": {"idToken": "x", "type": "Central"}}),
        _call("X" * 1000, {}), _call("", {}), _call("../../etc/passwd", {}), _call("GetVariables", {}),
        _call("DataTransfer", {"vendorId": "v" * 255, "data": "d" * 2000}))]
    schema_meter = [_text(_call("MeterValues", p)) for p in (
        {}, {"evseId": 1}, {"meterValue": []}, {"evseId": "1", "meterValue": []}, _meter([]),
        _meter([{"value": "high"}]), _meter([{**soc, "value": 250}]), _meter([{**soc, "value": -5}]),
        _meter([{**power, "value": 1e30}]), _meter([{**power, "unitOfMeasure": {"unit": "GW"}}]),
        _meter([{**power, "unitOfMeasure": {"unit": "W", "multiplier": 99}}]), _meter([soc], evse_id=999),
        _meter([soc], evse_id=2 ** 63), _meter([soc], evse_id=-1), _meter([{**soc, "measurand": "Nonsense"}]),
        {"evseId": 1, "meterValue": [{"timestamp": 5, "sampledValue": [soc]}]},
        {"evseId": 1, "meterValue": [{"sampledValue": [soc]}]}, _meter([{**soc, "value": True}]),
        {"evseId": 1, "meterValue": "x"}, _meter([soc, power], evse_id=1) | {"customData": {"vendorId": "x" * 300}})]
    schema_meter += [raw_meter(v) for v in ("NaN", "Infinity", "-Infinity", huge_int, "-" + huge_int, "1e400",
                                            "-1e308")]
    schema_meter += [raw_meter(v, "Power.Active.Import") for v in ("NaN", huge_int, "1e400")]
    schema_tx = [_text(_call("TransactionEvent", p)) for p in (
        {}, _tx(event="Exploded"), _tx(tx="T" * 37), _tx(evse="one"), _tx(evse=0), _tx(evse=999),
        _tx(event="Ended", tx="NEVER-STARTED"), {**_tx(), "seqNo": -1}, {**_tx(), "transactionInfo": {}},
        _tx(meterValue=[{"timestamp": _ts(), "sampledValue": [{**soc, "value": 900}]}]),
        {k: v for k, v in _tx().items() if k != "evse"} | {"transactionInfo": {"transactionId": "ORPHAN"}},
        _tx(event="Started", tx="TX-NEW-1"), _tx(event="Started", tx="TX-NEW-2"))]
    schema_tx += [ws_frame(f'[2,"t1","TransactionEvent",{{"eventType":"Updated","timestamp":"{_ts()}",'
                           f'"triggerReason":"MeterValuePeriodic","seqNo":{huge_int},"transactionInfo":'
                           f'{{"transactionId":"TX-A"}},"evse":{{"id":1}}}}]'.encode())]
    status = {"timestamp": _ts(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1}
    schema_status = [_text(_call("StatusNotification", p)) for p in (
        {}, {**status, "connectorStatus": "OnFire"}, {**status, "evseId": "1"}, {**status, "evseId": 2 ** 70},
        {**status, "evseId": 999}, {**status, "connectorId": None}, {**status, "timestamp": None},
        {k: v for k, v in status.items() if k != "connectorStatus"}, {**status, "connectorStatus": "Faulted"},
        {**status, "extra": [1] * 1000})]
    v2x = {"maxChargePower": 11000, "maxDischargePower": 11000}

    def needs(**over):
        params = {**v2x, **over.pop("v2x", {})}
        return {"evseId": 1, "chargingNeeds": {"requestedEnergyTransfer": "DC_BPT", "v2xChargingParameters": params,
                                               **over}}

    schema_needs = [_text(_call("NotifyEVChargingNeeds", p)) for p in (
        {}, {"evseId": 1}, needs(requestedEnergyTransfer="Teleport"), needs(v2x={"maxDischargePower": -1}),
        needs(v2x={"maxDischargePower": 1e12}), needs(v2x={"maxChargePower": "lots"}),
        needs(v2x={"evMinV2XEnergyRequest": 1e300}), needs(v2x={"targetSoC": 500}), {**needs(), "evseId": 999},
        needs(dcChargingParameters={"evMaxCurrent": 1, "evMaxVoltage": 1, "evMaxPower": 1e300}),
        {"evseId": 1, "chargingNeeds": {"requestedEnergyTransfer": "DC", "dcChargingParameters": {
            "evMaxCurrent": 1, "evMaxVoltage": 1, "evMaxPower": -5000}}})]
    for field in ("maxDischargePower", "maxChargePower", "evMinV2XEnergyRequest"):
        for value in ("NaN", "Infinity", huge_int, "1e400"):
            schema_needs.append(ws_frame(
                f'[2,"n1","NotifyEVChargingNeeds",{{"evseId":1,"chargingNeeds":{{"requestedEnergyTransfer":'
                f'"DC_BPT","v2xChargingParameters":{{"{field}":{value}}}}}}}]'.encode()))
    schema_needs.append(ws_frame(
        b'[2,"n2","NotifyEVChargingNeeds",{"evseId":1,"chargingNeeds":{"requestedEnergyTransfer":"DC_BPT",'
        b'"dcChargingParameters":{"evMaxCurrent":1,"evMaxVoltage":1,"evMaxPower":' + huge_int.encode() + b"}}}]"))

    def under_limit(make, unit_len: int) -> bytes:
        """The largest k for which make(k) stays a frame under the limit."""
        k = (FRAME_LIMIT - 200) // unit_len
        while len(make(k)) >= FRAME_LIMIT - 16:
            k -= 8
        return make(k)

    sv_len = len(json.dumps(power)) + 1
    huge_arrays = [
        ws_frame(under_limit(lambda k: json.dumps(_call("MeterValues", _meter([power] * k))).encode(), sv_len)),
        ws_frame(under_limit(lambda k: json.dumps(_call("MeterValues", {"evseId": 1, "meterValue": [
            {"timestamp": _ts(), "sampledValue": [soc]}] * k})).encode(), 80)),
        ws_frame(under_limit(lambda k: json.dumps(_call("MeterValues", _meter([{"value": "x"}] * k))).encode(), 14)),
        ws_frame(under_limit(lambda k: json.dumps(_call("StatusNotification", {**status, "x": [0] * k})).encode(),
                             3)),
        ws_frame(under_limit(lambda k: json.dumps([2, "a", "Heartbeat", {f"k{i}": i for i in range(k)}]).encode(),
                             14)),
    ]
    unsolicited = [_text(m) for m in (
        [3, "never-sent", {}], [4, "never-sent", "GenericError", "x", {}], [3, "x" * 36, {"status": "Accepted"}],
        [4, "y", "Invented" + "z" * 200, "d" * 500, {"a": 1}], [3, "", {}], [4, "q", 5, 6, 7])]
    depth = FRAME_LIMIT - 64
    deep_nesting = [ws_frame(b"[" * depth), ws_frame(b"[" * (depth // 2) + b"]" * (depth // 2)),
                    ws_frame(b'[2,"d","Heartbeat",' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"]"),
                    ws_frame(b"[" * 1000 + b"]" * 1000), ws_frame(b"[" * 990 + b"]" * 990)]
    duplicate_keys = [ws_frame(t) for t in (
        b'[2,"k","MeterValues",{"evseId":1,"evseId":"one","meterValue":[]}]',
        b'[2,"k","MeterValues",{"evseId":1,"meterValue":[{"timestamp":"' + _ts().encode()
        + b'","sampledValue":[{"measurand":"SoC","value":50,"value":"NaN"}]}]}]',
        b'[2,"k","Heartbeat",{},"extra"]', b'[2,"k","Heartbeat",{"a":1,"a":2,"a":3}]',
        b'[3,"k",{"status":"Accepted","status":"Rejected"}]')]
    invalid_utf8 = [ws_frame(b'[2,"u","Heartbeat",{"x":"\xff\xfe"}]'), ws_frame(b"\xc3\x28"),
                    ws_frame(b'["\xed\xa0\x80"]')]
    oversize = [ws_frame(b"[" + b"1," * (FRAME_LIMIT // 2 + 100) + b"1]"), ws_frame(b"x" * (FRAME_LIMIT + 1))]
    hb = json.dumps(_call("Heartbeat", {}, "f1")).encode()
    pieces = [hb[i:i + 1] for i in range(len(hb))]
    fragmented = [
        b"".join(ws_frame(p, opcode=0x1 if i == 0 else 0x0, fin=i == len(pieces) - 1) for i, p in enumerate(pieces)),
        ws_frame(hb[:5], fin=False) + ws_frame(b"ping", opcode=0x9) + ws_frame(hb[5:], opcode=0x0),
        b"".join(ws_frame(b"[" * 16_000, opcode=0x1 if i == 0 else 0x0, fin=i == 4) for i in range(5)),  # > limit
        ws_frame(b"stray continuation", opcode=0x0),
        ws_frame(hb[:5], fin=False) + ws_frame(hb, opcode=0x1),  # a new message inside a fragmented one
    ]
    ping_flood = [b"".join(ws_frame(os.urandom(125), opcode=0x9) for _ in range(50)),
                  b"".join(ws_frame(b"", opcode=0xA) for _ in range(50))]
    boot = json.dumps(_call("BootNotification", {"chargingStation": {"model": "M", "vendorName": "V"},
                                                 "reason": "PowerUp"}, "b1")).encode()
    boot_flood = [ws_frame(boot) * 100]
    valid = [_text(_call("Heartbeat", {}, "h1")), _text(_call("MeterValues", _meter([soc, power]), "v1")),
             _text(_call("StatusNotification", status, "s1"))]
    out = {"malformed_json": malformed_json, "binary": binary, "not_array": not_array, "bad_type_id": bad_type_id,
           "unknown_action": unknown_action, "schema_meter": schema_meter, "schema_tx": schema_tx,
           "schema_status": schema_status, "schema_needs": schema_needs, "huge_arrays": huge_arrays,
           "unsolicited_replies": unsolicited, "deep_nesting": deep_nesting, "duplicate_keys": duplicate_keys,
           "invalid_utf8": invalid_utf8, "oversize": oversize, "fragmented": fragmented, "ping_flood": ping_flood,
           "boot_flood": boot_flood, "valid": valid}
    assert out.keys() == MESSAGE_MIX.keys()
    return out


def upgrade_request(port: int, station: str, authorization: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "ocpp2.1"}
    if authorization is not None:
        headers["Authorization"] = authorization
    return (f"GET /ocpp/{station} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()


def basic(station: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{station}:{password}".encode()).decode()


# ---------------------------------------------------------------------------------------------------
# the attacker process


class Attacker:
    """Runs the lanes, the strangers and the slowloris connections of one process for ``duration_s``."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.port = spec["port"]
        self.ssl = ssl.create_default_context(cafile=spec["ca_cert"])
        self.frames = build_frames(spec["seed"])
        self.rng = random.Random(spec["seed"])
        self.sent = collections.Counter()
        self.frames_sent = collections.Counter()
        self.bytes_sent = collections.Counter()
        self.outcomes = collections.Counter()  # what came back, by what
        self.errors = collections.Counter()  # the attacker's own failures, by exception type
        self.close_codes = collections.Counter()
        self.replies = collections.Counter()
        self.lanes_connects = 0
        self.slowloris_s: list[float] = []
        self.t_end = 0.0

    # ------------------------------------------------------------------ connections
    async def _open(self, tls: bool = True):
        return await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ssl if tls else None, server_hostname="127.0.0.1" if tls else None), 10.0)

    async def _upgrade(self, station: str, authorization: str | None):
        """(reader, writer, HTTP status) after the upgrade request."""
        reader, writer = await self._open()
        writer.write(upgrade_request(self.port, station, authorization))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        status = int(head.split(None, 2)[1])
        return reader, writer, status

    async def _drain_close(self, reader, writer, timeout_s: float = 2.0) -> None:
        try:
            await asyncio.wait_for(reader.read(), timeout_s)
        except (asyncio.TimeoutError, OSError, ssl.SSLError):
            pass
        writer.close()

    # ------------------------------------------------------------------ a compromised station's lane
    async def lane(self, k: int, rate: float) -> None:
        station, password = self.spec["attackers"][k % len(self.spec["attackers"])]
        kinds = [kk for kk, w in self.spec["message_mix"].items() if w > 0]
        weights = [self.spec["message_mix"][kk] for kk in kinds]
        conn = None
        t_next = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= self.t_end:
                break
            if t_next > now:
                await asyncio.sleep(t_next - now)
            t_next = max(t_next + 1.0 / rate, time.monotonic() - 1.0)  # behind by > 1 s: do not burst to catch up
            try:
                if conn is None or conn["closed"].done():
                    conn = await self._lane_connect(station, password)
                    if conn is None:
                        await asyncio.sleep(0.2)
                        continue
                kind = self.rng.choices(kinds, weights)[0]
                data = self.rng.choice(self.frames[kind])
                conn["writer"].write(data)
                await asyncio.wait_for(conn["writer"].drain(), 5.0)
                self.sent[kind] += 1
                self.bytes_sent[kind] += len(data)
            except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError) as exc:
                self.errors[f"lane {type(exc).__name__}"] += 1
                if conn is not None:
                    conn["writer"].close()
                    conn = None
        if conn is not None:
            conn["writer"].close()

    async def _lane_connect(self, station: str, password: str):
        try:
            reader, writer, status = await self._upgrade(station, basic(station, password))
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ValueError, asyncio.IncompleteReadError) as exc:
            self.errors[f"connect {type(exc).__name__}"] += 1
            return None
        self.outcomes[f"lane upgrade {status}"] += 1
        if status != 101:
            writer.close()
            return None
        self.lanes_connects += 1
        closed = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._lane_reader(reader, writer, closed))
        return {"writer": writer, "closed": closed, "reader": task}

    async def _lane_reader(self, reader, writer, closed) -> None:
        """The gateway's frames: count replies, answer its CALLs badly, pong its pings; the close code."""
        turn = 0
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await reader.readexactly(8))[0]
                payload = await reader.readexactly(n)
                opcode = b0 & 0x0F
                if opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    self.close_codes[str(code)] += 1
                    writer.write(ws_frame(payload[:2], opcode=0x8))
                    break
                if opcode == 0x9:
                    writer.write(ws_frame(payload, opcode=0xA))
                    continue
                if opcode != 0x1:
                    self.replies[f"opcode {opcode}"] += 1
                    continue
                try:
                    msg = json.loads(payload)
                except ValueError:
                    self.replies["not json"] += 1
                    continue
                if msg[0] == 2:  # the gateway's CALL: a CALLERROR of an invented code, a broken reply, or nothing
                    self.replies[f"gateway CALL {msg[2]}"] += 1
                    turn += 1
                    if turn % 3 == 1:
                        writer.write(_text([4, msg[1], f"Invented{turn % 1000}", "no", {}]))
                    elif turn % 3 == 2:
                        writer.write(_text([3, msg[1], {"status": "Bogus", "extra": [1, 2, 3]}]))
                elif msg[0] == 3:
                    self.replies["CALLRESULT"] += 1
                elif msg[0] == 4:
                    self.replies[f"CALLERROR {msg[2] if msg[2] in KNOWN_CODES else 'Other'}"] += 1
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError, ValueError, IndexError, TypeError):
            self.close_codes["no close frame"] += 1
        finally:
            writer.close()
            if not closed.done():
                closed.set_result(None)

    # ------------------------------------------------------------------ strangers
    async def strangers(self, rate: float) -> None:
        kinds = [kk for kk, w in self.spec["connect_mix"].items() if w > 0]
        weights = [self.spec["connect_mix"][kk] for kk in kinds]
        tasks: set[asyncio.Task] = set()
        t_next = time.monotonic()
        while time.monotonic() < self.t_end:
            await asyncio.sleep(max(t_next - time.monotonic(), 0.0))
            t_next = max(t_next + 1.0 / rate, time.monotonic() - 1.0)
            if len(tasks) >= 64:  # bounded: the attacker's own loop must keep its pace
                self.outcomes["stranger skipped (64 in flight)"] += 1
                continue
            kind = self.rng.choices(kinds, weights)[0]
            self.sent[kind] += 1
            task = asyncio.ensure_future(self._stranger(kind))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    async def _stranger(self, kind: str) -> None:
        spec = self.spec
        station, password = spec["attackers"][0]
        honest = spec["honest_station"]
        try:
            if kind in ("wrong_password", "no_auth", "unknown_station", "honest_id"):
                who, auth = {"wrong_password": (station, basic(station, "wrong-password-0123456789")),
                             "no_auth": (station, None),
                             "unknown_station": ("ZZ9999", basic("ZZ9999", password)),
                             "honest_id": (honest, basic(honest, password))}[kind]
                reader, writer, status = await self._upgrade(who, auth)
                self.outcomes[f"{kind} HTTP {status}"] += 1
                await self._drain_close(reader, writer)
            elif kind == "garbage_upgrade":
                reader, writer = await self._open()
                writer.write(os.urandom(300) + b"\r\n\r\n")
                head = await asyncio.wait_for(reader.read(200), 5.0)
                self.outcomes[f"{kind} {head.split(b' ', 2)[1].decode(errors='replace') if head else 'closed'}"] += 1
                await self._drain_close(reader, writer)
            elif kind == "tls_garbage":
                reader, writer = await self._open(tls=False)
                writer.write(os.urandom(517))
                data = await asyncio.wait_for(reader.read(), 5.0)
                self.outcomes[f"{kind} {'closed' if not data else 'alert then closed'}"] += 1
                writer.close()
            elif kind == "churn":
                if self.rng.random() < 0.5:
                    reader, writer = await self._open(tls=False)
                    self.outcomes["churn TCP"] += 1
                else:
                    reader, writer = await self._open()
                    self.outcomes["churn TLS"] += 1
                writer.close()
            self.bytes_sent[kind] += 0
        except (OSError, asyncio.TimeoutError, ssl.SSLError, ValueError, IndexError,
                asyncio.IncompleteReadError) as exc:
            self.outcomes[f"{kind} {type(exc).__name__}"] += 1

    async def slowloris(self, k: int) -> None:
        """An upgrade request one byte a second, again and again, until the duration ends."""
        station, password = self.spec["attackers"][k % len(self.spec["attackers"])]
        while time.monotonic() < self.t_end:
            t0 = time.monotonic()
            try:
                reader, writer = await self._open()
                self.sent["slowloris"] += 1
                request = upgrade_request(self.port, station, basic(station, password))
                for byte in request:
                    if time.monotonic() >= self.t_end:
                        break
                    writer.write(bytes([byte]))
                    await asyncio.wait_for(writer.drain(), 5.0)
                    self.bytes_sent["slowloris"] += 1
                    try:  # the gateway closes the socket when its open timeout runs out
                        data = await asyncio.wait_for(reader.read(1), 1.0)
                        if not data:
                            break
                    except asyncio.TimeoutError:
                        pass
                writer.close()
            except (OSError, asyncio.TimeoutError, ssl.SSLError, ConnectionError) as exc:
                self.outcomes[f"slowloris {type(exc).__name__}"] += 1
            self.slowloris_s.append(time.monotonic() - t0)
            await asyncio.sleep(0.1)

    async def run(self) -> dict:
        spec = self.spec
        t0 = time.monotonic()
        self.t_end = t0 + spec["duration_s"]
        jobs = [self.lane(k, spec["rate"] / spec["lanes"]) for k in range(spec["lanes"]) if spec["rate"] > 0]
        if spec["connects_per_s"] > 0:
            jobs.append(self.strangers(spec["connects_per_s"]))
        jobs += [self.slowloris(k) for k in range(spec["slowloris"])]
        t0_ns = time.monotonic_ns()
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - t0
        return {"t0_ns": t0_ns, "elapsed_s": elapsed, "sent": dict(self.sent), "bytes": dict(self.bytes_sent),
                "lane_connects": self.lanes_connects, "outcomes": dict(self.outcomes), "errors": dict(self.errors),
                "close_codes": dict(self.close_codes), "replies": dict(self.replies),
                "slowloris_max_s": max(self.slowloris_s, default=0.0),
                "slowloris_p50_s": sorted(self.slowloris_s)[len(self.slowloris_s) // 2] if self.slowloris_s else 0.0}


def attacker_main() -> None:
    """Child process: build the frames, say "ready", wait for a line on stdin, attack, print one JSON line."""
    spec = json.loads(sys.argv[1])
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    attacker = Attacker(spec)
    print("ready", flush=True)
    sys.stdin.readline()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        out = runner.run(attacker.run())
    print(json.dumps(out), flush=True)
