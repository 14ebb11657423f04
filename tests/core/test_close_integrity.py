"""The close under attack: points committed after the cutoff while the month is being closed, statement
lines edited or deleted after the close, points that slip between statement and adjustments, boundary
months (leap day, December to January, a month without data), extreme values and concurrent closes."""

import time

import pytest
from prometheus_client import CollectorRegistry
from usage_rows import Crash, concurrently, crash_when_done, put

from meterhouse.core import close, schema
from meterhouse.core.close import Month
from meterhouse.exporter import Reconciler

NS = 10**9
M = Month.of_ns(time.time_ns()).previous().previous().previous()


def do_close(store, month=M, **kw):
    kw.setdefault("late_window_days", 35)
    return close.close_month(store, month, **kw)


def put_committed(store, rows: list[dict], committed_ms: int) -> None:
    """Points through the ingest path (raw and rollup alike), then given a chosen commit time: what a slow
    or late insert leaves (``committed_at`` is the commit time of its insert)."""
    put(store, rows)
    for r in rows:
        store.client.command(
            f"""ALTER TABLE {store.database}.{schema.POINTS_TABLE}
            UPDATE committed_at = fromUnixTimestamp64Milli({{c:Int64}}, 'UTC')
            WHERE org_id = {{o:String}} AND time = fromUnixTimestamp64Nano({{t:Int64}}, 'UTC')
                AND value_int = {{v:Int64}}""",
            parameters={"o": r["org_id"], "t": r["time"], "v": r["value_int"], "c": committed_ms},
            settings={"mutations_sync": 2},
        )


def lines(store, month=M) -> list[dict]:
    rows = store.rows(
        schema.statements_sql(store.database, False), {"month": month.key, "limit": 1000, "offset": 0}
    )
    return [dict(zip(schema.STATEMENT_FIELDS, r, strict=True)) for r in rows]


def statement_gauge(store) -> float:
    registry = CollectorRegistry()
    assert Reconciler(store, registry, months=6).refresh()
    return registry.get_sample_value("meterhouse_statement_mismatched_lines")


def test_points_committed_after_the_cutoff_leave_the_close_reconciled(store):
    # A close while ingest still writes the month (force inside the window, or the settle seconds): what is
    # committed after the cutoff is an adjustment, not a difference between statement and rollup.
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 100}])
    later = time.time_ns() // 10**6 + 3600 * 1000  # committed after any cutoff this close can take
    put_committed(store, [{"org_id": "a", "time": M.start_ns + 2, "value_int": 7},
                          {"org_id": "c", "time": M.end_ns - 1, "value_int": 9}], later)  # fmt: skip
    record = do_close(store)
    (line,) = lines(store)
    assert (line["org_id"], line["total_int"], line["points"]) == ("a", 100, 1)
    assert (line["rollup_int"], line["rollup_points"]) == (100, 1)
    assert record.reconciled and record.mismatched_lines == 0
    assert (record.total_int, record.rollup_int, record.points, record.rollup_points) == (100, 100, 1, 1)
    adjustments = store.rows(schema.adjustments_sql(store.database, False), {
        "from_ns": M.start_ns, "to_ns": M.end_ns, "cutoff_ms": record.cutoff_ms, "limit": 100, "offset": 0})  # fmt: skip
    assert sorted((o, int(ai), int(n)) for o, _m, _u, ai, _ad, n, _t, _b in adjustments) == [
        ("a", 7, 1),
        ("c", 9, 1),
    ]


def test_a_clean_close_verifies(store):
    put(store, [{"org_id": f"o{i}", "metric": m, "time": M.start_ns + i * NS, "value_int": i - 3}
                for i in range(8) for m in ("x", "y")])  # fmt: skip
    put(store, [{"org_id": "d", "metric": "credits", "time": M.start_ns + i, "is_int": 0, "value_double": v}
                for i, v in enumerate([0.1, 0.2, 0.3, -1e-17, 1e12, 3.3])])  # fmt: skip
    record = do_close(store)
    assert record.reconciled
    assert close.verify_statements(store, M) == []
    assert statement_gauge(store) == 0


