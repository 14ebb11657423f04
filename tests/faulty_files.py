"""A file layer that fails on demand (ENOSPC, EIO), passed to the spool and dead letters by constructor.

Faults are armed by the test (``fail_write``, ``fail_fsync``) or read from a small control file (for a
`meterhouse up` subprocess started by tests/fault_up.py). ``power_loss()`` cuts every file back to what
was last fsync'd (plus a torn part of what was not), as a machine losing power would."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
from pathlib import Path

from meterhouse.collector.files import Files


class FaultyFiles(Files):
    def __init__(self, control: Path | None = None, seed: int = 0) -> None:
        self.control = control
        self.rng = random.Random(seed)
        self.writes_to_fail = 0  # the next N writes fail after writing part of their bytes
        self.fail_kind: int | None = None  # only writes whose first record is of this spool type
        self.fsyncs_to_fail = 0
        self.truncate_fails = False
        self.failed = 0
        self.synced: dict[str, int] = {}  # path → size at its last fsync
        self._lock = threading.Lock()
        self._mtime = None
        self._p_write = 0.0

    # -- arming ---------------------------------------------------------------------------------
    def fail_write(self, n: int = 1) -> None:
        self.writes_to_fail += n

    def fail_fsync(self, n: int = 1) -> None:
        self.fsyncs_to_fail += n

    def _poll(self) -> None:
        """Read ``{"p_write": 0.05}`` from the control file: each write then fails with that chance."""
        if self.control is None:
            return
        try:
            st = self.control.stat()
            key = (st.st_mtime_ns, st.st_size)
            if key != self._mtime:
                text = self.control.read_text()
                if text:  # not caught between truncate and write
                    self._p_write = float(json.loads(text).get("p_write", 0))
                    self._mtime = key
        except (OSError, ValueError):
            pass

    def _should_fail_write(self, data: bytes) -> bool:
        with self._lock:
            self._poll()
            kind_ok = self.fail_kind is None or (len(data) > 2 and data[2] == self.fail_kind)
            if self.writes_to_fail and kind_ok:
                self.writes_to_fail -= 1
                return True
            return self._p_write > 0 and self.rng.random() < self._p_write

    # -- the file layer -------------------------------------------------------------------------
    def write(self, f, data: bytes) -> None:
        if self._should_fail_write(data):
            self.failed += 1
            f.write(data[: self.rng.randint(0, max(0, len(data) - 1))])  # a torn write
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        super().write(f, data)

    def fsync(self, f) -> None:
        with self._lock:
            fail = self.fsyncs_to_fail > 0
            self.fsyncs_to_fail -= 1 if fail else 0
        if fail:
            self.failed += 1
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().fsync(f)
        self.synced[f.name] = os.fstat(f.fileno()).st_size

    def truncate(self, f, size: int) -> None:
        if self.truncate_fails:
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().truncate(f, size)

    def write_durably(self, path: Path, data: bytes) -> None:
        # Not failed on purpose: quarantine at start-up failing would (rightly) stop the process.
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            Files.write(self, f, data)
            Files.fsync(self, f)
        os.replace(tmp, path)
        self.fsync_dir(path.parent)
        self.synced[str(path)] = len(data)

    def power_loss(self, directory: Path) -> None:
        """Cut each segment back to its last fsync'd size plus a random torn part of the rest."""
        for path in Path(directory).glob("seg-*.wal"):
            size = path.stat().st_size
            synced = self.synced.get(str(path), 0)
            if size > synced:
                keep = synced + self.rng.randint(0, size - synced)
                os.truncate(path, keep)
