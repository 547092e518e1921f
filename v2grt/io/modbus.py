"""SunSpec over Modbus TCP: model discovery, meter and inverter pollers, latest-value cells for the loop."""

# Threading model:
# All Modbus traffic runs on one asyncio event loop (uvloop when installed) inside `InputThread`, a daemon
# thread. Each device has one `SunSpecPoller` (``MeterReader`` or ``InverterReader``) owning one pymodbus
# ``AsyncModbusTcpClient``; the pollers run concurrently as tasks on that loop. A poller publishes each
# decoded sample into a `Latest` cell; the control thread only ever calls ``Latest.read()`` /
# ``Latest.age_s()``, which never block and never touch the network. Staleness is the caller's decision.
#
# Signs and units follow DESIGN.md section 4: kW and Hz; positive power is discharge into the grid
# (SunSpec ``W`` as an inverter reports it, and ``WSet`` as 704 defines it). A meter's ``W`` keeps the
# meter's own sign convention: model_20x.json does not define one, so check the meter's manual (the
# simulator in v2grt.sim.sunspec uses positive = imported from the grid at the meter).

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CONN_CONNECTED",
    "CONN_DISCONNECTED",
    "END_MODEL_ID",
    "INVST_FAULT",
    "INVST_RUNNING",
    "METER_FLOAT_MODELS",
    "METER_INT_MODELS",
    "SUNSPEC_BASE",
    "SUNS_MARKER",
    "Counters",
    "InputThread",
    "InverterReader",
    "InverterSample",
    "Latest",
    "MeterReader",
    "MeterSample",
    "Point",
    "SunSpecError",
    "SunSpecPoller",
    "aligned_poll_ns",
    "block_decoder",
    "decode_point",
    "discover",
    "encode_point",
    "model_length",
    "model_points",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: 'SunS' as two big-endian registers, at the base address (SunSpec Information Model, section 4).
SUNS_MARKER = (0x5375, 0x6E53)
SUNSPEC_BASE = 40000
END_MODEL_ID = 0xFFFF
#: Meter models with integer points and scale factors, and their float32 twins.
METER_INT_MODELS = (201, 202, 203, 204)
METER_FLOAT_MODELS = (211, 212, 213, 214)

# Model 701 enumerations (model_701.json): InvSt, ConnSt, Alrm bits.
INVST_RUNNING = 3
INVST_FAULT = 6
CONN_DISCONNECTED = 0
CONN_CONNECTED = 1


class SunSpecError(Exception):
    """A device's register map is not the SunSpec map expected (names the device, address, what was found)."""


# --------------------------------------------------------------------------------------------------
# Point layout and codec, from pysunspec2's bundled model definitions (one source of truth: the
# SunSpec JSON models), so offsets and types are never typed in by hand.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One point of a SunSpec model; ``offset`` counts registers from the first point after ID and L."""

    name: str
    offset: int
    size: int
    type: str
    sf: str | int | None
    access: str


def _load_model_json(model_id: int) -> dict:
    # Read the file from the installed package rather than sunspec2.device.get_model_def(), which
    # searches the current directory first and so can be shadowed by a stray ./json/model_N.json.
    ref = resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    try:
        return json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SunSpecError(
            f"no SunSpec model definition for model {model_id} in pysunspec2 ({ref})"
        ) from None


def _flatten(group: dict, prefix: str, offset: int, out: dict[str, Point]) -> tuple[int, bool]:
    """Append the points of a fixed group; stop (return complete=False) at a repeating group."""
    for p in group.get("points", []):
        name = prefix + p["name"]
        out[name] = Point(name, offset, int(p["size"]), p["type"], p.get("sf"), p.get("access", "R"))
        offset += int(p["size"])
    for g in group.get("groups", []):
        count = g.get("count", 1)
        if count != 1 and count is not None:
            return offset, False  # repeating group: its length depends on a count point at run time
        offset, complete = _flatten(g, f"{prefix}{g['name']}.", offset, out)
        if not complete:
            return offset, False
    return offset, True


@functools.cache
def _layout(model_id: int) -> tuple[dict[str, Point], int | None]:
    raw: dict[str, Point] = {}
    end, complete = _flatten(_load_model_json(model_id)["group"], "", 0, raw)
    # The JSON lists ID and L as the first two points; the model length L excludes them.
    if list(raw)[:2] != ["ID", "L"]:
        raise SunSpecError(f"model {model_id} definition does not start with ID, L")
    points = {n: Point(n, p.offset - 2, p.size, p.type, p.sf, p.access) for n, p in raw.items()}
    del points["ID"], points["L"]
    return points, (end - 2 if complete else None)


def model_points(model_id: int) -> dict[str, Point]:
    """Points of a SunSpec model up to its first repeating group, by name (nested fixed groups as 'G.P')."""
    return _layout(model_id)[0]


def model_length(model_id: int) -> int:
    """The model's length L in registers (excluding ID and L); raises for models with repeating groups."""
    length = _layout(model_id)[1]
    if length is None:
        raise SunSpecError(f"model {model_id} has repeating groups: its length is not fixed")
    return length


