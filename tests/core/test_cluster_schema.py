"""The cluster rendering of the schema, checked with the real engine.

No ClickHouse cluster runs here (no Keeper, no remote_servers), so: every cluster statement is parsed
by the real engine (``EXPLAIN AST``); and a database is built whose tables carry the cluster rendering's
names and columns — the ``_local`` tables and views exactly as rendered, minus ``ON CLUSTER`` and with
the non-replicated engines, and each Distributed table stood in for by a one-shard equivalent — on which
the insert path (with the cluster's insert settings) and every API and dashboard query run.
"""

import importlib.util
import re
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from usage_rows import put

from meterhouse.core import schema
from meterhouse.core.store import Store
from meterhouse.exporter import OrgHealth, create_app

CLUSTER = "mh"
H = 3600 * 10**9


def test_every_cluster_statement_parses_in_the_real_engine(store):
    statements = schema.render("meterhouse", CLUSTER, raw_retention_days=30)
    assert len(statements) > len(schema.ddl("meterhouse"))
    for statement in statements:
        ast = store.client.query(f"EXPLAIN AST {statement}").result_rows
        assert ast, statement


def test_a_cluster_database_of_the_version_before_gets_batch_seq_on_every_node(store):
    """The statements that bring an earlier version's cluster database up to date: every ingest and
    ledger table, local and Distributed, parsed by the real engine; and on a one-node stand-in (plain
    tables, no ON CLUSTER) they make the ingest table take the writer's blocks again."""
    statements = schema.seq_columns_cluster_migration("meterhouse", CLUSTER)
    for statement in statements:
        assert store.client.query(f"EXPLAIN AST {statement}").result_rows, statement
    for table in (*schema.LEDGER_TABLES, schema.INGEST_TABLE, schema.DIST_INGEST_TABLE):
        assert any(f".{table}_local ON CLUSTER {CLUSTER} ADD COLUMN" in s for s in statements), table
        assert any(f".{table} ON CLUSTER {CLUSTER} ADD COLUMN" in s for s in statements), table
    assert not any(re.search(r"\.\w+(?<!_local) ON CLUSTER \S+ ADD INDEX", s) for s in statements)
    db = store.database
    for table in (schema.INGEST_TABLE, schema.POINTS_TABLE):
        store.client.command(f"CREATE TABLE {db}.{table}_old AS {db}.{table}")
    store.client.command(f"ALTER TABLE {db}.{schema.INGEST_TABLE}_old DROP COLUMN batch_seq")
    for statement in statements:
        m = re.match(
            rf"ALTER TABLE meterhouse\.({schema.INGEST_TABLE})_local ON CLUSTER {CLUSTER} (.*)$", statement
        )
        if m:
            store.client.command(f"ALTER TABLE {db}.{m.group(1)}_old {m.group(2)}")
    cols = {r[0] for r in store.rows(f"DESCRIBE TABLE {db}.{schema.INGEST_TABLE}_old")}
    assert "batch_seq" in cols


