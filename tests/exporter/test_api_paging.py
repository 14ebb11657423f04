"""Paging over every org (``GET /api/v1/orgs`` with a cursor), unknown parameters and hostile cursors,
against a whole stack: usage sent over OTLP/HTTP, read over HTTP."""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import UTC, datetime

import pytest
from api_stack import SCOPED, TOKENS, WILD, api, send
from conftest import drain

T0 = int(datetime(2026, 3, 2, 10, tzinfo=UTC).timestamp()) * 10**9  # a whole hour
RANGE = {"from": "2026-03-02T10:00:00Z", "to": "2026-03-02T12:00:00Z"}


def org(i: int) -> str:
    return f"org-{i:05d}"


def fill(stack, n: int) -> dict[str, int]:
    """``n`` orgs, each with its own total (some equal, so that ties are broken by id), in large requests."""
    totals = {org(i): 1 + (i * 7919) % (n // 2 + 1) for i in range(n)}
    send(stack, "api.calls", [(o, v, T0 + 60 * 10**9) for o, v in totals.items()])
    drain(stack, 120)
    return totals


def pages(stack, between=None, token=WILD, **params) -> tuple[list[dict], int]:
    """Every page of a query, following next_cursor (the cursor alone); ``between(i)`` runs after page i."""
    body = api(stack, "/orgs", token, **params).json()
    out, n = list(body["orgs"]), 1
    while body["next_cursor"] is not None:
        if between is not None:
            between(n)
        r = api(stack, "/orgs", token, cursor=body["next_cursor"])
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        out += body["orgs"]
        n += 1
    return out, n


def check_every_org_once(stack, n: int, limit: int) -> None:
    totals = fill(stack, n)
    # By org id, while usage keeps arriving between pages: for orgs already read, orgs not yet read, and
    # orgs that did not exist when the paging began (before and after the cursor).
    rng = random.Random(7)
    late: list[str] = []

    def usage_arrives(page: int) -> None:
        new = [f"org-{rng.randrange(n):05d}-new{page}"]
        late.extend(new)
        # Each point at a time of its own: a repeat of a point (same series, time and value) is a retry.
        pts = [(org(rng.randrange(n)), 1000, T0 + 90 * 10**9 + page * 100 + k) for k in range(50)]
        pts += [(o, 5, T0) for o in new]
        send(stack, "api.calls", pts)
        for o, v, _t in pts:
            grown[o] = grown.get(o, 0) + v
        drain(stack, 60)

    grown = dict(totals)

    t = time.monotonic()
    got, count = pages(stack, usage_arrives, metric="api.calls", order="org", limit=limit, **RANGE)
    ids = [o["org_id"] for o in got]
    assert len(ids) == len(set(ids)), "an org came back twice"
    assert set(totals) <= set(ids), f"{len(set(totals) - set(ids))} orgs never came back"
    assert set(ids) - set(totals) <= set(late)
    assert ids == sorted(ids) and count == -(-len(ids) // limit)
    print(f"\n{n:,} orgs by id, {count} pages of {limit}, usage arriving between pages: "
          f"{time.monotonic() - t:.1f} s")  # fmt: skip

    # By total, with nothing arriving: each org once, in order, with the totals it has.
    for order in ("desc", "asc"):
        t = time.monotonic()
        # Raw points (a range off the whole hours) for one order, the hourly rollup for the other.
        to = "2026-03-02T10:59:59Z" if order == "asc" else "2026-03-02T11:00:00Z"
        got, count = pages(stack, None, metric="api.calls", order=order, limit=limit, to=to,
                           **{"from": RANGE["from"]})  # fmt: skip
        ids = [o["org_id"] for o in got]
        assert len(ids) == len(set(ids)) == len(grown) and {o["org_id"]: o["total"] for o in got} == grown
        keys = [(-o["total"] if order == "desc" else o["total"], o["org_id"]) for o in got]
        assert keys == sorted(keys)
        print(f"{n:,} orgs by total ({order}), {count} pages: {time.monotonic() - t:.1f} s")


def test_every_org_exactly_once_by_id_while_usage_arrives_and_by_total(stack_factory):
    check_every_org_once(stack_factory(auth_tokens=TOKENS), 3_000, 250)


@pytest.mark.soak
def test_every_one_of_100k_orgs_exactly_once(stack_factory):
    check_every_org_once(stack_factory(auth_tokens=TOKENS), 100_000, 1000)


@pytest.fixture
def small(stack_factory):
    s = stack_factory(auth_tokens=TOKENS)
    fill(s, 12)
    return s


def test_a_total_ranking_whose_totals_change_between_pages_is_409_not_a_wrong_page(small):
    first = api(small, "/orgs", metric="api.calls", limit=3, **RANGE).json()
    again = api(small, "/orgs", cursor=first["next_cursor"])
    assert again.status_code == 200 and len(again.json()["orgs"]) == 3  # nothing arrived: the next page
    send(small, "api.calls", [(org(11), 1, T0 + 61 * 10**9)])  # a late point inside the range
    drain(small)
    r = api(small, "/orgs", cursor=first["next_cursor"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "cursor_stale"
    # By id the same late point changes nothing about which orgs come next.
    first = api(small, "/orgs", metric="api.calls", order="org", limit=5, **RANGE).json()
    send(small, "api.calls", [(org(0), 1, T0 + 62 * 10**9), (org(9), 1, T0 + 62 * 10**9)])
    drain(small)
    nxt = api(small, "/orgs", cursor=first["next_cursor"]).json()
    assert [o["org_id"] for o in nxt["orgs"]] == [org(i) for i in range(5, 10)]


def test_an_org_scoped_token_pages_over_its_orgs_only(small):
    got, count = pages(small, None, token=SCOPED, metric="api.calls", order="org", limit=1, **RANGE)
    assert [o["org_id"] for o in got] == ["org-00002", "org-00005", "org-00007"] and count == 3
    got, _ = pages(small, None, token=SCOPED, metric="api.calls", limit=2, **RANGE)
    assert sorted(o["org_id"] for o in got) == ["org-00002", "org-00005", "org-00007"]
    # A cursor of the wildcard token's ranking is not the scoped token's.
    wild = api(small, "/orgs", metric="api.calls", order="org", limit=2, **RANGE).json()["next_cursor"]
    r = api(small, "/orgs", SCOPED, cursor=wild)
    assert r.status_code == 400 and r.json()["error"]["code"] == "cursor_mismatch"


def test_a_cursor_with_other_parameters_is_400_and_with_the_same_ones_continues(small):
    first = api(small, "/orgs", metric="api.calls", order="org", limit=4, **RANGE).json()
    c = first["next_cursor"]
    same = api(small, "/orgs", metric="api.calls", order="org", limit=4, cursor=c, **RANGE)
    alone = api(small, "/orgs", cursor=c)
    assert same.status_code == alone.status_code == 200 and same.json()["orgs"] == alone.json()["orgs"]
    assert [o["org_id"] for o in alone.json()["orgs"]] == [org(i) for i in range(4, 8)]
    for other in ({"metric": "other"}, {"order": "desc"}, {"limit": "5"}, {"from": "2026-03-02T09:00:00Z"},
                  {"to": "2026-03-02T13:00:00Z"}, {"status": "silent"}):  # fmt: skip
        r = api(small, "/orgs", cursor=c, **other)
        assert r.status_code == 400, (other, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] in ("cursor_mismatch", "invalid_cursor"), other


def forge(cursor: str, change) -> str:
    body = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    change(body)
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def test_garbled_and_forged_cursors_are_400_and_their_values_only_bound_parameters(small):
    by_id = api(small, "/orgs", metric="api.calls", order="org", limit=4, **RANGE).json()["next_cursor"]
    by_total = api(small, "/orgs", metric="api.calls", limit=4, **RANGE).json()["next_cursor"]
    garbled = ["x", "!!!!", by_id[:-7], by_id + "AAAA", "A" * 20_000, "é", base64.b64encode(b"[1,2]").decode(),
               base64.urlsafe_b64encode(b"\xff\xfe").decode(), base64.urlsafe_b64encode(b"[" * 5000).decode()]  # fmt: skip

    def set_(path, value):
        def change(body):
            target = body
            for p in path[:-1]:
                target = target[p]
            target[path[-1]] = value

        return change

    forged = [forge(by_id, f) for f in (
        set_(["v"], 2), set_(["q", "limit"], 10**9), set_(["q", "limit"], "4"), set_(["q", "order"], "sideways"),
        set_(["q", "from"], -1), set_(["q", "to"], 2**70), set_(["q", "metric"], 5), set_(["k"], []),
        set_(["k"], [1]), set_(["k"], ["a", "b"]), set_(["c"], -1), set_(["c"], True), set_(["q", "extra"], 1),
        set_(["q", "scope"], "*" * 2000), set_(["k"], ["x" * 5000]),
    )] + [forge(by_total, f) for f in (
        set_(["k"], ["NaN", "org"]), set_(["k"], [True, "org"]), set_(["k", 0], "1e309"),
    )]  # fmt: skip
    for bad in garbled + forged:
        r = api(small, "/orgs", cursor=bad)
        assert r.status_code == 400, (bad[:60], r.status_code, r.text[:200])
        assert r.json()["error"]["code"] in ("invalid_cursor", "cursor_mismatch", "invalid_parameter")
    # A well-formed cursor whose key is hostile text: a position among org ids, bound, never SQL.
    for key in ("org-00005'; DROP TABLE usage_hourly; --", "{after_org:String}", "\\", "org-00005"):
        r = api(small, "/orgs", cursor=forge(by_id, set_(["k"], [key])))
        assert r.status_code == 200
        assert [o["org_id"] for o in r.json()["orgs"]] == [org(i) for i in range(12) if org(i) > key][:4]
    r = api(small, "/orgs", cursor=forge(by_total, set_(["k"], [1e308, "'; --"])))
    assert r.status_code == 200 and len(r.json()["orgs"]) == 4  # every total is below it
    assert api(small, "/orgs/org-00001/usage", metric="api.calls", **RANGE).json()["total"] > 0  # intact


UNKNOWN = [
    ("/orgs", {"offset": "1000"}),
    ("/orgs", {"metric": "api.calls", "page": "2"}),
    ("/orgs", {"status": "silent", "offset": "5"}),
    ("/orgs/org-00001/usage", {"metric": "api.calls", "limit": "5"}),
    ("/orgs/org-00001/usage", {"metric": "api.calls", "Metric": "x"}),
    ("/metrics-catalog", {"metric": "api.calls"}),
    ("/openapi.json", {"v": "1"}),
    ("/usage/export", {"from": RANGE["from"], "to": RANGE["to"], "org": "org-00001"}),
    ("/months/2026-01/close", {"force": "true"}),
    ("/months/2026-01/statements", {"cursor": "x"}),
    ("/months/2026-01/adjustments", {"order": "asc"}),
    ("/orgs/org-00001/statements", {"metric": "api.calls"}),
]


@pytest.mark.parametrize(("path", "params"), UNKNOWN, ids=[f"{p}?{','.join(q)}" for p, q in UNKNOWN])
def test_an_unknown_parameter_is_400_naming_the_allowed_ones(small, path, params):
    r = api(small, path, **params)
    assert r.status_code == 400, r.text[:200]
    err = r.json()["error"]
    assert err["code"] == "unknown_parameter"
    unknown = list(params)[-1]  # each case's last parameter is the one the route does not take
    assert repr(unknown) in err["message"]
    expected = {"/orgs": "cursor, from, limit, metric, order, status, to", "/openapi.json": "no query parameters",
                "/usage/export": "format, from, metric, step, to", "/metrics-catalog": "no query parameters",
                "/orgs/org-00001/usage": "from, group_by, metric, step, to"}  # fmt: skip
    if path in expected:
        assert err["message"].endswith(expected[path])


def test_a_parameter_given_twice_is_400(small):
    r = api(small, "/orgs", metric=["api.calls", "other"])
    assert r.status_code == 400 and "more than once" in r.json()["error"]["message"]


def test_every_parameter_current_clients_send_is_still_taken(small):
    """What the README, the benchmarks and the tests send (each route's documented parameters)."""
    ok = [
        ("/orgs", {"metric": "api.calls", "limit": "20", "order": "asc", **RANGE}),
        ("/orgs", {"status": "silent", "limit": "5"}),
        ("/orgs/org-00001/usage", {"metric": "api.calls", "step": "1h", "group_by": "feature", **RANGE}),
        ("/metrics-catalog", {}),
        ("/openapi.json", {}),
    ]
    for path, params in ok:
        r = api(small, path, **params)
        assert r.status_code == 200, (path, r.text[:200])
    for path, params in (("/months/2026-01/statements", {"limit": "4", "offset": "4"}),
                         ("/months/2026-01/close", {"verify": "true"})):  # fmt: skip
        assert api(small, path, **params).json()["error"]["code"] == "not_closed"  # past the parameters


def test_status_lists_page_over_one_snapshot():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from meterhouse.exporter import create_app
    from meterhouse.exporter.health import Snapshot

    silent = [{"org_id": org(i), "last_seen": "2026-03-02T10:00:00Z"} for i in range(25)]
    health = SimpleNamespace(snapshot=Snapshot(computed_at=1000.0, silent=silent))
    client = create_app(None, CollectorRegistry(), lambda: True, health).test_client()
    got, body = [], client.get("/api/v1/orgs?status=silent&limit=10").get_json()
    got += body["orgs"]
    while body["next_cursor"]:
        body = client.get(f"/api/v1/orgs?cursor={body['next_cursor']}").get_json()
        got += body["orgs"]
    assert got == silent
    c = client.get("/api/v1/orgs?status=silent&limit=10").get_json()["next_cursor"]
    assert client.get(f"/api/v1/orgs?status=spiking&cursor={c}").status_code == 400
    assert client.get(f"/api/v1/orgs?metric=api.calls&cursor={c}").status_code == 400
    health.snapshot = Snapshot(computed_at=2000.0, silent=silent[5:])
    r = client.get(f"/api/v1/orgs?cursor={c}")
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "cursor_stale"
