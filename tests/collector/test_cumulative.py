"""Cumulative → delta conversion rules, rollback, and recovery of state from committed points."""

import hashlib
import math
import sys
import time

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from otlp_builders import CUMULATIVE, kv, point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.auth import IngestTokens
from meterhouse.collector.cumulative import CumulativePoint, CumulativeState, Entry, StateUnavailable
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.ingest import Ingestor, committed_state_loader, restore_cumulative
from meterhouse.collector.writer import Writer
from meterhouse.core import schema
from meterhouse.core.config import Token
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
    assert run(s, cp(40, 150)) == ["out_of_order"]  # older, another value
    assert run(s, cp(60, 250, start=50)) == ["out_of_order"]  # an older start time


def test_doubles():
    s = CumulativeState(lambda ids: {})
    run(s, cp(0.5, 200))
    assert run(s, cp(1.75, 300)) == [(1.25, 200)]


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.mark.parametrize(("first", "then"), [(INT64_MIN, INT64_MAX), (INT64_MAX, INT64_MIN), (-1, INT64_MAX)])
def test_an_int_delta_beyond_int64_is_out_of_range_and_leaves_the_series_where_it_was(first, then):
    """A non-monotonic sum may move by up to 2^64 - 1 between two points: no Int64 column holds that.
    Was returned as a delta, which failed the whole batch's encoding (500) on every re-send."""
    s = CumulativeState(lambda ids: {})
    assert run(s, cp(first, 200, monotonic=False)) == [(first, 100)]
    (res,), changes = s.convert([cp(then, 300, monotonic=False)])
    assert res == "out_of_range" and changes == []
    # The series stays at its last stored point: the next point is measured from there.
    back = first + (1 if first < 0 else -1)
    assert run(s, cp(back, 400, monotonic=False)) == [(back - first, 200)]


def test_int_deltas_at_the_int64_limits_are_kept():
    s = CumulativeState(lambda ids: {})
    assert run(s, cp(INT64_MIN, 200, monotonic=False), cp(-1, 300, monotonic=False)) == [
        (INT64_MIN, 100), (INT64_MAX, 200)]  # fmt: skip
    assert run(s, cp(INT64_MIN, 400, monotonic=False)) == [(INT64_MIN + 1, 300)]
    # A monotonic sum (never below zero) resets rather than going down: its deltas always fit.
    assert run(s, cp(INT64_MAX, 500, sid=2), cp(0, 600, sid=2), cp(INT64_MAX, 700, sid=2)) == [
        (INT64_MAX, 100), (0, 100), (INT64_MAX, 600)]  # fmt: skip


@pytest.mark.parametrize(
    ("first", "then", "bad"),
    [
        (-1e288, 1e288, 2e288),  # the delta of two values within the bound is beyond it
        (-1e308, None, -1e308),  # a first point counts its whole value
        (7.5, 2e288, 2e288),  # a double stream
    ],
)
def test_a_double_delta_beyond_the_bound_is_out_of_range(first, then, bad):
    """A double delta is usage that is summed: beyond ±MAX_SUM_DOUBLE, sums of such points could reach ±Inf."""
    s = CumulativeState(lambda ids: {})
    if then is None:
        assert run(s, cp(first, 200, monotonic=False)) == ["out_of_range"]
        return
    assert run(s, cp(first, 200, monotonic=False)) == [(first, 100)]
    assert run(s, cp(then, 300, monotonic=False)) == ["out_of_range"], bad
    assert run(s, cp(first, 400, monotonic=False)) == [(0.0, 200)]  # still measured from the first


def test_a_double_delta_that_overflows_to_infinity_is_out_of_range():
    """A state an earlier version stored beyond the bound: 1.7e308 after -1.7e308 was a delta of +Inf."""
    s = CumulativeState(lambda ids: {1: Entry(100, 200, -1.7e308)})
    assert run(s, cp(1.7e308, 300, monotonic=False)) == ["out_of_range"]
    assert run(s, cp(-1.7e308 + 1e300, 400, monotonic=False)) == ["out_of_range"]  # 1e300 is beyond too
    assert run(s, cp(-1.7e308, 500, monotonic=False)) == [(0.0, 200)]


