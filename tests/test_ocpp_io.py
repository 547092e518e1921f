"""The OCPP gateway's own WebSocket I/O layer (v2grt.gateway.ocpp_io) on loopback: what websockets' asyncio
server did for free, checked against real websockets clients and raw sockets, with and without TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import struct
import threading
import time

import pytest
from _ocpp import auth_header, expect_switching_protocols, make_site, start_gateway, tls_contexts

from v2grt.gateway.ocpp_io import StationServer
from v2grt.testing import wait_until


@pytest.fixture
def site(tmp_path):
    """Two stations of two EVSEs under gateway ocpp1: roster, credentials (hashes), passwords (plain)."""
    return make_site(tmp_path, 2)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, its server context and a client context."""
    return tls_contexts(tmp_path_factory.mktemp("tls"))


async def _connect(port, station, password, ssl_ctx=None, **kw):
    from websockets.asyncio.client import connect

    scheme = "wss" if ssl_ctx else "ws"
    return await connect(f"{scheme}://127.0.0.1:{port}/ocpp/{station}", subprotocols=["ocpp2.1"],
                         additional_headers=auth_header(station, password), ssl=ssl_ctx, **kw)


def _raw_upgrade(port, station, password) -> socket.socket:
    """A plain TCP socket through the HTTP upgrade by hand (101 checked): for what a library client will not do."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "ocpp2.1",
               **auth_header(station, password)}
    sock.sendall((f"GET /ocpp/{station} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                  + "\r\n").encode())
    return expect_switching_protocols(sock)


def _masked_text_frame(payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 * fin | 0x1])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the peer sends until it closes (b"" at EOF); AssertionError if it is still open after timeout_s."""
    deadline = time.monotonic() + timeout_s
    data = b""
    try:
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError
            sock.settimeout(left_s)  # the whole wait is bounded, not each recv (pings keep arriving)
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data
    except TimeoutError:
        raise AssertionError(f"still open after {timeout_s} s; received {data[:200]!r}") from None


# ------------------------------------------------------------------------------ through the gateway
@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
def test_garbage_before_the_upgrade_closes_only_that_socket(site, tls, use_tls):
    """Bytes that are no HTTP upgrade (no TLS hello, for a TLS port) get the socket closed, no session and no
    exception; a real station connects and is answered afterwards."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, tls if use_tls else None)
    try:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5.0)
        sock.sendall(b"\x00\xffHELLO? this is not HTTP\r\n\r\n")
        reply = _read_until_closed(sock, 5.0)
        sock.close()
        assert not reply.startswith(b"HTTP/1.1 101")
        assert gw.sessions == {}
        if use_tls:
            wait_until(lambda: gw.server.stats["tls_handshake_failures"] == 1, 2.0, "the failed TLS handshake counted")

        async def heartbeat():
            async with await _connect(gw.port, "CS0001", passwords["CS0001"], tls[1] if use_tls else None) as ws:
                await ws.send(json.dumps([2, "h1", "Heartbeat", {}]))
                return json.loads(await asyncio.wait_for(ws.recv(), 5.0))

        reply = asyncio.run(heartbeat())
        assert reply[:2] == [3, "h1"] and "currentTime" in reply[2]
        wait_until(lambda: not gw.server.connections, 5.0, "no connection left behind")
    finally:
        gw.close()


def test_a_tls_handshake_that_never_completes_is_timed_out_and_leaves_nothing(site, tls):
    """A TCP connect to the TLS port that never says hello, and one that stops mid-upgrade, are closed after
    open_timeout_s and counted; no connection object is left behind."""
    paths, fleet, _passwords = site
    gw = start_gateway(paths, fleet, tls, open_timeout_s=0.3)
    try:
        silent = socket.create_connection(("127.0.0.1", gw.port), timeout=5.0)
        t0 = time.monotonic()
        assert _read_until_closed(silent, 5.0) == b""
        assert 0.25 <= time.monotonic() - t0 < 3.0
        half = tls[1].wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=5.0),
                                  server_hostname="127.0.0.1")  # TLS done, the HTTP request never finished
        half.sendall(b"GET /ocpp/CS0001 HTTP/1.1\r\nHost: x\r\n")
        try:
            assert half.recv(1024) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass  # an EOF without close_notify: the socket is closed all the same
        silent.close()
        half.close()
        wait_until(lambda: gw.server.stats["open_timeouts"] == 2, 2.0, "both timeouts counted")
        wait_until(lambda: not gw.server.connections, 2.0, "no connection left behind")
        assert gw.sessions == {}
    finally:
        gw.close()


def test_an_oversized_frame_closes_1009_and_a_ping_is_answered(site, tls):
    """A message over max_message_bytes closes the connection with 1009 (the session ends, counted as a
    disconnect); a ping from the station is answered with its pong."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, tls, max_message_bytes=4096)

    async def run():
        async with await _connect(gw.port, "CS0001", passwords["CS0001"], tls[1]) as ws:
            latency_s = await asyncio.wait_for(await ws.ping(b"are you there"), 5.0)
            await ws.send(json.dumps([2, "big", "Heartbeat", {"customData": {"x": "y" * 5000}}]))
            try:
                await asyncio.wait_for(ws.recv(), 5.0)
            except Exception:
                pass
            return latency_s, ws.close_code

    try:
        latency_s, close_code = asyncio.run(run())
        assert latency_s >= 0.0
        assert close_code == 1009
        wait_until(lambda: "CS0001" not in gw.sessions, 5.0, "the session ended")
    finally:
        gw.close()


