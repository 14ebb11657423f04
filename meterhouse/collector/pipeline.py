"""The collector's chain, built from the sink back to the receivers."""

from __future__ import annotations

import logging
import time

from meterhouse.collector.cumulative import CumulativeState
from meterhouse.collector.decode import Limits
from meterhouse.collector.ingest import Ingestor, committed_state_loader
from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver
from meterhouse.collector.receivers.http import OtlpHttpReceiver
from meterhouse.collector.writer import BatchWriter
from meterhouse.core.config import Config
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Store

log = logging.getLogger("meterhouse.collector")


def limits_from(config: Config) -> Limits:
    return Limits(
        org_attribute=config.org_attribute,
        max_attributes=config.max_attributes,
        max_attribute_length=config.max_attribute_length,
        max_past_ns=int(config.max_past_s * 1e9),
        max_future_ns=int(config.max_future_s * 1e9),
    )


class Collector:
    """Writer (sink) ← ingestor ← receivers (sources). Start sinks first, stop sources first."""

    def __init__(self, config: Config, store: Store, metrics: PipelineMetrics) -> None:
        self.writer = BatchWriter(
            store,
            metrics,
            flush_interval_s=config.flush_interval_s,
            flush_max_points=config.flush_max_points,
            max_pending_points=config.max_pending_points,
            insert_attempts=config.insert_attempts,
        )
        self.cumulative = CumulativeState(committed_state_loader(store))
        self.ingestor = Ingestor(
            self.writer, metrics, limits_from(config), config.ack_timeout_s, self.cumulative
        )
        self.http = OtlpHttpReceiver(
            config.host, config.otlp_http_port, self.ingestor, metrics, config.max_request_bytes
        )
        self.grpc = OtlpGrpcReceiver(
            config.host, config.otlp_grpc_port, self.ingestor, metrics, config.max_request_bytes
        )
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started and self.writer.healthy

    def start(self) -> None:
        self.writer.start()
        self.http.start()
        self.grpc.start()
        self._started = True

    def shutdown(self, timeout_s: float) -> None:
        """Stop receivers, then flush the writer; bounded by ``timeout_s`` overall."""
        deadline = time.monotonic() + timeout_s
        self._started = False
        self.http.shutdown(max(0.0, deadline - time.monotonic()))
        grpc_done = self.grpc.stop_accepting(max(0.0, deadline - time.monotonic()))
        self.writer.shutdown(max(0.0, deadline - time.monotonic()))
        # Requests that were waiting on the flush now answer; let them finish writing.
        self.http.in_flight.wait_idle(max(0.1, deadline - time.monotonic()))
        grpc_done.wait(max(0.1, deadline - time.monotonic()))
