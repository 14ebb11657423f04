"""Adversarial: the embedded engine's writer-derived rows (orgs, catalog, attribute sets, cardinality
pairs) under a cut between a group's inserts and across the upgrade from the views' version."""

from __future__ import annotations

import time
import uuid

import pytest
from previous_schema import writer_views_before

from meterhouse.collector.model import BATCH_COLUMNS, Blocks
from meterhouse.collector.writer import NUMBER_NAMES, insert_calls, stamp
from meterhouse.core import native, schema
from meterhouse.core.config import Config
from meterhouse.core.store import open_store

TYPES = [{c.name: c.type for c in schema.INGEST_COLUMNS}[n] for n in BATCH_COLUMNS]
HOUR = 3_600_000_000_000


def unstamped(rows: list[tuple[str, str, int]]) -> bytes:
    """A record's block: one sum point per (org, attribute value, time)."""
    base = dict(metric="m", kind=schema.KIND_SUM, unit="1", monotonic=1, is_int=1, value_int=3,
                value_double=0.0, resource_keys=[], resource_values=[], scope_name="", scope_version="",
                temporality=schema.TEMPORALITY_DELTA, series_id=0, series_start=0, cumulative_int=0,
                cumulative_double=0.0)  # fmt: skip
    out = []
    for org, value, t in rows:
        out.append({**base, "org_id": org, "attr_keys": ["k"], "attr_values": [value], "start_time": t,
                    "time": t, "received_at": t})  # fmt: skip
    return native.encode(BATCH_COLUMNS, TYPES, [[r[n] for r in out] for n in BATCH_COLUMNS])


def points(now: int) -> list[tuple[str, str, int]]:
    h = now - now % HOUR - 2 * HOUR
    return [("a", "x", h + 1), ("a", "y", h + HOUR - 1), ("b", "x", h + HOUR), ("b", "z", h + HOUR + 5)] * 3


def snapshot(store) -> dict[str, object]:
    db = store.database
    q = {
        "points": f"SELECT org_id, count() FROM {db}.{schema.POINTS_TABLE} GROUP BY org_id ORDER BY 1",
        "hourly": f"SELECT org_id, sum(points) FROM {db}.{schema.HOURLY_TABLE} GROUP BY org_id ORDER BY 1",
        "by_metric": f"SELECT org_id, sum(points) FROM {db}.{schema.METRIC_ORGS_TABLE} GROUP BY 1 ORDER BY 1",
        "orgs": f"SELECT org_id, sum(points), min(first_seen), max(last_seen) FROM {db}.{schema.ORGS_TABLE} "
        "GROUP BY org_id ORDER BY 1",
        "catalog": f"SELECT metric, kind, sum(points) FROM {db}.{schema.CATALOG_TABLE} GROUP BY 1, 2 ORDER BY 1",
        "sets": f"SELECT DISTINCT org_id, metric, attr_keys, attr_values FROM {db}.{schema.ATTRIBUTE_SETS_TABLE} "
        "ORDER BY 1, 4",
        "cardinality": f"SELECT metric, hour, key, uniqExactMerge(distinct_values), uniqExactMerge(orgs) "
        f"FROM {db}.{schema.ATTRIBUTE_CARDINALITY_TABLE} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    }
    return {name: [tuple(r) for r in store.rows(sql)] for name, sql in q.items()}


@pytest.fixture
def second_store(engine_dir):
    s = open_store(Config(data_dir=engine_dir, database=f"t_{uuid.uuid4().hex[:12]}"))
    yield s
    s.client.command(f"DROP DATABASE IF EXISTS {s.database} SYNC")


def calls_of(store, seq: int, block: bytes, seen: native.KeySet | None = None):
    return insert_calls(store, f"{schema.ONE_BLOCK_TOKEN_PREFIX}{seq:x}", seq,
                        blocks=[Blocks(block, block_rows(block), b"", 0, f"d{seq}", 0)], seen=seen)  # fmt: skip


def block_rows(block: bytes) -> int:
    return native.decode(block)[3]


class Cut(Exception):
    pass


@pytest.mark.parametrize("cut_after", ["s", "a", "o", "c"])
def test_a_group_cut_after_any_insert_and_replayed_in_doubt_equals_one_clean_try(
    store, second_store, cut_after
):
    """Reference: the group once, cleanly. Cut: the same group's inserts stopped after ``cut_after``, the
    process gone (a fresh key set), the group replayed in doubt."""
    block = unstamped(points(time.time_ns()))
    for _kind, call in calls_of(second_store, 3, block):
        call(False)
    seen = native.KeySet(1 << 10)
    try:
        for kind, call in calls_of(store, 3, block, seen):
            call(False)
            if kind == cut_after:
                raise Cut
    except Cut:
        pass
    for _kind, call in calls_of(store, 3, block, native.KeySet(1 << 10)):
        call(True)
    assert snapshot(store) == snapshot(second_store)


def test_a_group_in_doubt_from_the_views_version_counts_once_after_the_upgrade(store, second_store):
    """The version before: views over every point filled orgs, catalog, sets and cardinality. Its group
    5 landed (points and views) and the process died before the commit mark; the start drops the views
    and the replay goes in doubt. Every table must equal one clean try of the new version."""
    block = unstamped(points(time.time_ns()))
    for _kind, call in calls_of(second_store, 5, block):
        call(False)
    db = store.database
    writer_views_before(store)
    for statement in schema._cardinality_views(db):
        store.client.command(statement)
    for view in ("attribute_cardinality_values_mv", "attribute_cardinality_keys_mv"):
        store.client.command(f"DROP VIEW IF EXISTS {db}.{view}")
    token = f"{schema.ONE_BLOCK_TOKEN_PREFIX}5"
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, stamp(block, block_rows(block), token + ":n", 5),
                        token + ":n")  # fmt: skip
    landed = snapshot(store)
    assert landed["orgs"] and landed["catalog"] and landed["sets"] and landed["cardinality"]  # the views ran
    store.ensure_schema()
    for _kind, call in calls_of(store, 5, block, native.KeySet(1 << 10)):
        call(True)
    assert snapshot(store) == snapshot(second_store)


def test_sets_that_differ_only_in_how_bytes_split_into_strings_are_all_stored():
    """Strings with NULs, empty strings and values that only move a byte from one string to the next: each
    distinct set is new and stored (the C summary and the Python reference agree)."""
    sets = [
        ("", [], []),
        ("", [""], [""]),
        ("o", ["a\x00", "b"], ["", ""]),
        ("o", ["a", "\x00b"], ["", ""]),
        ("o", ["a"], ["\x00"]),
        ("o", ["a"], ["\x00\x00"]),
        ("o\x00", ["a"], [""]),
        ("o", ["a", ""], ["", ""]),
        ("o", ["", "a"], ["", ""]),
    ]
    now = time.time_ns()
    rows = []
    for org, keys, values in sets:
        rows.append({"org_id": org, "metric": "m", "kind": schema.KIND_SUM, "unit": "1", "time": now,
                     "attr_keys": keys, "attr_values": values})  # fmt: skip
    names = ("org_id", "metric", "kind", "unit", "time", "attr_keys", "attr_values")
    types = ("String", "String", "String", "String", "Int64", "Array(String)", "Array(String)")
    block = native.encode(names, types, [[r[n] for r in rows] for n in names])
    c = native.group_summary(block, native.KeySet(1 << 10), True)
    p = native.group_summary_python(block, native.KeySet(1 << 10), True)
    assert len(set(c[3])) == len(sets)
    assert sorted(c[3]) == sorted(p[3])
    assert sorted(c[0]) == sorted(p[0])
