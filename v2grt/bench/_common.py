"""Shared pieces of the benchmarks: percentiles, the machine description, table and JSON output, --smoke."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from pathlib import Path

import numpy as np


def stats_ms(samples_ns) -> dict:
    """Median, tails and max of a list of durations in ns, as milliseconds."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "p999_ms": float(np.percentile(a, 99.9)),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
    }


def machine() -> dict:
    """What the numbers were measured on (a shared 2-core box drifts: compare within one run)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def emit(result: dict, as_json: bool, render) -> None:
    """Print one JSON object, or the human table made by render(result)."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (no dependency): numbers right-aligned."""
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)


def add_smoke_option(ap, smoke: dict) -> None:
    """--smoke: the bench at a tiny size, a few seconds (structure and counts, never timing); `smoke` maps
    option dests to their smoke values and is shown in the help."""
    ap.add_argument("--smoke", action="store_true", help="a few seconds at a tiny size (structure, not timing): "
                    + ", ".join(f"{k}={v}" for k, v in smoke.items()))


def apply_smoke(ap, args, smoke: dict) -> None:
    """With --smoke, every option still at its default takes its smoke value; one given explicitly wins."""
    if args.smoke:
        for dest, value in smoke.items():
            if getattr(args, dest) == ap.get_default(dest):
                setattr(args, dest, value)


# ----------------------------------------------------------------------------------------------------
# The aggregator benches (cycle, e2e, soak): the real Aggregator in this process, and "the world" it
# talks to (a SunSpec meter served over Modbus TCP, gateways subscribing to setpoints and pushing
# telemetry) in a child process, as in the field: the world's Python threads must not share the
# aggregator's GIL, or the numbers would charge the harness to v2grt.


def package_root() -> Path:
    """The directory holding the v2grt package this process imported: a checkout, or site-packages."""
    import v2grt

    return Path(v2grt.__file__).resolve().parent.parent


def shipped_config(name: str) -> bytes:
    """A file of the shipped configs/ (default.yaml, discharge_profile.json, ...), read from the package data
    (v2grt/data/configs), so an installed package has them too."""
    from importlib import resources

    ref = resources.files("v2grt") / "data" / "configs" / name
    try:
        return ref.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"shipped config {name!r}: not in the package data v2grt/data/configs "
                                "(package data not installed?)") from None


