"""Point identity: a point counts once, whatever request, encoding, transport, token or retry brings it.

OpenTelemetry's data model has one writer per stream. A point's identity is its stream (every field
that makes a series: metric name, kind, unit, temporality, monotonicity, org, scope name and version,
resource and point attributes) plus its interval: ``(start, time)`` for a delta sum, histogram,
exponential histogram or summary, ``time`` alone for a gauge. Cumulative sums are not checked here:
their conversion to deltas (``cumulative.py``) already counts a point seen again as 0.

The check is split in two, so that its cost is per stream, not per point:

- **At the edge** (:class:`EdgeIdentity`, called by the spool under its append lock, so the order in
  which points are marked is the order of their spool records) every point is marked *new* or *to
  verify*. A point is new when its time is after every time its stream has shown: after the greatest
  time this process has seen for the stream, and after ``floor``, the greatest time of any point
  acknowledged before this process started (read from ClickHouse and the spool at start). No point
  acknowledged before can then have its identity. Anything else (a point re-sent, an older interval
  re-batched by a forwarder, a stream not seen since the start and older than the floor) is marked to
  verify. The state is one time per stream (a slot of a fixed table); it only ever over-estimates, so
  losing an entry (eviction) or a request that is not stored afterwards only makes more points "to
  verify", never lets a repeat through. Before a request's streams would take the table past
  ``max_streams``, the streams silent the longest are forgotten, raising the floor to the greatest time
  they held; a new stream that still finds no room is marked to verify and raises the floor to its own
  time (the table does not remember it, so a copy of that point must not pass for new later).
- **At the writer** (:class:`Verifier`), which alone knows what is committed: a point to verify is
  dropped when a row of the same identity is in the raw table from an earlier group (``batch_seq`` below
  the group's, so a replay of the group does not see itself) or earlier in the same group. Groups go in
  spool order and points are marked in spool order, so a point marked new is never a repeat of one
  stored after it.

Folded points (the series limit's overflow series) have lost their attributes. A folded point keeps a
fingerprint of its own set in ``series_id`` (``series.fold_fingerprint``; 0 for every other delta, gauge
or distribution point), part of its stream, so it is checked as any point is: two streams folded into
one do not share an identity, and an SDK's own overflow series (the same attributes, ``series_id`` 0) is
not taken for a folded one. Spooled records of earlier versions, whose folded distribution points have
no fingerprint, carry their flag ``UNCHECKED`` (never verified; they count, as they did then).
"""

from __future__ import annotations

import hashlib
import heapq
import threading
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from meterhouse.collector.model import PointBatch
from meterhouse.core import schema

try:
    from meterhouse.core._native import stream_table_evict as _c_table_evict
    from meterhouse.core._native import stream_table_marks as _c_table_marks
except ImportError:  # pragma: no cover - built by `pip install`; the suite requires it
    _c_table_marks = _c_table_evict = None

#: The fields of a number point's stream, and the value fields a repeat has the same as its original.
_NUMBER_STREAM = (
    "org_id", "metric", "kind", "unit", "temporality", "monotonic", "scope_name", "scope_version",
    "resource_keys", "resource_values", "attr_keys", "attr_values", "series_id",
)  # fmt: skip
_NUMBER_VALUE = ("value_int", "value_double")
_DIST_STREAM = (
    "org_id", "metric", "kind", "unit", "temporality", "scope_name", "scope_version",
    "resource_keys", "resource_values", "attr_keys", "attr_values", "series_id",
)  # fmt: skip
_DIST_VALUE = ("count", "sum")

#: The edge's flag per point: new; to verify by the writer; never checked (an earlier version's folded
#: distribution points, read back from its spooled records).
NEW, VERIFY, UNCHECKED = 0, 1, 2

Identity = tuple[Any, ...]
#: The identities of a group's points so far, one set per table (numbers, distributions), each as a
#: 16-byte digest of its structure: a group's repeats are found without holding its points' strings.
GroupSeen = tuple[set[bytes], set[bytes]]
#: Identities asked of the store in one query: the query and its answer are as large as this.
EXISTING_CHUNK = 5_000


