"""``python -m bench.decode [--points N]``: decode CPU-seconds per million points, in one run.

Requests of 5,000 points (a gateway Collector batching) and of 50 points (an SDK exporting a few series),
15,000 orgs: protobuf's parse alone; the Python decoder (parse + walk); the native fast path from the
request bytes (``decode_request(..., body=...)``, no parse) and its bare walk (``decode_numbers``).
"""

from __future__ import annotations

import argparse
import gc
import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from bench.common import table
from bench.payloads import make_requests
from meterhouse.collector import decode
from meterhouse.collector.decode import Limits, decode_request
from meterhouse.core import schema


def cpu_per_million(fn, bodies: list[bytes], points: int, rounds: int = 3) -> float:
    """The best of ``rounds`` runs over all the bodies, in CPU-seconds per million points."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.process_time()
        for body in bodies:
            fn(body)
        best = min(best, time.process_time() - t0)
    return best / points * 1e6


def run(points: int = 200_000) -> list[dict]:
    limits = Limits()
    now = time.time_ns()
    lo, hi = now - limits.max_past_ns, now + limits.max_future_ns

    def parse(body: bytes) -> None:
        ExportMetricsServiceRequest.FromString(body)

    def python_path(body: bytes) -> None:
        decode_request(ExportMetricsServiceRequest.FromString(body), limits, now_ns=now, digest="d")

    def fast_path(body: bytes) -> None:
        r = decode_request(None, limits, now_ns=now, digest="d", body=body)
        assert r.batch.size

    def bare(body: bytes) -> None:
        found = decode._fast.decode_numbers(
            body, limits.org_attribute, lo, hi, limits.max_attributes, limits.max_attribute_length,
            limits.max_metric_name_length, limits.max_unit_length, limits.max_scope_length,
            limits.max_description_length, schema.MAX_SUM_DOUBLE, now,
        )  # fmt: skip
        assert found is not None

    if decode._fast is None:
        raise SystemExit("the native decoder is not built (pip install -e . with a C compiler)")
    rows = []
    for size in (5_000, 50):
        bodies, total = make_requests(15_000, size, max(1, points // size))
        assert decode_request(None, limits, now_ns=now, digest="d", body=bodies[0]).batch.size
        row: dict = {"request points": size, "requests": len(bodies)}
        for name, fn in (("protobuf parse", parse), ("python decode", python_path),
                         ("fast decode", fast_path), ("fast walk alone", bare)):  # fmt: skip
            row[name] = cpu_per_million(fn, bodies, total)
        row["speed-up"] = row["python decode"] / row["fast decode"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decode")
    ap.add_argument("--points", type=int, default=200_000, help="points per measurement")
    args = ap.parse_args()
    rows = run(args.points)
    print("Decode CPU-seconds per million points (best of 3)")
    print(table(rows, ["request points", "requests", "protobuf parse", "python decode", "fast decode",
                       "fast walk alone", "speed-up"]))  # fmt: skip


if __name__ == "__main__":
    main()
