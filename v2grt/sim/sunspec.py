"""Simulated SunSpec devices (grid meter, site inverter) served by real pymodbus TCP servers."""

# For tests, demos and benchmarks. Each device is a register image at 40000 ('SunS', model 1, its
# models, the end model), laid out from pysunspec2's JSON model definitions, so offsets and types are
# the standard's. A device is served by its own pymodbus ``ModbusTcpServer`` (one TCP endpoint per
# device, unit id 1 by default), either on the caller's event loop (`SimServer`) or on a background
# thread with its own loop (`SimServerThread`) for synchronous tests and the demo.
#
# Datastore: pymodbus 3.16's ``SimDevice``/``SimData`` (the legacy ``ModbusDeviceContext`` and
# DataBlock classes are deprecated; pymodbus.simulator still calls itself "experimental", but
# ModbusTcpServer takes a SimDevice directly and wraps it in its SimCore). ``SimDevice`` has no API to
# change registers from outside the server at run time, so each device keeps its own image and hands
# the server an ``action`` hook (a documented ``SimDevice`` field): on a read the hook copies the
# requested range from the image into the server's registers; on a write it checks the points are
# writable and applies the values to the image. The image is changed under one lock, by one slice
# assignment per update, so a client never sees half of a multi-register value or a value without
# its scale factor.
#
# Run ``python -m v2grt.sim.sunspec --help`` for a stand-alone meter and inverter.

from __future__ import annotations

import argparse
import asyncio
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from v2grt.io.modbus import (
    CONN_CONNECTED,
    CONN_DISCONNECTED,
    END_MODEL_ID,
    INVST_FAULT,
    INVST_RUNNING,
    METER_FLOAT_MODELS,
    METER_INT_MODELS,
    SUNS_MARKER,
    SUNSPEC_BASE,
    decode_point,
    encode_point,
    model_length,
    model_points,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ALRM_MANUFACTURER",
    "INVERTER_W_MAX",
    "PHASE_MISMATCH_TEXT",
    "InverterSetpoint",
    "RegisterDevice",
    "SimServer",
    "SimServerThread",
    "SunSpecDevice",
    "SunSpecInverter",
    "SunSpecMeter",
    "inverter_limit_kw",
    "inverter_w_sf",
    "serve",
]

#: 701 Alrm bit 16, MANUFACTURER_ALRM ("see MnAlrmInfo"): 701 has no "cannot sync to grid phase" bit.
ALRM_MANUFACTURER = 1 << 16
#: The MnAlrmInfo text of a simulated inverter that cannot synchronise (the field manual's code).
PHASE_MISMATCH_TEXT = "E_INVERTER_PHASE_MISMATCH"
# Coil and discrete-input function codes: in pymodbus's shared-block mode they would alias registers.
_BIT_FUNCTIONS = frozenset({1, 2, 5, 15})


