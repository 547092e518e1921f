"""`v2grt journal export` and `v2grt journal convert`."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from v2grt.journal.format import JournalError
from v2grt.journal.read import convert, export_cycles, export_vehicles, vehicles_schema


# ------------------------------------------------------------------------------------------ CLI
def _parse_time(text: str, what: str) -> int:
    from v2grt.cli import CliError

    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"journal export: {what}={text!r} is not an ISO 8601 time (e.g. 2026-12-04T21:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)  # records are UTC; a time without a zone is read as UTC
    # integer arithmetic: a float timestamp in ns since 1970 is only good to ~0.25 us
    return (t - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)) // _dt.timedelta(microseconds=1) * 1000


def cmd_export(args) -> int:
    """Write one interval of the journal as Parquet or CSV (cycle records, or per-vehicle samples)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from v2grt.cli import EXIT_OK, CliError

    t0, t1 = _parse_time(args.start, "--from"), _parse_time(args.end, "--to")
    if t1 <= t0:
        raise CliError(f"journal export: --to {args.end} is not after --from {args.start}")
    if not Path(args.dir).is_dir():
        raise CliError(f"journal export: {args.dir}: no such directory")
    rows = 0
    try:
        if args.vehicles is None:
            table = export_cycles(args.dir, t0, t1)
            rows = 0 if table is None else table.num_rows
            if rows:
                (pq.write_table(table, args.out, compression="zstd") if args.format == "parquet"
                 else pcsv.write_csv(table, args.out))
        else:
            only = None if args.vehicles == "*" else set(args.vehicles.split(","))
            schema = vehicles_schema()
            tmp = Path(f"{args.out}.tmp")
            writer = (pq.ParquetWriter(tmp, schema, compression="zstd") if args.format == "parquet"
                      else pcsv.CSVWriter(tmp, schema))
            with writer:
                for batch in export_vehicles(args.dir, t0, t1, only):
                    writer.write_batch(batch)
                    rows += batch.num_rows
            if rows:
                os.replace(tmp, args.out)
            else:
                tmp.unlink(missing_ok=True)
    except JournalError as exc:
        raise CliError(f"journal export: {exc}") from None
    if not rows:
        raise CliError(f"journal export: {args.dir} holds no records between {args.start} and {args.end}", 1)
    print(f"{args.out}: {rows} {'cycle records' if args.vehicles is None else 'vehicle samples'}")
    return EXIT_OK


def cmd_convert(args) -> int:
    """Convert segments to Parquet (the writer does this for sealed segments itself)."""
    for p in args.segments:
        out = convert(p)
        print(" ".join(str(q) for q in out.values()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("journal", help="the dispatch journal: export an interval, convert segments (docs/journal.md)")
    jsub = p.add_subparsers(dest="journal_command", required=True, metavar="ACTION")
    e = jsub.add_parser("export", help="one interval as Parquet or CSV", description=cmd_export.__doc__)
    e.add_argument("dir", help="the journal directory (journal.dir; default <state_dir>/journal/<fleet_id>)")
    e.add_argument("--from", dest="start", required=True, help="start, ISO 8601 (UTC if no zone), inclusive")
    e.add_argument("--to", dest="end", required=True, help="end, ISO 8601 (UTC if no zone), exclusive")
    e.add_argument("--vehicles", nargs="?", const="*", default=None,
                   help="per-vehicle samples instead of cycle records; optionally only these ids (ID,ID,...)")
    e.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    e.add_argument("--out", required=True, help="output file")
    e.set_defaults(func=cmd_export)
    c = jsub.add_parser("convert", help="convert segments to Parquet", description=cmd_convert.__doc__)
    c.add_argument("segments", nargs="+")
    c.set_defaults(func=cmd_convert)
