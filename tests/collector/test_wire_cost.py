"""What the native walker counts off a request's wire format (``count_wire``), against the same counts
taken from the parsed message: the decode budget's estimate is only as good as these counts."""

from __future__ import annotations

import random

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from meterhouse.collector.budget import Busy, DecodeBudget, TooCostly
from meterhouse.collector.decode import WireCount, count_wire, decoded_cost, python_cost


def nested(v: AnyValue, rng: random.Random, depth: int) -> None:
    kind = rng.choice(["s", "array", "kvlist"] if depth < 3 else ["s"])
    if kind == "s":
        v.string_value = "x"
    elif kind == "array":
        for _ in range(rng.randrange(4)):
            nested(v.array_value.values.add(), rng, depth + 1)
    else:
        for i in range(rng.randrange(4)):
            kv = v.kvlist_value.values.add(key=f"k{i}")
            nested(kv.value, rng, depth + 1)


def random_request(seed: int) -> ExportMetricsServiceRequest:
    rng = random.Random(seed)
    r = ExportMetricsServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rm = r.resource_metrics.add()
        for i in range(rng.randrange(3)):
            nested(rm.resource.attributes.add(key=f"r{i}").value, rng, 0)
        for _ in range(rng.randrange(1, 3)):
            sm = rm.scope_metrics.add()
            sm.scope.attributes.add(key="s").value.string_value = "v"
            for j in range(rng.randrange(1, 4)):
                m = sm.metrics.add(name=f"m{j}")
                kind = rng.choice(["gauge", "sum", "histogram", "exponential_histogram", "summary"])
                data = getattr(m, kind)
                for _ in range(rng.randrange(1, 4)):
                    dp = data.data_points.add()
                    for a in range(rng.randrange(4)):
                        nested(dp.attributes.add(key=f"a{a}").value, rng, 0)
                    if kind == "histogram":
                        dp.bucket_counts.extend([1] * rng.randrange(5))
                        dp.explicit_bounds.extend([1.0] * rng.randrange(5))
                    elif kind == "exponential_histogram":
                        dp.positive.bucket_counts.extend(
                            [rng.randrange(300) for _ in range(rng.randrange(5))]
                        )
                        dp.negative.bucket_counts.extend([0] * rng.randrange(5))
                    elif kind == "summary":
                        for _ in range(rng.randrange(3)):
                            dp.quantile_values.add(quantile=0.5, value=1.0)
                    if kind != "summary":
                        for _ in range(rng.randrange(3)):
                            dp.exemplars.add().filtered_attributes.add(key="e").value.string_value = "v"
    return r


def elements(v: AnyValue) -> int:
    which = v.WhichOneof("value")
    if which == "array_value":
        return sum(1 + elements(x) for x in v.array_value.values)
    if which == "kvlist_value":
        return sum(1 + elements(kv.value) for kv in v.kvlist_value.values)
    return 0


def attributes(attrs) -> int:
    return sum(1 + elements(kv.value) for kv in attrs)


def expected(r: ExportMetricsServiceRequest) -> WireCount:
    points = numbers = values = 0
    for rm in r.resource_metrics:
        values += 1 + attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            values += 1 + attributes(sm.scope.attributes)
            for m in sm.metrics:
                values += 1
                kind = m.WhichOneof("data")
                for dp in getattr(m, kind).data_points:
                    points += 1
                    values += attributes(dp.attributes)
                    if kind == "histogram":
                        numbers += len(dp.bucket_counts) + len(dp.explicit_bounds)
                    elif kind == "exponential_histogram":
                        numbers += len(dp.positive.bucket_counts) + len(dp.negative.bucket_counts)
                    elif kind == "summary":
                        values += 2 * len(dp.quantile_values)
                    if kind != "summary":
                        values += sum(1 + attributes(e.filtered_attributes) for e in dp.exemplars)
    return WireCount(points, numbers, values)


def test_the_walker_counts_what_the_parsed_message_holds():
    for seed in range(300):
        r = random_request(seed)
        assert count_wire(r.SerializeToString()) == expected(r), seed


def test_bytes_that_are_not_a_request_are_not_counted():
    assert count_wire(b"\x0a\xff\xff") is None  # a length past the end
    assert count_wire(b"\x0b") is None  # a group: protobuf's, not the walker's


def test_a_request_costing_more_than_the_whole_budget_is_refused_before_it_is_decoded():
    r = random_request(1)
    dp = r.resource_metrics[0].scope_metrics[0].metrics.add(name="e").exponential_histogram.data_points.add()
    dp.positive.bucket_counts.extend([0] * 1_000_000)  # a megabyte on the wire, 40 MB counted
    body = r.SerializeToString()
    assert decoded_cost(body) < python_cost(body)
    budget = DecodeBudget(capacity=python_cost(body) - 1)
    with budget.hold(decoded_cost(body)) as hold:
        try:
            hold.grow(python_cost(body))
        except TooCostly as e:
            assert "more than one request may of the decode budget" in str(e)
        else:
            raise AssertionError("a share past the capacity was granted")
    assert budget.used == 0


def test_large_requests_leave_the_last_quarter_of_the_budget_to_small_ones():
    """Requests each costing almost what one may take, beside a one-point request: the small one is
    granted at once (it waited with them before, and got 503 when it lost the race for 10 s)."""
    budget = DecodeBudget(capacity=100, wait_s=0.05)
    with budget.hold(70):
        try:
            with budget.hold(30):  # large: 100 > the large ones' three quarters
                raise AssertionError("a large request took the last quarter")
        except Busy:
            pass
        with budget.hold(25):  # small: granted from the last quarter
            assert budget.used == 95
    try:
        budget.hold(76).__enter__()
    except TooCostly as e:
        assert e.most == 75
    else:
        raise AssertionError("a request over three quarters was granted")


def test_a_resource_s_entity_references_are_counted():
    """Resource field 3, a message each that protobuf parses (an adversary sent 9.9 million empty ones:
    counted as bytes, 732 MiB decoded, the process OOM-killed)."""
    from google.protobuf.internal.encoder import _VarintBytes

    r = random_request(2)
    resource = b"\x1a\x00" * 1000 + b"\x1a\x06\x1a\x01k\x1a\x01j"  # 1,000 empty, one with two id keys
    rm = b"\x0a" + _VarintBytes(len(resource)) + resource
    body = r.SerializeToString() + b"\x0a" + _VarintBytes(len(rm)) + rm
    base = expected(r)
    assert count_wire(body) == WireCount(base.points, base.numbers, base.values + 1 + 1001 + 2)


def test_otlp_json_arrays_and_list_elements_are_counted():
    """``[]`` in a field no message has is a list that json.loads builds before it is ignored; a number
    in a list is a float and a slot (an adversary's 6.6 million empty arrays: counted 76 MiB, 470 MiB
    decoded)."""
    empty_lists = b'{"resourceMetrics":[],"x":[' + b",".join([b"[]"] * 100_000) + b"]}"
    assert decoded_cost(empty_lists, protobuf=False) >= 100_000 * 300
    numbers = b'{"resourceMetrics":[],"x":[' + b",".join([b"1.5"] * 100_000) + b"]}"
    assert decoded_cost(numbers, protobuf=False) >= 100_000 * 60