class RegisterDevice:
    """A block of holding registers starting at ``base``, served through a pymodbus ``SimDevice``.

    ``writable`` lists the address ranges a client may write; other writes get ILLEGAL_ADDRESS, and
    reads outside the block get ILLEGAL_ADDRESS from pymodbus itself. Thread-safe: the simulator's
    setters run on any thread, the server's hook on the server's loop.
    """

    def __init__(
        self,
        registers: Sequence[int],
        *,
        base: int = SUNSPEC_BASE,
        device_id: int = 1,
        writable: Iterable[range] = (),
        name: str = "device",
    ) -> None:
        if not registers or base + len(registers) > 0x10000:
            raise ValueError(
                f"{name}: {len(registers)} registers at {base} do not fit the 16-bit address space"
            )
        self.base, self.device_id, self.name = base, device_id, name
        self._image = [int(r) & 0xFFFF for r in registers]
        # A set, not the ranges: a write checks each address at once (a scan of the ranges per address was
        # a tenth of a 100-charger simulator's CPU).
        self._writable = frozenset(a for r in writable for a in r)
        self._lock = threading.Lock()
        self._stale = False
        self._host: SimServerThread | None = None

    # -- simulator side ------------------------------------------------------------------------------
    def registers(self, address: int | None = None, count: int | None = None) -> list[int]:
        """A copy of ``count`` registers at ``address`` (default: the whole image)."""
        start = 0 if address is None else address - self.base
        stop = len(self._image) if count is None else start + count
        with self._lock:
            return self._image[start:stop]

    def write_registers(self, address: int, values: Sequence[int]) -> None:
        """Set registers at ``address`` in one atomic step (simulator side: no writability check)."""
        start = address - self.base
        if start < 0 or start + len(values) > len(self._image):
            raise ValueError(
                f"{self.name}: registers {address}..{address + len(values) - 1} are outside the map"
            )
        with self._lock:
            self._image[start : start + len(values)] = values

    def set_stale(self, stale: bool = True) -> None:
        """Stop (or resume) answering: requests get no response at all, the TCP connection stays up."""
        self._stale = stale

    def stop(self) -> None:
        """Close this device's listener and connections (needs a `SimServerThread` host)."""
        self._need_host().stop_device(self)

    def start(self) -> None:
        """Listen again on the same port after `stop` (needs a `SimServerThread` host)."""
        self._need_host().start_device(self)

    def _need_host(self) -> SimServerThread:
        if self._host is None:
            raise RuntimeError(
                f"{self.name}: not served by a SimServerThread; with SimServer use "
                "`await server.stop_device(device)` / `start_device(device)`"
            )
        return self._host

    # -- server side ---------------------------------------------------------------------------------
    def sim_device(self) -> SimDevice:
        """A fresh pymodbus ``SimDevice`` serving this image (one per server instance)."""
        return SimDevice(
            id=self.device_id,
            simdata=[SimData(self.base, values=list(self._image), datatype=DataType.REGISTERS)],
            action=self._action,
        )

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if self._stale:
            # With ignore_missing_devices=True the request handler sends nothing back for this
            # exception ("the client will simply timeout"): a meter that went silent on a live socket.
            raise NoSuchIdException(f"{self.name} is simulating a dead device")
        if function_code in _BIT_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION  # SunSpec maps are registers only
        off = address - start_address
        i = address - self.base
        if set_values is None:
            with self._lock:
                current_registers[off : off + count] = self._image[i : i + count]
            return None
        values = [int(v) for v in set_values]
        if not self._writable.issuperset(range(address, address + len(values))):
            return ExcCodes.ILLEGAL_ADDRESS
        with self._lock:
            self._image[i : i + len(values)] = values
        self._on_write(address, len(values))
        return None

    def _on_write(self, address: int, count: int) -> None:
        """Called after a client's write was applied to the image."""


class SunSpecDevice(RegisterDevice):
    """'SunS' at ``base``, model 1 (common), the given models with every point "not implemented", end model.

    ``models`` maps model id to first-point address, as `v2grt.io.modbus.discover` returns it.
    """

    def __init__(
        self,
        model_ids: Sequence[int],
        *,
        mn: str = "v2grt",
        md: str = "sim",
        sn: str = "0001",
        vr: str = "1.0",
        base: int = SUNSPEC_BASE,
        device_id: int = 1,
        name: str = "sunspec",
    ) -> None:
        image: list[int] = list(SUNS_MARKER)
        models: dict[int, int] = {}
        writable: list[range] = []
        for mid in (1, *model_ids):
            if mid in models:
                raise ValueError(f"{name}: model {mid} listed twice")
            length = model_length(mid)
            start = base + len(image) + 2
            models[mid] = start
            block = [0] * length
            for p in model_points(mid).values():
                block[p.offset : p.offset + p.size] = encode_point(p, None)
                if "W" in p.access:
                    writable.append(range(start + p.offset, start + p.offset + p.size))
            image += [mid, length, *block]
        image += [END_MODEL_ID, 0]
        super().__init__(image, base=base, device_id=device_id, writable=writable, name=name)
        self.models = models
        self.set_points(1, Mn=mn, Md=md, SN=sn, Vr=vr, DA=device_id)

    def set_points(self, model_id: int, **values: Any) -> None:
        """Set raw (unscaled) point values of one model in one atomic step; None = not implemented."""
        start = self.models[model_id]
        pts = model_points(model_id)
        enc = {}
        for name, v in values.items():
            if name not in pts:
                raise KeyError(f"{self.name}: model {model_id} has no point {name!r}")
            enc[pts[name]] = encode_point(pts[name], v)
        lo = min(p.offset for p in enc)
        hi = max(p.offset + p.size for p in enc)
        i = start - self.base
        with self._lock:
            span = self._image[i + lo : i + hi]
            for p, regs in enc.items():
                span[p.offset - lo : p.offset - lo + p.size] = regs
            self._image[i + lo : i + hi] = span

    def get_point(self, model_id: int, name: str) -> int | float | str | None:
        """The raw (unscaled) value of a point as a client would decode it (None = not implemented)."""
        p = model_points(model_id)[name]
        return decode_point(self.registers(self.models[model_id] + p.offset, p.size), p, -p.offset)


