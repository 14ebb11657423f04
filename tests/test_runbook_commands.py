"""Every command docs/runbooks.md tells the on-call engineer to run, run as written against a running
`meterhouse up` (placeholders filled, and the flags the runbooks say to add: the ports the server runs
with): each `meterhouse ...` command line, each `GET`/`POST /api/...` it names, the `curl .../ping` and
`kill -HUP`. Those that need the server stopped (the dead-letter commands) run after stopping it. A
command that does not exist, a flag that was renamed, a table or a parameter that went away fails here."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from conftest import free_port
from otlp_builders import point, sum_request

from meterhouse.core.close import Month

RUNBOOKS = Path(__file__).resolve().parents[1] / "docs" / "runbooks.md"
#: Commands that work on a stopped data directory (the lock refuses them while `meterhouse up` runs).
STOPPED = ("dead-letter",)


def commands() -> list[str]:
    """Each `meterhouse ...` code span of the runbooks, its line breaks joined."""
    spans = re.findall(r"`(meterhouse [^`]+)`", RUNBOOKS.read_text())
    return sorted({" ".join(s.split()) for s in spans})


def api_calls() -> list[tuple[str, str]]:
    return sorted(set(re.findall(r"`(GET|POST) (/api/v1/[^`\s]+)`", RUNBOOKS.read_text())))


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meterhouse", *cmd], capture_output=True, text=True, timeout=300
    )


def test_every_runbook_command_runs_against_a_running_stack(up_factory):
    sql_port = free_port()
    up = up_factory("--sql-port", str(sql_port))
    now = time.time_ns()
    body = sum_request({"runbook.calls": [point(3, {"org.id": f"org-{i}", "otel.metric.overflow": "true"},
                                                t_ns=now - 10**9 + i, start_ns=now - 2 * 10**9) for i in range(3)]})  # fmt: skip
    assert requests.post(f"{up.otlp_http}/v1/metrics", data=body.SerializeToString(), timeout=10,
                         headers={"Content-Type": "application/x-protobuf"}).status_code == 200  # fmt: skip
    up.drain(60)
    month = str(Month.of_ns(now))
    fill = {"YYYY-MM": month, "DIR": str(up.data_dir), "…": "org-1"}
    ports = ["--http-port", str(up.http_port), "--sql-port", str(sql_port)]
    found = commands()
    assert len(found) >= 6, found
    ran, later = [], []
    for text in found:
        for placeholder, value in fill.items():
            text = text.replace(placeholder, value)
        argv = shlex.split(text)[1:]
        if len(argv) == 1:  # a command named in prose (`meterhouse up`, `meterhouse sql`): it exists
            r = run([argv[0], "--help"])
            assert r.returncode == 0, (text, r.stderr)
            continue
        if argv[0] in STOPPED:
            later.append(argv)
            continue
        r = run([*argv, *ports])
        assert r.returncode == 0, (text, r.stdout[-500:], r.stderr[-1000:])
        ran.append(argv[0])
    assert {"sql", "rollup"} <= set(ran), ran

    for method, path in api_calls():
        url = f"{up.api}{path.replace('{YYYY-MM}', month)}"
        r = requests.request(method, url, timeout=120)
        # 404: the month named has no close yet; anything else but 200 is a runbook out of date.
        assert r.status_code in (200, 404), (method, path, r.status_code, r.text[:300])
        if r.status_code == 404:
            assert r.json()["error"]["code"] in ("not_found", "not_closed"), (path, r.text)
    assert requests.get(f"http://127.0.0.1:{sql_port}/ping", timeout=10).text == "Ok.\n"  # `curl .../ping`

    pid = up.proc.pid  # `kill -HUP`: the tokens and TLS files are read again, nothing else changes
    os.kill(pid, signal.SIGHUP)
    time.sleep(1)
    assert up.proc.poll() is None and requests.get(f"{up.api}/readyz", timeout=10).status_code == 200

    up.stop()
    for argv in later:
        r = run(argv)
        assert r.returncode == 0, (argv, r.stdout[-500:], r.stderr[-1000:])
        if argv[:2] == ["dead-letter", "list"]:
            assert "0 dead letter(s)" in r.stdout + r.stderr