def test_double_deltas_at_the_bound_are_kept():
    bound = schema.MAX_SUM_DOUBLE
    assert bound == 1e288 and bound * 2**64 < sys.float_info.max / 2
    s = CumulativeState(lambda ids: {})
    assert run(s, cp(-bound, 200, monotonic=False), cp(0.0, 300, monotonic=False)) == [
        (-bound, 100), (bound, 200)]  # fmt: skip
    assert run(s, cp(math.nextafter(bound, math.inf), 400, monotonic=False)) == ["out_of_range"]


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


def test_eviction_keeps_entries_whose_points_are_not_committed_and_refuses_series_past_the_bound():
    """Entries of points not yet written cannot go; new series that would pass the bound are refused,
    retryable, until the writer's commits let entries go (the state grew with the writer's backlog
    before, past any bound)."""
    committed = [0]
    s = CumulativeState(lambda ids: {}, max_entries=10, committed_seq=lambda: committed[0])
    with pytest.raises(StateUnavailable, match="10 at most"):
        s.convert([cp(1, 200, sid=i) for i in range(11)])
    assert len(s) == 0  # nothing of the refused request kept
    _, changes = s.convert([cp(1, 200, sid=i) for i in range(10)])
    assert len(s) == 10  # not even spooled: nothing may go, however long it waits (an outage)
    s.spooled(changes, seq=7)
    with pytest.raises(StateUnavailable):
        run(s, cp(1, 300, sid=99))  # spooled as record 7, which is not committed
    run(s, cp(1, 300, sid=3))  # a known series is never refused
    committed[0] = 7
    run(s, cp(1, 300, sid=100))
    assert len(s) <= 10  # committed: a later miss reads the same state back from ClickHouse


def test_the_clickhouse_lookup_runs_outside_the_lock():
    import threading

    entered, release = threading.Event(), threading.Event()

    def slow_loader(ids):
        if 2 in ids:
            entered.set()
            release.wait(5)
        return {}

    s = CumulativeState(slow_loader)
    run(s, cp(1, 200, sid=1))
    t = threading.Thread(target=run, args=(s, cp(1, 200, sid=2)))
    t.start()
    assert entered.wait(5)
    done = threading.Event()
    threading.Thread(target=lambda: (run(s, cp(5, 300, sid=1)), done.set())).start()
    assert done.wait(2), "a known series waited for another series' ClickHouse look-up"
    release.set()
    t.join(5)


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
        self.state = CumulativeState(
            committed_state_loader(store), committed_seq=lambda: self.spool.committed_seq
        )
        restore_cumulative(self.state, self.spool)  # as the collector does before receivers start
        self.writer.start()
        self.ingestor = Ingestor(self.spool, metrics, Limits(), self.state)

    def export(self, req, digest, sender=None):
        return self.ingestor.export(req, digest, sender)

    def drain(self):
        deadline = time.time() + 10
        while self.spool.pending_points and time.time() < deadline:
            time.sleep(0.01)
        assert not self.spool.pending_points, "the writer did not commit the spool in time"

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


def test_a_restart_with_a_spool_backlog_does_not_count_twice(tmp_path, store):
    """The first point waits in the spool (ClickHouse was down); after a restart the next point of the
    series is converted against it, not against the older state ClickHouse holds."""
    start = time.time_ns() - 10**10
    p = Pipeline(tmp_path, store)
    try:
        assert p.export(cumulative_request(50, start + 10**9, start), "r0").kind == "ok"
        deadline = time.time() + 10
        while p.spool.pending_points and time.time() < deadline:
            time.sleep(0.01)
        p.writer.shutdown(0)  # ClickHouse goes away: what follows stays in the spool
        assert p.export(cumulative_request(150, start + 2 * 10**9, start), "r1").kind == "ok"
    finally:
        p.spool.shutdown(1)
    assert totals(store) == 50
    p2 = Pipeline(tmp_path, store)  # the restart: backlog of one record (150)
    try:
        assert p2.export(cumulative_request(200, start + 3 * 10**9, start), "r2").kind == "ok"
        deadline = time.time() + 10
        while p2.spool.pending_points and time.time() < deadline:
            time.sleep(0.01)
    finally:
        p2.close()
    assert totals(store) == 200  # the sender's own value
    assert store.scalar(f"SELECT sum(value_int) FROM {store.database}.usage_hourly") == 200