class SunSpecMeter(SunSpecDevice):
    """Grid meter: model 1, then 203 (wye, int16 + scale factors) or 213 (float32), then the end model.

    Model 203's ``Hz`` is int16 (model_203.json), so ``hz_sf=-2`` (10 mHz steps) is the finest scale
    that holds 50 and 60 Hz (-3 would need 50000 > 32767); use model 213 for finer resolution.
    ``W``: the meter models leave the sign undefined; this simulator uses positive = imported from the grid.
    """

    def __init__(
        self,
        model: int = 203,
        *,
        f_hz: float = 50.0,
        p_kw: float = 0.0,
        hz_sf: int = -2,
        w_sf: int = 1,
        v: float = 230.0,
        **kwargs: Any,
    ) -> None:
        if model not in (203, 213):
            raise ValueError(f"SunSpecMeter: model {model} not simulated (203 or 213)")
        kwargs.setdefault("md", f"meter-{model}")
        kwargs.setdefault("name", f"meter-{model}")
        super().__init__([model], **kwargs)
        self.model, self.hz_sf, self.w_sf = model, hz_sf, w_sf
        if model in METER_INT_MODELS:
            self.set_points(
                model,
                A=0,
                AphA=0,
                AphB=0,
                AphC=0,
                A_SF=-1,
                V_SF=-1,
                PhV=round(v * 10),
                PhVphA=round(v * 10),
                PhVphB=round(v * 10),
                PhVphC=round(v * 10),
                Hz_SF=hz_sf,
                W_SF=w_sf,
                TotWhExp=1,
                TotWhImp=1,
                TotWh_SF=0,
                Evt=0,
            )
        else:
            self.set_points(
                model,
                A=0.0,
                AphA=0.0,
                AphB=0.0,
                AphC=0.0,
                PhV=v,
                PhVphA=v,
                PhVphB=v,
                PhVphC=v,
                TotWhExp=1.0,
                TotWhImp=1.0,
                Evt=0,
            )
        self.set_frequency(f_hz)
        self.set_power(p_kw)

    def set_frequency(self, f_hz: float) -> None:
        """Show ``f_hz`` from the next read on (Hz and Hz_SF, or the float32 pair, in one atomic step)."""
        if self.model in METER_FLOAT_MODELS:
            self.set_points(self.model, Hz=float(f_hz))
            return
        raw = round(f_hz / 10.0**self.hz_sf)
        if not -0x7FFF <= raw <= 0x7FFF:
            raise ValueError(
                f"{self.name}: {f_hz} Hz is {raw} at Hz_SF={self.hz_sf}, outside model 203's int16 Hz"
            )
        self.set_points(self.model, Hz=raw, Hz_SF=self.hz_sf)

    def set_power(self, p_kw: float) -> None:
        """Total real power at the meter, kW (positive = imported from the grid; see the class docstring)."""
        if self.model in METER_FLOAT_MODELS:
            self.set_points(self.model, W=p_kw * 1e3)
            return
        raw = round(p_kw * 1e3 / 10.0**self.w_sf)
        if not -0x7FFF <= raw <= 0x7FFF:
            raise ValueError(f"{self.name}: {p_kw} kW does not fit int16 W at W_SF={self.w_sf}")
        self.set_points(self.model, W=raw, W_SF=self.w_sf)


