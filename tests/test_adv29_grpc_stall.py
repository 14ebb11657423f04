"""Adversary 29: one OTLP/gRPC connection that opens many cheap streams stalls the event loop thread.

h2 reports every stream of a read (asyncio reads up to 256 KiB at once) as ``RequestReceived`` before
the server answers any of them, so all the streams of one read are open at once inside h2 and each new
one walks the open ones (``H2Connection.open_inbound_streams``): a read of ~17,000 HPACK-indexed HEADERS
frames (15 bytes each) costs O(n^2), about 25 s of the one event loop thread on this machine (measured
with h2 alone: 5,000 streams in one read 3.8 s; 20,000 in 256 KiB reads 32 s, in 16 KiB reads 4.5 s).
Nothing bounds the rate of streams a connection opens (refused, answered at once, or reset), so
``max_streams_per_connection`` (checked against the server's own calls, each answered at once) never
bites. Meanwhile every other connection on the port waits: an honest SDK exporter times out.
(HEADERS each followed by RST_STREAM, the classic rapid reset, closes each stream in turn inside h2 and
held: 70,000 of them left the honest exports OK; ``stream_flood(rst=True)`` keeps that variant.)
"""

from __future__ import annotations

import time

import h2.config
import h2.connection
import h2.settings
import hpack
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricExportResult

from bench.slow_grpc import METHOD, loopback_socket

pytestmark = pytest.mark.e2e
HOUR = 3600
METRIC = "adv29.honest"


def stream_flood(streams: int, path: str, rst: bool = False) -> bytes:
    """The client preface, SETTINGS, and ``streams`` HEADERS frames (END_STREAM, or followed by
    RST_STREAM CANCEL: the rapid reset), the header block indexed after the first (15 bytes a frame)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    out = [c.data_to_send()]
    enc = hpack.Encoder()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
               ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    first, rest = enc.encode(headers), enc.encode(headers)
    flags = 0x4 if rst else 0x5  # END_HEADERS (| END_STREAM)
    for i in range(streams):
        sid = 1 + 2 * i
        block = first if i == 0 else rest
        out.append(len(block).to_bytes(3, "big") + bytes([0x1, flags]) + sid.to_bytes(4, "big") + block)
        if rst:
            out.append(
                (4).to_bytes(3, "big") + bytes([0x3, 0]) + sid.to_bytes(4, "big") + (8).to_bytes(4, "big")
            )
    return b"".join(out)


def honest_exports(up, org: str, rounds: int, timeout_s: float = 10) -> tuple[int, list, list[float]]:
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    counter = MeterProvider(metric_readers=[reader]).get_meter("honest").create_counter(METRIC)
    exporter = OTLPMetricExporter(endpoint=up.otlp_grpc, insecure=True, timeout=timeout_s)
    sent, results, took = 0, [], []
    try:
        for i in range(rounds):
            counter.add(1000 + i, {"org.id": org})
            t = time.monotonic()
            result = exporter.export(reader.get_metrics_data())
            took.append(round(time.monotonic() - t, 2))
            results.append(result)
            if result == MetricExportResult.SUCCESS:
                sent += 1000 + i
    finally:
        exporter.shutdown()
    return sent, results, took


@pytest.mark.parametrize(
    "path,rst",
    [(METHOD, False), ("/unknown.Service/Method", False)],
    ids=["no-message", "unknown-method"],
)
def test_one_connection_opening_cheap_streams_does_not_stop_an_honest_sdk_sender(up, path, rst):
    assert honest_exports(up, "org-warm", 1)[1] == [MetricExportResult.SUCCESS]
    flood = stream_flood(70_000, path, rst)  # 1 MB (2 MB with the resets), sent once
    with loopback_socket(up.otlp_grpc_port) as s:
        s.sendall(flood[:200_000])  # the rest follows while the server works
        t = time.monotonic()
        s.settimeout(30)
        try:
            s.sendall(flood[200_000:])
        except OSError:
            pass
        time.sleep(0.5)
        sent, results, took = honest_exports(up, "org-honest", rounds=3)
    assert results == [MetricExportResult.SUCCESS] * 3, (
        f"honest exports {[r.name for r in results]}, took {took} s (10 s timeout each); "
        f"attacker sent {len(flood):,} bytes in {time.monotonic() - t:.1f} s"
    )