def test_a_double_point_sent_again_in_another_request_counts_zero():
    """Found by an adversarial run: a re-sent cumulative double point (in a request whose bytes differ,
    so request dedup cannot see it) was stored with its full cumulative value again."""
    from meterhouse.collector.decode import decode_request

    state = CumulativeState(lambda ids: {})
    t0 = time.time_ns() - 60 * 10**9
    t1, t2 = t0 + 10**9, t0 + 2 * 10**9

    def stored(*points):
        req = sum_request({"credits": list(points)}, temporality=CUMULATIVE)
        cols = decode_request(
            req, Limits(), now_ns=time.time_ns(), digest="d", cumulative=state
        ).batch.columns
        return sum(cols["value_double"]) + sum(cols["value_int"])

    assert stored(point(100.0, {"org.id": "o"}, t1, t0)) == 100.0
    assert stored(point(100.0, {"org.id": "o"}, t1, t0), point(110.0, {"org.id": "o"}, t2, t0)) == 10.0
    assert stored(point(110.0, {"org.id": "o"}, t2, t0)) == 0.0  # the last point once more
    same = point(120.0, {"org.id": "o"}, t2 + 10**9, t0)
    assert stored(same, same) == 10.0  # twice within one request
    # Integers were right before and stay so.
    assert stored(point(5, {"org.id": "p"}, t1, t0), point(5, {"org.id": "p"}, t1, t0)) == 5


# -- the series key: structural, so no choice of names makes two streams one ----------------------------


