"""Numbers that do not fit are rejections, never a 5xx: OTLP/HTTP and gRPC to a real `meterhouse up`.

A point whose number cannot be kept (a cumulative int whose delta is beyond Int64, a double sum beyond
±1e288, whose sums could reach ±Inf) is rejected as ``out_of_range``: answered with partial success,
counted and logged, while the other orgs' points of the same request are stored exactly, in the raw
table and the hourly rollup. Before, the int case was answered 500 on every re-send (the batch did not fit
its Int64 column) and took the whole request with it; the double cases were stored and made the hourly
sums ±Inf.
"""

import json
import signal
import time

import grpc
import pytest
import requests
from conftest import UpProcess
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from otlp_builders import CUMULATIVE, point, sum_request

from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
PB = {"Content-Type": "application/x-protobuf"}
EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The largest magnitude of a double sum point (README, Validation; ``schema.MAX_SUM_DOUBLE``).
BOUND = 1e288


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    p = UpProcess(tmp_path_factory.mktemp("numbers") / "data")
    p.start()
    yield p
    p.stop(signal.SIGKILL)


def send(up: UpProcess, transport: str, req: ExportMetricsServiceRequest) -> ExportMetricsServiceResponse:
    """One export; a 5xx (or a gRPC error) fails the test with what the server said."""
    body = req.SerializeToString()
    if transport == "http":
        r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=PB, timeout=30)
        assert r.status_code == 200, (r.status_code, r.content[:300])
        return ExportMetricsServiceResponse.FromString(r.content)
    with grpc.insecure_channel(up.otlp_grpc) as channel:
        return ExportMetricsServiceResponse.FromString(channel.unary_unary(EXPORT)(body, timeout=30))


def merged(*requests_: ExportMetricsServiceRequest) -> ExportMetricsServiceRequest:
    """One request holding every resource of the given ones (a gateway's batch of many senders)."""
    out = ExportMetricsServiceRequest()
    for req in requests_:
        out.resource_metrics.extend(req.resource_metrics)
    return out


def cumulative(metric: str, org: str, value, t_ns: int, start_ns: int, monotonic: bool = False):
    return sum_request({metric: [point(value, {"org.id": org}, t_ns, start_ns)]}, temporality=CUMULATIVE,
                       monotonic=monotonic)  # fmt: skip


def stored(up: UpProcess, org: str, metric: str) -> tuple[object, object]:
    """(rollup total, raw total) of one org's metric around now: the hourly rollup (``1h``) and the raw
    points (``1m``)."""
    up.drain()
    now = int(time.time())
    lo, hi = now // 3600 * 3600 - 3600, (now // 3600 + 2) * 3600
    rollup = fetch_usage(up.api, org, metric, lo, hi, "1h")
    raw = fetch_usage(up.api, org, metric, lo, hi, "1m")
    assert (rollup["source"], raw["source"]) == ("rollup", "raw")
    return rollup["total"], raw["total"]


