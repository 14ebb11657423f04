"""OTLP/HTTP receiver: ``POST /v1/metrics`` with protobuf or JSON bodies, optionally gzip-compressed.

Answers follow the OTLP specification: the response uses the request's content type, errors carry a
``google.rpc.Status``, and only 429/502/503/504 are retryable. With ingest tokens a request needs
``Authorization: Bearer <token>``: without a valid one it is answered 401 before its body is read, and
nothing is kept. With TLS, each accepted connection is wrapped with the current certificate (a reload
serves new connections; open ones keep theirs); plain HTTP to the port fails its handshake.
"""

from __future__ import annotations

import json
import logging
import threading
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from meterhouse.collector.auth import Unauthenticated
from meterhouse.collector.ingest import Ingestor, Outcome
from meterhouse.collector.model import content_digest
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

#: Headers of a 401, so clients know which scheme to use.
UNAUTHORIZED_HEADERS = (("WWW-Authenticate", 'Bearer realm="meterhouse"'),)


class _TooLarge(Exception):
    pass


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


def gunzip_limited(data: bytes, limit: int) -> bytes:
    """Inflate gzip ``data`` but never past ``limit`` bytes, so a gzip bomb is refused cheaply."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise _TooLarge
    if not d.eof:
        raise zlib.error("truncated gzip stream")
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "meterhouse"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request would drown the logs; outcomes are counted instead

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        with self.server.receiver.in_flight:
            try:
                self._post()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception:
                # A bug must not cost the client its answer: 500 is not retryable, and it is logged.
                log.exception("unexpected error while handling an OTLP/HTTP request")
                self.close_connection = True
                self.server.receiver.metrics.requests.labels(transport="http", outcome="invalid").inc()
                self._status(HTTPStatus.INTERNAL_SERVER_ERROR, code_pb2.INTERNAL, "internal error", JSON)

    def _post(self) -> None:
        receiver = self.server.receiver
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        answer_type = ctype if ctype in (PROTOBUF, JSON) else JSON
        if self.path.split("?")[0] != PATH:
            self._discard_body()
            return self._status(
                HTTPStatus.NOT_FOUND,
                code_pb2.NOT_FOUND,
                f"no such path; OTLP metrics are posted to {PATH}",
                answer_type,
            )
        outcome = receiver.handle(self, ctype)
        status, code = _STATUS[outcome.kind]
        receiver.metrics.requests.labels(transport="http", outcome=outcome.kind).inc()
        if outcome.response is not None:
            body = (
                json_format.MessageToJson(outcome.response).encode()
                if answer_type == JSON
                else outcome.response.SerializeToString()
            )
            return self._send(status, body, answer_type)
        self._status(status, code, outcome.message, answer_type, outcome.retry_after_s)

    def do_GET(self) -> None:  # noqa: N802
        self._status(HTTPStatus.METHOD_NOT_ALLOWED, code_pb2.INVALID_ARGUMENT, f"use POST {PATH}", JSON)

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _discard_body(self) -> None:
        self.close_connection = True

    def _status(
        self, status: HTTPStatus, code: int, message: str, ctype: str, retry_after_s: int = 0
    ) -> None:
        st = status_pb2.Status(code=code, message=message)
        body = json_format.MessageToJson(st).encode() if ctype == JSON else st.SerializeToString()
        self._send(status, body, ctype, retry_after_s)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, retry_after_s: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if retry_after_s:
            self.send_header("Retry-After", str(retry_after_s))
        if status == HTTPStatus.UNAUTHORIZED:
            for name, value in UNAUTHORIZED_HEADERS:
                self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    receiver: OtlpHttpReceiver

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, address = super().get_request()
        tls = self.receiver.tls
        return (tls.wrap(sock) if tls is not None else sock), address

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        # A failed TLS handshake (plain HTTP to a TLS port, an unknown client certificate) or a
        # dropped connection: the connection is closed, nothing else to do.
        log.debug("connection closed on error", exc_info=True)


class OtlpHttpReceiver:
    """A source stage: serves OTLP/HTTP and hands decoded points to an :class:`Ingestor`."""

    def __init__(
        self,
        host: str,
        port: int,
        ingestor: Ingestor,
        metrics: PipelineMetrics,
        max_request_bytes: int,
        tls: ServerTls | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.tls = tls
        self.ingestor = ingestor
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.in_flight = InFlight()

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = _Server((self.host, self.port), _Handler)
        self._server.receiver = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="otlp-http", daemon=True
        )
        self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; requests in flight finish against the still-running writer."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def handle(self, h: _Handler, ctype: str) -> Outcome:
        try:
            sender = self.ingestor.authenticate(h.headers.get("Authorization"))
        except Unauthenticated as e:
            h.close_connection = True  # the body is not read: nothing of it is kept
            return Outcome("unauthenticated", str(e))
        limit = self.max_request_bytes
        encoding = (h.headers.get("Content-Encoding") or "identity").strip().lower()
        length_header = h.headers.get("Content-Length")
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked" or length_header is None:
            h.close_connection = True
            return Outcome("invalid", "a Content-Length header is required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            h.close_connection = True
            return Outcome("invalid", f"invalid Content-Length {length_header!r}")
        if length > limit:
            h.close_connection = True  # the unread body makes the connection unusable
            return Outcome("too_large", f"request body of {length} bytes exceeds the limit of {limit} bytes")
        body = h.rfile.read(length)
        if len(body) < length:
            h.close_connection = True
            return Outcome("invalid", "request body shorter than Content-Length")
        if ctype not in (PROTOBUF, JSON):
            return Outcome(
                "unsupported_media_type",
                f"unsupported Content-Type {ctype or '(none)'!r}; use {PROTOBUF} or {JSON}",
            )
        if encoding == "gzip":
            try:
                body = gunzip_limited(body, limit)
            except _TooLarge:
                return Outcome("too_large", f"decompressed request exceeds the limit of {limit} bytes")
            except (zlib.error, EOFError) as e:
                return Outcome("invalid", f"invalid gzip body: {e}")
        elif encoding != "identity":
            return Outcome(
                "unsupported_media_type", f"unsupported Content-Encoding {encoding!r}; use gzip or identity"
            )
        request = ExportMetricsServiceRequest()
        try:
            if ctype == PROTOBUF:
                request.ParseFromString(body)
            else:
                parsed = json.loads(body)
                check_json_shape(parsed, request.DESCRIPTOR)
                json_format.ParseDict(parsed, request, ignore_unknown_fields=True)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as e:
            what = "protobuf" if ctype == PROTOBUF else "OTLP/JSON"
            return Outcome(
                "invalid",
                f"cannot parse {what} ExportMetricsServiceRequest: {str(e)[:300] or type(e).__name__}",
            )
        return self.ingestor.export(request, content_digest(body), sender)