class InverterSetpoint(NamedTuple):
    """The 704 active-power setpoint as written by a client (kW, positive = discharge)."""

    enabled: bool  # WSetEna
    watts_mode: bool  # WSetMod == WATTS (else percent of WMax)
    p_kw: float  # WSet * 10**WSet_SF / 1000
    revert_enabled: bool  # WSetEnaRvrt
    revert_p_kw: float  # WSetRvrt, applied when the reversion timer runs out
    revert_s: int  # WSetRvrtTms, 0 = no reversion
    t_written_ns: int | None  # CLOCK_MONOTONIC of the latest client write to these points


#: The largest |701 W| the simulated site inverters are given (int16 holds 32767; the rest is headroom).
INVERTER_W_MAX = 30000


def inverter_w_sf(max_kw: float) -> int:
    """The smallest W_SF >= 0 at which ``max_kw`` fits a site inverter's 701 W (INVERTER_W_MAX)."""
    sf = 0
    while max_kw * 1e3 / 10.0**sf > INVERTER_W_MAX:
        sf += 1
    return sf


def inverter_limit_kw(w_sf: int) -> float:
    """The largest |power| a site inverter with ``w_sf`` shows, kW (what a rig clips its measured W to)."""
    return INVERTER_W_MAX * 10.0**w_sf / 1e3


