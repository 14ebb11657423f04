"""Scenario 10: where the CPU of one point goes, stage by stage, in one process (no HTTP, no threads).

Each stage runs over the same requests (``bench/payloads.py``: 15,000 orgs, 5,000 points a request) and is
timed with the process's user+system CPU: the protobuf parse (upb), the Python decoder, the native fast
path from the request bytes, the spool's Native-format encoding, and the insert into the embedded
engine with no view (the engine's floor: parse the block, write nothing), with each materialized view
alone, and with the whole schema. Background merges are not included (they run later, in the server).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from bench.payloads import make_requests

COLUMNS = ["stage", "cpu_s_per_million", "points_per_s_one_core"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(work: Path, quick: bool) -> dict:
    import re

    from meterhouse.collector.decode import Limits, decode_request
    from meterhouse.collector.spool import encode_blocks
    from meterhouse.collector.writer import NUMBER_NAMES, merge_blocks
    from meterhouse.core import native, schema
    from meterhouse.core.store import Store, connect

    requests, total = make_requests(15_000, 5_000, 8 if quick else 40)
    rows: list[dict] = []

    def stage(name: str, fn) -> object:  # noqa: ANN001
        t = _cpu()
        out = fn()
        spent = _cpu() - t
        rows.append({"stage": name, "cpu_s_per_million": spent / total * 1e6,
                     "points_per_s_one_core": total / spent if spent else 0.0})  # fmt: skip
        return out

    limits, now = Limits(), time.time_ns()
    parsed = stage(
        "protobuf parse (upb)", lambda: [ExportMetricsServiceRequest.FromString(b) for b in requests]
    )
    stage("decode, Python path (after the parse)", lambda: [
        decode_request(p, limits, now_ns=now, digest=f"{i:032x}") for i, p in enumerate(parsed)])  # fmt: skip
    batches = stage("decode, native fast path (from the bytes)", lambda: [
        decode_request(None, limits, now_ns=now, digest=f"{i:032x}", body=b).batch
        for i, b in enumerate(requests)])  # fmt: skip
    blocks = stage("spool encoding (Native blocks)", lambda: [encode_blocks(b) for b in batches])  # type: ignore[union-attr]
    merged = [merge_blocks(blocks[i : i + 10], f"t{i}")[0] for i in range(0, len(blocks), 10)]  # type: ignore[index]
    client = connect("embedded", work / "engine", "meterhouse").client
    views = [re.search(r"VIEW IF NOT EXISTS x\.(\w+)", s).group(1)  # type: ignore[union-attr]
             for s in schema.ddl("x") if "MATERIALIZED VIEW" in s]  # fmt: skip
    views = [v for v in views if "dist" not in v]  # number points only

    def insert(db: str, keep: set[str]) -> None:
        for statement in schema.ddl(db):
            m = re.search(r"VIEW IF NOT EXISTS \w+\.(\w+)", statement)
            if m is None or m.group(1) in keep:
                client.command(statement)
        store = Store(client, db, "embedded")
        for i, block in enumerate(merged):
            store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, block, f"{db}-{i}:n")

    def embedded(db: str) -> None:
        """What the writer sends on the embedded engine: each group as one block, with its own rows
        (orgs, catalog, new attribute sets and (set, hour) pairs) and the three views."""
        from meterhouse.collector.writer import insert_calls

        store = Store(client, db, "embedded")
        store.ensure_schema()
        seen = native.KeySet()
        for i in range(0, len(blocks), 10):
            token = f"{schema.ONE_BLOCK_TOKEN_PREFIX}{i:x}"
            for _kind, call in insert_calls(store, token, i + 1, blocks=blocks[i : i + 10], seen=seen):  # type: ignore[arg-type]
                call(False)

    insert("warmup", set())
    stage("insert, no view (the engine's floor)", lambda: insert("no_view", set()))
    for n, view in enumerate(views):
        stage(f"insert, {view} alone", lambda view=view, n=n: insert(f"v{n}", {view}))
    stage("insert, the whole schema (a server's: every view)", lambda: insert("all_views", set(views)))
    stage("insert, the embedded engine's (3 views and the writer's own rows)", lambda: embedded("lean"))
    return {"points": total, "rows": rows}
