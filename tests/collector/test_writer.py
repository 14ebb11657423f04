"""The batch writer against the real embedded ClickHouse engine."""

import time

import pytest
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.model import Backpressure, content_digest
from meterhouse.collector.writer import BatchWriter
from meterhouse.core.metrics import PipelineMetrics


def batch_of(points_by_metric, digest=None):
    req = sum_request(points_by_metric)
    raw = req.SerializeToString()
    return decode_request(req, Limits(), now_ns=time.time_ns(), digest=digest or content_digest(raw)).batch


def totals(store, table="usage_points"):
    col = "toInt128(value_int)" if table == "usage_points" else "value_int"
    return dict(
        store.rows(f"SELECT org_id, sum({col}) FROM {store.database}.{table} GROUP BY org_id ORDER BY org_id")
    )


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def writer(store, registry):
    w = BatchWriter(store, PipelineMetrics(registry), flush_interval_s=0.05, flush_max_points=1000)
    w.start()
    yield w
    w.shutdown(5)


def test_batches_are_committed_and_rolled_up_exactly(store, writer, registry):
    big = 2**62
    acks = [
        writer.consume(batch_of({"api": [point(big, {"org.id": "a"}), point(big, {"org.id": "a"})]})),
        writer.consume(batch_of({"api": [point(3, {"org.id": "b", "f": "x"}), point(4, {"org.id": "b"})]})),
    ]
    assert all(a.wait(10) for a in acks)
    # 2 × 2^62 overflows Int64; the sums are exact Int128.
    assert totals(store) == {"a": 2 * big, "b": 7}
    assert totals(store, "usage_hourly") == totals(store)
    assert registry.get_sample_value("meterhouse_points_written_total") == 4
    assert registry.get_sample_value("meterhouse_ingest_lag_seconds_count") == 2
    assert registry.get_sample_value("meterhouse_last_commit_timestamp_seconds") > 0


def test_the_same_batch_written_twice_counts_once(store):
    b = batch_of({"api": [point(5, {"org.id": "a"})]}, digest="same-request")
    w = BatchWriter(store, PipelineMetrics(CollectorRegistry()), flush_interval_s=0.01)
    w.start()
    try:
        assert w.consume(b).wait(10)
        assert w.consume(b).wait(10)
    finally:
        w.shutdown(5)
    assert totals(store) == {"a": 5}
    assert totals(store, "usage_hourly") == {"a": 5}


def test_many_small_requests_are_merged_into_few_inserts(store, registry):
    w = BatchWriter(store, PipelineMetrics(registry), flush_interval_s=0.5, flush_max_points=10_000)
    w.start()
    try:
        acks = [w.consume(batch_of({"api": [point(1, {"org.id": f"o{i % 7}"})]})) for i in range(200)]
        assert all(a.wait(10) for a in acks)
    finally:
        w.shutdown(5)
    assert sum(totals(store).values()) == 200
    inserts = registry.get_sample_value("meterhouse_insert_duration_seconds_count")
    assert 1 <= inserts <= 5


def test_shutdown_flushes_what_is_buffered(store):
    w = BatchWriter(store, PipelineMetrics(CollectorRegistry()), flush_interval_s=60)
    w.start()
    ack = w.consume(batch_of({"api": [point(9, {"org.id": "a"})]}))
    w.shutdown(10)
    assert ack.wait(0) and totals(store) == {"a": 9}
    w.shutdown(1)  # idempotent


def test_shutdown_without_start_is_safe(store):
    BatchWriter(store, PipelineMetrics(CollectorRegistry())).shutdown(1)


class FailingStore:
    """Fault injection at the engine boundary: inserts fail until `heal()`; queries pass through."""

    def __init__(self, real, failures: int):
        self.real, self.failures, self.name, self.database = real, failures, "faulty", real.database

    def insert_points(self, columns, token):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("injected: engine unavailable")
        self.real.insert_points(columns, token)


def test_retryable_failures_are_retried_then_committed(store, registry):
    w = BatchWriter(FailingStore(store, 2), PipelineMetrics(registry), flush_interval_s=0.01,
                    insert_attempts=5, backoff_base_s=0.01)  # fmt: skip
    w.start()
    try:
        assert w.consume(batch_of({"api": [point(2, {"org.id": "a"})]})).wait(10)
    finally:
        w.shutdown(5)
    assert registry.get_sample_value("meterhouse_insert_retries_total") == 2
    assert totals(store) == {"a": 2}


def test_giving_up_fails_the_ack_so_the_client_retries(store, registry):
    w = BatchWriter(FailingStore(store, 100), PipelineMetrics(registry), flush_interval_s=0.01,
                    insert_attempts=3, backoff_base_s=0.01)  # fmt: skip
    w.start()
    try:
        ack = w.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        assert not ack.wait(10)
        assert "injected" in ack.error
    finally:
        w.shutdown(5)
    assert registry.get_sample_value("meterhouse_insert_failures_total") == 1
    assert totals(store) == {}


def test_a_full_buffer_pushes_back(store):
    w = BatchWriter(store, PipelineMetrics(CollectorRegistry()), flush_interval_s=60, max_pending_points=3)
    try:
        w.consume(batch_of({"api": [point(1, {"org.id": "a"}), point(1, {"org.id": "a"})]}))
        with pytest.raises(Backpressure):
            w.consume(batch_of({"api": [point(1, {"org.id": "a"}), point(1, {"org.id": "a"})]}))
    finally:
        w.start()
        w.shutdown(5)
    assert totals(store) == {"a": 2}
