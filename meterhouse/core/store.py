"""The ClickHouse client factory: one clickhouse-connect ``Client`` for embedded and server alike."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from meterhouse.core import native, schema
from meterhouse.core.config import Config, ConfigError
from meterhouse.core.memory import MemoryPlan

log = logging.getLogger("meterhouse.store")

# chdb opens one data directory per process, and only once: share the client per path.
_embedded_lock = threading.Lock()
_embedded: dict[Path, Client] = {}
_embedded_options: dict[Path, dict[str, str]] = {}


def _embedded_client(path: Path, memory: MemoryPlan | None = None) -> Client:
    """The process's one embedded engine, opened on ``path`` with the limits of ``memory`` at first use
    (its server settings cannot change once it is open)."""
    path = path.resolve()
    with _embedded_lock:
        if path in _embedded:
            return _embedded[path]
        if _embedded:
            other = next(iter(_embedded))
            raise RuntimeError(
                f"the embedded engine is already open on {other}; one process can open only one "
                "embedded data directory"
            )
        path.mkdir(parents=True, exist_ok=True)
        if memory is None:
            client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        else:
            client = clickhouse_connect.get_client(
                dsn=f"chdb://{path}",
                chdb_options=memory.engine_options(),
                settings=memory.engine_settings(),
            )
        _embedded[path] = client
        _embedded_options[path] = memory.engine_options() if memory is not None else {}
        return client


def embedded_path() -> Path:
    """The folder of the process's open embedded engine (the SQL endpoint's processes mirror its tables)."""
    with _embedded_lock:
        if not _embedded:
            raise RuntimeError("the embedded engine is not open in this process")
        return next(iter(_embedded))


def embedded_handle() -> Any:
    """A connection of its own on the process's open embedded engine (``chdb.connect``): its session
    (current database, settings) is its own, and its queries do not wait behind the other clients' (the
    SQL endpoint reads the tables' definitions through one: exporter/sql_worker.py)."""
    import chdb
    from clickhouse_connect.driver._chdbclient import build_connection_string

    path = embedded_path()
    with _embedded_lock:
        return chdb.connect(build_connection_string(str(path), _embedded_options[path] or None))  # type: ignore[no-untyped-call]


class Queries(Protocol):
    """What readers of ClickHouse need: a Store, or the collector's endpoint set that fails over."""

    database: str

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]: ...

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any: ...


#: Row blocks of one streamed answer (each a list of row tuples), in the order ClickHouse sends them.
Blocks = Iterator[Sequence[tuple[Any, ...]]]


class Streams(Protocol):
    """What a streamed read needs (the bulk export): an answer read block by block on a connection of its
    own, so that a slow reader holds no connection that the writer or the other queries use."""

    def stream(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Blocks]: ...


def _reader_client(path: Path) -> Client:
    """A client of its own on the process's open embedded engine (a handle of its own, as
    :func:`embedded_handle`): a stream holds its handle's lock until it is read to its end or closed."""
    from clickhouse_connect.driver._chdbclient import ChdbClient

    with _embedded_lock:
        return ChdbClient(path=str(path), chdb_options=_embedded_options.get(path) or None)


class SchemaMismatch(ConfigError):
    """The database holds the other rendering of the schema (single-node against cluster): a configuration
    error that no retry mends."""


