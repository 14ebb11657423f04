"""Cumulative sums → per-interval usage, with state that survives restarts.

Every cumulative point is stored as the delta since the previous point of its series, beside the
sender's own value and a series id. The last committed point of every series is kept by ClickHouse
(``series_state``, filled by a materialized view in the same insert), so after a restart the state is
read back from what was actually committed, not from what was merely received.

Rules, for a point (start s, time t, value v) and the series' previous point e:
- no previous point: the point counts from its start time (delta v);
- a new start time after e's start: the counter restarted (delta v);
- same start, v ≥ e.value: delta v − e.value, covering (e.time, t];
- same start, v < e.value on a monotonic sum: a reset (delta v); a non-monotonic sum goes down;
- t ≤ e.time: the same point again (delta 0) or, with another value, ``out_of_order``;
- a delta that does not fit what is stored (an int beyond Int64: a non-monotonic sum may move by up to
  2^64 - 1; a double beyond ``schema.MAX_SUM_DOUBLE``) is ``out_of_range``.
A rejected point leaves the series' state as it was (nothing of it is stored, so a restart reads the same
state back): the next point is measured from the last stored one.

A series whose value type switches is a double stream from the switch on: when the point or e is a
double, the delta is a double (float) and so is the state it leaves, so an int point after a double one
keeps the fraction of its delta (5, 7.5, 10, 12 counts 12) and a restart, which reads the state back
from the committed row (a double row), continues the same way.

State changes are applied at decode time and rolled back when the batch is not committed, so a client
that retries after a 503 gets the same deltas again.

The state in memory is the truth for every series with a point not yet committed: at start it is rebuilt
from the uncommitted spool records (``restore``) before any receiver runs, and an entry is evicted only
once the spool record that last changed it is committed (``committed_seq``), so a miss can safely be
answered from ClickHouse. That look-up runs outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from meterhouse.collector.model import PointBatch
from meterhouse.core.schema import MAX_SUM_DOUBLE, VALUE_INT_MAX, VALUE_INT_MIN
from meterhouse.core.schema import TEMPORALITY_CUMULATIVE as _CUMULATIVE


@dataclass(frozen=True)
class Entry:
    start_ns: int
    time_ns: int
    value: int | float
    touched: float = 0.0  # monotonic time of the last change, for eviction
    seq: int = -1  # the spool record that holds this point (-1: not spooled yet, or unknown)


@dataclass(frozen=True)
class CumulativePoint:
    series_id: int
    start_ns: int
    time_ns: int
    value: int | float
    monotonic: bool
    #: The series' id in versions before the structural key (0: none): read when ``series_id`` has no
    #: state, never written (see :meth:`CumulativeState.convert`).
    legacy_id: int = 0


class Rejected(StrEnum):
    """Why a cumulative point has no delta (its reject reason, one of ``core.metrics.REJECT_REASONS``)."""

    OUT_OF_ORDER = "out_of_order"
    OUT_OF_RANGE = "out_of_range"


#: (delta, start of the interval it covers), or why the point is rejected.
Resolution = tuple[int | float, int] | Rejected
Change = tuple[int, Entry | None, Entry]

Loader = Callable[[list[int]], dict[int, Entry]]


class StateUnavailable(Exception):
    """The committed state of some series could not be read: retryable, unlike anything in a request."""


class CumulativeState:
    """Last point per cumulative series, loaded lazily from committed state on a miss."""

    def __init__(
        self,
        loader: Loader,
        *,
        max_entries: int = 2_000_000,
        committed_seq: Callable[[], int] = lambda: 0,
    ) -> None:
        self._load = loader
        self._entries: dict[int, Entry] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.committed_seq = committed_seq  # the spool's committed watermark: older entries may go
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def restore(self, batches: Iterable[tuple[int, PointBatch]]) -> int:
        """Apply the cumulative points of uncommitted spool records (seq, batch), in seq order: the state
        they left is the state, whatever ClickHouse holds. Call before receivers start."""
        n = 0
        with self._lock:
            for seq, b in batches:
                c = b.columns
                for i, sid in enumerate(c["series_id"]):
                    if not sid or c["temporality"][i] != _CUMULATIVE:
                        continue
                    t = c["time"][i]
                    e = self._entries.get(sid)
                    if e is not None and t <= e.time_ns:
                        continue
                    value = c["cumulative_int"][i] if c["is_int"][i] else c["cumulative_double"][i]
                    self._entries[sid] = Entry(c["series_start"][i], t, value, time.monotonic(), seq)
                    n += 1
        return n

    def spooled(self, changes: Iterable[Change], seq: int) -> None:
        """The changes' points are in spool record ``seq``: their entries may go once it is committed."""
        with self._lock:
            for series_id, _old, new in changes:
                if self._entries.get(series_id) is new:
                    self._entries[series_id] = replace(new, seq=seq)

    def convert(self, points: list[CumulativePoint]) -> tuple[list[Resolution], list[Change]]:
        """Each point's delta, and the state changes made (to undo with :meth:`rollback`).

        The upgrade from the legacy series id: a series without state under its id continues from the
        state under its ``legacy_id`` (in memory, restored from spool records of an older version, or
        else in ClickHouse), copied to its id. Legacy ids are only ever read: no state is written under
        one again, so after the upgrade nobody can change what a legacy id holds. The legacy key was
        ambiguous (another org's crafted names could give the same one), but a collision now only
        decides the first delta of the colliding sender's own series, stored under its own org: the
        state it reads is copied, never changed, and each series continues from its own copy.
        """
        while True:
            with self._lock:
                missing = {p.series_id for p in points if p.series_id not in self._entries}
                legacy = {
                    p.legacy_id
                    for p in points
                    if p.legacy_id and p.series_id in missing and p.legacy_id not in self._entries
                }
                evictions = self._evictions
            # ClickHouse is read outside the lock: ingest of known series never waits for it.
            try:
                loaded = self._load(sorted(missing | legacy)) if missing else {}
            except Exception as err:  # whatever the store raises; the request is not at fault
                raise StateUnavailable(str(err)) from err
            with self._lock:
                if self._evictions != evictions:
                    continue  # an entry went meanwhile: what was read may be older than it; read again
                for p in points:
                    sid = p.series_id
                    if sid in self._entries:
                        continue
                    e = loaded.get(sid)
                    if e is not None:
                        self._entries[sid] = replace(e, seq=0)  # committed: may be evicted
                    elif p.legacy_id:
                        e = self._entries.get(p.legacy_id)  # restored from an older version's spool
                        if e is not None:
                            self._entries[sid] = e  # as its record: kept until that is committed
                        elif (e := loaded.get(p.legacy_id)) is not None:
                            self._entries[sid] = replace(e, seq=0)
                self._make_room(points)
                return self._apply(points)

    def _make_room(self, points: list[CumulativePoint]) -> None:
        """Evict what may go; when the series new to the state still do not fit, refuse the request
        (retryable: the writer's commits make entries evictable). Entries of points not yet written
        cannot go, so without this the state grew with the writer's backlog, past any bound: 2 million
        series (about 440 bytes each) had the collector OOM-killed in its 1 GiB budget."""
        new = {p.series_id for p in points if p.series_id not in self._entries}
        if len(self._entries) + len(new) <= self.max_entries:
            return
        self._evict(time.monotonic(), room=len(new))
        if len(self._entries) + len(new) > self.max_entries:
            raise StateUnavailable(
                f"the cumulative state holds {len(self._entries)} series whose points are not all written, "
                f"{self.max_entries} at most (a share of --memory-budget-bytes); {len(new)} new series wait "
                "for the writer"
            )

    def _apply(self, points: list[CumulativePoint]) -> tuple[list[Resolution], list[Change]]:
        now = time.monotonic()
        results: list[Resolution] = []
        changes: list[Change] = []
        for p in points:
            e = self._entries.get(p.series_id)
            res = _resolve(e, p)
            results.append(res)
            if isinstance(res, Rejected) or (e is not None and p.time_ns <= e.time_ns):
                continue
            value = float(p.value) if isinstance(res[0], float) else p.value  # a double stream stays one
            new = Entry(p.start_ns, p.time_ns, value, now)
            self._entries[p.series_id] = new
            changes.append((p.series_id, e, new))
        self._evict(now)
        return results, changes

    def rollback(self, changes: Iterable[Change]) -> None:
        """Undo changes whose batch was not committed (only where nothing newer replaced them)."""
        with self._lock:
            for series_id, old, new in reversed(list(changes)):
                if self._entries.get(series_id) is new:
                    if old is None:
                        del self._entries[series_id]
                    else:
                        self._entries[series_id] = old

    def _evict(self, now: float, room: int = 0) -> None:
        if len(self._entries) + room <= self.max_entries:
            return
        # Only entries whose point is committed go, so a later miss reads the same state back.
        committed = self.committed_seq()
        for sid in [sid for sid, e in self._entries.items() if 0 <= e.seq <= committed]:
            del self._entries[sid]
            self._evictions += 1
            if len(self._entries) + room <= self.max_entries * 0.9:
                break


