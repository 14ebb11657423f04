"""The close killed (a real SIGKILL, injected by strace at the rename of one of its parts) and run again, as
the README says to: every org's lines present, the month closed, its statements answered.

The kill leaves the insert's deduplication token in the table's log without its part (non-replicated
tables write the log first): a repeat that trusted the token was dropped, so before the close read back
what it wrote, (a) the org of the chunk killed was in no statement line and no adjustment, (b) a month
whose start record was lost could never be closed (``the close of … was not recorded``), and (c) a month
whose final record was lost stayed ``running`` while every re-run said ``done``."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from close_kill import STRACE, close_cmd, insert_part, killed_at_rename, prepare, state, was_killed

from meterhouse.core.close import Month

pytestmark = pytest.mark.skipif(STRACE is None, reason="needs strace (scripts/test.sh installs it)")

M = Month.of_ns(time.time_ns()).previous().previous().previous()  # its late window is over
ORGS = 30


def rows() -> list[dict]:
    return [
        {"org_id": f"org-{o:02d}", "time": M.start_ns + o * 1000, "value_int": o + 1} for o in range(ORGS)
    ]


def run_close(data, *extra: str) -> dict:
    out = subprocess.run(close_cmd(data, str(M), *extra), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def check_closed(data) -> None:
    got = state(data, [str(M)])[str(M)]
    assert got["record"]["status"] == "done"
    assert {o: t for o, _m, t, _n, _c in got["lines"]} == {f"org-{o:02d}": o + 1 for o in range(ORGS)}
    assert len({c for *_, c in got["lines"]}) == 1 and got["lines"][0][4] == got["record"]["close_id"]
    assert got["record"]["orgs"] == ORGS and got["record"]["reconciled"]
    assert got["adjustments"] == []
    assert got["statements_status"] == 200


@pytest.mark.soak  # with the soaks, so that the default suite keeps to its 15 minutes (README, Tests)
def test_a_close_killed_at_the_rename_of_its_fifth_chunk_has_every_org_s_line_when_run_again(tmp_path):
    data = tmp_path / "data"
    paths = prepare(data, rows())
    part = insert_part(paths, "usage_statements", str(M.year), 5)  # the fifth chunk of one org each
    killed = killed_at_rename(part, close_cmd(data, str(M), "--batch-orgs", "1"))
    assert was_killed(killed), killed.stderr[-2000:]
    assert len(state(data, [str(M)])[str(M)]["lines"]) == 4  # four chunks stored, the fifth's part gone
    record = run_close(data, "--batch-orgs", "1")
    assert record["status"] == "done" and record["orgs"] == ORGS and record["mismatched_lines"] == 0
    assert record["total"] == sum(range(1, ORGS + 1))
    check_closed(data)


def test_a_close_killed_at_the_rename_of_its_start_record_closes_when_run_again(tmp_path):
    data = tmp_path / "data"
    paths = prepare(data, rows())
    killed = killed_at_rename(insert_part(paths, "month_closes", "all", 1), close_cmd(data, str(M)))
    assert was_killed(killed), killed.stderr[-2000:]
    assert state(data, [str(M)])[str(M)]["record"] is None  # nothing recorded: the month is open
    record = run_close(data)
    assert record["status"] == "done" and record["orgs"] == ORGS and record["reconciled"]
    check_closed(data)
    assert run_close(data) == record  # and again: the same close


@pytest.mark.soak  # with the soaks, so that the default suite keeps to its 15 minutes (README, Tests)
def test_a_close_killed_at_the_rename_of_its_final_record_is_done_when_run_again(tmp_path):
    data = tmp_path / "data"
    paths = prepare(data, rows())
    killed = killed_at_rename(insert_part(paths, "month_closes", "all", 2), close_cmd(data, str(M)))
    assert was_killed(killed), killed.stderr[-2000:]
    before = state(data, [str(M)])[str(M)]
    assert before["record"]["status"] == "running" and len(before["lines"]) == ORGS
    assert before["statements_status"] == 404
    record = run_close(data)
    assert record["status"] == "done" and record["close_id"] == before["record"]["close_id"]
    check_closed(data)  # the stored state is done, and the statements answer
