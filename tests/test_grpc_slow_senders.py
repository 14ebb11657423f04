"""One sender cannot stop the others over OTLP/gRPC: slow calls and idle connections cost a socket and a
coroutine, not a worker or a slot.

A raw HTTP/2 client (bench/slow_grpc.py) keeps many calls open across several connections, each
announcing a 100,000-byte message and then sending a byte a second, or nothing; meanwhile the real
OpenTelemetry SDK gRPC exporter sends honest requests to a real `meterhouse up`. Each export must
succeed within the exporter's own 5 s timeout, and the honest totals must be stored exactly.
(grpc's thread-pool server gave each call a worker from its start: 16 trickling calls held every
worker, and 64 held every concurrent-RPC slot, so the honest exporter timed out or was refused.)
"""

from __future__ import annotations

import time

import pytest
import requests
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricExportResult

from bench.slow_grpc import METHOD, SlowSender, h2_preface, loopback_socket, server_closed
from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
HOUR = 3600
METRIC = "honest.calls"


def honest_exports(up, org: str, rounds: int) -> int:
    """Export ``rounds`` deltas with the SDK's gRPC exporter, each answered within its 5 s timeout."""
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    counter = MeterProvider(metric_readers=[reader]).get_meter("honest").create_counter(METRIC)
    exporter = OTLPMetricExporter(endpoint=up.otlp_grpc, insecure=True, timeout=5)
    sent = 0
    try:
        for i in range(rounds):
            counter.add(1000 + i, {"org.id": org})
            sent += 1000 + i
            assert exporter.export(reader.get_metrics_data()) == MetricExportResult.SUCCESS, f"round {i}"
    finally:
        exporter.shutdown()
    return sent


def stored(up, org: str) -> int:
    up.drain()
    now = int(time.time())
    return fetch_usage(up.api, org, METRIC, now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR, "1h")[
        "total"
    ]


def grpc_outcome(up, outcome: str) -> float:
    for line in requests.get(f"{up.api}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'meterhouse_requests_total{{outcome="{outcome}",transport="grpc"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no grpc outcome {outcome}")


def test_slow_calls_on_many_connections_do_not_stop_an_honest_sdk_sender(up_factory):
    # A short read timeout, so that the slow calls are also seen cut off (and re-opened) in the test.
    up = up_factory("--grpc-read-timeout-s", "2", "--grpc-max-calls-per-address", "100")
    trickling = SlowSender(up.otlp_grpc_port, connections=3, streams=40, trickle_s=1.0)
    silent = SlowSender(up.otlp_grpc_port, connections=2, streams=40, trickle_s=None)
    with trickling, silent:
        trickling.wait_opened(100)  # beyond the calls per address: some of them are refused at once
        silent.wait_opened(60)
        sent = honest_exports(up, "org-honest", rounds=6)
        time.sleep(2.5)  # past the read timeout of the first slow calls
    assert stored(up, "org-honest") == sent
    # The slow calls were cut off after the read timeout (DEADLINE_EXCEEDED, 4) or refused beyond the
    # bound per address (RESOURCE_EXHAUSTED, 8), and counted.
    statuses = trickling.statuses + silent.statuses
    assert statuses["4"] > 0 and statuses["8"] > 0, statuses
    assert set(statuses) <= {"4", "8"}, statuses
    assert grpc_outcome(up, "read_timeout") >= statuses["4"]
    assert grpc_outcome(up, "address_limit") == statuses["8"]
    assert grpc_outcome(up, "ok") == 6


def test_many_idle_connections_do_not_stop_an_honest_sender_and_are_closed(up_factory):
    """Connections that never send (not even the HTTP/2 preface) and connections that send only the
    preface cost no worker; both are closed after --grpc-max-connection-idle-s."""
    up = up_factory("--grpc-max-connection-idle-s", "2")
    silent = [loopback_socket(up.otlp_grpc_port) for _ in range(300)]
    preface = [loopback_socket(up.otlp_grpc_port) for _ in range(200)]
    for s in preface:
        h2_preface(s)
    try:
        sent = honest_exports(up, "org-idle", rounds=3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(server_closed(s) for s in silent + preface):
            time.sleep(0.2)
        assert all(server_closed(s) for s in silent + preface)
    finally:
        for s in silent + preface:
            s.close()
    assert stored(up, "org-idle") == sent


def open_call(s) -> None:
    """Open a call on a new connection ``s`` and announce a message that never comes."""
    c = h2_preface(s)
    c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                       ("content-type", "application/grpc"), ("te", "trailers")])  # fmt: skip
    c.send_data(1, b"\x00\x00\x00\x01\x00")
    s.sendall(c.data_to_send())


def closed_soon(s, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not server_closed(s):
        time.sleep(0.1)
    return server_closed(s)


def test_at_the_connection_bound_the_longest_idle_makes_room_and_connections_with_calls_stay(up_factory):
    """At --grpc-max-connections a new connection is closed only when every other has a call open;
    otherwise the one idle longest is closed to make room for it."""
    up = up_factory("--grpc-max-connections", "20")
    busy = [loopback_socket(up.otlp_grpc_port) for _ in range(20)]
    idle, extra = [], []
    try:
        for s in busy:
            open_call(s)
        time.sleep(0.5)
        extra.append(loopback_socket(up.otlp_grpc_port))
        h2_preface(extra[0])
        assert closed_soon(extra[0])  # every other connection has a call open
        busy.pop().close()
        time.sleep(0.5)
        idle = [loopback_socket(up.otlp_grpc_port)]
        h2_preface(idle[0])
        time.sleep(0.5)
        extra.append(loopback_socket(up.otlp_grpc_port))
        h2_preface(extra[1])
        assert closed_soon(idle[0])  # the idle one made room
        assert not server_closed(extra[1])
        assert not any(server_closed(s) for s in busy)
    finally:
        for s in [*busy, *idle, *extra]:
            try:
                s.close()
            except OSError:
                pass
