"""OTLP requests are counted under the outcome that says whose fault they were, on both transports.

A failure by meterhouse's own fault (a bug: an unexpected exception) is a server error, never the
sender's: the availability SLI and MeterhouseServerErrors count `error`, while MeterhouseRequestsRejected
(whose runbook sends the SRE after a misconfigured sender) counts `invalid`. A 500 counted as `invalid`
paged nobody for a meterhouse bug and blamed the senders; a gRPC call that raised was not counted at
all. A request to the wrong path or with the wrong method (404/405) is the sender's fault and must be
counted too. The receivers are real (uvicorn and grpc on loopback); the ingestor raises as a bug in
decoding or the spool would.
"""

import grpc
import pytest
import requests
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver
from meterhouse.collector.receivers.http import OtlpHttpReceiver
from meterhouse.core.metrics import REQUEST_OUTCOMES, PipelineMetrics

METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
BODY = sum_request({"bug.calls": [point(1, {"org.id": "org-b"})]}).SerializeToString()


class BuggyIngestor:
    def authenticate(self, header):  # ingest is open: no sender
        return None

    def export(self, request, digest, sender=None):
        raise KeyError("a bug in meterhouse")


def counts(registry: CollectorRegistry, transport: str) -> dict[str, float]:
    return {
        o: registry.get_sample_value("meterhouse_requests_total", {"transport": transport, "outcome": o})
        for o in REQUEST_OUTCOMES
    }


@pytest.fixture
def registry():
    return CollectorRegistry()


def test_a_server_error_is_pre_created_as_an_outcome(registry):
    PipelineMetrics(registry)
    for transport in ("http", "grpc"):
        assert (
            registry.get_sample_value(
                "meterhouse_requests_total", {"transport": transport, "outcome": "error"}
            )
            == 0
        )


def test_an_http_500_counts_as_a_server_error_not_as_the_senders_invalid_request(registry):
    r = OtlpHttpReceiver("127.0.0.1", 0, BuggyIngestor(), PipelineMetrics(registry), 1 << 20)
    r.start()
    try:
        answer = requests.post(f"http://127.0.0.1:{r.port}/v1/metrics", data=BODY,
                               headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    finally:
        r.shutdown(2)
    assert answer.status_code == 500
    c = counts(registry, "http")
    assert c["invalid"] == 0, c
    assert c["error"] == 1, c


def test_a_grpc_call_that_raised_counts_as_a_server_error(registry):
    r = OtlpGrpcReceiver("127.0.0.1", 0, BuggyIngestor(), PipelineMetrics(registry), 1 << 20)
    r.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as channel:
            call = channel.unary_unary(METHOD)
            with pytest.raises(grpc.RpcError) as e:
                call(BODY, timeout=10)
    finally:
        r.shutdown(2)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    c = counts(registry, "grpc")
    assert c["invalid"] == 0, c
    assert c["error"] == 1, c


class OkIngestor(BuggyIngestor):
    def export(self, request, digest, sender=None):  # pragma: no cover - never reached
        raise AssertionError("a request to the wrong path or with the wrong method is not exported")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        # An SDK given OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=http://host:4318 posts to "/", not /v1/metrics.
        ("POST", "/", 404),
        ("POST", "/v1/metrics/", 404),
        ("GET", "/v1/metrics", 405),
    ],
)
def test_requests_to_the_wrong_path_or_method_are_counted_as_the_senders_fault(
    registry, method, path, status
):
    """The commonest OTLP misconfiguration answers 404 to every request of that sender: counted among the
    requests refused whole (MeterhouseRequestsRejected), never invisible."""
    r = OtlpHttpReceiver("127.0.0.1", 0, OkIngestor(), PipelineMetrics(registry), 1 << 20)
    r.start()
    try:
        answer = requests.request(method, f"http://127.0.0.1:{r.port}{path}", data=BODY,
                                  headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    finally:
        r.shutdown(2)
    assert answer.status_code == status
    c = counts(registry, "http")
    assert c["not_found"] == 1, c
    assert sum(c.values()) == 1, c
