"""Rankings, group-by, the metrics catalog, and hostile input through the API (never a 500)."""

import time

import pytest
from prometheus_client import CollectorRegistry
from usage_rows import put

from meterhouse.exporter import OrgHealth, create_app

H = 3600 * 10**9


@pytest.fixture
def client(store):
    t = (time.time_ns() // H - 2) * H + 60 * 10**9
    put(store, [
        {"org_id": "big", "time": t, "value_int": 500, "attrs": {"feature": "search", "region": "eu"}},
        {"org_id": "big", "time": t + 10**9, "value_int": 300, "attrs": {"feature": "export", "region": "eu"}},
        {"org_id": "big", "time": t + H, "value_int": 200, "attrs": {"feature": "search", "region": "us"}},
        {"org_id": "mid", "time": t, "value_int": 400},
        {"org_id": "small", "time": t, "value_int": 1},
        {"org_id": "big", "metric": "temp", "kind": "gauge", "unit": "Cel", "time": t, "value_int": 0,
         "value_double": 20.5, "is_int": 0},
    ])  # fmt: skip
    registry = CollectorRegistry()
    return create_app(store, registry, lambda: True, OrgHealth(store, registry)).test_client()


def test_ranking_largest_first_with_limit_and_order(client):
    body = client.get("/api/v1/orgs?metric=api.calls").get_json()
    assert [(o["org_id"], o["total"]) for o in body["orgs"]] == [("big", 1000), ("mid", 400), ("small", 1)]
    assert body["source"] == "rollup"
    asc = client.get("/api/v1/orgs?metric=api.calls&order=asc&limit=2").get_json()["orgs"]
    assert [o["org_id"] for o in asc] == ["small", "mid"]


def test_group_by_an_attribute(client):
    body = client.get("/api/v1/orgs/big/usage?metric=api.calls&group_by=feature").get_json()
    assert body["total"] == 1000 and body["group_by"] == "feature"
    assert {g["value"]: g["total"] for g in body["groups"]} == {"export": 300, "search": 700}
    raw = client.get("/api/v1/orgs/big/usage?metric=api.calls&group_by=region&step=1m").get_json()
    assert raw["source"] == "raw" and {g["value"]: g["total"] for g in raw["groups"]} == {
        "eu": 800,
        "us": 200,
    }
    missing = client.get("/api/v1/orgs/big/usage?metric=api.calls&group_by=nope").get_json()
    assert [(g["value"], g["total"]) for g in missing["groups"]] == [("", 1000)]


def test_metrics_catalog(client):
    metrics = client.get("/api/v1/metrics-catalog").get_json()["metrics"]
    assert [(m["metric"], m["kind"], m["unit"], m["points"]) for m in metrics] == [
        ("api.calls", "sum", "{call}", 5),
        ("temp", "gauge", "Cel", 1),
    ]


@pytest.mark.parametrize("status,field", [("silent", "orgs"), ("spiking", "orgs")])
def test_status_lists_answer_before_any_refresh(client, status, field):
    body = client.get(f"/api/v1/orgs?status={status}").get_json()
    assert body[field] == [] and body["computed_at"] is None


HOSTILE = [
    "o'; DROP TABLE usage_points; --",
    'a"b',
    "back\\slash\\",
    "{org:String}",
    "%s%s%s",
    "' OR 1=1 --",
    "ünïcødé ☃ 𝄞",
    "\u202eright-to-left",
    "null",
    "../../etc/passwd",
    "x" * 10_240,
    "\t\n",
    "1e309",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_are_empty_results_or_4xx_never_500(client, value):
    from urllib.parse import quote

    for path in (
        f"/api/v1/orgs/{quote(value, safe='')}/usage?metric=api.calls",
        f"/api/v1/orgs/big/usage?metric={quote(value, safe='')}",
        f"/api/v1/orgs/big/usage?metric=api.calls&group_by={quote(value, safe='')}",
        f"/api/v1/orgs?metric={quote(value, safe='')}",
        f"/api/v1/orgs?metric=api.calls&order={quote(value, safe='')}",
        f"/api/v1/orgs?status={quote(value, safe='')}",
        f"/api/v1/orgs/big/usage?metric=api.calls&from={quote(value, safe='')}",
        f"/api/v1/orgs?metric=api.calls&limit={quote(value, safe='')}",
    ):
        r = client.get(path)
        assert r.status_code in (200, 400, 404), (path[:80], r.status_code, r.get_data()[:200])
        body = r.get_json()
        if r.status_code == 200:
            assert body.get("total", 0) in (0, 1000) or body.get("orgs") == [] or "groups" in body
        else:
            assert body["error"]["message"]
    assert client.get("/api/v1/orgs/big/usage?metric=api.calls").get_json()["total"] == 1000  # tables intact


@pytest.mark.parametrize("value", ["²", "١٢", "𝟗", "1e3", "+5", " 5", "9" * 40])
def test_numeric_query_parameters_are_ascii_digits_only(client, value):
    from urllib.parse import quote

    """'²'.isdigit() is true and int('²') raises: every such value is a 400, never a 500."""
    r = client.get(f"/api/v1/orgs?metric=api.calls&limit={quote(value, safe='')}")
    assert r.status_code == 400, (value, r.status_code)
    assert "limit" in r.get_json()["error"]["message"]
