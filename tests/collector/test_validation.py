"""Validation at the edge: repairs that keep usage exactly, limits on resource attributes, and answers
that a request's content decides being 4xx-class (partial success), never a retryable 5xx."""

import logging
import math
import time

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValueList
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from otlp_builders import CUMULATIVE, kv, point, sum_request
from prometheus_client import CollectorRegistry

from meterhouse.collector.cumulative import CumulativeState
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.ingest import Ingestor
from meterhouse.collector.rejectlog import RejectLog
from meterhouse.collector.spool import encode_blocks
from meterhouse.core.metrics import PipelineMetrics


def decode(req, limits=None, cumulative=None):
    return decode_request(req, limits or Limits(), now_ns=time.time_ns(), digest="d", cumulative=cumulative)


def rows(result):
    cols = result.batch.columns
    return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


class Keep:
    """The last stage of a pipeline, keeping what it is given in memory."""

    def __init__(self) -> None:
        self.batches = []

    def consume(self, batch) -> None:
        self.batches.append(batch)

    def start(self) -> None: ...

    def shutdown(self, timeout_s: float) -> None: ...


def nested(depth: int) -> AnyValue:
    v = AnyValue(string_value="leaf")
    for _ in range(depth):
        v = AnyValue(kvlist_value=KeyValueList(values=[kv("k", v)]))
    return v


# -- start after time: stored, start clamped, counted ---------------------------------------------------
def test_a_delta_point_whose_start_is_after_its_time_is_stored_with_start_clamped():
    now = time.time_ns()
    req = sum_request({"m": [point(7, {"org.id": "o"}, t_ns=now, start_ns=now + 21_000_000)]})
    r = decode(req)
    assert r.rejected_count == 0
    assert r.repaired == {"start_after_time": 1}
    (p,) = rows(r)
    assert p["value_int"] == 7 and p["start_time"] == p["time"] == now


def test_a_cumulative_series_with_a_late_start_keeps_exact_deltas():
    """The SDK's cumulative start of a new series can also be a few ms after the first collection time;
    the series keeps the sender's start, so the next point is a continuation, not a reset."""
    state = CumulativeState(lambda ids: {})
    t0 = time.time_ns()
    start = t0 + 5_000_000
    first = decode(sum_request({"c": [point(10, {"org.id": "o"}, t_ns=t0, start_ns=start)]},
                               temporality=CUMULATIVE), cumulative=state)  # fmt: skip
    second = decode(sum_request({"c": [point(25, {"org.id": "o"}, t_ns=t0 + 10**9, start_ns=start)]},
                                temporality=CUMULATIVE), cumulative=state)  # fmt: skip
    assert first.repaired == {"start_after_time": 1} and not second.repaired
    (a,), (b,) = rows(first), rows(second)
    assert (a["value_int"], a["start_time"], a["time"]) == (10, t0, t0)
    assert (b["value_int"], b["start_time"], b["time"]) == (15, t0, t0 + 10**9)


def test_a_histogram_point_whose_start_is_after_its_time_is_stored_with_start_clamped():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    now = time.time_ns()
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="h")
    m.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    dp = m.histogram.data_points.add(time_unix_nano=now, start_time_unix_nano=now + 3, count=2, sum=3.0)
    dp.bucket_counts.extend([1, 1])
    dp.explicit_bounds.extend([1.0])
    r = decode(req)
    assert r.rejected_count == 0 and r.repaired == {"start_after_time": 1}
    assert r.batch.dist_columns["start_time"] == [now]


# -- resource attributes: the same limits as point attributes ------------------------------------------
def test_resource_attributes_over_the_limits_reject_the_resource_points():
    limits = Limits(max_attributes=3, max_attribute_length=10)
    cases = {
        "too many": {f"k{i}": "v" for i in range(4)},
        "long value": {"k": "x" * 11},
        "long key": {"k" * 11: "x"},
    }
    for name, resource in cases.items():
        req = sum_request({"m": [point(1, {"org.id": "o"}), point(2, {"org.id": "o"})]}, resource=resource)
        r = decode(req, limits)
        assert r.rejected == {"attribute_limit": 2}, name
        assert r.batch.size == 0 and r.received == 2, name
    ok = decode(sum_request({"m": [point(1)]}, resource={"a": "1", "b": "2", "org.id": "o"}), limits)
    assert ok.rejected_count == 0 and rows(ok)[0]["org_id"] == "o"


