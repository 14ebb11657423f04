"""The spool: an append-only, checksummed write-ahead log of accepted points on local disk.

A receiver's answer is sent once the request's points are appended here and fsync'd. The writer reads
records in order, and before each insert appends an INTENT naming the records it groups and the
deduplication token it uses; after each table's insert a PART mark, and after the last a COMMIT. On start
the log is scanned: committed records are skipped, uncommitted intents are replayed with the same
grouping and token (so ClickHouse deduplicates a batch that did commit before the crash), and the rest is
queued afresh. Groups are bounded by points, bytes and attribute keys (``next_group``; a record larger
than a bound is a group alone, and ``max_record_bytes`` and ``max_record_keys`` bound a record). A
replayed group larger than the bounds that the writer found had not landed anywhere is given back
(``release``) and its records grouped afresh: the first new intent over some of its records supersedes
its intent on disk.

Record layout (little-endian): ``b"MH"``, type (u8), payload length (u32), CRC-32 of type, length and
payload (u32), payload. Every segment starts with a FORMAT record (the format version) and a COMMIT (what
was committed when it was opened). A DATA payload (version 4) holds the request's distinct attribute keys
per metric and hour (``attribute_keys``: the writer bounds groups by them), its flags (``FOLDED``) and
its points as ClickHouse Native-format blocks, the form the writer inserts them in: a fingerprint of the
column set, the length of the number block, the number block, the distribution block. A block names its
columns, so a record written by another column set is read back by name (missing columns get their
defaults). Versions 1 and 2 held the decoded columns pickled; they are still read, as is version 3 (no
key count).

Faults: a write or fsync that fails seals the segment (the torn bytes are truncated away when the disk
allows, and nothing is appended after them) and the request fails retryably; its sequence number is
burned and an ABORT record naming it rides on the next fsync'd append, so a record whose fsync failed is
never replayed as if it were safe. A record that fails its checks is skipped: the scan resumes at the
next sound record, and the damaged bytes are copied to ``quarantine/`` (file and directory fsync'd)
before the segment is rewritten without them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from meterhouse.collector.files import Files
from meterhouse.collector.model import BATCH_COLUMNS, DIST_BATCH_COLUMNS, Backpressure, Blocks, PointBatch
from meterhouse.core import native, schema

log = logging.getLogger("meterhouse.spool")

MAGIC = b"MH"
HEADER = struct.Struct("<2sBII")  # magic, type, length, crc
DATA, INTENT, COMMIT, ABORT, PART, FORMAT = 1, 2, 3, 4, 5, 6
KINDS = frozenset({DATA, INTENT, COMMIT, ABORT, PART, FORMAT})
#: Version 1 segments (no FORMAT record) and version 2 hold pickled columns; both are still read, as is
#: version 3 (whose DATA head lacks the attribute-key count: it is counted from the record on start).
FORMAT_VERSION = 4
_VERSION = struct.Struct("<H")
_DATA_HEAD_V3 = struct.Struct("<QQI16s")  # seq, received_ns, points, request digest
_DATA_HEAD = struct.Struct("<QQI16sIB")  # and the attribute keys (``attribute_keys``), flags
#: A DATA record's flag, written by earlier versions: the request holds distribution points the series
#: limit folded without their own set's fingerprint, which point identity cannot check; its digest stays
#: pinned in the request-level dedup for the window (collector/dedup.py). This version writes 0: a folded
#: point keeps its fingerprint in ``series_id`` and is checked as any point.
FOLDED = 1
_RANGE = struct.Struct("<QQ")  # first seq, last seq
_SEQ = struct.Struct("<Q")
_BLOCKS_HEAD = struct.Struct("<II")  # column-set fingerprint, length of the number block
MAX_RECORD = 1 << 31

_TYPES = {c.name: c.type for c in schema.INGEST_COLUMNS}
_DIST_TYPES = {c.name: c.type for c in schema.DIST_INGEST_COLUMNS}
NUMBER_TYPES = tuple(_TYPES[n] for n in BATCH_COLUMNS)
DIST_TYPES = tuple(_DIST_TYPES[n] for n in DIST_BATCH_COLUMNS)
#: Records whose blocks carry exactly today's columns go to ClickHouse as they are; others are conformed.
COLUMN_SET = zlib.crc32(repr((BATCH_COLUMNS, NUMBER_TYPES, DIST_BATCH_COLUMNS, DIST_TYPES)).encode())
#: Today's columns and the edge's verify flags (``identity.VERIFY_COLUMN``) after them: the writer
#: checks the flagged points' identity and inserts the rest without the flags.
VERIFY_COLUMN = "verify"
COLUMN_SET_VERIFY = zlib.crc32(repr((COLUMN_SET, VERIFY_COLUMN)).encode())
#: Marks a batch's points new or to verify, in spool order (``identity.EdgeIdentity.mark``).
Marker = Callable[[PointBatch], tuple[list[int] | None, list[int] | None]]


_HOUR_NS = 3600 * 10**9


def attribute_keys(batch: PointBatch) -> int:
    """The batch's distinct attribute keys per metric and hour (of its number points): the
    attribute-cardinality views keep two states for each, and an insert's memory in the engine grows
    with them far faster than with its bytes (31,750 distinct keys took 96-112 MiB, 95,250 took 256-320
    MiB; 508,000 entries under 126 keys, 96 MiB: BENCHMARKS.md §13). Counted over the distinct key sets,
    so points that repeat one set cost one tuple each."""
    if not batch.size:
        return 0
    c = batch.columns
    sets = set(
        zip(c["metric"], map(_HOUR_NS.__rfloordiv__, c["time"]), map(tuple, c["attr_keys"]), strict=True)
    )
    return len({(metric, hour, key) for metric, hour, keys in sets for key in keys})


def encode_blocks(batch: PointBatch, max_bytes: int = -1) -> Blocks:
    """The batch as the spool stores it and the writer inserts it. With ``max_bytes`` (-1: none), raises
    :class:`RecordTooLarge` as soon as its blocks would take more, before they are built whole: a
    request's resource, scope and metric are copied onto each of its points, so a small request can
    make a block thousands of times its size."""
    try:
        numbers = (
            native.encode(BATCH_COLUMNS, NUMBER_TYPES, [batch.columns[n] for n in BATCH_COLUMNS], max_bytes)
            if batch.size
            else b""
        )
        left = max_bytes - len(numbers) if max_bytes >= 0 else -1
        dists = (
            native.encode(
                DIST_BATCH_COLUMNS, DIST_TYPES, [batch.dist_columns[n] for n in DIST_BATCH_COLUMNS], left
            )
            if batch.dist_size
            else b""
        )
    except native.BlockTooLarge:
        raise RecordTooLarge(
            f"the request's {batch.total} points take more than {max_bytes} bytes as stored (resource, "
            "scope and metric are stored with every point); send fewer points a request"
        ) from None
    return Blocks(numbers, batch.size, dists, batch.dist_size, batch.digest, batch.received_ns)


def _with_verify(blocks: Blocks, numbers: list[int] | None, dists: list[int] | None) -> Blocks:
    """The blocks with the verify flags as a last column of each, when any point is to verify."""
    if numbers is None and dists is None:
        return blocks
    return Blocks(
        native.with_flags(blocks.numbers, VERIFY_COLUMN, numbers or [0] * blocks.size)
        if blocks.size
        else b"",
        blocks.size,
        native.with_flags(blocks.dists, VERIFY_COLUMN, dists or [0] * blocks.dist_size)
        if blocks.dist_size
        else b"",
        blocks.dist_size,
        blocks.digest,
        blocks.received_ns,
        verify=True,
    )


class SpoolError(Exception):
    """The spool cannot take the request (a disk error): answer retryable."""


class RecordTooLarge(Exception):
    """The request's points take more than one record may hold (``max_record_bytes``, or
    ``max_record_keys`` distinct attribute keys): refused for good, nothing of it kept (413 /
    RESOURCE_EXHAUSTED)."""


class SpoolFormatError(Exception):
    """The spool was written in a format this version cannot read; see the README's migration note."""