def test_an_edited_statement_line_is_detected(store):
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 100},
                {"org_id": "b", "time": M.start_ns + 1, "value_int": 5}])  # fmt: skip
    do_close(store)
    assert statement_gauge(store) == 0
    # Someone writes a line with the same key: the ReplacingMergeTree keeps it instead of the signed one.
    row = list(store.rows(f"SELECT * FROM {store.database}.{schema.STATEMENTS_TABLE} WHERE org_id = 'a'")[0])
    for name in ("total_int", "rollup_int"):  # edited consistently, so the line still "reconciles"
        row[schema.STATEMENT_COLUMN_NAMES.index(name)] = 1
    store.insert_rows(schema.STATEMENTS_TABLE, [[v] for v in row], schema.STATEMENT_COLUMN_NAMES,
                      schema.STATEMENT_COLUMN_TYPES, "edited")  # fmt: skip
    assert [x["total_int"] for x in lines(store) if x["org_id"] == "a"] == [1]
    assert statement_gauge(store) == 1
    (bad,) = close.verify_statements(store, M)
    assert (bad["org_id"], bad["metric"], bad["statement_total"], bad["raw_total"]) == (
        "a",
        "api.calls",
        1,
        100,
    )


def test_a_deleted_statement_line_is_detected(store):
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 100},
                {"org_id": "b", "time": M.start_ns + 1, "value_int": 5}])  # fmt: skip
    do_close(store)
    store.client.command(f"ALTER TABLE {store.database}.{schema.STATEMENTS_TABLE} DELETE WHERE org_id = 'b'",
                         settings={"mutations_sync": 2})  # fmt: skip
    assert [x["org_id"] for x in lines(store)] == ["a"]
    assert statement_gauge(store) == 1
    assert [(x["org_id"], x["statement_points"], x["raw_points"]) for x in close.verify_statements(store, M)] == [
        ("b", 0, 1)]  # fmt: skip


def test_a_point_neither_in_the_statement_nor_an_adjustment_is_detected(store):
    # Committed (by its clock) before the cutoff but visible only after the lines were read: a slow insert
    # on a ClickHouse server. It is in no statement and, being before the cutoff, in no adjustment.
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 100}])
    record = do_close(store)
    put_committed(store, [{"org_id": "a", "time": M.start_ns + 3, "value_int": 40}], record.cutoff_ms - 1)
    assert statement_gauge(store) == 1
    (bad,) = close.verify_statements(store, M)
    assert (bad["statement_total"], bad["raw_total"], bad["raw_points"]) == (100, 140, 2)


def test_leap_day_december_to_january_and_an_empty_month(store):
    nov, dec, jan, feb = Month(2023, 11), Month(2023, 12), Month(2024, 1), Month(2024, 2)
    assert (feb.end_ns - feb.start_ns) // (86400 * NS) == 29 and jan.start_ns == dec.end_ns
    put(store, [
        {"org_id": "a", "time": dec.end_ns - 1, "value_int": 1},  # 2023-12-31T23:59:59.999999999Z
        {"org_id": "a", "time": jan.start_ns, "value_int": 10},  # 2024-01-01T00:00:00.000000000Z
        {"org_id": "a", "time": feb.start_ns - 1, "value_int": 100},
        {"org_id": "a", "time": feb.end_ns - 1, "value_int": 1000},  # 2024-02-29T23:59:59.999999999Z
        {"org_id": "a", "time": feb.end_ns, "value_int": 10000},  # 2024-03-01T00:00:00Z
    ])  # fmt: skip
    got = {}
    for month in (nov, dec, jan, feb):
        record = do_close(store, month)
        assert record.done and record.reconciled
        got[str(month)] = [
            (x["total_int"], x["points"], x["first_ns"], x["last_ns"]) for x in lines(store, month)
        ]
    assert got == {
        "2023-11": [],
        "2023-12": [(1, 1, dec.end_ns - 1, dec.end_ns - 1)],
        "2024-01": [(110, 2, jan.start_ns, feb.start_ns - 1)],
        "2024-02": [(1000, 1, feb.end_ns - 1, feb.end_ns - 1)],
    }
    empty = close.get_close(store, nov)
    assert (empty.orgs, empty.lines, empty.points, empty.total_int) == (0, 0, 0, 0)
    put(store, [{"org_id": "z", "time": nov.start_ns, "value_int": 3}])  # late, for the empty closed month
    assert lines(store, nov) == [] and statement_gauge(store) == 0  # outside the reconciled months: no noise
    adjustments = store.rows(schema.adjustments_sql(store.database, False), {
        "from_ns": nov.start_ns, "to_ns": nov.end_ns, "cutoff_ms": empty.cutoff_ms, "limit": 10, "offset": 0})  # fmt: skip
    assert [(o, int(ai)) for o, _m, _u, ai, _ad, _n, _t, _b in adjustments] == [("z", 3)]


