"""The embedded engine under SIGKILL, without meterhouse around it: a replayed insert lands everywhere once.

A child inserts batch after batch (each under its own token and ``batch_seq``) into the ingest table,
whose materialized views feed the raw table and the rollups; it is killed at a random moment, and the
batch that was in flight is inserted again as the writer inserts a group in doubt (``insert_in_doubt``).
Every batch must then be in every table exactly once.

ClickHouse's deduplication log for non-replicated MergeTree tables is written before the part, so a kill
between the two leaves a table holding a batch's token without its rows; a replay under the token alone
was dropped by that table (seen: ``usage_hourly_by_metric`` short of one batch that the raw table and
``usage_hourly`` held). This test found that; the ledger (``schema.SEQ_COLUMN``) fixed it. It runs with
the soak tests (``-m soak``).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak
CHILD = Path(__file__).with_name("engine_insert_child.py")
ROUNDS = 25


def run_child(data: Path, first: int, mode: str, months: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(data), str(first), mode, str(months)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parent)  # fmt: skip


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("months", [1, 12])
def test_a_replayed_insert_lands_in_every_table_after_sigkill(tmp_path, months):
    """``months`` 12: every batch spans twelve months, so each partitioned table gets twelve parts per
    insert, committed one after another; a kill between two of them leaves a table holding some of the
    batch's rows (the ledger must not take that for all of them)."""
    data = tmp_path / "engine"
    rng = random.Random(7)
    nxt = 0
    for _ in range(ROUNDS):
        p = run_child(data, nxt, "loop", months)
        first = p.stdout.readline()  # started and one batch in
        time.sleep(rng.uniform(0.0, 1.5))
        p.send_signal(signal.SIGKILL)
        done = [int(x) for x in (first + p.stdout.read()).split()]
        p.wait()
        inflight = (done[-1] if done else nxt - 1) + 1
        replay = run_child(data, inflight, "once", months)
        assert replay.wait(timeout=600) == 0
        nxt = inflight + 1
    check_every_table(data, nxt)


@pytest.mark.timeout(3600)
def test_a_redo_the_kill_cut_short_is_finished_by_the_next(tmp_path):
    """The redo of a group in doubt is killed at a random moment (creating its views, inserting, dropping
    them): the next replay finds what the cut-short one put in and adds only the rest."""
    data = tmp_path / "engine"
    rng = random.Random(11)
    months = 12
    for i in range(ROUNDS):
        for _ in range(3):  # up to two redos killed, then one left to finish
            p = run_child(data, i, "redo", months)
            assert p.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.6))
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert run_child(data, i, "once", months).wait(timeout=600) == 0
    check_every_table(data, ROUNDS)


def check_every_table(data: Path, batches: int) -> None:
    check = subprocess.run([sys.executable, "-c", f"""
import json, sys
from meterhouse.core.store import connect
from pathlib import Path
s = connect("embedded", Path({str(data)!r}), "meterhouse")
q = lambda sql: {{o: int(n) for o, n in s.rows(sql)}}
print(json.dumps([q("SELECT org_id, count() FROM meterhouse.usage_points GROUP BY org_id"),
                  q("SELECT org_id, sum(points) FROM meterhouse.usage_hourly GROUP BY org_id"),
                  q("SELECT org_id, sum(points) FROM meterhouse.usage_hourly_by_metric GROUP BY org_id")]))
"""], capture_output=True, text=True, check=True)  # fmt: skip
    # On the embedded engine the orgs' table and the metric catalog are the writer's inserts, not views'
    # (schema.WRITER_TABLES): this child inserts the ingest table alone, so only the views' tables count.
    raw, hourly, by_metric = json.loads(check.stdout)
    expected = {f"b{i:05d}": 20_000 for i in range(batches)}
    assert raw == expected
    assert hourly == expected
    assert by_metric == expected
