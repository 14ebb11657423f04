"""Rebuilding a month of the hourly rollups from raw points (``meterhouse rollup rebuild``).

The rollups (``usage_hourly``, ``usage_hourly_by_metric``) are written by materialized views in the same
insert as the raw points, so they agree unless something changed one without the other: a partition
dropped or detached by hand, a view dropped and created again, rows deleted. The reconciliation finds
such drift (MeterhouseReconciliationDrift); this is its remedy. Raw points are the truth (statements are
computed from them), so the month's rollup rows are computed again from them, with the views' own
grouping, into a staging table, which then replaces the month's partition in one step (``REPLACE
PARTITION``): readers see the old rows or the new, never a month half rebuilt. A rebuild killed at any
moment leaves the rollup as it was (the staging table is dropped by the next run).

While it runs, ``hold`` keeps the collector's writer from inserting (points are still acknowledged and
spooled meanwhile, and written once it is done): a group inserted between the staging table's read of the
raw points and the replacement would otherwise be in the raw points and out of the rollup. Another
collector writing to the same ClickHouse server is not held: there, rebuild months that receive no more
points (past ``--late-window-days``), or run it again if the reconciliation still finds drift.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from meterhouse.core import schema
from meterhouse.core.close import Month
from meterhouse.core.store import Store
from meterhouse.core.timefmt import format_rfc3339

#: The rollups rebuilt, each with the SELECT over raw points that its view computes from the ingest block
#: (the attribute set's hash is ``cityHash64`` of the raw table's sorted Map, as the views compute it).
REBUILT: dict[str, str] = {
    schema.HOURLY_TABLE: """SELECT org_id, metric, toStartOfHour(time) AS hour,
    cityHash64(attributes) AS attributes_hash, any(unit) AS unit,
    sum(toInt128(value_int)) AS value_int, sum(value_double) AS value_double, count() AS points,
    max(batch_seq) AS batch_seq
FROM {db}.{raw}
WHERE kind = '{sum}' AND toYYYYMM(time) = {{month:UInt32}}
    AND time >= fromUnixTimestamp64Nano({{kept_ns:Int64}}, 'UTC')
GROUP BY org_id, metric, hour, attributes_hash""",
    schema.METRIC_ORGS_TABLE: """SELECT metric, toStartOfHour(time) AS hour, org_id,
    sum(toInt128(value_int)) AS value_int, sum(value_double) AS value_double, count() AS points,
    uniqExactState(cityHash64(metric, attributes)) AS series,
    max(batch_seq) AS batch_seq
FROM {db}.{raw}
WHERE kind = '{sum}' AND toYYYYMM(time) = {{month:UInt32}}
    AND time >= fromUnixTimestamp64Nano({{kept_ns:Int64}}, 'UTC')
GROUP BY metric, hour, org_id""",
}


#: The raw table's retention TTL as the engine writes it back (``schema.retention_ddl``).
_TTL_DAYS = re.compile(r"\bTTL toDateTime\(time\) \+ toIntervalDay\((\d+)\)")
HOUR_NS = 3600 * 10**9


def retained_from_ns(store: Store, now_ns: int | None = None) -> int:
    """The first hour whose raw points are all still kept (0: all are). The raw table's TTL as the engine
    has it (whatever this process was configured with), or the store's ``raw_retention_days``: an hour
    before it may have lost raw points that the rollup still holds, its only copy."""
    query = store.scalar(
        "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        {"db": store.database, "t": schema.POINTS_TABLE},
    )
    m = _TTL_DAYS.search(query or "")
    days = [int(m.group(1))] if m else []
    days += [store.raw_retention_days] if store.raw_retention_days else []
    if not days:
        return 0
    edge = (time.time_ns() if now_ns is None else now_ns) - min(days) * 24 * HOUR_NS
    return (edge // HOUR_NS + 1) * HOUR_NS  # the hour holding the edge may have lost some of its points


class RebuildRefused(Exception):
    """The rebuild cannot run here (a cluster's schema); the message says what to do instead."""


@dataclass
class Rebuilt:
    month: str
    #: Per rollup table: (rows, points) before and after.
    tables: dict[str, dict[str, int]]
    #: The first hour rebuilt: those before it are past the raw points' retention and kept as they were.
    rebuilt_from: str
    #: Orgs whose raw points and hourly rollup disagreed in the month before, and after.
    drifting_before: int
    drifting_after: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"month": self.month, "tables": self.tables, "rebuilt_from": self.rebuilt_from,
                "drifting_orgs_before": self.drifting_before,
                "drifting_orgs_after": self.drifting_after, "seconds": round(self.seconds, 3)}  # fmt: skip


