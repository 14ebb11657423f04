"""Requests inside every bound whose insert still needs more than the engine's memory share. The writer
used to retry MEMORY_LIMIT_EXCEEDED for ever, every later group (honest usage) waiting behind it. Now a
group of several records that fails for memory, none of it landed, is grouped afresh in halves
(``Writer._halve``), and a retry inserts through one view at a time (``Store.insert_in_doubt``), so what
fits alone is written, exactly once."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from otlp_builders import point, sum_request
from test_group_over_engine_memory import assert_honest_usage_written

from meterhouse.demo import fetch_usage

PROTOBUF = {"Content-Type": "application/x-protobuf"}


def stored_total(up, org: str, metric: str) -> float:
    now = int(time.time())
    return fetch_usage(up.api, org, metric, now // 3600 * 3600 - 7200, (now // 3600 + 2) * 3600, "1h")[
        "total"
    ]


def distinct_keys_request(points: int, attributes: int, first: int = 0) -> bytes:
    """Points whose attribute keys are all distinct (``<point>.<j>``, points numbered from ``first``) and
    whose values are empty."""
    pts = [
        point(1, {"org.id": "org-attack", **{f"{i}.{j}": "" for j in range(attributes)}})
        for i in range(first, first + points)
    ]
    return sum_request({"attack.keys": pts}).SerializeToString()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_distinct_attribute_keys_do_not_stall_honest_usage(up):
    """The attribute-cardinality rollup groups by (metric, hour, key) and keeps two uniqExact states per
    group (distinct values, and distinct orgs in the orgs view): 2,000 points of 126 distinct keys with
    empty values are 252,000 groups. A 3.8 MB body, 2 MiB as stored (the bound is 21 MiB), counted 40 MiB
    by the decode budget: inside every bound, acknowledged 200, and its insert fails MEMORY_LIMIT_EXCEEDED
    ("would use 260.79 MiB ... maximum: 256.00 MiB ... while pushing to view
    attribute_cardinality_hourly_mv") when all views are fed at once; one at a time, it fits."""
    attack = distinct_keys_request(2000, 126)
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=attack, headers=PROTOBUF, timeout=60)
    assert r.status_code in (200, 413), (r.status_code, r.content[:300])
    assert_honest_usage_written(up)
    if r.status_code == 200:
        assert stored_total(up, "org-attack", "attack.keys") == 2000


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_group_of_small_requests_does_not_stall_honest_usage(up_factory):
    """The same through the writer's grouping: 10 requests of 250 such points (440 kB each, an eighth of
    the request that fails alone, each insertable alone) sent at once are grouped into one insert,
    which fails MEMORY_LIMIT_EXCEEDED (more than the 256 MiB share): it is written in smaller groups, each
    point once (giving the records back to the queue once counted them twice: 8,750 points stored of the
    4,000 of 16 such requests). The bound on an insert's distinct attribute keys keeps such records apart
    (``tests/test_adv28_halve_kill.py``); taken away here, so that the fallback for what no bound foresaw
    is what is tested. On the embedded engine the attribute-cardinality views, which needed that memory,
    now read each (attribute set, hour) pair once, not every point: the group may fit whole, and then
    nothing is halved; either way each point counts once."""
    up = up_factory("--max-insert-attribute-keys", str(10**9))
    attacks = [distinct_keys_request(250, 126, first=k * 250) for k in range(10)]

    def send(body: bytes) -> int:
        return requests.post(
            f"{up.otlp_http}/v1/metrics", data=body, headers=PROTOBUF, timeout=60
        ).status_code

    with ThreadPoolExecutor(10) as pool:
        assert set(pool.map(send, attacks)) == {200}
    assert_honest_usage_written(up)
    assert stored_total(up, "org-attack", "attack.keys") == 2500
    halved = re.search(
        r"\nmeterhouse_groups_halved_total (\S+)", requests.get(f"{up.api}/metrics", timeout=10).text
    )
    assert halved and float(halved.group(1)) >= 0


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_many_long_orgs_do_not_stall_honest_usage(up):
    """3,000 points each of its own 4,096-character org (the attribute bound allows it), no other
    attribute: a 12.4 MB body, 12 MiB as stored (the bound is 21 MiB), acknowledged 200. Its insert
    failed MEMORY_LIMIT_EXCEEDED ("would use 258.53 MiB ... while pushing to view usage_points_mv") on
    every retry: every view groups or sorts by the org, and the views' blocks were held together."""
    pts = [point(1, {"org.id": str(i).rjust(4096, "o")}) for i in range(3000)]
    attack = sum_request({"attack.orgs": pts}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=attack, headers=PROTOBUF, timeout=60)
    assert r.status_code in (200, 413), (r.status_code, r.content[:300])
    assert_honest_usage_written(up)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_many_long_metric_names_do_not_stall_honest_usage(up):
    """15,000 metrics of distinct 1,024-character names (the name bound), one point each: a 16 MB body,
    16 MiB as stored (the bound is 21 MiB), acknowledged 200; its insert fails MEMORY_LIMIT_EXCEEDED
    ("would use 259.63 MiB ... while pushing to view usage_points_mv", measured on the engine alone) when
    all views are fed at once."""
    attack = sum_request(
        {str(i).rjust(1024, "m"): [point(1, {"org.id": "org-attack"})] for i in range(15_000)}
    ).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=attack, headers=PROTOBUF, timeout=60)
    assert r.status_code in (200, 413), (r.status_code, r.content[:300])
    assert_honest_usage_written(up)
