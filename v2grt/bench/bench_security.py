"""What CURVE + ZAP cost: setpoint publish to N gateways, a control round trip, connecting, revoking.

    v2grt bench security [--gateways 20] [--nodes 500] [--cycles 400] [--period-ms 20] [--json]
    v2grt bench security --revocation-only --period-ms 100 --repeats 8 [--reconnect-ivl-ms 100 10]

Plain and secured sockets run side by side in one run: two setpoint publishers (a PUB, and the
aggregator's secured XPUB with its ZAP handler, key checks and subscription policy, exactly as
security.enabled builds them) publish the same messages in alternating blocks of cycles, to N gateway
subscribers each (one key per gateway) in a child process, so the receivers' Python does not share
this process's GIL. Reported per mode:

- publish phase: encode + send of the N messages on the publishing thread, plus (secured) admitting
  subscriptions; CURVE encrypts in libzmq's I/O thread, so this barely moves;
- process CPU per cycle: this process's CPU time per cycle over the mode's blocks (it includes the
  I/O thread's encryption, which the publish phase does not see);
- setpoint latency: send to receipt and decode at the gateway (CLOCK_MONOTONIC in both processes);
- control round trip: a `status`-sized request and reply, REQ to ROUTER (secured: the per-message
  identity check too); connect: a new client's connect, handshake (ZAP) and first round trip;
- revocation: how long after `keys_reload` a revoked key's subscriber still received, and the longest
  pause the other gateways' subscribers saw while the setpoint socket dropped and re-admitted them;
- crypto per message size: CPU per message of one PUSH/PULL pair in this process (encrypt and
  decrypt both counted), plain vs CURVE, 1 KB to 100 KB: what CURVE costs per byte on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

from v2grt.bench._common import add_smoke_option, apply_smoke, emit, machine, stats_ms, table

MODES = ("plain", "curve")


# ---------------------------------------------------------------------------------------------------
# the child process: N gateway subscribers per mode


def _subscribers_main(conn) -> None:
    import zmq

    from v2grt import security
    from v2grt.io import bus

    setup = conn.recv()
    ctx = zmq.Context()
    subs = {}
    for mode in MODES:
        for g in range(setup["gateways"]):
            gw = f"gw{g + 1}"
            curve = security.client_curve(setup["keys"], gw, setup["server_key"]) if mode == "curve" else None
            subs[(mode, g)] = bus.GatewaySubscriber(ctx, setup["endpoints"][mode], gw, curve=curve)
    poller = zmq.Poller()
    owner = {}
    for key, sub in subs.items():
        poller.register(sub.sock, zmq.POLLIN)
        owner[sub.sock] = key
    records = []  # (mode index, gateway index, seq, t_recv_ns)
    seen = set()
    ready_sent = False
    while True:
        if conn.poll():
            if conn.recv() == "done":
                break
        for sock, _ in poller.poll(20):
            mode, g = owner[sock]
            msg = subs[(mode, g)].recv(0)
            if msg is None:
                continue
            t = time.monotonic_ns()
            records.append((MODES.index(mode), g, msg.seq, t))
            seen.add((mode, g))
        if not ready_sent and len(seen) == len(subs):
            conn.send("ready")
            ready_sent = True
    conn.send(np.array(records, dtype=np.int64))
    for sub in subs.values():
        sub.close()
    ctx.term()


# ---------------------------------------------------------------------------------------------------
# the secured side, as the aggregator builds it


def _server_security(tmp: Path, gateways: int, ctx):
    from v2grt import security
    from v2grt.config import SecurityConfig

    keys, auth = tmp / "keys", tmp / "authorized"
    security.generate_keypair("aggregator", keys)
    for g in range(gateways):
        security.generate_keypair(f"gw{g + 1}", keys)
        security.authorize_key(keys / f"gw{g + 1}.key", f"gateway:gw{g + 1}", auth)
    for name in ("op", "op2"):
        security.generate_keypair(name, keys)
        security.authorize_key(keys / f"{name}.key", f"operator:{name}", auth)
    cfg = types.SimpleNamespace(
        security=SecurityConfig(enabled=True, server_secret_key=str(keys / "aggregator.key_secret"),
                                authorized_keys=str(auth), allow=["127.0.0.0/8"]),
        resolve=lambda p: Path(p))
    return security.server_for(cfg, ctx), keys, auth


def measure_setpoints(sec, keys, ctx, child, gateways: int, nodes: int, cycles: int, period_ns: int,
                      block: int) -> dict:
    from v2grt.io import bus, wire

    pubs = {"plain": bus.SetpointPublisher(ctx, "tcp://127.0.0.1:*"),
            "curve": bus.SetpointPublisher(ctx, "tcp://127.0.0.1:*", **sec.bus_options("setpoints"))}
    proc, parent = child
    parent.send({"gateways": gateways, "keys": str(keys), "server_key": str(keys / "aggregator.key"),
                 "endpoints": {m: p.endpoint for m, p in pubs.items()}})
    ids = [wire.join_ids(f"EV_{g:03d}_{i:05d}" for i in range(nodes)) for g in range(gateways)]
    p_kw = np.random.default_rng(0).uniform(-11, 11, nodes)
    rs = np.zeros(nodes, np.uint8)
    t_send = {m: np.zeros((cycles * 2 + 2000, gateways), np.int64) for m in MODES}
    publish_ns = {m: [] for m in MODES}
    cpu_ns = {m: 0 for m in MODES}
    counted = {m: 0 for m in MODES}

    def publish(mode: str, seq: int, record: bool) -> None:
        pub = pubs[mode]
        t0 = time.monotonic_ns()
        if mode == "curve":
            pub.admit_subscriptions()  # the cycle hook's share of the secured cycle
        now = time.time_ns()
        for g in range(gateways):
            t_send[mode][seq, g] = time.monotonic_ns()
            pub.send(wire.encode_setpoints(f"gw{g + 1}", 1, seq, now, now + 500_000_000, False, ids[g], p_kw, rs))
        if record:
            publish_ns[mode].append(time.monotonic_ns() - t0)

    seq = 0
    deadline = time.monotonic_ns()
    warm_until = time.monotonic() + 20.0
    while not parent.poll():  # warm-up: until every subscriber of both modes has a message
        if time.monotonic() > warm_until:
            raise SystemExit("subscribers did not all receive within 20 s")
        seq += 1
        for mode in MODES:
            publish(mode, seq, False)
        deadline += period_ns
        time.sleep(max(0.0, (deadline - time.monotonic_ns()) / 1e9))
    parent.recv()
    first_seq = seq + 1
    for b in range(2 * cycles // block):
        mode = MODES[b % 2]
        c0 = time.process_time_ns()
        for _ in range(block):
            seq += 1
            publish(mode, seq, True)
            deadline += period_ns
            time.sleep(max(0.0, (deadline - time.monotonic_ns()) / 1e9))
        cpu_ns[mode] += time.process_time_ns() - c0
        counted[mode] += block
    time.sleep(0.2)
    parent.send("done")
    records = parent.recv()
    proc.join(5)
    for p in pubs.values():
        p.close()
    lat = {m: [] for m in MODES}
    sel = records[:, 2] >= first_seq
    for mi, g, s, t in records[sel]:
        mode = MODES[mi]
        if t_send[mode][s, g]:
            lat[mode].append(int(t - t_send[mode][s, g]))
    expected = {m: counted[m] * gateways for m in MODES}
    return {m: {"publish": stats_ms(publish_ns[m]), "cpu_ms_per_cycle": cpu_ns[m] / counted[m] / 1e6,
                "latency": stats_ms(lat[m]), "delivered": len(lat[m]), "expected": expected[m]} for m in MODES}


def measure_control(sec, keys, ctx, calls: int, connects: int) -> dict:
    import zmq

    from v2grt import security
    from v2grt.io import bus

    status = {"fleet": "bench", "vehicles": 10000, "target_kw": 1234.5, "estop": False,
              "loop": {"cycles": 1, "p99_ms": 1.0}}
    servers = {"plain": bus.ControlServer(ctx, "tcp://127.0.0.1:*", lambda r: status),
               "curve": bus.ControlServer(ctx, "tcp://127.0.0.1:*", lambda r: status, **sec.bus_options("control"))}
    stop = threading.Event()

    def serve():  # the bus thread: owns both servers
        poller = zmq.Poller()
        for s in servers.values():
            poller.register(s.sock, zmq.POLLIN)
        while not stop.is_set():
            for sock, _ in poller.poll(50):
                next(s for s in servers.values() if s.sock is sock).serve_once(0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = zmq.Context()  # clients in their own context: no ZAP handler, as on a real client
    curve = security.client_curve(keys, "op", keys / "aggregator.key")
    rtt = {m: [] for m in MODES}
    connect = {m: [] for m in MODES}
    try:
        clients = {m: bus.ControlClient(client_ctx, servers[m].endpoint, curve=curve if m == "curve" else None)
                   for m in MODES}
        for m in MODES:
            assert clients[m].call("status").ok
        for i in range(calls):
            for m in (MODES if i % 2 else MODES[::-1]):
                t0 = time.perf_counter_ns()
                clients[m].call("status")
                rtt[m].append(time.perf_counter_ns() - t0)
        for c in clients.values():
            c.close()
        other = security.client_curve(keys, "op2", keys / "aggregator.key")
        for _ in range(connects):
            for m in MODES:
                t0 = time.perf_counter_ns()
                with bus.ControlClient(client_ctx, servers[m].endpoint, curve=other if m == "curve" else None) as c:
                    c.call("status")
                connect[m].append(time.perf_counter_ns() - t0)
    finally:
        stop.set()
        thread.join(2)
        for s in servers.values():
            s.close()
        client_ctx.term()
    return {m: {"round_trip": stats_ms(rtt[m]), "connect": stats_ms(connect[m])} for m in MODES}


def measure_revocation(repeats: int, period_s: float, reconnect_ivl_ms: int | None = None) -> dict:
    """A real secured Aggregator; per repeat: revoke one gateway's key, keys_reload, watch both subscribers.

    ``reconnect_ivl_ms``: the gateways' ZMQ_RECONNECT_IVL for this run (bus.RECONNECT_IVL_MS otherwise),
    to compare settings side by side.
    """
    import zmq

    from v2grt import security
    from v2grt.aggregator import Aggregator
    from v2grt.config import REVOCATION_PAUSE_PERIODS, REVOCATION_RECONNECT_S, config_from_dict
    from v2grt.fleet import Fleet
    from v2grt.io import bus

    # The default expiry (three periods), or the shortest one a secured config accepts where that is longer
    # (below a 100 ms period: two periods and a reconnect, which the revocation's pause needs).
    ttl_s = max(3 * period_s, REVOCATION_PAUSE_PERIODS * period_s + REVOCATION_RECONNECT_S)
    tail_ms, gap_ms, drop_gap_ms, rebind_ms = [], [], [], []
    shipped_ivl_ms = bus.RECONNECT_IVL_MS
    if reconnect_ivl_ms is not None:
        bus.RECONNECT_IVL_MS = reconnect_ivl_ms  # read when each socket is made
    with tempfile.TemporaryDirectory() as tmp:
        keys, auth = Path(tmp) / "keys", Path(tmp) / "auth"
        for name in ("aggregator", "op", "gw1"):
            security.generate_keypair(name, keys)
        security.authorize_key(keys / "op.key", "operator:op", auth)
        security.authorize_key(keys / "gw1.key", "gateway:gw1", auth)
        cfg = config_from_dict({
            "period_s": period_s, "budget_s": period_s, "meter": None, "state_dir": tmp,
            "realtime": {"mlockall": False, "gc_freeze": False},
            "bus": {k: "tcp://127.0.0.1:*" for k in ("setpoints", "telemetry", "control")}
                   | {"setpoint_ttl_s": ttl_s},
            "service": {"name": "dc", "capacity_kw": 100.0}, "fleet": {"random": 2000},
            "security": {"enabled": True, "server_secret_key": str(keys / "aggregator.key_secret"),
                         "authorized_keys": str(auth)}})
        agg = Aggregator(cfg, epoch=1, fleet=Fleet.random(2000, seed=1, n_gateways=4))
        agg.start()
        ctx = zmq.Context()
        try:
            agg.first_cycle.wait(5)
            op = bus.ControlClient(ctx, agg.control.endpoint, curve=security.client_curve(keys, "op",
                                                                                          keys / "aggregator.key"))
            keep = bus.GatewaySubscriber(ctx, agg.publisher.endpoint, "gw1",
                                         curve=security.client_curve(keys, "gw1", keys / "aggregator.key"))
            for r in range(repeats):
                name = f"gw1-old{r}"
                security.generate_keypair(name, keys)
                security.authorize_key(keys / f"{name}.key", "gateway:gw1", auth)
                assert op.call("keys_reload").ok
                victim = bus.GatewaySubscriber(ctx, agg.publisher.endpoint, "gw1",
                                               curve=security.client_curve(keys, name, keys / "aggregator.key"))
                end = time.monotonic() + 3
                while not (victim.recv(5) and keep.recv(5)) and time.monotonic() < end:
                    pass
                security.revoke_key(name, auth)
                t0 = time.monotonic()
                assert op.call("keys_reload").ok
                last_victim = last_keep = t0
                gap = 0.0
                arrivals = [(t0, 0)]
                while time.monotonic() < t0 + 1.0:
                    now = time.monotonic()
                    if victim.recv(1) is not None:
                        last_victim = now
                    if (msg := keep.recv(1)) is not None:
                        gap, last_keep = max(gap, now - last_keep), now
                        arrivals.append((now, msg.seq))
                tail_ms.append((last_victim - t0) * 1e3)
                gap_ms.append(gap * 1e3)
                # the pause across the drop (last message published before it to the first after it): what
                # the revocation costs, apart from the pauses a loaded machine causes anyway
                last_before = agg.security.last_rebind_seq or 0
                after = next((i for i, (_, seq) in enumerate(arrivals) if seq > last_before), None)
                drop_gap_ms.append((arrivals[after][0] - arrivals[after - 1][0]) * 1e3 if after else float("nan"))
                rebind_ms.append(agg.security.last_rebind_ms.get("setpoints", float("nan")))
                victim.close()
            op.close()
            keep.close()
        finally:
            ctx.term()
            agg.stop()
            bus.RECONNECT_IVL_MS = shipped_ivl_ms
    return {"repeats": repeats, "period_ms": period_s * 1e3, "revoked_received_for_ms": tail_ms,
            "kept_max_gap_ms": gap_ms, "kept_gap_across_drop_ms": drop_gap_ms, "rebind_ms": rebind_ms,
            "delay_ms": 1e3 * security.REBIND_DELAY_S["setpoints"],
            "reconnect_ivl_ms": reconnect_ivl_ms if reconnect_ivl_ms is not None else shipped_ivl_ms,
            "setpoint_ttl_ms": cfg.bus.setpoint_ttl_s * 1e3}


def measure_crypto(sizes=(1_000, 10_000, 100_000), n: int = 2000) -> dict:
    """CPU per message (us) of a PUSH -> PULL pair on loopback, plain and CURVE, per message size."""
    import zmq

    out = {}
    for size in sizes:
        row = {}
        for mode in MODES:
            ctx = zmq.Context()
            pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            if mode == "curve":
                server_public, server_secret = zmq.curve_keypair()
                client_public, client_secret = zmq.curve_keypair()
                pull.curve_server, pull.curve_secretkey = 1, server_secret
                push.curve_serverkey, push.curve_publickey, push.curve_secretkey = (server_public, client_public,
                                                                                    client_secret)
            pull.bind("tcp://127.0.0.1:*")
            push.connect(pull.last_endpoint)
            msg = b"\x5a" * size
            push.send(msg)
            pull.recv()
            c0 = time.process_time_ns()
            for _ in range(n):
                push.send(msg)
                pull.recv(copy=False)
            row[mode] = (time.process_time_ns() - c0) / n / 1e3
            push.close(0)
            pull.close(0)
            ctx.term()
        out[size] = row
    return out


def run(gateways: int, nodes: int, cycles: int, period_ms: float, block: int, calls: int, repeats: int) -> dict:
    import zmq

    # the subscribers' process is forked before this process has any zmq context or thread
    mp = multiprocessing.get_context("fork")
    parent, child_end = mp.Pipe()
    proc = mp.Process(target=_subscribers_main, args=(child_end,), daemon=True)
    proc.start()
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        sec, keys, _auth = _server_security(Path(tmp), gateways, ctx)
        try:
            sp = measure_setpoints(sec, keys, ctx, (proc, parent), gateways, nodes, cycles, int(period_ms * 1e6),
                                   block)
            ctl = measure_control(sec, keys, ctx, calls, max(10, calls // 50))
        finally:
            sec.stop()
            ctx.term()
    rev = measure_revocation(repeats, period_ms / 1e3) if repeats else None
    return {"bench": "security", "machine": machine(), "gateways": gateways, "nodes_per_gateway": nodes,
            "cycles_per_mode": cycles, "period_ms": period_ms, "block": block, "setpoints": sp, "control": ctl,
            "revocation": rev, "crypto_us_per_msg": measure_crypto()}


def render(r: dict) -> str:
    sp, ctl = r["setpoints"], r["control"]
    rows = []

    def row(name, a, b, key_p50="p50_ms", key_p99="p99_ms"):
        rows.append([name, a[key_p50], a[key_p99], b[key_p50], b[key_p99], b[key_p50] - a[key_p50],
                     b[key_p99] - a[key_p99]])

    row("publish phase, ms/cycle", sp["plain"]["publish"], sp["curve"]["publish"])
    row("setpoint latency, ms", sp["plain"]["latency"], sp["curve"]["latency"])
    row("control round trip, ms", ctl["plain"]["round_trip"], ctl["curve"]["round_trip"])
    row("connect + handshake + 1st reply, ms", ctl["plain"]["connect"], ctl["curve"]["connect"])
    cpu = [sp[m]["cpu_ms_per_cycle"] for m in MODES]
    out = [f"CURVE + ZAP cost: {r['gateways']} gateways x {r['nodes_per_gateway']} nodes, {r['cycles_per_mode']} "
           f"cycles per mode every {r['period_ms']:g} ms, alternating blocks of {r['block']} "
           f"({r['machine']['cpu']}, {r['machine']['cores']} cores)",
           table(["", "plain p50", "plain p99", "CURVE p50", "CURVE p99", "+p50", "+p99"], rows),
           f"process CPU per cycle (incl. libzmq I/O thread): plain {cpu[0]:.3f} ms, CURVE {cpu[1]:.3f} ms "
           f"(+{cpu[1] - cpu[0]:.3f} ms)",
           "setpoints delivered: " + ", ".join(f"{m} {sp[m]['delivered']}/{sp[m]['expected']}" for m in MODES)]
    crypto = r.get("crypto_us_per_msg") or {}
    if crypto:
        out.append("CPU per message, encrypt + decrypt (one PUSH/PULL pair): " + "; ".join(
            f"{int(size) // 1000} KB plain {c['plain']:.1f} us, CURVE {c['curve']:.1f} us "
            f"(+{c['curve'] - c['plain']:.1f})" for size, c in crypto.items()))
    if r.get("revocation"):
        out.append(render_revocation(r["revocation"]))
    return "\n".join(out)


def render_revocation(rev: dict) -> str:
    gaps, drop = rev["kept_max_gap_ms"], rev.get("kept_gap_across_drop_ms") or [float("nan")]
    return (f"revocation ({rev['repeats']} repeats, period {rev['period_ms']:g} ms, gateway reconnect interval "
            f"{rev['reconnect_ivl_ms']} ms, drop scheduled {rev['delay_ms']:g} ms after keys_reload): revoked key "
            f"received for max {max(rev['revoked_received_for_ms']):.0f} ms after the reload; the kept gateway's "
            f"pause across the drop max {np.nanmax(drop):.0f} ms, p50 {np.nanmedian(drop):.0f} ms; its longest "
            f"pause in the 1 s after the reload max {max(gaps):.0f} ms, p50 {np.median(gaps):.0f} ms "
            f"(setpoint expiry {rev['setpoint_ttl_ms']:g} ms: margin {rev['setpoint_ttl_ms'] - max(gaps):.0f} ms); "
            f"unbind+bind max {np.nanmax(rev['rebind_ms']):.2f} ms")


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"gateways": 2, "nodes": 50, "cycles": 20, "block": 10, "calls": 50, "repeats": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench security", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateways", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=500, help="nodes per gateway")
    ap.add_argument("--cycles", type=int, default=400, help="cycles per mode")
    ap.add_argument("--period-ms", type=float, default=20.0)
    ap.add_argument("--block", type=int, default=50, help="cycles per block; the modes alternate blocks")
    ap.add_argument("--calls", type=int, default=2000, help="control round trips per mode")
    ap.add_argument("--repeats", type=int, default=5, help="revocations measured (0: skip)")
    ap.add_argument("--revocation-only", action="store_true",
                    help="only the revocation pause, once per --reconnect-ivl-ms value, at --period-ms")
    ap.add_argument("--reconnect-ivl-ms", type=int, nargs="+", default=None, metavar="MS",
                    help="gateways' ZMQ_RECONNECT_IVL values to compare (default: the shipped one)")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    apply_smoke(ap, a, SMOKE)
    if a.cycles % a.block:
        ap.error("--cycles must be a multiple of --block")
    if a.revocation_only:
        runs = [measure_revocation(a.repeats, a.period_ms / 1e3, ivl) for ivl in (a.reconnect_ivl_ms or [None])]
        emit({"bench": "security-revocation", "machine": machine(), "runs": runs}, a.json,
             lambda r: "\n".join(render_revocation(x) for x in r["runs"]))
        return 0
    emit(run(a.gateways, a.nodes, a.cycles, a.period_ms, a.block, a.calls, a.repeats), a.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
