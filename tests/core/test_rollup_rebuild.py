"""``meterhouse rollup rebuild --month``: the remedy of MeterhouseReconciliationDrift, run as the runbook
says, through a running stack (its writer held meanwhile) and on a stopped data directory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import requests
from conftest import drain, free_port
from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import post

from meterhouse.core import schema
from meterhouse.core.close import Month
from meterhouse.core.config import Token
from meterhouse.core.timefmt import format_rfc3339

ADMIN = "admin-token-0123456789"
READER = "reader-token-0123456789"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meterhouse", *args], capture_output=True, text=True, timeout=600
    )


def sent(stack, metric: str, orgs: int, value: int) -> None:
    now = time.time_ns()
    post(stack, sum_request({metric: [point(value, {"org.id": f"org-{i}", "k": str(now)}, t_ns=now - 10**9 + i,
                                            start_ns=now - 2 * 10**9) for i in range(orgs)]}))  # fmt: skip


def drift(store, month: Month) -> int:
    rows = store.rows(
        schema.drift_summary_sql(store.database), {"from_ns": month.start_ns, "to_ns": month.end_ns}
    )
    return sum(int(n) for _m, n, *_ in rows)


def totals(store, table: str, month: Month) -> dict[str, int]:
    column = "time" if table == schema.POINTS_TABLE else "hour"
    rows = store.rows(f"SELECT org_id, toInt64(sum(value_int)) FROM {store.database}.{table} "
                      f"WHERE toYYYYMM({column}) = {month.key} GROUP BY org_id")  # fmt: skip
    return {o: int(v) for o, v in rows}


def test_a_rebuild_through_the_running_stack_mends_drift_while_usage_keeps_arriving(stack_factory):
    stack = stack_factory(auth_tokens=(Token(ADMIN, ("*",), admin=True), Token(READER, ("*",))))
    store = stack.collector.endpoints.endpoints[0].store
    month = Month.of_ns(time.time_ns())
    for value in (3, 5, 7):
        sent(stack, "rebuild.calls", 20, value)
    drain(stack)
    assert drift(store, month) == 0
    # Drift as the runbook names its causes: rows deleted from one rollup, a partition of the other gone.
    store.client.command(
        f"DELETE FROM {store.database}.{schema.HOURLY_TABLE} WHERE org_id IN ('org-1', 'org-2')"
    )
    store.client.command(
        f"ALTER TABLE {store.database}.{schema.METRIC_ORGS_TABLE} DROP PARTITION ID '{month.key}'"
    )
    assert drift(store, month) == 2

    stop = threading.Event()
    more = [0]

    def keep_sending() -> None:  # the same month's usage, while the rebuild runs
        while not stop.is_set():
            sent(stack, "rebuild.calls", 20, 1)
            more[0] += 1
            time.sleep(0.01)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(0.3)
        refused = cli("rollup", "rebuild", "--month", str(month), "--http-port", str(stack.http_port),
                      "--token", READER)  # fmt: skip
        assert refused.returncode == 3 and "admin token" in refused.stderr, refused.stderr
        r = cli(
            "rollup", "rebuild", "--month", str(month), "--http-port", str(stack.http_port), "--token", ADMIN
        )
        time.sleep(0.3)
    finally:
        stop.set()
        sender.join()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["month"] == str(month) and out["drifting_orgs_before"] == 2 and out["drifting_orgs_after"] == 0
    assert more[0] > 5, "no usage arrived during the rebuild"
    drain(stack)
    assert drift(store, month) == 0
    raw = totals(store, schema.POINTS_TABLE, month)
    assert raw == totals(store, schema.HOURLY_TABLE, month) == {f"org-{i}": 15 + more[0] for i in range(20)}
    by_metric = dict(store.rows(
        f"SELECT org_id, toInt64(sum(value_int)) FROM {store.database}.{schema.METRIC_ORGS_TABLE} "
        f"WHERE toYYYYMM(hour) = {month.key} GROUP BY org_id"))  # fmt: skip
    assert {o: int(v) for o, v in by_metric.items()} == raw
    # What customers read: the API over whole hours (the rollup) equals the raw points.
    hour = 3600 * 10**9
    start, end = (time.time_ns() // hour - 2) * hour, (time.time_ns() // hour + 1) * hour
    usage = requests.get(
        f"http://127.0.0.1:{stack.http_port}/api/v1/orgs/org-1/usage", timeout=30,
        params={"metric": "rebuild.calls", "from": format_rfc3339(start), "to": format_rfc3339(end)},
        headers={"Authorization": f"Bearer {READER}"},
    ).json()  # fmt: skip
    assert usage["source"] == "rollup" and usage["total"] == raw["org-1"], usage


def test_a_rebuild_of_an_unknown_or_bad_month_is_refused_clearly(stack_factory):
    stack = stack_factory(auth_tokens=(Token(ADMIN, ("*",), admin=True),))
    bad = cli(
        "rollup", "rebuild", "--month", "2026-13", "--http-port", str(stack.http_port), "--token", ADMIN
    )
    assert bad.returncode == 2 and "YYYY-MM" in bad.stderr
    empty = cli(
        "rollup", "rebuild", "--month", "1999-01", "--http-port", str(stack.http_port), "--token", ADMIN
    )
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["tables"][schema.HOURLY_TABLE]["points_after"] == 0


def test_a_rebuild_on_a_stopped_data_directory(up_factory, tmp_path):
    """``--direct`` on a data directory no server holds: the lock is taken, and the month rebuilt."""
    up = up_factory()
    now = time.time_ns()
    body = sum_request({"direct.calls": [point(4, {"org.id": f"org-{i}"}, t_ns=now - 10**9 + i,
                                               start_ns=now - 2 * 10**9) for i in range(5)]})  # fmt: skip
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    assert r.status_code == 200
    up.drain(60)
    data_dir = up.data_dir
    month = Month.of_ns(now)
    busy = cli("rollup", "rebuild", "--month", str(month), "--direct", "--data-dir", str(data_dir),
               "--http-port", str(free_port()))  # fmt: skip
    assert busy.returncode != 0 and "in use" in busy.stderr, busy.stderr  # the server holds the directory
    up.stop()
    done = cli("rollup", "rebuild", "--month", str(month), "--direct", "--data-dir", str(data_dir),
               "--http-port", str(free_port()))  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["tables"][schema.HOURLY_TABLE]["points_after"] == 5 and out["drifting_orgs_after"] == 0


def test_a_month_past_raw_retention_is_refused_and_its_rollup_kept(stack_factory):
    """The rollup of a month whose raw points the retention dropped is the only copy of its usage: the
    rebuild refuses (409), whatever the process was configured with (the engine's TTL says)."""
    stack = stack_factory(auth_tokens=(Token(ADMIN, ("*",), admin=True),))
    store = stack.collector.endpoints.endpoints[0].store
    for statement in schema.retention_ddl(store.database, 30):
        store.client.command(statement)
    old = Month.of_ns(time.time_ns())
    for _ in range(3):
        old = old.previous()
    store.client.command(
        f"INSERT INTO {store.database}.{schema.HOURLY_TABLE} (org_id, metric, hour, attributes_hash, unit, "
        f"value_int, value_double, points, batch_seq) VALUES ('org-1', 'm', {old.start_ns // 10**9}, 1, '', 9, 0, 1, 0)"
    )
    r = cli("rollup", "rebuild", "--month", str(old), "--http-port", str(stack.http_port), "--token", ADMIN)
    assert r.returncode == 3 and "past the raw points' retention" in r.stderr, r.stderr
    assert totals(store, schema.HOURLY_TABLE, old) == {"org-1": 9}
