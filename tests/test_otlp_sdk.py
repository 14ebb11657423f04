"""The real OpenTelemetry SDK exporters, gRPC and HTTP/protobuf, delta and cumulative, against a real
`meterhouse up`: every combination gives the same exact per-org totals through the API.
(Cumulative senders also compress with gzip, so both transports' gzip paths are exercised; the HTTP
exporter's Deflate and Gzip are also tested on their own.)"""

import time

import pytest
from grpc import Compression as GrpcCompression
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from otlp_builders import CUMULATIVE, point, sum_request

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
HOUR = 3600
ORGS = ["org-a", "org-b", "org-c"]


def provider(
    up, transport: str, temporality: str, resource: dict | None = None, compression: Compression | None = None
) -> MeterProvider:
    t = AggregationTemporality.DELTA if temporality == "delta" else AggregationTemporality.CUMULATIVE
    prefs = {Counter: t, UpDownCounter: t}
    gz = compression or (Compression.Gzip if temporality == "cumulative" else Compression.NoCompression)
    if transport == "grpc":
        exporter = GrpcExporter(endpoint=up.otlp_grpc, insecure=True, preferred_temporality=prefs,
                                compression=GrpcCompression.Gzip if gz == Compression.Gzip else None)  # fmt: skip
    else:
        exporter = HttpExporter(
            endpoint=f"{up.otlp_http}/v1/metrics", preferred_temporality=prefs, compression=gz
        )
    reader = PeriodicExportingMetricReader(
        exporter,
        export_interval_millis=3_600_000,
        cardinality_limits={Counter: 10_000, UpDownCounter: 10_000},
    )
    return MeterProvider(metric_readers=[reader],
                         resource=Resource.create(resource or {"service.name": "sdk-test"}))  # fmt: skip


def total(up, org: str, metric: str, step: str = "1h") -> int | float:
    up.drain()
    now = int(time.time())
    return fetch_usage(up.api, org, metric, now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR, step)[
        "total"
    ]


def script(i: int, org_index: int) -> int:
    """The same usage script for every combination: round i, org j."""
    return (org_index + 1) * 10**12 + i * 7 + (2**55 if org_index == 2 else 0)


def run_script(
    up, transport: str, temporality: str, metric: str, rounds: int = 4, compression: Compression | None = None
) -> dict[str, int]:
    p = provider(up, transport, temporality, compression=compression)
    counter = p.get_meter("t").create_counter(metric, unit="{unit}")
    expected = dict.fromkeys(ORGS, 0)
    for i in range(rounds):
        for j, org in enumerate(ORGS):
            for feature in ("a", "b"):
                counter.add(script(i, j), {"org.id": org, "feature": feature})
                expected[org] += script(i, j)
        assert p.force_flush(30_000)
    p.shutdown()
    return expected


def test_grpc_and_http_with_delta_and_cumulative_give_identical_exact_totals(up):
    results = {}
    for transport in ("grpc", "http"):
        for temporality in ("delta", "cumulative"):
            metric = f"usage.{transport}.{temporality}"
            expected = run_script(up, transport, temporality, metric)
            results[(transport, temporality)] = {org: total(up, org, metric) for org in ORGS}
            assert results[(transport, temporality)] == expected, (transport, temporality)
            assert {org: total(up, org, metric, "1m") for org in ORGS} == expected  # raw agrees
    assert len({tuple(sorted(r.items())) for r in results.values()}) == 1


@pytest.mark.parametrize("compression", [Compression.Deflate, Compression.Gzip], ids=["deflate", "gzip"])
def test_http_exporter_compressing_gives_exact_totals(up, compression):
    """The SDK's Deflate is zlib.compress (RFC 1950), its Gzip a GzipFile: both stored exactly."""
    for temporality in ("delta", "cumulative"):
        metric = f"usage.{compression.value}.{temporality}"
        expected = run_script(up, "http", temporality, metric, compression=compression)
        assert {org: total(up, org, metric) for org in ORGS} == expected, temporality


def test_cumulative_counter_reset_mid_stream(up):
    # SDK: a restarted application is a new provider, with a new start time, counting from zero again.
    expected = 0
    for _restart in range(2):
        p = provider(up, "http", "cumulative")
        c = p.get_meter("t").create_counter("reset.sdk")
        for v in (100, 250, 5):
            c.add(v, {"org.id": "org-r"})
            expected += v
            assert p.force_flush(30_000)
        p.shutdown()
    assert total(up, "org-r", "reset.sdk") == expected == 710

    # By hand: same start time, smaller value — the counter reset without telling us.
    import requests

    start = time.time_ns() - 10**10
    for i, v in enumerate((100, 160, 30, 50)):
        body = sum_request({"reset.hand": [point(v, {"org.id": "org-r"}, t_ns=start + (i + 1) * 10**9,
                                                 start_ns=start)]}, temporality=CUMULATIVE)  # fmt: skip
        r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(), timeout=30,
                          headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
        assert r.status_code == 200
    assert total(up, "org-r", "reset.hand") == 160 + 50  # 100, +60, reset to 30, +20


def test_up_down_counter_cumulative_equals_delta(up):
    for temporality in ("delta", "cumulative"):
        p = provider(up, "grpc", temporality)
        c = p.get_meter("t").create_up_down_counter(f"seats.{temporality}")
        for v in (10, -3, 5, -12):
            c.add(v, {"org.id": "org-u"})
            assert p.force_flush(30_000)
        p.shutdown()
    assert total(up, "org-u", "seats.delta") == total(up, "org-u", "seats.cumulative") == 0


def test_collector_restart_between_two_cumulative_exports(up_factory, tmp_path):
    up1 = up_factory(data_dir=tmp_path / "d")
    p = provider(up1, "grpc", "cumulative")
    c = p.get_meter("t").create_counter("restart.cumulative")
    c.add(1000, {"org.id": "org-x"})
    assert p.force_flush(30_000)
    assert up1.stop() == 0

    up2 = up_factory(data_dir=tmp_path / "d", ports_of=up1)
    c.add(234, {"org.id": "org-x"})
    assert p.force_flush(30_000)  # exports the cumulative 1234 with the original start time
    c.add(1, {"org.id": "org-x"})
    assert p.force_flush(30_000)
    p.shutdown()
    assert total(up2, "org-x", "restart.cumulative") == 1235
