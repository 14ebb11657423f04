"""OTLP/HTTP receiver: ``POST /v1/metrics`` with protobuf or JSON bodies, optionally compressed (gzip,
deflate or zstd; see receivers.compression).

Answers follow the OTLP specification: the response uses the request's content type, errors carry a
``google.rpc.Status``, and only 429/502/503/504 are retryable. With ingest tokens a request needs
``Authorization: Bearer <token>``: without a valid one it is answered 401 before its body is read, and
nothing is kept. With TLS (see core.tls), plain HTTP to the port fails its handshake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from meterhouse.collector.auth import Principal, Unauthenticated
from meterhouse.collector.budget import STANDALONE_DECODE_BYTES, Busy, DecodeBudget, Hold, TooCostly
from meterhouse.collector.decode import decoded_cost
from meterhouse.collector.ingest import Ingestor, Outcome
from meterhouse.collector.model import content_digest
from meterhouse.collector.receivers import compression
from meterhouse.core.httpserver import HttpLimits, HttpServer, Receive, Scope, Send
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.tls import ServerTls

log = logging.getLogger("meterhouse.receiver.http")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
PATH = "/v1/metrics"

_STATUS = {
    "ok": (HTTPStatus.OK, code_pb2.OK),
    "partial": (HTTPStatus.OK, code_pb2.OK),
    "invalid": (HTTPStatus.BAD_REQUEST, code_pb2.INVALID_ARGUMENT),
    "too_large": (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code_pb2.INVALID_ARGUMENT),
    "unsupported_media_type": (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, code_pb2.INVALID_ARGUMENT),
    "backpressure": (HTTPStatus.SERVICE_UNAVAILABLE, code_pb2.UNAVAILABLE),
    "unavailable": (HTTPStatus.SERVICE_UNAVAILABLE, code_pb2.UNAVAILABLE),
    "unauthenticated": (HTTPStatus.UNAUTHORIZED, code_pb2.UNAUTHENTICATED),
    "rate_limited": (HTTPStatus.TOO_MANY_REQUESTS, code_pb2.RESOURCE_EXHAUSTED),
}

#: Header of a 401, so clients know which scheme to use.
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="meterhouse"')
#: Header of a 415: the Content-Encodings a request may use (RFC 7694).
ACCEPT_ENCODING = (b"accept-encoding", compression.ACCEPTED.encode())


def check_json_shape(value: object, descriptor: Descriptor, path: str = "") -> None:
    """Every known message-typed field holds an object (or a list of objects when repeated).

    protobuf's JSON parser, told to ignore unknown fields, takes a string where a message belongs as
    a message of unknown fields; OTLP/JSON with such a wrong type is refused instead.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{path or 'request'}: expected an object, got {type(value).__name__}")
    for key, item in value.items():
        field = descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)
        if field is None or field.message_type is None or item is None:
            continue
        where = f"{path}.{key}" if path else key
        if field.is_repeated:
            if not isinstance(item, list):
                raise ValueError(f"{where}: expected a list, got {type(item).__name__}")
            for i, element in enumerate(item):
                check_json_shape(element, field.message_type, f"{where}[{i}]")
        else:
            check_json_shape(item, field.message_type, where)


