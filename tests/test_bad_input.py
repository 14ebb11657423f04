"""A corpus of malformed and hostile OTLP requests against a real `meterhouse up`.

Each gets its documented status and a message; the process keeps serving, and a valid request sent
right after each one is stored.
"""

import gzip
import json
import math
import time
import zlib

import grpc
import pytest
import requests
import zstandard
from conftest import module_up
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from otlp_builders import kv, point, sum_request, zstd_compress

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
LIMIT = 1_000_000
PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    yield from module_up(tmp_path_factory, "bad", "--max-request-bytes", str(LIMIT))


def valid_bytes(org="org-ok", **attrs) -> bytes:
    return sum_request({"ok.calls": [point(1, {"org.id": org, **attrs})]}).SerializeToString()


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    from google.protobuf.internal.encoder import _VarintBytes

    return _VarintBytes(field << 3 | 2) + _VarintBytes(len(payload)) + payload


def raw_nested_request(depth: int) -> bytes:
    """A request whose one attribute nests kvlists ``depth`` deep, past what protobuf's API builds."""
    import struct

    value = _ld(1, b"leaf")  # AnyValue.string_value
    for _ in range(depth):
        value = _ld(6, _ld(1, _ld(1, b"k") + _ld(2, value)))  # AnyValue.kvlist_value.values[0]
    point_ = b"\x19" + struct.pack("<Q", time.time_ns()) + b"\x31" + struct.pack("<q", 1)
    point_ += _ld(7, _ld(1, b"deep") + _ld(2, value))  # NumberDataPoint.attributes
    metric = _ld(1, b"bad.calls") + _ld(7, _ld(1, point_) + b"\x10\x01")  # Metric.sum (delta)
    return _ld(1, _ld(2, _ld(2, metric)))  # request.resource_metrics.scope_metrics.metrics


def with_attr(key: str, value) -> bytes:
    dp = point(1, {"org.id": "org-bad"})
    dp.attributes.append(kv(key, value))
    return sum_request({"bad.calls": [dp]}).SerializeToString()


def many_attrs(n: int) -> bytes:
    return sum_request({"bad.calls": [point(1, {f"k{i}": "v" for i in range(n)})]}).SerializeToString()


def with_resource(resource: dict) -> bytes:
    return sum_request(
        {"bad.calls": [point(1, {"org.id": "org-bad"})]}, resource=resource
    ).SerializeToString()


def copied_onto_every_point() -> bytes:
    """260 KB of resource attributes and 200 points: the resource is stored with every point, so its
    points take 52 MB stored, past --max-request-spooled-bytes (32 MiB), from a body far under the limit."""
    resource = {"org.id": "org-bad", **{f"r{i:02d}": f"{i:02d}" + "x" * 4000 for i in range(64)}}
    points = [point(i + 1, {"k": str(i)}) for i in range(200)]
    return sum_request({"bad.calls": points}, resource=resource).SerializeToString()


def nested_value(depth: int):
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValueList

    v = AnyValue(string_value="leaf")
    for _ in range(depth):
        v = AnyValue(kvlist_value=KeyValueList(values=[kv("k", v)]))
    return v


def one_point(value, **kw) -> bytes:
    return sum_request({"bad.calls": [point(value, {"org.id": "org-bad"}, **kw)]}).SerializeToString()


def bad_histogram() -> bytes:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="bad.hist")
    dp = m.histogram.data_points.add(time_unix_nano=time.time_ns(), count=10)
    dp.bucket_counts.extend([1, 2])
    dp.explicit_bounds.extend([1.0])
    return req.SerializeToString()


def invalid_utf8_protobuf() -> bytes:
    good = sum_request({"m": [point(1, {"org.id": "ÄÄÄ"})]}).SerializeToString()
    return good.replace("ÄÄÄ".encode(), b"\xc3\x28\xff\xfe\xc3\x28")


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def damaged(data: bytes, at: int) -> bytes:
    """``data`` with one byte flipped (at the end: the stream's checksum)."""
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


