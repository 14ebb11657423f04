"""Requests whose decoded form costs far more than the decode budget counts for them (collector/decode.py
``decoded_cost``: 1.2 kB a data point plus the body's bytes), sent at a real `meterhouse up` inside a
memory cgroup limited to its memory budget, beside honest senders: the process must stay inside the
budget (no OOM kill, anonymous memory at most the budget) and store every point it acknowledged.

Each request here is one data point and a body under ``--max-request-bytes``, so every bound but the
decode budget lets it through to the decoder; gzip makes each body a few kilobytes on the wire, so the
bytes in flight do not hold them back either."""

from __future__ import annotations

import gzip
import signal
import threading
import time
from collections.abc import Callable

import pytest
import requests
from hostile_mix import (
    PROTOBUF,
    AnonPeak,
    Answers,
    HostileMix,
    MemoryCgroup,
    Tally,
    cgroup_unavailable,
    summary,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from otlp_builders import point, sum_request

from meterhouse.demo import fetch_usage

BUDGET = 1 << 30  # the default --memory-budget-bytes
MAX_REQUEST_BYTES = 20 << 20  # the default --max-request-bytes


def exp_histogram_request(buckets: int) -> bytes:
    """One exponential histogram point with ``buckets`` zero counts: one byte each on the wire (a packed
    varint), eight in the parsed message and eight more in the decoder's list."""
    r = ExportMetricsServiceRequest()
    m = r.resource_metrics.add().scope_metrics.add().metrics.add()
    m.name = "attack.exp"
    m.exponential_histogram.aggregation_temporality = 1
    dp = m.exponential_histogram.data_points.add()
    dp.time_unix_nano = time.time_ns()
    dp.attributes.add(key="org.id").value.string_value = "org-attack"
    dp.positive.bucket_counts.extend([0] * buckets)
    return r.SerializeToString()


def array_attribute_request(values: int) -> bytes:
    """One sum point whose one attribute is an array of ``values`` empty values: two bytes each on the
    wire, a message each when parsed, a Python value each in ``_plain`` and four characters of JSON text,
    all built before the attribute's length is checked."""
    r = ExportMetricsServiceRequest()
    m = r.resource_metrics.add().scope_metrics.add().metrics.add()
    m.name = "attack.array"
    m.sum.aggregation_temporality = 1
    m.sum.is_monotonic = True
    dp = m.sum.data_points.add()
    dp.time_unix_nano = time.time_ns()
    dp.as_int = 1
    dp.attributes.add(key="org.id").value.string_value = "org-attack"
    dp.attributes.add(key="a").value.array_value.values.extend([AnyValue() for _ in range(values)])
    return r.SerializeToString()


def json_empty_points_request(points: int) -> bytes:
    """OTLP/JSON of one gauge with ``points`` empty data points: three bytes each on the wire, a dict, a
    message and a refusal each once parsed. Over ``--max-points-per-request``, but OTLP/JSON is counted
    only once parsed and decoded whole."""
    head = '{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"attack.json","gauge":{"dataPoints":['
    return (head + ",".join(["{}"] * points) + "]}}]}]}]}").encode()


def run_attack(
    up_factory,
    body: bytes | Callable[[], bytes],
    senders: int,
    seconds: float,
    ctype: dict[str, str] = PROTOBUF,
) -> None:
    """``body`` is sent as it is, or made anew for each request (so that no copy is taken for a re-sent
    one and answered without being decoded)."""
    why = cgroup_unavailable()
    if why:
        pytest.skip(why)
    make = body if callable(body) else None
    gz = b"" if make else gzip.compress(body, compresslevel=9)
    assert make or len(body) < MAX_REQUEST_BYTES
    cgroup = MemoryCgroup(BUDGET)
    up = None
    try:
        up = up_factory("--memory-budget-bytes", str(BUDGET), cgroup=cgroup.path)
        anon = AnonPeak(up.proc.pid)
        mix = HostileMix.__new__(HostileMix)  # only its honest senders and tally: no hostile bodies built
        mix.http_url, mix.grpc_target = up.otlp_http, up.otlp_grpc
        mix.stop_event = threading.Event()
        mix.answers, mix.tally, mix.threads = Answers(), Tally(), []
        headers = {**ctype, "Content-Encoding": "gzip"}

        def attack() -> None:
            while not mix.stop_event.is_set():
                try:
                    data = gzip.compress(make(), compresslevel=1) if make else gz
                    r = requests.post(f"{up.otlp_http}/v1/metrics", data=data, headers=headers, timeout=120)
                    mix.answers.add("attack", r.status_code)
                except requests.RequestException as e:
                    mix.answers.add("attack", type(e).__name__)
                    time.sleep(0.2)

        for _ in range(senders):
            # Not joined: an attack's request may take minutes; the process is killed at the end.
            threading.Thread(target=attack, daemon=True).start()
        mix.start_honest()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and up.proc.poll() is None:
            time.sleep(0.5)
        peak = anon.stop()
        died = up.proc.poll()
        mix.stop_event.set()
        assert died is None and cgroup.oom_kills() == 0, (
            f"meterhouse up died ({cgroup.oom_kills()} OOM kills, exit {died}), peak anonymous memory "
            f"{peak >> 20} MiB: {summary(mix)}"
        )
        print(f"peak anonymous memory {peak >> 20} MiB before stopping: {summary(mix)}")
        mix.stop()
        up.drain(timeout_s=120)
        print(f"peak anonymous memory {peak >> 20} MiB: {summary(mix)}")
        assert peak <= BUDGET, f"peak anonymous memory {peak >> 20} MiB: {summary(mix)}"
        now = int(time.time())
        window = (now // 3600 * 3600 - 7200, (now // 3600 + 2) * 3600)
        for org, acknowledged in mix.tally.acknowledged.items():
            stored = fetch_usage(up.api, org, "honest.calls", *window, "1h")["total"]
            assert stored == acknowledged, (org, stored, acknowledged, summary(mix))
    finally:
        if up is not None and up.proc is not None:
            up.stop(signal.SIGKILL)
        cgroup.remove()


@pytest.mark.soak  # the default suite has the walker's counts (tests/collector/test_wire_cost.py)
@pytest.mark.timeout(300)
def test_exponential_histogram_buckets_keep_the_process_in_its_budget(up_factory):
    """16 senders of one exponential histogram point of 20 million zero buckets (20 MB, 20 kB gzipped)."""
    run_attack(up_factory, exp_histogram_request(20_000_000), senders=16, seconds=15)


@pytest.mark.soak  # the default suite has the walker's counts (tests/collector/test_wire_cost.py)
@pytest.mark.timeout(300)
def test_array_attribute_values_keep_the_process_in_its_budget(up_factory):
    """8 senders of one point whose attribute is an array of 10 million empty values (20 MB, 20 kB gzipped)."""
    run_attack(up_factory, array_attribute_request(10_000_000), senders=8, seconds=15)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_json_empty_points_keep_the_process_in_its_budget(up_factory):
    """2 senders of OTLP/JSON with 6.9 million empty data points (20 MB, 30 kB gzipped): a minute, as
    parsing one took that long before it was refused (the default suite has the quick case below)."""
    body = json_empty_points_request(6_900_000)
    run_attack(up_factory, body, senders=2, seconds=60, ctype={"Content-Type": "application/json"})


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_one_json_request_does_not_shut_out_honest_senders(up_factory):
    """One OTLP/JSON request (30 kB gzipped) of 6.9 million empty points is parsed whole before its points
    are counted; it costs more than the whole decode budget, so it takes all of it for as long as it is
    parsed (over a minute of CPU). An honest one-point request sent meanwhile must still be taken."""
    up = up_factory()
    gz = gzip.compress(json_empty_points_request(6_900_000), compresslevel=9)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    attack = threading.Thread(
        target=lambda: requests.post(f"{up.otlp_http}/v1/metrics", data=gz, headers=headers, timeout=300),
        daemon=True,
    )
    attack.start()
    time.sleep(2)  # the attack's body is complete and being parsed
    honest = sum_request({"honest.calls": [point(1, {"org.id": "org-honest"})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=honest, headers=PROTOBUF, timeout=60)
    assert r.status_code == 200, (r.status_code, r.headers, r.content[:300])
