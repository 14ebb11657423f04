"""The naive baseline: what a straightforward implementation does with the same OTLP/HTTP load.

One row-oriented insert per request (a Map column serialized by clickhouse-connect), no batching
across requests, no spool, no deduplication: ``python -m bench.naive --port P --data-dir DIR``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import clickhouse_connect
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

DDL = """CREATE TABLE IF NOT EXISTS naive_points (
    org_id String, metric String, time DateTime64(9, 'UTC'), value Float64,
    attributes Map(String, String)
) ENGINE = MergeTree ORDER BY (org_id, metric, time)"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args()
    client = clickhouse_connect.get_client(dsn=f"chdb://{args.data_dir}")
    client.command(DDL)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            req = ExportMetricsServiceRequest.FromString(body)
            rows = []
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        for dp in m.sum.data_points:
                            attrs = {kv.key: kv.value.string_value for kv in dp.attributes}
                            org = attrs.pop("org.id", "")
                            value = dp.as_int if dp.HasField("as_int") else dp.as_double
                            ts = datetime.fromtimestamp(dp.time_unix_nano / 1e9, tz=UTC)
                            rows.append((org, m.name, ts, float(value), attrs))
            client.insert(
                "naive_points", rows, column_names=["org_id", "metric", "time", "value", "attributes"]
            )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
