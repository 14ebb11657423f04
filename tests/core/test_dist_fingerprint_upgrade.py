"""The upgrade that gives folded distribution points their fingerprint: ``series_id`` on the distribution
tables (``schema.ADDED_COLUMNS``) and the view that fills it created again (``schema.REVISED_VIEWS``),
at start, with a kill at any step of it finished by the next start. The real embedded engine."""

from __future__ import annotations

import pytest
from previous_schema import before_dist_fingerprint

from meterhouse.core import schema

DIST_ADDED = [c for c in schema.ADDED_COLUMNS if c[1] == "series_id"]


def columns(store, table: str) -> list[str]:
    sql = "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position"
    return [str(r[0]) for r in store.rows(sql, {"db": store.database, "t": table})]


def ingest(store, org: str, count: int, seq: int, series_id: int | None = None) -> None:
    extra, value = (", series_id", f", {series_id}") if series_id is not None else ("", "")
    store.client.command(
        f"INSERT INTO {store.database}.{schema.DIST_INGEST_TABLE} "
        f"(org_id, metric, kind, time, count, batch_seq{extra}) "
        f"VALUES ('{org}', 'latency', 'histogram', now64(9), {count}, {seq}{value})"
    )


@pytest.mark.parametrize("done", [0, 1, 2, 3], ids=["none", "ingest-column", "both-columns", "view-dropped"])
def test_an_earlier_database_upgrades_in_place_and_a_kill_mid_upgrade_is_finished(store, done):
    """``done``: the upgrade's steps an earlier start ran before it was killed (add the column to the
    ingest table, to the raw table, drop the view to create it again)."""
    db = store.database
    fresh = {t: columns(store, t) for t in (schema.DIST_INGEST_TABLE, schema.DIST_TABLE)}
    before_dist_fingerprint(store)
    assert "series_id" not in columns(store, schema.DIST_TABLE)
    ingest(store, "old", 3, 1)  # a row the earlier version wrote
    steps = schema.added_columns_migration(db, "", DIST_ADDED)
    steps.append(f"DROP VIEW IF EXISTS {db}.distribution_points_mv")
    for statement in steps[:done]:
        store.client.command(statement)
    store.ensure_schema()
    for table, names in fresh.items():
        assert columns(store, table) == names, table  # the same columns, in a new database's order
    view = store.scalar(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {v:String}",
        {"db": db, "v": "distribution_points_mv"},
    )
    assert "series_id" in view
    ingest(store, "new", 4, 2, series_id=12345)
    rows = store.rows(f"SELECT org_id, count, series_id FROM {db}.{schema.DIST_TABLE} ORDER BY org_id")
    assert [tuple(r) for r in rows] == [("new", 4, 12345), ("old", 3, 0)]
    store.ensure_schema()  # a second start finds nothing to do
    assert columns(store, schema.DIST_TABLE) == fresh[schema.DIST_TABLE]
