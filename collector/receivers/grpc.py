"""OTLP/gRPC receiver: ``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``.

The request is taken as raw bytes and parsed here, so a malformed message is answered
INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL). gzip is handled by gRPC; messages
above ``max_request_bytes`` (after decompression) are refused by gRPC with RESOURCE_EXHAUSTED.
Retryable answers are UNAVAILABLE (or RESOURCE_EXHAUSTED for the ingest rate and the call bounds)
with a ``RetryInfo`` detail. With ingest tokens, a call needs ``authorization: Bearer <token>``
metadata (UNAUTHENTICATED otherwise, before its message is read, nothing kept). With TLS, credentials
are re-read on the first handshake after a reload, so open channels are kept.

The server is grpc's asyncio server on its own event loop thread: a call costs a coroutine, not a
thread, while its message arrives, so senders that open streams and trickle (or never finish) their
messages cannot hold the workers. Decoding and the spool append run on ``workers`` threads once the
whole message is in. (grpc's thread-pool server gave each call a worker from its start, which then
waited for the message: 16 slow streams stopped every other sender.)

Bounds (:class:`GrpcLimits`): the message must arrive within ``read_timeout_s`` of the call's start
(DEADLINE_EXCEEDED otherwise); at most ``max_calls_per_address`` calls are open from one client
address; at most ``max_concurrent_rpcs`` calls whose message has arrived are handled or queued for a
worker, and they hold at most ``max_bytes_in_flight`` request bytes (RESOURCE_EXHAUSTED / UNAVAILABLE,
both with RetryInfo, beyond); gRPC itself allows ``max_streams_per_connection`` streams on a
connection and ``max_connections`` connections, and holds clients' keepalive pings to the enforcement
policy. grpc has no hook on an accepted connection, so connections cannot be bounded per address:
one without a call open (one that never sent a byte included) is closed after ``max_connection_idle_s``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2

from meterhouse.collector.auth import Principal, Unauthenticated
from meterhouse.collector.budget import STANDALONE_DECODE_BYTES, Busy, DecodeBudget, TooCostly
from meterhouse.collector.decode import decoded_cost
from meterhouse.collector.ingest import Ingestor, Outcome
from meterhouse.core import listen
from meterhouse.core.memory import plan as memory_plan
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
    "error": grpc.StatusCode.INTERNAL,
}
_RETRYABLE = ("backpressure", "unavailable", "rate_limited")


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
class GrpcLimits:
    """What a sender may hold on the OTLP/gRPC port, and keepalive enforcement after the Collector's
    configgrpc ``keepalive``. Each field is the option ``grpc_<field>`` (0 turns a time off)."""

    read_timeout_s: float = 30.0
    max_calls_per_address: int = 64
    max_streams_per_connection: int = 100
    max_connections: int = 10_000
    keepalive_min_time_s: float = 300.0
    keepalive_permit_without_calls: bool = False
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> GrpcLimits:
        limits = cls(**{f.name: getattr(config, f"grpc_{f.name}") for f in fields(cls)})
        if not limits.max_connections:  # a share of the memory budget
            limits = replace(limits, max_connections=memory_plan(config).connections_per_port)
        return limits

    def options(self) -> list[tuple[str, int]]:
        """gRPC's channel arguments for the bounds it enforces itself."""
        ping_ms = int(self.keepalive_min_time_s * 1000)
        opts = [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ping_ms),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_idle_s:
            opts.append(("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000)))
        if self.max_connection_age_s:
            opts.append(("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)))
            opts.append(("grpc.max_connection_age_grace_ms", 30_000))
        return opts


class _Budget:
    """Units (request bytes, calls) held at once, from any thread."""

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


class _RefusalLog:
    """A warning line per reason at most every ``interval_s``, counting the calls refused since the last."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._since: dict[str, tuple[float, int]] = {}

    def record(self, reason: str, address: str) -> None:
        now = time.monotonic()
        logged_at, calls = self._since.get(reason, (now - self.interval_s, 0))
        calls += 1
        if now - logged_at >= self.interval_s:
            log.warning("OTLP/gRPC calls refused", extra={"reason": reason, "calls": calls,
                                                           "example_address": address})  # fmt: skip
            logged_at, calls = now, 0
        self._since[reason] = (logged_at, calls)


def _address(peer: str) -> str:
    """The client's address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``), port dropped."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return peer


class OtlpGrpcReceiver:
    """A source stage serving OTLP/gRPC into an :class:`Ingestor`."""

    def __init__(self, host: str, port: int, ingestor: Ingestor, metrics: PipelineMetrics,
                 max_request_bytes: int, workers: int = 16,
                 max_concurrent_rpcs: int = 64, max_bytes_in_flight: int = 0,
                 tls: ServerTls | None = None, limits: GrpcLimits | None = None,
                 decode_budget: DecodeBudget | None = None) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.tls = tls
        self.ingestor = ingestor
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.workers = workers
        self.limits = limits or GrpcLimits()
        self.calls_handled = _Budget(max_concurrent_rpcs)
        self.bytes_in_flight = _Budget(max_bytes_in_flight or 4 * max_request_bytes)
        self.decode_budget = decode_budget or DecodeBudget(STANDALONE_DECODE_BYTES)
        self.calls_by_address: dict[str, int] = {}  # touched on the event loop thread only
        self._refusals = _RefusalLog()
        self._server: grpc.aio.Server | None = None  # bound (and serving once started)
        self._serving = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def bind(self) -> None:
        """Take the port, serving nothing before :meth:`start`; OSError naming why it cannot be. Idempotent.

        gRPC says no more than "Failed to bind" (after logging a line of its own), so a plain socket is
        bound there first to learn why (taken, privileged, not this host's address)."""
        if self._server is not None:
            return
        listen.bind(self.host, self.port, 1).close()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="otlp-grpc", daemon=True)
        thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._bind(), loop).result(30)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            raise
        self._loop, self._thread = loop, thread

    async def _bind(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.so_reuseport", 0),
                *self.limits.options(),
            ],
        )
        handler = grpc.stream_unary_rpc_method_handler(self._export)  # raw bytes in and out
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
        return server

    def start(self) -> None:
        """Bind if not yet bound (see :meth:`bind`) and serve."""
        if self._serving:
            return
        self.bind()
        assert self._server is not None and self._loop is not None
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="otlp-grpc")
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(30)
        self._serving = True

    def shutdown(self, timeout_s: float) -> None:
        """Refuse new calls; calls in flight get ``timeout_s`` to finish. Idempotent, safe without start."""
        server, self._server = self._server, None
        loop, thread, serving = self._loop, self._thread, self._serving
        if server is None or loop is None or thread is None:
            return
        self._serving = False

        async def stop() -> None:
            if not serving:  # bound only: gRPC gives the port back only by stopping a started server
                await server.start()
            await server.stop(timeout_s if serving else None)  # None: nothing in flight to wait for

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout_s + 1)
        except TimeoutError:
            log.warning("OTLP/gRPC calls still open after the shutdown grace")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s + 1)
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    async def _export(self, _messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        # A stream-unary handler, so that the message is read here, within the read timeout; a unary
        # client's stream carries one message.
        address = _address(context.peer())
        open_calls = self.calls_by_address.get(address, 0)
        if open_calls >= self.limits.max_calls_per_address:
            await self._refuse(context, "address_limit", address, "too many calls open from this address",
                               grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
        self.calls_by_address[address] = open_calls + 1
        try:
            return await self._export_open(context, address)
        finally:
            left = self.calls_by_address.pop(address) - 1
            if left:
                self.calls_by_address[address] = left

    async def _export_open(self, context: grpc.aio.ServicerContext, address: str) -> bytes:
        metadata = context.invocation_metadata() or ()
        headers = [v for k, v in metadata if k == "authorization" and isinstance(v, str)]
        try:
            sender = self.ingestor.authenticate(headers)
        except Unauthenticated as e:
            self.metrics.requests.labels(transport="grpc", outcome="unauthenticated").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        timeout = self.limits.read_timeout_s or None
        try:
            body = await asyncio.wait_for(context.read(), timeout)
        except TimeoutError:
            self.metrics.requests.labels(transport="grpc", outcome="read_timeout").inc()
            self._refusals.record("read_timeout", address)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"request not received within {timeout:g} s"
            )
        if not isinstance(body, bytes):
            # EOF: the client closed its side without a message, or went away (then gRPC cancels this
            # call, and nothing is answered or counted): counted once the answer is sent.
            try:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
            except grpc.aio.AbortError:
                self.metrics.requests.labels(transport="grpc", outcome="invalid").inc()
                raise
        # Every answer but OK raises out of this frame, and the exception's traceback keeps the frame and
        # so the message alive until the cyclic garbage collector runs: seconds, or hundreds of MiB
        # under a flood of large refused messages. The message is held by the worker's job only.
        size, message = len(body), [body]
        del body
        if not self.calls_handled.take(1):
            message.clear()
            await self._refuse(context, "backpressure", address, "too many calls in flight",
                               grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
        if not self.bytes_in_flight.take(size):
            message.clear()
            self.calls_handled.give(1)
            await self._refuse(context, "backpressure", address, "too many request bytes in flight")
        assert self._pool is not None
        job = self._pool.submit(self._ingest, message.pop(), sender)

        def release(_: object) -> None:  # when the worker is done, even if the client cancelled before
            self.bytes_in_flight.give(size)
            self.calls_handled.give(1)

        job.add_done_callback(release)
        outcome = await asyncio.wrap_future(job)
        self.metrics.requests.labels(transport="grpc", outcome=outcome.kind).inc()
        if outcome.response is not None:
            answer: bytes = outcome.response.SerializeToString()
            return answer
        code = _CODES[outcome.kind]
        if outcome.kind in _RETRYABLE:
            await self._abort_retryable(context, outcome.message, outcome.retry_after_s, code)
        await context.abort(code, outcome.message)
        raise AssertionError("context.abort raises")  # for type checkers: abort never returns

    def _ingest(self, body: bytes, sender: Principal | None) -> Outcome:
        """On a worker: the ingestor parses (or decodes natively) the request; bytes that protobuf refuses
        are answered INVALID_ARGUMENT."""
        try:
            with self.decode_budget.hold(decoded_cost(body)) as hold:
                return self.ingestor.export_body(body, sender, hold)
        except Busy as e:
            return Outcome("backpressure", str(e), retry_after_s=1)
        except TooCostly as e:
            return Outcome("too_large", str(e))
        except Exception:
            # A bug: INTERNAL (not retried by senders), logged and counted as the server's fault.
            log.exception("unexpected error while handling an OTLP/gRPC request")
            return Outcome("error", "internal error")

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        outcome: str,
        address: str,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    ) -> NoReturn:
        """A call refused by a bound of the edge: counted, logged (at most a line a minute) and retryable."""
        self.metrics.requests.labels(transport="grpc", outcome=outcome).inc()
        self._refusals.record(outcome, address)
        await self._abort_retryable(context, f"{message}, retry later", 1, code)

    async def _abort_retryable(
        self,
        context: grpc.aio.ServicerContext,
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
        await context.abort(
            code,
            message,
            (
                ("grpc-status-details-bin", detail.SerializeToString()),
                ("google.rpc.retryinfo-bin", retry.SerializeToString()),
            ),
        )
        raise AssertionError("context.abort raises")  # for type checkers: abort never returns


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
