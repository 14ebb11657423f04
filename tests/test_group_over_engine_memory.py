"""A request the engine can never insert within its memory share must not hold up everyone's usage.

The attribute-cardinality rollup (``attribute_cardinality_hourly_mv``) ARRAY JOINed each point's attribute
keys and copied the point's org onto every one: 127 attributes and a 4,096-character org (the bounds
allow both, the org here on the resource) made each point 127 copies of its org inside the insert. 3,000
such points are a 6 MB body, 29 MB as stored (under the stored bound of 32 MiB then): inside every
bound, so the request was acknowledged; its insert then needed more than the engine's whole share (256
MiB at the default budget) and failed MEMORY_LIMIT_EXCEEDED on every try. The writer retries a memory
failure for as long as it takes, so the group was retried forever and no later group was written.

Now no view copies the org per attribute (tests/core/test_attribute_cardinality.py), and a request's
stored bound is a twelfth of the engine's share (21 MiB at the default budget), what one insert can
take: 3,000 such points are refused 413, and 2,000 (19 MB stored) are stored."""

from __future__ import annotations

import time

import pytest
import requests
from otlp_builders import point, sum_request

from meterhouse.demo import fetch_usage

PROTOBUF = {"Content-Type": "application/x-protobuf"}


def wide_points_request(points: int, attributes: int, org_length: int) -> bytes:
    pts = [point(1, {f"k{j:03}": str(i) for j in range(attributes)}) for i in range(points)]
    return sum_request({"attack.wide": pts}, resource={"org.id": "o" * org_length}).SerializeToString()


def assert_honest_usage_written(up, seconds: float = 60) -> None:
    """A one-point request of an honest org sent now is acknowledged and stored within ``seconds``."""
    honest = sum_request({"honest.calls": [point(5, {"org.id": "org-honest"})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=honest, headers=PROTOBUF, timeout=60)
    assert r.status_code == 200, (r.status_code, r.content[:300])
    now = int(time.time())
    window = (now // 3600 * 3600 - 7200, (now // 3600 + 2) * 3600)
    deadline = time.monotonic() + seconds
    stored = 0
    while time.monotonic() < deadline and stored != 5:
        stored = fetch_usage(up.api, "org-honest", "honest.calls", *window, "1h")["total"]
        time.sleep(0.5)
    failures = [line[:300] for line in up.output().splitlines() if "insert failed" in line]
    assert stored == 5, (
        f"honest usage not written in {seconds:g} s; {len(failures)} insert failures: {failures[:2]}"
    )


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.parametrize("points, status", [(3000, 413), (2000, 200)])
def test_a_group_over_the_engine_memory_share_does_not_stall_honest_usage(up, points, status):
    attack = wide_points_request(points, 127, 4096)
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=attack, headers=PROTOBUF, timeout=60)
    assert r.status_code == status, (r.status_code, r.content[:300])
    assert_honest_usage_written(up)
    up.drain(
        timeout_s=60
    )  # nothing pending: the accepted request is written too (the API takes shorter orgs)