def test_keepalive_fails_a_station_that_does_not_answer_pings(site):
    """A station that never answers the gateway's pings is failed (1011), not before ping_interval + ping_timeout;
    one whose library answers them stays connected while the gateway pings it several more times."""
    paths, fleet, passwords = site
    interval_s, timeout_s = 0.2, 0.5  # a pong has 0.5 s: under load a client thread can miss 0.2 s
    gw = start_gateway(paths, fleet, ping_interval_s=interval_s, ping_timeout_s=timeout_s)
    mute_failed = threading.Event()

    async def answering():
        async with await _connect(gw.port, "CS0002", passwords["CS0002"], ping_interval=None) as ws:
            await asyncio.to_thread(mute_failed.wait, 30.0)
            pings = gw.server.stats["pings_sent"]  # the mute's, and ours so far
            # three more pings to this station alone: each one follows a pong to the one before, in time
            await asyncio.to_thread(wait_until, lambda: gw.server.stats["pings_sent"] >= pings + 3, 30.0,
                                    "three more pings to the answering station")
            await ws.send(json.dumps([2, "h1", "Heartbeat", {}]))
            return json.loads(await asyncio.wait_for(ws.recv(), 10.0))

    try:
        result: dict = {}
        side = threading.Thread(target=lambda: result.update(reply=asyncio.run(answering())))
        side.start()
        wait_until(lambda: "CS0002" in gw.sessions, 10.0, "the answering station's session")
        mute = _raw_upgrade(gw.port, "CS0001", passwords["CS0001"])
        t0 = time.monotonic()
        data = _read_until_closed(mute, 30.0)  # pings, then a Close frame with 1011, then EOF
        elapsed_s = time.monotonic() - t0
        mute_failed.set()
        mute.close()
        frames = _server_frames(data)
        assert frames[0][0] == 0x9 and {op for op, _ in frames[:-1]} == {0x9}, frames  # pings only, then
        assert frames[-1][0] == 0x8 and struct.unpack("!H", frames[-1][1][:2])[0] == 1011, frames  # the close
        assert elapsed_s >= interval_s + timeout_s - 0.05  # a ping, then its whole timeout
        side.join(60.0)
        assert result["reply"][:2] == [3, "h1"]
        assert gw.server.stats["keepalive_timeouts"] == 1
    finally:
        mute_failed.set()
        gw.close()


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole unmasked frame a server sent (a ping's random payload may hold any byte)."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n >= 126:
            size = 2 if n == 126 else 8
            n, i = int.from_bytes(data[i:i + size], "big"), i + size
        frames.append((opcode, data[i:i + n]))
        i += n
    assert i == len(data), f"{len(data) - i} bytes of a partial frame: {data!r}"
    return frames


def test_eof_in_the_middle_of_a_frame_ends_the_session(site):
    """A station whose socket ends halfway through a frame: its session ends (close code 1006, abnormal),
    the gateway marks its EVSEs not controllable and serves the next connection."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet)
    try:
        sock = _raw_upgrade(gw.port, "CS0001", passwords["CS0001"])
        wait_until(lambda: "CS0001" in gw.sessions, 5.0, "the session")
        frame = _masked_text_frame(json.dumps([2, "h1", "Heartbeat", {}]).encode())
        sock.sendall(frame[: len(frame) // 2])
        sock.shutdown(socket.SHUT_WR)
        assert _read_until_closed(sock, 5.0) == b""  # no reply to half a frame
        sock.close()
        wait_until(lambda: "CS0001" not in gw.sessions, 5.0, "the session ended")
        wait_until(lambda: not gw.server.connections, 5.0, "no connection left behind")
        again = _raw_upgrade(gw.port, "CS0001", passwords["CS0001"])
        again.sendall(_masked_text_frame(json.dumps([2, "h2", "Heartbeat", {}]).encode()))
        again.settimeout(5.0)
        head = again.recv(2)
        assert head[0] == 0x81  # a text frame: the Heartbeat's CALLRESULT
        again.close()
    finally:
        gw.close()


def test_a_station_that_connects_twice_replaces_its_first_connection(site, tls):
    """A second connection of the same station closes the first one (1000, replaced) and takes over; the
    first's end does not drop the second's session."""
    paths, fleet, passwords = site
    gw = start_gateway(paths, fleet, tls)

    async def run():
        first = await _connect(gw.port, "CS0001", passwords["CS0001"], tls[1])
        await first.send(json.dumps([2, "a", "Heartbeat", {}]))
        assert json.loads(await asyncio.wait_for(first.recv(), 5.0))[1] == "a"
        second = await _connect(gw.port, "CS0001", passwords["CS0001"], tls[1])
        try:
            await asyncio.wait_for(first.wait_closed(), 5.0)
            await second.send(json.dumps([2, "b", "Heartbeat", {}]))
            reply = json.loads(await asyncio.wait_for(second.recv(), 5.0))
            return first.close_code, first.close_reason, reply
        finally:
            await second.close()

    try:
        code, reason, reply = asyncio.run(run())
        assert code == 1000 and "replaced" in reason
        assert reply[:2] == [3, "b"]
        assert gw.stats["replaced_connections"] == 1 and gw.stats["connections"] == 2
    finally:
        gw.close()


# ------------------------------------------------------------------------------ the server alone
def test_a_slow_reader_holds_the_sender_and_gets_every_byte_in_order(tls):
    """Over TLS, a station that does not read fills the socket: the handler's send() waits (the unsent bytes
    stay bounded by the high-water mark plus one message) and, once the station reads, every message
    arrives whole and in order (partial TLS writes resumed with the same bytes)."""
    n, size = 400, 30_000  # 12 MB: more than loopback's socket buffers hold (the client's is made small too)
    state = {"sent": 0, "max_unsent": 0}

    async def handler(conn):
        for i in range(n):
            await conn.send(json.dumps([i, "x" * size]))
            state["sent"] = i + 1
            state["max_unsent"] = max(state["max_unsent"], conn._out_bytes)
        await asyncio.sleep(10.0)

    async def run():
        server = await StationServer(handler, "127.0.0.1", 0, ssl_context=tls[0], subprotocols=["ocpp2.1"],
                                     write_high_bytes=65_536).start()
        from websockets.asyncio.client import connect

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
        sock.connect(("127.0.0.1", server.port))
        try:
            async with connect(f"wss://127.0.0.1:{server.port}/", subprotocols=["ocpp2.1"], ssl=tls[1],
                               max_queue=1, max_size=None, sock=sock) as ws:
                await asyncio.sleep(1.0)  # not reading: the client library stops reading after one message
                sent_while_stalled = state["sent"]
                got = [json.loads(await asyncio.wait_for(ws.recv(), 10.0)) for _ in range(n)]
            return sent_while_stalled, got
        finally:
            await server.close(timeout_s=1.0)

    sent_while_stalled, got = asyncio.run(run())
    assert sent_while_stalled < n  # held back: about the socket buffers' worth, not all 12 MB
    assert [m[0] for m in got] == list(range(n)) and all(len(m[1]) == size for m in got)
    assert state["max_unsent"] <= 65_536 + size + 1024
