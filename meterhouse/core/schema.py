"""The ClickHouse schema: the contract between the planes.

This module owns every table and column name and all DDL. Data arrives in ``usage_points_ingest``
(``ENGINE = Null``) as parallel ``Array(String)`` key/value columns, which clickhouse-connect inserts
several times faster than a ``Map``; materialized views turn them into a sorted ``Map`` in
``usage_points`` and roll sums up into ``usage_hourly``. Every target table has a deduplication window,
so a batch inserted again with the same ``insert_deduplication_token`` counts once everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INGEST_TABLE = "usage_points_ingest"
POINTS_TABLE = "usage_points"
HOURLY_TABLE = "usage_hourly"
SERIES_STATE_TABLE = "series_state"
ORGS_TABLE = "org_last_seen"
CATALOG_TABLE = "metric_catalog"
DIST_INGEST_TABLE = "distribution_points_ingest"
DIST_TABLE = "distribution_points"
EVENTS_TABLE = "pipeline_events"
#: Cross-org views of the rollup, ordered by hour first: rankings over all orgs read only the
#: granules of the metric and hours asked for (the rollup is ordered by org first).
METRIC_ORGS_TABLE = "usage_hourly_by_metric"
ATTRIBUTE_CARDINALITY_TABLE = "attribute_cardinality_hourly"
#: Every attribute set stored per org and metric: what the series limit counts, read back at start.
ATTRIBUTE_SETS_TABLE = "attribute_sets"
#: The views that fill the attribute-cardinality table from every point on a ClickHouse server (``ddl``).
CARDINALITY_VIEWS = ("attribute_cardinality_hourly_mv", "attribute_cardinality_orgs_mv")
#: The embedded engine's: each new (attribute set, hour) pair of a sum, from the writer (``cardinality_ddl``).
CARDINALITY_INGEST_TABLE = "attribute_cardinality_ingest"

#: The hash of a point's attribute set that the rollup is keyed by, from the ingest columns (the
#: collector sorts the keys, so this is cityHash64 of the raw table's sorted ``attributes`` Map).
ATTRIBUTES_HASH = "cityHash64(mapFromArrays(attr_keys, attr_values))"

#: Blocks remembered per table for insert deduplication (a retried or replayed batch counts once).
DEDUP_WINDOW_BLOCKS = 10_000

#: Every table whose rows a batch adds to (its totals would count a batch twice) carries the writer's
#: ``batch_seq``: the spool sequence number of the group, increasing across groups and restarts. After a
#: crash or a failed insert the writer asks each of these tables whether it holds the group (a row with
#: ``batch_seq >= seq``: nothing newer was inserted) and pushes the group through the views of the
#: tables that do not, alone. ClickHouse's own deduplication log is not enough on a non-replicated table:
#: it is written before the part, so a kill between the two leaves a table that drops a replay it never
#: stored. The row and its part are one, so this question has a true answer. (On a replicated table the
#: block id and the part are committed together in Keeper, and the token suffices.)
_SEQ_RAW = "batch_seq UInt64 CODEC(Delta, ZSTD)"
_SEQ_MAX = "batch_seq SimpleAggregateFunction(max, UInt64)"
_SEQ_INDEX = "batch_seq_idx batch_seq TYPE minmax GRANULARITY 1"
SEQ_COLUMN = f"{_SEQ_RAW},\n    INDEX {_SEQ_INDEX}"
SEQ_MAX_COLUMN = f"{_SEQ_MAX},\n    INDEX {_SEQ_INDEX}"

#: What the engine writes is on disk before the writer commits the group in the spool (after which the
#: spool may forget it): a part's files and directory are fsync'd on insert, and a merged part before its
#: sources go (the embedded engine removes merged parts at once, ``old_parts_lifetime`` 0). Without these,
#: a power loss within the kernel's writeback delay took committed groups with it, the spool holding
#: nothing to replay. On every table a group or a close writes.
DURABLE_SETTINGS = "fsync_after_insert = 1, fsync_part_directory = 1, min_rows_to_fsync_after_merge = 1"

#: Kinds of stored points. Only ``sum`` points are usage and reach the hourly rollup; ``gauge`` points sit
#: beside them in ``usage_points``; histograms and summaries go to ``distribution_points``.
KIND_SUM = "sum"
KIND_GAUGE = "gauge"
KIND_HISTOGRAM = "histogram"
KIND_EXP_HISTOGRAM = "exp_histogram"
KIND_SUMMARY = "summary"

#: OTLP AggregationTemporality values, as stored in the ``temporality`` columns.
TEMPORALITY_UNSPECIFIED, TEMPORALITY_DELTA, TEMPORALITY_CUMULATIVE = 0, 1, 2


@dataclass(frozen=True)
class Column:
    name: str
    type: str


#: The range of a sum point's value as stored, which the edge checks every point against (a point outside
#: is rejected ``out_of_range``). ``value_int`` is an Int64 and every sum of it an Int128, which holds
#: 2^64 points (the rollups count points in a UInt64) at either limit. A double is summed in Float64,
#: which has no wider type: at most ``MAX_SUM_DOUBLE`` a point, 2^64 points sum to 1.8e307, about a tenth
#: of the largest double, so no rollup, statement, total or difference of two of them reaches ±Inf.
VALUE_INT_MIN, VALUE_INT_MAX = -(2**63), 2**63 - 1
MAX_SUM_DOUBLE = 1e288

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
    # Cumulative sums are stored as deltas (start_time is then the start of the delta's interval); the
    # sender's own start time and value and the series id are kept beside them, so that the conversion
    # state can be recovered from what was committed (series_state).
    Column("temporality", "UInt8"),
    Column("series_id", "UInt64"),
    Column("series_start", "DateTime64(9, 'UTC')"),
    Column("cumulative_int", "Int64"),
    Column("cumulative_double", "Float64"),
    Column("batch_id", "String"),
    Column("batch_seq", "UInt64"),
)
INGEST_COLUMN_NAMES = tuple(c.name for c in INGEST_COLUMNS)
INGEST_COLUMN_TYPES = tuple(c.type for c in INGEST_COLUMNS)

#: Columns of histogram, exponential histogram and summary points, inserted as a second table.
DIST_INGEST_COLUMNS: tuple[Column, ...] = (
    Column("org_id", "String"),
    Column("metric", "String"),
    Column("kind", "String"),
    Column("unit", "String"),
    Column("temporality", "UInt8"),
    Column("start_time", "DateTime64(9, 'UTC')"),
    Column("time", "DateTime64(9, 'UTC')"),
    Column("count", "UInt64"),
    Column("sum", "Nullable(Float64)"),
    Column("min", "Nullable(Float64)"),
    Column("max", "Nullable(Float64)"),
    Column("bucket_counts", "Array(UInt64)"),
    Column("explicit_bounds", "Array(Float64)"),
    Column("scale", "Int32"),
    Column("zero_count", "UInt64"),
    Column("zero_threshold", "Float64"),
    Column("positive_offset", "Int32"),
    Column("positive_counts", "Array(UInt64)"),
    Column("negative_offset", "Int32"),
    Column("negative_counts", "Array(UInt64)"),
    Column("quantiles", "Array(Float64)"),
    Column("quantile_values", "Array(Float64)"),
    Column("attr_keys", "Array(String)"),
    Column("attr_values", "Array(String)"),
    Column("resource_keys", "Array(String)"),
    Column("resource_values", "Array(String)"),
    Column("scope_name", "String"),
    Column("scope_version", "String"),
    Column("received_at", "DateTime64(9, 'UTC')"),
    Column("series_id", "UInt64"),  # a folded point's own set (series.fold_fingerprint); else 0
    Column("batch_id", "String"),
    Column("batch_seq", "UInt64"),
)
DIST_INGEST_COLUMN_NAMES = tuple(c.name for c in DIST_INGEST_COLUMNS)
DIST_INGEST_COLUMN_TYPES = tuple(c.type for c in DIST_INGEST_COLUMNS)


def ddl(database: str, cardinality_views: bool = True, writer_views: bool = True) -> list[str]:
    """Statements that create the schema if it is missing (idempotent), in dependency order. Without
    ``cardinality_views`` (the embedded engine) the attribute-cardinality table is filled from the
    writer's (set, hour) pairs (``cardinality_ddl``) instead of every point; without ``writer_views``
    (the embedded engine) the writer inserts the rows of ``WRITER_VIEWS``' tables itself."""
    statements = _ddl(database, cardinality_views)
    if writer_views:
        return statements
    return [s for s in statements if not ((m := _CREATE_MV.match(s)) and m.group(2) in WRITER_VIEWS)]


def _ddl(database: str, cardinality_views: bool) -> list[str]:
    db = database
    dedup = f"non_replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}, {DURABLE_SETTINGS}"
    ingest_cols = ",\n    ".join(f"{c.name} {c.type}" for c in INGEST_COLUMNS)
    dist_cols = ",\n    ".join(f"{c.name} {c.type}" for c in DIST_INGEST_COLUMNS)
    dist_plain = ", ".join(
        c.name
        for c in DIST_INGEST_COLUMNS
        if c.name not in {"attr_keys", "attr_values", "resource_keys", "resource_values"}
    )
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
    temporality UInt8,
    series_id UInt64,
    series_start DateTime64(9, 'UTC'),
    cumulative_int Int64,
    cumulative_double Float64,
    batch_id String CODEC(ZSTD),
    {SEQ_COLUMN}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (org_id, metric, time)
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_points_mv TO {db}.{POINTS_TABLE} AS
SELECT org_id, metric, kind, unit, monotonic, start_time, time, is_int, value_int, value_double,
    mapSort(mapFromArrays(attr_keys, attr_values)) AS attributes,
    mapSort(mapFromArrays(resource_keys, resource_values)) AS resource,
    scope_name, scope_version, received_at, temporality, series_id, series_start, cumulative_int,
    cumulative_double, batch_id, batch_seq
