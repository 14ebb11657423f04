"""Dead letters: batches ClickHouse refused for good (a permanent error), kept on disk with the reason.

``meterhouse dead-letter list`` shows them and ``meterhouse dead-letter redrive`` inserts them again with
their original deduplication token (so a batch that did land is not counted twice), deleting each file
once it is in.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

from meterhouse.collector.files import Files
from meterhouse.collector.model import PointBatch


@dataclass
class DeadLetter:
    path: Path
    token: str
    reason: str
    points: int
    time: float
    batches: list[PointBatch] | None = None
    #: The writer sent the batches as one block per batch (spool format 3), not merged into one: a
    #: redrive sends them the same way, or an insert that did land is not recognised by ClickHouse.
    per_batch_blocks: bool = False


class DeadLetters:
    """Each letter is written atomically and its directory fsync'd before ``put`` returns, so the spool
    may forget the batch as soon as it does."""

    def __init__(self, directory: Path, files: Files | None = None) -> None:
        self.dir = Path(directory)
        self.files = files or Files()

    def put(self, token: str, reason: str, batches: list[PointBatch], per_batch_blocks: bool = False) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        points = sum(b.total for b in batches)
        meta = {"token": token, "reason": reason, "points": points, "time": time.time(),
                "per_batch_blocks": per_batch_blocks}  # fmt: skip
        path = self.dir / f"{time.time_ns()}-{token[:16]}.dlq"
        payload = [(b.digest, b.received_ns, b.columns, b.size, b.dist_columns, b.dist_size) for b in batches]
        self.files.write_durably(path, pickle.dumps((meta, payload), protocol=pickle.HIGHEST_PROTOCOL))
        self.files.write_durably(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
        return path

    def count(self) -> int:
        """Dead letters on disk (cheap: no file is read); what meterhouse_dead_letters_pending shows."""
        try:
            return sum(1 for _ in self.dir.glob("*.dlq"))
        except OSError:
            return 0

    def list(self, with_batches: bool = False) -> list[DeadLetter]:
        out = []
        for path in sorted(self.dir.glob("*.dlq")):
            meta, payload = pickle.loads(path.read_bytes())
            batches = None
            if with_batches:
                batches = [PointBatch(c, s, d, r, dc, ds) for d, r, c, s, dc, ds in payload]
            out.append(DeadLetter(path, meta["token"], meta["reason"], meta["points"], meta["time"], batches,
                                  bool(meta.get("per_batch_blocks", False))))  # fmt: skip
        return out

    def remove(self, letter: DeadLetter) -> None:
        letter.path.unlink(missing_ok=True)
        letter.path.with_suffix(".json").unlink(missing_ok=True)
