"""The writer's ledger (``schema.SEQ_COLUMN``): which tables hold a group, a group in doubt inserted only
where it is missing, and a database of the version before it brought up to date at start."""

from __future__ import annotations

import re
import time

import pytest
from previous_schema import previous_version

from meterhouse.collector.model import BATCH_COLUMNS, Blocks
from meterhouse.collector.writer import NUMBER_NAMES, insert_calls, stamp
from meterhouse.core import native, schema

TYPES = [{c.name: c.type for c in schema.INGEST_COLUMNS}[n] for n in BATCH_COLUMNS]


def block(org: str, seq: int, rows: int = 10) -> bytes:
    return stamp(unstamped(org, rows), rows, f"tok-{seq}:n", seq)


def unstamped(org: str, rows: int) -> bytes:
    """A record's block as the spool holds it (without the writer's columns)."""
    now = time.time_ns()
    row = dict(org_id=org, metric="m", kind=schema.KIND_SUM, unit="1", monotonic=1, start_time=now,
               time=now, is_int=1, value_int=3, value_double=0.0, attr_keys=["k"], attr_values=["v"],
               resource_keys=[], resource_values=[], scope_name="", scope_version="", received_at=now,
               temporality=schema.TEMPORALITY_DELTA, series_id=0, series_start=0, cumulative_int=0,
               cumulative_double=0.0)  # fmt: skip
    cols = [[row[n]] * rows for n in BATCH_COLUMNS]
    return native.encode(BATCH_COLUMNS, TYPES, cols)


def totals(store) -> dict[str, dict[str, int]]:
    db = store.database
    out = {}
    for table, expr in ((schema.POINTS_TABLE, "count()"), (schema.HOURLY_TABLE, "sum(points)"),
                        (schema.METRIC_ORGS_TABLE, "sum(points)"), (schema.ORGS_TABLE, "sum(points)")):  # fmt: skip
        out[table] = {
            o: int(n) for o, n in store.rows(f"SELECT org_id, {expr} FROM {db}.{table} GROUP BY org_id")
        }
    out[schema.CATALOG_TABLE] = {
        m: int(n)
        for m, n in store.rows(f"SELECT metric, sum(points) FROM {db}.{schema.CATALOG_TABLE} GROUP BY metric")
    }
    return out


def write(store, org: str, seq: int, doubt: bool = False) -> None:
    """A group of 10 points of ``org`` as the writer inserts it (with its own rows: orgs, catalog, sets),
    every insert of it ``doubt``-ful or not."""
    calls = insert_calls(store, f"{schema.ONE_BLOCK_TOKEN_PREFIX}{seq:x}", seq,
                         blocks=[Blocks(unstamped(org, 10), 10, b"", 0, f"d{seq}", 0)])  # fmt: skip
    for _kind, call in calls:
        call(doubt)


def test_a_group_in_doubt_goes_only_where_it_is_missing(store):
    write(store, "a", 5)
    write(store, "b", 6)
    before = totals(store)
    # Group 6 lost its rows in two tables (the kill took those parts; their dedup logs keep the token).
    for table in (schema.HOURLY_TABLE, schema.ORGS_TABLE):
        store.client.command(
            f"ALTER TABLE {store.database}.{table} DELETE WHERE batch_seq >= 6",
            settings={"mutations_sync": 2},
        )
    redone = store.insert_in_doubt("n", NUMBER_NAMES, block("b", 6), "tok-6:n", 6)
    assert redone == [schema.HOURLY_TABLE]  # the orgs' rows are the writer's own insert ("o")
    write(store, "b", 6, doubt=True)
    assert totals(store) == before
    # Everything in: nothing is inserted again, however often asked.
    for _ in range(2):
        assert store.insert_in_doubt("n", NUMBER_NAMES, block("b", 6), "tok-6:n", 6) == []
        write(store, "b", 6, doubt=True)
    assert totals(store) == before
    # Nothing in (the kill came first): everywhere, once; the redo table is gone afterwards.
    assert len(store.insert_in_doubt("n", NUMBER_NAMES, block("c", 7), "tok-7:n", 7)) == 3
    write(store, "c", 7, doubt=True)
    after = totals(store)
    assert (
        after[schema.POINTS_TABLE]["c"]
        == after[schema.HOURLY_TABLE]["c"]
        == after[schema.METRIC_ORGS_TABLE]["c"]
        == after[schema.ORGS_TABLE]["c"]
        == 10
    )
    assert after[schema.CATALOG_TABLE]["m"] == 30
    tables = {r[0] for r in store.rows(f"SELECT name FROM system.tables WHERE database = '{store.database}'")}
    assert not {t for t in tables if t.startswith(schema.REDO_TABLE)}


