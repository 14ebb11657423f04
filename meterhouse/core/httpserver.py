"""The HTTP server under both HTTP ports: uvicorn (httptools' llhttp parser) on one asyncio loop thread.

uvicorn brings chunked bodies, keep-alive, pipelining, ``Expect: 100-continue`` and llhttp's refusal
of ambiguous framing (two Content-Length headers, Content-Length with Transfer-Encoding: 400 and the
connection closed). What it lacks is added here, on its protocol class, after the OpenTelemetry
Collector's confighttp: a header timeout (request line and headers must arrive within
``read_header_timeout_s``), a request timeout (the body too, within ``read_timeout_s``), an idle timeout
(a connection that sends nothing, before or between requests), a bound on header bytes (431), a
minimum body rate after a grace period (Kestrel's ``MinRequestBodyDataRate``: 408 below it), and bounds on
connections per port and per client address (503).
Connections cost a socket and a few kilobytes, not a thread: thousands of idle or trickling clients
neither starve the others nor pile up threads, and each is closed when its timer runs out.

A connection closed while its client may still be sending (an answer given before the body was read: 401,
413, 415, 503; a timeout mid-request) is closed the way RFC 9112 section 9.6 asks: the answer is sent, the
write side shut (FIN), and what the client still sends is read and dropped until it closes its side or
``LINGER_S`` passes. Closing at once with unread bytes makes the kernel send a reset, which can destroy the
answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from meterhouse.core import listen
from meterhouse.core.memory import plan as memory_plan
from meterhouse.core.tls import ServerTls

if TYPE_CHECKING:
    from meterhouse.core.config import Config

log = logging.getLogger("meterhouse.http")

# ASGI 3, as uvicorn calls it.
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class HttpLimits:
    """Timeouts and bounds of one HTTP port (0 turns a timeout off)."""

    read_header_timeout_s: float = 60.0
    read_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_requests_in_flight: int = 64
    max_connections: int = 10_000
    max_connections_per_address: int = 256
    min_body_rate_bytes_s: float = 1024.0
    min_body_rate_grace_s: float = 5.0
    backlog: int = 2048


#: Longest a connection is kept, reading and dropping what its client still sends, after its answer.
LINGER_S = 2.0


def _close_with(transport: asyncio.Transport | LingeringTransport, status: bytes, message: bytes) -> None:
    if transport.is_closing():
        return
    transport.write(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\nconnection: close\r\n\r\n" + message
    )
    transport.close()


def limits_from(config: Config) -> HttpLimits:
    """The HTTP limits of ``config`` (a :class:`meterhouse.core.config.Config`)."""
    return HttpLimits(
        read_header_timeout_s=config.http_read_header_timeout_s,
        read_timeout_s=config.http_read_timeout_s,
        idle_timeout_s=config.http_idle_timeout_s,
        max_header_bytes=config.http_max_header_bytes,
        max_requests_in_flight=config.http_max_requests_in_flight,
        max_connections=config.http_max_connections or memory_plan(config).connections_per_port,
        max_connections_per_address=config.http_max_connections_per_address,
        min_body_rate_bytes_s=config.http_min_body_rate_bytes_s,
        min_body_rate_grace_s=config.http_min_body_rate_grace_s,
    )


class LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` mid-request lingers (see the module doc).

    Everything else is the transport's own. While lingering the connection counts as closing, so nothing
    more is written to it.
    """

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self._transport, self._protocol = transport, protocol
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self.is_closing():
            return
        if not self._protocol.mid_request:
            self._transport.close()
            return
        self.lingering = True
        self._transport.resume_reading()
        if self._transport.can_write_eof():
            self._transport.write_eof()  # after what is buffered: the answer goes first
        self._timer = self._protocol.loop.call_later(LINGER_S, self.abort_linger)

    def abort_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._transport.is_closing():
            self._transport.close()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines, a minimum body rate, header and connection bounds."""

    limits: HttpLimits = HttpLimits()
    #: Open connections per client address, of the server this class was made for (one event loop).
    per_address: Counter[str] = Counter()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.lingering = LingeringTransport(transport, self)
        self.transport = self.lingering  # type: ignore[assignment]
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_head = True  # between requests and while a request line and headers arrive
        self.mid_request = True  # a refusal now is read by a client that is about to send a request
        self._body_started = 0.0
        self._body_bytes = 0
        self._rate_timer: asyncio.TimerHandle | None = None
        self._since = self.loop.time()  # when its present phase began: connected, a head, an answer
        peer = transport.get_extra_info("peername")
        self._address: str | None = peer[0] if isinstance(peer, tuple) else None
        if self._address is not None:
            self.per_address[self._address] += 1
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            _close_with(self.transport, b"503 Service Unavailable", b"too many connections")
            return
        crowded = (
            self._address is not None
            and self.per_address[self._address] > self.limits.max_connections_per_address
        )
        if crowded:
            _close_with(self.transport, b"503 Service Unavailable", b"too many connections from this address")
            return
        self.mid_request = False
        self._arm(self.limits.idle_timeout_s, b"")  # a connection that never sends is idle

    def _make_room(self) -> bool:
        """At the connection bound: close the connection that has waited longest between requests or in
        a request's head (nothing of it is taken yet: its client reconnects and sends again), so idle or
        crawling connections, however many addresses hold them, cannot keep an honest sender out. False
        when every other connection has a request or an answer in progress."""
        victim: GuardedProtocol | None = None
        for c in self.connections:
            if c is self or not isinstance(c, GuardedProtocol) or c.transport.is_closing():
                continue
            if (c.cycle is not None and not c.cycle.response_complete) or (c.mid_request and not c._in_head):
                continue
            if victim is None or c._since < victim._since:
                victim = c
        if victim is None:
            return False
        if victim.mid_request:
            _close_with(victim.transport, b"503 Service Unavailable", b"too many connections")
        else:
            victim.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.lingering.abort_linger()
        if self._address is not None:
            self.per_address[self._address] -= 1
            if self.per_address[self._address] <= 0:
                del self.per_address[self._address]
            self._address = None
        super().connection_lost(exc)

    def _arm(self, seconds: float, status: bytes) -> None:
        self._disarm()
        if seconds > 0:
            self._timer = self.loop.call_later(seconds, self._expire, status)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None

    def _expire(self, status: bytes) -> None:
        self._timer = None
        if status and (self.cycle is None or not self.cycle.response_started):
            _close_with(self.transport, status, b"request not received in time")
        elif not self.transport.is_closing():
            self.transport.close()

    def _check_body_rate(self) -> None:
        """Every second while a body arrives: below the minimum rate after the grace period, 408."""
        self._rate_timer = None
        if self.transport.is_closing() or not self.mid_request or self._in_head:
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the server is not reading: the client is not to blame
            self._body_started += 1.0
        elapsed = now - self._body_started
        if (
            elapsed >= self.limits.min_body_rate_grace_s
            and self._body_bytes < self.limits.min_body_rate_bytes_s * elapsed
            and (self.cycle is None or not self.cycle.response_started)
        ):
            _close_with(self.transport, b"408 Request Timeout", b"request body arrives too slowly")
            return
        self._rate_timer = self.loop.call_later(1.0, self._check_body_rate)

    def data_received(self, data: bytes) -> None:
        if self.lingering.lingering:
            return  # read and dropped: the answer has been given
        if self._in_head:
            # Count the head's bytes before the parser sees them: a head that ends within this read
            # would otherwise be complete (and the count reset) before the bound is checked.
            end = data.find(b"\r\n\r\n")
            head = len(data) if end < 0 else end + 4
            if self._header_bytes + head > self.limits.max_header_bytes and self.parser is not None:
                _close_with(
                    self.transport, b"431 Request Header Fields Too Large", b"request headers too large"
                )
                return
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._header_bytes > self.limits.max_header_bytes and self.parser is not None:
            _close_with(self.transport, b"431 Request Header Fields Too Large", b"request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._since = self.loop.time()
        self._in_head = True
        self.mid_request = True
        self._arm(self.limits.read_header_timeout_s, b"408 Request Timeout")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._header_bytes = 0
        self._body_started, self._body_bytes = self.loop.time(), 0
        self._arm(self.limits.read_timeout_s, b"408 Request Timeout")
        if self.limits.min_body_rate_bytes_s > 0:
            self._rate_timer = self.loop.call_later(1.0, self._check_body_rate)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()  # the application has the request; uvicorn arms keep-alive after the answer
        self._since = self.loop.time()
        self._in_head = True
        self.mid_request = False
        super().on_message_complete()


def retry_after_503(message: str, retry_after_s: int = 1) -> App:
    """An ASGI answer: 503 with Retry-After, closing the connection (the body was not read)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = message.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after_s).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