def _digest(ident: Identity) -> bytes:
    """A strong digest of an identity's structure (its repr is exact for strings, ints and floats)."""
    return hashlib.blake2b(repr(ident).encode(), digest_size=16).digest()


#: A spooled record's points with the edge's flags for its number and distribution points.
Flagged = tuple[PointBatch, list[int], list[int]]


def _cumulative(cols: dict[str, list[Any]]) -> list[int]:
    """Rows whose identity is not checked here: cumulative sums (their conversion counts a point seen
    again as 0). Folded points carry their own set's fingerprint in ``series_id``, and are checked."""
    temps, kinds = cols["temporality"], cols["kind"]
    if schema.TEMPORALITY_CUMULATIVE not in temps:
        return []
    return [
        i
        for i, (t, k) in enumerate(zip(temps, kinds, strict=True))
        if t == schema.TEMPORALITY_CUMULATIVE and k == schema.KIND_SUM
    ]


def _identities(
    cols: dict[str, list[Any]], stream: Sequence[str], values: Sequence[str], flags: Sequence[int]
) -> list[Identity | None]:
    """Each row's identity: stream, interval and value (None for rows never checked: cumulative sums,
    folded points). The stream's fields are compared as a structure (a tuple of strings, numbers and
    tuples), never joined. A repeat has its original's value; a point of the same stream and interval
    with another value is not a repeat (a second writer, or two starts the SDK-race repair made equal)."""
    fields = [cols[f] for f in stream]
    vals = [cols[f] for f in values]
    kinds, temps = cols["kind"], cols["temporality"]
    starts, times = cols["start_time"], cols["time"]
    out: list[Identity | None] = []
    for i, (row, value) in enumerate(zip(zip(*fields, strict=True), zip(*vals, strict=True), strict=True)):
        if (temps[i] == schema.TEMPORALITY_CUMULATIVE and kinds[i] == schema.KIND_SUM) or (
            i < len(flags) and flags[i] == UNCHECKED
        ):
            out.append(None)
            continue
        start = 0 if kinds[i] == schema.KIND_GAUGE else int(starts[i])
        out.append((*(tuple(v) if isinstance(v, list) else v for v in row), start, int(times[i]), *value))
    return out


