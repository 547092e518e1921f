"""`v2grt demo --ha`: two aggregators under etcd on the HA rig, the leader killed midway, the gap reported.

The rig (v2grt.harig) runs etcd, aggregators A and B, a SunSpec meter and ``--gateways`` simulated
gateways, each a host of its own (a network namespace as root, else loopback). A leads; at half of
``--duration`` the demo kills it (kill -9), B takes over once A's lease expired at etcd, and the demo
says what the gateways saw: the gap in setpoints, whether any frame of two leaders was accepted, and
the fleet's power through the gap. A is then restarted and comes back as the standby. Everything is
torn down at the end (or on Ctrl-C); ``report.json`` and the rig's logs stay in ``--out``.

The meter holds one frequency (below the deadband, so the fleet discharges and the gap shows in its
power): this demo is about failover, not about tracking a trace (plain ``v2grt demo`` is).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

#: Sizes when --vehicles / --gateways are left at the plain demo's defaults (10,000 / 20 would be 20
#: gateway processes and two full aggregators on one machine: the failover is the same at 400).
HA_VEHICLES, HA_GATEWAYS = 400, 4


def run_ha(args, default_vehicles: int, default_gateways: int, period_s: float) -> int:
    """The HA demo; returns the exit code (0, 1 on a failure, 130 on Ctrl-C)."""
    from v2grt import harig

    vehicles = HA_VEHICLES if args.vehicles == default_vehicles else args.vehicles
    gateways = HA_GATEWAYS if args.gateways == default_gateways else args.gateways
    if not 1 <= gateways <= 20 or gateways > vehicles:
        print(f"v2grt demo --ha: --gateways {gateways}: expected 1..20 and at most --vehicles", file=sys.stderr)
        return 2
    if not 6.0 <= args.duration <= 3600.0:
        print(f"v2grt demo --ha: --duration {args.duration}: expected 6..3600 s", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = harig.RigConfig(gateways=gateways, vehicles=vehicles, period_s=period_s, service=args.service,
                          capacity_kw=args.capacity_kw or 5.0 * vehicles, seed=args.seed)
    say = print
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        say(f"v2grt demo --ha: etcd, aggregators A and B, a meter and {gateways} gateways ({vehicles} vehicles), "
            f"lease {cfg.lease_ttl_s} s, period {period_s * 1e3:g} ms; files in {out}")
        t_start = time.monotonic()
        with harig.Rig(out / "rig", cfg) as rig:
            where = ("each in its own network namespace" if rig.netns
                     else f"on loopback ({rig.reason})")
            say(f"  up in {time.monotonic() - t_start:.1f} s, {where}; leader {rig.leader()}")
            report = _run(rig, args.duration, say)
        report.update({"vehicles": vehicles, "gateways": gateways, "period_s": period_s,
                       "lease_ttl_s": cfg.lease_ttl_s, "netns": rig.netns, "loopback_reason": rig.reason,
                       "rig_tag": rig.tag})
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        _summary(report, say)
        say(f"  report: {out / 'report.json'}; logs: {out / 'rig'}")
        return 0 if report["double_leader"] == 0 and report["stale_after_newer"] == 0 else 1
    except KeyboardInterrupt:
        print("v2grt demo --ha: interrupted; everything stopped", file=sys.stderr)
        return 130
    except harig.RigError as exc:
        print(f"v2grt demo --ha: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the rig's `with` tears everything down


def _line(rig, t0: float, say) -> None:
    recs = rig.records()
    now = time.monotonic_ns()
    epochs = [int(r.accepted[-1, 1]) for r in recs.values() if len(r.accepted) and now - r.accepted[-1, 0] < 5e8]
    kw = sum(float(r.power[-1, 1]) for r in recs.values() if len(r.power))
    shown = ", ".join(f"{e}" for e in sorted(set(epochs))) or "none"
    say(f"  t={time.monotonic() - t0:5.1f} s  leader {rig.leader() or '-':4s} gateways with fresh setpoints "
        f"{len(epochs)}/{len(recs)} (epoch {shown})  fleet {kw:+,.1f} kW")


def _run(rig, duration_s: float, say) -> dict:
    from v2grt import harig

    t0 = time.monotonic()
    kill_at = t0 + duration_s / 2
    while time.monotonic() < kill_at:
        _line(rig, t0, say)
        time.sleep(min(1.0, max(0.0, kill_at - time.monotonic())))
    old = rig.wait_leader()
    pid = rig.procs[old].popen.pid
    say(f"  kill -9 of the leader {old} (pid {pid})")
    r = harig.fault_kill9(rig)
    say(f"  {r['new']} leads with epoch {r['new_epoch']} (was {r['old_epoch']}); gap at the gateways "
        f"{r['gap_max_s']:.3f} s")
    rig.start_aggregator(old)
    say(f"  {old} restarted: it comes back as the standby")
    while time.monotonic() < t0 + duration_s:
        _line(rig, t0, say)
        time.sleep(min(1.0, max(0.0, t0 + duration_s - time.monotonic())))
    # The restarted process may still be starting (imports, its etcd session) when the duration is up on a loaded
    # host: its role once it answers, within a bound (a role read once at the end said None under two busy loops).
    deadline = time.monotonic() + 30.0
    while (st := rig.status(old)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    r["restarted_role"] = st["ha"]["role"] if st else None
    r.pop("published", None)
    return r


def _summary(r: dict, say) -> None:
    say(f"\nv2grt demo --ha: leader {r['old']} killed, {r['new']} took over: setpoint gap at the gateways "
        f"{r['gap_max_s']:.3f} s (per gateway: " + ", ".join(f"{g} {v:.3f}" for g, v in r["gap_s"].items()) + ")")
    say(f"  frames of two leaders accepted: {r['double_leader']}; older epoch after a newer: "
        f"{r['stale_after_newer']}; epochs seen: {r['epochs']}")
    say(f"  fleet power: {r['p_before_kw']:+,.1f} kW before, {r['p_min_kw']:+,.1f} kW at the lowest, at 0 kW for "
        f"{r['p_zero_s']:.2f} s (setpoints expire after 3 periods; the lease is {r['lease_ttl_s']} s)")
    say(f"  {r['old']} after its restart: {r['restarted_role']}")
