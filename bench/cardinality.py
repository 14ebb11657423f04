"""Scenario 3: the same per-org usage as Prometheus series with an org_id label, scraped by a real
Prometheus, against meterhouse holding it: memory, series, disk per point, and "usage of org X over
the last 24 h" on each."""

from __future__ import annotations

import sys
import time
import urllib.parse
from pathlib import Path

import yaml

from bench.common import Proc, free_port, get, median_time, scrape, wait_http
from bench.ingest import start_up, wait_written
from bench.procstat import dir_bytes, memory


def prometheus_side(work: Path, orgs: int, seconds: float, interval_s: int) -> dict:
    port, prom_port = free_port(), free_port()
    exporter = Proc([sys.executable, "-m", "bench.promexporter", "--port", str(port), "--orgs", str(orgs)],
                    work / "promexporter.log")  # fmt: skip
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{interval_s}s", "scrape_timeout": f"{interval_s}s"},
        "scrape_configs": [{"job_name": "naive", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }))  # fmt: skip
    prom = Proc(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"], work / "prometheus.log")  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}"
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", 120, attempt_s=60)
        wait_http(f"{base}/-/ready", 60)
        t_scrape = median_time(lambda: get(f"http://127.0.0.1:{port}/metrics", 60), 3, warm=False)
        size = len(get(f"http://127.0.0.1:{port}/metrics", 60))
        time.sleep(seconds)
        # On a loaded machine the first scrapes can time out: wait (bounded) until one has landed, so the
        # figures describe Prometheus holding the orgs' series rather than an empty head.
        deadline = time.monotonic() + 120
        while True:
            m = scrape(f"{base}/metrics")
            if m.get("prometheus_tsdb_head_series", 0) >= orgs or time.monotonic() > deadline:
                break
            time.sleep(interval_s)
        q = urllib.parse.urlencode(
            {"query": 'sum(increase(usage_api_requests_total{org_id="org-000042"}[24h]))'}
        )
        t_query = median_time(lambda: get(f"{base}/api/v1/query?{q}"), warm=False)
        samples = m.get("prometheus_tsdb_head_samples_appended_total", 0) or sum(
            v for _, v in m.get("prometheus_tsdb_head_samples_appended_total{}", []))  # fmt: skip
        return {
            "system": f"Prometheus (org_id label, {interval_s}s scrape)",
            "series": int(m.get("prometheus_tsdb_head_series", 0)),
            "rss_mb": m.get("process_resident_memory_bytes", 0) / 2**20,
            "scrape_s": t_scrape,
            "scrape_mb": size / 2**20,
            "bytes_per_point": dir_bytes(work / "tsdb") / max(samples, 1),
            "org_24h_query_s": t_query,
        }
    finally:
        prom.stop()
        exporter.stop()


def meterhouse_side(work: Path, orgs: int, rounds: int) -> dict:
    import pickle

    from bench.common import run_load
    from bench.payloads import make_requests

    per_request = min(5000, orgs * 5)
    requests = max(1, orgs * 5 * rounds // per_request)
    payloads, total = make_requests(orgs, per_request, requests, seed=3)
    path = work / "card-payloads.pkl"
    with open(path, "wb") as f:
        pickle.dump((payloads, total // requests), f)
    proc, ports = start_up(work, "up-card")
    api = f"http://127.0.0.1:{ports['api']}"
    try:
        load = run_load(path, f"http://127.0.0.1:{ports['http']}", "http")
        wait_written(api, load["points"])
        text = get(f"{api}/metrics").decode()
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        now = int(time.time())
        hour = "%Y-%m-%dT%H:00:00Z"
        window = {
            "from": time.strftime(hour, time.gmtime(now - 86400)),
            "to": time.strftime(hour, time.gmtime(now + 3600)),
        }
        q = urllib.parse.urlencode({"metric": "api.requests", "step": "1h", **window})
        t_query = median_time(lambda: get(f"{api}/api/v1/orgs/org-000042/usage?{q}"), warm=False)
        t_scrape = median_time(lambda: get(f"{api}/metrics"), 10, warm=False)
        time.sleep(2)  # let parts settle before measuring disk
        return {
            "system": "meterhouse",
            "series": series,
            "rss_mb": memory(proc.pid)["rss"] / 2**20,
            "scrape_s": t_scrape,
            "scrape_mb": len(text) / 2**20,
            "bytes_per_point": dir_bytes(work / "up-card" / "clickhouse") / max(load["points"], 1),
            "org_24h_query_s": t_query,
        }
    finally:
        proc.stop()


COLUMNS = ["system", "series", "rss_mb", "scrape_s", "scrape_mb", "bytes_per_point", "org_24h_query_s"]


def run(work: Path, quick: bool) -> dict:
    orgs = 2_000 if quick else 15_000
    seconds, interval = (6, 2) if quick else (120, 15)
    rows = [
        prometheus_side(work, orgs, seconds, interval),
        meterhouse_side(work, orgs, max(2, seconds // interval)),
    ]
    p, m = rows
    return {"orgs": orgs, "seconds": seconds, "rows": rows,
            "ratios_meterhouse_over_prometheus": {k: m[k] / p[k] for k in COLUMNS[1:] if p[k]}}  # fmt: skip
