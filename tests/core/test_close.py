"""The monthly close on the real schema: boundaries to the nanosecond, exact totals, late points,
idempotence, resumption, and the reconciliation of raw points against the hourly rollup."""

import time

import pytest
import requests
from otlp_builders import CUMULATIVE, point, sum_request
from prometheus_client import CollectorRegistry
from usage_rows import Crash, concurrently, crash_when_done, put

from meterhouse.core import close, schema
from meterhouse.core.close import CloseRefused, Month
from meterhouse.exporter import Reconciler

NOW_MONTH = Month.of_ns(time.time_ns())


def months_ago(n: int) -> Month:
    m = NOW_MONTH
    for _ in range(n):
        m = m.previous()
    return m


M = months_ago(3)  # its late window (35 days) is over


def lines(store, month: Month) -> list[dict]:
    rows = store.rows(
        schema.statements_sql(store.database, False), {"month": month.key, "limit": 1000, "offset": 0}
    )
    return [dict(zip(schema.STATEMENT_FIELDS, r, strict=True)) for r in rows]


def raw_total(store, org: str, metric: str, month: Month) -> tuple[int, int]:
    return store.rows(
        f"""SELECT sum(toInt128(value_int)), count() FROM {store.database}.{schema.POINTS_TABLE}
        WHERE org_id = {{o:String}} AND metric = {{m:String}} AND kind = 'sum'
          AND time >= fromUnixTimestamp64Nano({{a:Int64}}, 'UTC') AND time < fromUnixTimestamp64Nano({{b:Int64}}, 'UTC')""",
        {"o": org, "m": metric, "a": month.start_ns, "b": month.end_ns},
    )[0]


def rollup_total(store, org: str, metric: str, month: Month) -> tuple[int, int]:
    return store.rows(
        f"""SELECT sum(value_int), sum(points) FROM {store.database}.{schema.HOURLY_TABLE}
        WHERE org_id = {{o:String}} AND metric = {{m:String}} AND toYYYYMM(hour) = {{k:UInt32}}""",
        {"o": org, "m": metric, "k": month.key},
    )[0]


def do_close(store, month=M, **kw):
    kw.setdefault("late_window_days", 35)
    return close.close_month(store, month, **kw)


def test_points_on_both_sides_of_a_month_boundary_to_the_nanosecond(store):
    nxt = Month.of_ns(M.end_ns)
    put(store, [
        {"org_id": "a", "time": M.start_ns - 1, "value_int": 1000},  # the month before, by 1 ns
        {"org_id": "a", "time": M.start_ns, "value_int": 1},
        {"org_id": "a", "time": M.end_ns - 1, "value_int": 10},
        {"org_id": "a", "time": M.end_ns, "value_int": 100},  # the next month
    ])  # fmt: skip
    record = do_close(store)
    (line,) = lines(store, M)
    assert (line["org_id"], line["metric"], line["total_int"], line["points"]) == ("a", "api.calls", 11, 2)
    assert (line["first_ns"], line["last_ns"]) == (M.start_ns, M.end_ns - 1)
    assert record.done and record.reconciled and record.points == 2
    do_close(store, nxt, late_window_days=0, force=True)
    assert [(x["total_int"], x["points"], x["first_ns"]) for x in lines(store, nxt)] == [(100, 1, M.end_ns)]
    assert raw_total(store, "a", "api.calls", M.previous()) == (1000, 1)


def test_statement_equals_raw_equals_rollup_to_the_unit_and_above_2_63(store):
    big = 2**62 + 7
    rows = [{"org_id": f"org-{o}", "metric": m, "time": M.start_ns + (o * 3 + k) * 10**9 + 123, "value_int": v}
            for o in range(30) for k, (m, v) in enumerate([("calls", o + 1), ("rows", 3 * o), ("bytes", 17)])]  # fmt: skip
    rows += [
        {"org_id": "whale", "metric": "calls", "time": M.start_ns + i * 3600 * 10**9, "value_int": big}
        for i in range(5)
    ]
    rows += [{"org_id": "doubles", "metric": "credits", "time": M.start_ns + i, "is_int": 0, "value_double": 0.1}
             for i in range(10)]  # fmt: skip
    put(store, rows)
    record = do_close(store, batch_orgs=7)
    got = lines(store, M)
    assert len(got) == 30 * 3 + 2 and record.lines == len(got) and record.orgs == 32
    for line in got:
        if line["metric"] == "credits":
            assert line["total_double"] == pytest.approx(1.0) and line["rollup_points"] == 10
            continue
        raw = raw_total(store, line["org_id"], line["metric"], M)
        roll = rollup_total(store, line["org_id"], line["metric"], M)
        assert (line["total_int"], line["points"]) == tuple(raw) == tuple(roll)
        assert (line["rollup_int"], line["rollup_points"]) == tuple(roll)
    whale = next(x for x in got if x["org_id"] == "whale")
    assert whale["total_int"] == 5 * big > 2**63
    assert record.total_int == sum(x["total_int"] for x in got) and record.mismatched_lines == 0
    # the org's checksum covers all its lines
    org0 = [x for x in got if x["org_id"] == "org-0"]
    assert len({x["checksum"] for x in org0}) == 1
    assert org0[0]["checksum"] == close.checksum(
        [
            (
                x["metric"],
                x["unit"],
                x["total_int"],
                x["total_double"],
                x["points"],
                x["first_ns"],
                x["last_ns"],
            )
            for x in org0
        ]  # fmt: skip
    )


