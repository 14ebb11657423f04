"""Requests accepted recently, by content digest: an identical request re-sent (its answer was lost)
within the window counts once. The digests survive restarts in a small append-only file."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path


class RecentRequests:
    def __init__(self, path: Path, window_s: float) -> None:
        self.path = Path(path)
        self.window_ns = int(window_s * 1e9)
        self._seen: OrderedDict[str, int] = OrderedDict()  # digest → received_ns, oldest first
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._file = None
        self._unsynced = 0

    def load(self, extra: Iterable[tuple[str, int]] = ()) -> int:
        """Read the digests file (and digests of records still in the spool); keep those in the window."""
        cutoff = time.time_ns() - self.window_ns
        entries: list[tuple[int, str]] = []
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                parts = line.split(" ")
                if len(parts) == 2 and parts[0].isdigit():
                    entries.append((int(parts[0]), parts[1]))
        entries += [(t, d) for d, t in extra]
        for t, d in sorted(entries):
            if t >= cutoff:
                self._seen[d] = t
                self._seen.move_to_end(d)
        self._rewrite()
        return len(self._seen)

    def claim(self, digest: str) -> bool:
        """True when the digest is new: the caller stores the request, then calls ``add`` or ``release``."""
        with self._lock:
            self._prune()
            if digest in self._seen or digest in self._claimed:
                return False
            self._claimed.add(digest)
            return True

    def release(self, digest: str) -> None:
        with self._lock:
            self._claimed.discard(digest)

    def add(self, digest: str, received_ns: int) -> None:
        with self._lock:
            self._claimed.discard(digest)
            self._seen[digest] = received_ns
            if self._file is not None:
                self._file.write(f"{received_ns} {digest}\n")
                self._unsynced += 1

    def sync(self) -> None:
        """Make added digests durable; called when their points are committed (not on the hot path)."""
        with self._lock:
            if self._file is not None and self._unsynced:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._unsynced = 0
            # Lines are ~55 bytes: compact once the file holds four times what the window does.
            if self._file is not None and self._file.tell() > 4 * 64 * (len(self._seen) + 1000):
                self._rewrite()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self) -> None:
        cutoff = time.time_ns() - self.window_ns
        while self._seen:
            digest, t = next(iter(self._seen.items()))
            if t >= cutoff:
                break
            self._seen.popitem(last=False)

    def _rewrite(self) -> None:
        """Replace the file with the digests in the window (write, fsync, rename)."""
        self._prune()
        if self._file is not None:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(f"{t} {d}\n" for d, t in self._seen.items())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for appends
