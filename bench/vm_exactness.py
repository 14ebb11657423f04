"""Scenario 8: exactness, what a billing team checks, meterhouse beside VictoriaMetrics.

Each check is one org's ``api.requests`` usage, sent as OTLP to ``meterhouse up`` and, as the same
samples in line protocol, to VictoriaMetrics, then read back as a total (the usage API's ``total``;
``sum(sum_over_time(...))`` at the end of the window):

- big integers: 2^53 + 1, 3 and 5 (exact total 2^53 + 9; a float64 holds 2^53 + 1 as 2^53);
- the same request twice: one request of 10, 20 and 30 sent twice, byte for byte, as a client retry
  after a lost answer does (the usage is 60 once);
- a late sample for last month: 7 at 12:00 UTC on the 1st of last month, sent now (the month's usage
  is 7 if it is kept).

VictoriaMetrics runs with its defaults, and for the late sample also with ``-retentionPeriod=13``
(its default retention is one month, so "last month" is partly outside it).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

from bench.common import get
from bench.ingest import start_up, wait_written
from bench.victoria import Victoria, exact, line_protocol

NS = 10**9
METRIC = "api.requests"
SERIES = "api_requests_value"


def request(org: str, samples: list[tuple[int, int]]) -> bytes:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name=METRIC, unit="1")
    m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    m.sum.is_monotonic = True
    for ts, value in samples:
        dp = m.sum.data_points.add(time_unix_nano=ts * NS, start_time_unix_nano=(ts - 60) * NS, as_int=value)
        dp.attributes.append(KeyValue(key="org.id", value=AnyValue(string_value=org)))
        dp.attributes.append(KeyValue(key="feature", value=AnyValue(string_value="search")))
    return req.SerializeToString()


def post(url: str, path: str, body: bytes, content_type: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def checks(now: int) -> list[dict]:
    today = datetime.fromtimestamp(now, UTC)
    this_month = datetime(today.year, today.month, 1, tzinfo=UTC)
    last = datetime(today.year - (today.month == 1), (today.month - 2) % 12 + 1, 1, tzinfo=UTC)
    late = int(last.timestamp()) + 12 * 3600
    recent = now - 2 * 3600
    return [
        {"check": "integer sum above 2^53", "org": "org-exact-big", "sends": 1,
         "samples": [(recent, 2**53 + 1), (recent + 1, 3), (recent + 2, 5)], "expected": 2**53 + 9,
         "window": (now - 86400, now)},
        {"check": "the same request sent twice", "org": "org-exact-twice", "sends": 2,
         "samples": [(recent, 10), (recent + 1, 20), (recent + 2, 30)], "expected": 60,
         "window": (now - 86400, now)},
        {"check": f"late sample for last month ({(now - late) // 86400} days ago)", "org": "org-exact-late",
         "sends": 1, "samples": [(late, 7)], "expected": 7,
         "window": (int(last.timestamp()), int(this_month.timestamp()))},
    ]  # fmt: skip


def meterhouse_side(work: Path, cases: list[dict]) -> list:
    proc, ports = start_up(work, "up-exact")
    api, otlp = f"http://127.0.0.1:{ports['api']}", f"http://127.0.0.1:{ports['http']}"
    try:
        statuses = []
        for c in cases:
            body = request(c["org"], c["samples"])
            statuses.append(
                [post(otlp, "/v1/metrics", body, "application/x-protobuf") for _ in range(c["sends"])]
            )
        wait_written(api, sum(len(c["samples"]) for c in cases), 120)
        time.sleep(3)  # past the flush interval: a second copy, if it were kept, would be written by now
        out = []
        for c, status in zip(cases, statuses, strict=True):
            frm, to = c["window"]
            q = urllib.parse.urlencode({"metric": METRIC, "step": "1d", "from": _iso(frm), "to": _iso(to)})
            out.append((json.loads(get(f"{api}/api/v1/orgs/{c['org']}/usage?{q}"))["total"], status))
        return out
    finally:
        proc.stop()


def victoria_side(
    work: Path, cases: list[dict], name: str, flags: tuple[str, ...] = ()
) -> tuple[list, float]:
    vm = Victoria(work, name, flags)
    try:
        statuses = []
        for c in cases:
            body, _ = line_protocol(request(c["org"], c["samples"]))
            statuses.append([post(vm.base, "/write", body, "text/plain") for _ in range(c["sends"])])
        deadline = time.monotonic() + 60
        while not vm.settled() and time.monotonic() < deadline:
            time.sleep(0.1)
        vm.flush()
        time.sleep(2)
        out = []
        for c, status in zip(cases, statuses, strict=True):
            frm, to = c["window"]
            result = vm.query(f'sum(sum_over_time({SERIES}{{org_id="{c["org"]}"}}[{to - frm}s]))', to, True)
            out.append((exact(result[0]["value"][1]) if result else None, status))
        ignored = vm.metrics().get('vm_rows_ignored_total{reason="small_timestamp"}', 0)
        return out, ignored
    finally:
        vm.stop()


COLUMNS = ["check", "expected", "meterhouse", "VictoriaMetrics", "VictoriaMetrics_retention_13"]


def run(work: Path, quick: bool) -> dict:
    cases = checks(int(time.time()))
    mh = meterhouse_side(work, cases)
    vm, vm_ignored = victoria_side(work, cases, "vm-exact")
    vm13, vm13_ignored = victoria_side(work, cases, "vm-exact-13", ("-retentionPeriod=13",))
    rows = []
    for c, (m, m_status), (v, v_status), (v13, _) in zip(cases, mh, vm, vm13, strict=True):
        rows.append({
            "check": c["check"], "expected": str(c["expected"]),
            "meterhouse": _shown(m), "VictoriaMetrics": _shown(v), "VictoriaMetrics_retention_13": _shown(v13),
            "meterhouse_exact": m == c["expected"], "victoria_exact": v == c["expected"],
            "victoria_retention_13_exact": v13 == c["expected"],
            "meterhouse_http_status": m_status, "victoria_http_status": v_status,
        })  # fmt: skip
    return {"rows": rows, "victoria_rows_ignored_small_timestamp": vm_ignored,
            "victoria_retention_13_rows_ignored_small_timestamp": vm13_ignored}  # fmt: skip


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _shown(total) -> str:
    return "no data" if total is None else str(total)
