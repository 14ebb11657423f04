"""OTLP/gRPC receiver: ``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``.

The server is meterhouse's own (``grpc_server``: asyncio and the ``h2`` HTTP/2 state machine on one event
loop thread), so that every connection and every DATA frame is seen before anything is held: a call costs
a coroutine-free stream record, not a thread, while its message arrives, and a message is admitted by its
5-byte length prefix. (grpcio's server buffered a unary message whole before any hook, up to
``max_request_bytes`` on every call, and closed new connections at its bound while idle ones stayed.)

The request is taken as raw bytes and parsed on one of ``workers`` threads, so a malformed message is
answered INVALID_ARGUMENT. ``grpc-encoding: gzip`` (or deflate) is inflated there to at most
``max_request_bytes``. Retryable answers are UNAVAILABLE (or RESOURCE_EXHAUSTED for the ingest rate and the
call bounds) with a ``RetryInfo`` detail. With ingest tokens, a call needs ``authorization: Bearer
<token>`` metadata (UNAUTHENTICATED otherwise, before its message is read, nothing kept). With TLS (HTTP/2
offered by ALPN), credentials are re-read on the first handshake after a reload, so open channels are kept.

Bounds (:class:`GrpcLimits`): a message whose prefix announces more than ``max_request_bytes`` is refused
(RESOURCE_EXHAUSTED) before its body is read; its bytes are charged to ``max_bytes_in_flight`` as they
arrive, not as announced (UNAVAILABLE with RetryInfo when the budget cannot take them, and what the call
held is given back), so a sender that announces large messages and trickles them holds only what it
sent; the message must arrive within ``read_timeout_s`` of the call's
start (DEADLINE_EXCEEDED otherwise); at most ``max_calls_per_address`` calls are open from one client
address; at most ``max_concurrent_rpcs`` calls whose message has arrived are handled or queued for a
worker (RESOURCE_EXHAUSTED with RetryInfo beyond). Connections are bounded per port
(``max_connections``, making room by closing the longest idle) and per address, streams per connection,
idle and age, and keepalive pings are held to the enforcement policy (see ``grpc_server``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from socket import socket
from typing import TYPE_CHECKING, NoReturn

from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2

from meterhouse.collector.auth import Principal, Unauthenticated
from meterhouse.collector.budget import STANDALONE_DECODE_BYTES, Busy, DecodeBudget, TooCostly
from meterhouse.collector.decode import decoded_cost
from meterhouse.collector.ingest import Ingestor, Outcome
from meterhouse.collector.receivers import compression
from meterhouse.collector.receivers.grpc_server import Call, GrpcServer, Refusal, ServerLimits, Status
from meterhouse.core import listen
from meterhouse.core.memory import plan as memory_plan
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.tls import ServerTls

if TYPE_CHECKING:
    from meterhouse.core.config import Config

log = logging.getLogger("meterhouse.receiver.grpc")
SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"

_CODES = {
    "invalid": Status.INVALID_ARGUMENT,
    "too_large": Status.RESOURCE_EXHAUSTED,
    "backpressure": Status.UNAVAILABLE,
    "unavailable": Status.UNAVAILABLE,
    "rate_limited": Status.RESOURCE_EXHAUSTED,
    "error": Status.INTERNAL,
}
_RETRYABLE = ("backpressure", "unavailable", "rate_limited")
#: ``grpc-encoding`` values taken: gRPC's gzip and deflate (zlib), inflated as OTLP/HTTP's are.
_ENCODINGS = {b"identity": compression.Encoding.IDENTITY, b"gzip": compression.Encoding.GZIP,
              b"deflate": compression.Encoding.DEFLATE}  # fmt: skip
LISTEN_BACKLOG = 2048


@dataclass(frozen=True)
class GrpcLimits:
    """What a sender may hold on the OTLP/gRPC port, and keepalive enforcement after the Collector's
    configgrpc ``keepalive``. Each field is the option ``grpc_<field>`` (0 turns a time off)."""

    read_timeout_s: float = 30.0
    max_calls_per_address: int = 64
    max_streams_per_connection: int = 100
    max_connections: int = 10_000
    max_connections_per_address: int = 256
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

    def server(self) -> ServerLimits:
        """The bounds the HTTP/2 server enforces itself."""
        return ServerLimits(**{f.name: getattr(self, f.name) for f in fields(ServerLimits)})


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


@dataclass
class _CallState:
    """What the receiver keeps on a call it took: who sent it and how its message is encoded."""

    sender: Principal | None
    encoding: compression.Encoding


class OtlpGrpcReceiver:
    """A source stage serving OTLP/gRPC into an :class:`Ingestor` (the :class:`CallHandler` of its server)."""

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
        self._states: dict[Call, _CallState] = {}  # the calls taken, until closed (loop thread)
        self._refusals = _RefusalLog()
        self._socket: socket | None = None  # bound, not yet served
        self._server: GrpcServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def bind(self) -> None:
        """Take the port, serving nothing before :meth:`start` (connections wait in the backlog); OSError
        naming why it cannot be. Idempotent."""
        if self._socket is None and self._server is None:
            self._socket = listen.bind(self.host, self.port, LISTEN_BACKLOG)
            self.port = self._socket.getsockname()[1]

    def start(self) -> None:
        """Bind if not yet bound (see :meth:`bind`) and serve."""
        if self._server is not None:
            return
        self.bind()
        sock, self._socket = self._socket, None
        assert sock is not None
        context = self.tls.front_context(h2=True) if self.tls is not None else None
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="otlp-grpc", daemon=True)
        thread.start()
        server = GrpcServer(loop, self, self.limits.server())
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="otlp-grpc")
        try:
            asyncio.run_coroutine_threadsafe(server.serve(sock, context), loop).result(30)
        except BaseException:
            sock.close()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            raise
        self._server, self._loop, self._thread = server, loop, thread

    def shutdown(self, timeout_s: float) -> None:
        """Refuse new calls (GOAWAY); calls in flight get ``timeout_s`` to finish. Idempotent, safe without
        start, and gives a port bound and not served back."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        server, self._server = self._server, None
        loop, thread = self._loop, self._thread
        if server is None or loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(server.stop(timeout_s), loop).result(timeout_s + 2)
        except TimeoutError:
            log.warning("OTLP/gRPC calls still open after the shutdown grace")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s + 1)
            if self._pool is not None:
                self._pool.shutdown(wait=False)

    # The server's hooks (on its event loop thread).

    def opened(self, call: Call) -> None:
        address = call.address
        open_calls = self.calls_by_address.get(address, 0)
        if open_calls >= self.limits.max_calls_per_address:
            self._refuse("address_limit", address, "too many calls open from this address",
                         Status.RESOURCE_EXHAUSTED)  # fmt: skip
        encoding = _ENCODINGS.get((call.header(b"grpc-encoding") or [b"identity"])[0])
        if encoding is None:
            self.metrics.requests.labels(transport="grpc", outcome="unsupported_media_type").inc()
            raise Refusal(
                Status.UNIMPLEMENTED,
                "unsupported grpc-encoding; accepted: identity, gzip, deflate",
            )
        headers = [v.decode("latin-1") for v in call.header(b"authorization")]
        try:
            sender = self.ingestor.authenticate(headers)
        except Unauthenticated as e:
            self.metrics.requests.labels(transport="grpc", outcome="unauthenticated").inc()
            raise Refusal(Status.UNAUTHENTICATED, str(e)) from None
        self.calls_by_address[address] = open_calls + 1
        self._states[call] = _CallState(sender, encoding)

    def announced(self, call: Call, size: int) -> None:
        state = self._states[call]
        if call.compressed and state.encoding is compression.Encoding.IDENTITY:
            self.metrics.requests.labels(transport="grpc", outcome="invalid").inc()
            raise Refusal(Status.INTERNAL, "a compressed message without grpc-encoding")
        if size > self.max_request_bytes:
            self.metrics.requests.labels(transport="grpc", outcome="too_large").inc()
            self._refusals.record("too_large", call.address)
            limit = self.max_request_bytes
            raise Refusal(
                Status.RESOURCE_EXHAUSTED, f"request message of {size} bytes exceeds the limit of {limit}"
            )

    def received(self, call: Call, n: int) -> None:
        if not self.bytes_in_flight.take(n):
            self._refuse("backpressure", call.address, "too many request bytes in flight")
        call.held += n

    def arrived(self, call: Call, message: bytes | None) -> None:
        if message is None:
            self.metrics.requests.labels(transport="grpc", outcome="invalid").inc()
            raise Refusal(Status.INVALID_ARGUMENT, "no request message")
        if not self.calls_handled.take(1):
            self._refuse("backpressure", call.address, "too many calls in flight", Status.RESOURCE_EXHAUSTED)
        assert self._pool is not None
        state, size = self._states[call], call.held
        call.held = 0  # the job holds them now, until its worker is done
        # A message's own flag says whether it is compressed: grpc sends a message that gzip would not
        # make smaller uncompressed (flag 0) under the call's grpc-encoding (it was refused, and lost).
        encoding = state.encoding if call.compressed else compression.Encoding.IDENTITY
        job = self._pool.submit(self._ingest, message, encoding, state.sender)
        del message

        def done(job: Future[Outcome]) -> None:  # on the worker, even if the client cancelled before
            self.bytes_in_flight.give(size)
            self.calls_handled.give(1)
            self._answer(call, job.result())

        job.add_done_callback(done)

    def timed_out(self, call: Call) -> Refusal:
        timeout = self.limits.read_timeout_s
        self.metrics.requests.labels(transport="grpc", outcome="read_timeout").inc()
        self._refusals.record("read_timeout", call.address)
        return Refusal(Status.DEADLINE_EXCEEDED, f"request not received within {timeout:g} s")

    def closed(self, call: Call) -> None:
        if self._states.pop(call, None) is None:
            return
        if call.held:
            self.bytes_in_flight.give(call.held)
            call.held = 0
        left = self.calls_by_address.pop(call.address) - 1
        if left:
            self.calls_by_address[call.address] = left

    def _answer(self, call: Call, outcome: Outcome) -> None:
        self.metrics.requests.labels(transport="grpc", outcome=outcome.kind).inc()
        if outcome.response is not None:
            call.answer(outcome.response.SerializeToString())
        elif outcome.kind in _RETRYABLE:
            call.refuse(_retryable(outcome.message, outcome.retry_after_s, _CODES[outcome.kind]))
        else:
            call.refuse(Refusal(_CODES[outcome.kind], outcome.message))

    def _ingest(self, body: bytes, encoding: compression.Encoding, sender: Principal | None) -> Outcome:
        """On a worker: the message inflated (at most ``max_request_bytes``) and parsed (or decoded
        natively) by the ingestor within the decode budget; bytes protobuf refuses are INVALID_ARGUMENT."""
        compressed = encoding is not compression.Encoding.IDENTITY
        if compressed:  # a budget smaller than one inflating lets it inflate alone
            cost = compression.inflating_cost(encoding, len(body), self.max_request_bytes)
            first = min(cost, self.decode_budget.most)
        else:
            first = decoded_cost(body)
        try:
            with self.decode_budget.hold(first) as hold:
                if compressed:
                    try:
                        body = compression.inflate(encoding, body, self.max_request_bytes)
                    except compression.TooLarge:
                        return Outcome("too_large", f"decompressed request exceeds the limit of "
                                                    f"{self.max_request_bytes} bytes")  # fmt: skip
                    except compression.CorruptBody as e:
                        return Outcome("invalid", str(e))
                    hold.resize(decoded_cost(body))
                return self.ingestor.export_body(body, sender, hold)
        except Busy as e:
            return Outcome("backpressure", str(e), retry_after_s=1)
        except TooCostly as e:
            return Outcome("too_large", str(e))
        except Exception:
            # A bug: INTERNAL (not retried by senders), logged and counted as the server's fault.
            log.exception("unexpected error while handling an OTLP/gRPC request")
            return Outcome("error", "internal error")

    def _refuse(
        self, outcome: str, address: str, message: str, status: Status = Status.UNAVAILABLE
    ) -> NoReturn:
        """A call refused by a bound of the edge: counted, logged (at most a line a minute) and retryable."""
        self.metrics.requests.labels(transport="grpc", outcome=outcome).inc()
        self._refusals.record(outcome, address)
        raise _retryable(f"{message}, retry later", 1, status)


def _retryable(message: str, retry_after_s: int, status: Status = Status.UNAVAILABLE) -> Refusal:
    """A retryable answer: the status details (the gRPC convention) and RetryInfo alone, which the Python
    SDK reads."""
    rpc_code = code_pb2.RESOURCE_EXHAUSTED if status == Status.RESOURCE_EXHAUSTED else code_pb2.UNAVAILABLE
    retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=max(1, retry_after_s)))
    detail = status_pb2.Status(code=rpc_code, message=message)
    detail.details.add().Pack(retry)
    return Refusal(status, message, (("grpc-status-details-bin", detail.SerializeToString()),
                                     ("google.rpc.retryinfo-bin", retry.SerializeToString())))  # fmt: skip


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