_FORMAT = {
    "int16": "h",
    "sunssf": "h",
    "uint16": "H",
    "count": "H",
    "acc16": "H",
    "enum16": "H",
    "bitfield16": "H",
    "pad": "H",
    "int32": "i",
    "uint32": "I",
    "acc32": "I",
    "enum32": "I",
    "bitfield32": "I",
    "ipaddr": "I",
    "int64": "q",
    "uint64": "Q",
    "acc64": "Q",
    "float32": "f",
    "float64": "d",
}
# SunSpec "not implemented" values (SunSpec Information Model Specification, table of types; the same
# constants as pysunspec2's mb.SUNS_UNIMPL_*). Accumulators use 0; floats use NaN.
_UNIMPL = {
    "int16": -0x8000,
    "sunssf": -0x8000,
    "uint16": 0xFFFF,
    "count": 0xFFFF,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "acc16": 0,
    "pad": 0x8000,
    "int32": -0x80000000,
    "uint32": 0xFFFFFFFF,
    "enum32": 0xFFFFFFFF,
    "bitfield32": 0xFFFFFFFF,
    "acc32": 0,
    "ipaddr": 0,
    "int64": -(2**63),
    "uint64": 2**64 - 1,
    "acc64": 0,
}


def decode_point(regs: Sequence[int], point: Point, first: int = 0) -> int | float | str | None:
    """Decode ``point`` from ``regs`` (``regs[first]`` = the model's first point); None = not implemented."""
    i = first + point.offset
    chunk = regs[i : i + point.size]
    if len(chunk) != point.size:
        raise SunSpecError(f"point {point.name} needs registers {i}..{i + point.size - 1}, got {len(regs)}")
    data = struct.pack(f">{point.size}H", *chunk)
    if point.type == "string":
        text = data.rstrip(b"\0")
        return text.decode("utf-8", "replace") if text else None
    fmt = _FORMAT.get(point.type)
    if fmt is None:
        raise SunSpecError(f"point {point.name}: SunSpec type {point.type!r} is not decoded here")
    (value,) = struct.unpack(">" + fmt, data)
    if fmt in "fd":
        return None if math.isnan(value) else value
    return None if value == _UNIMPL[point.type] else value


def block_decoder(points: Sequence[Point], first: int = 0) -> Callable[[Sequence[int]], tuple]:
    """A decoder of several numeric points of one model from one register block, in one struct call.

    ``decoder(regs)`` equals ``tuple(decode_point(regs, p, first) for p in points)`` (None = not implemented);
    built once per layout. A simulated charger decodes its 704 block on every write: eight decode_point calls
    were a third of its own CPU per write (cProfile).
    """
    order = sorted(range(len(points)), key=lambda k: points[k].offset)
    lo = points[order[0]].offset
    fmt, pos, unimpl = ">", lo, []
    for k in order:
        p = points[k]
        if p.type not in _FORMAT or p.offset < pos:
            raise SunSpecError(f"point {p.name} ({p.type} at offset {p.offset}): not a numeric point apart from "
                               f"the others ({[q.name for q in points]})")
        fmt += "x" * (2 * (p.offset - pos)) + _FORMAT[p.type]
        pos = p.offset + p.size
        unimpl.append(math.nan if _FORMAT[p.type] in "fd" else _UNIMPL[p.type])
    codec, regs_fmt, count = struct.Struct(fmt), struct.Struct(f">{pos - lo}H"), pos - lo
    slot = [order.index(k) for k in range(len(points))]  # where each requested point sits in offset order

    def decode(regs: Sequence[int]) -> tuple:
        i = first + lo
        chunk = regs[i : i + count]
        if len(chunk) != count:
            raise SunSpecError(f"points {[p.name for p in points]} need registers {i}..{i + count - 1}, got "
                               f"{len(regs)}")
        raw = codec.unpack(regs_fmt.pack(*chunk))
        # NaN != NaN: a float not implemented compares unequal to its marker, so check floats with isnan
        vals = [None if (v != v if isinstance(v, float) else v == u) else v for v, u in zip(raw, unimpl)]
        return tuple(vals[j] for j in slot)

    return decode


def encode_point(point: Point, value: float | str | None) -> list[int]:
    """Registers for ``value`` of ``point`` (None encodes SunSpec's "not implemented" for the type)."""
    if point.type == "string":
        data = (value or "").encode("utf-8")
        if len(data) > 2 * point.size:
            raise ValueError(f"point {point.name}: {value!r} is longer than {2 * point.size} bytes")
        data = data.ljust(2 * point.size, b"\0")
    else:
        fmt = _FORMAT.get(point.type)
        if fmt is None:
            raise ValueError(f"point {point.name}: SunSpec type {point.type!r} is not encoded here")
        if value is None:
            value = math.nan if fmt in "fd" else _UNIMPL[point.type]
        try:
            data = struct.pack(">" + fmt, value)
        except struct.error as exc:
            raise ValueError(f"point {point.name} ({point.type}): {value!r} does not fit: {exc}") from None
    return list(struct.unpack(f">{point.size}H", data))


