"""Spool → writer → the real embedded ClickHouse: exactly once, retries, dead letters."""

import time

import pytest
from faulty_files import FaultyFiles
from otlp_builders import point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.deadletter import DeadLetters
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.model import content_digest
from meterhouse.collector.spool import INTENT, Spool
from meterhouse.collector.writer import PermanentError, Writer, classify
from meterhouse.core import schema
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


class Rig:
    """A spool and a writer on a store, as `meterhouse up` builds them."""

    def __init__(self, tmp_path, store, registry=None, **kw):
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.spool = Spool(tmp_path / "spool")
        self.report = self.spool.open()
        self.dead = DeadLetters(tmp_path / "dead")
        kw.setdefault("flush_interval_s", 0.02)
        kw.setdefault("backoff_base_s", 0.005)
        self.writer = Writer(self.spool, store, self.metrics, self.dead, **kw)

    def __enter__(self):
        self.writer.start()
        return self

    def __exit__(self, *exc):
        self.writer.shutdown(5)
        self.spool.shutdown(1)

    def drain(self, timeout_s=10):
        deadline = time.monotonic() + timeout_s
        while self.spool.pending_points and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.spool.pending_points == 0

    def value(self, name, labels=None):
        return self.registry.get_sample_value(name, labels or {})


def test_spooled_batches_are_committed_and_rolled_up_exactly(tmp_path, store):
    big = 2**62
    with Rig(tmp_path, store) as rig:
        rig.spool.consume(batch_of({"api": [point(big, {"org.id": "a"}), point(big, {"org.id": "a"})]}))
        rig.spool.consume(batch_of({"api": [point(3, {"org.id": "b", "f": "x"}), point(4, {"org.id": "b"})]}))
        rig.drain()
    assert totals(store) == {"a": 2 * big, "b": 7}  # beyond Int64: exact Int128 sums
    assert totals(store, "usage_hourly") == totals(store)
    assert rig.value("meterhouse_points_written_total") == 4
    assert rig.value("meterhouse_ingest_lag_seconds_count") == 2


def test_the_same_batch_inserted_twice_counts_once(tmp_path, store):
    b = batch_of({"api": [point(5, {"org.id": "a"})]}, digest="same-request")
    with Rig(tmp_path, store) as rig:
        rig.spool.consume(b)
        rig.drain()
        rig.spool.consume(b)  # the same content again: the same token
        rig.drain()
    assert totals(store) == {"a": 5} and totals(store, "usage_hourly") == {"a": 5}


def test_many_small_requests_make_few_inserts(tmp_path, store):
    with Rig(tmp_path, store, flush_interval_s=0.3, flush_max_points=10_000) as rig:
        for i in range(200):
            rig.spool.consume(batch_of({"api": [point(1, {"org.id": f"o{i % 7}"})]}))
        rig.drain()
    assert sum(totals(store).values()) == 200
    assert 1 <= rig.value("meterhouse_insert_duration_seconds_count") <= 5


def test_shutdown_writes_what_is_spooled(tmp_path, store):
    rig = Rig(tmp_path, store, flush_interval_s=60)
    rig.writer.start()
    rig.spool.consume(batch_of({"api": [point(9, {"org.id": "a"})]}))
    rig.writer.shutdown(10)
    assert totals(store) == {"a": 9}
    rig.writer.shutdown(1)  # idempotent
    Writer(rig.spool, store, rig.metrics, rig.dead).shutdown(1)  # safe without start


class FailingStore:
    """Fault injection at the engine boundary: inserts raise until healed; the rest passes through."""

    def __init__(self, real, failures: int, error: Exception | None = None):
        self.real, self.failures, self.name, self.database = real, failures, "faulty", real.database
        self.error = error or ConnectionError("injected: engine unavailable")

    def insert_native(self, table, names, block, token):
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        self.real.insert_native(table, names, block, token)

    def active_healthy(self):
        return isinstance(self.error, ConnectionError) is False


def test_retryable_failures_are_retried_until_they_succeed(tmp_path, store):
    with Rig(tmp_path, FailingStore(store, 6)) as rig:
        rig.spool.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        rig.drain()
    assert rig.value("meterhouse_insert_retries_total") == 6
    assert totals(store) == {"a": 2}
    assert rig.value("meterhouse_dead_letter_batches_total") == 0


def test_permanent_errors_go_to_the_dead_letters_and_can_be_redriven(tmp_path, store):
    failing = FailingStore(store, 1, PermanentError("Code: 53. DB::Exception: Type mismatch"))
    with Rig(tmp_path, failing) as rig:
        rig.spool.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        rig.spool.consume(batch_of({"api": [point(3, {"org.id": "b"})]}))
        rig.drain()
    assert rig.value("meterhouse_dead_letter_batches_total") == 1
    assert totals(store) in ({}, {"b": 3})  # the refused batch (maybe grouped with b) is not in
    (letter,) = rig.dead.list(with_batches=True)
    assert "Type mismatch" in letter.reason and letter.points in (1, 2)
    assert letter.code == 53  # named by the server's error code

    from meterhouse.cli import redrive

    assert redrive(rig.dead, store) == (1, 0)
    assert totals(store) == {"a": 2, "b": 3}
    assert rig.dead.list() == []


def test_a_batch_failing_on_a_healthy_endpoint_is_poison_after_n_attempts(tmp_path, store):
    class Poison(FailingStore):
        def active_healthy(self):
            return True

    poison = Poison(store, 100, RuntimeError("Code: 1001. DB::Exception: an error never seen before"))
    with Rig(tmp_path, poison, poison_after_attempts=3) as rig:
        rig.spool.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        rig.drain()
    assert rig.value("meterhouse_dead_letter_batches_total") == 1
    assert rig.value("meterhouse_insert_failures_total", {"cause": "other"}) == 3
    (letter,) = rig.dead.list()
    assert letter.code == 1001 and "Code: 1001" in letter.reason  # named by the server's code