def test_late_points_before_and_after_the_close(store):
    put(store, [{"org_id": "a", "time": M.start_ns + 5, "value_int": 3}])
    put(store, [{"org_id": "a", "time": M.end_ns - 5, "value_int": 4}])  # late, but the month is open
    reconciler = Reconciler(store, CollectorRegistry(), months=5)
    assert reconciler.refresh()
    assert reconciler.late_points == {"open_month": 2, "adjustment": 0}  # both arrived after the month
    record = do_close(store)
    put(store, [{"org_id": "a", "time": M.start_ns + 9, "value_int": 50}])  # after the close
    put(store, [{"org_id": "b", "time": M.end_ns - 1, "value_int": 7}])  # a new org, after the close
    assert do_close(store) == record  # closing again changes nothing
    assert [(x["org_id"], x["total_int"], x["points"]) for x in lines(store, M)] == [("a", 7, 2)]
    adjustments = store.rows(schema.adjustments_sql(store.database, False), {
        "from_ns": M.start_ns, "to_ns": M.end_ns, "cutoff_ms": record.cutoff_ms, "limit": 100, "offset": 0})  # fmt: skip
    assert sorted((org, metric, int(ai), int(n)) for org, metric, _u, ai, _ad, n, _t, _b in adjustments) == [
        ("a", "api.calls", 50, 1), ("b", "api.calls", 7, 1)]  # fmt: skip
    # the points are stored as they arrived: raw = statement + adjustments
    assert raw_total(store, "a", "api.calls", M) == (57, 3)
    view = store.rows(
        f"SELECT org_id, amount_int, month FROM {store.database}.{schema.ADJUSTMENTS_VIEW} ORDER BY org_id"
    )
    assert [(o, int(a), int(m)) for o, a, m in view] == [("a", 50, M.key), ("b", 7, M.key)]
    registry = CollectorRegistry()
    reconciler = Reconciler(store, registry, months=5)
    assert reconciler.refresh()
    late = "meterhouse_late_points_total"
    assert registry.get_sample_value(late, {"disposition": "adjustment"}) == 2
    assert registry.get_sample_value(late, {"disposition": "open_month"}) == 2