def test_a_database_of_the_version_before_is_brought_up_to_date(store):
    """Tables without ``batch_seq`` and views that do not fill it (the schema before the ledger): the
    start adds the column and index and creates the views again; rows from before read 0."""
    db = store.database
    write(store, "old", 1)
    views = previous_version(store)
    store.ensure_schema()
    for view in views:
        query = store.scalar(
            f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name = '{view}'"
        )
        if view in schema.WRITER_VIEWS:
            assert query is None, view  # the embedded engine's writer fills their tables
        else:
            assert "batch_seq" in query, view
    write(store, "new", 2)
    assert store.max_batch_seq() == 2
    assert store.insert_in_doubt("n", NUMBER_NAMES, block("new", 2), "tok-2:n", 2) == []
    t = totals(store)
    assert t[schema.POINTS_TABLE] == t[schema.HOURLY_TABLE] == t[schema.ORGS_TABLE] == {"old": 10, "new": 10}


@pytest.mark.parametrize("prefix", [schema.ONE_BLOCK_TOKEN_PREFIX, schema.LEDGER_TOKEN_PREFIX])
def test_a_group_of_over_a_million_points_is_one_part_per_table_so_a_kill_takes_all_of_it_or_none(
    store, prefix
):
    """ClickHouse squashes an insert's blocks into parts of about a million rows (and a view's output
    likewise), committed one after another: a kill between two of them would leave a table holding part
    of a group, which the ledger takes for all of it. The writer's insert of a ledger group is one part
    per table (and month) however large."""
    from meterhouse.collector.model import Blocks
    from meterhouse.collector.writer import insert_calls

    db = store.database
    tables = sorted({*schema.ledger_tables("n"), *schema.WRITER_TABLES.values()})
    for table in tables:
        store.client.command(f"SYSTEM STOP MERGES {db}.{table}")
    rows, records = 275_000, 5  # five requests' blocks: over a million rows and some
    record = unstamped("big", rows)
    blocks = [Blocks(record, rows, b"", 0, f"d{i}", 0) for i in range(records)]
    calls = insert_calls(store, prefix + "big", 9, blocks=blocks)
    assert [kind for kind, _ in calls] == ["s", "a", "o", "c", "n"]
    for _kind, call in calls:
        call(False)  # the writer's first try
    parts = dict(
        store.rows(
            f"SELECT table, count() FROM system.parts WHERE database = '{db}' AND active "
            f"AND table IN {tuple(tables)} GROUP BY table"
        )
    )
    assert parts == dict.fromkeys(tables, 1)
    assert (
        store.scalar(f"SELECT count() FROM {db}.{schema.POINTS_TABLE} WHERE batch_seq = 9") == rows * records
    )


def test_a_migration_a_kill_cut_short_is_finished_at_the_next_start(store):
    """The start adds ``batch_seq`` table by table; a kill after the raw tables got it and before the
    rollups did must not leave the rollups without it (the ledger could not ask them, and every group in
    doubt would fail there for good)."""
    db = store.database
    write(store, "old", 1)
    previous_version(store)
    statements = schema.seq_columns_migration(db)
    for statement in statements[:4]:  # the ingest and raw tables; then the kill
        store.client.command(statement)
    store.ensure_schema()
    for table in schema.LEDGER_TABLES:
        columns = store.rows(f"SELECT name FROM system.columns WHERE database = '{db}' AND table = '{table}'")
        assert ("batch_seq",) in columns, table
    indexed = store.rows(f"SELECT table FROM system.data_skipping_indices WHERE database = '{db}'")
    assert {(t,) for t in schema.LEDGER_TABLES} <= set(indexed)
    write(store, "new", 2)
    assert store.insert_in_doubt("n", NUMBER_NAMES, block("new", 2), "tok-2:n", 2) == []
    t = totals(store)
    assert t[schema.POINTS_TABLE] == t[schema.HOURLY_TABLE] == t[schema.ORGS_TABLE] == {"old": 10, "new": 10}


