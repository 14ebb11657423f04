"""Requests accepted recently, by content digest: an identical request re-sent (its answer was lost)
within the window counts once. The digests survive restarts in a small append-only file.

A digest is *claimed* while its first copy is being stored and *settled* once that copy is durable.
Only a settled digest lets a re-sent copy be answered "ok": a copy that arrives while the first is still
claimed waits for the first's outcome (and stores itself if the first failed), so an acknowledgement is
never given for points that are not stored.

At most ``max_entries`` digests are kept (a share of the memory budget, ``core/memory.py``): under more
requests than that in a window the oldest go first, so the window is shorter. Nothing counts twice for
it: this is the fast path, and a re-sent copy whose digest went has its points dropped by point identity
(``collector/identity.py``), at the cost of checking them; points the series limit folded too, as each
keeps its own set's fingerprint. Earlier versions folded distribution points without one, so identity
could not check them, and *pinned* the digest of a request holding some: kept for the whole window,
never evicted. Such digests (the spool's records and the digests file of an earlier version say which)
are still kept pinned here until their window ends."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from meterhouse.collector.model import Blocks


class RecentRequests:
    def __init__(self, path: Path, window_s: float, max_entries: int = 1 << 62) -> None:
        self.path = Path(path)
        self.window_ns = int(window_s * 1e9)
        self.max_entries = max(1, max_entries)
        self._seen: OrderedDict[str, int] = OrderedDict()  # digest → received_ns, oldest first
        self._pinned: OrderedDict[str, int] = OrderedDict()  # the same, never evicted (an earlier version's)
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._file: TextIO | None = None
        self._unsynced = 0

    def load(self, extra: Iterable[tuple[str, int] | tuple[str, int, bool]] = ()) -> int:
        """Read the digests file and the digests of records still in the spool (digest, received, and
        whether pinned: the spool's record says, durably before its request was answered, where the
        file's line may not have reached the disk); keep those in the window."""
        cutoff = time.time_ns() - self.window_ns
        entries: list[tuple[int, str, bool]] = []
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                parts = line.split(" ")
                if len(parts) in (2, 3) and parts[0].isdigit():
                    entries.append((int(parts[0]), parts[1], parts[2:] == ["p"]))
        entries += [(e[1], e[0], len(e) > 2 and bool(e[2])) for e in extra]
        for t, d, pinned in sorted(entries):
            if t >= cutoff:
                self._keep(d, t, pinned)
        self._rewrite()
        return len(self)

    def claim(self, digest: str, wait_s: float = 0.0) -> str:
        """``"new"``: the caller stores the request, then calls ``add`` or ``release``.
        ``"settled"``: an identical request is stored; ``"busy"``: an identical request is still being
        stored after ``wait_s`` (answer retryable). A copy whose first failed (released) becomes new."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                self._prune()
                if digest in self._seen or digest in self._pinned:
                    return "settled"
                if digest not in self._claimed:
                    self._claimed.add(digest)
                    return "new"
                left = deadline - time.monotonic()
                if left <= 0:
                    return "busy"
                self._settled.wait(left)

    def release(self, digest: str) -> None:
        with self._lock:
            self._claimed.discard(digest)
            self._settled.notify_all()

    def add(self, digest: str, received_ns: int) -> None:
        """The request is stored."""
        with self._lock:
            self._claimed.discard(digest)
            self._settled.notify_all()
            self._keep(digest, received_ns)
            if self._file is not None:
                self._file.write(f"{received_ns} {digest}\n")
                self._unsynced += 1

    def _keep(self, digest: str, received_ns: int, pinned: bool = False) -> None:
        if pinned:
            self._seen.pop(digest, None)
            self._pinned[digest] = received_ns
            self._pinned.move_to_end(digest)
        elif digest not in self._pinned:
            self._seen[digest] = received_ns
            self._seen.move_to_end(digest)
        while self._seen and len(self._seen) + len(self._pinned) > self.max_entries:
            self._seen.popitem(last=False)

    def committed(self, batches: Iterable[Blocks]) -> None:
        """Make the digests of batches about to be committed durable, before the spool forgets them.
        The ingest thread adds a digest once its append is durable, but the writer may commit the record
        before that thread gets there; without this its digest could be in neither file after a crash,
        and a re-sent copy would be stored again."""
        with self._lock:
            for b in batches:
                if b.digest not in self._seen and b.digest not in self._pinned:
                    self._keep(b.digest, b.received_ns)
                    if self._file is not None:
                        self._file.write(f"{b.received_ns} {b.digest}\n")
                        self._unsynced += 1
        self.sync()

    def sync(self) -> None:
        """Make added digests durable; called when their points are committed (not on the hot path)."""
        with self._lock:
            if self._file is not None and self._unsynced:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._unsynced = 0
            # Lines are ~55 bytes: compact once the file holds four times what the window does.
            if self._file is not None and self._file.tell() > 4 * 64 * (len(self) + 1000):
                self._rewrite()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None

    def __len__(self) -> int:
        return len(self._seen) + len(self._pinned)

    def _prune(self) -> None:
        cutoff = time.time_ns() - self.window_ns
        for kept in (self._seen, self._pinned):
            while kept:
                digest, t = next(iter(kept.items()))
                if t >= cutoff:
                    break
                kept.popitem(last=False)

    def _rewrite(self) -> None:
        """Replace the file with the digests in the window (write, fsync, rename)."""
        self._prune()
        if self._file is not None:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(f"{t} {d}\n" for d, t in self._seen.items())
            f.writelines(f"{t} {d} p\n" for d, t in self._pinned.items())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for appends
