"""Scenarios 1 and 2: ingest throughput, CPU and lag of `meterhouse up` (HTTP and gRPC) with its
durability settings on (fsync'd spool, dedup), against the naive baseline, with the same load."""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

from bench.common import Proc, free_port, lag_buckets, quantile, run_load, scrape, wait_http
from bench.payloads import make_fleet_requests, make_requests
from bench.procstat import cpu_seconds, memory


def prepare(work: Path, orgs: int, points_per_request: int, requests: int, tag: str = "") -> tuple[Path, int]:
    """Payloads whose points are all new: their times follow the clock, so points prepared later (for
    the paced runs) are later intervals of the same streams, never repeats (which point identity would
    rightly count zero, and the benchmark would wait for forever)."""
    payloads, total = make_requests(orgs, points_per_request, requests)
    path = work / f"payloads-{orgs}-{points_per_request}-{requests}{tag}.pkl"
    with open(path, "wb") as f:
        pickle.dump((payloads, total // requests), f)
    return path, total


_fleet_next_ns = [0]  # where the next fleet payloads' times start (after every earlier one's)


def prepare_fleet(
    work: Path, orgs: int, points_per_request: int, requests: int, tag: str = "", once: bool = False
) -> tuple[Path, int]:
    """Payloads of the realistic fleet (``make_fleet_requests``), each set's times after the last's, so
    no stream's interval comes twice; ``once``: every series' first point (the warm-up)."""
    start = max(_fleet_next_ns[0], time.time_ns() - 3600 * 10**9)
    payloads, total, _fleet_next_ns[0] = make_fleet_requests(
        orgs, points_per_request, requests, start, once=once
    )
    requests = len(payloads)
    path = work / f"fleet-{orgs}-{points_per_request}-{requests}{tag}.pkl"
    with open(path, "wb") as f:
        pickle.dump((payloads, total // requests), f)
    return path, total


def start_up(work: Path, name: str) -> tuple[Proc, dict]:
    ports = {"http": free_port(), "grpc": free_port(), "api": free_port()}
    data = work / name
    proc = Proc([sys.executable, "-m", "meterhouse", "up", "--data-dir", str(data),
                 "--otlp-http-port", str(ports["http"]), "--otlp-grpc-port", str(ports["grpc"]),
                 "--http-port", str(ports["api"]), "--log-format", "json", "--health-refresh-s", "3600"],
                work / f"{name}.log")  # fmt: skip
    wait_http(f"http://127.0.0.1:{ports['api']}/readyz", 120)
    return proc, ports


def wait_written(api: str, expected: float, timeout_s: float = 600) -> float:
    """When the server's counter of written points reaches ``expected``. Polled every 0.1 s: a scrape
    costs the server about a millisecond, and at 50 a second they were 1.3-1.8 CPU-s of its million
    points (BENCHMARKS.md §14), charged to the server by the benchmark itself."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if scrape(f"{api}/metrics").get("meterhouse_points_written_total", 0) >= expected:
            return time.monotonic()
        time.sleep(0.1)
    raise RuntimeError("points were not all written in time")


def meterhouse(
    work: Path,
    transport: str,
    payloads: Path,
    total: int,
    rate_seconds: float,
    per_request: int,
    orgs: int,
    make=prepare,
    data: str = "all-new",
    warm: Path | None = None,
) -> dict:
    """``warm``: payloads sent and written before anything is measured (the fleet's every series once)."""
    proc, ports = start_up(work, f"up-{transport}-{per_request}-{data}")
    api = f"http://127.0.0.1:{ports['api']}"
    target = f"http://127.0.0.1:{ports['http']}" if transport == "http" else f"127.0.0.1:{ports['grpc']}"
    try:
        warmed = 0
        if warm is not None:
            warmed = run_load(warm, target, transport)["points"]
            wait_written(api, warmed)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.monotonic()
        load = run_load(payloads, target, transport)
        t1 = wait_written(api, warmed + load["points"])
        cpu = cpu_seconds(proc.pid) - cpu0
        max_rate = load["points"] / (t1 - t0)
        result = {
            "system": f"meterhouse ({transport})",
            "data": data,
            "points_per_request": per_request,
            "points": load["points"],
            "points_per_s": max_rate,
            "cpu_s_per_million": cpu / load["points"] * 1e6,
            "rejected_retries": load["retries"],
        }
        written = warmed + load["points"]
        for share in (0.5, 0.9):
            sends = int(max_rate * share * rate_seconds / per_request * 1.5) + 2
            paced, _ = make(work, orgs, per_request, sends, f"-{transport}-{int(share * 100)}")
            before = lag_buckets(scrape(f"{api}/metrics"))
            run = run_load(paced, target, transport, rate=max_rate * share, seconds=rate_seconds)
            written += run["points"]
            wait_written(api, written)
            after = lag_buckets(scrape(f"{api}/metrics"))
            delta = [(le, c - dict(before).get(le, 0)) for le, c in after]
            result[f"p50_lag_s_at_{int(share * 100)}pct"] = quantile(0.5, delta)
            result[f"p99_lag_s_at_{int(share * 100)}pct"] = quantile(0.99, delta)
        result["peak_rss_mb"] = memory(proc.pid)["peak_rss"] / 2**20
        return result
    finally:
        proc.stop()


def naive(work: Path, payloads: Path, total: int, per_request: int, data: str = "all-new") -> dict:
    port = free_port()
    name = f"naive-{per_request}-{data}"
    proc = Proc([sys.executable, "-m", "bench.naive", "--port", str(port), "--data-dir", str(work / name)],
                work / f"{name}.log")  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while b"ready" not in (work / f"{name}.log").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu0 = cpu_seconds(proc.pid)
        load = run_load(payloads, f"http://127.0.0.1:{port}", "http")
        cpu = cpu_seconds(proc.pid) - cpu0
        return {
            "system": "naive baseline (http)",
            "data": data,
            "points_per_request": per_request,
            "points": load["points"],
            "points_per_s": load["points"] / load["seconds"],
            "cpu_s_per_million": cpu / max(load["points"], 1) * 1e6,
            "peak_rss_mb": memory(proc.pid)["peak_rss"] / 2**20,
        }
    finally:
        proc.stop()


COLUMNS = [
    "system", "data", "points_per_request", "points", "points_per_s", "cpu_s_per_million", "p50_lag_s_at_50pct", "p99_lag_s_at_50pct",
    "p50_lag_s_at_90pct", "p99_lag_s_at_90pct", "peak_rss_mb",
]  # fmt: skip


def run(work: Path, quick: bool, orgs: int = 15_000) -> dict:
    """Requests of 5,000 points (a gateway Collector batching) over HTTP and gRPC, and of 50 points (many
    SDKs exporting a few series each) over HTTP, each against the naive baseline with the same load; then
    the realistic fleet (``make_fleet_requests``: each series every 10-60 s) in 5,000-point requests over
    HTTP, measured once the collector has seen every series of the fleet (as one running for a minute
    has), against the naive baseline with that load."""
    rate_seconds = 1 if quick else 10
    rows, ratios = [], {}
    for per_request, requests, transports, data in (
        (2_000 if quick else 5_000, 12 if quick else 120, ("http", "grpc"), "all-new"),
        (50, 200 if quick else 4_000, ("http",), "all-new"),
        (2_000 if quick else 5_000, 12 if quick else 240, ("http",), "fleet"),
    ):
        make = prepare_fleet if data == "fleet" else prepare
        warm = prepare_fleet(work, orgs, per_request, 0, "-warm", once=True)[0] if data == "fleet" else None
        payloads, total = make(work, orgs, per_request, requests)
        mine = [
            meterhouse(work, t, payloads, total, rate_seconds, per_request, orgs, make, data, warm)
            for t in transports
        ]
        base = naive(work, payloads, total, per_request, data)
        rows += [*mine, base]
        for r in mine:
            ratios[f"{r['system']}, {per_request} points/request, {data}"] = (
                r["points_per_s"] / base["points_per_s"]
            )
    return {"orgs": orgs, "rows": rows, "throughput_ratio_vs_naive": ratios}
