"""Adversary 29: the header list bound the gRPC server advertises (16 KiB) is not the one it enforces.

``GrpcConnection.__init__`` replaces ``h2``'s ``local_settings`` after ``initiate_connection``; h2 sets
its HPACK decoder's ``max_header_list_size`` only when a *changed* local setting is acknowledged, so the
decoder kept h2's default, 64 KiB. A call's headers are held (``Call.headers``) until it ends (up to
the read timeout), uncharged to any budget, so each call held four times what the server promises. Now
the decoder's bound is set with the settings, and a larger header list closes the connection.
"""

from __future__ import annotations

import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from prometheus_client import CollectorRegistry

from bench.slow_grpc import METHOD, h2_preface, loopback_socket
from meterhouse.collector.ingest import Outcome
from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver
from meterhouse.collector.receivers.grpc_server import MAX_HEADER_LIST_BYTES
from meterhouse.core.metrics import PipelineMetrics


class Ingestor:
    def authenticate(self, header):
        return None

    def export_body(self, body, sender, hold) -> Outcome:
        return Outcome("ok", response=ExportMetricsServiceResponse())


def test_a_header_list_larger_than_advertised_is_not_held():
    r = OtlpGrpcReceiver("127.0.0.1", 0, Ingestor(), PipelineMetrics(CollectorRegistry()), 1 << 20)
    r.start()
    try:
        with loopback_socket(r.port) as s:
            c = h2_preface(s)
            extra = [(f"x-h{i:05d}", "v") for i in range(1500)]  # 1500 * (8 + 1 + 32) = 61,500 bytes
            c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                               ("content-type", "application/grpc"), ("te", "trailers"), *extra])  # fmt: skip
            c.send_data(1, b"\x00\x00\x00\x00\x10")  # a message announced, never sent: the call stays open
            s.sendall(c.data_to_send())
            time.sleep(0.5)
            held = sum(
                len(k) + len(v) + 32
                for conn in r._server.connections
                for call in conn.calls.values()
                for k, vs in call.headers.items()
                for v in vs
            )
            assert held <= MAX_HEADER_LIST_BYTES, (
                f"a call holds a header list of {held:,} bytes, more than the {MAX_HEADER_LIST_BYTES:,} "
                f"advertised (calls_by_address {r.calls_by_address})"
            )
            assert r.calls_by_address == {}  # refused: the connection is closed (HPACK's COMPRESSION_ERROR)
    finally:
        r.shutdown(2)