def test_an_unknown_error_without_a_server_code_is_never_a_dead_letter(tmp_path, store):
    """Only the server refuses content for good: an error that carries no ClickHouse code (the client's,
    the network's) is retried, however long the endpoint otherwise looks healthy."""

    class Odd(FailingStore):
        def active_healthy(self):
            return True

    odd = Odd(store, 8, RuntimeError("the client library tripped over something"))
    with Rig(tmp_path, odd, poison_after_attempts=3, backoff_max_s=0.02) as rig:
        rig.spool.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        rig.drain()
    assert rig.dead.list() == []
    assert totals(store) == {"a": 2}
    assert rig.value("meterhouse_insert_failures_total", {"cause": "other"}) == 8


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectionError("refused"), "transient"),
        (RuntimeError("Code: 241. DB::Exception: Memory limit exceeded"), "transient"),
        (RuntimeError("Code: 252. DB::Exception: Too many parts"), "transient"),
        (RuntimeError("Code: 1001. DB::Exception: something new"), "retryable"),
        (RuntimeError("Code: 53. DB::Exception: Type mismatch"), "permanent"),
        (TypeError("bad column"), "permanent"),
        (TimeoutError(), "transient"),
    ],
)
def test_error_classification(error, kind):
    assert classify(error) == kind


#: What ClickHouse says when its disk is full, read-only or failing, out of memory, overloaded or slow: the
#: messages as the embedded engine and a server give them (243 measured on a full tmpfs).
SERVER_TROUBLE = [
    ("Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space: while pushing to view "
     "meterhouse.metric_catalog_points_mv. (NOT_ENOUGH_SPACE)", "disk_full"),
    ("Code: 75. DB::ErrnoException: Cannot write to file /data/clickhouse/store/74b/tmp_insert_202612_2_2_0/"
     "data.bin, errno: 28, strerror: No space left on device. (CANNOT_WRITE_TO_FILE_DESCRIPTOR)", "disk_full"),
    ("Code: 1001. DB::Exception: std::__1::__fs::filesystem::filesystem_error: filesystem error: in "
     "create_directory: No space left on device [/data/clickhouse/store/abc]. (STD_EXCEPTION)", "disk_full"),
    ("Code: 241. DB::Exception: Memory limit (total) exceeded: would use 3.51 GiB. (MEMORY_LIMIT_EXCEEDED)",
     "memory"),
    ("Code: 252. DB::Exception: Too many parts (3001) in all partitions in total. (TOO_MANY_PARTS)",
     "too_many_parts"),
    ("Code: 242. DB::Exception: Table is in readonly mode: replica_path=/clickhouse/tables/01/usage_points. "
     "(TABLE_IS_READ_ONLY)", "read_only"),
    ("Code: 1000. DB::Exception: File access error: read-only file system: /data/clickhouse/store/74b. "
     "(POCO_EXCEPTION)", "read_only"),
    ("Code: 1000. DB::Exception: Cannot write to file /data/clickhouse/format_version.txt. (POCO_EXCEPTION)",
     "read_only"),
    ("Code: 74. DB::ErrnoException: Cannot read from file /data/clickhouse/store/74b/all_1_1_0/data.bin, "
     "errno: 5, strerror: Input/output error. (CANNOT_READ_FROM_FILE_DESCRIPTOR)", "read_only"),
    ("Code: 204. DB::ErrnoException: Cannot fsync /data/clickhouse/store/74b/all_1_1_0/checksums.txt, "
     "errno: 5, strerror: Input/output error. (CANNOT_FSYNC)", "read_only"),
    ("Code: 159. DB::Exception: Timeout exceeded: elapsed 30.1 seconds. (TIMEOUT_EXCEEDED)", "timeout"),
    ("Code: 209. DB::NetException: Timeout exceeded while reading from socket. (SOCKET_TIMEOUT)", "timeout"),
    ("Code: 202. DB::Exception: Too many simultaneous queries. Maximum: 100. (TOO_MANY_SIMULTANEOUS_QUERIES)",
     "unavailable"),
    ("Code: 210. DB::NetException: Connection refused (localhost:9000). (NETWORK_ERROR)", "unavailable"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "cause"), SERVER_TROUBLE)
def test_server_trouble_is_transient_and_named_by_its_cause(message, cause):
    from meterhouse.collector.writer import failure_cause

    assert classify(RuntimeError(message)) == "transient"
    assert failure_cause(RuntimeError(message)) == cause


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ConnectionError("refused"), "unavailable"),
        (TimeoutError(), "timeout"),
        (RuntimeError("Code: 53. DB::Exception: Type mismatch (TYPE_MISMATCH)"), "refused"),
        # Content the server refuses for good, whatever the data it quotes says.
        (
            RuntimeError("Code: 27. DB::Exception: Cannot parse input: expected 'No space left on device'"),
            "refused",
        ),  # fmt: skip
        (TypeError("bad column"), "refused"),
        (RuntimeError("Code: 1001. DB::Exception: an error never seen before"), "other"),
        (RuntimeError("something without a code"), "other"),
    ],
)
def test_every_failure_has_one_cause_of_a_fixed_set(error, cause):
    from meterhouse.collector.writer import failure_cause
    from meterhouse.core.metrics import INSERT_FAILURE_CAUSES

    assert failure_cause(error) == cause
    assert cause in INSERT_FAILURE_CAUSES
    assert classify(error) == {"refused": "permanent", "other": "retryable"}.get(cause, "transient")


def test_a_group_over_more_than_a_hundred_months_is_written_not_retried_forever(tmp_path, store):
    """A backfill (``--max-past-s`` of ten years): one request's points over nine. ClickHouse refuses an
    insert block of more than 100 partitions by default (TOO_MANY_PARTS, an overload code, retried for as
    long as it takes): the writer would retry it forever and every later group would wait behind it."""
    month = 31 * 86400 * 10**9
    now = time.time_ns()
    req = sum_request({"api": [point(1, {"org.id": "a"}, t_ns=now - k * month) for k in range(110)]})
    limits = Limits(max_past_ns=10 * 366 * 86400 * 10**9)
    b = decode_request(req, limits, now_ns=now, digest=content_digest(req.SerializeToString())).batch
    assert b.size == 110
    with Rig(tmp_path, store) as rig:
        rig.spool.consume(b)
        rig.spool.consume(batch_of({"api": [point(5, {"org.id": "b"})]}))
        rig.drain(30)
    assert totals(store) == {"a": 110, "b": 5}
    assert totals(store, "usage_hourly") == totals(store)