def series_request(metric, value, t_ns, start_ns, *, org, scope=("tests", "1.0"), resource=None, attrs=None,
                   unit="1", monotonic=True):  # fmt: skip
    """One cumulative point; unlike sum_request, any metric name, scope and (possibly empty) resource."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(k, v) for k, v in (resource or {}).items())
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = scope
    m = sm.metrics.add(name=metric, unit=unit)
    m.sum.aggregation_temporality = CUMULATIVE
    m.sum.is_monotonic = monotonic
    m.sum.data_points.append(point(value, {"org.id": org, **(attrs or {})}, t_ns=t_ns, start_ns=start_ns))
    return req


def legacy_series_id(metric, org, scope, resource_keys, resource_values, keys, values):
    """The series id of the previous versions, written out here as they computed it: the ids under which
    existing databases hold their cumulative state (``series_state``)."""
    h = hashlib.blake2b(digest_size=8)
    parts = (metric, org, scope, *resource_keys, *resource_values, "\x1e", *keys, "\x1e", *values)
    h.update("\x1f".join(parts).encode())
    return int.from_bytes(h.digest(), "little")


def org_totals(store):
    rows = store.rows(
        f"SELECT org_id, toString(sum(toInt128(value_int))), sum(value_double) "
        f"FROM {store.database}.usage_points GROUP BY org_id"
    )
    return {org: int(ints) + doubles for org, ints, doubles in rows}


VICTIM = Token("ingest-token-of-org-42-00001", ("42",))
ATTACKER = Token("ingest-token-of-org-4242-001", ("4242",))
#: The attacker's metric name: the victim's metric, org, scope and resource keys joined by the old key's
#: separator, so that (with the victim's resource values as the attacker's org and scope) the old
#: unescaped key of the attacker's series was the victim's.
CRAFTED = "api.requests\x1f42\x1fbilling\x1fprocess.pid\x1fservice.name"


def test_a_crafted_metric_name_cannot_reset_another_orgs_cumulative_series(tmp_path, store):
    """Was: the attacker's cumulative 0 reset org 42's series, whose next point then counted its whole
    value again: org 42 billed 2,100 where 1,100 is right, the attacker's org 0."""
    victim_series = {
        "scope": ("billing", "1.0"),
        "resource": {"process.pid": 4242, "service.name": "checkout"},
    }
    # The collision this test is about, in the old key (computed independently of the decoder).
    assert legacy_series_id("api.requests", "42", "billing", ["process.pid", "service.name"],
                            ["4242", "checkout"], [], []) == legacy_series_id(
        CRAFTED, "4242", "checkout", [], [], [], [])  # fmt: skip
    p = Pipeline(tmp_path, store)
    p.ingestor.tokens = IngestTokens((VICTIM, ATTACKER))
    victim = p.ingestor.authenticate(f"Bearer {VICTIM.token}")
    attacker = p.ingestor.authenticate(f"Bearer {ATTACKER.token}")
    start = time.time_ns() - 60 * 10**9
    try:
        first = p.export(series_request("api.requests", 1000, start + 10**9, start, org="42", **victim_series),
                         "v1", victim)  # fmt: skip
        attack = p.export(series_request(CRAFTED, 0, start + 15 * 10**8, start, org="4242",
                                         scope=("checkout", "")), "a1", attacker)  # fmt: skip
        second = p.export(series_request("api.requests", 1100, start + 2 * 10**9, start, org="42",
                                         **victim_series), "v2", victim)  # fmt: skip
        p.drain()
    finally:
        p.close()
    assert org_totals(store).get("42") == 1100, org_totals(store)
    assert org_totals(store).get("4242", 0) == 0
    assert first.kind == second.kind == "ok"
    assert attack.kind == "partial" and "invalid_name" in attack.message  # its name is refused too


@pytest.mark.parametrize(
    ("base", "other"),
    [
        ({"scope": ("lib", "1.0")}, {"scope": ("lib", "2.0")}),
        ({"unit": "By"}, {"unit": "KiBy"}),
        ({"monotonic": True}, {"monotonic": False}),
        # The old separators inside attribute values (allowed there): a resource attribute and a point
        # attribute that joined into the same text.
        ({"resource": {"\x1e": "v"}}, {"attrs": {"v": "\x1e"}}),
        ({"resource": {"a": "1\x1fb"}}, {"resource": {"a\x1f1": "b"}}),
    ],
    ids=["scope_version", "unit", "monotonic", "resource_vs_point", "key_vs_value"],
)
def test_series_that_differ_only_in_what_the_old_key_left_out_or_blurred_are_separate(base, other):
    state = CumulativeState(lambda ids: {})
    start = time.time_ns() - 60 * 10**9
    ids, total = [], 0
    for i, (series, value) in enumerate(((base, 100), (other, 30), (base, 150))):
        req = series_request("credits", value, start + (i + 1) * 10**9, start, org="o", **series)
        r = decode_request(req, Limits(), now_ns=time.time_ns(), digest=str(i), cumulative=state)
        assert r.rejected_count == 0 and r.batch.size == 1
        ids.append(r.batch.columns["series_id"][0])
        total += r.batch.columns["value_int"][0]
    assert ids[0] == ids[2] != ids[1]
    assert total == 150 + 30  # each series its own value


