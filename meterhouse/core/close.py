"""The monthly close: one immutable statement line per org, metric and month, computed from raw points.

A close asked for at some instant first waits until every point acknowledged before that instant is
committed (``wait_committed``: the composition's, which knows the collectors), then takes a cutoff (the
server's clock) and records its start; the statements count the month's points committed before the
cutoff, and points committed after it are the month's adjustments, so statement + adjustments = raw
points, always. Both the CLI and the API use this module.

Exactly once under a kill at any instant. Nothing the close writes trusts ClickHouse's deduplication token
alone: on a non-replicated table the token reaches the deduplication log before the part, so a kill
between the two drops every repeat of that insert. So every write is followed by a read of what the table
holds: the start record is written until a start record is read back (the first stored is the month's
close, whoever wrote it; a later attempt takes another token); lines are written for the orgs whose lines
the table does not hold (all of them), under a token of their own run, and read again before the close is
signed; the final record is written until it is read back. The close's state is what is stored: none,
``running`` (a start record), or ``done`` (its final record, read back after every org's lines were).
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TextIO

from meterhouse.core import schema
from meterhouse.core.store import Queries

log = logging.getLogger("meterhouse.close")

NS = 10**9
DAY_S = 86400
MONTH_RE = re.compile(r"(\d{4})-(\d{2})", re.ASCII)  # matched whole: no other digits, no newline
DOUBLE_TOLERANCE = 1e-9
#: How many times a record is written before the close gives up (each attempt after the first takes a
#: token of its own; only a kill between an attempt's deduplication log entry and its part costs one).
RECORD_ATTEMPTS = 16
#: How many times the lines are written and read back before the close gives up.
LINE_PASSES = 5
NOW_MS_SQL = "SELECT toUnixTimestamp64Milli(now64(3))"

#: Waits until every point acknowledged before the call is committed; returns the names of the collectors
#: that did not confirm it in time (their points may become adjustments). Given by the composition.
WaitCommitted = Callable[[], Sequence[str]]


class CloseStore(Queries, Protocol):
    """What a close needs of a store (a :class:`~meterhouse.core.store.Store` or the failover set): the
    readers' queries, and inserts into the close's tables."""

    def insert_rows(
        self,
        table: str,
        columns: Sequence[Sequence[Any]],
        names: Sequence[str],
        types: Sequence[str],
        token: str,
    ) -> None: ...

    def sync_replicas(self, tables: Sequence[str]) -> None:
        """On a cluster, wait until every replica of ``tables`` has every part acknowledged so far."""


class CloseRefused(Exception):
    """The month cannot be closed now (``code``: ``late_window`` or ``month_not_ended``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        """``YYYY-MM`` (UTC), 1970-01 to 2261-12; ValueError otherwise."""
        m = MONTH_RE.fullmatch(text or "")
        if not m or not 1970 <= int(m[1]) <= 2261 or not 1 <= int(m[2]) <= 12:
            raise ValueError(f"month must be YYYY-MM between 1970-01 and 2261-12 (got {text[:20]!r})")
        return cls(int(m[1]), int(m[2]))

    @property
    def key(self) -> int:
        """YYYYMM, as ``toYYYYMM`` stores it."""
        return self.year * 100 + self.month

    @property
    def start_ns(self) -> int:
        return calendar.timegm((self.year, self.month, 1, 0, 0, 0)) * NS

    @property
    def end_ns(self) -> int:
        """The first nanosecond of the next month (months are half-open)."""
        y, m = (self.year + 1, 1) if self.month == 12 else (self.year, self.month + 1)
        return calendar.timegm((y, m, 1, 0, 0, 0)) * NS

    def previous(self) -> Month:
        return Month(self.year - 1, 12) if self.month == 1 else Month(self.year, self.month - 1)

    @classmethod
    def of_ns(cls, ns: int) -> Month:
        t = time.gmtime(ns // NS)
        return cls(t.tm_year, t.tm_mon)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


@dataclass
class CloseRecord:
    """The state of one month's close and its comparison with the hourly rollup."""

    month: int
    close_id: str
    status: str
    forced: int
    cutoff_ms: int
    finished_ms: int
    orgs: int = 0
    lines: int = 0
    points: int = 0
    total_int: int = 0
    total_double: float = 0.0
    rollup_points: int = 0
    rollup_int: int = 0
    rollup_double: float = 0.0
    mismatched_lines: int = 0
    version: int = 1
    unconfirmed: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status == schema.CLOSE_DONE

    @property
    def reconciled(self) -> bool:
        return self.done and self.mismatched_lines == 0

    def columns(self) -> list[list[Any]]:
        values = asdict(self)
        values["cutoff"], values["finished_at"] = values.pop("cutoff_ms"), values.pop("finished_ms")
        out = []
        for name in schema.CLOSE_COLUMN_NAMES:
            v = values[name]
            out.append([v])
        return out


@dataclass
class Progress:
    """Orgs done of the total, with rate and time left; what a terminal shows."""

    done: int
    total: int
    started: float
    first_done: int = 0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.first_done) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f}s"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"orgs {self.done}/{self.total} ({pct:.1f}%)  {self.rate:.0f} orgs/s  left {eta}"


