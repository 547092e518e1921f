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


# Calls whose code is computed, each with where its codes are documented: a new one must be added here.
_COMPUTED_CODES = {
    "aggregator.py": "UNKNOWN_NODE / FOREIGN_NODE (_telemetry_error), in the table",
    "gateway/core.py": "the wire error codes of refused setpoints: docs/wire.md 9.1",
    "gateway/sunspec.py": "Reason names INVALID_TELEMETRY, TIMEOUT_BMS_RESPONSE, NODE_UNREACHABLE, in the table",
    "journal/writer.py": "Journal._event, the wrapper: its callers' codes are collected",
    "monitor.py": "Reason names of monitor._WHAT, checked below",
}


def test_every_code_the_package_emits_is_in_the_operations_troubleshooting_table():
    """Each engine.log code passed to an emit() (or the journal's _event()) in v2grt appears in docs/operations.md
    section 9, so an operator meeting a code in the log finds what it means."""
    import ast
    from pathlib import Path

    from v2grt import monitor

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "operations.md").read_text()
    table = doc[doc.index("## 9. Troubleshooting matrix"):doc.index("## 10.")]
    codes: dict[str, str] = {}
    computed = set()
    for path in sorted((root / "v2grt").rglob("*.py")):
        rel = path.relative_to(root / "v2grt").as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("emit", "_event") and node.args):
                continue
            arg = node.args[0]
            options = [arg.body, arg.orelse] if isinstance(arg, ast.IfExp) else [arg]
            for opt in options:
                if isinstance(opt, ast.Constant) and isinstance(opt.value, str):
                    codes.setdefault(opt.value, f"{rel}:{node.lineno}")
                else:
                    computed.add(rel)
    assert len(codes) > 40  # the walk found the emits
    assert computed == set(_COMPUTED_CODES), "a new emit() with a computed code: say in _COMPUTED_CODES where"
    codes.update({c.name: "monitor.py" for c in monitor._WHAT})
    codes.update({c: "gateway/sunspec.py" for c in ("INVALID_TELEMETRY", "TIMEOUT_BMS_RESPONSE", "NODE_UNREACHABLE")})
    missing = sorted(f"{code} ({where})" for code, where in codes.items() if f"`{code}`" not in table)
    assert missing == [], "codes emitted but not in docs/operations.md section 9"
