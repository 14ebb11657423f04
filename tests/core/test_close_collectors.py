"""Several collectors writing one ClickHouse (a server, or the cluster profile behind a load balancer): each
publishes how far it has committed; a close waits for every live collector to pass the time it was asked
for, and its record names any collector that did not within the timeout."""

from __future__ import annotations

import threading
import time

import requests
from otlp_builders import point, sum_request
from usage_rows import put

from meterhouse.collector.commits import CommitPublisher
from meterhouse.core import close, commits, schema
from meterhouse.core.close import Month

M = Month.of_ns(time.time_ns()).previous().previous().previous()


def now_ms(store) -> int:
    return int(store.scalar(commits.NOW_MS_SQL))


def test_a_close_waits_for_live_collectors_and_names_those_that_did_not_answer(store):
    t = now_ms(store)
    commits.publish(store, "behind", t - 5000, t)  # live, not yet past the close's start
    commits.publish(store, "silent", t - 600_000, t - 120_000)  # silent for two minutes: not waited for
    commits.publish(store, "ahead", t + 1000, t)
    since = now_ms(store)

    def catch_up() -> None:
        time.sleep(0.6)
        commits.publish(store, "behind", now_ms(store), now_ms(store))

    threading.Thread(target=catch_up).start()
    started = time.monotonic()
    assert commits.wait_for_collectors(store, since, timeout_s=30) == ["silent"]
    assert 0.5 < time.monotonic() - started < 20  # waited for "behind", not for "silent"
    # One that never catches up is waited for as long as the timeout, then named (and so is "ahead",
    # which is not ahead of this later start).
    later = max(now_ms(store), t + 1000) + 1000
    commits.publish(store, "stuck", later - 1, now_ms(store))
    started = time.monotonic()
    assert commits.wait_for_collectors(store, later, timeout_s=1.0, exclude={"behind"}) == [
        "ahead", "silent", "stuck"]  # fmt: skip
    assert time.monotonic() - started >= 1.0


def test_the_collectors_that_did_not_answer_are_named_in_the_close_s_record(store):
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 3}])
    record = close.close_month(store, M, late_window_days=35, wait_committed=lambda: ["collector-2"])
    assert record.unconfirmed == ["collector-2"] and record.done
    assert close.get_close(store, M) == record  # stored, in the final record as in the start record
    assert store.scalar(
        f"SELECT groupUniqArrayArray(unconfirmed) FROM {store.database}.{schema.CLOSES_TABLE}"
    ) == ["collector-2"]


def test_a_close_on_one_collector_holds_what_another_acknowledged_just_before(stack_factory):
    """Two collectors on one database; the close is asked of the first right after the second
    acknowledged a point that its writer (flushing every second) has not committed yet."""
    first = stack_factory(flush_interval_s=0.05)
    second = stack_factory(database=first.config.database, flush_interval_s=1.0)
    for stack, name in ((first, "first"), (second, "second")):
        stack.name = name
        stack.publisher = CommitPublisher(stack.collector.spool, stack.collector.endpoints, name, 0.1)
        stack.publisher.start()
    reader = first.store
    deadline = time.monotonic() + 30
    while {c for c, *_ in commits.collectors(reader, now_ms(reader))} != {"first", "second"}:
        assert time.monotonic() < deadline, "the collectors did not publish"
        time.sleep(0.05)
    body = sum_request({"calls": [point(7, {"org.id": "org-b"}, t_ns=M.start_ns + 5, start_ns=M.start_ns)]})
    r = requests.post(f"http://127.0.0.1:{second.collector.http.port}/v1/metrics", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    assert r.status_code == 200
    assert second.collector.spool.pending_points == 1  # acknowledged, not committed
    record = close.close_month(reader, M, late_window_days=35, wait_committed=first.wait_committed)
    assert record.unconfirmed == [] and (record.orgs, record.total_int) == (1, 7)
    # The second one stops publishing: the next close names it (and waits no longer than the timeout).
    second.publisher.shutdown(2)
    first.close_wait_s = 1.0
    body = sum_request({"calls": [point(9, {"org.id": "org-b"}, t_ns=M.end_ns + 5, start_ns=M.end_ns)]})
    r = requests.post(f"http://127.0.0.1:{second.collector.http.port}/v1/metrics", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    following = close.close_month(reader, Month.of_ns(M.end_ns), late_window_days=35, force=True,
                                  wait_committed=first.wait_committed)  # fmt: skip
    assert following.unconfirmed == ["second"]


def test_the_close_records_of_a_database_of_the_version_before_get_the_column_at_start(store):
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 3}])
    record = close.close_month(store, M, late_window_days=35)
    store.client.command(f"ALTER TABLE {store.database}.{schema.CLOSES_TABLE} DROP COLUMN unconfirmed")
    store.ensure_schema()
    assert close.get_close(store, M) == record