class EdgeIdentity:
    """The edge's half: marks each point new (0) or to verify (1). See the module's doc.

    The streams' latest times are kept in a table of 16-byte slots (``_native.stream_table_marks``: a
    stream's key and time, no Python object per stream; about 23 bytes a stream at its 70% load), or,
    without the C extension, in a dict of ints (about 100 bytes a stream)."""

    def __init__(self, floor_ns: int, max_streams: int = 1_000_000) -> None:
        self.floor_ns = floor_ns
        self.max_streams = max(1, max_streams)
        self._last: dict[int, int] = {}  # without C: stream key (this process's hash) -> greatest time
        self._table: bytearray | None = None
        self._count = 0  # streams in the table
        if _c_table_marks is not None:
            slots = 16
            while slots * 7 // 10 < self.max_streams:
                slots <<= 1
            self._table = bytearray(16 * slots)
        self._lock = threading.Lock()
        self.marked_new = 0
        self.marked_verify = 0

    def __len__(self) -> int:
        return self._count if self._table is not None else len(self._last)

    def mark(self, batch: PointBatch) -> tuple[list[int] | None, list[int] | None]:
        """The batch's verify flags per table, or None for a table with none to verify."""
        with self._lock:
            incoming = min(batch.size + batch.dist_size, self.max_streams)
            if len(self) + incoming > self.max_streams:
                # Room for the batch's streams, and a tenth more, by forgetting the oldest.
                self._evict(len(self) - max(0, int(self.max_streams * 0.9) - incoming))
            numbers = self._mark(batch.columns, batch.size, _NUMBER_STREAM) if batch.size else None
            dists = self._mark(batch.dist_columns, batch.dist_size, _DIST_STREAM) if batch.dist_size else None
        return numbers, dists

    def _mark(self, cols: dict[str, list[Any]], size: int, stream: Sequence[str]) -> list[int] | None:
        columns = [cols[f] for f in stream]
        room = self.max_streams - len(self)
        if self._table is not None:
            raw, verify, added, refused = _c_table_marks(
                columns, cols["time"], self._table, self.floor_ns, room
            )
            self._count += added
            self.floor_ns = max(self.floor_ns, refused)
            flags = list(raw)
        else:
            flags, verify = self._marks_python(columns, cols["time"], room)
        for i in _cumulative(cols):
            verify -= flags[i]
            flags[i] = NEW
        self.marked_new += size - verify
        self.marked_verify += verify
        return flags if verify else None

    def _marks_python(self, columns: list[list[Any]], times: list[int], room: int) -> tuple[list[int], int]:
        """What ``_native.stream_table_marks`` does, with a dict, for an install without the C extension:
        a hash of each row's structure (a collision only merges two streams' entries: more to verify,
        never fewer); a new stream past ``room`` is marked to verify, and the floor rises to its time (the
        dict does not remember it: a copy of that point must not pass for new once room is made)."""
        last, floor = self._last, self.floor_ns
        refused = floor
        parts = [list(map(hash, map(tuple, c))) if c and isinstance(c[0], list) else c for c in columns]
        flags = [0] * len(times)
        verify = 0
        get = last.get
        for i, (key, t) in enumerate(zip(map(hash, zip(*parts, strict=True)), times, strict=True)):
            seen = get(key)
            if t > floor and (seen is not None and t > seen or seen is None and room > 0):
                room -= seen is None
                last[key] = t
            else:
                if t > floor and seen is None:
                    refused = max(refused, t)
                flags[i] = 1
                verify += 1
        self.floor_ns = refused
        return flags, verify

    def _evict(self, n: int) -> None:
        """Forget at least ``n`` streams, those silent the longest (the oldest latest times, and any tied
        with the newest of them); the floor rises to the latest time they held, so none of their points
        can pass for new. In C a selection in linear time over the table; the dict this was before, with
        a heap, cost a fifth of the receiving threads' time where every point is a new stream, and the
        realistic fleet's 720,000 series overflowed its 322,000 (BENCHMARKS.md §14)."""
        if n <= 0:
            return
        if self._table is not None:
            bound, self._count = _c_table_evict(self._table, n)
        else:
            gone = heapq.nsmallest(n, self._last.items(), key=itemgetter(1))
            bound = gone[-1][1] if gone else None
            for key, t in list(self._last.items()):
                if bound is not None and t <= bound:
                    del self._last[key]
        if bound is not None:
            self.floor_ns = max(self.floor_ns, bound)


def _existing_sql(database: str, table: str, stream: Sequence[str], values: Sequence[str]) -> str:
    """The stored rows that may share an identity with the wanted ones: the same org, metric, time,
    attribute values and resource values (the primary key and two set tests narrow it to about the
    candidates themselves). Without the resource's, points sent again and again at one time with the
    same attributes under new resources (a sender inventing a resource per request) brought back every
    earlier request's rows for each new one: the writer verified 1,700 points a second."""
    cols = ", ".join(
        {
            "resource_keys": "mapKeys(resource)",
            "resource_values": "mapValues(resource)",
            "attr_keys": "mapKeys(attributes)",
            "attr_values": "mapValues(attributes)",
        }.get(c, c)
        for c in stream
    )
    interval = "toUnixTimestamp64Nano(start_time), toUnixTimestamp64Nano(time)"
    return f"""SELECT {cols}, {interval}, {", ".join(values)}
FROM {database}.{table}
WHERE org_id IN {{orgs:Array(String)}} AND metric IN {{metrics:Array(String)}}
    AND time IN (SELECT fromUnixTimestamp64Nano(arrayJoin({{times:Array(Int64)}}), 'UTC'))
    AND mapValues(attributes) IN (SELECT arrayJoin({{attr_values:Array(Array(String))}}))
    AND mapValues(resource) IN (SELECT arrayJoin({{resource_values:Array(Array(String))}}))
    AND batch_seq < {{seq:UInt64}}"""