def checksum(lines: Sequence[tuple[str, str, int, float, int, int, int]]) -> str:
    """sha256 over an org's lines (metric, unit, exact total, double total, points, first, last) in
    metric order: finance can recompute it from the CSV."""
    h = hashlib.sha256()
    for metric, unit, ti, td, n, first, last in sorted(lines):
        h.update(f"{metric}\t{unit}\t{ti}\t{td!r}\t{n}\t{first}\t{last}\n".encode())
    return h.hexdigest()


def get_close(store: CloseStore, month: Month) -> CloseRecord | None:
    rows = store.rows(schema.close_record_sql(store.database), {"month": month.key})
    if not rows:
        return None
    r = rows[0]
    renamed = {"cutoff": "cutoff_ms", "finished_at": "finished_ms"}
    names = [renamed.get(n, n) for n in schema.CLOSE_COLUMN_NAMES]
    values = dict(zip(names, r, strict=True))
    for k in ("orgs", "lines", "points", "total_int", "rollup_points", "rollup_int", "mismatched_lines",
              "version", "forced", "month", "cutoff_ms", "finished_ms"):  # fmt: skip
        values[k] = int(values[k])
    for k in ("total_double", "rollup_double"):
        values[k] = float(values[k])
    values["unconfirmed"] = [str(x) for x in values["unconfirmed"]]
    return CloseRecord(**values)


def _check_params(month: Month, record: CloseRecord) -> dict[str, Any]:
    return {"month": month.key, "close_id": record.close_id, "from_ns": month.start_ns, "to_ns": month.end_ns,
            "cutoff_ms": record.cutoff_ms}  # fmt: skip


def verify_statements(store: CloseStore, month: Month, limit: int = 1000) -> list[dict[str, Any]]:
    """The lines of a closed month's statement that no longer match the raw points they were computed from
    (edited, deleted or written by another close, or raw points that became visible after the close though
    committed before its cutoff); [] for a statement that still holds, or a month not closed."""
    record = get_close(store, month)
    if record is None or not record.done:
        return []
    rows = store.rows(
        schema.statement_check_sql(store.database), {**_check_params(month, record), "limit": limit}
    )
    names = ("org_id", "metric", "statement_points", "raw_points", "statement_total", "raw_total",
             "statement_double", "raw_double", "close_id")  # fmt: skip
    out = []
    for row in rows:
        line = dict(zip(names, row, strict=True))
        for k in ("statement_points", "raw_points", "statement_total", "raw_total"):
            line[k] = int(line[k])
        out.append(line)
    return out


def count_statement_mismatches(store: CloseStore, month: Month, record: CloseRecord) -> int:
    """How many lines of the (finished) close ``record`` of ``month`` differ from their raw points."""
    return int(
        store.scalar(schema.statement_check_count_sql(store.database), _check_params(month, record)) or 0
    )


