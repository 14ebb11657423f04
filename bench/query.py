"""Scenario 4: query latency at 1k, 10k and 100k orgs, raw table against rollup, with the SQL the API
and dashboards use. Each scale runs in its own process (one embedded engine per process):
``python -m bench.query --orgs N --data-dir DIR``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import median_time

DAY = 86400
NS = 10**9


def load(store, orgs: int, per_org_month: int, per_org_year: int) -> int:
    """Points for every org: ``per_org_month`` over the last 30 days and ``per_org_year`` over the year."""
    from meterhouse.collector.model import BATCH_COLUMNS

    now = int(time.time()) // 3600 * 3600
    total, batch = 0, []

    def flush() -> None:
        nonlocal batch
        if not batch:
            return
        cols = {n: [] for n in BATCH_COLUMNS}
        for org, t, v in batch:
            for n, value in (("org_id", org), ("metric", "api.requests"), ("kind", "sum"), ("unit", "1"),
                             ("monotonic", 1), ("start_time", t), ("time", t), ("is_int", 1), ("value_int", v),
                             ("value_double", 0.0), ("attr_keys", ["feature", "region"]),
                             ("attr_values", [["search", "export"][v % 2], ["eu", "us"][v % 2]]),
                             ("resource_keys", []), ("resource_values", []), ("scope_name", ""),
                             ("scope_version", ""), ("received_at", t), ("temporality", 1), ("series_id", 0),
                             ("series_start", 0), ("cumulative_int", 0), ("cumulative_double", 0.0)):  # fmt: skip
                cols[n].append(value)
        token = f"load-{time.time_ns()}"
        store.insert_points([cols[n] for n in BATCH_COLUMNS] + [[token] * len(batch)], token)
        batch = []

    for i in range(orgs):
        org = f"org-{i:06d}"
        for k in range(per_org_month):
            batch.append((org, (now - k * 30 * DAY // per_org_month - 60) * NS, k + 1))
        for k in range(per_org_year):
            batch.append((org, (now - 30 * DAY - k * 335 * DAY // per_org_year) * NS, k + 1))
        if len(batch) >= 200_000:
            total += len(batch)
            flush()
    total += len(batch)
    flush()
    return total


def measure(orgs: int, data_dir: Path, per_org_month: int, per_org_year: int) -> dict:
    from meterhouse.core import datadir, schema
    from meterhouse.core.config import Config
    from meterhouse.core.store import open_store

    datadir.lock(data_dir)  # one process per data directory, as the meterhouse commands
    store = open_store(Config(data_dir=data_dir))
    t = time.perf_counter()
    points = load(store, orgs, per_org_month, per_org_year)
    load_s = time.perf_counter() - t
    store.client.command(f"OPTIMIZE TABLE {store.database}.{schema.HOURLY_TABLE} FINAL")
    now = int(time.time()) // 3600 * 3600 + 3600
    month = {"from_ns": (now - 30 * DAY) * NS, "to_ns": now * NS}
    year = {"from_ns": (now - 365 * DAY) * NS, "to_ns": now * NS}
    org = {"org": f"org-{orgs // 2:06d}", "metric": "api.requests"}
    db = store.database
    out = {"orgs": orgs, "points": points, "load_s": load_s}
    for source, rollup in (("rollup", True), ("raw", False)):
        out[f"org_30d_1h_{source}_s"] = median_time(
            lambda: store.rows(schema.usage_series_sql(db, "1h", rollup), {**org, **month})
        )  # noqa: B023
        out[f"org_365d_1d_{source}_s"] = median_time(
            lambda: store.rows(schema.usage_series_sql(db, "1d", rollup), {**org, **year})
        )  # noqa: B023
        out[f"top_orgs_30d_{source}_s"] = median_time(
            lambda: store.rows(
                schema.org_ranking_sql(db, rollup, "desc", False),
                {"metric": "api.requests", "limit": 20, **month},
            )
        )  # noqa: B023
    return out


def run_scale(orgs: int, work: Path, quick: bool) -> dict:
    per_month, per_year = (30, 12) if quick else (60, 52)
    cmd = [sys.executable, "-m", "bench.query", "--orgs", str(orgs), "--data-dir", str(work / f"query-{orgs}"),
           "--per-org-month", str(per_month), "--per-org-year", str(per_year)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


COLUMNS = ["orgs", "points", "org_30d_1h_rollup_s", "org_30d_1h_raw_s", "org_365d_1d_rollup_s", "org_365d_1d_raw_s",
           "top_orgs_30d_rollup_s", "top_orgs_30d_raw_s"]  # fmt: skip


def run(work: Path, quick: bool) -> dict:
    scales = (1_000, 5_000) if quick else (1_000, 10_000, 100_000)
    return {"rows": [run_scale(n, work, quick) for n in scales]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orgs", type=int, required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--per-org-month", type=int, default=60)
    ap.add_argument("--per-org-year", type=int, default=52)
    args = ap.parse_args()
    print(json.dumps(measure(args.orgs, Path(args.data_dir), args.per_org_month, args.per_org_year)))


if __name__ == "__main__":
    main()
