"""A re-batching OTLP forwarder: what an OpenTelemetry Collector with a persistent queue does between the
SDKs and meterhouse, made adversarial. A test tool (tests/test_rebatch.py), run as a subprocess:

    python tests/rebatch_proxy.py --listen-port P --target-http URL --target-grpc HOST:PORT \\
        --queue FILE --seed N [--passthrough] [--resend-done FRACTION] [--lose-answers P]

SDKs post OTLP/HTTP (protobuf or JSON, gzip or not) to 127.0.0.1:P/v1/metrics; each request is answered
200 once it is appended to the queue file and fsync'd. A forwarding thread sends the queued points on to
meterhouse re-grouped into other requests: random sizes, points of several incoming requests merged,
each forward protobuf or OTLP JSON over HTTP (gzip or not) or protobuf over gRPC. Points are marked done
(a fsync'd record) only once meterhouse answered 200. Forwards fail: some answers are "lost" on purpose
(the points were stored, the proxy sends them again in other groupings), and while meterhouse is down
the forwards get errors and are retried with backoff, re-grouped. After a restart every point not done
is sent again, and a random sample of done points too (a Collector whose queue acknowledgement was lost).

--passthrough turns the re-batching off: each incoming request is forwarded byte for byte as it came
(re-sends included), so request-level deduplication is enough to count every point once.

The queue file is a sequence of records ``kind (1 byte), length, crc32, payload``: ``R`` a request as
received (content type ``p``/``j`` + the uncompressed body), ``D`` the ids of points meterhouse took
(little-endian uint64s). A point's id is its position among the points of the file's requests. A torn
last record (a kill mid-append) was never answered, and is cut off at start.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import struct
import sys
import threading
import time
import traceback
import zlib
from array import array
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import requests
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ResourceMetrics, ScopeMetrics

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
HEADER = struct.Struct("<cII")  # kind, payload length, crc32 of the payload
RETRYABLE_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}  # fmt: skip


def parse(ctype: bytes, body: bytes) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    if ctype == b"j":
        json_format.ParseDict(json.loads(body), req, ignore_unknown_fields=True)
    else:
        req.ParseFromString(body)
    return req


def points_of(req: ExportMetricsServiceRequest) -> list[tuple]:
    """One unit per data point: (resource, scope, metric without its points, point field, point)."""
    units = []
    for rm in req.resource_metrics:
        res = ResourceMetrics(resource=rm.resource, schema_url=rm.schema_url).SerializeToString()
        for sm in rm.scope_metrics:
            scope = ScopeMetrics(scope=sm.scope, schema_url=sm.schema_url).SerializeToString()
            for m in sm.metrics:
                field = m.WhichOneof("data")
                if field is None:
                    continue
                shell = Metric()
                shell.CopyFrom(m)
                getattr(shell, field).ClearField("data_points")
                for p in getattr(m, field).data_points:
                    if "exemplars" in p.DESCRIPTOR.fields_by_name:
                        p.ClearField("exemplars")  # not usage; and their ids are hex in OTLP JSON
                    units.append((res, scope, shell.SerializeToString(), field, p))
    return units


def build(units: list[tuple]) -> ExportMetricsServiceRequest:
    """One request holding the units, regrouped under their resources, scopes and metrics."""
    req = ExportMetricsServiceRequest()
    groups: dict[tuple, object] = {}
    for res, scope, shell, field, p in units:
        if (res,) not in groups:
            groups[(res,)] = req.resource_metrics.add()
            groups[(res,)].MergeFromString(res)
        if (res, scope) not in groups:
            groups[(res, scope)] = groups[(res,)].scope_metrics.add()
            groups[(res, scope)].MergeFromString(scope)
        if (res, scope, shell) not in groups:
            groups[(res, scope, shell)] = groups[(res, scope)].metrics.add()
            groups[(res, scope, shell)].MergeFromString(shell)
        getattr(groups[(res, scope, shell)], field).data_points.add().CopyFrom(p)
    return req


class Queue:
    def __init__(self, path: Path) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[bytes, bytes, range]] = []  # (content type, body, point ids)
        self.units: list[tuple] = []
        self.done: set[int] = set()
        self.pending: set[int] = set()
        data = path.read_bytes() if path.exists() else b""
        at = 0
        while at + HEADER.size <= len(data):
            kind, n, crc = HEADER.unpack_from(data, at)
            payload = data[at + HEADER.size : at + HEADER.size + n]
            if len(payload) < n or zlib.crc32(payload) != crc:
                break
            self._apply(kind, payload)
            at += HEADER.size + n
        self.file = open(path, "ab")  # noqa: SIM115 - open for the process's life
        self.file.truncate(at)  # a torn tail: its request was never answered

    def _apply(self, kind: bytes, payload: bytes, units: list[tuple] | None = None) -> None:
        if kind == b"R":
            units = points_of(parse(payload[:1], payload[1:])) if units is None else units
            ids = range(len(self.units), len(self.units) + len(units))
            self.requests.append((payload[:1], payload[1:], ids))
            self.units += units
            self.pending.update(ids)
        else:
            ids = array("Q", payload)
            self.done.update(ids)
            self.pending.difference_update(ids)

    def append(self, kind: bytes, payload: bytes, units: list[tuple] | None = None) -> None:
        with self.lock:
            self.file.write(HEADER.pack(kind, len(payload), zlib.crc32(payload)) + payload)
            self.file.flush()
            os.fsync(self.file.fileno())
            self._apply(kind, payload, units)


def reject(message: str) -> str:
    print(f"rejected: {message[:300]}", file=sys.stderr, flush=True)  # a bug here, or meterhouse's
    return "rejected"


class Forwarder:
    def __init__(self, queue: Queue, args: argparse.Namespace) -> None:
        self.q, self.args, self.rng = queue, args, random.Random(args.seed)
        self.http = requests.Session()
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]  # fmt: skip
        self.grpc = grpc.insecure_channel(args.target_grpc, options=options).unary_unary(
            EXPORT, response_deserializer=ExportMetricsServiceResponse.FromString
        )  # bytes in: a request passed through is sent byte for byte
        self.stats = dict.fromkeys(("forwards", "points_forwarded", "lost_answers", "errors", "rejected"), 0)
        with queue.lock:  # a restart: all not done is pending again, and a sample of what was done
            again = self.rng.sample(sorted(queue.done), int(len(queue.done) * args.resend_done))
            queue.pending.update(again)
        self.stats["resent_done"] = len(again)

    def next_batch(self) -> tuple[list[int], bytes, bytes]:
        """Point ids and what to send them as: (ids, content type, body), ids empty when none pend."""
        with self.q.lock:
            oldest = sorted(self.q.pending)[: 4 * self.args.max_batch]
            if not oldest:
                return [], b"", b""
            if self.args.passthrough:  # the oldest pending request, as it came
                ctype, body, ids = next(r for r in self.q.requests if oldest[0] in r[2])
                return list(ids), ctype, body
            k = self.rng.randint(1, min(self.args.max_batch, len(oldest)))
            ids = sorted(self.rng.sample(oldest, k))  # from several requests, not in their order
            units = [self.q.units[i] for i in ids]
        req = build(units)
        if self.rng.random() < 0.4:  # OTLP JSON: int64 as strings, enums as numbers
            return ids, b"j", json.dumps(json_format.MessageToDict(req, use_integers_for_enums=True)).encode()
        return ids, b"p", req.SerializeToString()

    def send(self, ctype: bytes, body: bytes) -> str:
        """``ok``, ``retry`` or ``rejected`` (a permanent error: dropped, as a Collector does)."""
        if ctype == b"p" and self.rng.random() < 0.35:
            try:
                resp = self.grpc(body, timeout=10)
            except grpc.RpcError as e:
                return "retry" if e.code() in RETRYABLE_GRPC else reject(f"grpc {e.code()}: {e.details()}")
            return self.partial(resp.partial_success.rejected_data_points, resp.partial_success.error_message)
        headers = {"Content-Type": "application/json" if ctype == b"j" else "application/x-protobuf"}
        if self.rng.random() < 0.5:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        try:
            r = self.http.post(self.args.target_http, data=body, headers=headers, timeout=10)
        except requests.RequestException:
            return "retry"
        if r.status_code in (408, 429, 502, 503, 504):
            return "retry"
        if r.status_code != 200:
            return reject(f"{r.status_code}: {r.text}")
        if ctype == b"j":
            partial = r.json().get("partialSuccess", {})
            return self.partial(int(partial.get("rejectedDataPoints", 0)), partial.get("errorMessage", ""))
        partial = ExportMetricsServiceResponse.FromString(r.content).partial_success
        return self.partial(partial.rejected_data_points, partial.error_message)

    def partial(self, rejected: int, message: str) -> str:
        if rejected:  # some points of the request refused, the rest stored: the request is done
            self.stats["rejected"] += rejected
            reject(f"{rejected} points: {message}")
        return "ok"

    def run(self) -> None:
        backoff = 0.05
        while True:
            ids, ctype, body = self.next_batch()
            if not ids:
                time.sleep(0.02)
                continue
            outcome = self.send(ctype, body)
            self.stats["forwards"] += 1
            if outcome == "retry":
                self.stats["errors"] += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if outcome == "rejected":
                self.stats["rejected"] += len(ids)
            elif self.rng.random() < self.args.lose_answers:
                self.stats["lost_answers"] += 1  # stored, but not known to be: sent again, regrouped
                continue
            self.stats["points_forwarded"] += len(ids)
            self.q.append(b"D", array("Q", ids).tobytes())


def forward_or_die(forwarder: Forwarder) -> None:
    try:
        forwarder.run()
    except BaseException:
        traceback.print_exc()
        os._exit(70)  # never a proxy that takes requests and forwards none


def handler(queue: Queue, forwarder: Forwarder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))
            chunks = []  # Node's HTTP client sends chunked bodies
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)

        def answer(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.read_body()
            json_ = "json" in self.headers.get("Content-Type", "")
            ctype = b"j" if json_ else b"p"
            try:
                if self.headers.get("Content-Encoding", "") == "gzip":
                    body = gzip.decompress(body)
                units = points_of(parse(ctype, body))
            except Exception as e:  # noqa: BLE001 - any undecodable request is the sender's error
                return self.answer(400, str(e).encode(), "text/plain")
            queue.append(b"R", ctype + body, units)
            if json_:
                return self.answer(200, b"{}", "application/json")
            self.answer(200, ExportMetricsServiceResponse().SerializeToString(), "application/x-protobuf")

        def do_GET(self) -> None:
            with queue.lock:
                status = {"points": len(queue.units), "pending": len(queue.pending), "done": len(queue.done)}
            self.answer(200, json.dumps({**status, **forwarder.stats}).encode(), "application/json")

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--target-http", required=True, help="meterhouse's OTLP/HTTP URL, .../v1/metrics")
    p.add_argument("--target-grpc", required=True, help="meterhouse's OTLP gRPC HOST:PORT")
    p.add_argument("--queue", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passthrough", action="store_true", help="forward each request byte for byte")
    p.add_argument("--resend-done", type=float, default=0.1, help="fraction of done points sent again")
    p.add_argument("--lose-answers", type=float, default=0.1, help="chance a 200 is taken as lost")
    p.add_argument("--max-batch", type=int, default=60, help="most points in one forward")
    args = p.parse_args()
    queue = Queue(args.queue)
    forwarder = Forwarder(queue, args)
    server = ThreadingHTTPServer(("127.0.0.1", args.listen_port), handler(queue, forwarder))
    server.daemon_threads = True
    threading.Thread(target=forward_or_die, args=(forwarder,), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