def test_a_spool_replay_of_a_committed_batch_counts_once(tmp_path, store):
    """Crash after the insert and before the spool's COMMIT: the replay repeats the insert, same token."""
    rig = Rig(tmp_path, store)
    rig.spool.consume(batch_of({"api": [point(4, {"org.id": "a"})]}))
    rig.spool.consume(batch_of({"api": [point(5, {"org.id": "b"})]}))
    rig.spool.commit = lambda group: None  # the process dies before it can record the commit
    rig.writer.start()
    deadline = time.monotonic() + 10
    while not totals(store) and time.monotonic() < deadline:
        time.sleep(0.01)
    rig.writer.shutdown(1)
    rig.spool.shutdown(1)
    assert totals(store) == {"a": 4, "b": 5}

    with Rig(tmp_path, store) as again:  # restart: the same spool directory
        assert again.report.replay_groups >= 1
        again.drain()
    assert totals(store) == {"a": 4, "b": 5}
    assert totals(store, "usage_hourly") == {"a": 4, "b": 5}


def test_the_writer_survives_an_io_error_writing_its_intent(tmp_path, store):
    files = FaultyFiles()
    rig = Rig(tmp_path, store)
    rig.spool.files = files  # the spool's file layer (as the constructor would take it)
    with rig:
        files.fail_kind = INTENT
        files.fail_write()  # ENOSPC on the writer's intent
        rig.spool.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        rig.drain()
        assert rig.writer.running
    assert totals(store) == {"a": 2}
    assert rig.value("meterhouse_writer_errors_total") == 1


class OverloadedStore(FailingStore):
    def active_healthy(self):
        return True  # SELECT 1 works; inserts are refused for overload


@pytest.mark.parametrize(("error", "cause"), SERVER_TROUBLE, ids=[c for _m, c in SERVER_TROUBLE])
def test_overload_is_retried_for_as_long_as_it_takes_never_dead_lettered(tmp_path, store, error, cause):
    """``SELECT 1`` passes while the disk is full, read-only or failing (the endpoint is healthy): the
    group is retried until the server takes it, never a dead letter, and every failure names its cause."""
    overloaded = OverloadedStore(store, 12, RuntimeError(error))
    with Rig(tmp_path, overloaded, poison_after_attempts=3, backoff_max_s=0.05) as rig:
        rig.spool.consume(batch_of({"api": [point(2, {"org.id": "a"})]}))
        rig.drain()
    assert rig.value("meterhouse_dead_letter_batches_total") == 0
    assert rig.dead.list() == []
    assert totals(store) == {"a": 2}
    assert rig.value("meterhouse_insert_failures_total", {"cause": cause}) == 12
    assert rig.value("meterhouse_insert_failures_total", {"cause": "other"}) == 0


class DistributionsRefused:
    """Numbers go in; the distributions insert is refused for good."""

    def __init__(self, real):
        self.real, self.name, self.database = real, "faulty", real.database

    def insert_native(self, table, names, block, token):
        if table == schema.DIST_INGEST_TABLE:
            raise PermanentError("Code: 53. DB::Exception: Type mismatch")
        self.real.insert_native(table, names, block, token)


def test_a_dead_letter_holds_only_the_table_that_was_not_inserted(tmp_path, store):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from otlp_builders import kv

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="latency")
    m.histogram.aggregation_temporality = 1
    dp = m.histogram.data_points.add(time_unix_nano=time.time_ns(), start_time_unix_nano=1, count=3, sum=6.0)
    dp.bucket_counts.extend([1, 2])
    dp.explicit_bounds.extend([1.0])
    dp.attributes.append(kv("org.id", "a"))
    number = batch_of({"api": [point(2, {"org.id": "a"})]})
    dist = decode_request(req, Limits(), now_ns=time.time_ns(), digest="h").batch
    assert dist.dist_size
    with Rig(tmp_path, DistributionsRefused(store)) as rig:
        rig.spool.consume(number)
        rig.spool.consume(dist)
        rig.drain()
    (letter,) = rig.dead.list(with_batches=True)
    assert letter.points == dist.dist_size  # the numbers are in and are not redriven again
    assert sum(b.size for b in letter.batches) == 0


def test_a_committed_requests_digest_is_durable_before_the_spool_forgets_it(tmp_path, store):
    """The writer may commit a record before the ingest thread has added its digest; after a crash the
    digest must still be known, or a re-sent copy of an acknowledged request is stored again."""
    from meterhouse.collector.dedup import RecentRequests

    recent = RecentRequests(tmp_path / "recent.log", window_s=60)
    recent.load()
    b = batch_of({"api": [point(2, {"org.id": "a"})]}, digest="d" * 32)
    with Rig(tmp_path, store, before_commit=recent.committed) as rig:
        rig.spool.consume(b)  # durable; the ingest thread has not yet called recent.add
        rig.drain()
    again = RecentRequests(tmp_path / "recent.log", window_s=60)  # a restart (no close: a crash)
    again.load()
    assert again.claim("d" * 32) == "settled"


# -- replays of groups of many records, numbers and distributions ---------------------------------------

I64_MIN, I64_MAX, U64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def mixed_request(i, t_ns):
    """Sums at the Int64 limits, a gauge, a histogram without a sum, an exponential histogram with
    negative offsets and scale, and a summary; unicode and empty attribute values."""
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
    from otlp_builders import kv

    delta = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    org = ["a", "ö✓", "c"][i % 3]
    attrs = {"org.id": org, "k": "" if i % 2 else "ü" * (i % 7)}
    req = sum_request({"api": [point(I64_MAX, attrs, t_ns=t_ns), point(I64_MIN + i, attrs, t_ns=t_ns),
                               point(i + 1, attrs, t_ns=t_ns)]}, monotonic=False)  # fmt: skip
    sm = req.resource_metrics[0].scope_metrics[0]
    g = sm.metrics.add()
    g.name = "temp"
    dp = g.gauge.data_points.add(time_unix_nano=t_ns, as_double=-0.5 * i)
    dp.attributes.append(kv("org.id", org))
    h = sm.metrics.add()
    h.name, h.unit = "latency", "ms"
    h.histogram.aggregation_temporality = delta
    hp = h.histogram.data_points.add(time_unix_nano=t_ns, start_time_unix_nano=t_ns - 10**9, count=U64_MAX,
                                     bucket_counts=[U64_MAX - i, i], explicit_bounds=[1.5], min=-1e308)  # fmt: skip
    hp.attributes.append(kv("org.id", org))
    e = sm.metrics.add()
    e.name = "size"
    e.exponential_histogram.aggregation_temporality = delta
    ep = e.exponential_histogram.data_points.add(
        time_unix_nano=t_ns, start_time_unix_nano=t_ns - 10**9, count=11 + i, sum=1e-300, scale=-10,
        zero_count=3, zero_threshold=1e-9, max=2.0,
    )  # fmt: skip
    ep.positive.offset, ep.negative.offset = -(2**31), 2**31 - 1
    ep.positive.bucket_counts.extend([1, 2 + i])
    ep.negative.bucket_counts.extend([5])
    ep.attributes.append(kv("org.id", org))
    s = sm.metrics.add()
    s.name = "rtt"
    sp = s.summary.data_points.add(time_unix_nano=t_ns, start_time_unix_nano=t_ns - 10**9, count=2, sum=3.5)
    sp.quantile_values.add(quantile=0.5, value=1.0)
    sp.quantile_values.add(quantile=0.99, value=float(i))
    sp.attributes.append(kv("org.id", org))
    raw = req.SerializeToString()
    result = decode_request(req, Limits(), now_ns=time.time_ns(), digest=content_digest(raw))
    assert not result.rejected, result.rejected
    return result.batch