def test_a_resource_attribute_nested_too_deep_rejects_its_points_and_spares_other_resources():
    req = sum_request({"m": [point(1, {"org.id": "o"})]})
    bad = req.resource_metrics.add()
    bad.resource.attributes.append(kv("deep", nested(20)))
    m2 = bad.scope_metrics.add().metrics.add(name="m2")
    m2.sum.data_points.append(point(5, {"org.id": "o"}))
    m2.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    r = decode(req)
    assert r.rejected == {"attribute_limit": 1} and r.examples == {"attribute_limit": "m2"}
    assert [p["metric"] for p in rows(r)] == ["m"]


def test_a_resource_attribute_array_nested_too_deep_is_rejected():
    v = AnyValue(string_value="x")
    for _ in range(25):
        v = AnyValue(array_value=ArrayValue(values=[v]))
    req = sum_request({"m": [point(1, {"org.id": "o"})]}, resource={"deep": v})
    assert decode(req).rejected == {"attribute_limit": 1}


def ingestor(metrics, reject_log=None):
    state = CumulativeState(lambda ids: {})
    return Ingestor(Keep(), metrics, Limits(), state, reject_log=reject_log)


def test_a_deep_resource_attribute_is_answered_as_a_rejection_not_as_retry_later():
    """Was: 503 "cannot read cumulative state, retry later", so the client retried a bad request forever."""
    metrics = PipelineMetrics(CollectorRegistry())
    for temporality in (AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA, CUMULATIVE):
        req = sum_request({"m": [point(1, {"org.id": "o"})]}, resource={"deep": nested(20)},
                          temporality=temporality)  # fmt: skip
        outcome = ingestor(metrics).export(req, f"digest-{temporality}")
        assert outcome.kind == "partial", outcome
        assert outcome.response.partial_success.rejected_data_points == 1


def test_a_state_read_failure_is_still_retryable():
    def broken(ids):
        raise OSError("ClickHouse is down")

    metrics = PipelineMetrics(CollectorRegistry())
    ing = Ingestor(Keep(), metrics, Limits(), CumulativeState(broken))
    outcome = ing.export(sum_request({"c": [point(1, {"org.id": "o"})]}, temporality=CUMULATIVE), "d")
    assert outcome.kind == "unavailable" and outcome.retry_after_s >= 1


def test_repairs_are_counted_in_the_repaired_metric():
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    assert registry.get_sample_value("meterhouse_points_repaired_total", {"reason": "start_after_time"}) == 0
    assert registry.get_sample_value("meterhouse_points_rejected_total", {"reason": "out_of_order"}) == 0
    now = time.time_ns()
    req = sum_request(
        {"m": [point(1, {"org.id": "o"}, t_ns=now, start_ns=now + 1), point(2, {"org.id": "o"})]}
    )
    outcome = ingestor(metrics).export(req, "d")
    assert outcome.kind == "ok"
    assert registry.get_sample_value("meterhouse_points_repaired_total", {"reason": "start_after_time"}) == 1


# -- what is still rejected is logged, rate-limited, per (reason, metric) --------------------------------
def test_rejections_are_logged_once_per_interval_per_reason_and_metric_with_an_org_and_a_count(caplog):
    clock = [1000.0]
    log = RejectLog(interval_s=60, clock=lambda: clock[0])
    metrics = PipelineMetrics(CollectorRegistry())
    ing = ingestor(metrics, reject_log=log)
    bad = sum_request(
        {"neg": [point(-1, {"org.id": "org-7"})], "nan": [point(float("nan"), {"org.id": "org-8"})]}
    )
    with caplog.at_level(logging.WARNING, logger="meterhouse.rejected"):
        for i in range(5):
            ing.export(bad, f"d{i}")
        lines = [r for r in caplog.records if r.name == "meterhouse.rejected"]
        assert sorted((r.reason, r.metric, r.example_org, r.points) for r in lines) == [
            ("invalid_value", "nan", "org-8", 1),
            ("negative_delta", "neg", "org-7", 1),
        ]
        clock[0] += 61
        ing.export(bad, "d-later")
        lines = [r for r in caplog.records if r.name == "meterhouse.rejected"]
        assert len(lines) == 4
        assert sorted(r.points for r in lines[2:]) == [5, 5]  # the 4 held back and this one


