"""An honest OTLP/gRPC sender's latency while others hold slow calls and idle connections.

Against a running ``meterhouse up`` (its OTLP/gRPC port, and its pid for threads and RSS), each
scenario starts a slow sender from 127.0.0.2 (``bench/slow_grpc.py``: calls announcing 100,000 bytes,
then a byte a second or nothing) or opens idle connections, waits 3 s, then times one honest unary
call (a one-point request from 127.0.0.1, 10 s deadline) every 1.5 s.

    python -m bench.grpc_slow_senders --port 4317 [--pid PID] [--calls 6]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from bench.procstat import memory
from bench.slow_grpc import METHOD, SlowSender, loopback_socket


def honest_body() -> bytes:
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add()
    metric.name = "bench.honest"
    metric.sum.aggregation_temporality = 1  # delta
    metric.sum.is_monotonic = True
    p = metric.sum.data_points.add()
    p.as_int, p.time_unix_nano = 1, time.time_ns()
    p.start_time_unix_nano = p.time_unix_nano - 10**9
    attribute = p.attributes.add()
    attribute.key, attribute.value.string_value = "org.id", "org-bench"
    return request.SerializeToString()


class IdleConnections(AbstractContextManager["IdleConnections"]):
    """``n`` connections from 127.0.0.2 that never send a byte."""

    def __init__(self, port: int, n: int) -> None:
        self.socks: list[socket.socket] = [loopback_socket(port) for _ in range(n)]

    def __exit__(self, *exc: object) -> None:
        for s in self.socks:
            s.close()


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def run(port: int, pid: int | None, calls: int) -> None:
    scenarios: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "none": ExitStack,
        "40 calls trickling (2 connections x 20)": lambda: SlowSender(port, 2, 20, trickle_s=1.0),
        "200 calls trickling (4 x 50)": lambda: SlowSender(port, 4, 50, trickle_s=1.0),
        "400 calls silent (4 x 100)": lambda: SlowSender(port, 4, 100, trickle_s=None),
        "2,000 idle connections": lambda: IdleConnections(port, 2000),
    }
    body = honest_body()
    print("| others | honest calls | median s | max s | server threads | server RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, make in scenarios.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, make():
            export = channel.unary_unary(METHOD)
            time.sleep(3)
            times, answers = [], []
            for _ in range(calls):
                t0 = time.monotonic()
                try:
                    export(body, timeout=10)
                    answers.append("OK")
                except grpc.RpcError as e:
                    answers.append(e.code().name)
                times.append(time.monotonic() - t0)
                time.sleep(1.5)
            stats = (threads(pid), memory(pid)["rss"] // 2**20) if pid else ("?", "?")
        summary = ", ".join(f"{answers.count(a)} {a}" for a in sorted(set(answers)))
        print(f"| {name} | {summary} | {statistics.median(times):.3f} | {max(times):.3f} | "
              f"{stats[0]} | {stats[1]} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--pid", type=int, default=None, help="meterhouse up's pid (threads and RSS)")
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    run(args.port, args.pid, args.calls)


if __name__ == "__main__":
    main()
