"""Failover between two SEPARATE stores (two databases of the embedded engine, each with its own tables
and its own deduplication), so split data shows: why several endpoints are accepted only as nodes of
one replicated schema (`--cluster`), and refused otherwise."""

import time
import uuid

import pytest
from conftest import shared_engine
from faulty_store import faulty_connect
from test_failover import Rig, batch

from meterhouse.core import schema
from meterhouse.core.config import Config, ConfigError
from meterhouse.core.store import connect


def total(store):
    return store.scalar(f"SELECT sum(toInt128(value_int)) FROM {store.database}.{schema.POINTS_TABLE}") or 0


@pytest.fixture
def two_stores(engine_dir):
    names = {"embedded#a": f"sa_{uuid.uuid4().hex[:10]}", "embedded#b": f"sb_{uuid.uuid4().hex[:10]}"}
    stores = {url: connect(url, engine_dir, db) for url, db in names.items()}
    for s in stores.values():
        s.ensure_schema()
    yield stores
    for s in stores.values():
        s.client.command(f"DROP DATABASE IF EXISTS {s.database} SYNC")


def test_failover_between_separate_stores_splits_the_data(tmp_path, engine_dir, two_stores):
    a, b = two_stores["embedded#a"], two_stores["embedded#b"]
    with Rig(tmp_path, engine_dir, a.database, ["embedded#a", "embedded#b"]) as rig:
        # Each endpoint opens its own database: two servers with plain tables.
        connect_separate = faulty_connect(lambda url: two_stores[url], rig.faults_file)
        rig.endpoints._connect = connect_separate
        for ep in rig.endpoints.endpoints:
            ep.store, ep.schema_ready = connect_separate(ep.url), True
        rig.spool.consume(batch("o", 1))
        rig.wait(lambda: rig.spool.pending_points == 0)
        rig.down("embedded#a")
        rig.spool.consume(batch("o", 10))
        rig.wait(lambda: rig.endpoints.name == "embedded#b")
        rig.wait(lambda: rig.spool.pending_points == 0)
        rig.down()
        rig.wait(lambda: rig.endpoints.name == "embedded#a")
        rig.spool.consume(batch("o", 100))
        rig.wait(lambda: rig.spool.pending_points == 0)
    # Nothing was lost, but the API reads one endpoint: after failback the primary misses the 10.
    assert (total(a), total(b)) == (101, 10)


def test_a_retry_on_another_store_counts_twice(two_stores):
    a, b = two_stores["embedded#a"], two_stores["embedded#b"]
    from usage_rows import _DEFAULTS

    from meterhouse.collector.model import BATCH_COLUMNS

    row = {**_DEFAULTS, "org_id": "o", "time": time.time_ns(), "value_int": 5}
    columns = [[row[n]] for n in BATCH_COLUMNS] + [["t:n"]]
    a.insert_points(columns, "t:n")  # landed, but the answer timed out ...
    a.insert_points(columns, "t:n")  # (the same store drops the repeat)
    b.insert_points(columns, "t:n")  # ... and the retry after failover went to the other store
    assert total(a) + total(b) == 10  # deduplication is per server: counted twice


def test_such_an_endpoint_list_is_refused_and_a_cluster_is_required():
    with pytest.raises(ConfigError, match="--cluster NAME"):
        Config(clickhouse_url="http://ch-1:8123,http://ch-2:8123")
    ok = Config(clickhouse_url="http://ch-1:8123,http://ch-2:8123", cluster="meterhouse")
    assert ok.endpoints == ["http://ch-1:8123", "http://ch-2:8123"] and ok.cluster == "meterhouse"


def test_embedded_handles_are_one_store(engine_dir):
    db = f"se_{uuid.uuid4().hex[:10]}"
    open_ = shared_engine(engine_dir, db)
    a, b = open_("embedded#a"), open_("embedded#b")
    a.ensure_schema()
    assert a.client is b.client and a.database == b.database  # no split is possible
    a.client.command(f"DROP DATABASE IF EXISTS {db} SYNC")
