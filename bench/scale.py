"""Scenario 5: how ingest throughput, memory and the scrape change with the number of orgs (1k to
100k), the same number of points each time. The query side of the curve is scenario 4."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.common import get, run_load
from bench.ingest import prepare, start_up, wait_written
from bench.procstat import cpu_seconds, memory


def one(work: Path, orgs: int, requests: int, per_request: int) -> dict:
    payloads, total = prepare(work, orgs, per_request, requests)
    proc, ports = start_up(work, f"up-scale-{orgs}")
    api = f"http://127.0.0.1:{ports['api']}"
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        load = run_load(payloads, f"http://127.0.0.1:{ports['http']}", "http")
        t1 = wait_written(api, load["points"])
        cpu = cpu_seconds(proc.pid) - cpu0
        scrapes = []
        for _ in range(10):
            t = time.perf_counter()
            text = get(f"{api}/metrics").decode()
            scrapes.append(time.perf_counter() - t)
        return {
            "orgs": orgs,
            "points": load["points"],
            "points_per_s": load["points"] / (t1 - t0),
            "cpu_s_per_million": cpu / load["points"] * 1e6,
            "peak_rss_mb": memory(proc.pid)["peak_rss"] / 2**20,
            "metrics_series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
            "scrape_ms": statistics.median(scrapes) * 1000,
        }
    finally:
        proc.stop()


COLUMNS = [
    "orgs",
    "points",
    "points_per_s",
    "cpu_s_per_million",
    "peak_rss_mb",
    "metrics_series",
    "scrape_ms",
]


def run(work: Path, quick: bool) -> dict:
    scales = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
    requests, per_request = (4, 2_000) if quick else (80, 5_000)
    return {"rows": [one(work, n, requests, per_request) for n in scales]}