@dataclass
class Record:
    """An uncommitted DATA record: where it lies, and its batch while it is kept in memory."""

    seq: int
    segment: Path
    offset: int
    length: int
    points: int
    received_ns: int
    blocks: Blocks | None = None  # kept in memory while the cache's byte budget allows
    epoch: int = 0  # the append that wrote it (group commit: durable once the synced epoch reaches it)
    state: str = "durable"  # "written" until its group fsync; "failed" if that fsync (or write) failed
    version: int = FORMAT_VERSION  # the format of the segment it lies in
    keys: int = 0  # distinct attribute keys per metric and hour (``attribute_keys``)


@dataclass
class Group:
    """Records inserted together under one token. ``replay`` groups were started before a restart."""

    records: list[Record]
    token: str | None = None
    replay: bool = False
    done: set[str] = field(default_factory=set)  # tables ("n", "d") already inserted under the token
    #: A replay group that lost records to damage: its insert cannot repeat the first try's blocks, so
    #: ClickHouse would not drop it; the writer asks each table whether the batch is in first.
    damaged: bool = False

    @property
    def first(self) -> int:
        return self.records[0].seq

    @property
    def last(self) -> int:
        return self.records[-1].seq


@dataclass
class ScanReport:
    records: int = 0
    committed_through: int = 0
    replay_groups: int = 0
    pending_records: int = 0
    quarantined_records: int = 0
    quarantined_bytes: int = 0
    digests: list[tuple[str, int, bool]] = field(default_factory=list)  # digest, received, pinned


def _data_head(version: int) -> struct.Struct:
    return _DATA_HEAD if version >= 4 else _DATA_HEAD_V3


