"""The native fast path of the decoder (collector/_otlpfast.c) against the Python decoder.

For every request, ``decode_numbers`` returns None or exactly the columns and counts the Python decoder
builds; for every request inside the fast path (delta sums and gauges, string/int/bool attributes) that
the Python decoder accepts whole, it does not return None. Malformed bytes never crash it and are never
accepted when protobuf refuses them.
"""

import math
import random
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality as SdkTemporality
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from bench.payloads import make_requests
from meterhouse.collector import decode
from meterhouse.collector.decode import Limits, decode_request, resource_columns
from meterhouse.collector.series import SeriesLimiter
from meterhouse.core import schema

NOW = time.time_ns()
DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def test_the_native_decoder_is_built_and_used():
    from meterhouse.collector import _otlpfast  # noqa: F401  (fails when the extension was not built)

    assert decode._fast is not None, "the native decoder is not importable: install with a C compiler"


def fast(body, limits=None, now=NOW):
    lim = limits or Limits()
    return decode._fast.decode_numbers(
        body, lim.org_attribute, now - lim.max_past_ns, now + lim.max_future_ns, lim.max_attributes,
        lim.max_attribute_length, lim.max_metric_name_length, lim.max_unit_length, lim.max_scope_length,
        lim.max_description_length, schema.MAX_SUM_DOUBLE, now,
    )  # fmt: skip


def slow(body, limits=None, now=NOW):
    req = ExportMetricsServiceRequest.FromString(body)
    return decode_request(req, limits or Limits(), now_ns=now, digest="d")


def same_columns(a, b):
    """Equal, NaN equal to NaN, and of the same types (0 is not 0.0, 1 is not True)."""
    return repr(a) == repr(b) and list(a) == list(b)


def check(body, limits=None, *, in_path=None):
    """The property: None, or the Python decoder's columns and counts exactly; not None when the
    request is inside the fast path and the Python decoder accepts all of it."""
    got = fast(body, limits)
    try:
        py = slow(body, limits)
    except Exception:  # protobuf refuses the bytes (or the Python walk fails): the fast path must too
        assert got is None
        return None
    accepted = not py.rejected and not py.changes and not py.batch.dist_columns
    if got is None:
        if in_path is not None and in_path and accepted:
            pytest.fail("the fast path declined a request inside it that the Python decoder accepts")
        return None
    assert accepted, f"fast path accepted what the Python decoder rejects: {py.rejected}"
    cols, points, unattributed, late = got
    assert same_columns(cols, py.batch.columns)
    assert (points, unattributed, late) == (py.received, py.unattributed, py.repaired["start_after_time"])
    return got


# -- realistic requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(("orgs", "points"), [(15_000, 5_000), (3, 50), (1, 8)])
def test_bench_payloads_take_the_fast_path_with_identical_columns(orgs, points):
    bodies, _ = make_requests(orgs, points, 3, seed=orgs)
    for body in bodies:
        assert check(body, in_path=True) is not None


def test_list_objects_are_shared_by_rows_with_the_same_sets():
    bodies, _ = make_requests(10, 400, 1)
    cols, *_ = fast(bodies[0])
    # The resource's lists, like the Python path's ``[value] * n``.
    assert all(k is cols["resource_keys"][0] for k in cols["resource_keys"])
    assert all(v is cols["resource_values"][0] for v in cols["resource_values"])
    # One pair of lists per distinct point attribute set (nothing downstream changes them in place).
    pairs = {(tuple(k), tuple(v)) for k, v in zip(cols["attr_keys"], cols["attr_values"], strict=True)}
    assert len({id(k) for k in cols["attr_keys"]}) == len({id(v) for v in cols["attr_values"]}) == len(pairs)
    assert len(pairs) < len(cols["attr_keys"])


def sdk_request(temporality, instruments):
    preferred = {kind: temporality for kind in (Counter, UpDownCounter, Histogram, ObservableCounter,
                                                ObservableUpDownCounter, ObservableGauge)}  # fmt: skip
    reader = InMemoryMetricReader(preferred_temporality=preferred)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "billing", "org.id": "org-res", "pid": 42, "ok": True}),
    )
    try:
        meter = provider.get_meter("usage", "1.2.3")
        instruments(meter)
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    return encode_metrics(data).SerializeToString()


