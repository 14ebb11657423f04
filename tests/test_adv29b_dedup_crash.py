"""Adversary 29b: a pinned digest came back unpinned after a crash, so it could be evicted and the folded
points of a re-sent copy counted twice.

Earlier versions pinned the digest of a request with folded distribution points, which point identity
could not check, and wrote the pin to the digests file through Python's buffer, fsync'd only when points
were committed: a SIGKILL while the request's points were still in the spool lost the pin, and the
digest, an ordinary one again, was evicted within the window (11 stored where 7 were sent). A folded
point now keeps its own set's fingerprint and is checked by identity whatever request brings it: here it
is killed while spooled, and re-sent after the restart re-batched with a new point (another digest).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import requests
from otlp_builders import histogram_request
from test_delivery import FAST, faults, metric, wait

pytestmark = pytest.mark.e2e
SEC = 10**9
ORG = "org-adv29b"
PROTOBUF = {"Content-Type": "application/x-protobuf"}
READ = r"""
import sys
from pathlib import Path
from meterhouse.core.store import connect
s = connect("embedded", Path(sys.argv[1]), "meterhouse")
print(int(s.scalar("SELECT sum(count) FROM meterhouse.distribution_points WHERE metric = 'adv29b.crash'")))
"""


def test_a_folded_point_spooled_before_a_crash_counts_once_when_resent_in_another_request(
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
    # A folded histogram point, spooled and not yet written when the process is killed.
    folded = histogram_request([(5, {"org.id": ORG, "a": "2"})], "adv29b.crash", t + SEC)
    body = folded.SerializeToString()
    r = requests.post(url, data=body, headers=PROTOBUF, timeout=30)
    assert r.status_code == 200, r.text  # spooled
    assert metric(up, "meterhouse_series_folded_total") == 2
    up.stop(signal.SIGKILL)
    faults(tmp_path)
    again = up_factory("--clickhouse-url", "embedded#main", "--series-per-org-metric", "1", *FAST,
                       faults=ff, data_dir=up.data_dir, ports_of=up)  # fmt: skip
    again.drain()
    # The forwarder re-sends the folded point re-batched with a new one (another digest): the folded
    # point is a repeat, recognised by its identity (its own set's fingerprint is stored with it).
    rebatched = histogram_request(
        [(5, {"org.id": ORG, "a": "2"}), (7, {"org.id": ORG, "a": "3"})], "adv29b.crash", t + SEC
    )
    r = requests.post(url, data=rebatched.SerializeToString(), headers=PROTOBUF, timeout=30)
    assert r.status_code == 200, r.text
    again.drain()
    again.stop()
    out = subprocess.run([sys.executable, "-c", READ, str(up.data_dir)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == 1 + 2 + 5 + 7, out.stdout