def _encode(kind: int, payload: bytes) -> bytes:
    head = struct.pack("<BI", kind, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return HEADER.pack(MAGIC, kind, len(payload), crc) + payload


def _digest_bytes(digest: str) -> bytes:
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    return raw if len(raw) == 16 else hashlib.blake2b(digest.encode(), digest_size=16).digest()


def _default(column_type: str) -> Callable[[], Any] | None:
    t = column_type.removeprefix("LowCardinality(").removeprefix("Nullable(")
    if t.startswith("Array("):
        return list
    if t.startswith("Map("):
        return dict
    if t.startswith("String"):
        return lambda: ""
    if t.startswith("Float"):
        return lambda: 0.0
    if t.startswith(("Int", "UInt", "DateTime")):
        return lambda: 0
    return None


def _conform(
    cols: dict[str, list[Any]],
    size: int,
    names: tuple[str, ...],
    columns: tuple[schema.Column, ...],
    seq: int,
) -> dict[str, list[Any]]:
    if all(n in cols for n in names) and len(cols) == len(names):
        return cols
    types = {c.name: c.type for c in columns}
    out: dict[str, list[Any]] = {}
    for n in names:
        if n in cols:
            out[n] = cols[n]
            continue
        make = _default(types[n])
        if make is None:
            raise SpoolFormatError(
                f"spool record {seq} lacks column {n} ({types[n]}), which has no default; "
                "see the README, section 'Spool format'"
            )
        out[n] = [make() for _ in range(size)]
    return out


def _conformed(
    seq: int,
    cols: dict[str, list[Any]],
    size: int,
    digest: str,
    received: int,
    dist: dict[str, list[Any]],
    dist_size: int,
) -> PointBatch:
    """A record's columns as today's batch: a record written by another version may lack columns added
    since (they get their defaults), and columns since removed are dropped; anything else is refused
    with a clear error."""
    cols = _conform(cols, size, BATCH_COLUMNS, schema.INGEST_COLUMNS, seq)
    if dist_size:
        dist = _conform(dist, dist_size, DIST_BATCH_COLUMNS, schema.DIST_INGEST_COLUMNS, seq)
    return PointBatch(cols, size, digest, received, dist, dist_size)


def _columns(block: bytes) -> tuple[dict[str, list[Any]], int]:
    _names, _types, columns, rows = native.decode(block)
    return columns, rows


def _sound(raw: bytes, pos: int) -> int:
    """The end of a sound record at ``pos``, or -1."""
    if len(raw) - pos < HEADER.size:
        return -1
    magic, kind, length, crc = HEADER.unpack_from(raw, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or kind not in KINDS or end > len(raw):
        return -1
    payload = memoryview(raw)[pos + HEADER.size : end]
    return end if zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, length))) == crc else -1


def _next_sound(raw: bytes, pos: int) -> int:
    """The offset of the next sound record after ``pos``, or the end of ``raw``."""
    while True:
        pos = raw.find(MAGIC, pos + 1)
        if pos < 0:
            return len(raw)
        if _sound(raw, pos) > 0:
            return pos