def stored(store):
    """Every stored row of both tables (without the insert's own columns), sorted; and the rollups."""
    db = store.database
    skip = {"batch_id", "batch_seq", "committed_at", "received_at"}
    out = {}
    for table in ("usage_points", "distribution_points"):
        names = [r[0] for r in store.rows(f"SELECT name FROM system.columns WHERE database = '{db}' "
                                          f"AND table = '{table}' ORDER BY position")]  # fmt: skip
        cols = ", ".join(f"toString({n})" for n in names if n not in skip)
        out[table] = sorted(store.rows(f"SELECT {cols} FROM {db}.{table}"))
    for table in ("usage_hourly", "usage_hourly_by_metric"):
        out[table] = sorted(store.rows(
            f"SELECT org_id, metric, hour, sum(value_int), sum(value_double), sum(points) FROM {db}.{table} "
            "GROUP BY org_id, metric, hour"))  # fmt: skip
    out["org_last_seen"] = sorted(
        store.rows(f"SELECT org_id, sum(points) FROM {db}.org_last_seen GROUP BY org_id")
    )
    out["metric_catalog"] = sorted(
        store.rows(f"SELECT metric, kind, sum(points) FROM {db}.metric_catalog GROUP BY metric, kind")
    )
    return out


def expected_rows(tmp_path, store_factory, batches):
    """What the batches look like stored once, through a clean writer on a fresh database."""
    ref = store_factory()
    with Rig(tmp_path / "ref", ref) as rig:
        for b in batches:
            rig.spool.consume(b)
        rig.drain(30)
    return stored(ref)


@pytest.fixture
def store_factory(engine_dir):
    import uuid

    from meterhouse.core.config import Config
    from meterhouse.core.store import open_store

    made = []

    def make():
        made.append(open_store(Config(data_dir=engine_dir, database=f"t_{uuid.uuid4().hex[:12]}")))
        return made[-1]

    yield make
    for s in made:
        s.client.command(f"DROP DATABASE IF EXISTS {s.database} SYNC")


def crash(spool):
    spool._file = None  # abandoned, as a killed process leaves it (no shutdown, no marks)


def insert_then_crash(
    tmp_path, store, batches, max_points=50_000, cache_bytes=256 << 20, crash_after="both",
    prefix=schema.ONE_BLOCK_TOKEN_PREFIX,
):  # fmt: skip
    """The writer's steps for the first group, up to a crash after the numbers' insert (or after both, or
    after its intent alone), before any mark: its intent, token and ``batch_seq`` as the writer makes
    them (``prefix``: ``schema.LEDGER_TOKEN_PREFIX`` alone for the version before one block per group,
    which sent the records' blocks one after another). Returns the group."""
    from meterhouse.collector.writer import DIST_NAMES, NUMBER_NAMES, merge_blocks

    spool = Spool(tmp_path / "spool", max_cached_bytes=cache_bytes)
    spool.open()
    for b in batches:
        spool.consume(b)
    group = spool.next_group(max_points, 0.0, __import__("threading").Event())
    blocks = [spool.blocks(r) for r in group.records]
    token = prefix + content_digest(*(b.digest.encode() for b in blocks))
    spool.intent(group, token)
    numbers, dists = merge_blocks(blocks, token, group.last)
    if crash_after != "intent":
        store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, numbers, token + ":n")
    if crash_after == "both":
        store.insert_native(schema.DIST_INGEST_TABLE, DIST_NAMES, dists, token + ":d")
    crash(spool)
    return group


def lose_then_replay(tmp_path, store, table, where, want):
    """Delete ``table``'s rows matching ``where`` (what a kill took; the token stays in the table's
    deduplication log), then restart: the replay must bring back exactly ``want``."""
    store.client.command(
        f"ALTER TABLE {store.database}.{table} DELETE WHERE {where}", settings={"mutations_sync": 2}
    )
    assert stored(store) != want
    with Rig(tmp_path, store) as rig:
        assert rig.report.replay_groups == 1
        rig.drain(60)
    assert stored(store) == want


@pytest.mark.parametrize(
    "lost", [schema.POINTS_TABLE, schema.HOURLY_TABLE, schema.METRIC_ORGS_TABLE, schema.DIST_TABLE]
)
def test_a_table_whose_part_the_kill_took_gets_the_group_again_though_its_dedup_log_has_the_token(
    tmp_path, store, store_factory, lost
):
    """The embedded engine writes a part's token to its deduplication log before the part itself: a kill
    between the two leaves a table that would drop the replay it never stored (seen in
    ``tests/core/test_engine_dedup_soak.py``). Here the group landed everywhere and then one table's rows
    are deleted (the token stays in its log); the replay finds the table short by its ``batch_seq`` and
    puts the group there alone, and nowhere twice."""
    t0 = time.time_ns() - 3 * 3600 * 10**9
    batches = [mixed_request(i, t0 + (i % 4) * 1800 * 10**9) for i in range(6)]
    want = expected_rows(tmp_path, store_factory, batches)
    group = insert_then_crash(tmp_path, store, batches)
    lose_then_replay(tmp_path, store, lost, f"batch_seq >= {group.last}", want)


