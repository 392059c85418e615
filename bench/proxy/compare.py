#!/usr/bin/env python3
# A generic proxy benchmark harness written before tendril, copied unchanged (see README.md);
# tendril's targets come in through EXTRA_TARGET, started by tendril-up.sh.
"""Compare / pool several result directories of bench.py.

usage: python3 compare.py results/RUN_A [results/RUN_B ...]

Prints, per test and target, the median within-round TPS ratio to direct of each
run and of all rounds pooled, the pooled median TPS, p50/p99 (lat1), and the
proxy's CPU microseconds per transaction. Of retried runs, the least contaminated
attempt is used (as in bench.py's summary).
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TESTS, us_per_txn, pick_attempts  # noqa: E402


def load(d):
    with open(os.path.join(d, "runs.jsonl")) as f:
        runs = [json.loads(l) for l in f if l.strip()]
    return pick_attempts(runs)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=2):
    return "-" if x is None else f"{x:,.{nd}f}"


def main(dirs):
    per_run = []
    for d in dirs:
        runs = load(d)
        base = {(r["test"], r["round"]): r for r in runs if r["target"] == "direct"}
        per_run.append((os.path.basename(d.rstrip("/")), runs, base))
    # Runs from before the topology was recorded are local (README.md, "Topologies").
    topo = {n: sorted({r.get("topology", "local") for r in runs}) for n, runs, _ in per_run}
    print("topology: " + ", ".join(f"{n} {'/'.join(t)}" for n, t in topo.items()))
    if len({t for ts in topo.values() for t in ts}) > 1:
        print("warning: these runs measured different topologies; the pooled columns mix them",
              file=sys.stderr)
    targets = []
    for _, runs, _ in per_run:
        for r in runs:
            if r["target"] not in targets:
                targets.append(r["target"])
    for test in TESTS:
        if not any(r["test"] == test for _, runs, _ in per_run for r in runs):
            continue
        lat = TESTS[test].get("txn_log")
        print(f"\n## {TESTS[test]['desc']}\n")
        hdr = ["target"] + [f"ratio {n}" for n, _, _ in per_run] + ["ratio pooled", "TPS pooled"]
        if lat:
            hdr += ["p50 us", "p99 us", "p99 ratio pooled"]
        hdr += ["proxy us/txn", "foreign CPU% med"]
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
        for t in targets:
            row, pooled, tps, p50, p99, p99r, cost, foreign = [t], [], [], [], [], [], [], []
            for _, runs, base in per_run:
                rs = [r for r in runs if r["test"] == test and r["target"] == t]
                ratios = []
                for r in rs:
                    b = base.get((test, r["round"]))
                    if b and b.get("tps") and r.get("tps"):
                        ratios.append(r["tps"] / b["tps"])
                        if b.get("p99_us") and r.get("p99_us"):
                            p99r.append(r["p99_us"] / b["p99_us"])
                    tps.append(r.get("tps"))
                    p50.append(r.get("p50_us"))
                    p99.append(r.get("p99_us"))
                    cost.append(us_per_txn(r, r["cpu"]["proxy_pct"].get(t)))
                    foreign.append(r["cpu"]["foreign_pct"])
                pooled += ratios
                row.append(f(med(ratios), 3) + (f" ({'/'.join(f(x, 2) for x in ratios)})" if ratios else ""))
            if not tps:
                continue
            row += [f(med(pooled), 3), f(med(tps), 0)]
            if lat:
                row += [f(med(p50), 0), f(med(p99), 0), f(med(p99r), 2)]
            row += [f(med(cost), 1), f(med(foreign), 0)]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
