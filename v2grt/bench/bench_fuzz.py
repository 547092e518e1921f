"""Fuzz: issue 10's wire attack on a real `v2grt run`; deadlines, setpoint gaps, memory, log and refusals.

    v2grt bench fuzz [--messages 1000000] [--rate 8000] [--duration-max 240] [--vehicles 10000] [--json]
    v2grt bench fuzz --smoke          # a few seconds: structure and survival, no timing

Every part is a real process on loopback, as in the field:

- the aggregator: `python -m v2grt.cli run` with configs/default.yaml's real-time and bus settings
  (SCHED_FIFO priority, mlockall, gc freeze, switch interval, period, expiry, HWM, log limits), a
  --vehicles roster CSV over --gateways gateways, ephemeral ports, its own engine.log;
- a SunSpec meter (model 213, the benches' World child) whose frequency wanders +-0.15 Hz (inside the alert band);
- --sim-gateways real `v2grt gateway sim` processes (gw1, gw2, ...), each driving its vehicles;
- a stand-in gateway process that subscribes to gw1's setpoints and records every arrival
  (CLOCK_MONOTONIC, and the message's seq and t_ns), and doing nothing else; and one that pushes one
  valid batch a second for every gateway no sim runs, so every vehicle is heard (shared decision 2)
  before and during the attack;
- --fuzzers fuzzer processes sending --messages messages (or until --duration-max) at --rate to the
  telemetry PULL and the control ROUTER, from frames built before the clock starts.

The mix (weights, --mix): malformed msgpack, wrong types, NaN/inf values for real vehicles, 2-frame
multipart messages (garbage + a valid batch), unknown and foreign node ids under real gateway ids,
small valid batches under a new gateway id each time, valid batches, bad control requests. Paced by
time, not weight (each costs the aggregator ~0.1-0.5 s today): --huge-per-s frames of 3.8 MB with
~760,000 node ids and empty arrays (a different id list each time, so no cache can help), and
--bigids-per-s valid batches under a new gateway id each time with a 1 MB id list.

Reported: missed deadlines and budget overruns (the status reply before and after the attack),
setpoint inter-arrival p50/p99/max at the stand-in (quiet window before, and the attack), the
gateway sims' setpoint expiries, aggregator RSS growth (VmRSS), engine.log bytes and lines by
code, bad frames by code (status keys telemetry_errors, telemetry_refused_nodes, control_errors when
present), messages sent by kind and the achieved rate, the round trip of an operator's status
request every 0.5 s during the attack (the path an e-stop takes); PASS/FAIL against issue 10's goal.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from v2grt.bench._common import (
    World,
    add_smoke_option,
    apply_smoke,
    child_env,
    emit,
    machine,
    shipped_config,
    source_state,
    stats_ms,
    table,
)

#: Issue 10's goal, at 10,000 vehicles and >= 1,000,000 messages.
GOAL_RSS_GROWTH_BYTES = 50_000_000
GOAL_LOG_BYTES = 100_000
GOAL_P99_SLACK_MS = 5.0

#: Cheap kinds, sent by weight; the two expensive ones are paced per second (--huge-per-s, --bigids-per-s).
DEFAULT_MIX = {"malformed": 25, "wrong_types": 20, "nan_values": 8, "multipart": 8, "unknown_nodes": 10,
               "new_gateway": 5, "valid": 4, "control_bad": 20}
PACED_KINDS = ("huge_ids", "new_gateway_1mb")
KINDS = tuple(DEFAULT_MIX) + PACED_KINDS

HUGE_IDS = 760_000  # 4 characters + NUL each: 3.8 MB, under wire.MAX_FRAME_BYTES (4 MiB)
BIG_IDS_BYTES = 1 << 20
SUBSCRIBED_GATEWAY = "gw1"


# ---------------------------------------------------------------------------------------------------
# frames (built before the clock starts; the fuzzer only picks, patches a few bytes and sends)

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
GATEWAY_ID_DIGITS = 10


def _b36_id(k: int) -> bytes:
    """The k-th 4-character id (base 36: 1.68 million of them)."""
    return "".join(_B36[(k // 36 ** p) % 36] for p in (3, 2, 1, 0)).encode()


def new_gateway_id(prefix: str, k: int) -> str:
    """The k-th invented gateway id of a fuzzer: fixed width, so it is written into a built frame in place."""
    return f"{prefix}{k % 10 ** GATEWAY_ID_DIGITS:0{GATEWAY_ID_DIGITS}d}"


def huge_frame() -> tuple[bytearray, int]:
    """A 3.8 MB telemetry frame: ~760,000 distinct 4-character ids, empty arrays (LENGTH_MISMATCH once parsed).

    Returns the frame and the offset of its first id: the fuzzer writes an id the frame does not use
    there before each send, so every frame is a new id list and no cache in the receiver skips the work.
    """
    import msgpack

    ids = b"\x00".join("".join(t).encode() for t in itertools.islice(itertools.product(_B36, repeat=4), HUGE_IDS))
    frame = msgpack.packb({"v": 1, "gw": "gw3", "seq": 1, "t_ns": time.time_ns(), "ids": ids, "soc": b"",
                           "p_kw": b"", "online": b"", "fault": b""})
    return bytearray(frame), frame.index(ids[:64])


class _Batches:
    """Telemetry batches with the roster's values for known vehicles: what a healthy gateway reports, so
    that only the fault a kind is about differs (flapping values would fill engine.log with per-vehicle
    events that are not the attack's doing)."""

    def __init__(self, roster: str):
        from v2grt.fleet import Fleet
        from v2grt.io import wire

        self.wire = wire
        self.fleet = Fleet.from_csv(roster)

    def ids_of(self, gw: str) -> list[str]:
        return [self.fleet.node_ids[r] for r in self.fleet.gateway_rows(gw)]

    def values(self, node_ids: list[str]) -> dict[str, np.ndarray]:
        f = self.fleet
        rows = np.array([f.row_of.get(i, -1) for i in node_ids], np.int64)
        known = rows >= 0
        r = np.where(known, rows, 0)
        return {"soc": np.where(known, f.soc[r], 0.5).astype("<f4"), "p_kw": np.zeros(len(rows), "<f4"),
                "online": np.where(known, f.online[r], 1).astype(np.uint8), "fault": np.zeros(len(rows), np.uint8),
                "soh": np.where(known, f.soh[r], 0.95).astype("<f4"),
                "temp_c": np.where(known, f.temp_c[r], 25.0).astype("<f4")}

    def encode(self, gw: str, node_ids: list[str], seq: int = 1, **override) -> bytes:
        v = {**self.values(node_ids), **override}
        return self.wire.encode_telemetry(gw, seq, time.time_ns(), self.wire.join_ids(node_ids), v.pop("soc"),
                                          v.pop("p_kw"), v.pop("online"), v.pop("fault"), **v)


_DROP = object()


def build_frames(roster: str, targets: list[str], foreign_gw: str, seed: int, prefix: str) -> dict:
    """Every kind's frames. `targets`: real gateways no sim runs (their vehicles get valid, NaN and
    multipart batches); `foreign_gw`: a gateway whose vehicles the targets must not report.

    Per kind a list of variants; a variant is bytes (one frame) or a list of frames (one multipart
    message). new_gateway and new_gateway_1mb hold (frame, offset): the fuzzer writes a new gateway id
    (new_gateway_id) at offset for every send; huge_ids holds (frame, offset of its first id).
    """
    import msgpack

    rng = np.random.default_rng(seed)
    b = _Batches(roster)
    per_gw = {gw: b.ids_of(gw) for gw in [*targets, foreign_gw]}
    valid = [b.encode(gw, per_gw[gw], seq=k + 2) for k, gw in enumerate(targets)]

    def garbage(lo=1, hi=300) -> bytes:
        return rng.integers(0, 256, int(rng.integers(lo, hi)), dtype=np.uint8).tobytes()

    malformed = [b"", b"\xc1", b"\xdf\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xc7\x05\x01abcde",
                 msgpack.packb([1, 2, 3]), msgpack.packb(42), msgpack.packb("telemetry"), msgpack.packb(None),
                 msgpack.packb({1: 2}), msgpack.packb({"v": 1, "nested": [[[[{}]]]] * 300}),
                 msgpack.packb({f"k{i}": i for i in range(100)})]
    malformed += [v[: int(rng.integers(1, len(v)))] for v in (valid * 20)[:20]]  # truncated
    malformed += [garbage() for _ in range(40)]

    good = msgpack.unpackb(valid[0], raw=False)
    ids0 = per_gw[targets[0]]

    def variant(**changes) -> bytes:
        m = dict(good)
        for k, v in changes.items():
            if v is _DROP:
                m.pop(k, None)
            else:
                m[k] = v
        return msgpack.packb(m)

    wrong_types = [variant(v=2), variant(v="1"), variant(gw=17), variant(gw=""), variant(gw="bad id"),
                   variant(gw="x" * 65), variant(seq=-1), variant(seq="7"), variant(t_ns=1.5), variant(t_ns=-5),
                   variant(ids="EV_NODE_1"), variant(ids=ids0[:200]), variant(ids=b"\xff\xfe\x00bad"),
                   variant(ids=b"dup\x00dup"), variant(ids=b"a b\x00c"), variant(soc=[0.5] * 10),
                   variant(soc=b"\x00\x00"), variant(online=1), variant(fault="none"), variant(p_kw=None),
                   variant(soc=_DROP), variant(ids=_DROP), variant(gw=_DROP), variant(soh=b"\x00" * 3),
                   variant(temp_c=[20.0])]

    # NaN/inf for real vehicles: the same three per gateway every time (a broken BMS is a few vehicles)
    nan_values = []
    for gw in targets:
        ids = per_gw[gw]
        v = b.values(ids)
        v["soc"][0], v["p_kw"][1], v["temp_c"][2] = np.nan, np.inf, -np.inf
        nan_values.append(b.encode(gw, ids, **{k: v[k] for k in ("soc", "p_kw", "temp_c")}))

    multipart = [[garbage(1, 64), f] for f in valid] + [[f, garbage(1, 64)] for f in valid[:4]]

    foreign = per_gw[foreign_gw]
    unknown_nodes = []
    for k, gw in enumerate(targets):
        ghosts = [f"GHOST_{k}_{i}" for i in range(8)]
        unknown_nodes.append(b.encode(gw, ghosts))
        unknown_nodes.append(b.encode(gw, foreign[k * 4 % len(foreign):][:4]))
        unknown_nodes.append(b.encode(gw, per_gw[gw][:5] + ghosts[:3]))

    small_id, big_id = new_gateway_id(prefix, 0), new_gateway_id(prefix.upper(), 0)
    new_gw = b.encode(small_id, [f"NEWGW_NODE_{i}" for i in range(4)])
    n_big = BIG_IDS_BYTES // 12
    big = b.encode(big_id, [f"UNK_{i:07d}" for i in range(n_big)])  # 11 characters + NUL: 1 MB of ids

    control_bad = [[b"", p] for p in (
        b"", b"\x93\x01\x02\x03", garbage(), msgpack.packb({"v": 1}), msgpack.packb({"v": 1, "cmd": "nuke"}),
        msgpack.packb({"v": 2, "cmd": "status"}), msgpack.packb({"v": 1, "cmd": 5}),
        msgpack.packb({"v": 1, "cmd": "status", "args": [1]}),
        msgpack.packb({"v": 1, "cmd": "status", "args": {"verbose": True}}),
        msgpack.packb({"v": 1, "cmd": "test_discharge", "args": {"node_id": "NOBODY", "kw": "ten", "seconds": 1}}),
        msgpack.packb({"v": 1, "cmd": "test_discharge", "args": {"node_id": "NOBODY_HERE", "kw": 5.0,
                                                                "seconds": 1.0}}),
        msgpack.packb({"v": 1, "cmd": "telemetry_profile", "args": {"name": "turbo"}}),
        msgpack.packb({"v": 1, "cmd": "estop", "args": {"reason": 7}}),
        msgpack.packb({"v": 1, "cmd": "status", "id": -1}), msgpack.packb({"v": 1, "cmd": "status", "id": "x" * 99}),
        msgpack.packb({"v": 1, "cmd": "keys_reload", "args": {"x": 1}}),
    )]
    control_bad.append([b""] * 12 + [msgpack.packb({"v": 1, "cmd": "status"})])  # routing envelope too long
    control_bad.append([b"x" * 300, b"", msgpack.packb({"v": 1, "cmd": "nuke"})])

    return {
        "malformed": malformed, "wrong_types": wrong_types, "nan_values": nan_values, "multipart": multipart,
        "unknown_nodes": unknown_nodes, "valid": valid, "control_bad": control_bad,
        "new_gateway": [(bytearray(new_gw), new_gw.index(small_id.encode()))],
        "new_gateway_1mb": [(bytearray(big), big.index(big_id.encode()))],
        "huge_ids": [huge_frame()],
    }


# ---------------------------------------------------------------------------------------------------
# child processes: the stand-in gateway (subscriber) and the fuzzer


def _child(kind: str, spec: dict, *, stdin=subprocess.PIPE) -> subprocess.Popen:
    code = "from v2grt.bench.bench_fuzz import child_main; child_main()"
    return subprocess.Popen([sys.executable, "-c", code, kind, json.dumps(spec)], stdin=stdin,
                            stdout=subprocess.PIPE, text=True, env=child_env())


def child_main() -> None:
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    out = {"subscriber": subscriber_main, "fuzzer": fuzzer_main}[kind](spec)
    print(json.dumps(out), flush=True)


def _try_fifo(priority: int) -> str:
    """SCHED_FIFO for this thread (and threads it starts later, e.g. libzmq's I/O thread), if allowed."""
    if priority <= 0:
        return "not asked"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return f"granted ({priority})"
    except (OSError, AttributeError) as exc:
        return f"refused: {exc}"


def subscriber_main(spec: dict) -> dict:
    """The stand-in gateway: record every setpoint message for spec['gateway'] (None: none) and push 1 Hz
    telemetry for spec['standins'], until stdin closes; arrivals go to spec['out'] (.npy: t_arrival_ns, seq, t_ns)."""
    fifo = _try_fifo(spec["priority"])  # before the context: libzmq's I/O thread inherits it
    import zmq

    from v2grt.io import wire

    batches = _Batches(spec["roster"])
    standins = [(gw, batches.ids_of(gw)) for gw in spec["standins"]]
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 10_000  # record everything the aggregator sends to this gateway
    if spec["gateway"] is not None:
        sub.setsockopt(zmq.SUBSCRIBE, wire.setpoint_topic(spec["gateway"]))
        sub.connect(spec["setpoints"])
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.sndhwm = 64
    push.connect(spec["telemetry"])
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    rec = np.zeros((1 << 16, 3), np.int64)
    n, bad, pushed, push_dropped, rounds = 0, 0, 0, 0, 0
    next_push = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_push:  # as a gateway does: the next seq, stamped now
            rounds += 1
            for gw, ids in standins:
                try:
                    push.send(batches.encode(gw, ids, seq=rounds), zmq.NOBLOCK)
                    pushed += 1
                except zmq.Again:
                    push_dropped += 1
            next_push = max(next_push + 1.0, now)
        events = dict(poller.poll(max(1, int((next_push - time.monotonic()) * 1000))))
        if sys.stdin.fileno() in events:
            break
        if sub not in events:
            continue
        while True:
            try:
                frame = sub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            t = time.monotonic_ns()
            try:
                msg = wire.decode_setpoints(frame.buffer)
            except wire.WireError:
                bad += 1
                continue
            if n == len(rec):
                rec = np.concatenate([rec, np.zeros_like(rec)])
            rec[n] = (t, msg.seq, msg.t_ns)
            n += 1
    if spec["out"] is not None:
        np.save(spec["out"], rec[:n])
    sub.close(0)
    push.close(0)
    ctx.term()
    return {"received": n, "bad": bad, "standin_batches": pushed, "standin_dropped": push_dropped, "fifo": fifo}


def fuzzer_main(spec: dict) -> dict:
    """Send spec['messages'] messages (or until spec['duration_max_s']) at spec['rate'] per second."""
    import zmq

    frames = build_frames(spec["roster"], spec["targets"], spec["foreign"], spec["seed"], spec["prefix"])
    rng = np.random.default_rng(spec["seed"] + 1)
    mix = {k: w for k, w in spec["mix"].items() if w > 0}
    cheap = list(mix)
    p = np.array([mix[k] for k in cheap], float)
    p /= p.sum()
    ctx = zmq.Context()
    tel = ctx.socket(zmq.PUSH)
    ctl = ctx.socket(zmq.DEALER)
    for s in (tel, ctl):
        s.linger = 1000  # a stopped fuzzer's last queued frames still reach the aggregator
        s.sndhwm = 1000
    tel.connect(spec["telemetry"])
    ctl.connect(spec["control"])
    time.sleep(0.2)  # connected before the clock starts
    sent = collections.Counter()
    nbytes = collections.Counter()
    replies = 0
    blocked_ns = 0
    counter = itertools.count()
    free_id = itertools.count()  # ids beyond the huge frame's own: a new id list every send

    def send(sock, parts, kind) -> bool:
        nonlocal blocked_ns
        multi = isinstance(parts, list)
        while True:
            try:
                if multi:
                    sock.send_multipart(parts, zmq.NOBLOCK, copy=True)
                else:
                    sock.send(parts, zmq.NOBLOCK, copy=True)
                break
            except zmq.Again:  # the aggregator is not reading: wait (the rate achieved shows it)
                t = time.monotonic_ns()
                sock.poll(50, zmq.POLLOUT)
                blocked_ns += time.monotonic_ns() - t
                if time.monotonic() > t_end:
                    return False
        sent[kind] += 1
        nbytes[kind] += sum(map(len, parts)) if multi else len(parts)
        return True

    def patched(kind):
        buf, at = frames[kind][0]
        gid = new_gateway_id(spec["prefix"] if kind == "new_gateway" else spec["prefix"].upper(), next(counter) + 1)
        buf[at: at + len(gid)] = gid.encode()
        return buf

    total, target, rate = 0, spec["messages"], spec["rate"]
    t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the run
    t_end = t0 + spec["duration_max_s"]
    paced = {"huge_ids": spec["huge_per_s"], "new_gateway_1mb": spec["bigids_per_s"]}
    next_paced = {k: t0 for k, r in paced.items() if r > 0}
    chunk = 64
    stopped = "count"
    while total < target:
        now = time.monotonic()
        if now > t_end:
            stopped = "duration_max"
            break
        for kind, due in next_paced.items():
            if now >= due and total < target:
                if kind == "huge_ids":
                    buf, at = frames[kind][0]
                    buf[at: at + 4] = _b36_id(HUGE_IDS + next(free_id) % (36 ** 4 - HUGE_IDS))
                    ok = send(tel, buf, kind)
                else:
                    ok = send(tel, patched(kind), kind)
                total += ok
                next_paced[kind] = max(due + 1.0 / paced[kind], now)  # behind (the queue was full): no burst
        n = min(chunk, target - total)
        for k, pick in zip(rng.choice(len(cheap), n, p=p), rng.integers(0, 1 << 30, n)):
            kind = cheap[k]
            if kind == "new_gateway":
                parts = patched(kind)
            else:
                variants = frames[kind]
                parts = variants[pick % len(variants)]
            ok = send(ctl if kind == "control_bad" else tel, parts, kind)
            total += ok
            if not ok:
                break
        while True:  # replies to the bad control requests: read and dropped
            try:
                ctl.recv_multipart(zmq.NOBLOCK)
                replies += 1
            except zmq.Again:
                break
        if rate > 0:
            ahead = t0 + total / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    elapsed = time.monotonic() - t0
    t_close = time.monotonic()
    tel.close()
    ctl.close()
    ctx.term()
    return {"sent": dict(sent), "bytes": dict(nbytes), "total": total, "elapsed_s": elapsed, "stopped_by": stopped,
            "blocked_s": blocked_ns / 1e9, "control_replies": replies, "close_s": time.monotonic() - t_close,
            "t0_ns": int(t0 * 1e9)}


# ---------------------------------------------------------------------------------------------------
# the parent: the aggregator, the world, the gateways; before and after


def write_config(tmp: Path, roster: Path, meter_port: int, priority: int | None) -> tuple[Path, dict]:
    """configs/default.yaml as shipped (the package's copy), pointed at this run's roster, meter, state dir and
    ephemeral ports; its discharge profile copied beside it."""
    import yaml

    cfg = yaml.safe_load(shipped_config("default.yaml"))
    cfg["fleet_id"] = "bench-fuzz"
    cfg["state_dir"] = str(tmp / "state")
    profile = tmp / Path(cfg["discharge_profile"]).name
    profile.write_bytes(shipped_config(cfg["discharge_profile"]))
    cfg["discharge_profile"] = str(profile)
    cfg["meter"].update(host="127.0.0.1", port=meter_port)
    cfg["bus"].update(setpoints="tcp://127.0.0.1:*", telemetry="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*")
    cfg["fleet"] = {"roster": str(roster)}
    cfg["log"]["file"] = str(tmp / "engine.log")
    cfg["metrics"]["enabled"] = False
    # The journal stays on as shipped (its writer is part of what is attacked), but its Parquet conversion runs in
    # a child process of its own that may still be writing when the run's temporary directory is removed (seen:
    # "Directory not empty: 'bench-fuzz'" at cleanup); it is not what this bench measures.
    cfg.setdefault("journal", {})["parquet"] = False
    if priority is not None:
        cfg["realtime"]["sched_fifo_priority"] = priority
    path = tmp / "aggregator.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


def _wait_for_line(path: Path, needle: str, proc: subprocess.Popen, timeout_s: float, what: str) -> str:
    """The first line of `path` containing `needle`; RuntimeError naming `what` if proc dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = _find_line(path, needle)
        if line is not None:
            return line
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before logging {needle!r}; see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not log {needle!r} within {timeout_s:.0f} s; see {path}")


def _find_line(path: Path, needle: str) -> str | None:
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                return line
    return None


def _fields(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (/proc/PID/status), bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def status(ctx, endpoint: str, tries: int = 3) -> dict | None:
    """The aggregator's status reply (v2g-cli --status), or None if it did not answer."""
    from v2grt.io import bus, wire

    for _ in range(tries):
        with bus.ControlClient(ctx, endpoint, timeout_ms=5000) as client:
            try:
                reply = client.call("status")
            except wire.WireError:
                continue
            if reply.ok:
                return reply.result
    return None


#: Status maps counted by code (shared decision 5: frames, vehicles, control requests); an absent one is None.
ERROR_KEYS = ("telemetry_errors", "telemetry_refused_nodes", "control_errors")


def status_delta(before: dict, after: dict) -> dict:
    """What the attack changed in the status reply: loop counters, and each error map by code."""
    lb, la = before.get("loop", {}), after.get("loop", {})
    out = {k: int(la.get(k, 0)) - int(lb.get(k, 0)) for k in ("cycles", "missed_deadlines", "budget_overruns",
                                                                 "errors")}
    for key in ERROR_KEYS:
        if key in after:
            b, a = before.get(key) or {}, after[key] or {}
            out[key] = {code: int(a[code]) - int(b.get(code, 0)) for code in sorted(a) if a[code] != b.get(code, 0)}
        else:
            out[key] = None  # not in this version's status reply
    eb, ea = before.get("events", {}), after.get("events", {})
    out["events"] = {code: int(ea[code]) - int(eb.get(code, 0)) for code in sorted(ea)
                     if ea[code] != eb.get(code, 0)}
    return out


def log_slice(path: Path, start: int, end: int | None = None) -> dict:
    """Bytes and lines of a log between two offsets, and lines by code (the word after the level)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read() if end is None else fh.read(end - start)
    codes: collections.Counter[str] = collections.Counter()
    lines = data.splitlines()
    for line in lines:
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[1].isupper():
            codes[parts[2].decode(errors="replace")] += 1
    return {"bytes": len(data), "lines": len(lines), "by_code": dict(codes.most_common())}


def long_gaps(rec: np.ndarray, t_from_ns: int, t_to_ns: int, period_ms: float) -> dict:
    """Setpoint gaps over 1.5 periods in the window: how long, and when (s after the window starts).

    Not matched to the fuzzer's sends: while the aggregator's queue is full a frame waits seconds
    between send and decode, so send times say little about which frame stalled the loop.
    """
    t = rec[(rec[:, 0] >= t_from_ns) & (rec[:, 0] <= t_to_ns), 0]
    gap = np.diff(t)
    long = np.flatnonzero(gap > 1.5 * period_ms * 1e6)
    return {"n": int(len(long)), "gaps_ms": [round(float(gap[i]) / 1e6, 1) for i in long],
            "at_s": [round(float(t[i] - t_from_ns) / 1e9, 3) for i in long]}


def interarrival(rec: np.ndarray, t_from_ns: int, t_to_ns: int) -> dict:
    """Inter-arrival of setpoint messages received in [t_from, t_to] (arrival clock), and what the
    aggregator stamped (t_ns deltas): the second shows publish cadence without the subscriber's delays."""
    w = rec[(rec[:, 0] >= t_from_ns) & (rec[:, 0] <= t_to_ns)]
    if len(w) < 2:
        return {"n": int(len(w))}
    seq_steps = np.diff(w[:, 1])
    return {"arrival": stats_ms(np.diff(w[:, 0])), "published": stats_ms(np.diff(w[:, 2])),
            "messages": int(len(w)), "seq_gaps": int((seq_steps - 1).clip(min=0).sum()),
            "window_s": (t_to_ns - t_from_ns) / 1e9}


class _Procs:
    """Every child process this run started, stopped on the way out (SIGTERM, then SIGKILL), by handle."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def add(self, name: str, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            self.stop(proc, 5.0)


def start_aggregator(tmp: Path, roster: Path, meter_port: int, priority: int | None, procs: _Procs):
    """`v2grt run` on the shipped config; returns its process, endpoints, config and real-time setup."""
    cfg_path, cfg = write_config(tmp, roster, meter_port, priority)
    engine_log = tmp / "engine.log"
    cmd = [sys.executable, "-m", "v2grt.cli", "run", "--config", str(cfg_path), "--log-file", str(engine_log)]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(tmp / "aggregator.stderr", "w") as err:  # the child keeps its own descriptor
        agg = procs.add("aggregator", subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=child_env(),
                                                       cwd=tmp))
    start = _fields(_wait_for_line(engine_log, " START ", agg, 60, "the aggregator"))
    _wait_for_line(engine_log, " READY ", agg, 60, "the aggregator")
    ep = {k: start[k] for k in ("setpoints", "telemetry", "control")}
    rt = dict(m.groups() for m in re.finditer(r"RT_SETUP step=(\S+) granted=(\S+ detail=.*)", engine_log.read_text()))
    return agg, ep, cfg, rt


def start_gateways(tmp: Path, roster: Path, ep: dict, sim_gws: list[str], standins: list[str],
                   subscriber_priority: int, procs: _Procs):
    """The gateway sims and the stand-in; returns the sims' log paths and the stand-in's process."""
    gw_logs = {}
    for gw in sim_gws:
        gw_logs[gw] = tmp / f"gateway-{gw}.log"
        procs.add(gw, subprocess.Popen(
            [sys.executable, "-m", "v2grt.cli", "gateway", "sim", "--roster", str(roster), "--gateway-id", gw,
             "--setpoints", ep["setpoints"], "--telemetry", ep["telemetry"], "--log-file", str(gw_logs[gw])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=tmp))
    # Two processes: the recorder does nothing else, so its arrival stamps are not delayed by its own work
    # (encoding 18 gateways' batches once a second delayed the arrival that came meanwhile by 3-11 ms: one
    # message in ten, at the same phase of every second, which is the p99 of the gaps).
    sub = procs.add("stand-in", _child("subscriber", {
        "gateway": SUBSCRIBED_GATEWAY, "setpoints": ep["setpoints"], "telemetry": ep["telemetry"],
        "roster": str(roster), "standins": [], "out": str(tmp / "arrivals.npy"),
        "priority": subscriber_priority}))
    pusher = procs.add("stand-in telemetry", _child("subscriber", {
        "gateway": None, "setpoints": ep["setpoints"], "telemetry": ep["telemetry"],
        "roster": str(roster), "standins": standins, "out": None, "priority": 0}))
    for gw, path in gw_logs.items():
        _wait_for_line(path, "GATEWAY_START", dict(procs.procs)[gw], 60, f"gateway sim {gw}")
    return gw_logs, sub, pusher


def wait_heard(ctx, control: str, timeout_s: float = 20.0) -> dict:
    """Heard before dispatched: wait until no vehicle waits for its first telemetry (or timeout_s)."""
    t0 = time.monotonic()
    time.sleep(2.5)  # the sims' and the stand-in's first two batches
    while True:
        st = status(ctx, control)
        if st is None:
            raise RuntimeError("the aggregator did not answer status before the attack")
        waiting = int((st.get("nodes_by_reason") or {}).get("TIMEOUT_BMS_RESPONSE", 0))
        if waiting == 0 or time.monotonic() - t0 > timeout_s:
            return {"waited_s": time.monotonic() - t0, "vehicles_unheard_at_start": waiting,
                    "nodes_carrying": st.get("nodes_carrying")}
        time.sleep(0.5)


def attack(args, ep: dict, roster: Path, targets: list[str], foreign: str, procs: _Procs) -> list[dict]:
    """The fuzzer processes, from start to exit; returns each one's report."""
    n_f = args.fuzzers
    fuzzers = [procs.add(f"fuzzer{i}", _child("fuzzer", {
        "telemetry": ep["telemetry"], "control": ep["control"], "roster": str(roster), "targets": targets,
        "foreign": foreign, "seed": args.seed + 100 * i, "prefix": f"fz{i}_", "mix": args.mix,
        "messages": args.messages // n_f + (i < args.messages % n_f), "rate": args.rate / n_f,
        "duration_max_s": args.duration_max, "huge_per_s": args.huge_per_s / n_f,
        "bigids_per_s": args.bigids_per_s / n_f}, stdin=subprocess.DEVNULL)) for i in range(n_f)]
    probe = ControlProbe(ep["control"]).start()
    outs = []
    for f in fuzzers:
        line, _ = f.communicate(timeout=args.duration_max + 120)
        if f.returncode != 0:
            raise RuntimeError(f"a fuzzer process failed with exit code {f.returncode}")
        outs.append(json.loads(line))
    probe.stop()
    return outs, probe.report()


class ControlProbe:
    """An operator's client during the attack: a ``status`` request every PROBE_INTERVAL_S on the control ROUTER
    the fuzzer floods, timed from send to reply. It takes the path an e-stop takes (the ROUTER, the bus
    thread's turn after each cycle, control before telemetry), without latching the fleet at 0 kW."""

    PROBE_INTERVAL_S = 0.5

    def __init__(self, endpoint: str):
        import threading

        self.endpoint = endpoint
        self.rtt_ms: list[float] = []
        self.timeouts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-probe", daemon=True)

    def start(self) -> ControlProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import zmq

        from v2grt.io import bus, wire

        ctx = zmq.Context()
        try:
            with bus.ControlClient(ctx, self.endpoint, timeout_ms=5000) as client:
                while not self._stop.wait(self.PROBE_INTERVAL_S):
                    t0 = time.monotonic_ns()
                    try:
                        client.call("status")
                    except wire.WireError:
                        self.timeouts += 1
                        continue
                    self.rtt_ms.append((time.monotonic_ns() - t0) / 1e6)
        finally:
            ctx.term()

    def report(self) -> dict:
        rtt = np.array(self.rtt_ms)
        return {"requests": len(rtt), "timeouts": self.timeouts,
                **({f"p{q}_ms": float(np.percentile(rtt, q)) for q in (50, 99)} if len(rtt) else {}),
                "max_ms": float(rtt.max()) if len(rtt) else None}


def _rss_or_none(pid: int) -> int | None:
    try:
        return rss_bytes(pid)
    except (OSError, RuntimeError):  # the process is gone
        return None


def run(args) -> dict:
    """The phases: roster, meter and aggregator up; gateways heard; a quiet window; the attack; after."""
    import zmq

    from v2grt.fleet import Fleet
    from v2grt.roster import write_roster

    sim_gws = [f"gw{k + 1}" for k in range(args.sim_gateways)]
    standins = [f"gw{k + 1}" for k in range(args.sim_gateways, args.gateways)]
    if not standins or not sim_gws:
        raise SystemExit("bench fuzz: need at least one simulated gateway and one other (--gateways > --sim-gateways)")
    keep = tempfile.mkdtemp(prefix="v2grt-bench-fuzz-") if args.keep else None
    tmpdir = tempfile.TemporaryDirectory(prefix="v2grt-bench-fuzz-") if keep is None else None
    tmp = Path(keep or tmpdir.name)
    m: dict = {"load_before": os.getloadavg(), "keep": keep}  # what was measured, for report()
    procs = _Procs()
    ctx = zmq.Context()
    try:
        roster = tmp / "roster.csv"
        write_roster(Fleet.random(args.vehicles, seed=args.seed, n_gateways=args.gateways), roster)
        with World(meter_model=213) as world:
            # the frequency wanders inside the alert band (0.2 Hz): the response moves, no alert line is due
            world.connect("tcp://127.0.0.1:1", sink=False, wander_hz=0.15)
            agg, ep, m["cfg"], m["rt"] = start_aggregator(tmp, roster, world.meter_port, args.priority, procs)
            gw_logs, sub, pusher = start_gateways(tmp, roster, ep, sim_gws, standins, args.subscriber_priority,
                                                  procs)
            m["warmup"] = wait_heard(ctx, ep["control"])

            m["t_quiet"] = time.monotonic_ns()
            time.sleep(args.quiet_s)
            m["before"], m["rss0"] = status(ctx, ep["control"]), rss_bytes(agg.pid)
            log0 = (tmp / "engine.log").stat().st_size
            gw_log0 = {gw: p.stat().st_size for gw, p in gw_logs.items()}
            m["t_attack"] = time.monotonic_ns()
            m["outs"], m["control_probe"] = attack(args, ep, roster, standins, sim_gws[0], procs)
            m["t_sent"] = time.monotonic_ns()
            time.sleep(args.settle_s)  # what was queued is processed, its log lines written
            m["t_end"] = time.monotonic_ns()
            m["after"] = status(ctx, ep["control"])
            m["alive"] = agg.poll() is None
            m["rss1"] = _rss_or_none(agg.pid) if m["alive"] else None
            log1 = (tmp / "engine.log").stat().st_size
            gw_log1 = {gw: p.stat().st_size for gw, p in gw_logs.items()}
            m["load_after"] = os.getloadavg()

            m["sub"] = json.loads(sub.communicate(timeout=30)[0] or "{}")  # closing its stdin stops it
            pushed = json.loads(pusher.communicate(timeout=30)[0] or "{}")
            m["sub"].update({k: v for k, v in pushed.items() if k.startswith("standin_")})
            arrivals = tmp / "arrivals.npy"
            m["rec"] = np.load(arrivals) if arrivals.exists() else np.zeros((0, 3), np.int64)
            m["gw_codes"] = {gw: log_slice(p, gw_log0[gw], gw_log1[gw])["by_code"] for gw, p in gw_logs.items()}
            m["gw_rc"] = {gw: procs.stop(proc) for gw, proc in procs.procs if gw in gw_logs}
            # the gateways' own count (their log lines are rate-limited per gateway): GATEWAY_STOP expiries=N
            m["gw_expiries"] = {gw: int(_fields(_find_line(p, "GATEWAY_STOP") or "").get("expiries", -1))
                                for gw, p in gw_logs.items()}
            m["agg_rc"] = procs.stop(agg, 15)
        m["engine"] = log_slice(tmp / "engine.log", log0, log1)
        err = tmp / "aggregator.stderr"
        m["stderr_bytes"] = err.stat().st_size
        m["stderr_tail"] = err.read_text(errors="replace").strip().splitlines()[-1:]
    finally:
        procs.stop_all()
        ctx.term()
        if tmpdir is not None:
            tmpdir.cleanup()
    return report(args, m, sim_gws)


def report(args, m: dict, sim_gws: list[str]) -> dict:
    """The benchmark's JSON object from what run() measured."""
    outs, rec, cfg = m["outs"], m["rec"], m["cfg"]
    period_ms = cfg["period_s"] * 1e3
    sent = collections.Counter()
    nbytes = collections.Counter()
    for o in outs:
        sent.update(o["sent"])
        nbytes.update(o["bytes"])
    total = sum(sent.values())
    elapsed = max(o["elapsed_s"] for o in outs)
    before, after = m["before"], m["after"]
    delta = status_delta(before, after) if before and after else None
    t_first = min(o["t0_ns"] for o in outs)  # the first message, after the fuzzers built their frames
    attack_w = interarrival(rec, t_first, m["t_end"])
    attack_w["long_gaps"] = long_gaps(rec, t_first, m["t_end"], period_ms)
    rss_growth = None if m["rss1"] is None else m["rss1"] - m["rss0"]
    survived = m["alive"] and after is not None
    arr = attack_w.get("arrival", {})
    goals = {
        "missed_deadlines": _goal(delta and delta["missed_deadlines"], 0),
        "interarrival_p99_ms": _goal(arr.get("p99_ms"), period_ms + GOAL_P99_SLACK_MS),
        "interarrival_max_ms": _goal(arr.get("max_ms"), 2 * period_ms),
        "rss_growth_bytes": _goal(rss_growth, GOAL_RSS_GROWTH_BYTES),
        "engine_log_bytes": _goal(m["engine"]["bytes"], GOAL_LOG_BYTES),
        "messages_sent": {"value": total, "limit": args.messages, "met": total >= args.messages},
        "aggregator_survived": {"value": survived, "limit": True, "met": survived},
    }
    return {
        "benchmark": "fuzz", "machine": machine(), "source": source_state(),
        "load_avg": {"before": list(m["load_before"]), "after": list(m["load_after"])},
        "config": {"vehicles": args.vehicles, "gateways": args.gateways, "sim_gateways": sim_gws,
                   "subscribed_gateway": SUBSCRIBED_GATEWAY, "messages": args.messages, "rate": args.rate,
                   "duration_max_s": args.duration_max, "fuzzers": args.fuzzers, "mix": args.mix,
                   "huge_per_s": args.huge_per_s, "bigids_per_s": args.bigids_per_s, "quiet_s": args.quiet_s,
                   "settle_s": args.settle_s, "period_ms": period_ms,
                   "setpoint_ttl_s": cfg["bus"].get("setpoint_ttl_s"),
                   "sched_fifo_priority": cfg["realtime"]["sched_fifo_priority"],
                   "subscriber_priority": args.subscriber_priority, "smoke": args.smoke},
        "realtime": m["rt"], "warmup": m["warmup"],
        "sent": {"by_kind": {k: sent.get(k, 0) for k in KINDS}, "bytes_by_kind": {k: nbytes.get(k, 0) for k in KINDS},
                 "total": total, "elapsed_s": elapsed, "rate_per_s": total / elapsed if elapsed else 0.0,
                 "stopped_by": sorted({o["stopped_by"] for o in outs}),
                 "fuzzer_blocked_s": sum(o["blocked_s"] for o in outs),
                 "control_replies": sum(o["control_replies"] for o in outs)},
        "aggregator": {"survived": survived, "exit_code": m["agg_rc"], "status_delta": delta,
                       "loop_after": (after or {}).get("loop"), "rss_before_bytes": m["rss0"],
                       "rss_after_bytes": m["rss1"], "rss_growth_bytes": rss_growth,
                       "stderr_bytes": m["stderr_bytes"],
                       "stderr_last_line": m["stderr_tail"][0] if m["stderr_tail"] else "",
                       "setpoints_dropped": (after or {}).get("setpoints_dropped"),
                       "receive_after": (after or {}).get("receive")},  # the receive gate's counters
        "engine_log": m["engine"],
        "control_probe": m["control_probe"],
        "setpoints": {"quiet": interarrival(rec, m["t_quiet"], m["t_attack"]), "attack": attack_w,
                      "subscriber": m["sub"]},
        "gateways": {"log_codes_during_attack": m["gw_codes"], "expiries": m["gw_expiries"],
                     "exit_codes": m["gw_rc"]},
        "goals": goals,
        "pass": all(g["met"] for g in goals.values()),
        "logs_kept_in": m["keep"],
        "attack_s": (m["t_sent"] - t_first) / 1e9,  # first message to the last fuzzer's exit
    }


def _goal(value, limit) -> dict:
    return {"value": value, "limit": limit, "met": value is not None and value <= limit}


# ---------------------------------------------------------------------------------------------------
# output


def _kb(v) -> str:
    return "-" if v is None else f"{v / 1e3:.1f}"


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _gaps_line(g: dict | None, period_ms: float) -> str:
    if not g:
        return "gaps over 1.5 periods: -"
    worst = ", ".join(f"{v:g}" for v in sorted(g["gaps_ms"], reverse=True)[:5])
    longest = f" (longest: {worst} ms)" if worst else ""
    return f"gaps over {1.5 * period_ms:g} ms during the attack: {g['n']}{longest}"


def _probe_line(p: dict | None) -> str:
    if not p:
        return "control round trip during the attack: -"
    return (f"control round trip during the attack (a status request every {ControlProbe.PROBE_INTERVAL_S:g} s, "
            f"the e-stop's path; ms): p50 {_ms(p.get('p50_ms'))}, p99 {_ms(p.get('p99_ms'))}, "
            f"max {_ms(p.get('max_ms'))}; {p['requests']} answered, {p['timeouts']} timed out")


def _receive_line(rc: dict | None) -> str:
    if not rc:
        return "receive gate: - (not in this version's status reply)"
    return (f"receive gate (whole run): budget {rc['budget']:g} of a period, busy {rc['busy_s']:.1f} s, "
            f"budget exhausted in {rc['budget_exhausted']} periods, throttled {rc['throttled_s']:.1f} s, "
            f"most in one period {rc['max_window_busy_ms']:.1f} ms")


def _codes(m) -> str:
    if m is None:
        return "(not in this version's status reply)"
    return ", ".join(f"{k} {v}" for k, v in sorted(m.items(), key=lambda kv: -kv[1])) or "none"


def render(r: dict) -> str:
    m, c, s, a, g = r["machine"], r["config"], r["sent"], r["aggregator"], r["goals"]
    d = a["status_delta"] or {}
    lb, la = r["load_avg"]["before"], r["load_avg"]["after"]
    fifo = r["realtime"].get("sched_fifo", "?").replace(" detail=", ", ")
    lines = [
        f"fuzz: {s['total']} messages to the telemetry PULL and control ROUTER of `v2grt run` ({c['vehicles']} "
        f"vehicles, {c['gateways']} gateways, sims {', '.join(c['sim_gateways'])}), period {c['period_ms']:.0f} ms, "
        f"expiry {'the default' if c['setpoint_ttl_s'] is None else str(c['setpoint_ttl_s']) + ' s'}",
        f"on {m['cpu']} ({m['cores']} cores), python {m['python']}, commit {r['source']['commit']}; load average "
        f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} before, {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} after; "
        f"aggregator SCHED_FIFO: {fifo}; stand-in subscriber: {r['setpoints']['subscriber'].get('fifo', '?')}",
        *([] if a["survived"] else [
            f"THE AGGREGATOR DID NOT SURVIVE: exit code {a['exit_code']}; last line on its stderr: "
            f"{a.get('stderr_last_line', '')!r}"]),
        "",
        table(["kind", "sent", "MB"], [[k, s["by_kind"][k], _mb(s["bytes_by_kind"][k])] for k in KINDS]
              + [["total", s["total"], _mb(sum(s["bytes_by_kind"].values()))]]),
        f"achieved {s['rate_per_s']:.0f} messages/s over {s['elapsed_s']:.1f} s (asked {c['rate']:.0f}/s; stopped by "
        f"{', '.join(s['stopped_by'])}; fuzzers waited {s['fuzzer_blocked_s']:.1f} s on a full queue)",
        "",
    ]
    sp_rows = []
    for name in ("quiet", "attack"):
        w = r["setpoints"][name]
        arr, pub = w.get("arrival", {}), w.get("published", {})
        sp_rows.append([name, w.get("messages", w.get("n")), arr.get("p50_ms"), arr.get("p99_ms"), arr.get("max_ms"),
                        pub.get("p99_ms"), pub.get("max_ms"), w.get("seq_gaps")])
    lines += [
        f"setpoint inter-arrival at {c['subscribed_gateway']} (ms; 'stamped' = the aggregator's t_ns deltas)",
        table(["window", "messages", "p50", "p99", "max", "stamped p99", "stamped max", "seq gaps"], sp_rows),
        _gaps_line(r["setpoints"]["attack"].get("long_gaps"), c["period_ms"]),
        "gateway sims' setpoint expiries (their own count, whole run; 0 kW until the next message): "
        + ", ".join(f"{gw} {n}" for gw, n in r["gateways"]["expiries"].items()),
        "",
        table(["during the attack", "cycles", "missed deadlines", "budget overruns", "cycle errors",
               "RSS before MB", "RSS after MB", "engine.log KB", "log lines", "stderr B"],
              [["aggregator", *(("-" if d.get(k) is None else d[k]) for k in ("cycles", "missed_deadlines",
                                                                                "budget_overruns", "errors")),
                _mb(a["rss_before_bytes"]), _mb(a["rss_after_bytes"]), _kb(r["engine_log"]["bytes"]),
                r["engine_log"]["lines"], a["stderr_bytes"]]]),
        _probe_line(r.get("control_probe")),
        _receive_line(a.get("receive_after")),
        "cycle total over the whole run (ms): " + (", ".join(
            f"{k} {_ms(v)}" for k, v in ((a["loop_after"] or {}).get("total") or {}).items()) or "-"),
        f"engine.log lines by code: {_codes(dict(list(r['engine_log']['by_code'].items())[:8]))}",
        *([f"{key}: {_codes(d.get(key))}" for key in ERROR_KEYS] if d else
          ["bad frames by code: - (no status reply after the attack)"]),
        "",
    ]
    shown = {  # goal key: (label, how the value is shown, how the limit is shown)
        "missed_deadlines": ("missed deadlines", lambda v: "-" if v is None else str(v), str),
        "interarrival_p99_ms": ("setpoint inter-arrival p99 ms", _ms, lambda v: f"<= {v:g}"),
        "interarrival_max_ms": ("setpoint inter-arrival max ms", _ms, lambda v: f"<= {v:g}"),
        "rss_growth_bytes": ("RSS growth MB", _mb, lambda v: f"<= {v / 1e6:g}"),
        "engine_log_bytes": ("engine.log written KB", _kb, lambda v: f"<= {v / 1e3:g}"),
        "messages_sent": ("messages sent", str, lambda v: f">= {v}"),
        "aggregator_survived": ("aggregator survived", lambda v: "yes" if v else "NO", lambda v: "yes"),
    }
    goal_rows = [[label, value(g[k]["value"]), limit(g[k]["limit"]), "met" if g[k]["met"] else "NOT MET"]
                 for k, (label, value, limit) in shown.items()]
    lines += [table(["goal (issue 10)", "measured", "limit", ""], goal_rows),
              f"RESULT: {'PASS' if r['pass'] else 'FAIL'}"]
    if r["logs_kept_in"]:
        lines.append(f"logs kept in {r['logs_kept_in']}")
    return "\n".join(lines)


