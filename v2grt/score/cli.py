"""`v2grt score JOURNAL --service ...`: score a journal, write score.json and score.png."""

from __future__ import annotations

from pathlib import Path

from v2grt.journal.format import JournalError


def cmd_score(args) -> int:
    """Score a dispatch journal for a grid service, per settlement period (docs/services.md section 7)."""
    from v2grt.cli import EXIT_FAILED, EXIT_OK, CliError
    from v2grt.journal.cli import _parse_time
    from v2grt.report import write_json
    from v2grt.score.core import DEFAULT_TOLERANCE, parse_duration_s, score_journal
    from v2grt.score.plot import plot_score

    service = args.service or ("reg" if args.signal else None)
    if service is None:
        raise CliError("score: give --service NAME (dc, fcr, fcr_n, fcr_d_up, fcr_d_down, ffr, ..., reg) "
                       "or --signal FILE")
    opts: dict = {"keep_series": True, "delivered": args.delivered}
    try:
        if args.settlement_period:
            opts["settlement_period_s"] = parse_duration_s(args.settlement_period)
    except ValueError as exc:
        raise CliError(f"score: --settlement-period: {exc}") from None
    if args.start:
        opts["t0_ns"] = _parse_time(args.start, "--from")
    if args.end:
        opts["t1_ns"] = _parse_time(args.end, "--to")
    for key in ("capacity_kw", "nominal_hz", "window_s"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if service.strip().lower() in ("reg", "regulation", "pjm_reg"):
        if args.signal:
            opts["signal"] = args.signal
    else:
        if args.signal:
            raise CliError("score: --signal goes with --service reg (a regulation signal), not with a frequency curve")
        opts["tolerance"] = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE
    if not Path(args.journal).is_dir():
        raise CliError(f"score: {args.journal}: no such journal directory")
    try:
        score = score_journal(args.journal, service, **opts)
    except JournalError as exc:
        raise CliError(f"score: {exc}", EXIT_FAILED) from None
    except (ValueError, OSError) as exc:
        raise CliError(f"score: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_score(out / "score.png", score)
    score.pop("_series", None)
    write_json(out / "score.json", score)
    _print(score, out)
    return EXIT_OK


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _print(score: dict, out: Path) -> None:
    tot = score["total"]
    print(f"{score['service']}: {score['from']} .. {score['to']}, {len(score['periods'])} settlement period(s), "
          f"delivered = {score['delivered_source']}")
    if score["service"] == "reg":
        for p in score["periods"]:
            print(f"  {p['start']}  composite {p['composite'] if p['composite'] is None else round(p['composite'], 3)}"
                  f"  accuracy {p['accuracy']}  delay {p['delay']}  precision {p['precision']}  windows {p['windows']}")
        print(f"  total composite {tot['composite']}  pass {tot['pass']}")
    else:
        print("  period start              within tol   available   energy ratio  events  start/full ok"
              "  floor breaches")
        for p in score["periods"] + [{**tot, "start": "total"}]:
            e = p["energy"][score["delivered_source"]]["total"]["ratio"]
            ev = p["events"]
            ok = "/".join("-" if ev[k] is None else str(ev[k]) for k in ("start_ok", "full_ok"))
            print(f"  {p['start']:<25} {_pct(p['tolerance']['share']):>10}  {_pct(p['availability']['share']):>10}"
                  f"  {'-' if e is None else f'{e:.3f}':>12}  {ev['count']:>6}  {ok:>13}"
                  f"  {p['soc_floor']['breaches']:>14}")
    print(f"  written: {out / 'score.json'}, {out / 'score.png'}")


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score a dispatch journal for a grid service (docs/services.md section 7)",
                       description=cmd_score.__doc__)
    p.add_argument("journal", help="the journal directory (journal.dir)")
    p.add_argument("--service", help="dc, dc_low, dc_high, fcr, fcr_n, fcr_d_up, fcr_d_down, ffr, ffr_49.6, ffr_49.5, "
                                     "ieee1547, or reg (a regulation signal: PJM's composite score)")
    p.add_argument("--signal", help="regulation signal CSV (time,signal in -1..1); implies --service reg")
    p.add_argument("--from", dest="start", help="start, ISO 8601 (UTC if no zone), inclusive")
    p.add_argument("--to", dest="end", help="end, ISO 8601 (UTC if no zone), exclusive")
    p.add_argument("--settlement-period", help="settlement period, e.g. 30min (default), 1h (default for reg), 5min")
    p.add_argument("--capacity-kw", type=float, help="contracted capacity, kW (default: each record's capacity_kw; "
                                                     "for reg: the largest |base schedule|)")
    p.add_argument("--nominal-hz", type=float, help="50 or 60 (default: the service's own)")
    p.add_argument("--tolerance", type=float, help="band half-width, share of capacity (default 0.03)")
    p.add_argument("--window-s", type=float, help="lag the band allows, s (default: the service's full activation "
                                                  "time, else 1 s)")
    p.add_argument("--delivered", choices=["auto", "measured", "reported"], default="auto",
                   help="judge the site inverters' measured power or the vehicles' reports (auto: measured if any)")
    p.add_argument("--out", default="score-out", help="output directory for score.json and score.png")
    p.set_defaults(func=cmd_score)