def counters(meter):
    c = meter.create_counter("api.requests", unit="1", description="requests")
    for i in range(40):
        c.add(i + 1, {"org.id": f"org-{i % 7}", "route": f"/r/{i % 3}", "é": "ü", "n": i % 2, "b": True})
    c.add(5, {})  # no org anywhere but the resource's
    meter.create_up_down_counter("queue.depth").add(-3, {"org.id": "org-1"})
    meter.create_counter("bytes", unit="By").add(2.5, {"org.id": ""})
    meter.create_observable_gauge(
        "temperature", callbacks=[lambda _o: [__import__("opentelemetry.metrics").metrics.Observation(
            21.5, {"org.id": "org-2", "room": "a"})]],
    )  # fmt: skip


def test_opentelemetry_python_sdk_delta_export_takes_the_fast_path():
    body = sdk_request(SdkTemporality.DELTA, counters)
    got = check(body, in_path=True)
    assert got is not None
    cols = got[0]
    assert set(cols["kind"]) == {"sum", "gauge"}
    assert {"org-0", "org-res", ""} <= set(cols["org_id"])


def test_opentelemetry_python_sdk_cumulative_and_histograms_fall_back():
    assert check(sdk_request(SdkTemporality.CUMULATIVE, counters)) is None

    def histogram(meter):
        meter.create_histogram("latency").record(3.5, {"org.id": "org-1"})

    assert check(sdk_request(SdkTemporality.DELTA, histogram)) is None


def test_float_and_sequence_attributes_fall_back():
    def floats(meter):
        meter.create_counter("c").add(1, {"org.id": "o", "ratio": 0.5, "tags": ("a", "b")})

    assert check(sdk_request(SdkTemporality.DELTA, floats)) is None