class InFlight:
    """Counts requests being handled, so shutdown can wait until their answers are sent."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            self._n += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout_s)


class _Answer:
    """What the receiver sends back: an outcome, and whether the connection must close (unread body)."""

    def __init__(self, outcome: Outcome, close: bool = False) -> None:
        self.outcome, self.close = outcome, close


class OtlpHttpReceiver:
    """A source stage: serves OTLP/HTTP and hands decoded points to an :class:`Ingestor`.

    The server (see core.httpserver) reads bodies on its event loop; decoding and the spool append run
    on ``workers`` threads. At most ``limits.max_requests_in_flight`` requests and
    ``max_bytes_in_flight`` body bytes are held at once; beyond either, 503 with Retry-After.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ingestor: Ingestor,
        metrics: PipelineMetrics,
        max_request_bytes: int,
        limits: HttpLimits | None = None,
        max_bytes_in_flight: int = 0,
        workers: int = 8,
        tls: ServerTls | None = None,
        decode_budget: DecodeBudget | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.tls = tls
        self.ingestor = ingestor
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.limits = limits or HttpLimits()
        self.max_bytes_in_flight = max_bytes_in_flight or 4 * max_request_bytes
        self.workers = workers
        self.decode_budget = decode_budget or DecodeBudget(STANDALONE_DECODE_BYTES)
        self.in_flight = InFlight()
        self._admitted = 0  # touched on the event loop thread only
        self._bytes = 0
        self._server: HttpServer | None = None
        self._pool: ThreadPoolExecutor | None = None

    def bind(self) -> None:
        """Take the port (OSError when it cannot be), serving nothing before :meth:`start`. Idempotent."""
        if self._server is None:
            self._server = HttpServer(self._asgi, self.host, self.port, self.limits, "otlp-http", self.tls)
        self._server.bind()
        self.port = self._server.port

    def start(self) -> None:
        if self._pool is not None and self._server is not None:
            return
        self.bind()
        assert self._server is not None
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="otlp-http")
        try:
            self._server.start()
        except OSError:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise

    def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; requests in flight finish against the still-running writer."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k: v for k, v in scope["headers"]}
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        answer_type = ctype if ctype in (PROTOBUF, JSON) else JSON
        if scope["method"] != "POST":
            self.metrics.requests.labels(transport="http", outcome="not_found").inc()
            return await self._status(
                send,
                HTTPStatus.METHOD_NOT_ALLOWED,
                code_pb2.INVALID_ARGUMENT,
                f"use POST {PATH}",
                JSON,
                close=True,
            )
        if scope["path"] != PATH:
            self.metrics.requests.labels(transport="http", outcome="not_found").inc()
            return await self._status(
                send,
                HTTPStatus.NOT_FOUND,
                code_pb2.NOT_FOUND,
                f"no such path; OTLP metrics are posted to {PATH}",
                answer_type,
                close=True,
            )
        try:
            with self.in_flight:
                auth = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
                codings = [v for k, v in scope["headers"] if k == b"content-encoding"]
                handled = await self._handle(headers, auth, codings, ctype, receive)
                if handled is not None:
                    await self._answer(send, handled, answer_type)
        except Exception:
            # A bug must not cost the client its answer: 500 is not retryable, and it is logged.
            log.exception("unexpected error while handling an OTLP/HTTP request")
            self.metrics.requests.labels(transport="http", outcome="error").inc()
            await self._status(
                send, HTTPStatus.INTERNAL_SERVER_ERROR, code_pb2.INTERNAL, "internal error", JSON, close=True
            )

    async def _handle(
        self, headers: dict[bytes, bytes], auth: list[str], codings: list[bytes], ctype: str, receive: Receive
    ) -> _Answer | None:
        """The request's answer, or None when its client went away.

        Its headers are checked first and its body read (bounded by ``max_bytes_in_flight``) without a
        slot: a request holds one of ``max_requests_in_flight`` only once its body is complete, so clients
        that trickle their bodies cost a socket each, not a slot.
        """
        try:
            sender = self.ingestor.authenticate(auth)  # every Authorization header: two are refused
        except Unauthenticated as e:
            return _Answer(Outcome("unauthenticated", str(e)), True)  # the body is not read, nor kept
        limit = self.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None and int(length) > limit:  # llhttp has already checked it is digits
            return _Answer(
                Outcome(
                    "too_large", f"request body of {int(length)} bytes exceeds the limit of {limit} bytes"
                ),
                True,
            )
        if ctype not in (PROTOBUF, JSON):
            return _Answer(
                Outcome(
                    "unsupported_media_type",
                    f"unsupported Content-Type {ctype or '(none)'!r}; use {PROTOBUF} or {JSON}",
                ),
                True,
            )
        try:
            encoding = compression.content_encoding(codings)  # every Content-Encoding header
        except compression.UnsupportedEncoding as e:
            return _Answer(Outcome("unsupported_media_type", str(e)), True)
        body = bytearray()
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None  # the client went away mid-body; nothing was acknowledged
                chunk = message.get("body", b"")
                if len(body) + len(chunk) > limit:
                    return _Answer(
                        Outcome("too_large", f"request body exceeds the limit of {limit} bytes"), True
                    )
                if self._bytes + len(chunk) > self.max_bytes_in_flight:
                    return _Answer(
                        Outcome(
                            "backpressure", "too many request bytes in flight, retry later", retry_after_s=1
                        ),
                        True,
                    )
                self._bytes += len(chunk)
                body += chunk
                if not message.get("more_body", False):
                    break
            if self._admitted >= self.limits.max_requests_in_flight:
                # The body was read whole: the connection stays open for the client's retry.
                return _Answer(
                    Outcome("backpressure", "too many requests in flight, retry later", retry_after_s=1)
                )
            self._admitted += 1
            try:
                loop = asyncio.get_running_loop()
                outcome = await loop.run_in_executor(
                    self._pool, self._decode_in_budget, ctype, encoding, bytes(body), sender
                )
            finally:
                self._admitted -= 1
            return _Answer(outcome)
        finally:
            self._bytes -= len(body)

    def _decode_in_budget(
        self, ctype: str, encoding: compression.Encoding, body: bytes, sender: Principal | None
    ) -> Outcome:
        compressed = encoding is not compression.Encoding.IDENTITY
        if compressed:  # a budget smaller than one inflating lets it inflate alone
            cost = compression.inflating_cost(encoding, len(body), self.max_request_bytes)
            first = min(cost, self.decode_budget.most)
        else:
            first = decoded_cost(body, ctype == PROTOBUF)
        try:
            with self.decode_budget.hold(first) as hold:
                return self._decode_export(ctype, encoding, body, sender, hold)
        except Busy as e:
            return Outcome("backpressure", str(e), retry_after_s=1)
        except TooCostly as e:
            return Outcome("too_large", str(e))

    def _decode_export(
        self, ctype: str, encoding: compression.Encoding, body: bytes, sender: Principal | None, hold: Hold
    ) -> Outcome:
        limit = self.max_request_bytes
        try:
            body = compression.inflate(encoding, body, limit)
        except compression.TooLarge as e:
            why = f" ({e})" if str(e) else ""
            return Outcome("too_large", f"decompressed request exceeds the limit of {limit} bytes{why}")
        except compression.CorruptBody as e:
            return Outcome("invalid", str(e))
        hold.resize(decoded_cost(body, ctype == PROTOBUF))
        if ctype == PROTOBUF:  # decoded natively, or parsed after its share grows, by the ingestor
            return self.ingestor.export_body(body, sender, hold)
        request = ExportMetricsServiceRequest()
        try:
            parsed = json.loads(body)
            check_json_shape(parsed, request.DESCRIPTOR)
            json_format.ParseDict(parsed, request, ignore_unknown_fields=True)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as e:
            return Outcome(
                "invalid",
                f"cannot parse OTLP/JSON ExportMetricsServiceRequest: {str(e)[:300] or type(e).__name__}",
            )
        return self.ingestor.export(request, content_digest(body), sender)

    async def _answer(self, send: Send, answer: _Answer, answer_type: str) -> None:
        outcome = answer.outcome
        status, code = _STATUS[outcome.kind]
        self.metrics.requests.labels(transport="http", outcome=outcome.kind).inc()
        if outcome.response is not None:
            body = (
                json_format.MessageToJson(outcome.response).encode()
                if answer_type == JSON
                else outcome.response.SerializeToString()
            )
            return await self._send(send, status, body, answer_type, close=answer.close)
        await self._status(
            send, status, code, outcome.message, answer_type, outcome.retry_after_s, answer.close
        )

    async def _status(
        self,
        send: Send,
        status: HTTPStatus,
        code: int,
        message: str,
        ctype: str,
        retry_after_s: int = 0,
        close: bool = False,
    ) -> None:
        st = status_pb2.Status(code=code, message=message)
        body = json_format.MessageToJson(st).encode() if ctype == JSON else st.SerializeToString()
        await self._send(send, status, body, ctype, retry_after_s, close)

    @staticmethod
    async def _send(
        send: Send, status: HTTPStatus, body: bytes, ctype: str, retry_after_s: int = 0, close: bool = False
    ) -> None:
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        if retry_after_s:
            headers.append((b"retry-after", str(retry_after_s).encode()))
        if close:
            headers.append((b"connection", b"close"))
        if status == HTTPStatus.UNAUTHORIZED:
            headers.append(WWW_AUTHENTICATE)
        if status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE:
            headers.append(ACCEPT_ENCODING)
        await send({"type": "http.response.start", "status": int(status), "headers": headers})
        await send({"type": "http.response.body", "body": body})