FROM {db}.{INGEST_TABLE}""",
        # The last committed point of each cumulative series: how cumulative→delta state survives restarts.
        f"""CREATE TABLE IF NOT EXISTS {db}.{SERIES_STATE_TABLE} (
    series_id UInt64,
    start_time DateTime64(9, 'UTC'),
    time DateTime64(9, 'UTC'),
    is_int UInt8,
    cumulative_int Int64,
    cumulative_double Float64
) ENGINE = ReplacingMergeTree(time)
ORDER BY series_id
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.series_state_mv TO {db}.{SERIES_STATE_TABLE} AS
SELECT series_id, series_start AS start_time, time, is_int, cumulative_int, cumulative_double
FROM {db}.{INGEST_TABLE}
WHERE temporality = {TEMPORALITY_CUMULATIVE} AND kind = '{KIND_SUM}'""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{DIST_INGEST_TABLE} (
    {dist_cols}
) ENGINE = Null""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{DIST_TABLE} (
    org_id String,
    metric LowCardinality(String),
    kind LowCardinality(String),
    unit LowCardinality(String),
    temporality UInt8,
    start_time DateTime64(9, 'UTC') CODEC(Delta, ZSTD),
    time DateTime64(9, 'UTC') CODEC(Delta, ZSTD),
    count UInt64,
    sum Nullable(Float64),
    min Nullable(Float64),
    max Nullable(Float64),
    bucket_counts Array(UInt64),
    explicit_bounds Array(Float64),
    scale Int32,
    zero_count UInt64,
    zero_threshold Float64,
    positive_offset Int32,
    positive_counts Array(UInt64),
    negative_offset Int32,
    negative_counts Array(UInt64),
    quantiles Array(Float64),
    quantile_values Array(Float64),
    attributes Map(LowCardinality(String), String),
    resource Map(LowCardinality(String), String),
    scope_name LowCardinality(String),
    scope_version LowCardinality(String),
    received_at DateTime64(9, 'UTC') CODEC(Delta, ZSTD),
    committed_at DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD),
    series_id UInt64,
    batch_id String CODEC(ZSTD),
    {SEQ_COLUMN}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (org_id, metric, time)
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.distribution_points_mv TO {db}.{DIST_TABLE} AS
SELECT {dist_plain},
    mapSort(mapFromArrays(attr_keys, attr_values)) AS attributes,
    mapSort(mapFromArrays(resource_keys, resource_values)) AS resource
FROM {db}.{DIST_INGEST_TABLE}""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{HOURLY_TABLE} (
    org_id String,
    metric LowCardinality(String),
    hour DateTime('UTC'),
    attributes_hash UInt64,
    unit SimpleAggregateFunction(any, String),
    value_int SimpleAggregateFunction(sum, Int128),
    value_double SimpleAggregateFunction(sum, Float64),
    points SimpleAggregateFunction(sum, UInt64),
    {SEQ_MAX_COLUMN}
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, metric, hour, attributes_hash)
SETTINGS {dedup}""",
        # The rollup reads the ingest block (the collector's sorted key and value arrays), not the raw
        # table's Map, and groups by a hash of the attribute set: no Map is built or aggregated per
        # point (~4x cheaper). The sets themselves are in attribute_sets; the hash is cityHash64 of the
        # raw table's sorted Map, as it always was.
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_hourly_mv TO {db}.{HOURLY_TABLE} AS
SELECT org_id, metric, toStartOfHour(time) AS hour, {ATTRIBUTES_HASH} AS attributes_hash, any(unit) AS unit,
    sum(toInt128(value_int)) AS value_int, sum(value_double) AS value_double, count() AS points,
    max(batch_seq) AS batch_seq
FROM {db}.{INGEST_TABLE}
WHERE kind = '{KIND_SUM}'
GROUP BY org_id, metric, hour, attributes_hash""",
        # Per (metric, hour, org): usage, points and the org's distinct series (metric + attributes).
        f"""CREATE TABLE IF NOT EXISTS {db}.{METRIC_ORGS_TABLE} (
    metric LowCardinality(String),
    hour DateTime('UTC'),
    org_id String,
    value_int SimpleAggregateFunction(sum, Int128),
    value_double SimpleAggregateFunction(sum, Float64),
    points SimpleAggregateFunction(sum, UInt64),
    series AggregateFunction(uniqExact, UInt64),
    {SEQ_MAX_COLUMN}
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, metric, org_id)
SETTINGS {dedup}""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_hourly_by_metric_mv "
        f"""TO {db}.{METRIC_ORGS_TABLE} AS
SELECT metric, toStartOfHour(time) AS hour, org_id,
    sum(toInt128(value_int)) AS value_int, sum(value_double) AS value_double, count() AS points,
    uniqExactState(cityHash64(metric, mapFromArrays(attr_keys, attr_values))) AS series,
    max(batch_seq) AS batch_seq
FROM {db}.{INGEST_TABLE}
WHERE kind = '{KIND_SUM}'
GROUP BY metric, hour, org_id""",
        # Per (metric, attribute key, hour): distinct values and distinct orgs, for cardinality panels.
        f"""CREATE TABLE IF NOT EXISTS {db}.{ATTRIBUTE_CARDINALITY_TABLE} (
    metric LowCardinality(String),
    hour DateTime('UTC'),
    key String,
    distinct_values AggregateFunction(uniqExact, String),
    orgs AggregateFunction(uniqExact, String)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, metric, key)
SETTINGS {dedup}""",
        # Filled in two parts, distinct values and distinct orgs, so that no row of the ARRAY JOIN
        # carries the org: copied onto each of a point's attributes, a 4,096-character org made 3,000
        # points of 127 attributes need more than the engine's whole share, a request inside every
        # bound whose insert failed on every retry. The orgs part joins each org's distinct keys per
        # hour instead. On a server two views do it from every point; on the embedded engine two views do
        # it from each (attribute set, hour) pair the writer sends once (``cardinality_ddl``).
        *(_cardinality_views(db) if cardinality_views else []),
        # One row per org (after merges): when it last reported. Feeds the silent-org signal cheaply.
        f"""CREATE TABLE IF NOT EXISTS {db}.{ORGS_TABLE} (
    org_id String,
    first_seen SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    last_seen SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    points SimpleAggregateFunction(sum, UInt64),
    {SEQ_MAX_COLUMN}
) ENGINE = AggregatingMergeTree
ORDER BY org_id
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.org_last_seen_mv TO {db}.{ORGS_TABLE} AS
SELECT org_id, min(time) AS first_seen, max(time) AS last_seen, count() AS points,
    max(batch_seq) AS batch_seq
FROM {db}.{INGEST_TABLE}
GROUP BY org_id""",
        # The metrics that exist, their units and kinds: for a UI, Grafana variables and the API.
        f"""CREATE TABLE IF NOT EXISTS {db}.{CATALOG_TABLE} (
    metric String,
    kind LowCardinality(String),
    unit SimpleAggregateFunction(anyLast, String),
    last_seen SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    points SimpleAggregateFunction(sum, UInt64),
    {SEQ_MAX_COLUMN}
) ENGINE = AggregatingMergeTree
ORDER BY (metric, kind)
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_catalog_points_mv TO {db}.{CATALOG_TABLE} AS
SELECT metric, kind, anyLast(unit) AS unit, max(time) AS last_seen, count() AS points,
    max(batch_seq) AS batch_seq
FROM {db}.{INGEST_TABLE}
GROUP BY metric, kind""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.metric_catalog_dist_mv TO {db}.{CATALOG_TABLE} AS
SELECT metric, kind, anyLast(unit) AS unit, max(time) AS last_seen, count() AS points,
    max(batch_seq) AS batch_seq
