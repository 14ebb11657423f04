"""Realistic OTLP payloads: many orgs, several metrics, 3-5 attributes, 1,000-10,000 points a request."""

from __future__ import annotations

import random
import time
from typing import Any

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


def _request(r: int) -> tuple[ExportMetricsServiceRequest, list[Any]]:
    """Request number ``r``: one resource and scope, and a monotonic delta sum of each of :data:`METRICS`."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(kv("service.name", f"svc-{r % 7}"))
    sm = rm.scope_metrics.add()
    sm.scope.name = "bench"
    metrics = []
    for name in METRICS:
        m = sm.metrics.add(name=name, unit="1")
        m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
        m.sum.is_monotonic = True
        metrics.append(m)
    return req, metrics


def make_requests(orgs: int, points_per_request: int, count: int, seed: int = 1) -> tuple[list[bytes], int]:
    """``count`` serialized requests; returns them and the total number of points."""
    rng = random.Random(seed)
    t0 = time.time_ns() - 3600 * 10**9
    out, total = [], 0
    for r in range(count):
        req, metrics = _request(r)
        per_metric = points_per_request // len(METRICS)
        for name, m in zip(METRICS, metrics, strict=True):
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


#: The realistic fleet's shape: every org reports each metric under this many attribute sets, each series
#: every 10 to 60 seconds (issue 26's measurements: 15,000 orgs x 4 metrics x 12 sets).
FLEET_SETS = 12
FLEET_PERIOD_S = (10.0, 60.0)


def make_fleet_requests(
    orgs: int,
    points_per_request: int,
    count: int,
    start_ns: int,
    seed: int = 2,
    once: bool = False,
    span_s: float = 0,
) -> tuple[list[bytes], int, int]:
    """``count`` requests of a realistic fleet, a gateway Collector's batches in time order: ``orgs`` x
    4 metrics x :data:`FLEET_SETS` attribute sets (each org's sets shared by its metrics), each series a
    delta sum reporting every 10-60 s (its own period and phase), so a series repeats within a request
    group rarely and within the hour often, unlike :func:`make_requests`, whose points are almost all
    new series. Times start at ``start_ns``; returns the requests, their points and the time after the
    last point (where the next call's points may start without repeating an interval of a stream).
    ``once``: every series' first point only, in as many requests as they fill (``count`` is ignored): a
    collector that has run for a while has seen every series of its fleet, and this brings it there.
    ``span_s``: every point of the schedule's first ``span_s`` seconds (``count`` is ignored)."""
    rng = random.Random(seed)
    sets = []
    for _org in range(orgs):
        sets.append([
            tuple((k, rng.choice(ATTRS[k])) for k in KEYS[: rng.randint(3, 5)]) for _ in range(FLEET_SETS)
        ])  # fmt: skip
    series = [(o, m, s) for o in range(orgs) for m in range(len(METRICS)) for s in range(FLEET_SETS)]
    lo, hi = FLEET_PERIOD_S
    periods = [rng.uniform(lo, hi) for _ in series]
    phases = [rng.uniform(0, p) for p in periods]
    rate = sum(1 / p for p in periods)
    wanted = len(series) if once else points_per_request * count
    horizon = hi if once else span_s or wanted / rate * 1.1 + hi
    events: list[tuple[float, int]] = []
    for i, (period, phase) in enumerate(zip(periods, phases, strict=True)):
        t = phase
        while t < horizon:
            events.append((t, i))
            t += period
            if once:
                break
    events.sort()
    events = events if span_s else events[:wanted]
    count = -(-len(events) // points_per_request)
    last: dict[int, float] = {}
    out = []
    for r in range(count):
        req, metrics = _request(r)
        for t, i in events[r * points_per_request : (r + 1) * points_per_request]:
            org, metric, s = series[i]
            dp = metrics[metric].sum.data_points.add()
            dp.time_unix_nano = start_ns + int(t * 1e9)
            dp.start_time_unix_nano = start_ns + int(last.get(i, t - periods[i]) * 1e9)
            last[i] = t
            if metric == 3:
                dp.as_double = rng.random() * 3
            else:
                dp.as_int = rng.randint(1, 10_000)
            dp.attributes.append(kv("org.id", f"org-{org:06d}"))
            for k, v in sets[org][s]:
                dp.attributes.append(kv(k, v))
        out.append(req.SerializeToString())
    end = start_ns + int((events[-1][0] + hi) * 1e9) if events else start_ns
    return out, len(events), end