def test_opentelemetry_js_sdk_protobuf_exports_take_the_fast_path():
    """The JS SDK's OTLP/HTTP protobuf exporter (tests/js, delta temporality), captured on loopback."""
    js = Path(__file__).resolve().parent.parent / "js"
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(
            "node and npm are needed (Debian: apt-get install nodejs npm); scripts/test.sh installs them"
        )
    if not (js / "node_modules" / "@opentelemetry" / "sdk-metrics").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=js, check=True, timeout=300)
    bodies = []

    class Capture(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            if self.headers.get("Content-Length") is not None:
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            else:  # Node's client sends chunked bodies
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/metrics"
        subprocess.run(["node", "export.js", url, "proto", "none", "js-fast", "12"], cwd=js,
                       capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    with_points = [b for b in bodies if slow(b).received]
    assert with_points
    for body in with_points:
        got = check(body, in_path=True)
        assert got is not None and got[1] > 0


# -- decode_request wiring -------------------------------------------------------------------------


def test_decode_request_with_body_equals_the_python_walk():
    bodies, _ = make_requests(50, 200, 2)
    for body in bodies:
        req = ExportMetricsServiceRequest.FromString(body)
        a = decode_request(req, Limits(), now_ns=NOW, digest="d", body=body)
        b = decode_request(None, Limits(), now_ns=NOW, digest="d", body=body)
        c = decode_request(req, Limits(), now_ns=NOW, digest="d")
        for r in (a, b):
            assert same_columns(r.batch.columns, c.batch.columns)
            assert (r.received, r.unattributed, r.batch.size, r.repaired) == (
                c.received, c.unattributed, c.batch.size, c.repaired)  # fmt: skip


def test_the_spool_encodes_fast_path_batches_to_the_same_blocks():
    from meterhouse.collector.spool import encode_blocks

    bodies, _ = make_requests(30, 500, 2)
    mixed = bodies[0] + one_point([("n", 7), ("b", True)], resource=[("p", 1)]).SerializeToString()
    for body in (*bodies, mixed):
        a = decode_request(None, Limits(), now_ns=NOW, digest="d", body=body)
        b = decode_request(ExportMetricsServiceRequest.FromString(body), Limits(), now_ns=NOW, digest="d")
        assert encode_blocks(a.batch) == encode_blocks(b.batch)


def test_decode_request_checks_the_senders_orgs_on_the_fast_path():
    bodies, _ = make_requests(5, 40, 1)
    req = ExportMetricsServiceRequest.FromString(bodies[0])
    allowed = {"org-000001"}.__contains__
    a = decode_request(req, Limits(), now_ns=NOW, digest="d", allowed_org=allowed, body=bodies[0])
    b = decode_request(req, Limits(), now_ns=NOW, digest="d", allowed_org=allowed)
    assert a.rejected["org_not_allowed"] == b.rejected["org_not_allowed"] > 0
    assert same_columns(a.batch.columns, b.batch.columns)
    everyone = decode_request(
        req, Limits(), now_ns=NOW, digest="d", allowed_org=lambda o: True, body=bodies[0]
    )
    assert everyone.batch.size == 40 and not everyone.rejected


def test_decode_request_folds_series_on_the_fast_path():
    bodies, _ = make_requests(1, 200, 1)
    results = []
    for body in (bodies[0], None):
        req = ExportMetricsServiceRequest.FromString(bodies[0])
        series = SeriesLimiter(3, lambda pairs: {})
        results.append(decode_request(req, Limits(), now_ns=NOW, digest="d", series=series, body=body))
    a, b = results
    assert a.folded == b.folded > 0
    assert len(a.admitted) == len(b.admitted) == 3 * 4  # three sets per metric for the one org
    assert same_columns(a.batch.columns, b.batch.columns)


def test_decode_request_with_bytes_protobuf_refuses_raises_like_a_parse():
    with pytest.raises(DecodeError):
        decode_request(None, Limits(), now_ns=NOW, digest="d", body=b"\x0a\x05\x0a")


# -- hand-made edge cases --------------------------------------------------------------------------


def kv(k, v):
    if isinstance(v, AnyValue):
        return KeyValue(key=k, value=v)
    if isinstance(v, bool):
        return KeyValue(key=k, value=AnyValue(bool_value=v))
    if isinstance(v, int):
        return KeyValue(key=k, value=AnyValue(int_value=v))
    if isinstance(v, float):
        return KeyValue(key=k, value=AnyValue(double_value=v))
    if v is None:
        return KeyValue(key=k)
    return KeyValue(key=k, value=AnyValue(string_value=v))


def one_point(attrs=(), resource=(), value=1, t=None, start=None, kind="sum", temporality=DELTA, mono=True):
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(k, v) for k, v in resource)
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = "s", "1"
    m = sm.metrics.add(name="m", unit="1")
    data = getattr(m, kind)
    if kind == "sum":
        data.aggregation_temporality = temporality
        data.is_monotonic = mono
    dp = data.data_points.add()
    dp.time_unix_nano = NOW - 10**9 if t is None else t
    dp.start_time_unix_nano = max(0, dp.time_unix_nano - 10**9) if start is None else start
    if isinstance(value, float):
        dp.as_double = value
    elif value is not None:
        dp.as_int = value
    dp.attributes.extend(kv(k, v) for k, v in attrs)
    return req


def named(req, name=None, unit=None, scope=None, version=None, description=None, extra=True):
    """``req`` (one_point's) with its metric's name, unit or description or its scope changed, and a good
    metric beside it in another scope (``extra``), so that a rejection leaves something to keep."""
    sm = req.resource_metrics[0].scope_metrics[0]
    m = sm.metrics[0]
    for attr, value in (("name", name), ("unit", unit), ("description", description)):
        if value is not None:
            setattr(m, attr, value)
    for attr, value in (("name", scope), ("version", version)):
        if value is not None:
            setattr(sm.scope, attr, value)
    if extra:
        good = req.resource_metrics[0].scope_metrics.add()
        good.scope.name = "good"
        g = good.metrics.add(name="kept", unit="1")
        g.gauge.data_points.add(time_unix_nano=NOW - 10**9, as_int=3)
    return req


def bad_metric_without_points():
    req = one_point()
    req.resource_metrics[0].scope_metrics[0].metrics.add(name="no\x00points", unit="\x01").gauge.SetInParent()
    return req


#: Names, units, scopes and descriptions at the default limits, and what is not a control character.
NAMES_ACCEPTED = [
    named(one_point(), name="n" * 1024, unit="u" * 255, description="d" * 4096),
    named(one_point(), scope="s" * 1024, version="v" * 1024),
    named(one_point(), description="prose\nwith\tcontrols\x00"),  # a description: its length only
    named(one_point(), name="é.ｚ😀\x80\u2028", unit="°C", scope="😀"),
    named(one_point(), name="", unit="", scope="", version=""),
    bad_metric_without_points(),  # no point to reject: nothing rejected, as in Python
]

#: Each breaks one rule (the Python decoder rejects the first metric's point as invalid_name).
NAMES_DECLINED = [
    named(one_point(), name="n" * 1025),
    named(one_point(), unit="u" * 256),
    named(one_point(), description="d" * 4097),
    named(one_point(), scope="s" * 1025),
    named(one_point(), version="v" * 1025),
    named(one_point(), name="api.requests\x1f42"),
    named(one_point(), name="\x00"),
    named(one_point(), name="m\x7f"),
    named(one_point(), name="m\n"),
    named(one_point(), unit="\x1e"),
    named(one_point(), scope="s\x1f"),
    named(one_point(), version="1\x00"),
    named(one_point(), name="😀" * 1025),  # code points, not bytes, are counted
]

EDGE_ACCEPTED = [
    one_point([("org.id", "a"), ("z", "1"), ("b", "2"), ("z", "3"), ("b", "4")]),  # repeated keys: last wins
    one_point([("org.id", "a"), ("org.id", "b")]),  # the last org
    one_point(
        [("x", "y")], resource=[("org.id", "r"), ("org.id", "q"), ("a", "1")]
    ),  # resource org: first sorted
    one_point([("org.id", "")], resource=[("org.id", "r")]),  # an empty point org wins
    one_point(
        [("n", -17), ("t", True), ("f", False), ("e", None), ("s", AnyValue())],
        resource=[("p", 7), ("q", None)],
    ),
    one_point([("é", "ü"), ("e", "😀"), ("\x00", "nul"), ("ａ", "b")]),  # code point order
    one_point(start=NOW + 5 * 10**9, t=NOW),  # start after time: repaired
    one_point(value=-5, mono=False),  # a non-monotonic sum may decrease
    one_point(value=-2.5, kind="gauge"),
    one_point(value=math.nan, kind="gauge"),  # gauges take any double
    one_point(value=math.inf, kind="gauge"),
    one_point(value=0.0),
    one_point(value=2**63 - 1),
    one_point(value=-(2**63), mono=False),
    one_point(value=1e288),  # the bound of a double sum point (schema.MAX_SUM_DOUBLE)
    one_point(value=-1e288, mono=False),
    one_point(value=1e308, kind="gauge"),  # gauges are not summed: not bounded
    one_point([("k" * 4096, "v" * 4096)]),  # at the length limit
    one_point([(f"k{i:03d}", "v") for i in range(128)]),  # at the count limit
]

EDGE_DECLINED = [
    one_point(value=None),  # no value
    one_point(t=0),
    one_point(t=NOW - 3 * 366 * 86400 * 10**9),
    one_point(t=NOW + 2 * 86400 * 10**9),
    one_point(value=-1),  # negative monotonic delta
    one_point(value=-0.5),
    one_point(value=math.nan),  # non-finite sum
    one_point(value=math.inf, mono=False),
    one_point(value=1e308),  # beyond the bound: out_of_range
    one_point(value=math.nextafter(1e288, math.inf)),
    one_point(value=-math.nextafter(1e288, math.inf), mono=False),
    one_point(temporality=CUMULATIVE),
    one_point(temporality=0),
    one_point([("k" * 4097, "v")]),
    one_point([("k", "v" * 4097)]),
    one_point([("org.id", "o" * 4097)]),
    one_point([(f"k{i:03d}", "v") for i in range(129)]),
    one_point(resource=[(f"k{i:03d}", "v") for i in range(129)]),
    one_point(resource=[("k", "v" * 4097)]),
    one_point([("d", 0.5)]),
    one_point([("a", AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="x")])))]),
    one_point([("a", AnyValue(bytes_value=b"x"))]),
    one_point(resource=[("d", 1.5)]),
]


