"""The sink: takes spooled records in order and writes them to ClickHouse, exactly once.

Records are grouped into one column-oriented insert per table (when ``flush_max_points`` wait or the
oldest has waited ``flush_interval_s``). Before the insert the group and its deduplication token (a
digest of the requests' contents) are written to the spool, so a replay after a crash repeats the same
insert and ClickHouse counts it once. Retryable errors are retried with exponential backoff and full
jitter for as long as it takes (the points are safe in the spool); a batch ClickHouse refuses for good
goes to the dead letters with the reason.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from meterhouse.collector.deadletter import DeadLetters
from meterhouse.collector.identity import VERIFY, Verifier
from meterhouse.collector.model import BATCH_COLUMNS, DIST_BATCH_COLUMNS, Blocks, PointBatch, content_digest
from meterhouse.collector.spool import Group, Spool, encode_blocks
from meterhouse.core import native, schema
from meterhouse.core.metrics import PipelineMetrics

log = logging.getLogger("meterhouse.writer")

#: ClickHouse error codes that no retry can fix: the data itself is refused.
PERMANENT_CODES = frozenset({6, 27, 38, 41, 43, 53, 69, 70, 72, 117, 131, 190})
#: Overload and availability: the server refuses now and will take the same batch later, however often it
#: failed (TIMEOUT_EXCEEDED, SOCKET_TIMEOUT, NETWORK_ERROR, TOO_MANY_SIMULTANEOUS_QUERIES,
#: NO_FREE_CONNECTION, MEMORY_LIMIT_EXCEEDED, TABLE_IS_READ_ONLY, TOO_MANY_PARTS, CANNOT_SCHEDULE_TASK,
#: ALL_CONNECTION_TRIES_FAILED, KEEPER_EXCEPTION).
TRANSIENT_CODES = frozenset({159, 209, 210, 202, 203, 241, 242, 252, 439, 279, 999})
_CODE = re.compile(r"Code:\s*(\d+)")


class PermanentError(Exception):
    """An insert that can never succeed as it is."""


def classify(exc: BaseException) -> str:
    """``permanent`` (dead-letter at once), ``transient`` (retry for as long as it takes: overload or
    outage) or ``retryable`` (unknown: retried, and dead-lettered only after repeated failures on an
    endpoint that is otherwise healthy)."""
    if isinstance(exc, PermanentError | TypeError | OverflowError):
        return "permanent"
    m = _CODE.search(str(exc))
    if m and int(m.group(1)) in PERMANENT_CODES:
        return "permanent"
    if (m and int(m.group(1)) in TRANSIENT_CODES) or isinstance(exc, ConnectionError | TimeoutError):
        return "transient"
    return "retryable"


def merge(
    batches: list[PointBatch], token: str, seq: int = 0
) -> tuple[list[list[Any]] | None, list[list[Any]] | None]:
    """The batches' columns per table, concatenated, each with its ``batch_id`` and ``batch_seq``."""

    def one(attr: str, size_attr: str, names: tuple[str, ...], suffix: str) -> list[list[Any]] | None:
        parts = [b for b in batches if getattr(b, size_attr)]
        if not parts:
            return None
        if len(parts) == 1:
            columns = [getattr(parts[0], attr)[name] for name in names]
        else:
            columns = [[v for b in parts for v in getattr(b, attr)[name]] for name in names]
        rows = sum(getattr(b, size_attr) for b in parts)
        columns.append([token + suffix] * rows)
        columns.append([seq] * rows)
        return columns

    return one("columns", "size", BATCH_COLUMNS, ":n"), one(
        "dist_columns", "dist_size", DIST_BATCH_COLUMNS, ":d"
    )


NUMBER_NAMES = (*BATCH_COLUMNS, "batch_id", "batch_seq")
DIST_NAMES = (*DIST_BATCH_COLUMNS, "batch_id", "batch_seq")