def test_a_new_spool_beside_a_database_it_cannot_read_at_start_numbers_above_its_groups(engine_dir, tmp_path):
    """The spool is gone and the database stays (its groups carry numbers up to N); the engine fails at
    start, so the new spool cannot learn N. It must still number its records above N: a group of the new
    spool in doubt (its first try failed) would otherwise find the old groups' rows at or above its number
    in every table, be taken as landed, and be lost."""
    import json
    import shutil
    import uuid

    import requests
    from conftest import drain, shared_engine
    from faulty_store import faulty_connect
    from otlp_builders import point, sum_request

    from meterhouse.core.config import Config
    from meterhouse.runtime import Stack

    database = f"sp_{uuid.uuid4().hex[:12]}"
    control = tmp_path / "faults.json"
    control.write_text(json.dumps({"down": []}))
    config = Config(data_dir=tmp_path / "stack", database=database, otlp_http_port=0, otlp_grpc_port=0,
                    http_port=0, sql_port=0, flush_interval_s=0.05)  # fmt: skip

    def send(stack, value: int) -> None:
        body = sum_request({"calls": [point(value, {"org.id": "a"})]}).SerializeToString()
        r = requests.post(f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics", data=body,
                          headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text

    stack = Stack(config, faulty_connect(shared_engine(engine_dir, database), control))
    stack.start()
    try:
        for v in range(1, 6):
            send(stack, v)
            drain(stack)
    finally:
        stack.shutdown(5)
    shutil.rmtree(config.data_dir / "spool")
    control.write_text(json.dumps({"down": ["embedded"]}))  # the engine fails at start
    stack = Stack(config, faulty_connect(shared_engine(engine_dir, database), control))
    stack.start()
    reader = shared_engine(engine_dir, database)("embedded")
    try:
        send(stack, 100)  # spooled; its first try fails
        deadline = time.monotonic() + 10
        while (
            not stack.metrics.insert_failures.labels(cause="unavailable")._value.get()
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        control.write_text(json.dumps({"down": []}))
        drain(stack)
    finally:
        stack.shutdown(5)
    total = reader.scalar(f"SELECT sum(value_int) FROM {database}.{schema.HOURLY_TABLE} WHERE org_id = 'a'")
    assert int(total) == 115
    assert int(reader.scalar(f"SELECT sum(value_int) FROM {database}.{schema.POINTS_TABLE}")) == 115


def test_every_view_of_an_ingest_table_is_in_the_ledger_or_repeatable():
    """A group in doubt reaches only the views the ledger names (``LEDGER_VIEWS``, ``REPEATABLE_VIEWS``):
    a view of an ingest table in neither would miss every redo."""
    for statement in schema.render("db"):
        if (m := schema._CREATE_MV.match(statement)) is None:
            continue
        view, select = m.group(2), m.group(5)
        for kind, source in schema.INGEST_OF.items():
            if re.search(rf"\bdb\.{source}\b", select):
                named = [v for _, v in schema.LEDGER_VIEWS[kind]] + list(schema.REPEATABLE_VIEWS[kind])
                assert view in named, (kind, view)


def test_a_redo_view_a_failed_cleanup_left_behind_does_not_feed_the_next_redo(store):
    """A redo whose insert landed and whose cleanup then failed leaves a copy of a view on the redo table
    (here: the organisations' one). The next redo (the group is retried) creates the redo table again;
    the copy left behind must not feed its table a second time."""
    db = store.database
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block("a", 5), "tok-5:n")
    before = totals(store)
    for statement in schema.redo_ddl(db, "n", ["org_last_seen_mv"]):
        store.client.command(statement)  # what the failed cleanup left
    assert store.insert_in_doubt("n", NUMBER_NAMES, block("a", 5), "tok-5:n", 5) == []
    assert totals(store) == before


def test_every_table_a_group_or_a_close_writes_fsyncs_its_parts_also_in_a_database_of_the_version_before(
    store,
):
    """A group is committed in the spool (which may then forget it) once its insert returned: its parts
    must be on disk by then, and a merged part before its sources go, or a power loss within the
    kernel's writeback delay loses committed usage with nothing left to replay."""
    db = store.database
    tables = schema.durable_tables(db)
    assert {schema.POINTS_TABLE, schema.HOURLY_TABLE, schema.METRIC_ORGS_TABLE, schema.DIST_TABLE,
            schema.ORGS_TABLE, schema.CATALOG_TABLE, schema.STATEMENTS_TABLE} <= set(tables)  # fmt: skip

    def settings() -> dict[str, str]:
        return {
            str(t): str(q)
            for t, q in store.rows(
                f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}' "
                f"AND name IN ({', '.join(repr(t) for t in tables)})"
            )
        }

    for table, query in settings().items():
        assert schema.DURABLE_SETTINGS in query, table
    for table in (schema.HOURLY_TABLE, schema.STATEMENTS_TABLE):  # as the version before created them
        store.client.command(
            f"ALTER TABLE {db}.{table} RESET SETTING fsync_after_insert, fsync_part_directory, "
            "min_rows_to_fsync_after_merge"
        )
    assert "fsync_after_insert" not in settings()[schema.HOURLY_TABLE]
    store.ensure_schema()
    for table, query in settings().items():
        assert "fsync_after_insert = 1" in query and "min_rows_to_fsync_after_merge = 1" in query, table
