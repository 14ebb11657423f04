"""Helpers shared by the scenarios: processes on free loopback ports, scraping, histograms, tables."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def median_time(fn, n: int = 5, warm: bool = True) -> float:
    """Median wall time of ``fn()`` over ``n`` calls (after one unmeasured call when ``warm``)."""
    import statistics

    if warm:
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait_http(url: str, timeout_s: float = 60, attempt_s: float = 2) -> None:
    """Until ``url`` answers; each attempt may take ``attempt_s`` (an exposition of 75k series takes
    seconds to render on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            get(url, attempt_s)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s}s")


def scrape(url: str) -> dict:
    """name → value for unlabelled samples, and name → [(labels, value)] under name + '{}'."""
    out: dict = {}
    for family in text_string_to_metric_families(get(url).decode()):
        for s in family.samples:
            if s.labels:
                out.setdefault(s.name + "{}", []).append((s.labels, s.value))
            else:
                out[s.name] = s.value
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile over cumulative (le, count) pairs, as Prometheus interpolates."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return prev_le


def lag_buckets(metrics: dict) -> list[tuple[float, float]]:
    return [
        (float(labels["le"]), v) for labels, v in metrics.get("meterhouse_ingest_lag_seconds_bucket{}", [])
    ]


class Proc:
    """A subprocess in its own session, always stopped."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.log = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **(env or {})})  # fmt: skip

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self.log.close()


def run_load(payload_file: Path, target: str, transport: str, rate: float = 0, seconds: float = 0,
             connections: int = 4) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "bench.load", "--payloads", str(payload_file), "--target", target,
           "--transport", transport, "--rate", str(rate), "--seconds", str(seconds),
           "--connections", str(connections)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"load process failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)
