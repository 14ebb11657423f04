"""The sink: buffers decoded batches and writes them to ClickHouse column-oriented, in bulk.

A flush happens when ``flush_max_points`` are buffered or the oldest buffered point has waited
``flush_interval_s``. Each insert carries a deterministic deduplication token derived from the contents
of the requests it merges, so a retry of the same insert counts once. Failed inserts are retried with
exponential backoff and jitter; after the last attempt the batch's acks fail and the receivers answer
retryable, so the client sends again (nothing acknowledged is lost).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque

from meterhouse.collector.model import (
    BATCH_COLUMNS,
    DIST_BATCH_COLUMNS,
    Ack,
    Backpressure,
    PointBatch,
    content_digest,
)
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Store

log = logging.getLogger("meterhouse.writer")


class BatchWriter:
    """Buffer → merged column-oriented insert → acks. One thread; bounded buffer."""

    def __init__(
        self,
        store: Store,
        metrics: PipelineMetrics,
        *,
        flush_interval_s: float = 1.0,
        flush_max_points: int = 50_000,
        max_pending_points: int = 2_000_000,
        insert_attempts: int = 5,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.flush_interval_s = flush_interval_s
        self.flush_max_points = flush_max_points
        self.max_pending_points = max_pending_points
        self.insert_attempts = insert_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._queue: deque[tuple[PointBatch, Ack, float]] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._deadline = float("inf")
        self.healthy = True

    # -- consumer -------------------------------------------------------------------------------
    def consume(self, batch: PointBatch) -> Ack:
        ack = Ack()
        size = batch.total
        if size == 0:
            ack.succeed()
            return ack
        with self._cond:
            if self._stopping.is_set():
                raise Backpressure("shutting down")
            if self._pending + size > self.max_pending_points and self._pending > 0:
                raise Backpressure(f"{self._pending} points pending, limit {self.max_pending_points}")
            # Wake the writer when its timer starts (first batch) or a flush is due (size).
            wake = not self._queue or self._pending + size >= self.flush_max_points
            self._queue.append((batch, ack, time.monotonic()))
            self._pending += size
            self.metrics.pending_points.set(self._pending)
            if wake:
                self._cond.notify()
        return ack

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meterhouse-writer", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        """Flush what is buffered, within ``timeout_s``; idempotent and safe without start."""
        self._deadline = time.monotonic() + timeout_s
        with self._cond:
            self._stopping.set()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(max(timeout_s, 0.1))
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
            self._pending = 0
        for _, ack, _ in leftover:
            ack.fail("shut down before the points were written")

    # -- work -----------------------------------------------------------------------------------
    def _take(self) -> list[tuple[PointBatch, Ack, float]]:
        """Wait for a flush condition, then take up to ``flush_max_points`` (at least one batch)."""
        with self._cond:
            while True:
                if self._queue:
                    age = time.monotonic() - self._queue[0][2]
                    if (
                        self._pending >= self.flush_max_points
                        or age >= self.flush_interval_s
                        or self._stopping.is_set()
                    ):
                        break
                    self._cond.wait(self.flush_interval_s - age)
                elif self._stopping.is_set():
                    return []
                else:
                    self._cond.wait()
            taken, n = [], 0
            while self._queue and (not taken or n + self._queue[0][0].total <= self.flush_max_points):
                item = self._queue.popleft()
                taken.append(item)
                n += item[0].total
            self._pending -= n
            self.metrics.pending_points.set(self._pending)
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                return
            self._write([b for b, _, _ in taken], [a for _, a, _ in taken])

    def _write(self, batches: list[PointBatch], acks: list[Ack]) -> None:
        token = content_digest(*(b.digest.encode() for b in batches))
        inserts = []
        numbers = _merge(batches, "columns", "size", BATCH_COLUMNS, f"{token}:n")
        if numbers:
            inserts.append((self.store.insert_points, numbers, f"{token}:n"))
        dists = _merge(batches, "dist_columns", "dist_size", DIST_BATCH_COLUMNS, f"{token}:d")
        if dists:
            inserts.append((self.store.insert_distributions, dists, f"{token}:d"))
        for insert, columns, tok in inserts:
            error = self._insert_with_retries(insert, columns, tok)
            if error is not None:
                # Parts already inserted carry their tokens: the client's retry counts them once.
                self.metrics.insert_failures.inc()
                for ack in acks:
                    ack.fail(error)
                return
        now_ns = time.time_ns()
        self.metrics.points_written.inc(sum(b.total for b in batches))
        self.metrics.last_commit.set(now_ns / 1e9)
        for b in batches:
            self.metrics.ingest_lag.observe(max(0.0, (now_ns - b.received_ns) / 1e9))
        for ack in acks:
            ack.succeed()

    def _insert_with_retries(self, insert, columns: list[list], token: str) -> str | None:
        error = "not attempted"
        for attempt in range(1, self.insert_attempts + 1):
            started = time.perf_counter()
            try:
                insert(columns, token)
            except Exception as e:  # noqa: BLE001 - classified by retrying, then failing retryably
                error = f"{type(e).__name__}: {e}"[:500]
                self.healthy = False
                log.warning(
                    "insert failed", extra={"attempt": attempt, "error": error, "endpoint": self.store.name}
                )
                if attempt == self.insert_attempts or not self._backoff(attempt):
                    return error
                self.metrics.insert_retries.inc()
                continue
            self.metrics.insert_duration.observe(time.perf_counter() - started)
            self.healthy = True
            return None
        return error

    def _backoff(self, attempt: int) -> bool:
        """Wait with full jitter; False when shutting down and the deadline would pass first."""
        delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
        if self._stopping.is_set():
            if self._deadline - time.monotonic() <= delay:
                return False
            time.sleep(delay)
        else:
            self._stopping.wait(delay)  # shutdown cuts the wait short; the next try is the flush
        return True


def _merge(
    batches: list[PointBatch], attr: str, size_attr: str, names: tuple[str, ...], token: str
) -> list[list] | None:
    """The batches' columns of one table, concatenated, with the ``batch_id`` column appended."""
    parts = [b for b in batches if getattr(b, size_attr)]
    if not parts:
        return None
    if len(parts) == 1:
        columns = [getattr(parts[0], attr)[name] for name in names]
    else:
        columns = [[v for b in parts for v in getattr(b, attr)[name]] for name in names]
    columns.append([token] * sum(getattr(b, size_attr) for b in parts))
    return columns
