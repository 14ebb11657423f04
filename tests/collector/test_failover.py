"""Endpoint failover with the real engine. No ClickHouse server runs here, so two handles on the
embedded engine stand in for two replicas of one cluster, with outages injected at the endpoint
boundary (a store returned by `connect_endpoint` that fails while listed as down); one case uses a real HTTP URL on a closed port."""

import json
import time

import pytest
from conftest import free_port, shared_engine
from faulty_store import faulty_connect
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.deadletter import DeadLetters
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.failover import EndpointSet
from meterhouse.collector.model import content_digest
from meterhouse.collector.spool import Spool
from meterhouse.collector.writer import Writer
from meterhouse.core.metrics import PipelineMetrics


def batch(org, value):
    req = sum_request({"api": [point(value, {"org.id": org})]})
    return decode_request(
        req, Limits(), now_ns=time.time_ns(), digest=content_digest(req.SerializeToString())
    ).batch


class Rig:
    def __init__(self, tmp_path, engine_dir, database, urls, hold_s=0.5):
        self.faults_file = tmp_path / "faults.json"
        self.faults_file.write_text("{}")
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.endpoints = EndpointSet(
            urls, faulty_connect(shared_engine(engine_dir, database), self.faults_file), self.metrics, database,
            failover_after_failures=2, failback_hold_s=hold_s, health_check_interval_s=0.05,
        )  # fmt: skip
        self.spool = Spool(tmp_path / "spool")
        self.spool.open()
        self.writer = Writer(self.spool, self.endpoints, self.metrics, DeadLetters(tmp_path / "dl"),
                             flush_interval_s=0.01, backoff_base_s=0.01, backoff_max_s=0.05)  # fmt: skip

    def __enter__(self):
        self.endpoints.start()
        self.writer.start()
        return self

    def __exit__(self, *exc):
        self.writer.shutdown(5)
        self.spool.shutdown(1)
        self.endpoints.shutdown(2)

    def down(self, *names):
        time.sleep(0.01)  # a new mtime for the injector
        self.faults_file.write_text(json.dumps({"down": list(names)}))

    def wait(self, cond, timeout_s=10):
        deadline = time.monotonic() + timeout_s
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cond()

    def failovers(self, src, dst):
        return self.registry.get_sample_value("meterhouse_failovers_total",
                                              {"from_endpoint": src, "to_endpoint": dst}) or 0  # fmt: skip


@pytest.fixture
def db(store):
    return store


def totals(store):
    return store.scalar(f"SELECT sum(toInt128(value_int)) FROM {store.database}.usage_points") or 0


def test_failover_and_failback_with_exact_totals(tmp_path, engine_dir, db):
    with Rig(tmp_path, engine_dir, db.database, ["embedded#a", "embedded#b"]) as rig:
        ep = rig.endpoints
        assert ep.name == "embedded#a"
        rig.spool.consume(batch("o", 1))
        rig.wait(lambda: rig.spool.pending_points == 0)

        rig.down("embedded#a")
        t0 = time.monotonic()
        rig.spool.consume(batch("o", 10))
        rig.wait(lambda: ep.name == "embedded#b")
        switched_in = time.monotonic() - t0
        rig.wait(lambda: rig.spool.pending_points == 0)
        assert rig.failovers("embedded#a", "embedded#b") == 1
        assert rig.registry.get_sample_value("meterhouse_endpoint_up", {"endpoint": "embedded#a"}) == 0
        assert rig.registry.get_sample_value("meterhouse_endpoint_active", {"endpoint": "embedded#b"}) == 1

        rig.down()  # a recovers: writes return after the hold-down, not before
        rig.wait(
            lambda: rig.registry.get_sample_value("meterhouse_endpoint_up", {"endpoint": "embedded#a"}) == 1
        )
        assert ep.name == "embedded#b"
        rig.wait(lambda: ep.name == "embedded#a")
        assert rig.failovers("embedded#b", "embedded#a") == 1
        rig.spool.consume(batch("o", 100))
        rig.wait(lambda: rig.spool.pending_points == 0)
    assert switched_in < 5
    assert totals(db) == 111
    assert db.scalar(f"SELECT sum(value_int) FROM {db.database}.usage_hourly") == 111
    events = db.rows(f"SELECT kind, source, target FROM {db.database}.pipeline_events ORDER BY time")
    assert [e for e in events if e[0] in ("failover", "failback")] == [
        ("failover", "embedded#a", "embedded#b"),
        ("failback", "embedded#b", "embedded#a"),
    ]


def test_a_flapping_endpoint_does_not_pull_writes_back(tmp_path, engine_dir, db):
    with Rig(tmp_path, engine_dir, db.database, ["embedded#a", "embedded#b"], hold_s=1.0) as rig:
        rig.down("embedded#a")
        rig.wait(lambda: rig.endpoints.name == "embedded#b")
        for _ in range(5):  # up for less than the hold-down, then down again
            rig.down()
            time.sleep(0.3)
            rig.down("embedded#a")
            time.sleep(0.15)
        assert rig.endpoints.name == "embedded#b"
        assert rig.failovers("embedded#b", "embedded#a") == 0


def test_a_closed_http_port_first_moves_writes_to_the_next_endpoint(tmp_path, engine_dir, db):
    closed = f"http://127.0.0.1:{free_port()}"
    with Rig(tmp_path, engine_dir, db.database, [closed, "embedded#b"]) as rig:
        rig.wait(lambda: rig.endpoints.name == "embedded#b")
        rig.spool.consume(batch("o", 5))
        rig.wait(lambda: rig.spool.pending_points == 0)
        assert rig.registry.get_sample_value("meterhouse_endpoint_up", {"endpoint": closed}) == 0
    assert totals(db) == 5


def test_when_every_endpoint_is_down_the_spool_holds_until_one_returns(tmp_path, engine_dir, db):
    with Rig(tmp_path, engine_dir, db.database, ["embedded#a", "embedded#b"]) as rig:
        rig.down("embedded#a", "embedded#b")
        time.sleep(0.3)
        for v in (1, 2, 3):
            rig.spool.consume(batch("o", v))
        time.sleep(0.5)
        assert rig.spool.pending_points == 3 and totals(db) == 0
        assert rig.registry.get_sample_value("meterhouse_insert_retries_total") > 0
        rig.down("embedded#a")
        rig.wait(lambda: rig.spool.pending_points == 0)
    assert totals(db) == 6


def test_failing_reads_never_take_the_write_endpoint_down(tmp_path, engine_dir, db):
    """Three failing API queries used to mark the endpoint down: /readyz 503 and the next write error
    failed over at once. Reads have health of their own."""
    with Rig(tmp_path, engine_dir, db.database, ["embedded#a", "embedded#b"]) as rig:
        rig.wait(lambda: rig.endpoints.endpoints[0].up)
        reads = rig.endpoints.reads()
        for _ in range(5):
            with pytest.raises(Exception, match="no_such_column|Missing columns|UNKNOWN_IDENTIFIER"):
                reads.rows("SELECT no_such_column FROM system.one")
        assert reads.failures == 5
        ep = rig.endpoints.endpoints[0]
        assert ep.up and ep.failures == 0 and rig.endpoints.active == 0
        assert reads.ping()  # readiness follows the write path
        rig.spool.consume(batch("a", 3))
        rig.wait(lambda: totals(db) == 3)
        assert reads.scalar(f"SELECT sum(toInt128(value_int)) FROM {db.database}.usage_points") == 3
        assert rig.failovers("embedded#a", "embedded#b") == 0
