"""One process per data directory: a second process on a held data directory is refused at once and the
first one goes on untouched (its spool is not deleted under it, what it acknowledges is kept)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from otlp_builders import point, sum_request

from meterhouse.core.close import Month
from meterhouse.demo import fetch_usage as api_usage

HOUR = 3600


def refusal(directory: Path, pid: int) -> str:
    return f"meterhouse: the data directory {directory.resolve()} is in use by pid {pid} ("


def wait_exit(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit code, or None if the process still runs after ``timeout_s``."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def deleted_files_under(pid: int, directory: Path) -> list[str]:
    """Files the process holds open under ``directory`` that are deleted (unlinked under it)."""
    prefix = str(directory.resolve()) + "/"
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith(prefix) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def send(up, value: int, org: str) -> None:
    body = sum_request({"api.calls": [point(value, {"org.id": org})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, timeout=60,
                      headers={"Content-Type": "application/x-protobuf"})  # fmt: skip
    assert r.status_code == 200, r.text  # acknowledged: spooled and fsync'd


def total(up, org: str) -> int | float:
    now = int(time.time())
    return api_usage(up.api, org, "api.calls", now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR, "1h")[
        "total"
    ]


@pytest.mark.e2e
def test_a_second_up_on_a_held_data_dir_exits_at_once_naming_the_holder(up_factory, tmp_path):
    data = tmp_path / "d"
    first = up_factory(data_dir=data)
    started = time.monotonic()
    second = up_factory(data_dir=data, wait=False)
    code = wait_exit(second.proc, 30)
    took = time.monotonic() - started
    out = second.output()
    assert code not in (None, 0), f"the second `meterhouse up` still runs or exited 0 ({code}):\n{out}"
    assert took < 15, took  # refused at once: no waiting for the lock, no start-up before it
    assert out.startswith(refusal(data, first.proc.pid)), out
    assert "one process per data directory" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out  # one line, nothing logged before it
    assert requests.get(f"{first.api}/readyz", timeout=10).status_code == 200
    assert first.stop() == 0


@pytest.mark.e2e
def test_the_first_keeps_its_spool_and_what_it_acknowledges_after_a_second_up(up_factory, tmp_path):
    data = tmp_path / "d"
    first = up_factory("--flush-interval-s", "60", data_dir=data)  # what it acknowledges stays spooled
    second = up_factory(data_dir=data, wait=False)
    deadline = time.monotonic() + 60
    while second.proc.poll() is None and time.monotonic() < deadline:  # refused, or (before the lock) ready
        try:
            if requests.get(f"{second.api}/readyz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.1)
    ran = second.proc.poll() is None
    second.stop(signal.SIGKILL)
    send(first, 7, "org-lock")
    deleted = deleted_files_under(first.proc.pid, data)
    first.stop(signal.SIGKILL)  # the point is in the spool only: the restart must replay it

    again = up_factory(data_dir=data)
    again.drain()
    assert (ran, deleted, total(again, "org-lock")) == (False, [], 7)


@pytest.mark.e2e
def test_close_direct_and_dead_letter_on_a_held_data_dir_are_refused_and_change_nothing(up_factory, tmp_path):
    from meterhouse.collector.deadletter import DeadLetters
    from meterhouse.collector.decode import Limits, decode_request
    from meterhouse.collector.model import content_digest

    data = tmp_path / "d"
    req = sum_request({"api.calls": [point(5, {"org.id": "org-dl"})]})
    batch = decode_request(
        req, Limits(), now_ns=time.time_ns(), digest=content_digest(req.SerializeToString())
    )
    DeadLetters(data / "dead-letter").put("lock-test-token", "refused in a test", [batch.batch])
    letters = {p.name: p.read_bytes() for p in (data / "dead-letter").iterdir()}
    first = up_factory(data_dir=data)
    month = Month.of_ns(time.time_ns()).previous()  # --force: a close would be written
    meterhouse = [sys.executable, "-m", "meterhouse"]
    commands = {
        "close": [
            *meterhouse,
            "close",
            "--month",
            str(month),
            "--direct",
            "--force",
            "--data-dir",
            str(data),
        ],
        "redrive": [*meterhouse, "dead-letter", "redrive", "--data-dir", str(data)],
        "list": [*meterhouse, "dead-letter", "list", "--data-dir", str(data)],
    }
    results = {name: subprocess.run(cmd, capture_output=True, text=True, timeout=120)
               for name, cmd in commands.items()}  # fmt: skip
    refused = {
        name: r.returncode != 0
        and r.stderr.startswith(refusal(data, first.proc.pid))
        and len(r.stderr.strip().splitlines()) == 1
        and r.stdout == ""
        for name, r in results.items()
    }
    assert all(refused.values()), {n: (r.returncode, r.stdout, r.stderr[-2000:]) for n, r in results.items()}
    assert {p.name: p.read_bytes() for p in (data / "dead-letter").iterdir()} == letters
    assert requests.get(f"{first.api}/readyz", timeout=10).status_code == 200
    assert first.stop() == 0

    again = up_factory(data_dir=data)  # nothing the refused commands could have written shows
    assert requests.get(f"{again.api}/api/v1/months/{month}/close", timeout=30).status_code == 404
    assert {p.name: p.read_bytes() for p in (data / "dead-letter").iterdir()} == letters


HOLD = """
import sys, time
from meterhouse.core import datadir
datadir.lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""