def test_schema_command_prints_the_rendering_up_applies():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "meterhouse", "schema", "--cluster", CLUSTER],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert out == "".join(s + ";\n\n" for s in schema.render("meterhouse", CLUSTER))
    single = subprocess.run([sys.executable, "-m", "meterhouse", "schema"],
                            capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert single == "".join(s + ";\n\n" for s in schema.render("meterhouse"))
    assert Store(None, "db", "x", cluster=CLUSTER).cluster == CLUSTER


def test_every_table_is_replicated_local_plus_distributed_by_org():
    statements = schema.cluster_ddl("db", CLUSTER)
    single = schema.ddl("db")
    tables = [m.group(1) for s in single if (m := re.match(r"CREATE TABLE IF NOT EXISTS db\.(\w+) ", s))]
    assert len(tables) >= 9
    for table in tables:
        local = [
            s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS db.{table}_local ON CLUSTER")
        ]
        dist = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS db.{table} ON CLUSTER")]
        assert len(local) == 1 and len(dist) == 1, table
        engine = re.search(r"ENGINE = (\w+)", local[0]).group(1)
        assert engine == "Null" or (
            engine.startswith("Replicated")
            and f"'/clickhouse/tables/{{shard}}/db/{table}_local', '{{replica}}'" in local[0]
        ), table
        if engine != "Null" and table != schema.EVENTS_TABLE:  # events carry no token
            assert "replicated_deduplication_window = 10000" in local[0], table
            assert "non_replicated" not in local[0], table
        key = "cityHash64(org_id)" if re.search(r"^\s+org_id ", local[0], re.M) else "rand()"
        assert dist[0].endswith(f"ENGINE = Distributed({CLUSTER}, db, {table}_local, {key})"), table
    # One org's points and rollups live on one shard: every org table is sharded by org.
    for table in (schema.INGEST_TABLE, schema.DIST_INGEST_TABLE, schema.POINTS_TABLE, schema.HOURLY_TABLE,
                  schema.ORGS_TABLE, schema.DIST_TABLE):  # fmt: skip
        assert any(s.endswith(f"{table}_local, cityHash64(org_id))") for s in statements), table


def test_views_are_shard_local():
    statements = schema.cluster_ddl("db", CLUSTER)
    views = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
    assert len(views) == sum(s.startswith("CREATE MATERIALIZED VIEW") for s in schema.ddl("db"))
    for view in views:
        assert re.search(r" ON CLUSTER mh TO db\.\w+_local AS\n", view), view
        for source in re.findall(r"FROM db\.(\w+)", view):
            assert source.endswith("_local"), view  # never through a Distributed table


def test_a_table_added_to_the_definitions_gets_its_cluster_rendering():
    extra = """CREATE TABLE IF NOT EXISTS db.monthly_statements (
    org_id String,
    month Date,
    total SimpleAggregateFunction(sum, Int128)
) ENGINE = AggregatingMergeTree
ORDER BY (org_id, month)
SETTINGS non_replicated_deduplication_window = 10000"""
    view = """CREATE MATERIALIZED VIEW IF NOT EXISTS db.monthly_statements_mv TO db.monthly_statements AS
SELECT org_id, toStartOfMonth(hour) AS month, sum(value_int) AS total
FROM db.usage_hourly GROUP BY org_id, month"""
    out = schema.cluster_ddl("db", CLUSTER, schema.ddl("db") + [extra, view])
    assert any("db.monthly_statements_local ON CLUSTER mh" in s and "ReplicatedAggregatingMergeTree(" in s
               for s in out)  # fmt: skip
    assert any(s.endswith("monthly_statements_local, cityHash64(org_id))") for s in out)
    assert any("TO db.monthly_statements_local AS" in s and "FROM db.usage_hourly_local" in s for s in out)


def test_a_statement_of_an_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="no cluster rendering"):
        schema.cluster_ddl("db", CLUSTER, ["CREATE VIEW db.v AS SELECT 1"])
    with pytest.raises(ValueError, match="no cluster rendering for engine Log"):
        schema.cluster_ddl("db", CLUSTER, ["CREATE TABLE IF NOT EXISTS db.t (\n    a String\n) ENGINE = Log"])


def test_the_insert_path_carries_the_deduplication_settings():
    on_cluster = Store(None, "db", "x", cluster=CLUSTER).insert_settings("tok")
    assert on_cluster == {
        "insert_deduplication_token": "tok",
        "insert_deduplicate": 1,
        "distributed_foreground_insert": 1,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        "optimize_on_insert": 0,
        "max_partitions_per_insert_block": 0,
    }
    assert Store(None, "db", "x", cluster=CLUSTER).query_settings == {"optimize_skip_unused_shards": 1}
    assert Store(None, "db", "x").insert_settings("tok") == {
        "insert_deduplication_token": "tok",
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        "optimize_on_insert": 0,
        "max_partitions_per_insert_block": 0,
    }


def test_an_endpoint_is_ready_when_its_own_tables_exist(store):
    statements = schema.cluster_ddl(store.database, CLUSTER)
    names = schema.created_names(statements)
    assert len(names) == sum(
        s.startswith("CREATE TABLE") or s.startswith("CREATE MATERIALIZED") for s in statements
    )
    single = schema.created_names(schema.ddl(store.database, cardinality_views=False, writer_views=False))
    store.wait_for_tables(single, timeout_s=1)  # the single-node (embedded) schema is there
    with pytest.raises(RuntimeError, match="not created within"):
        store.wait_for_tables(names, timeout_s=0.3)  # the _local tables are not
    # The ON CLUSTER statements' settings are real settings of the engine.
    store.client.command("SELECT 1", settings=schema.CLUSTER_DDL_SETTINGS)


