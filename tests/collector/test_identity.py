"""A point counts once by its identity (stream and interval), whatever request, encoding, transport or
token brings it; another interval of the same stream counts (collector/identity.py).

Whole stacks in this process on loopback ports, with the real embedded ClickHouse; every case is one a
forwarder between SDKs and meterhouse produces (re-batching, splitting, re-encoding)."""

from __future__ import annotations

import gzip
import time

import grpc
import pytest
import requests
from conftest import drain
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from otlp_builders import point, sum_request

from meterhouse.collector.identity import EdgeIdentity
from meterhouse.collector.model import PointBatch
from meterhouse.core import schema
from meterhouse.core.config import Token

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
PB = {"Content-Type": "application/x-protobuf"}
ORG = "org-ident"
SEC = 10**9


def raw_and_rollup(stack, metric: str) -> tuple[dict[str, int], dict[str, int]]:
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    db = store.database

    def read(sql: str) -> dict[str, int]:
        return {o: int(v) for o, v in store.rows(sql, {"m": metric})}

    raw = read(
        f"SELECT org_id, sum(value_int) FROM {db}.usage_points WHERE metric = {{m:String}} GROUP BY org_id"
    )
    hourly = read(
        f"SELECT org_id, sum(value_int) FROM {db}.{schema.HOURLY_TABLE} WHERE metric = {{m:String}} GROUP BY org_id"
    )
    return raw, hourly


def points(metric: str, n: int, base_ns: int, value: int = 10, org: str = ORG):
    """n contiguous delta points of one stream (what an SDK exports every second), oldest first."""
    return [
        point(
            value, {"org.id": org, "region": "eu"}, t_ns=base_ns + (i + 1) * SEC, start_ns=base_ns + i * SEC
        )
        for i in range(n)
    ]


def request(metric: str, pts) -> ExportMetricsServiceRequest:
    return sum_request({metric: list(pts)}, resource={"service.name": "svc", "host.name": "h1"})


def post(
    stack,
    req: ExportMetricsServiceRequest,
    *,
    as_json: bool = False,
    gz: bool = False,
    token: Token | None = None,
):
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    if as_json:
        body, headers = json_format.MessageToJson(req).encode(), {"Content-Type": "application/json"}
    else:
        body, headers = req.SerializeToString(), dict(PB)
    if gz:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    if token is not None:
        headers["Authorization"] = f"Bearer {token.token}"
    r = requests.post(url, data=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r


def grpc_send(stack, req: ExportMetricsServiceRequest) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.collector.grpc.port}") as channel:
        export = channel.unary_unary(
            EXPORT,
            request_serializer=ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )
        export(req, timeout=30)


def checked(stack, outcome: str) -> float:
    return (
        stack.registry.get_sample_value("meterhouse_points_identity_checked_total", {"outcome": outcome})
        or 0.0
    )


def test_the_same_points_in_other_requests_encodings_and_transports_count_once(stack):
    """The issue's case: 16 points of 10 in two requests (160), then re-grouped into one request, one
    re-sent alone, four as OTLP JSON, seven over gRPC: 160 every time."""
    metric = "ident.regroup"
    base = time.time_ns() - 60 * SEC
    pts = points(metric, 16, base)
    post(stack, request(metric, pts[:8]))
    post(stack, request(metric, pts[8:]))
    assert raw_and_rollup(stack, metric) == ({ORG: 160}, {ORG: 160})
    post(stack, request(metric, pts))  # re-grouped: one request
    assert raw_and_rollup(stack, metric) == ({ORG: 160}, {ORG: 160})
    post(stack, request(metric, pts[5:6]))  # one alone
    post(stack, request(metric, pts[2:6]), as_json=True)  # four as OTLP JSON
    post(stack, request(metric, reversed(pts[4:12])), gz=True)  # eight, gzip, in another order
    grpc_send(stack, request(metric, pts[8:15]))  # seven over gRPC
    assert raw_and_rollup(stack, metric) == ({ORG: 160}, {ORG: 160})
    assert checked(stack, "repeat") == 16 + 1 + 4 + 8 + 7
    # A new interval of the stream still counts, and so does an older one not seen before.
    later = points(metric, 17, base)[16:]
    earlier = [point(10, {"org.id": ORG, "region": "eu"}, t_ns=base, start_ns=base - SEC)]
    post(stack, request(metric, later + earlier))
    assert raw_and_rollup(stack, metric) == ({ORG: 180}, {ORG: 180})