def test_every_component_of_the_series_key_tells_series_apart():
    from meterhouse.collector.decode import series_id

    base = dict(metric="m", kind="sum", unit="1", temporality=2, monotonic=1, org="o", scope=("s", "1"),
                resource=(["r"], ["x"]), keys=["k"], values=["v"])  # fmt: skip
    variants = [
        {"metric": "m2"}, {"kind": "gauge"}, {"unit": "By"}, {"temporality": 1}, {"monotonic": 0},
        {"org": "o2"}, {"scope": ("s", "2")}, {"scope": ("s2", "1")}, {"scope": ("s1", "")},
        {"resource": (["r"], ["y"])}, {"resource": (["r2"], ["x"])}, {"resource": ([], [])},
        {"keys": ["k2"]}, {"values": ["v2"]}, {"keys": [], "values": []},
        # Texts moved across component boundaries (what the legacy key could not tell apart).
        {"metric": "m\x1fo", "org": ""}, {"metric": "", "org": "m"},
        {"resource": (["r", "k"], ["x", "v"]), "keys": [], "values": []},
        {"resource": (["r"], ["x\x1fk"]), "keys": [""], "values": ["v"]},
        {"keys": ["k", "v"], "values": ["", ""]},
    ]  # fmt: skip
    ids = [series_id(**{**base, **v}) for v in [{}, *variants]]
    assert len(set(ids)) == len(ids)
    with pytest.raises(ValueError):  # the encoding relies on as many keys as values
        series_id(**{**base, "keys": ["k", "v"], "values": ["x"]})
    # Pinned: the ids are stored (series_state), so a change of the encoding would make every running
    # series start over (count its whole value again) unless it came with a fallback like the legacy one.
    assert series_id(**base) == 3230373070235245390


class LegacyIds:
    """The stage between an ingestor and the spool that makes its batches what the previous version spooled
    and stored: cumulative rows under the legacy series id."""

    def __init__(self, spool):
        self.spool = spool

    def consume(self, batch):
        c = batch.columns
        for i, sid in enumerate(c["series_id"]):
            if sid:
                c["series_id"][i] = legacy_series_id(
                    c["metric"][i], c["org_id"][i], c["scope_name"][i], c["resource_keys"][i],
                    c["resource_values"][i], c["attr_keys"][i], c["attr_values"][i],
                )  # fmt: skip
        return self.spool.consume(batch)


def upgrade_request(value, t_ns, start_ns):
    return series_request("credits", value, t_ns, start_ns, org="org-u", resource={"service.name": "api"},
                          attrs={"region": "eu"})  # fmt: skip


def test_an_upgrade_continues_series_whose_state_is_under_the_legacy_id(tmp_path, store):
    """A running cumulative series of a database written by the previous version: its next point counts
    the increase only, not its whole value again."""
    start = time.time_ns() - 60 * 10**9
    old = Pipeline(tmp_path / "old", store)
    old.ingestor.next = LegacyIds(old.spool)
    try:
        assert old.export(upgrade_request(1000, start + 10**9, start), "r1").kind == "ok"
        old.drain()
    finally:
        old.close()
    new = Pipeline(tmp_path / "new", store)  # the upgrade: state read back from ClickHouse
    try:
        assert new.export(upgrade_request(1250, start + 2 * 10**9, start), "r2").kind == "ok"
        new.drain()
    finally:
        new.close()
    assert org_totals(store) == {"org-u": 1250}
    ids = store.rows(f"SELECT series_id FROM {store.database}.usage_points ORDER BY time")
    assert ids[0] != ids[1]  # the new point is stored under the new id; the legacy one is not written


def test_an_upgrade_with_legacy_points_in_the_spool_continues_from_them(tmp_path, store):
    """The previous version left points in the spool (ClickHouse was down): the new version converts the
    series' next point against the newest of them, not against the older state ClickHouse holds."""
    start = time.time_ns() - 60 * 10**9
    old = Pipeline(tmp_path, store)
    old.ingestor.next = LegacyIds(old.spool)
    try:
        assert old.export(upgrade_request(100, start + 10**9, start), "r1").kind == "ok"
        old.drain()
        old.writer.shutdown(0)  # ClickHouse goes away: the next point waits in the spool
        assert old.export(upgrade_request(150, start + 2 * 10**9, start), "r2").kind == "ok"
    finally:
        old.spool.shutdown(1)
    new = Pipeline(tmp_path, store)  # the upgrade: the spool is restored, then replayed
    try:
        assert new.export(upgrade_request(200, start + 3 * 10**9, start), "r3").kind == "ok"
        new.drain()
    finally:
        new.close()
    assert org_totals(store) == {"org-u": 200}


