"""The cumulative→delta state (collector/cumulative.py, ``CumulativeState``) keeps up to 2,000,000 series
in memory (``max_entries``, not a share of ``--memory-budget-bytes``), about 440 bytes each (an
``Entry`` dataclass, its ints and the dict slot; measured with Python on malloc): 880 MB at its bound,
more than "the rest" of a 1 GiB budget holds. Against a real `meterhouse up` in a 1 GiB memory cgroup."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import requests
from hostile_mix import PROTOBUF, AnonPeak, MemoryCgroup, cgroup_unavailable
from otlp_builders import CUMULATIVE, point, sum_request

BUDGET = 1 << 30  # the default --memory-budget-bytes


@pytest.mark.e2e
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_many_cumulative_series_keep_the_process_in_its_budget(up_factory):
    """Requests of 50,000 new cumulative series each (one point per series; the resource differs per
    request, so every series is new), sent one after another until 2.2 million series: every answer is
    200 and the state keeps every series (none is evicted below the bound). On main: OOM-killed in its
    cgroup (peak anonymous memory 1,016 MiB) after 40 requests, 2,000,000 series acknowledged, in about
    3 minutes."""
    why = cgroup_unavailable()
    if why:
        pytest.skip(why)
    now = time.time_ns()
    request = sum_request(
        {
            "attack.cumulative": [
                point(1, {"org.id": "org-attack", "i": str(i)}, t_ns=now, start_ns=now - 10**9)
                for i in range(50_000)
            ]
        },  # fmt: skip
        temporality=CUMULATIVE,
    )
    cgroup = MemoryCgroup(BUDGET)
    up = None
    try:
        up = up_factory("--memory-budget-bytes", str(BUDGET), cgroup=cgroup.path)
        anon = AnonPeak(up.proc.pid)
        sent, answers = 0, {}
        while sent < 2_200_000 and up.proc.poll() is None:
            request.resource_metrics[0].resource.attributes[0].value.string_value = uuid.uuid4().hex
            try:
                r = requests.post(f"{up.otlp_http}/v1/metrics", data=request.SerializeToString(),
                                  headers=PROTOBUF, timeout=120)  # fmt: skip
            except requests.RequestException as e:
                answers[type(e).__name__] = answers.get(type(e).__name__, 0) + 1
                continue
            answers[r.status_code] = answers.get(r.status_code, 0) + 1
            if r.status_code == 200:
                sent += 50_000
            else:
                time.sleep(1)
        time.sleep(2)
        peak, died = anon.stop(), up.proc.poll()
        assert died is None and cgroup.oom_kills() == 0, (
            f"meterhouse up died ({cgroup.oom_kills()} OOM kills, exit {died}) after {sent:,} cumulative "
            f"series acknowledged; peak anonymous memory {peak >> 20} MiB; answers {answers}"
        )
        assert peak <= BUDGET, f"peak anonymous memory {peak >> 20} MiB after {sent:,} series; {answers}"
    finally:
        if up is not None and up.proc is not None:
            up.stop(signal.SIGKILL)
        cgroup.remove()
