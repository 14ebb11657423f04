"""The ClickHouse schema: the contract between the planes.

This module owns every table and column name and all DDL. Data arrives in ``usage_points_ingest``
(``ENGINE = Null``) as parallel ``Array(String)`` key/value columns, which clickhouse-connect inserts
several times faster than a ``Map``; materialized views turn them into a sorted ``Map`` in
``usage_points`` and roll sums up into ``usage_hourly``. Every target table has a deduplication window,
so a batch inserted again with the same ``insert_deduplication_token`` counts once everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

INGEST_TABLE = "usage_points_ingest"
POINTS_TABLE = "usage_points"
HOURLY_TABLE = "usage_hourly"
EVENTS_TABLE = "pipeline_events"

#: Blocks remembered per table for insert deduplication (a retried or replayed batch counts once).
DEDUP_WINDOW_BLOCKS = 10_000

#: Kinds of stored points. Only ``sum`` points are usage and reach the hourly rollup.
KIND_SUM = "sum"


@dataclass(frozen=True)
class Column:
    name: str
    type: str


#: Columns the collector inserts, in order; the writer sends exactly these.
INGEST_COLUMNS: tuple[Column, ...] = (
    Column("org_id", "String"),
    Column("metric", "String"),
    Column("kind", "String"),
    Column("unit", "String"),
    Column("monotonic", "UInt8"),
    Column("start_time", "DateTime64(9, 'UTC')"),
    Column("time", "DateTime64(9, 'UTC')"),
    Column("is_int", "UInt8"),
    Column("value_int", "Int64"),
    Column("value_double", "Float64"),
    Column("attr_keys", "Array(String)"),
    Column("attr_values", "Array(String)"),
    Column("resource_keys", "Array(String)"),
    Column("resource_values", "Array(String)"),
    Column("scope_name", "String"),
    Column("scope_version", "String"),
    Column("received_at", "DateTime64(9, 'UTC')"),
    Column("batch_id", "String"),
)
INGEST_COLUMN_NAMES = tuple(c.name for c in INGEST_COLUMNS)
INGEST_COLUMN_TYPES = tuple(c.type for c in INGEST_COLUMNS)


def ddl(database: str) -> list[str]:
    """Statements that create the schema if it is missing (idempotent), in dependency order."""
    db = database
    dedup = f"non_replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}"
    ingest_cols = ",\n    ".join(f"{c.name} {c.type}" for c in INGEST_COLUMNS)
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"""CREATE TABLE IF NOT EXISTS {db}.{INGEST_TABLE} (
    {ingest_cols}
) ENGINE = Null""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{POINTS_TABLE} (
    org_id String,
    metric LowCardinality(String),
    kind LowCardinality(String),
    unit LowCardinality(String),
    monotonic UInt8,
    start_time DateTime64(9, 'UTC') CODEC(Delta, ZSTD),
    time DateTime64(9, 'UTC') CODEC(Delta, ZSTD),
    is_int UInt8,
    value_int Int64 CODEC(T64, ZSTD),
    value_double Float64 CODEC(Gorilla, ZSTD),
    attributes Map(LowCardinality(String), String),
    resource Map(LowCardinality(String), String),
    scope_name LowCardinality(String),
    scope_version LowCardinality(String),
    received_at DateTime64(9, 'UTC') CODEC(Delta, ZSTD),
    committed_at DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD),
    batch_id String CODEC(ZSTD)
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (org_id, metric, time)
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_points_mv TO {db}.{POINTS_TABLE} AS
SELECT org_id, metric, kind, unit, monotonic, start_time, time, is_int, value_int, value_double,
    mapSort(mapFromArrays(attr_keys, attr_values)) AS attributes,
    mapSort(mapFromArrays(resource_keys, resource_values)) AS resource,
    scope_name, scope_version, received_at, batch_id
FROM {db}.{INGEST_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{HOURLY_TABLE} (
    org_id String,
    metric LowCardinality(String),
    hour DateTime('UTC'),
    attributes_hash UInt64,
    attributes SimpleAggregateFunction(any, Map(String, String)),
    unit SimpleAggregateFunction(any, String),
    value_int SimpleAggregateFunction(sum, Int128),
    value_double SimpleAggregateFunction(sum, Float64),
    points SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, metric, hour, attributes_hash)
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_hourly_mv TO {db}.{HOURLY_TABLE} AS
SELECT org_id, metric, toStartOfHour(time) AS hour, cityHash64(attributes) AS attributes_hash,
    attributes, any(unit) AS unit,
    sum(toInt128(value_int)) AS value_int, sum(value_double) AS value_double, count() AS points
FROM {db}.{POINTS_TABLE}
WHERE kind = '{KIND_SUM}'
GROUP BY org_id, metric, hour, attributes""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{EVENTS_TABLE} (
    time DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    kind LowCardinality(String),
    source String,
    target String,
    reason String,
    details String
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (kind, time)""",
    ]


#: Step names the API accepts, with the ClickHouse interval each means.
STEPS = {"1m": "toStartOfMinute", "1h": "toStartOfHour", "1d": "toStartOfDay"}


def usage_series_sql(database: str, step: str, rollup: bool) -> str:
    """Per-step usage of one org and metric over ``[from, to)``; shared by the API and dashboards.

    Bound parameters: ``org`` (String), ``metric`` (String), ``from_ns`` and ``to_ns`` (Int64 ns).
    With ``rollup`` the hourly table is read; the caller uses it only for hour-aligned ranges.
    """
    bucket = STEPS[step]
    if rollup:
        return f"""SELECT {bucket}(hour) AS start, sum(value_int) AS vi, sum(value_double) AS vd,
    sum(points) AS n, any(unit) AS u
FROM {database}.{HOURLY_TABLE}
WHERE org_id = {{org:String}} AND metric = {{metric:String}}
    AND hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')
GROUP BY start ORDER BY start"""
    return f"""SELECT {bucket}(time) AS start, sum(toInt128(value_int)) AS vi,
    sum(value_double) AS vd, count() AS n, any(unit) AS u
FROM {database}.{POINTS_TABLE}
WHERE org_id = {{org:String}} AND metric = {{metric:String}} AND kind = '{KIND_SUM}'
    AND time >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND time < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')
GROUP BY start ORDER BY start"""