def check_window(month: Month, now_ns: int, late_window_days: int, force: bool) -> None:
    """Refuse a month not over, or (without force) one whose late window is still open."""
    if month.end_ns > now_ns:
        raise CloseRefused("month_not_ended", f"{month} has not ended yet")
    open_until = month.end_ns + late_window_days * DAY_S * NS
    if open_until > now_ns and not force:
        raise CloseRefused(
            "late_window",
            f"{month} is inside the {late_window_days}-day late window (until "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(open_until // NS))}); "
            "close it now with --force (in the API: ?force=true)",
        )


_lock = threading.Lock()
_running: dict[int, Progress] = {}  # month → progress of the close running in this process


def running_progress(month: Month) -> Progress | None:
    """Progress of the close of ``month`` running in this process, if one is."""
    return _running.get(month.key)


@dataclass
class Preview:
    """What a close of ``month`` writes: its statement's orgs, lines and totals as of ``cutoff_ms``.
    ``status``: ``new`` (no close yet: the cutoff a close asked for now would take), ``running`` (the
    close recorded, not finished: what it holds once done) or ``done`` (written already)."""

    month: int
    status: str
    forced: int
    cutoff_ms: int
    orgs: int
    lines: int
    points: int
    total_int: int
    total_double: float
    lines_written: int = 0
    unconfirmed: list[str] = field(default_factory=list)

    def text(self) -> str:
        total = self.total_int if self.total_double == 0 else self.total_int + self.total_double
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.cutoff_ms // 1000))
        cutoff += f".{self.cutoff_ms % 1000:03d}Z"
        out = (f"{'forced ' if self.forced else ''}close of {_month_text(self.month)}, cutoff {cutoff}: "
               f"orgs {self.orgs}, lines {self.lines} ({self.lines_written} written), points {self.points}, "
               f"total {total}")  # fmt: skip
        if self.unconfirmed:
            out += f"; not confirmed committed: {', '.join(self.unconfirmed)}"
        return out


def _month_text(key: int) -> str:
    return f"{key // 100:04d}-{key % 100:02d}"


def preview(store: CloseStore, month: Month, record: CloseRecord) -> Preview:
    """What the close ``record`` of ``month`` writes (or wrote), read from the raw points."""
    bounds = {"from_ns": month.start_ns, "to_ns": month.end_ns, "cutoff_ms": record.cutoff_ms}
    orgs, lines, points, ti, td = store.rows(schema.close_preview_sql(store.database), bounds)[0]
    written = store.rows(
        schema.close_written_sql(store.database), {"month": month.key, "close_id": record.close_id}
    )
    return Preview(
        month=month.key, status=record.status if record.close_id else "new", forced=record.forced,
        cutoff_ms=record.cutoff_ms, orgs=int(orgs), lines=int(lines), points=int(points or 0),
        total_int=int(ti or 0), total_double=float(td or 0.0), lines_written=sum(int(n) for _, n in written),
        unconfirmed=list(record.unconfirmed),
    )  # fmt: skip


def dry_run(
    store: CloseStore,
    month: Month,
    *,
    late_window_days: int,
    force: bool = False,
    wait_committed: WaitCommitted | None = None,
    now_ns: Callable[[], int] = time.time_ns,
) -> Preview:
    """What closing ``month`` now would write, without writing anything: refused as the close would be;
    for a month with no close, after the same wait for acknowledged points, with the cutoff it would take."""
    record = get_close(store, month)
    if record is None:
        check_window(month, now_ns(), late_window_days, force)
        cutoff_ms, unconfirmed = _cutoff(store, wait_committed)
        record = CloseRecord(month=month.key, close_id="", status="new", forced=int(force),
                             cutoff_ms=cutoff_ms, finished_ms=0, unconfirmed=unconfirmed)  # fmt: skip
    return preview(store, month, record)


def _cutoff(store: CloseStore, wait_committed: WaitCommitted | None) -> tuple[int, list[str]]:
    """The cutoff of a close asked for now, and the collectors that did not confirm their commits.

    Every point acknowledged before now is committed first (the first wait), so its commit time is before
    the cutoff taken after. An insert that took its commit time before the cutoff may still be on its way
    when the cutoff is taken (its part not yet visible): the second wait lets every insert that began
    before it finish, so the statements never miss a point they claim to count."""
    if wait_committed is None:  # nothing pending: a stopped data directory, or a caller that waited
        return int(store.scalar(NOW_MS_SQL)), []
    unconfirmed = set(wait_committed())
    cutoff_ms = int(store.scalar(NOW_MS_SQL))
    unconfirmed.update(wait_committed())
    if unconfirmed:
        log.warning("close: collectors did not confirm their commits in time; what they hold uncommitted "
                    "becomes adjustments", extra={"collectors": sorted(unconfirmed)})  # fmt: skip
    return cutoff_ms, sorted(unconfirmed)


def close_month(
    store: CloseStore,
    month: Month,
    *,
    late_window_days: int,
    force: bool = False,
    batch_orgs: int = 2000,
    wait_committed: WaitCommitted | None = None,
    progress: Callable[[Progress], None] | None = None,
    before_writing: Callable[[Preview], None] | None = None,
    now_ns: Callable[[], int] = time.time_ns,
) -> CloseRecord:
    """Close ``month`` (or finish a close that was interrupted); a finished close is returned unchanged.

    ``wait_committed`` is called (twice) before a new close takes its cutoff; ``before_writing`` is shown
    what the close writes once its cutoff is recorded, before any line is written."""
    if batch_orgs < 1:  # a chunk of no orgs would write nothing and sign the month empty
        raise ValueError(f"batch_orgs must be at least 1 (got {batch_orgs})")
    with _lock:  # one close at a time in a process (API and CLI share this module)
        record = get_close(store, month)
        if record is not None and record.done:
            return record
        if record is None:
            check_window(month, now_ns(), late_window_days, force)
            cutoff_ms, unconfirmed = _cutoff(store, wait_committed)
            mine = CloseRecord(
                month=month.key, close_id=uuid.uuid4().hex, status=schema.CLOSE_RUNNING,
                forced=int(force), cutoff_ms=cutoff_ms, finished_ms=0, unconfirmed=unconfirmed,
            )  # fmt: skip
            # The lock above is this process's; several collectors may start the month's close at once.
            # The first start record stored is the month's close: every process carries on that one.
            record = _store_record(store, month, mine, f"close:{month.key}:start", lambda r: True)
            if record.done:
                return record
        # Inserts that took their commit time before the cutoff have finished (``_cutoff``), so their
        # parts are in their shards' replication logs: once every replica has fetched them, whichever
        # replica a read reaches holds every point the statements count (and a resumed close its lines).
        store.sync_replicas(schema.CLOSE_READ_TABLES)
        if before_writing is not None:
            before_writing(preview(store, month, record))
        try:
            _write_lines(store, month, record, batch_orgs, progress)
        finally:
            _running.pop(month.key, None)
        return _finish(store, month, record)


def _write_record(store: CloseStore, record: CloseRecord, token: str) -> None:
    store.insert_rows(
        schema.CLOSES_TABLE, record.columns(), schema.CLOSE_COLUMN_NAMES, schema.CLOSE_COLUMN_TYPES, token
    )


def _store_record(
    store: CloseStore, month: Month, record: CloseRecord, token: str, stored: Callable[[CloseRecord], bool]
) -> CloseRecord:
    """Write ``record`` until the month's close read back satisfies ``stored``; that close.

    The first attempt takes ``token``, so that concurrent writers of the same record (collectors starting
    or finishing one close at once) store one; each later attempt takes a token of its own, so that a
    token whose part a kill took (the deduplication log holds it, the table not) cannot hold the month
    back. An attempt is made only after reading that the table does not hold the record: within a live
    engine a dropped repeat means the part is there (the log and the part are written under one lock)."""
    for attempt in range(RECORD_ATTEMPTS):
        _write_record(store, record, token if attempt == 0 else f"{token}:{attempt}")
        store.sync_replicas([schema.CLOSES_TABLE])
        found = get_close(store, month)
        if found is not None and stored(found):
            return found
        log.warning("close: a record was not stored (its token's part lost to a kill?); writing it again",
                    extra={"month": str(month), "status": record.status, "attempt": attempt + 1})  # fmt: skip
    raise RuntimeError(f"the close of {month} could not be recorded after {RECORD_ATTEMPTS} attempts")


def _write_lines(
    store: CloseStore,
    month: Month,
    record: CloseRecord,
    batch_orgs: int,
    progress: Callable[[Progress], None] | None,
) -> None:
    """Write the lines of every org the table does not hold in full, and read them back, until it does.

    The orgs and their number of lines are known from the raw points before anything is written; each
    pass reads which orgs' lines the close holds and writes the others, in chunks of at most
    ``batch_orgs`` consecutive orgs, each chunk under a token of its own pass (a token a kill left in the
    deduplication log without its part is never used again). A line written twice is the same row,
    collapsed by ``FINAL``."""
    db = store.database
    bounds = {"from_ns": month.start_ns, "to_ns": month.end_ns, "cutoff_ms": record.cutoff_ms}
    expected = [(str(o), int(n)) for o, n in store.rows(schema.close_orgs_sql(db), bounds)]
    position = {org: i for i, (org, _) in enumerate(expected)}
    key = {"month": month.key, "close_id": record.close_id}
    state: Progress | None = None
    for _ in range(LINE_PASSES):
        held = {str(o): int(n) for o, n in store.rows(schema.close_written_sql(db), key)}
        todo = [org for org, n in expected if held.get(org, 0) < n]
        done = len(expected) - len(todo)
        if state is None:
            state = Progress(done, len(expected), time.monotonic(), first_done=done)
            _running[month.key] = state
            if progress:
                progress(state)
        elif todo:
            log.warning("close: lines not stored (their part lost to a kill?); writing them again",
                        extra={"month": str(month), "orgs": len(todo)})  # fmt: skip
        state.done = done
        if not todo:
            return
        run = uuid.uuid4().hex[:12]
        i = 0
        while i < len(todo):
            # At most batch_orgs orgs, and no wider a range of orgs than that (the raw points of the
            # range are read; a resumed close's missing orgs may lie apart).
            first = position[todo[i]]
            j = i + 1
            while j < len(todo) and j - i < batch_orgs and position[todo[j]] - first < batch_orgs:
                j += 1
            chunk = todo[i:j]
            _write_chunk(store, month, record, chunk, f"stmt:{record.close_id}:{run}:{chunk[0]}")
            i = j
            state.done += len(chunk)
            if progress:
                progress(state)
    raise RuntimeError(f"the close of {month} could not store every org's lines in {LINE_PASSES} passes")


def _write_chunk(store: CloseStore, month: Month, record: CloseRecord, chunk: list[str], token: str) -> None:
    db = store.database
    params = {"from_ns": month.start_ns, "to_ns": month.end_ns, "lo": chunk[0], "hi": chunk[-1],
              "cutoff_ms": record.cutoff_ms}  # fmt: skip
    wanted = set(chunk)
    lines = [r for r in store.rows(schema.close_lines_sql(db), params) if r[0] in wanted]
    rollup = {
        (org, metric): (int(vi), float(vd), int(n))
        for org, metric, vi, vd, n in store.rows(schema.close_rollup_sql(db), params)
    }
    by_org: dict[str, list[tuple[str, str, int, float, int, int, int]]] = {}
    for org, metric, unit, ti, td, n, first, last_ns in lines:
        by_org.setdefault(org, []).append(
            (metric, unit, int(ti), float(td), int(n), int(first), int(last_ns))
        )
    sums = {org: checksum(org_lines) for org, org_lines in by_org.items()}
    cols: list[list[Any]] = [[] for _ in schema.STATEMENT_COLUMN_NAMES]
    for org, org_lines in by_org.items():
        for metric, unit, ti, td, n, first, last_ns in org_lines:
            ri, rd, rn = rollup.get((org, metric), (0, 0.0, 0))
            # Below zero only when the rollup lacks points committed after the cutoff (drift): a line
            # has points, so 0 still reads as a mismatch.
            rn = max(0, rn)
            row = (month.key, org, metric, unit, ti, td, n, first, last_ns, record.close_id,
                   record.cutoff_ms, record.forced, sums[org], ri, rd, rn)  # fmt: skip
            for col, v in zip(cols, row, strict=True):
                col.append(v)
    if cols[0]:
        store.insert_rows(
            schema.STATEMENTS_TABLE, cols, schema.STATEMENT_COLUMN_NAMES, schema.STATEMENT_COLUMN_TYPES, token
        )


def _summary(
    store: CloseStore, month: Month, record: CloseRecord, orgs: Sequence[str] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"month": month.key, "close_id": record.close_id}
    if orgs is not None:
        params["orgs"] = list(orgs)
    row = store.rows(schema.close_summary_sql(store.database, scoped=orgs is not None), params)[0]
    n_orgs, lines, points, ti, td, rp, ri, rd, mismatched = row
    return dict(
        orgs=int(n_orgs), lines=int(lines), points=int(points or 0), total_int=int(ti or 0),
        total_double=float(td or 0.0), rollup_points=int(rp or 0), rollup_int=int(ri or 0),
        rollup_double=float(rd or 0.0), mismatched_lines=int(mismatched or 0),
    )  # fmt: skip


def scoped_close(store: CloseStore, month: Month, record: CloseRecord, orgs: Sequence[str]) -> CloseRecord:
    """The close as the holder of a token for ``orgs`` may see it: its totals over those orgs' lines only
    (the month's totals over every org are not theirs to read)."""
    return replace(record, **_summary(store, month, record, orgs))


def _finish(store: CloseStore, month: Month, record: CloseRecord) -> CloseRecord:
    store.sync_replicas([schema.STATEMENTS_TABLE])  # the totals below read back every line written
    summary = _summary(store, month, record, None)
    # Usage the rollup has under an org and metric with no line: lines the two disagree on as well.
    n, vi, vd, points = store.rows(schema.close_rollup_only_sql(store.database), {
        "month": month.key, "close_id": record.close_id, "from_ns": month.start_ns, "to_ns": month.end_ns,
        "cutoff_ms": record.cutoff_ms})[0]  # fmt: skip
    summary["mismatched_lines"] += int(n or 0)
    summary["rollup_int"] += int(vi or 0)
    summary["rollup_double"] += float(vd or 0.0)
    summary["rollup_points"] = max(0, summary["rollup_points"] + int(points or 0))
    done = CloseRecord(
        month=month.key, close_id=record.close_id, status=schema.CLOSE_DONE, forced=record.forced,
        cutoff_ms=record.cutoff_ms, finished_ms=int(store.scalar(NOW_MS_SQL)), version=2,
        unconfirmed=list(record.unconfirmed), **summary,
    )  # fmt: skip
    # Done only once read back as done: a final record lost to a kill leaves the close running, and the
    # next run (which finds every line) signs it.
    return _store_record(store, month, done, f"close:{record.close_id}:2", lambda r: r.done)


def terminal_progress(stream: TextIO | None = None, every_s: float = 0.5) -> Callable[[Progress], None]:
    """A progress printer: a line rewritten in place on a terminal, a status line a second otherwise."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    interval = every_s if tty else 1.0
    last = [0.0]

    def show(p: Progress) -> None:
        now = time.monotonic()
        final = p.done >= p.total
        if now - last[0] < interval and not final and p.done != p.first_done:
            return
        last[0] = now
        if tty:
            stream.write("\r\033[K" + p.line() + ("\n" if final else ""))
        else:
            stream.write(p.line() + "\n")
        stream.flush()

    return show
