"""A real full file system under the embedded ClickHouse: a small tmpfs mounted at ``DATA_DIR/clickhouse``
(the spool on another file system) or at ``DATA_DIR`` itself (spool, dead letters and ClickHouse on one).

ClickHouse answers ``Code: 243 NOT_ENOUGH_SPACE`` while ``SELECT 1`` still passes: the writer must retry
for as long as it takes (never a dead letter), the edge must answer 503 once the spool fills (or cannot
write), and once space is freed every acknowledged point must be written exactly once. Mounting needs
root (CI runs as root); elsewhere these tests are skipped, saying so."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from test_delivery import PB, Requests, metric, org_totals

pytestmark = pytest.mark.e2e
FAST = ["--retry-max-backoff-s", "0.3", "--poison-after-attempts", "3", "--health-check-interval-s", "0.2"]


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for ClickHouse needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(mount: Path, leave: int = 0) -> Path:
    """Take all the space of ``mount`` but ``leave`` bytes with a filler file; returns it."""
    filler = mount / "filler"
    with open(filler, "ab", buffering=0) as f:
        for chunk in (1 << 20, 64 << 10, 4 << 10):
            try:
                while free(mount) - leave >= chunk:
                    f.write(b"\xa5" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    assert free(mount) <= leave + (4 << 10), free(mount)
    return filler


def free(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def send_while(reqs: Requests, url: str, ids: list[int], seconds: float) -> dict[int, int]:
    """Send each request once, spread over ``seconds``: the answers by status."""
    answers: dict[int, int] = {}
    pause = seconds / max(1, len(ids))
    for i in ids:
        r = requests.post(url, data=reqs.bodies[i], headers=PB, timeout=10)
        answers[r.status_code] = answers.get(r.status_code, 0) + 1
        if r.status_code == 200:
            reqs.acked.add(i)
        else:
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
        time.sleep(pause)
    return answers


def resend_until_acknowledged(reqs: Requests, url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(reqs.acked) < len(reqs.bodies) and time.monotonic() < deadline:
        reqs.send(url, [i for i in range(len(reqs.bodies)) if i not in reqs.acked])
        time.sleep(0.2)
    assert len(reqs.acked) == len(reqs.bodies), "a request was never acknowledged"


def wait_for(cond, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def full_disk_rounds(up_factory, data: Path, mount: Path, rounds: int, seed: int, full_s: float,
                     leave: int, *extra: str) -> None:  # fmt: skip
    reqs = Requests(seed)
    up = up_factory("--spool-max-bytes", "60000", *FAST, *extra, data_dir=data)
    url = f"{up.otlp_http}/v1/metrics"
    reqs.send(url, reqs.make(5))
    up.drain()
    for _ in range(rounds):
        filler = fill(mount, leave)
        answers = send_while(reqs, url, reqs.make(60), full_s)
        assert answers.get(503), f"the spool never filled: {answers}"
        # The inserts fail for the full disk, are retried and never dead-lettered: by now a group would
        # have gone to a dead letter after --poison-after-attempts (3) many times over.
        wait_for(lambda: metric(up, "meterhouse_insert_failures_total", cause="disk_full") >= 6)
        assert metric(up, "meterhouse_pending_points") > 0
        assert metric(up, "meterhouse_dead_letters_pending") == 0
        assert metric(up, "meterhouse_dead_letter_batches_total") == 0
        filler.unlink()
        assert free(mount) > 1 << 20
        resend_until_acknowledged(reqs, url)
        expected = reqs.expected()
        assert org_totals(up) == expected  # the hourly rollup
        assert org_totals(up, step="1m") == expected  # the raw table
    assert metric(up, "meterhouse_dead_letter_batches_total") == 0
    assert not list((data / "dead-letter").glob("*.dlq"))
    assert up.stop() == 0


def test_a_full_clickhouse_disk_with_the_spool_elsewhere_loses_nothing_and_dead_letters_nothing(
    up_factory, tmp_path
):
    data = tmp_path / "data"
    with tmpfs(data / "clickhouse", "32m") as mount:
        full_disk_rounds(up_factory, data, mount, rounds=1, seed=243, full_s=4.0, leave=0)


def test_a_full_disk_shared_by_the_spool_and_clickhouse_loses_nothing_and_dead_letters_nothing(
    up_factory, tmp_path
):
    """One file system for everything: the spool takes what space is left (ClickHouse asks for at least
    a MiB per part), then cannot write either and the edge answers 503."""
    with tmpfs(tmp_path / "data", "48m") as mount:
        full_disk_rounds(up_factory, mount, mount, rounds=1, seed=244, full_s=4.0, leave=32 << 10)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("one_fs", [False, True], ids=["spool-elsewhere", "one-file-system"])
def test_a_disk_filled_and_freed_again_and_again(up_factory, tmp_path, one_fs):
    if one_fs:
        with tmpfs(tmp_path / "data", "48m") as mount:
            full_disk_rounds(up_factory, mount, mount, 6, 7, 15.0, 32 << 10)
    else:
        data = tmp_path / "data"
        with tmpfs(data / "clickhouse", "32m") as mount:
            full_disk_rounds(up_factory, data, mount, 6, 8, 15.0, 0)