FROM {db}.{DIST_INGEST_TABLE}
GROUP BY metric, kind""",
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
        # Attribute sets as the collector sorted them (parallel arrays: a Map cannot be a sort key).
        f"""CREATE TABLE IF NOT EXISTS {db}.{ATTRIBUTE_SETS_TABLE} (
    org_id String,
    metric LowCardinality(String),
    attr_keys Array(String),
    attr_values Array(String)
) ENGINE = ReplacingMergeTree
ORDER BY (org_id, metric, attr_keys, attr_values)
SETTINGS {dedup}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attr_sets_points_mv TO {db}.{ATTRIBUTE_SETS_TABLE} AS
SELECT DISTINCT org_id, metric, attr_keys, attr_values FROM {db}.{INGEST_TABLE}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attr_sets_dist_mv TO {db}.{ATTRIBUTE_SETS_TABLE} AS
SELECT DISTINCT org_id, metric, attr_keys, attr_values FROM {db}.{DIST_INGEST_TABLE}""",
    ]


def _cardinality_views(db: str) -> list[str]:
    """The two views that fill the attribute-cardinality table from every insert (a ClickHouse server's
    schema; the embedded engine's are ``cardinality_ddl``)."""
    return [
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attribute_cardinality_hourly_mv "
        f"""TO {db}.{ATTRIBUTE_CARDINALITY_TABLE} AS
SELECT metric, toStartOfHour(time) AS hour, key,
    uniqExactState(value) AS distinct_values, uniqExactStateIf(org_id, 0) AS orgs
FROM (SELECT metric, time, '' AS org_id, attr_keys, attr_values FROM {db}.{INGEST_TABLE}
    WHERE kind = '{KIND_SUM}')
ARRAY JOIN attr_keys AS key, attr_values AS value
GROUP BY metric, hour, key""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attribute_cardinality_orgs_mv "
        f"""TO {db}.{ATTRIBUTE_CARDINALITY_TABLE} AS
SELECT metric, hour, key, uniqExactStateIf('', 0) AS distinct_values, uniqExactState(org_id) AS orgs
FROM (SELECT metric, toStartOfHour(time) AS hour, org_id, groupUniqArrayArray(attr_keys) AS keys
    FROM {db}.{INGEST_TABLE} WHERE kind = '{KIND_SUM}' GROUP BY metric, hour, org_id)
ARRAY JOIN keys AS key
GROUP BY metric, hour, key""",
    ]


def cardinality_ddl(database: str) -> list[str]:
    """The embedded engine's attribute cardinality: the writer inserts each new (attribute set, hour) pair
    of a sum once (``native.group_summary``; a set reported every few seconds is sent once an hour, not
    once a point) into a Null table whose two views make the states ``_cardinality_views`` makes from
    every point on a server. The states are sets: a pair sent twice adds nothing."""
    db = database
    return [
        f"""CREATE TABLE IF NOT EXISTS {db}.{CARDINALITY_INGEST_TABLE} (
    metric String,
    hour DateTime('UTC'),
    org_id String,
    attr_keys Array(String),
    attr_values Array(String)
) ENGINE = Null""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attribute_cardinality_values_mv "
        f"""TO {db}.{ATTRIBUTE_CARDINALITY_TABLE} AS
SELECT metric, hour, key, uniqExactState(value) AS distinct_values, uniqExactStateIf('', 0) AS orgs
FROM (SELECT metric, hour, attr_keys, attr_values FROM {db}.{CARDINALITY_INGEST_TABLE})
ARRAY JOIN attr_keys AS key, attr_values AS value
GROUP BY metric, hour, key""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attribute_cardinality_keys_mv "
        f"""TO {db}.{ATTRIBUTE_CARDINALITY_TABLE} AS
SELECT metric, hour, key, uniqExactStateIf('', 0) AS distinct_values, uniqExactState(org_id) AS orgs
FROM (SELECT metric, hour, org_id, groupUniqArrayArray(attr_keys) AS keys
    FROM {db}.{CARDINALITY_INGEST_TABLE} GROUP BY metric, hour, org_id)
ARRAY JOIN keys AS key
GROUP BY metric, hour, key""",
    ]


#: On the embedded engine the writer derives these tables' rows from each group's blocks and inserts them
#: itself, one insert each under the ledger (``native.group_summary``: a few rows per org and metric, not
#: a view over every point): "o" the orgs' first and last points, "c" and "e" the metric catalog of the
#: number and the distribution points (apart, as the views of the two ingest tables were). It inserts the
#: group's attribute sets it has not stored before as well ("s", repeatable: a set kept once). A server's
#: views do all three per insert.
WRITER_TABLES = {"o": ORGS_TABLE, "c": CATALOG_TABLE, "e": CATALOG_TABLE}
WRITER_VIEWS = (
    "org_last_seen_mv",
    "metric_catalog_points_mv",
    "metric_catalog_dist_mv",
    "attr_sets_points_mv",
    "attr_sets_dist_mv",
)
ORG_ROW_COLUMNS: tuple[Column, ...] = (
    Column("org_id", "String"),
    Column("first_seen", "DateTime64(9, 'UTC')"),
    Column("last_seen", "DateTime64(9, 'UTC')"),
    Column("points", "UInt64"),
    Column("batch_seq", "UInt64"),
)
CATALOG_ROW_COLUMNS: tuple[Column, ...] = (
    Column("metric", "String"),
    Column("kind", "String"),
    Column("unit", "String"),
    Column("last_seen", "DateTime64(9, 'UTC')"),
    Column("points", "UInt64"),
    Column("batch_seq", "UInt64"),
)
#: The writer's inserts that a repeat leaves as they were ("s" attribute sets, "a" the attribute
#: cardinality's (set, hour) pairs): outside the ledger, inserted again whenever in doubt.
REPEATABLE_INSERTS = {"s": ATTRIBUTE_SETS_TABLE, "a": CARDINALITY_INGEST_TABLE}
WRITER_COLUMNS = {"o": ORG_ROW_COLUMNS, "c": CATALOG_ROW_COLUMNS, "e": CATALOG_ROW_COLUMNS}
#: The points insert whose rows each of the writer's own inserts is derived from.
WRITER_SOURCE = {"o": "n", "c": "n", "e": "d"}


#: Per insert ("n" into the ingest table, "d" into the distribution ingest table): the tables that carry
#: ``batch_seq`` (see ``SEQ_COLUMN``), each with the view from the ingest table that feeds it.
LEDGER_VIEWS: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (
        (POINTS_TABLE, "usage_points_mv"),
        (HOURLY_TABLE, "usage_hourly_mv"),
        (METRIC_ORGS_TABLE, "usage_hourly_by_metric_mv"),
        (ORGS_TABLE, "org_last_seen_mv"),
        (CATALOG_TABLE, "metric_catalog_points_mv"),
    ),
    "d": ((DIST_TABLE, "distribution_points_mv"), (CATALOG_TABLE, "metric_catalog_dist_mv")),
}
#: The ledger's tables and their views, each once, in order.
LEDGER_TABLES = tuple(dict.fromkeys(t for views in LEDGER_VIEWS.values() for t, _ in views))
#: The embedded engine's ledger per insert: the tables each view of an ingest table feeds, and the tables
#: the writer inserts itself (``WRITER_TABLES``).
EMBEDDED_LEDGER_VIEWS: dict[str, tuple[tuple[str, str], ...]] = {
    kind: tuple((t, v) for t, v in views if v not in WRITER_VIEWS) for kind, views in LEDGER_VIEWS.items()
}


def ledger_tables(kind: str) -> list[str]:
    """The embedded engine's ledger tables of the ``kind`` insert ("n", "d", or a ``WRITER_TABLES`` one)."""
    if kind in WRITER_TABLES:
        return [WRITER_TABLES[kind]]
    return [t for t, _ in EMBEDDED_LEDGER_VIEWS[kind]]


LEDGER_VIEW_NAMES = tuple(v for views in LEDGER_VIEWS.values() for _, v in views)
#: The catalog holds both inserts' rows: which are whose, by kind.
_NUMBER_KINDS = f"('{KIND_SUM}', '{KIND_GAUGE}')"
LEDGER_FILTER = {
    ("n", CATALOG_TABLE): f"kind IN {_NUMBER_KINDS}",
    ("d", CATALOG_TABLE): f"kind NOT IN {_NUMBER_KINDS}",
    ("c", CATALOG_TABLE): f"kind IN {_NUMBER_KINDS}",
    ("e", CATALOG_TABLE): f"kind NOT IN {_NUMBER_KINDS}",
}
#: The views whose tables a repeat leaves as they were (the newest state per series, distinct values,
#: distinct sets): a group in doubt goes through them again whatever the ledger says.
REPEATABLE_VIEWS: dict[str, tuple[str, ...]] = {
    "n": (
        "series_state_mv",
        "attribute_cardinality_hourly_mv",
        "attribute_cardinality_orgs_mv",
        "attr_sets_points_mv",
    ),
    "d": ("attr_sets_dist_mv",),
}
INGEST_OF = {"n": INGEST_TABLE, "d": DIST_INGEST_TABLE, **WRITER_TABLES}
#: The raw table of each insert (the one whose rows carry the group's ``batch_id``).
RAW_OF = {"n": POINTS_TABLE, "d": DIST_TABLE}


def batch_landed_sql(database: str, kind: str) -> str:
    """Whether the ``kind`` insert's raw table holds rows of the bound ``batch_id`` (its token)."""
    return f"SELECT count() > 0 FROM {database}.{RAW_OF[kind]} WHERE batch_id = {{b:String}}"


#: Views that read the raw tables before the ledger and the ingest tables since: ClickHouse does not
#: recognise a repeat of an insert the version before made as one there (the views' blocks are other
#: blocks now), so a group that version inserted is not repeated through them (``Store.insert_earlier``).
READ_RAW_BEFORE_LEDGER: dict[str, tuple[str, ...]] = {
    "n": ("org_last_seen_mv", "metric_catalog_points_mv"),
    "d": ("metric_catalog_dist_mv",),
}
#: The Null table a group in doubt is inserted into to reach one view alone.
REDO_TABLE = "redo_ingest"


#: Starts the deduplication token of every group whose rows carry its ``batch_seq`` (the writer's): a
#: group in doubt is checked against the ledger only then (the intent of a group an earlier version began
#: has another token, and its rows no number; the token alone guards it, as then).
LEDGER_TOKEN_PREFIX = "s-"
#: Starts the token of every group sent as one block per table (``collector.writer.merge_blocks``); a
#: ledger group without it was sent as its records' blocks one after another, and a repeat does the same.
#: A digest is hex, so "g" cannot begin one.
ONE_BLOCK_TOKEN_PREFIX = LEDGER_TOKEN_PREFIX + "g"

#: Insert settings that make one insert one part per partition of every table it reaches: the input
#: blocks and each view's output squashed into one block, however many rows or bytes. ClickHouse commits
#: an insert's parts one after another; with several in one table (past ``min_insert_block_size_rows``,
#: about a million rows, or 256 MiB) a kill between them leaves a table holding part of a group, which the
#: ledger would take for all of it. The parts of one block differ by partition only, and the ledger asks
#: per partition (``landed_sql``).
ONE_PART_SETTINGS = {
    "min_insert_block_size_rows": 0x7FFF_FFFF_FFFF_FFFF,
    "min_insert_block_size_bytes": 0x7FFF_FFFF_FFFF_FFFF,
    "min_insert_block_size_rows_for_materialized_views": 0x7FFF_FFFF_FFFF_FFFF,
    "min_insert_block_size_bytes_for_materialized_views": 0x7FFF_FFFF_FFFF_FFFF,
}

_PARTITION_BY = re.compile(r"^PARTITION BY (.+)$", re.M)


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def partition_key(database: str, table: str) -> str:
    """The ``PARTITION BY`` expression of ``table`` (over its own columns), or ``''`` for none."""
    for statement in ddl(database):
        if (m := _CREATE_TABLE.match(statement)) and m.group(2) == table:
            key = _PARTITION_BY.search(m.group(5))
            return key.group(1).strip() if key else ""
    raise ValueError(f"no table {table}")


def landed_sql(database: str, kind: str, table: str) -> str:
    """The partitions of ``table`` that hold rows of the group ``seq`` (bound) from its ``kind`` insert,
    as strings (``''`` for a table without partitions): none newer exists (one writer, groups in order),
    so any row at or above it is the group's; the minmax index skips every older granule.

    Per partition, not per table: an insert writes one part per partition (``ONE_PART_SETTINGS``) and
    commits them one by one, so a kill can leave the group's rows of one month in a table and not the
    other's."""
    where = " AND ".join(
        ["batch_seq >= {seq:UInt64}"]
        + ([LEDGER_FILTER[(kind, table)]] if (kind, table) in LEDGER_FILTER else [])
    )
    key = partition_key(database, table) or "''"
    return f"SELECT DISTINCT toString({key}) FROM {database}.{table} WHERE {where}"


def max_seq_sql(database: str, table: str) -> str:
    return f"SELECT max(batch_seq) FROM {database}.{table}"


def redo_ddl(
    database: str, kind: str, views: Sequence[str], landed: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Statements that make ``REDO_TABLE`` (shaped as the ``kind`` ingest table) feed only ``views``,
    each as its own view does: the same SELECT, reading the redo table; a view in ``landed`` without the
    rows of the partitions of its table named there (they hold the group already). Dropped again
    afterwards."""
    source = INGEST_OF[kind]
    bodies = {}
    for statement in ddl(database):
        if m := _CREATE_MV.match(statement):
            bodies[m.group(2)] = (m.group(4), m.group(5))
    # Copies a failed cleanup left behind first: they would feed their tables from the new redo table too.
    out = redo_cleanup_ddl(database, all_views()) + [
        f"CREATE TABLE {database}.{REDO_TABLE} AS {database}.{source} ENGINE = Null",
    ]
    for view in views:
        target, select = bodies[view]
        select = re.sub(rf"\b{database}\.{source}\b", f"{database}.{REDO_TABLE}", select)
        if (landed or {}).get(view):
            key = partition_key(database, target)
            done = ", ".join(quote(p) for p in sorted((landed or {})[view]))
            select = f"SELECT * FROM (\n{select}\n) WHERE toString({key}) NOT IN ({done})"
        out.append(
            f"CREATE MATERIALIZED VIEW {database}.{REDO_TABLE}_{view} TO {database}.{target} AS\n{select}"
        )
    return out


def redo_cleanup_ddl(database: str, views: Sequence[str]) -> list[str]:
    return [f"DROP VIEW IF EXISTS {database}.{REDO_TABLE}_{v}" for v in views] + [
        f"DROP TABLE IF EXISTS {database}.{REDO_TABLE}"
    ]


#: Views whose definition changed since a version that created them, each with a part of the new
#: definition the stored one lacks: created again at start (``revised_views_migration``).
REVISED_VIEWS = {
    "attribute_cardinality_hourly_mv": "uniqExactStateIf(org_id, 0)",
    "distribution_points_mv": "series_id",
}


def all_views() -> list[str]:
    return [*LEDGER_VIEW_NAMES, *(v for views in REPEATABLE_VIEWS.values() for v in views)]


def seq_columns_migration(database: str) -> list[str]:
    """A database created before ``batch_seq``: the column on the ingest and ledger tables, with its
    index (run at start, before the views; see ``seq_views_migration``)."""
    out = [
        f"ALTER TABLE {database}.{t} ADD COLUMN IF NOT EXISTS batch_seq UInt64"
        for t in (INGEST_TABLE, DIST_INGEST_TABLE)
    ]
    for table in LEDGER_TABLES:
        column = _SEQ_RAW if table in RAW_OF.values() else _SEQ_MAX
        out.append(f"ALTER TABLE {database}.{table} ADD COLUMN IF NOT EXISTS {column}")
    out += [f"ALTER TABLE {database}.{t} ADD INDEX IF NOT EXISTS {_SEQ_INDEX}" for t in LEDGER_TABLES]
    return out


def seq_columns_cluster_migration(database: str, cluster: str) -> list[str]:
    """``seq_columns_migration`` for a cluster's database of an earlier version: on every node, the
    ``_local`` tables and the Distributed ones (which take no index). The views stay as that version made
    them (a cluster's token decides; the ledger is the embedded engine's), so the column of the tables
    they fill is left at 0; what matters is that the ingest tables take the writer's ``batch_seq``."""
    out = []
    for statement in seq_columns_migration(database):
        m = _ALTER.match(statement)
        assert m is not None
        _, table, action = m.groups()
        out.append(f"ALTER TABLE {database}.{local_name(table)} ON CLUSTER {cluster} {action}")
        if action.startswith("ADD COLUMN"):
            column = re.sub(r" CODEC\(.*\)$", "", action)  # a Distributed table has no codecs
            out.append(f"ALTER TABLE {database}.{table} ON CLUSTER {cluster} {column}")
    return out


def durable_tables(database: str) -> list[str]:
    """The tables created with ``DURABLE_SETTINGS``."""
    return [
        m.group(2)
        for s in ddl(database) + close_ddl(database)
        if (m := _CREATE_TABLE.match(s)) and DURABLE_SETTINGS in s
    ]


def durable_migration(database: str, tables: Sequence[str]) -> list[str]:
    """``DURABLE_SETTINGS`` on tables an earlier version created without them."""
    return [f"ALTER TABLE {database}.{t} MODIFY SETTING {DURABLE_SETTINGS}" for t in tables]


def seq_views_migration(database: str, stale_views: Sequence[str]) -> list[str]:
    """Views an earlier version created (ledger views that do not fill ``batch_seq``, ``REVISED_VIEWS``),
    created again (run while nothing inserts: at start)."""
    out = []
    creates = {m.group(2): s for s in ddl(database) if (m := _CREATE_MV.match(s))}
    for view in stale_views:
        out += [f"DROP VIEW IF EXISTS {database}.{view}", creates[view]]
    return out


#: Step names the API accepts, with the ClickHouse interval each means.
STEPS = {"1m": "toStartOfMinute", "1h": "toStartOfHour", "1d": "toStartOfDay"}


def retention_ddl(database: str, days: int) -> list[str]:
    """TTLs that drop raw and distribution points after ``days`` (the rollups stay); none for 0."""
    if days <= 0:
        return []
    return [
        f"ALTER TABLE {database}.{table} MODIFY TTL toDateTime(time) + INTERVAL {int(days)} DAY"
        for table in (POINTS_TABLE, DIST_TABLE)
    ]


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


def max_point_time_sql(database: str) -> str:
    """The greatest time of any stored point, number or distribution, in integer nanoseconds (0 if none);
    read from the parts' min-max indexes (``time`` is in the partition key)."""
    return f"""SELECT greatest(
    (SELECT toUnixTimestamp64Nano(max(time)) FROM {database}.{POINTS_TABLE}),
    (SELECT toUnixTimestamp64Nano(max(time)) FROM {database}.{DIST_TABLE}))"""


def series_state_sql(database: str, cluster: str = "") -> str:
    """The last committed point of each listed cumulative series (bound ``ids``: Array(UInt64)).

    On a cluster, every replica is read (``clusterAllReplicas``) and the newest point wins: "committed"
    means acknowledged by one replica of the shard, and a Distributed read could reach another one that has
    not fetched it yet, whose older point would make the next delta count the difference twice. A replica
    that does not answer is skipped; only if the one that took the insert is down before any other fetched
    it can an older point be read."""
    source = f"{database}.{SERIES_STATE_TABLE}"
    settings = ""
    if cluster:
        source = f"clusterAllReplicas({cluster}, {database}.{local_name(SERIES_STATE_TABLE)})"
        settings = "\nSETTINGS skip_unavailable_shards = 1"
    # Times as integer nanoseconds: a datetime would drop the last three digits and fake a reset.
    return f"""SELECT series_id, toUnixTimestamp64Nano(argMax(start_time, time)),
    toUnixTimestamp64Nano(max(time)), argMax(is_int, time),
    argMax(cumulative_int, time), argMax(cumulative_double, time)
FROM {source}
WHERE series_id IN {{ids:Array(UInt64)}}
GROUP BY series_id{settings}"""


def attribute_sets_sql(database: str) -> str:
    """Stored attribute sets of the listed orgs' metrics, at most ``n`` per (org, metric).

    Bound parameters: ``orgs`` and ``metrics`` (Array(String)), ``n`` (UInt64); the caller keeps only
    the (org, metric) pairs it asked for.
    """
    return f"""SELECT org_id, metric, attr_keys, attr_values
FROM {database}.{ATTRIBUTE_SETS_TABLE}
WHERE org_id IN {{orgs:Array(String)}} AND metric IN {{metrics:Array(String)}}
GROUP BY org_id, metric, attr_keys, attr_values
LIMIT {{n:UInt64}} BY org_id, metric"""


def attribute_sets_present_sql(database: str) -> str:
    """Which of the candidate sets are stored: the stored sets of the listed orgs' metrics whose values
    are among ``values`` (the caller matches org, metric and keys exactly).

    Bound parameters: ``orgs``, ``metrics`` (Array(String)), ``values`` (Array(Array(String))).
    """
    return f"""SELECT org_id, metric, attr_keys, attr_values
FROM {database}.{ATTRIBUTE_SETS_TABLE}
WHERE org_id IN {{orgs:Array(String)}} AND metric IN {{metrics:Array(String)}}
    AND attr_values IN (SELECT arrayJoin({{values:Array(Array(String))}}))
GROUP BY org_id, metric, attr_keys, attr_values"""


# -- org health (exporter) ---------------------------------------------------------------------------
def orgs_active_sql(database: str) -> str:
    """Orgs with usage since ``since`` (DateTime, bound), from the rollup."""
    return f"""SELECT uniqExact(org_id) FROM {database}.{HOURLY_TABLE}
WHERE hour >= toStartOfHour({{since:DateTime('UTC')}}) AND org_id != ''"""


def orgs_silent_sql(database: str) -> str:
    """Orgs seen in ``[day_ago, quiet_since)`` but not since ``quiet_since`` (bound DateTimes)."""
    return f"""SELECT org_id, toUnixTimestamp64Milli(max(last_seen)) AS last
FROM {database}.{ORGS_TABLE}
WHERE org_id != ''
GROUP BY org_id
HAVING last >= toUnixTimestamp64Milli(toDateTime64({{day_ago:DateTime('UTC')}}, 3))
   AND last < toUnixTimestamp64Milli(toDateTime64({{quiet_since:DateTime('UTC')}}, 3))
ORDER BY last
LIMIT {{limit:UInt32}}"""


def orgs_silent_count_sql(database: str) -> str:
    """How many orgs :func:`orgs_silent_sql` would list without its limit (same bound parameters but
    ``limit``): the gauge counts every silent org, the API lists at most ``limit`` of them."""
    return f"""SELECT count() FROM (
    SELECT org_id, toUnixTimestamp64Milli(max(last_seen)) AS last
    FROM {database}.{ORGS_TABLE}
    WHERE org_id != ''
    GROUP BY org_id
    HAVING last >= toUnixTimestamp64Milli(toDateTime64({{day_ago:DateTime('UTC')}}, 3))
       AND last < toUnixTimestamp64Milli(toDateTime64({{quiet_since:DateTime('UTC')}}, 3))
)"""


def orgs_spiking_sql(database: str) -> str:
    """(org, metric) whose usage in hour ``last`` exceeds ``factor`` × its mean hourly usage over the
    ``hours`` hours before, and at least ``min_usage``. Read from the rollup."""
    return f"""SELECT org_id, metric, last_usage, baseline FROM (
    SELECT org_id, metric,
        sumIf(toFloat64(value_int) + value_double, hour = {{last:DateTime('UTC')}}) AS last_usage,
        sumIf(toFloat64(value_int) + value_double, hour < {{last:DateTime('UTC')}}) / {{hours:UInt32}}
            AS baseline
    FROM {database}.{HOURLY_TABLE}
    WHERE hour >= {{last:DateTime('UTC')}} - toIntervalHour({{hours:UInt32}})
        AND hour <= {{last:DateTime('UTC')}} AND org_id != ''
    GROUP BY org_id, metric
)
WHERE baseline > 0 AND last_usage >= {{min_usage:Float64}} AND last_usage > {{factor:Float64}} * baseline
ORDER BY last_usage / baseline DESC
LIMIT {{limit:UInt32}}"""


def orgs_spiking_count_sql(database: str) -> str:
    """How many distinct orgs :func:`orgs_spiking_sql` would list without its limit (same bound
    parameters but ``limit``)."""
    inner = orgs_spiking_sql(database).split("\nORDER BY")[0]
    return f"SELECT uniqExact(org_id) FROM (\n{inner}\n)"


def top_orgs_by_points_sql(database: str) -> str:
    """The ``k`` orgs with the most points since ``since``."""
    return f"""SELECT org_id, sum(points) AS n FROM {database}.{HOURLY_TABLE}
WHERE hour >= toStartOfHour({{since:DateTime('UTC')}}) AND org_id != ''
GROUP BY org_id ORDER BY n DESC LIMIT {{k:UInt32}}"""


def org_ranking_sql(database: str, rollup: bool, order: str, scoped: bool, by_metric: bool = True) -> str:
    """Orgs ranked by usage of ``metric`` over ``[from_ns, to_ns)`` (or, without ``by_metric``, by their
    number of sum points); ``scoped`` adds the bound ``orgs`` (Array(String))."""
    direction = "ASC" if order == "asc" else "DESC"
    scope = "AND org_id IN {orgs:Array(String)}" if scoped else ""
    metric = "metric = {metric:String}" if by_metric else "1"
    if rollup:
        source = f"""{database}.{HOURLY_TABLE}
WHERE {metric} {scope}
    AND hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')"""
        value = (
            "sum(value_int) AS vi, sum(value_double) AS vd" if by_metric else "sum(points) AS vi, 0.0 AS vd"
        )
    else:
        source = f"""{database}.{POINTS_TABLE}
WHERE {metric} AND kind = '{KIND_SUM}' {scope}
    AND time >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND time < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')"""
        value = (
            "sum(toInt128(value_int)) AS vi, sum(value_double) AS vd"
            if by_metric
            else "count() AS vi, 0.0 AS vd"
        )
    return f"""SELECT org_id, {value} FROM {source}
GROUP BY org_id
ORDER BY toFloat64(vi) + vd {direction}, org_id
LIMIT {{limit:UInt32}}"""


#: Orders of ``GET /api/v1/orgs``: by total, largest or smallest first, or by org id (stable while usage
#: arrives: what reading every org pages by).
ORG_ORDERS = ("desc", "asc", "org")


def _org_totals(database: str, rollup: bool, scoped: bool, by_metric: bool, after_org: bool) -> str:
    """Per org over ``[from_ns, to_ns)``: ``vi``, ``vd`` (usage of ``metric``, or without ``by_metric`` the
    number of sum points) and ``n`` (the points summed)."""
    scope = "AND org_id IN {orgs:Array(String)}" if scoped else ""
    after = "AND org_id > {after_org:String}" if after_org else ""
    metric = "metric = {metric:String}" if by_metric else "1"
    if rollup:
        where = f"""{database}.{HOURLY_TABLE}
WHERE {metric} {scope} {after}
    AND hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')"""
        n = "sum(points)"
        value = "sum(value_int) AS vi, sum(value_double) AS vd" if by_metric else f"{n} AS vi, 0.0 AS vd"
    else:
        where = f"""{database}.{POINTS_TABLE}
WHERE {metric} AND kind = '{KIND_SUM}' {scope} {after}
    AND time >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND time < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')"""
        n = "toUInt64(count())"
        value = (
            "sum(toInt128(value_int)) AS vi, sum(value_double) AS vd"
            if by_metric
            else f"{n} AS vi, 0.0 AS vd"
        )
    return f"SELECT org_id, {value}, {n} AS n FROM {where}\nGROUP BY org_id"


def org_page_sql(database: str, rollup: bool, order: str, scoped: bool, by_metric: bool, after: bool) -> str:
    """One page of ``GET /api/v1/orgs`` by keyset (never OFFSET): ``limit`` orgs after the cursor's key.

    ``order`` ``org``: rows ``org_id, vi, vd``, orgs after the bound ``after_org`` in id order; usage that
    arrives between pages moves no org past the cursor.

    By total (``desc``/``asc``): rows ``org_id, vi, vd, t, past, points``. ``t`` is the total as ordered
    (a Float64); ``past`` is 1 for the orgs after the bound key (``after_total`` Float64, ``after_org``);
    ``points`` counts the points of the whole ranking, read in the same scan (a window over every org,
    computed before the page is cut), so that a cursor can tell that the totals it was cut from have
    changed (points are only ever added). The page is the first ``limit`` rows with ``past``; the rows
    without it sort last and are dropped by the caller (one always comes back, with the count, when no org
    is left). Bound parameters as :func:`_org_totals`, and ``limit`` (UInt32)."""
    if order == "org":
        return f"""SELECT org_id, vi, vd FROM (
{_org_totals(database, rollup, scoped, by_metric, after)}
)
ORDER BY org_id
LIMIT {{limit:UInt32}}"""
    direction, beyond = ("ASC", ">") if order == "asc" else ("DESC", "<")
    past = (
        # The cursor's own org never again: its total is a double sum, which may differ in its last bits
        # from one read to the next (the order in which parts are summed).
        f"(t {beyond} {{after_total:Float64}}"
        " OR (t = {after_total:Float64} AND org_id > {after_org:String})) AND org_id != {after_org:String}"
        if after
        else "1"
    )
    return f"""SELECT org_id, vi, vd, t, past, sum(n) OVER () AS points FROM (
    SELECT org_id, vi, vd, n, toFloat64(vi) + vd AS t, toUInt8({past}) AS past FROM (
{_org_totals(database, rollup, scoped, by_metric, False)}
    )
)
ORDER BY past DESC, t {direction}, org_id
LIMIT {{limit:UInt32}}"""


def usage_export_sql(database: str, step: str, scoped: bool, by_metric: bool) -> str:
    """Usage of every org (the bound ``orgs``, when ``scoped``) over ``[from_ns, to_ns)`` per step of
    ``step`` (``1h``, ``1d``, ``1mo``: calendar months, UTC), read from the hourly rollup in its own order
    (org, metric, then time), so that ClickHouse aggregates one org and metric at a time
    (``optimize_aggregation_in_order``) and the answer streams out sorted.

    Rows: ``org_id, metric, start`` (Unix seconds), ``vi`` (Int128), ``vd`` (Float64), ``unit``; every
    summed metric, or only the bound ``metric`` with ``by_metric``."""
    bucket = {
        "1h": "hour",
        "1d": "toStartOfDay(hour)",
        "1mo": "toDateTime(toStartOfMonth(hour), 'UTC')",
    }[step]
    scope = "AND org_id IN {orgs:Array(String)}" if scoped else ""
    metric = "AND metric = {metric:String}" if by_metric else ""
    return f"""SELECT org_id, metric, toUnixTimestamp({bucket}) AS start, sum(value_int) AS vi,
    sum(value_double) AS vd, any(unit) AS u
FROM {database}.{HOURLY_TABLE}
WHERE hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC') {metric} {scope}
GROUP BY org_id, metric, start
ORDER BY org_id, metric, start"""


#: Settings of the export's query: aggregation in the rollup's order, so that its memory is one org's.
EXPORT_SETTINGS = {"optimize_aggregation_in_order": 1, "max_block_size": 8192}


def usage_grouped_sql(database: str, step: str, rollup: bool) -> str:
    """Like :func:`usage_series_sql`, split by the value of attribute ``key`` (bound String)."""
    bucket = STEPS[step]
    if rollup:
        # The rollup is keyed by the set's hash; the org's sets (a few hundred rows) name the value.
        return f"""SELECT sets.grp AS grp, {bucket}(h.hour) AS start, sum(h.value_int) AS vi,
    sum(h.value_double) AS vd, sum(h.points) AS n, any(h.unit) AS u
FROM {database}.{HOURLY_TABLE} AS h
LEFT JOIN (
    SELECT {ATTRIBUTES_HASH} AS attributes_hash, any(attr_values[indexOf(attr_keys, {{key:String}})]) AS grp
    FROM {database}.{ATTRIBUTE_SETS_TABLE}
    WHERE org_id = {{org:String}} AND metric = {{metric:String}}
    GROUP BY attributes_hash
) AS sets ON h.attributes_hash = sets.attributes_hash
WHERE h.org_id = {{org:String}} AND h.metric = {{metric:String}}
    AND h.hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND h.hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')
GROUP BY grp, start ORDER BY grp, start"""
    return f"""SELECT attributes[{{key:String}}] AS grp, {bucket}(time) AS start,
    sum(toInt128(value_int)) AS vi, sum(value_double) AS vd, count() AS n, any(unit) AS u
FROM {database}.{POINTS_TABLE}
WHERE org_id = {{org:String}} AND metric = {{metric:String}} AND kind = '{KIND_SUM}'
    AND time >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
    AND time < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')
GROUP BY grp, start ORDER BY grp, start"""


def metric_kinds_sql(database: str) -> str:
    """The kinds a metric has points of (the catalog), and every metric's name (for "did you mean")."""
    return f"""SELECT metric, groupUniqArray(kind) FROM {database}.{CATALOG_TABLE} GROUP BY metric"""


def metric_in_rollup_sql(database: str) -> str:
    """One row when the hourly rollup holds usage of ``metric`` (the catalog's fallback: a store whose
    catalog is filled by nothing, such as two handles on the embedded engine standing in for replicas)."""
    return f"SELECT 1 FROM {database}.{HOURLY_TABLE} WHERE metric = {{metric:String}} LIMIT 1"


def catalog_sql(database: str) -> str:
    return f"""SELECT metric, kind, anyLast(unit), toUnixTimestamp64Milli(max(last_seen)), sum(points)
FROM {database}.{CATALOG_TABLE} GROUP BY metric, kind ORDER BY metric, kind"""


# -- monthly close (statements, adjustments, reconciliation) ----------------------------------------
CLOSES_TABLE = "month_closes"
STATEMENTS_TABLE = "usage_statements"
ADJUSTMENTS_VIEW = "usage_adjustments"

#: Columns of one statement line, in insert order (one immutable line per month, org and metric).
STATEMENT_COLUMNS: tuple[Column, ...] = (
    Column("month", "UInt32"),  # YYYYMM
    Column("org_id", "String"),
    Column("metric", "String"),
    Column("unit", "String"),
    Column("total_int", "Int128"),
    Column("total_double", "Float64"),
    Column("points", "UInt64"),
    Column("first_time", "DateTime64(9, 'UTC')"),
    Column("last_time", "DateTime64(9, 'UTC')"),
    Column("close_id", "String"),
    Column("closed_at", "DateTime64(3, 'UTC')"),
    Column("forced", "UInt8"),
    Column("checksum", "String"),  # sha256 over the org's lines of the month (see meterhouse.core.close)
    # The hourly rollup's numbers for the same org, metric and month as of the cutoff (less the points
    # committed after it), as compared at close.
    Column("rollup_int", "Int128"),
    Column("rollup_double", "Float64"),
    Column("rollup_points", "UInt64"),
)
STATEMENT_COLUMN_NAMES = tuple(c.name for c in STATEMENT_COLUMNS)
STATEMENT_COLUMN_TYPES = tuple(c.type for c in STATEMENT_COLUMNS)

#: One row per state of a close (``running``, then ``done``); the highest ``version`` is the current one.
#: The close never trusts a deduplication token for these rows: each is written until it is read back
#: (see ``meterhouse.core.close``).
CLOSE_COLUMNS: tuple[Column, ...] = (
    Column("month", "UInt32"),
    Column("close_id", "String"),
    Column("status", "String"),
    Column("forced", "UInt8"),
    Column("cutoff", "DateTime64(3, 'UTC')"),  # points committed before it are in the statements
    Column("finished_at", "DateTime64(3, 'UTC')"),
    Column("orgs", "UInt64"),
    Column("lines", "UInt64"),
    Column("points", "UInt64"),
    Column("total_int", "Int128"),
    Column("total_double", "Float64"),
    Column("rollup_points", "UInt64"),
    Column("rollup_int", "Int128"),
    Column("rollup_double", "Float64"),
    Column("mismatched_lines", "UInt64"),
    Column("version", "UInt64"),
    # The collectors that had not confirmed, when the cutoff was taken, that they had committed every
    # point acknowledged before the close was asked for (their points may be adjustments).
    Column("unconfirmed", "Array(String)"),
)
CLOSE_COLUMN_NAMES = tuple(c.name for c in CLOSE_COLUMNS)
CLOSE_COLUMN_TYPES = tuple(c.type for c in CLOSE_COLUMNS)
CLOSE_RUNNING, CLOSE_DONE = "running", "done"

#: How far each collector has committed: one row per publication (every second or so), the newest per
#: collector being its state. ``committed_through``: every point the collector acknowledged before it is
#: committed (in the clock of the ClickHouse endpoint it writes to). A close waits for every collector
#: that published lately to pass the time it was asked (see ``meterhouse.core.close``).
COLLECTOR_COMMITS_TABLE = "collector_commits"
COLLECTOR_COMMITS_COLUMNS: tuple[Column, ...] = (
    Column("collector", "String"),
    Column("committed_through", "DateTime64(3, 'UTC')"),
    Column("published_at", "DateTime64(3, 'UTC')"),
)
COLLECTOR_COMMITS_COLUMN_NAMES = tuple(c.name for c in COLLECTOR_COMMITS_COLUMNS)
COLLECTOR_COMMITS_COLUMN_TYPES = tuple(c.type for c in COLLECTOR_COMMITS_COLUMNS)


#: Columns added to tables since they were first created: (table, column, type and place). Each is
#: placed where a new database has it, so that both hold the same columns in the same order.
ADDED_COLUMNS = (
    (CLOSES_TABLE, "unconfirmed", "Array(String)"),
    # A folded distribution point's fingerprint of its own set, part of its identity (collector/identity.py).
    (DIST_INGEST_TABLE, "series_id", "UInt64 AFTER received_at"),
    (DIST_TABLE, "series_id", "UInt64 AFTER committed_at"),
)


def added_columns_migration(
    database: str, cluster: str, missing: Sequence[tuple[str, str, str]]
) -> list[str]:
    """The ``ADDED_COLUMNS`` a database of an earlier version lacks: on a cluster, on every node's
    shard-local and Distributed table."""
    out = []
    for table, column, type_ in missing:
        if cluster:
            for t in (local_name(table), table):
                add = f"ADD COLUMN IF NOT EXISTS {column} {type_}"
                out.append(f"ALTER TABLE {database}.{t} ON CLUSTER {cluster} {add}")
        else:
            out.append(f"ALTER TABLE {database}.{table} ADD COLUMN IF NOT EXISTS {column} {type_}")
    return out


def close_ddl(database: str) -> list[str]:
    """The monthly close's tables. Statement lines are deterministic for a close, so a line written twice
    (a close resumed after a crash) is the same row, collapsed by ``ReplacingMergeTree`` and ``FINAL``."""
    db = database
    dedup = f"non_replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}, {DURABLE_SETTINGS}"
    stmt_cols = ",\n    ".join(f"{c.name} {c.type}" for c in STATEMENT_COLUMNS)
    close_cols = ",\n    ".join(f"{c.name} {c.type}" for c in CLOSE_COLUMNS)
    commit_cols = ",\n    ".join(f"{c.name} {c.type}" for c in COLLECTOR_COMMITS_COLUMNS)
    return [
        f"""CREATE TABLE IF NOT EXISTS {db}.{STATEMENTS_TABLE} (
    {stmt_cols}
) ENGINE = ReplacingMergeTree
PARTITION BY intDiv(month, 100)
ORDER BY (month, org_id, metric)
SETTINGS {dedup}""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{CLOSES_TABLE} (
    {close_cols}
) ENGINE = ReplacingMergeTree(version)
ORDER BY month
SETTINGS {dedup}""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{COLLECTOR_COMMITS_TABLE} (
    {commit_cols}
) ENGINE = ReplacingMergeTree(published_at)
ORDER BY collector
TTL toDateTime(published_at) + INTERVAL 7 DAY""",
        # Points of a closed month committed at or after its cutoff: stored, outside the statement.
        f"""CREATE VIEW IF NOT EXISTS {db}.{ADJUSTMENTS_VIEW} AS
SELECT c.month AS month, p.org_id AS org_id, p.metric AS metric, any(p.unit) AS unit,
    sum(toInt128(p.value_int)) AS amount_int, sum(p.value_double) AS amount_double, count() AS points,
    min(p.received_at) AS arrived_at, min(p.committed_at) AS committed_at, p.batch_id AS batch_id
FROM {db}.{POINTS_TABLE} AS p
INNER JOIN (SELECT month, cutoff FROM {db}.{CLOSES_TABLE} FINAL WHERE status = '{CLOSE_DONE}') AS c
    ON toYYYYMM(p.time) = c.month
WHERE p.kind = '{KIND_SUM}' AND p.org_id != '' AND p.committed_at >= c.cutoff
GROUP BY month, org_id, metric, batch_id""",
    ]


_MONTH_RANGE = """time >= fromUnixTimestamp64Nano({from_ns:Int64}, 'UTC')
    AND time < fromUnixTimestamp64Nano({to_ns:Int64}, 'UTC')"""


def close_orgs_sql(database: str) -> str:
    """The orgs with usage in month ``[from_ns, to_ns)`` committed before ``cutoff_ms``, in order, each
    with how many statement lines it gets (its metrics)."""
    return f"""SELECT org_id, uniqExact(metric) FROM {database}.{POINTS_TABLE}
WHERE kind = '{KIND_SUM}' AND org_id != '' AND {_MONTH_RANGE}
    AND committed_at < fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC')
GROUP BY org_id ORDER BY org_id"""


def close_preview_sql(database: str) -> str:
    """What a close with cutoff ``cutoff_ms`` writes for the month: orgs, lines, points and totals."""
    return f"""SELECT uniqExact(org_id), count(), sum(n), sum(ti), sum(td) FROM (
    SELECT org_id, metric, count() AS n, sum(toInt128(value_int)) AS ti,
        arraySum(arraySort(groupArrayIf(value_double, value_double != 0))) AS td
    FROM {database}.{POINTS_TABLE}
    WHERE kind = '{KIND_SUM}' AND org_id != '' AND {_MONTH_RANGE}
        AND committed_at < fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC')
    GROUP BY org_id, metric)"""


def close_lines_sql(database: str) -> str:
    """Statement lines of orgs ``[lo, hi]`` from raw points (the source of truth).

    Doubles are summed in sorted order so that a recomputation gives the same bits."""
    return f"""SELECT org_id, metric, argMax(unit, time) AS u, sum(toInt128(value_int)) AS ti,
    arraySum(arraySort(groupArrayIf(value_double, value_double != 0))) AS td, count() AS n,
    toUnixTimestamp64Nano(min(time)) AS first_ns, toUnixTimestamp64Nano(max(time)) AS last_ns
FROM {database}.{POINTS_TABLE}
WHERE kind = '{KIND_SUM}' AND org_id >= {{lo:String}} AND org_id <= {{hi:String}} AND {_MONTH_RANGE}
    AND committed_at < fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC')
GROUP BY org_id, metric ORDER BY org_id, metric"""


def _rollup_at_cutoff(database: str, org_range: bool) -> str:
    """Per org and metric, the hourly rollup's totals for the month as of the cutoff: the rollup cannot
    tell when a point was committed, so the points committed at or after ``cutoff_ms`` (adjustments, or
    points still arriving while the month is closed) are taken out of it, read in the same query; what is
    compared is then like for like with the statement. ``org_range`` binds ``lo`` and ``hi``."""
    orgs = "org_id >= {lo:String} AND org_id <= {hi:String}" if org_range else "org_id != ''"
    return f"""SELECT org_id, metric, sum(vi) AS vi, sum(vd) AS vd, sum(n) AS n FROM (
    SELECT org_id, metric, toInt128(value_int) AS vi, toFloat64(value_double) AS vd, toInt64(points) AS n
    FROM {database}.{HOURLY_TABLE}
    WHERE {orgs}
        AND hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
        AND hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')
    UNION ALL
    SELECT org_id, metric, -toInt128(value_int), -value_double, toInt64(-1)
    FROM {database}.{POINTS_TABLE}
    WHERE kind = '{KIND_SUM}' AND {orgs} AND {_MONTH_RANGE}
        AND committed_at >= fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC')
)
GROUP BY org_id, metric"""


def close_rollup_sql(database: str) -> str:
    """The hourly rollup's totals of orgs ``[lo, hi]`` for the month as of the cutoff, per org and metric."""
    return _rollup_at_cutoff(database, org_range=True)


def close_rollup_only_sql(database: str) -> str:
    """The rollup's usage for the month (as of the cutoff) under an org and metric that close ``close_id``
    has no line for: how many such (org, metric) and their totals. Each is a line the rollup and the
    statement disagree on. Unattributed usage (org ``''``) is in no statement and not counted here."""
    return f"""SELECT count(), sum(vi), sum(vd), sum(n) FROM ({_rollup_at_cutoff(database, org_range=False)})
WHERE (n != 0 OR vi != 0 OR vd != 0) AND (org_id, metric) GLOBAL NOT IN (
    SELECT org_id, metric FROM {database}.{STATEMENTS_TABLE} FINAL
    WHERE month = {{month:UInt32}} AND close_id = {{close_id:String}})"""


def close_record_sql(database: str) -> str:
    """The current state of the close of ``month`` (YYYYMM), if any."""
    cols = ", ".join(
        f"toUnixTimestamp64Milli({c})" if c in ("cutoff", "finished_at") else c for c in CLOSE_COLUMN_NAMES
    )
    return f"""SELECT {cols} FROM {database}.{CLOSES_TABLE} FINAL WHERE month = {{month:UInt32}}
ORDER BY version DESC LIMIT 1"""


def closes_sql(database: str) -> str:
    """Every finished close: month and cutoff (ms)."""
    return f"""SELECT month, toUnixTimestamp64Milli(cutoff) FROM {database}.{CLOSES_TABLE} FINAL
WHERE status = '{CLOSE_DONE}' ORDER BY month"""


def close_written_sql(database: str) -> str:
    """The orgs close ``close_id`` of ``month`` holds lines for, each with how many: what a close (or its
    resumption) reads before it writes, and again before it signs the month."""
    return f"""SELECT org_id, count() FROM {database}.{STATEMENTS_TABLE} FINAL
WHERE month = {{month:UInt32}} AND close_id = {{close_id:String}}
GROUP BY org_id"""


def collector_commits_sql(database: str) -> str:
    """Per collector that published since ``since_ms``: how far it has committed and when it said so
    (ms). Read by aggregation, not FINAL: on a cluster the rows of one collector may lie on any shard."""
    return f"""SELECT collector, toUnixTimestamp64Milli(max(committed_through)),
    toUnixTimestamp64Milli(max(published_at))
FROM {database}.{COLLECTOR_COMMITS_TABLE}
WHERE published_at >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC')
GROUP BY collector ORDER BY collector"""


def close_summary_sql(database: str, scoped: bool = False) -> str:
    """Totals of a close's lines, and how many lines the rollup does not match (doubles to 1e-9);
    ``scoped`` binds ``orgs`` (Array(String)): the totals of those orgs' lines only."""
    scope = "AND org_id IN {orgs:Array(String)}" if scoped else ""
    return f"""SELECT uniqExact(org_id), count(), sum(points), sum(total_int), sum(total_double),
    sum(rollup_points), sum(rollup_int), sum(rollup_double),
    countIf(points != rollup_points OR total_int != rollup_int
        OR abs(total_double - rollup_double) > 1e-9 * greatest(1, abs(total_double)))
FROM {database}.{STATEMENTS_TABLE} FINAL
WHERE month = {{month:UInt32}} AND close_id = {{close_id:String}} {scope}"""


_STATEMENT_SELECT = """month, org_id, metric, unit, total_int, total_double, points,
    toUnixTimestamp64Nano(first_time) AS first_ns, toUnixTimestamp64Nano(last_time) AS last_ns, close_id,
    toUnixTimestamp64Milli(closed_at) AS closed_ms, forced, checksum, rollup_int, rollup_double,
    rollup_points"""
STATEMENT_FIELDS = (
    "month", "org_id", "metric", "unit", "total_int", "total_double", "points", "first_ns", "last_ns",
    "close_id", "closed_ms", "forced", "checksum", "rollup_int", "rollup_double", "rollup_points",
)  # fmt: skip


def statements_sql(database: str, scoped: bool) -> str:
    """A page of a month's statement lines, by org and metric; ``scoped`` binds ``orgs``."""
    scope = "AND org_id IN {orgs:Array(String)}" if scoped else ""
    return f"""SELECT {_STATEMENT_SELECT} FROM {database}.{STATEMENTS_TABLE} FINAL
WHERE month = {{month:UInt32}} {scope}
ORDER BY org_id, metric LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}"""


def org_statements_sql(database: str) -> str:
    """A page of one org's statement lines over every closed month, newest month first: the lines of
    finished closes only (a close killed half-way has written lines of a month that is not closed)."""
    return f"""SELECT {_STATEMENT_SELECT} FROM {database}.{STATEMENTS_TABLE} FINAL
WHERE org_id = {{org:String}} AND (month, close_id) GLOBAL IN (
    SELECT month, close_id FROM {database}.{CLOSES_TABLE} FINAL WHERE status = '{CLOSE_DONE}')
ORDER BY month DESC, metric LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}"""


def adjustments_sql(database: str, scoped: bool) -> str:
    """A page of a closed month's adjustments: its points committed at or after the close's cutoff,
    one line per org, metric and arriving batch. Bound: ``from_ns``, ``to_ns``, ``cutoff_ms``."""
    scope = "AND org_id IN {orgs:Array(String)}" if scoped else ""
    return f"""SELECT org_id, metric, any(unit), sum(toInt128(value_int)), sum(value_double), count(),
    toUnixTimestamp64Nano(min(received_at)) AS arrived_ns, batch_id
FROM {database}.{POINTS_TABLE}
WHERE kind = '{KIND_SUM}' AND org_id != '' AND {_MONTH_RANGE}
    AND committed_at >= fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC') {scope}
GROUP BY org_id, metric, batch_id
ORDER BY arrived_ns, org_id, metric, batch_id LIMIT {{limit:UInt32}} OFFSET {{offset:UInt64}}"""


def _drift_rows(database: str) -> str:
    """Raw against rollup per month, org and metric over ``[from_ns, to_ns)`` (whole months)."""
    return f"""SELECT month, org_id, metric, raw_points, rollup_points,
        raw_int - rollup_int AS drift_int, raw_double - rollup_double AS drift_double
    FROM (
        SELECT toYYYYMM(time) AS month, org_id, metric, count() AS raw_points,
            sum(toInt128(value_int)) AS raw_int, sum(value_double) AS raw_double
        FROM {database}.{POINTS_TABLE}
        WHERE kind = '{KIND_SUM}' AND {_MONTH_RANGE}
        GROUP BY month, org_id, metric
    ) AS r
    FULL OUTER JOIN (
        SELECT toYYYYMM(hour) AS month, org_id, metric, sum(points) AS rollup_points,
            sum(value_int) AS rollup_int, sum(value_double) AS rollup_double
        FROM {database}.{HOURLY_TABLE}
        WHERE hour >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')
            AND hour < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')
        GROUP BY month, org_id, metric
    ) AS h USING (month, org_id, metric)
    WHERE raw_points != rollup_points OR raw_int != rollup_int
        OR abs(raw_double - rollup_double) > 1e-9 * greatest(1, abs(raw_double))"""


def drifting_orgs_sql(database: str) -> str:
    """(month, org, metric) whose raw points and hourly rollup disagree: the list behind the drift gauges
    (API-free: Grafana reads it). Bound ``from_ns``, ``to_ns`` (Int64 ns) and ``limit``."""
    return f"""SELECT month, org_id, metric, raw_points, rollup_points,
    toFloat64(drift_int) + drift_double AS value_drift
FROM ({_drift_rows(database)})
ORDER BY month DESC, abs(toFloat64(drift_int) + drift_double) DESC, org_id, metric
LIMIT {{limit:UInt32}}"""


def drift_summary_sql(database: str) -> str:
    """Per month: drifting orgs, absolute drift in points and in value (the gauges' numbers)."""
    return f"""SELECT month, uniqExact(org_id), sum(abs(toInt64(raw_points) - toInt64(rollup_points))),
    sum(abs(toFloat64(drift_int) + drift_double))
FROM ({_drift_rows(database)})
GROUP BY month"""


def _statement_check_rows(database: str) -> str:
    """A closed month's statement lines against the raw points they were computed from (the month's points
    committed before the close's cutoff), per org and metric: the lines that no longer match, and the
    (org, metric) with such points but no line. Bound: ``month``, ``close_id``, ``from_ns``, ``to_ns``,
    ``cutoff_ms``. The doubles are summed as the close sums them, so an unchanged line matches to the bit."""
    return f"""SELECT org_id, metric, s.points AS statement_points, r.n AS raw_points,
        s.total_int AS statement_int, r.ti AS raw_int, s.total_double AS statement_double, r.td AS raw_double,
        s.close_id AS line_close_id
    FROM (
        SELECT org_id, metric, points, total_int, total_double, close_id,
            toUnixTimestamp64Nano(first_time) AS first_ns, toUnixTimestamp64Nano(last_time) AS last_ns
        FROM {database}.{STATEMENTS_TABLE} FINAL
        WHERE month = {{month:UInt32}}
    ) AS s
    FULL OUTER JOIN (
        SELECT org_id, metric, count() AS n, sum(toInt128(value_int)) AS ti,
            arraySum(arraySort(groupArrayIf(value_double, value_double != 0))) AS td,
            toUnixTimestamp64Nano(min(time)) AS first_ns, toUnixTimestamp64Nano(max(time)) AS last_ns
        FROM {database}.{POINTS_TABLE}
        WHERE kind = '{KIND_SUM}' AND org_id != '' AND {_MONTH_RANGE}
            AND committed_at < fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC')
        GROUP BY org_id, metric
    ) AS r USING (org_id, metric)
    WHERE s.points != r.n OR s.total_int != r.ti OR s.total_double != r.td OR s.first_ns != r.first_ns
        OR s.last_ns != r.last_ns OR s.close_id != {{close_id:String}}"""


def statement_check_sql(database: str) -> str:
    """A closed month's statement lines that differ from their raw points (see ``_statement_check_rows``),
    by org and metric, at most ``limit``."""
    return f"""SELECT * FROM ({_statement_check_rows(database)})
ORDER BY org_id, metric LIMIT {{limit:UInt32}}"""


def statement_check_count_sql(database: str) -> str:
    """How many of a closed month's statement lines differ from their raw points."""
    return f"SELECT count() FROM ({_statement_check_rows(database)})"


def late_points_sql(database: str) -> str:
    """Points committed after the end of the month they belong to, per month (``open`` since ever)."""
    return f"""SELECT toYYYYMM(time) AS month, count() FROM {database}.{POINTS_TABLE}
WHERE kind = '{KIND_SUM}'
    AND committed_at >= toDateTime64(addMonths(toStartOfMonth(time), 1), 3, 'UTC')
GROUP BY month"""


def after_close_points_sql(database: str) -> str:
    """Points of a closed month committed at or after its cutoff (the adjustments' points)."""
    return f"""SELECT count() FROM {database}.{POINTS_TABLE}
WHERE kind = '{KIND_SUM}' AND org_id != '' AND {_MONTH_RANGE}
    AND committed_at >= fromUnixTimestamp64Milli({{cutoff_ms:Int64}}, 'UTC')"""


# -- the cluster rendering ---------------------------------------------------------------------------
# Derived from ddl() statement by statement, so a table added there gets its cluster form without a line
# here: each table becomes a shard-local ``<name>_local`` (Replicated*MergeTree with {shard}/{replica}
# macros, or Null) plus a Distributed table under the original name, sharded by org; materialized views
# run shard-locally from ``_local`` to ``_local``. Readers keep the original names (the Distributed
# tables), so the API and dashboard queries above serve both renderings unchanged. A statement of a
# shape this does not know raises, so a new kind of statement cannot silently stay single-node.

#: Suffix of the shard-local table behind each Distributed table.
LOCAL_SUFFIX = "_local"

#: How long Keeper keeps insert deduplication hashes (the same 10,000-block window as single-node).
REPLICATED_DEDUP_WINDOW_SECONDS = 7 * 86400

#: Settings of every insert. The token makes a repeat count once in the target and, with the second
#: setting, in every materialized view the insert feeds.
#: ``optimize_on_insert = 0``: the aggregating and replacing tables are not merged within each inserted
#: block (every query aggregates anyway, and background merges do it later): ~20% less insert CPU.
#: ``max_partitions_per_insert_block = 0``: a group whose points span more than 100 months (a backfill
#: with a long ``--max-past-s``) is written, one part per month; refused (TOO_MANY_PARTS, an overload code)
#: it would be retried forever and hold up every group after it.
INSERT_SETTINGS = {
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "optimize_on_insert": 0,
    "max_partitions_per_insert_block": 0,
}

#: Added on a cluster: the Distributed insert returns only once every shard has the block on one replica
#: (no background queue that re-batches blocks and loses the token's meaning), and deduplication is on.
CLUSTER_INSERT_SETTINGS = {
    "insert_deduplicate": 1,
    "distributed_foreground_insert": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "optimize_on_insert": 0,
    "max_partitions_per_insert_block": 0,
}

#: Added to reads on a cluster: a query with ``org_id = …`` touches only that org's shard.
CLUSTER_QUERY_SETTINGS = {"optimize_skip_unused_shards": 1}

#: Settings of the ON CLUSTER statements: queue them for every node and return (see Store.ensure_schema).
CLUSTER_DDL_SETTINGS = {"distributed_ddl_output_mode": "none"}

#: The sharding key of tables with an ``org_id`` column; tables without one (the catalog, the cumulative
#: state, events) are written shard-locally by views, or carry no token (events), and get ``rand()``.
SHARDING_KEY = "cityHash64(org_id)"

_CREATE_DB = re.compile(r"^CREATE DATABASE IF NOT EXISTS (\w+)$")
_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+)\.(\w+) \((.*?)\n\) ENGINE = (\w+)(.*)$", re.S)
_CREATE_MV = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\.(\w+) TO (\w+)\.(\w+) AS\n(.*)$", re.S
)
_CREATE_VIEW = re.compile(r"^CREATE VIEW IF NOT EXISTS (\w+)\.(\w+) AS\n(.*)$", re.S)
_ALTER = re.compile(r"^ALTER TABLE (\w+)\.(\w+) (.*)$", re.S)


def local_name(table: str) -> str:
    return table + LOCAL_SUFFIX


def _replicated_engine(engine: str, rest: str, database: str, table: str) -> tuple[str, str]:
    """``MergeTree`` → ``ReplicatedMergeTree('/clickhouse/tables/{shard}/db/t', '{replica}')``; the
    engine's own arguments (e.g. ReplacingMergeTree's version column) follow the two."""
    args = ""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                args, rest = rest[1:i], rest[i + 1 :]
                break
    path = f"'/clickhouse/tables/{{shard}}/{database}/{table}', '{{replica}}'"
    return f"Replicated{engine}({path}{', ' + args if args else ''})", rest


def cluster_ddl(database: str, cluster: str, statements: list[str] | None = None) -> list[str]:
    """The schema for a cluster named ``cluster``, from the single-node statements (default ``ddl``)."""
    db, on = database, f"ON CLUSTER {cluster}"
    tables = {m.group(2) for s in (statements or ddl(db)) if (m := _CREATE_TABLE.match(s))}
    out: list[str] = []
    for statement in statements if statements is not None else ddl(db):
        if m := _CREATE_DB.match(statement):
            out.append(f"{statement} {on}")
        elif m := _CREATE_TABLE.match(statement):
            _, table, columns, engine, rest = m.groups()
            local = local_name(table)
            if engine.endswith("MergeTree"):
                engine, rest = _replicated_engine(engine, rest, db, local)
                rest = rest.replace(
                    f"non_replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}",
                    f"replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}, "
                    f"replicated_deduplication_window_seconds = {REPLICATED_DEDUP_WINDOW_SECONDS}",
                )
            elif engine != "Null":
                raise ValueError(f"no cluster rendering for engine {engine} of {table}")
            if re.search(r"^\s*org_id ", columns, re.M):
                key = SHARDING_KEY
            elif re.search(r"^\s*month ", columns, re.M):
                key = "month"  # one month's close records on one shard, so FINAL collapses them
            else:
                key = "rand()"
            out.append(f"CREATE TABLE IF NOT EXISTS {db}.{local} {on} ({columns}\n) ENGINE = {engine}{rest}")
            out.append(
                f"CREATE TABLE IF NOT EXISTS {db}.{table} {on} AS {db}.{local}\n"
                f"ENGINE = Distributed({cluster}, {db}, {local}, {key})"
            )
        elif m := _CREATE_MV.match(statement):
            _, view, _, target, select = m.groups()
            for table in tables:  # read the shard's own rows
                select = re.sub(rf"\b{db}\.{table}\b", f"{db}.{local_name(table)}", select)
            out.append(
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view} {on} TO {db}.{local_name(target)} AS\n"
                f"{select}"
            )
        elif m := _CREATE_VIEW.match(statement):
            # A plain view reads the Distributed tables from whichever node is asked; a join's right
            # side is computed once and shipped to the shards (GLOBAL), not distributed twice.
            _, view, select = m.groups()
            select = re.sub(r"\b((?:INNER |LEFT )?JOIN)\b", r"GLOBAL \1", select)
            out.append(f"CREATE VIEW IF NOT EXISTS {db}.{view} {on} AS\n{select}")
        elif m := _ALTER.match(statement):
            _, table, action = m.groups()
            out.append(f"ALTER TABLE {db}.{local_name(table)} {on} {action}")
        else:
            raise ValueError(f"no cluster rendering for: {statement[:80]}")
    return out