def _live_intents(intents: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The intents a replay follows, in order. An intent written again for the same records (after a
    failed write) is the same group; an intent over some of an earlier one's records supersedes it: the
    writer writes one only after it found that nothing of the earlier group had landed and gave its
    records back to be grouped afresh (:meth:`Spool.release`), so the earlier one's other records are
    pending again."""
    live: list[tuple[int, int, str]] = []
    for first, last, token in intents:
        if any((a, z) == (first, last) for a, z, _t in live):
            continue
        live = [(a, z, t) for a, z, t in live if z < first or a > last]
        live.append((first, last, token))
    return sorted(live)


class Spool:
    """Durable queue between receivers (``consume``) and the writer (``next_group``/``commit``)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        fsync: bool = True,
        max_cached_bytes: int = 256 << 20,
        files: Files | None = None,
        mark: Marker | None = None,
        max_record_bytes: int = -1,
        max_record_keys: int = -1,
    ) -> None:
        """``mark`` flags each batch's points new or to verify, under the append lock (point identity).
        ``max_record_bytes`` bounds one request's blocks and ``max_record_keys`` its distinct attribute
        keys per metric and hour (-1: no bound; beyond, :class:`RecordTooLarge`)."""
        self.dir = Path(directory)
        self.mark = mark
        self.max_record_bytes = max_record_bytes
        self.max_record_keys = max_record_keys
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.max_cached_bytes = max_cached_bytes
        self.files = files or Files()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: deque[Record] = deque()  # uncommitted, not yet in a group, in seq order
        self._replay: deque[Group] = deque()  # groups with intents from before the restart
        self._inflight: Group | None = None
        self._segments: OrderedDict[Path, int] = OrderedDict()  # path → highest seq in it
        self._active: Path = self.dir / "(none)"  # until open() starts the first segment
        self._file: BinaryIO | None = None
        self._size = 0  # bytes in the active segment
        self._seq = 0
        self._committed = 0
        self._aborted: list[int] = []  # burned seqs whose ABORT is not yet on disk
        self._abort_mark: tuple[int, int] | None = None  # (epoch, count) of the last ABORTs written
        # Group commit: every append gets an epoch; one fsync covers every append made before it began.
        self._epoch = 0  # the last append's epoch
        self._synced = 0  # every append up to this epoch is durable (or failed)
        self._syncing = False  # a group fsync is running (outside the lock)
        self._unsynced: deque[Record] = deque()  # DATA written, waiting for their group fsync
        self._defer_close: list[BinaryIO] = []  # files rotated away while an fsync on them ran
        self._failed_segments: dict[Path, int] = {}  # sealed after a failed fsync → synced epoch then
        self._pending_points = 0
        self._cached_bytes = 0
        self._uncommitted_bytes = 0
        self._uncommitted_keys = 0
        self._closed = False
        self.write_errors = 0  # failed writes or fsyncs (each sealed a segment)

    # -- opening and replay ---------------------------------------------------------------------
    def open(self) -> ScanReport:
        """Scan the log, quarantine damaged records, and queue what is not committed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        report = ScanReport()
        data: dict[int, Record] = {}
        intents: list[tuple[int, int, str]] = []
        parts: dict[tuple[int, int], set[str]] = {}
        aborted: set[int] = set()
        digests: dict[int, tuple[str, int, bool]] = {}
        paths = sorted(self.dir.glob("seg-*.wal"))
        for path in paths:
            top = 0
            for kind, offset, length, payload, version in self._scan(path, report):
                report.records += 1
                if kind == DATA:
                    seq, received, points, digest, *more = _data_head(version).unpack_from(payload)
                    data[seq] = Record(seq, path, offset, length, points, received, version=version,
                                       keys=more[0] if more else -1)  # fmt: skip
                    digests[seq] = (digest.hex(), received, bool(more and more[1] & FOLDED))
                    top = max(top, seq)
                elif kind == INTENT:
                    first, last = _RANGE.unpack_from(payload)
                    intents.append((first, last, payload[_RANGE.size :].decode()))
                elif kind == PART:
                    first, last = _RANGE.unpack_from(payload)
                    parts.setdefault((first, last), set()).add(payload[_RANGE.size :].decode())
                elif kind == ABORT:
                    (seq,) = _SEQ.unpack_from(payload)
                    aborted.add(seq)
                    top = max(top, seq)
                elif kind == COMMIT:
                    (seq,) = _SEQ.unpack_from(payload)
                    self._committed = max(self._committed, seq)
                    top = max(top, seq)
            self._segments[path] = top
            self._seq = max(self._seq, top)
        for seq in aborted:
            data.pop(seq, None)
        report.digests = [digests[seq] for seq in sorted(data)]
        report.committed_through = self._committed
        grouped: set[int] = set()
        for first, last, token in _live_intents(intents):
            if last <= self._committed:
                continue
            records = [data[s] for s in range(first, last + 1) if s in data]
            if records:
                done = parts.get((first, last), set())
                damaged = len(records) + sum(1 for s in aborted if first <= s <= last) < last - first + 1
                self._replay.append(Group(records, token, replay=True, done=set(done), damaged=damaged))
                grouped.update(r.seq for r in records)
        for seq in sorted(data):
            if seq > self._committed and seq not in grouped:
                self._pending.append(data[seq])
        uncommitted = [r for r in data.values() if r.seq > self._committed]
        self._count_keys([r for r in uncommitted if r.keys < 0])
        self._pending_points = sum(r.points for r in uncommitted)
        self._uncommitted_bytes = sum(r.length for r in uncommitted)
        self._uncommitted_keys = sum(r.keys for r in uncommitted)
        report.replay_groups = len(self._replay)
        report.pending_records = len(uncommitted)
        self._rotate()
        self._drop_committed_segments()
        return report

    def uncommitted_records(self) -> list[Record]:
        """Every uncommitted record, in seq order (replayed groups included)."""
        with self._lock:
            records = [r for g in (self._inflight, *self._replay) if g for r in g.records]
            records += list(self._pending)
        return sorted(records, key=lambda r: r.seq)

    @property
    def committed_seq(self) -> int:
        return self._committed

    @property
    def last_seq(self) -> int:
        """The highest sequence number used (0 for a spool that never held a record)."""
        return self._seq

    def advance(self, seq: int) -> None:
        """Number the next record above ``seq``: a new spool beside a database that already holds
        groups of an earlier one (the writer's ledger needs the numbers to keep growing; see
        ``schema.SEQ_COLUMN``). Call before the first append (the records then carry the number across
        restarts)."""
        with self._lock:
            self._seq = max(self._seq, seq)

    def reserve(self, seq: int) -> None:
        """Number every later record above ``seq``, durably (a COMMIT mark at ``seq``, fsync'd): the
        numbers a dead letter's redrive gives its rows (``collector/writer.py``: ``redrive``). Only while
        nothing is uncommitted: the mark covers every record below it."""
        with self._lock:
            if self._pending or self._replay or self._inflight or self._unsynced:
                raise SpoolError(
                    "the spool holds records not yet written: nothing can be numbered above them"
                )
            if seq <= self._seq:
                return
            self._seq = seq
            self._committed = max(self._committed, seq)
            self._append(_encode(COMMIT, _SEQ.pack(seq)))
            self._segments[self._active] = seq
            self._wait_durable(self._epoch)

    def _count_keys(self, records: list[Record]) -> None:
        """Records an earlier format wrote carry no attribute-key count: counted from their points, once,
        on the start that reads them (the writer bounds its groups by it)."""
        if not records:
            return
        log.info("counting the attribute keys of records an earlier version wrote",
                 extra={"records": len(records)})  # fmt: skip
        for r in records:
            r.keys = attribute_keys(self.load(r))

    def _scan(self, path: Path, report: ScanReport) -> Iterator[tuple[int, int, int, bytes, int]]:
        """Yield (kind, offset, length, payload, format version) of every sound record. Damaged stretches
        are skipped (the scan resumes at the next sound record), copied to the quarantine and cut from the
        segment."""
        raw = path.read_bytes()
        bad: list[tuple[int, int]] = []
        pos = 0
        while pos < len(raw):
            end = _sound(raw, pos)
            if end < 0:
                nxt = _next_sound(raw, pos)
                bad.append((pos, nxt))
                pos = nxt
            else:
                pos = end
        if bad:
            raw = self._quarantine(path, raw, bad, report)
        pos = 0
        version = 1
        while pos < len(raw):
            _magic, kind, length, _crc = HEADER.unpack_from(raw, pos)
            end = pos + HEADER.size + length
            payload = raw[pos + HEADER.size : end]
            if kind == FORMAT:
                (version,) = _VERSION.unpack_from(payload)
                if version > FORMAT_VERSION:
                    raise SpoolFormatError(
                        f"spool segment {path.name} has format version {version}; this meterhouse reads "
                        f"versions 1-{FORMAT_VERSION}. Drain it with the version that wrote it (or move "
                        "the spool directory aside); see the README, section 'Spool format'."
                    )
            else:
                yield kind, pos, end - pos, payload, version
            pos = end

    def _quarantine(self, path: Path, raw: bytes, bad: list[tuple[int, int]], report: ScanReport) -> bytes:
        """Keep the damaged bytes durably in ``quarantine/``, then rewrite the segment without them."""
        qdir = self.dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        stamp = int(time.time())
        for start, end in bad:
            target = qdir / f"{path.stem}-{start}-{stamp}.bin"
            self.files.write_durably(target, raw[start:end])
            report.quarantined_records += 1
            report.quarantined_bytes += end - start
            log.warning("spool: damaged record quarantined",
                        extra={"segment": path.name, "offset": start, "bytes": end - start,
                               "quarantine_file": target.name})  # fmt: skip
        kept, pos = [], 0
        for start, end in bad:
            kept.append(raw[pos:start])
            pos = end
        kept.append(raw[pos:])
        cleaned = b"".join(kept)
        self.files.write_durably(path, cleaned)
        return cleaned

    # -- appending (receivers) ------------------------------------------------------------------
    def consume(self, batch: PointBatch) -> int:
        """Append the batch durably; return its seq only once it is on disk (fsync'd when configured)."""
        if batch.total == 0:
            return 0
        keys = attribute_keys(batch)
        if 0 <= self.max_record_keys < keys:
            raise RecordTooLarge(
                f"the request's points carry {keys} distinct attribute keys (per metric and hour), more "
                f"than the {self.max_record_keys} one insert may hold; send fewer distinct keys a request"
            )
        blocks = encode_blocks(batch, self.max_record_bytes)
        digest = _digest_bytes(batch.digest)
        with self._lock:
            if self._closed:
                raise Backpressure("shutting down")
            need = _BLOCKS_HEAD.size + len(blocks.numbers) + len(blocks.dists)
            if self._uncommitted_bytes + need > self.max_bytes and self._uncommitted_bytes > 0:
                raise Backpressure(
                    f"spool full: {self._uncommitted_bytes} of {self.max_bytes} bytes await ClickHouse", 5
                )
            if self.mark is not None:
                # Under the lock: points are marked in the order of their records (see identity.py).
                blocks = _with_verify(blocks, *self.mark(batch))
            column_set = COLUMN_SET_VERIFY if blocks.verify else COLUMN_SET
            body = _BLOCKS_HEAD.pack(column_set, len(blocks.numbers)) + blocks.numbers + blocks.dists
            seq = self._seq + 1
            record = _encode(
                DATA,
                _DATA_HEAD.pack(seq, batch.received_ns, batch.total, digest, keys, 0) + body,
            )
            if len(record) > MAX_RECORD:
                raise RecordTooLarge(
                    f"the request's points take {len(record)} bytes, above a record's {MAX_RECORD}"
                )
            self._seq = seq
            try:
                offset = self._append(record)
            except SpoolError:
                # The bytes may be on disk or torn: the seq is burned for good.
                self._aborted.append(seq)
                raise
            self._segments[self._active] = seq
            cached = self._cached_bytes + blocks.nbytes <= self.max_cached_bytes
            rec = Record(seq, self._active, offset, len(record), batch.total, batch.received_ns,
                         blocks if cached else None, self._epoch, "written", keys=keys)  # fmt: skip
            self._cached_bytes += blocks.nbytes if cached else 0
            self._pending_points += batch.total
            self._uncommitted_bytes += len(record)
            self._uncommitted_keys += keys
            self._unsynced.append(rec)
            self._wait_durable(rec.epoch, rec)
            return seq

    def _wait_durable(self, epoch: int, rec: Record | None = None) -> None:
        """Group commit: return once the append of ``epoch`` is fsync'd. The first waiter to find no fsync
        running starts one (outside the lock) covering every append made so far; the others wait for it.
        A failed fsync fails every append not yet durable in its segment. Called with the lock held."""
        segment = rec.segment if rec is not None else self._active
        while True:
            failed = segment in self._failed_segments and epoch > self._failed_segments[segment]
            if failed or (rec is not None and rec.state == "failed"):
                raise SpoolError("spool write or fsync failed: the request is not stored")
            if self._synced >= epoch and (rec is None or rec.state == "durable"):
                return
            if self._syncing:
                self._cond.wait()
                continue
            self._syncing = True
            target, f, seg = self._epoch, self._file, self._active
            self._lock.release()
            try:
                error = None
                if f is not None and self.fsync:
                    self.files.fsync(f)
            except OSError as e:
                error = e
            finally:
                self._lock.acquire()
                self._syncing = False
                for old in self._defer_close:
                    try:
                        old.close()
                    except OSError:
                        pass
                self._defer_close.clear()
            if error is None:
                self._synced_to(target)
            elif seg == self._active and f is self._file:
                self._seal(self._size)
            self._cond.notify_all()

    def _uncache(self, rec: Record) -> None:
        if rec.blocks is not None:
            self._cached_bytes -= rec.blocks.nbytes
            rec.blocks = None

    def _synced_to(self, target: int) -> None:
        """Appends up to ``target`` are durable: their records become visible to the writer, in order."""
        self._synced = max(self._synced, target)
        while self._unsynced and self._unsynced[0].epoch <= target:
            rec = self._unsynced.popleft()
            rec.state = "durable"
            self._pending.append(rec)
        if self._abort_mark is not None and self._abort_mark[0] <= target:
            del self._aborted[: self._abort_mark[1]]
            self._abort_mark = None
        self._cond.notify_all()

    def _fail_unsynced(self, segment: Path) -> None:
        """The segment's fsync failed: none of its appends not yet durable may be trusted."""
        self._failed_segments[segment] = self._synced
        keep: deque[Record] = deque()
        for rec in self._unsynced:
            if rec.segment != segment:
                keep.append(rec)
                continue
            rec.state = "failed"
            self._aborted.append(rec.seq)
            self._pending_points -= rec.points
            self._uncommitted_bytes -= rec.length
            self._uncommitted_keys -= rec.keys
            self._uncache(rec)
        self._unsynced = keep
        self._abort_mark = None

    def _append(self, record: bytes) -> int:
        """Write one record (after any ABORT marks still owed) without waiting for its fsync; its offset.
        The append's epoch is ``self._epoch`` afterwards (see ``_wait_durable``). On failure the segment
        is sealed and :class:`SpoolError` raised: nothing is ever appended after torn bytes."""
        aborts = b"".join(_encode(ABORT, _SEQ.pack(s)) for s in self._aborted)
        if self._file is None or self._size + len(aborts) + len(record) > self.segment_bytes:
            self._rotate()
        start, f = self._size, self._file
        assert f is not None  # _rotate opened one or raised
        try:
            self.files.write(f, aborts + record)
        except OSError as e:
            self._seal(start)
            raise SpoolError(f"spool write failed: {e}") from e
        self._size += len(aborts) + len(record)
        self._epoch += 1
        if self._aborted:
            self._segments[self._active] = max(self._segments[self._active], max(self._aborted))
            self._abort_mark = (self._epoch, len(self._aborted))
        if not self.fsync:
            self._synced_to(self._epoch)
        return start + len(aborts)

    def _seal(self, good: int) -> None:
        """After a failed write or fsync: cut the torn bytes if the disk lets us, and never append to this
        segment again (after a failed fsync its pages may be gone: nothing that follows may depend on it)."""
        self.write_errors += 1
        log.error("spool: write failed, segment sealed", extra={"segment": self._active.name})
        if self._file is not None:
            try:
                self.files.truncate(self._file, good)
            except OSError:
                pass  # the scan at the next start skips the torn bytes
            self._close(self._file)
        self._segments[self._active] = max(self._segments.get(self._active, 0), self._seq)
        self._fail_unsynced(self._active)
        self._file = None

    def _rotate(self) -> None:
        if self._file is not None:
            try:
                if self.fsync:
                    self.files.fsync(self._file)  # what waits for its group fsync, and the marks
            except OSError:
                self._seal(self._size)  # fails what waited in it
            else:
                self._synced_to(self._epoch)
                self._close(self._file)
                self._file = None
        path = self.dir / f"seg-{time.time_ns():020d}.wal"
        head = _encode(FORMAT, _VERSION.pack(FORMAT_VERSION)) + _encode(COMMIT, _SEQ.pack(self._committed))
        try:
            f = self.files.open_append(path)
        except OSError as e:
            self.write_errors += 1
            raise SpoolError(f"cannot open a spool segment: {e}") from e
        self._file, self._active, self._size = f, path, 0
        self._segments[path] = self._seq
        try:
            self.files.write(f, head)
            self._size = len(head)
            self.files.fsync_dir(self.dir)
        except OSError as e:
            self._seal(0)
            raise SpoolError(f"cannot start a spool segment: {e}") from e

    def _close(self, f: BinaryIO) -> None:
        if self._syncing:
            self._defer_close.append(f)  # an fsync on it may be running outside the lock
            return
        try:
            f.close()
        except OSError:
            pass

    # -- the writer's side ----------------------------------------------------------------------
    def next_group(
        self,
        max_points: int,
        max_wait_s: float,
        stop: threading.Event,
        max_bytes: int | None = None,
        max_keys: int | None = None,
    ) -> Group | None:
        """The next records to insert, in order: a replayed group, or the pending records up to
        ``max_points`` points, ``max_bytes`` bytes and ``max_keys`` attribute keys (summed over its
        records; a record larger than any bound is a group alone) once that many points, bytes or keys
        wait or the oldest has waited ``max_wait_s``. None when nothing is due before ``stop``."""
        byte_bound = max_bytes if max_bytes is not None else float("inf")
        key_bound = max_keys if max_keys is not None else float("inf")
        with self._cond:
            if self._inflight is not None:
                return self._inflight
            while True:
                if self._replay and (not self._pending or self._replay[0].first < self._pending[0].seq):
                    self._inflight = self._replay.popleft()
                    return self._inflight
                if self._pending:
                    age = time.time() - self._pending[0].received_ns / 1e9
                    full = (
                        self._pending_points >= max_points
                        or self._uncommitted_bytes >= byte_bound
                        or self._uncommitted_keys >= key_bound
                    )
                    if full or age >= max_wait_s or stop.is_set():
                        break
                    self._cond.wait(min(max_wait_s - age, 0.5))
                elif stop.is_set():
                    return None
                else:
                    self._cond.wait(0.5)
            # Records given back by release() come before a later replayed group: groups go in order.
            before = self._replay[0].first if self._replay else None
            records: list[Record] = []
            n = size = keys = 0
            for rec in self._pending:
                if before is not None and rec.seq > before:
                    break
                if records and (
                    n + rec.points > max_points
                    or size + rec.length > byte_bound
                    or keys + rec.keys > key_bound
                ):
                    break
                records.append(rec)
                n += rec.points
                size += rec.length
                keys += rec.keys
            self._inflight = Group(records)
            return self._inflight

    def release(self, group: Group) -> None:
        """Give the records of the group in flight back to be grouped afresh, under the writer's bounds
        (today's, for a replayed group; smaller, for a group that failed for memory): the writer found
        that nothing of it landed (``collector/writer.py``). Its intent stays on disk until the first new
        group's intent, over some of the same records, supersedes it (``_live_intents``); a restart before
        that replays it, and it is released again."""
        with self._lock:
            if self._inflight is not group:
                raise ValueError("only the group in flight can be released")
            self._inflight = None
            if group.replay:  # a live group's records are still at the head of the queue (until commit)
                self._pending.extendleft(reversed(group.records))
            self._cond.notify_all()

    def _payload(self, record: Record) -> bytes:
        with open(record.segment, "rb") as f:
            f.seek(record.offset + HEADER.size)
            return f.read(record.length - HEADER.size)

    def _read_blocks(self, record: Record) -> tuple[Blocks, int]:
        """A version 3 record's blocks read back from its segment, and their column-set fingerprint."""
        payload = self._payload(record)
        head = _data_head(record.version)
        _seq, received, _points, digest, *_keys = head.unpack_from(payload)
        column_set, n_len = _BLOCKS_HEAD.unpack_from(payload, head.size)
        start = head.size + _BLOCKS_HEAD.size
        numbers, dists = payload[start : start + n_len], payload[start + n_len :]
        try:
            size = native.rows_of(numbers) if numbers else 0
            dist_size = native.rows_of(dists) if dists else 0
        except (ValueError, IndexError) as e:
            raise SpoolFormatError(f"spool record {record.seq} cannot be decoded: {e}") from e
        verify = column_set == COLUMN_SET_VERIFY
        return Blocks(numbers, size, dists, dist_size, digest.hex(), received, verify), column_set

    def blocks(self, record: Record) -> Blocks:
        """The record as the writer inserts it: from memory, or read back from its segment."""
        if record.blocks is not None:
            return record.blocks
        if record.version < 3:
            return encode_blocks(self.load(record))  # pickled columns, conformed first
        blocks, column_set = self._read_blocks(record)
        if column_set in (COLUMN_SET, COLUMN_SET_VERIFY):
            return blocks
        # Another column set (an earlier version's): conformed first, its verify flags kept. Dropped
        # with the columns since removed, the points it marked to verify (copies of stored points) were
        # inserted unchecked after an upgrade: 17 stored where 12 were sent.
        batch, numbers, dists = self.load_flagged(record, blocks)
        return _with_verify(encode_blocks(batch), numbers or None, dists or None)

    def load(self, record: Record) -> PointBatch:
        """The record's points as Python columns (for the state rebuilt at start and dead letters)."""
        if record.version >= 3:
            b = record.blocks if record.blocks is not None else self._read_blocks(record)[0]
            return self.decoded(record, b)
        payload = self._payload(record)
        _seq, received, _points, raw_digest = _DATA_HEAD_V3.unpack_from(payload)
        try:
            cols, size, dist, dist_size = pickle.loads(payload[_DATA_HEAD_V3.size :])
        except Exception as e:  # noqa: BLE001 - any undecodable payload
            raise SpoolFormatError(f"spool record {record.seq} cannot be decoded: {e}") from e
        return _conformed(record.seq, cols, size, raw_digest.hex(), received, dist, dist_size)

    def load_flagged(self, record: Record, b: Blocks) -> tuple[PointBatch, list[int], list[int]]:
        """A record whose blocks carry verify flags: its points and the flags of each table."""
        try:
            cols, size = _columns(b.numbers) if b.numbers else (PointBatch.empty(), 0)
            dist, dist_size = _columns(b.dists) if b.dists else ({}, 0)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise SpoolFormatError(f"spool record {record.seq} cannot be decoded: {e}") from e
        numbers, dists = cols.pop(VERIFY_COLUMN, []), dist.pop(VERIFY_COLUMN, [])
        return _conformed(record.seq, cols, size, b.digest, b.received_ns, dist, dist_size), numbers, dists

    def decoded(self, record: Record, b: Blocks) -> PointBatch:
        """A version 3 record's blocks (its own, or the writer's after identity dropped points) as Python
        columns, conformed to today's column set."""
        try:
            cols, size = _columns(b.numbers) if b.numbers else (PointBatch.empty(), 0)
            dist, dist_size = _columns(b.dists) if b.dists else ({}, 0)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise SpoolFormatError(f"spool record {record.seq} cannot be decoded: {e}") from e
        return _conformed(record.seq, cols, size, b.digest, b.received_ns, dist, dist_size)

    def uncommitted_batches(self) -> Iterator[PointBatch]:
        """Every batch not yet committed, read back in order (state that must count them at start)."""
        with self._lock:
            records = [r for g in self._replay for r in g.records] + list(self._pending)
        for record in records:
            yield self.load(record)

    def intent(self, group: Group, token: str) -> None:
        """Record the grouping and token before the insert, so a replay repeats both (fsync'd)."""
        with self._lock:
            payload = _RANGE.pack(group.first, group.last) + token.encode()
            self._append(_encode(INTENT, payload))
            self._wait_durable(self._epoch)  # rides on the next group fsync
            group.token = token

    def part(self, group: Group, table: str) -> None:
        """One table of the group is inserted: a retry, replay or dead letter skips it. Best effort (a
        lost mark means a replay repeats the insert under the same token, which ClickHouse drops)."""
        group.done.add(table)
        with self._lock:
            try:
                self._append(_encode(PART, _RANGE.pack(group.first, group.last) + table.encode()))
            except SpoolError:
                pass

    def commit(self, group: Group) -> None:
        """The group is in ClickHouse: drop it from the queue and from disk once its segment is done.
        The mark rides on the next fsync; if it cannot be written, a replay repeats the insert under the
        same token and ClickHouse drops it."""
        with self._lock:
            self._committed = max(self._committed, group.last)
            try:
                self._append(_encode(COMMIT, _SEQ.pack(group.last)))
            except SpoolError:
                pass
            done = {r.seq for r in group.records}
            if not group.replay:
                while self._pending and self._pending[0].seq in done:
                    self._pending.popleft()
            for r in group.records:
                self._pending_points -= r.points
                self._uncommitted_bytes -= r.length
                self._uncommitted_keys -= r.keys
                self._uncache(r)
            self._inflight = None
            self._drop_committed_segments()
            self._cond.notify_all()

    def _drop_committed_segments(self) -> None:
        for path, top in list(self._segments.items()):
            if path != self._active and top <= self._committed:
                path.unlink(missing_ok=True)
                del self._segments[path]

    # -- state ----------------------------------------------------------------------------------
    @property
    def pending_points(self) -> int:
        return self._pending_points

    @property
    def uncommitted_bytes(self) -> int:
        return self._uncommitted_bytes

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in list(self._segments) if p.exists())

    def oldest_age_s(self) -> float:
        """Age of the oldest uncommitted record; 0 when everything is committed."""
        with self._lock:
            oldest = [g.records[0].received_ns for g in (self._inflight, *self._replay) if g]
            if self._pending:
                oldest.append(self._pending[0].received_ns)
        return max(0.0, time.time() - min(oldest) / 1e9) if oldest else 0.0

    def start(self) -> None:
        pass

    def shutdown(self, timeout_s: float) -> None:
        """Refuse new appends and close the active segment. Idempotent."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                try:
                    if self.fsync:
                        self.files.fsync(self._file)
                except OSError:
                    self._seal(self._size)
                else:
                    self._synced_to(self._epoch)
                    self._close(self._file)
                    self._file = None
            self._cond.notify_all()
