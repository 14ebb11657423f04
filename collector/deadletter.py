"""Dead letters: batches ClickHouse refused for good (content it will never accept), kept on disk with
the reason and the server's error code.

``meterhouse dead-letter list`` shows them and ``meterhouse dead-letter redrive`` inserts them again
(``collector/writer.py``: ``redrive``), deleting each file once it is in. A letter the writer makes on the
embedded engine records the group's ``batch_seq`` and which partitions of which ledger tables already held
the group when it was refused (``landed``), so the redrive adds only what each table lacks; a redrive
writes its own number in the letter before it inserts (``redrive_seq``), so a redrive cut short is
settled from the tables, not guessed (``writer.settle_redrives``).

What a letter holds still counts for the cumulative conversion: the last point of every cumulative series
in the letters is part of the conversion state (:meth:`DeadLetters.cumulative`), beside what ClickHouse
and the spool hold, so the series' next point is converted against it after a restart too.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterhouse.collector.cumulative import Entry
from meterhouse.collector.files import Files
from meterhouse.collector.model import PointBatch
from meterhouse.core.schema import TEMPORALITY_CUMULATIVE

#: Per insert ("n", "d"): per ledger table, the partitions holding the letter's rows already.
Landed = dict[str, dict[str, list[str]]]


@dataclass
class DeadLetter:
    path: Path
    token: str
    reason: str
    points: int
    time: float
    batches: list[PointBatch] | None = None
    #: The writer sent the batches as one block per batch (spool format 3), not merged into one: a
    #: redrive under the token alone sends them the same way, or an insert that did land is not
    #: recognised by ClickHouse.
    per_batch_blocks: bool = False
    #: The ClickHouse error code that refused the batch (None: refused before it reached the server).
    code: int | None = None
    #: The group's ``batch_seq`` (0 for letters of earlier versions).
    seq: int = 0
    #: What of the letter the ledger tables held when it was made, and what a redrive cut short added;
    #: None when not known (a ClickHouse server, whose token decides, or a letter of an earlier version).
    landed: Landed | None = None
    #: The number a redrive gave the letter's rows before it inserted them (None when none is running).
    redrive_seq: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


class DeadLetters:
    """Each letter is written atomically and its directory fsync'd before ``put`` returns, so the spool
    may forget the batch as soon as it does."""

    def __init__(self, directory: Path, files: Files | None = None) -> None:
        self.dir = Path(directory)
        self.files = files or Files()
        self._lock = threading.Lock()
        self._tokens: set[str] | None = None  # of the letters on disk (None: not read yet)
        self._series: dict[int, Entry] = {}  # the last cumulative point of each series in the letters

    def put(
        self,
        token: str,
        reason: str,
        batches: list[PointBatch],
        per_batch_blocks: bool = False,
        *,
        code: int | None = None,
        seq: int = 0,
        landed: Landed | None = None,
    ) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        points = sum(b.total for b in batches)
        meta = {"token": token, "reason": reason, "points": points, "time": time.time(),
                "per_batch_blocks": per_batch_blocks, "code": code, "seq": seq, "landed": landed,
                "redrive_seq": None}  # fmt: skip
        path = self.dir / f"{time.time_ns()}-{token[:16]}.dlq"
        payload = [(b.digest, b.received_ns, b.columns, b.size, b.dist_columns, b.dist_size) for b in batches]
        self._write(path, meta, payload)
        with self._lock:
            if self._tokens is not None:
                self._tokens.add(token)
                self._index(batches)
        return path

    def _write(self, path: Path, meta: dict[str, Any], payload: list[Any]) -> None:
        self.files.write_durably(path, pickle.dumps((meta, payload), protocol=pickle.HIGHEST_PROTOCOL))
        self.files.write_durably(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())

    def update(self, letter: DeadLetter, **changes: Any) -> None:
        """Rewrite ``letter``'s record (``landed``, ``redrive_seq``) atomically and durably."""
        meta, payload = pickle.loads(letter.path.read_bytes())
        meta.update(changes)
        self._write(letter.path, meta, payload)
        for name, value in changes.items():
            setattr(letter, name, value)
        letter.meta = meta

    def count(self) -> int:
        """Dead letters on disk (cheap: no file is read); what meterhouse_dead_letters_pending shows."""
        try:
            return sum(1 for _ in self.dir.glob("*.dlq"))
        except OSError:
            return 0

    def list(self, with_batches: bool = False) -> list[DeadLetter]:
        """Every letter on disk (their batches all in memory: :meth:`each` reads one at a time)."""
        return list(self.each(with_batches))

    def each(self, with_batches: bool = False) -> Iterator[DeadLetter]:
        """The letters on disk in the order they were made, read one at a time (with their batches: one
        group each, so memory holds one group's points, not every letter's); a letter removed meanwhile
        is passed over."""
        for path in sorted(self.dir.glob("*.dlq")):
            try:
                meta, payload = pickle.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            batches = None
            if with_batches:
                batches = [PointBatch(c, s, d, r, dc, ds) for d, r, c, s, dc, ds in payload]
            del payload
            yield DeadLetter(
                path, meta["token"], meta["reason"], meta["points"], meta["time"], batches,
                bool(meta.get("per_batch_blocks", False)), meta.get("code"), int(meta.get("seq") or 0),
                meta.get("landed"), meta.get("redrive_seq"), meta,
            )  # fmt: skip

    def remove(self, letter: DeadLetter) -> None:
        letter.path.unlink(missing_ok=True)
        letter.path.with_suffix(".json").unlink(missing_ok=True)

    # -- what the letters on disk hold, for the writer and the cumulative conversion -----------------
    def load(self) -> None:
        """Read every letter's token and cumulative points (at start, before the writer and receivers);
        done on first use otherwise."""
        with self._lock:
            self._load()

    def _load(self) -> None:
        if self._tokens is not None:
            return
        self._tokens, self._series = set(), {}
        if not self.dir.exists():
            return
        for letter in self.each(with_batches=True):
            self._tokens.add(letter.token)
            self._index(letter.batches or [])

    def _index(self, batches: Iterable[PointBatch]) -> None:
        for b in batches:
            c = b.columns
            if not b.size or "series_id" not in c:
                continue
            for i, sid in enumerate(c["series_id"]):
                if not sid or c["temporality"][i] != TEMPORALITY_CUMULATIVE:
                    continue
                t = c["time"][i]
                e = self._series.get(sid)
                if e is not None and t <= e.time_ns:
                    continue
                value = c["cumulative_int"][i] if c["is_int"][i] else c["cumulative_double"][i]
                self._series[sid] = Entry(c["series_start"][i], t, value)

    def holds(self, token: str) -> bool:
        """Whether a letter on disk holds the group of ``token`` (a replay after a crash between the
        letter and the spool's commit mark must not write it again)."""
        with self._lock:
            self._load()
            assert self._tokens is not None
            return token in self._tokens

    def cumulative(self, ids: Iterable[int]) -> dict[int, Entry]:
        """The last point of each listed cumulative series that a letter holds."""
        with self._lock:
            self._load()
            return {sid: self._series[sid] for sid in ids if sid in self._series}