TRY = """
import json, sys
from meterhouse.core import datadir
try:
    datadir.lock(sys.argv[1])
except datadir.DataDirInUse as e:
    print(json.dumps({"pid": e.pid, "command": e.command, "message": str(e)}))
    sys.exit(3)
print(json.dumps({"locked": True}))
"""


def test_the_lock_names_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    data = tmp_path / "missing" / "data"  # created by the lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        tried = subprocess.run(
            [sys.executable, "-c", TRY, str(data)], capture_output=True, text=True, timeout=60
        )
        assert tried.returncode == 3, tried.stderr
        got = json.loads(tried.stdout)
        command = f"{Path(sys.executable).name} -c {data}"  # the program and its words before any option
        assert got["pid"] == holder.pid and got["command"] == command
        assert got["message"] == (
            f"the data directory {data.resolve()} is in use by pid {holder.pid} ({command}); "
            "one process per data directory"
        )
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(30)
        holder.stdout.close()
    assert (data / "meterhouse.lock").exists()  # the file stays; the lock went with the process
    tried = subprocess.run([sys.executable, "-c", TRY, str(data)], capture_output=True, text=True, timeout=60)
    assert tried.returncode == 0 and json.loads(tried.stdout) == {"locked": True}, tried.stderr


def test_the_lock_is_taken_once_per_process_and_released_with_it(tmp_path):
    from meterhouse.core import datadir

    held = datadir.lock(tmp_path)
    try:
        assert datadir.lock(tmp_path / ".") is held  # again in the same process: the same lock
        assert (tmp_path / "meterhouse.lock").read_text().splitlines()[0] == str(os.getpid())
        busy = subprocess.run(
            [sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert busy.returncode == 3 and json.loads(busy.stdout)["pid"] == os.getpid()
    finally:
        held.release()
    free = subprocess.run(
        [sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert free.returncode == 0, free.stderr


def test_a_lock_file_another_user_made_is_locked_read_only_and_its_stale_pid_not_named(tmp_path, monkeypatch):
    """Root ran a dead-letter list first: the service's user cannot write the lock file, only lock it,
    and the pid left in it (root's, gone) must not be named as the holder."""
    from meterhouse.core import datadir

    (tmp_path / "meterhouse.lock").write_text("999999999\nmeterhouse dead-letter\n")  # above any pid_max
    real_open = os.open

    def open_as_another_user(path, flags, *args):
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(datadir.os, "open", open_as_another_user)
    held = datadir.lock(tmp_path)
    monkeypatch.undo()
    try:
        busy = subprocess.run(
            [sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
        assert busy.returncode == 3, busy.stderr
        assert json.loads(busy.stdout)["message"] == (
            f"the data directory {tmp_path.resolve()} is in use by another process; one process per data directory"
        )
    finally:
        held.release()
