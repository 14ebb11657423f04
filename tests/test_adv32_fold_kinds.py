"""Adversary 32: folded distribution points of every kind against point identity, this version only.

Exponential histograms, summaries, cumulative histograms: folded by ``--series-per-org-metric``, re-sent
re-batched into other requests (another digest), after the dedup lost the digest, and against an SDK's
own overflow series of the same interval, count and sum. Whole stacks in this process (loopback, the real
embedded engine)."""

from __future__ import annotations

import time

import pytest
from conftest import drain
from otlp_builders import CUMULATIVE, DELTA, kv, sum_request
from test_adv28_dedup_eviction import SEC, post

ORG = "org-adv32k"


def dist_request(kind: str, points, metric: str, t_ns: int, temporality=DELTA, start_ns: int | None = None):
    """One metric of ``kind`` ("histogram", "exp", "summary"): per (count, attrs) a point over
    [start, t] with ``count`` observations and sum ``count``."""
    req = sum_request({})
    m = req.resource_metrics[0].scope_metrics[0].metrics.add(name=metric, unit="ms")
    start = t_ns - SEC if start_ns is None else start_ns
    for count, attrs in points:
        if kind == "histogram":
            m.histogram.aggregation_temporality = temporality
            dp = m.histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=t_ns)
            dp.count, dp.sum = count, float(count)
            dp.bucket_counts.extend([count, 0])
            dp.explicit_bounds.append(100.0)
        elif kind == "exp":
            m.exponential_histogram.aggregation_temporality = temporality
            dp = m.exponential_histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=t_ns)
            dp.count, dp.sum, dp.scale = count, float(count), 0
            dp.positive.offset = 0
            dp.positive.bucket_counts.append(count)
        else:
            dp = m.summary.data_points.add(start_time_unix_nano=start, time_unix_nano=t_ns)
            dp.count, dp.sum = count, float(count)
            q = dp.quantile_values.add()
            q.quantile, q.value = 0.5, 1.0
        for k, v in attrs.items():
            dp.attributes.append(kv(k, v))
    return req


def counts(stack, metric: str) -> int:
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    sql = f"SELECT sum(count) FROM {store.database}.distribution_points WHERE metric = {{m:String}}"
    return int(store.scalar(sql, {"m": metric}) or 0)


KINDS = ["histogram", "exp", "summary"]


@pytest.mark.parametrize("kind", KINDS)
def test_folded_points_resent_rebatched_count_once(stack_factory, kind):
    """Limit 1. Request 1: a=1 (1, admitted), a=2 (2, folded), a=3 (4, folded). A forwarder re-sends a=3
    and a=2 in the other order with a new a=4 (8, folded), then request 1 again with a new a=5 (16).
    Sent: 1+2+4+8+16 = 31."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = f"adv32.kinds.{kind}", time.time_ns() - 30 * SEC
    a = {i: {"org.id": ORG, "a": str(i)} for i in range(1, 6)}
    post(stack, dist_request(kind, [(1, a[1]), (2, a[2]), (4, a[3])], metric, t))
    assert counts(stack, metric) == 7
    post(stack, dist_request(kind, [(4, a[3]), (2, a[2]), (8, a[4])], metric, t))
    post(stack, dist_request(kind, [(1, a[1]), (2, a[2]), (4, a[3]), (16, a[5])], metric, t))
    assert counts(stack, metric) == 31


@pytest.mark.parametrize("kind", KINDS)
def test_an_sdk_overflow_point_is_not_a_repeat_of_folded_ones(stack_factory, kind):
    """Limit 1. a=1 (3, admitted), a=2 (3, folded), a=3 (3, folded) over one second; then an SDK's own
    overflow series (3) for the same second, twice over: re-sent exactly (the dedup answers it) and
    re-batched with nothing new (identity drops it). Sent: 12."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = f"adv32.sdkover.{kind}", time.time_ns() - 30 * SEC
    post(stack, dist_request(kind, [(3, {"org.id": ORG, "a": "1"}), (3, {"org.id": ORG, "a": "2"}),
                                    (3, {"org.id": ORG, "a": "3"})], metric, t))  # fmt: skip
    over = dist_request(kind, [(3, {"org.id": ORG, "otel.metric.overflow": True})], metric, t)
    post(stack, over)
    post(stack, over)
    post(stack, dist_request(kind, [(3, {"otel.metric.overflow": "true", "org.id": ORG})], metric, t))
    assert counts(stack, metric) == 12


def test_a_folded_cumulative_histogram_resent_counts_once(stack_factory):
    """Cumulative histograms are stored as sent (no conversion). Limit 1: a=1 admitted; a=2 folded, its
    points over [s, t1] (2) and [s, t2] (5); each re-sent re-batched with another point (a=1's copy; a=3,
    3, folded). Sent: 1 + 2 + 5 + 3."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv32.cumhist", time.time_ns() - 60 * SEC
    s = t - 10 * SEC
    a1, a2 = {"org.id": ORG, "a": "1"}, {"org.id": ORG, "a": "2"}
    post(stack, dist_request("histogram", [(1, a1), (2, a2)], metric, t, CUMULATIVE, s))
    post(stack, dist_request("histogram", [(5, a2)], metric, t + SEC, CUMULATIVE, s))
    post(stack, dist_request("histogram", [(2, a2), (1, a1)], metric, t, CUMULATIVE, s))
    post(
        stack,
        dist_request("histogram", [(5, a2), (3, {"org.id": ORG, "a": "3"})], metric, t + SEC, CUMULATIVE, s),
    )
    assert counts(stack, metric) == 11