def _scaled(raw: float | None, sf: int | None) -> float:
    """raw * 10**sf, or NaN when either is not implemented or the SF is outside SunSpec's -10..10."""
    if raw is None or sf is None or not -10 <= sf <= 10:
        return math.nan
    # Dividing by 10**-sf gives the nearest double to the decimal (4987 / 100 == 49.87, while
    # 4987 * 0.01 == 49.870000000000005).
    return raw * 10.0**sf if sf >= 0 else raw / 10.0**-sf


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``await awaitable``, or TimeoutError (asyncio.TimeoutError) after ``timeout_s``, cancelling it where it stands.

    asyncio.timeout's own mechanism (a timer that cancels this task, then ``uncancel`` to tell the timeout from
    a cancellation from outside) without its context-manager object: asyncio.timeout per request was a fifth
    of a SunSpec gateway's time to send a setpoint message's 100 writes (6.2 -> 4.9 ms at 100 chargers), and
    asyncio.wait_for, which wraps each request in a task of its own on 3.10, a sixth of its Modbus thread
    (py-spy). On 3.10 (no ``Task.uncancel``) it is asyncio.wait_for.
    """
    task = asyncio.current_task()
    if not hasattr(task, "uncancel"):
        return await asyncio.wait_for(awaitable, timeout_s)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = task.get_loop().call_later(timeout_s, expire)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        # ours alone: a timeout; a cancellation from outside as well (cancelling() still counts it): propagate it
        if expired and task.uncancel() == 0:
            raise asyncio.TimeoutError from None
        raise
    finally:
        handle.cancel()
    if expired:
        # The timer fired, yet a result came back: asyncio.wait_for (inside every pymodbus request) returns a
        # response that raced the cancellation and swallows it (CPython gh-86296 on 3.11). Take our cancel back,
        # as asyncio.timeout does, or the task counts it forever and the next timeout here would propagate as a
        # cancellation that ends the poller (a bench smoke run's meter went stale for good that way).
        task.uncancel()
    return result


async def _read(
    client: AsyncModbusTcpClient,
    address: int,
    count: int,
    device_id: int,
    who: str,
    timeout_s: float | None = None,
) -> list[int]:
    request = client.read_holding_registers(address, count=count, device_id=device_id)
    rr = await (request if timeout_s is None else within(request, timeout_s))
    if rr.isError():
        raise SunSpecError(
            f"{who}: reading {count} register(s) at {address} failed with Modbus exception "
            f"{getattr(rr, 'exception_code', '?')} ({rr})"
        )
    if len(rr.registers) != count:
        raise SunSpecError(f"{who}: asked for {count} register(s) at {address}, got {len(rr.registers)}")
    return rr.registers


def _who(client: Any, device_id: int) -> str:
    params = client.comm_params
    return f"device {params.host}:{params.port} unit {device_id}"


async def discover(
    client: AsyncModbusTcpClient,
    device_id: int = 1,
    base: int = SUNSPEC_BASE,
    *,
    timeout_s: float | None = None,
    name: str | None = None,
    max_models: int = 64,
) -> dict[int, int]:
    """Walk the SunSpec model chain at ``base`` and return {model_id: address of its first point}.

    Expects 'SunS' at ``base``, then (ID, L) headers, each model L registers long, until the end model
    0xFFFF. A model id that appears twice keeps its first address (v2grt reads one meter or inverter
    per device). Raises `SunSpecError` naming the device, the address and what was found there;
    ``timeout_s`` bounds each request (``TimeoutError``), else the client's own timeout applies;
    ``name`` labels the device in errors (default "device host:port unit N").
    """
    who = name or _who(client, device_id)
    marker = await _read(client, base, 2, device_id, who, timeout_s)
    if tuple(marker) != SUNS_MARKER:
        raw = struct.pack(">2H", *marker)
        raise SunSpecError(
            f"{who}: no 'SunS' marker at register {base}: found 0x{marker[0]:04X} 0x{marker[1]:04X} "
            f"({raw!r}); is this a SunSpec device, and is its map at {base}?"
        )
    models: dict[int, int] = {}
    address = base + 2
    for _ in range(max_models + 1):
        try:
            model_id, length = await _read(client, address, 2, device_id, who, timeout_s)
        except SunSpecError:
            # Some devices end the map right after the end model's ID (no L register): read it alone.
            (model_id,) = await _read(client, address, 1, device_id, who, timeout_s)
            if model_id != END_MODEL_ID:
                raise
            length = 0
        if model_id == END_MODEL_ID:
            return models
        if model_id == 0 or address + 2 + length > 0xFFFF:
            raise SunSpecError(
                f"{who}: bad model header at register {address}: id {model_id}, length {length} "
                f"(chain started at {base}; models so far {sorted(models)})"
            )
        models.setdefault(model_id, address + 2)
        address += 2 + length
    raise SunSpecError(f"{who}: no end model (0xFFFF) after {max_models} models from register {base}")


# --------------------------------------------------------------------------------------------------
# Latest-value cell and counters
# --------------------------------------------------------------------------------------------------


class Latest(Generic[T]):
    """The newest sample and its ``CLOCK_MONOTONIC`` time, written by one thread and read by any.

    ``publish`` replaces one attribute with one new tuple; under CPython that store is a single
    atomic reference swap (the GIL; per-object locking on free-threaded builds), so ``read`` always
    returns a matching (value, time) pair and neither side ever waits. Values must be immutable.
    """

    __slots__ = ("_cell",)

    def __init__(self) -> None:
        self._cell: tuple[T | None, int | None] = (None, None)

    def publish(self, value: T, t_mono_ns: int) -> None:
        """Make ``value`` (observed at ``t_mono_ns``, from ``time.monotonic_ns()``) the latest."""
        self._cell = (value, t_mono_ns)

    def read(self) -> tuple[T | None, int | None]:
        """(value, t_mono_ns) of the latest sample, or (None, None) before the first."""
        return self._cell

    def age_s(self, now_ns: int | None = None) -> float:
        """Seconds since the latest sample at ``now_ns`` (default: now); infinity before the first."""
        t_ns = self._cell[1]
        if t_ns is None:
            return math.inf
        if now_ns is None:
            now_ns = time.monotonic_ns()
        return (now_ns - t_ns) * 1e-9


@dataclass(slots=True)
class Counters:
    """Per-device I/O counters; written only by the input thread, each field readable from any thread."""

    reads_ok: int = 0
    timeouts: int = 0  # a request or connect that got no answer within timeout_s
    errors: int = 0  # Modbus exception responses, lost connections, unexpected maps
    invalid: int = 0  # answered, but the value was "not implemented" or out of range: not published
    connects: int = 0  # successful connect + discovery
    connect_failures: int = 0  # connect refused, timed out, or discovery failed
    reconnects: int = 0  # connection attempts after the first (each one follows a loss or a failure)
    writes_ok: int = 0
    write_failures: int = 0
    last_error: str = ""
    last_error_t_ns: int = 0  # UTC wall clock (time.time_ns), for logs and status; 0 = never

    def snapshot(self) -> dict[str, int | str]:
        """A copy as a dict (fields are read one by one: not a consistent cut across fields)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Pollers
