"""The bulk export (``GET /api/v1/usage/export``) against a whole stack: usage sent over OTLP/HTTP, the
export's totals held to the per-org API's, for each step and format, and its bounds."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import defaultdict
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from api_stack import SCOPED, TOKENS, WILD, H, api, send
from conftest import drain
from prometheus_client import CollectorRegistry

from meterhouse.exporter import create_app

# Across a day and a month boundary (UTC): 2026-01-31 20:00 to 2026-02-01 04:00, and a point in March.
T0 = int(datetime(2026, 1, 31, 20, tzinfo=UTC).timestamp()) * 10**9
RANGE = {"from": "2026-01-31T18:00:00Z", "to": "2026-03-02T00:00:00Z"}
ORGS = [f"org-{i:05d}" for i in range(10)] + ["org-b", 'ünïcødé,"quoted" ✓']


@pytest.fixture
def stack(stack_factory):
    s = stack_factory(auth_tokens=TOKENS)
    calls, credits = [], []
    for i, org in enumerate(ORGS):
        for h in range(8):
            calls.append((org, (i + 1) * 1000 + h, T0 + h * H + 17 * 10**9 + i))
        calls.append((org, 2**62, T0 + 3 * H + 5))  # beyond 2^53: exact, as an integer
        credits.append((org, 0.25 * (i + 1), T0 + 5 * H + i))
    calls.append(("org-00003", 11, int(datetime(2026, 3, 1, 23, 59, tzinfo=UTC).timestamp()) * 10**9))
    calls.append(("org-00004", 99, int(datetime(2026, 3, 2, 0, tzinfo=UTC).timestamp()) * 10**9))  # past `to`
    send(s, "api.calls", calls)
    send(s, "credits", credits, unit="USD")
    drain(s)
    return s


def rows(r) -> list[dict]:
    assert r.status_code == 200, r.text[:300]
    if r.headers["Content-Type"].startswith("text/csv"):
        out = list(csv.DictReader(io.StringIO(r.text, newline="")))
        for row in out:  # CSV has no types: an integer is digits, a double has a point or an exponent
            v = row["value"]
            row["value"] = int(v) if v.lstrip("-").isdigit() else float(v)
        return out
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
@pytest.mark.parametrize("step", ["1h", "1d", "1mo"])
def test_export_totals_equal_the_per_org_api_for_each_step_and_format(stack, step, fmt):
    r = api(stack, "/usage/export", step=step, format=fmt, **RANGE)
    assert r.headers.get("Transfer-Encoding") == "chunked"  # streamed, not built whole
    got = rows(r)
    assert [list(row) for row in got[:1]] == [["org_id", "metric", "start", "value", "unit"]]
    keys = [(row["org_id"], row["metric"], row["start"]) for row in got]
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    totals: dict[tuple[str, str], int | float] = defaultdict(int)
    for row in got:
        totals[row["org_id"], row["metric"]] += row["value"]
        start = datetime.fromisoformat(row["start"].replace("Z", "+00:00"))
        assert row["start"].endswith("Z") and start.minute == start.second == 0
        if step != "1h":
            assert start.hour == 0 and (step == "1d" or start.day == 1)
        assert row["unit"] == ("USD" if row["metric"] == "credits" else "{call}")
    assert {o for o, _m in totals} == set(ORGS)
    for (org, metric), total in totals.items():
        per_org = api(stack, f"/orgs/{quote(org, safe='')}/usage", metric=metric, step="1h", **RANGE).json()
        assert per_org.get("source") == "rollup", per_org
        assert total == per_org["total"] and type(total) is type(per_org["total"]), (org, metric)
    if step == "1mo":
        march = [row for row in got if row["start"].startswith("2026-03")]
        assert [(row["org_id"], row["value"]) for row in march] == [("org-00003", 11)]


def test_one_metric_and_the_rows_of_each_step_sum_to_the_next(stack):
    by_step = {}
    for step in ("1h", "1d", "1mo"):
        got = rows(api(stack, "/usage/export", step=step, metric="api.calls", format="ndjson", **RANGE))
        assert {row["metric"] for row in got} == {"api.calls"}
        by_step[step] = got
    assert len(by_step["1h"]) > len(by_step["1d"]) >= len(by_step["1mo"])
    for finer, coarser, cut in (("1h", "1d", 10), ("1d", "1mo", 7)):
        sums: dict[tuple, int] = defaultdict(int)
        for row in by_step[finer]:
            start = row["start"][:cut] + ("T00:00:00Z" if cut == 10 else "-01T00:00:00Z")
            sums[row["org_id"], start] += row["value"]
        assert sums == {(row["org_id"], row["start"]): row["value"] for row in by_step[coarser]}


def test_an_org_scoped_token_exports_its_orgs_only(stack):
    for fmt in ("csv", "ndjson"):
        got = rows(api(stack, "/usage/export", SCOPED, format=fmt, **RANGE))
        assert {row["org_id"] for row in got} == {"org-00002", "org-00005", "org-00007", "org-b"}
    assert api(stack, "/usage/export", None, **RANGE).status_code == 401


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        ({"from": "2026-01-31T18:30:00Z", "to": RANGE["to"]}, 400, "whole hour"),
        ({"from": RANGE["from"], "to": "2026-03-02T00:00:01Z"}, 400, "whole hour"),
        ({"from": RANGE["from"], "to": "2026-03-02T05:00:00+05:30"}, 400, "whole hour"),
        ({"to": RANGE["to"]}, 400, "from"),
        ({"from": RANGE["from"]}, 400, "to"),
        ({**RANGE, "step": "1m"}, 400, "step"),
        ({**RANGE, "step": "1w"}, 400, "step"),
        ({**RANGE, "format": "parquet"}, 400, "format"),
        ({**RANGE, "metric": "api.call"}, 404, "api.calls"),
        ({**RANGE, "offset": "5"}, 400, "offset"),
        ({**RANGE, "metric": "x'; DROP TABLE usage_hourly; --"}, 404, "metric"),
    ],
)
def test_bad_input_is_a_clear_4xx(stack, params, status, needle):
    r = api(stack, "/usage/export", **params)
    assert r.status_code == status, r.text[:200]
    assert needle in r.json()["error"]["message"]


def test_an_inverted_range_is_empty_and_a_range_on_hours_of_another_zone_is_taken(stack):
    r = api(stack, "/usage/export", **{"from": RANGE["to"], "to": RANGE["from"]})
    assert r.status_code == 200 and r.text.splitlines() == ["org_id,metric,start,value,unit"]
    r = api(stack, "/usage/export", format="ndjson", **{"from": "2026-02-01T01:00:00+01:00",
                                                         "to": "2026-02-01T02:00:00+01:00"})  # fmt: skip
    assert {row["start"] for row in rows(r)} == {"2026-02-01T00:00:00Z"}


def test_an_unreachable_store_is_503():
    class Down:
        database = "x"

        def rows(self, sql, params):
            raise ConnectionError("no endpoint")

        def stream(self, sql, params, settings):
            raise ConnectionError("no endpoint")

        def ping(self):
            return False

    client = create_app(Down(), CollectorRegistry(), lambda: True).test_client()
    for query in ("", "&metric=api.calls"):
        r = client.get(f"/api/v1/usage/export?from={RANGE['from']}&to={RANGE['to']}{query}")
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "unavailable"


def test_clients_that_leave_mid_export_give_their_slot_back(stack):
    """Exports at once are bounded (MAX_EXPORTS); a client that reads a little and goes must not keep one."""
    import requests

    from meterhouse.exporter.export import MAX_EXPORTS

    url = f"http://127.0.0.1:{stack.http_port}/api/v1/usage/export"
    headers = {"Authorization": f"Bearer {WILD.token}"}
    for _ in range(MAX_EXPORTS * 3):
        with requests.get(url, params={**RANGE, "step": "1h"}, headers=headers, stream=True, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_content(64))
    deadline = time.monotonic() + 10
    while (r := api(stack, "/usage/export", **RANGE)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200
