"""Adversary 29b: a message sent uncompressed (compressed flag 0) on a call whose ``grpc-encoding`` is gzip is
refused INVALID_ARGUMENT, so an honest SDK sender with gzip loses its usage.

In gRPC the compressed flag of each message says whether that message is compressed; ``grpc-encoding``
names the algorithm used for the messages that are. grpc-core (under grpcio and so the OpenTelemetry
Python exporter) does not compress a message that gzip would not make smaller and sends it with the
flag 0 and the header still ``gzip``. ``OtlpGrpcReceiver._ingest`` inflates by the header alone
(``compressed = encoding is not IDENTITY``), never by ``call.compressed``: the plain protobuf fails
"incorrect header check", answered INVALID_ARGUMENT, which the exporter does not retry.
"""

from __future__ import annotations

import time

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from otlp_builders import point, sum_request

from bench.slow_grpc import METHOD
from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e


def stored(up, org: str, metric: str) -> float:
    up.drain()
    now = int(time.time())
    return fetch_usage(up.api, org, metric, now - 7200, now + 7200, "1h")["total"]


def test_an_sdk_sender_with_gzip_whose_small_export_grpc_sends_uncompressed_is_stored(up):
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    counter = (
        MeterProvider(metric_readers=[reader], resource=Resource.get_empty())
        .get_meter("m")
        .create_counter("adv29b.gzip")
    )
    exporter = OTLPMetricExporter(
        endpoint=up.otlp_grpc, insecure=True, timeout=10, compression=Compression.Gzip
    )
    try:
        counter.add(7, {"org.id": "org-3f9c2a71d8e4b605"})  # an 81-byte export: gzip would make it larger
        result = exporter.export(reader.get_metrics_data())
    finally:
        exporter.shutdown()
    assert (result.name, stored(up, "org-3f9c2a71d8e4b605", "adv29b.gzip")) == ("SUCCESS", 7)


def test_a_grpcio_channel_with_gzip_sending_an_incompressible_message_is_answered_ok(up):
    body = sum_request({"adv29b.raw": [point(5, {"org.id": "org-a1b2c3d4e5f60718"})]}).SerializeToString()
    with grpc.insecure_channel(up.otlp_grpc, compression=grpc.Compression.Gzip) as channel:
        try:
            channel.unary_unary(METHOD)(body, timeout=10)
            answer = "OK"
        except grpc.RpcError as e:
            answer = f"{e.code().name}: {e.details()}"
    assert (answer, stored(up, "org-a1b2c3d4e5f60718", "adv29b.raw")) == ("OK", 5)
