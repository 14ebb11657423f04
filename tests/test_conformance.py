"""Conformance with a real client: the OpenTelemetry Python SDK, over HTTP (plain, gzip, deflate, and zstd
as a Collector sends it) and gRPC, delta and cumulative, exporting periodically while the application
keeps creating new series.

The real exporter is wrapped to tally every point it exported successfully; what meterhouse stores must
equal that tally exactly, per org and metric, and every exported point must be written (none rejected).
The SDK (1.45) has a race: a series created while a collection runs can be exported with a start time a
few ms after its time. Each round makes that window wide (a first instrument with thousands of series
takes a while to collect while a recording thread creates series on a second one), so the race happens
in every run, and the test checks that meterhouse repaired exactly the points the exporter saw with it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict

import pytest
import requests
from conftest import UpProcess
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from otlp_builders import ZstdSession
from prometheus_client.parser import text_string_to_metric_families

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
HOUR = 3600
ORGS = [f"org-{i}" for i in range(5)]
ROUNDS = 2  # applications (providers) per combination; each one's first collections race
BIG_SERIES = 1000  # series on the first instrument: collecting them is the window of the race
RECORD_S = 0.5  # how long each application records new series while exporting every INTERVAL_MS
INTERVAL_MS = 150


class TallyExporter(MetricExporter):
    """The real exporter, with a tally of every point it exported successfully."""

    def __init__(self, inner: MetricExporter, temporality: str) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality)
        self.inner = inner
        self.cumulative = temporality == "cumulative"
        self.points = 0
        self.late_starts = 0  # points exported with their start after their time (the SDK race)
        self.failures = 0
        self.delta_sum: dict[tuple[str, str], int] = defaultdict(int)
        self.last: dict[tuple[str, str, frozenset], int] = {}  # cumulative: last value per series

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs
    ) -> MetricExportResult:
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is not MetricExportResult.SUCCESS:
            self.failures += 1
            return result
        for rm in metrics_data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in m.data.data_points:
                        self.points += 1
                        self.late_starts += dp.start_time_unix_nano > dp.time_unix_nano
                        org = dp.attributes["org.id"]
                        if self.cumulative:
                            self.last[(org, m.name, frozenset(dp.attributes.items()))] = dp.value
                        else:
                            self.delta_sum[(org, m.name)] += dp.value
        return result

    def totals(self) -> dict[tuple[str, str], int]:
        if not self.cumulative:
            return dict(self.delta_sum)
        out: dict[tuple[str, str], int] = defaultdict(int)
        for (org, name, _), value in self.last.items():
            out[(org, name)] += value
        return dict(out)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def exporter(up: UpProcess, transport: str, temporality: str, encoding: str = "identity") -> MetricExporter:
    t = AggregationTemporality.DELTA if temporality == "delta" else AggregationTemporality.CUMULATIVE
    if transport == "grpc":
        return GrpcExporter(endpoint=up.otlp_grpc, insecure=True, preferred_temporality={Counter: t})
    if encoding == "zstd":  # the SDK offers gzip and deflate; zstd is what a Collector's exporter adds
        return HttpExporter(endpoint=f"{up.otlp_http}/v1/metrics", preferred_temporality={Counter: t},
                            session=ZstdSession())  # fmt: skip
    compression = {
        "identity": Compression.NoCompression,
        "gzip": Compression.Gzip,
        "deflate": Compression.Deflate,
    }
    return HttpExporter(endpoint=f"{up.otlp_http}/v1/metrics", preferred_temporality={Counter: t},
                        compression=compression[encoding])  # fmt: skip


def run_application(
    up, transport, temporality, prefix: str, seed: int, encoding: str = "identity"
) -> tuple[TallyExporter, dict]:
    """One application: a provider that exports every INTERVAL_MS while a thread records new series."""
    tally = TallyExporter(exporter(up, transport, temporality, encoding), temporality)
    reader = PeriodicExportingMetricReader(
        tally, export_interval_millis=INTERVAL_MS, cardinality_limits={Counter: 1_000_000}
    )
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": f"conformance-{seed}"})
    )
    meter = provider.get_meter("conformance")
    big = meter.create_counter(f"{prefix}.big")  # collected first: its series make the race window
    new = meter.create_counter(f"{prefix}.new")
    recorded: dict[tuple[str, str], int] = defaultdict(int)
    for j in range(BIG_SERIES):
        org = ORGS[j % len(ORGS)]
        big.add(j + 1, {"org.id": org, "n": j})
        recorded[(org, big.name)] += j + 1

    def record_new_series() -> None:
        deadline, i = time.monotonic() + RECORD_S, 0
        while time.monotonic() < deadline:
            org = ORGS[i % len(ORGS)]
            value = (i % 7) + 1
            new.add(value, {"org.id": org, "series": f"{seed}-{i}"})  # a new series every time
            recorded[(org, new.name)] += value
            if i % 3 == 0:
                big.add(1, {"org.id": org, "n": i % BIG_SERIES})  # and existing ones keep growing
                recorded[(org, big.name)] += 1
            i += 1
            if i % 25 == 0:
                time.sleep(0.001)

    # Switching threads more often than Python's default 5 ms interleaves the recording thread with
    # the SDK's collection more finely: the race is the SDK's, only its odds are raised.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        recorder = threading.Thread(target=record_new_series)
        recorder.start()
        recorder.join()
    finally:
        sys.setswitchinterval(switch)
    assert provider.force_flush(30_000)
    provider.shutdown()
    return tally, dict(recorded)


def meterhouse_counts(up) -> dict[str, float]:
    text = requests.get(f"{up.api}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("meterhouse_points_written_total", "meterhouse_points_received_total"):
                out[s.name] = s.value
            elif s.name in ("meterhouse_points_rejected_total", "meterhouse_points_repaired_total"):
                out[f"{s.name}:{s.labels['reason']}"] = s.value
    return out


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    p = UpProcess(tmp_path_factory.mktemp("conformance") / "data")
    p.start()
    yield p
    p.stop()


# Each transport with each temporality; each HTTP Content-Encoding once more (the encoding is the body's
# bytes, whatever they hold; tests/test_otlp_sdk.py sends both temporalities with gzip and deflate).
CASES = [(t, "identity", temporality) for t in ("http", "grpc") for temporality in ("delta", "cumulative")]
CASES += [("http", encoding, "delta") for encoding in ("gzip", "deflate", "zstd")]


@pytest.mark.parametrize(("transport", "encoding", "temporality"), CASES, ids=["-".join(c) for c in CASES])
def test_every_exported_point_is_stored_exactly(up, transport, encoding, temporality):
    prefix = f"conf.{transport}.{encoding}.{temporality}"
    up.drain()
    before = meterhouse_counts(up)
    exported: dict[tuple[str, str], int] = defaultdict(int)
    recorded: dict[tuple[str, str], int] = defaultdict(int)
    points = late = 0
    for seed in range(ROUNDS):
        tally, rec = run_application(up, transport, temporality, prefix, seed, encoding)
        assert tally.failures == 0
        for key, value in tally.totals().items():
            exported[key] += value
        for key, value in rec.items():
            recorded[key] += value
        points += tally.points
        late += tally.late_starts
    assert exported == recorded  # the SDK exported everything the application recorded
    up.drain()
    after = meterhouse_counts(up)
    diff = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    rejected = {k: v for k, v in diff.items() if k.startswith("meterhouse_points_rejected_total")}
    assert rejected == {}, rejected
    assert diff["meterhouse_points_received_total"] == points
    assert diff["meterhouse_points_written_total"] == points
    # The race happened, and meterhouse repaired exactly the points the exporter saw with it.
    assert late > 0, "the SDK race did not happen: widen its window (BIG_SERIES)"
    assert diff.get("meterhouse_points_repaired_total:start_after_time", 0) == late
    now = int(time.time())
    start, end = now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR
    stored = {
        (org, name): fetch_usage(up.api, org, name, start, end, "1h")["total"]
        for org in ORGS
        for name in (f"{prefix}.big", f"{prefix}.new")
    }
    assert stored == dict(exported)