@pytest.mark.parametrize(
    "lost", [schema.POINTS_TABLE, schema.HOURLY_TABLE, schema.METRIC_ORGS_TABLE, schema.DIST_TABLE]
)
def test_a_group_over_two_months_whose_part_of_one_month_the_kill_took_gets_that_month_again(
    tmp_path, store, store_factory, lost
):
    """A table partitioned by month gets one part per month from a group whose points span two, each
    committed on its own: a kill between the two leaves the group's rows of one month in the table and
    not the other's. The replay must find the month missing (a row of the group in the table does not
    mean all of its rows are there) and put only that month's rows in, nowhere twice."""
    now = time.time_ns()
    earlier = now - 40 * 86400 * 10**9  # another month
    batches = [mixed_request(i, (now, earlier)[i % 2] - 3600 * 10**9) for i in range(6)]
    want = expected_rows(tmp_path, store_factory, batches)
    group = insert_then_crash(tmp_path, store, batches)
    column = "hour" if lost in (schema.HOURLY_TABLE, schema.METRIC_ORGS_TABLE) else "time"
    months = store.rows(
        f"SELECT DISTINCT toYYYYMM({column}) FROM {store.database}.{lost} WHERE batch_seq >= {group.last}"
    )
    assert len(months) == 2
    lose_then_replay(
        tmp_path, store, lost, f"batch_seq >= {group.last} AND toYYYYMM({column}) = {months[0][0]}", want
    )


@pytest.mark.parametrize("landed", ["numbers", "both"])
def test_a_group_the_version_before_inserted_replayed_after_the_upgrade_counts_once_everywhere(
    tmp_path, store, store_factory, landed
):
    """The version before the ledger inserted a group (its token without the ledger's prefix, its rows
    without ``batch_seq``) and crashed before its marks; the upgrade's start brings the database up to date
    and replays the group under its token alone. The organisations' and catalog's views read the raw
    tables then and the ingest tables now: ClickHouse does not recognise the repeat there, so those tables
    must not be given the rows the raw tables show landed."""
    from previous_schema import previous_version

    from meterhouse.collector.model import BATCH_COLUMNS, DIST_BATCH_COLUMNS
    from meterhouse.core import native

    t0 = time.time_ns() - 3 * 3600 * 10**9
    batches = [mixed_request(i, t0 + (i % 4) * 1800 * 10**9) for i in range(5)]
    want = expected_rows(tmp_path, store_factory, batches)
    previous_version(store)
    spool = Spool(tmp_path / "spool")
    spool.open()
    for b in batches:
        spool.consume(b)
    group = spool.next_group(50_000, 0.0, __import__("threading").Event())
    blocks = [spool.blocks(r) for r in group.records]
    token = content_digest(*(b.digest.encode() for b in blocks))  # as the version before made it
    spool.intent(group, token)
    numbers = b"".join(
        native.with_constant(b.numbers, b.size, "batch_id", "String", token + ":n") for b in blocks
    )
    store.insert_native(schema.INGEST_TABLE, (*BATCH_COLUMNS, "batch_id"), numbers, token + ":n")
    if landed == "both":  # that version's distribution blocks had no series_id
        before = [n for n in DIST_BATCH_COLUMNS if n != "series_id"]
        types = dict(zip(schema.DIST_INGEST_COLUMN_NAMES, schema.DIST_INGEST_COLUMN_TYPES, strict=True))
        dists = b""
        for b in blocks:
            _n, _t, cols, rows = native.decode(b.dists)
            old = native.encode(before, [types[n] for n in before], [cols[n] for n in before])
            dists += native.with_constant(old, rows, "batch_id", "String", token + ":d")
        store.insert_native(schema.DIST_INGEST_TABLE, (*before, "batch_id"), dists, token + ":d")
    crash(spool)
    store.ensure_schema()  # the upgrade's start
    with Rig(tmp_path, store) as rig:
        assert rig.report.replay_groups == 1
        rig.drain(60)
    assert stored(store) == want


@pytest.mark.parametrize(
    ("records", "max_points", "cache_bytes", "crash_after", "prefix"),
    [
        (1, 50_000, 256 << 20, "numbers", schema.ONE_BLOCK_TOKEN_PREFIX),
        (25, 50_000, 0, "numbers", schema.ONE_BLOCK_TOKEN_PREFIX),
        (25, 50_000, 0, "both", schema.ONE_BLOCK_TOKEN_PREFIX),
        (60, 40, 3000, "numbers", schema.ONE_BLOCK_TOKEN_PREFIX),
        (60, 50_000, 256 << 20, "both", schema.ONE_BLOCK_TOKEN_PREFIX),
        (25, 50_000, 0, "numbers", schema.LEDGER_TOKEN_PREFIX),  # sent block by block before
    ],
)
def test_a_group_of_many_records_replayed_after_a_crash_counts_once(
    tmp_path, store, store_factory, records, max_points, cache_bytes, crash_after, prefix
):
    """The writer's steps up to a crash after the numbers' insert (or after both, before any mark), then a
    restart: the replay repeats the group's blocks (read back from disk when evicted) under its token,
    in the shape its token names (one block per table, or the records' blocks one after another)."""
    t0 = time.time_ns() - 3 * 3600 * 10**9
    batches = [mixed_request(i, t0 + (i % 4) * 1800 * 10**9) for i in range(records)]
    want = expected_rows(tmp_path, store_factory, batches)
    insert_then_crash(tmp_path, store, batches, max_points, cache_bytes, crash_after, prefix)

    with Rig(tmp_path, store, flush_max_points=max_points) as rig:  # the restart
        assert rig.report.replay_groups == 1
        rig.drain(60)
    assert stored(store) == want


