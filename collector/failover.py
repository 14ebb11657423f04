"""Endpoint failover: writes go to the first healthy ClickHouse endpoint in priority order.

Consecutive failures of the active endpoint (inserts, or health checks) move writing to the next
healthy endpoint; a higher-priority endpoint that has stayed healthy for the hold-down moves it back,
so a flapping replica does not drag writes back and forth. Every switch is a failover event: a row in
``pipeline_events``, a structured log line and ``meterhouse_failovers_total{from_endpoint,to_endpoint}``.

:class:`EndpointSet` offers the :class:`~meterhouse.core.store.Store` interface, so the writer and the
cumulative state read and write through whichever endpoint is active. The API and org health read through
:meth:`EndpointSet.reads`, a view with health of its own: a failing read query never marks an endpoint
down for the writer, so reads cannot take writes down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterhouse.core import schema
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Blocks, SchemaMismatch, Store, endpoint_label, is_embedded

log = logging.getLogger("meterhouse.failover")


class NoEndpoint(ConnectionError):
    """No ClickHouse endpoint is reachable."""


@dataclass
class Endpoint:
    url: str
    label: str
    store: Store | None = None
    up: bool = False
    failures: int = 0
    up_since: float | None = None
    schema_ready: bool = False
    error: str = ""  # why the last check failed (the label, not the URL, names the endpoint)


class EndpointSet:
    """Stores in priority order with one active; health-checked in the background."""

    def __init__(
        self,
        urls: Sequence[str],
        connect: Callable[[str], Store],
        metrics: PipelineMetrics,
        database: str,
        *,
        failover_after_failures: int = 3,
        failback_hold_s: float = 30.0,
        health_check_interval_s: float = 2.0,
    ) -> None:
        self.endpoints = [Endpoint(u, endpoint_label(u)) for u in urls]
        self._connect = connect
        self.metrics = metrics
        self.database = database
        self.failover_after_failures = failover_after_failures
        self.failback_hold_s = failback_hold_s
        self.health_check_interval_s = health_check_interval_s
        self.active = 0
        self.name = self.endpoints[0].label
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events: list[tuple[int, str, str, str, str, str]] = []  # waiting to be written
        for ep in self.endpoints:
            metrics.endpoint_up.labels(endpoint=ep.label).set(0)
            metrics.endpoint_active.labels(endpoint=ep.label).set(0)
        metrics.endpoint_active.labels(endpoint=self.name).set(1)
        # Every possible switch starts at 0, so the first failover is an increase Prometheus can see.
        for a in self.endpoints:
            for b in self.endpoints:
                if a is not b:
                    metrics.failovers.labels(from_endpoint=a.label, to_endpoint=b.label)
        metrics.active_endpoint_priority.set(0)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.check_all()
        with self._lock:
            first_up = next((i for i, ep in enumerate(self.endpoints) if ep.up), None)
            if first_up is not None and first_up != self.active:
                self._switch(first_up, "active endpoint unreachable at start")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="health-checks", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._write_events()
        for ep in self.endpoints:
            if ep.store is not None:
                ep.store.close()

    def _run(self) -> None:
        while not self._stop.wait(self.health_check_interval_s):
            self.check_all()
            self._rebalance()
            self._write_events()

    # -- health ---------------------------------------------------------------------------------
    def _store(self, ep: Endpoint) -> Store:
        if ep.store is None:
            ep.store = self._connect(ep.url)
        if not ep.schema_ready:
            ep.store.ensure_schema()
            ep.schema_ready = True
        return ep.store

    def _probe(self, ep: Endpoint) -> bool:
        try:
            store = self._store(ep)
            if not store.ping():
                raise ConnectionError("ping failed")
            return True
        except SchemaMismatch as e:  # a configuration error: said loudly, and the endpoint stays down
            ep.error = str(e)[:500]
            log.error("endpoint refused", extra={"endpoint": ep.label, "error": ep.error})
            return False
        except Exception as e:  # noqa: BLE001 - any failure means down
            ep.error = f"{type(e).__name__}: {e}"[:300]
            log.debug("health check failed", extra={"endpoint": ep.label, "error": ep.error})
            return False

    def check_all(self) -> None:
        for ep in self.endpoints:
            ok = self._probe(ep)
            with self._lock:
                self._mark(ep, ok)

    def _mark(self, ep: Endpoint, ok: bool) -> None:
        if ok:
            ep.failures = 0
            if not ep.up:
                ep.up, ep.up_since = True, time.monotonic()
                log.info("endpoint up", extra={"endpoint": ep.label})
        else:
            ep.failures += 1
            if ep.up and ep.failures >= self.failover_after_failures:
                ep.up, ep.up_since = False, None
                log.warning("endpoint down", extra={"endpoint": ep.label, "failures": ep.failures})
        self.metrics.endpoint_up.labels(endpoint=ep.label).set(1 if ep.up else 0)

    def _rebalance(self) -> None:
        with self._lock:
            active = self.endpoints[self.active]
            for i, ep in enumerate(self.endpoints):
                if i >= self.active:
                    break
                if (
                    ep.up
                    and ep.up_since is not None
                    and time.monotonic() - ep.up_since >= self.failback_hold_s
                ):
                    self._switch(i, f"{ep.label} healthy for {self.failback_hold_s:g}s (failback)")
                    return
            if not active.up and active.failures >= self.failover_after_failures:
                self._failover(f"{active.label} failed {active.failures} times")

    def _failover(self, reason: str) -> bool:
        """Move to the first healthy endpoint other than the active one; False when there is none."""
        for i, ep in enumerate(self.endpoints):
            if i != self.active and ep.up:
                self._switch(i, reason)
                return True
        return False

    def _switch(self, to: int, reason: str) -> None:
        old, new = self.endpoints[self.active], self.endpoints[to]
        self.active, self.name = to, new.label
        self.metrics.endpoint_active.labels(endpoint=old.label).set(0)
        self.metrics.endpoint_active.labels(endpoint=new.label).set(1)
        self.metrics.active_endpoint_priority.set(to)
        self.metrics.failovers.labels(from_endpoint=old.label, to_endpoint=new.label).inc()
        kind = "failback" if to < self.endpoints.index(old) else "failover"
        log.warning(kind, extra={"event": kind, "from_endpoint": old.label, "to_endpoint": new.label,
                                 "reason": reason})  # fmt: skip
        self.record_event(kind, old.label, new.label, reason)

    # -- events ---------------------------------------------------------------------------------
    def record_event(self, kind: str, source: str, target: str, reason: str, details: str = "") -> None:
        """Queue a pipeline event; it is written to the active endpoint as soon as one answers."""
        with self._lock:
            self._events.append((time.time_ns() // 10**6, kind, source, target, reason, details))

    def _write_events(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return
        try:
            store = self._store(self.endpoints[self.active])
            cols = [list(c) for c in zip(*events, strict=True)]
            store.client.insert(
                f"{self.database}.{schema.EVENTS_TABLE}", cols,
                column_names=["time", "kind", "source", "target", "reason", "details"],
                column_type_names=["DateTime64(3, 'UTC')", "String", "String", "String", "String", "String"],
                column_oriented=True,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - kept for the next round
            with self._lock:
                self._events[:0] = events

    # -- the Store interface --------------------------------------------------------------------
    def _call(self, fn: Callable[[Store], Any], write: bool) -> Any:
        with self._lock:
            ep = self.endpoints[self.active]
        try:
            result = fn(self._store(ep))
        except Exception:
            with self._lock:
                self._mark(ep, False)
                if ep.failures >= self.failover_after_failures:
                    self._failover(f"{ep.label}: {ep.failures} consecutive failures")
            raise
        if write and ep.failures:
            with self._lock:
                self._mark(ep, True)
        return result

    def reads(self) -> ReadView:
        """The endpoint set as the API and org health see it (separate health, same routing)."""
        return ReadView(self)

    def insert_points(self, columns: Sequence[Sequence[Any]], token: str) -> None:
        self._call(lambda s: s.insert_points(columns, token), write=True)

    def insert_native(self, table: str, names: Sequence[str], block: bytes, token: str) -> None:
        self._call(lambda s: s.insert_native(table, names, block, token), write=True)

    def insert_in_doubt(
        self,
        kind: str,
        names: Sequence[str],
        block: bytes,
        token: str,
        seq: int,
        landed: Mapping[str, Iterable[str]] | None = None,
    ) -> list[str]:
        done: list[str] = self._call(
            lambda s: s.insert_in_doubt(kind, names, block, token, seq, landed), write=True
        )
        return done

    def landed(self, kind: str, seq: int) -> dict[str, set[str]] | None:
        found: dict[str, set[str]] | None = self._call(lambda s: s.landed(kind, seq), write=False)
        return found

    def insert_earlier(self, kind: str, names: Sequence[str], block: bytes, token: str) -> None:
        self._call(lambda s: s.insert_earlier(kind, names, block, token), write=True)

    @property
    def embedded(self) -> bool:
        """The embedded engine (one endpoint, in this process): its ledger and derived rows apply."""
        return len(self.endpoints) == 1 and is_embedded(self.endpoints[0].url)

    def max_batch_seq(self) -> int:
        seq: int = self._call(lambda s: s.max_batch_seq(), write=False)
        return seq

    def insert_distributions(self, columns: Sequence[Sequence[Any]], token: str) -> None:
        self._call(lambda s: s.insert_distributions(columns, token), write=True)

    def insert_rows(
        self,
        table: str,
        columns: Sequence[Sequence[Any]],
        names: Sequence[str],
        types: Sequence[str],
        token: str,
    ) -> None:
        self._call(lambda s: s.insert_rows(table, columns, names, types, token), write=True)

    def sync_replicas(self, tables: Sequence[str]) -> None:
        self._call(lambda s: s.sync_replicas(tables), write=False)

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._call(lambda s: s.rows(sql, parameters), write=False)
        return rows

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        rows = self.rows(sql, parameters)
        return rows[0][0] if rows else None

    def ping(self) -> bool:
        with self._lock:
            return self.endpoints[self.active].up

    def active_healthy(self) -> bool:
        """Whether the active endpoint answered its last check (a retry there may succeed)."""
        with self._lock:
            return self.endpoints[self.active].up

    def close(self) -> None:
        self.shutdown(1.0)


class ReadView:
    """Queries for the API and org health: routed to the writer's active endpoint (the freshest data),
    with failures counted here only. A broken or slow query is the reader's problem, not the writer's."""

    def __init__(self, endpoints: EndpointSet) -> None:
        self._set = endpoints
        self.database = endpoints.database
        self.failures = 0  # consecutive failed reads (for logs and tests; never fails writes over)

    @property
    def name(self) -> str:
        return self._set.name

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            result = self.active_store().rows(sql, parameters)
        except Exception:
            self.failures += 1
            raise
        self.failures = 0
        return result

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        rows = self.rows(sql, parameters)
        return rows[0][0] if rows else None

    def active_store(self) -> Store:
        """The active endpoint's Store (the reads here go to it; so does a maintenance command that writes
        there: a rollup rebuild)."""
        with self._set._lock:
            ep = self._set.endpoints[self._set.active]
        return self._set._store(ep)

    @contextlib.contextmanager
    def stream(
        self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> Iterator[Blocks]:
        """A streamed read (the bulk export) on the active endpoint, on a client of its own
        (:meth:`Store.stream`); a failure to start it counts as a failed read."""
        with contextlib.ExitStack() as opened:
            try:
                blocks = opened.enter_context(self.active_store().stream(sql, parameters, settings))
            except Exception:
                self.failures += 1
                raise
            self.failures = 0
            yield blocks

    def sync_replicas(self, tables: Sequence[str]) -> None:
        """Before a read that must see every acknowledged write (a monthly close), on the active endpoint."""
        self.active_store().sync_replicas(tables)

    def ping(self) -> bool:
        """Readiness is the write path's (the pipeline's) health."""
        return self._set.ping()

    def insert_rows(
        self,
        table: str,
        columns: Sequence[Sequence[Any]],
        names: Sequence[str],
        types: Sequence[str],
        token: str,
    ) -> None:
        """A write from the API (a monthly close) goes the write path's way, with its health."""
        self._set.insert_rows(table, columns, names, types, token)
