"""Adversary (adv28): the writer's identity check now also filters stored rows by the candidates' resource
values (collector/identity.py, ``_existing_sql``). A true repeat must still be dropped (counted once) and
a distinct point kept (counted), whatever shape the resource has. Each copy is sent as other bytes (JSON,
another attribute order), so the request-level dedup does not decide."""

from __future__ import annotations

import time

import pytest
import requests
from conftest import drain
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from otlp_builders import kv, point

from meterhouse.core import schema

ORG = "org-adv28"
SEC = 10**9


def body_of(
    resource: list[tuple[str, object]], metric: str, value: int, t: int
) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in resource:
        rm.resource.attributes.append(kv(k, v))
    sm = rm.scope_metrics.add()
    sm.scope.name = "adv28"
    m = sm.metrics.add()
    m.name, m.unit = metric, "1"
    m.sum.aggregation_temporality, m.sum.is_monotonic = 1, True  # delta
    m.sum.data_points.append(point(value, {"org.id": ORG, "a": "x"}, t_ns=t, start_ns=t - SEC))
    return req


def send(stack, body: bytes, content_type: str) -> None:
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    r = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == 200, r.text
    assert b"rejected" not in r.content, r.content


def stored(stack, metric: str) -> tuple[int, int]:
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    db = store.database
    raw = store.scalar(
        f"SELECT sum(value_int) FROM {db}.usage_points WHERE metric = {{m:String}}", {"m": metric}
    )
    hourly = store.scalar(
        f"SELECT sum(value_int) FROM {db}.{schema.HOURLY_TABLE} WHERE metric = {{m:String}}", {"m": metric}
    )
    return int(raw or 0), int(hourly or 0)


RESOURCES = {
    "empty": [],
    "two_keys": [("service.name", "svc"), ("host.name", "h1")],
    "repeated_key": [("k", "b"), ("k", "a")],
    "repeated_key_same_value": [("k", "a"), ("k", "a")],
    "empty_key_and_value": [("", ""), ("z", "")],
    "array_and_kvlist": [("arr", "placeholder"), ("n", 1)],
    "non_ascii_keys": [("é", "1"), ("e", "2"), ("\U0001f600", "3"), ("\uffff", "4")],
    "int_and_string": [("n", 1), ("s", "1")],
    "double": [("d", 0.1), ("e", 1e300)],
    "bytes": [("b", b"\x00\xff")],
}


@pytest.mark.parametrize("shape", sorted(RESOURCES))
def test_the_same_point_as_json_after_protobuf_counts_once(stack, shape):
    metric = f"adv28.res.{shape}"
    t = time.time_ns() - 30 * SEC
    req = body_of(RESOURCES[shape], metric, 5, t)
    if shape == "array_and_kvlist":
        a = req.resource_metrics[0].resource.attributes[0].value
        a.ClearField("string_value")
        a.array_value.values.add().string_value = "v"
        a.array_value.values.add().int_value = 2
        kvl = req.resource_metrics[0].resource.attributes.add(key="kv").value.kvlist_value
        kvl.values.add(key="x").value.string_value = "y"
    send(stack, req.SerializeToString(), "application/x-protobuf")
    send(stack, json_format.MessageToJson(req).encode(), "application/json")
    assert stored(stack, metric) == (5, 5)


def test_the_same_point_with_resource_attributes_in_another_order_counts_once(stack):
    metric, t = "adv28.res.order", time.time_ns() - 30 * SEC
    attrs = [("service.name", "svc"), ("host.name", "h1"), ("zone", "a"), ("k", "b"), ("k", "a")]
    send(stack, body_of(attrs, metric, 5, t).SerializeToString(), "application/x-protobuf")
    send(stack, body_of(attrs[::-1], metric, 5, t).SerializeToString(), "application/x-protobuf")
    assert stored(stack, metric) == (5, 5)


def test_points_whose_resources_differ_only_in_key_both_count(stack):
    """Same values under different keys: other streams, other usage."""
    metric, t = "adv28.res.keys", time.time_ns() - 30 * SEC
    send(stack, body_of([("host.name", "h1")], metric, 5, t).SerializeToString(), "application/x-protobuf")
    send(stack, body_of([("host.id", "h1")], metric, 5, t).SerializeToString(), "application/x-protobuf")
    send(stack, body_of([], metric, 5, t).SerializeToString(), "application/x-protobuf")
    send(stack, body_of([("host.id", "")], metric, 5, t).SerializeToString(), "application/x-protobuf")
    assert stored(stack, metric) == (20, 20)
