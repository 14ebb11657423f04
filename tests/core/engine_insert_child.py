"""Child process of tests/core/test_engine_dedup_soak.py: insert batches into the embedded engine's ingest
table, each under its own deduplication token and with its ``batch_seq``, printing each batch number once
its insert returned; ``once`` inserts one batch as the writer does a group in doubt (``insert_in_doubt``).

``python engine_insert_child.py DATA_DIR FIRST loop|once|redo [MONTHS]`` (``redo``: ``once``, saying "ready"
first); batch i holds ROWS points of org ``b{i}``,
spread over MONTHS months (default 1: one part per partitioned table; more: one part per month each).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from meterhouse.collector.model import BATCH_COLUMNS
from meterhouse.collector.writer import NUMBER_NAMES, stamp
from meterhouse.core import native, schema
from meterhouse.core.store import connect

ROWS = 20_000
TYPES = [{c.name: c.type for c in schema.INGEST_COLUMNS}[n] for n in BATCH_COLUMNS]


MONTH_NS = 31 * 86400 * 10**9


def block(i: int, months: int = 1) -> bytes:
    now = time.time_ns()
    row = dict(org_id=f"b{i:05d}", metric="m", kind=schema.KIND_SUM, unit="1", monotonic=1, start_time=now,
               time=now, is_int=1, value_int=1, value_double=0.0, attr_keys=["k"], attr_values=["v"],
               resource_keys=[], resource_values=[], scope_name="", scope_version="", received_at=now,
               temporality=schema.TEMPORALITY_DELTA, series_id=0, series_start=0, cumulative_int=0,
               cumulative_double=0.0)  # fmt: skip
    cols = [
        [[str(j % 500)] for j in range(ROWS)]
        if n == "attr_values"
        else [now - (j % months) * MONTH_NS for j in range(ROWS)]
        if n == "time"
        else [row[n]] * ROWS
        for n in BATCH_COLUMNS
    ]
    return stamp(native.encode(BATCH_COLUMNS, TYPES, cols), ROWS, f"t{i}:n", i + 1)


def main() -> None:
    data, first, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    months = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    store = connect("embedded", data, "meterhouse")
    store.ensure_schema()
    i = first
    if mode in ("once", "redo"):
        if mode == "redo":  # the parent kills it at some moment of the redo
            print("ready", flush=True)
        store.insert_in_doubt("n", NUMBER_NAMES, block(i, months), f"t{i}:n", i + 1)
        print(i, flush=True)
        return
    while True:
        store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block(i, months), f"t{i}:n")
        print(i, flush=True)
        i += 1


if __name__ == "__main__":
    main()