#: What the monthly close reads. On a cluster a Distributed read goes to one replica of each shard, which
#: may not yet have fetched a part another replica acknowledged; so before the close reads, every replica
#: of these is synced (a point committed before the cutoff and missing from the replica read would be in
#: neither the statement nor the adjustments).
CLOSE_READ_TABLES = (POINTS_TABLE, HOURLY_TABLE, STATEMENTS_TABLE, CLOSES_TABLE)


def sync_replicas_sql(database: str, cluster: str, tables: Sequence[str]) -> list[str]:
    """Statements that return once every replica of each table's shard-local form, on every node of
    ``cluster``, has fetched the parts in its shard's replication log when the statement was issued
    (``LIGHTWEIGHT``: fetches only, not merges). They fail if a node does not answer within
    ``distributed_ddl_task_timeout``: a read then would not be known to be complete."""
    return [
        f"SYSTEM SYNC REPLICA ON CLUSTER {cluster} {database}.{local_name(t)} LIGHTWEIGHT" for t in tables
    ]


def created_names(statements: list[str]) -> list[str]:
    """The tables and views the statements create."""
    pattern = re.compile(r"^CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS \w+\.(\w+) ")
    return [m.group(1) for s in statements if (m := pattern.match(s))]


def render(
    database: str, cluster: str = "", raw_retention_days: int = 0, embedded: bool = False
) -> list[str]:
    """Every statement of the schema: single-node, or for ``cluster`` when one is named; ``embedded``: the
    embedded engine's (three views per point; the writer inserts the other tables' rows, ``WRITER_TABLES``
    and ``cardinality_ddl``)."""
    statements = (
        ddl(database, cardinality_views=not embedded, writer_views=not embedded)
        + (cardinality_ddl(database) if embedded else [])
        + close_ddl(database)
        + retention_ddl(database, raw_retention_days)
    )
    return cluster_ddl(database, cluster, statements) if cluster else statements