# -- a database with the cluster rendering's names and columns ---------------------------------------
def stand_in(database: str) -> list[str]:
    """The cluster rendering for one node without Keeper: statements as rendered, except that
    ``ON CLUSTER`` goes, Replicated engines become their plain form with the same deduplication window,
    and each Distributed table becomes its one-shard equivalent: for a Null ingest table, a Null table
    whose inserts a view forwards to the shard's ``_local`` table; for the others a Merge table reading
    the ``_local`` one."""
    out = []
    null_locals = set()
    for s in schema.render(database, CLUSTER):  # the close's tables and view too
        s = s.replace(f" ON CLUSTER {CLUSTER}", "")
        s = re.sub(r"Replicated(\w*MergeTree)\('[^']*', '\{replica\}'(?:, )?", r"\1(", s)
        s = re.sub(r"replicated_deduplication_window = (\d+), replicated_deduplication_window_seconds = \d+",
                   r"non_replicated_deduplication_window = \1", s)  # fmt: skip
        if m := re.match(rf"CREATE TABLE IF NOT EXISTS {database}\.(\w+)_local \(", s):
            if "ENGINE = Null" in s:
                null_locals.add(m.group(1))
        if m := re.match(
            rf"CREATE TABLE IF NOT EXISTS {database}\.(\w+) AS {database}\.(\w+)\nENGINE = Distributed", s
        ):
            table, local = m.groups()
            if table in null_locals:
                out.append(f"CREATE TABLE {database}.{table} AS {database}.{local} ENGINE = Null")
                out.append(f"CREATE MATERIALIZED VIEW {database}.{table}_to_shard TO {database}.{local} "
                           f"AS SELECT * FROM {database}.{table}")  # fmt: skip
            else:
                out.append(f"CREATE TABLE {database}.{table} AS {database}.{local} "
                           f"ENGINE = Merge({database}, '^{local}$')")  # fmt: skip
            continue
        out.append(s)
    return out


@pytest.fixture
def cluster_store(store):
    """A Store with ``cluster`` set (its insert and query settings) on the stand-in database."""
    db = f"c_{uuid.uuid4().hex[:12]}"
    for statement in stand_in(db):
        store.client.command(statement)
    yield Store(store.client, db, "cluster-stand-in", cluster=CLUSTER)
    store.client.command(f"DROP DATABASE IF EXISTS {db} SYNC")


def totals(s: Store) -> dict[str, int]:
    db = s.database
    return {
        "points": s.scalar(f"SELECT count() FROM {db}.{schema.POINTS_TABLE}"),
        "hourly": s.scalar(f"SELECT sum(points) FROM {db}.{schema.HOURLY_TABLE}"),
        "orgs": s.scalar(f"SELECT sum(points) FROM {db}.{schema.ORGS_TABLE}"),
        "catalog": s.scalar(f"SELECT sum(points) FROM {db}.{schema.CATALOG_TABLE}"),
        "state": s.scalar(f"SELECT count() FROM {db}.{schema.SERIES_STATE_TABLE}"),
    }


