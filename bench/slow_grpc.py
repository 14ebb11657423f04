"""A slow OTLP/gRPC sender on a raw HTTP/2 connection (the ``h2`` library over a plain socket).

It opens calls to ``MetricsService/Export``, sends a gRPC length prefix announcing ``announce`` bytes
and then a byte every ``trickle_s`` seconds, or nothing (``trickle_s=None``), and, once a second,
opens new calls for those the server ended, so that ``streams`` calls stay open on each connection
for as long as it runs. It connects from ``source`` (another loopback address than the honest senders' 127.0.0.1, so a
bound per client address can tell them apart) and records what the server answered.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import h2.config
import h2.connection
import h2.events
import h2.exceptions

METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def loopback_socket(port: int, source: str = "127.0.0.2") -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``source`` (any address of 127.0.0.0/8)."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def h2_preface(s: socket.socket) -> h2.connection.H2Connection:
    """Send the client's HTTP/2 preface and SETTINGS; the connection state to go on with."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return c


def server_closed(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (reading whatever it sent before)."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


class SlowSender:
    """``connections`` connections holding ``streams`` slow calls each, until :meth:`stop`."""

    def __init__(self, port: int, connections: int, streams: int, trickle_s: float | None = 1.0,
                 announce: int = 100_000, source: str = "127.0.0.2") -> None:  # fmt: skip
        self.port, self.connections, self.streams = port, connections, streams
        self.trickle_s, self.announce, self.source = trickle_s, announce, source
        self.opened = 0  # calls opened in all
        self.statuses: Counter[str] = Counter()  # grpc-status of the calls the server answered
        self.resets = 0  # calls the server reset without a status
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def __enter__(self) -> SlowSender:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def wait_opened(self, calls: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while self.opened < calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.opened >= calls, f"only {self.opened} slow calls opened"

    def _open(self, c: h2.connection.H2Connection, open_ids: set[int]) -> None:
        limit = min(self.streams, c.remote_settings.max_concurrent_streams)
        while len(open_ids) < limit:
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", METHOD),
                                 (":authority", f"127.0.0.1:{self.port}"), ("te", "trailers"),
                                 ("content-type", "application/grpc")])  # fmt: skip
            c.send_data(sid, b"\x00" + self.announce.to_bytes(4, "big"))
            open_ids.add(sid)
            with self._lock:
                self.opened += 1

    def _run(self) -> None:
        with loopback_socket(self.port, self.source) as s:
            c = h2_preface(s)
            s.settimeout(0.2)
            open_ids: set[int] = set()
            self._open(c, open_ids)
            last_tick = last_byte = time.monotonic()
            while not self._stop.is_set():
                if time.monotonic() - last_tick >= 1.0:  # once a second: re-open calls, send a byte
                    last_tick = last_byte = time.monotonic()
                    self._open(c, open_ids)
                if self.trickle_s is not None and time.monotonic() - last_byte >= self.trickle_s:
                    last_byte = time.monotonic()
                    for sid in open_ids:
                        try:
                            c.send_data(sid, b"\x01")
                        except h2.exceptions.StreamClosedError:
                            pass  # reset by the server; its event is read below
                s.sendall(c.data_to_send())
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return  # closed by the server
                try:
                    events = c.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return  # frames after the server's GOAWAY: the connection is over
                for event in events:
                    if isinstance(event, h2.events.ConnectionTerminated):
                        return
                    # A refusal before any message is one HEADERS frame ("trailers-only"), else trailers.
                    headers = getattr(event, "headers", None) or ()
                    status = dict(headers).get("grpc-status")
                    if status is not None and event.stream_id in open_ids:
                        with self._lock:
                            self.statuses[status] += 1
                        open_ids.discard(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        if event.stream_id in open_ids:
                            open_ids.discard(event.stream_id)
                            with self._lock:
                                self.resets += 1
