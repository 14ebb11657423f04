"""Property-based: mutated OTLP requests (protobuf and JSON, bytes and structure) against a real
`meterhouse up` are answered 2xx or 4xx (gRPC: OK or a client error), never a 5xx or a dropped
connection; and valid requests sent between them are all stored exactly.
"""

from __future__ import annotations

import gzip
import json
import math
import time
import uuid

import grpc
import pytest
import requests
from conftest import module_up
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from otlp_builders import point, sum_request

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}
LIMIT = 200_000
EXAMPLES = 40
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHECK_ORG = f"org-check-{uuid.uuid4().hex[:8]}"


class Checks:
    """Valid requests sent between the mutated ones: each answered 200 without rejections; their sum is
    compared with what is stored at the end."""

    def __init__(self) -> None:
        self.sent = 0
        self.n = 0

    def send_valid(self, up) -> None:
        self.n += 1
        body = sum_request({"fuzz.check": [point(self.n, {"org.id": CHECK_ORG})]}).SerializeToString()
        r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=PB, timeout=30)
        assert r.status_code == 200, r.content[:200]
        resp = ExportMetricsServiceResponse.FromString(r.content)
        assert resp.partial_success.rejected_data_points == 0
        self.sent += self.n


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    yield from module_up(tmp_path_factory, "fuzz", "--max-request-bytes", str(LIMIT))


@pytest.fixture(scope="module")
def checks(up):
    c = Checks()
    yield c
    up.drain()
    now = int(time.time())
    got = fetch_usage(
        up.api, CHECK_ORG, "fuzz.check", now // 3600 * 3600 - 3600, (now // 3600 + 2) * 3600, "1h"
    )
    assert got["total"] == c.sent, "a valid request sent after mutated ones was not stored exactly"


# -- strategies ---------------------------------------------------------------------------------------
NOW = time.time_ns()
times = st.sampled_from([0, 1, 10**9, NOW, NOW - 10**9, NOW + 10**9, NOW + 10**15, 2**64 - 1])
texts = st.text(max_size=20)


def nested(depth: int) -> AnyValue:
    v = AnyValue(string_value="leaf")
    for i in range(depth):
        v = (
            AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=v)]))
            if i % 2
            else AnyValue(array_value=ArrayValue(values=[v]))
        )
    return v


scalars = st.one_of(
    st.integers(12, 30).map(nested),  # around the nesting limit (16)
    texts.map(lambda s: AnyValue(string_value=s)),
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: AnyValue(int_value=i)),
    st.floats().map(lambda f: AnyValue(double_value=f)),
    st.binary(max_size=10).map(lambda b: AnyValue(bytes_value=b)),
    st.just(AnyValue()),
)
any_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs))),
        st.lists(st.tuples(texts, inner), max_size=3).map(
            lambda kvs: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in kvs]))
        ),
    ),
    max_leaves=30,
)
attributes = st.lists(st.tuples(st.one_of(st.just("org.id"), texts), any_values), max_size=5).map(
    lambda kvs: [KeyValue(key=k, value=v) for k, v in kvs]
)


@st.composite
def requests_(draw) -> ExportMetricsServiceRequest:
    """A structurally varied request: every metric type, odd times, values, temporalities, attributes."""
    req = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(draw(attributes))
        for _ in range(draw(st.integers(0, 2))):
            sm = rm.scope_metrics.add()
            sm.scope.name = draw(texts)
            for _ in range(draw(st.integers(0, 3))):
                m = sm.metrics.add(name=draw(texts), unit=draw(texts))
                kind = draw(
                    st.sampled_from(["sum", "gauge", "histogram", "exponential_histogram", "summary", "none"])
                )
                if kind == "none":
                    continue
                data = getattr(m, kind)
                if kind in ("sum", "histogram", "exponential_histogram"):
                    data.aggregation_temporality = draw(st.integers(0, 3))
                if kind == "sum":
                    data.is_monotonic = draw(st.booleans())
                for _ in range(draw(st.integers(0, 3))):
                    dp = data.data_points.add(time_unix_nano=draw(times), start_time_unix_nano=draw(times))
                    dp.attributes.extend(draw(attributes))
                    if kind in ("sum", "gauge"):
                        if draw(st.booleans()):
                            dp.as_int = draw(st.integers(-(2**63), 2**63 - 1))
                        elif draw(st.booleans()):
                            dp.as_double = draw(st.floats())
                    elif kind == "histogram":
                        dp.count = draw(st.integers(0, 2**64 - 1))
                        dp.bucket_counts.extend(draw(st.lists(st.integers(0, 2**64 - 1), max_size=4)))
                        dp.explicit_bounds.extend(draw(st.lists(st.floats(), max_size=3)))
                        if draw(st.booleans()):
                            dp.sum = draw(st.floats())
                    elif kind == "exponential_histogram":
                        dp.count = draw(st.integers(0, 2**64 - 1))
                        dp.scale = draw(st.integers(-(2**31), 2**31 - 1))
                        dp.zero_threshold = draw(st.floats())
                        dp.positive.offset = draw(st.integers(-(2**31), 2**31 - 1))
                        dp.positive.bucket_counts.extend(
                            draw(st.lists(st.integers(0, 2**64 - 1), max_size=3))
                        )
                    else:
                        dp.count = draw(st.integers(0, 2**64 - 1))
                        dp.sum = draw(st.floats())
                        q = dp.quantile_values.add()
                        q.quantile, q.value = draw(st.floats()), draw(st.floats())
    return req


