"""Adversary 38 (held): a rebuilt month's rollup rows carry the same attribute-set hashes and series counts
as the views wrote, so ``group_by`` over the rollup and later inserts into the same hours still agree.

Claim: after ``rollup rebuild`` "the month's hourly rollups equal the raw points exactly", computed "with
the views' own grouping" (core/rollup.py), while usage keeps arriving. The views hash the ingest block's
key/value arrays (``Map(String, String)``); the rebuild hashes the raw table's
``Map(LowCardinality(String), String)``: if the two hashes differed, a rebuilt month would lose its
``group_by`` names (the rollup is joined to attribute_sets by hash) and split/double series counts.

What I did: points with several attributes (unicode, commas, quotes, JSON-ish values, an empty value)
for 3 orgs; the rollup rows (org, metric, hour, hash, value, points) and per-hour series counts read;
``POST /months/{m}/rollup/rebuild``; the same read again, then the same series sent again into the same
hours and ``group_by`` read from the rollup and from raw points.
"""

from __future__ import annotations

import time

import requests
from api_stack import api
from conftest import drain
from otlp_builders import point, sum_request

from meterhouse.core import schema
from meterhouse.core.close import Month
from meterhouse.core.config import Token
from meterhouse.core.timefmt import format_rfc3339

ADMIN = Token("admin-token-0123456789", ("*",), admin=True)
H = 3600 * 10**9
ATTRS = [{"region": "eu", "tier": "gold"}, {"region": "ünï,\"cødé\"", "z": ""},
         {"region": "us", "a.b": "[1,2]", "tier": "x\ny"}, {}]  # fmt: skip


def post(stack, pts) -> None:
    body = sum_request({"h.calls": pts}).SerializeToString()
    r = requests.post(f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics", data=body,
                      headers={"Content-Type": "application/x-protobuf"}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text


def test_rebuilt_rows_keep_the_views_hashes_and_series(stack_factory):
    stack = stack_factory(auth_tokens=(ADMIN,))
    store = stack.collector.endpoints.endpoints[0].store
    db = store.database
    hour = (time.time_ns() // H - 1) * H
    month = Month.of_ns(hour)

    def send(k: int) -> None:
        post(stack, [point(10 + i, {"org.id": f"o{o}", **a}, t_ns=hour + k * 10**9 + i,
                           start_ns=hour + k * 10**9 - 10**8)
                     for o in range(3) for i, a in enumerate(ATTRS)])  # fmt: skip
        drain(stack)

    def rollup_rows():
        return sorted(store.rows(
            f"SELECT org_id, metric, hour, attributes_hash, toString(sum(value_int)), sum(points) "
            f"FROM {db}.{schema.HOURLY_TABLE} GROUP BY org_id, metric, hour, attributes_hash"))  # fmt: skip

    def series():
        return sorted(
            store.rows(
                f"SELECT org_id, uniqExactMerge(series) FROM {db}.{schema.METRIC_ORGS_TABLE} GROUP BY org_id"
            )
        )

    send(1)
    rows, ser = rollup_rows(), series()
    r = requests.post(f"http://127.0.0.1:{stack.http_port}/api/v1/months/{month}/rollup/rebuild",
                      headers={"Authorization": f"Bearer {ADMIN.token}"}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert rollup_rows() == rows
    assert series() == ser == [(f"o{o}", len(ATTRS)) for o in range(3)]
    send(2)  # the same series again, through the views, into the rebuilt hour
    assert series() == ser
    assert len(rollup_rows()) == len(rows)
    rng = {"from": format_rfc3339(hour), "to": format_rfc3339(hour + H)}
    by_rollup = api(stack, "/orgs/o1/usage", ADMIN, metric="h.calls", group_by="region", **rng).json()
    by_raw = api(stack, "/orgs/o1/usage", ADMIN, metric="h.calls", group_by="region",
                 **{**rng, "to": format_rfc3339(hour + H - 10**9)}).json()  # fmt: skip
    assert by_rollup["source"] == "rollup" and by_raw["source"] == "raw"
    assert (
        {g["value"]: g["total"] for g in by_rollup["groups"]}
        == {g["value"]: g["total"] for g in by_raw["groups"]}
        == {"eu": 20, 'ünï,"cødé"': 22, "us": 24, "": 26}
    )