def stamp(block: bytes, rows: int, batch_id: str, seq: int) -> bytes:
    """A record's block with the group's ``batch_id`` and ``batch_seq`` columns."""
    block = native.with_constant(block, rows, "batch_id", "String", batch_id)
    return native.with_constant(block, rows, "batch_seq", "UInt64", seq)


def merge_blocks(blocks: list[Blocks], token: str, seq: int = 0) -> tuple[bytes, bytes]:
    """The records' Native blocks per table, each with its ``batch_id`` and ``batch_seq`` columns, one
    after another (an INSERT reads any number of blocks; ClickHouse squashes them into parts)."""
    numbers = b"".join(stamp(b.numbers, b.size, token + ":n", seq) for b in blocks if b.size)
    dists = b"".join(stamp(b.dists, b.dist_size, token + ":d", seq) for b in blocks if b.dist_size)
    return numbers, dists


def _encoded(names: Sequence[str], types: Sequence[str], columns: list[list[Any]] | None) -> bytes:
    return native.encode(names, types, columns) if columns else b""


def insert_calls(
    store: Any,
    token: str,
    seq: int = 0,
    *,
    blocks: list[Blocks] | None = None,
    batches: list[PointBatch] | None = None,
) -> list[tuple[str, Callable[[bool], None]]]:
    """The inserts of one group per table ("n" numbers, "d" distributions), as calls to make; a call
    given ``True`` inserts a group that may have landed before (``Store.insert_in_doubt``).

    ClickHouse keys a token's deduplication by the blocks the insert holds (a repeat that holds its rows
    in other blocks is not dropped), so a repeat must send what the first try sent: ``blocks``, the
    records' Native blocks one after another (spool format 3), or ``batches``, their columns merged into
    one block per table (what the writer of spool formats 1-2 sent, through ``Store.insert_points``).
    ``seq`` is the group's ``batch_seq`` (0 for a dead letter's redrive, which the token alone guards)."""
    calls: list[tuple[str, Callable[[bool], None]]] = []
    if blocks is not None:
        numbers, dists = merge_blocks(blocks, token, seq)
        shaped = [("n", NUMBER_NAMES, numbers), ("d", DIST_NAMES, dists)]
    else:
        n_cols, d_cols = merge(batches or [], token, seq)
        shaped = [
            ("n", schema.INGEST_COLUMN_NAMES,
             _encoded(schema.INGEST_COLUMN_NAMES, schema.INGEST_COLUMN_TYPES, n_cols)),
            ("d", schema.DIST_INGEST_COLUMN_NAMES,
             _encoded(schema.DIST_INGEST_COLUMN_NAMES, schema.DIST_INGEST_COLUMN_TYPES, d_cols)),
        ]  # fmt: skip
    for kind, names, block in shaped:
        if not block:
            continue

        def call(doubt: bool, kind: str = kind, names: Sequence[str] = names, block: bytes = block) -> None:
            suffix = f"{token}:{kind}"
            if doubt and hasattr(store, "insert_in_doubt"):
                store.insert_in_doubt(kind, names, block, suffix, seq)
            elif not token.startswith(schema.LEDGER_TOKEN_PREFIX) and hasattr(store, "insert_earlier"):
                store.insert_earlier(kind, names, block, suffix)  # a group an earlier version began
            else:
                store.insert_native(schema.INGEST_OF[kind], names, block, suffix)

        calls.append((kind, call))
    return calls


def redrive_letter(store: Any, batches: list[PointBatch], token: str, per_batch_blocks: bool) -> None:
    """Insert a dead letter's batches again under its token, in the blocks the writer sent them in
    (one per batch, or merged into one): what ClickHouse needs to drop an insert that did land."""
    if per_batch_blocks:
        calls = insert_calls(store, token, blocks=[encode_blocks(b) for b in batches])
    else:
        calls = insert_calls(store, token, batches=batches)
    for _table, insert in calls:
        insert(False)


