"""The attribute-cardinality rollup (``attribute_cardinality_hourly``): distinct values and distinct orgs
per metric, attribute key and hour, filled in two parts so that no row of the ARRAY JOIN carries the org:
by two views over every point on a ClickHouse server, and on the embedded engine by two views over the
(attribute set, hour) pairs the writer sends once each (``schema.cardinality_ddl``), which must give the
same table.

One view used to fill both: its ARRAY JOIN copied each point's org onto every one of its attributes, so
points of 127 attributes with a 4,096-character org (inside every bound, acknowledged) needed more than
the engine's whole memory share, and the group failed MEMORY_LIMIT_EXCEEDED on every retry."""

from __future__ import annotations

import time

import pytest

from meterhouse.collector.model import BATCH_COLUMNS
from meterhouse.collector.writer import NUMBER_NAMES, stamp
from meterhouse.core import native, schema
from meterhouse.core.store import Store

TYPES = [{c.name: c.type for c in schema.INGEST_COLUMNS}[n] for n in BATCH_COLUMNS]

#: The view as the version before created it: one view, the org carried through the ARRAY JOIN.
BEFORE = """CREATE MATERIALIZED VIEW {db}.attribute_cardinality_hourly_mv TO {db}.{table} AS
SELECT metric, toStartOfHour(time) AS hour, key,
    uniqExactState(value) AS distinct_values, uniqExactState(org_id) AS orgs
FROM {db}.{ingest} ARRAY JOIN attr_keys AS key, attr_values AS value
WHERE kind = 'sum'
GROUP BY metric, hour, key"""


def write(store, seq: int, points: list[tuple[str, dict[str, str]]], now: int = 0, raw: bytes = b"") -> None:
    """One group as the writer inserts it (on the embedded engine with its own attribute-set rows)."""
    from meterhouse.collector.model import Blocks
    from meterhouse.collector.writer import insert_calls

    raw = raw or unstamped(points, now)
    token = f"{schema.ONE_BLOCK_TOKEN_PREFIX}{seq:x}"
    seen = _SEEN.setdefault(store.database, native.KeySet(1 << 12))
    blocks = [Blocks(raw, len(points), b"", 0, "d", 0)]
    for _kind, insert in insert_calls(store, token, seq, blocks=blocks, seen=seen):
        insert(False)


#: The writer's key set per database (what a running writer keeps between groups).
_SEEN: dict[str, native.KeySet] = {}


def block(seq: int, points: list[tuple[str, dict[str, str]]], now: int = 0) -> bytes:
    return stamp(unstamped(points, now), len(points), f"tok-{seq}:n", seq)


def unstamped(points: list[tuple[str, dict[str, str]]], now: int = 0) -> bytes:
    now = now or time.time_ns()
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
    return native.encode(BATCH_COLUMNS, TYPES, cols)


def views_store(store) -> Store:
    """A database beside ``store`` with a ClickHouse server's schema (the two views), on the same engine."""
    other = Store(store.client, store.database + "_views", "http://views")
    other.ensure_schema()
    return other


def per_hour(store) -> dict[tuple[str, str, str], tuple[int, int]]:
    return {
        (str(m), str(h), str(k)): (int(v), int(o))
        for m, h, k, v, o in store.rows(
            f"SELECT metric, hour, key, uniqExactMerge(distinct_values), uniqExactMerge(orgs) "
            f"FROM {store.database}.{schema.ATTRIBUTE_CARDINALITY_TABLE} GROUP BY metric, hour, key"
        )
    }


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
    write(store, 1, points)
    assert cardinality(store) == {"a": (5, 3), "b": (1, 3), "c": (1, 1)}


def test_points_with_many_attributes_and_a_long_org_insert_within_the_engine_share(store):
    """2,000 points, 127 attributes each, one 4,096-character org: 19 MB stored, under the request's
    stored bound at the default budget (21 MiB). Inserted with the engine's per-insert limit at its
    default share (256 MiB); the one view failed it, asking for one chunk of 256 MiB (346 MiB in all)."""
    org = "o" * 4096
    points = [(org, {f"k{j:03}": str(i) for j in range(127)}) for i in range(2000)]
    store.client.command("SET max_memory_usage = 268435456")
    try:
        write(store, 1, points)
    finally:
        store.client.command("SET max_memory_usage = 0")
    found = cardinality(store)
    assert len(found) == 127 and set(found.values()) == {(2000, 1)}


def test_the_views_of_the_version_before_are_replaced_at_start(store):
    """A database of the version with one view over every point (and of the one with two): at start the
    views are dropped; the writer's pairs fill the table from then on, each point once."""
    db, table = store.database, schema.ATTRIBUTE_CARDINALITY_TABLE
    store.client.command(BEFORE.format(db=db, table=table, ingest=schema.INGEST_TABLE))
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block(1, [("org-1", {"a": "1"})]), "tok-1:n")
    assert cardinality(store) == {"a": (1, 1)}  # the old view's
    store.ensure_schema()
    assert store.rows(f"SELECT name FROM system.tables WHERE database = '{db}' AND name = "
                      "'attribute_cardinality_hourly_mv'") == []  # fmt: skip
    write(store, 2, [("org-2", {"a": "2"})])
    assert cardinality(store) == {"a": (2, 2)}


@pytest.mark.parametrize("kill", [False, True])
def test_the_writers_pairs_give_the_table_the_views_give(store, kill):
    """The same groups (three hours, orgs sharing and not sharing sets, a set repeated across groups and
    hours, a gauge that the table leaves out) inserted into a server's schema and the embedded one fill
    the same table; with ``kill``, the writer's key set is lost (a restart) half-way and every pair it had
    sent is sent again."""
    views = views_store(store)
    hour = 3600 * 10**9
    t0 = (time.time_ns() // hour - 3) * hour
    groups = []
    for g in range(6):
        points = [(f"org-{(g + i) % 4}", {"region": f"r{i % 3}", "plan": ("free", "pro")[i % 2],
                   **({"feature": f"f{g}"} if i % 5 == 0 else {})}) for i in range(40)]  # fmt: skip
        groups.append((g + 1 if g < 5 else 10**18 + g, points, t0 + (g % 3) * hour + g))
    try:
        for n, (seq, points, at) in enumerate(groups):
            for target in (store, views):
                write(target, seq, points, at)
            if kill and n == 2:
                _SEEN.clear()
        gauge_point = [("org-9", {"only": "gauge"})]
        gauge = unstamped(gauge_point).replace(b"\x03sum", b"\x05gauge")
        assert b"gauge" in gauge
        for target in (store, views):
            write(target, 10**18 + 9, gauge_point, raw=gauge)
        want = per_hour(views)
        assert len(want) == 3 * 3 and per_hour(store) == want  # 3 hours x region, plan, feature
    finally:
        store.client.command(f"DROP DATABASE IF EXISTS {views.database} SYNC")
