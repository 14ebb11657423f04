"""One sender cannot stop the others: a real `meterhouse up` in a real memory cgroup limited to its memory
budget, under the hostile mix of tests/hostile_mix.py beside honest senders (raw and the real SDK): it
is never OOM-killed, its anonymous memory peaks inside the budget, no sender gets a 5xx, and every point
the honest senders had acknowledged is stored."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hostile_mix import AnonPeak, HostileMix, MemoryCgroup, SdkSenders, cgroup_unavailable, summary

from meterhouse.demo import fetch_usage

BUDGET = 1 << 30  # the default --memory-budget-bytes


def run_mix(up_factory, seconds: float, budget: int = BUDGET) -> None:
    why = cgroup_unavailable()
    if why:
        pytest.skip(why)
    cgroup = MemoryCgroup(budget)
    up = None
    try:
        up = up_factory("--memory-budget-bytes", str(budget), cgroup=cgroup.path)
        anon = AnonPeak(up.proc.pid)
        mix = HostileMix(up.otlp_http, up.otlp_grpc, 20 << 20)
        mix.start_hostile()
        mix.start_honest()
        sdk = SdkSenders(up.otlp_http, up.otlp_grpc)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert up.proc.poll() is None, (
                f"meterhouse up died ({cgroup.oom_kills()} OOM kills): {summary(mix)}"
            )
            time.sleep(1)
        mix.stop()
        counted = sdk.stop()
        assert up.proc.poll() is None and cgroup.oom_kills() == 0, summary(mix)
        backlog = up.pending_points()
        # The mix spools faster than 2 shared cores write (a backlog of 2-4 million points after 10
        # minutes): what is acknowledged is written after it, however long the mix ran.
        up.drain(timeout_s=max(600.0, 3 * seconds))
        peak = anon.stop()
        now = int(time.time())
        window = (now // 3600 * 3600 - 7200, (now // 3600 + 2) * 3600)
        for org, acknowledged in mix.tally.acknowledged.items():
            stored = fetch_usage(up.api, org, "honest.calls", *window, "1h")["total"]
            assert stored == acknowledged, (org, stored, acknowledged, summary(mix))
        assert len(mix.tally.acknowledged) == 2, summary(mix)
        for org, n in counted.items():  # what the SDK's application counted, all delivered
            assert fetch_usage(up.api, org, "honest.sdk", *window, "1h")["total"] == n, (org, n, summary(mix))
        assert not mix.answers.server_errors(), summary(mix)
        print(
            f"peak anonymous memory {peak >> 20} MiB, cgroup peak {cgroup.peak_bytes() >> 20} MiB, backlog "
            f"{backlog:,.0f} points when the mix stopped: {summary(mix)}"
        )
        assert peak <= budget
        assert up.stop() == 0
    finally:
        if up is not None and up.proc is not None:
            up.stop(signal.SIGKILL)
        cgroup.remove()


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_hostile_mix_in_a_memory_cgroup_keeps_honest_usage(up_factory):
    run_mix(up_factory, seconds=float(os.environ.get("MH_HOSTILE_S", "12")))


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_hostile_mix_soak(up_factory):
    """The same for ten minutes (MH_HOSTILE_SOAK_S): `bash scripts/test.sh -m soak tests/test_hostile_mix.py`."""
    run_mix(up_factory, seconds=float(os.environ.get("MH_HOSTILE_SOAK_S", "600")))