def _remaining(batches: list[PointBatch], done: set[str]) -> list[PointBatch]:
    """The batches without the tables already inserted (a dead letter holds only what is not in)."""
    if not done:
        return batches
    out = []
    for b in batches:
        cols, size = (PointBatch.empty(), 0) if "n" in done else (b.columns, b.size)
        dist, dist_size = (PointBatch.empty_dist(), 0) if "d" in done else (b.dist_columns, b.dist_size)
        if size or dist_size:
            out.append(PointBatch(cols, size, b.digest, b.received_ns, dist, dist_size))
    return out


class Writer:
    """Spool → ClickHouse, one thread."""

    def __init__(
        self,
        spool: Spool,
        store: Any,  # a Store or the failover EndpointSet (insert_points, insert_distributions)
        metrics: PipelineMetrics,
        dead_letters: DeadLetters,
        *,
        flush_interval_s: float = 1.0,
        flush_max_points: int = 50_000,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        poison_after_attempts: int = 10,
        before_commit: Callable[[list[Blocks]], None] | None = None,
    ) -> None:
        self.spool = spool
        self.store = store  # a Store, or an EndpointSet that fails over
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.flush_interval_s = flush_interval_s
        self.flush_max_points = flush_max_points
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.poison_after_attempts = poison_after_attempts
        # Called after an insert and before the spool forgets its records (the dedup digests sync).
        self.before_commit = before_commit
        self.verifier = Verifier(store)
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self.last_error = ""

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meterhouse-writer", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        """Write what is spooled until ``timeout_s`` runs out; the rest stays in the spool. Idempotent."""
        self._deadline = min(self._deadline, time.monotonic() + timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """A supervised loop: any error outside the insert (loading, the intent, the commit) is counted,
        logged and retried with backoff; the group stays in flight, so nothing is skipped."""
        errors = 0
        while not (self._stop.is_set() and time.monotonic() >= self._deadline):
            try:
                group = self.spool.next_group(self.flush_max_points, self.flush_interval_s, self._stop)
                if group is None:
                    return
                if not self.write(group):
                    return  # shutting down with the group still spooled
                errors = 0
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one error
                errors += 1
                self.metrics.writer_errors.inc()
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.error("writer error, will retry", extra={"error": self.last_error, "in_a_row": errors})
                if not self._backoff(min(errors, 8)):
                    return

    def write(self, group: Group) -> bool:
        """Insert one group; True once it is committed or dead-lettered. Each table's insert is marked
        in the spool once done, so a retry, a replay or a dead letter covers only what is left."""
        batches = [self.spool.blocks(r) for r in group.records]
        verified: list[PointBatch] | None = None
        if any(b.verify for b in batches):
            verified = self._verify(group, batches)
            batches = [encode_blocks(b) for b in verified]
        token = group.token
        # In doubt: the group may have landed, in part, before (its intent is from before a restart, or
        # a try failed). The ledger (``schema.SEQ_COLUMN``) answers for groups whose intent says so.
        doubt = token is not None and token.startswith(schema.LEDGER_TOKEN_PREFIX)
        if token is None:
            token = schema.LEDGER_TOKEN_PREFIX + content_digest(*(b.digest.encode() for b in batches))
            self.spool.intent(group, token)
        elif group.damaged and not doubt:
            self._skip_landed(group, token)
        inserts = self._inserts(group, batches, token)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                for table, insert in inserts:
                    if table not in group.done:
                        insert(doubt)
                        self.spool.part(group, table)
                break
            except Exception as e:  # noqa: BLE001 - classified below
                doubt = token.startswith(schema.LEDGER_TOKEN_PREFIX)
                self.metrics.insert_failures.inc()
                error = f"{type(e).__name__}: {e}"[:1000]
                kind = classify(e)
                healthy = self.store.active_healthy() if hasattr(self.store, "active_healthy") else True
                poisoned = kind == "retryable" and healthy and attempt >= self.poison_after_attempts
                if kind == "permanent" or poisoned:
                    loaded = verified or [self.spool.load(r) for r in group.records]
                    per_batch = all(r.version >= 3 for r in group.records)  # as _inserts sent it
                    self._dead_letter(group, _remaining(loaded, group.done), token, error, per_batch)
                    return True
                extra = {"attempt": attempt, "error": error[:300], "endpoint": self.store.name}
                log.warning("insert failed, will retry", extra=extra)
                if not self._backoff(attempt):
                    return False
                self.metrics.insert_retries.inc()
        self.metrics.insert_duration.observe(time.perf_counter() - started)
        if self.before_commit is not None:
            self.before_commit(batches)
        self.spool.commit(group)
        self._committed(batches)
        return True

    def _verify(self, group: Group, batches: list[Blocks]) -> list[PointBatch]:
        """The group's records without the points the edge flagged whose identity is already stored
        (``collector/identity.py``). Only rows of earlier groups count as stored, so a replay of this
        group after a crash drops the same points and inserts the same blocks."""
        decoded = [
            self.spool.load_flagged(r, b) if b.verify else (self.spool.load(r), [], [])
            for r, b in zip(group.records, batches, strict=True)
        ]
        kept, dropped = self.verifier.filter(decoded, group.last)
        checked = sum(n.count(VERIFY) + d.count(VERIFY) for _b, n, d in decoded)
        m = self.metrics.points_identity_checked
        m.labels(outcome="repeat").inc(dropped)
        m.labels(outcome="new").inc(checked - dropped)
        if dropped:
            extra = {"points": dropped, "checked": checked, "records": len(group.records)}
            log.info("points already stored dropped by identity", extra=extra)
        return kept

    def _skip_landed(self, group: Group, token: str) -> None:
        """A replay group that lost records to damage: a table whose raw points already hold the batch
        is done (its insert landed before the crash); only the rest is inserted."""
        for table, raw in schema.RAW_OF.items():
            if table in group.done:
                continue
            if self.store.scalar(
                schema.batch_landed_sql(self.store.database, table), {"b": f"{token}:{table}"}
            ):
                log.warning("replay: a damaged group's insert had landed; not inserted again",
                            extra={"table": raw, "records": len(group.records)})  # fmt: skip
                self.spool.part(group, table)

    def _inserts(
        self, group: Group, batches: list[Blocks], token: str
    ) -> list[tuple[str, Callable[[bool], None]]]:
        """The group's inserts as the first try sent them (see :func:`insert_calls`): a group holding any
        record of spool formats 1-2 as merged columns, a format 3 group as the records' blocks."""
        if any(r.version < 3 for r in group.records):
            return insert_calls(
                self.store, token, group.last, batches=[self.spool.load(r) for r in group.records]
            )
        return insert_calls(self.store, token, group.last, blocks=batches)

    def _committed(self, batches: list[Blocks]) -> None:
        now_ns = time.time_ns()
        self.metrics.points_written.inc(sum(b.total for b in batches))
        self.metrics.last_commit.set(now_ns / 1e9)
        for b in batches:
            self.metrics.ingest_lag.observe(max(0.0, (now_ns - b.received_ns) / 1e9))

    def _dead_letter(
        self, group: Group, batches: list[PointBatch], token: str, error: str, per_batch_blocks: bool
    ) -> None:
        path = self.dead_letters.put(token, error, batches, per_batch_blocks)
        points = sum(b.total for b in batches)
        self.metrics.dead_letter_batches.inc()
        self.metrics.dead_letter_points.inc(points)
        log.error("batch refused by ClickHouse, kept as a dead letter",
                  extra={"file": path.name, "points": points, "error": error[:300]})  # fmt: skip
        record = getattr(self.store, "record_event", None)
        if record is not None:
            record("dead_letter", self.store.name, path.name, error[:500], f"points={points}")
        self.spool.commit(group)

    def _backoff(self, attempt: int) -> bool:
        """Wait with full jitter; False once shutting down past the deadline."""
        delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
        if self._stop.is_set():
            if self._deadline - time.monotonic() <= delay:
                return False
            time.sleep(delay)
        else:
            self._stop.wait(delay)  # shutdown cuts the wait short; the next try is the flush
        return True
