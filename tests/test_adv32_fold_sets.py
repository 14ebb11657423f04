"""Adversary 32: distinct attribute sets folded with identical interval, count and sum, whose encodings
would meet if joined naively (separators, quotes, a key's text inside a value, empty strings), each a
separate stream by its fingerprint; and folded sums and histograms of one metric name re-sent together
re-batched after the dedup lost the digest. Whole stacks in this process."""

from __future__ import annotations

import time

from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import SEC, evict, post
from test_adv32_fold_kinds import counts, dist_request

from meterhouse.collector.series import fold_fingerprint

ORG = "org-adv32c"
TRICKY = [
    {"a": "x", "b": "y"},
    {"a": "x', 'b", "": "y"},
    {"a": "x,b=y"},
    {"a,b": "x,y"},
    {"a": "x\x00b\x00y"},
    {"a": "('x',)"},
    {"a": ""},
    {"": "a"},
    {"a": "x\\', 'y"},
]


def test_tricky_sets_have_distinct_fingerprints_and_count_apart(stack_factory):
    fps = {fold_fingerprint(sorted(s), [s[k] for k in sorted(s)]) for s in TRICKY}
    assert len(fps) == len(TRICKY)
    stack = stack_factory(series_per_org_metric=1)
    metric, t = "adv32.tricky", time.time_ns() - 30 * SEC
    post(stack, dist_request("histogram", [(3, {"org.id": ORG, "z": "admitted"})], metric, t))
    for s in TRICKY:  # one request each, the same second, count and sum: all folded
        post(stack, dist_request("histogram", [(3, {"org.id": ORG, **s})], metric, t))
    assert counts(stack, metric) == 3 * (1 + len(TRICKY))
    # and every one re-sent in one request, in reverse order: nothing new
    post(stack, dist_request("histogram", [(3, {"org.id": ORG, **s}) for s in reversed(TRICKY)], metric, t))
    assert counts(stack, metric) == 3 * (1 + len(TRICKY))


def test_folded_sums_and_histograms_resent_together_after_eviction(stack_factory):
    """Limit 1 per (org, metric). Histogram h and sum c: each a=1 admitted, a=2 and a=3 folded. Then the
    dedup holds one digest (others pushed it out) and a forwarder re-sends all six points in one request
    with a new folded point of each (a=4). Sent: histogram 1+2+4+8, sum 10+20+40+80."""
    stack = stack_factory(series_per_org_metric=1)
    h, c, t = "adv32.mixed.h", "adv32.mixed.c", time.time_ns() - 30 * SEC
    sets = [{"org.id": ORG, "a": str(i)} for i in range(1, 5)]

    def request(n):
        req = dist_request("histogram", [(2**i, sets[i]) for i in range(n)], h, t)
        pts = [point(10 * 2**i, sets[i], t_ns=t) for i in range(n)]
        req.resource_metrics[0].scope_metrics[0].metrics.extend(
            sum_request({c: pts}).resource_metrics[0].scope_metrics[0].metrics
        )
        return req

    post(stack, request(3))
    evict(stack, 3)
    post(stack, request(4))
    assert counts(stack, h) == 15
    store = stack.collector.endpoints.endpoints[0].store
    got = int(store.scalar(f"SELECT sum(value_int) FROM {store.database}.usage_points WHERE metric = '{c}'"))
    assert got == 150
