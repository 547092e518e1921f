"""OCPP payload checks: the gateway's compiled schemas against the `ocpp` package's jsonschema, side by side.

    v2grt bench ocpp_schema [--messages 20000] [--rounds 5] [--json]

The same MeterValues request (SoC and exported power, as the simulated stations send it) is checked by
v2grt.gateway.ocpp_schema.validate (the package's shipped schemas compiled by fastjsonschema) and by the
`ocpp` package's own check (`ocpp.messages._validate_payload`, jsonschema Draft 4), alternating in
--rounds slices so drift on a shared machine hits both alike. Reported: per-message p50/p99 in
microseconds for each side and the ratio of the medians. Both reach the same verdicts
(tests/test_ocpp_schema.py); this measures only their cost.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from v2grt.bench._common import add_smoke_option, apply_smoke, emit, machine, source_state, table

METER = {"evseId": 1, "meterValue": [{"timestamp": "2026-12-05T00:00:00.000Z", "sampledValue": [
    {"measurand": "SoC", "value": 55.2, "unitOfMeasure": {"unit": "Percent"}},
    {"measurand": "Power.Active.Export", "value": 8800.0}]}]}


def _time_each(fn, n: int) -> list[int]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def run(messages: int, rounds: int) -> dict:
    from ocpp.messages import Call, _validate_payload

    from v2grt.gateway import ocpp_schema

    ours = lambda: ocpp_schema.validate("2.1", "MeterValues", METER)
    call = Call("1", "MeterValues", copy.deepcopy(METER))
    theirs = lambda: _validate_payload(call, "2.1")
    ours(), theirs()  # compile and load the schemas outside the timing
    a, b = [], []
    for _ in range(rounds):
        a += _time_each(ours, messages // rounds)
        b += _time_each(theirs, messages // rounds)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] / 1e3

    res = {side: {"n": len(x), "p50_us": pct(x, 50), "p99_us": pct(x, 99)} for side, x in
           (("compiled", a), ("ocpp_package", b))}
    return {"benchmark": "ocpp_schema", "machine": machine(), "source": source_state(),
            "config": {"messages": messages, "rounds": rounds, "payload": "MeterValues (OCPP 2.1)"},
            "results": res, "ratio_p50": res["ocpp_package"]["p50_us"] / max(res["compiled"]["p50_us"], 1e-9)}


def render(r: dict) -> str:
    rows = [[side, x["n"], x["p50_us"], x["p99_us"]] for side, x in r["results"].items()]
    return (f"OCPP MeterValues schema check per message on {r['machine']['cpu']}\n"
            + table(["check", "messages", "p50 us", "p99 us"], rows)
            + f"\nthe package's check / the compiled one, p50: {r['ratio_p50']:.1f}x")


#: --smoke: a few seconds at a tiny size (structure and counts, not timing).
SMOKE = {"messages": 200, "rounds": 2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="v2grt bench ocpp_schema", description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000, help="checks per side, in total")
    ap.add_argument("--rounds", type=int, default=5, help="alternating slices per side")
    add_smoke_option(ap, SMOKE)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args(argv)
    apply_smoke(ap, args, SMOKE)
    emit(run(args.messages, args.rounds), args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