# -- names, units, scopes and descriptions: length limits, no control characters ---------------------------
def name_limits():
    return Limits(max_metric_name_length=8, max_unit_length=4, max_scope_length=6, max_description_length=10)


def names_request(name="m", unit="1", scope=("s", "1"), description="", temporality=None):
    """The metric under test (points 1 and 2) beside a good metric (4) in its scope, and a good metric (8)
    in another scope of the same resource."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    delta = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA

    def add(sm, name, unit, description, values, temporality=delta):
        m = sm.metrics.add(name=name, unit=unit, description=description)
        m.sum.aggregation_temporality = temporality
        m.sum.is_monotonic = True
        m.sum.data_points.extend(point(v, {"org.id": "o"}) for v in values)

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(kv("service.name", "svc"))
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = scope
    add(sm, name, unit, description, [1, 2], temporality or delta)
    add(sm, "good", "1", "", [4])
    other = rm.scope_metrics.add()
    other.scope.name, other.scope.version = "other", "1"
    add(other, "kept", "1", "", [8])
    return req


#: (request fields, points rejected as invalid_name): the metric's two, or its scope's three.
NAME_CASES = {
    "name_too_long": ({"name": "m" * 9}, 2),
    "unit_too_long": ({"unit": "By/s!"}, 2),
    "description_too_long": ({"description": "d" * 11}, 2),
    "scope_name_too_long": ({"scope": ("s" * 7, "1")}, 3),
    "scope_version_too_long": ({"scope": ("s", "1.2.3.4")}, 3),
    "name_unit_separator": ({"name": "a\x1fb"}, 2),
    "name_newline": ({"name": "a\nb"}, 2),
    "name_nul": ({"name": "\x00"}, 2),
    "name_del": ({"name": "a\x7f"}, 2),
    "unit_tab": ({"unit": "\t"}, 2),
    "scope_name_control": ({"scope": ("s\x1e", "1")}, 3),
    "scope_version_control": ({"scope": ("s", "1\x00")}, 3),
}
NAME_ACCEPTED = {
    "at_the_limits": {"name": "m" * 8, "unit": "By/s", "description": "d" * 10, "scope": ("s" * 6, "v" * 6)},
    "description_with_newlines": {"description": "a\nb\tc"},  # descriptions are prose: length only
    "unicode": {"name": "é.ｚ😀\x80", "unit": "°C", "scope": ("😀", "")},  # U+0080 is not U+0000-U+001F
    "empty_scope": {"scope": ("", "")},
}


def kept_values(result):
    return sorted(result.batch.columns["value_int"])


@pytest.mark.parametrize("case", NAME_CASES, ids=list(NAME_CASES))
def test_a_name_unit_scope_or_description_over_its_limit_or_with_control_characters_is_rejected(case):
    fields, n = NAME_CASES[case]
    r = decode(names_request(**fields), name_limits())
    assert r.rejected == {"invalid_name": n}
    assert r.received == 4 and r.batch.size == 4 - n
    assert kept_values(r) == ([8] if n == 3 else [4, 8])
    assert "invalid_name" in r.error_message()
    if "too_long" not in case:  # control characters are refused whatever the limits
        assert decode(names_request(**fields)).rejected == {"invalid_name": n}


@pytest.mark.parametrize("case", NAME_ACCEPTED, ids=list(NAME_ACCEPTED))
def test_names_within_the_limits_are_kept(case):
    r = decode(names_request(**NAME_ACCEPTED[case]), name_limits())
    assert r.rejected_count == 0 and kept_values(r) == [1, 2, 4, 8]


def test_the_default_limits_take_what_real_senders_send():
    long_ok = {
        "name": "n" * 1024,
        "unit": "u" * 255,
        "scope": ("s" * 1024, "v" * 1024),
        "description": "d" * 4096,
    }
    assert decode(names_request(**long_ok)).rejected_count == 0
    for field, value in (("name", "n" * 1025), ("unit", "u" * 256), ("scope", ("s" * 1025, "")),
                         ("scope", ("", "v" * 1025)), ("description", "d" * 4097)):  # fmt: skip
        assert decode(names_request(**{field: value})).rejected == {
            "invalid_name": 3 if field == "scope" else 2
        }


def test_an_invalid_name_is_rejected_before_cumulative_conversion_and_for_distributions():
    state = CumulativeState(lambda ids: {})
    r = decode(names_request(name="c\x1fx", temporality=CUMULATIVE), cumulative=state)
    assert r.rejected == {"invalid_name": 2} and not r.changes and len(state) == 0
    req = names_request()
    h = req.resource_metrics[0].scope_metrics[0].metrics.add(name="latency\x00", unit="ms")
    h.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    h.histogram.data_points.add(time_unix_nano=time.time_ns(), count=1)
    r = decode(req)
    assert r.rejected == {"invalid_name": 1} and r.batch.dist_size == 0 and r.batch.size == 4


def kept_and_counted(reason):
    """An ingestor whose last stage keeps what it is given, its registry, and that stage; ``reason`` is
    counted from 0 before any rejection."""
    registry = CollectorRegistry()
    keep = Keep()
    ing = Ingestor(keep, PipelineMetrics(registry), Limits(), CumulativeState(lambda ids: {}))
    assert registry.get_sample_value("meterhouse_points_rejected_total", {"reason": reason}) == 0
    return ing, registry, keep


def test_an_invalid_name_is_answered_with_partial_success_counted_and_logged_cut_short(caplog):
    ing, registry, keep = kept_and_counted("invalid_name")
    huge = "x\x1f" * 100_000
    with caplog.at_level(logging.WARNING, logger="meterhouse.rejected"):
        outcome = ing.export(names_request(name=huge), "d")
    assert outcome.kind == "partial"
    assert outcome.response.partial_success.rejected_data_points == 2
    assert "invalid_name" in outcome.response.partial_success.error_message
    assert len(outcome.response.partial_success.error_message) < 2000  # the sender's name is not echoed whole
    assert sorted(keep.batches[0].columns["value_int"]) == [4, 8]
    assert registry.get_sample_value("meterhouse_points_rejected_total", {"reason": "invalid_name"}) == 2
    (line,) = [r for r in caplog.records if r.name == "meterhouse.rejected"]
    assert line.reason == "invalid_name" and line.points == 2 and len(line.metric) <= 200


# -- numbers that do not fit: rejected out_of_range, the request's other points kept ----------------------
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def level(org, value, t_ns, start_ns, monotonic=False):
    return sum_request({"level": [point(value, {"org.id": org}, t_ns=t_ns, start_ns=start_ns)]},
                       temporality=CUMULATIVE, monotonic=monotonic)  # fmt: skip


def test_a_cumulative_int_delta_beyond_int64_is_rejected_and_the_other_points_are_kept():
    """Was a delta of 2^64 - 1 in an Int64 column: the spool could not encode the batch (500), on every
    re-send, and the other orgs' points of the request went with it."""
    state = CumulativeState(lambda ids: {})
    now = time.time_ns()
    start = now - 60 * 10**9
    assert decode(level("bad", INT64_MIN, now - 2 * 10**9, start), cumulative=state).rejected_count == 0
    req = level("bad", INT64_MAX, now - 10**9, start)
    req.resource_metrics.extend(level("c", 40, now - 10**9, start).resource_metrics)
    req.resource_metrics.extend(sum_request({"calls": [point(INT64_MAX, {"org.id": "a"}),
                                                       point(INT64_MIN, {"org.id": "b"})]},
                                            monotonic=False).resource_metrics)  # fmt: skip
    r = decode(req, cumulative=state)
    assert r.rejected == {"out_of_range": 1} and r.examples == {"out_of_range": "level"}
    assert r.by_metric[("out_of_range", "level")].org == "bad"
    assert sorted((p["org_id"], p["value_int"]) for p in rows(r)) == [("a", INT64_MAX), ("b", INT64_MIN),
                                                                      ("c", 40)]  # fmt: skip
    encode_blocks(r.batch)  # as the spool stores it: every value fits its column (was OverflowError)
    assert len(r.changes) == 1  # only the kept series moved: "bad" stays at -2^63