@pytest.mark.parametrize("req", EDGE_ACCEPTED, ids=range(len(EDGE_ACCEPTED)))
def test_edge_cases_inside_the_fast_path_match_the_python_decoder(req):
    assert check(req.SerializeToString(), in_path=True) is not None


@pytest.mark.parametrize("req", NAMES_ACCEPTED, ids=range(len(NAMES_ACCEPTED)))
def test_names_within_the_limits_take_the_fast_path(req):
    assert check(req.SerializeToString(), in_path=True) is not None


@pytest.mark.parametrize("req", NAMES_DECLINED, ids=range(len(NAMES_DECLINED)))
def test_invalid_names_are_declined_and_both_paths_reject_them_alike(req):
    body = req.SerializeToString()
    assert fast(body) is None
    a = decode_request(None, Limits(), now_ns=NOW, digest="d", body=body)
    b = decode_request(req, Limits(), now_ns=NOW, digest="d")
    assert a.rejected == b.rejected == {"invalid_name": 1}
    assert a.batch.columns["metric"] == ["kept"] and same_columns(a.batch.columns, b.batch.columns)


def test_name_limits_are_the_configured_ones_on_both_paths():
    small = Limits(max_metric_name_length=4, max_unit_length=1, max_scope_length=4, max_description_length=5)
    at = {"name": "abcd", "unit": "1", "scope": "abcd", "version": "wxyz", "description": "abcde"}
    assert check(named(one_point(), **at).SerializeToString(), small, in_path=True) is not None
    for over in ({"name": "abcde"}, {"unit": "12"}, {"scope": "abcde"}, {"version": "vwxyz"},
                 {"description": "abcdef"}):  # fmt: skip
        req = named(one_point(), **{**at, **over})
        body = req.SerializeToString()
        assert fast(body, small) is None, over
        a = decode_request(None, small, now_ns=NOW, digest="d", body=body)
        assert a.rejected == {"invalid_name": 1} and a.batch.columns["metric"] == ["kept"], over


