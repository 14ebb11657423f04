"""The OTLP/gRPC edge's bounds: concurrent calls and request bytes held at once, calls per client
address, and the time a call's message may take to arrive.

The receiver is real (a grpc server on loopback, a real channel, and a raw HTTP/2 client for calls whose
message comes slowly or never); its ingestor is held at a barrier so that "a call in flight" is a state
the test controls rather than a race it hopes to win.
"""

import select
import threading
import time

import grpc
import h2.errors
import h2.events
import pytest
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from bench.slow_grpc import SlowSender, h2_preface, loopback_socket, server_closed
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


def pings_until_goaway(port: int, pings: int, every_s: float) -> h2.events.ConnectionTerminated | None:
    """Send ``pings`` keepalive pings ``every_s`` apart on a connection with no call; the GOAWAY, if any."""
    with loopback_socket(port) as s:
        c = h2_preface(s)
        s.settimeout(0.2)
        for i in range(pings):
            c.ping(b"%08d" % i)
            s.sendall(c.data_to_send())
            time.sleep(every_s)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            for e in c.receive_data(data):
                if isinstance(e, h2.events.ConnectionTerminated):
                    return e
    return None


def test_keepalive_pings_beyond_the_enforcement_policy_are_answered_goaway(held):
    """As grpc's enforcement: pings too often (or with no call open, unless permitted) are strikes, and
    the third is answered GOAWAY ENHANCE_YOUR_CALM."""
    _, make = held
    strict, _ = make()
    goaway = pings_until_goaway(strict.port, pings=3, every_s=0.01)
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too_many_pings"
    lenient, _ = make(limits=GrpcLimits(keepalive_min_time_s=0.05, keepalive_permit_without_calls=True))
    assert pings_until_goaway(lenient.port, pings=4, every_s=0.1) is None


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
        answered: list[h2.events.Event] = []
        while not any(isinstance(e, h2.events.StreamEnded) for e in answered):
            answered += c.receive_data(s.recv(65536))
        assert ("grpc-status", "3") in next(
            e.headers for e in answered if isinstance(e, h2.events.ResponseReceived)
        )
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


def open_call(c, sid: int, announce: int, body: bytes = b"") -> None:
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                         ("content-type", "application/grpc"), ("te", "trailers")])  # fmt: skip
    c.send_data(sid, b"\x00" + announce.to_bytes(4, "big") + body)


def send_until_answered(s, c, sid: int, n: int) -> dict[int, dict[str, str]]:
    """Send ``n`` bytes on stream ``sid`` as flow control lets, until the stream is answered."""
    got: dict[int, dict[str, str]] = {}
    s.settimeout(5)
    while sid not in got:
        window = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, n)
        if window > 0:
            c.send_data(sid, b"y" * window)
            n -= window
        s.sendall(c.data_to_send())
        if window == 0 or select.select([s], [], [], 0)[0]:
            for e in c.receive_data(s.recv(65536)):
                if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    got.setdefault(e.stream_id, {}).update(dict(e.headers))
    return got


def answers(s, c, streams: int) -> dict[int, dict[str, str]]:
    """The headers each of ``streams`` streams is answered with (trailers-only answers)."""
    got: dict[int, dict[str, str]] = {}
    s.settimeout(5)
    while len(got) < streams:
        for e in c.receive_data(s.recv(65536)):
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                got.setdefault(e.stream_id, {}).update(dict(e.headers))
        s.sendall(c.data_to_send())
    return got


def test_a_message_is_checked_by_its_length_prefix_and_charged_as_it_arrives(held):
    """The prefix decides the size: beyond --max-request-bytes RESOURCE_EXHAUSTED before the body, the
    stream's window never opened. An allowed message's window is opened to its length, and its bytes
    are charged to the budget as they arrive: past what the budget has left, UNAVAILABLE with RetryInfo,
    and what the call held is given back."""
    ingestor, make = held
    receiver, _ = make(max_bytes_in_flight=200_000)
    with loopback_socket(receiver.port) as s:
        c = h2_preface(s)
        open_call(c, 1, 150_000, b"x" * 1000)  # allowed: holds the 1,000 bytes that arrived
        open_call(c, 3, 2 << 20)  # past the 1 MiB limit of a message
        s.sendall(c.data_to_send())
        got = answers(s, c, 1)
        assert got[3]["grpc-status"] == "8", got
        assert c.local_flow_control_window(1) == 150_005 - 1005  # its whole message, and no more
        deadline = time.monotonic() + 5
        while receiver.bytes_in_flight.used != 1000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.bytes_in_flight.used == 1000
        open_call(c, 5, 300_000)
        got = send_until_answered(s, c, 5, 300_000)  # past the budget at 199,000 bytes
        assert got[5]["grpc-status"] == "14" and "google.rpc.retryinfo-bin" in got[5], got
        assert 1 not in got  # still arriving
        deadline = time.monotonic() + 5
        while receiver.bytes_in_flight.used != 1000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.bytes_in_flight.used == 1000  # the refused call's bytes given back
    deadline = time.monotonic() + 10
    while receiver.bytes_in_flight.used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.bytes_in_flight.used == 0  # given back when its client left
    assert ingestor.outcome("too_large") == 1 and ingestor.outcome("backpressure") == 1


def test_a_sender_that_announces_large_messages_and_trickles_them_does_not_keep_others_out(held):
    """Announcing is free: a call that announces nearly the whole budget and sends a byte holds a byte.
    (Reserving the announced length at the prefix let one such call answer everyone else UNAVAILABLE
    for the read timeout, and again on each reconnect.)"""
    ingestor, make = held
    receiver, channel = make(max_bytes_in_flight=200_000)
    ingestor.release.set()
    with loopback_socket(receiver.port) as s:
        c = h2_preface(s)
        for sid in (1, 3, 5):
            open_call(c, sid, 200_000 - len(BODY) + 1, b"x")  # what leaves no room for BODY, announced
        s.sendall(c.data_to_send())
        deadline = time.monotonic() + 5
        while receiver.calls_by_address.get("127.0.0.1", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert channel.unary_unary(METHOD)(BODY, timeout=10) == b""
        assert receiver.bytes_in_flight.used == 3


def test_connections_beyond_the_bound_per_address_are_closed_and_other_addresses_are_served(held):
    ingestor, make = held
    receiver, channel = make(limits=GrpcLimits(max_connections_per_address=3))
    held_open = [loopback_socket(receiver.port) for _ in range(3)]
    try:
        for s in held_open:
            h2_preface(s)
        extra = loopback_socket(receiver.port)
        held_open.append(extra)
        deadline = time.monotonic() + 5
        while not server_closed(extra) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server_closed(extra)
        assert not any(server_closed(s) for s in held_open[:3])
        ingestor.release.set()
        assert channel.unary_unary(METHOD)(BODY, timeout=10) == b""  # 127.0.0.1 is another sender
    finally:
        for s in held_open:
            s.close()
