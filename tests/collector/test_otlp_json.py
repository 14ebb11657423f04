"""OTLP/JSON written by hand from the specification's JSON mapping, posted to the real receiver.

lowerCamelCase keys, int64 values as strings, enums as integers, unknown fields ignored; every metric
type. Values are read back from ClickHouse.
"""

import gzip
import json
import time

import pytest
import requests
from conftest import drain

NOW = time.time_ns()
T0, T1 = str(NOW - 60 * 10**9), str(NOW)


def attrs(org="org-j", **more):
    out = [{"key": "org.id", "value": {"stringValue": org}}]
    out += [{"key": k, "value": v} for k, v in more.items()]
    return out


def request_body() -> dict:
    return {
        "resourceMetrics": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}],
                         "droppedAttributesCount": 0},
            "scopeMetrics": [{
                "scope": {"name": "hand", "version": "0.1"},
                "metrics": [
                    {"name": "j.calls", "unit": "{call}", "sum": {
                        "aggregationTemporality": 1, "isMonotonic": True,
                        "dataPoints": [
                            {"startTimeUnixNano": T0, "timeUnixNano": T1, "asInt": "9007199254740993",
                             "attributes": attrs(flag={"boolValue": True}, n={"intValue": "-5"},
                                                 d={"doubleValue": 1.5}, b={"bytesValue": "AAE="},
                                                 arr={"arrayValue": {"values": [{"intValue": "1"},
                                                                                {"stringValue": "x"}]}},
                                                 kv={"kvlistValue": {"values": [
                                                     {"key": "z", "value": {"intValue": "2"}},
                                                     {"key": "a", "value": {"stringValue": "q"}}]}})},
                            {"startTimeUnixNano": T0, "timeUnixNano": T1, "asInt": 7,
                             "attributes": attrs(), "someFutureField": {"x": 1}},
                        ]}},
                    {"name": "j.cumulative", "unit": "By", "sum": {
                        "aggregationTemporality": 2, "isMonotonic": True,
                        "dataPoints": [{"startTimeUnixNano": T0, "timeUnixNano": T1, "asInt": "1000",
                                        "attributes": attrs()}]}},
                    {"name": "j.temperature", "unit": "Cel", "gauge": {
                        "dataPoints": [{"timeUnixNano": T1, "asDouble": 21.5, "attributes": attrs()}]}},
                    {"name": "j.latency", "unit": "s", "histogram": {
                        "aggregationTemporality": 1,
                        "dataPoints": [{"startTimeUnixNano": T0, "timeUnixNano": T1, "count": "6",
                                        "sum": 3.5, "min": 0.1, "max": 2.0,
                                        "bucketCounts": ["1", "2", "3"], "explicitBounds": [0.5, 1.0],
                                        "attributes": attrs()}]}},
                    {"name": "j.size", "unit": "By", "exponentialHistogram": {
                        "aggregationTemporality": 2,
                        "dataPoints": [{"startTimeUnixNano": T0, "timeUnixNano": T1, "count": "7",
                                        "sum": 99.0, "scale": 3, "zeroCount": "1", "zeroThreshold": 0.001,
                                        "positive": {"offset": -2, "bucketCounts": ["2", "3"]},
                                        "negative": {"offset": 1, "bucketCounts": ["1"]},
                                        "attributes": attrs()}]}},
                    {"name": "j.rpc", "unit": "ms", "summary": {
                        "dataPoints": [{"startTimeUnixNano": T0, "timeUnixNano": T1, "count": "10",
                                        "sum": 250.0, "quantileValues": [
                                            {"quantile": 0.5, "value": 20.0},
                                            {"quantile": 0.99, "value": 90.0}],
                                        "attributes": attrs()}]}},
                ],
            }],
        }],
        "unknownTopLevel": True,
    }  # fmt: skip


def post(stack, body: bytes, **headers):
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    r = requests.post(url, data=body, headers={"Content-Type": "application/json", **headers}, timeout=30)
    drain(stack)
    return r


