"""One process per data directory: a second process on a held data directory is refused at once and the
first one goes on untouched (its spool is not deleted under it, what it acknowledges is kept)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