VALID = valid_bytes()
# (name, body, headers, status, words the message must contain; for 200: rejected points and reason)
CORPUS = [
    ("truncated protobuf", VALID[: len(VALID) // 2], PB, 400, "cannot parse"),
    ("random bytes", bytes(range(256)) * 4, PB, 400, "cannot parse"),
    ("length prefix past the end", b"\x0a\x64abc", PB, 400, "cannot parse"),
    ("unterminated group", b"\x0b\x10\x01", PB, 400, "cannot parse"),
    ("invalid UTF-8 in a string", invalid_utf8_protobuf(), PB, 400, "cannot parse"),
    ("JSON with wrong field types", b'{"resourceMetrics": 5}', JS, 400, "OTLP/JSON"),
    ("JSON with a string where an object goes", b'{"resourceMetrics": ["x"]}', JS, 400, "OTLP/JSON"),
    ("JSON int64 that is not a number", json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "m", "sum": {"dataPoints": [{"asInt": "12abc"}]}}]}]}]}).encode(), JS, 400, "OTLP/JSON"),
    ("JSON syntax error", b'{"resourceMetrics": [', JS, 400, "OTLP/JSON"),
    ("JSON invalid UTF-8", b'{"resourceMetrics": [{"x": "\xff\xfe"}]}', JS, 400, "OTLP/JSON"),
    ("JSON array at top level", b"[1, 2, 3]", JS, 400, "OTLP/JSON"),
    ("empty JSON body", b"", JS, 400, "OTLP/JSON"),
    ("wrong content type", VALID, {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("no content type", VALID, {}, 415, "Content-Type"),
    ("form content type", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("gzip bomb", gzip.compress(b"\x00" * 50_000_000), {**PB, "Content-Encoding": "gzip"}, 413, "limit"),
    ("oversized body", b"\x00" * (LIMIT + 1), PB, 413, "limit"),
    ("points far larger stored than sent", copied_onto_every_point(), PB, 413, "as stored"),
    ("not gzip", b"plain bytes", {**PB, "Content-Encoding": "gzip"}, 400, "gzip"),
    ("truncated gzip", gzip.compress(VALID)[:-12], {**PB, "Content-Encoding": "gzip"}, 400, "gzip"),
    ("unknown content encoding", VALID, {**PB, "Content-Encoding": "br"}, 415, "Content-Encoding"),
    ("two content encodings", gzip.compress(VALID), {**PB, "Content-Encoding": "gzip, zstd"}, 415, "Content-Encoding"),
    ("deflate bomb", zlib.compress(b"\x00" * 50_000_000), {**PB, "Content-Encoding": "deflate"}, 413, "limit"),
    ("not deflate", b"plain bytes", {**PB, "Content-Encoding": "deflate"}, 400, "deflate"),
    ("raw deflate without the zlib wrapper", raw_deflate(VALID), {**PB, "Content-Encoding": "deflate"}, 400, "RFC 1950"),
    ("truncated deflate", zlib.compress(VALID)[:-6], {**PB, "Content-Encoding": "deflate"}, 400, "deflate"),
    ("deflate with a bad checksum", damaged(zlib.compress(VALID), -1), {**PB, "Content-Encoding": "deflate"}, 400, "deflate"),
    ("trailing data after deflate", zlib.compress(VALID) + b"garbage!", {**PB, "Content-Encoding": "deflate"}, 400, "trailing"),
    ("zstd bomb", zstd_compress(b"\x00" * 50_000_000), {**PB, "Content-Encoding": "zstd"}, 413, "limit"),
    ("zstd bomb declaring its size", zstandard.compress(b"\x00" * 50_000_000), {**PB, "Content-Encoding": "zstd"}, 413, "limit"),
    ("not zstd", b"plain bytes", {**PB, "Content-Encoding": "zstd"}, 400, "zstd"),
    ("truncated zstd", zstd_compress(VALID)[:-3], {**PB, "Content-Encoding": "zstd"}, 400, "zstd"),
    ("zstd with a bad checksum", damaged(zstandard.ZstdCompressor(write_checksum=True).compress(VALID), -1), {**PB, "Content-Encoding": "zstd"}, 400, "zstd"),
    ("trailing data after zstd", zstd_compress(VALID) + b"garbage!", {**PB, "Content-Encoding": "zstd"}, 400, "trailing"),
    ("empty zstd body", b"", {**PB, "Content-Encoding": "zstd"}, 400, "zstd"),
    ("kvlist nested past the parser's limit", raw_nested_request(5000), PB, 400, "cannot parse"),
    ("deeply nested kvlist", raw_nested_request(20), PB, 200, (1, "attribute_limit")),
    ("10,000 attributes", many_attrs(10_000), PB, 200, (1, "attribute_limit")),
    ("huge attribute value", with_attr("big", "x" * 500_000), PB, 200, (1, "attribute_limit")),
    ("huge attribute key", with_attr("k" * 100_000, "v"), PB, 200, (1, "attribute_limit")),
    # Resource attributes: the same limits as point attributes, and a rejection, never "retry later".
    ("resource attribute nested 20 deep", with_resource({"deep": nested_value(20)}), PB, 200, (1, "attribute_limit")),
    ("resource attribute nested 29 deep", with_resource({"deep": nested_value(29)}), PB, 200, (1, "attribute_limit")),
    ("10,000 resource attributes", with_resource({f"k{i}": "v" for i in range(10_000)}), PB, 200, (1, "attribute_limit")),
    ("huge resource attribute value", with_resource({"big": "x" * 500_000}), PB, 200, (1, "attribute_limit")),
    ("NaN in a sum", one_point(math.nan), PB, 200, (1, "invalid_value")),
    ("Inf in a sum", one_point(math.inf), PB, 200, (1, "invalid_value")),
    ("-Inf in a sum", one_point(-math.inf), PB, 200, (1, "invalid_value")),
    ("timestamp in 1970", one_point(1, t_ns=10**9, start_ns=0), PB, 200, (1, "invalid_timestamp")),
    ("timestamp in 2500", one_point(1, t_ns=16725225600 * 10**9, start_ns=0), PB, 200, (1, "invalid_timestamp")),
    ("timestamp zero", one_point(1, t_ns=0, start_ns=0), PB, 200, (1, "invalid_timestamp")),
    ("negative monotonic delta", one_point(-5), PB, 200, (1, "negative_delta")),
    ("point without a value", one_point(None), PB, 200, (1, "no_value")),
    ("histogram with inconsistent counts", bad_histogram(), PB, 200, (1, "invalid_value")),
]  # fmt: skip


def ok_total(up) -> int:
    up.drain()
    now = int(time.time())
    return fetch_usage(up.api, "org-ok", "ok.calls", now // 3600 * 3600 - 3600, (now // 3600 + 2) * 3600,
                       "1h")["total"]  # fmt: skip


def check_valid_request_is_stored(up, i: int) -> None:
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=valid_bytes(case=str(i)), headers=PB, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize(("name", "body", "headers", "status", "expect"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_request_is_answered_and_the_next_valid_one_stored(up, name, body, headers, status, expect):
    before = ok_total(up)
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=headers, timeout=60)
    assert r.status_code == status, r.content[:300]
    ctype = headers.get("Content-Type", "")
    answer_json = ctype != "application/x-protobuf"
    assert r.headers["Content-Type"] == ("application/json" if answer_json else "application/x-protobuf")
    if status == 200:
        rejected, reason = expect
        resp = ExportMetricsServiceResponse.FromString(r.content)
        assert resp.partial_success.rejected_data_points == rejected
        assert reason in resp.partial_success.error_message
    else:
        message = r.json()["message"] if answer_json else status_pb2.Status.FromString(r.content).message
        assert expect in message, message
    assert r.status_code not in (429, 502, 503, 504)  # nothing here is worth retrying
    check_valid_request_is_stored(up, len(name))
    assert ok_total(up) == before + 1


def test_wrong_path_and_method(up):
    r = requests.post(f"{up.otlp_http}/v1/traces", data=VALID, headers=PB, timeout=10)
    assert r.status_code == 404
    r = requests.get(f"{up.otlp_http}/v1/metrics", timeout=10)
    assert r.status_code == 405


def test_grpc_bad_input(up):
    channel = grpc.insecure_channel(up.otlp_grpc)
    export = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
    with pytest.raises(grpc.RpcError) as e:
        export(b"\xff\xff\xff garbage", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        export(b"\x0a" + b"\x80" * 5 + b"\x00" * (LIMIT + 10), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    partial = ExportMetricsServiceResponse.FromString(export(one_point(-1), timeout=10))
    assert partial.partial_success.rejected_data_points == 1
    ok = ExportMetricsServiceResponse.FromString(export(valid_bytes(case="grpc"), timeout=10))
    assert not ok.HasField("partial_success") or ok.partial_success.rejected_data_points == 0
    channel.close()


def test_rejections_are_counted_by_reason(up):
    text = requests.get(f"{up.api}/metrics", timeout=10).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("meterhouse_points_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            counts[reason] = float(line.rsplit(" ", 1)[1])
    expected: dict[str, int] = {}
    for _, _, _, status, expect in CORPUS:
        if status == 200:
            expected[expect[1]] = expected.get(expect[1], 0) + expect[0]
    for reason, n in expected.items():
        assert counts[reason] >= n, (reason, counts)


def test_a_request_whose_points_take_too_much_stored_is_refused_counted_and_logged(up):
    """A body of 260 KB whose resource is copied onto its 200 points would be a 52 MB spool record and a
    group several times that in the writer's memory (before: answered 200, and the record built whole).
    Refused for good before the record is built, its points counted as rejected and logged."""
    before = metric_value(up, "meterhouse_points_rejected_total", reason="request_too_large")
    body = copied_onto_every_point()
    assert len(body) < LIMIT
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=PB, timeout=60)
    assert r.status_code == 413
    assert "as stored" in status_pb2.Status.FromString(r.content).message
    channel = grpc.insecure_channel(up.otlp_grpc)
    export = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
    with pytest.raises(grpc.RpcError) as e:
        export(body, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "as stored" in e.value.details()
    channel.close()
    assert metric_value(up, "meterhouse_points_rejected_total", reason="request_too_large") == before + 400
    lines = [json.loads(line) for line in up.output().splitlines() if '"data points rejected"' in line]
    assert any(e["reason"] == "request_too_large" and e["metric"] == "bad.calls" for e in lines), lines


def metric_value(up, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(requests.get(f"{up.api}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_rejections_are_logged_once_per_reason_and_metric(up):
    """Never silent, never one line per point: the corpus above rejected `bad.calls` points for
    attribute_limit many times; the log has one line for that pair, with an example org and a count."""
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=with_attr("big", "x" * 5000), headers=PB, timeout=30)
    assert r.status_code == 200
    lines = [json.loads(line) for line in up.output().splitlines() if '"data points rejected"' in line]
    pairs = [(entry["reason"], entry["metric"]) for entry in lines]
    assert pairs.count(("attribute_limit", "bad.calls")) == 1, lines
    (entry,) = [e for e in lines if (e["reason"], e["metric"]) == ("invalid_value", "bad.calls")]
    assert entry["level"] == "warning" and entry["example_org"] == "org-bad" and entry["points"] >= 1
    assert {"invalid_value", "invalid_timestamp", "negative_delta", "no_value"} <= {
        e["reason"] for e in lines
    }