def _drifting(store: Store, month: Month) -> int:
    rows = store.rows(
        schema.drift_summary_sql(store.database), {"from_ns": month.start_ns, "to_ns": month.end_ns}
    )
    return int(sum(n for _m, n, *_ in rows))


def _counts(store: Store, table: str, month: Month) -> dict[str, int]:
    (rows, points), *_ = store.rows(
        f"SELECT count(), sum(points) FROM {store.database}.{table} WHERE toYYYYMM(hour) = {{month:UInt32}}",
        {"month": month.key},
    )
    return {"rows": int(rows), "points": int(points or 0)}


def rebuild_month(
    store: Store,
    month: Month,
    hold: Callable[[], AbstractContextManager[Any]] = nullcontext,
    progress: Callable[[str], None] = lambda _: None,
) -> Rebuilt:
    """Compute ``month``'s rows of each rollup again from raw points and put them in place of the
    month's partition (the module's doc); ``hold()`` is held from before the raw points are read until
    the last partition is replaced."""
    if store.cluster:
        raise RebuildRefused(
            "on a cluster each shard holds its own partitions: run the rebuild against each shard's node "
            "with --clickhouse-url (its local tables), not the cluster"
        )
    started = time.monotonic()
    db = store.database
    kept_ns = max(retained_from_ns(store), month.start_ns)
    if kept_ns >= month.end_ns:
        raise RebuildRefused(
            f"{month} is past the raw points' retention: its hourly rollup is the only copy of its usage, "
            "and there is nothing to rebuild it from"
        )
    before = {t: _counts(store, t, month) for t in REBUILT}
    drifting_before = _drifting(store, month)
    # Staging tables of killed runs (a run takes minutes, never a day; a running one elsewhere is kept).
    for (name,) in store.rows(
        "SELECT name FROM system.tables WHERE database = {db:String} AND match(name, {pattern:String}) "
        "AND metadata_modification_time < now() - INTERVAL 1 DAY",
        {"db": db, "pattern": "^(" + "|".join(REBUILT) + ")_rebuild_[0-9a-f]{12}$"},
    ):
        store.client.command(f"DROP TABLE IF EXISTS {db}.`{name}`")
    with hold():
        for table, select in REBUILT.items():
            staging = f"{table}_rebuild_{uuid.uuid4().hex[:12]}"  # two rebuilds never share one
            progress(f"{table}: computing {month} from raw points")
            store.client.command(f"CREATE TABLE {db}.{staging} AS {db}.{table}")
            try:
                # The hours whose raw points the retention may have dropped keep their rollup rows as they
                # are (adversary 38: a rebuild deleted the only copy of such hours' usage).
                store.client.command(
                    f"INSERT INTO {db}.{staging} SELECT * FROM {db}.{table} WHERE toYYYYMM(hour) = "
                    "{month:UInt32} AND hour < fromUnixTimestamp64Nano({kept_ns:Int64}, 'UTC')",
                    parameters={"month": month.key, "kept_ns": kept_ns},
                )
                store.client.command(
                    f"INSERT INTO {db}.{staging} "
                    + select.format(db=db, raw=schema.POINTS_TABLE, sum=schema.KIND_SUM),
                    parameters={"month": month.key, "kept_ns": kept_ns},
                )
                progress(f"{table}: replacing the partition of {month}")
                if not store.scalar(f"SELECT count() FROM {db}.{staging}"):  # no raw points: no rollup rows
                    store.client.command(f"ALTER TABLE {db}.{table} DROP PARTITION ID '{month.key}'")
                    continue
                store.client.command(
                    f"ALTER TABLE {db}.{table} REPLACE PARTITION ID '{month.key}' FROM {db}.{staging}"
                )
            finally:
                store.client.command(f"DROP TABLE IF EXISTS {db}.{staging}")
    after = {t: _counts(store, t, month) for t in REBUILT}
    return Rebuilt(
        month=str(month),
        tables={t: {"rows_before": before[t]["rows"], "points_before": before[t]["points"],
                    "rows_after": after[t]["rows"], "points_after": after[t]["points"]} for t in REBUILT},
        rebuilt_from=format_rfc3339(kept_ns),
        drifting_before=drifting_before,
        drifting_after=_drifting(store, month),
        seconds=time.monotonic() - started,
    )  # fmt: skip