class SunSpecInverter(SunSpecDevice):
    """Site inverter: model 1, 701 (DERMeasureAC), 704 (DERCtlAC), end model.

    Cannot-sync is shown the way a DER that fails to synchronise reports it in 701 (which has no
    dedicated sync-failure bit): ``InvSt`` FAULT, ``ConnSt`` DISCONNECTED, ``W`` 0, and ``Alrm`` bit 16
    MANUFACTURER_ALRM with ``MnAlrmInfo`` = "E_INVERTER_PHASE_MISMATCH". ``St`` stays ON (commanded on).
    """

    def __init__(
        self,
        *,
        p_kw: float = 0.0,
        f_hz: float = 50.0,
        w_sf: int = 1,
        hz_sf: int = -3,
        wset_sf: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("md", "inverter-701-704")
        kwargs.setdefault("name", "inverter")
        super().__init__([701, 704], **kwargs)
        self.w_sf, self.hz_sf, self.wset_sf = w_sf, hz_sf, wset_sf
        self._t_written_ns: int | None = None
        self._cannot_sync = False
        self._p_kw, self._f_hz = p_kw, f_hz
        self.set_points(
            701,
            ACType=2,
            St=1,
            InvSt=INVST_RUNNING,
            ConnSt=CONN_CONNECTED,
            Alrm=0,
            DERMode=0,
            W_SF=w_sf,
            Hz_SF=hz_sf,
            A_SF=0,
            V_SF=0,
            VA_SF=w_sf,
            Var_SF=w_sf,
            PF_SF=-3,
            TotWh_SF=0,
            TotVarh_SF=0,
            Tmp_SF=0,
        )
        self.set_points(
            704,
            WSetEna=0,
            WSetMod=1,
            WSet=0,
            WSetRvrt=0,
            WSetPct=0,
            WSetPctRvrt=0,
            WSetEnaRvrt=0,
            WSetRvrtTms=0,
            WSetRvrtRem=0,
            WSet_SF=wset_sf,
            WSetPct_SF=-2,
        )
        self.set_measured(p_kw, f_hz)
        p704 = model_points(704)
        lo = self.models[704] + p704["WSetEna"].offset
        hi = self.models[704] + p704["WSetRvrtTms"].offset + p704["WSetRvrtTms"].size
        self._wset_regs = range(lo, hi)

    def set_measured(self, w_kw: float, f_hz: float) -> None:
        """Measured output (kW, positive = injection) and frequency, in one atomic step."""
        raw_w = round(w_kw * 1e3 / 10.0**self.w_sf)
        if not -0x7FFF <= raw_w <= 0x7FFF:
            raise ValueError(f"{self.name}: {w_kw} kW does not fit 701's int16 W at W_SF={self.w_sf}")
        self._p_kw, self._f_hz = w_kw, f_hz
        if self._cannot_sync:
            raw_w = 0  # off the grid: no power flows whatever the setpoint
        self.set_points(701, W=raw_w, Hz=round(f_hz / 10.0**self.hz_sf))

    def set_cannot_sync(self, cannot_sync: bool = True) -> None:
        """Raise (or clear) the cannot-synchronise-to-grid-phase condition (see the class docstring)."""
        self._cannot_sync = cannot_sync
        if cannot_sync:
            self.set_points(
                701,
                St=1,
                InvSt=INVST_FAULT,
                ConnSt=CONN_DISCONNECTED,
                Alrm=ALRM_MANUFACTURER,
                W=0,
                MnAlrmInfo=PHASE_MISMATCH_TEXT,
            )
        else:
            self.set_points(701, St=1, InvSt=INVST_RUNNING, ConnSt=CONN_CONNECTED, Alrm=0, MnAlrmInfo=None)
            self.set_measured(self._p_kw, self._f_hz)

    def _on_write(self, address: int, count: int) -> None:
        if any(a in self._wset_regs for a in range(address, address + count)):
            self._t_written_ns = time.monotonic_ns()

    def setpoint(self) -> InverterSetpoint:
        """The 704 power setpoint as the last client wrote it."""
        sf = 10.0 ** (self.get_point(704, "WSet_SF") or 0)
        g = self.get_point
        return InverterSetpoint(
            enabled=g(704, "WSetEna") == 1,
            watts_mode=g(704, "WSetMod") == 1,
            p_kw=(g(704, "WSet") or 0) * sf / 1e3,
            revert_enabled=g(704, "WSetEnaRvrt") == 1,
            revert_p_kw=(g(704, "WSetRvrt") or 0) * sf / 1e3,
            revert_s=g(704, "WSetRvrtTms") or 0,
            t_written_ns=self._t_written_ns,
        )

    def p_target_kw(self, now_ns: int | None = None) -> float:
        """What the inverter would deliver now: the setpoint, its revert value after the timer, or 0."""
        sp = self.setpoint()
        if not sp.enabled or self._cannot_sync:
            return 0.0
        if sp.revert_enabled and sp.revert_s > 0 and sp.t_written_ns is not None:
            now_ns = time.monotonic_ns() if now_ns is None else now_ns
            if now_ns - sp.t_written_ns > sp.revert_s * 1e9:
                return sp.revert_p_kw
        return sp.p_kw


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("device", "host", "port", "server")

    def __init__(self, device: RegisterDevice, host: str, port: int) -> None:
        self.device, self.host, self.port = device, host, port
        self.server: ModbusTcpServer | None = None


def _entries(devices: Iterable[Any]) -> list[_Entry]:
    out = []
    for d in devices:
        dev, host, port = (d, "127.0.0.1", 0) if isinstance(d, RegisterDevice) else d
        if any(e.device is dev for e in out):
            raise ValueError(f"{dev.name}: listed twice")
        out.append(_Entry(dev, host, port))
    return out


class SimServer:
    """One pymodbus ``ModbusTcpServer`` per device on the running event loop.

    ``devices``: devices (served on 127.0.0.1, an ephemeral port) or (device, host, port) tuples.
    Ports chosen by the OS are kept, so `start_device` after `stop_device` reuses the same port.
    """

    def __init__(self, devices: Iterable[Any]) -> None:
        self._entries = _entries(devices)

    def _entry(self, device: RegisterDevice) -> _Entry:
        for e in self._entries:
            if e.device is device:
                return e
        raise KeyError(f"{device.name}: not served by this SimServer")

    def port(self, device: RegisterDevice) -> int:
        """The TCP port ``device`` is (or was last) bound to."""
        return self._entry(device).port

    async def start(self) -> None:
        """Listen for every device (raises RuntimeError if a port cannot be bound)."""
        for e in self._entries:
            await self._open(e)

    async def stop(self) -> None:
        """Close every listener and connection."""
        for e in self._entries:
            await self._close(e)

    async def start_device(self, device: RegisterDevice) -> None:
        """Listen again for one device, on its previous port."""
        await self._open(self._entry(device))

    async def stop_device(self, device: RegisterDevice) -> None:
        """Close one device's listener and its client connections (a powered-off meter)."""
        await self._close(self._entry(device))

    async def _open(self, e: _Entry) -> None:
        if e.server is not None:
            return
        server = ModbusTcpServer(e.device.sim_device(), address=(e.host, e.port), ignore_missing_devices=True)
        await server.serve_forever(background=True)
        # server.transport is the asyncio.Server from loop.create_server (pymodbus transport.listen).
        e.port = server.transport.sockets[0].getsockname()[1]
        e.server = server

    @staticmethod
    async def _close(e: _Entry) -> None:
        server, e.server = e.server, None
        if server is not None:
            await server.shutdown()


async def serve(devices: Iterable[Any]) -> SimServer:
    """Start and return a `SimServer` for ``devices`` on the running loop."""
    server = SimServer(devices)
    await server.start()
    return server


class SimServerThread:
    """A `SimServer` on its own event loop in a daemon thread, driven from synchronous code.

    ``start()`` returns once every device listens; ``port(device)`` gives its port. Devices hosted
    here can be stopped and restarted with ``device.stop()`` / ``device.start()``.
    """

    def __init__(self, devices: Iterable[Any], *, name: str = "v2grt-sim") -> None:
        self._server = SimServer(devices)
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def port(self, device: RegisterDevice) -> int:
        """The TCP port ``device`` listens on."""
        return self._server.port(device)

    def _call(self, coro: Any, timeout_s: float) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self.name}: not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self, timeout_s: float = 5.0) -> SimServerThread:
        """Start the loop thread and every device's server."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=self.name, daemon=True)
        self._loop = loop
        self._thread.start()
        try:
            self._call(self._server.start(), timeout_s)
        except BaseException:
            self.stop()
            raise
        for e in self._server._entries:
            e.device._host = self
        return self

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop_device(self, device: RegisterDevice, timeout_s: float = 5.0) -> None:
        """Close one device's listener and connections."""
        self._call(self._server.stop_device(device), timeout_s)

    def start_device(self, device: RegisterDevice, timeout_s: float = 5.0) -> None:
        """Listen again for one device on its previous port."""
        self._call(self._server.start_device(device), timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every server, stop the loop, join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        for e in self._server._entries:
            if e.device._host is self:
                e.device._host = None
        try:
            self._call(self._server.stop(), timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
            self._thread = self._loop = None
        if thread.is_alive():
            raise RuntimeError(f"{self.name}: server thread did not stop within {timeout_s} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a meter and an inverter until interrupted; optionally swing the frequency for demos."""
    ap = argparse.ArgumentParser(prog="python -m v2grt.sim.sunspec", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--meter-port", type=int, default=1502)
    ap.add_argument("--inverter-port", type=int, default=1503)
    ap.add_argument("--meter-model", type=int, choices=(203, 213), default=213)
    ap.add_argument("--f-hz", type=float, default=50.0, help="nominal frequency")
    ap.add_argument("--swing-mhz", type=float, default=0.0, help="sine amplitude around --f-hz, mHz")
    ap.add_argument("--period-s", type=float, default=20.0, help="period of the sine")
    args = ap.parse_args(argv)
    meter = SunSpecMeter(args.meter_model, f_hz=args.f_hz)
    inverter = SunSpecInverter(f_hz=args.f_hz)
    with SimServerThread(
        [(meter, args.host, args.meter_port), (inverter, args.host, args.inverter_port)]
    ) as sim:
        print(
            f"meter (model {args.meter_model}) on {args.host}:{sim.port(meter)}, "
            f"inverter (701/704) on {args.host}:{sim.port(inverter)}; Ctrl-C stops",
            flush=True,
        )
        t0 = time.monotonic()
        try:
            while True:
                f = args.f_hz + args.swing_mhz * 1e-3 * math.sin(
                    2 * math.pi * (time.monotonic() - t0) / args.period_s
                )
                meter.set_frequency(f)
                inverter.set_measured(inverter.p_target_kw(), f)
                time.sleep(0.05)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
