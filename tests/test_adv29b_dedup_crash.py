"""Adversary 29b: a pinned digest comes back unpinned after a crash, so it can be evicted and the folded
points of a re-sent copy count twice.

``RecentRequests.add(..., pinned=True)`` writes ``<t> <digest> p`` to the digests file through Python's
buffer and fsyncs only in ``sync()``, which runs when points are committed. A request whose points are
still in the spool when the process dies (SIGKILL, OOM kill, power loss: here the ClickHouse endpoint is
down, so nothing commits) loses that line; on start ``load`` takes the digests of the spool's records as
*unpinned* (``extra``: ``(t, d, False)``), and ``committed()`` then writes them unpinned. The digest of a
request holding folded points, which the dedup must keep for the whole window, is an ordinary one for
the rest of it: the next N requests (the dedup's bound) evict it, and a re-sent copy counts its folded
points again (as ``tests/test_adv28_dedup_eviction.py`` showed before pinning: 11 stored where 7 sent).
"""

from __future__ import annotations

import signal
import time

import pytest
import requests
from otlp_builders import histogram_request
from test_delivery import FAST, faults, metric, wait

from meterhouse.collector.model import content_digest

pytestmark = pytest.mark.e2e
SEC = 10**9
ORG = "org-adv29b"
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def test_the_digest_of_a_spooled_request_with_folded_points_is_still_pinned_after_a_crash(
    up_factory, tmp_path
):
    ff = faults(tmp_path)
    up = up_factory("--clickhouse-url", "embedded#main", "--series-per-org-metric", "1", *FAST, faults=ff)
    url = f"{up.otlp_http}/v1/metrics"
    t = time.time_ns() - 30 * SEC
    # a=1 is the org's one series; a=2, past the limit, is folded (the store asked once whether it holds
    # the set: a set not yet seen by this process needs the store, as a new org and metric does).
    first = histogram_request(
        [(1, {"org.id": ORG, "a": "1"}), (2, {"org.id": ORG, "a": "2"})], "adv29b.crash", t
    )
    assert requests.post(url, data=first.SerializeToString(), headers=PROTOBUF, timeout=30).status_code == 200
    up.drain()
    faults(tmp_path, "embedded#main")
    wait(lambda: metric(up, "meterhouse_endpoint_up", endpoint="embedded#main") == 0)
    # A folded histogram point: identity cannot check it, so its request's digest is pinned.
    folded = histogram_request([(5, {"org.id": ORG, "a": "2"})], "adv29b.crash", t + SEC)
    body = folded.SerializeToString()
    r = requests.post(url, data=body, headers=PROTOBUF, timeout=30)
    assert r.status_code == 200, r.text  # spooled: its digest is pinned now
    assert metric(up, "meterhouse_series_folded_total") == 2
    up.stop(signal.SIGKILL)
    faults(tmp_path)
    again = up_factory("--clickhouse-url", "embedded#main", "--series-per-org-metric", "1", *FAST,
                       faults=ff, data_dir=up.data_dir, ports_of=up)  # fmt: skip
    again.drain()
    digest = content_digest(body)
    lines = [
        line
        for line in (up.data_dir / "spool" / "recent-requests.log").read_text().splitlines()
        if digest in line
    ]
    assert any(line.endswith(" p") for line in lines), (
        f"after SIGKILL and restart the digest of the acknowledged request with a folded point is kept as "
        f"{lines} (no ' p': evictable by the dedup's bound within the window)"
    )