def test_the_legacy_fallback_is_read_only_so_a_collision_changes_only_the_colliders_first_delta():
    legacy = 77
    loads = []
    state = CumulativeState(lambda ids: loads.append(sorted(ids)) or {legacy: Entry(100, 150, 40)})

    def convert(sid, t, value):
        (res,), changes = state.convert([CumulativePoint(sid, 100, t, value, True, legacy_id=legacy)])
        assert [c[0] for c in changes] == [sid]  # only the new id's state changes
        return res

    assert convert(1, 200, 50) == (10, 150)  # continues the legacy state
    # Another stream whose old key was the same (the ambiguity): its own first point converts against
    # that state too (a reset here, 0 < 40), and nothing it does reaches series 1.
    assert convert(2, 300, 0) == (0, 100)
    assert convert(1, 400, 60) == (10, 200)
    assert loads == [[1, legacy], [2, legacy]]  # the legacy id is read only beside a new id with no state
    assert len(state) == 2  # entries of series 1 and 2; none under the legacy id


# -- a series whose value type switches between int and double ------------------------------------------


def test_a_series_switching_between_int_and_double_keeps_its_fractions():
    """Was stored as 11.5: the switch back to int truncated the delta 10 - 7.5 to 2."""
    state = CumulativeState(lambda ids: {})
    start = time.time_ns() - 60 * 10**9
    rows = []
    for i, v in enumerate([5, 7.5, 10, 12]):
        req = cumulative_request(v, start + (i + 1) * 10**9, start)
        cols = decode_request(
            req, Limits(), now_ns=time.time_ns(), digest=str(i), cumulative=state
        ).batch.columns
        rows.append({k: col[0] for k, col in cols.items()})
    assert sum(r["value_int"] + r["value_double"] for r in rows) == 12
    # A double stream from the switch on: the rows after it are doubles, with the sender's value.
    assert [(r["is_int"], r["value_int"], r["value_double"]) for r in rows] == [
        (1, 5, 0.0), (0, 0, 2.5), (0, 0, 2.5), (0, 0, 2.0)]  # fmt: skip
    assert [(r["cumulative_int"], r["cumulative_double"]) for r in rows] == [
        (5, 0.0), (0, 7.5), (0, 10.0), (0, 12.0)]  # fmt: skip


def test_a_series_switching_between_int_and_double_keeps_its_fractions_across_restarts(tmp_path, store):
    start = time.time_ns() - 60 * 10**9
    for i, v in enumerate([5, 7.5, 10, 12]):
        p = Pipeline(tmp_path / str(i), store)  # a fresh process each time: state read back from ClickHouse
        try:
            out = p.export(cumulative_request(v, start + (i + 1) * 10**9, start), f"r{i}")
            assert out.kind == "ok", out.message
            p.drain()
        finally:
            p.close()
    assert org_totals(store) == {"org-c": 12}
    rows = store.rows(f"SELECT is_int, value_double FROM {store.database}.usage_points ORDER BY time")
    assert [tuple(r) for r in rows] == [(1, 0.0), (0, 2.5), (0, 2.5), (0, 2.0)]
    hourly = store.rows(
        f"SELECT toString(sum(value_int)), sum(value_double) FROM {store.database}.usage_hourly"
    )
    assert int(hourly[0][0]) + hourly[0][1] == 12


def test_in_a_double_stream_an_int_point_sent_again_counts_zero():
    s = CumulativeState(lambda ids: {})
    run(s, cp(7.5, 200))
    big = 2**63 - 1  # not a double: equal to the state it leaves only when taken as one
    assert run(s, cp(big, 300)) == [(float(big) - 7.5, 200)]
    assert run(s, cp(big, 300)) == [(0.0, 100)]  # the same point again, not out_of_order
    assert run(s, cp(10, 400, start=350)) == [(10.0, 350)]  # a reset stays a double stream


