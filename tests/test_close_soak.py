"""Soak: closes killed at random instants and run again, interleaved with ingest, over many rounds.

Each round puts usage into random months (some of them closed already: adjustments), then closes the next
month under a SIGKILL at a random instant: either at a random one of its renames (strace's fault
injection: the moment a part, of any table, goes into place, when a repeat under the same token is
dropped) or after a random delay; the close is then run again until it finishes, as the README says.
At the end, for every month and org: statement + adjustments = raw points = what was put, every month
closed once (one close id), its statement verified against its raw points. It runs with the soak tests
(``-m soak``)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter

import pytest
from close_kill import STRACE, close_cmd, insert_part, killed_at_rename, prepare, state, was_killed

from meterhouse.core.close import Month

pytestmark = [pytest.mark.soak, pytest.mark.skipif(STRACE is None, reason="needs strace")]
ROUNDS = 20
ORGS = 40


def statement_and_raw(s: dict) -> tuple[Counter, Counter]:
    """Per org, a month's statement lines (all of its one close) plus adjustments, and its raw points."""
    total: Counter = Counter()
    for org, _metric, t, _n, close_id in s["lines"]:
        assert close_id == s["record"]["close_id"]
        total[org] += t
    for org, amount in s["adjustments"]:
        total[org] += amount
    return total, Counter({org: t for org, (t, _n) in s["raw"].items()})


def months() -> list[Month]:
    m, out = Month.of_ns(time.time_ns()), []
    for _ in range(3):  # the late window (35 days) is over for every month closed
        m = m.previous()
    for _ in range(ROUNDS):
        out.append(m)
        m = m.previous()
    return out


def killed_close(data, month: Month, orgs: int, paths: dict, rng: random.Random) -> str:
    """One run of the close, killed at a random instant (or not, if it finished first): how.

    Mostly at the rename of one of its parts (the start record, a chunk of lines, the final record: the
    instants when a repeat under the same token is dropped), else after a random delay."""
    batch = rng.choice([1, 3, 7, 50])
    cmd = close_cmd(data, str(month), "--batch-orgs", str(batch))
    if rng.random() < 0.7:
        if rng.random() < 0.5 or not orgs:
            table, partition, n = "month_closes", "all", rng.randint(1, 2)  # start or final record
        else:
            table, partition, n = "usage_statements", str(month.year), rng.randint(1, -(-orgs // batch))
        out = killed_at_rename(insert_part(paths, table, partition, n), cmd)
        return f"{table} part {n}: {'killed' if was_killed(out) else out.returncode}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    delay = rng.uniform(0.5, 4.0)
    try:
        proc.wait(delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    return f"after {delay:.2f}s: {'killed' if proc.returncode == -9 else proc.returncode}"


@pytest.mark.timeout(3600)
def test_closes_killed_at_random_instants_among_ingest_end_exact(tmp_path):
    data = tmp_path / "data"
    rng = random.Random(24)
    ms = months()
    put: dict[str, Counter] = {str(m): Counter() for m in ms}
    log = []
    for r in range(ROUNDS):
        rows = []
        for _ in range(rng.randint(20, 120)):
            m = rng.choice(ms[: r + 1])  # the months closed so far and the one closed this round
            org, value = f"org-{rng.randrange(ORGS):02d}", rng.randint(-50, 10**6)
            t = m.start_ns + rng.randrange(m.end_ns - m.start_ns)
            rows.append(
                {"org_id": org, "metric": rng.choice(["calls", "bytes"]), "time": t, "value_int": value}
            )
            put[str(m)][org] += value
        paths = prepare(data, rows)
        orgs = len({row["org_id"] for row in rows if Month.of_ns(row["time"]) == ms[r]})
        log.append(killed_close(data, ms[r], orgs, paths, rng))
        for _ in range(5):  # run again until it finishes
            out = subprocess.run(close_cmd(data, str(ms[r])), capture_output=True, text=True, timeout=300)
            if out.returncode == 0:
                break
        assert out.returncode == 0, (log, out.stderr[-3000:])
    assert sum("killed" in x for x in log) >= ROUNDS // 2, log  # most closes were cut short
    got = state(data, [str(m) for m in ms])
    for m in ms:
        s = got[str(m)]
        assert s["record"]["status"] == "done", (m, log)
        assert len(s["close_ids"]) == 1, (m, s["close_ids"], log)
        total, raw = statement_and_raw(s)
        assert dict(total) == dict(raw) == dict(put[str(m)]), (m, log)
        assert s["record"]["mismatched_lines"] == 0 and s["statements_status"] == 200, (m, log)
