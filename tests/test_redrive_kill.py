"""`meterhouse dead-letter redrive` killed (SIGKILL, by strace's fault injection) at the rename that
commits one part, then the documented recovery: running the redrive again (or `meterhouse up` first).
Every table must end with what was acknowledged, exactly once, and the letter gone.

The embedded engine writes a part's deduplication token to the table's log before it renames the part
into place: a redrive that trusted the token alone was dropped, on the second run, by the table whose
part the kill took ("re-driven 1", the letter deleted, the raw table 7 short of the 12 acknowledged)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("dead_letter_child.py")
STRACE = shutil.which("strace")
TABLES = ("usage_points", "usage_hourly", "usage_hourly_by_metric", "org_last_seen", "metric_catalog")


def needs_strace() -> None:
    if STRACE is None:
        pytest.skip("strace is not installed (apt-get install strace): it injects the SIGKILL")
    probe = subprocess.run([STRACE, "-qq", "-e", "trace=none", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace refused): {probe.stderr.strip()[:200]}")


def redrive_cmd(data: Path) -> list[str]:
    return [sys.executable, "-m", "meterhouse", "dead-letter", "redrive", "--data-dir", str(data)]


def table_dir(data: Path, table: str) -> Path:
    """The directory of ``table``'s parts (the Atomic database keeps it under the table's UUID)."""
    sql = (data / "clickhouse" / "metadata" / "meterhouse" / f"{table}.sql").read_text()
    uuid = re.search(r"UUID '([0-9a-f-]{36})'", sql).group(1)
    return data / "clickhouse" / "store" / uuid[:3] / uuid


def renames(data: Path, cmd: list[str]) -> list[tuple[str, str]]:
    """Run ``cmd`` under strace and list its rename() calls in order: (source, target)."""
    log = data.parent / f"{data.name}.strace"
    subprocess.run([STRACE, "-f", "-qq", "-e", "trace=rename", "-o", str(log), *cmd], check=True,
                   capture_output=True, cwd=ROOT)  # fmt: skip
    return re.findall(r'rename\("([^"]+)", "([^"]+)"\)', log.read_text())


def killed_at(data: Path, cmd: list[str], *, n: int = 0, path: str = "") -> subprocess.CompletedProcess:
    """Run ``cmd`` with a SIGKILL injected before a rename(): the ``n``-th (1-based, per thread), or the
    one whose source is ``path`` (strace's ``-P`` limits the injection to it)."""
    log = data.parent / f"{data.name}.killed.strace"
    where = ["-P", path] if path else []
    when = f":when={n}" if n else ""
    return subprocess.run([STRACE, "-f", "-qq", "-o", str(log), *where, "-e", "trace=rename", "-e",
                           f"inject=rename:error=EIO:signal=SIGKILL{when}", *cmd],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip


def totals(data: Path) -> dict[str, dict[str, int]]:
    """Per table and org: the sum of values (raw table, rollups) or of points (org_last_seen); for the
    catalog, its points per metric."""
    script = f"""
import json
from pathlib import Path
from meterhouse.core.store import connect
s = connect("embedded", Path({str(data)!r}), "meterhouse")
q = lambda sql: {{str(k): int(v) for k, v in s.rows(sql)}}
print(json.dumps({{
    "usage_points": q("SELECT org_id, sum(value_int) FROM meterhouse.usage_points GROUP BY org_id"),
    "usage_hourly": q("SELECT org_id, sum(value_int) FROM meterhouse.usage_hourly GROUP BY org_id"),
    "usage_hourly_by_metric": q("SELECT org_id, sum(value_int) FROM meterhouse.usage_hourly_by_metric GROUP BY org_id"),
    "org_last_seen": q("SELECT org_id, sum(points) FROM meterhouse.org_last_seen GROUP BY org_id"),
    "metric_catalog": q("SELECT metric, sum(points) FROM meterhouse.metric_catalog GROUP BY metric"),
}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def expected(a: int, b: int, points_a: int, points_b: int) -> dict[str, dict[str, int]]:
    values = {"a": a, "b": b}
    return {"usage_points": values, "usage_hourly": values, "usage_hourly_by_metric": values,
            "org_last_seen": {"a": points_a, "b": points_b},
            "metric_catalog": {"calls": points_a + points_b}}  # fmt: skip


@pytest.fixture
def lettered(tmp_path) -> Path:
    """A data directory holding 12 acknowledged: 5 written, 7 in a dead letter."""
    needs_strace()
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(CHILD), str(data)], check=True, capture_output=True, cwd=ROOT)
    assert totals(data)["usage_points"] == {"a": 2, "b": 3}
    return data


def part_in_the_making(data: Path, table: str) -> str:
    """The temporary directory of the part a process's first insert into ``table`` writes (renamed into
    place to commit it): ``tmp_insert_<partition>_1_1_0``, the partition the table's parts already show
    (the letter's points are of the same month as the group written before them)."""
    parts = [p.name for p in table_dir(data, table).iterdir() if re.fullmatch(r"\w+_\d+_\d+_\d+", p.name)]
    partitions = {name.rsplit("_", 3)[0] for name in parts}
    assert len(partitions) == 1, parts
    return f"{table_dir(data, table)}/tmp_insert_{partitions.pop()}_1_1_0/"


def kill_redrive_at_part(lettered: Path, table: str) -> None:
    cut = killed_at(lettered, redrive_cmd(lettered), path=part_in_the_making(lettered, table))
    assert cut.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), cut.stdout + cut.stderr
    left = [p.name for p in table_dir(lettered, table).iterdir() if p.name.startswith("tmp_insert_")]
    assert left, f"the kill did not come at {table}'s part"


def run_again_ends_exact(data: Path) -> None:
    again = subprocess.run(redrive_cmd(data), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-driven 1, still failing 0" in again.stdout
    assert not list((data / "dead-letter").glob("*.dlq"))
    assert totals(data) == expected(6, 6, 2, 2)


@pytest.mark.parametrize(  # the second table with the soaks: the default suite keeps to its 15 minutes
    "table", ["usage_points", pytest.param("usage_hourly_by_metric", marks=pytest.mark.soak)]
)
def test_a_redrive_killed_at_a_part_s_rename_and_run_again_ends_exact(lettered, table):
    kill_redrive_at_part(lettered, table)
    run_again_ends_exact(lettered)


def test_a_redrive_killed_then_meterhouse_up_before_the_redrive_again_ends_exact(
    lettered, tmp_path, up_factory
):
    """The operator starts `meterhouse up` before running the redrive again: it writes new groups, whose
    numbers are above the cut-short redrive's, and the redrive must still find what it lacks."""
    from otlp_builders import point, sum_request

    kill_redrive_at_part(lettered, "usage_points")
    up = up_factory(data_dir=lettered)
    body = sum_request(
        {"calls": [point(10, {"org.id": "a"}), point(20, {"org.id": "b"})]}
    ).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body,
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    up.drain()
    assert up.stop() == 0
    again = subprocess.run(redrive_cmd(lettered), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-driven 1, still failing 0" in again.stdout
    assert totals(lettered) == expected(16, 26, 3, 3)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_a_redrive_killed_at_every_part_and_every_rename_and_run_again_ends_exact(lettered, tmp_path):
    """Every table's part, then every rename() the redrive makes (parts, its journal in the letter, the
    redo's views dropped), by number: at each, a fresh copy of the data directory is killed there and the
    redrive run again."""
    dry = tmp_path / "dry"
    shutil.copytree(lettered, dry, symlinks=True)
    count = len(renames(dry, redrive_cmd(dry)))
    assert count >= len(TABLES)
    kills: list[dict] = [{"table": t} for t in TABLES] + [{"n": n} for n in range(1, count + 1)]
    for i, kill in enumerate(kills):
        data = tmp_path / f"kill{i}"
        shutil.copytree(lettered, data, symlinks=True)
        if "table" in kill:
            kill_redrive_at_part(data, kill["table"])
        else:
            killed_at(data, redrive_cmd(data), n=kill["n"])
        run_again_ends_exact(data)
        shutil.rmtree(data)


def test_the_redrive_waits_for_the_spool_to_be_written_first(lettered, up_factory):
    """Points acknowledged and not yet written (the spool was not drained when `meterhouse up` stopped)
    are written before any dead letter: a redrive that went first would hold rows above their group's
    number, which the ledger takes for that group's own. The redrive refuses and says what to do."""
    import time

    from otlp_builders import point, sum_request

    from meterhouse.collector.decode import Limits, decode_request
    from meterhouse.collector.spool import Spool

    spool = Spool(lettered / "spool")
    spool.open()
    req = sum_request({"calls": [point(100, {"org.id": "a"})]})
    spool.consume(decode_request(req, Limits(), now_ns=time.time_ns(), digest="pending").batch)
    spool.shutdown(1)
    refused = subprocess.run(redrive_cmd(lettered), capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "meterhouse up" in refused.stderr and "1 point" in refused.stderr, refused.stderr
    assert len(list((lettered / "dead-letter").glob("*.dlq"))) == 1
    up = up_factory(data_dir=lettered)
    up.drain()
    assert up.stop() == 0
    again = subprocess.run(redrive_cmd(lettered), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert totals(lettered) == expected(106, 6, 3, 2)
