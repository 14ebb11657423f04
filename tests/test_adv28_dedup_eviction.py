"""Adversary (adv28): the request-level dedup keeps at most N digests (a share of --memory-budget-bytes,
floor 10,000), the oldest evicted; point identity is supposed to drop the points of a re-sent copy whose
digest went ("Nothing counts twice for it", collector/dedup.py). Each case re-sends acknowledged bytes,
well inside --dedup-window-s, after other requests pushed their digest out.

Whole stacks in this process (real sockets on loopback, the real embedded engine), with the dedup's bound
set to one digest as tests/collector/test_identity.py does: at the default budget it takes 85,899 other
requests, at the floor 10,000 (and a budget small enough for the floor leaves the engine too little to
insert a one-point group: 30 MiB at 125 MB)."""

from __future__ import annotations

import time

import requests
from conftest import drain
from otlp_builders import CUMULATIVE, histogram_request, point, sum_request

from meterhouse.core import schema

ORG = "org-adv28"
SEC = 10**9


def post(stack, req) -> None:
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    r = requests.post(
        url, data=req.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}, timeout=30
    )
    assert r.status_code == 200, r.text


def raw_and_rollup(stack, metric: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per-org totals of ``metric`` in the raw table and in the hourly rollup, once all is written."""
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    db = store.database

    def read(table: str) -> dict[str, int]:
        sql = f"SELECT org_id, sum(value_int) FROM {db}.{table} WHERE metric = {{m:String}} GROUP BY org_id"
        return {o: int(v) for o, v in store.rows(sql, {"m": metric})}

    return read("usage_points"), read(schema.HOURLY_TABLE)


def evict(stack, n: int = 1) -> None:
    """Other requests, acknowledged, until the dedup's only place holds one of them."""
    stack.collector.recent.max_entries = 1
    for i in range(n):
        post(stack, sum_request({"adv28.filler": [point(1, {"org.id": "org-filler", "i": str(i)})]}))


def test_a_resent_request_with_folded_points_counts_once_after_its_digest_was_evicted(stack_factory):
    """--series-per-org-metric 1: the request's second attribute set is folded into the overflow series,
    which point identity never checks. Before the dedup was bounded, these bytes re-sent within the
    15-minute window were answered 200 and not stored again; once their digest was evicted the folded
    point was stored again: 11 where 7 was sent. A folded point keeps its own set's fingerprint in
    ``series_id`` and is checked by point identity (collector/series.py)."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv28.fold", time.time_ns() - 30 * SEC
    req = sum_request(
        {
            metric: [
                point(3, {"org.id": ORG, "a": "1"}, t_ns=t, start_ns=t - SEC),
                point(4, {"org.id": ORG, "a": "2"}, t_ns=t, start_ns=t - SEC),
            ]
        }
    )
    post(stack, req)
    assert raw_and_rollup(stack, metric) == ({ORG: 7}, {ORG: 7})
    evict(stack)
    post(stack, req)  # the client's retry of an answer it lost
    assert raw_and_rollup(stack, metric) == ({ORG: 7}, {ORG: 7})


def test_a_resent_cumulative_request_counts_once_after_its_digest_was_evicted(stack):
    """Cumulative sums are not checked by identity: the conversion counts the same point again as 0."""
    metric, t0 = "adv28.cumulative", time.time_ns() - 60 * SEC

    def req(values: list[int]):
        pts = [point(v, {"org.id": ORG}, t_ns=t0 + (i + 1) * SEC, start_ns=t0) for i, v in enumerate(values)]
        return sum_request({metric: pts}, temporality=CUMULATIVE)

    first = req([5, 9])
    post(stack, first)
    post(stack, req([5, 9, 20]))
    evict(stack)
    post(stack, first)
    assert raw_and_rollup(stack, metric) == ({ORG: 20}, {ORG: 20})


def test_a_resent_gauge_counts_once_after_its_digest_was_evicted(stack):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key="service.name").value.string_value = "svc"
    m = rm.scope_metrics.add().metrics.add()
    m.name = "adv28.gauge"
    t = time.time_ns() - 20 * SEC
    for i in range(3):
        dp = m.gauge.data_points.add(time_unix_nano=t + i * SEC, as_int=7)
        dp.attributes.add(key="org.id").value.string_value = ORG
    post(stack, req)
    evict(stack)
    post(stack, req)
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    n = store.scalar(f"SELECT count() FROM {store.database}.usage_points WHERE metric = 'adv28.gauge'")
    assert int(n) == 3


def test_requests_with_folded_histograms_are_never_refused_and_count_once_after_eviction(stack_factory):
    """Folded distribution points were not checked by point identity, so the digest of a request holding
    some was pinned for the window, and past half the dedup's entries such requests were answered 503
    (retry in 5 s) for as long as their org stayed over the limit. A folded point now keeps its own set's
    fingerprint and is checked: requests with folded histograms are taken however many, and a re-sent
    copy whose digest was evicted counts once."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv28.fold.room", time.time_ns() - 30 * SEC

    def folding(v: int):  # a=1 admitted (the one series), a=<v> folded
        return histogram_request(
            [(1, {"org.id": ORG, "a": "1"}), (v, {"org.id": ORG, "a": str(v)})], metric, t + v
        )

    for v in (2, 3, 4):
        post(stack, folding(v))  # each 200
    evict(stack, 3)
    post(stack, folding(2))  # the client's retry of an answer it lost, its digest gone
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    sql = f"SELECT sum(count) FROM {store.database}.distribution_points WHERE metric = {{m:String}}"
    assert int(store.scalar(sql, {"m": metric})) == 3 + 2 + 3 + 4
