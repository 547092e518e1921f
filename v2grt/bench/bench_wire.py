"""Wire codec benchmark: setpoint and telemetry encode/decode against per-node msgpack, side by side.

    v2grt bench wire [--sizes 500,10000] [--calls N] [--json]

For each gateway size, in one run: encode_setpoints (float64 setpoints in, as the kernel produces
them), decode_setpoints with the ids cache warm (every cycle but the first after a roster change) and
cold, encode_telemetry and decode_telemetry with every optional key, and the naive alternative the
wire avoids (one msgpack tuple per node) as the yardstick.
"""

from __future__ import annotations

import argparse
import sys
import time

import msgpack
import numpy as np

from v2grt.bench._common import add_smoke_option, apply_smoke, emit, machine, stats_ms, table
from v2grt.io import wire

T_NS = 1_700_000_000_000_000_000


def _time(fn, calls: int) -> dict:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return stats_ms(samples)


def measure(n: int, calls: int, rng: np.random.Generator) -> dict:
    """Time every codec path for one gateway of ``n`` nodes."""
    node_ids = [f"EV_NODE_{i:07d}" for i in range(n)]
    ids = wire.join_ids(node_ids)
    p = rng.uniform(-11, 11, n)
    r = np.zeros(n, np.uint8)
    sp = wire.encode_setpoints("gw1", 1, 0, T_NS, T_NS + 10**9, False, ids, p, r)

    def f4(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype("<f4")

    tel = wire.encode_telemetry("gw1", 0, T_NS, ids, f4(0, 1), f4(-11, 11), np.ones(n, "u1"),
                                np.zeros(n, "u1"), soh=f4(0.7, 1), temp_c=f4(0, 40),
                                p_dis_max_kw=f4(0, 11), p_chg_max_kw=f4(0, 11), v_dc=f4(300, 800),
                                cycle_count=f4(0, 3000), cabin_temp_c=f4(0, 30))
    rows = list(zip(node_ids, p.tolist(), r.tolist()))

    def cold() -> None:
        wire._ids_cache.clear()  # a roster change: ids parsed and checked again
        wire.decode_setpoints(sp)

    few = max(calls // 10, 5)
    return {
        "n": n, "setpoint_bytes": len(sp), "telemetry_bytes": len(tel),
        "encode_setpoints": _time(lambda: wire.encode_setpoints("gw1", 1, 0, T_NS, T_NS + 10**9, False, ids,
                                                                p, r), calls),
        "decode_setpoints": _time(lambda: wire.decode_setpoints(sp), calls),
        "decode_setpoints_cold": _time(cold, few),
        "encode_telemetry": _time(lambda: wire.encode_telemetry("gw1", 0, T_NS, ids, p, p, r, r), calls),
        "decode_telemetry": _time(lambda: wire.decode_telemetry(tel), calls),
        "per_node_msgpack": _time(lambda: msgpack.packb(rows), few),
    }


def run(sizes: list[int], calls: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    results = [measure(n, calls, rng) for n in sizes]
    wire._ids_cache.clear()
    return {"machine": machine(), "results": results}


def render(result: dict) -> str:
    headers = ["nodes", "sp bytes", "enc sp us", "dec sp us", "dec sp cold us", "enc tel us", "dec tel us",
               "per-node msgpack us"]
    us = lambda r, k: 1000 * r[k]["p50_ms"]
    rows = [[r["n"], r["setpoint_bytes"], us(r, "encode_setpoints"), us(r, "decode_setpoints"),
             us(r, "decode_setpoints_cold"), us(r, "encode_telemetry"), us(r, "decode_telemetry"),
             us(r, "per_node_msgpack")] for r in result["results"]]
    m = result["machine"]
    return (f"wire codec (p50 per call) on {m['cpu']} ({m['cores']} cores), python {m['python']}\n"
            + table(headers, rows))


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"sizes": "500", "calls": 50}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench wire", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,10000", help="comma-separated nodes per gateway")
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per measurement")
    ap.add_argument("--seed", type=int, default=0)
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    emit(run([int(s) for s in args.sizes.split(",") if s], args.calls, args.seed), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
