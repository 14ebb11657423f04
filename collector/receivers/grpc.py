"""OTLP/gRPC receiver: ``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``.

The request is taken as raw bytes and parsed here, so a malformed message is answered
INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL). gzip is handled by gRPC; messages
above ``max_request_bytes`` (after decompression) are refused by gRPC with RESOURCE_EXHAUSTED.
Retryable answers are UNAVAILABLE (or RESOURCE_EXHAUSTED for the ingest rate) with a ``RetryInfo``
detail. With ingest tokens, a call needs ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED
otherwise, nothing kept). With TLS, credentials are re-read on the first handshake after a reload, so
open channels are kept.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from meterhouse.collector.auth import Unauthenticated
from meterhouse.collector.ingest import Ingestor
from meterhouse.collector.model import content_digest
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.tls import ServerTls, TlsMaterial

SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "backpressure": grpc.StatusCode.UNAVAILABLE,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_RETRYABLE = {"backpressure": code_pb2.UNAVAILABLE, "unavailable": code_pb2.UNAVAILABLE,
              "rate_limited": code_pb2.RESOURCE_EXHAUSTED}  # fmt: skip


def _certificate_config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(m.private_key, m.cert_chain)], m.client_ca)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """TLS credentials that follow :meth:`ServerTls.reload`: new handshakes get the new material.

    A client CA makes client certificates required (mutual TLS); whether they are required is fixed
    at start.
    """
    first = tls.material
    served = [first.generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        m = tls.material
        if m.generation == served[0]:
            return None  # unchanged
        served[0] = m.generation
        return _certificate_config(m)

    return grpc.dynamic_ssl_server_credentials(_certificate_config(first), fetch, first.mutual)


class OtlpGrpcReceiver:
    """A source stage serving OTLP/gRPC into an :class:`Ingestor`."""

    def __init__(self, host: str, port: int, ingestor: Ingestor, metrics: PipelineMetrics,
                 max_request_bytes: int, workers: int = 16,
                 tls: ServerTls | None = None) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.tls = tls
        self.ingestor = ingestor
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.workers = workers
        self._server: grpc.Server | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="otlp-grpc"),
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        handler = grpc.unary_unary_rpc_method_handler(self._export)  # raw bytes in and out
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))
        host = f"[{self.host}]" if ":" in self.host else self.host
        address = f"{host}:{self.port}"
        if self.tls is not None:
            bound = server.add_secure_port(address, server_credentials(self.tls))
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot bind OTLP/gRPC on {self.host}:{self.port}")
        self.port = bound
        server.start()
        self._server = server

    def stop_accepting(self, grace_s: float) -> threading.Event:
        """Refuse new calls; calls in flight get ``grace_s`` to finish. The event is set once done."""
        server, self._server = self._server, None
        if server is None:
            done = threading.Event()
            done.set()
            return done
        return server.stop(grace=grace_s)

    def shutdown(self, timeout_s: float) -> None:
        """Idempotent and safe without start."""
        self.stop_accepting(timeout_s).wait(timeout_s + 1)

    def _export(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        header = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        try:
            sender = self.ingestor.authenticate(header if isinstance(header, str) else None)
        except Unauthenticated as e:
            self.metrics.requests.labels(transport="grpc", outcome="unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        request = ExportMetricsServiceRequest()
        try:
            request.ParseFromString(body)
        except (DecodeError, RecursionError, ValueError) as e:
            self.metrics.requests.labels(transport="grpc", outcome="invalid").inc()
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot parse ExportMetricsServiceRequest: {str(e)[:300] or type(e).__name__}",
            )
        outcome = self.ingestor.export(request, content_digest(body), sender)
        self.metrics.requests.labels(transport="grpc", outcome=outcome.kind).inc()
        if outcome.response is not None:
            return outcome.response.SerializeToString()
        code = _CODES[outcome.kind]
        if outcome.kind in _RETRYABLE:
            retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=max(1, outcome.retry_after_s)))
            detail = status_pb2.Status(code=_RETRYABLE[outcome.kind], message=outcome.message)
            detail.details.add().Pack(retry)
            # The status details (the gRPC convention) and RetryInfo alone, which the Python SDK reads.
            context.set_trailing_metadata(
                (
                    ("grpc-status-details-bin", detail.SerializeToString()),
                    ("google.rpc.retryinfo-bin", retry.SerializeToString()),
                )
            )
        context.abort(code, outcome.message)