class InFlightLimit:
    """ASGI middleware: at most ``limit`` requests inside ``app``; more are answered 503 + Retry-After."""

    def __init__(self, app: App, limit: int) -> None:
        self.app, self.limit, self.n = app, limit, 0
        self._refuse = retry_after_503("too many requests in flight, retry later")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.n >= self.limit:
            await self._refuse(scope, receive, send)
            return
        self.n += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.n -= 1


class UnreadAnswers:
    """ASGI middleware: the bytes of answers that their clients have not yet taken are at most
    ``max_bytes``. An answer is counted from its first body bytes until it is complete and the server's
    transport has passed it to the kernel (uvicorn's ``send`` waits for the connection's write buffer to
    drain before it writes, so an empty last message is sent after the answer's bytes and waited for); an
    answer that would pass the bound while others are held is replaced by ``refusal`` (status, content
    type, body, extra headers). A client that asked for answers and read none held each in the process's
    memory until its connection closed: 100 of 7 MB grew the collector by 230-260 MiB (adversary 36)."""

    def __init__(
        self, app: App, max_bytes: int, refusal: tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]
    ):
        self.app, self.max_bytes, self.refusal = app, max_bytes, refusal
        self.held = 0  # changed on the event loop only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        refused = False
        mine = 0  # this answer's bytes in self.held

        async def counted(message: Message) -> None:
            nonlocal start, refused, mine
            if refused:
                return
            if message["type"] == "http.response.start":
                start = message  # sent with the first body bytes, or replaced by the refusal
                return
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            if start is not None:
                head, start = start, None
                if self.held and self.held + len(body) > self.max_bytes:
                    refused = True
                    status, content_type, text, headers = self.refusal
                    await send({"type": "http.response.start", "status": status, "headers": [
                        (b"content-type", content_type), (b"content-length", str(len(text)).encode()),
                        (b"retry-after", b"1"), *headers]})  # fmt: skip
                    await send({"type": "http.response.body", "body": text})
                    return
                await send(head)
            self.held += len(body)
            mine += len(body)
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            if last and body:
                await send({**message, "more_body": True})
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)  # the last one returns once what was written before it has drained
            if last:
                self.held -= mine
                mine = 0

        try:
            await self.app(scope, receive, counted)
        finally:
            self.held -= mine