@pytest.mark.parametrize("req", EDGE_DECLINED, ids=range(len(EDGE_DECLINED)))
def test_requests_the_python_decoder_does_not_accept_whole_are_declined(req):
    assert fast(req.SerializeToString()) is None
    check(req.SerializeToString())


def test_histograms_exemplars_scope_attributes_and_no_data():
    req = one_point()
    req.resource_metrics[0].scope_metrics[0].metrics.add(name="h").histogram.data_points.add(count=1)
    assert fast(req.SerializeToString()) is None
    req = one_point()
    req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].exemplars.add(as_int=1)
    assert fast(req.SerializeToString()) is None
    req = one_point()
    req.resource_metrics[0].scope_metrics[0].scope.attributes.add(key="k")
    assert fast(req.SerializeToString()) is None
    req = one_point()
    req.resource_metrics[0].scope_metrics[0].metrics.add(name="nodata", unit="1")  # skipped, as in Python
    req.resource_metrics[0].scope_metrics[0].metrics.add(name="empty").gauge.SetInParent()
    assert check(req.SerializeToString(), in_path=True) is not None


def field(number, wire_type, payload):
    def varint(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    tag = varint(number << 3 | wire_type)
    return tag + (varint(len(payload)) + payload if wire_type == 2 else payload)


def test_wire_level_cases():
    body = one_point([("org.id", "a")]).SerializeToString()
    rm = ExportMetricsServiceRequest.FromString(body).resource_metrics[0]
    res = rm.resource.SerializeToString()
    sms = rm.scope_metrics[0].SerializeToString()
    # Fields in any order: the scope metrics before the resource.
    assert check(field(1, 2, field(2, 2, sms) + field(1, 2, res)), in_path=True) is not None
    # Unknown fields of every wire type are skipped, as protobuf does.
    unknown = (
        field(99, 0, b"\x96\x01") + field(98, 1, b"\0" * 8) + field(97, 5, b"\0" * 4) + field(96, 2, b"xyz")
    )
    assert check(body + unknown, in_path=True) is not None
    assert check(field(1, 2, field(2, 2, sms + unknown) + field(1, 2, res)), in_path=True) is not None
    # A singular message twice (protobuf merges them): declined.
    assert fast(field(1, 2, field(1, 2, res) + field(1, 2, res) + field(2, 2, sms))) is None
    # Invalid UTF-8 in a string protobuf checks (here the metric's description): declined and refused.
    m = rm.scope_metrics[0].metrics[0].SerializeToString() + field(2, 2, b"\xff")
    bad = field(1, 2, field(1, 2, res) + field(2, 2, field(2, 2, m)))
    assert fast(bad) is None
    check(bad)
    # A surrogate encoded in UTF-8 is not valid UTF-8 either (the same length as the text it replaces).
    for placeholder in (b"abc", b"xyz", b"org"):
        ok = one_point([("org.id", "abc"), ("xyz", "v")], resource=[("a", "org")]).SerializeToString()
        surrogate = ok.replace(placeholder, b"\xed\xa0\x80")
        assert check(ok, in_path=True) is not None
        assert fast(surrogate) is None
        with pytest.raises(DecodeError):
            ExportMetricsServiceRequest.FromString(surrogate)
    # A known field with another wire type, a group, field number 0, truncation: declined.
    assert fast(body + field(1, 0, b"\x01")) is None
    assert fast(body + b"\x0b\x0c") is None
    assert fast(body + b"\x02\x00") is None
    for cut in range(1, len(body)):
        check(body[:cut])


# -- generated requests ----------------------------------------------------------------------------

LIMITS = Limits(max_attributes=5, max_attribute_length=6, max_metric_name_length=4, max_unit_length=3,
                max_scope_length=4, max_description_length=5)  # fmt: skip
chars = st.sampled_from("ab\x00é𝄞ｚ")
short = st.text(alphabet=chars, max_size=4)
#: Names, units and scopes: within LIMITS and without control characters, or anything.
good_names = st.text(alphabet=st.sampled_from("abé𝄞ｚ"), max_size=3)
any_names = st.one_of(good_names, st.text(alphabet=st.sampled_from("ab\x00\x1f\x7f\né𝄞ｚ"), max_size=6))


def request_st(valid):
    """Requests the Python decoder accepts whole and inside the fast path (``valid``), or anything: every
    reject reason, cumulative sums, histograms, double attributes, values over the limits."""
    text = short if valid else st.one_of(short, st.text(alphabet=chars, max_size=8))
    names = good_names if valid else any_names
    keys = st.one_of(st.sampled_from(["org.id", "a", "b", "é", "ab"]), short)
    values = st.one_of(
        short, short, st.integers(-99999, 999999), st.booleans(), st.none(), st.just(AnyValue()),
        *([] if valid else [text, st.integers(-(2**63), 2**63 - 1), st.floats().map(lambda f: AnyValue(double_value=f))]),
    )  # fmt: skip
    attrs = st.lists(st.tuples(keys, values), max_size=5 if valid else 7)
    times = st.integers(NOW - 10**12, NOW)
    numbers = st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 100), st.floats(0, 1e288))
    kinds = ["delta", "delta_nonmono", "gauge", "none"]
    if not valid:
        times = st.one_of(times, st.sampled_from([0, 1, NOW + 10**15, 2**64 - 1]))
        bound = st.sampled_from([1e288, math.nextafter(1e288, math.inf)]).flatmap(
            lambda b: st.sampled_from([b, -b])
        )
        numbers = st.one_of(numbers, st.integers(-(2**63), 2**63 - 1), st.floats(), bound, st.none())
        kinds += ["cumulative", "unspecified", "histogram"]
    point = st.fixed_dictionaries(
        {
            "t": times,
            "start_delta": st.integers(-(10**10), 10**10),
            "value": numbers,
            "attrs": attrs,
            "unknown": st.booleans(),
        }  # fmt: skip
    )
    metric = st.fixed_dictionaries(
        {"name": names, "unit": names, "description": names, "kind": st.sampled_from(kinds),
         "points": st.lists(point, max_size=4)}
    )  # fmt: skip
    resource = st.fixed_dictionaries(
        {
            "attrs": attrs,
            "scope": st.one_of(st.none(), st.tuples(names, names)),
            "metrics": st.lists(metric, max_size=3),
        }
    )
    return st.lists(resource, max_size=3)


