"""Transport-independent handling of one OTLP export: decode, count, hand on, wait until durable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from meterhouse.collector.auth import IngestTokens, Principal
from meterhouse.collector.budget import Busy, Hold, TooCostly
from meterhouse.collector.cumulative import Change, CumulativeState, Entry, StateUnavailable
from meterhouse.collector.decode import (
    DecodeResult,
    Limits,
    RejectSample,
    count_wire_points,
    decode_request,
    python_cost,
)
from meterhouse.collector.dedup import RecentRequests
from meterhouse.collector.model import Backpressure, Consumer, content_digest
from meterhouse.collector.ratelimit import RateLimiter
from meterhouse.collector.rejectlog import RejectLog
from meterhouse.collector.series import Candidate, Loader, Pair, Present, SeriesLimiter
from meterhouse.collector.spool import RecordTooLarge, Spool, SpoolError
from meterhouse.core import schema
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Queries

log = logging.getLogger("meterhouse.ingest")


def restore_cumulative(state: CumulativeState, spool: Spool) -> int:
    """Rebuild the conversion state of series with uncommitted points from the spool (before receivers
    start), so a new point is never converted against ClickHouse while an earlier one waits in the spool."""
    return state.restore((r.seq, spool.load(r)) for r in spool.uncommitted_records())


def committed_state_loader(store: Queries, cluster: str = "") -> Callable[[list[int]], dict[int, Entry]]:
    """Read the last committed point of cumulative series from ClickHouse (see cumulative.py); on a
    ``cluster``, from every replica (see ``schema.series_state_sql``)."""
    sql = schema.series_state_sql(store.database, cluster)

    def load(ids: list[int]) -> dict[int, Entry]:
        rows = store.rows(sql, {"ids": ids})
        return {
            int(sid): Entry(int(start), int(t), int(vi) if is_int else float(vd))
            for sid, start, t, is_int, vi, vd in rows
        }

    return load


def with_dead_letters(
    load: Callable[[list[int]], dict[int, Entry]], letters: Callable[[list[int]], dict[int, Entry]]
) -> Callable[[list[int]], dict[int, Entry]]:
    """The conversion state of series as committed (``load``) or dead-lettered (``letters``: what
    ``DeadLetters.cumulative`` holds), the newest point of each: a point the server refused is still
    acknowledged, and the series' next delta starts where it ended."""

    def merged(ids: list[int]) -> dict[int, Entry]:
        found = load(ids)
        for sid, e in letters(ids).items():
            if sid not in found or e.time_ns > found[sid].time_ns:
                found[sid] = e
        return found

    return merged


def attribute_sets_loader(store: Queries, limit: int) -> Loader:
    """Read the attribute sets already stored for (org, metric) pairs (see series.py)."""
    sql = schema.attribute_sets_sql(store.database)

    def load(pairs: list[Pair]) -> dict[Pair, list[tuple[Sequence[str], Sequence[str]]]]:
        wanted = set(pairs)
        rows = store.rows(
            sql,
            {"orgs": sorted({o for o, _ in pairs}), "metrics": sorted({m for _, m in pairs}), "n": limit + 1},
        )
        found: dict[Pair, list[tuple[Sequence[str], Sequence[str]]]] = {}
        for org, metric, keys, values in rows:
            if (org, metric) in wanted:
                found.setdefault((org, metric), []).append((list(keys), list(values)))
        return found

    return load


def attribute_sets_present(store: Queries) -> Present:
    """Ask which candidate sets are stored (see series.py: a stored set is never folded)."""
    sql = schema.attribute_sets_present_sql(store.database)

    def present(candidates: list[Candidate]) -> set[Candidate]:
        params = {"orgs": sorted({p[0] for p, _, _ in candidates}),
                  "metrics": sorted({p[1] for p, _, _ in candidates}),
                  "values": [list(v) for v in {v for _, _, v in candidates}]}  # fmt: skip
        stored = {((o, m), tuple(k), tuple(v)) for o, m, k, v in store.rows(sql, params)}
        return stored & set(candidates)

    return present


def count_points(request: ExportMetricsServiceRequest) -> int:
    """Data points in a request, without decoding them (what the rate limit counts)."""
    n = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                if which is not None:
                    n += len(getattr(m, which).data_points)
    return n


def _too_many_points(n: int, limit: int) -> Outcome:
    return Outcome(
        "too_large",
        f"request of {n} data points exceeds the limit of {limit}; send smaller batches (an "
        "OpenTelemetry Collector: the batch processor's send_batch_max_size)",
    )


