"""The database as earlier versions made it: before the writer's ledger (no ``batch_seq`` anywhere, and the
organisations' and catalog's views reading the raw tables, which read the ingest tables since), and
before folded distribution points kept their own set's fingerprint (no ``series_id`` on the
distribution tables)."""

from __future__ import annotations

import re

from meterhouse.core import schema

#: The views whose source the ledger changed, with the table each read before.
READ_BEFORE = {
    "org_last_seen_mv": (schema.INGEST_TABLE, schema.POINTS_TABLE),
    "metric_catalog_points_mv": (schema.INGEST_TABLE, schema.POINTS_TABLE),
    "metric_catalog_dist_mv": (schema.DIST_INGEST_TABLE, schema.DIST_TABLE),
}


def previous_version(store) -> list[str]:
    """Turn the store's database into the version before's; returns the ledger views."""
    db = store.database
    views = list(schema.LEDGER_VIEW_NAMES)
    creates = {m.group(2): s for s in schema.ddl(db) if (m := schema._CREATE_MV.match(s))}
    for view in views:
        store.client.command(f"DROP VIEW IF EXISTS {db}.{view}")  # the embedded engine has fewer
    for table in schema.LEDGER_TABLES:
        store.client.command(f"ALTER TABLE {db}.{table} DROP INDEX batch_seq_idx")
        store.client.command(f"ALTER TABLE {db}.{table} DROP COLUMN batch_seq")
    for table in (schema.INGEST_TABLE, schema.DIST_INGEST_TABLE):
        store.client.command(f"ALTER TABLE {db}.{table} DROP COLUMN batch_seq")
    for table in (schema.DIST_INGEST_TABLE, schema.DIST_TABLE):
        store.client.command(f"ALTER TABLE {db}.{table} DROP COLUMN series_id")
    for view in views:
        old = re.sub(r",\s*max\(batch_seq\) AS batch_seq|, batch_seq(?=\n)", "", creates[view])
        old = old.replace(", series_id, batch_id", ", batch_id")  # the distribution view's fingerprint
        old = old.replace(", batch_id, batch_seq", ", batch_id")  # the distribution view lists its columns
        if view in READ_BEFORE:
            now, before = READ_BEFORE[view]
            old = old.replace(f"FROM {db}.{now}\n", f"FROM {db}.{before}\n")
            assert f"FROM {db}.{before}\n" in old, view
        assert "batch_seq" not in old, view
        store.client.command(old)
    return views


def before_dist_fingerprint(store) -> None:
    """The version before folded distribution points kept a fingerprint (after the ledger)."""
    db = store.database
    store.client.command(f"DROP VIEW IF EXISTS {db}.distribution_points_mv")
    for table in (schema.DIST_INGEST_TABLE, schema.DIST_TABLE):
        store.client.command(f"ALTER TABLE {db}.{table} DROP COLUMN series_id")
    (create,) = [
        s
        for s in schema.ddl(db)
        if (m := schema._CREATE_MV.match(s)) and m.group(2) == "distribution_points_mv"
    ]
    old = create.replace(", series_id, batch_id", ", batch_id")
    assert "series_id" not in old
    store.client.command(old)


def writer_views_before(store) -> None:
    """The views the versions before fed the orgs, the catalog and the attribute sets by (the embedded
    engine's writer inserts those rows itself since, and its start drops the views: ``Store.ensure_schema``,
    the upgrade)."""
    for statement in schema.ddl(store.database):
        m = schema._CREATE_MV.match(statement)
        if m and m.group(2) in schema.WRITER_VIEWS:
            store.client.command(statement)
