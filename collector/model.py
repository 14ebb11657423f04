"""The unit that flows through the pipeline: one decoded request's points, column by column."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from meterhouse.core import schema

#: Columns a decoded batch carries: every ingest column except ``batch_id``, set when written.
#: What the writer adds to every row of a group (its token and sequence number); not in the spool.
WRITER_COLUMNS = ("batch_id", "batch_seq")
BATCH_COLUMNS = tuple(n for n in schema.INGEST_COLUMN_NAMES if n not in WRITER_COLUMNS)
DIST_BATCH_COLUMNS = tuple(n for n in schema.DIST_INGEST_COLUMN_NAMES if n not in WRITER_COLUMNS)


class Backpressure(Exception):
    """The pipeline is full: answer retryable (HTTP 503 / gRPC UNAVAILABLE) and let the client retry."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class PointBatch:
    """One request's points as columns: number points (:data:`BATCH_COLUMNS`) and distribution points
    (:data:`DIST_BATCH_COLUMNS`), plus the request's content digest."""

    columns: dict[str, list[Any]]
    size: int
    digest: str
    received_ns: int
    dist_columns: dict[str, list[Any]] = field(default_factory=dict)
    dist_size: int = 0

    @property
    def total(self) -> int:
        return self.size + self.dist_size

    @staticmethod
    def empty() -> dict[str, list[Any]]:
        return {name: [] for name in BATCH_COLUMNS}

    @staticmethod
    def empty_dist() -> dict[str, list[Any]]:
        return {name: [] for name in DIST_BATCH_COLUMNS}


@dataclass
class Blocks:
    """A spooled request as the writer inserts it: Native-format blocks (``meterhouse.core.native``) of
    its number points (:data:`BATCH_COLUMNS`) and distribution points, without ``batch_id``."""

    numbers: bytes
    size: int
    dists: bytes
    dist_size: int
    digest: str
    received_ns: int
    #: The blocks carry the edge's verify flags (``identity.VERIFY_COLUMN``): the writer must check
    #: the flagged points' identity against what is stored before inserting them.
    verify: bool = False

    @property
    def total(self) -> int:
        return self.size + self.dist_size

    @property
    def nbytes(self) -> int:
        return len(self.numbers) + len(self.dists)


def content_digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h.hexdigest()


class Consumer(Protocol):
    """A pipeline stage (after the OpenTelemetry Collector's consumer and component interfaces)."""

    def consume(self, batch: PointBatch) -> int | None:
        """Take the batch durably, or raise :class:`Backpressure`. The spool returns the record's seq."""

    def start(self) -> None: ...

    def shutdown(self, timeout_s: float) -> None: ...
