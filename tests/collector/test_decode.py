import math
import time

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValueList
from otlp_builders import CUMULATIVE, kv, point, sum_request

from meterhouse.collector.decode import Limits, decode_request, value_text


def decode(req, limits=None):
    return decode_request(req, limits or Limits(), now_ns=time.time_ns(), digest="d")


def rows(result):
    cols = result.batch.columns
    return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def test_point_org_wins_over_resource_org_and_is_not_kept_as_attribute():
    req = sum_request(
        {"api.calls": [point(3, {"org.id": "org-a", "region": "eu"}), point(4, {"region": "us"})]},
        resource={"org.id": "org-r", "service.name": "svc"},
    )
    r = decode(req)
    got = rows(r)
    assert [p["org_id"] for p in got] == ["org-a", "org-r"]
    assert got[0]["attr_keys"] == ["region"] and got[0]["attr_values"] == ["eu"]
    assert got[0]["resource_keys"] == ["org.id", "service.name"]
    assert got[0]["scope_name"] == "tests" and got[0]["scope_version"] == "1.0"
    assert r.unattributed == 0 and r.rejected_count == 0


def test_point_without_org_is_kept_with_empty_org_and_counted():
    r = decode(sum_request({"api.calls": [point(5, {"region": "eu"})]}))
    assert [p["org_id"] for p in rows(r)] == [""]
    assert r.unattributed == 1
    assert r.batch.size == 1


def test_org_attribute_key_is_configurable():
    req = sum_request({"m": [point(1, {"tenant": "t-1", "org.id": "ignored-as-org"})]})
    (p,) = rows(decode(req, Limits(org_attribute="tenant")))
    assert p["org_id"] == "t-1"
    assert p["attr_keys"] == ["org.id"]


def test_attributes_are_sorted_so_the_same_series_is_stored_the_same_way():
    a = rows(decode(sum_request({"m": [point(1, {"z": "1", "a": "2", "m": "3"})]})))[0]
    b = rows(decode(sum_request({"m": [point(1, {"m": "3", "z": "1", "a": "2"})]})))[0]
    assert a["attr_keys"] == b["attr_keys"] == ["a", "m", "z"]
    assert a["attr_values"] == b["attr_values"] == ["2", "3", "1"]


def test_int_values_stay_exact_above_2_to_the_53():
    big = 2**62 + 1
    (p,) = rows(decode(sum_request({"m": [point(big, {"org.id": "o"})]})))
    assert p["value_int"] == big and p["is_int"] == 1 and p["value_double"] == 0.0


def test_double_values_are_stored_as_doubles():
    (p,) = rows(decode(sum_request({"m": [point(0.1, {"org.id": "o"})]})))
    assert p["value_double"] == 0.1 and p["is_int"] == 0


def test_invalid_points_are_rejected_by_reason_and_valid_neighbours_kept():
    now = time.time_ns()
    req = sum_request(
        {
            "good": [point(1, {"org.id": "o"}), point(2.5, {"org.id": "o"})],
            "nan": [point(math.nan, {"org.id": "o"}), point(math.inf, {"org.id": "o"})],
            "negative": [point(-1, {"org.id": "o"}), point(-0.5, {"org.id": "o"})],
            "novalue": [point(None, {"org.id": "o"})],
            "zero_time": [point(1, {"org.id": "o"}, t_ns=0, start_ns=0)],
            "year_1970": [point(1, {"org.id": "o"}, t_ns=10**9, start_ns=0)],
            "year_2500": [point(1, {"org.id": "o"}, t_ns=16725225600 * 10**9, start_ns=0)],
            "start_after_time": [point(1, {"org.id": "o"}, t_ns=now, start_ns=now + 1)],
        }
    )
    r = decode(req)
    assert r.batch.size == 3  # a start after the time is repaired, not rejected (test_validation.py)
    assert sorted(p["metric"] for p in rows(r)) == ["good", "good", "start_after_time"]
    assert r.rejected == {"invalid_value": 2, "negative_delta": 2, "no_value": 1, "invalid_timestamp": 3}
    assert r.received == 11
    assert "negative_delta" in r.error_message() and "'negative'" in r.error_message()


def test_negative_values_are_fine_on_non_monotonic_sums():
    r = decode(sum_request({"balance": [point(-7, {"org.id": "o"})]}, monotonic=False))
    assert r.batch.size == 1 and rows(r)[0]["monotonic"] == 0


def test_attribute_limits():
    limits = Limits(max_attributes=3, max_attribute_length=10)
    too_many = point(1, {f"k{i}": "v" for i in range(4)})
    long_value = point(1, {"k": "x" * 11})
    long_key = point(1, {"k" * 11: "x"})
    ok = point(1, {"a": "1", "b": "2", "c": "3"})
    r = decode(sum_request({"m": [too_many, long_value, long_key, ok]}, resource={"svc": "t"}), limits)
    assert r.rejected == {"attribute_limit": 3}
    assert r.batch.size == 1


def test_cumulative_sums_are_not_yet_usage_and_counted():
    r = decode(sum_request({"m": [point(1, {"org.id": "o"})]}, temporality=CUMULATIVE))
    assert r.batch.size == 0 and r.rejected == {"unsupported_metric": 1}


def test_value_text_forms():
    assert value_text(AnyValue(string_value="x")) == "x"
    assert value_text(AnyValue(bool_value=True)) == "true"
    assert value_text(AnyValue(int_value=-(2**63))) == str(-(2**63))
    assert value_text(AnyValue(double_value=0.5)) == "0.5"
    assert value_text(AnyValue(bytes_value=b"\x00\xff")) == "AP8="
    assert value_text(AnyValue()) == ""
    arr = AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(string_value="a")]))
    assert value_text(arr) == '[1,"a"]'
    kvl = AnyValue(kvlist_value=KeyValueList(values=[kv("b", 1), kv("a", True)]))
    assert value_text(kvl) == '{"a":true,"b":1}'


def test_deeply_nested_values_are_rejected_not_fatal():
    v = AnyValue(string_value="leaf")
    for _ in range(40):
        v = AnyValue(array_value=ArrayValue(values=[v]))
    dp = point(1, {"org.id": "o"})
    dp.attributes.append(kv("deep", v))
    r = decode(sum_request({"m": [dp, point(2, {"org.id": "o"})]}))
    assert r.rejected == {"attribute_limit": 1} and r.batch.size == 1


def test_a_repeated_attribute_key_keeps_its_last_value():
    dp = point(1, {"org.id": "o"})
    for value in ("zz", "aa"):  # the later value sorts first: order in the request decides, not sorting
        dp.attributes.append(kv("feature", value))
    (p,) = rows(decode(sum_request({"m": [dp]})))
    assert p["attr_keys"] == ["feature"] and p["attr_values"] == ["aa"]
