"""Scenario 11: what point identity costs (``collector/identity.py``).

- The edge's marking, CPU per million points, beside the native decode of the same requests (the
  benchmark's all-new-sets data: 15,000 orgs, 5,000 points a request), once with every stream new and
  once with every point already seen (all to verify), and the pure-Python fallback.
- Memory per active stream held by the edge, at 1k, 10k, 100k and 1M streams (tracemalloc, the edge's
  own allocations: its dict, keys and times), so "flat in the number of orgs" can be read off.
- The writer's check of points to verify against the embedded engine (the rare path: a re-sent or
  re-batched point), CPU per million checked points, for a group of 50,000 re-sent points.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from bench.payloads import make_requests

COLUMNS = ["stage", "cpu_s_per_million", "bytes_per_stream", "streams"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _stream_batch(n: int, t: int):  # noqa: ANN202
    from meterhouse.collector.model import PointBatch
    from meterhouse.core import schema

    cols = PointBatch.empty()
    attrs = (["feature", "region"], ["search", "eu-west-1"])
    fixed = {"metric": "api.requests", "kind": schema.KIND_SUM, "unit": "1", "monotonic": 1, "is_int": 1,
             "value_int": 1, "value_double": 0.0, "resource_keys": ["service.name"], "resource_values": ["svc"],
             "scope_name": "bench", "scope_version": "", "received_at": t, "temporality": schema.TEMPORALITY_DELTA,
             "series_id": 0, "series_start": 0, "cumulative_int": 0, "cumulative_double": 0.0}  # fmt: skip
    for i in range(n):
        cols["org_id"].append(f"org-{i:07d}")
        cols["start_time"].append(t - 10**9)
        cols["time"].append(t + i)  # one time object per stream, as from the decoder
        cols["attr_keys"].append(attrs[0])
        cols["attr_values"].append(attrs[1])
        for k, v in fixed.items():
            cols[k].append(v)
    return PointBatch(cols, n, "d", t)


def run(work: Path, quick: bool) -> dict:
    from meterhouse.collector import identity
    from meterhouse.collector.decode import Limits, decode_request
    from meterhouse.collector.identity import EdgeIdentity

    requests, total = make_requests(15_000, 5_000, 8 if quick else 40)
    now = time.time_ns()
    rows: list[dict] = []

    def stage(name: str, fn, points: int) -> object:  # noqa: ANN001
        t = _cpu()
        out = fn()
        spent = _cpu() - t
        rows.append({"stage": name, "cpu_s_per_million": spent / points * 1e6, "bytes_per_stream": "",
                     "streams": ""})  # fmt: skip
        return out

    batches = stage("decode, native fast path (for scale)", lambda: [
        decode_request(None, Limits(), now_ns=now, digest=f"{i:032x}", body=b).batch
        for i, b in enumerate(requests)], total)  # fmt: skip
    edge = EdgeIdentity(floor_ns=0)
    stage("edge marking, every stream new", lambda: [edge.mark(b) for b in batches], total)  # type: ignore[union-attr]
    stage("edge marking, every point seen (all to verify)", lambda: [edge.mark(b) for b in batches], total)  # type: ignore[union-attr]
    native = identity._c_marks
    identity._c_marks = None
    try:
        python = EdgeIdentity(floor_ns=0)
        stage("edge marking, pure-Python fallback", lambda: [python.mark(b) for b in batches], total)  # type: ignore[union-attr]
    finally:
        identity._c_marks = native

    for n in (1_000, 10_000, 100_000) if quick else (1_000, 10_000, 100_000, 1_000_000):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        batch = _stream_batch(n, now)
        e = EdgeIdentity(floor_ns=0, max_streams=2 * n)
        e.mark(batch)
        del batch  # what the edge keeps once the request is gone: its dict, keys and times
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(e) == n
        rows.append({"stage": "edge memory per active stream", "cpu_s_per_million": "",
                     "bytes_per_stream": round(held / n, 1), "streams": n})  # fmt: skip

    # The writer's check, in a child process: one process can open only one embedded data directory.
    n = 10_000 if quick else 50_000
    out = subprocess.run([sys.executable, "-m", "bench.identity", str(work / "engine"), str(n)],
                         capture_output=True, text=True, timeout=1800, check=True).stdout  # fmt: skip
    rows.append({"stage": "writer check of re-sent points (rare path)",
                 "cpu_s_per_million": float(out.strip().splitlines()[-1]), "bytes_per_stream": "", "streams": ""})  # fmt: skip
    return {"points": total, "rows": rows}


def writer_check(engine: Path, n: int) -> float:
    """CPU-s per million points of the writer's check of a group of ``n`` re-sent points, all to verify,
    against an engine that holds them."""
    from meterhouse.collector.identity import Verifier
    from meterhouse.collector.spool import encode_blocks
    from meterhouse.collector.writer import NUMBER_NAMES, merge_blocks
    from meterhouse.core import schema
    from meterhouse.core.store import connect

    store = connect("embedded", engine, "identity")
    store.ensure_schema()
    group = _stream_batch(n, time.time_ns())
    numbers, _ = merge_blocks([encode_blocks(group)], "t0", 1)
    store.insert_native(schema.INGEST_TABLE, NUMBER_NAMES, numbers, "t0:n")
    t = _cpu()
    _kept, dropped = Verifier(store).filter((group, [1] * n, []), 2, (set(), set()))
    spent = _cpu() - t
    assert dropped == n, dropped
    return spent / n * 1e6


if __name__ == "__main__":
    print(writer_check(Path(sys.argv[1]), int(sys.argv[2])))