@pytest.mark.parametrize("previous_insert", ["one native block", "clickhouse-connect"])
def test_a_version_2_spool_with_a_half_inserted_group_replays_exactly_once(
    tmp_path, store, store_factory, previous_insert
):
    """A segment the previous format wrote (pickled columns): its intent's numbers were inserted by the
    previous version (column-oriented, one block) before the crash; the distributions were not. The
    replay through today's blocks counts every record once, the histograms' columns intact."""
    import pickle
    import struct

    from meterhouse.collector.spool import (
        _DATA_HEAD_V3,
        _RANGE,
        COMMIT,
        DATA,
        FORMAT,
        INTENT,
        _digest_bytes,
        _encode,
    )
    from meterhouse.collector.writer import merge

    t0 = time.time_ns() - 2 * 3600 * 10**9
    batches = [mixed_request(i, t0 + i * 600 * 10**9) for i in range(7)]
    want = expected_rows(tmp_path, store_factory, batches)
    token = content_digest(*(b.digest.encode() for b in batches[:4]))
    seg = [_encode(FORMAT, struct.pack("<H", 2)), _encode(COMMIT, struct.pack("<Q", 0))]
    for seq, b in enumerate(batches, 1):
        body = pickle.dumps(
            (b.columns, b.size, b.dist_columns, b.dist_size), protocol=pickle.HIGHEST_PROTOCOL
        )
        seg.append(
            _encode(DATA, _DATA_HEAD_V3.pack(seq, b.received_ns, b.total, _digest_bytes(b.digest)) + body)
        )
        if seq == 4:
            seg.append(_encode(INTENT, _RANGE.pack(1, 4) + token.encode()))
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "seg-00000000000000000001.wal").write_bytes(b"".join(seg))
    numbers, _dists = merge(batches[:4], token)
    # What the previous version's writer did before it died: the merged columns in one Native block, or
    # (the versions before) through clickhouse-connect's column-oriented insert, with that version's views.
    from previous_schema import writer_views_before

    writer_views_before(store)
    if previous_insert == "one native block":
        store.insert_points(numbers, token + ":n")
    else:
        store.client.insert(f"{store.database}.{schema.INGEST_TABLE}", numbers,
                            column_names=schema.INGEST_COLUMN_NAMES, column_type_names=schema.INGEST_COLUMN_TYPES,
                            column_oriented=True, settings=store.insert_settings(token + ":n"))  # fmt: skip
    store.ensure_schema()  # the upgrade's start
    with Rig(tmp_path, store) as rig:
        assert rig.report.replay_groups == 1 and rig.report.pending_records == 7
        rig.drain(30)
    assert stored(store) == want


class LandedThenRefused:
    """The numbers' insert lands and then reports a permanent error (a later view of the chain refused
    it: ClickHouse's views are not atomic with the table); distributions go in."""

    def __init__(self, real):
        self.real, self.name, self.database = real, "faulty", real.database

    def insert_native(self, table, names, block, token):
        self.real.insert_native(table, names, block, token)
        if table == schema.INGEST_TABLE:
            raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view")

    def insert_points(self, columns, token):
        self.real.insert_points(columns, token)
        raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view")

    def insert_distributions(self, columns, token):
        self.real.insert_distributions(columns, token)


def test_a_redriven_dead_letter_that_did_land_counts_once(tmp_path, store, store_factory):
    """A dead letter is re-driven with its token: the insert that landed before the error must be
    dropped by ClickHouse, so the redrive has to send the group in the blocks the writer sent."""
    from meterhouse.cli import redrive

    t0 = time.time_ns() - 3600 * 10**9
    batches = [mixed_request(i, t0 + i * 10**9) for i in range(5)]
    want = expected_rows(tmp_path, store_factory, batches)
    rig = Rig(tmp_path, LandedThenRefused(store))
    for b in batches:
        rig.spool.consume(b)
    with rig:
        rig.drain(30)
    (letter,) = rig.dead.list(with_batches=True)
    assert sum(b.size for b in letter.batches) == sum(b.size for b in batches)  # the numbers only
    assert redrive(rig.dead, store) == (1, 0)
    assert stored(store) == want


def test_a_landed_group_with_a_record_damaged_on_disk_does_not_count_the_rest_twice(
    tmp_path, store, store_factory
):
    t0 = time.time_ns() - 3600 * 10**9
    batches = [mixed_request(i, t0 + i * 10**9) for i in range(4)]
    group = insert_then_crash(tmp_path, store, batches, cache_bytes=0)
    damaged = group.records[1]
    with open(damaged.segment, "r+b") as f:  # the disk damages a record that was safely written
        f.seek(damaged.offset + damaged.length - 3)
        f.write(b"\xff\xff\xff")
    want = expected_rows(tmp_path, store_factory, [b for i, b in enumerate(batches) if i != 1])
    with Rig(tmp_path, store) as rig:
        assert rig.report.quarantined_records == 1
        rig.drain(30)
    got = stored(store)
    # Every intact record is in exactly once (the damaged one landed too: it may be in).
    lost = {"usage_points": batches[1].size, "distribution_points": batches[1].dist_size}
    for table in ("usage_points", "distribution_points"):
        assert set(got[table]) >= set(want[table]), table
        assert len(want[table]) <= len(got[table]) <= len(want[table]) + lost[table], table
    assert sum(p for _o, p in got["org_last_seen"]) <= sum(b.size for b in batches)


def test_a_format_3_record_of_another_column_set_is_conformed_and_inserted(tmp_path, store, store_factory):
    """A record whose blocks carry another column set (a column since added is missing, one since removed
    is there): read back by name, the missing column defaulted, the extra one dropped, inserted once."""
    import struct

    from meterhouse.collector.model import BATCH_COLUMNS, DIST_BATCH_COLUMNS
    from meterhouse.collector.spool import (
        _BLOCKS_HEAD,
        _DATA_HEAD_V3,
        COMMIT,
        DATA,
        DIST_TYPES,
        FORMAT,
        NUMBER_TYPES,
        _digest_bytes,
        _encode,
    )
    from meterhouse.core import native

    b = mixed_request(3, time.time_ns() - 3600 * 10**9)
    want = expected_rows(tmp_path, store_factory, [b])
    keep = [i for i, n in enumerate(BATCH_COLUMNS) if n != "cumulative_double"]
    names = [BATCH_COLUMNS[i] for i in keep] + ["retired"]
    types = [NUMBER_TYPES[i] for i in keep] + ["String"]
    numbers = native.encode(names, types, [b.columns[BATCH_COLUMNS[i]] for i in keep] + [["x"] * b.size])
    dists = native.encode(DIST_BATCH_COLUMNS, DIST_TYPES, [b.dist_columns[n] for n in DIST_BATCH_COLUMNS])
    body = _BLOCKS_HEAD.pack(0xDEAD, len(numbers)) + numbers + dists
    head = _DATA_HEAD_V3.pack(1, b.received_ns, b.total, _digest_bytes(b.digest))
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "seg-00000000000000000001.wal").write_bytes(
        _encode(FORMAT, struct.pack("<H", 3))
        + _encode(COMMIT, struct.pack("<Q", 0))
        + _encode(DATA, head + body)
    )
    assert 0.0 in b.columns["cumulative_double"]  # what the default restores
    with Rig(tmp_path, store) as rig:
        rig.drain(30)
    assert stored(store) == want