def test_extreme_negative_and_zero_values_sum_exactly(store):
    lo, hi = -(2**63), 2**63 - 1
    values = [lo, lo, hi, hi, hi, 0, 0, -5, 1]
    put(store, [{"org_id": "x", "time": M.start_ns + i, "value_int": v} for i, v in enumerate(values)])
    record = do_close(store)
    (line,) = lines(store)
    assert (line["total_int"], line["points"]) == (sum(values), 9) and sum(values) > 2**53
    assert record.reconciled and record.total_int == sum(values) and record.rollup_int == sum(values)
    assert close.verify_statements(store, M) == []


def test_concurrent_closes_of_a_month_give_one_close(store):
    put(store, [{"org_id": f"o{i:03d}", "time": M.start_ns + i, "value_int": i} for i in range(200)])
    results, errors = concurrently(lambda: do_close(store, batch_orgs=7), 4)
    assert not errors and len(results) == 4
    assert len({r.close_id for r in results}) == 1 and all(r == results[0] for r in results)
    assert results[0].lines == 200 and results[0].total_int == sum(range(200))
    assert store.scalar(f"SELECT count() FROM {store.database}.{schema.STATEMENTS_TABLE} FINAL") == 200
    assert store.scalar(f"SELECT uniqExact(close_id) FROM {store.database}.{schema.STATEMENTS_TABLE}") == 1


def test_late_point_counters_never_go_down_when_a_month_is_closed(store):
    # Committed after its month ended, so counted open_month; then a close whose cutoff lies before its
    # commit makes it an adjustment. A counter that went down would read as a reset: increase() would
    # count every late point again.
    registry = CollectorRegistry()
    reconciler = Reconciler(store, registry, months=6)
    late = "meterhouse_late_points_total"
    before = {}
    calls = []

    def wait_committed():  # called before the close's cutoff and after it: the point lands in between
        calls.append(1)
        if len(calls) == 2:
            put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 1}])
            assert reconciler.refresh()
            before.update(
                {d: registry.get_sample_value(late, {"disposition": d}) for d in ("open_month", "adjustment")}
            )
        return []

    do_close(store, wait_committed=wait_committed)
    assert before == {"open_month": 1, "adjustment": 0}
    assert reconciler.refresh()
    after = {d: registry.get_sample_value(late, {"disposition": d}) for d in ("open_month", "adjustment")}
    assert after["adjustment"] == 1
    assert after["open_month"] >= before["open_month"]


def test_a_resumed_close_completes_an_org_whose_lines_were_written_in_part(store):
    # A chunk's insert is one insert, but ClickHouse cuts a large one into several parts, committed one by
    # one: a kill between them leaves the last org written with only some of its metrics.
    put(store, [{"org_id": f"o{i}", "metric": m, "time": M.start_ns + i, "value_int": i + 1}
                for i in range(6) for m in ("m1", "m2", "m3")])  # fmt: skip

    with pytest.raises(Crash):
        do_close(store, batch_orgs=2, progress=crash_when_done(4))
    # What a kill between the parts of the second chunk leaves: o3's last metric was not committed.
    store.client.command(f"ALTER TABLE {store.database}.{schema.STATEMENTS_TABLE} DELETE "
                         "WHERE org_id = 'o3' AND metric = 'm3'", settings={"mutations_sync": 2})  # fmt: skip
    record = do_close(store, batch_orgs=2)
    assert record.lines == 18 and record.reconciled
    assert [(x["org_id"], x["metric"]) for x in lines(store)] == [
        (f"o{i}", m) for i in range(6) for m in ("m1", "m2", "m3")]  # fmt: skip
    assert close.verify_statements(store, M) == []


