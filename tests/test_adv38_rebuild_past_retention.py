"""Adversary 38: ``rollup rebuild`` of a month that the raw-retention TTL has partly dropped deletes the
only usage left of it (the hourly rollup), and customers' usage for those days reads 0.

Claims: README (Configuration) "``--raw-retention-days``: Days raw points are kept (a ClickHouse TTL) ...
The hourly rollup is kept", and (Reading usage) "a range starting before that is read from the rollup";
README (reconciliation) "a raw-retention TTL shorter than the reconciled months shows as drift" and the
remedy of drift is ``meterhouse rollup rebuild``; docs/runbooks.md: "nothing is lost, and the command is
safe at any hour"; brief: "ingest is only paused, never loses acknowledged points". The rebuild computes
the month from raw points only (``core/rollup.py``) and replaces the month's partition with that, so every
hour whose raw points the TTL already dropped loses its rollup rows too; it neither refuses nor keeps them.

What I did: an in-process stack with ``raw_retention_days`` set so that last month's 15th is the edge (23
days on 2026-12-08) and the TTL it sets (``schema.retention_ddl``); points of one org on last month's 3rd
(value 700, past retention) and 28th (value 25) over OTLP/HTTP; ``OPTIMIZE ... FINAL`` so the TTL has run;
then ``POST /api/v1/months/{last month}/rollup/rebuild`` with an admin token.
Measured: before the rebuild ``GET /orgs/org-1/usage`` for the month (read from the rollup) is 725 and the
rebuild reports ``drifting_orgs_before: 1``; it answers 200 with rows 2 -> 1, and usage is then 25: the 700
acknowledged units of the 3rd are gone from every table (the rollup was their only copy).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import requests
from api_stack import api, send
from conftest import drain

from meterhouse.core import schema
from meterhouse.core.config import Token

ADMIN = Token("admin-token-0123456789", ("*",), admin=True)


def ns(*a: int) -> int:
    return int(datetime(*a, tzinfo=UTC).timestamp()) * 10**9


def test_a_rebuild_keeps_the_rollup_of_hours_past_raw_retention(stack_factory):
    # Last month: its 15th is the retention's edge, so its 3rd is past retention and its 28th within it.
    today = datetime.now(UTC)
    y, m = (today.year, today.month - 1) if today.month > 1 else (today.year - 1, 12)
    days = (time.time_ns() - ns(y, m, 15)) // (86400 * 10**9)
    old, recent = ns(y, m, 3, 10), ns(y, m, 28, 10)
    stack = stack_factory(auth_tokens=(ADMIN,), raw_retention_days=days)
    store = stack.collector.endpoints.endpoints[0].store
    # What ``meterhouse up --raw-retention-days N`` sets up (Store.ensure_schema via schema.render); the
    # in-process stack's shared-engine store is opened without it.
    for statement in schema.retention_ddl(store.database, days):
        store.client.command(statement)
    send(stack, "api.calls", [("org-1", 700, old + 10**9), ("org-1", 25, recent + 10**9)])
    drain(stack)
    store.client.command(f"OPTIMIZE TABLE {store.database}.{schema.POINTS_TABLE} FINAL")
    raw = store.scalar(f"SELECT count() FROM {store.database}.{schema.POINTS_TABLE}")
    assert raw == 1, f"the TTL left {raw} raw points"
    nxt = f"{y + 1}-01" if m == 12 else f"{y}-{m + 1:02d}"
    month = {"from": f"{y}-{m:02d}-01T00:00:00Z", "to": f"{nxt}-01T00:00:00Z"}
    before = api(stack, "/orgs/org-1/usage", ADMIN, metric="api.calls", step="1d", **month).json()
    assert before["source"] == "rollup" and before["total"] == 725, before
    r = requests.post(f"http://127.0.0.1:{stack.http_port}/api/v1/months/{y}-{m:02d}/rollup/rebuild",
                      headers={"Authorization": f"Bearer {ADMIN.token}"}, timeout=120)  # fmt: skip
    assert r.status_code in (200, 409), r.text[:300]  # a refusal would keep the rollup: fine
    after = api(stack, "/orgs/org-1/usage", ADMIN, metric="api.calls", step="1d", **month).json()
    assert after["total"] == 725, (
        f"rebuild answered {r.status_code} {r.text[:300]}; usage now {after['total']}"
    )
