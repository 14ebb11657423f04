"""The OTLP/gRPC edge's bounds: concurrent calls and request bytes held at once, calls per client
address, and the time a call's message may take to arrive.

The receiver is real (a grpc server on loopback, a real channel, and a raw HTTP/2 client for calls whose
message comes slowly or never); its ingestor is held at a barrier so that "a call in flight" is a state
the test controls rather than a race it hopes to win.
"""

import threading
import time

import grpc
import h2.events
import pytest
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from bench.slow_grpc import SlowSender, h2_preface, loopback_socket
from meterhouse.collector.ingest import Outcome
from meterhouse.collector.receivers.grpc import GrpcLimits, OtlpGrpcReceiver
from meterhouse.core.metrics import PipelineMetrics

METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


class HeldIngestor:
    """Answers ok once released; counts the calls that reached it."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def authenticate(self, header):  # ingest is open: no sender
        return None

    def export(self, request, digest, sender=None, body=None) -> Outcome:
        self.entered.release()
        self.release.wait(30)
        return Outcome("ok", response=ExportMetricsServiceResponse())

    def export_body(self, body, sender, hold) -> Outcome:  # as the ingestor's: protobuf bytes in budget
        return self.export(None, "", sender, body=body)


@pytest.fixture
def held():
    ingestor = HeldIngestor()
    receivers = []

    def make(**kw) -> tuple[OtlpGrpcReceiver, grpc.Channel]:
        r = OtlpGrpcReceiver("127.0.0.1", 0, ingestor, metrics, 1 << 20, **kw)
        r.start()
        receivers.append(r)
        return r, grpc.insecure_channel(f"127.0.0.1:{r.port}")

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    ingestor.outcome = lambda o: registry.get_sample_value(
        "meterhouse_requests_total", {"transport": "grpc", "outcome": o}
    )
    yield ingestor, make
    ingestor.release.set()
    for r in receivers:
        r.shutdown(2)


BODY = sum_request({"grpc.calls": [point(1, {"org.id": "org-g"})]}).SerializeToString()


def refused_while_held(ingestor, channel, held_calls: int = 1) -> grpc.RpcError:
    """The error of one more call while ``held_calls`` calls are inside the ingestor (then released)."""
    export = channel.unary_unary(METHOD)
    first = [export.future(BODY, timeout=30) for _ in range(held_calls)]
    assert all(ingestor.entered.acquire(timeout=10) for _ in range(held_calls))
    with pytest.raises(grpc.RpcError) as e:
        export(BODY, timeout=10)
    ingestor.release.set()
    assert all(f.result() == b"" for f in first)  # the calls in flight are answered
    return e.value


def retry_info(e: grpc.RpcError) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo.FromString(dict(e.trailing_metadata())["google.rpc.retryinfo-bin"])


def test_calls_beyond_maximum_concurrent_rpcs_are_resource_exhausted(held):
    ingestor, make = held
    receiver, channel = make(max_concurrent_rpcs=2)
    e = refused_while_held(ingestor, channel, held_calls=2)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_info(e).retry_delay.seconds == 1
    assert channel.unary_unary(METHOD)(BODY, timeout=10) == b""  # and new calls are taken again
    assert receiver.calls_handled.used == 0


def test_request_bytes_beyond_the_bound_are_unavailable_with_retry_info(held):
    ingestor, make = held
    receiver, channel = make(max_bytes_in_flight=len(BODY) + 10)
    e = refused_while_held(ingestor, channel)
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert any(k == "grpc-status-details-bin" for k, _ in e.trailing_metadata())
    assert receiver.bytes_in_flight.used == 0


def test_keepalive_enforcement_and_transport_bounds_reach_grpc():
    opts = dict(GrpcLimits(keepalive_min_time_s=10, keepalive_permit_without_calls=True, max_connection_idle_s=5,
                           max_streams_per_connection=7, max_connections=9).options())  # fmt: skip
    assert opts["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.max_connection_idle_ms"] == 5_000
    assert "grpc.max_connection_age_ms" not in opts  # 0 = never
    assert opts["grpc.max_concurrent_streams"] == 7
    assert opts["grpc.max_allowed_incoming_connections"] == 9


def test_calls_whose_message_has_not_arrived_hold_no_worker(held):
    """With one worker, 20 calls trickling their messages leave it free for an honest call."""
    ingestor, make = held
    receiver, channel = make(workers=1, max_concurrent_rpcs=2)
    ingestor.release.set()
    with SlowSender(receiver.port, connections=2, streams=10, trickle_s=0.2) as slow:
        slow.wait_opened(20)
        time.sleep(0.5)
        assert channel.unary_unary(METHOD)(BODY, timeout=10) == b""
    assert slow.statuses == {}  # none was answered: they were only waiting for their messages


def test_calls_beyond_the_bound_per_address_are_resource_exhausted_and_others_are_served(held):
    ingestor, make = held
    receiver, channel = make(limits=GrpcLimits(max_calls_per_address=5))
    ingestor.release.set()
    with SlowSender(receiver.port, connections=1, streams=8, trickle_s=None, source="127.0.0.2") as slow:
        slow.wait_opened(8)
        deadline = time.monotonic() + 10
        while slow.statuses["8"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.statuses == {"8": 3}  # RESOURCE_EXHAUSTED; five are still open
        assert receiver.calls_by_address == {"127.0.0.2": 5}
        assert channel.unary_unary(METHOD)(BODY, timeout=10) == b""  # 127.0.0.1 is another sender
    assert ingestor.outcome("address_limit") == 3


def test_a_grpc_client_beyond_the_bound_per_address_is_told_when_to_retry(held):
    ingestor, make = held
    receiver, channel = make(limits=GrpcLimits(max_calls_per_address=1))
    e = refused_while_held(ingestor, channel)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_info(e).retry_delay.seconds == 1


def test_a_message_not_received_in_time_is_deadline_exceeded_and_counted(held):
    ingestor, make = held
    receiver, channel = make(limits=GrpcLimits(read_timeout_s=0.5))
    ingestor.release.set()
    with SlowSender(receiver.port, connections=1, streams=3, trickle_s=0.1) as slow:
        deadline = time.monotonic() + 10
        while slow.statuses["4"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert set(slow.statuses) == {"4"}, slow.statuses  # DEADLINE_EXCEEDED, 3 or more
    assert ingestor.outcome("read_timeout") >= slow.statuses["4"] >= 3
    deadline = time.monotonic() + 10
    while receiver.calls_by_address and time.monotonic() < deadline:
        time.sleep(0.05)  # the calls the sender left open are cancelled with its connection
    assert receiver.calls_by_address == {}
    assert channel.unary_unary(METHOD)(BODY, timeout=10) == b""  # a prompt message is served


def test_a_call_without_a_message_is_invalid_and_one_whose_client_left_is_not_counted(held):
    ingestor, make = held
    receiver, _ = make()
    with loopback_socket(receiver.port) as s:  # HEADERS with END_STREAM: no message at all
        c = h2_preface(s)
        c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                           ("content-type", "application/grpc"), ("te", "trailers")], end_stream=True)  # fmt: skip
        s.sendall(c.data_to_send())
        answered = b""
        while b"grpc-status" not in answered:
            answered += s.recv(65536)
    with loopback_socket(receiver.port) as s:  # a partial message, then the connection closes
        c = h2_preface(s)
        c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                           ("content-type", "application/grpc"), ("te", "trailers")])  # fmt: skip
        c.send_data(1, b"\x00\x00\x00\x01\x00")
        s.sendall(c.data_to_send())
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while receiver.calls_by_address and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.calls_by_address == {}
    assert ingestor.outcome("invalid") == 1  # the first; the second's client left (nothing answered)
    assert sum(ingestor.outcome(o) or 0 for o in ("ok", "read_timeout", "address_limit")) == 0


def test_streams_beyond_the_bound_per_connection_are_reset_by_grpc(held):
    """A client that opens streams before reading the server's SETTINGS: those beyond are reset."""
    ingestor, make = held
    receiver, _ = make(limits=GrpcLimits(max_streams_per_connection=10))
    with loopback_socket(receiver.port) as s:
        c = h2_preface(s)
        for sid in range(1, 60, 2):  # 30 calls, each with a part of its message
            c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                                 ("content-type", "application/grpc"), ("te", "trailers")])  # fmt: skip
            c.send_data(sid, b"\x00\x00\x01\x00\x00")
        s.sendall(c.data_to_send())
        s.settimeout(0.5)
        reset: set[int] = set()
        deadline = time.monotonic() + 10
        while len(reset) < 20 and time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            reset |= {e.stream_id for e in c.receive_data(data) if isinstance(e, h2.events.StreamReset)}
            s.sendall(c.data_to_send())
        assert len(reset) == 20
        while receiver.calls_by_address != {"127.0.0.2": 10} and time.monotonic() < deadline:
            time.sleep(0.05)  # the ten calls' handlers are starting
        assert receiver.calls_by_address == {"127.0.0.2": 10}
