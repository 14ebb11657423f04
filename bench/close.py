"""Scenario 6: the monthly close of N orgs × 4 metrics, from raw points, checked against the rollup.
Runs in its own process (one embedded engine per process): ``python -m bench.close --orgs N --data-dir DIR``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("api.requests", "rows.processed", "credits.spent", "storage.bytes")
NS = 10**9


def load(store, month, orgs: int, per_series: int) -> int:
    """``per_series`` points for every org and metric, spread over the month."""
    from meterhouse.collector.model import BATCH_COLUMNS

    span = (month.end_ns - month.start_ns) // per_series
    total, cols = 0, None

    def flush() -> None:
        nonlocal cols, total
        if cols and cols["org_id"]:
            token = f"close-load-{time.time_ns()}"
            store.insert_points([cols[n] for n in BATCH_COLUMNS] + [[token] * len(cols["org_id"])], token)
            total += len(cols["org_id"])
        cols = {n: [] for n in BATCH_COLUMNS}

    flush()
    for i in range(orgs):
        org = f"org-{i:06d}"
        for metric in METRICS:
            for k in range(per_series):
                t = month.start_ns + k * span + i
                for n, v in (("org_id", org), ("metric", metric), ("kind", "sum"), ("unit", "1"), ("monotonic", 1),
                             ("start_time", t), ("time", t), ("is_int", 1), ("value_int", i + k + 1),
                             ("value_double", 0.0), ("attr_keys", ["region"]), ("attr_values", ["eu"]),
                             ("resource_keys", []), ("resource_values", []), ("scope_name", ""),
                             ("scope_version", ""), ("received_at", t), ("temporality", 1), ("series_id", 0),
                             ("series_start", 0), ("cumulative_int", 0), ("cumulative_double", 0.0)):  # fmt: skip
                    cols[n].append(v)
        if len(cols["org_id"]) >= 200_000:
            flush()
    flush()
    return total


def measure(orgs: int, data_dir: Path, per_series: int) -> dict:
    from meterhouse.core import close, datadir
    from meterhouse.core.config import Config
    from meterhouse.core.store import open_store

    datadir.lock(data_dir)  # one process per data directory, as the meterhouse commands
    store = open_store(Config(data_dir=data_dir))
    month = close.Month.of_ns(time.time_ns()).previous().previous().previous()
    t = time.perf_counter()
    points = load(store, month, orgs, per_series)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    # The load is over, so nothing is in flight: nothing to wait for before the cutoff.
    record = close.close_month(store, month, late_window_days=35, progress=close.terminal_progress())
    close_s = time.perf_counter() - t
    t = time.perf_counter()
    again = close.close_month(store, month, late_window_days=35)
    again_s = time.perf_counter() - t
    assert again == record and record.reconciled and record.lines == orgs * len(METRICS)
    return {"orgs": orgs, "metrics": len(METRICS), "points": points, "lines": record.lines, "load_s": load_s,
            "close_s": close_s, "orgs_per_s": orgs / close_s, "reclose_s": again_s,
            "reconciled": record.reconciled}  # fmt: skip


COLUMNS = ["orgs", "metrics", "points", "lines", "close_s", "orgs_per_s", "reclose_s", "reconciled"]


def run(work: Path, quick: bool) -> dict:
    orgs, per_series = (2_000, 2) if quick else (100_000, 3)
    cmd = [sys.executable, "-m", "bench.close", "--orgs", str(orgs), "--data-dir", str(work / f"close-{orgs}"),
           "--per-series", str(per_series)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return {"rows": [json.loads(r.stdout.strip().splitlines()[-1])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orgs", type=int, required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--per-series", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(measure(args.orgs, Path(args.data_dir), args.per_series)))


if __name__ == "__main__":
    main()
