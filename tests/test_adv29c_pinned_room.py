"""Adversary 29c: every request with a folded point pins its digest, also when all its folded points are
sums or gauges, which point identity now checks by their fingerprint (or cumulative sums, which the
conversion counts once): the pinned half of the dedup fills with digests it does not need, and past it an
honest sender is answered 503 (retry in 5 s) for ever while its org stays over the limit. At the default
1 GiB budget 42,949 pins per 15-minute window: 47.7 requests/s with a folded point (500 SDK pods exporting
every 10 s, their org over its limit); at the 10,000-entry floor 5.6/s. No request is pinned any more
(every folded point keeps its fingerprint and is checked); the histogram case is in
tests/test_adv28_dedup_eviction.py."""

from __future__ import annotations

import time

import requests
from otlp_builders import CUMULATIVE, point, sum_request
from test_adv28_dedup_eviction import ORG, SEC, raw_and_rollup


def status(stack, req) -> int:
    url = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    r = requests.post(url, data=req.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=30)  # fmt: skip
    return r.status_code


def test_requests_whose_folded_points_are_all_delta_sums_are_not_refused_for_pinned_room(stack_factory):
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv29c.pin.delta", time.time_ns() - 60 * SEC
    got = []
    for k in range(3):  # one export interval after another: a=1 admitted, a=2 folded every time
        tk = t + k * 10 * SEC
        got.append(status(stack, sum_request({metric: [
            point(1, {"org.id": ORG, "a": "1"}, t_ns=tk, start_ns=tk - 10 * SEC),
            point(5, {"org.id": ORG, "a": "2"}, t_ns=tk, start_ns=tk - 10 * SEC)]})))  # fmt: skip
    assert got == [200, 200, 200]
    assert raw_and_rollup(stack, metric) == ({ORG: 18}, {ORG: 18})


def test_requests_whose_folded_points_are_all_cumulative_are_not_refused_for_pinned_room(stack_factory):
    stack = stack_factory(series_per_org_metric=1)
    metric, t0 = "adv29c.pin.cumulative", time.time_ns() - 60 * SEC
    got = []
    for k in range(3):
        tk = t0 + (k + 1) * 10 * SEC
        got.append(status(stack, sum_request({metric: [
            point(1 * (k + 1), {"org.id": ORG, "a": "1"}, t_ns=tk, start_ns=t0),
            point(5 * (k + 1), {"org.id": ORG, "a": "2"}, t_ns=tk, start_ns=t0)]},
            temporality=CUMULATIVE)))  # fmt: skip
    assert got == [200, 200, 200]
    assert raw_and_rollup(stack, metric) == ({ORG: 18}, {ORG: 18})
