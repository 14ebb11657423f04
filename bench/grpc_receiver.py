"""OTLP/gRPC receiver throughput: the OpenTelemetry SDK's gRPC exporter against the receiver alone.

The receiver is real (its HTTP/2 server, framing, budgets and worker hop) and its ingestor answers OK
at once, so the figure is the edge's own, not the pipeline's. ``senders`` exporters each send
``requests`` requests of ``points`` points, one after another (gzip with ``--gzip``).

    python -m bench.grpc_receiver [--requests 200] [--points 1000] [--senders 1] [--gzip]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricExportResult
from prometheus_client import CollectorRegistry

from meterhouse.collector.ingest import Outcome
from meterhouse.core.metrics import PipelineMetrics


class AnsweringIngestor:
    """Answers every request OK without looking at it."""

    def authenticate(self, _headers: Any) -> None:
        return None

    def export_body(self, _body: bytes, _sender: Any, _hold: Any) -> Outcome:
        return Outcome("ok", response=ExportMetricsServiceResponse())


def metrics_data(points: int) -> Any:
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    counter = MeterProvider(metric_readers=[reader]).get_meter("bench").create_counter("bench.calls")
    for i in range(points):
        counter.add(i + 1, {"org.id": f"org-{i % 50}", "sku": f"sku-{i}"})
    return reader.get_metrics_data()


def send(port: int, data: Any, requests: int, gzip: bool) -> None:
    compression = Compression.Gzip if gzip else Compression.NoCompression
    exporter = OTLPMetricExporter(
        endpoint=f"127.0.0.1:{port}", insecure=True, timeout=30, compression=compression
    )
    try:
        for i in range(requests):
            assert exporter.export(data) == MetricExportResult.SUCCESS, f"request {i}"
    finally:
        exporter.shutdown()


def measure(receiver_type: Any, requests: int, points: int, senders: int, gzip: bool) -> dict[str, float]:
    """Requests and points a second through a receiver of ``receiver_type`` (OtlpGrpcReceiver's signature)."""
    receiver = receiver_type(
        "127.0.0.1", 0, AnsweringIngestor(), PipelineMetrics(CollectorRegistry()), 64 << 20
    )
    receiver.start()
    data = metrics_data(points)
    try:
        send(receiver.port, data, 5, gzip)  # warm: the channel and both sides' code paths
        threads = [
            threading.Thread(target=send, args=(receiver.port, data, requests, gzip)) for _ in range(senders)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        receiver.shutdown(2)
    total = requests * senders
    return {"requests_s": total / elapsed, "points_s": total * points / elapsed, "seconds": elapsed}


def main() -> None:
    from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--gzip", action="store_true")
    a = parser.parse_args()
    result = measure(OtlpGrpcReceiver, a.requests, a.points, a.senders, a.gzip)
    print(
        f"{result['requests_s']:.1f} requests/s, {result['points_s']:,.0f} points/s ({result['seconds']:.2f} s)"
    )


if __name__ == "__main__":
    main()
