"""Adversary 29c: ``grpc_server.FrameLengths`` must not misparse honest HTTP/2 traffic: the preface and
every frame header split across reads at every byte boundary, and large honest messages (5-15 MB, with
gzip and without) from a grpcio channel, the transport of the SDK's exporter. Whole stacks in this
process, real loopback sockets."""

from __future__ import annotations

import os
import socket
import threading
import time

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import MetricsServiceStub
from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import SEC, raw_and_rollup

ORG = "org-adv29c-grpc"


def grpc_port(stack) -> int:
    g = stack.collector.grpc
    return getattr(g, "port", None) or g.server.port


def byte_proxy(target_port: int) -> tuple[int, socket.socket]:
    """A loopback proxy that forwards client → server one byte per send (a pause between), server →
    client as it comes."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def pump(src, dst, one):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if one:
                    for i in range(len(data)):
                        dst.sendall(data[i : i + 1])
                        time.sleep(0.0005)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = socket.create_connection(("127.0.0.1", target_port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(c, s, True), daemon=True).start()
            threading.Thread(target=pump, args=(s, c, False), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls.getsockname()[1], ls


def test_an_export_whose_bytes_arrive_one_at_a_time_is_stored(stack_factory):
    stack = stack_factory()
    port, ls = byte_proxy(grpc_port(stack))
    metric, t = "adv29c.grpc.bytes", time.time_ns() - 30 * SEC
    req = sum_request({metric: [point(i + 1, {"org.id": ORG, "i": str(i)}, t_ns=t, start_ns=t - SEC)
                                for i in range(20)]})  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            MetricsServiceStub(ch).Export(req, timeout=60)
            MetricsServiceStub(ch).Export(req, timeout=60, compression=grpc.Compression.Gzip)
    finally:
        ls.close()
    assert raw_and_rollup(stack, metric)[0] == {ORG: 210}


@pytest.mark.parametrize("mb", [5, 15])
@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_a_large_honest_export_is_stored(stack_factory, mb, gzip):
    stack = stack_factory()
    metric, t = f"adv29c.grpc.big.{mb}.{gzip}", time.time_ns() - 30 * SEC
    n = 20_000
    pad = max(1, mb * 1_000_000 // n - 80)
    pts = [point(1, {"org.id": ORG, "i": str(i), "p": os.urandom(pad // 2).hex()}, t_ns=t, start_ns=t - SEC)
           for i in range(n)]  # fmt: skip
    req = sum_request({metric: pts})
    size = req.ByteSize()
    assert mb * 0.8e6 < size < 20 * 2**20, size
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port(stack)}", options=opts) as ch:
        MetricsServiceStub(ch).Export(
            req, timeout=60, compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
        )
    assert raw_and_rollup(
        stack,
        metric,
    )[0] == {ORG: n}
