"""``python -m bench [--quick] [--only NAME ...] [--out FILE]``: run the scenarios, print a table each
and write the results as JSON (default ``bench-results.json``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    breakdown,
    cardinality,
    close,
    groupmem,
    identity,
    ingest,
    insertkeys,
    query,
    scale,
    steady,
    vm_exactness,
    vm_ingest,
    vm_query,
)
from bench.common import table

SCENARIOS = {
    "ingest": (
        ingest,
        "1-2. Ingest throughput, CPU and lag: meterhouse (HTTP, gRPC; all-new series and the realistic fleet) against the naive baseline",
    ),
    "cardinality": (cardinality, "3. Per-org usage as Prometheus series (org_id label) against meterhouse"),
    "query": (query, "4. Query latency, rollup against raw"),
    "scale": (scale, "5. Scale curve: the same points from 1k to 100k orgs"),
    "close": (close, "6. Monthly close: 100k orgs x 4 metrics from raw points, checked against the rollup"),
    "vm-ingest": (vm_ingest, "7. Ingest beside VictoriaMetrics: 5,000- and 48-sample requests"),
    "vm-query": (vm_query, "8. Queries beside VictoriaMetrics: one org over 24 h and 30 days, top 20 orgs"),
    "vm-exactness": (
        vm_exactness,
        "9. Exactness beside VictoriaMetrics: big integers, a re-sent request, a late sample",
    ),
    "breakdown": (breakdown, "10. Where a point's CPU goes: parse, decode, encode, insert with each view"),
    "identity": (
        identity,
        "11. Point identity: the edge's marking, its memory per stream, the writer's check",
    ),
    "groupmem": (groupmem, "12. A group's memory in the writer: peak RSS against the group's bytes"),
    "insertkeys": (insertkeys, "13. An insert's engine memory against its distinct attribute keys"),
    "steady": (steady, "14. The realistic fleet at its own rate for 30 minutes, merges included"),
}


def machine() -> dict:
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)  # fmt: skip
    return {"cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform()}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the code, not the numbers")
    ap.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run (default: all)")
    ap.add_argument("--out", default="bench-results.json", help="where to write the JSON results")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="meterhouse-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine(),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"machine: {results['machine']}", flush=True)
    for name in args.only or list(SCENARIOS):
        module, title = SCENARIOS[name]
        print(f"\n== {title}", flush=True)
        started = time.monotonic()
        (work / name).mkdir(parents=True, exist_ok=True)
        res = module.run(work / name, args.quick)
        res["seconds"] = time.monotonic() - started
        results[name] = res
        print(table(res["rows"], module.COLUMNS), flush=True)
        for key in ("throughput_ratio_vs_naive", "ratios_meterhouse_over_prometheus"):
            if key in res:
                print(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in res[key].items()), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))  # what is done so far
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