class Verifier:
    """The writer's half: drops the points of a group whose identity is already stored (see the doc)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def existing(
        self, table: str, stream: Sequence[str], values: Sequence[str], wanted: set[Identity], seq: int
    ) -> set[Identity]:
        """Which of ``wanted`` the raw ``table`` holds from groups before ``seq``."""
        found: set[Identity] = set()
        ordered = sorted(wanted, key=repr)  # neighbours share orgs, metrics and times: narrower queries
        for at in range(0, len(ordered), EXISTING_CHUNK):
            found |= self._existing(table, stream, values, set(ordered[at : at + EXISTING_CHUNK]), seq)
        return found

    def _existing(
        self, table: str, stream: Sequence[str], values: Sequence[str], wanted: set[Identity], seq: int
    ) -> set[Identity]:
        nf = len(stream)
        at = {f: stream.index(f) for f in ("org_id", "metric", "kind", "attr_values", "resource_values")}
        rows = self.store.rows(
            _existing_sql(self.store.database, table, stream, values),
            {
                "orgs": sorted({w[at["org_id"]] for w in wanted}),
                "metrics": sorted({w[at["metric"]] for w in wanted}),
                "times": sorted({w[nf + 1] for w in wanted}),
                "attr_values": [list(v) for v in sorted({w[at["attr_values"]] for w in wanted})],
                "resource_values": [list(v) for v in sorted({w[at["resource_values"]] for w in wanted})],
                "seq": seq,
            },
        )
        found = set()
        for row in rows:
            fields = [tuple(v) if isinstance(v, list | tuple) else v for v in row[:nf]]
            start = 0 if fields[at["kind"]] == schema.KIND_GAUGE else int(row[nf])
            ident = (*fields, start, int(row[nf + 1]), *row[nf + 2 :])
            if ident in wanted:
                found.add(ident)
        return found

    def filter(self, record: Flagged, seq: int, seen: GroupSeen) -> tuple[PointBatch, int]:
        """One record of the group ``seq`` without its flagged points already stored or already earlier
        in the group (``seen``, which this record's points join), and how many went. The writer takes a
        group's records one at a time, so that one record's points are in memory as Python objects, not
        a group's (a group of 50,000-point records held 1.8 million lists at once)."""
        batch, number_flags, dist_flags = record
        cols, size, dcols, dsize = batch.columns, batch.size, batch.dist_columns, batch.dist_size
        dropped = 0
        for t, (table, stream, values) in enumerate(
            (
                (schema.POINTS_TABLE, _NUMBER_STREAM, _NUMBER_VALUE),
                (schema.DIST_TABLE, _DIST_STREAM, _DIST_VALUE),
            )
        ):
            c, n, fl = (cols, size, number_flags) if t == 0 else (dcols, dsize, dist_flags)
            if not n:
                continue
            ids = _identities(c, stream, values, fl)
            wanted = {i for i, f in zip(ids, fl, strict=False) if f == VERIFY and i}
            stored = self.existing(table, stream, values, wanted, seq)
            keep = []
            for i, ident in enumerate(ids):
                if ident is None:
                    keep.append(i)
                    continue
                key = _digest(ident)
                verify = i < len(fl) and fl[i] == VERIFY
                if verify and (ident in stored or key in seen[t]):
                    continue
                keep.append(i)
                seen[t].add(key)
            if len(keep) < n:
                dropped += n - len(keep)
                kept = {name: [col[i] for i in keep] for name, col in c.items()}
                if t == 0:
                    cols, size = kept, len(keep)
                else:
                    dcols, dsize = kept, len(keep)
        return PointBatch(cols, size, batch.digest, batch.received_ns, dcols, dsize), dropped
