"""Adversary 29: a client's GOAWAY before its call is answered leaks the call.

After the client's GOAWAY h2's connection is CLOSED: ``send_headers`` raises ProtocolError, and so does
the ``reset_stream`` in ``GrpcConnection.answer``'s except branch, so the exception leaves ``answer``
(a ``call_soon_threadsafe`` callback: logged as "Exception in callback" and dropped) before ``_end``:
the call stays in ``connection.calls`` and in ``calls_by_address`` for as long as the client keeps the
socket open; the connection has a call open, so its idle timer is never armed, it is never closed to
make room at the port's bound, and the read timeout was cancelled when the message arrived.
"""

from __future__ import annotations

import threading
import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from bench.slow_grpc import METHOD, h2_preface, loopback_socket, server_closed
from meterhouse.collector.ingest import Outcome
from meterhouse.collector.receivers.grpc import GrpcLimits, OtlpGrpcReceiver
from meterhouse.core.metrics import PipelineMetrics

BODY = sum_request({"adv29.calls": [point(1, {"org.id": "org-g"})]}).SerializeToString()


class SlowIngestor:
    """Answers OK after ``delay_s`` (the time a real spool append and fsync may take under load)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.calls = delay_s, 0
        self.lock = threading.Lock()

    def authenticate(self, header):
        return None

    def export_body(self, body, sender, hold) -> Outcome:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay_s)
        return Outcome("ok", response=ExportMetricsServiceResponse())


def test_a_call_whose_client_sent_goaway_is_released_once_answered():
    ingestor = SlowIngestor(0.3)
    r = OtlpGrpcReceiver("127.0.0.1", 0, ingestor, PipelineMetrics(CollectorRegistry()), 1 << 20,
                         limits=GrpcLimits(max_connection_idle_s=2))  # fmt: skip
    r.start()
    socks = []
    try:
        for _ in range(5):  # five connections, each: a whole call, then the client's GOAWAY
            s = loopback_socket(r.port)
            socks.append(s)
            c = h2_preface(s)
            c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                               ("content-type", "application/grpc"), ("te", "trailers")])  # fmt: skip
            c.send_data(1, b"\x00" + len(BODY).to_bytes(4, "big") + BODY, end_stream=True)
            c.close_connection()  # GOAWAY (last stream 0: the client accepts no pushed streams)
            s.sendall(c.data_to_send())
        time.sleep(4)  # the answers came 0.3 s after; the idle timeout is 2 s
        assert ingestor.calls == 5  # every call was taken and its points stored
        leaked = sum(len(conn.calls) for conn in list(r._server.connections))
        closed = sum(server_closed(s) for s in socks)
        assert (r.calls_by_address, leaked) == ({}, 0), (
            f"4 s after the answers: calls_by_address {r.calls_by_address}, calls still open on the "
            f"server's connections {leaked}, connections the server closed {closed} of 5"
        )
    finally:
        for s in socks:
            s.close()
        r.shutdown(2)
