"""The monthly close: one immutable statement line per org, metric and month, computed from raw points.

A close takes a cutoff (the server's clock) first and records it as ``running``; the statements count the
month's points committed before the cutoff, and points committed after it are the month's adjustments, so
statement + adjustments = raw points, always. Orgs are written in order, in chunks; each line is a
deterministic function of the cutoff, so a close killed half-way resumes after the last org written and
gives the same lines (a line written twice is one row). Both the CLI and the API use this module.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TextIO

from meterhouse.core import schema
from meterhouse.core.store import Queries

NS = 10**9
DAY_S = 86400
MONTH_RE = re.compile(r"(\d{4})-(\d{2})", re.ASCII)  # matched whole: no other digits, no newline
#: The cutoff lies this many seconds before the close starts: an insert that took its commit time before
#: the cutoff has finished (is visible) by then, so the statements never miss a point they claim to count.
SETTLE_S = 5.0
DOUBLE_TOLERANCE = 1e-9


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
            "pass force to close it now",
        )


_lock = threading.Lock()
_running: dict[int, Progress] = {}  # month → progress of the close running in this process


def running_progress(month: Month) -> Progress | None:
    """Progress of the close of ``month`` running in this process, if one is."""
    return _running.get(month.key)


def close_month(
    store: CloseStore,
    month: Month,
    *,
    late_window_days: int,
    force: bool = False,
    batch_orgs: int = 2000,
    settle_s: float = SETTLE_S,
    progress: Callable[[Progress], None] | None = None,
    now_ns: Callable[[], int] = time.time_ns,
) -> CloseRecord:
    """Close ``month`` (or finish a close that was interrupted); a finished close is returned unchanged."""
    if batch_orgs < 1:  # a chunk of no orgs would write nothing and sign the month empty
        raise ValueError(f"batch_orgs must be at least 1 (got {batch_orgs})")
    with _lock:  # one close at a time in a process (API and CLI share this module)
        record = get_close(store, month)
        if record is not None and record.done:
            return record
        if record is None:
            check_window(month, now_ns(), late_window_days, force)
            cutoff_ms = int(store.scalar("SELECT toUnixTimestamp64Milli(now64(3))")) - int(settle_s * 1000)
            mine = CloseRecord(
                month=month.key, close_id=uuid.uuid4().hex, status=schema.CLOSE_RUNNING,
                forced=int(force), cutoff_ms=cutoff_ms, finished_ms=0,
            )  # fmt: skip
            # The lock above is this process's; several collectors may start the month's close at once.
            # The start record's token is the month's, so the first one stored wins and the others are
            # dropped as repeats; every process then carries on the close that was recorded.
            _write_record(store, mine, token=f"close:{month.key}:start")
            store.sync_replicas([schema.CLOSES_TABLE])
            record = get_close(store, month)
            if record is None:
                raise RuntimeError(f"the close of {month} was not recorded")
            if record.done:
                return record
        # Inserts that took their commit time before the cutoff have finished (settle_s), so their parts
        # are in their shards' replication logs: once every replica has fetched them, whichever replica a
        # read reaches holds every point the statements count (and a resumed close its lines so far).
        store.sync_replicas(schema.CLOSE_READ_TABLES)
        try:
            _write_lines(store, month, record, batch_orgs, progress)
        finally:
            _running.pop(month.key, None)
        store.sync_replicas([schema.STATEMENTS_TABLE])  # the totals below read back every line written
        return _finish(store, month, record)


def _write_record(store: CloseStore, record: CloseRecord, token: str = "") -> None:
    store.insert_rows(
        schema.CLOSES_TABLE,
        record.columns(),
        schema.CLOSE_COLUMN_NAMES,
        schema.CLOSE_COLUMN_TYPES,
        token or f"close:{record.close_id}:{record.version}",
    )


def _write_lines(
    store: CloseStore,
    month: Month,
    record: CloseRecord,
    batch_orgs: int,
    progress: Callable[[Progress], None] | None,
) -> None:
    db = store.database
    bounds = {"from_ns": month.start_ns, "to_ns": month.end_ns}
    orgs = [r[0] for r in store.rows(schema.close_orgs_sql(db), {**bounds, "cutoff_ms": record.cutoff_ms})]
    last, _ = store.rows(schema.close_progress_sql(db), {"month": month.key, "close_id": record.close_id})[0]
    # Orgs are written in order, one insert per chunk: every org before the last one written is complete.
    # ClickHouse may commit a large insert as several parts, so the last org may lack lines: then resume
    # with it (a line written again is the same row, collapsed by FINAL), else after it.
    start = 0
    if last:
        start = next((i for i, o in enumerate(orgs) if o > last), len(orgs))
        params = {**bounds, "lo": last, "hi": last, "cutoff_ms": record.cutoff_ms}
        expected = len(store.rows(schema.close_lines_sql(db), params))
        written = store.scalar(
            schema.close_org_lines_sql(db), {"month": month.key, "close_id": record.close_id, "org": last}
        )
        if int(written or 0) < expected:
            start -= 1
    state = Progress(start, len(orgs), time.monotonic(), first_done=start)
    _running[month.key] = state
    if progress:
        progress(state)
    for i in range(start, len(orgs), batch_orgs):
        chunk = orgs[i : i + batch_orgs]
        params = {**bounds, "lo": chunk[0], "hi": chunk[-1], "cutoff_ms": record.cutoff_ms}
        lines = store.rows(schema.close_lines_sql(db), params)
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
                schema.STATEMENTS_TABLE,
                cols,
                schema.STATEMENT_COLUMN_NAMES,
                schema.STATEMENT_COLUMN_TYPES,
                f"stmt:{record.close_id}:{chunk[0]}",
            )
        state.done = i + len(chunk)
        if progress:
            progress(state)


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
        cutoff_ms=record.cutoff_ms, finished_ms=int(store.scalar("SELECT toUnixTimestamp64Milli(now64(3))")),
        version=2, **summary,
    )  # fmt: skip
    _write_record(store, done)
    return done


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