def test_a_replayed_batch_counts_once_in_every_local_table(cluster_store):
    from meterhouse.collector.model import BATCH_COLUMNS

    t = (time.time_ns() // H - 1) * H
    rows = [
        ("org-a", t, 5, schema.TEMPORALITY_DELTA, 0),
        ("org-b", t + 1, 7, schema.TEMPORALITY_CUMULATIVE, 42),
    ]
    defaults = {"metric": "api.calls", "kind": schema.KIND_SUM, "unit": "1", "monotonic": 1, "is_int": 1,
                "value_double": 0.0, "attr_keys": [], "attr_values": [], "resource_keys": [],
                "resource_values": [], "scope_name": "", "scope_version": "", "series_start": t,
                "cumulative_int": 7, "cumulative_double": 0.0}  # fmt: skip
    cols = {n: [] for n in BATCH_COLUMNS}
    for org, when, v, temporality, sid in rows:
        row = {**defaults, "org_id": org, "start_time": when, "time": when, "received_at": when,
               "value_int": v, "temporality": temporality, "series_id": sid}  # fmt: skip
        for n in BATCH_COLUMNS:
            cols[n].append(row[n])
    batch = [cols[n] for n in BATCH_COLUMNS] + [["b1:n"] * 2]
    cluster_store.insert_points(batch, "b1:n")
    first = totals(cluster_store)
    assert first == {"points": 2, "hourly": 2, "orgs": 2, "catalog": 2, "state": 1}
    cluster_store.insert_points(batch, "b1:n")  # the replay after a crash, with the same token
    assert totals(cluster_store) == first
    cluster_store.insert_points(batch, "b2:n")  # another batch with the same rows counts
    assert totals(cluster_store)["points"] == 4


def _dashboards_module():
    path = Path(__file__).resolve().parent.parent / "dashboards" / "test_dashboards.py"
    spec = importlib.util.spec_from_file_location("dashboard_queries", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def filled(cluster_store):
    now = time.time_ns()
    rows = []
    for h in range(0, 30):
        for org, v in (("org-a", 100), ("org-b", 10)):
            t = (now // H - h) * H + 60 * 10**9
            rows.append({"org_id": org, "time": t, "value_int": v * (50 if (org == "org-a" and h == 1) else 1),
                         "attrs": {"feature": "search" if h % 2 else "export", "region": "eu"}})  # fmt: skip
    rows.append({"org_id": "org-quiet", "time": now - 3 * H, "value_int": 5})
    rows.append({"org_id": "", "time": now - H, "value_int": 7})
    rows.append({"org_id": "org-gone", "time": now - 48 * H, "value_int": 5})  # silent for over 24 h
    put(cluster_store, rows)
    # A rollup row with no raw points behind it: the drift the reconciliation panel lists.
    cluster_store.client.command(f"""INSERT INTO {cluster_store.database}.{schema.HOURLY_TABLE}_local (org_id,
        metric, hour, attributes_hash, unit, value_int, value_double, points)
        VALUES ('org-drift', 'api.calls', toDateTime({(now // H - 1) * 3600}, 'UTC'), 1, '', 3, 0, 1)""")
    # Events go through the Distributed table on a cluster; here straight to the shard's table.
    cluster_store.client.insert(
        f"{cluster_store.database}.{schema.EVENTS_TABLE}_local",
        [[now // 10**6 - 60_000], ["failover"], ["http://a:8123"], ["http://b:8123"], ["down"], [""]],
        column_names=["time", "kind", "source", "target", "reason", "details"],
        column_type_names=["DateTime64(3, 'UTC')", "String", "String", "String", "String", "String"],
        column_oriented=True,
    )
    return cluster_store


@pytest.mark.parametrize("interval_s", [60, 3600])
def test_every_dashboard_query_runs_on_the_cluster_names(filled, interval_s):
    dashboards = _dashboards_module()
    queries = dashboards.clickhouse_queries()
    assert len(queries) >= 12
    for dash, what, target in queries:
        sql = dashboards.expand(target.rawSql, filled.database, interval_s)
        result = filled.client.query(sql, settings=filled.query_settings)
        assert tuple(result.column_names) == target.columns, (dash, what)
        assert result.result_rows, f"{dash} / {what} returned no rows on the cluster names"


def test_every_api_query_runs_on_the_cluster_names(filled):
    registry = CollectorRegistry()
    health = OrgHealth(filled, registry, silent_after_s=1800)
    snapshot = health.refresh()
    assert snapshot.ok and snapshot.active["1h"] >= 1
    client = create_app(filled, registry, lambda: True, health).test_client()
    now_s = time.time_ns() // 10**9

    def rfc(s):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s))

    end = now_s // 3600 * 3600 + 3600
    sources = set()
    for start in (end - 40 * 3600, end - 40 * 3600 + 61):  # hour-aligned (rollup) and not (raw)
        window = f"from={rfc(start)}&to={rfc(end)}"
        for step in ("1m", "1h", "1d"):
            for extra in ("", "&group_by=feature"):
                r = client.get(f"/api/v1/orgs/org-a/usage?metric=api.calls&step={step}{extra}&{window}")
                body = r.get_json()
                assert r.status_code == 200 and body["total"] > 0, (step, extra, body)
                sources.add(body.get("source"))
    assert {"rollup", "raw"} <= sources
    ranking = client.get("/api/v1/orgs?metric=api.calls").get_json()["orgs"]
    assert [o["org_id"] for o in ranking][:2] == ["org-a", "org-b"]
    # The ranking over raw points (a range off the whole hours; /orgs takes no step, and refuses one now).
    assert client.get(f"/api/v1/orgs?metric=api.calls&from={rfc(end - 40 * 3600 + 61)}").status_code == 200
    catalog = client.get("/api/v1/metrics-catalog").get_json()
    assert catalog["metrics"]
    for status in ("silent", "spiking"):
        assert client.get(f"/api/v1/orgs?status={status}").status_code == 200
    # The cumulative state the collector reads back (its only query).
    assert filled.rows(schema.series_state_sql(filled.database), {"ids": [1, 2]}) == []
    # And the top-K query of the exporter.
    top = filled.rows(schema.top_orgs_by_points_sql(filled.database),
                      {"since": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now_s - 86400)), "k": 2})  # fmt: skip
    assert sorted(o for o, _ in top) == ["org-a", "org-b"]


# -- the monthly close on a cluster reads what every replica has --------------------------------------
class RecordingClusterStore(Store):
    """The stand-in as a cluster node, with its reads, writes and replica syncs recorded in order. The
    stand-in has no replicas and the embedded engine no ``ON CLUSTER``, so a sync's statements are parsed
    by the engine and recorded; writes go to the shard's table (the stand-in's Distributed tables are
    read-only Merge tables), as the events do above."""

    def __init__(self, base: Store) -> None:
        super().__init__(base.client, base.database, base.name, cluster=base.cluster)
        self.log: list[tuple[str, object]] = []

    def sync_replicas(self, tables):
        statements = schema.sync_replicas_sql(self.database, self.cluster, tables)
        assert len(statements) == len(tables)
        for sql in statements:
            assert self.client.query(f"EXPLAIN AST {sql}").result_rows, sql
        self.log.append(("sync", frozenset(tables)))

    def rows(self, sql, parameters=None):
        self.log.append(("read", sql))
        return super().rows(sql, parameters)

    def insert_rows(self, table, columns, names, types, token):
        self.log.append(("write", table))
        super().insert_rows(schema.local_name(table), columns, names, types, token)


def test_a_close_on_a_cluster_syncs_the_replicas_before_it_reads(cluster_store):
    """Distributed reads one replica per shard, and a replica may not have fetched a part the other one
    acknowledged: a point committed before the cutoff but read from a lagging replica would be in neither
    the statement nor the adjustments (committed before the cutoff). So each replica of what the close
    reads is synced after the cutoff is taken and before the first read, and the statements again before
    the close's totals are read back."""
    from meterhouse.core import close

    month = close.Month.of_ns(time.time_ns())
    for _ in range(3):
        month = month.previous()
    put(cluster_store, [{"org_id": "org-a", "time": month.start_ns + H, "value_int": 5},
                        {"org_id": "org-b", "time": month.start_ns + 2 * H, "value_int": 7}])  # fmt: skip
    node = RecordingClusterStore(cluster_store)
    record = close.close_month(node, month, late_window_days=35)
    assert (record.orgs, record.points, record.total_int) == (2, 2, 12)

    log = node.log
    cutoff = next(i for i, (kind, what) in enumerate(log) if kind == "read" and "now64(3)" in what)
    first_points_read = next(
        i for i, (kind, what) in enumerate(log)
        if kind == "read" and f".{schema.POINTS_TABLE}\n" in what
    )  # fmt: skip
    synced = [(i, what) for i, (kind, what) in enumerate(log) if kind == "sync"]
    read_tables = {schema.POINTS_TABLE, schema.HOURLY_TABLE, schema.STATEMENTS_TABLE, schema.CLOSES_TABLE}
    assert any(cutoff < i < first_points_read and read_tables <= what for i, what in synced), log
    last_write = max(
        i for i, (kind, what) in enumerate(log) if kind == "write" and what == schema.STATEMENTS_TABLE
    )
    summary = next(i for i, (kind, what) in enumerate(log) if kind == "read" and "countIf(points !=" in what)
    assert any(last_write < i < summary and schema.STATEMENTS_TABLE in what for i, what in synced), log


def test_replica_syncs_name_every_shard_local_table_on_the_cluster(store):
    statements = schema.sync_replicas_sql("db", CLUSTER, [schema.POINTS_TABLE, schema.STATEMENTS_TABLE])
    assert statements == [
        f"SYSTEM SYNC REPLICA ON CLUSTER {CLUSTER} db.{schema.POINTS_TABLE}_local LIGHTWEIGHT",
        f"SYSTEM SYNC REPLICA ON CLUSTER {CLUSTER} db.{schema.STATEMENTS_TABLE}_local LIGHTWEIGHT",
    ]
    for sql in statements:
        assert store.client.query(f"EXPLAIN AST {sql}").result_rows
    # One node: nothing to sync, nothing sent.
    Store(store.client, store.database, "single").sync_replicas([schema.POINTS_TABLE])


def test_the_cumulative_state_is_read_from_every_replica(cluster_store):
    """The collector answers a miss from ClickHouse once the series' last point is committed, that is
    acknowledged by one replica of its shard. A Distributed read may reach the other replica before it
    fetched that part and return an older point; the next point's delta would then count the difference
    again. So on a cluster the look-up reads every replica and keeps each series' newest point."""
    from meterhouse.collector.ingest import committed_state_loader

    db = cluster_store.database
    sql = schema.series_state_sql(db, CLUSTER)
    source = f"clusterAllReplicas({CLUSTER}, {db}.{schema.SERIES_STATE_TABLE}_local)"
    assert source in sql
    assert cluster_store.client.query(f"EXPLAIN AST {sql}", parameters={"ids": [7]}).result_rows
    # Two replicas of the shard, one of them lagging: the look-up's query over both gives the newest point.
    state = f"{db}.{schema.SERIES_STATE_TABLE}_local"
    cluster_store.client.command(f"CREATE TABLE {state}_lagging AS {state}")
    cols = "series_id, start_time, time, is_int, cumulative_int, cumulative_double"
    cluster_store.client.command(
        f"INSERT INTO {state} ({cols}) VALUES (7, 0, 10, 1, 100, 0), (7, 0, 20, 1, 150, 0)"
    )
    cluster_store.client.command(f"INSERT INTO {state}_lagging ({cols}) VALUES (7, 0, 10, 1, 100, 0)")
    both = sql.replace(source, f"merge('{db}', '^{schema.SERIES_STATE_TABLE}_local')")
    assert [tuple(r)[4] for r in cluster_store.rows(both, {"ids": [7]})] == [150]
    # And the collector's loader sends that query when it runs on a cluster.
    sent = []

    class Node(Store):
        def rows(self, sql, parameters=None):
            sent.append(sql)
            return []

    committed_state_loader(Node(cluster_store.client, db, "node", cluster=CLUSTER), CLUSTER)([7])
    assert sent and source in sent[0]


def test_the_close_and_its_api_run_on_the_cluster_names(cluster_store):
    """The close's tables and the adjustments view in their cluster rendering (GLOBAL JOIN over the
    Distributed names), read by the months API: a point committed after the close is an adjustment."""
    from meterhouse.core import close

    month = close.Month.of_ns(time.time_ns())
    for _ in range(3):
        month = month.previous()
    put(cluster_store, [{"org_id": "org-a", "time": month.start_ns + H, "value_int": 5}])
    node = RecordingClusterStore(cluster_store)
    close.close_month(node, month, late_window_days=35)
    time.sleep(0.01)
    put(cluster_store, [{"org_id": "org-a", "time": month.start_ns + 2 * H, "value_int": 2}])  # late
    app = create_app(node, CollectorRegistry(), lambda: True, None).test_client()
    m = str(month)
    assert app.get(f"/api/v1/months/{m}/close").get_json()["status"] == schema.CLOSE_DONE
    (line,) = app.get(f"/api/v1/months/{m}/statements").get_json()["statements"]
    assert (line["org_id"], line["total_int"]) == ("org-a", "5")
    (adj,) = app.get(f"/api/v1/months/{m}/adjustments").get_json()["adjustments"]
    assert adj["org_id"] == "org-a"
    assert app.get("/api/v1/orgs/org-a/statements").status_code == 200
    view = (
        f"SELECT org_id, amount_int FROM {node.database}.{schema.ADJUSTMENTS_VIEW} WHERE month = {month.key}"
    )
    assert [tuple(r) for r in node.rows(view)] == [("org-a", 2)]


def test_a_cluster_node_holding_the_single_node_schema_is_refused(store):
    """`--cluster` against a database created without it (an upgrade from one node, or one start without
    the flag): every `CREATE … IF NOT EXISTS` of the cluster rendering finds the ingest and points names
    taken by plain tables, so the `_local` tables are created beside them and nothing writes there, while
    each node keeps its own plain tables — the split between endpoints the cluster exists to prevent.
    Such a node is refused; so is a database with the cluster schema opened as one node."""
    from meterhouse.core.store import SchemaMismatch

    node = Store(store.client, store.database, "node", cluster=CLUSTER)
    with pytest.raises(SchemaMismatch, match="single-node schema"):
        node.check_rendering()
    store.check_rendering()  # one node on the single-node schema: as it should be
