"""Adversarial cases against point identity (README "Delivery guarantees": a point counts once by its
stream and interval; another stream, or another interval of the same stream, counts).

Each test is a real in-process stack (HTTP receiver, spool, writer, embedded ClickHouse) and asserts
what a correct single count is. Each failed on the first version of point identity.

One case found then stays a stated limit (README, "Delivery guarantees"): a point the series limit
folded, re-sent after the operator raised the limit, is admitted under its own attributes and counts
again, since what is stored of its first copy no longer carries them; matching it to a folded row by
everything but its attributes would drop real usage of other streams with the same interval and value."""

from __future__ import annotations

import time

import pytest
from otlp_builders import CUMULATIVE, point, sum_request
from test_identity import ORG, SEC, post, raw_and_rollup, request


def test_two_points_whose_start_is_after_their_time_both_count(stack):
    """Two different points of one stream: (start t+1s, time t) worth 10 and (start t+2s, time t) worth
    20. The decoder repairs a start after the time to the time ("usage kept exactly"), which gives both
    the identity (t, t): the second is dropped as a repeat and its 20 is lost. Stored 10, should be 30."""
    metric = "adv.latestart"
    t = time.time_ns() - 60 * SEC
    post(stack, request(metric, [point(10, {"org.id": ORG}, t_ns=t, start_ns=t + SEC)]))
    post(stack, request(metric, [point(20, {"org.id": ORG}, t_ns=t, start_ns=t + 2 * SEC)]))
    assert raw_and_rollup(stack, metric) == ({ORG: 30}, {ORG: 30})


@pytest.mark.parametrize(
    "attrs",
    [
        # The OpenTelemetry SDKs' own overflow series (their cardinality limit): the org on the resource.
        {"otel.metric.overflow": True},
        # Any value, as long as the key sorts first among the point's attributes.
        {"otel.metric.overflow": "false", "region": "eu"},
    ],
    ids=["sdk-overflow-series", "overflow-false"],
)
def test_a_point_carrying_the_overflow_attribute_is_still_checked(stack, attrs):
    """No --series-per-org-metric, so meterhouse folds nothing; but a point whose first attribute key is
    ``otel.metric.overflow`` is taken for a folded one (``_never_verified`` looks at the key only) and
    never checked: the same 4 points re-batched (2 of them again, other bytes) count 60, not 40."""
    metric = "adv.overflowkey." + str(len(attrs))
    base = time.time_ns() - 60 * SEC
    pts = [point(10, attrs, t_ns=base + (i + 1) * SEC, start_ns=base + i * SEC) for i in range(4)]
    resource = {"org.id": ORG, "service.name": "svc"}
    post(stack, sum_request({metric: pts}, resource=resource))
    post(stack, sum_request({metric: pts[:2]}, resource=resource))  # re-batched by a forwarder
    assert raw_and_rollup(stack, metric) == ({ORG: 40}, {ORG: 40})


@pytest.mark.parametrize(
    ("typed", "text"), [(1, "1"), (True, "true"), (1.5, "1.5")], ids=["int", "bool", "double"]
)
def test_attribute_values_of_other_types_are_other_streams(stack, typed, text):
    """Two pods report one interval of ``tier``-attributed usage, one as an int (or bool, double)
    attribute, the other as a string: two streams to OpenTelemetry (an attribute's value is typed). Both
    become the text "1" in the identity, so the second is dropped as a repeat: stored 10, should be 30."""
    metric = f"adv.types.{type(typed).__name__}"
    t = time.time_ns() - 60 * SEC
    post(stack, request(metric, [point(10, {"org.id": ORG, "tier": typed}, t_ns=t, start_ns=t - SEC)]))
    post(stack, request(metric, [point(20, {"org.id": ORG, "tier": text}, t_ns=t, start_ns=t - SEC)]))
    assert raw_and_rollup(stack, metric) == ({ORG: 30}, {ORG: 30})


@pytest.mark.parametrize("differs", ["scope_version", "unit"])
def test_cumulative_series_that_differ_in_scope_version_or_unit_are_two_series(stack, differs):
    """Two cumulative counters of one metric that differ only in their scope's version (two library
    versions side by side) or their unit: two streams by the README's definition. The cumulative
    series id (decode.series_id) leaves both out, so the second counter's first point (100, same start
    and time) reads as the first's point sent again and counts 0: stored 100, should be 200."""
    metric = f"adv.cum.{differs}"
    t = time.time_ns() - 60 * SEC

    def req(variant: int):
        r = sum_request(
            {metric: [point(100, {"org.id": ORG}, t_ns=t, start_ns=t - 10 * SEC)]},
            temporality=CUMULATIVE,
            unit="By" if differs != "unit" or variant == 0 else "KiBy",
        )
        if differs == "scope_version" and variant:
            r.resource_metrics[0].scope_metrics[0].scope.version = "2.0"
        return r

    post(stack, req(0))
    post(stack, req(1))
    assert raw_and_rollup(stack, metric) == ({ORG: 200}, {ORG: 200})


class _CountingRows:
    """The writer's store, counting the rows its identity check reads back."""

    def __init__(self, store) -> None:
        self._store, self.read, self.seconds = store, 0, 0.0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def rows(self, sql, parameters=None):
        started = time.perf_counter()
        rows = self._store.rows(sql, parameters)
        self.seconds += time.perf_counter() - started
        self.read += len(rows)
        return rows


def test_checking_one_re_sent_point_costs_per_point_not_per_stored_stream(stack):
    """An SDK exports all its series with one timestamp. An org with 20,000 series sends one export;
    a gateway then retries ONE of those points. The writer's check selects by org, metric and time
    only, so it reads back all 20,000 rows of that export (measured with 100,000 series: 2 s of writer
    time for one re-sent point; 30 re-sent points of one series across 30 exports of 20,000 series:
    9.4 s, while every other org's usage waits). The README promises a cost "per stream rather than
    per point"; here it is per stored row of the org at that time."""
    metric = "adv.cost"
    t = time.time_ns() - 120 * SEC
    pts = [point(1, {"org.id": ORG, "series": str(i)}, t_ns=t, start_ns=t - 60 * SEC) for i in range(20_000)]
    post(stack, request(metric, pts))
    assert raw_and_rollup(stack, metric)[0] == {ORG: 20_000}
    counting = _CountingRows(stack.collector.writer.verifier.store)
    stack.collector.writer.verifier.store = counting
    post(stack, request(metric, pts[:1]))  # one point, re-sent
    assert raw_and_rollup(stack, metric)[0] == {ORG: 20_000}
    assert counting.read <= 100, (
        f"to check 1 re-sent point the writer read {counting.read} stored rows ({counting.seconds:.2f} s)"
    )