class RefusedWhileSwitchedOn:
    """A store whose inserts the server refuses for good (a type mismatch) while ``refuse`` is set."""

    refuse = False

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _check(self):
        from meterhouse.collector.writer import PermanentError

        if RefusedWhileSwitchedOn.refuse:
            raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view. (TYPE_MISMATCH)")

    def insert_native(self, *args, **kwargs):
        self._check()
        return self._real.insert_native(*args, **kwargs)

    def insert_in_doubt(self, *args, **kwargs):
        self._check()
        return self._real.insert_in_doubt(*args, **kwargs)


def test_a_dead_lettered_cumulative_point_stays_in_the_conversion_state_across_a_restart(
    engine_dir, tmp_path
):
    """A cumulative point acknowledged and then dead-lettered, a restart, the series' next point, then the
    redrive: the next point's delta must start where the dead-lettered one ended. Rebuilt from
    ``series_state`` alone (which never saw the dead-lettered point), it covered that interval again:
    acknowledged 200, stored 250 once the letter was re-driven."""
    import uuid

    import requests
    from conftest import drain, shared_engine

    from meterhouse.cli import redrive
    from meterhouse.collector.deadletter import DeadLetters
    from meterhouse.core.config import Config
    from meterhouse.runtime import Stack

    database = f"dl_{uuid.uuid4().hex[:12]}"
    config = Config(data_dir=tmp_path / "stack", database=database, otlp_http_port=0, otlp_grpc_port=0,
                    http_port=0, sql_port=0, flush_interval_s=0.05)  # fmt: skip
    connect = shared_engine(engine_dir, database)
    start = time.time_ns() - 60 * 10**9

    def send(stack, value, i):
        body = cumulative_request(value, start + i * 10**9, start).SerializeToString()
        r = requests.post(f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics", data=body,
                          headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text

    stack = Stack(config, lambda url: RefusedWhileSwitchedOn(connect(url)))
    stack.start()
    try:
        send(stack, 100, 1)
        drain(stack)
        RefusedWhileSwitchedOn.refuse = True
        send(stack, 150, 2)  # acknowledged, then refused for good: a dead letter
        drain(stack)
        assert stack.collector.writer.dead_letters.count() == 1
    finally:
        RefusedWhileSwitchedOn.refuse = False
        stack.shutdown(5)
    stack = Stack(config, lambda url: RefusedWhileSwitchedOn(connect(url)))  # the restart
    stack.start()
    try:
        send(stack, 200, 3)
        drain(stack)
    finally:
        stack.shutdown(5)
    store = connect("embedded")
    try:
        assert redrive(DeadLetters(config.data_dir / "dead-letter"), store) == (1, 0)
        assert totals(store) == 200  # the sender's own value
        assert store.scalar(f"SELECT sum(value_int) FROM {database}.usage_hourly") == 200
    finally:
        store.client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


def test_the_conversion_state_is_the_newest_of_committed_and_dead_lettered_points():
    """A series' state after a restart: ClickHouse's ``series_state`` or a dead letter's point, whichever
    is newer (a point committed after the dead-lettered one wins; the letter's wins over an older one)."""
    from meterhouse.collector.ingest import with_dead_letters

    committed = {1: Entry(100, 200, 10), 2: Entry(100, 500, 50)}
    lettered = {1: Entry(100, 300, 30), 2: Entry(100, 400, 40), 3: Entry(100, 300, 7)}
    load = with_dead_letters(lambda ids: {i: committed[i] for i in ids if i in committed},
                             lambda ids: {i: lettered[i] for i in ids if i in lettered})  # fmt: skip
    assert load([1, 2, 3, 4]) == {1: lettered[1], 2: committed[2], 3: lettered[3]}
    s = CumulativeState(load)
    assert run(s, cp(45, 600, sid=1), cp(60, 600, sid=2), cp(9, 600, sid=3)) == [
        (15, 300),
        (10, 500),
        (2, 300),
    ]
