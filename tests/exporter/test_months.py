"""The month API over a real embedded ClickHouse: close (admin, 409, force, idempotent), statements as
JSON and CSV with pages and scopes, adjustments, an org's statements, and exact totals above 2^63."""

import csv
import io
import time

import pytest
from prometheus_client import CollectorRegistry
from usage_rows import put

from meterhouse.core.close import Month
from meterhouse.core.config import Token, load_config
from meterhouse.exporter import create_app

ADMIN = "admin-token-0123456789"
READER = "reader-token-0123456789"
SCOPED = "scoped-token-0123456789"
BIG = 2**63 - 1


def month_ago(n: int) -> Month:
    m = Month.of_ns(time.time_ns())
    for _ in range(n):
        m = m.previous()
    return m


M = month_ago(3)


@pytest.fixture
def client(store):
    put(store, [{"org_id": f"org-{i}", "metric": metric, "time": M.start_ns + i * 10**9, "value_int": i + 1}
                for i in range(5) for metric in ("calls", "rows")])  # fmt: skip
    put(
        store,
        [
            {"org_id": "org-big", "metric": "calls", "time": M.start_ns + k, "value_int": BIG}
            for k in range(3)
        ],
    )
    tokens = (Token(ADMIN, ("*",), admin=True), Token(READER, ("*",)), Token(SCOPED, ("org-1", "org-2")))
    app = create_app(store, CollectorRegistry(), lambda: True, tokens=tokens)
    return app.test_client()


def call(client, method, path, token=ADMIN, **kw):
    return client.open(
        path, method=method, headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw
    )


def test_closing_needs_an_admin_token_and_is_idempotent(client):
    url = f"/api/v1/months/{M}/close"
    for token in (READER, SCOPED):
        r = call(client, "POST", url, token)
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    assert call(client, "GET", url).status_code == 404
    first = call(client, "POST", url)
    assert first.status_code == 200, first.get_json()
    body = first.get_json()
    assert body["status"] == "done" and body["reconciled"] and body["orgs"] == 6 and body["lines"] == 11
    assert body["total"] == 2 * sum(range(1, 6)) + 3 * BIG and body["rollup"]["total"] == body["total"]
    again = call(client, "POST", url + "?force=true")
    assert again.get_json() == body  # the same close, unchanged
    assert call(client, "GET", url, READER).get_json() == body


def test_inside_the_late_window_is_409_without_force(client):
    recent = month_ago(0)
    r = call(client, "POST", f"/api/v1/months/{recent}/close?force=true")
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "month_not_ended"
    last = month_ago(1)
    if last.end_ns + 35 * 86400 * 10**9 > time.time_ns():  # the previous month is still in its window
        r = call(client, "POST", f"/api/v1/months/{last}/close")
        assert r.status_code == 409 and r.get_json()["error"]["code"] == "late_window"
        r = call(client, "POST", f"/api/v1/months/{last}/close?force=true")
        assert r.status_code == 200 and r.get_json()["forced"] is True
    assert call(client, "POST", "/api/v1/months/2026-13/close").status_code == 400


def test_statements_json_csv_pages_and_scopes(client):
    assert call(client, "GET", f"/api/v1/months/{M}/statements").status_code == 404  # not closed yet
    call(client, "POST", f"/api/v1/months/{M}/close")
    body = call(client, "GET", f"/api/v1/months/{M}/statements", READER).get_json()
    lines = body["statements"]
    assert len(lines) == 11 and body["next_offset"] is None and body["close"]["status"] == "done"
    big = next(x for x in lines if x["org_id"] == "org-big")
    assert (
        big["total"] == 3 * BIG
        and big["total_int"] == str(3 * BIG)
        and big["points"] == 3
        and big["reconciled"]
    )
    assert (
        big["first_point"]
        == f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(M.start_ns // 10**9))}.000000000Z"
    )
    assert big["last_point"].endswith(".000000002Z")
    assert {"org_id", "metric", "unit", "total", "points"} <= set(lines[0])
    page1 = call(client, "GET", f"/api/v1/months/{M}/statements?limit=4").get_json()
    assert page1["next_offset"] == 4 and len(page1["statements"]) == 4
    rest, offset = [], 4
    while offset is not None:
        page = call(client, "GET", f"/api/v1/months/{M}/statements?limit=4&offset={offset}").get_json()
        rest += page["statements"]
        offset = page["next_offset"]
    assert page1["statements"] + rest == lines
    r = call(client, "GET", f"/api/v1/months/{M}/statements", READER, headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.content_type.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert len(rows) == 11 and next(x for x in rows if x["org_id"] == "org-big")["total"] == str(3 * BIG)
    scoped = call(client, "GET", f"/api/v1/months/{M}/statements", SCOPED).get_json()["statements"]
    assert sorted({x["org_id"] for x in scoped}) == ["org-1", "org-2"]
    org = call(client, "GET", "/api/v1/orgs/org-1/statements", SCOPED).get_json()["statements"]
    assert [(x["month"], x["metric"], x["total"]) for x in org] == [(str(M), "calls", 2), (str(M), "rows", 2)]
    assert call(client, "GET", "/api/v1/orgs/org-3/statements", SCOPED).status_code == 403


def test_adjustments_list_what_arrived_after_the_close(client, store):
    assert call(client, "GET", f"/api/v1/months/{M}/adjustments").status_code == 404
    call(client, "POST", f"/api/v1/months/{M}/close")
    put(store, [{"org_id": "org-1", "metric": "calls", "time": M.end_ns - 1, "value_int": 40}])
    put(store, [{"org_id": "org-3", "metric": "calls", "time": M.start_ns, "value_int": 9}])
    body = call(client, "GET", f"/api/v1/months/{M}/adjustments").get_json()
    assert sorted((a["org_id"], a["amount"], a["points"]) for a in body["adjustments"]) == [
        ("org-1", 40, 1), ("org-3", 9, 1)]  # fmt: skip
    scoped = call(client, "GET", f"/api/v1/months/{M}/adjustments", SCOPED).get_json()["adjustments"]
    assert [a["org_id"] for a in scoped] == ["org-1"]
    # the statement did not move
    lines = call(client, "GET", f"/api/v1/months/{M}/statements").get_json()["statements"]
    assert next(x for x in lines if x["org_id"] == "org-1" and x["metric"] == "calls")["total"] == 2
    r = call(client, "GET", f"/api/v1/months/{M}/adjustments", headers={"Accept": "text/csv"})
    assert r.get_data(as_text=True).splitlines()[0].startswith("month,org_id,metric,unit,amount")


def test_admin_tokens_come_from_the_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"auth:\n  tokens:\n    - {{token: {ADMIN}, orgs: ['*'], admin: true}}\n"
                 f"    - {{token: {READER}, orgs: ['*']}}\n")  # fmt: skip
    tokens = load_config(config_file=f, env={}).auth_tokens
    assert [(t.token, t.admin) for t in tokens] == [(ADMIN, True), (READER, False)]
