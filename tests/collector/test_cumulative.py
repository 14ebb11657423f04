"""Cumulative → delta conversion rules, rollback, and recovery of state from committed points."""

import time

from otlp_builders import CUMULATIVE, point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.cumulative import CumulativePoint, CumulativeState, Entry
from meterhouse.collector.decode import Limits
from meterhouse.collector.ingest import Ingestor, committed_state_loader
from meterhouse.collector.writer import Writer
from meterhouse.core.metrics import PipelineMetrics


def cp(value, t, start=100, sid=1, monotonic=True):
    return CumulativePoint(sid, start, t, value, monotonic)


def run(state, *points):
    results, _ = state.convert(list(points))
    return results


def test_first_point_counts_from_its_start_then_differences():
    s = CumulativeState(lambda ids: {})
    assert run(s, cp(10, 200)) == [(10, 100)]
    assert run(s, cp(25, 300)) == [(15, 200)]
    assert run(s, cp(25, 400)) == [(0, 300)]


def test_reset_by_new_start_time_or_smaller_value():
    s = CumulativeState(lambda ids: {})
    run(s, cp(50, 200))
    assert run(s, cp(7, 400, start=350)) == [(7, 350)]  # new start time
    assert run(s, cp(3, 500, start=350)) == [(3, 350)]  # smaller value, same start


def test_non_monotonic_sums_go_down_instead_of_resetting():
    s = CumulativeState(lambda ids: {})
    run(s, cp(50, 200, monotonic=False))
    assert run(s, cp(20, 300, monotonic=False)) == [(-30, 200)]


def test_repeats_count_zero_and_older_points_are_out_of_order():
    s = CumulativeState(lambda ids: {})
    run(s, cp(50, 200))
    assert run(s, cp(50, 200)) == [(0, 100)]  # the same point again
    assert run(s, cp(40, 150)) == [None]  # older, another value
    assert run(s, cp(60, 250, start=50)) == [None]  # an older start time


def test_doubles():
    s = CumulativeState(lambda ids: {})
    run(s, cp(0.5, 200))
    assert run(s, cp(1.75, 300)) == [(1.25, 200)]


def test_state_is_loaded_once_per_request_for_all_missing_series():
    calls = []

    def loader(ids):
        calls.append(sorted(ids))
        return {1: Entry(100, 150, 40)}

    s = CumulativeState(loader)
    assert run(s, cp(50, 200, sid=1), cp(5, 200, sid=2), cp(60, 300, sid=1)) == [
        (10, 150),
        (5, 100),
        (10, 200),
    ]
    assert calls == [[1, 2]]
    run(s, cp(70, 400, sid=1))
    assert calls == [[1, 2]]


def test_rollback_restores_the_previous_entry_unless_replaced():
    s = CumulativeState(lambda ids: {})
    run(s, cp(10, 200))
    _, changes = s.convert([cp(30, 300)])
    s.rollback(changes)
    assert run(s, cp(30, 300)) == [(20, 200)]  # the retry gets the same delta
    _, changes = s.convert([cp(45, 400)])
    run(s, cp(50, 500))  # a newer point replaced it: the rollback leaves that alone
    s.rollback(changes)
    assert run(s, cp(60, 600)) == [(10, 500)]


def test_eviction_keeps_recent_entries():
    s = CumulativeState(lambda ids: {}, max_entries=10, settle_s=3600)
    run(s, *[cp(1, 200, sid=i) for i in range(20)])
    assert len(s) == 20  # nothing settled yet: nothing may go


def cumulative_request(value, t_ns, start_ns, org="org-c"):
    return sum_request(
        {"c": [point(value, {"org.id": org}, t_ns=t_ns, start_ns=start_ns)]}, temporality=CUMULATIVE
    )


def totals(store):
    return store.scalar(f"SELECT sum(toInt128(value_int)) FROM {store.database}.usage_points")


class Pipeline:
    """Ingestor → spool → writer on the real engine, with cumulative state read from it."""

    def __init__(self, tmp_path, store, **spool_kw):
        from meterhouse.collector.deadletter import DeadLetters
        from meterhouse.collector.spool import Spool

        metrics = PipelineMetrics(CollectorRegistry())
        self.spool = Spool(tmp_path / "spool", **spool_kw)
        self.spool.open()
        self.writer = Writer(
            self.spool, store, metrics, DeadLetters(tmp_path / "dead"), flush_interval_s=0.01
        )
        self.writer.start()
        self.ingestor = Ingestor(
            self.spool, metrics, Limits(), CumulativeState(committed_state_loader(store))
        )

    def export(self, req, digest):
        return self.ingestor.export(req, digest)

    def close(self):
        self.writer.shutdown(5)
        self.spool.shutdown(1)


def test_a_refused_request_is_rolled_back_so_the_retry_counts_the_same(tmp_path, store):
    p = Pipeline(tmp_path, store, max_bytes=1)  # every append after the first finds the spool full
    start = time.time_ns() - 10**10
    try:
        p.writer.shutdown(0)  # nothing drains: the spool stays full
        assert p.export(cumulative_request(100, start + 10**9, start), "r1").kind == "ok"
        assert p.export(cumulative_request(150, start + 2 * 10**9, start), "r2").kind == "backpressure"
        p.spool.max_bytes = 1 << 30
        assert p.export(cumulative_request(150, start + 2 * 10**9, start), "r2").kind == "ok"
    finally:
        p.close()
    p2 = Pipeline(tmp_path, store)  # the spool is replayed
    deadline = time.time() + 10
    while p2.spool.pending_points and time.time() < deadline:
        time.sleep(0.01)
    p2.close()
    assert totals(store) == 150


def test_state_is_recovered_from_committed_points_after_a_restart(tmp_path, store):
    start = time.time_ns() - 10**10
    for i, v in enumerate([100, 180, 180, 300]):
        p = Pipeline(tmp_path / str(i), store)  # a fresh process each time: state read back from ClickHouse
        try:
            out = p.export(cumulative_request(v, start + (i + 1) * 10**9, start), f"r{i}")
            assert out.kind == "ok", out.message
        finally:
            p.close()
    assert totals(store) == 300
    assert store.scalar(f"SELECT sum(value_int) FROM {store.database}.usage_hourly") == 300