@pytest.mark.parametrize("batch_orgs", [0, -1])
def test_a_close_with_a_nonsense_chunk_size_is_refused_not_signed_empty(store, batch_orgs):
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 100}])
    with pytest.raises(ValueError, match="batch_orgs"):
        do_close(store, batch_orgs=batch_orgs)
    assert close.get_close(store, M) is None  # nothing recorded: the month stays open
    record = do_close(store)
    assert (record.lines, record.total_int) == (1, 100)


def test_the_close_command_refuses_a_nonsense_chunk_size(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "meterhouse", "close", "--month", str(M), "--direct",
                          "--data-dir", str(tmp_path), "--batch-orgs", "-5"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "--batch-orgs" in out.stderr and "Traceback" not in out.stderr


TZ_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from usage_rows import put
from meterhouse.core import close, schema
from meterhouse.core.close import Month
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
store = open_store(Config(data_dir=Path(sys.argv[1])))
dec, jan = Month(2023, 12), Month(2024, 1)
put(store, [{"org_id": "a", "time": jan.start_ns - 1, "value_int": 1}, {"org_id": "a", "time": jan.start_ns, "value_int": 10},
            {"org_id": "a", "time": jan.start_ns + 1800 * 10**9, "value_int": 100}])
out = {}
for m in (dec, jan):
    r = close.close_month(store, m, late_window_days=35)
    rows = store.rows(schema.statements_sql(store.database, False), {"month": m.key, "limit": 10, "offset": 0})
    out[str(m)] = [[int(x[4]), int(x[6]), int(x[7]), int(x[8]), int(x[13]), int(x[15])] for x in rows] + [r.reconciled]
print(json.dumps(out))
"""


@pytest.mark.parametrize("tz", ["Pacific/Chatham"])  # +13:45 in January: a date ahead, off the hour
def test_months_are_utc_whatever_the_process_time_zone(tmp_path, tz):
    # chdb's session time zone is the process's: every month boundary must still be UTC, to the nanosecond.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", TZ_PROBE, str(tmp_path), tests], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TZ": tz})  # fmt: skip
    assert out.returncode == 0, out.stderr
    jan = Month(2024, 1).start_ns
    assert json.loads(out.stdout) == {
        "2023-12": [[1, 1, jan - 1, jan - 1, 1, 1], True],
        "2024-01": [[110, 2, jan, jan + 1800 * NS, 110, 2], True],
    }


def test_rollup_usage_without_a_statement_line_is_a_mismatch(store):
    # The rollup (the hourly numbers customers see) has usage the raw points do not: for an org with no
    # line at all, and for a metric of an org that has lines. The close must not call that reconciled.
    put(store, [{"org_id": "m", "time": M.start_ns + 1, "value_int": 5}])
    for org, metric in (("ghost", "api.calls"), ("m", "other")):
        store.client.command(f"""INSERT INTO {store.database}.{schema.HOURLY_TABLE}
            (org_id, metric, hour, attributes_hash, unit, value_int, value_double, points)
            VALUES ('{org}', '{metric}', toDateTime({M.start_ns // NS}, 'UTC'), 1, '', 3, 0, 1)""")
    record = do_close(store)
    assert [(x["org_id"], x["metric"]) for x in lines(store)] == [("m", "api.calls")]
    assert not record.reconciled and record.mismatched_lines == 2
    assert (record.total_int, record.rollup_int, record.points, record.rollup_points) == (5, 11, 1, 3)


def test_a_rollup_short_of_the_points_committed_after_the_cutoff_is_a_mismatch_not_a_crash(store):
    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 5}])
    later = time.time_ns() // 10**6 + 3600 * 1000
    put_committed(store, [{"org_id": "a", "time": M.start_ns + 2, "value_int": 7},
                          {"org_id": "a", "time": M.start_ns + 3, "value_int": 7}], later)  # fmt: skip
    # The rollup loses the hour (a dropped partition repaired by hand, say): it is now short of raw.
    store.client.command(f"ALTER TABLE {store.database}.{schema.HOURLY_TABLE} DELETE WHERE org_id = 'a'",
                         settings={"mutations_sync": 2})  # fmt: skip
    record = do_close(store)
    assert record.done and not record.reconciled and record.mismatched_lines == 1
    (line,) = lines(store)
    assert (line["total_int"], line["points"], line["rollup_int"], line["rollup_points"]) == (5, 1, -14, 0)