def valid_request() -> ExportMetricsServiceRequest:
    return sum_request(
        {
            "fuzz.calls": [
                point(3, {"org.id": "org-fuzz", "feature": "a"}),
                point(2.5, {"org.id": "org-fuzz"}),
            ]
        },
        resource={"service.name": "fuzz", "org.id": "org-fuzz"},
    )


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` with a few random byte-level edits: flips, inserts, deletions, truncation, duplication."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate", "set"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and b:
            b[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22]))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del b[i:]
        elif op == "duplicate":
            j = draw(st.integers(i, len(b)))
            b[j:j] = b[i:j]
    return bytes(b)


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=10)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def mutated_json(draw, doc) -> object:
    """The OTLP/JSON document with a few fields replaced by other JSON values, or removed."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 4))):
        node = doc
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            child = node[key]
            if not isinstance(child, (dict, list)) or not child:
                break
            node = child
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            if draw(st.booleans()):
                del node[key]
            else:
                node[key] = draw(json_values)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
    return doc


# -- the properties -------------------------------------------------------------------------------------
def post(up, body: bytes, headers: dict) -> int:
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=headers, timeout=60)
    assert 200 <= r.status_code < 500, (r.status_code, r.content[:300])
    if r.status_code == 200:
        parse = json_format.Parse if headers is JS else None
        if parse is None:
            ExportMetricsServiceResponse.FromString(r.content)
        else:
            parse(r.text, ExportMetricsServiceResponse())
    return r.status_code


GRPC_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def export_grpc(up, body: bytes) -> None:
    with grpc.insecure_channel(up.otlp_grpc) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
        try:
            ExportMetricsServiceResponse.FromString(export(body, timeout=30))
        except grpc.RpcError as e:
            assert e.code() in GRPC_CLIENT_ERRORS, (e.code(), e.details())


VALID_PB = valid_request().SerializeToString()
VALID_JSON = json_format.MessageToDict(valid_request())


@SETTINGS
@given(body=mutated_bytes(VALID_PB), compress=st.booleans())
def test_mutated_protobuf_bytes(up, checks, body, compress):
    headers = {**PB, "Content-Encoding": "gzip"} if compress else PB
    post(up, gzip.compress(body) if compress else body, headers)
    export_grpc(up, body)
    checks.send_valid(up)


@SETTINGS
@given(request=requests_())
def test_structurally_varied_protobuf_requests(up, checks, request):
    body = request.SerializeToString()
    post(up, body, PB)
    export_grpc(up, body)
    checks.send_valid(up)


@SETTINGS
@given(request=requests_())
def test_structurally_varied_json_requests(up, checks, request):
    post(up, json_format.MessageToJson(request).encode(), JS)
    checks.send_valid(up)


@SETTINGS
@given(doc=mutated_json(VALID_JSON))
def test_mutated_json_structure(up, checks, doc):
    post(up, json.dumps(doc, allow_nan=True).encode(), JS)
    checks.send_valid(up)


@SETTINGS
@given(body=mutated_bytes(json.dumps(VALID_JSON).encode()))
def test_mutated_json_bytes(up, checks, body):
    post(up, body, JS)
    checks.send_valid(up)


def test_nan_and_infinities_in_json(up, checks):
    for value in (math.nan, math.inf, -math.inf):
        doc = json.loads(json.dumps(VALID_JSON))
        doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][0]["asDouble"] = value
        post(up, json.dumps(doc).encode(), JS)
    checks.send_valid(up)
