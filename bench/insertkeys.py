"""Scenario 13: the engine memory one insert needs, against its distinct attribute keys and its bytes.

The embedded engine is opened in this process and the schema created; each row is one insert of the
writer's shape (the records' Native blocks, stamped, one after another, into the ingest table with every
view) under an engine query limit (``max_memory_usage``) raised step by step until it fits: the first
limit it fits under is the row's figure. Each try goes to a fresh database, so no try sees another's
rows. Two shapes of the same entries: every point's keys distinct (``<record>.<point>.<j>``), and the
same 126 keys on every point. The attribute-cardinality views keep two states per distinct key (per
metric and hour), which is what ``--max-insert-attribute-keys`` bounds (``collector/spool.py``,
``attribute_keys``; ``meterhouse/core/memory.py``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from meterhouse.collector.decode import Limits, decode_request
from meterhouse.collector.spool import attribute_keys, encode_blocks
from meterhouse.collector.writer import NUMBER_NAMES, merge_blocks
from meterhouse.core import schema
from meterhouse.core.store import Store, connect

COLUMNS = ["shape", "records", "points", "entries", "distinct_keys", "group_mib", "fits_under_mib"]
MIB = 1 << 20
SEC = 10**9
LIMITS_MIB = (24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 512, 768)


def _request(record: int, t: int, points: int, keys: int, distinct: bool) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="bench")))
    m = rm.scope_metrics.add().metrics.add(name="bench.keys", unit="1")
    m.sum.aggregation_temporality, m.sum.is_monotonic = 1, True
    for i in range(points):
        dp = m.sum.data_points.add(start_time_unix_nano=t - SEC, time_unix_nano=t, as_int=1)
        dp.attributes.append(KeyValue(key="org.id", value=AnyValue(string_value="org-bench")))
        for j in range(keys):
            key = f"{record}.{i}.{j}" if distinct else f"k{j}"
            dp.attributes.append(KeyValue(key=key, value=AnyValue(string_value="")))
    return req


def measure(store: Store, records: int, points: int, keys: int, distinct: bool, limits=LIMITS_MIB) -> dict:
    t = time.time_ns() - 30 * SEC
    blocks, entries, distinct_keys = [], 0, 0
    for k in range(records):
        req = _request(k, t, points, keys, distinct)
        batch = decode_request(req, Limits(), now_ns=time.time_ns(), digest=f"{k:032x}").batch
        entries += sum(map(len, batch.columns["attr_keys"]))
        distinct_keys += attribute_keys(batch)
        blocks.append(encode_blocks(batch))
    numbers, _ = merge_blocks(blocks, f"{schema.LEDGER_TOKEN_PREFIX}{time.time_ns()}", 1)
    fits = None
    for mib in limits:
        database = f"bench_keys_{time.time_ns()}"
        Store(store.client, database, "embedded").ensure_schema()
        try:
            store.client.raw_insert(
                f"{database}.{schema.INGEST_OF['n']}", NUMBER_NAMES, numbers, fmt="Native",
                settings={**schema.INSERT_SETTINGS, **schema.ONE_PART_SETTINGS, "insert_deduplicate": 0,
                          "max_memory_usage": mib * MIB},
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - only a memory failure means "try a larger limit"
            if "MEMORY_LIMIT_EXCEEDED" not in str(e):
                raise
        else:
            fits = mib
            break
        finally:
            store.client.command(f"DROP DATABASE IF EXISTS {database}")
    return {"shape": f"{keys} keys a point, {'all distinct' if distinct else 'the same on every point'}",
            "records": records, "points": records * points, "entries": entries,
            "distinct_keys": distinct_keys, "group_mib": round(sum(b.nbytes for b in blocks) / MIB, 2),
            "fits_under_mib": fits if fits is not None else f"> {limits[-1]}"}  # fmt: skip


def run(work: Path, quick: bool) -> dict:
    store = connect("embedded", Path(tempfile.mkdtemp(dir=work)), "meterhouse")
    if quick:  # one small insert: checks the code, not the numbers
        return {"rows": [measure(store, 1, 20, 10, True, limits=(64, 256))]}
    shapes = [(1, 250, 126, True), (2, 250, 126, True), (3, 250, 126, True), (4, 250, 126, True),
              (8, 250, 126, True), (16, 250, 126, False), (64, 250, 126, False)]  # fmt: skip
    return {"rows": [measure(store, *shape) for shape in shapes]}