SMOKE = {"vehicles": 1000, "gateways": 4, "sim_gateways": 1, "messages": 3000, "rate": 3000.0, "quiet_s": 1.0,
         "settle_s": 1.0, "duration_max": 20.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages to send in all (default 1,000,000)")
    ap.add_argument("--rate", type=float, default=8000.0, help="messages per second in all (0: as fast as taken)")
    ap.add_argument("--duration-max", type=float, default=240.0, help="stop sending after this many seconds")
    ap.add_argument("--vehicles", type=int, default=10_000)
    ap.add_argument("--gateways", type=int, default=20)
    ap.add_argument("--sim-gateways", type=int, default=2, help="gateways run by `v2grt gateway sim` (gw1..)")
    ap.add_argument("--fuzzers", type=int, default=1, help="fuzzer processes (the counts and rates are split)")
    ap.add_argument("--huge-per-s", type=float, default=0.5, help="3.8 MB frames of ~760,000 ids per second")
    ap.add_argument("--bigids-per-s", type=float, default=1.0,
                    help="valid batches with a 1 MB id list under a new gateway id, per second")
    ap.add_argument("--mix", default=",".join(f"{k}={w}" for k, w in DEFAULT_MIX.items()),
                    help="weights of the other kinds, KIND=W,... (default %(default)s)")
    ap.add_argument("--quiet-s", type=float, default=5.0, help="seconds of setpoints measured before the attack")
    ap.add_argument("--settle-s", type=float, default=2.0, help="seconds after the last message before 'after'")
    ap.add_argument("--priority", type=int, default=None,
                    help="the aggregator's SCHED_FIFO priority (default: configs/default.yaml's)")
    ap.add_argument("--subscriber-priority", type=int, default=40,
                    help="SCHED_FIFO priority of the stand-in gateway that times setpoints (0: SCHED_OTHER); it "
                         "stands for a gateway on its own machine, so its own scheduling is kept out of the gaps")
    ap.add_argument("--seed", type=int, default=10)
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--keep", action="store_true", help="keep the logs, config and roster (path printed)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    mix = {}
    for item in filter(None, args.mix.split(",")):
        kind, _, w = item.partition("=")
        if kind not in DEFAULT_MIX:
            ap.error(f"--mix: unknown kind {kind!r}; expected some of {list(DEFAULT_MIX)}")
        try:
            mix[kind] = float(w)
        except ValueError:
            ap.error(f"--mix {item!r}: expected KIND=WEIGHT with a number")
    args.mix = {k: mix.get(k, 0.0) for k in DEFAULT_MIX}
    result = run(args)
    emit(result, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
