"""The close as a real subprocess: SIGKILL in the middle and a rerun give the same statements as an
uninterrupted close; `meterhouse close` goes through the running server's API when one answers."""

import json
import os
import signal
import subprocess
import sys
import time

import requests
from conftest import ROOT
from otlp_builders import point, sum_request

from meterhouse.core.close import Month

M = Month.of_ns(time.time_ns()).previous().previous().previous()
ORGS, METRICS = 3000, ("calls", "rows", "bytes", "credits")

PREPARE = f"""
import sys; sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from usage_rows import put
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
store = open_store(Config(data_dir=Path(sys.argv[1])))
rows = [{{"org_id": f"org-{{o:05d}}", "metric": m, "time": {M.start_ns} + o * 1000 + k, "value_int": o * 7 + k}}
        for o in range({ORGS}) for k, m in enumerate({METRICS!r})]
rows += [{{"org_id": "org-00001", "metric": "calls", "time": {M.end_ns} - 1, "value_int": 2**62}} for _ in range(3)]
put(store, rows)
"""

DUMP = """
import json, sys
from pathlib import Path
from meterhouse.core import schema
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
store = open_store(Config(data_dir=Path(sys.argv[1])))
rows = store.rows(f"SELECT * EXCEPT (close_id, closed_at) FROM {store.database}.{schema.STATEMENTS_TABLE} FINAL "
                  "ORDER BY org_id, metric")
raw = store.scalar(f"SELECT count() FROM {store.database}.{schema.STATEMENTS_TABLE} FINAL")
ids = store.rows(f"SELECT DISTINCT close_id FROM {store.database}.{schema.STATEMENTS_TABLE}")
print(json.dumps({"lines": [[str(v) for v in r] for r in rows], "count": raw, "close_ids": [i[0] for i in ids]}))
"""


def run_py(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def close_cmd(data_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meterhouse", "close", "--month", str(M), "--data-dir", str(data_dir),
            "--log-format", "text", *extra]  # fmt: skip


def test_sigkill_during_close_and_a_rerun_give_the_same_statements(tmp_path):
    data, reference = tmp_path / "data", tmp_path / "reference"
    run_py(PREPARE, str(data))
    run_py(PREPARE, str(reference))  # the same points in a second data dir (chdb's cannot be copied)
    # The uninterrupted close, on a copy of the same data.
    done = subprocess.run(close_cmd(reference, "--direct"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = json.loads(done.stdout)
    # The close killed in the middle: SIGKILL once some orgs (not all) are written.
    proc = subprocess.Popen(close_cmd(data, "--direct", "--batch-orgs", "20"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    seen = []
    try:
        for line in proc.stderr:
            if line.startswith("orgs "):
                done_orgs = int(line.split()[1].split("/")[0])
                seen.append(done_orgs)
                if 0 < done_orgs < ORGS:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, (seen, proc.returncode)
    # The rerun resumes the same close after the last org written.
    rerun = subprocess.run(close_cmd(data, "--direct", "--batch-orgs", "20"), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    first_progress = next(x for x in rerun.stderr.splitlines() if x.startswith("orgs "))
    assert int(first_progress.split()[1].split("/")[0]) >= seen[-1] > 0
    record = json.loads(rerun.stdout)
    assert record["status"] == "done" and record["reconciled"] and record["lines"] == ORGS * 4
    for key in ("orgs", "lines", "points", "total", "rollup", "mismatched_lines"):
        assert record[key] == expected[key], key
    # A third run answers the same close and writes nothing.
    again = subprocess.run(close_cmd(data, "--direct"), capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout) == record
    got, want = json.loads(run_py(DUMP, str(data))), json.loads(run_py(DUMP, str(reference)))
    assert (
        got["count"] == ORGS * 4 and len(got["close_ids"]) == 1 and got["close_ids"][0] == record["close_id"]
    )
    assert got["lines"] == want["lines"]  # the same statements, line for line, checksums included


def test_the_close_command_uses_the_running_server(up_factory, tmp_path):
    up = up_factory("--late-window-days", "35", data_dir=tmp_path / "srv")
    body = sum_request({"calls": [point(5, {"org.id": "org-a"}, t_ns=M.start_ns + 1, start_ns=M.start_ns)]})
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    assert r.status_code == 200
    up.drain()
    out = subprocess.run(close_cmd(tmp_path / "srv", "--http-port", str(up.http_port)), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "running server" in out.stderr
    record = json.loads(out.stdout)
    assert record["status"] == "done" and record["total"] == 5 and record["reconciled"]
    lines = requests.get(f"{up.api}/api/v1/months/{M}/statements", timeout=10).json()["statements"]
    assert [(x["org_id"], x["metric"], x["total"]) for x in lines] == [("org-a", "calls", 5)]
    # Inside the late window without force: refused, exit code 3.
    last = Month.of_ns(time.time_ns()).previous()
    if last.end_ns + 35 * 86400 * 10**9 > time.time_ns():
        cmd = [
            sys.executable,
            "-m",
            "meterhouse",
            "close",
            "--month",
            str(last),
            "--http-port",
            str(up.http_port),
        ]
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 3 and "409" in refused.stderr
