"""The load process: posts prepared OTLP requests over HTTP or gRPC, flat out or at a target rate.

``python -m bench.load --payloads FILE --target URL|HOST:PORT --transport http|grpc|influx [--rate PPS]
[--seconds S] [--connections C]``; prints a JSON summary on its last line. ``influx`` posts prepared
Influx line-protocol bodies to ``/write`` as they are (the VictoriaMetrics peer, ``bench/victoria.py``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import pickle
import threading
import time
from urllib.parse import urlsplit

RUN = time.time_ns()  # send numbers are unique across load processes too


def body(payloads: list[bytes], i: int) -> bytes:
    """Payload i, made unique: a re-sent identical request would (rightly) be deduplicated. Protobuf
    messages concatenate, so the suffix adds one empty resource carrying the send number."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    suffix = ExportMetricsServiceRequest()
    suffix.resource_metrics.add().resource.attributes.append(
        KeyValue(key="bench.send", value=AnyValue(string_value=f"{RUN}-{i}"))
    )
    return payloads[i % len(payloads)] + suffix.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payloads", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--transport", choices=["http", "grpc", "influx"], default="http")
    ap.add_argument("--rate", type=float, default=0, help="points/s (0 = as fast as possible)")
    ap.add_argument("--seconds", type=float, default=0, help="0 = send every payload once")
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()
    with open(args.payloads, "rb") as f:
        payloads, points_each = pickle.load(f)
    lock = threading.Lock()
    state = {"next": 0, "sent": 0, "points": 0, "errors": 0, "retries": 0}
    started = time.monotonic()
    deadline = started + args.seconds if args.seconds else None

    def take() -> int | None:
        with lock:
            i = state["next"]
            if i >= len(payloads):  # never a payload twice: its points would be repeats (counted zero)
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
            state["next"] = i + 1
            if args.rate:  # pace: request i may start at i * points / rate
                due = started + i * points_each / args.rate
            else:
                due = 0
        if due:
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return i

    influx = args.transport == "influx"
    path, content_type = ("/write", "text/plain") if influx else ("/v1/metrics", "application/x-protobuf")

    def http_worker() -> None:
        parts = urlsplit(args.target)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while (i := take()) is not None:
            data = payloads[i % len(payloads)] if influx else body(payloads, i)
            for _attempt in range(50):
                try:
                    conn.request("POST", path, body=data, headers={"Content-Type": content_type})
                    r = conn.getresponse()
                    r.read()
                except OSError:
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                    continue
                if r.status in (429, 503):
                    with lock:
                        state["retries"] += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    if r.status in (200, 204):
                        state["sent"] += 1
                        state["points"] += points_each
                    else:
                        state["errors"] += 1
                break

    def grpc_worker() -> None:
        import grpc

        channel = grpc.insecure_channel(args.target, options=[("grpc.max_send_message_length", 64 << 20)])
        export = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
        while (i := take()) is not None:
            for _attempt in range(50):
                try:
                    export(body(payloads, i), timeout=60)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        with lock:
                            state["retries"] += 1
                        time.sleep(0.05)
                        continue
                    with lock:
                        state["errors"] += 1
                    break
                with lock:
                    state["sent"] += 1
                    state["points"] += points_each
                break
        channel.close()

    worker = grpc_worker if args.transport == "grpc" else http_worker
    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state["seconds"] = time.monotonic() - started
    del state["next"]
    print(json.dumps(state))


if __name__ == "__main__":
    main()