class BufferedBody:
    """ASGI middleware: the whole request body is read on the event loop, under the port's timeouts and
    body-rate bound, before ``app`` runs; one past ``max_bytes`` is answered ``too_large`` and the
    connection closed. For an app on a small thread pool (a2wsgi's): a client trickling its body held a
    worker thread the whole time, and four of them stopped the SQL endpoint answering (adversary 33)."""

    def __init__(self, app: App, max_bytes: int, too_large: bytes) -> None:
        self.app, self.max_bytes, self.too_large = app, max_bytes, too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"text/plain; charset=UTF-8"),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": self.too_large})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole, given = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class HttpServer:
    """An ASGI application served by uvicorn on its own thread and event loop, in this process."""

    def __init__(
        self, app: App, host: str, port: int, limits: HttpLimits, name: str, tls: ServerTls | None = None
    ) -> None:
        self.app, self.host, self.port, self.limits, self.name = app, host, port, limits, name
        self.tls = tls  # TLS on every connection (plain HTTP fails its handshake); reloadable
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None  # bound, not yet served

    def bind(self) -> None:
        """Take the port (OSError when it cannot be: taken, privileged, not this host's address); nothing
        is served before :meth:`start`, connections wait in the backlog. Idempotent."""
        if self._socket is None and self._server is None:
            self._socket = listen.bind(self.host, self.port, self.limits.backlog)
            self.port = self._socket.getsockname()[1]

    def start(self) -> None:
        """Bind if not yet bound (see :meth:`bind`) and serve; returns once the server is up."""
        if self._server is not None:
            return
        self.bind()
        sock, self._socket = self._socket, None
        assert sock is not None
        protocol = type("Protocol", (GuardedProtocol,), {"limits": self.limits, "per_address": Counter()})
        config = uvicorn.Config(
            self.app,
            http=protocol,
            loop="asyncio",
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            log_config=None,
            log_level="error",  # uvicorn would log a line per refused request; outcomes are counted
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=max(1, round(self.limits.idle_timeout_s))
            if self.limits.idle_timeout_s
            else 10**9,
            backlog=self.limits.backlog,
            ssl_context_factory=self._ssl_context if self.tls is not None else None,
        )
        server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise OSError(f"{self.name}: the HTTP server did not start on {self.host}:{self.port}")
        self._server = server

    def _ssl_context(self, _config: uvicorn.Config, _default: object) -> ssl.SSLContext:
        assert self.tls is not None
        return self.tls.front_context()

    def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; requests in flight get ``timeout_s`` to be answered. Idempotent, and gives a
        port bound and not served back."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        server, self._server = self._server, None
        if server is None:
            return
        server.config.timeout_graceful_shutdown = max(1, round(timeout_s))
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s + 2)
