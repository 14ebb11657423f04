"""Realistic OTLP payloads: many orgs, several metrics, 3-5 attributes, 1,000-10,000 points a request."""

from __future__ import annotations

import random
import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

METRICS = ("api.requests", "rows.processed", "egress.bytes", "compute.credits")
ATTRS = {
    "feature": ["search", "export", "ingest", "query", "dashboards", "alerts"],
    "region": ["us-east-1", "us-west-2", "eu-west-1", "ap-south-1"],
    "plan": ["free", "team", "business", "enterprise"],
    "endpoint": [f"/v1/resource/{i}" for i in range(20)],
    "client": ["python", "go", "java", "node", "ruby"],
}
KEYS = list(ATTRS)


def kv(k: str, v: str) -> KeyValue:
    return KeyValue(key=k, value=AnyValue(string_value=v))


def make_requests(orgs: int, points_per_request: int, count: int, seed: int = 1) -> tuple[list[bytes], int]:
    """``count`` serialized requests; returns them and the total number of points."""
    rng = random.Random(seed)
    t0 = time.time_ns() - 3600 * 10**9
    out, total = [], 0
    for r in range(count):
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.append(kv("service.name", f"svc-{r % 7}"))
        sm = rm.scope_metrics.add()
        sm.scope.name = "bench"
        per_metric = points_per_request // len(METRICS)
        for name in METRICS:
            m = sm.metrics.add(name=name, unit="1")
            m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
            m.sum.is_monotonic = True
            for i in range(per_metric):
                dp = m.sum.data_points.add()
                dp.time_unix_nano = t0 + (r * points_per_request + i) * 1000
                dp.start_time_unix_nano = dp.time_unix_nano - 10**9
                if name == "compute.credits":
                    dp.as_double = rng.random() * 3
                else:
                    dp.as_int = rng.randint(1, 10_000)
                dp.attributes.append(kv("org.id", f"org-{rng.randrange(orgs):06d}"))
                for k in KEYS[: rng.randint(3, 5)]:
                    dp.attributes.append(kv(k, rng.choice(ATTRS[k])))
            total += per_metric
        out.append(req.SerializeToString())
    return out, total
