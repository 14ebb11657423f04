"""OTLP/gRPC receiver: ``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``.

The request is taken as raw bytes and parsed here, so a malformed message is answered
INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL). gzip is handled by gRPC; messages
above ``max_request_bytes`` (after decompression) are refused by gRPC with RESOURCE_EXHAUSTED.
Retryable answers are UNAVAILABLE (or RESOURCE_EXHAUSTED for the ingest rate) with a ``RetryInfo``
detail. With ingest tokens, a call needs ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED
otherwise, nothing kept). With TLS, credentials are re-read on the first handshake after a reload, so
open channels are kept.

Bounds: at most ``max_concurrent_rpcs`` calls are running or queued for a worker (gRPC answers the
next RESOURCE_EXHAUSTED), at most ``max_bytes_in_flight`` request bytes are held by them (UNAVAILABLE
with RetryInfo beyond), and clients' keepalive pings are held to the enforcement policy.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2

from meterhouse.collector.auth import Principal, Unauthenticated
from meterhouse.collector.ingest import Ingestor
from meterhouse.collector.model import content_digest
from meterhouse.core import listen
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.tls import ServerTls, TlsMaterial

if TYPE_CHECKING:
    from meterhouse.core.config import Config

log = logging.getLogger("meterhouse.receiver.grpc")
SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "backpressure": grpc.StatusCode.UNAVAILABLE,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


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


@dataclass(frozen=True)
class GrpcKeepalive:
    """Keepalive enforcement and connection lifetimes (the Collector's configgrpc ``keepalive``)."""

    min_time_s: float = 300.0
    permit_without_calls: bool = False
    max_connection_idle_s: float = 0.0
    max_connection_age_s: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> GrpcKeepalive:
        return cls(
            config.grpc_keepalive_min_time_s,
            config.grpc_keepalive_permit_without_calls,
            config.grpc_max_connection_idle_s,
            config.grpc_max_connection_age_s,
        )

    def options(self) -> list[tuple[str, int]]:
        opts = [
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_time_s * 1000)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.min_time_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_idle_s:
            opts.append(("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000)))
        if self.max_connection_age_s:
            opts.append(("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)))
            opts.append(("grpc.max_connection_age_grace_ms", 30_000))
        return opts


class _Budget:
    """Request bytes held by calls at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class OtlpGrpcReceiver:
    """A source stage serving OTLP/gRPC into an :class:`Ingestor`."""

    def __init__(self, host: str, port: int, ingestor: Ingestor, metrics: PipelineMetrics,
                 max_request_bytes: int, workers: int = 16, keepalive: GrpcKeepalive | None = None,
                 max_concurrent_rpcs: int = 64, max_bytes_in_flight: int = 0,
                 tls: ServerTls | None = None) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.tls = tls
        self.ingestor = ingestor
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.workers = workers
        self.keepalive = keepalive or GrpcKeepalive()
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.bytes_in_flight = _Budget(max_bytes_in_flight or 4 * max_request_bytes)
        self._server: grpc.Server | None = None  # bound (and serving once started)
        self._serving = False

    def bind(self) -> None:
        """Take the port, serving nothing before :meth:`start`; OSError naming why it cannot be. Idempotent.

        gRPC says no more than "Failed to bind" (after logging a line of its own), so a plain socket is
        bound there first to learn why (taken, privileged, not this host's address)."""
        if self._server is not None:
            return
        listen.bind(self.host, self.port, 1).close()
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="otlp-grpc"),
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.so_reuseport", 0),
                *self.keepalive.options(),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        handler = grpc.unary_unary_rpc_method_handler(self._export)  # raw bytes in and out
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))
        host = f"[{self.host}]" if ":" in self.host else self.host
        address = f"{host}:{self.port}"
        try:
            if self.tls is not None:
                bound = server.add_secure_port(address, server_credentials(self.tls))
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:  # taken by another process since the plain socket let it go
            bound = 0
        if bound == 0:
            raise OSError(f"gRPC could not bind {address}")
        self.port = bound
        self._server = server

    def start(self) -> None:
        """Bind if not yet bound (see :meth:`bind`) and serve."""
        if self._serving:
            return
        self.bind()
        assert self._server is not None
        self._server.start()
        self._serving = True

    def stop_accepting(self, grace_s: float) -> threading.Event:
        """Refuse new calls; calls in flight get ``grace_s`` to finish. The event is set once done."""
        server, self._server = self._server, None
        if server is None:
            done = threading.Event()
            done.set()
            return done
        if not self._serving:  # bound only: gRPC gives the port back only by stopping a started server
            server.start()
        grace = grace_s if self._serving else None  # None: nothing in flight to wait for
        self._serving = False
        stopped: threading.Event = server.stop(grace=grace)
        return stopped

    def shutdown(self, timeout_s: float) -> None:
        """Idempotent and safe without start."""
        self.stop_accepting(timeout_s).wait(timeout_s + 1)

    def _export(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        headers = [v for k, v in context.invocation_metadata() if k == "authorization" and isinstance(v, str)]
        try:
            sender = self.ingestor.authenticate(headers)
        except Unauthenticated as e:
            self.metrics.requests.labels(transport="grpc", outcome="unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if not self.bytes_in_flight.take(len(body)):
            self.metrics.requests.labels(transport="grpc", outcome="backpressure").inc()
            self._abort_retryable(context, "too many request bytes in flight, retry later", 1)
        try:
            return self._export_held(body, context, sender)
        finally:
            self.bytes_in_flight.give(len(body))

    def _abort_retryable(
        self,
        context: grpc.ServicerContext,
        message: str,
        retry_after_s: int,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    ) -> NoReturn:
        rpc_code = (
            code_pb2.RESOURCE_EXHAUSTED
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED
            else code_pb2.UNAVAILABLE
        )
        retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=max(1, retry_after_s)))
        detail = status_pb2.Status(code=rpc_code, message=message)
        detail.details.add().Pack(retry)
        # The status details (the gRPC convention) and RetryInfo alone, which the Python SDK reads.
        context.set_trailing_metadata(
            (
                ("grpc-status-details-bin", detail.SerializeToString()),
                ("google.rpc.retryinfo-bin", retry.SerializeToString()),
            )
        )
        context.abort(code, message)
        raise AssertionError("context.abort raises")  # for type checkers: abort never returns

    def _export_held(self, body: bytes, context: grpc.ServicerContext, sender: Principal | None) -> bytes:
        # Parsed (or decoded natively) by the ingestor; bytes protobuf refuses answer INVALID_ARGUMENT.
        try:
            outcome = self.ingestor.export(None, content_digest(body), sender, body=body)
        except Exception:
            # A bug: INTERNAL (not retried by senders), logged and counted as the server's fault.
            log.exception("unexpected error while handling an OTLP/gRPC request")
            self.metrics.requests.labels(transport="grpc", outcome="error").inc()
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        self.metrics.requests.labels(transport="grpc", outcome=outcome.kind).inc()
        if outcome.response is not None:
            answer: bytes = outcome.response.SerializeToString()
            return answer
        code = _CODES[outcome.kind]
        if outcome.kind in ("backpressure", "unavailable", "rate_limited"):
            self._abort_retryable(context, outcome.message, outcome.retry_after_s, code)
        context.abort(code, outcome.message)
        raise AssertionError("context.abort raises")