def _resolve(e: Entry | None, p: CumulativePoint) -> Resolution:
    if not isinstance(p.value, float) and (e is None or not isinstance(e.value, float)):
        res = _resolve_value(e, p)
        if isinstance(res, Rejected) or VALUE_INT_MIN <= res[0] <= VALUE_INT_MAX:
            return res
        return Rejected.OUT_OF_RANGE
    # A double stream: the point is taken as a double (so an int point sent again equals the double
    # state it left) and the delta is a double, whatever the point's own type.
    res = _resolve_value(e, replace(p, value=float(p.value)))
    if isinstance(res, Rejected):
        return res
    delta = float(res[0])
    return (delta, res[1]) if abs(delta) <= MAX_SUM_DOUBLE else Rejected.OUT_OF_RANGE


def _resolve_value(e: Entry | None, p: CumulativePoint) -> Resolution:
    if e is None:
        return p.value, p.start_ns
    if p.time_ns <= e.time_ns:
        same = p.start_ns == e.start_ns and p.value == e.value and p.time_ns == e.time_ns
        return (0, p.start_ns) if same else Rejected.OUT_OF_ORDER
    if p.start_ns != e.start_ns:
        return (p.value, p.start_ns) if p.start_ns > e.start_ns else Rejected.OUT_OF_ORDER
    if p.monotonic and p.value < e.value:
        return p.value, p.start_ns
    return p.value - e.value, e.time_ns