def _invalid(e: BaseException) -> Outcome:
    return Outcome("invalid", f"cannot parse ExportMetricsServiceRequest: {str(e)[:300] or type(e).__name__}")


def _parse(body: bytes | None) -> ExportMetricsServiceRequest | Outcome:
    request = ExportMetricsServiceRequest()
    try:
        request.ParseFromString(body or b"")
    except (DecodeError, RecursionError, ValueError) as e:
        return _invalid(e)
    return request


@dataclass
class Outcome:
    """What to answer: ``kind`` is one of the request outcomes in core.metrics."""

    kind: str
    message: str = ""
    response: ExportMetricsServiceResponse | None = None
    retry_after_s: int = 0


class Ingestor:
    """(auth) → rate limit → (dedup) → decode (org scope, series limit) → spool.

    The answer is sent once the points are durable in the spool. Receivers call :meth:`authenticate`
    before reading a body, then :meth:`export` with the sender it returned.
    """

    def __init__(
        self,
        next_stage: Consumer,
        metrics: PipelineMetrics,
        limits: Limits,
        cumulative: CumulativeState | None = None,
        recent: RecentRequests | None = None,
        reject_log: RejectLog | None = None,
        resend_wait_s: float = 5.0,
        tokens: IngestTokens | None = None,
        rate: RateLimiter | None = None,
        series: SeriesLimiter | None = None,
    ) -> None:
        self.next = next_stage
        self.metrics = metrics
        self.limits = limits
        self.cumulative = cumulative
        self.recent = recent
        self.reject_log = reject_log if reject_log is not None else RejectLog()
        self.resend_wait_s = resend_wait_s  # how long a re-sent copy waits for its first copy
        self.tokens = tokens or IngestTokens()
        self.rate = rate
        self.series = series

    def authenticate(self, header: str | Sequence[str] | None) -> Principal | None:
        """The sender of a request's ``authorization`` value, or of all of them (None when ingest is open).

        Raises :class:`~meterhouse.collector.auth.Unauthenticated`: answer 401 / UNAUTHENTICATED.
        """
        return self.tokens.authenticate(header)

    def export(
        self,
        request: ExportMetricsServiceRequest | None,
        digest: str,
        sender: Principal | None = None,
        body: bytes | None = None,
        before_python: Callable[[], None] | None = None,
    ) -> Outcome:
        """Handle one export: ``request`` parsed, or None with ``body`` its protobuf bytes (decoded by the
        native fast path when it can, parsed otherwise; bytes protobuf refuses answer ``invalid``).
        ``before_python`` runs before a request is parsed for the Python walk (``decode_request``): the
        receiver's decode budget grows there, and its refusals are answered here."""
        m = self.metrics
        key = sender.id if sender is not None else ""
        points = 0
        if self.rate is not None:
            counted = count_wire_points(body) if request is None and body is not None else None
            if counted is not None:
                points = counted
            else:
                if request is None:
                    parsed = _parse(body)
                    if isinstance(parsed, Outcome):
                        return parsed
                    request = parsed
                points = count_points(request)
            wait_s = self.rate.take(key, points)
            if wait_s:
                m.limited_requests.labels(reason="ingest_rate").inc()
                return Outcome(
                    "rate_limited",
                    f"ingest rate limit of {self.rate.rate:g} points/s exceeded; retry in {wait_s}s",
                    retry_after_s=wait_s,
                )
        if sender is not None:
            # The same bytes from another sender are another request: its org scope may differ.
            digest = content_digest(digest.encode(), sender.id.encode())
        try:
            outcome = self._export(request, digest, sender, body, before_python)
        except BaseException:
            # A bug (answered 500 by the receiver): the claim must not outlive it, or every identical
            # re-send would be answered "being stored" for as long as the process runs.
            self._release(digest)
            raise
        if self.rate is not None and outcome.kind in ("backpressure", "unavailable"):
            self.rate.refund(key, points)  # nothing kept: the client sends it all again
        return outcome

    def export_body(self, body: bytes, sender: Principal | None, hold: Hold) -> Outcome:
        """:meth:`export` of protobuf bytes whose decode holds ``hold`` of the decode budget: the share
        grows to the Python walk's cost before the request takes it."""
        return self.export(
            None, content_digest(body), sender, body=body, before_python=lambda: hold.grow(python_cost(body))
        )

    def _export(
        self,
        request: ExportMetricsServiceRequest | None,
        digest: str,
        sender: Principal | None,
        body: bytes | None,
        before_python: Callable[[], None] | None = None,
    ) -> Outcome:
        m = self.metrics
        limit = self.limits.max_points_per_request
        counted = count_wire_points(body) if body is not None else None
        if counted is not None and counted > limit:  # refused before anything is decoded
            return _too_many_points(counted, limit)
        if self.recent is not None:
            state = self.recent.claim(digest, self.resend_wait_s)
            if state == "settled":
                # The same bytes are stored within the window (a client re-sent after a lost answer).
                m.requests_deduplicated.inc()
                return Outcome("ok", "", ExportMetricsServiceResponse())
            if state == "busy":
                # The first copy is still being stored: its fate is not known, so promise nothing.
                return Outcome(
                    "unavailable", "an identical request is being stored, retry later", retry_after_s=1
                )
        now = time.time_ns()
        try:
            result = decode_request(
                request,
                self.limits,
                now_ns=now,
                digest=digest,
                cumulative=self.cumulative,
                allowed_org=None if sender is None or sender.all_orgs else sender.allows,
                series=self.series,
                body=body if request is None else None,
                before_python=before_python,
            )
        except (DecodeError, RecursionError) as e:  # bytes protobuf refuses: nothing kept
            self._release(digest)
            return _invalid(e)
        except TooCostly as e:  # its Python walk costs more than the whole decode budget
            self._release(digest)
            return Outcome("too_large", str(e))
        except Busy as e:  # the decode budget stayed taken: nothing kept, the sender retries
            self._release(digest)
            return Outcome("backpressure", str(e), retry_after_s=1)
        except StateUnavailable as e:  # the cumulative state or attribute sets could not be read
            self._release(digest)
            log.warning("cannot decode request", extra={"error": str(e)[:300]})
            return Outcome(
                "unavailable", f"cannot read ingest state, retry later: {e}"[:500], retry_after_s=1
            )
        if result.received > limit:  # parsed requests (OTLP/JSON), or no native decoder
            self._forget(result, digest)
            return _too_many_points(result.received, limit)
        m.points_received.inc(result.received)
        try:
            seq = self.next.consume(result.batch)
        except (Backpressure, SpoolError, RecordTooLarge) as e:
            # Nothing of this request is kept: the client retries all of it (no rejections counted), or,
            # too large, is told it never will be stored (its points counted as rejected below).
            self._forget(result, digest)
            if isinstance(e, Backpressure):
                m.spool_full.inc()
                return Outcome("backpressure", f"pipeline is full: {e}", retry_after_s=e.retry_after_s)
            if isinstance(e, RecordTooLarge):
                # Refused for good: its points are never stored (counted and logged as rejected).
                m.points_rejected.labels(reason="request_too_large").inc(result.received)
                b = result.batch
                cols = b.columns if b.size else b.dist_columns
                org, metric = (cols["org_id"][0], cols["metric"][0]) if cols.get("metric") else ("", "")
                self.reject_log.record({("request_too_large", metric): RejectSample(result.received, org)})
                return Outcome("too_large", str(e))
            return Outcome("unavailable", str(e), retry_after_s=1)
        except Exception:
            # A bug: nothing was kept, so the conversion state and admitted sets go back as they were.
            self._undo(result.changes)
            if self.series is not None:
                self.series.rollback(result.admitted)
            raise
        if self.series is not None:
            self.series.settle(result.admitted)  # stored: its sets stay admitted
        if result.changes and self.cumulative is not None and isinstance(seq, int):
            self.cumulative.spooled(result.changes, seq)
        if self.recent is not None:
            self.recent.add(digest, now)
        for reason, n in result.rejected.items():
            m.points_rejected.labels(reason=reason).inc(n)
        for reason, n in result.repaired.items():
            m.points_repaired.labels(reason=reason).inc(n)
        if result.by_metric:
            self.reject_log.record(result.by_metric)
        if result.unattributed:
            m.points_unattributed.inc(result.unattributed)
        if result.folded:
            m.series_folded.inc(result.folded)
        response = ExportMetricsServiceResponse()
        if result.rejected:
            response.partial_success.rejected_data_points = result.rejected_count
            response.partial_success.error_message = result.error_message()
            return Outcome("partial", result.error_message(), response)
        return Outcome("ok", "", response)

    def _forget(self, result: DecodeResult, digest: str) -> None:
        """Nothing of a decoded request is kept: its conversion state, admitted sets and claim go back."""
        self._undo(result.changes)
        if self.series is not None:
            self.series.rollback(result.admitted)
        self._release(digest)

    def _release(self, digest: str) -> None:
        if self.recent is not None:
            self.recent.release(digest)

    def _undo(self, changes: list[Change]) -> None:
        if changes and self.cumulative is not None:
            self.cumulative.rollback(changes)
