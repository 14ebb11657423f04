"""Adversary 37: a query process's mirror outlives its collector when the SQL endpoint is turned off.

Claim (README "SQL endpoint", brief 37 claims 3 and 4): the mirror under ``<data_dir>/sql-workers/`` must
not hold the disk space of removed parts for long, and nothing leaves ``sql-workers/`` mirrors holding disk
space forever. Only a ``Spawner`` removes ``sql-workers/`` (at its start and at a clean shutdown), and a
``Spawner`` is made only when ``--sql-port`` is on.

What I did: ``meterhouse up --sql-port P`` (a real subprocess), 30 OTLP/HTTP posts (30 parts), one SQL
query (its process mirrors every part as hard links); then the collector SIGKILLed (an OOM kill, a
crash: its query process dies with it, the mirror stays) and started again on the same data directory
with the SQL endpoint off (``--sql-port 0``, also the tests' default). 60 more posts; the collector
merges its parts and removes the merged-away ones.

Measured: ``sql-workers/`` is still there after the restart and nothing removes it while the collector
runs; within seconds 26 files (17,728 bytes) of parts the collector had merged away were held by the
stale mirror alone (link count 1). It links every part the first run had when it was killed, so in a real
deployment it holds up to the whole data set of that moment, until someone deletes the folder by hand
(or restarts with the SQL endpoint on).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import requests
from conftest import free_port
from otlp_builders import point, sum_request


def _post(up, value: int, org: str) -> None:
    now = time.time_ns()
    req = sum_request({"adv37.calls": [point(value, {"org.id": org}, t_ns=now, start_ns=now - 10**9)]})
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=req.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text


def _held_only_by_mirror(workers: Path) -> tuple[int, int]:
    """(files, bytes) under ``workers`` whose only link is the mirror's."""
    files = size = 0
    for root, _dirs, names in os.walk(workers):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if st.st_nlink == 1:
                files += 1
                size += st.st_size
    return files, size


def test_adv37_a_stale_mirror_is_kept_forever_when_the_sql_endpoint_is_off(up_factory, tmp_path):
    data = tmp_path / "data"
    port = free_port()
    first = up_factory("--sql-port", str(port), data_dir=data)
    for i in range(30):
        _post(first, i + 1, f"org-{i % 3}")
    first.drain()
    r = requests.post(f"http://127.0.0.1:{port}/", data=b"SELECT count() FROM meterhouse.usage_points",
                      timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    workers = data / "sql-workers"
    assert any(p.is_file() for p in workers.rglob("*")), "the query process mirrored nothing"
    first.stop(signal.SIGKILL)

    second = up_factory(data_dir=data)  # the SQL endpoint off (--sql-port 0)
    for i in range(60):
        _post(second, 1, f"org-{i % 3}")
    second.drain()
    deadline = time.monotonic() + 25
    held = (0, 0)
    while time.monotonic() < deadline:
        held = _held_only_by_mirror(workers) if workers.exists() else (0, 0)
        if not workers.exists() or held[0]:
            break
        time.sleep(0.5)
    assert not workers.exists(), (
        f"{workers} outlived the collector that made it and is kept by the one now running with the SQL "
        f"endpoint off; {held[0]} files ({held[1]:,} bytes) of parts the collector removed are held by it "
        "alone"
    )
