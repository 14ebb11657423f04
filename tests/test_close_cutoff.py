"""A close holds every point acknowledged before it was asked for.

The close used to take its cutoff 5 s behind the clock: points acknowledged (HTTP 200) a second before
`meterhouse close --month M --force` were committed after that cutoff and became adjustments, with no
warning. Now the close waits until the writer has committed everything acknowledged when it was asked,
then takes its cutoff. The writer here flushes once a second, so the points are still in the spool when
the close is asked for. Also: the dry run, the `--force` wording, and `--direct` on a stopped data
directory whose spool still holds acknowledged points."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import requests
from otlp_builders import point, sum_request

from meterhouse.core.close import Month

LAST = Month.of_ns(time.time_ns()).previous()  # always inside the 35-day late window: a forced close
VALUES = {"org-a": 5, "org-b": 2**40 + 3, "org-c": 11}


def send(up, org: str, value: int, i: int = 0) -> None:
    t = LAST.start_ns + 3600 * 10**9 * (i + 1)
    body = sum_request({"calls": [point(value, {"org.id": org}, t_ns=t, start_ns=t - 1)]})
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text


def statement(up) -> tuple[dict, dict, dict]:
    s = requests.get(f"{up.api}/api/v1/months/{LAST}/statements", timeout=30).json()
    a = requests.get(f"{up.api}/api/v1/months/{LAST}/adjustments", timeout=30).json()
    return (
        {x["org_id"]: int(x["total_int"]) for x in s["statements"]},
        {x["org_id"]: int(x["amount_int"]) for x in a["adjustments"]},
        s["close"],
    )


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meterhouse", "close", "--month", str(LAST), "--log-format",
                           "text", *args], capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_points_acknowledged_right_before_a_forced_close_are_in_its_statement(up_factory, tmp_path):
    up = up_factory("--late-window-days", "35", "--flush-interval-s", "1", data_dir=tmp_path / "srv")
    for i, (org, value) in enumerate(VALUES.items()):
        send(up, org, value, i)
    closed = requests.post(f"{up.api}/api/v1/months/{LAST}/close?force=true", timeout=300)
    assert closed.status_code == 200, closed.text
    record = closed.json()
    lines, adjustments, _ = statement(up)
    assert lines == VALUES and adjustments == {}  # in the statement, not adjustments
    assert record["status"] == "done" and record["forced"] and record["unconfirmed_collectors"] == []
    assert record["total"] == sum(VALUES.values()) and record["reconciled"]


def test_the_close_command_shows_what_a_forced_close_writes_and_holds_what_was_just_acknowledged(
    up_factory, tmp_path
):
    up = up_factory("--late-window-days", "35", "--flush-interval-s", "1", data_dir=tmp_path / "srv")
    send(up, "org-a", 5)
    # A dry run: what the close would write, and nothing written.
    dry = requests.post(f"{up.api}/api/v1/months/{LAST}/close?force=true&dry_run=true", timeout=300)
    assert dry.status_code == 200, dry.text
    body = dry.json()
    assert body["dry_run"] and body["status"] == "new" and body["forced"]
    assert (body["orgs"], body["lines"], body["points"], body["total"]) == (1, 1, 1, 5)
    assert requests.get(f"{up.api}/api/v1/months/{LAST}/close", timeout=30).status_code == 404
    # Without --force inside the late window: refused, and the message says how to force it.
    refused = cli("--http-port", str(up.http_port))
    assert refused.returncode == 3 and "--force" in refused.stderr and "pass force" not in refused.stderr
    send(up, "org-b", 7)  # acknowledged a moment before the close
    out = cli("--http-port", str(up.http_port), "--force")
    assert out.returncode == 0, out.stderr
    shown = next(x for x in out.stderr.splitlines() if x.startswith("would write:"))
    assert "orgs 2, lines 2 (0 written), points 2, total 12" in shown, out.stderr
    record = json.loads(out.stdout)
    assert record["status"] == "done" and record["total"] == 12
    lines, adjustments, _ = statement(up)
    assert lines == {"org-a": 5, "org-b": 7} and adjustments == {}
    # A dry run of a closed month writes nothing and says so.
    again = requests.post(f"{up.api}/api/v1/months/{LAST}/close?force=true&dry_run=true", timeout=60).json()
    assert again["status"] == "done" and again["lines_written"] == again["lines"] == 2


def test_a_direct_close_refuses_a_spool_with_acknowledged_points_not_yet_committed(up_factory, tmp_path):
    data = tmp_path / "srv"
    up = up_factory("--late-window-days", "35", "--flush-interval-s", "60", data_dir=data)
    send(up, "org-a", 5)  # acknowledged: in the spool, not committed for a minute
    up.stop(signal.SIGKILL)
    refused = cli("--direct", "--force", "--data-dir", str(data))
    assert refused.returncode == 3, refused.stderr
    assert "holds 1 acknowledged point" in refused.stderr
    dry = cli("--direct", "--force", "--dry-run", "--data-dir", str(data))
    assert dry.returncode == 3  # a dry run would leave the same point out: refused alike
    # Started again, the server replays the spool; a close through it holds the point.
    up = up_factory("--late-window-days", "35", "--flush-interval-s", "1", data_dir=data)
    out = cli("--http-port", str(up.http_port), "--force", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["total"] == 5
