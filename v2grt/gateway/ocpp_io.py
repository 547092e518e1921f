"""The OCPP gateway's WebSocket server: websockets' sans-I/O ServerProtocol driven by a lean asyncio I/O layer.

websockets' own asyncio server (``websockets.asyncio.server.serve``) wraps every frame in layers the
gateway pays for at 4,000 frames a second each way: its Connection's send context and drain, its
receive queue and a task switch per message, and, with TLS, uvloop's SSLProtocol that moves every
record through memory BIOs and a second transport. Here the WebSocket protocol itself (the HTTP
upgrade, framing, masking, size limits, close handshake, ping/pong) is still websockets'
:class:`~websockets.server.ServerProtocol`; only the glue is ours:

- a listening socket and one non-blocking socket per station, read and written from the event loop's
  ``add_reader``/``add_writer`` callbacks; with TLS an :class:`ssl.SSLObject` on memory BIOs: one recv per
  burst of records, decrypted in memory, and one send per frame written (the same syscalls as plaintext);
- each whole message goes to the connection's ``on_message`` callback in the read callback itself (the
  gateway answers its hot frames there, without a task); ``recv()`` serves whatever the callback hands
  back, in order, to the session's task;
- bounded buffers both ways: a station whose replies pile up unread (over ``write_high_bytes``) is not
  read until they drain, and no station is read while ``max_queue`` of its messages wait for the session's
  task (plus what one 64 KiB read held);
- timeouts: the TLS and HTTP handshake together (``open_timeout_s``), keepalive pings
  (``ping_interval_s``/``ping_timeout_s``, close 1011 as websockets does), the closing handshake
  (``close_timeout_s``).

docs/architecture.md says why (the measured cost of each layer) and what of websockets is still used.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

log = logging.getLogger("v2grt.gateway")

_OPEN, _CLOSED, _CONNECTING = State.OPEN, State.CLOSED, State.CONNECTING
_TEXT, _BINARY, _CONT, _PING, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
#: bytes read per read callback (one recv): a burst of a station's frames at once, and the most one station
#: can make the loop work on before the others get their turn
_RECV_BYTES = 65_536
#: decrypted bytes per SSLObject.read: one TLS record at most (RFC 8446 5.1)
_RECORD_BYTES = 16_384


class StationServer:
    """Accepts station connections on ``host:port`` and runs ``handler(connection)`` for each one upgraded.

    ``process_request(connection, request)`` sees the HTTP upgrade first and returns a
    :class:`~websockets.http11.Response` to refuse it (``connection.respond(status, text)`` builds one) or
    None to go on; then websockets' ``ServerProtocol.accept`` chooses the subprotocol and answers 101 (or
    refuses a request that is not a WebSocket upgrade). The connection is closed (1000) when the handler
    returns, as websockets' own server does.
    """

    def __init__(self, handler: Callable[[StationConnection], Awaitable[None]], host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None, subprotocols: list[str],
                 process_request: Callable[[StationConnection, Request], Response | None] | None = None,
                 max_size: int = 65_536, max_queue: int = 8, open_timeout_s: float = 10.0,
                 ping_interval_s: float | None = 20.0, ping_timeout_s: float | None = 20.0,
                 close_timeout_s: float = 10.0, write_high_bytes: int = 65_536, backlog: int = 1024,
                 logger: logging.Logger | None = None):
        self.handler = handler
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.subprotocols = subprotocols
        self.process_request = process_request
        self.max_size = max_size
        self.max_queue = max_queue
        self.open_timeout_s = open_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.close_timeout_s = close_timeout_s
        self.write_high_bytes = write_high_bytes
        self.backlog = backlog
        self.logger = logger or logging.getLogger("websockets.server")
        self.connections: set[StationConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock: socket.socket | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        # every connection reads into this one buffer (one loop thread; the protocol and the BIO copy it)
        self.recv_buffer = bytearray(_RECV_BYTES)
        self.recv_view = memoryview(self.recv_buffer)

    async def start(self) -> StationServer:
        """Bind and listen (OSError if the address is taken)."""
        self.loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=self.backlog)
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.loop.add_reader(sock.fileno(), self._accept)
        return self

    def _accept(self) -> None:
        for _ in range(64):  # then back to the loop: a connect storm must not hold up the stations' frames
            try:
                sock, addr = self.sock.accept()
            except _WOULD_BLOCK:
                return
            except OSError as exc:  # EMFILE and the like: counted, and no accept for a second (as asyncio's
                self.stats["accept_errors"] += 1  # server does: the socket stays readable, the loop would spin)
                if self.stats["accept_errors"] <= 20:
                    log.warning("OCPP_ACCEPT_ERROR port=%s error=%r", self.port, exc)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(1.0, self._resume_accept)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = StationConnection(self, sock, addr)
            if not conn.closed.done():
                self.connections.add(conn)

    def _resume_accept(self) -> None:
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def close(self, code: int = 1001, reason: str = "server stopping", timeout_s: float = 5.0) -> None:
        """Stop accepting; close every connection still open (``code``), abort the rest after ``timeout_s``."""
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        conns = list(self.connections)
        for conn in conns:
            conn.start_close(code, reason)
        waits = [c.closed for c in conns if not c.closed.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)
        for conn in list(self.connections):
            conn.abort()


class StationConnection:
    """One station's socket and its websockets ``ServerProtocol``: what the gateway's session talks to.

    The session gets whole messages from ``on_message`` (set by the handler; called in the read
    callback, in order; it returns False to leave the message to ``recv()`` instead) and sends with
    ``write_text`` (now, buffered if the socket is full) or ``send`` (the same, then waits while the
    buffer is over the high-water mark). Attributes like websockets' Connection's: ``remote_address``,
    ``request``, ``subprotocol``, ``close_code``, ``close_reason``.
    """

    def __init__(self, server: StationServer, sock: socket.socket, addr):
        self.server = server
        self.loop = loop = server.loop
        self.remote_address = addr
        self.request: Request | None = None
        self.station_id: str | None = None  # set by process_request
        self.protocol = ServerProtocol(subprotocols=server.subprotocols, max_size=server.max_size,
                                       logger=server.logger)
        self._sock = sock
        self._fd = sock.fileno()
        self._tls = server.ssl_context is not None
        self._handshaking = False
        self._out: collections.deque[bytes] = collections.deque()  # bytes for the socket (encrypted if TLS)
        self._out_bytes = 0
        self._writer_on = False
        self._reading = False
        self._read_paused = False
        self._cut = False  # cut(): never read again
        self._eof_pending = False  # the protocol asked for EOF: half-close (TLS: close) once the buffer is out
        self._fragments: list[bytes] | None = None
        self._fragment_text = False
        self.on_message: Callable[[str | bytes], bool] | None = None
        # called for each ping and unsolicited pong the station sends (websockets has answered the ping already):
        # control frames are no messages, and without this a ping flood bypassed the station's rate limit
        self.on_control: Callable[[], None] | None = None
        self._queue: collections.deque[str | bytes] = collections.deque()
        self._recv_waiter: asyncio.Future | None = None
        self._drain_waiters: list[asyncio.Future] = []
        self.closed: asyncio.Future = loop.create_future()  # result None when the socket is closed
        self.connection_exc: BaseException | None = None
        self._handler_task: asyncio.Task | None = None
        self._ping_payload: bytes | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._open_timer = loop.call_later(server.open_timeout_s, self._open_timed_out)
        if self._tls:
            # TLS in memory: one recv and one send syscall per burst, encryption and decryption in C calls
            # on the bytes (an SSLSocket read each record with two or three recv calls, one failing)
            self._in_bio, self._out_bio = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._sslobj = server.ssl_context.wrap_bio(self._in_bio, self._out_bio, server_side=True)
            self._handshaking = True
        self._start_reading()

    # ------------------------------------------------------------------------------ the websockets side
    @property
    def subprotocol(self) -> str | None:
        return self.protocol.subprotocol

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self.protocol.close_reason

    @property
    def state(self) -> State:
        return self.protocol.state

    def respond(self, status, text: str) -> Response:
        """A plain HTTP response that refuses the upgrade (for ``process_request``)."""
        return self.protocol.reject(status, text)

    def write_text(self, data: bytes | str) -> bool:
        """Send one text frame now (buffered if the socket is full); False if the connection is not open."""
        protocol = self.protocol
        if protocol.state is not _OPEN or self._eof_pending:
            return False
        protocol.send_text(data.encode() if isinstance(data, str) else data)
        self._flush()
        return True

    async def send(self, message: str | bytes, text: bool | None = None) -> None:
        """Send one message (str: text frame, bytes: binary unless ``text``); ConnectionClosed if not open,
        and wait while the unsent bytes are over the high-water mark (the station does not read)."""
        protocol = self.protocol
        if protocol.state is not _OPEN:
            raise self.close_exc
        if isinstance(message, str):
            protocol.send_text(message.encode())
        elif text:
            protocol.send_text(message)
        else:
            protocol.send_binary(message)
        self._flush()
        await self.drain()

    async def drain(self) -> None:
        """Wait until the unsent bytes are under the high-water mark (ConnectionClosed if the socket closes)."""
        while self._out_bytes > self.server.write_high_bytes:
            if self.closed.done():
                raise self.close_exc
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    async def recv(self) -> str | bytes:
        """The next message ``on_message`` left; ConnectionClosed once the connection is closed and none is left."""
        while not self._queue:
            if self.closed.done() or self.protocol.state is _CLOSED:
                raise self.close_exc
            waiter = self._recv_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
        message = self._queue.popleft()
        if self._read_paused and len(self._queue) < self.server.max_queue:
            self._resume_reading()
        return message

    @property
    def queued(self) -> int:
        """Messages waiting for ``recv()``."""
        return len(self._queue)

    @property
    def close_exc(self) -> ConnectionClosed:
        exc = self.protocol.close_exc
        if self.connection_exc is not None:
            exc.__cause__ = self.connection_exc
        return exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake: send Close, wait for the station's and the TCP close (``close_timeout_s``)."""
        self.start_close(code, reason)
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), self.server.close_timeout_s + 1.0)
        except asyncio.TimeoutError:
            self.abort()

    def start_close(self, code: int = 1000, reason: str = "") -> None:
        """Begin the closing handshake without waiting (a connection not yet open is dropped)."""
        protocol = self.protocol
        if protocol.state is _OPEN:
            protocol.send_close(code, reason)
            self._flush()
            self._arm_close_timer()
        elif protocol.state is _CONNECTING:
            self.abort()

    def abort(self) -> None:
        """Close the socket now."""
        self._lost(None)

    def cut(self, grace_s: float = 1.0) -> None:
        """Read nothing more from the station, and close the socket ``grace_s`` later: for a flooder being closed,
        whose close handshake may never come (what was written, the Close frame included, still gets out; closing
        at once would make the kernel answer its unread bytes with a reset that can destroy those)."""
        self._cut = True
        self._stop_reading()
        self.loop.call_later(grace_s, self.abort)

    # ------------------------------------------------------------------------------ reading
    def _start_reading(self) -> None:
        if not self._reading and not self.closed.done() and not self._cut:
            self.loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def _pause_reading(self) -> None:
        self._read_paused = True
        self._stop_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not (self._out_bytes > self.server.write_high_bytes
                                      or len(self._queue) >= self.server.max_queue):
            self._read_paused = False
            self._start_reading()  # level-triggered: bytes left in the socket call _on_readable again

    def _on_readable(self) -> None:
        """One recv; with TLS, every whole record in it decrypted; the bytes to the protocol."""
        if self.closed.done() or not self._reading:
            return
        try:
            n = self._sock.recv_into(self.server.recv_buffer)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not n:
            self._eof()
            return
        raw = self.server.recv_view[:n]
        if not self._tls:
            self.protocol.receive_data(raw)
            self._process()
            return
        self._in_bio.write(raw)
        sslobj = self._sslobj
        if self._handshaking:
            try:
                sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._write_tls_out()
                return
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a bad client hello
                self.server.stats["tls_handshake_failures"] += 1
                self._lost(exc)
                return
            self._handshaking = False
            self._write_tls_out()
        protocol = self.protocol
        in_bio = self._in_bio
        while in_bio.pending or sslobj.pending():  # not one read more: its SSLWantReadError costs as much as a read
            try:
                data = sslobj.read(_RECORD_BYTES)
            except ssl.SSLWantReadError:  # part of a record: the rest comes with the next recv
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                self._eof()
                return
            except (OSError, ValueError) as exc:
                self._lost(exc)
                return
            if not data:
                self._eof()
                return
            protocol.receive_data(data)
            self._process()
            if self.closed.done():
                return
        if self._out_bio.pending:
            self._write_tls_out()

    def _write_tls_out(self) -> None:
        data = self._out_bio.read()
        if data:
            self._write_raw(data)

    def _eof(self) -> None:
        self.protocol.receive_eof()
        self._process()
        if not self.closed.done():
            self._stop_reading()
            if not self._out:
                self._lost(None)

    def _process(self) -> None:
        """What the protocol made of the bytes: the upgrade, whole messages, pongs; then write its replies."""
        protocol = self.protocol
        for event in protocol.events_received():
            if type(event) is Frame:
                opcode = event.opcode
                if opcode is _TEXT or opcode is _BINARY:
                    if event.fin:
                        self._deliver(event.data, opcode is _TEXT)
                    else:
                        self._fragments, self._fragment_text = [event.data], opcode is _TEXT
                elif opcode is _CONT:
                    if self._fragments is not None:  # ServerProtocol refuses a stray continuation
                        self._fragments.append(event.data)
                        if event.fin:
                            data, self._fragments = b"".join(self._fragments), None
                            self._deliver(data, self._fragment_text)
                elif opcode is _PONG and self._ping_payload is not None and event.data == self._ping_payload:
                    self._ping_payload = None
                elif (opcode is _PING or opcode is _PONG) and self.on_control is not None:
                    self.on_control()  # the station's own ping or an unsolicited pong: its rate limit's business
            elif type(event) is Request:
                self._upgrade(event)
        self._flush()
        if protocol.close_expected():
            self._arm_close_timer()
        if protocol.state is _CLOSED and not self.closed.done() and not self._out:
            self._lost(None)

    def _deliver(self, data: bytes, text: bool) -> None:
        if self.protocol.state is not _OPEN:
            return  # after a Close: websockets drops data frames too
        if text:
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError as exc:
                self.protocol.fail(1007, f"{exc.reason} at position {exc.start}")
                return
        else:
            message = data
        on_message = self.on_message
        if on_message is not None and not self._queue and on_message(message):
            return
        self._queue.append(message)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(self._queue) >= self.server.max_queue:
            self._pause_reading()

    def _upgrade(self, request: Request) -> None:
        self.request = request
        protocol = self.protocol
        response = None
        if self.server.process_request is not None:
            try:
                response = self.server.process_request(self, request)
            except Exception as exc:  # our bug: the station gets a 500, the server goes on
                log.error("OCPP_UPGRADE_ERROR port=%s error=%r", self.server.port, exc)
                response = protocol.reject(500, "internal error\n")
        if response is None:
            response = protocol.accept(request)
        protocol.send_response(response)
        if protocol.state is _OPEN:
            self._open_timer.cancel()
            self._schedule_ping()
            self._handler_task = self.loop.create_task(self._run_handler())
        else:
            self.server.stats["upgrades_refused"] += 1

    async def _run_handler(self) -> None:
        try:
            await self.server.handler(self)
        except Exception as exc:
            log.error("OCPP_HANDLER_FAILED port=%s error=%r", self.server.port, exc)
            self.start_close(1011, "internal error")
        else:
            self.start_close(1000, "")

    # ------------------------------------------------------------------------------ writing
    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self._write(data)
            else:
                self._eof_pending = True
        if self._eof_pending and not self._out:
            self._send_eof()

    def _write(self, data: bytes) -> None:
        if self._tls:
            if self.closed.done():
                return
            try:
                self._sslobj.write(data)
            except (OSError, ValueError) as exc:
                self._lost(exc)
                return
            data = self._out_bio.read()
        self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        """Send now what the socket takes; the rest waits in ``_out`` for the writer callback."""
        if self.closed.done():
            return
        if not self._out:
            n = self._send_some(data)
            if n is None:
                return
            if n == len(data):
                return
            data = data[n:]
        self._out.append(data)
        self._out_bytes += len(data)
        self._want_writer(True)
        self._check_high()

    def _send_some(self, data: bytes) -> int | None:
        """One non-blocking send: the bytes the socket took (0 when its buffer is full), None when the connection
        is lost (then already handled)."""
        try:
            return self._sock.send(data)
        except _WOULD_BLOCK:
            return 0
        except OSError as exc:
            self._lost(exc)
            return None

    def _check_high(self) -> None:
        if self._out_bytes > self.server.write_high_bytes and not self._read_paused:
            self.server.stats["write_paused"] += 1
            self._pause_reading()  # the station does not read our replies: stop reading its requests

    def _want_writer(self, on: bool) -> None:
        if on and not self._writer_on and not self.closed.done():
            self.loop.add_writer(self._fd, self._on_writable)
            self._writer_on = True
        elif not on and self._writer_on:
            self.loop.remove_writer(self._fd)
            self._writer_on = False

    def _on_writable(self) -> None:
        if self.closed.done():
            return
        while self._out:
            data = self._out.popleft() if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            n = self._send_some(data)
            if n is None:
                return
            self._out_bytes -= n
            if n < len(data):
                self._out.appendleft(data[n:])
                return
        self._out_bytes = 0
        self._want_writer(False)
        self._drained()

    def _drained(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self._eof_pending:
            self._send_eof()
            return
        if self.protocol.state is _CLOSED and not self.closed.done():
            self._lost(None)
            return
        if self._read_paused:
            self._resume_reading()

    def _send_eof(self) -> None:
        """The protocol's end of stream: a half-close (plaintext) or, with TLS (no half-close), the close."""
        if self._tls or self.protocol.state is _CLOSED:
            self._lost(None)
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._lost(None)
            return
        self._eof_pending = False
        self._arm_close_timer()

    # ------------------------------------------------------------------------------ timers and the end
    def _open_timed_out(self) -> None:
        if self.protocol.state is _CONNECTING and not self.closed.done():
            self.server.stats["open_timeouts"] += 1
            self._lost(TimeoutError("timed out during the opening handshake"))

    def _schedule_ping(self) -> None:
        if self.server.ping_interval_s is not None:
            self._ping_timer = self.loop.call_later(self.server.ping_interval_s, self._ping)

    def _ping(self) -> None:
        if self.protocol.state is not _OPEN or self.closed.done():
            return
        if self._ping_payload is not None:  # the last ping was not answered in ping_timeout_s
            self.server.stats["keepalive_timeouts"] += 1
            self.protocol.fail(1011, "keepalive ping timeout")
            self._flush()
            self._arm_close_timer()
            return
        self._ping_payload = os.urandom(4)
        self.server.stats["pings_sent"] += 1
        self.protocol.send_ping(self._ping_payload)
        self._flush()
        timeout_s = self.server.ping_timeout_s
        if timeout_s is None:
            self._ping_payload = None
            self._schedule_ping()
        else:
            self._ping_timer = self.loop.call_later(timeout_s, self._ping_check)

    def _ping_check(self) -> None:
        """ping_timeout_s after a ping: answered, the next one ping_interval_s after it (websockets' rhythm)."""
        if self._ping_payload is not None:
            self._ping()  # not answered: fails the connection (1011)
            return
        wait_s = self.server.ping_interval_s - self.server.ping_timeout_s
        self._ping_timer = self.loop.call_later(max(wait_s, 0.0), self._ping)

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self.closed.done():
            self._close_timer = self.loop.call_later(self.server.close_timeout_s, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self.closed.done():
            self.server.stats["close_timeouts"] += 1
            self._lost(TimeoutError("timed out while closing connection"))

    def _lost(self, exc: BaseException | None) -> None:
        """The socket is done: close it, end the protocol, wake everyone waiting."""
        if self.closed.done():
            return
        if exc is not None and self.connection_exc is None:
            self.connection_exc = exc
        self._stop_reading()
        self._want_writer(False)
        for timer in (self._open_timer, self._ping_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        try:
            self._sock.close()
        except OSError:
            pass
        self._out.clear()
        self._out_bytes = 0
        self.protocol.receive_eof()  # idempotent: the state becomes CLOSED
        self.protocol.events_received()
        self.protocol.data_to_send()
        self.closed.set_result(None)
        self.server.connections.discard(self)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()


def is_closed_error(exc: BaseException) -> bool:
    """True for the exception a send or recv raises on a closed connection (websockets' ConnectionClosed)."""
    return isinstance(exc, ConnectionClosed)


__all__ = ["ConnectionClosed", "ConnectionClosedOK", "StationConnection", "StationServer", "is_closed_error"]