def build(resources):
    req = ExportMetricsServiceRequest()
    for r in resources:
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(kv(k, v) for k, v in r["attrs"])
        sm = rm.scope_metrics.add()
        if r["scope"] is not None:
            sm.scope.name, sm.scope.version = r["scope"]
        for md in r["metrics"]:
            m = sm.metrics.add(name=md["name"], unit=md["unit"], description=md["description"])
            kind = md["kind"]
            if kind == "none":
                continue
            if kind == "histogram":
                for p in md["points"]:
                    m.histogram.aggregation_temporality = DELTA
                    m.histogram.data_points.add(time_unix_nano=p["t"], count=0)
                continue
            data = m.gauge if kind == "gauge" else m.sum
            if kind != "gauge":
                data.aggregation_temporality = {"cumulative": CUMULATIVE, "unspecified": 0}.get(kind, DELTA)
                data.is_monotonic = kind != "delta_nonmono"
            for p in md["points"]:
                dp = data.data_points.add(time_unix_nano=p["t"])
                dp.start_time_unix_nano = max(0, min(2**64 - 1, p["t"] + p["start_delta"]))
                v = p["value"]
                if isinstance(v, float):
                    dp.as_double = v
                elif v is not None:
                    dp.as_int = v
                dp.attributes.extend(kv(k, v) for k, v in p["attrs"])
                if p["unknown"]:
                    dp.MergeFromString(field(100, 0, b"\x01") + field(101, 2, b"\xff\xfe"))
            data.SetInParent()
    return req


