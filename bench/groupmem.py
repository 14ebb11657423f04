"""Scenario 12: what one group costs in memory while the writer inserts it (``collector/writer.py``).

A real ``meterhouse up`` (embedded engine) is sent requests of one shape until its spool holds the group
size wanted, with the flush held back (a long ``--flush-interval-s``, no point or byte bound reached);
then its peak RSS is reset (``/proc/PID/clear_refs``) and the group is let go: the peak while it is
stamped, sent, squashed into one block, run through the materialized views and written as parts, less
the RSS just before, is the group's cost. Its ratio to the group's bytes (the spool's Native blocks,
``meterhouse_spool_uncommitted_bytes``) is the multiplier ``docs/capacity.md`` sizes ``--flush-max-bytes``
with.

Shapes: the benchmark's usage (5 short attributes, 5,000 points a request); points with 16 attributes of
4,000 characters each, all distinct; points at the attribute limits (127 attributes of 4,000 beside the org
characters); metrics whose names, units, scope names and versions are at their length limits.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from bench.common import free_port, scrape, wait_http
from bench.payloads import make_requests
from bench.procstat import memory

COLUMNS = ["shape", "group_mib", "points", "rss_before_mib", "peak_mib", "group_peak_mib", "multiplier"]
MIB = 1 << 20


def _kv(k: str, v: str) -> KeyValue:
    return KeyValue(key=k, value=AnyValue(string_value=v))


def _text(rng: random.Random, n: int) -> str:
    return rng.randbytes((n + 1) // 2).hex()[:n]


def _request(rng: random.Random, t0: int, points: int, attrs: int, length: int, names: int) -> bytes:
    """One request of ``points`` delta points, each with ``attrs`` distinct attributes of ``length``
    characters; ``names`` > 0: that many metrics with name, unit, scope name and version at their limits."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(_kv("service.name", "groupmem"))
    sm = rm.scope_metrics.add()
    sm.scope.name = _text(rng, 1024) if names else "bench"
    sm.scope.version = _text(rng, 1024) if names else ""
    metrics = max(1, names)
    for _ in range(metrics):
        m = sm.metrics.add(
            name=_text(rng, 1024) if names else "api.requests", unit=_text(rng, 255) if names else "1"
        )
        m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
        m.sum.is_monotonic = True
        for _ in range(points // metrics):
            dp = m.sum.data_points.add()
            dp.time_unix_nano = t0 + rng.randrange(10**12)
            dp.start_time_unix_nano = dp.time_unix_nano - 10**9
            dp.as_int = rng.randint(1, 1000)
            dp.attributes.append(_kv("org.id", f"org-{rng.randrange(100):03d}"))
            for a in range(attrs):
                dp.attributes.append(_kv(f"a{a:03d}", _text(rng, length)))
    return req.SerializeToString()


#: name: (points a request, attributes a point, attribute length, metrics with names at the limits), or
#: None for the benchmark's usage (``bench/payloads.py``).
SHAPES: dict[str, tuple[int, int, int, int] | None] = {
    "benchmark usage": None,
    "16 attributes x 4,000": (40, 16, 4000, 0),
    "127 attributes x 4,000": (4, 127, 4000, 0),
    "names at their limits": (2000, 1, 16, 50),
}
#: Bytes a request of each shape takes in the spool, roughly (to make enough of them).
_RECORD_BYTES = {"benchmark usage": 1_150_000, "16 attributes x 4,000": 2_700_000,
                 "127 attributes x 4,000": 2_100_000, "names at their limits": 6_000_000}  # fmt: skip
MIB = 1 << 20
FLUSH_AFTER_S = 20.0


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return int(r.status)


def _bodies(shape: str, group_bytes: int, rng: random.Random) -> list[bytes]:
    """Distinct requests of ``shape`` that fill about ``group_bytes`` of spool."""
    n = group_bytes // _RECORD_BYTES[shape] + 2
    params = SHAPES[shape]
    if params is None:
        return make_requests(15_000, 5_000, n, seed=rng.randrange(1 << 30))[0]
    t0 = time.time_ns() - 3600 * 10**9
    return [_request(rng, t0, *params) for _ in range(n)]


def measure(work: Path, shape: str, group_mib: int, flush_after_s: float = FLUSH_AFTER_S) -> dict:
    """One group of about ``group_mib`` MiB of ``shape`` through a fresh ``meterhouse up``: sent within
    ``flush_after_s`` of its first request, which is when the writer takes it."""
    rng = random.Random(group_mib)
    bodies = _bodies(shape, group_mib * MIB, rng)
    data = work / f"{shape.split()[0]}-{group_mib}"
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "meterhouse", "up", "--data-dir", str(data), "--otlp-http-port", str(ports[0]),
           "--otlp-grpc-port", str(ports[1]), "--http-port", str(ports[2]), "--flush-interval-s", str(flush_after_s),
           "--flush-max-points", "100000000", "--flush-max-bytes", str(1 << 40),
           "--spool-cache-bytes", str(1 << 40), "--log-format", "json"]  # fmt: skip
    log = open(work / f"{data.name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{ports[2]}"
    try:
        wait_http(f"{api}/readyz", 120)
        url = f"http://127.0.0.1:{ports[0]}/v1/metrics"
        first = time.monotonic()
        for body in bodies:
            _post(url, body)
        stats = scrape(f"{api}/metrics")
        group_bytes, points = stats["meterhouse_spool_uncommitted_bytes"], stats["meterhouse_pending_points"]
        before = memory(proc.pid)["rss"]
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        if time.monotonic() - first > flush_after_s - 1:
            raise RuntimeError(f"sending took longer than {flush_after_s} s: the flush may have begun")
        deadline = time.monotonic() + 600
        while scrape(f"{api}/metrics").get("meterhouse_pending_points", 1) > 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the group was not written")
            time.sleep(0.2)
        peak = memory(proc.pid)["peak_rss"]
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return {"shape": shape, "group_mib": round(group_bytes / MIB, 1), "points": int(points),
            "rss_before_mib": round(before / MIB), "peak_mib": round(peak / MIB),
            "group_peak_mib": round((peak - before) / MIB),
            "multiplier": round((peak - before) / group_bytes, 1)}  # fmt: skip


def run(work: Path, quick: bool) -> dict:
    if quick:  # one small group of one shape: checks the code, not the numbers
        return {"rows": [measure(work, "16 attributes x 4,000", 4, flush_after_s=6.0)]}
    return {"rows": [measure(work, shape, size) for shape in SHAPES for size in (16, 64)]}
