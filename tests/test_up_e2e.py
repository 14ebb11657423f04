"""`meterhouse up` as a real subprocess, fed by the real OpenTelemetry SDK over OTLP/HTTP."""

import gzip
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from google.rpc import status_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from otlp_builders import point, sum_request
from prometheus_client.parser import text_string_to_metric_families

from meterhouse.demo import delta_exporter
from meterhouse.demo import fetch_usage as api_usage

pytestmark = pytest.mark.e2e
HOUR = 3600


def sdk_provider(endpoint: str, resource: dict | None = None) -> MeterProvider:
    from opentelemetry.sdk.metrics import Counter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    reader = PeriodicExportingMetricReader(
        delta_exporter(endpoint), export_interval_millis=3_600_000, cardinality_limits={Counter: 100_000}
    )
    return MeterProvider(metric_readers=[reader], resource=Resource.create(resource or {}))


def window() -> tuple[int, int]:
    now = int(time.time())
    return now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR


def scrape(up) -> dict[str, float]:
    text = requests.get(f"{up.api}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert not {"org", "org_id", "org.id"} & set(s.labels), s
            if not s.labels:
                out[s.name] = s.value
    return out


def test_sdk_usage_is_exact_per_org_and_rollup_agrees_with_raw(up):
    provider = sdk_provider(up.otlp_http, {"service.name": "billing-test"})
    meter = provider.get_meter("test")
    calls = meter.create_counter("api.calls", unit="{call}")
    credits = meter.create_counter("credits", unit="{credit}")
    sent: dict[tuple[str, str], int | float] = {}
    orgs = ["org-1", "org-2", "org-3", "org-ünï'\"\\"]
    for round_ in range(3):
        for i, org in enumerate(orgs):
            for feature in ("search", "export"):
                v = (i + 1) * 1000 + round_ + (2**53 + 1 if org == "org-3" else 0)
                calls.add(v, {"org.id": org, "feature": feature, "region": "eu"})
                sent[(org, "api.calls")] = sent.get((org, "api.calls"), 0) + v
            credits.add(0.5, {"org.id": org})
            sent[(org, "credits")] = sent.get((org, "credits"), 0) + 0.5
        calls.add(1, {"feature": "search"})  # no org: stored unattributed, counted
        assert provider.force_flush(30_000)
    provider.shutdown()

    up.drain()
    start, end = window()
    for (org, metric), expected in sent.items():
        rollup = api_usage(up.api, org, metric, start, end, "1h")
        raw = api_usage(up.api, org, metric, start, end, "1m")
        assert (rollup["source"], raw["source"]) == ("rollup", "raw")
        assert rollup["total"] == expected == raw["total"], (org, metric)
        assert sum(p["value"] for p in raw["points"]) == expected
    assert api_usage(up.api, "org-3", "api.calls", start, end, "1h")["unit"] == "{call}"

    m = scrape(up)
    points = len(orgs) * 2 * 3 + len(orgs) * 3 + 3
    assert m["meterhouse_points_received_total"] == points
    assert m["meterhouse_points_written_total"] == points
    assert m["meterhouse_points_unattributed_total"] == 3
    assert m["meterhouse_ingest_lag_seconds_count"] >= 1
    assert up.stop() == 0


def test_sigterm_flushes_spooled_points_and_exits_0(up_factory, tmp_path):
    up = up_factory("--flush-interval-s", "60", data_dir=tmp_path / "d")
    body = sum_request({"api.calls": [point(42, {"org.id": "org-t"})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, timeout=60,
                      headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
    assert r.status_code == 200  # answered once spooled (fsync'd), before the insert
    m = scrape(up)
    assert m["meterhouse_pending_points"] == 1 and m["meterhouse_points_written_total"] == 0
    assert up.stop(signal.SIGTERM) == 0  # the flush on shutdown writes it

    up2 = up_factory(data_dir=tmp_path / "d")
    assert scrape(up2)["meterhouse_spool_replayed_records_total"] == 0  # nothing left to replay
    start, end = window()
    assert api_usage(up2.api, "org-t", "api.calls", start, end, "1h")["total"] == 42


def test_sigkill_before_the_insert_loses_nothing(up_factory, tmp_path):
    up = up_factory("--flush-interval-s", "60", data_dir=tmp_path / "d")
    body = sum_request({"api.calls": [point(7, {"org.id": "org-k"})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, timeout=60,
                      headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
    assert r.status_code == 200
    up.stop(signal.SIGKILL)

    up2 = up_factory(data_dir=tmp_path / "d")
    up2.drain()
    assert scrape(up2)["meterhouse_spool_replayed_records_total"] == 1
    start, end = window()
    assert api_usage(up2.api, "org-k", "api.calls", start, end, "1h")["total"] == 7


def test_bad_requests_get_clear_answers_and_serving_continues(up_factory):
    up = up_factory("--max-request-bytes", "100000")
    url = f"{up.otlp_http}/v1/metrics"
    pb = {"Content-Type": "application/x-protobuf"}
    cases = [
        (b"\xff\xff\xff\xff garbage", pb, 400),
        (b"{}", {"Content-Type": "text/plain"}, 415),
        (gzip.compress(b"\x00" * 10_000_000), {**pb, "Content-Encoding": "gzip"}, 413),
        (b"x" * 200_000, pb, 413),
        (b"not gzip", {**pb, "Content-Encoding": "gzip"}, 400),
        (b'{"resourceMetrics": 5}', {"Content-Type": "application/json"}, 400),
    ]
    for i, (data, headers, status) in enumerate(cases):
        r = requests.post(url, data=data, headers=headers, timeout=30)
        assert r.status_code == status, (i, r.status_code, r.content)
        if headers["Content-Type"] == "application/x-protobuf":
            st = status_pb2.Status.FromString(r.content)
        else:
            st = r.json()
        assert st.message if hasattr(st, "message") else st["message"]
        good = sum_request({"api.calls": [point(1, {"org.id": "org-g", "case": str(i)})]})
        ok = requests.post(url, data=good.SerializeToString(), headers=pb, timeout=30)
        assert ok.status_code == 200
    up.drain()
    start, end = window()
    assert api_usage(up.api, "org-g", "api.calls", start, end, "1h")["total"] == len(cases)


def test_mixed_request_stores_the_valid_points_and_reports_partial_success(up):
    req = sum_request({"api.calls": [point(5, {"org.id": "org-m"}), point(-1, {"org.id": "org-m"})]})
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=req.SerializeToString(), timeout=30,
                      headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

    resp = ExportMetricsServiceResponse.FromString(r.content)
    assert r.status_code == 200 and resp.partial_success.rejected_data_points == 1
    assert "negative_delta" in resp.partial_success.error_message
    up.drain()
    start, end = window()
    assert api_usage(up.api, "org-m", "api.calls", start, end, "1h")["total"] == 5
    text = requests.get(f"{up.api}/metrics", timeout=10).text
    assert 'meterhouse_points_rejected_total{reason="negative_delta"} 1.0' in text


def test_demo_command_sends_and_verifies(up):
    # Twice against the same data: a second run (as `bash scripts/demo.sh` again on the same clone)
    # must not count the first run's usage as its own.
    for run in range(2):
        r = subprocess.run(
            [sys.executable, "-m", "meterhouse", "demo", "--orgs", "12", "--seconds", "2", "--seed", str(run),
             "--endpoint", up.otlp_http, "--api", up.api],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all totals match" in r.stdout
        assert "measurements recorded" in r.stdout  # progress while it runs
        # Beside the verdict, what meterhouse rejected or repaired, by reason, so a mismatch explains itself.
        assert re.search(
            r"checked by identity \(a repeat counts zero\) while the demo ran: rejected 0; repaired [0-9,]+.*; identity [0-9,]+",
            r.stdout,
        )


def test_demo_fails_loudly_when_nothing_listens(tmp_path):
    from conftest import free_port

    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "meterhouse", "demo", "--orgs", "2", "--seconds", "0.3",
         "--endpoint", f"http://127.0.0.1:{port}", "--api", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1
