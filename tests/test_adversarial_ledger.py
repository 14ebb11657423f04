"""Adversarial tests of the ledger: the monthly close, dry runs, and how insert failures are classified
(what goes to the dead letters and what is retried for as long as it takes)."""

import time

import pytest
from usage_rows import put

from meterhouse.collector.writer import classify, failure_cause
from meterhouse.core import close, schema
from meterhouse.core.close import Month

M = Month.of_ns(time.time_ns()).previous().previous().previous()  # late window over


def _count(store, table: str) -> int:
    return int(store.scalar(f"SELECT count() FROM {store.database}.{table}"))


@pytest.mark.parametrize(
    "message",
    [
        # A refusal of the content (not a file error, code not generic) whose text quotes the refused
        # data: an attribute value that happens to read like a disk or a timeout.
        "Code: 36. DB::Exception: Unknown element 'No space left on device' for enum. (BAD_ARGUMENTS)",
        "Code: 36. DB::Exception: Unknown element 'request timed out' for enum. (BAD_ARGUMENTS)",
    ],
)
def test_a_refusal_whose_data_reads_like_server_trouble_is_not_retried_forever(message):
    """README: disk_full is 'Code 243; ENOSPC / "No space left on device" in a file error', and the text
    is read only for 'a generic code (or none)'. Code 36 is neither generic nor a file error, yet the
    quoted data decides: the batch is 'transient', retried for as long as it takes, never dead-lettered,
    and the writer (one group at a time) is stuck behind it forever."""
    e = Exception(message)
    assert failure_cause(e) == "other", failure_cause(e)
    assert classify(e) == "retryable"


def test_a_dry_run_writes_nothing_and_matches_the_close(store):
    put(store, [{"org_id": o, "time": M.start_ns + i, "value_int": 3 + i} for i, o in enumerate("abc")])
    before = (_count(store, schema.CLOSES_TABLE), _count(store, schema.STATEMENTS_TABLE))
    p = close.dry_run(store, M, late_window_days=35)
    assert (_count(store, schema.CLOSES_TABLE), _count(store, schema.STATEMENTS_TABLE)) == before
    record = close.close_month(store, M, late_window_days=35)
    assert (p.orgs, p.lines, p.points, p.total_int) == (record.orgs, record.lines, record.points,
                                                         record.total_int)  # fmt: skip


def test_points_of_the_month_arriving_during_its_close_are_adjustments_exactly_once(store):
    put(store, [{"org_id": f"o{i:02d}", "time": M.start_ns + i, "value_int": 10} for i in range(6)])
    late = []

    def arrive(_p) -> None:  # after the cutoff is recorded, and again between chunks
        n = len(late)
        if n < 4:
            late.append(n)
            put(store, [{"org_id": f"o{n:02d}", "time": M.end_ns - 1, "value_int": 1000},
                        {"org_id": f"new{n}", "time": M.start_ns, "value_int": 7}])  # fmt: skip

    record = close.close_month(store, M, late_window_days=35, batch_orgs=2, before_writing=arrive,
                               progress=arrive)  # fmt: skip
    assert record.done and record.total_int == 60 and record.points == 6 and record.reconciled
    adj = store.rows(
        schema.adjustments_sql(store.database, False),
        {"from_ns": M.start_ns, "to_ns": M.end_ns, "cutoff_ms": record.cutoff_ms, "limit": 100, "offset": 0},
    )
    raw = int(store.scalar(f"SELECT sum(value_int) FROM {store.database}.{schema.POINTS_TABLE}"))
    assert record.total_int + sum(int(r[3]) for r in adj) == raw
    assert close.verify_statements(store, M) == []