def child_env() -> dict:
    """The environment for a bench's child processes: they import the v2grt this process imported (what the
    bench measures), whatever the caller's PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(package_root()), *filter(None, [env.get("PYTHONPATH")])])
    return env


def percentiles_us(samples_ns) -> dict:
    """Nearest-rank p50/p99/p99.9/max of durations in ns, as whole microseconds (floored, as cyclictest
    does), so the two sides of the loop bench are computed the same way."""
    a = np.sort(np.asarray(samples_ns, dtype=np.int64) // 1000)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), **{f"p{k}_us": int(_rank(a, q)) for k, q in (("50", 50), ("99", 99), ("999", 99.9))},
            "max_us": int(a[-1]), "mean_us": float(a.mean())}


def _rank(sorted_a, q: float):
    """Nearest-rank percentile of a sorted array: the smallest value with at least q % at or below it."""
    k = max(int(np.ceil(q * sorted_a.size / 100.0 - 1e-9)) - 1, 0)  # float: 99.9 / 100 * 1000 > 999
    return sorted_a[k]


def aggregator_config(*, period_s: float, meter_port: int, n_nodes: int, poll_s: float = 0.02,
                      priority: int = 0, cpu: int | None = None, hwm: int = 4, capacity_kw: float | None = None):
    """A validated Config for a bench aggregator on ephemeral loopback ports (real-time knobs as shipped
    in configs/default.yaml unless asked: SCHED_OTHER, mlockall, gc freeze, 0.5 ms switch interval)."""
    from v2grt.config import config_from_dict

    return config_from_dict({
        "fleet_id": "bench", "period_s": period_s, "budget_s": period_s,
        "realtime": {"sched_fifo_priority": priority, "cpu_affinity": None if cpu is None else [cpu]},
        "meter": {"host": "127.0.0.1", "port": meter_port, "poll_interval_s": poll_s, "timeout_s": 0.05,
                  "stale_after_s": 1.0},
        "bus": {"setpoints": "tcp://127.0.0.1:*", "telemetry": "tcp://127.0.0.1:*",
                "control": "tcp://127.0.0.1:*", "setpoint_ttl_s": max(0.5, 3 * period_s), "setpoint_hwm": hwm},
        "service": {"name": "dc", "capacity_kw": capacity_kw},
        "fleet": {"random": n_nodes},
    })


def source_state() -> dict:
    """What was measured: the package's version and location and, from a git checkout, the commit and the
    package files that differed from it (a shared tree moves under a run); commit "" when installed."""
    import subprocess

    import v2grt

    root = package_root()

    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    state = {"version": v2grt.__version__, "package": str(root / "v2grt"), "commit": "",
             "uncommitted_package_files": []}
    top = git("rev-parse", "--show-toplevel").strip()
    # Only the package's own checkout: an installed package may sit in some other repository's tree.
    if top and Path(top).resolve() == root:
        state["commit"] = git("rev-parse", "--short", "HEAD").strip()
        state["uncommitted_package_files"] = [line[3:] for line in git("status", "--porcelain", "--", "v2grt")
                                              .splitlines() if line.strip()]
    return state


def catch_all_hwm(gateways: int) -> int:
    """Setpoint HWM for the benches' catch-all SUB: a whole cycle's burst, several times over.

    A PUB counts a message against its pipe's HWM until the I/O thread's read is acknowledged back,
    which the publishing thread processes lazily; with the shipped HWM of 4, a SUB taking every topic
    gets the first few gateways' messages of each cycle and loses the rest (silently, at the PUB),
    and with a cycle's worth (gateways + 4) the tail of every other burst is still dropped.
    """
    return 4 * gateways + 64


def keep_fresh(agg) -> None:
    """Telemetry timestamps as if every vehicle had just reported (benches without telemetry)."""
    import time

    agg.fleet.last_telemetry_ns[: agg.fleet.n_rows] = time.monotonic_ns() + 3_600_000_000_000


def setup_report(agg) -> dict:
    """What the aggregator's real-time setup was granted, step by step."""
    return {s.step: {"granted": s.granted, "detail": s.detail} for s in agg.loop.setup_report}


