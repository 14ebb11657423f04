"""The OTLP/gRPC edge's HTTP/2 server: asyncio connections driving the ``h2`` state machine, one unary method.

grpcio's server buffers a unary message whole before any application code sees it and has no hook on
an accepted connection; this server sees every connection and every DATA frame, so that meterhouse
bounds what senders hold itself:

- A call's flow-control window is the HTTP/2 default (64 KiB) until its 5-byte length prefix arrives.
  The handler then checks the announced length (:meth:`CallHandler.announced`, which refuses a message
  larger than a request may be before its body is read), and only then is the stream's window opened to
  the message's length. Every DATA byte is charged on arrival to its call (:meth:`CallHandler.received`,
  which refuses the call when the byte budget cannot take it) or dropped (a refused call), so what the
  connection window lets in is never held beyond what the budget took; the window is given back as bytes
  arrive. A call holds what has arrived of its message, not what it announced: a sender that announces
  a large message and trickles it holds what it sent, and cannot fill the budget with announcements.
- Connections are bounded per port and per client address. At the port's bound the connection idle
  longest (no call open, or never sent the HTTP/2 preface) is closed to make room, as the HTTP ports do
  (``meterhouse.core.httpserver``); only when every other connection has a call open is the new one closed.
- Streams beyond ``max_streams_per_connection`` are reset (REFUSED_STREAM); a connection with no call
  open is closed after ``max_connection_idle_s`` and any after ``max_connection_age_s`` (GOAWAY, then
  30 s for its calls); keepalive pings more often than ``keepalive_min_time_s`` (or without a call, unless
  permitted) are struck, and the third strike is answered GOAWAY ENHANCE_YOUR_CALM, as grpc does.
- Shutdown sends GOAWAY on every connection and lets open calls finish within the grace.

Everything here runs on one event loop thread; the handler's answers come back to it with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import socket
import ssl
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

log = logging.getLogger("meterhouse.receiver.grpc")

EXPORT_PATH = b"/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PREFIX = 5  # a gRPC message's compressed flag and 4-byte length
#: The inbound window of the connection, given back as bytes arrive (each charged or dropped at once).
CONNECTION_WINDOW = 4 << 20
#: The inbound window of a stream before its message's length is known (RFC 9113's default).
STREAM_WINDOW = 65_535
MAX_HEADER_LIST_BYTES = 16 * 1024
#: A connection's calls get this long to finish after its age passed (grpc's default grace is infinite).
AGE_GRACE_S = 30.0
MAX_PING_STRIKES = 2


#: Streams a connection may hold open inside ``h2`` (twice what is advertised, so that a client which
#: overshoots is answered REFUSED_STREAM per stream); past it, a connection error. It must be bounded: h2
#: counts a connection's open streams for each new one, and every stream of one read (up to 256 KiB, some
#: 17,000 HEADERS frames) is open until the read's events are handled, so without a bound one read cost
#: O(n^2): 70,000 cheap streams stalled the event loop, every other sender timing out.
def _h2_stream_bound(advertised: int) -> int:
    return 2 * advertised + 16


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class Refusal(Exception):
    """A call's answer other than OK: its status, message and binary trailers (``-bin`` keys)."""

    def __init__(self, status: Status, message: str, details: Sequence[tuple[str, bytes]] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, tuple(details)


@dataclass(frozen=True)
class ServerLimits:
    """The bounds this server enforces itself (0 turns a time off)."""

    read_timeout_s: float
    max_streams_per_connection: int
    max_connections: int
    max_connections_per_address: int
    keepalive_min_time_s: float
    keepalive_permit_without_calls: bool
    max_connection_idle_s: float
    max_connection_age_s: float


class CallHandler(Protocol):
    """What the receiver decides about a call; the hooks that raise :class:`Refusal` refuse it."""

    def opened(self, call: Call) -> None:
        """Its headers arrived (counted against its address from now until :meth:`closed`)."""

    def announced(self, call: Call, size: int) -> None:
        """Its message's prefix announces ``size`` bytes (refuse a message larger than one may be)."""

    def received(self, call: Call, n: int) -> None:
        """``n`` more bytes of its message arrived: charge them (kept in ``call.held``), or refuse."""

    def arrived(self, call: Call, message: bytes | None) -> None:
        """The client ended its side, with a whole message or none (None); answer with :meth:`Call.answer`
        or :meth:`Call.refuse`, now or later from any thread."""

    def timed_out(self, call: Call) -> Refusal:
        """Its message did not arrive within the read timeout: the answer."""

    def closed(self, call: Call) -> None:
        """The call is over (answered, reset, or its connection gone): release what it holds."""


class Call:
    """One stream: a call of the Export method."""

    def __init__(self, connection: GrpcConnection, stream_id: int, headers: dict[bytes, list[bytes]]) -> None:
        self.connection, self.stream_id, self.headers = connection, stream_id, headers
        self.address = connection.address
        self.held = 0  # bytes of the message the handler charged as they arrived; the handler's to release
        self._prefix = b""
        self._size = -1  # the message's length, once its prefix is in
        self._chunks: list[bytes] = []
        self._received = 0
        self.compressed = False
        self.answered = False
        self.ignoring = False  # refused while the client still sends: its data is dropped
        self._timer: asyncio.TimerHandle | None = None

    def header(self, name: bytes) -> list[bytes]:
        return self.headers.get(name, [])

    def answer(self, message: bytes) -> None:
        """Answer OK with ``message`` (from any thread)."""
        self.connection.loop.call_soon_threadsafe(self.connection.answer, self, message, None)

    def refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal`` (from any thread)."""
        self.connection.loop.call_soon_threadsafe(self.connection.answer, self, None, refusal)

    def _data(self, data: bytes) -> bytes | None:
        """Take a DATA frame's bytes; the message's prefix once it is complete (and not before)."""
        if self._size < 0:
            need = PREFIX - len(self._prefix)
            self._prefix += data[:need]
            data = data[need:]
            if len(self._prefix) < PREFIX:
                return None
            self.compressed = self._prefix[0] == 1
            self._size = int.from_bytes(self._prefix[1:], "big")
            if data:
                self._chunks.append(data)
                self._received += len(data)
            return self._prefix
        self._chunks.append(data)
        self._received += len(data)
        return None

    @property
    def overrun(self) -> bool:
        """More bytes than one message: a unary call carries exactly one."""
        return self._size >= 0 and self._received > self._size

    def message(self) -> bytes | None:
        """The whole message, or None: none began; ValueError when one began and is incomplete."""
        if self._size < 0 and not self._prefix:
            return None
        if self._size < 0 or self._received != self._size:
            raise ValueError("the request message is incomplete")
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body


def _trailer_value(message: str) -> bytes:
    """grpc-message: percent-encoded UTF-8 (the gRPC HTTP/2 protocol)."""
    return urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def _status_headers(
    status: Status, message: str, details: Sequence[tuple[str, bytes]]
) -> list[tuple[bytes, bytes]]:
    headers = [(b"grpc-status", str(int(status)).encode())]
    if message:
        headers.append((b"grpc-message", _trailer_value(message)))
    headers += [(k.encode(), base64.b64encode(v).rstrip(b"=")) for k, v in details]
    return headers


_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


class FrameLengths:
    """Each frame's announced length, checked as soon as its 9-byte header arrives: ``h2`` buffers a frame
    whole before it checks its length against SETTINGS_MAX_FRAME_SIZE, so a header announcing 16 MiB had
    the server hold up to 16 MiB per connection, charged to nothing (56 such connections had the process
    OOM-killed in its 1 GiB cgroup). Skips the client's 24-byte connection preface first."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._skip = 24  # bytes of the preface or of the current frame's payload still to come
        self._head = b""

    def feed(self, data: bytes) -> int | None:
        """None while every frame header so far is within the bound; else the length announced."""
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                taken = min(self._skip, n - pos)
                self._skip -= taken
                pos += taken
                continue
            taken = min(9 - len(self._head), n - pos)
            self._head += data[pos : pos + taken]
            pos += taken
            if len(self._head) < 9:
                break
            length = int.from_bytes(self._head[:3], "big")
            if length > self.max_length:
                return length
            self._skip, self._head = length, b""
        return None


class GrpcConnection(asyncio.Protocol):
    """One client connection: HTTP/2 framing by ``h2``, the bounds of the module doc."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.address = ""
        self.calls: dict[int, Call] = {}
        self.prefaced = False  # the client's preface and SETTINGS arrived
        self.closing = False
        self.idle_since = self.loop.time()
        self._unacked = 0  # connection-window bytes arrived and not yet given back
        self._strikes = 0
        self._last_ping = -1e18
        self._idle_timer: asyncio.TimerHandle | None = None
        self._age_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self._frames = FrameLengths(self.h2.max_inbound_frame_size)
        codes = h2.settings.SettingCodes
        sent = {codes.MAX_CONCURRENT_STREAMS: self.limits.max_streams_per_connection,
                codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES}  # fmt: skip
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=sent)
        self.h2.initiate_connection()
        # What is sent stays; what h2 enforces on its own (as a connection error) is lifted.
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                **sent,
                codes.MAX_CONCURRENT_STREAMS: _h2_stream_bound(self.limits.max_streams_per_connection),
            },
        )
        # Settings given as initial values are in force at once, but h2 hands the header list bound to
        # its HPACK decoder only when the client acknowledges it: set it now (it enforced 64 KiB).
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_BYTES
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - STREAM_WINDOW)

    # Connection lifecycle.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, tuple) else str(peer)
        if not self.server.admit(self):
            self.closing = True
            transport.abort()
            return
        self._flush()
        self._arm_idle()
        if self.limits.max_connection_age_s:
            self._age_timer = self.loop.call_later(self.limits.max_connection_age_s, self._aged)

    def pause_writing(self) -> None:
        """The client does not read what is written (past the transport's high-water mark): stop reading
        it, so that its requests, and the answers they would pile up, wait in its own socket buffers. (A
        client sending refused calls and reading nothing grew the write buffer by 11 times what it sent.)"""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        for t in (self._idle_timer, self._age_timer):
            if t is not None:
                t.cancel()
        for call in list(self.calls.values()):
            self._end(call)
        self.server.forget(self)

    def close(self, error: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR, debug: bytes = b"") -> None:
        """GOAWAY and close (what is open is cut: for idle connections and abuse)."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        try:
            self.h2.close_connection(error, additional_data=debug or None)
            self._flush()
        except h2.exceptions.ProtocolError:
            pass
        self.transport.close()

    def go_away(self) -> None:
        """GOAWAY, letting open calls finish (shutdown, age): closed when the last ends."""
        if self.closing or self.transport is None:
            return
        try:
            self.h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass
        self.closing = True
        if not self.calls:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        """No call open (or the preface never came): closing it costs its client nothing but a reconnect."""
        return not self.calls or not self.prefaced

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.idle_since = self.loop.time()
        if self.limits.max_connection_idle_s and not self.calls:
            self._idle_timer = self.loop.call_later(self.limits.max_connection_idle_s, self.close)

    def _aged(self) -> None:
        self.go_away()
        self._age_timer = self.loop.call_later(AGE_GRACE_S, self.close)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # Frames in.

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._frames.feed(data) is not None:
            self.close(h2.errors.ErrorCodes.FRAME_SIZE_ERROR, b"frame larger than SETTINGS_MAX_FRAME_SIZE")
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2's GOAWAY
            self.closing = True
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                if (call := self.calls.get(event.stream_id)) is not None:
                    self._end(call)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.prefaced = True
            elif isinstance(event, h2.events.PingReceived):
                self._on_ping()
            elif isinstance(event, h2.events.ConnectionTerminated):
                # The client's GOAWAY: h2 sends nothing after it, so no call can be answered; each is
                # released (its points, if any, are stored: the client re-sends, and the request-level
                # dedup answers the copy), and the connection closed.
                self.closing = True
                for call in list(self.calls.values()):
                    call.answered = True
                    self._end(call)
                if self.transport is not None:
                    self.transport.close()
        self._flush()

    def _on_ping(self) -> None:
        """grpc's keepalive enforcement: a ping too soon after the last (or with no call open, unless
        permitted) is a strike; past ``MAX_PING_STRIKES`` the connection is closed."""
        now = self.loop.time()
        allowed = self.calls or self.limits.keepalive_permit_without_calls
        if not allowed or now - self._last_ping < self.limits.keepalive_min_time_s:
            self._strikes += 1
            if self._strikes > MAX_PING_STRIKES:
                self.close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings")
        self._last_ping = now

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        self._strikes = 0
        if self.closing:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if len(self.calls) >= self.limits.max_streams_per_connection:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers: dict[bytes, list[bytes]] = {}
        for k, v in event.headers or ():
            headers.setdefault(bytes(k), []).append(bytes(v))
        call = Call(self, sid, headers)
        self.calls[sid] = call
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            if headers.get(b":path") != [EXPORT_PATH]:
                raise Refusal(Status.UNIMPLEMENTED, "unknown method")
            if not headers.get(b"content-type", [b""])[0].startswith(b"application/grpc"):
                raise Refusal(Status.INTERNAL, "not a gRPC request (content-type)")
            self.server.handler.opened(call)
        except Refusal as r:
            self.calls.pop(sid)
            call.answered = True  # the handler did not take it: nothing to release
            self._send_refusal(call, r)
            if not self.calls:
                self._arm_idle()
            return
        if self.limits.read_timeout_s:
            call._timer = self.loop.call_later(self.limits.read_timeout_s, self._timed_out, call)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        self._give_back(event.flow_controlled_length or 0)
        call = self.calls.get(event.stream_id)
        if call is None or call.ignoring or call.answered:
            return
        data = event.data or b""
        try:
            before = call._received
            prefix = call._data(data)
            if prefix is not None:
                size = int.from_bytes(prefix[1:], "big")
                self.server.handler.announced(call, size)
                # The window of the stream is the whole message now that its length is allowed.
                more = PREFIX + size - STREAM_WINDOW
                if more > 0:
                    self.h2.increment_flow_control_window(more, event.stream_id)
            if call.overrun:
                raise Refusal(Status.INVALID_ARGUMENT, "more than one request message in a unary call")
            if call._received > before:
                self.server.handler.received(call, call._received - before)
        except Refusal as r:
            self._refuse_now(call, r)

    def _give_back(self, n: int) -> None:
        self._unacked += n
        if self._unacked >= CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(self._unacked)
            self._unacked = 0

    def _on_end(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is None or call.ignoring or call.answered:
            return
        if call._timer is not None:
            call._timer.cancel()
            call._timer = None
        try:
            message = call.message()
        except ValueError as e:
            self._refuse_now(call, Refusal(Status.INVALID_ARGUMENT, str(e)))
            return
        try:
            self.server.handler.arrived(call, message)
        except Refusal as r:
            self._refuse_now(call, r)

    def _timed_out(self, call: Call) -> None:
        call._timer = None
        if call.answered or call.ignoring or self.calls.get(call.stream_id) is not call:
            return
        self._refuse_now(call, self.server.handler.timed_out(call))

    # Answers out.

    def _refuse_now(self, call: Call, refusal: Refusal) -> None:
        call.ignoring = True
        self.answer(call, None, refusal)

    def answer(self, call: Call, message: bytes | None, refusal: Refusal | None) -> None:
        if call.answered or self.calls.get(call.stream_id) is not call:
            return  # the client went away first
        call.answered = True
        try:
            if refusal is None:
                assert message is not None
                self.h2.send_headers(call.stream_id, _RESPONSE_HEADERS)
                self.h2.send_data(call.stream_id, b"\0" + len(message).to_bytes(4, "big") + message)
                self.h2.send_headers(call.stream_id, _status_headers(Status.OK, "", ()), end_stream=True)
            else:
                self._send_refusal(call, refusal)
        except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
            try:
                self.h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closed for h2 (a GOAWAY): nothing more can be sent
        finally:
            self._end(call)  # released whatever could be sent
        self._flush()

    def _send_refusal(self, call: Call, r: Refusal) -> None:
        """A trailers-only answer; a client still sending is told to stop (RST_STREAM NO_ERROR)."""
        headers = _RESPONSE_HEADERS + _status_headers(r.status, r.message, r.details)
        self.h2.send_headers(call.stream_id, headers, end_stream=True)
        stream = self.h2.streams.get(call.stream_id)
        if stream is not None and not stream.closed:
            self.h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _end(self, call: Call) -> None:
        """The call is over: the handler releases what it holds, once."""
        if self.calls.get(call.stream_id) is not call:
            return
        del self.calls[call.stream_id]
        if call._timer is not None:
            call._timer.cancel()
            call._timer = None
        call._chunks.clear()
        self.server.handler.closed(call)
        if self.closing and not self.calls and self.transport is not None:
            self.transport.close()
        elif not self.calls:
            self._arm_idle()


class GrpcServer:
    """The connections of one listening socket, on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: CallHandler, limits: ServerLimits) -> None:
        self.loop, self.handler, self.limits = loop, handler, limits
        self.connections: set[GrpcConnection] = set()
        self.per_address: Counter[str] = Counter()
        self._server: asyncio.Server | None = None

    async def serve(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        self._server = await self.loop.create_server(
            lambda: GrpcConnection(self),
            sock=sock,
            ssl=context,
            ssl_handshake_timeout=10 if context else None,
        )

    def admit(self, c: GrpcConnection) -> bool:
        """Count a new connection; False when it must be closed (its address holds its bound, or every
        other connection has a call open)."""
        if self.per_address[c.address] >= self.limits.max_connections_per_address:
            log.debug("gRPC connection refused: too many from %s", c.address)
            return False
        if len(self.connections) >= self.limits.max_connections and not self._make_room():
            return False
        self.connections.add(c)
        self.per_address[c.address] += 1
        return True

    def _make_room(self) -> bool:
        """At the bound: close the connection idle longest (no call open, or no preface yet)."""
        victims = [c for c in self.connections if c.idle and not c.closing]
        if not victims:
            return False
        victim = min(victims, key=lambda c: (c.prefaced, c.idle_since))
        victim.close()
        self.forget(victim)
        return True

    def forget(self, c: GrpcConnection) -> None:
        if c in self.connections:
            self.connections.discard(c)
            self.per_address[c.address] -= 1
            if self.per_address[c.address] <= 0:
                del self.per_address[c.address]

    async def stop(self, grace_s: float | None) -> None:
        """Stop accepting; GOAWAY on every connection; open calls get ``grace_s`` (None: cut at once)."""
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.go_away()
        if grace_s:
            deadline = self.loop.time() + grace_s
            while any(c.calls for c in self.connections) and self.loop.time() < deadline:
                await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.abort()
        if self._server is not None:
            await self._server.wait_closed()