# --------------------------------------------------------------------------------------------------


class MeterSample(NamedTuple):
    """One meter reading: frequency, total power (meter's sign convention, kW; NaN if not given)."""

    f_hz: float
    p_kw: float
    model_id: int


class InverterSample(NamedTuple):
    """One 701 reading. ``p_kw`` positive = injection (discharge); NaN where the device leaves it out."""

    p_kw: float
    f_hz: float
    st: int | None  # 701 St: 0 OFF, 1 ON
    inv_st: int | None  # 701 InvSt: 0 OFF .. 3 RUNNING, 4 THROTTLED, 6 FAULT, 7 STANDBY
    conn_st: int | None  # 701 ConnSt: 0 DISCONNECTED, 1 CONNECTED
    alarms: int  # 701 Alrm bitfield (0 when not implemented)
    cannot_sync: bool  # InvSt FAULT while ConnSt DISCONNECTED: E_INVERTER_PHASE_MISMATCH


class _Failed(Exception):
    """Internal: this connection should be dropped and re-established."""


def aligned_poll_ns(after_ns: int, interval_ns: int, period_ns: int, lead_ns: int) -> int:
    """The first poll start after ``after_ns`` on a grid phase-locked to a control loop's deadlines.

    The deadlines are ``k * period_ns`` on CLOCK_MONOTONIC (v2grt.loop.ControlLoop's grid). Each period's
    polls are laid back from its deadline: ``D - lead_ns``, ``D - lead_ns - interval_ns``, ... while later
    than the previous deadline's last poll, so the last poll of every period starts ``lead_ns`` before the
    deadline (a regular grid when the period is a multiple of the interval; otherwise the period's first gap
    is the shorter one). All in ns; needs ``0 <= lead_ns < period_ns`` and ``interval_ns > 0``.
    """
    # the first deadline whose last poll is still ahead, then the earliest of its polls after after_ns
    deadline = ((after_ns + lead_ns) // period_ns + 1) * period_ns
    return deadline - lead_ns - (deadline - lead_ns - after_ns - 1) // interval_ns * interval_ns


class SunSpecPoller:
    """Poll one SunSpec device over Modbus TCP and publish decoded samples into ``self.latest``.

    One ``AsyncModbusTcpClient`` per device. Every (re)connection rediscovers the model chain (no
    fixed offsets). Each request has its own ``timeout_s``; after ``max_failures`` consecutive failed
    polls, or at once when the connection drops, the client is closed and a new one connects after
    an exponential backoff from ``backoff_min_s`` doubling up to ``backoff_max_s``. Polls follow an
    absolute schedule every ``interval_s`` (missed slots are skipped, never bunched). With
    ``cycle_period_s`` the schedule is phase-locked to a control loop's deadlines (``k * cycle_period_s``
    on CLOCK_MONOTONIC, as v2grt.loop keeps them): the last poll of each period starts ``lead_s`` before
    the deadline (`aligned_poll_ns`), so the cycle takes a sample about ``lead_s`` old instead of anywhere
    from 0 to ``interval_s`` plus a round trip. A poll that ends after the deadline leaves the previous
    sample, as any late poll does. Subclasses implement ``_setup`` (after discovery) and ``_poll``.
    """

    kind = "device"

    def __init__(
        self,
        host: str,
        port: int = 502,
        *,
        device_id: int = 1,
        base: int = SUNSPEC_BASE,
        name: str | None = None,
        interval_s: float = 0.02,
        timeout_s: float = 0.1,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        max_failures: int = 3,
        cycle_period_s: float | None = None,
        lead_s: float = 0.0,
    ) -> None:
        if not interval_s > 0 or not timeout_s > 0:
            raise ValueError(f"{self.kind} {host}:{port}: interval_s and timeout_s must be > 0")
        if cycle_period_s is not None and not 0 <= lead_s < cycle_period_s:
            raise ValueError(f"{self.kind} {host}:{port}: lead_s={lead_s!r} with cycle_period_s={cycle_period_s!r}: "
                             "expected 0 <= lead_s < cycle_period_s")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError(f"{self.kind} {host}:{port}: need 0 < backoff_min_s <= backoff_max_s")
        self.host, self.port, self.device_id, self.base = host, port, device_id, base
        self.name = name or f"{self.kind} {host}:{port} unit {device_id}"
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.max_failures = max_failures
        # the phase-locked grid in ns (None: free-running from the connection's first poll)
        self._grid_ns = None if cycle_period_s is None else (
            round(interval_s * 1e9), round(cycle_period_s * 1e9), round(lead_s * 1e9))
        self.latest: Latest[Any] = Latest()
        self.counters = Counters()
        self.models: dict[int, int] = {}  # from the latest discovery
        self.connected = False
        self._client: AsyncModbusTcpClient | None = None
        self._last_warning: tuple[str, float] = ("", 0.0)

    # -- the two hooks -------------------------------------------------------------------------------
    async def _setup(self) -> None:
        """Check the discovered models and read static points (scale factors); raise SunSpecError."""

    async def _poll(self) -> Any:
        """Read and decode one sample; return it, or None for an invalid (unpublished) sample."""
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------------------
    async def read(self, address: int, count: int) -> list[int]:
        """Read ``count`` holding registers at ``address`` with this poller's timeout (on its loop)."""
        client = self._client
        if client is None or not client.connected:
            raise _Failed("connection closed")
        return await _read(client, address, count, self.device_id, self.name, self.timeout_s)

    async def write(self, address: int, values: Sequence[int]) -> None:
        """Write holding registers in one request (function 16) with this poller's timeout."""
        client = self._client
        if client is None or not client.connected:
            raise _Failed("connection closed")
        rr = await within(client.write_registers(address, list(values), device_id=self.device_id), self.timeout_s)
        if rr.isError():
            raise SunSpecError(
                f"{self.name}: writing {len(values)} register(s) at {address} failed with Modbus exception "
                f"{getattr(rr, 'exception_code', '?')}"
            )

    def _warn(self, text: str) -> None:
        # A dead device retries every backoff_max_s for hours: log a changed message at once, the
        # same message at most once a minute (the counters keep the full count).
        now = time.monotonic()
        if text != self._last_warning[0] or now - self._last_warning[1] >= 60.0:
            log.warning("%s", text)
            self._last_warning = (text, now)

    def _error(self, text: str) -> None:
        if not text.startswith(self.name):
            text = f"{self.name}: {text}"
        self.counters.last_error = text
        self.counters.last_error_t_ns = time.time_ns()

    async def _connect(self) -> None:
        # pymodbus's own timeout would also apply to each request, but it retries and reports a
        # timeout as a generic ModbusIOException; we time each call ourselves (asyncio.wait_for) so a
        # timeout is counted as one, and keep pymodbus's as a loose backstop. reconnect_delay=0 turns
        # off pymodbus's background reconnect: this class owns reconnection and its backoff.
        self._client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=self.name,
            timeout=max(1.0, 4 * self.timeout_s),
            retries=0,
            reconnect_delay=0,
        )
        if not await asyncio.wait_for(self._client.connect(), self.timeout_s):
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}")
        self.models = await discover(
            self._client, self.device_id, self.base, timeout_s=self.timeout_s, name=self.name
        )
        await self._setup()

    def close(self) -> None:
        """Close the client (call on the poller's loop, or after it has stopped)."""
        client, self._client = self._client, None
        self.connected = False
        if client is not None:
            client.close()

    async def run(self) -> None:
        """Connect, discover, poll; on failure reconnect with capped exponential backoff; until cancelled."""
        delay = self.backoff_min_s
        attempts = 0
        try:
            while True:
                if attempts:
                    self.counters.reconnects += 1
                attempts += 1
                try:
                    await self._connect()
                except (asyncio.TimeoutError, OSError, ModbusException, SunSpecError, _Failed) as exc:
                    self.close()
                    self.counters.connect_failures += 1
                    if isinstance(exc, asyncio.TimeoutError):
                        self.counters.timeouts += 1
                        self._error(f"no answer within {self.timeout_s} s while connecting")
                    else:
                        self._error(str(exc) or type(exc).__name__)
                    self._warn(
                        f"{self.counters.last_error} (retrying with backoff up to {self.backoff_max_s} s)"
                    )
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, self.backoff_max_s)
                    continue
                self.connected = True
                self.counters.connects += 1
                log.info("%s: connected, models %s", self.name, self.models)
                if await self._poll_connected():
                    delay = self.backoff_min_s  # the connection worked: the next outage starts over
                self.close()
                self._warn(f"connection dropped: {self.counters.last_error}")
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.backoff_max_s)
        finally:
            self.close()

    async def _poll_connected(self) -> bool:
        """Poll until the connection fails; True if at least one poll succeeded."""
        loop = asyncio.get_running_loop()
        failures = 0
        any_ok = False
        next_t = loop.time()
        slot_ns = 0
        if self._grid_ns is not None:  # the first poll on the grid too: its sample is the one a cycle needs
            slot_ns = await self._sleep_until_slot(time.monotonic_ns())
        while True:
            try:
                sample = await self._poll()
            except asyncio.TimeoutError:
                self.counters.timeouts += 1
                self._error(f"no answer within {self.timeout_s} s")
                failures += 1
            except (OSError, ModbusException, SunSpecError, _Failed) as exc:
                self.counters.errors += 1
                self._error(str(exc) or type(exc).__name__)
                failures += 1
                client = self._client
                if client is None or not client.connected:
                    return any_ok
            else:
                failures = 0
                any_ok = True
                if sample is not None:
                    self.counters.reads_ok += 1
                    self.latest.publish(sample, time.monotonic_ns())
                await self._after_poll()
            if failures >= self.max_failures:
                return any_ok
            if self._grid_ns is not None:
                # from the slot just polled at the earliest: a timer that fired early must not poll that slot twice
                slot_ns = await self._sleep_until_slot(max(time.monotonic_ns(), slot_ns))
                continue
            next_t += self.interval_s
            now = loop.time()
            if next_t < now:  # overran: skip to the next slot on the grid rather than bunch up
                next_t += math.ceil((now - next_t) / self.interval_s) * self.interval_s
            await asyncio.sleep(next_t - now)

    async def _sleep_until_slot(self, after_ns: int) -> int:
        """Sleep until the phase-locked grid's first poll start after ``after_ns`` (a late poll skips the slots it
        overran); returns that slot (CLOCK_MONOTONIC ns).

        Timed on CLOCK_MONOTONIC, the control loop's clock, not loop.time(): uvloop's is the libuv loop's cached
        millisecond clock (0.4 ms behind time.monotonic here); its timers fire within about +-0.5 ms of it."""
        interval_ns, period_ns, lead_ns = self._grid_ns
        slot_ns = aligned_poll_ns(after_ns, interval_ns, period_ns, lead_ns)
        await asyncio.sleep(max(slot_ns - time.monotonic_ns(), 0) / 1e9)
        return slot_ns

    async def _after_poll(self) -> None:
        """Hook run after each successful poll (e.g. pending writes)."""