class LandedThenFailedOnce:
    """The first insert of each kind lands and then reports a retryable error (a timeout after the
    server took it); the retry goes through the ledger of the real store."""

    def __init__(self, real):
        self.real, self.name, self.database = real, real.name, real.database
        self.embedded = real.embedded
        self.failed: set[str] = set()

    def insert_native(self, table, names, block, token):
        self.real.insert_native(table, names, block, token)
        if table not in self.failed and table in schema.INGEST_OF.values():
            self.failed.add(table)
            raise TimeoutError("the answer was lost")

    def insert_in_doubt(self, kind, names, block, token, seq):
        return self.real.insert_in_doubt(kind, names, block, token, seq)

    def scalar(self, sql, parameters=None):
        return self.real.scalar(sql, parameters)


def test_an_insert_that_landed_and_then_failed_counts_once_when_retried(tmp_path, store, store_factory):
    now = time.time_ns()
    batches = [mixed_request(i, (now, now - 40 * 86400 * 10**9)[i % 2] - 3600 * 10**9) for i in range(4)]
    want = expected_rows(tmp_path, store_factory, batches)
    flaky = LandedThenFailedOnce(store)
    with Rig(tmp_path, flaky) as rig:
        for b in batches:
            rig.spool.consume(b)
        rig.drain(30)
    assert flaky.failed  # each group's first insert landed and failed: the rest went through the ledger
    assert stored(store) == want


class PartlyLandedThenRefused:
    """The first try of each insert fails before the server took it (a timeout); the retry, a group in
    doubt, goes through the ledger's redo (no deduplication token) and lands everywhere but in
    ``usage_hourly_by_metric`` (its part is lost, as a full disk or a kill takes it) before the answer is
    lost; the next retry is refused for good. What the redo put in carries the group's ``batch_seq`` and
    no token a later insert could be dropped by."""

    def __init__(self, real):
        self.real, self.name, self.database = real, real.name, real.database
        self.tries: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self.real, name)

    def insert_native(self, table, names, block, token):
        raise TimeoutError("the connection was reset before the server read the insert")

    def insert_in_doubt(self, kind, names, block, token, seq, *args, **kwargs):
        self.tries[kind] = self.tries.get(kind, 0) + 1
        if self.tries[kind] > 1:
            raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view. (TYPE_MISMATCH)")
        self.real.insert_in_doubt(kind, names, block, token, seq, *args, **kwargs)
        self.real.client.command(
            f"ALTER TABLE {self.database}.{schema.METRIC_ORGS_TABLE} DELETE WHERE batch_seq >= {seq}",
            settings={"mutations_sync": 2},
        )
        raise TimeoutError("the answer was lost")


def test_a_redriven_dead_letter_whose_group_had_partly_landed_counts_once(tmp_path, store, store_factory):
    """A group that partly landed through the redo before it was dead-lettered: its redrive must add only
    what each table lacks. Under the token alone it landed again wherever the redo had put it (no token
    there to drop it by): the raw table and the rollups counted it twice."""
    from meterhouse.cli import redrive

    t0 = time.time_ns() - 3600 * 10**9
    batches = [mixed_request(i, t0 + i * 10**9) for i in range(4)]
    want = expected_rows(tmp_path, store_factory, batches)
    rig = Rig(tmp_path, PartlyLandedThenRefused(store))
    for b in batches:
        rig.spool.consume(b)  # one group
    with rig:
        rig.drain(30)
    (letter,) = rig.dead.list()
    assert letter.code == 53
    assert redrive(rig.dead, store) == (1, 0)
    assert rig.dead.list() == []
    assert stored(store) == want


def test_a_dead_lettered_group_replayed_after_a_crash_is_not_written_again(tmp_path, store, store_factory):
    """The process dies after the dead letter is durable and before the spool's commit mark: the replay
    must not write the group (the letter holds it), or the redrive counts it a second time."""
    import threading

    from meterhouse.cli import redrive

    t0 = time.time_ns() - 3600 * 10**9
    batches = [mixed_request(i, t0 + i * 10**9) for i in range(3)]
    want = expected_rows(tmp_path, store_factory, batches)
    rig = Rig(tmp_path, FailingStore(store, 1, PermanentError("Code: 53. DB::Exception: Type mismatch")))
    for b in batches:
        rig.spool.consume(b)
    group = rig.spool.next_group(50_000, 0.0, threading.Event())
    rig.spool.commit = lambda group: None  # the kill comes before the commit mark
    assert rig.writer.write(group)
    assert len(rig.dead.list()) == 1
    crash(rig.spool)
    with Rig(tmp_path, store) as again:  # the restart: the same spool and dead letters
        assert again.report.replay_groups == 1
        again.drain(30)
        assert len(again.dead.list()) == 1
    assert redrive(again.dead, store) == (1, 0)
    assert stored(store) == want


class Refused:
    """Every insert is refused for good while ``left`` > 0; the rest is the real store's."""

    def __init__(self, real, left):
        self.real, self.left = real, left

    def __getattr__(self, name):
        return getattr(self.real, name)

    def insert_native(self, *args):
        if self.left > 0:
            self.left -= 1
            raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view. (TYPE_MISMATCH)")
        return self.real.insert_native(*args)


class DistributionsRefusedOnce(Refused):
    def insert_in_doubt(self, kind, *args):
        if kind == "d" and self.left > 0:
            self.left -= 1
            raise PermanentError("Code: 53. DB::Exception: Type mismatch in a view. (TYPE_MISMATCH)")
        return self.real.insert_in_doubt(kind, *args)


def test_a_redrive_that_fails_half_way_keeps_what_it_put_in_and_the_next_one_adds_the_rest(
    tmp_path, store, store_factory
):
    """The redrive of the first of two letters puts its numbers in, then its distributions are refused:
    the letter stays, with what went in recorded (read from the tables while its number is the newest),
    the second letter goes in above it, and the next redrive adds only the distributions."""
    from meterhouse.cli import redrive

    t0 = time.time_ns() - 3600 * 10**9
    batches = [mixed_request(i, t0 + i * 10**9) for i in range(2)]
    want = expected_rows(tmp_path, store_factory, batches)
    rig = Rig(tmp_path, Refused(store, 2))
    with rig:
        for b in batches:
            rig.spool.consume(b)
            rig.drain(30)  # each its own group, each refused: two letters
    first, second = rig.dead.list()
    assert {"n", "d"} <= set(first.landed) and not any(first.landed.values()) and first.seq < second.seq
    assert redrive(rig.dead, DistributionsRefusedOnce(store, 1)) == (1, 1)
    (left,) = rig.dead.list()
    assert left.path == first.path and left.redrive_seq is None
    assert set(left.landed["n"]) == set(schema.ledger_tables("n"))  # in, recorded
    assert not left.landed.get("d")
    assert redrive(rig.dead, store) == (1, 0)
    assert rig.dead.list() == []
    assert stored(store) == want