@pytest.mark.parametrize("value", [1e308, -1e308, math.nextafter(1e288, math.inf), -1.5e288])
def test_a_double_sum_beyond_the_bound_is_rejected(value):
    """Two accepted points of 1e308 made the hourly sum +Inf."""
    req = sum_request(
        {"cost": [point(value, {"org.id": "big"}), point(2.5, {"org.id": "ok"})]}, monotonic=False
    )
    r = decode(req)
    assert r.rejected == {"out_of_range": 1}
    assert [(p["org_id"], p["value_double"]) for p in rows(r)] == [("ok", 2.5)]


def test_numbers_at_the_limits_are_kept_and_gauges_are_not_bounded():
    """At the bound (and Int64's limits) a point is usage; a gauge is never summed, so any double goes."""
    req = sum_request({"cost": [point(1e288, {"org.id": "o"}), point(-1e288, {"org.id": "o"}),
                                point(INT64_MIN, {"org.id": "o"}), point(INT64_MAX, {"org.id": "o"})]},
                      monotonic=False)  # fmt: skip
    g = req.resource_metrics[0].scope_metrics[0].metrics.add(name="temp")
    g.gauge.data_points.append(point(1e308, {"org.id": "o"}))
    r = decode(req)
    assert r.rejected_count == 0 and r.batch.size == 5
    encode_blocks(r.batch)


