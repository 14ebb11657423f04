"""atheris harness for the decoder's native fast path (collector/_otlpfast.c) against protobuf and the
Python decoder.

Not part of the default suite. For every input (protobuf bytes of an ExportMetricsServiceRequest):

- when protobuf refuses the bytes, ``decode_numbers`` must return None (never columns);
- when it returns columns, they (and the counts) must be exactly what the Python decoder builds from
  the parsed request, and the Python decoder must have accepted every point.

Run it (seeded with real payloads; with an ASan build of the extension, see README section Tests):

    .venv/bin/python tests/fuzz/fuzz_fastdecode.py -runs=200000 /tmp/fastdecode-corpus

``seeds DIR`` writes the seed corpus (bench payloads) into DIR and exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from meterhouse.collector import decode
    from meterhouse.core import schema

LIMITS = decode.Limits(max_attributes=8, max_attribute_length=64)
NOW = time.time_ns()


def norm(column: list) -> list:
    """A column comparable with == (NaN is not equal to itself; -0.0 equals 0.0)."""
    return [repr(v) if isinstance(v, float) else v for v in column]


def check(body: bytes) -> None:
    fast = decode._fast
    assert fast is not None, "the native decoder is not built"
    lim = LIMITS
    min_t, max_t = NOW - lim.max_past_ns, NOW + lim.max_future_ns
    found = fast.decode_numbers(
        body, lim.org_attribute, min_t, max_t, lim.max_attributes, lim.max_attribute_length,
        lim.max_metric_name_length, lim.max_unit_length, lim.max_scope_length, lim.max_description_length,
        schema.MAX_SUM_DOUBLE, NOW,
    )  # fmt: skip
    try:
        request = ExportMetricsServiceRequest.FromString(body)
    except (DecodeError, RecursionError) as e:
        if found is not None:
            raise AssertionError(f"fast path accepted bytes protobuf refuses ({e}): {body!r}") from None
        return
    if found is None:
        return
    cols, points, unattributed, late = found
    slow = decode.decode_request(request, lim, now_ns=NOW, digest="d")
    if slow.rejected_count:
        raise AssertionError(f"fast path accepted a request the Python decoder rejects points of: {body!r}")
    want = slow.batch.columns
    if set(cols) != set(want) or any(norm(cols[k]) != norm(want[k]) for k in want):
        diff = [k for k in want if norm(cols.get(k, [])) != norm(want[k])]
        raise AssertionError(f"columns differ in {diff}: {body!r}")
    for k in want:  # same types too (1 vs True vs 1.0)
        for a, b in zip(cols[k], want[k], strict=True):
            if type(a) is not type(b) or (isinstance(a, float) and repr(a) != repr(b)):
                raise AssertionError(f"column {k}: {a!r} vs {b!r}: {body!r}")
    got = (points, unattributed, late, slow.batch.size)
    expected = (slow.received, slow.unattributed, slow.repaired.get("start_after_time", 0), points)
    if got != expected:
        raise AssertionError(f"counts {got} vs {expected}: {body!r}")


def test_one_input(data: bytes) -> None:
    check(data)


def write_seeds(directory: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.payloads import make_requests

    directory.mkdir(parents=True, exist_ok=True)
    bodies, _ = make_requests(3, 20, 4)
    for i, body in enumerate(bodies):
        (directory / f"bench-{i}").write_bytes(body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "seeds":
        write_seeds(Path(sys.argv[2]))
        sys.exit(0)
    if os.environ.get("MH_FUZZ_NO_ATHERIS"):
        sys.exit(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
