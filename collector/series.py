"""Per-(org, metric) series limit: new attribute sets beyond it are folded into one overflow series.

Folding replaces a point's attributes with ``otel.metric.overflow=true`` (as the OpenTelemetry SDKs do
for their own cardinality limit); its value is kept, so the org's totals stay exact. It runs after the
cumulative→delta conversion, which keys its state on the original attributes, so a folded cumulative
series still counts exactly its own increase. A folded delta or gauge point keeps a fingerprint of its
own attribute set in ``series_id`` (which only cumulative points use otherwise), stored with it, so that
point identity checks it as it checks any point: re-sent in another request (a forwarder re-batching its
queue), it counts once (``identity.py``).

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
_OVERFLOW = hash(((OVERFLOW_KEY,), (OVERFLOW_VALUE,)))
#: The attribute lists of every point this limit folded: these very objects, so that point identity
#: (``identity.py``) tells a point folded here from one an SDK sent with the same attributes. Never mutated.
FOLDED_KEYS: list[str] = [OVERFLOW_KEY]
FOLDED_VALUES: list[str] = [OVERFLOW_VALUE]

Pair = tuple[str, str]
#: (org, metric) → the attribute sets stored for it, as (sorted keys, values).
Loader = Callable[[list[Pair]], dict[Pair, list[tuple[Sequence[str], Sequence[str]]]]]
Admission = tuple[Pair, int]
#: Sets over the limit known not to be stored (about 150 bytes each: at most some 15 MB).
ABSENT_MAX = 100_000
#: A set the limit would fold, (org, metric) and its keys and values; asked whether it is stored already.
Candidate = tuple[Pair, tuple[str, ...], tuple[str, ...]]
Present = Callable[[list[Candidate]], set[Candidate]]


def fold_fingerprint(keys: Sequence[str], values: Sequence[str]) -> int:
    """A folded point's own attribute set, as a stable 64-bit number (stored: the same in every process)."""
    digest = hashlib.blake2b(repr((tuple(keys), tuple(values))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never 0, what a delta point's series_id is


def _set_key(keys: Sequence[str], values: Sequence[str]) -> int:
    # Process-local hashes are enough: every set is hashed by this process, loaded ones included.
    return hash((tuple(keys), tuple(values)))


class SeriesLimiter:
    """Admitted attribute sets per (org, metric), at most ``limit`` each (the overflow set aside)."""

    def __init__(self, limit: int, loader: Loader, present: Present | None = None) -> None:
        """``loader`` reads up to ``limit + 1`` stored sets of (org, metric) pairs; ``present`` says which
        sets over the limit are stored already (admitted under a larger limit, or past what ``loader``
        read): those are not folded, as their points stored before were not."""
        self.limit = limit
        self._load = loader
        self._present = present
        self._sets: dict[Pair, set[int]] = {}
        # Sets over the limit the store was asked about and does not hold (folded from then on without
        # asking again); at most ABSENT_MAX, forgotten all at once past it.
        self._absent: set[tuple[Pair, int]] = set()
        self._loaded: set[Pair] = set()
        # Sets admitted by requests not yet settled: how many such requests use each, and whether one
        # of them was stored. A refused request forgets a set only if no request using it was stored.
        self._pending: dict[Admission, list[Any]] = {}  # admission → [users, stored]
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
        series_ids = columns.get("series_id")  # number points only; 0 unless cumulative
        folded = 0
        admitted: list[Admission] = []
        held: set[Admission] = set()
        over: list[int] = []  # rows over the limit
        with self._lock:
            missing = list({(o, m) for o, m in zip(orgs, metrics, strict=True)} - self._loaded)
            if missing:
                try:
                    found = self._load(missing)
                except Exception as err:  # ClickHouse unreachable: retryable, like cumulative state
                    raise StateUnavailable(f"cannot read attribute sets: {err}") from err
                self._merge(found)
                self._loaded.update(missing)
            limit = self.limit
            for i, pair in enumerate(zip(orgs, metrics, strict=True)):
                h = _set_key(keys_col[i], values_col[i])
                if h == _OVERFLOW:
                    continue
                sets = self._sets.setdefault(pair, set())
                if h in sets:
                    pending = self._pending.get((pair, h))
                    if pending is not None and (pair, h) not in held:
                        pending[0] += 1  # admitted by a request not settled yet: this one relies on it
                        held.add((pair, h))
                        admitted.append((pair, h))
                    continue
                if len(sets) < limit:
                    sets.add(h)
                    self._pending[(pair, h)] = [1, False]
                    held.add((pair, h))
                    admitted.append((pair, h))
                    continue
                over.append(i)
            if over and self._present is not None:
                over = self._unless_stored(over, orgs, metrics, keys_col, values_col)
            for i in over:
                if series_ids is not None and not series_ids[i]:
                    series_ids[i] = fold_fingerprint(keys_col[i], values_col[i])
                keys_col[i] = FOLDED_KEYS
                values_col[i] = FOLDED_VALUES
                folded += 1
        return folded, admitted

    def _unless_stored(
        self, over: list[int], orgs: list[str], metrics: list[str], keys: list[Any], values: list[Any]
    ) -> list[int]:
        """The rows of ``over`` whose set is not stored already. A stored set (admitted under a larger
        limit, or past the ``limit + 1`` sets read back) is known from now on and its rows are not folded:
        folded, a point of it re-sent (re-batched by a forwarder) had another identity than its stored
        copy and counted twice."""
        assert self._present is not None
        wanted = {i: ((orgs[i], metrics[i]), tuple(keys[i]), tuple(values[i])) for i in over}
        absent = self._absent
        ask = {c for c in wanted.values() if (c[0], _set_key(c[1], c[2])) not in absent}
        stored: set[Candidate] = set()
        if ask:
            try:
                stored = self._present(list(ask))
            except Exception as err:  # ClickHouse unreachable: retryable, like cumulative state
                raise StateUnavailable(f"cannot read attribute sets: {err}") from err
            if len(absent) > ABSENT_MAX:
                absent.clear()
            absent.update((c[0], _set_key(c[1], c[2])) for c in ask - stored)
        for pair, k, v in stored:
            self._sets.setdefault(pair, set()).add(_set_key(k, v))
        return [i for i in over if wanted[i] not in stored]

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
                if not pending[1]:
                    pair, h = admission
                    self._sets.get(pair, set()).discard(h)

    def observe(self, columns: dict[str, list[Any]]) -> None:
        """Count the sets of points already accepted (the spool at start) as admitted."""
        with self._lock:
            for org, metric, keys, values in zip(
                columns["org_id"], columns["metric"], columns["attr_keys"], columns["attr_values"],
                strict=True,
            ):  # fmt: skip
                h = _set_key(keys, values)
                if h != _OVERFLOW:
                    self._sets.setdefault((org, metric), set()).add(h)

    def _merge(self, found: dict[Pair, list[tuple[Sequence[str], Sequence[str]]]]) -> None:
        for pair, sets in found.items():
            mine = self._sets.setdefault(pair, set())
            for keys, values in sets:
                h = _set_key(keys, values)
                if h != _OVERFLOW:
                    mine.add(h)

    def admitted(self, org: str, metric: str) -> int:
        with self._lock:
            return len(self._sets.get((org, metric), ()))
