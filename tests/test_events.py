"""engine.log set-up (v2grt.events): what libraries log reaches the engine log as one bounded line."""

from __future__ import annotations

import logging

from _plant import logging_restored
from pymodbus.logging import Log

from v2grt.events import setup_logging, shutdown_logging


def test_pymodbus_records_reach_engine_log_one_line_each_rate_limited(tmp_path, capfd):
    """pymodbus's warnings and errors go to engine.log (not stderr) as PYMODBUS lines: its frame dump cut
    to a count, a repeated message logged once and counted, its DEBUG frames left out."""
    path = tmp_path / "engine.log"
    with logging_restored():
        setup_logging(path, level=logging.DEBUG, library_rate_limit_s=60.0)
        Log.frame_dump, Log.last_log_text = [], ""  # pymodbus's class-wide state, left by earlier Modbus tests
        Log.transport_dump(Log.SEND_DATA, b"\x00\x01\x00\x00\x00\x06\x01\x03\x9c\x40\x00\x02", b"")
        for _ in range(5):
            Log.warning("ERROR: received pdu without a corresponding request, IGNORING")
            Log.debug("send: {}", b"\x01\x03", ":hex")
        Log.error("Invalid Modbus protocol id: {}", 7)
        Log.transport_dump(Log.RECV_DATA, b"\x00\x02", b"")
        Log.error("Invalid Modbus protocol id: {}", 8)  # the same message but for its digits: a repeat
        Log.warning("ERROR: received pdu without a corresponding request, IGNORING")
        shutdown_logging()
    lines = path.read_text().splitlines()
    pdu = [ln for ln in lines if "received pdu without a corresponding request" in ln]
    assert len(pdu) == 1 and " WARNING PYMODBUS logger=pymodbus.logging msg=" in pdu[0], lines
    protocol = [ln for ln in lines if "Invalid Modbus protocol id" in ln]
    assert len(protocol) == 1 and " ERROR PYMODBUS " in protocol[0] and "frames=1" in protocol[0], lines
    assert not any(">>>>>" in ln or "send: 0x1 0x3" in ln for ln in lines), lines
    assert "received pdu" not in capfd.readouterr().err
    assert logging.getLogger("pymodbus").propagate  # shutdown_logging put the library's logger back
