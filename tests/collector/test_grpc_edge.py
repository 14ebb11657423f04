"""The OTLP/gRPC edge's bounds: concurrent calls and request bytes held at once.

The receiver is real (a grpc server on loopback, a real channel); its ingestor is held at a barrier so
that "a call in flight" is a state the test controls rather than a race it hopes to win.
"""

import threading

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.ingest import Outcome
from meterhouse.collector.receivers.grpc import GrpcKeepalive, OtlpGrpcReceiver
from meterhouse.core.metrics import PipelineMetrics

METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


class HeldIngestor:
    """Answers ok once released; counts the calls that reached it."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def authenticate(self, header):  # ingest is open: no sender
        return None

    def export(self, request, digest, sender=None, body=None) -> Outcome:
        self.entered.release()
        self.release.wait(30)
        return Outcome("ok", response=ExportMetricsServiceResponse())


@pytest.fixture
def held():
    ingestor = HeldIngestor()
    receivers = []

    def make(**kw) -> tuple[OtlpGrpcReceiver, grpc.Channel]:
        r = OtlpGrpcReceiver("127.0.0.1", 0, ingestor, PipelineMetrics(CollectorRegistry()), 1 << 20, **kw)
        r.start()
        receivers.append(r)
        return r, grpc.insecure_channel(f"127.0.0.1:{r.port}")

    yield ingestor, make
    ingestor.release.set()
    for r in receivers:
        r.shutdown(2)


BODY = sum_request({"grpc.calls": [point(1, {"org.id": "org-g"})]}).SerializeToString()


def test_calls_beyond_maximum_concurrent_rpcs_are_resource_exhausted(held):
    ingestor, make = held
    receiver, channel = make(max_concurrent_rpcs=2)
    export = channel.unary_unary(METHOD)
    first = [export.future(BODY, timeout=30) for _ in range(2)]
    assert ingestor.entered.acquire(timeout=10) and ingestor.entered.acquire(timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        export(BODY, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ingestor.release.set()
    assert all(f.result() == b"" for f in first)  # the calls in flight are answered
    assert export(BODY, timeout=10) == b""  # and new calls are taken again


def test_request_bytes_beyond_the_bound_are_unavailable_with_retry_info(held):
    ingestor, make = held
    receiver, channel = make(max_bytes_in_flight=len(BODY) + 10)
    export = channel.unary_unary(METHOD)
    first = export.future(BODY, timeout=30)
    assert ingestor.entered.acquire(timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        export(BODY, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert any(k == "grpc-status-details-bin" for k, _ in e.value.trailing_metadata())
    ingestor.release.set()
    assert first.result() == b""
    assert receiver.bytes_in_flight.used == 0


def test_keepalive_enforcement_options_reach_grpc():
    opts = dict(GrpcKeepalive(min_time_s=10, permit_without_calls=True, max_connection_idle_s=5).options())
    assert opts["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.max_connection_idle_ms"] == 5_000
    assert "grpc.max_connection_age_ms" not in opts  # 0 = never
