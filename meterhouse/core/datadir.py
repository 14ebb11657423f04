"""One process per data directory: an exclusive lock taken before anything in the directory is touched.

Two processes on one data directory destroy each other's state: the second one's spool start deletes the
segment the first is still appending to, so what the first acknowledges then lives only in an unlinked
file and is gone at its restart. The embedded engine's own lock (on ``clickhouse/status``) does not
prevent that: it guards the engine's files only, not the spool beside them, and to `meterhouse up` a
refused engine is an endpoint that is down, not a reason to stop. So every command that opens a data
directory first calls :func:`lock`, which creates the directory if it is missing and takes
``flock(LOCK_EX | LOCK_NB)`` on ``meterhouse.lock`` inside it; a second process gets
:class:`DataDirInUse` at once, naming the holder.

The lock lives as long as the process: its file descriptor stays open until exit, and the kernel drops a
``flock`` lock when the last descriptor of it closes, whatever the exit (SIGKILL, a crash, the OOM killer).
A lock left by a dead process therefore cannot exist and needs no cleanup; the file itself stays (removing
it would let two processes lock two different files of the same name), and what it holds, the holder's pid
and command, is only there for the message. The command is the program and its sub-command (``meterhouse
up``), without options, which can carry credentials (``--clickhouse-url``, ``--token``): ``ps -p PID``
shows the rest. The descriptor is not inherited by programs the process starts (close-on-exec).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = "meterhouse.lock"


class DataDirError(Exception):
    """The data directory cannot be locked: it cannot be created, or the lock file cannot be opened."""


class DataDirInUse(DataDirError):
    """Another process holds the data directory."""

    def __init__(self, directory: Path, pid: int | None, command: str) -> None:
        self.directory = directory
        self.pid = pid
        self.command = command
        holder = f"pid {pid}" if pid is not None else "another process"
        if command:
            holder += f" ({command})"
        super().__init__(
            f"the data directory {directory} is in use by {holder}; one process per data directory"
        )


class DataDirLock:
    """The held lock on one data directory (its open lock file)."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (processes need not: exit drops it). Idempotent."""
        with _held_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                _held.pop(self.directory, None)


# The locks this process holds: taking one again returns it (a second open of the file would conflict
# with the first, even in one process).
_held_lock = threading.Lock()
_held: dict[Path, DataDirLock] = {}


def lock(directory: Path) -> DataDirLock:
    """Create ``directory`` if missing and lock it for this process's life.

    Raises :class:`DataDirInUse` when another process holds it, :class:`DataDirError` when it cannot be
    created or locked.
    """
    try:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        directory = directory.resolve()
    except OSError as e:
        raise DataDirError(f"cannot create the data directory {directory}: {e}") from e
    with _held_lock:
        held = _held.get(directory)
        if held is not None:
            return held
        path = directory / LOCK_FILE
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:  # made by another user (root listing dead letters, say): a lock
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # needs no write access, the pid does
        except OSError as e:
            raise DataDirError(f"cannot open the lock file {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    pid, command = _holder(fd)
                    raise DataDirInUse(directory, pid, command) from None
                raise DataDirError(f"cannot lock {path}: {e}") from e
            finally:
                os.close(fd)
        try:  # ours now: say who holds it (the file is truncated only under the lock)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{_command()}\n".encode(), 0)
        except OSError:
            pass  # only the message of a second process needs it (and checks the pid it finds lives)
        held = _held[directory] = DataDirLock(directory, fd)
        return held


def _holder(fd: int, wait_s: float = 1.0) -> tuple[int | None, str]:
    """The pid and command the holder wrote; it writes them just after locking, so wait a moment for
    them. (None, "") when they do not come, or name a process that is gone (a holder that could not
    write the file leaves an earlier one's there)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
        except OSError:
            lines = []
        if len(lines) >= 2 and lines[0].strip().isdigit() and _alive(int(lines[0])):
            return int(lines[0]), lines[1].strip()
        if time.monotonic() >= deadline:
            return None, ""
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def _command() -> str:
    """The program and its sub-command words: ``meterhouse up``, ``meterhouse dead-letter redrive``."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path(sys.executable)
    if program.name == "__main__.py":  # `python -m meterhouse`: the package, as the console script is named
        words = [program.parent.name]
    elif program.name == "-c":
        words = [Path(sys.executable).name, "-c"]
    else:
        words = [program.name]
    for arg in sys.argv[1:]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(words)[:200]