def _span(points: dict[str, Point], names: Iterable[str]) -> tuple[int, int]:
    """(first offset, register count) covering the named points, for one atomic read."""
    sel = [points[n] for n in names]
    first = min(p.offset for p in sel)
    return first, max(p.offset + p.size for p in sel) - first


class MeterReader(SunSpecPoller):
    """Grid meter: Hz from 211-214 (float32, preferred: no 10 mHz quantum), else 201-204 (Hz * 10**Hz_SF).

    A sample whose Hz (or Hz_SF) is "not implemented" (0x8000), NaN, or outside ``f_valid_hz`` is
    counted in ``counters.invalid`` and not published: the cell's age keeps growing instead.
    """

    kind = "meter"

    def __init__(
        self, host: str, port: int = 502, *, f_valid_hz: tuple[float, float] = (40.0, 70.0), **kwargs: Any
    ) -> None:
        super().__init__(host, port, **kwargs)
        self.f_valid_hz = f_valid_hz
        self.model_id: int | None = None
        self._addr = 0
        self._count = 0
        self._decode: Callable[[list[int]], tuple[float, float]] = lambda regs: (math.nan, math.nan)

    async def _setup(self) -> None:
        found = [m for m in METER_FLOAT_MODELS + METER_INT_MODELS if m in self.models]
        if not found:
            raise SunSpecError(
                f"{self.name}: no meter model (201-204 or 211-214) in the chain; found models "
                f"{sorted(self.models)}"
            )
        self.model_id = mid = found[0]
        pts = model_points(mid)
        if mid in METER_FLOAT_MODELS:
            names = ("Hz", "W")
        else:
            names = ("Hz", "Hz_SF", "W", "W_SF")
        first, self._count = _span(pts, names)
        self._addr = self.models[mid] + first
        hz, w = pts["Hz"], pts["W"]
        if mid in METER_FLOAT_MODELS:

            def decode(regs: list[int]) -> tuple[float, float]:
                f = decode_point(regs, hz, -first)
                p = decode_point(regs, w, -first)
                return (math.nan if f is None else f), (math.nan if p is None else p * 1e-3)
        else:
            hz_sf, w_sf = pts["Hz_SF"], pts["W_SF"]

            def decode(regs: list[int]) -> tuple[float, float]:
                f = _scaled(decode_point(regs, hz, -first), decode_point(regs, hz_sf, -first))
                p = _scaled(decode_point(regs, w, -first), decode_point(regs, w_sf, -first))
                return f, p * 1e-3

        self._decode = decode

    async def _poll(self) -> MeterSample | None:
        # Hz, its SF and W come from one request, so a sample never mixes two device updates.
        f_hz, p_kw = self._decode(await self.read(self._addr, self._count))
        lo, hi = self.f_valid_hz
        if not lo <= f_hz <= hi:  # also False for NaN
            self.counters.invalid += 1
            self._error(f"invalid frequency sample {f_hz!r} Hz from model {self.model_id}")
            return None
        return MeterSample(f_hz, p_kw, self.model_id or 0)


