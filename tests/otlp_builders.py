"""Hand-built OTLP requests for decoder and receiver tests (the SDK is used where a client is meant)."""

from __future__ import annotations

import gzip
import time
import zlib

import requests
import zstandard
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, NumberDataPoint

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def kv(key: str, value) -> KeyValue:
    return KeyValue(key=key, value=any_value(value))


def any_value(value) -> AnyValue:
    if isinstance(value, AnyValue):
        return value
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    return AnyValue(string_value=value)


def point(value=None, attrs: dict | None = None, t_ns: int | None = None, start_ns: int | None = None):
    t = time.time_ns() if t_ns is None else t_ns
    dp = NumberDataPoint(time_unix_nano=t, start_time_unix_nano=t - 10**9 if start_ns is None else start_ns)
    if isinstance(value, int):
        dp.as_int = value
    elif isinstance(value, float):
        dp.as_double = value
    for k, v in (attrs or {}).items():
        dp.attributes.append(kv(k, v))
    return dp


def sum_request(
    points_by_metric: dict[str, list[NumberDataPoint]],
    resource: dict | None = None,
    temporality=DELTA,
    monotonic: bool = True,
    unit: str = "1",
) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in (resource or {"service.name": "test"}).items():
        rm.resource.attributes.append(kv(k, v))
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = "tests", "1.0"
    for name, points in points_by_metric.items():
        m = sm.metrics.add()
        m.name, m.unit = name, unit
        m.sum.aggregation_temporality = temporality
        m.sum.is_monotonic = monotonic
        m.sum.data_points.extend(points)
    return req


def zstd_compress(data: bytes) -> bytes:
    """One zstd frame without its content size, as a streaming writer (the Collector's exporters) sends it."""
    return zstandard.ZstdCompressor(write_content_size=False).compress(data)


#: Each OTLP/HTTP Content-Encoding as its senders make it: gzip and deflate as the OpenTelemetry Python
#: SDK does (gzip.GzipFile, zlib.compress: the zlib format of RFC 1950), zstd as the Collector does.
ENCODERS = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstd_compress}


class ZstdSession(requests.Session):
    """A session that sends every body zstd-compressed: the SDK's HTTP exporter (which offers gzip and
    deflate only) given this session sends what a Collector exporter with `compression: zstd` sends."""

    def request(self, method, url, *args, data=None, headers=None, **kwargs):
        if data:
            data, headers = zstd_compress(data), {**(headers or {}), "Content-Encoding": "zstd"}
        return super().request(method, url, *args, data=data, headers=headers, **kwargs)


def histogram_request(points: list[tuple[int, dict]], metric: str, t_ns: int) -> ExportMetricsServiceRequest:
    """One delta histogram metric: a point of ``count`` observations (all in the first bucket) per
    ``(count, attributes)``, each over the second before ``t_ns``."""
    req = sum_request({})
    m = req.resource_metrics[0].scope_metrics[0].metrics.add(name=metric, unit="ms")
    m.histogram.aggregation_temporality = DELTA
    for count, attrs in points:
        dp = m.histogram.data_points.add(start_time_unix_nano=t_ns - 10**9, time_unix_nano=t_ns)
        dp.count, dp.sum = count, float(count)
        dp.bucket_counts.extend([count, 0])
        dp.explicit_bounds.append(100.0)
        for k, v in attrs.items():
            dp.attributes.append(kv(k, v))
    return req
