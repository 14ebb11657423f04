"""Adversary 29b: points folded by the series limit count twice when they come again in another request.

With ``--series-per-org-metric`` set, a point past the limit is folded into the overflow series, which
point identity cannot check (``collector/identity.py`` skips folded points); only the request-level
dedup recognises them, and only as the same bytes (the pinned digest). A Collector's queue re-batching
(what ``tests/rebatch_proxy.py`` does, and what ``tests/test_rebatch.py`` says a point survives: "A
point counts once by its identity, whatever request brings it") sends the same points in another
grouping, with another digest: the folded point was stored again (13 where 8 were sent). A folded number
point now keeps its own set's fingerprint in ``series_id``, part of its identity (``collector/series.py``,
``fold_fingerprint``). Whole stacks in this process, as ``tests/test_adv28_dedup_eviction.py`` runs them
(no eviction needed here: the digest differs).
"""

from __future__ import annotations

import time

from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import ORG, SEC, post, raw_and_rollup


def test_a_folded_point_regrouped_into_another_request_counts_once(stack_factory):
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv29b.fold.regroup", time.time_ns() - 30 * SEC
    a1 = point(1, {"org.id": ORG, "a": "1"}, t_ns=t, start_ns=t - SEC)  # admitted (the one series)
    a2 = point(5, {"org.id": ORG, "a": "2"}, t_ns=t, start_ns=t - SEC)  # folded
    a3 = point(2, {"org.id": ORG, "a": "3"}, t_ns=t, start_ns=t - SEC)  # folded
    post(stack, sum_request({metric: [a1, a2]}))  # its answer lost on the way back
    # The forwarder sends what it does not know was taken again, grouped with a point that came later.
    post(stack, sum_request({metric: [a2, a3]}))
    assert raw_and_rollup(stack, metric) == ({ORG: 1 + 5 + 2}, {ORG: 1 + 5 + 2})


def test_an_admitted_point_regrouped_into_another_request_counts_once(stack_factory):
    """The control: the same re-grouping without the series limit is held by point identity."""
    stack = stack_factory()
    metric, t = "adv29b.nofold.regroup", time.time_ns() - 30 * SEC
    a1 = point(1, {"org.id": ORG, "a": "1"}, t_ns=t, start_ns=t - SEC)
    a2 = point(5, {"org.id": ORG, "a": "2"}, t_ns=t, start_ns=t - SEC)
    a3 = point(2, {"org.id": ORG, "a": "3"}, t_ns=t, start_ns=t - SEC)
    post(stack, sum_request({metric: [a1, a2]}))
    post(stack, sum_request({metric: [a2, a3]}))
    assert raw_and_rollup(stack, metric) == ({ORG: 1 + 5 + 2}, {ORG: 1 + 5 + 2})


def test_two_streams_folded_with_the_same_interval_and_value_both_count(stack_factory):
    """The fingerprint keeps folded streams apart: two series folded into the overflow series with the
    same interval and value (an SDK stamps every point of one export with one time) are two points, and
    each counts once when re-batched again."""
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv29b.fold.twins", time.time_ns() - 30 * SEC
    a1 = point(1, {"org.id": ORG, "a": "1"}, t_ns=t, start_ns=t - SEC)
    a2 = point(5, {"org.id": ORG, "a": "2"}, t_ns=t, start_ns=t - SEC)
    a3 = point(5, {"org.id": ORG, "a": "3"}, t_ns=t, start_ns=t - SEC)
    post(stack, sum_request({metric: [a1, a2, a3]}))
    post(stack, sum_request({metric: [a3]}))
    post(stack, sum_request({metric: [a2, a1]}))
    assert raw_and_rollup(stack, metric) == ({ORG: 11}, {ORG: 11})
