"""Transport-independent handling of one OTLP export: decode, count, hand on, wait until durable."""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.model import Backpressure, Consumer
from meterhouse.core.metrics import PipelineMetrics


@dataclass
class Outcome:
    """What to answer: ``kind`` is one of the request outcomes in core.metrics."""

    kind: str
    message: str = ""
    response: ExportMetricsServiceResponse | None = None
    retry_after_s: int = 0


class Ingestor:
    def __init__(
        self, next_stage: Consumer, metrics: PipelineMetrics, limits: Limits, ack_timeout_s: float
    ) -> None:
        self.next = next_stage
        self.metrics = metrics
        self.limits = limits
        self.ack_timeout_s = ack_timeout_s

    def export(self, request: ExportMetricsServiceRequest, digest: str) -> Outcome:
        result = decode_request(request, self.limits, now_ns=time.time_ns(), digest=digest)
        m = self.metrics
        m.points_received.inc(result.received)
        try:
            ack = self.next.consume(result.batch)
        except Backpressure as e:
            # Nothing of this request is kept; the client retries all of it, so count no rejections.
            return Outcome("backpressure", f"pipeline is full: {e}", retry_after_s=e.retry_after_s)
        if not ack.wait(self.ack_timeout_s):
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
