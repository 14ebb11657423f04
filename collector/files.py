"""The file layer under the spool, the quarantine and the dead letters: every write, fsync, truncate and
rename they make goes through one :class:`Files` object, passed by constructor. Tests pass a subclass that
fails (ENOSPC, EIO) at chosen points; production uses this one, which is plain ``os`` calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


class Files:
    def open_append(self, path: Path) -> BinaryIO:
        return open(path, "ab")  # noqa: SIM115 - the caller keeps it open for appends

    def write(self, f: BinaryIO, data: bytes) -> None:
        f.write(data)
        f.flush()

    def fsync(self, f: BinaryIO) -> None:
        os.fsync(f.fileno())

    def truncate(self, f: BinaryIO, size: int) -> None:
        f.truncate(size)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_durably(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically: a temporary file, fsync, rename, fsync of the directory.
        Only once this returns may anything the file replaces or preserves be removed."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            self.write(f, data)
            self.fsync(f)
        os.replace(tmp, path)
        self.fsync_dir(path.parent)
