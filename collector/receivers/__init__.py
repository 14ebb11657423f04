"""OTLP receivers: one module per transport."""

from meterhouse.collector.receivers.grpc import OtlpGrpcReceiver
from meterhouse.collector.receivers.http import OtlpHttpReceiver

__all__ = ["OtlpGrpcReceiver", "OtlpHttpReceiver"]
