"""Scenario 6: ingest, meterhouse beside VictoriaMetrics, for 5,000- and 48-sample requests.

The same generated OTLP requests (15,000 orgs, 4 metrics, 3-5 attributes besides ``org.id``) go to
``meterhouse up`` over OTLP/HTTP and, translated to line protocol (``bench/victoria.py``), to
VictoriaMetrics' ``/write``, each from the same load process with 4 connections. Per system: samples/s
acknowledged (first request to last answer), samples/s queryable (first request to the moment all are
visible: committed in ClickHouse for meterhouse, returned by counting queries for VictoriaMetrics), CPU
per million, peak RSS, and disk per sample after the flush.

Almost every generated sample has a new attribute set, so VictoriaMetrics registers a new series for
nearly each one; its second pass sends the same lines again 60 s later, so that every series is known
(the steady state of a fleet that reports the same attribute sets every minute).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

from bench.common import run_load
from bench.ingest import prepare, start_up, wait_written
from bench.payloads import METRICS
from bench.procstat import cpu_seconds, dir_bytes, memory
from bench.victoria import Victoria, line_protocol


def translate(otlp_file: Path, out: Path, shift_ns: int = 0) -> tuple[Path, int]:
    with open(otlp_file, "rb") as f:
        payloads, _ = pickle.load(f)
    bodies, total = [], 0
    for p in payloads:
        body, n = line_protocol(p)
        if shift_ns:
            body = b"\n".join(_shift(line, shift_ns) for line in body.splitlines()) + b"\n"
        bodies.append(body)
        total += n
    with open(out, "wb") as f:
        pickle.dump((bodies, total // len(bodies)), f)
    return out, total


def _shift(line: bytes, shift_ns: int) -> bytes:
    head, _, ts = line.rpartition(b" ")
    return head + b" " + str(int(ts) + shift_ns).encode()


def meterhouse(work: Path, payloads: Path, per_request: int) -> dict:
    proc, ports = start_up(work, f"up-vs-{per_request}")
    api = f"http://127.0.0.1:{ports['api']}"
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        load = run_load(payloads, f"http://127.0.0.1:{ports['http']}", "http")
        t1 = wait_written(api, load["points"])
        cpu = cpu_seconds(proc.pid) - cpu0
        time.sleep(2)  # the spool and the parts written by the last insert settle
        return {
            "system": "meterhouse (OTLP/HTTP)",
            "per_request": per_request,
            "samples": load["points"],
            "acked_per_s": load["points"] / load["seconds"],
            "queryable_per_s": load["points"] / (t1 - t0),
            "cpu_s_per_million": cpu / load["points"] * 1e6,
            "peak_rss_mb": memory(proc.pid)["peak_rss"] / 2**20,
            "disk_bytes_per_sample": dir_bytes(work / f"up-vs-{per_request}" / "clickhouse") / load["points"],
            "spool_mb": dir_bytes(work / f"up-vs-{per_request}" / "spool") / 2**20,
        }
    finally:
        proc.stop()


def victoria(work: Path, passes: list[tuple[str, Path]], per_request: int) -> list[dict]:
    vm = Victoria(work, f"vm-{per_request}")
    rows, stored = [], 0
    try:
        for label, payloads in passes:
            cpu0, t0 = cpu_seconds(vm.pid), time.monotonic()
            load = run_load(payloads, vm.base, "influx")
            stored += load["points"]
            t1 = vm.wait_queryable(METRICS, stored)
            cpu = cpu_seconds(vm.pid) - cpu0
            vm.flush()
            time.sleep(2)
            rows.append({
                "system": f"VictoriaMetrics ({label})",
                "per_request": per_request,
                "samples": load["points"],
                "acked_per_s": load["points"] / load["seconds"],
                "queryable_per_s": load["points"] / (t1 - t0),
                "cpu_s_per_million": cpu / load["points"] * 1e6,
                "peak_rss_mb": memory(vm.pid)["peak_rss"] / 2**20,
                "disk_bytes_per_sample": dir_bytes(vm.data) / stored,
                "errors": load["errors"],
            })  # fmt: skip
        return rows
    finally:
        vm.stop()


COLUMNS = ["system", "per_request", "samples", "acked_per_s", "queryable_per_s", "cpu_s_per_million", "peak_rss_mb",
           "disk_bytes_per_sample", "spool_mb"]  # fmt: skip


def run(work: Path, quick: bool, orgs: int = 15_000) -> dict:
    sizes = ((2_000, 6), (48, 60)) if quick else ((5_000, 120), (48, 12_500))
    rows = []
    for per_request, requests in sizes:
        otlp, total = prepare(work, orgs, per_request, requests)
        new, _ = translate(otlp, work / f"lp-{per_request}.pkl")
        known, _ = translate(otlp, work / f"lp-{per_request}-again.pkl", shift_ns=60 * 10**9)
        rows.append(meterhouse(work, otlp, per_request))
        rows.extend(victoria(work, [("new series", new), ("known series", known)], per_request))
    return {"orgs": orgs, "rows": rows}