def test_a_second_writer_of_one_stream_and_overlapping_intervals_count(stack):
    """Two pods without an instance attribute write one stream: their intervals differ, so both count."""
    metric = "ident.twowriters"
    base = time.time_ns() - 60 * SEC
    a = points(metric, 4, base, value=1)
    b = points(metric, 4, base + SEC // 3, value=100)  # same stream, intervals shifted by 1/3 s
    for pa, pb in zip(a, b, strict=True):
        post(stack, request(metric, [pa]))
        post(stack, request(metric, [pb]))
    assert raw_and_rollup(stack, metric) == ({ORG: 404}, {ORG: 404})
    # A gauge is identified by its time: the same time again is a repeat, whatever its start.
    gauge = ExportMetricsServiceRequest()
    gauge.CopyFrom(request("unused", []))
    m = gauge.resource_metrics[0].scope_metrics[0].metrics.add()
    m.name = "ident.gauge"
    t = time.time_ns() - 5 * SEC
    m.gauge.data_points.append(point(7, {"org.id": ORG}, t_ns=t, start_ns=t - SEC))
    post(stack, gauge)
    m.gauge.data_points[0].start_time_unix_nano = t - 2 * SEC
    post(stack, gauge)
    assert raw_and_rollup(stack, "ident.gauge")[0] == {ORG: 7}


def test_the_same_bytes_after_the_token_changed_count_once(stack_factory):
    """Request dedup is keyed per token; the point's identity is not."""
    old = Token("ingest-token-before-rotation1", ("*",))
    new = Token("ingest-token-after-rotation22", ("*",))
    stack = stack_factory(ingest_tokens=(old, new))
    metric = "ident.rotation"
    req = request(metric, points(metric, 3, time.time_ns() - 30 * SEC))
    post(stack, req, token=old)
    post(stack, req, token=new)
    assert raw_and_rollup(stack, metric) == ({ORG: 30}, {ORG: 30})


def test_a_copy_whose_digest_the_bounded_dedup_let_go_counts_once(stack):
    """The request-level dedup keeps a bounded number of digests (a share of the memory budget; the
    oldest go first): a copy re-sent after its digest went is stored again at the edge, and its points are
    dropped by identity."""
    stack.collector.recent.max_entries = 1
    metric = "ident.evicted"
    base = time.time_ns() - 60 * SEC
    first, second = (
        request(metric, points(metric, 3, base)),
        request("ident.other", points("ident.other", 1, base)),
    )
    post(stack, first)
    post(stack, second)  # takes the one place: the first's digest goes
    assert len(stack.collector.recent) == 1
    repeats = checked(stack, "repeat")
    post(stack, first)
    assert raw_and_rollup(stack, metric) == ({ORG: 30}, {ORG: 30})
    assert checked(stack, "repeat") == repeats + 3  # the copy was stored, then dropped by identity


def test_distributions_count_once_by_identity(stack):
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

    req = request("unused", [])
    m = req.resource_metrics[0].scope_metrics[0].metrics.add()
    m.name = "ident.latency"
    m.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    base = time.time_ns() - 30 * SEC
    for i in range(3):
        dp = m.histogram.data_points.add(
            start_time_unix_nano=base + i * SEC, time_unix_nano=base + (i + 1) * SEC
        )
        dp.count, dp.sum = 2, 3.0
        dp.bucket_counts.extend([1, 1])
        dp.explicit_bounds.append(1.0)
        dp.attributes.add(key="org.id").value.string_value = ORG
    post(stack, req)
    post(stack, req, as_json=True)
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    n = store.scalar(
        f"SELECT sum(count) FROM {store.database}.{schema.DIST_TABLE} WHERE metric = 'ident.latency'"
    )
    assert int(n) == 6


def test_a_point_re_sent_after_a_restart_counts_once(stack_factory, tmp_path):
    """Nothing of the edge's state survives a restart: the floor read from ClickHouse makes the re-sent
    points 'to verify', and the writer finds them stored."""
    data_dir = tmp_path / "restart"
    first = stack_factory(data_dir=data_dir, dedup_window_s=0)
    metric = "ident.restart"
    req = request(metric, points(metric, 5, time.time_ns() - 30 * SEC))
    post(first, req)
    drain(first)
    first.shutdown(5)
    again = stack_factory(data_dir=data_dir, dedup_window_s=0, database=first.config.database)
    post(again, req)
    assert raw_and_rollup(again, metric) == ({ORG: 50}, {ORG: 50})
    assert checked(again, "repeat") == 5


def test_the_writer_reads_back_only_candidates_under_new_resources_at_one_time(stack_factory, tmp_path):
    """A sender that sends the same attributes at one time under a new resource per request (the hostile
    mix's requests at the points bound): once its points are to verify, each check read back every
    earlier request's rows (their org, metric, time and attributes match), and the writer fell to 1,700
    points a second. Only the candidates' resources are read now."""
    data_dir, metric, n, earlier = tmp_path / "resources", "ident.resources", 200, 6
    t = time.time_ns() - 30 * SEC

    def req(resource: str) -> ExportMetricsServiceRequest:
        pts = [point(1, {"org.id": ORG, "i": str(i)}, t_ns=t, start_ns=t - SEC) for i in range(n)]
        return sum_request({metric: pts}, resource={"service.name": resource})

    first = stack_factory(data_dir=data_dir, dedup_window_s=0)
    for k in range(earlier):
        post(first, req(f"r{k}"))
    drain(first)
    first.shutdown(5)
    again = stack_factory(data_dir=data_dir, dedup_window_s=0, database=first.config.database)
    store = again.collector.endpoints.endpoints[0].store
    read_back: list[int] = []
    rows = store.rows

    def counted(sql, params=None):
        out = rows(sql, params)
        if "batch_seq <" in sql:
            read_back.append(len(out))
        return out

    store.rows = counted
    post(again, req("r-new"))  # after the restart: to verify (its time is not after the floor)
    post(again, req("r0"))  # a real repeat of the first request
    assert raw_and_rollup(again, metric) == ({ORG: (earlier + 1) * n}, {ORG: (earlier + 1) * n})
    assert checked(again, "repeat") == n and checked(again, "new") == n
    assert sum(read_back) == n  # the repeat's originals only; before: 2,400 (every earlier request's)


def _batch(rows: list[tuple[str, int, int]]) -> PointBatch:
    """Delta sum rows (org, start, time) of one metric, as the decoder produces them."""
    cols = PointBatch.empty()
    for org, start, t in rows:
        for name, value in (
            ("org_id", org), ("metric", "m"), ("kind", schema.KIND_SUM), ("unit", "1"), ("monotonic", 1),
            ("start_time", start), ("time", t), ("is_int", 1), ("value_int", 1), ("value_double", 0.0),
            ("attr_keys", []), ("attr_values", []), ("resource_keys", []), ("resource_values", []),
            ("scope_name", ""), ("scope_version", ""), ("received_at", t), ("temporality", schema.TEMPORALITY_DELTA),
            ("series_id", 0), ("series_start", 0), ("cumulative_int", 0), ("cumulative_double", 0.0),
        ):  # fmt: skip
            cols[name].append(value)
    return PointBatch(cols, len(rows), "d", 0)


def test_the_edge_marks_new_only_what_is_after_everything_its_stream_showed():
    edge = EdgeIdentity(floor_ns=100)
    # At or below the floor: to verify; after it: new; the same time again, or older: to verify.
    assert edge.mark(_batch([("a", 90, 100), ("a", 100, 110), ("a", 100, 110), ("a", 95, 105)]))[0] == [
        1,
        0,
        1,
        1,
    ]
    # Streams are told apart structurally: another org is another stream.
    assert edge.mark(_batch([("b", 100, 110), ("a", 110, 120)]))[0] is None
    # Eviction forgets the oldest streams and raises the floor to what they held: never a false "new".
    # A stream past the room left is marked to verify, never new.
    small = EdgeIdentity(floor_ns=0, max_streams=10)
    assert small.mark(_batch([(f"o{i}", 0, 1000 + i) for i in range(11)]))[0] == [0] * 10 + [1]
    assert len(small) == 10 and small.floor_ns == 1010  # o10 is not held: the floor covers its point
    assert small.mark(_batch([("n0", 0, 2000)]))[0] is None  # room made: o0 (1000) forgotten
    assert len(small) <= 10 and small.floor_ns >= 1000
    assert small.mark(_batch([("o0", 0, 1000)]))[0] == [1]


@pytest.mark.parametrize("as_json", [False, True])
def test_a_request_holding_the_same_point_twice_counts_it_once(stack, as_json):
    metric = f"ident.twice.{int(as_json)}"
    p = points(metric, 1, time.time_ns() - 10 * SEC)[0]
    post(stack, request(metric, [p, p]), as_json=as_json)
    assert raw_and_rollup(stack, metric) == ({ORG: 10}, {ORG: 10})


def test_the_c_and_python_marks_agree(monkeypatch):
    """The native marking and the pure-Python one flag the same rows, on the same sequence of batches."""
    import random

    from meterhouse.collector import identity

    rng = random.Random(7)
    batches = [
        _batch([(f"o{rng.randrange(5)}", 0, 1000 + rng.randrange(30)) for _ in range(40)]) for _ in range(20)
    ]
    native = EdgeIdentity(floor_ns=1005)
    got_native = [native.mark(b) for b in batches]
    monkeypatch.setattr(identity, "_c_table_marks", None)
    python = EdgeIdentity(floor_ns=1005)
    assert python._table is None and native._table is not None
    got_python = [python.mark(b) for b in batches]
    assert got_native == got_python
    assert any(f[0] for f in got_native) and any(f[0] is None or 0 in f[0] for f in got_native)


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.integers(1, 2**64 - 2) | st.integers(1, 20), max_size=60),
    n=st.integers(-2, 70),
)
def test_the_stream_table_forgets_the_oldest_times_and_everything_tied_with_them(times, n):
    """``stream_table_evict`` forgets at least ``n`` streams (all when fewer), every one whose time is at
    or below the n-th oldest and nothing newer, over the whole unsigned range; the bound is that time."""
    from meterhouse.core._native import stream_table_evict, stream_table_marks

    table = bytearray(16 * 128)
    names = [f"s{i}" for i in range(len(times))]
    _, _, added, _ = stream_table_marks([names], list(times), table, 0, 1000)
    assert added == len(times)
    bound, left = stream_table_evict(table, n)
    if n <= 0 or not times:
        assert bound is None and left == len(times)
        return
    assert bound == sorted(times)[min(n, len(times)) - 1]
    assert left == sum(t > bound for t in times)
    for name, t in zip(names, times, strict=True):  # held: marking it again adds nothing
        probe = bytearray(table)
        assert stream_table_marks([[name]], [2**64 - 1], probe, 0, 1)[2] == (0 if t > bound else 1)


def test_the_edge_evicts_the_same_with_and_without_c(monkeypatch):
    """The stream table and the dict forget the same streams at the same points, raise the floor alike,
    and mark a new stream past the room left to verify: with both, a batch larger than the table."""
    from meterhouse.collector import identity

    def run() -> tuple[int, int, list]:
        edge = EdgeIdentity(floor_ns=0, max_streams=20)
        flags = [
            edge.mark(_batch([(f"o{i}-{j}", 0, 1000 + (i * 7) % 13) for i in range(9)]))[0] for j in range(6)
        ]
        flags.append(edge.mark(_batch([(f"big{i}", 0, 5000 + i) for i in range(25)]))[0])
        flags.append(edge.mark(_batch([("o1-5", 0, 1001), ("big3", 0, 6000)]))[0])
        return edge.floor_ns, len(edge), flags

    native = run()
    monkeypatch.setattr(identity, "_c_table_marks", None)
    assert run() == native
    floor, held, flags = native
    assert floor > 0 and held <= 20
    assert flags[-2] is not None and 1 in flags[-2]  # 25 new streams, room for 20 at most
