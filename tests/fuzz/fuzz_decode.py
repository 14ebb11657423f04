"""atheris (libFuzzer) harness for the OTLP decoder: bytes → protobuf or OTLP/JSON → decode_request.

Not part of the default suite; run it as the README says (section Tests), e.g.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python tests/fuzz/fuzz_decode.py -runs=200000 tests/fuzz/corpus

The first byte picks the format (even: protobuf, odd: JSON), the rest is the body, parsed as the OTLP/HTTP
receiver does. A parse error is the expected answer (a 400); anything else that escapes is a finding. For
every request that parses, the decoder's accounting must hold: each received point is either stored or
rejected, all columns have one value per stored point, and no stored point starts after its time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from meterhouse.collector.cumulative import CumulativeState
    from meterhouse.collector.decode import Limits, decode_request
    from meterhouse.collector.receivers.http import check_json_shape

LIMITS = Limits()
PARSE_ERRORS = (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError)


def parse(data: bytes) -> ExportMetricsServiceRequest | None:
    request = ExportMetricsServiceRequest()
    if not data:
        return request
    fmt, body = data[0], data[1:]
    try:
        if fmt % 2 == 0:
            request.ParseFromString(body)
        else:
            parsed = json.loads(body)
            check_json_shape(parsed, request.DESCRIPTOR)
            json_format.ParseDict(parsed, request, ignore_unknown_fields=True)
    except PARSE_ERRORS:
        return None
    return request


def test_one_input(data: bytes) -> None:
    request = parse(data)
    if request is None:
        return
    now = time.time_ns()
    result = decode_request(
        request, LIMITS, now_ns=now, digest="fuzz", cumulative=CumulativeState(lambda ids: {})
    )
    batch = result.batch
    assert result.received == batch.size + batch.dist_size + result.rejected_count, result
    for columns, size in ((batch.columns, batch.size), (batch.dist_columns, batch.dist_size)):
        for name, values in columns.items():
            assert len(values) == size, (name, len(values), size)
        for start, t in zip(columns.get("start_time", ()), columns.get("time", ()), strict=True):
            assert start <= t, (start, t)
    assert sum(result.repaired.values()) <= batch.size + batch.dist_size
    assert sum(s.points for s in result.by_metric.values()) == result.rejected_count


def write_seeds(directory: Path) -> None:
    """A few valid requests (both formats) to start from."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from otlp_builders import CUMULATIVE, point, sum_request

    directory.mkdir(parents=True, exist_ok=True)
    now = time.time_ns()
    requests = [
        sum_request({"api.calls": [point(3, {"org.id": "org-a", "feature": "x"}, t_ns=now)]}),
        sum_request({"c": [point(2.5, {"org.id": "o"}, t_ns=now, start_ns=now + 5)]}, temporality=CUMULATIVE),
        sum_request(
            {"g": [point(-1, {"region": "eu"}, t_ns=now)]}, resource={"org.id": "org-r"}, monotonic=False
        ),
    ]
    for i, req in enumerate(requests):
        (directory / f"seed-{i}.pb").write_bytes(b"\x00" + req.SerializeToString())
        (directory / f"seed-{i}.json").write_bytes(b"\x01" + json_format.MessageToJson(req).encode())


if __name__ == "__main__":
    corpus = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    for d in corpus:
        if not d.exists() or not any(d.iterdir()):
            write_seeds(d)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
