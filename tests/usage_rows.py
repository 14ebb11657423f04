"""Helpers to put usage straight into the real schema (many orgs at chosen times)."""

from __future__ import annotations

import itertools
import threading

from meterhouse.collector.model import BATCH_COLUMNS
from meterhouse.core import schema

_DEFAULTS = {
    "org_id": "", "metric": "api.calls", "kind": schema.KIND_SUM, "unit": "{call}", "monotonic": 1,
    "start_time": 0, "time": 0, "is_int": 1, "value_int": 0, "value_double": 0.0, "attr_keys": [],
    "attr_values": [], "resource_keys": [], "resource_values": [], "scope_name": "", "scope_version": "",
    "received_at": 0, "temporality": schema.TEMPORALITY_DELTA, "series_id": 0, "series_start": 0,
    "cumulative_int": 0, "cumulative_double": 0.0,
}  # fmt: skip
_tokens = itertools.count()


def put(store, rows: list[dict]) -> None:
    """Insert rows (dicts of column → value; ``time`` in ns; ``attrs`` a dict) in one insert."""
    cols: dict[str, list] = {n: [] for n in BATCH_COLUMNS}
    for row in rows:
        row = dict(row)
        attrs = row.pop("attrs", {})
        row.setdefault("attr_keys", sorted(attrs))
        row.setdefault("attr_values", [attrs[k] for k in sorted(attrs)])
        row.setdefault("start_time", row["time"])
        row.setdefault("received_at", row["time"])
        for n in BATCH_COLUMNS:
            cols[n].append(row.get(n, _DEFAULTS[n]))
    token = f"test-{next(_tokens)}-{id(rows)}"
    if getattr(store, "embedded", False):
        # As the embedded engine's writer inserts them: with its own rows (orgs, catalog, attribute sets).
        from meterhouse.collector.model import PointBatch
        from meterhouse.collector.writer import insert_calls

        for _kind, insert in insert_calls(store, token, batches=[PointBatch(cols, len(rows), token, 0)]):
            insert(False)
    else:
        store.insert_points([cols[n] for n in BATCH_COLUMNS] + [[token] * len(rows)], token)


class Crash(Exception):
    """What a close's progress callback raises to stand for a kill half-way."""


def crash_when_done(chunks: int):
    """A close ``progress`` callback that raises :class:`Crash` once ``chunks`` orgs are done."""

    def progress(p) -> None:
        if p.done >= chunks:
            raise Crash

    return progress


def concurrently(fn, n: int, timeout_s: float = 120) -> tuple[list, list]:
    """Run ``fn`` in ``n`` threads at once; its results and the exceptions it raised."""
    results, errors = [], []

    def run() -> None:
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001 - returned to the caller
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return results, errors
