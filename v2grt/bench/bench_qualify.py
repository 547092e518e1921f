"""Host qualification: can this host hold the config's period with its fleet and gateways, and with what margin?

    v2grt bench qualify --config FILE [--vehicles N] [--gateways G] [--out DIR] [--seconds 20] [--cycles 300]
                        [--trials 100] [--json]

The one report a control engineer runs on the target host. From the config it takes the control period
and budget, the fleet size (the roster's rows, or `fleet.random`), the number of gateways (the roster's
gateway ids; `random: N` gets one per 500 vehicles as Fleet.random makes them), the meter poll interval,
the journal and publisher-thread settings and the real-time settings (SCHED_FIFO priority, CPU pinning);
--vehicles/--gateways ask "what if" instead. Then, in one run, with those real-time settings:

1. loop:   wake-up lateness of v2grt's ControlLoop against cyclictest (rt-tests) at the period, alternating
           in slices so drift hits both alike (as `bench loop`); without cyclictest, the loop alone, said so;
2. kernel: the compiled kernel at the fleet size against the memory-streaming roofline (as `bench kernel`),
           on a thread scheduled as the control thread is;
3. cycle:  the whole cycle of the real Aggregator with that many gateways, every gateway's frame really sent
           over TCP (as `bench cycle`, journal as configured);
4. e2e:    meter-to-gateway latency: a frequency step at a simulated SunSpec meter to the setpoint at a
           gateway (as `bench e2e`).

The fleet's values are synthetic (Fleet.random) at the configured size and gateway count: the cost of a
cycle depends on those, not on the roster's contents. It also inspects the host (v2grt.host: kernel
preemption model, SCHED_FIFO, CPU isolation, IRQ affinity, SMT, frequency governor, RT throttling, memory
lock limits, clocksource, virtualization), each finding with the setting to change and why, and ends with
a verdict. Output: the terminal summary, DIR/qualify.json and DIR/qualify.png.

Verdict rules (all must hold): no missed deadline in the cycle run; p99 wake-up lateness + p99 cycle time
inside the budget; worst lateness + worst cycle inside the period; meter-to-gateway p99 <= period + 10 ms
(DESIGN.md section 10). The margins say how much of the budget is left at p99 and at the worst cycle, and
how much of the 10 ms slack the meter-to-gateway p99 leaves (its wait for the next cycle is up to a period
by design); under a quarter left on either is "HOLDS, NARROWLY".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from v2grt.bench import bench_cycle, bench_e2e, bench_kernel, bench_loop
from v2grt.bench._common import add_smoke_option, apply_smoke, machine, percentiles_us, source_state, stats_ms, table

E2E_SLACK_MS = 10.0  # DESIGN.md section 10: meter step to gateway within one period + 10 ms at p99
NARROW_MARGIN = 0.25  # under a quarter of the budget left at p99: holds, narrowly


# ------------------------------------------------------------------------------------------- the target
def target_from_config(path: str, vehicles: int | None, gateways: int | None) -> dict:
    """What the config asks the host to carry: period, budget, fleet size, gateways, real-time settings."""
    from v2grt.aggregator import load_fleet
    from v2grt.config import load_config

    cfg = load_config(path)
    if vehicles is None:
        fleet = load_fleet(cfg, now_ns=0)
        vehicles, fleet_gateways = len(fleet), len(fleet.gateway_ids)
        source = f"random: {cfg.fleet.random}" if cfg.fleet.random is not None else f"roster {cfg.fleet.roster}"
    else:
        fleet_gateways, source = None, "--vehicles"
    if gateways is None:
        gateways = fleet_gateways or max(1, -(-vehicles // 500))
    cpus = cfg.realtime.cpu_affinity or None
    return {
        "config": str(Path(path).resolve()), "fleet_source": source,
        "period_ms": cfg.period_s * 1e3, "budget_ms": cfg.budget_s * 1e3,
        "vehicles": int(vehicles), "gateways": int(min(gateways, max(vehicles, 1))),
        "poll_ms": (cfg.meter.poll_interval_s * 1e3) if cfg.meter else 5.0,
        "journal": bool(cfg.journal.enabled),
        "sched_fifo_priority": int(cfg.realtime.sched_fifo_priority),
        "cpu_affinity": cpus, "mlockall": cfg.realtime.mlockall,
        "publisher_thread": bool(cfg.bus.publisher_thread),
    }


# ------------------------------------------------------------------------------------------ measurements
def measure_loop(period_ms: float, seconds: float, rounds: int, priority: int, cpu: int | None) -> dict:
    """Wake-up lateness, v2grt's loop and cyclictest alternating in slices; raw samples kept for the picture."""
    exe = shutil.which("cyclictest")
    period_us = round(period_ms * 1000)
    v_samples, hists, missed = [], [], 0
    for _ in range(rounds):
        if exe:
            h = bench_loop.run_cyclictest(exe, period_us, seconds / rounds, priority, cpu)
            h.pop("cmd")
            hists.append(h)
        v = bench_loop.run_v2grt(period_us * 1000, seconds / rounds, priority, cpu)
        v_samples.append(np.asarray(v["lateness_ns"], dtype=np.int64))
        missed += v["missed_deadlines"]
    lat_ns = np.concatenate(v_samples) if v_samples else np.zeros(0, np.int64)
    out = {"v2grt": percentiles_us(lat_ns), "v2grt_missed_deadlines": int(missed), "lateness_ns": lat_ns}
    if exe:
        merged = bench_loop.merge(hists)
        ct = bench_loop.histogram_percentiles(merged)
        out.update(cyclictest=ct, cyclictest_counts=merged["counts"],
                   p99_ratio=out["v2grt"].get("p99_us", 0) / max(ct.get("p99_us", 1), 1))
    else:
        out["cyclictest"] = None
        out["hint"] = bench_loop.INSTALL_HINT
    return out