class Store:
    """A handle on one ClickHouse endpoint with the project's schema in ``database``."""

    def __init__(
        self,
        client: Client,
        database: str,
        name: str,
        raw_retention_days: int = 0,
        cluster: str = "",
        open_reader: Callable[[], Client] | None = None,
    ) -> None:
        """``open_reader`` opens a client of its own on the same endpoint, for streamed reads
        (:meth:`stream`); without it they share ``client``."""
        self.client = client
        self.database = database
        self.name = name
        self.raw_retention_days = raw_retention_days
        self.cluster = cluster  # the replicated, sharded schema of this ClickHouse cluster, or ""
        self._open_reader = open_reader

    @property
    def embedded(self) -> bool:
        """The embedded engine: one writer, its ledger numbers in order, its own rows (``WRITER_TABLES``)."""
        return is_embedded(self.name) and not self.cluster

    def ensure_schema(self) -> None:
        statements = schema.render(self.database, self.cluster, self.raw_retention_days, self.embedded)
        # ON CLUSTER statements are queued for every node without waiting for them (a node that is down
        # would otherwise hold every statement for distributed_ddl_task_timeout); this endpoint is ready
        # once its own tables exist.
        settings = schema.CLUSTER_DDL_SETTINGS if self.cluster else {}
        if self.cluster:
            self._migrate_cluster_columns(settings)
        else:
            self._migrate_columns()
        self._migrate_added_columns(settings)
        for statement in statements:
            self.client.command(statement, settings=settings)
        if self.cluster:
            self.wait_for_tables(schema.created_names(statements))
        self.check_rendering()
        if self.embedded:
            self._migrate_embedded_views()
        if not self.cluster:
            self._migrate_views()

    def _present(self, names: Sequence[str]) -> list[str]:
        """Which of the named tables or views the database holds."""
        return [
            str(r[0])
            for r in self.client.query(
                "SELECT name FROM system.tables WHERE database = {db:String} AND name IN {v:Array(String)}",
                parameters={"db": self.database, "v": list(names)},
            ).result_rows
        ]

    def _migrate_embedded_views(self) -> None:
        """The embedded engine's views are the three per-point ones (and the distributions'): the writer
        inserts the orgs', the catalog's and the attribute sets' rows (``schema.WRITER_TABLES``) and each
        new (attribute set, hour) pair for the attribute cardinality (``schema.cardinality_ddl``). A
        database whose views did that from every point has them dropped here, at start, while nothing
        writes. A group in doubt that one of them fed is found in its table by the ledger (rows at or
        above the group's number), as a view's table always was; the cardinality's states are sets, which
        the writer's pairs of such a group join again without counting anything twice."""
        views = self._present([*schema.CARDINALITY_VIEWS, *schema.WRITER_VIEWS])
        if views:
            log.warning("schema: orgs, catalog, attribute sets and attribute cardinality written by the "
                        "writer from now on; their views over every point dropped",
                        extra={"views": views})  # fmt: skip
        for view in views:
            self.client.command(f"DROP VIEW IF EXISTS {self.database}.{view}")

    def _migrate_added_columns(self, settings: dict[str, Any]) -> None:
        """Tables of an earlier version: the columns added since (``ADDED_COLUMNS``), asked for first, so
        that a start finds nothing to alter (an ALTER, even one that changes nothing, rewrites the table's
        metadata, and on a cluster queues a task for every node). Run before this version's DDL (the
        engine checks a view's query even under ``IF NOT EXISTS``, and this version's read them); tables
        that do not exist yet are left to the DDL, which creates them with the columns."""
        tables = [schema.local_name(t) if self.cluster else t for t, _, _ in schema.ADDED_COLUMNS]
        present = {
            (str(t), str(c))
            for t, c in self.client.query(
                "SELECT table, name FROM system.columns"
                " WHERE database = {db:String} AND table IN {t:Array(String)}",
                parameters={"db": self.database, "t": tables},
            ).result_rows
        }
        existing = {t for t, _ in present}
        missing = [
            (t, c, ty)
            for (t, c, ty), local in zip(schema.ADDED_COLUMNS, tables, strict=True)
            if local in existing and (local, c) not in present
        ]
        if missing:
            log.warning("schema: adding columns to a database of an earlier version",
                        extra={"columns": [f"{t}.{c}" for t, c, _ in missing]})  # fmt: skip
            for statement in schema.added_columns_migration(self.database, self.cluster, missing):
                self.client.command(statement, settings=settings)

    def _migrate_cluster_columns(self, settings: dict[str, Any]) -> None:
        """A cluster's database of an earlier version: its ingest tables take no ``batch_seq``, so every
        insert would be refused, and the views of this version's DDL would not be created. The columns
        are added on every node first (``schema.seq_columns_cluster_migration``)."""
        local = schema.local_name(schema.INGEST_TABLE)
        ((exists, found),) = self.client.query(
            "SELECT count() > 0, countIf(name = 'batch_seq') FROM system.columns"
            " WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": self.database, "t": local},
        ).result_rows
        if exists and not found:
            log.warning("schema: adding batch_seq to a cluster database of an earlier version")
            for statement in schema.seq_columns_cluster_migration(self.database, self.cluster):
                self.client.command(statement, settings=settings)

    def _migrate_columns(self) -> None:
        """A database of the version before the ledger (single node; nothing inserts yet): the
        ``batch_seq`` columns first (a view that reads one is refused while it is missing, even when the
        view exists). Every table is asked, not one: a start the kill cut short added it to some."""
        tables = [schema.INGEST_TABLE, schema.DIST_INGEST_TABLE, *schema.LEDGER_TABLES]
        found = {
            str(name): int(n)
            for name, n in self.client.query(
                "SELECT table, countIf(name = 'batch_seq') FROM system.columns"
                " WHERE database = {db:String} AND table IN {t:Array(String)} GROUP BY table",
                parameters={"db": self.database, "t": tables},
            ).result_rows
        }
        indexed = {
            str(r[0])
            for r in self.client.query(
                "SELECT table FROM system.data_skipping_indices"
                " WHERE database = {db:String} AND name = 'batch_seq_idx'",
                parameters={"db": self.database},
            ).result_rows
        }
        if any(n == 0 for n in found.values()) or (found and not set(schema.LEDGER_TABLES) <= indexed):
            log.warning("schema: adding batch_seq to a database of an earlier version")
            for statement in schema.seq_columns_migration(self.database):
                self.client.command(statement)

    def _migrate_views(self) -> None:
        """The views that fill ``batch_seq``, created again where an earlier version made them; and a
        redo table a kill left behind, dropped."""
        for statement in schema.redo_cleanup_ddl(self.database, schema.all_views()):
            self.client.command(statement)
        durable = schema.durable_tables(self.database)
        created = {
            str(name): str(query)
            for name, query in self.client.query(
                "SELECT name, create_table_query FROM system.tables "
                "WHERE database = {db:String} AND name IN {names:Array(String)}",
                parameters={
                    "db": self.database,
                    "names": [*schema.LEDGER_VIEW_NAMES, *schema.REVISED_VIEWS, *durable],
                },
            ).result_rows
        }
        lax = [t for t in durable if t in created and "fsync_after_insert" not in created[t]]
        if lax:
            log.warning("schema: parts fsync'd on insert and merge from now on", extra={"tables": lax})
            for statement in schema.durable_migration(self.database, lax):
                self.client.command(statement)
        stale = [v for v in schema.LEDGER_VIEW_NAMES if v in created and "batch_seq" not in created[v]]
        stale += [v for v, part in schema.REVISED_VIEWS.items() if v in created and part not in created[v]]
        if stale:
            log.warning("schema: views of an earlier version created again", extra={"views": stale})
            for statement in schema.seq_views_migration(self.database, stale):
                self.client.command(statement)

    def check_rendering(self) -> None:
        """Refuse a database whose schema is the other rendering. ``CREATE … IF NOT EXISTS`` keeps whatever
        holds a name: a cluster node whose database was created single-node keeps its plain tables (each
        node's points stay apart, the split the cluster prevents), and a single-node store on a cluster
        schema would insert into its Distributed tables without the cluster's insert settings."""
        rows = self.client.query(
            "SELECT name, engine FROM system.tables "
            "WHERE database = {db:String} AND name IN {names:Array(String)}",
            parameters={"db": self.database, "names": [schema.INGEST_TABLE, schema.POINTS_TABLE]},
        ).result_rows
        engines = {str(name): str(engine) for name, engine in rows}
        found = ", ".join(f"{name}: {engine}" for name, engine in sorted(engines.items()))
        distributed = [name for name, engine in engines.items() if engine == "Distributed"]
        if self.cluster and len(distributed) < len(engines):
            raise SchemaMismatch(
                f"{self.name}: database {self.database} holds the single-node schema ({found}), not cluster "
                f"{self.cluster}'s: its plain tables would keep this node's points apart from the others'. "
                "Use another database, or move the data into the cluster's tables first"
            )
        if not self.cluster and distributed:
            raise SchemaMismatch(
                f"{self.name}: database {self.database} holds a cluster schema ({found}); pass --cluster NAME"
            )

    def wait_for_tables(self, names: Sequence[str], timeout_s: float = 60.0) -> None:
        """Wait until every named table and view exists in the database on this endpoint."""
        deadline = time.monotonic() + timeout_s
        while True:
            present = {
                r[0]
                for r in self.client.query(
                    "SELECT name FROM system.tables WHERE database = {db:String}",
                    parameters={"db": self.database},
                ).result_rows
            }
            missing = sorted(set(names) - present)
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name}: tables not created within {timeout_s:g}s: {missing}")
            time.sleep(0.2)

    def sync_replicas(self, tables: Sequence[str]) -> None:
        """On a cluster, wait until every replica of ``tables`` has what its shard's log held when called
        (see ``schema.sync_replicas_sql``); one node has nothing to wait for."""
        if self.cluster:
            for statement in schema.sync_replicas_sql(self.database, self.cluster, tables):
                self.client.command(statement)

    def insert_settings(self, token: str) -> dict[str, Any]:
        """The settings of every insert: what makes a retried or replayed batch count once."""
        settings = schema.CLUSTER_INSERT_SETTINGS if self.cluster else schema.INSERT_SETTINGS
        if token.startswith(schema.LEDGER_TOKEN_PREFIX) and is_embedded(self.name):
            # The ledger's groups: one part per partition of each table (``schema.ONE_PART_SETTINGS``).
            settings = {**settings, **schema.ONE_PART_SETTINGS}
        return {"insert_deduplication_token": token, **settings}

    @property
    def query_settings(self) -> dict[str, Any]:
        return schema.CLUSTER_QUERY_SETTINGS if self.cluster else {}

    def insert_points(self, columns: Sequence[Sequence[Any]], token: str) -> None:
        """Insert number points, column-oriented; ``token`` makes a repeat of the batch count once."""
        self._insert(
            schema.INGEST_TABLE, schema.INGEST_COLUMN_NAMES, schema.INGEST_COLUMN_TYPES, columns, token
        )

    def insert_distributions(self, columns: Sequence[Sequence[Any]], token: str) -> None:
        """Insert histogram, exponential histogram and summary points (same contract)."""
        self._insert(
            schema.DIST_INGEST_TABLE,
            schema.DIST_INGEST_COLUMN_NAMES,
            schema.DIST_INGEST_COLUMN_TYPES,
            columns,
            token,
        )

    def _insert(
        self,
        table: str,
        names: Sequence[str],
        types: Sequence[str],
        columns: Sequence[Sequence[Any]],
        token: str,
    ) -> None:
        if len(columns) == len(names) - 1 and names[-1] == "batch_seq":
            # Rows inserted outside the writer (tools, tests) are outside its ledger: batch_seq 0.
            columns = [*columns, [0] * (len(columns[0]) if columns else 0)]
        if all(native.supported(t) for t in types):
            self.insert_native(table, names, native.encode(names, types, columns), token)
            return
        self.client.insert(
            f"{self.database}.{table}",
            columns,
            column_names=names,
            column_type_names=types,
            column_oriented=True,
            settings=self.insert_settings(token),
        )

    def insert_native(self, table: str, names: Sequence[str], block: bytes, token: str) -> None:
        """Insert Native-format blocks (``meterhouse.core.native``) holding the named columns."""
        self.client.raw_insert(
            f"{self.database}.{table}", names, block, settings=self.insert_settings(token), fmt="Native"
        )

    def landed(self, kind: str, seq: int) -> dict[str, set[str]] | None:
        """Per ledger table of the ``kind`` insert, the partitions holding rows of the group ``seq``
        (``schema.landed_sql``: rows at or above it, so asked while it is the newest group). None where
        the ledger does not decide (a ClickHouse server or cluster: the token does)."""
        if not is_embedded(self.name):
            return None
        return {
            table: {str(r[0]) for r in self.rows(schema.landed_sql(self.database, kind, table), {"seq": seq})}
            for table in schema.ledger_tables(kind)
        }

    def insert_in_doubt(
        self,
        kind: str,
        names: Sequence[str],
        block: bytes,
        token: str,
        seq: int,
        landed: Mapping[str, Iterable[str]] | None = None,
    ) -> list[str]:
        """Insert a group that may have landed already, in part (a replay after a crash, a retry after a
        failed insert, a dead letter's redrive): ``kind`` "n" or "d", ``block`` as the first try sent it.
        Returns the ledger tables it was inserted into.

        On the embedded engine, one process is the only writer: each ledger table is asked which of its
        partitions hold the group (``schema.landed_sql``), and the group's other rows go through the
        table's view, alone, without deduplication (the engine's deduplication log may hold the token of
        a part the kill took, and would drop it). ``landed`` names partitions known to hold the rows under
        another number (what a dead letter's group put in before it was refused). Elsewhere the token
        decides, as on the first try."""
        if kind in schema.REPEATABLE_INSERTS:  # the writer's sets and (set, hour) pairs: kept once
            table = schema.REPEATABLE_INSERTS[kind]
            self._insert_again(table, names, block, one_part=False)
            return [table]
        if not is_embedded(self.name):
            self.insert_native(schema.INGEST_OF[kind], names, block, token)
            if kind in schema.WRITER_TABLES:
                return [schema.WRITER_TABLES[kind]]
            return [t for t, _ in schema.LEDGER_VIEWS[kind]]

        def asked() -> dict[str, set[str]]:
            return self.landed(kind, seq) or {}

        found = asked()
        before = {table: found[table] | set((landed or {}).get(table, ())) for table in found}
        if kind in schema.WRITER_TABLES:
            # The writer's own rows (a few per org and metric): one insert into the table, whole or not
            # at all (the table has no partitions), without deduplication as below.
            table = schema.WRITER_TABLES[kind]
            if before[table]:
                return []
            self._insert_again(table, names, block, one_part=True)
            return [table]
        ledger = schema.EMBEDDED_LEDGER_VIEWS[kind]
        # A table without partitions holds the group whole or not at all; one with partitions may hold
        # some of the group's months (one part each): its view redoes the rest.
        views = [
            view for table, view in ledger if schema.partition_key(self.database, table) or not before[table]
        ]
        skip = {view: sorted(before[table]) for table, view in ledger if view in views}
        # Its attribute cardinality and attribute sets are the writer's inserts ("a", "s").
        repeatable = [
            v
            for v in schema.REPEATABLE_VIEWS[kind]
            if v not in schema.CARDINALITY_VIEWS and v not in schema.WRITER_VIEWS
        ]
        views = [*repeatable, *views]
        try:
            # One view at a time: the insert's memory is one view's, not all of them together (a retry
            # after the group failed for memory would fail the same way), and each ledger table that
            # holds the group stays asked for alone if this is cut short. The repeatable views first:
            # they are the costliest (the attribute-cardinality states), and one of them failing for
            # memory leaves no ledger table holding the group, so the writer may still halve it.
            for view in views:
                for statement in schema.redo_ddl(self.database, kind, [view], skip):
                    self.client.command(statement)
                self.client.raw_insert(
                    f"{self.database}.{schema.REDO_TABLE}", names, block, fmt="Native",
                    settings={**schema.INSERT_SETTINGS, **schema.ONE_PART_SETTINGS, "insert_deduplicate": 0},
                )  # fmt: skip
        finally:
            for statement in schema.redo_cleanup_ddl(self.database, views):
                self.client.command(statement)
        after = asked()
        return [table for table, _ in ledger if after[table] != found[table]]

    def _insert_again(self, table: str, names: Sequence[str], block: bytes, one_part: bool) -> None:
        """Insert ``block`` into ``table`` without deduplication: a repeat the ledger (or a set's
        idempotence) has already decided on, which the engine's log must not drop."""
        settings = {**schema.INSERT_SETTINGS, **(schema.ONE_PART_SETTINGS if one_part else {})}
        self.client.raw_insert(f"{self.database}.{table}", names, block, fmt="Native",
                               settings={**settings, "insert_deduplicate": 0})  # fmt: skip

    def insert_earlier(self, kind: str, names: Sequence[str], block: bytes, token: str) -> None:
        """Insert again a group an earlier version began (its token lacks the ledger's prefix; a replay or
        a dead letter's redrive): under its token alone, as then. On the embedded engine (one writer), when
        the raw table holds the group's ``batch_id`` (that version's insert landed), the views that read
        the raw table then and the ingest table now (``schema.READ_RAW_BEFORE_LEDGER``) were fed by it and
        would not recognise the repeat: they are left out of it (dropped for the insert and created again
        after; a kill in between leaves them to the next start's ``ensure_schema``)."""
        table = schema.INGEST_OF[kind]
        if kind in schema.WRITER_TABLES:
            # The writer's own rows of such a group (the embedded engine's, inserted before its points):
            # when its points had landed, that version's views counted them.
            source = schema.WRITER_SOURCE[kind]
            raw = f"{token.rsplit(':', 1)[0]}:{source}"
            if not self.scalar(schema.batch_landed_sql(self.database, source), {"b": raw}):
                self.insert_native(table, names, block, token)
            return
        views = [] if self.embedded else schema.READ_RAW_BEFORE_LEDGER[kind]  # the embedded has none
        landed = is_embedded(self.name) and bool(
            self.scalar(schema.batch_landed_sql(self.database, kind), {"b": token})
        )
        if not landed or not views:
            self.insert_native(table, names, block, token)
            return
        log.warning("replay: a group an earlier version inserted; its repeat leaves out the views that "
                    "read the raw table then", extra={"views": list(views)})  # fmt: skip
        creates = {m.group(2): s for s in schema.ddl(self.database) if (m := schema._CREATE_MV.match(s))}
        try:
            for view in views:
                self.client.command(f"DROP VIEW IF EXISTS {self.database}.{view}")
            self.insert_native(table, names, block, token)
        finally:
            for view in views:
                self.client.command(creates[view])

    def max_batch_seq(self) -> int:
        """The highest ``batch_seq`` any ledger table holds (0 if none)."""
        return max(int(self.scalar(schema.max_seq_sql(self.database, t)) or 0) for t in schema.LEDGER_TABLES)

    def insert_rows(
        self,
        table: str,
        columns: Sequence[Sequence[Any]],
        names: Sequence[str],
        types: Sequence[str],
        token: str,
    ) -> None:
        """Insert into one of the schema's tables, column-oriented, deduplicated by ``token``."""
        self._insert(table, names, types, columns, token)

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        result = self.client.query(sql, parameters=parameters or {}, settings=self.query_settings)
        return cast("list[tuple[Any, ...]]", result.result_rows)

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        rows = self.rows(sql, parameters)
        return rows[0][0] if rows else None

    @contextlib.contextmanager
    def stream(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> Iterator[Blocks]:
        """The answer of ``sql`` in row blocks (clickhouse-connect's ``query_row_block_stream``), read on a
        client opened for it and closed after: on the embedded engine an open stream holds its handle, on
        a server its HTTP session, for as long as the reader takes."""
        client = self._open_reader() if self._open_reader is not None else self.client
        try:
            with client.query_row_block_stream(
                sql, parameters=parameters or {}, settings={**self.query_settings, **(settings or {})}
            ) as blocks:
                yield blocks
        finally:
            if client is not self.client:
                client.close()

    def ping(self) -> bool:
        try:
            return self.client.command("SELECT 1") == 1
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    def close(self) -> None:
        # The embedded client stays open for the life of the process (chdb cannot reopen a path).
        if not is_embedded(self.name):
            self.client.close()


EMBEDDED = "embedded"


def is_embedded(url: str) -> bool:
    return url == EMBEDDED or url.startswith(EMBEDDED + "#")


def endpoint_label(url: str) -> str:
    """A name for logs and metric labels: no credentials, no path."""
    if is_embedded(url):
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or (8443 if parts.scheme == 'https' else 8123)}"


