"""Transport-independent handling of one OTLP export: decode, count, hand on, wait until durable."""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from meterhouse.collector.cumulative import CumulativeState, Entry
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.model import Backpressure, Consumer
from meterhouse.core import schema
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Store


def committed_state_loader(store: Store):
    """Read the last committed point of cumulative series from ClickHouse (see cumulative.py)."""
    sql = schema.series_state_sql(store.database)

    def load(ids: list[int]) -> dict[int, Entry]:
        rows = store.rows(sql, {"ids": ids})
        return {
            int(sid): Entry(int(start), int(t), int(vi) if is_int else float(vd))
            for sid, start, t, is_int, vi, vd in rows
        }

    return load


@dataclass
class Outcome:
    """What to answer: ``kind`` is one of the request outcomes in core.metrics."""

    kind: str
    message: str = ""
    response: ExportMetricsServiceResponse | None = None
    retry_after_s: int = 0


class Ingestor:
    def __init__(
        self,
        next_stage: Consumer,
        metrics: PipelineMetrics,
        limits: Limits,
        ack_timeout_s: float,
        cumulative: CumulativeState | None = None,
    ) -> None:
        self.next = next_stage
        self.metrics = metrics
        self.limits = limits
        self.ack_timeout_s = ack_timeout_s
        self.cumulative = cumulative

    def export(self, request: ExportMetricsServiceRequest, digest: str) -> Outcome:
        result = decode_request(
            request, self.limits, now_ns=time.time_ns(), digest=digest, cumulative=self.cumulative
        )
        m = self.metrics
        m.points_received.inc(result.received)
        try:
            ack = self.next.consume(result.batch)
        except Backpressure as e:
            # Nothing of this request is kept; the client retries all of it, so count no rejections.
            self._undo(result.changes)
            return Outcome("backpressure", f"pipeline is full: {e}", retry_after_s=e.retry_after_s)
        if not ack.wait(self.ack_timeout_s):
            self._undo(result.changes)
            reason = ack.error or f"points not durable within {self.ack_timeout_s:g}s"
            return Outcome("unavailable", f"storage unavailable, retry later: {reason}", retry_after_s=1)
        for reason, n in result.rejected.items():
            m.points_rejected.labels(reason=reason).inc(n)
        if result.unattributed:
            m.points_unattributed.inc(result.unattributed)
        response = ExportMetricsServiceResponse()
        if result.rejected:
            response.partial_success.rejected_data_points = result.rejected_count
            response.partial_success.error_message = result.error_message()
            return Outcome("partial", result.error_message(), response)
        return Outcome("ok", "", response)

    def _undo(self, changes) -> None:
        if changes and self.cumulative is not None:
            self.cumulative.rollback(changes)
