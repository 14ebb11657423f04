"""Helpers for the close under a real SIGKILL at the rename of one of its parts (tests/test_close_kill.py and
the soak tests/test_close_soak.py).

ClickHouse writes a part into ``tmp_insert_<part>/`` and renames it into place; on a non-replicated table
the insert's deduplication token is in the table's deduplication log by then. strace (``-P`` limits it to
one path, ``inject=…:signal=SIGKILL`` kills at that syscall) kills the close exactly there: the token
stays, the part is gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

STRACE = shutil.which("strace")
RENAMES = "rename,renameat,renameat2"

PREPARE = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from usage_rows import put
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
store = open_store(Config(data_dir=Path(sys.argv[1])))
put(store, json.loads(sys.argv[2]))
paths = dict(store.rows("SELECT name, data_paths[1] FROM system.tables WHERE database = 'meterhouse'"))
print(json.dumps(paths))
"""

STATE = """
import json, sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from meterhouse.core import close, schema
from meterhouse.core.config import Config
from meterhouse.core.store import open_store
from meterhouse.exporter import create_app
store = open_store(Config(data_dir=Path(sys.argv[1])))
out = {}
for m in json.loads(sys.argv[2]):
    month = close.Month.parse(m)
    record = close.get_close(store, month)
    db = store.database
    lines = store.rows(f"SELECT org_id, metric, toString(total_int), points, close_id FROM {db}.usage_statements "
                       "FINAL WHERE month = {m:UInt32} ORDER BY org_id, metric", {"m": month.key})
    raw = store.rows(f"SELECT org_id, toString(sum(toInt128(value_int))), count() FROM {db}.usage_points "
                     "WHERE kind = 'sum' AND org_id != '' AND toYYYYMM(time) = {m:UInt32} GROUP BY org_id "
                     "ORDER BY org_id", {"m": month.key})
    adjustments = []
    if record is not None and record.done:
        adjustments = store.rows(schema.adjustments_sql(db, False), {"from_ns": month.start_ns,
            "to_ns": month.end_ns, "cutoff_ms": record.cutoff_ms, "limit": 1000, "offset": 0})
    api = create_app(store, CollectorRegistry(), lambda: True).test_client()
    answer = api.get(f"/api/v1/months/{month}/statements")
    out[m] = {
        "record": None if record is None else {"status": record.status, "close_id": record.close_id,
                  "orgs": record.orgs, "lines": record.lines, "total_int": str(record.total_int),
                  "mismatched_lines": record.mismatched_lines, "reconciled": record.reconciled},
        "lines": [[o, me, int(t), int(n), c] for o, me, t, n, c in lines],
        "raw": {o: [int(t), int(n)] for o, t, n in raw},
        "adjustments": [[o, int(a)] for o, _m, _u, a, *_ in adjustments],
        "statements_status": answer.status_code,
        "close_ids": sorted({r[0] for r in store.rows(
            f"SELECT close_id FROM {db}.month_closes WHERE month = {{m:UInt32}}", {"m": month.key})}),
    }
print(json.dumps(out))
"""


def run_py(code: str, *args: str, timeout: float = 300) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def prepare(data: Path, rows: list[dict]) -> dict[str, str]:
    """Put ``rows`` (``usage_rows.put``) into the data directory's database; the tables' data paths."""
    return json.loads(run_py(PREPARE, str(data), json.dumps(rows)))


def insert_part(paths: dict[str, str], table: str, partition: str, n: int) -> str:
    """The temporary directory of the ``n``-th part a process inserts into ``table`` (from 1; a part's
    temporary name is numbered by the process, its final name by the table), e.g. the close's start
    record is ``insert_part(paths, "month_closes", "all", 1)``."""
    return f"{paths[table]}tmp_insert_{partition}_{n}_{n}_0/"


def state(data: Path, months: list[str]) -> dict:
    return json.loads(run_py(STATE, str(data), json.dumps(months)))


def close_cmd(data: Path, month: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meterhouse", "close", "--month", month, "--data-dir", str(data), "--direct",
            "--log-format", "text", *extra]  # fmt: skip


def killed_at_rename(
    path: str, cmd: list[str], when: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``cmd`` under strace, SIGKILLed at its ``when``-th rename of ``path`` (a part's temporary
    directory: ``insert_part``)."""
    assert STRACE is not None
    return subprocess.run(
        [STRACE, "-f", "-qq", "-o", "/dev/null", "-P", path, "-e", f"trace={RENAMES}",
         "-e", f"inject={RENAMES}:signal=SIGKILL:when={when}", *cmd],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def was_killed(result: subprocess.CompletedProcess) -> bool:
    """strace ends as its tracee did: killed by SIGKILL (or exit status 137)."""
    return result.returncode in (-9, 137)
