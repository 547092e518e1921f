"""Capacity of one protocol gateway process: how many devices it holds at its update rate, and its CPU.

    v2grt bench gateway --protocol ocpp [...]   (OCPP 2.1 charging stations: v2grt/bench/gateway_ocpp.py)
    v2grt bench gateway --protocol sunspec [...]   (SunSpec DER chargers on Modbus TCP: v2grt/bench/gateway_sunspec.py)

Each protocol's rig is a module with ``run(args) -> dict`` (the JSON result) and ``main(argv)`` (its own
options, ``--smoke`` and ``--json``); ``--protocol`` picks it and hands it the rest of the command line
(``v2grt bench gateway --protocol sunspec --help``). The gateway runs as a real process; its CPU is read
from /proc (% of one core); load generators run in other processes and their CPU is shown, not counted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: --protocol NAME -> the module whose main(argv) runs that rig (one line per protocol).
PROTOCOL_RIGS = {
    "ocpp": "v2grt.bench.gateway_ocpp",
    "sunspec": "v2grt.bench.gateway_sunspec",
}
DEFAULT_PROTOCOL = "sunspec"


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(prog="v2grt bench gateway", description=__doc__.splitlines()[0], add_help=False)
    pre.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=sorted(PROTOCOL_RIGS),
                     help=f"whose gateway (default {DEFAULT_PROTOCOL}); `--protocol NAME --help` for its options")
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.help:
        rest = [*rest, "--help"]
        if "--protocol" not in (argv or sys.argv[1:]):
            pre.print_help()
            print()
    return int(importlib.import_module(PROTOCOL_RIGS[known.protocol]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