def in_control_thread(fn, priority: int, cpu: int | None):
    """fn() on a thread scheduled as the control thread will be (SCHED_FIFO at `priority` when > 0, pinned to
    `cpu`): on a loaded host a SCHED_OTHER measurement would charge other processes' work to the kernel."""
    import threading

    box: dict = {}

    def body():
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            if priority > 0:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    t = threading.Thread(target=body, name="v2grt-qualify-kernel")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def measure_kernel(n: int, cycles: int, profile, threads: int = 1) -> dict:
    """The compiled kernel at the fleet size against the streaming roofline, interleaved (call it through
    in_control_thread to run it as the control thread runs); `threads`: kernel.threads."""
    from v2grt._buffers import KernelOutput, Workspace
    from v2grt.fleet import Fleet
    from v2grt.kernel import compiled

    core = compiled()
    fleet = Fleet.random(n, seed=0)
    out, work = KernelOutput(fleet.capacity), Workspace(fleet.capacity, fleet.site_capacity)
    work.threads = threads
    reqs = bench_kernel.requests_kw(fleet, cycles)
    bench_kernel.time_kernel(core, fleet, profile, reqs[:3], out, work)  # page in, warm caches
    bench_kernel.time_roofline(core, fleet, out, 2)
    kern, roof = [], []
    gc.collect()
    gc.disable()
    try:
        for chunk in np.array_split(reqs, max(cycles // 10, 1)):
            kern += bench_kernel.time_kernel(core, fleet, profile, chunk, out, work)
            roof += bench_kernel.time_roofline(core, fleet, out, len(chunk))
    finally:
        gc.enable()
    k, r = stats_ms(kern), stats_ms(roof)
    mode = work.kernel_mode()
    work.teams.clear()  # its worker thread ends here, not when the workspace happens to be collected
    return {"isa": core.ISA, "kernel": k, "roofline": r, "kernel_over_roofline": k["p50_ms"] / max(r["p50_ms"], 1e-9),
            "threads": threads, "mode": mode, "kernel_ns": kern}


# --------------------------------------------------------------------------------------------- verdict
def verdict(target: dict, loop: dict, cycle: dict, e2e: dict) -> dict:
    """Can the host hold the period: each rule with its numbers, the margins, and one word."""
    period, budget = target["period_ms"], target["budget_ms"]
    late = loop["v2grt"]
    late_p99_ms, late_max_ms = late.get("p99_us", 0) / 1e3, late.get("max_us", 0) / 1e3
    tot = cycle["phases"]["total"]
    cyc_p99, cyc_max = tot["p99_ms"], tot["max_ms"]
    e2e_p99 = e2e["latency"].get("p99_ms", float("inf"))
    e2e_target = period + E2E_SLACK_MS
    rules = [
        {"rule": "no missed deadline in the cycle run", "measured": cycle["missed_deadlines"], "limit": 0,
         "met": cycle["missed_deadlines"] == 0},
        {"rule": "p99 lateness + p99 cycle inside the budget (ms)", "measured": late_p99_ms + cyc_p99,
         "limit": budget, "met": late_p99_ms + cyc_p99 <= budget},
        {"rule": "worst lateness + worst cycle inside the period (ms)", "measured": late_max_ms + cyc_max,
         "limit": period, "met": late_max_ms + cyc_max < period},
        {"rule": "meter-to-gateway p99 <= period + 10 ms (ms)", "measured": e2e_p99, "limit": e2e_target,
         "met": e2e_p99 <= e2e_target and e2e["timeouts"] == 0},
    ]
    margin_p99 = 1.0 - (late_p99_ms + cyc_p99) / budget
    margin_worst = 1.0 - (late_max_ms + cyc_max) / period
    # the wait for the next cycle is up to a period by design: the e2e margin is what is left of the 10 ms slack
    margin_e2e = min(1.0, 1.0 - (e2e_p99 - period) / E2E_SLACK_MS)
    if not all(r["met"] for r in rules):
        word = "DOES NOT HOLD"
    elif min(margin_p99, margin_e2e) < NARROW_MARGIN:
        word = "HOLDS, NARROWLY"
    else:
        word = "HOLDS"
    return {"verdict": word, "rules": rules, "margin_p99": margin_p99, "margin_worst": margin_worst,
            "margin_e2e": margin_e2e,
            "sentence": (f"{word}: period {period:g} ms with {target['vehicles']:,} vehicles and "
                         f"{target['gateways']:,} gateways; at p99 {100 * margin_p99:.0f} % of the budget is left "
                         f"(lateness {late_p99_ms:.3f} + cycle {cyc_p99:.3f} ms), at the worst cycle "
                         f"{100 * margin_worst:.0f} % (lateness {late_max_ms:.3f} + cycle {cyc_max:.3f} ms); "
                         f"meter to gateway p99 {e2e_p99:.1f} ms against {e2e_target:g} ms "
                         f"({100 * max(margin_e2e, 0.0):.0f} % of its {E2E_SLACK_MS:g} ms slack left)")}


# --------------------------------------------------------------------------------------------------- run
def run(config: str, vehicles: int | None, gateways: int | None, seconds: float, rounds: int, cycles: int,
        kernel_cycles: int, trials: int, out_dir: str | None, progress=None, smoke: bool = False) -> dict:
    from v2grt import host
    from v2grt.config import load_config
    from v2grt.profile import DispatchProfile

    say = progress or (lambda line: None)
    target = target_from_config(config, vehicles, gateways)
    cfg = load_config(config)
    profile = DispatchProfile()
    if cfg.discharge_profile:  # the kernel's work depends on the profile's limits: the config's own
        profile = DispatchProfile.from_json(cfg.resolve(cfg.discharge_profile))
    fifo_ok, fifo_detail = bench_loop.fifo_permitted(target["sched_fifo_priority"])
    prio = target["sched_fifo_priority"] if fifo_ok else 0
    cpu = target["cpu_affinity"][0] if target["cpu_affinity"] else None
    n, g = target["vehicles"], target["gateways"]
    from v2grt.fleet import COLUMNS, STATE_COLUMNS

    fleet_bytes = n * (sum(np.dtype(c.dtype).itemsize for c in COLUMNS)
                       + sum(np.dtype(d).itemsize for _, d in STATE_COLUMNS))
    findings = host.inspect(target["cpu_affinity"], target["sched_fifo_priority"], fifo_ok, fifo_detail, fleet_bytes)

    say(f"1/4 loop wake-up lateness at {target['period_ms']:g} ms, {seconds:g} s per side ...")
    loop = measure_loop(target["period_ms"], seconds, rounds, prio, cpu)
    say(f"2/4 kernel at {n:,} vehicles against the roofline ...")
    kernel = in_control_thread(lambda: measure_kernel(n, kernel_cycles, profile, cfg.kernel.threads), prio, cpu)
    say(f"3/4 whole cycle, {n:,} vehicles, {g:,} gateways, {cycles} cycles ...")
    gc.collect()
    cycle = bench_cycle.measure(n, g, cycles, target["period_ms"] / 1e3, prio, journal=target["journal"], cpu=cpu,
                                samples=True, publisher=target["publisher_thread"], kernel_threads=cfg.kernel.threads)
    say(f"4/4 meter-to-gateway latency, {trials} frequency steps ...")
    e2e = bench_e2e.measure(target["period_ms"], target["poll_ms"], n, g, trials, prio, seed=3, cpu=cpu, samples=True)
    v = verdict(target, loop, cycle, e2e)
    if smoke:  # sizes and durations chosen to check the report's structure, never to qualify a host
        v["sentence"] = "SMOKE RUN, NOT A QUALIFICATION (tiny sizes and durations): " + v["sentence"]
    result = {
        "benchmark": "qualify", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "source": source_state(), "load_avg": os.getloadavg(),
        "smoke": smoke,
        "target": target,
        "scheduling": {"sched_fifo": fifo_ok, "priority_used": prio, "detail": fifo_detail, "cpu": cpu},
        "host": [f.to_dict() for f in findings],
        "loop": {k: v_ for k, v_ in loop.items() if k not in ("lateness_ns", "cyclictest_counts")},
        "kernel": {k: v_ for k, v_ in kernel.items() if k != "kernel_ns"},
        "cycle": {"phases": cycle["phases"], "missed_deadlines": cycle["missed_deadlines"],
                  "budget_overruns": cycle["budget_overruns"], "cycles": cycle["cycles"],
                  "setpoint_frames_expected": cycle["setpoint_frames_expected"],
                  "setpoint_frames_received": cycle["setpoint_frames_received"], "realtime": cycle["realtime"]},
        "e2e": {k: e2e[k] for k in ("latency", "split_mean_ms", "split_p99_ms", "arrived", "timeouts",
                                    "missed_deadlines", "poll_ms")},
        **v,
    }
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "qualify.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(out / "qualify.png", result, loop, kernel, cycle["total_ns"], e2e["latency_ns"])
        result["files"] = [str(out / "qualify.json"), str(out / "qualify.png")]
    return result


# ------------------------------------------------------------------------------------------------ output
def render(r: dict) -> str:
    t, m, s = r["target"], r["machine"], r["scheduling"]
    pinned = "" if s["cpu"] is None else f", pinned to CPU {s['cpu']}"
    lines = [
        f"host qualification on {m['cpu']} ({m['cores']} cores), load {r['load_avg'][0]:.2f}, {r['date_utc']}",
        f"config {t['config']}: period {t['period_ms']:g} ms (budget {t['budget_ms']:g} ms), {t['vehicles']:,} "
        f"vehicles ({t['fleet_source']}), {t['gateways']:,} gateways, meter poll {t['poll_ms']:g} ms, journal "
        f"{'on' if t['journal'] else 'off'}, publisher thread {'on' if t.get('publisher_thread') else 'off'}",
        f"scheduling: {'SCHED_FIFO ' + str(s['priority_used']) if s['sched_fifo'] else 'SCHED_OTHER'} ({s['detail']})"
        + pinned,
        "", "host"]
    marks = {"ok": "ok    ", "advice": "ADVICE", "warn": "WARN  ", "info": "info  "}
    for f in r["host"]:
        lines.append(f"  {marks.get(f['status'], f['status'])} {f['check']}: {f['value']}")
        if f["change"]:
            lines.append(f"         change: {f['change']}")
            lines.append(f"         why: {f['why']}")
    lp, k, c, e = r["loop"], r["kernel"], r["cycle"]["phases"], r["e2e"]

    def row(label: str, st: dict, unit: str = "ms") -> list:
        return [label, st.get("n"), *(st.get(f"{q}_{unit}") for q in ("p50", "p99", "max"))]

    rows = [row("loop lateness, v2grt (us)", lp["v2grt"], "us")]
    if lp.get("cyclictest"):
        rows.append(row("loop lateness, cyclictest (us)", lp["cyclictest"], "us"))
    km = k.get("mode", {})
    threads = f"{km.get('threads', 1)} thread(s) of kernel.threads {k.get('threads', 1)}"
    rows += [row(f"kernel, {k['isa']}, {threads} (ms)", k["kernel"]),
             row("roofline: one pass over its bytes (ms)", k["roofline"]),
             row("whole cycle (ms)", c["total"]),
             row("  of which publish (ms)", c["publish"]),
             row("meter to gateway (ms)", e["latency"])]
    lines += ["", table(["measured", "n", "p50", "p99", "max"], rows)]
    notes = [f"kernel/roofline {k['kernel_over_roofline']:.2f}x" + (f" (one thread: {km['why']})" if km.get(
                 "threads") == 1 and k.get("threads") == 2 else ""),
             f"missed deadlines {r['cycle']['missed_deadlines']}, budget overruns {r['cycle']['budget_overruns']}",
             f"setpoint frames {r['cycle']['setpoint_frames_received']:,} of "
             f"{r['cycle']['setpoint_frames_expected']:,}"]
    if lp.get("cyclictest"):
        notes.insert(0, f"loop p99 / cyclictest p99 {lp['p99_ratio']:.2f}x")
    else:
        notes.insert(0, lp["hint"] + "; the loop alone was measured")
    lines += ["  " + "; ".join(notes), ""]
    for rule in r["rules"]:
        lines.append(f"  {'met    ' if rule['met'] else 'NOT MET'} {rule['rule']}: {_num(rule['measured'])} "
                     f"(limit {_num(rule['limit'])})")
    lines += ["", r["sentence"]]
    if r.get("files"):
        lines.append("written: " + ", ".join(r["files"]))
    return "\n".join(lines)


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def plot(path: Path, r: dict, loop: dict, kernel: dict, cycle_ns, e2e_ns) -> None:
    """One page, the demo report's style: lateness (v2grt against cyclictest), kernel against the roofline,
    whole cycle against the budget, meter-to-gateway latency against its target; the verdict as the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = r["target"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=90)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.07, hspace=0.35, wspace=0.2)
    fig.suptitle(f"v2grt host qualification, {r['machine']['cpu']} ({r['machine']['cores']} cores), {r['date_utc']}\n"
                 f"{r['verdict']}: period {t['period_ms']:g} ms, {t['vehicles']:,} vehicles, {t['gateways']:,} "
                 f"gateways; margin at p99 {100 * r['margin_p99']:.0f} %, at worst {100 * r['margin_worst']:.0f} %",
                 fontsize=11)

    def marks(ax, values_ms, unit_scale=1.0, unit="ms"):
        a = np.asarray(values_ms, float)
        if a.size:
            for key, q, style in (("p50", 50, ":"), ("p99", 99, "--")):
                v = float(np.percentile(a, q))
                ax.axvline(v, color="k", ls=style, lw=0.9, label=f"{key} {v:.3g} {unit}")
            ax.axvline(float(a.max()), color="k", ls="-.", lw=0.9, label=f"max {a.max():.3g} {unit}")

    ax = axes[0, 0]
    lat_us = np.asarray(loop["lateness_ns"], float) / 1e3
    if lat_us.size:
        bins = np.logspace(0, np.log10(max(lat_us.max(), 10.0) * 1.5), 50)
        ax.hist(np.maximum(lat_us, 1.0), bins=bins, histtype="stepfilled", alpha=0.45, color="#9467bd",
                label="v2grt loop")
        if loop.get("cyclictest_counts"):
            us = np.array(sorted(loop["cyclictest_counts"]), float)
            w = np.array([loop["cyclictest_counts"][int(k)] for k in us], float)
            ax.hist(np.maximum(us, 1.0), bins=bins, weights=w, histtype="step", lw=1.5, color="#1f4e79",
                    label="cyclictest")
        marks(ax, lat_us, unit="us")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("wake-up lateness after the deadline, us")
    ax.set_ylabel("wake-ups")
    ax.set_title("1. Loop wake-up lateness" + ("" if loop.get("cyclictest_counts") else " (cyclictest not installed)"),
                 fontsize=9, loc="left")

    ax = axes[0, 1]
    k_ms = np.asarray(kernel["kernel_ns"], float) / 1e6
    ax.hist(k_ms, bins=40, color="#2ca02c", alpha=0.6, label=f"kernel ({kernel['isa']})")
    ax.axvline(kernel["roofline"]["p50_ms"], color="#d62728", lw=1.2,
               label=f"roofline p50 {kernel['roofline']['p50_ms']:.3g} ms")
    marks(ax, k_ms)
    ax.set_xlabel("kernel time per cycle, ms")
    ax.set_ylabel("cycles")
    ax.set_title(f"2. Kernel at {t['vehicles']:,} vehicles: {kernel['kernel_over_roofline']:.2f}x one pass over "
                 "its bytes", fontsize=9, loc="left")

    ax = axes[1, 0]
    c_ms = np.asarray(cycle_ns, float) / 1e6
    if c_ms.size:
        lo = max(float(c_ms.min()) * 0.8, 1e-3)
        ax.hist(c_ms, bins=np.logspace(np.log10(lo), np.log10(max(float(c_ms.max()), t["budget_ms"]) * 1.3), 60),
                color="#ff7f0e", alpha=0.6, label="whole cycle")
    marks(ax, c_ms)
    ax.axvline(t["budget_ms"], color="#d62728", lw=1.2, label=f"budget {t['budget_ms']:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("inputs + kernel + publish, ms")
    ax.set_ylabel("cycles")
    ax.set_title(f"3. Whole cycle, {t['gateways']:,} gateways", fontsize=9, loc="left")

    ax = axes[1, 1]
    e_ms = np.asarray(e2e_ns, float) / 1e6
    if e_ms.size:
        ax.hist(e_ms, bins=30, color="#1f77b4", alpha=0.6, label="step to setpoint")
        marks(ax, e_ms)
    ax.axvline(t["period_ms"] + E2E_SLACK_MS, color="#d62728", lw=1.2,
               label=f"target {t['period_ms'] + E2E_SLACK_MS:g} ms")
    ax.set_xlabel("frequency step at the meter to setpoint at the gateway, ms")
    ax.set_ylabel("steps")
    ax.set_title(f"4. Meter to gateway (poll {t['poll_ms']:g} ms)", fontsize=9, loc="left")
    for a in axes.flat:
        a.grid(alpha=0.3, which="both")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"vehicles": 1000, "gateways": 4, "seconds": 0.6, "rounds": 1, "cycles": 20, "kernel_cycles": 20,
         "trials": 3}


def _default_config() -> str:
    from importlib import resources

    return str(resources.files("v2grt") / "data" / "configs" / "default.yaml")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench qualify", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="the aggregator config to qualify the host for "
                    "(default: the shipped configs/default.yaml)")
    ap.add_argument("--vehicles", type=int, default=None, help="fleet size instead of the config's")
    ap.add_argument("--gateways", type=int, default=None, help="gateway count instead of the config's")
    ap.add_argument("--out", default="qualify", help="directory for qualify.json and qualify.png ('' : none)")
    ap.add_argument("--seconds", type=float, default=20.0, help="loop lateness: seconds per side (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="loop lateness: alternating slices per side")
    ap.add_argument("--cycles", type=int, default=300, help="whole-cycle run: measured cycles")
    ap.add_argument("--kernel-cycles", type=int, default=200, help="kernel: cycles at the fleet size")
    ap.add_argument("--trials", type=int, default=100, help="meter-to-gateway: frequency steps")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the summary")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    from v2grt.config import ConfigError

    config = args.config or _default_config()
    progress = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        r = run(config, args.vehicles, args.gateways, args.seconds, args.rounds, args.cycles, args.kernel_cycles,
                args.trials, args.out or None, progress, smoke=args.smoke)
    except ConfigError as exc:
        print(f"v2grt bench qualify: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
