"""The month routes against hostile callers: an org-scoped token learns nothing of other orgs (not even
the month's totals over all orgs), and malformed months and pages are a clear 400, never a 500."""

import time

import pytest
from prometheus_client import CollectorRegistry
from usage_rows import Crash, crash_when_done, put

from meterhouse.core.close import Month
from meterhouse.core.config import Token
from meterhouse.exporter import create_app

ADMIN = "admin-token-0123456789"
SCOPED = "scoped-token-0123456789"
M = Month.of_ns(time.time_ns()).previous().previous().previous()


@pytest.fixture
def client(store):
    put(store, [{"org_id": f"org-{i}", "metric": metric, "time": M.start_ns + i, "value_int": 1000 * i + 1}
                for i in range(5) for metric in ("calls", "rows")])  # fmt: skip
    tokens = (Token(ADMIN, ("*",), admin=True), Token(SCOPED, ("org-1", "org-9")))
    app = create_app(store, CollectorRegistry(), lambda: True, tokens=tokens)
    c = app.test_client()
    assert call(c, "POST", f"/api/v1/months/{M}/close").status_code == 200
    return c


def call(client, method, path, token=ADMIN, **kw):
    return client.open(path, method=method, headers={"Authorization": f"Bearer {token}"}, **kw)


def test_a_scoped_token_sees_the_close_of_its_own_orgs_only(client):
    whole = call(client, "GET", f"/api/v1/months/{M}/close").get_json()
    assert (whole["orgs"], whole["lines"], whole["points"], whole["total"]) == (5, 10, 10, 2 * 10005)
    own = {"orgs": 1, "lines": 2, "points": 2, "total": 2 * 1001}
    for path in (f"/api/v1/months/{M}/close", f"/api/v1/months/{M}/statements",
                 f"/api/v1/months/{M}/adjustments"):  # fmt: skip
        body = call(client, "GET", path, SCOPED).get_json()
        record = body.get("close", body)
        assert {k: record[k] for k in own} == own, path
        assert record["rollup"] == {"total": 2 * 1001, "points": 2} and record["reconciled"], path
        assert record["close_id"] == whole["close_id"] and record["status"] == "done"
    # An admin's view of the same close is unchanged.
    assert call(client, "GET", f"/api/v1/months/{M}/statements").get_json()["close"] == whole


@pytest.mark.parametrize(
    "query", ["limit=²", "offset=²", "limit=١٠", "offset=" + "9" * 5000, "offset=-0", "limit=1e3"]
)
def test_bad_pages_are_400(client, query):
    for path in (f"/api/v1/months/{M}/statements", f"/api/v1/months/{M}/adjustments",
                 "/api/v1/orgs/org-1/statements"):  # fmt: skip
        r = call(client, "GET", f"{path}?{query}")
        assert r.status_code == 400, (path, query, r.get_json())
        assert r.get_json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize(
    "month", ["٢٠٢٦-٠١", "2026-01%0A", "2026-1", "2026-13", "1969-12", "2026-01-01", "+2026-01"]
)
def test_malformed_months_are_400(client, month):
    for method, path in (("GET", f"/api/v1/months/{month}/statements"), ("GET", f"/api/v1/months/{month}/close"),
                         ("POST", f"/api/v1/months/{month}/close")):  # fmt: skip
        r = call(client, method, path)
        assert r.status_code == 400, (method, path, r.get_json())


def test_verify_lists_edited_lines_within_the_token_scope(client, store):
    from meterhouse.core import schema

    url = f"/api/v1/months/{M}/close?verify=true"
    assert call(client, "GET", url).get_json()["verification"] == {"verified": True, "mismatches": []}
    for org in ("org-1", "org-3"):  # two lines rewritten after the close
        row = list(store.rows(f"SELECT * FROM {store.database}.{schema.STATEMENTS_TABLE} "
                              f"WHERE org_id = '{org}' AND metric = 'calls'")[0])  # fmt: skip
        row[schema.STATEMENT_COLUMN_NAMES.index("total_int")] = 0
        store.insert_rows(schema.STATEMENTS_TABLE, [[v] for v in row], schema.STATEMENT_COLUMN_NAMES,
                          schema.STATEMENT_COLUMN_TYPES, f"edit-{org}")  # fmt: skip
    found = call(client, "GET", url).get_json()["verification"]
    assert not found["verified"]
    assert [(x["org_id"], x["statement_total"], x["raw_total"]) for x in found["mismatches"]] == [
        ("org-1", 0, 1001), ("org-3", 0, 3001)]  # fmt: skip
    scoped = call(client, "GET", url, SCOPED).get_json()["verification"]
    assert [x["org_id"] for x in scoped["mismatches"]] == ["org-1"]
    assert call(client, "GET", f"/api/v1/months/{M}/close?verify=yes").status_code == 400


def test_a_running_close_shows_its_progress_to_unscoped_tokens_only(client, store):
    import threading

    from meterhouse.core import close

    month = M.previous()
    put(store, [{"org_id": f"p-{i:02d}", "time": month.start_ns + i, "value_int": 1} for i in range(30)])
    put(store, [{"org_id": "org-1", "time": month.start_ns, "value_int": 4}])
    started, release = threading.Event(), threading.Event()

    def hold(p):
        if p.done > 0:
            started.set()
            release.wait(30)

    worker = threading.Thread(target=lambda: close.close_month(store, month, late_window_days=35,
                                                               batch_orgs=5, progress=hold))  # fmt: skip
    worker.start()
    try:
        assert started.wait(30)
        admin = call(client, "GET", f"/api/v1/months/{month}/close").get_json()
        assert admin["status"] == "running" and admin["progress"]["total"] == 31
        scoped = call(client, "GET", f"/api/v1/months/{month}/close", SCOPED).get_json()
        assert scoped["status"] == "running" and "progress" not in scoped  # how many orgs: not its to know
        assert scoped["orgs"] <= 1
    finally:
        release.set()
        worker.join(60)
    done = call(client, "GET", f"/api/v1/months/{month}/close", SCOPED).get_json()
    assert (done["status"], done["orgs"], done["total"]) == ("done", 1, 4)


def test_an_orgs_statements_list_finished_closes_only(client, store):
    from meterhouse.core import close

    month = M.previous()
    put(store, [{"org_id": f"org-{i}", "metric": "calls", "time": month.start_ns + i, "value_int": 50 + i}
                for i in range(6)])  # fmt: skip

    with pytest.raises(Crash):  # a close killed half-way: lines written, the month not closed
        close.close_month(store, month, late_window_days=35, batch_orgs=2, progress=crash_when_done(2))
    assert call(client, "GET", f"/api/v1/months/{month}/statements").status_code == 404
    body = call(client, "GET", "/api/v1/orgs/org-1/statements", SCOPED).get_json()
    assert [x["month"] for x in body["statements"]] == [str(M), str(M)]  # not the unfinished month
    close.close_month(store, month, late_window_days=35, batch_orgs=2)
    body = call(client, "GET", "/api/v1/orgs/org-1/statements", SCOPED).get_json()
    assert [(x["month"], x["metric"], x["total"]) for x in body["statements"]] == [
        (str(M), "calls", 1001),
        (str(M), "rows", 1001),
        (str(month), "calls", 51),
    ]  # newest month first
