"""Adversary 31: the series limit's folded points against point identity.

A histogram the series limit folded is stored with the overflow set (``otel.metric.overflow=true``) and
is never checked itself, but it stays in the raw table as a row of that stream. An SDK's own overflow
series (its cardinality limit: the same attribute, a bool ``true``, stored as the text "true") is a
stream point identity does check; its point of the same interval, count and sum (one collection of one
SDK: one interval for all its series) was taken for a repeat of the folded row and dropped: acknowledged
usage lost. A folded distribution point now keeps its own set's fingerprint in ``series_id`` (as a folded
number point does), part of its identity: the two are told apart, and a folded point re-sent is a repeat.

Whole stacks in this process (real loopback sockets, the real embedded engine)."""

from __future__ import annotations

import time

from conftest import drain
from otlp_builders import histogram_request
from test_adv28_dedup_eviction import SEC, post

ORG = "org-adv31s"


def histogram_counts(stack, metric: str) -> dict[str, int]:
    drain(stack)
    store = stack.collector.endpoints.endpoints[0].store
    sql = (
        f"SELECT org_id, sum(count) FROM {store.database}.distribution_points "
        "WHERE metric = {m:String} GROUP BY org_id"
    )
    return {o: int(v) for o, v in store.rows(sql, {"m": metric})}


def test_an_sdk_overflow_histogram_is_not_dropped_as_a_repeat_of_a_point_the_limit_folded(stack_factory):
    """--series-per-org-metric 1. Request 1: histograms of a=1 (admitted) and a=2 (folded), 3
    observations each. Request 2, the next export of another SDK process: its own overflow series, 3
    observations over the same second. Three histograms, 9 observations (the third was dropped as a
    repeat of the folded a=2 row: 6)."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv31.overflow.hist", time.time_ns() - 30 * SEC
    post(
        stack, histogram_request([(3, {"org.id": ORG, "a": "1"}), (3, {"org.id": ORG, "a": "2"})], metric, t)
    )
    assert histogram_counts(stack, metric) == {ORG: 6}
    assert stack.metrics.series_folded._value.get() == 1
    post(stack, histogram_request([(3, {"org.id": ORG, "otel.metric.overflow": True})], metric, t))
    got = histogram_counts(stack, metric)
    assert got == {ORG: 9}, got


def test_a_folded_histogram_resent_inside_another_request_counts_once(stack_factory):
    """--series-per-org-metric 1. Request 1: histograms of a=1 (admitted) and a=2 (folded), 3
    observations each. A forwarder re-batches its queue: the same two points and a new one (a=3, folded
    too, 4 observations) in one request, another digest. The folded a=2 point is a repeat (its own
    set's fingerprint is stored with it) and a=3 is new usage: 10 observations, not 13."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv31.refold.hist", time.time_ns() - 30 * SEC
    first = [(3, {"org.id": ORG, "a": "1"}), (3, {"org.id": ORG, "a": "2"})]
    post(stack, histogram_request(first, metric, t))
    assert histogram_counts(stack, metric) == {ORG: 6}
    post(stack, histogram_request([*first, (4, {"org.id": ORG, "a": "3"})], metric, t))
    got = histogram_counts(stack, metric)
    assert got == {ORG: 10}, got
    assert stack.metrics.series_folded._value.get() == 3
