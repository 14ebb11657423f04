"""The spool: an append-only, checksummed write-ahead log of accepted points on local disk.

A receiver's answer is sent once the request's points are appended here and fsync'd. The writer reads
records in order, and before each insert appends an INTENT naming the records it groups and the
deduplication token it uses; after the insert it appends a COMMIT. On start the log is scanned:
committed records are skipped, uncommitted intents are replayed with the same grouping and token (so
ClickHouse deduplicates a batch that did commit before the crash), and the rest is queued afresh.

Record layout (little-endian): ``b"MH"``, type (u8), payload length (u32), CRC-32 of type, length and
payload (u32), payload. DATA payloads are the decoded columns, pickled (the spool directory is private
to the process; the CRC guards against torn and corrupt records, not against a hostile writer).
A record that fails its checks ends the readable part of its segment: the rest of that segment is
moved to ``quarantine/`` and counted, and start-up continues.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meterhouse.collector.model import Backpressure, PointBatch

log = logging.getLogger("meterhouse.spool")

MAGIC = b"MH"
HEADER = struct.Struct("<2sBII")  # magic, type, length, crc
DATA, INTENT, COMMIT = 1, 2, 3
_DATA_HEAD = struct.Struct("<QQI16s")  # seq, received_ns, points, request digest
_RANGE = struct.Struct("<QQ")  # first seq, last seq
_SEQ = struct.Struct("<Q")
MAX_RECORD = 1 << 31


class SpoolError(Exception):
    """The spool cannot take the request (a disk error): answer retryable."""


@dataclass
class Record:
    """An uncommitted DATA record: where it lies, and its batch while it is kept in memory."""

    seq: int
    segment: Path
    offset: int
    length: int
    points: int
    received_ns: int
    batch: PointBatch | None = None


@dataclass
class Group:
    """Records inserted together under one token. ``replay`` groups were started before a restart."""

    records: list[Record]
    token: str | None = None
    replay: bool = False

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
    digests: list[tuple[str, int]] = field(default_factory=list)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable queue between receivers (``consume``) and the writer (``next_group``/``commit``)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        fsync: bool = True,
        max_cached_points: int = 2_000_000,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.max_cached_points = max_cached_points
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: deque[Record] = deque()  # uncommitted, not yet in a group, in seq order
        self._replay: deque[Group] = deque()  # groups with intents from before the restart
        self._inflight: Group | None = None
        self._segments: OrderedDict[Path, int] = OrderedDict()  # path → highest DATA seq in it
        self._active: Path | None = None
        self._file = None
        self._seq = 0
        self._committed = 0
        self._pending_points = 0
        self._cached_points = 0
        self._uncommitted_bytes = 0
        self._closed = False

    # -- opening and replay ---------------------------------------------------------------------
    def open(self) -> ScanReport:
        """Scan the log, quarantine damaged tails, and queue what is not committed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        report = ScanReport()
        data: dict[int, Record] = {}
        intents: list[tuple[int, int, str]] = []
        paths = sorted(self.dir.glob("seg-*.wal"))
        for path in paths:
            top = 0
            for kind, offset, length, payload in self._scan(path, report):
                report.records += 1
                if kind == DATA:
                    seq, received, points, digest = _DATA_HEAD.unpack_from(payload)
                    data[seq] = Record(seq, path, offset, length, points, received)
                    report.digests.append((digest.hex(), received))
                    top = max(top, seq)
                elif kind == INTENT:
                    first, last = _RANGE.unpack_from(payload)
                    intents.append((first, last, payload[_RANGE.size :].decode()))
                elif kind == COMMIT:
                    (seq,) = _SEQ.unpack_from(payload)
                    self._committed = max(self._committed, seq)
                    top = max(top, seq)
            self._segments[path] = top
            self._seq = max(self._seq, top)
        report.committed_through = self._committed
        grouped: set[int] = set()
        for first, last, token in intents:
            if last <= self._committed:
                continue
            records = [data[s] for s in range(first, last + 1) if s in data]
            if records:
                self._replay.append(Group(records, token, replay=True))
                grouped.update(r.seq for r in records)
        for seq in sorted(data):
            if seq > self._committed and seq not in grouped:
                self._pending.append(data[seq])
        uncommitted = [r for r in data.values() if r.seq > self._committed]
        self._pending_points = sum(r.points for r in uncommitted)
        self._uncommitted_bytes = sum(r.length for r in uncommitted)
        report.replay_groups = len(self._replay)
        report.pending_records = len(uncommitted)
        self._rotate()
        self._drop_committed_segments()
        return report

    def _scan(self, path: Path, report: ScanReport):
        """Yield (kind, offset, length, payload) of every sound record; quarantine the rest."""
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            bad = len(raw) - pos < HEADER.size
            if not bad:
                magic, kind, length, crc = HEADER.unpack_from(raw, pos)
                end = pos + HEADER.size + length
                bad = magic != MAGIC or kind not in (DATA, INTENT, COMMIT) or end > len(raw)
                if not bad:
                    payload = raw[pos + HEADER.size : end]
                    bad = zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, length))) != crc
            if bad:
                self._quarantine(path, pos, raw[pos:], report)
                return
            yield kind, pos, end - pos, payload
            pos = end

    def _quarantine(self, path: Path, offset: int, tail: bytes, report: ScanReport) -> None:
        qdir = self.dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        target = qdir / f"{path.stem}-{offset}-{int(time.time())}.bin"
        target.write_bytes(tail)
        with open(path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        report.quarantined_records += 1
        report.quarantined_bytes += len(tail)
        log.warning("spool: damaged record quarantined",
                    extra={"segment": path.name, "offset": offset, "bytes": len(tail),
                           "quarantine_file": target.name})  # fmt: skip

    # -- appending (receivers) ------------------------------------------------------------------
    def consume(self, batch: PointBatch) -> None:
        """Append the batch durably; return only once it is on disk (fsync'd when configured)."""
        if batch.total == 0:
            return
        body = pickle.dumps(
            (batch.columns, batch.size, batch.dist_columns, batch.dist_size), protocol=pickle.HIGHEST_PROTOCOL
        )
        digest = _digest_bytes(batch.digest)
        with self._lock:
            if self._closed:
                raise Backpressure("shutting down")
            if self._uncommitted_bytes + len(body) > self.max_bytes and self._uncommitted_bytes > 0:
                raise Backpressure(
                    f"spool full: {self._uncommitted_bytes} of {self.max_bytes} bytes await ClickHouse", 5
                )
            seq = self._seq + 1
            record = _encode(DATA, _DATA_HEAD.pack(seq, batch.received_ns, batch.total, digest) + body)
            if len(record) > MAX_RECORD:
                raise SpoolError("request too large for one spool record")
            offset = self._write(record, sync=True)
            self._seq = seq
            self._segments[self._active] = seq
            cached = self._cached_points + batch.total <= self.max_cached_points
            rec = Record(seq, self._active, offset, len(record), batch.total, batch.received_ns,
                         batch if cached else None)  # fmt: skip
            self._cached_points += batch.total if cached else 0
            self._pending.append(rec)
            self._pending_points += batch.total
            self._uncommitted_bytes += len(record)
            self._cond.notify_all()

    def _write(self, record: bytes, sync: bool) -> int:
        if self._file is None or self._file.tell() + len(record) > self.segment_bytes:
            self._rotate()
        offset = self._file.tell()
        try:
            self._file.write(record)
            self._file.flush()
            if sync and self.fsync:
                os.fsync(self._file.fileno())
        except OSError as e:
            raise SpoolError(f"spool write failed: {e}") from e
        return offset

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
        self._active = self.dir / f"seg-{time.time_ns():020d}.wal"
        self._file = open(self._active, "ab")  # noqa: SIM115 - kept open for appends
        self._segments[self._active] = self._seq
        _fsync_dir(self.dir)
        # Each segment starts with what is committed, so older segments can go without losing it.
        self._file.write(_encode(COMMIT, _SEQ.pack(self._committed)))
        self._file.flush()

    # -- the writer's side ----------------------------------------------------------------------
    def next_group(self, max_points: int, max_wait_s: float, stop: threading.Event) -> Group | None:
        """The next records to insert: a replayed group first, else up to ``max_points`` once that
        many wait or the oldest has waited ``max_wait_s``. None when nothing is due before ``stop``."""
        with self._cond:
            if self._inflight is not None:
                return self._inflight
            if self._replay:
                self._inflight = self._replay.popleft()
                return self._inflight
            while True:
                if self._pending:
                    age = time.time() - self._pending[0].received_ns / 1e9
                    if self._pending_points >= max_points or age >= max_wait_s or stop.is_set():
                        break
                    self._cond.wait(min(max_wait_s - age, 0.5))
                elif stop.is_set():
                    return None
                else:
                    self._cond.wait(0.5)
            records, n = [], 0
            for rec in self._pending:
                if records and n + rec.points > max_points:
                    break
                records.append(rec)
                n += rec.points
            self._inflight = Group(records)
            return self._inflight

    def load(self, record: Record) -> PointBatch:
        """The record's batch, from memory or read back from its segment."""
        if record.batch is not None:
            return record.batch
        with open(record.segment, "rb") as f:
            f.seek(record.offset + HEADER.size)
            payload = f.read(record.length - HEADER.size)
        _seq, received, _points, digest = _DATA_HEAD.unpack_from(payload)
        cols, size, dist, dist_size = pickle.loads(payload[_DATA_HEAD.size :])
        return PointBatch(cols, size, digest.hex(), received, dist, dist_size)

    def uncommitted_batches(self) -> Iterator[PointBatch]:
        """Every batch not yet committed, read back in order (state that must count them at start)."""
        with self._lock:
            records = [r for g in self._replay for r in g.records] + list(self._pending)
        for record in records:
            yield self.load(record)

    def intent(self, group: Group, token: str) -> None:
        """Record the grouping and token before the insert, so a replay repeats both."""
        with self._lock:
            group.token = token
            payload = _RANGE.pack(group.first, group.last) + token.encode()
            self._write(_encode(INTENT, payload), sync=True)

    def commit(self, group: Group) -> None:
        """The group is in ClickHouse: drop it from the queue and from disk once its segment is done."""
        with self._lock:
            self._write(_encode(COMMIT, _SEQ.pack(group.last)), sync=False)
            self._committed = max(self._committed, group.last)
            done = {r.seq for r in group.records}
            if not group.replay:
                while self._pending and self._pending[0].seq in done:
                    self._pending.popleft()
            for r in group.records:
                self._pending_points -= r.points
                self._uncommitted_bytes -= r.length
                if r.batch is not None:
                    self._cached_points -= r.points
                    r.batch = None
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
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
            self._cond.notify_all()
