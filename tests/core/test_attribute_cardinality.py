"""The attribute-cardinality rollup (``attribute_cardinality_hourly``): distinct values and distinct orgs
per metric, attribute key and hour, filled by two views so that no row of the ARRAY JOIN carries the org.

One view used to fill both: its ARRAY JOIN copied each point's org onto every one of its attributes, so
points of 127 attributes with a 4,096-character org (inside every bound, acknowledged) needed more than
the engine's whole memory share, and the group failed MEMORY_LIMIT_EXCEEDED on every retry."""

from __future__ import annotations

import time

from meterhouse.collector.model import BATCH_COLUMNS
from meterhouse.collector.writer import NUMBER_NAMES, stamp
from meterhouse.core import native, schema

TYPES = [{c.name: c.type for c in schema.INGEST_COLUMNS}[n] for n in BATCH_COLUMNS]

#: The view as the version before created it: one view, the org carried through the ARRAY JOIN.
BEFORE = """CREATE MATERIALIZED VIEW {db}.attribute_cardinality_hourly_mv TO {db}.{table} AS
SELECT metric, toStartOfHour(time) AS hour, key,
    uniqExactState(value) AS distinct_values, uniqExactState(org_id) AS orgs
FROM {db}.{ingest} ARRAY JOIN attr_keys AS key, attr_values AS value
WHERE kind = 'sum'
GROUP BY metric, hour, key"""


def block(seq: int, points: list[tuple[str, dict[str, str]]]) -> bytes:
    now = time.time_ns()
    rows = []
    for org, attrs in points:
        keys = sorted(attrs)
        rows.append(dict(org_id=org, metric="m", kind=schema.KIND_SUM, unit="1", monotonic=1,
                         start_time=now, time=now, is_int=1, value_int=1, value_double=0.0, attr_keys=keys,
                         attr_values=[attrs[k] for k in keys], resource_keys=[], resource_values=[],
                         scope_name="", scope_version="", received_at=now,
                         temporality=schema.TEMPORALITY_DELTA, series_id=0, series_start=0,
                         cumulative_int=0, cumulative_double=0.0))  # fmt: skip
    cols = [[row[n] for row in rows] for n in BATCH_COLUMNS]
    return stamp(native.encode(BATCH_COLUMNS, TYPES, cols), len(rows), f"tok-{seq}:n", seq)


def cardinality(store) -> dict[str, tuple[int, int]]:
    db = store.database
    return {
        str(key): (int(values), int(orgs))
        for key, values, orgs in store.rows(
            f"SELECT key, uniqExactMerge(distinct_values), uniqExactMerge(orgs) "
            f"FROM {db}.{schema.ATTRIBUTE_CARDINALITY_TABLE} GROUP BY key"
        )
    }


def test_distinct_values_and_orgs_per_key(store):
    points = [(f"org-{i % 3}", {"a": str(i % 5), "b": "x"}) for i in range(30)] + [("org-9", {"c": "1"})]
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block(1, points), "tok-1:n")
    assert cardinality(store) == {"a": (5, 3), "b": (1, 3), "c": (1, 1)}


def test_points_with_many_attributes_and_a_long_org_insert_within_the_engine_share(store):
    """2,000 points, 127 attributes each, one 4,096-character org: 19 MB stored, under the request's
    stored bound at the default budget (21 MiB). Inserted with the engine's per-insert limit at its
    default share (256 MiB); the one view failed it, asking for one chunk of 256 MiB (346 MiB in all)."""
    org = "o" * 4096
    points = [(org, {f"k{j:03}": str(i) for j in range(127)}) for i in range(2000)]
    store.client.command("SET max_memory_usage = 268435456")
    try:
        store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block(1, points), "tok-1:n")
    finally:
        store.client.command("SET max_memory_usage = 0")
    found = cardinality(store)
    assert len(found) == 127 and set(found.values()) == {(2000, 1)}


def test_the_one_view_of_the_version_before_is_replaced_at_start(store):
    db, table = store.database, schema.ATTRIBUTE_CARDINALITY_TABLE
    for view in ("attribute_cardinality_hourly_mv", "attribute_cardinality_orgs_mv"):
        store.client.command(f"DROP VIEW {db}.{view}")
    store.client.command(BEFORE.format(db=db, table=table, ingest=schema.INGEST_TABLE))
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block(1, [("org-1", {"a": "1"})]), "tok-1:n")
    store.ensure_schema()
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block(2, [("org-2", {"a": "2"})]), "tok-2:n")
    assert cardinality(store) == {"a": (2, 2)}  # each point once: the old view is gone, both new ones fill