def test_a_cumulative_series_crossing_a_month_boundary(stack_factory):
    from conftest import drain

    stack = stack_factory()
    start = M.end_ns - 3600 * 10**9
    cumulative = [
        (M.end_ns - 60 * 10**9, 10),
        (M.end_ns - 1, 25),
        (M.end_ns, 40),
        (M.end_ns + 3600 * 10**9, 70),
    ]
    for t, v in cumulative:  # one request each, in order, as an SDK exports them
        body = sum_request(
            {"credits": [point(v, {"org.id": "cum"}, t_ns=t, start_ns=start)]}, temporality=CUMULATIVE
        )
        r = requests.post(f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics", data=body.SerializeToString(),
                          headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
    drain(stack)
    first = do_close(stack.store)
    second = do_close(stack.store, Month.of_ns(M.end_ns), late_window_days=0, force=True)
    a, b = lines(stack.store, M), lines(stack.store, Month.of_ns(M.end_ns))
    assert [(x["total_int"], x["points"]) for x in a] == [(25, 2)]  # 10, then +15 up to the last ns
    assert [(x["total_int"], x["points"]) for x in b] == [(45, 2)]  # +15 across the boundary, +30
    assert a[0]["total_int"] + b[0]["total_int"] == 70  # the series' last value: nothing lost or doubled
    assert first.reconciled and second.reconciled and second.forced == 1 and b[0]["forced"] == 1


def test_the_late_window_and_force(store):
    now = time.time_ns()
    recent = months_ago(1)  # ended less than 35 days ago at most... or more: check against the rule itself
    with pytest.raises(CloseRefused) as e:
        close.check_window(NOW_MONTH, now, 35, force=True)
    assert e.value.code == "month_not_ended"
    inside = recent.end_ns + 35 * 86400 * 10**9 > now
    if inside:
        with pytest.raises(CloseRefused) as e:
            do_close(store, recent)
        assert e.value.code == "late_window"
    with pytest.raises(CloseRefused):
        close.check_window(recent, recent.end_ns + 35 * 86400 * 10**9 - 1, 35, force=False)
    close.check_window(recent, recent.end_ns + 35 * 86400 * 10**9, 35, force=False)  # just out: fine
    put(store, [{"org_id": "a", "time": recent.start_ns, "value_int": 1}])
    record = do_close(store, recent, force=True)
    assert record.forced == 1 and lines(store, recent)[0]["forced"] == 1
    assert close.get_close(store, recent) == record


def test_an_interrupted_close_resumes_with_the_same_lines(store):
    put(store, [{"org_id": f"o{i:03d}", "metric": m, "time": M.start_ns + i, "value_int": i}
                for i in range(100) for m in ("x", "y")])  # fmt: skip

    with pytest.raises(Crash):  # after two chunks
        do_close(store, batch_orgs=10, progress=crash_when_done(20))
    running = close.get_close(store, M)
    assert running.status == "running" and len(lines(store, M)) == 40
    seen = []
    record = do_close(store, batch_orgs=10, progress=lambda p: seen.append(p.done))
    assert seen[0] == 20  # resumed after the last org written
    assert record.close_id == running.close_id and record.lines == 200 and record.reconciled
    got = lines(store, M)
    assert [(x["org_id"], x["metric"], x["total_int"]) for x in got] == [
        (f"o{i:03d}", m, i) for i in range(100) for m in ("x", "y")]  # fmt: skip


def test_reconciliation_finds_drift_without_an_org_label(store):
    put(store, [{"org_id": "fine", "time": M.start_ns, "value_int": 5},
                {"org_id": "drifts", "time": M.start_ns, "value_int": 5},
                {"org_id": "now", "time": time.time_ns() - 10**9, "value_int": 1}])  # fmt: skip
    do_close(store)
    # A rollup row with no raw point behind it: what a broken view or a manual repair would leave.
    store.client.command(f"""INSERT INTO {store.database}.{schema.HOURLY_TABLE}
        (org_id, metric, hour, attributes_hash, unit, value_int, value_double, points)
        VALUES ('drifts', 'api.calls', toDateTime({M.start_ns // 10**9}, 'UTC'), 1, '', 3, 0, 1)""")
    registry = CollectorRegistry()
    reconciler = Reconciler(store, registry, months=4)
    assert reconciler.refresh()
    get = registry.get_sample_value
    assert get("meterhouse_reconcile_drifting_orgs", {"month_state": "closed"}) == 1
    assert get("meterhouse_reconcile_drift_points", {"month_state": "closed"}) == 1
    assert get("meterhouse_reconcile_drift_value", {"month_state": "closed"}) == 3
    assert get("meterhouse_reconcile_drifting_orgs", {"month_state": "open"}) == 0
    assert get("meterhouse_reconcile_months", {"month_state": "closed"}) == 1
    assert get("meterhouse_reconcile_ok") == 1
    for metric in registry.collect():
        for sample in metric.samples:
            assert "org_id" not in sample.labels
    listed = store.rows(schema.drifting_orgs_sql(store.database),
                        {"from_ns": M.start_ns, "to_ns": M.end_ns, "limit": 10})  # fmt: skip
    assert [(m, org, int(rp), int(hp), v) for m, org, _metric, rp, hp, v in listed] == [
        (M.key, "drifts", 1, 2, -3.0)
    ]


def test_two_collectors_closing_the_same_month_make_one_close(store, monkeypatch):
    """Several collectors serve the API (the compose profile `cluster` runs two behind one load balancer),
    and the one-close-at-a-time lock is per process. Two close requests that both find no close must still
    make one close — one close id, one cutoff — or the lines of one and the cutoff of the other would count
    the points committed between the two cutoffs twice (statement and adjustment) or not at all."""
    import contextlib
    import threading

    from meterhouse.core.store import Store

    put(store, [{"org_id": "a", "time": M.start_ns + 1, "value_int": 3},
                {"org_id": "b", "time": M.start_ns + 2, "value_int": 4}])  # fmt: skip
    monkeypatch.setattr(close, "_lock", contextlib.nullcontext())  # two processes: a lock each
    both_looked = threading.Barrier(2, timeout=60)
    seen = threading.local()

    class Collector(Store):
        def rows(self, sql, parameters=None):
            result = super().rows(sql, parameters)
            if f".{schema.CLOSES_TABLE} FINAL WHERE month =" in sql and not getattr(seen, "looked", False):
                seen.looked = True
                both_looked.wait()  # both have found no close before either records one
            return result

    results, errors = concurrently(lambda: do_close(Collector(store.client, store.database, "collector")), 2)
    assert not errors and len(results) == 2
    assert results[0].close_id == results[1].close_id and results[0].cutoff_ms == results[1].cutoff_ms
    db = store.database
    assert store.scalar(f"SELECT uniqExact(close_id) FROM {db}.{schema.STATEMENTS_TABLE}") == 1
    assert store.scalar(f"SELECT uniqExact(close_id) FROM {db}.{schema.CLOSES_TABLE}") == 1
    assert [(r["org_id"], r["total_int"]) for r in lines(store, M)] == [("a", 3), ("b", 4)]