def inside_fast_path(req):
    """Delta sums and gauges with string, int, bool or empty attribute values; resources in the limits."""
    ok_value = {"string_value", "int_value", "bool_value", None}
    for rm in req.resource_metrics:
        if any(kv.value.WhichOneof("value") not in ok_value for kv in rm.resource.attributes):
            return False
        if resource_columns(rm.resource.attributes, LIMITS) is None:
            return False
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                if which in ("histogram", "exponential_histogram", "summary"):
                    return False
                if which == "sum" and m.sum.aggregation_temporality != DELTA:
                    return False
                if which in ("sum", "gauge"):
                    for dp in getattr(m, which).data_points:
                        if any(kv.value.WhichOneof("value") not in ok_value for kv in dp.attributes):
                            return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(request_st(True), request_st(False)))
def test_generated_requests_match_the_python_decoder(resources):
    req = build(resources)
    check(req.SerializeToString(), LIMITS, in_path=inside_fast_path(req))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_st(False), st.data())
def test_mutated_bytes_never_crash_and_are_never_accepted_when_protobuf_refuses_them(resources, data):
    body = bytearray(build(resources).SerializeToString())
    assume(body)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(body) - 1)) if body else 0
        if op == "flip" and body:
            body[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del body[i:]
        else:
            body[i:i] = bytes(data.draw(st.lists(st.integers(0, 255), max_size=4)))
    check(bytes(body), LIMITS)


def test_random_mutations_of_a_real_payload():
    rng = random.Random(7)
    bodies, _ = make_requests(20, 50, 1)
    base = bodies[0]
    for _ in range(3000):
        body = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        check(bytes(body))


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_past_ns=10**20),  # "accept anything old": the window starts before -2**63
        Limits(max_future_ns=10**20),
        Limits(max_attribute_length=2**64, max_attributes=2**64),
    ],
    ids=["past", "future", "attributes"],
)
def test_limits_beyond_64_bits_decode_like_the_python_walk(limits):
    """Limits are plain Python ints (config seconds * 1e9): ones past the C types must not fail every
    request (OverflowError), and the fast path still decodes exactly what the Python walk does."""
    bodies, _ = make_requests(5, 40, 1)
    body = bodies[0]
    req = ExportMetricsServiceRequest.FromString(body)
    a = decode_request(None, limits, now_ns=NOW, digest="d", body=body)
    c = decode_request(req, limits, now_ns=NOW, digest="d")
    assert a.batch.size == c.batch.size > 0
    assert same_columns(a.batch.columns, c.batch.columns)
    assert (a.received, a.unattributed, a.repaired) == (c.received, c.unattributed, c.repaired)
    old = one_point(t=1, start=0).SerializeToString()  # 1 ns after the epoch: inside a 3000-year window
    if limits.max_past_ns > NOW:
        got = decode_request(None, limits, now_ns=NOW, digest="d", body=old)
        assert got.batch.size == 1 and got.batch.columns["time"] == [1]