def rejected(answer: ExportMetricsServiceResponse) -> tuple[int, str]:
    return answer.partial_success.rejected_data_points, answer.partial_success.error_message


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize(
    ("first", "then"), [(INT64_MIN, INT64_MAX), (INT64_MAX, INT64_MIN)], ids=["up", "down"]
)
def test_a_cumulative_int_delta_beyond_int64_is_rejected_and_the_other_orgs_points_are_stored(
    up, transport, first, then
):
    """A non-monotonic cumulative int sum from -2^63 to 2^63 - 1 (or back) moves by 2^64 - 1: no Int64
    holds that delta. Was 500 "internal error" on every re-send, the other orgs' points lost with it."""
    tag = f"{transport}-{'up' if first < then else 'down'}"
    now = time.time_ns()
    start = now - 60 * 10**9
    bad_org = f"bad-{tag}"
    earlier = cumulative("n.level", bad_org, first, now - 2 * 10**9, start)
    assert rejected(send(up, transport, earlier)) == (0, "")
    a_points = [point(INT64_MAX, {"org.id": f"a-{tag}"}, now - 10**9 + i) for i in range(2)]
    others = [
        # Another org's delta points at the Int64 limits: exact in the raw table and the rollup.
        sum_request({"n.calls": a_points}),
        sum_request({"n.calls": [point(INT64_MIN, {"org.id": f"b-{tag}"}, now - 10**9)]}, monotonic=False),
        # Another org's cumulative series, converted beside the rejected one.
        cumulative("n.level", f"c-{tag}", 40, now - 10**9, start),
    ]
    req = merged(others[0], cumulative("n.level", bad_org, then, now - 10**9, start), *others[1:])
    n, message = rejected(send(up, transport, req))
    assert n == 1 and "out_of_range" in message and "n.level" in message, message
    assert rejected(send(up, transport, req)) == (0, "")  # the same bytes again: already stored, not twice
    assert stored(up, f"a-{tag}", "n.calls") == (2 * INT64_MAX, 2 * INT64_MAX)
    assert stored(up, f"b-{tag}", "n.calls") == (INT64_MIN, INT64_MIN)
    assert stored(up, f"c-{tag}", "n.level") == (40, 40)
    # The rejected point left the series where its last stored point was: the next point is measured
    # from there (from -2^63, 0 is 2^63 away, still beyond Int64; -5 is not).
    assert stored(up, bad_org, "n.level") == (first, first)
    nxt = cumulative("n.level", bad_org, first + (5 if first < 0 else -5), now, start)
    assert rejected(send(up, transport, nxt)) == (0, "")
    assert stored(up, bad_org, "n.level") == (first + (5 if first < 0 else -5),) * 2


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_double_sums_whose_hourly_sum_could_reach_infinity_are_rejected(up, transport):
    """Two finite points of 1e308 in one hour summed to +Inf in the rollup and in every total read from the
    raw points; a non-monotonic cumulative double from -1e288 to 1e288 made a delta of 2e288. Each is
    rejected now; the bound is ±1e288 a point, so 2^64 points (the rollups count them in a UInt64) sum
    to 1.8e307 at most."""
    now = time.time_ns()
    start = now - 60 * 10**9
    bound = BOUND
    earlier = cumulative("d.level", f"bad-{transport}", -bound, now - 2 * 10**9, start)
    assert rejected(send(up, transport, earlier)) == (0, "")
    req = merged(
        sum_request({"d.cost": [point(1e308, {"org.id": f"big-{transport}"}, now - 10**9),
                                point(1e308, {"org.id": f"big-{transport}"}, now - 10**9 + 1)]}),
        sum_request({"d.cost": [point(2.5, {"org.id": f"ok-{transport}"}, now - 10**9),
                                point(bound, {"org.id": f"ok-{transport}"}, now - 10**9 + 1)]}),
        cumulative("d.level", f"bad-{transport}", bound, now - 10**9, start),
        cumulative("d.level", f"ok-{transport}", 7.25, now - 10**9, start),
    )  # fmt: skip
    n, message = rejected(send(up, transport, req))
    assert n == 3 and "3 out_of_range" in message, message
    assert stored(up, f"big-{transport}", "d.cost") == (0, 0)
    assert stored(up, f"ok-{transport}", "d.cost") == (bound + 2.5, bound + 2.5)
    assert stored(up, f"ok-{transport}", "d.level") == (7.25, 7.25)
    assert stored(up, f"bad-{transport}", "d.level") == (-bound, -bound)


def test_out_of_range_rejections_are_counted_and_logged(up):
    """After the cases above: counted under their reason, and one log line per metric with an org."""
    now = time.time_ns()
    req = sum_request({"d.cost": [point(-1e300, {"org.id": "org-log"}, now)]}, monotonic=False)
    assert rejected(send(up, "http", req))[0] == 1
    text = requests.get(f"{up.api}/metrics", timeout=10).text
    (line,) = [
        x
        for x in text.splitlines()
        if x.startswith('meterhouse_points_rejected_total{reason="out_of_range"}')
    ]
    assert float(line.rsplit(" ", 1)[1]) >= 1
    lines = [json.loads(x) for x in up.output().splitlines() if '"data points rejected"' in x]
    entries = [e for e in lines if e["reason"] == "out_of_range"]
    assert {e["metric"] for e in entries} >= {"d.cost"}, lines
    assert all(e["level"] == "warning" and e["example_org"] and e["points"] >= 1 for e in entries)
