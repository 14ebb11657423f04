"""The collector plane: OTLP receivers → decode and validate → batch writer into ClickHouse."""

from meterhouse.collector.decode import Limits, decode_request, value_text
from meterhouse.collector.ingest import Ingestor
from meterhouse.collector.model import Ack, Backpressure, Consumer, PointBatch
from meterhouse.collector.pipeline import Collector
from meterhouse.collector.receivers import OtlpHttpReceiver
from meterhouse.collector.writer import BatchWriter

__all__ = [
    "Ack",
    "Backpressure",
    "BatchWriter",
    "Collector",
    "Consumer",
    "Ingestor",
    "Limits",
    "OtlpHttpReceiver",
    "PointBatch",
    "decode_request",
    "value_text",
]