# -- groups bounded by bytes as well as points ------------------------------------------------------


def groups_of(store):
    """The groups the raw table holds: batch_seq → rows, in order."""
    return dict(
        store.rows(f"SELECT batch_seq, count() FROM {store.database}.usage_points GROUP BY 1 ORDER BY 1")
    )


def wide_batch(i, points=10, width=4000):
    """A request of ``points`` points, each with an attribute of ``width`` characters: about
    ``points * width`` bytes in the spool, few points."""
    return batch_of({"api": [point(1, {"org.id": f"o{i % 3}", "blob": f"{i}.{k}." + "x" * width})
                             for k in range(points)]})  # fmt: skip


def test_waiting_records_whose_bytes_pass_the_bound_are_inserted_as_several_groups(tmp_path, store):
    """12 records of about 40 KB (10 points each) wait when the writer starts; with a byte bound of 100 KB
    they go as groups of two records, each under the bound, in order (before: one group of all 12, since
    the point bound is far away; a group's memory in the writer is several times its bytes)."""
    rig = Rig(tmp_path, store, flush_max_bytes=100_000)
    for i in range(12):
        rig.spool.consume(wide_batch(i))
    lengths = [r.length for r in rig.spool.uncommitted_records()]
    assert all(40_000 < n < 50_000 for n in lengths), lengths
    with rig:
        rig.drain()
    assert groups_of(store) == {seq: 20 for seq in range(2, 13, 2)}  # numbered by their last record
    assert sum(totals(store).values()) == 120 and totals(store, "usage_hourly") == totals(store)
    assert rig.value("meterhouse_insert_duration_seconds_count") == 6


def test_a_record_larger_than_the_byte_bound_is_a_group_alone(tmp_path, store):
    rig = Rig(tmp_path, store, flush_max_bytes=30_000)
    for i in range(3):
        rig.spool.consume(wide_batch(i))  # about 40 KB each
    with rig:
        rig.drain()
    assert groups_of(store) == {1: 10, 2: 10, 3: 10}


def oversized_replay(tmp_path, store, store_factory, crash_after):
    """Twelve records that an earlier writer (no byte bound) took as one group, crashed ``crash_after``;
    the restart's bound takes about three records a group. Returns (what must be stored, the bound)."""
    t0 = time.time_ns() - 3 * 3600 * 10**9
    batches = [mixed_request(i, t0 + (i % 4) * 1800 * 10**9) for i in range(12)]
    want = expected_rows(tmp_path, store_factory, batches)
    group = insert_then_crash(tmp_path, store, batches, crash_after=crash_after)
    assert len(group.records) == 12
    return want, 3 * max(r.length for r in group.records)


def test_a_replayed_group_larger_than_the_bounds_of_which_nothing_landed_is_grouped_afresh(
    tmp_path, store, store_factory
):
    """An earlier version took every waiting record into one group, wrote its intent and was killed in the
    insert (the OOM loop: each restart replayed the same group and was killed again). Nothing of it is in
    any table, so the replay groups its records afresh under today's bounds, each group with its own
    intent and number; every point once, everywhere."""
    want, bound = oversized_replay(tmp_path, store, store_factory, "intent")
    with Rig(tmp_path, store, flush_max_bytes=bound) as rig:
        assert rig.report.replay_groups == 1
        rig.drain(60)
    assert stored(store) == want
    assert len(groups_of(store)) == 4


@pytest.mark.parametrize("killed", ["released", "first group's insert", "first group committed"])
def test_a_kill_between_the_groups_of_a_split_replay_loses_and_doubles_nothing(
    tmp_path, store, store_factory, killed
):
    """The split replay killed again: right after the oversized group was given back, after the first new
    group's insert (its intent over some of the old group's records supersedes the old intent), or after
    that group's commit. The next start replays what is left, in order, and every point counts once."""
    from meterhouse.collector.writer import DIST_NAMES, NUMBER_NAMES, merge_blocks

    want, bound = oversized_replay(tmp_path, store, store_factory, "intent")
    spool = Spool(tmp_path / "spool")
    spool.open()
    writer = Writer(spool, store, PipelineMetrics(CollectorRegistry()), DeadLetters(tmp_path / "dead"),
                    flush_max_bytes=bound)  # fmt: skip
    stop = __import__("threading").Event()
    old = spool.next_group(50_000, 0.0, stop, bound)
    assert old.replay and len(old.records) == 12
    assert writer.write(old)  # given back: nothing of it landed
    first = spool.next_group(50_000, 0.0, stop, bound)
    assert not first.replay and len(first.records) == 3
    if killed == "first group's insert":
        blocks = [spool.blocks(r) for r in first.records]
        token = schema.ONE_BLOCK_TOKEN_PREFIX + content_digest(*(b.digest.encode() for b in blocks))
        spool.intent(first, token)
        numbers, dists = merge_blocks(blocks, token, first.last)
        store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, numbers, token + ":n")
        store.insert_native(schema.DIST_INGEST_TABLE, DIST_NAMES, dists, token + ":d")
    elif killed == "first group committed":
        assert writer.write(first)
    crash(spool)
    with Rig(tmp_path, store, flush_max_bytes=bound) as rig:
        assert rig.report.replay_groups == (0 if killed == "first group committed" else 1)
        rig.drain(60)
    assert stored(store) == want
    assert len(groups_of(store)) == 4


def test_a_replayed_group_larger_than_the_bounds_that_landed_in_part_is_replayed_whole(
    tmp_path, store, store_factory
):
    """Its numbers' insert landed before the kill: its rows there carry its number, and a group of some of
    its records could not be told from it, so it is replayed whole, as the ledger requires."""
    want, bound = oversized_replay(tmp_path, store, store_factory, "numbers")
    with Rig(tmp_path, store, flush_max_bytes=bound) as rig:
        rig.drain(60)
    assert stored(store) == want
    assert len(groups_of(store)) == 1