class InverterReader(SunSpecPoller):
    """Site inverter: W, Hz, St, InvSt, ConnSt, Alrm from 701; optional power setpoint to 704.

    ``cannot_sync`` is set when InvSt is FAULT while ConnSt is DISCONNECTED: model 701 has no
    dedicated "cannot synchronise to grid phase" bit, and a DER that cannot sync stays off the grid
    in fault (the simulator also raises the manufacturer alarm with the text in ``MnAlrmInfo``).
    Setpoints: ``request_setpoint`` from any thread (written on the next poll, and refreshed every
    ``revert_s / 3`` so the 704 reversion timer never runs out while we are alive), or
    ``await write_setpoint(...)`` on the input loop.
    """

    kind = "inverter"

    _MEAS = ("St", "InvSt", "ConnSt", "Alrm", "W", "Hz")
    _SET = ("WSetEna", "WSetMod", "WSet", "WSetRvrt", "WSetPct", "WSetPctRvrt", "WSetEnaRvrt", "WSetRvrtTms")

    def __init__(self, host: str, port: int = 502, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self._p701 = model_points(701)
        self._p704 = model_points(704)
        self._addr = 0
        self._first, self._count = _span(self._p701, self._MEAS)
        self._w_sf: int | None = None
        self._hz_sf: int | None = None
        self._wset_sf: int | None = None
        self._requested: Latest[tuple[float, float]] = Latest()
        self._written: tuple[float, float] | None = None
        self._written_t_ns = 0

    async def _setup(self) -> None:
        if 701 not in self.models:
            raise SunSpecError(
                f"{self.name}: no model 701 (DERMeasureAC); found models {sorted(self.models)}"
            )
        start = self.models[701]
        self._addr = start + self._first
        # The 701 scale factors are static (model_701.json "static": "S"): read them once per connect.
        first, count = _span(self._p701, ("W_SF", "Hz_SF"))
        regs = await self.read(start + first, count)
        self._w_sf = decode_point(regs, self._p701["W_SF"], -first)
        self._hz_sf = decode_point(regs, self._p701["Hz_SF"], -first)
        self._wset_sf = None
        if 704 in self.models:
            p = self._p704["WSet_SF"]
            self._wset_sf = decode_point(await self.read(self.models[704] + p.offset, 1), p, -p.offset)
        self._written = None  # a new connection (maybe a rebooted inverter): write again

    async def _poll(self) -> InverterSample:
        regs = await self.read(self._addr, self._count)
        p, o = self._p701, -self._first
        inv_st = decode_point(regs, p["InvSt"], o)
        conn_st = decode_point(regs, p["ConnSt"], o)
        return InverterSample(
            p_kw=_scaled(decode_point(regs, p["W"], o), self._w_sf) * 1e-3,
            f_hz=_scaled(decode_point(regs, p["Hz"], o), self._hz_sf),
            st=decode_point(regs, p["St"], o),
            inv_st=inv_st,
            conn_st=conn_st,
            alarms=decode_point(regs, p["Alrm"], o) or 0,
            cannot_sync=inv_st == INVST_FAULT and conn_st == CONN_DISCONNECTED,
        )

    def request_setpoint(self, p_kw: float, revert_s: float = 10.0) -> None:
        """Ask for ``p_kw`` (positive = discharge), reverting to 0 kW after ``revert_s``; never blocks."""
        if not math.isfinite(p_kw) or not 0 < revert_s < 2**32:
            raise ValueError(f"{self.name}: setpoint {p_kw!r} kW with revert_s={revert_s!r} is not valid")
        self._requested.publish((float(p_kw), float(revert_s)), time.monotonic_ns())

    async def write_setpoint(self, p_kw: float, revert_s: float = 10.0) -> None:
        """Write WSetEna=1, WSetMod=WATTS, WSet, revert-to 0 W after ``revert_s`` (one atomic request)."""
        if 704 not in self.models or self._wset_sf is None:
            raise SunSpecError(
                f"{self.name}: cannot write a power setpoint: model 704 with WSet_SF is missing "
                f"(models {sorted(self.models)}, WSet_SF {self._wset_sf})"
            )
        p = self._p704
        values = {
            "WSetEna": 1,
            "WSetMod": 1,
            "WSet": round(p_kw * 1e3 / 10.0**self._wset_sf),
            "WSetRvrt": 0,
            # WSetMod=WATTS makes the device ignore the Pct points; writing them keeps this one request.
            "WSetPct": 0,
            "WSetPctRvrt": 0,
            "WSetEnaRvrt": 1,
            "WSetRvrtTms": max(1, math.ceil(revert_s)),
        }
        first, count = _span(p, self._SET)
        regs = [0] * count
        for name, v in values.items():
            q = p[name]
            regs[q.offset - first : q.offset - first + q.size] = encode_point(q, v)
        await self.write(self.models[704] + first, regs)

    async def _after_poll(self) -> None:
        want, _t = self._requested.read()
        if want is None:
            return
        now = time.monotonic_ns()
        if want == self._written and now - self._written_t_ns < want[1] / 3 * 1e9:
            return
        try:
            await self.write_setpoint(*want)
        except (asyncio.TimeoutError, OSError, ModbusException, SunSpecError, _Failed, ValueError) as exc:
            # ValueError: WSet does not fit int32 at the device's WSet_SF.
            self.counters.write_failures += 1
            self._error(f"setpoint write failed: {exc or type(exc).__name__}")
            return
        self.counters.writes_ok += 1
        self._written, self._written_t_ns = want, now


# --------------------------------------------------------------------------------------------------
# The input thread
# --------------------------------------------------------------------------------------------------


def _new_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: Modbus polling runs on the default asyncio loop")
        return asyncio.new_event_loop(), "asyncio"
    return uvloop.new_event_loop(), "uvloop"


class InputThread:
    """A daemon thread running one asyncio (uvloop) event loop with every poller as a concurrent task.

    ``start()`` returns once the loop runs; ``stop()`` cancels the pollers, closes their clients,
    stops the loop and joins. ``call(coro_fn)`` runs a coroutine on the input loop from another
    thread and waits for its result (for setup and tools, never for the control loop).
    """

    def __init__(
        self, pollers: Iterable[SunSpecPoller], *, name: str = "v2grt-input", use_uvloop: bool = True
    ) -> None:
        self.pollers = list(pollers)
        self.name = name
        self.use_uvloop = use_uvloop
        self.loop_kind = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._crash: BaseException | None = None

    @property
    def native_id(self) -> int | None:
        """The OS thread id once started (for its scheduling policy: v2grt.loop.set_thread_fifo)."""
        return self._thread.native_id if self._thread is not None else None

    def start(self, timeout_s: float = 5.0) -> InputThread:
        """Start the thread and its pollers; raise if the loop is not running within ``timeout_s``."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"{self.name}: event loop did not start within {timeout_s} s")
        if self._crash is not None:
            raise RuntimeError(f"{self.name}: event loop failed to start") from self._crash
        return self

    def _run(self) -> None:
        try:
            if self.use_uvloop:
                loop, self.loop_kind = _new_loop()
            else:
                loop, self.loop_kind = asyncio.new_event_loop(), "asyncio"
            asyncio.set_event_loop(loop)
            self._loop = loop
        except BaseException as exc:
            self._crash = exc
            self._ready.set()
            raise
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._guard(p), name=p.name) for p in self.pollers]
        self._ready.set()
        await self._stop.wait()
        pending = set(tasks)
        while pending:
            # Cancel until done: on Python < 3.12, asyncio.wait_for can swallow a cancellation that
            # races with its inner future finishing (CPython gh-86296), leaving a poller running.
            for t in pending:
                t.cancel()
            _done, pending = await asyncio.wait(pending, timeout=0.2)
        for p in self.pollers:
            p.close()

    @staticmethod
    async def _guard(poller: SunSpecPoller) -> None:
        # A poller that dies from a bug would leave its cell silently ageing: log it loudly, count
        # it, and start it again after its maximum backoff.
        while True:
            try:
                await poller.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                poller.counters.errors += 1
                poller.counters.last_error = f"{poller.name}: poller crashed: {exc!r}"
                log.exception("%s: poller crashed; restarting in %.1f s", poller.name, poller.backoff_max_s)
                poller.close()
                await asyncio.sleep(poller.backoff_max_s)

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: object) -> bool:
        """Run ``fn(*args)`` on the input loop soon, from any thread; False when the loop is not running."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call
            return False
        return True

    def call(self, coro_fn: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run ``coro_fn()`` on the input loop from another thread and return its result."""
        if self._loop is None or not self._loop.is_running():
            raise RuntimeError(f"{self.name}: not running")

        async def wrapper() -> T:
            return await coro_fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel the pollers, close their clients, stop the loop and join the thread."""
        thread = self._thread
        if thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop closed between the check and the call
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            raise RuntimeError(f"{self.name}: input thread did not stop within {timeout_s} s")
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
