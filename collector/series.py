"""Per-(org, metric) series limit: new attribute sets beyond it are folded into one overflow series.

Folding replaces a point's attributes with ``otel.metric.overflow=true`` (as the OpenTelemetry SDKs do
for their own cardinality limit); its value is kept, so the org's totals stay exact. It runs after the
cumulative→delta conversion, which keys its state on the original attributes, so a folded cumulative
series still counts exactly its own increase. A folded delta, gauge or distribution point keeps a
fingerprint of its own attribute set in ``series_id`` (which only cumulative points use otherwise),
stored with it, so that point identity checks it as it checks any point: re-sent in another request (a
forwarder re-batching its queue), it counts once, and an SDK's own overflow series (the same attributes,
``series_id`` 0) is not taken for it (``identity.py``).

The attribute sets admitted so far are read back from ClickHouse (``attribute_sets``) the first time an
(org, metric) is seen by this process, so a restart does not admit more; sets of points still waiting
in the spool are added at start (:meth:`SeriesLimiter.observe`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from meterhouse.collector.cumulative import StateUnavailable

OVERFLOW_KEY = "otel.metric.overflow"
OVERFLOW_VALUE = "true"
#: The attribute lists of every point this limit folded: these very objects, shared (never mutated).
FOLDED_KEYS: list[str] = [OVERFLOW_KEY]
FOLDED_VALUES: list[str] = [OVERFLOW_VALUE]

Pair = tuple[str, str]
#: (org, metric) → the attribute sets stored for it, as (sorted keys, values).
Loader = Callable[[list[Pair]], dict[Pair, list[tuple[Sequence[str], Sequence[str]]]]]
#: A set a request admitted or relies on: its key (:func:`_keys`).
Admission = int
#: Sets over the limit known not to be stored (about 150 bytes each: at most some 15 MB).
ABSENT_MAX = 100_000
#: A set the limit would fold, (org, metric) and its keys and values; asked whether it is stored already.
Candidate = tuple[Pair, tuple[str, ...], tuple[str, ...]]
Present = Callable[[list[Candidate]], set[Candidate]]

try:
    from meterhouse.core._native import row_keys as _c_row_keys
except ImportError:  # pragma: no cover - built by `pip install`; the suite requires it
    _c_row_keys = None


def fold_fingerprint(keys: Sequence[str], values: Sequence[str]) -> int:
    """A folded point's own attribute set, as a stable 64-bit number (stored: the same in every process)."""
    digest = hashlib.blake2b(repr((tuple(keys), tuple(values))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never 0, what a delta point's series_id is


def _keys(orgs: list[str], metrics: list[str], keys: list[Any], values: list[Any]) -> list[int]:
    """Each row's key of (org, metric, attribute set), in one C call a request (``_native.row_keys``): a
    tuple of tuples a point cost the receiving threads 6 µs a point, more than the whole decode
    (BENCHMARKS.md §14). Process-local hashes are enough: every set is keyed by this process, loaded
    ones included; two sets of one key (a 64-bit collision) count as one against the limit, which
    changes only which set a point is folded into, never a total."""
    if _c_row_keys is not None:
        out: list[int] = _c_row_keys([orgs, metrics, keys, values])
        return out
    return [hash((o, m, tuple(k), tuple(v))) for o, m, k, v in zip(orgs, metrics, keys, values, strict=True)]


def _is_overflow(keys: Sequence[str], values: Sequence[str]) -> bool:
    return len(keys) == 1 and keys[0] == OVERFLOW_KEY and len(values) == 1 and values[0] == OVERFLOW_VALUE


class SeriesLimiter:
    """Admitted attribute sets per (org, metric), at most ``limit`` each (the overflow set aside)."""

    def __init__(self, limit: int, loader: Loader, present: Present | None = None) -> None:
        """``loader`` reads up to ``limit + 1`` stored sets of (org, metric) pairs; ``present`` says which
        sets over the limit are stored already (admitted under a larger limit, or past what ``loader``
        read): those are not folded, as their points stored before were not."""
        self.limit = limit
        self._load = loader
        self._present = present
        self._known: set[int] = set()  # the admitted sets' keys, every (org, metric)'s
        self._count: dict[Pair, int] = {}  # admitted sets per (org, metric)
        # Sets over the limit the store was asked about and does not hold (folded from then on without
        # asking again); at most ABSENT_MAX, forgotten all at once past it.
        self._absent: set[int] = set()
        self._loaded: set[Pair] = set()
        # Sets admitted by requests not yet settled: how many such requests use each, whether one of
        # them was stored, and its (org, metric). A refused request forgets a set only if no request
        # using it was stored.
        self._pending: dict[Admission, list[Any]] = {}  # admission → [users, stored, pair]
        self._lock = threading.Lock()

    def fold(self, columns: dict[str, list[Any]]) -> tuple[int, list[Admission]]:
        """Fold the rows of ``columns`` whose new attribute set is over the limit, in place.

        Returns the number of folded rows and the admissions this call holds: the sets it admitted and
        those it uses that other unsettled requests admitted. Each is given back once, by
        :meth:`settle` (the request was stored) or :meth:`rollback` (it was not).
        """
        orgs, metrics = columns["org_id"], columns["metric"]
        if not orgs:
            return 0, []
        keys_col, values_col = columns["attr_keys"], columns["attr_values"]
        series_ids = columns.get("series_id")  # 0 unless cumulative (number points) or folded
        row_keys = _keys(orgs, metrics, keys_col, values_col)
        folded = 0
        admitted: list[Admission] = []
        over: list[int] = []  # rows over the limit
        with self._lock:
            known, pending, count = self._known, self._pending, self._count
            fresh = [i for i, k in enumerate(row_keys) if k not in known]  # most points: none
            if fresh:
                missing = list({(orgs[i], metrics[i]) for i in fresh} - self._loaded)
                if missing:
                    try:
                        found = self._load(missing)
                    except Exception as err:  # ClickHouse unreachable: retryable, like cumulative state
                        raise StateUnavailable(f"cannot read attribute sets: {err}") from err
                    self._merge(found)
                    self._loaded.update(missing)
            if pending:  # sets admitted by requests not settled yet: this one relies on them too
                for k in pending.keys() & set(row_keys):
                    pending[k][0] += 1
                    admitted.append(k)
            limit = self.limit
            for i in fresh:
                k = row_keys[i]
                if k in known or _is_overflow(keys_col[i], values_col[i]):
                    continue  # loaded just now, or admitted by an earlier row of this request
                pair = (orgs[i], metrics[i])
                n = count.get(pair, 0)
                if n < limit:
                    known.add(k)
                    count[pair] = n + 1
                    pending[k] = [1, False, pair]
                    admitted.append(k)
                    continue
                over.append(i)
            if over and self._present is not None:
                over = self._unless_stored(over, row_keys, orgs, metrics, keys_col, values_col)
            for i in over:
                if series_ids is not None and not series_ids[i]:
                    series_ids[i] = fold_fingerprint(keys_col[i], values_col[i])
                keys_col[i] = FOLDED_KEYS
                values_col[i] = FOLDED_VALUES
                folded += 1
        return folded, admitted

    def _unless_stored(
        self,
        over: list[int],
        row_keys: list[int],
        orgs: list[str],
        metrics: list[str],
        keys: list[Any],
        values: list[Any],
    ) -> list[int]:
        """The rows of ``over`` whose set is not stored already. A stored set (admitted under a larger
        limit, or past the ``limit + 1`` sets read back) is known from now on and its rows are not folded:
        folded, a point of it re-sent (re-batched by a forwarder) had another identity than its stored
        copy and counted twice."""
        assert self._present is not None
        wanted = {i: ((orgs[i], metrics[i]), tuple(keys[i]), tuple(values[i])) for i in over}
        key_of = {wanted[i]: row_keys[i] for i in over}
        absent = self._absent
        ask = {c for c, k in key_of.items() if k not in absent}
        stored: set[Candidate] = set()
        if ask:
            try:
                stored = self._present(list(ask))
            except Exception as err:  # ClickHouse unreachable: retryable, like cumulative state
                raise StateUnavailable(f"cannot read attribute sets: {err}") from err
            if len(absent) > ABSENT_MAX:
                absent.clear()
            absent.update(key_of[c] for c in ask - stored)
        for c in stored:
            self._admit(c[0], key_of[c])
        return [i for i in over if wanted[i] not in stored]

    def _admit(self, pair: Pair, key: int) -> None:
        if key not in self._known:
            self._known.add(key)
            self._count[pair] = self._count.get(pair, 0) + 1

    def rollback(self, admitted: Iterable[Admission]) -> None:
        """Give back the admissions of a request that was not kept (the client sends it again): a set
        is forgotten once no request using it is pending and none of them was stored."""
        self._release(admitted, stored=False)

    def settle(self, admitted: Iterable[Admission]) -> None:
        """Give back the admissions of a request that was stored: its sets stay admitted."""
        self._release(admitted, stored=True)

    def _release(self, admitted: Iterable[Admission], stored: bool) -> None:
        with self._lock:
            for admission in admitted:
                pending = self._pending.get(admission)
                if pending is None:
                    continue
                pending[0] -= 1
                pending[1] = pending[1] or stored
                if pending[0] > 0:
                    continue
                del self._pending[admission]
                if not pending[1] and admission in self._known:
                    self._known.discard(admission)
                    self._count[pending[2]] -= 1

    def observe(self, columns: dict[str, list[Any]]) -> None:
        """Count the sets of points already accepted (the spool at start) as admitted."""
        orgs, metrics, keys, values = (columns[c] for c in ("org_id", "metric", "attr_keys", "attr_values"))
        row_keys = _keys(orgs, metrics, keys, values)
        with self._lock:
            for i, k in enumerate(row_keys):
                if not _is_overflow(keys[i], values[i]):
                    self._admit((orgs[i], metrics[i]), k)

    def _merge(self, found: dict[Pair, list[tuple[Sequence[str], Sequence[str]]]]) -> None:
        rows = [(pair, k, v) for pair, sets in found.items() for k, v in sets if not _is_overflow(k, v)]
        row_keys = _keys(
            [r[0][0] for r in rows], [r[0][1] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        )
        for (pair, _k, _v), key in zip(rows, row_keys, strict=True):
            self._admit(pair, key)

    def admitted(self, org: str, metric: str) -> int:
        with self._lock:
            return self._count.get((org, metric), 0)
