"""Adversary 29b: a client that never reads its answers grows the server's write buffer without bound.

``GrpcConnection`` writes every answer, RST_STREAM, SETTINGS ACK and PING ACK to its asyncio transport
and never looks at ``pause_writing`` (it keeps reading, too): once the client's receive window and the
kernel's socket buffers are full, asyncio keeps the rest in the transport's buffer, in the process, for
as long as the client keeps the connection. A call refused at once (here ``address_limit``: the
client's address already has its 64 calls open, each holding a length prefix and nothing more) costs the
client one 15-byte HPACK-indexed HEADERS frame and the server a trailers-only answer of some 300 bytes
written literally (the client set SETTINGS_HEADER_TABLE_SIZE 0, so the server's HPACK encoder may index
nothing): twenty times what the client sends stays in memory. Streams are paced at 50 per 20 ms so
that no read holds more than h2's stream bound (216).
"""

from __future__ import annotations

import socket
import time

import h2.config
import h2.connection
import h2.settings
import hpack
import pytest
from prometheus_client import CollectorRegistry

from bench.slow_grpc import METHOD, h2_preface, loopback_socket
from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver
from meterhouse.core.metrics import PipelineMetrics

HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
           ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip


class OpenIngestor:
    def authenticate(self, header):
        return None


def hold_calls(port: int, source: str, calls: int) -> socket.socket:
    """``calls`` calls on one connection, each with its message's prefix (100 bytes announced) and no more."""
    s = loopback_socket(port, source)
    c = h2_preface(s)
    for i in range(calls):
        c.send_headers(1 + 2 * i, HEADERS)
        c.send_data(1 + 2 * i, b"\0" + (100).to_bytes(4, "big"))
    s.sendall(c.data_to_send())
    return s


@pytest.mark.soak  # with the soaks, so that the default suite keeps to its 15 minutes (README, Tests)
def test_the_answers_a_client_never_reads_are_not_buffered_without_bound():
    r = OtlpGrpcReceiver("127.0.0.1", 0, OpenIngestor(), PipelineMetrics(CollectorRegistry()), 1 << 20)
    r.start()
    held = hold_calls(r.port, "127.0.0.2", 64)  # the address's calls (--grpc-max-calls-per-address 64)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind(("127.0.0.2", 0))
    s.connect(("127.0.0.1", r.port))
    try:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        c.initiate_connection()
        c.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
        s.sendall(c.data_to_send())
        enc = hpack.Encoder()
        first, rest = enc.encode(HEADERS), enc.encode(HEADERS)
        sid, sent, t0 = 1, 0, time.monotonic()
        while time.monotonic() - t0 < 15 and sid < 2**31 - 1000:
            frames = []
            for _ in range(50):
                block = first if sid == 1 else rest
                frames.append(
                    len(block).to_bytes(3, "big") + bytes([0x1, 0x5]) + sid.to_bytes(4, "big") + block
                )
                sid += 2
            data = b"".join(frames)
            s.sendall(data)
            sent += len(data)
            time.sleep(0.02)
        time.sleep(1)
        conns = [x for x in list(r._server.connections) if x.calls == {}]
        buffered = max(x.transport.get_write_buffer_size() for x in conns)
        assert buffered <= 4 << 20, (
            f"the server buffers {buffered:,} bytes of answers for a client that sent {sent:,} bytes in "
            f"{(sid - 1) // 2:,} calls and read none of them (15 s; it grows for as long as the client goes on)"
        )
    finally:
        s.close()
        held.close()
        r.shutdown(1)