def quiet_pymodbus() -> None:
    """Keep pymodbus off a bench's stderr: a meter server whose client hung up mid-reply (the aggregator's reader
    reconnecting after a timeout, or stopping) logs "Cancel send, because not connected!" at ERROR with its last
    20 raw frames appended ("\\n>>>>> send: 0x0 0x41 ..."; pymodbus adds them unless it logs at DEBUG). With no
    handler set (a bench calls no events.setup_logging, which routes it to engine.log) Python's last-resort
    handler printed them into `bench cycle`'s output. The reader counts its own timeouts and reconnects."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class World:
    """The child process that plays meter and gateways; driven by one JSON line per command.

    World(meter_model=213) starts the meter server and gives `meter_port`; `connect(...)` points the
    gateways at a running aggregator; `call(cmd, **args)` runs e2e trials and the like; `stop()` returns
    the child's counters (setpoint frames and bytes received, telemetry batches sent, ...).
    """

    def __init__(self, meter_model: int | None = 213, f_hz: float = 50.0):
        """meter_model None: no meter (a process that only pushes telemetry, so a high telemetry rate does not
        starve the meter server of its own process's GIL: `bench soak` runs its load in one of these)."""
        import subprocess

        quiet_pymodbus()  # this process reads the world's meter (an aggregator's MeterReader)
        code = "from v2grt.bench._common import world_main; world_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=child_env())
        self.meter_port = None
        if meter_model is not None:
            self.meter_port = self.call("meter", model=meter_model, f_hz=f_hz)["port"]

    def call(self, cmd: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench world process died during {cmd!r} (exit {self.proc.wait()}); see stderr")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench world: {cmd}: {reply['error']}")
        return reply

    def connect(self, setpoints: str, *, sink: bool = True, telemetry: str | None = None, fleet: dict | None = None,
                rate: float = 0.0, wander_hz: float = 0.0) -> dict:
        """Subscribe a catch-all SUB to `setpoints`; push telemetry for `fleet` (Fleet.random's n, seed,
        n_gateways) at `rate` node-updates/s; wander the meter frequency +-wander_hz around 50 Hz."""
        return self.call("connect", setpoints=setpoints, sink=sink, telemetry=telemetry, fleet=fleet, rate=rate,
                         wander_hz=wander_hz)

    def stop(self) -> dict:
        try:
            out = self.call("stop")
        finally:
            self.proc.stdin.close()
            self.proc.wait(10)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            try:
                self.stop()
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def world_main() -> None:
    """Child side of World: a command loop on stdin, one JSON reply line per command on stdout."""
    import threading
    import time
    import traceback

    import zmq

    from v2grt.sim.sunspec import SimServerThread, SunSpecMeter

    quiet_pymodbus()  # the meter's server: its stderr is the bench's
    ctx = zmq.Context()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    counters = {"sp_frames": 0, "sp_bytes": 0, "status_frames": 0, "tel_batches": 0, "tel_nodes": 0,
                "tel_dropped": 0, "tel_late_ms_max": 0.0}
    state: dict = {}

    def sink(endpoint):
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.rcvhwm = 0  # count everything the aggregator sends
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        while not stop.is_set():
            if not sock.poll(100):
                continue
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                buf = frame.buffer
                if buf[:3] == b"sp/":
                    counters["sp_frames"] += 1
                    counters["sp_bytes"] += len(buf)
                else:
                    counters["status_frames"] += 1
        sock.close(0)

    def pusher(endpoint, fleet_spec, rate):
        from v2grt.fleet import Fleet
        from v2grt.io import bus, wire

        fleet = Fleet.random(fleet_spec["n"], seed=fleet_spec.get("seed", 0), n_gateways=fleet_spec["n_gateways"])
        rng = np.random.default_rng(1)
        gws = []
        for gw in fleet.gateway_ids:
            rows = fleet.gateway_rows(gw)
            ids = wire.join_ids(fleet.node_ids[r] for r in rows)
            n = len(rows)
            soc = fleet.soc[rows].astype("<f4")
            gws.append((gw, ids, n, soc, bus.TelemetryPusher(ctx, endpoint)))
        batch = max(1, int(np.mean([g[2] for g in gws])))
        interval = batch / rate  # one gateway's batch every interval, round robin
        t_next = time.monotonic()
        k = 0
        while not stop.is_set():
            now = time.monotonic()
            if now < t_next:
                time.sleep(min(t_next - now, 0.1))
                continue
            counters["tel_late_ms_max"] = max(counters["tel_late_ms_max"], (now - t_next) * 1e3)
            gw, ids, n, soc, push = gws[k % len(gws)]
            seq = k // len(gws) + 1  # this gateway's batch number
            k += 1
            soc += rng.normal(0.0, 0.001, n).astype("<f4")  # a slow random walk, kept in range
            np.clip(soc, 0.05, 1.0, out=soc)
            slow = {}  # every gateway's tenth batch also carries slow keys (the field manual's optimized profile)
            if seq % 10 == 1:
                slow = {"soh": np.full(n, 0.95, "<f4"), "temp_c": np.full(n, 25.0, "<f4")}
            frame = wire.encode_telemetry(gw, seq, time.time_ns(), ids, soc, rng.uniform(-11, 11, n),
                                          np.ones(n, np.uint8), np.zeros(n, np.uint8), **slow)
            if push.send(frame):
                counters["tel_batches"] += 1
                counters["tel_nodes"] += n
            else:
                counters["tel_dropped"] += 1
            t_next += interval
            if t_next < now - 1.0:  # fell far behind (machine stalled): do not burst to catch up
                t_next = now
        for g in gws:
            g[4].close()

    def wander(meter, amp_hz):
        rng = np.random.default_rng(2)
        walk = 0.0
        while not stop.wait(0.05):
            walk += rng.normal(0.0, 0.1)
            meter.set_frequency(50.0 + amp_hz * float(np.tanh(walk)))

    def e2e(args):
        """Frequency steps at the meter; time until gw's setpoints turn to the new direction."""
        from v2grt.io import bus

        meter = state["meter"]
        f_dis, f_chg = args["f"]
        rng = np.random.default_rng(args.get("seed", 3))
        trials = []
        with bus.GatewaySubscriber(ctx, args["setpoints"], args["gateway"], rcvhwm=1000) as sub:
            # settle at the charge side first, and see it arrive
            meter.set_frequency(f_chg)
            t_end = time.monotonic() + 10.0
            while time.monotonic() < t_end:
                msg = sub.recv(200)
                if msg is not None and float(msg.p_kw.sum()) < 0:
                    break
            else:
                raise RuntimeError("no charging setpoint reached the gateway within 10 s of the first step")
            for k in range(args["trials"]):
                f = f_dis if k % 2 == 0 else f_chg
                sign = 1.0 if f == f_dis else -1.0
                time.sleep(float(rng.uniform(*args["gap_s"])))  # random phase against the period
                while sub.recv(0) is not None:  # drop what is queued: only messages after the step count
                    pass
                meter.set_frequency(f)
                t_step = time.monotonic_ns()
                deadline = t_step + int(args["timeout_s"] * 1e9)
                arrived = None
                while time.monotonic_ns() < deadline:
                    msg = sub.recv(50)
                    t = time.monotonic_ns()
                    if msg is not None and sign * float(msg.p_kw.sum()) > 0:
                        arrived = t
                        break
                trials.append({"f_hz": f, "t_step_ns": t_step, "t_arrival_ns": arrived,
                               "seq": None if arrived is None else msg.seq})
        return {"trials": trials, "sub_errors": dict(sub.errors)}

    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            if cmd == "meter":
                meter = SunSpecMeter(req["model"], f_hz=req["f_hz"])
                sim = SimServerThread([meter], name="bench-meter").start()
                state.update(meter=meter, sim=sim)
                reply = {"port": sim.port(meter)}
            elif cmd == "connect":
                if req["sink"]:
                    threads.append(threading.Thread(target=sink, args=(req["setpoints"],), daemon=True))
                if req["telemetry"] and req["rate"] > 0:
                    threads.append(threading.Thread(target=pusher, args=(req["telemetry"], req["fleet"], req["rate"]),
                                                    daemon=True))
                if req["wander_hz"] > 0:
                    threads.append(threading.Thread(target=wander, args=(state["meter"], req["wander_hz"]),
                                                    daemon=True))
                for t in threads:
                    t.start()
                time.sleep(0.3)  # let subscriptions reach the PUB before the caller starts counting
                reply = {"ok": True}
            elif cmd == "set_frequency":
                state["meter"].set_frequency(req["f_hz"])
                reply = {"ok": True, "t_ns": time.monotonic_ns()}  # when the step was made (CLOCK_MONOTONIC)
            elif cmd == "counters":
                reply = dict(counters)
            elif cmd == "e2e":
                reply = e2e(req)
            elif cmd == "stop":
                stop.set()
                for t in threads:
                    t.join(5)
                if "sim" in state:
                    state["sim"].stop()
                print(json.dumps(dict(counters)), flush=True)
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as exc:
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    ctx.term()
