"""``python -m bench.decode_cost``: what each shape of request costs while it is decoded, against what the
decode budget counts for it (``collector/decode.py``: ``decoded_cost``, then ``python_cost`` for the
Python walk; the weights there come from this table).

Each shape is built in one child process and written to a file; another child reads it, resets nothing,
and decodes it the way the receivers do (the native fast path, else the Python walk; OTLP/JSON parsed
first), and the rise of its peak RSS (``VmHWM``) is the cost, against what was counted for the path it
took. A weight is right when every shape's estimate is at least what it took.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import table

#: (shape, count): the count is what the shape repeats (buckets, values, points).
SHAPES = [
    ("exp-histogram-empty-buckets", 2_000_000),
    ("histogram-buckets", 1_000_000),
    ("summary-empty-quantiles", 500_000),
    ("array-attribute-empty-values", 1_000_000),
    ("kvlist-attribute-empty-values", 500_000),
    ("empty-exemplars", 500_000),
    ("delta-sums-10-attributes", 20_000),
    ("delta-sums-100-attributes-python-walk", 10_000),
    ("delta-sums-10-attributes-python-walk", 20_000),
    ("histograms-21-buckets-10-attributes", 20_000),
    ("delta-sums-16-long-attributes-python-walk", 400),
    ("json-empty-points", 500_000),
    ("json-sums-10-attributes", 5_000),
]


def _build(shape: str, n: int) -> bytes:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    r = ExportMetricsServiceRequest()
    metrics = r.resource_metrics.add().scope_metrics.add().metrics
    now = time.time_ns()

    def attrs(dp, i: int, count: int, length: int = 20) -> None:
        dp.attributes.add(key="org.id").value.string_value = f"org-{i % 100}"
        dp.attributes.add(key="i").value.string_value = str(i)
        for j in range(count - 2):
            dp.attributes.add(key=f"k{j}").value.string_value = f"{i}-{j}-".ljust(length, "v")

    def sums(count: int, attributes: int, python_walk: bool, length: int = 20) -> None:
        m = metrics.add(name="calls")
        m.sum.aggregation_temporality, m.sum.is_monotonic = 1, True
        for i in range(count):
            dp = m.sum.data_points.add(time_unix_nano=now, as_int=5)
            attrs(dp, i, attributes, length)
        if python_walk:  # one histogram point: the request leaves the fast path
            h = metrics.add(name="h")
            h.histogram.aggregation_temporality = 1
            h.histogram.data_points.add(time_unix_nano=now)

    if shape.startswith("json-"):
        if shape == "json-empty-points":
            head = '{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"j","gauge":{"dataPoints":['
            return (head + ",".join(["{}"] * n) + "]}}]}]}]}").encode()
        sums(n, 10, False)
        return json_format.MessageToJson(r).encode()
    if shape == "exp-histogram-empty-buckets":
        m = metrics.add(name="e")
        m.exponential_histogram.aggregation_temporality = 1
        dp = m.exponential_histogram.data_points.add(time_unix_nano=now)
        dp.positive.bucket_counts.extend([0] * n)
    elif shape == "histogram-buckets":
        m = metrics.add(name="h")
        m.histogram.aggregation_temporality = 1
        dp = m.histogram.data_points.add(time_unix_nano=now)
        dp.bucket_counts.extend([0] * (n + 1))
        dp.explicit_bounds.extend(float(i) for i in range(n))
    elif shape == "summary-empty-quantiles":
        dp = metrics.add(name="s").summary.data_points.add(time_unix_nano=now)
        for _ in range(n):
            dp.quantile_values.add()
    elif shape in ("array-attribute-empty-values", "kvlist-attribute-empty-values", "empty-exemplars"):
        m = metrics.add(name="a")
        m.sum.aggregation_temporality, m.sum.is_monotonic = 1, True
        dp = m.sum.data_points.add(time_unix_nano=now, as_int=1)
        dp.attributes.add(key="org.id").value.string_value = "o"
        if shape.startswith("array"):
            dp.attributes.add(key="a").value.array_value.values.extend([AnyValue() for _ in range(n)])
        elif shape.startswith("kvlist"):
            kv = dp.attributes.add(key="a").value.kvlist_value
            for _ in range(n):
                kv.values.add()
        else:
            for _ in range(n):
                dp.exemplars.add()
    elif shape.startswith("delta-sums-"):
        sums(n, int(shape.split("-")[2]), shape.endswith("python-walk"), 4000 if "-long-" in shape else 20)
    elif shape == "histograms-21-buckets-10-attributes":
        m = metrics.add(name="h")
        m.histogram.aggregation_temporality = 1
        for i in range(n):
            dp = m.histogram.data_points.add(time_unix_nano=now, count=21, sum=5.0)
            attrs(dp, i, 10)
            dp.bucket_counts.extend([1] * 21)
            dp.explicit_bounds.extend(float(b) for b in range(20))
    else:
        raise SystemExit(f"unknown shape {shape}")
    return r.SerializeToString()


def _peak() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _measure(path: str, protobuf: bool) -> None:
    import json

    from google.protobuf import json_format
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from meterhouse.collector.decode import Limits, decode_request, decoded_cost, python_cost
    from meterhouse.collector.receivers.http import check_json_shape

    body = Path(path).read_bytes()
    before = _peak()
    if protobuf:
        walked = []  # the Python walk's hook: the share grows to its cost there
        decode_request(None, Limits(), now_ns=time.time_ns(), digest="d", body=body,
                       before_python=lambda: walked.append(True))  # fmt: skip
        estimate = python_cost(body) if walked else decoded_cost(body)
    else:
        request = ExportMetricsServiceRequest()
        parsed = json.loads(body)
        check_json_shape(parsed, request.DESCRIPTOR)
        json_format.ParseDict(parsed, request, ignore_unknown_fields=True)
        decode_request(request, Limits(), now_ns=time.time_ns(), digest="d")
        estimate = decoded_cost(body, protobuf=False)
    print(len(body), _peak() - before, estimate)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        Path(sys.argv[3]).write_bytes(_build(sys.argv[2].split(":")[0], int(sys.argv[2].split(":")[1])))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        _measure(sys.argv[3], sys.argv[2] == "protobuf")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "body")
        for shape, n in SHAPES:
            me = [sys.executable, "-m", "bench.decode_cost"]
            subprocess.run([*me, "--build", f"{shape}:{n}", path], check=True)
            kind = "json" if shape.startswith("json-") else "protobuf"
            out = subprocess.run([*me, "--measure", kind, path], check=True, capture_output=True, text=True)
            size, took, estimate = (int(x) for x in out.stdout.split())
            rows.append({"shape": shape, "count": f"{n:,}", "body": f"{size / 1e6:.1f} MB",
                         "decoding took": f"{took / (1 << 20):.0f} MiB",
                         "counted": f"{estimate / (1 << 20):.0f} MiB",
                         "counted / took": f"{estimate / max(took, 1):.1f}"})  # fmt: skip
    print(table(rows, ["shape", "count", "body", "decoding took", "counted", "counted / took"]))


if __name__ == "__main__":
    main()
