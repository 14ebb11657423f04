"""The collector plane: OTLP receivers → decode and validate → spool → writer → ClickHouse (failover)."""

from meterhouse.collector.decode import Limits, decode_request, value_text
from meterhouse.collector.failover import EndpointSet
from meterhouse.collector.ingest import Ingestor
from meterhouse.collector.model import Backpressure, Consumer, PointBatch
from meterhouse.collector.pipeline import Collector
from meterhouse.collector.receivers import OtlpGrpcReceiver, OtlpHttpReceiver
from meterhouse.collector.spool import Spool
from meterhouse.collector.writer import Writer

__all__ = [
    "Backpressure", "Collector", "Consumer", "EndpointSet", "Ingestor", "Limits", "OtlpGrpcReceiver",
    "OtlpHttpReceiver", "PointBatch", "Spool", "Writer", "decode_request", "value_text",
]  # fmt: skip
