"""How far each collector has committed, as stored in ClickHouse (``schema.COLLECTOR_COMMITS_TABLE``).

Several collectors may write one ClickHouse (a server, or a cluster behind a load balancer). A collector
that may not be alone publishes, every second or so, a time before which every point it acknowledged is
committed (``collector.commits.CommitPublisher``). A close asked for at ``since_ms`` waits until every
collector that published lately has passed it (``wait_for_collectors``); the ones that did not within the
timeout are named in the close's record. Both times are read from ClickHouse's clock (``now64``).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any, Protocol

from meterhouse.core import schema
from meterhouse.core.store import Queries

#: A collector that published within this many seconds is live: a close waits for it.
LIVE_S = 30.0
#: A collector that published within this many seconds and has not passed a close's start when the close
#: takes its cutoff is named in the close's record; one silent for longer is taken as retired.
KNOWN_S = 24 * 3600.0
NOW_MS_SQL = "SELECT toUnixTimestamp64Milli(now64(3))"
#: How long a close waits for the collectors to commit what they acknowledged before it was asked for.
CLOSE_WAIT_S = 60.0


class Publisher(Protocol):
    database: str

    def insert_rows(self, table: str, columns: Any, names: Any, types: Any, token: str) -> None: ...


def publish(store: Publisher, collector: str, committed_through_ms: int, published_ms: int) -> None:
    """One row: ``collector`` has committed every point it acknowledged before ``committed_through_ms``."""
    store.insert_rows(
        schema.COLLECTOR_COMMITS_TABLE,
        [[collector], [committed_through_ms], [published_ms]],
        schema.COLLECTOR_COMMITS_COLUMN_NAMES,
        schema.COLLECTOR_COMMITS_COLUMN_TYPES,
        f"commits:{collector}:{published_ms}",
    )


def collectors(store: Queries, now_ms: int) -> list[tuple[str, int, int]]:
    """(collector, committed through ms, published ms) of every collector known (``KNOWN_S``)."""
    rows = store.rows(
        schema.collector_commits_sql(store.database), {"since_ms": now_ms - int(KNOWN_S * 1000)}
    )
    return [(str(c), int(through), int(published)) for c, through, published in rows]


def wait_for_collectors(
    store: Queries,
    since_ms: int,
    timeout_s: float,
    exclude: Collection[str] = (),
    poll_s: float = 0.2,
) -> list[str]:
    """Wait until every live collector (but ``exclude``) has committed through ``since_ms``, at most
    ``timeout_s``; the known collectors that have not (live or not), in order."""
    deadline = time.monotonic() + timeout_s
    while True:
        now_ms = int(store.scalar(NOW_MS_SQL))
        known = collectors(store, now_ms)
        behind = [(c, p) for c, through, p in known if c not in exclude and through < since_ms]
        live = [c for c, published in behind if published >= now_ms - int(LIVE_S * 1000)]
        if not live or time.monotonic() >= deadline:
            return sorted(c for c, _ in behind)
        time.sleep(poll_s)