@pytest.mark.parametrize("gzipped", [False, True])
def test_every_metric_type_in_otlp_json_is_stored_and_read_back(stack, gzipped):
    body = json.dumps(request_body()).encode()
    r = post(
        stack, gzip.compress(body) if gzipped else body, **({"Content-Encoding": "gzip"} if gzipped else {})
    )
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.json().get("partialSuccess", {}).get("rejectedDataPoints", 0) in (0, "0")
    db, store = stack.store.database, stack.store

    sums = store.rows(
        f"SELECT metric, toString(sum(toInt128(value_int))), count() FROM {db}.usage_points "
        "WHERE org_id = 'org-j' AND kind = 'sum' GROUP BY metric ORDER BY metric"
    )
    assert sums == [("j.calls", str(2**53 + 1 + 7), 2), ("j.cumulative", "1000", 1)]
    (attributes,) = store.rows(
        f"SELECT attributes FROM {db}.usage_points WHERE metric = 'j.calls' AND value_int > 100"
    )[0]
    assert attributes == {
        "arr": '[1,"x"]', "b": "AAE=", "d": "1.5", "flag": "true", "kv": '{"a":"q","z":2}', "n": "-5",
    }  # fmt: skip
    (resource, scope) = store.rows(f"SELECT resource, scope_name FROM {db}.usage_points LIMIT 1")[0]
    assert resource == {"service.name": "json-svc"} and scope == "hand"

    gauge = store.rows(
        f"SELECT kind, value_double, unit FROM {db}.usage_points WHERE metric = 'j.temperature'"
    )
    assert gauge == [("gauge", 21.5, "Cel")]
    assert store.scalar(f"SELECT count() FROM {db}.usage_hourly WHERE metric = 'j.temperature'") == 0

    dist = {
        row[0]: row[1:]
        for row in store.rows(
            f"SELECT metric, kind, temporality, count, sum, min, max, bucket_counts, explicit_bounds, scale, "
            f"zero_count, zero_threshold, positive_offset, positive_counts, negative_offset, negative_counts, "
            f"quantiles, quantile_values FROM {db}.distribution_points WHERE org_id = 'org-j'"
        )
    }
    assert dist["j.latency"] == ("histogram", 1, 6, 3.5, 0.1, 2.0, [1, 2, 3], [0.5, 1.0], 0, 0, 0.0, 0, [], 0,
                                 [], [], [])  # fmt: skip
    assert dist["j.size"] == ("exp_histogram", 2, 7, 99.0, None, None, [], [], 3, 1, 0.001, -2, [2, 3], 1,
                              [1], [], [])  # fmt: skip
    assert dist["j.rpc"] == ("summary", 0, 10, 250.0, None, None, [], [], 0, 0, 0.0, 0, [], 0, [], [0.5, 0.99],
                             [20.0, 90.0])  # fmt: skip


def test_inconsistent_distributions_are_rejected_with_the_rest_kept(stack):
    body = request_body()
    metrics = body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
    metrics[3]["histogram"]["dataPoints"][0]["count"] = "5"  # buckets add up to 6
    metrics[4]["exponentialHistogram"]["dataPoints"][0]["scale"] = 99
    metrics[5]["summary"]["dataPoints"][0]["quantileValues"][0]["quantile"] = 1.5
    r = post(stack, json.dumps(body).encode())
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert int(partial["rejectedDataPoints"]) == 3 and "invalid_value" in partial["errorMessage"]
    db = stack.store.database
    assert stack.store.scalar(f"SELECT count() FROM {db}.distribution_points") == 0
    assert stack.store.scalar(f"SELECT count() FROM {db}.usage_points") == 4
    assert (
        stack.registry.get_sample_value("meterhouse_points_rejected_total", {"reason": "invalid_value"}) == 3
    )


def test_enum_names_and_numbers_as_json_numbers_are_accepted(stack):
    body = request_body()
    s = body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]
    s["aggregationTemporality"] = "AGGREGATION_TEMPORALITY_DELTA"
    s["dataPoints"] = [
        {"startTimeUnixNano": int(T0), "timeUnixNano": int(T1), "asInt": 5, "attributes": attrs()}
    ]
    body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"] = [body["resourceMetrics"][0]["scopeMetrics"][0]
                                                                ["metrics"][0]]  # fmt: skip
    assert post(stack, json.dumps(body).encode()).status_code == 200
    db = stack.store.database
    assert stack.store.scalar(f"SELECT sum(value_int) FROM {db}.usage_points WHERE metric = 'j.calls'") == 5
