"""Setpoint sends: every gateway's frame of a cycle onto the PUB, one pyzmq send per frame against one compiled call.

    v2grt bench sends [--nodes 100000] [--gateways 1000] [--repeats 30] [--json]

The frames are the aggregator's own (wire.SetpointFrames for a random fleet of --nodes over --gateways, written
once), the socket its own (bus.SetpointPublisher on loopback TCP, the HWM raised as in `bench cycle`), and a
child process subscribes to every topic and counts what arrives. Interleaved, --repeats times each (a pause
between, so each burst starts with the socket's queue drained): the NumPy twin's path (backend "reference":
one `SetpointPublisher.send` of a bytes copy per frame, the publisher thread's sends before the compiled path)
and the compiled one (`send_frames`: one call without the GIL, `zmq_send` per frame in C). The same messages
either way; the table gives p50, p99 and max of a whole cycle's sends, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import zmq

from v2grt.bench._common import (
    World,
    add_smoke_option,
    apply_smoke,
    catch_all_hwm,
    emit,
    machine,
    source_state,
    stats_ms,
    table,
)
from v2grt.fleet import Fleet
from v2grt.io import bus, wire

PAUSE_S = 0.05  # between bursts: the subscriber drains the last one


def measure(n: int, gateways: int, repeats: int) -> dict:
    fleet = Fleet.random(n, seed=0, n_gateways=gateways, now_ns=0)
    layout = [(gw, wire.join_ids(fleet.node_ids[r] for r in fleet.gateway_rows(gw))) for gw in fleet.gateway_ids
              if len(fleet.gateway_rows(gw))]
    paths = {backend: wire.SetpointFrames(layout, backend=backend) for backend in ("reference", "cython")}
    rows = np.concatenate([fleet.gateway_rows(gw) for gw, _ in layout]).astype(np.int64)
    setpoints_kw, reasons = np.linspace(-10.0, 10.0, fleet.n_rows), np.zeros(fleet.n_rows, np.uint8)
    for frames in paths.values():
        frames.write(setpoints_kw, reasons, rows, 1, 1, 10, 20, False)
    ctx = zmq.Context(io_threads=2)
    samples: dict[str, list[int]] = {backend: [] for backend in paths}
    with World(meter_model=None) as world:
        pub = bus.SetpointPublisher(ctx, "tcp://127.0.0.1:*", sndhwm=catch_all_hwm(len(layout)))
        try:
            world.connect(pub.endpoint)
            time.sleep(0.5)  # the subscription reaches the PUB
            rx0 = world.call("counters")["sp_frames"]
            for _ in range(repeats):
                for backend, frames in paths.items():
                    t0 = time.perf_counter_ns()
                    pub.send_frames(frames)
                    samples[backend].append(time.perf_counter_ns() - t0)
                    time.sleep(PAUSE_S)
            time.sleep(0.5)
            received = world.call("counters")["sp_frames"] - rx0
            dropped = pub.dropped
        finally:
            pub.close()
            ctx.term()
    out = {backend: stats_ms(v) for backend, v in samples.items()}
    return {"nodes": n, "gateways": len(layout), "repeats": repeats, "frame_bytes_mean": len(paths["cython"].buffer)
            / max(len(layout), 1), "sends": out, "p50_ratio": out["reference"]["p50_ms"] / out["cython"]["p50_ms"],
            "frames_expected": 2 * repeats * len(layout), "frames_received": int(received),
            "frames_refused": int(dropped)}


def render(r: dict) -> str:
    m, x = r["machine"], r["result"]
    rows = [[name, s["p50_ms"], s["p99_ms"], s["max_ms"]] for name, s in
            (("pyzmq send per frame (reference)", x["sends"]["reference"]),
             ("one compiled call (cython)", x["sends"]["cython"]))]
    return "\n".join([
        f"one cycle's setpoint frames onto a PUB (loopback TCP, a subscriber in another process) on {m['cpu']} "
        f"({m['cores']} cores): {x['gateways']} gateways, {x['nodes']} nodes, {x['frame_bytes_mean']:.0f} bytes a "
        f"frame, {x['repeats']} cycles each, interleaved",
        table(["path", "p50 ms", "p99 ms", "max ms"], rows),
        f"ratio of the medians {x['p50_ratio']:.1f}x; frames received {x['frames_received']}/{x['frames_expected']}, "
        f"refused by the socket {x['frames_refused']}",
    ])


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"nodes": 2000, "gateways": 10, "repeats": 3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench sends", description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30, help="cycles sent per path (interleaved)")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    result = measure(args.nodes, args.gateways, args.repeats)
    emit({"benchmark": "sends", "machine": machine(), "source": source_state(), "result": result}, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