def test_an_out_of_range_point_is_answered_as_a_rejection_counted_and_logged(caplog):
    ing, registry, keep = kept_and_counted("out_of_range")
    req = sum_request({"cost": [point(1e300, {"org.id": "org-9"}), point(3.0, {"org.id": "org-1"})]})
    with caplog.at_level(logging.WARNING, logger="meterhouse.rejected"):
        outcome = ing.export(req, "d")
    assert outcome.kind == "partial" and outcome.response.partial_success.rejected_data_points == 1
    assert "out_of_range" in outcome.response.partial_success.error_message
    assert keep.batches[0].columns["value_double"] == [3.0]
    assert registry.get_sample_value("meterhouse_points_rejected_total", {"reason": "out_of_range"}) == 1
    (line,) = [r for r in caplog.records if r.name == "meterhouse.rejected"]
    assert (line.reason, line.metric, line.example_org, line.points) == ("out_of_range", "cost", "org-9", 1)


def histogram(counts, count, bounds=None, **fields):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="h")
    m.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    dp = m.histogram.data_points.add(time_unix_nano=time.time_ns(), count=count, **fields)
    dp.bucket_counts.extend(counts)
    dp.explicit_bounds.extend(bounds if bounds is not None else [float(i) for i in range(len(counts) - 1)])
    return req


def test_distribution_counts_are_compared_exactly_and_their_sums_stored_as_sent():
    """Bucket counts that add up past 2^64 differ from the count (a UInt64 sum would wrap onto it); a
    negative sum is what an SDK records for negative measurements, and distributions are not summed."""
    assert decode(histogram([2**64 - 1, 1], 0)).rejected == {"invalid_value": 1}
    assert decode(histogram([2**64 - 1, 2], 1)).rejected == {"invalid_value": 1}
    top = decode(histogram([2**64 - 2, 1], 2**64 - 1, sum=-1e308))
    assert top.rejected_count == 0 and top.batch.dist_columns["sum"] == [-1e308]
    encode_blocks(top.batch)
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="e")
    dp = m.exponential_histogram.data_points.add(time_unix_nano=time.time_ns(), count=0, zero_count=1)
    dp.positive.bucket_counts.extend([2**64 - 1])
    assert decode(req).rejected == {"invalid_value": 1}


def test_a_time_past_2262_is_invalid_whatever_the_window():
    """A DateTime64(9) ends at 2^63 - 1 ns (2262): a window widened past it (``--max-future-s``) took such
    a point, and the spool could not encode the batch (500)."""
    wide = Limits(max_future_ns=10**30)
    late = [
        point(1, {"org.id": "o"}, t_ns=2**64 - 1, start_ns=0),
        point(2, {"org.id": "o"}, t_ns=2**63, start_ns=0),
    ]
    r = decode(sum_request({"m": [*late, point(3, {"org.id": "o"})]}), wide)
    assert r.rejected == {"invalid_timestamp": 2} and [p["value_int"] for p in rows(r)] == [3]
    encode_blocks(r.batch)
    h = histogram([1], 1)
    h.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points[0].time_unix_nano = 2**63
    assert decode(h, wide).rejected == {"invalid_timestamp": 1}