def connect(
    url: str,
    data_dir: Path,
    database: str,
    raw_retention_days: int = 0,
    cluster: str = "",
    memory: MemoryPlan | None = None,
) -> Store:
    """A store on one endpoint: ``embedded[#name]`` or ``http(s)://[user:password@]host:port``; with
    ``cluster``, a node of that ClickHouse cluster holding the replicated schema. ``memory`` bounds the
    embedded engine when this call opens it."""
    if is_embedded(url):
        client = _embedded_client(data_dir / "clickhouse", memory)
        path = (data_dir / "clickhouse").resolve()
        return Store(client, database, url, raw_retention_days, open_reader=lambda: _reader_client(path))
    client = clickhouse_connect.get_client(dsn=url, connect_timeout=5, send_receive_timeout=30)
    # A stream's client has no session: its queries never wait for (or lock) another's session.
    reader = lambda: clickhouse_connect.get_client(  # noqa: E731
        dsn=url, connect_timeout=5, send_receive_timeout=30, autogenerate_session_id=False
    )
    return Store(client, database, endpoint_label(url), raw_retention_days, cluster, open_reader=reader)


def open_store(config: Config, *, create_schema: bool = True) -> Store:
    """Open the first configured endpoint (the embedded engine under ``config.data_dir`` by default).

    For the one-off commands (a direct close, a schema check): the engine is not held to the collector's
    memory budget here; `meterhouse up` opens it through the collector, which applies the budget."""
    store = connect(
        config.endpoints[0], config.data_dir, config.database, config.raw_retention_days, config.cluster
    )
    if create_schema:
        store.ensure_schema()
    return store
