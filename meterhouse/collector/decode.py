"""OTLP metrics request → columns of usage points, with every rejected point counted by reason.

Per-point work is kept minimal: the walk over points is the ceiling of the ingest path.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from dataclasses import dataclass, field

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from meterhouse.collector.model import PointBatch
from meterhouse.core.schema import KIND_SUM

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
MAX_VALUE_DEPTH = 16


@dataclass(frozen=True)
class Limits:
    org_attribute: str = "org.id"
    max_attributes: int = 128
    max_attribute_length: int = 4096
    max_past_ns: int = 2 * 366 * 86400 * 10**9
    max_future_ns: int = 86400 * 10**9


@dataclass
class DecodeResult:
    batch: PointBatch
    received: int = 0
    unattributed: int = 0
    rejected: Counter = field(default_factory=Counter)
    #: reason → first metric name seen with it, for the partial-success message.
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, metric: str, n: int = 1) -> None:
        self.rejected[reason] += n
        self.examples.setdefault(reason, metric)

    def error_message(self) -> str:
        parts = [
            f"{n} {reason} (e.g. metric {self.examples[reason]!r})"
            for reason, n in sorted(self.rejected.items())
        ]
        return "rejected data points: " + "; ".join(parts) if parts else ""


class _TooDeep(ValueError):
    pass


def _plain(v: AnyValue, depth: int):
    """AnyValue → a JSON-able Python value (bytes as base64)."""
    if depth > MAX_VALUE_DEPTH:
        raise _TooDeep
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which == "array_value":
        return [_plain(x, depth + 1) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _plain(kv.value, depth + 1) for kv in v.kvlist_value.values}
    return None


def value_text(v: AnyValue) -> str:
    """The documented textual form of an attribute value.

    string → itself; bool → ``true``/``false``; int → decimal; double → shortest repr;
    bytes → base64; array and kvlist → compact JSON (keys sorted); empty → ``""``.
    """
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return str(v.int_value)
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "double_value":
        return repr(v.double_value)
    if which is None:
        return ""
    plain = _plain(v, 0)
    if isinstance(plain, str):
        return plain
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decode_request(
    request: ExportMetricsServiceRequest,
    limits: Limits,
    *,
    now_ns: int,
    digest: str,
) -> DecodeResult:
    """Walk the request once, appending accepted points to columns and counting the rest."""
    cols = PointBatch.empty()
    result = DecodeResult(PointBatch(cols, 0, digest, now_ns))
    org_key = limits.org_attribute
    max_attrs = limits.max_attributes
    max_len = limits.max_attribute_length
    min_t = now_ns - limits.max_past_ns
    max_t = now_ns + limits.max_future_ns

    c_org, c_metric, c_kind, c_unit = cols["org_id"], cols["metric"], cols["kind"], cols["unit"]
    c_mono, c_start, c_time = cols["monotonic"], cols["start_time"], cols["time"]
    c_isint, c_vi, c_vd = cols["is_int"], cols["value_int"], cols["value_double"]
    c_ak, c_av = cols["attr_keys"], cols["attr_values"]
    c_rk, c_rv = cols["resource_keys"], cols["resource_values"]
    c_sn, c_sv, c_recv = cols["scope_name"], cols["scope_version"], cols["received_at"]

    for rm in request.resource_metrics:
        res_pairs = sorted((kv.key, value_text(kv.value)) for kv in rm.resource.attributes)
        res_keys = [k for k, _ in res_pairs]
        res_values = [v for _, v in res_pairs]
        res_org = next((v for k, v in res_pairs if k == org_key), "")
        for sm in rm.scope_metrics:
            scope_name, scope_version = sm.scope.name, sm.scope.version
            for m in sm.metrics:
                name = m.name
                which = m.WhichOneof("data")
                if which != "sum":
                    points = getattr(m, which).data_points if which else ()
                    result.received += len(points)
                    if points:
                        result.reject("unsupported_metric", name, len(points))
                    continue
                s = m.sum
                n_points = len(s.data_points)
                result.received += n_points
                if s.aggregation_temporality != DELTA:
                    result.reject("unsupported_metric", name, n_points)
                    continue
                mono = 1 if s.is_monotonic else 0
                unit = m.unit
                for dp in s.data_points:
                    t = dp.time_unix_nano
                    if t == 0 or t < min_t or t > max_t or dp.start_time_unix_nano > t:
                        result.reject("invalid_timestamp", name)
                        continue
                    vkind = dp.WhichOneof("value")
                    if vkind == "as_int":
                        vi, vd, is_int = dp.as_int, 0.0, 1
                        negative = vi < 0
                    elif vkind == "as_double":
                        vi, vd, is_int = 0, dp.as_double, 0
                        if not math.isfinite(vd):
                            result.reject("invalid_value", name)
                            continue
                        negative = vd < 0
                    else:
                        result.reject("no_value", name)
                        continue
                    if mono and negative:
                        result.reject("negative_delta", name)
                        continue
                    attrs = dp.attributes
                    if len(attrs) > max_attrs:
                        result.reject("attribute_limit", name)
                        continue
                    org = res_org
                    pairs = {}
                    try:
                        for kv in attrs:
                            key = kv.key
                            text = value_text(kv.value)
                            if len(key) > max_len or len(text) > max_len:
                                raise _TooDeep
                            if key == org_key:
                                org = text
                            else:
                                pairs[key] = text
                    except (_TooDeep, RecursionError):
                        result.reject("attribute_limit", name)
                        continue
                    if not org:
                        result.unattributed += 1
                    keys = sorted(pairs)
                    c_org.append(org)
                    c_metric.append(name)
                    c_kind.append(KIND_SUM)
                    c_unit.append(unit)
                    c_mono.append(mono)
                    c_start.append(dp.start_time_unix_nano)
                    c_time.append(t)
                    c_isint.append(is_int)
                    c_vi.append(vi)
                    c_vd.append(vd)
                    c_ak.append(keys)
                    c_av.append([pairs[k] for k in keys])
                    c_rk.append(res_keys)
                    c_rv.append(res_values)
                    c_sn.append(scope_name)
                    c_sv.append(scope_version)
                    c_recv.append(now_ns)
    result.batch.size = len(c_org)
    return result
