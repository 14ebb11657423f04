"""Which HTTP server library carries the OTLP/HTTP and API ports: the same tiny OTLP handler on each.

Each candidate runs in its own process (one interpreter, in-process server, no prefork, as
`meterhouse up` must) with a handler that reads the whole body, parses a protobuf
``ExportMetricsServiceRequest`` and answers an empty ``ExportMetricsServiceResponse``. The client (another
process, raw asyncio sockets) sends 50-point requests on keep-alive connections, then the server is
given 2,000 connections that sent half a request line each, and its threads and RSS are read from
/proc while a normal client asks once more.

    python -m bench.http_servers [--seconds 5] [--connections 8] [--idle 2000] [server ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

from bench.payloads import make_requests

SERVERS = (
    "stdlib",
    "meterhouse",
    "waitress",
    "cheroot",
    "aiohttp",
    "uvicorn-httptools",
    "uvicorn-h11",
    "hypercorn",
)
RESPONSE = b""  # an empty ExportMetricsServiceResponse serializes to no bytes


def _parse(body: bytes) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    ExportMetricsServiceRequest().ParseFromString(body)


def wsgi_app(environ, start_response):
    _parse(environ["wsgi.input"].read())
    start_response("200 OK", [("Content-Type", "application/x-protobuf"), ("Content-Length", "0")])
    return [RESPONSE]


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    _parse(b"".join(chunks))
    headers = [(b"content-type", b"application/x-protobuf"), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": RESPONSE})


def serve(name: str, port: int) -> None:
    """Run candidate ``name`` on 127.0.0.1:``port`` until killed."""
    if name == "stdlib":
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                _parse(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        ThreadingHTTPServer.daemon_threads = True
        ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    elif name == "meterhouse":  # uvicorn under core.httpserver's guarded protocol, as `meterhouse up` runs it
        from meterhouse.core.httpserver import HttpLimits, HttpServer

        HttpServer(asgi_app, "127.0.0.1", port, HttpLimits(), "bench").start()
        threading.Event().wait()
    elif name == "waitress":
        import waitress

        waitress.serve(
            wsgi_app, host="127.0.0.1", port=port, threads=4, connection_limit=5000,
            asyncore_use_poll=True, channel_timeout=120, _quiet=True,
        )  # fmt: skip
    elif name == "cheroot":
        from cheroot import wsgi

        wsgi.Server(("127.0.0.1", port), wsgi_app, numthreads=4, timeout=60).safe_start()
    elif name == "aiohttp":
        from aiohttp import web

        async def handle(request):
            _parse(await request.read())
            return web.Response(body=RESPONSE, content_type="application/x-protobuf")

        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/v1/metrics", handle)
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    elif name.startswith("uvicorn"):
        import uvicorn

        http = name.split("-")[1]
        uvicorn.run(asgi_app, host="127.0.0.1", port=port, http=http, loop="asyncio", log_level="error",
                    access_log=False, lifespan="off")  # fmt: skip
    elif name == "hypercorn":
        from hypercorn.asyncio import serve as hserve
        from hypercorn.config import Config

        cfg = Config()
        cfg.bind = [f"127.0.0.1:{port}"]
        cfg.accesslog = None
        cfg.errorlog = None
        asyncio.run(hserve(asgi_app, cfg))
    else:
        raise SystemExit(f"unknown server {name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(body: bytes) -> bytes:
    head = (
        "POST /v1/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    if length:
        await reader.readexactly(length)
    return status


async def _load(port: int, payloads: list[bytes], seconds: float, connections: int) -> tuple[int, int]:
    deadline = time.monotonic() + seconds
    done = errors = 0

    async def one(i: int) -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        while time.monotonic() < deadline:
            writer.write(payloads[k % len(payloads)])
            k += 1
            if await _read_response(reader) == 200:
                done += 1
            else:
                errors += 1
        writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return done, errors


def _proc(pid: int) -> tuple[int, float]:
    threads, rss = 0, 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return threads, rss


async def _idle(port: int, pid: int, n: int, payload: bytes) -> tuple[int, float, float, str]:
    socks = []
    for _ in range(n):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            break
        writer.write(b"POST /v1/metrics HTTP/1.1\r\nHo")
        socks.append(writer)
    await asyncio.sleep(2.0)
    threads, rss = _proc(pid)
    t = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        writer.write(payload)
        status = str(await asyncio.wait_for(_read_response(reader), 30))
        writer.close()
    except (TimeoutError, OSError) as e:
        status = type(e).__name__
    latency = time.monotonic() - t
    for w in socks:
        w.close()
    return threads, rss, latency, status


def measure(name: str, payloads: list[bytes], seconds: float, connections: int, idle: int) -> dict:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.http_servers", "--serve", name, "--port", str(port)]
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        asyncio.run(_load(port, payloads, 1.0, connections))  # warm up
        _, rss0 = _proc(proc.pid)
        done, errors = asyncio.run(_load(port, payloads, seconds, connections))
        threads, rss, latency, status = asyncio.run(_idle(port, proc.pid, idle, payloads[0]))
        return {
            "server": name, "req_s": round(done / seconds), "errors": errors, "rss_mb_before": round(rss0),
            "idle_threads": threads, "idle_rss_mb": round(rss), "normal_client_s": round(latency, 3),
            "normal_client_status": status,
        }  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("servers", nargs="*", default=list(SERVERS))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--serve")
    p.add_argument("--port", type=int)
    a = p.parse_args()
    if a.serve:
        return serve(a.serve, a.port)
    raw, _ = make_requests(orgs=20, points_per_request=a.points, count=16)
    payloads = [_request(b) for b in raw]
    print(f"{a.points}-point protobuf requests ({len(raw[0])} bytes), {a.connections} keep-alive connections, "
          f"{a.seconds:g} s each; then {a.idle} connections holding half a request line", flush=True)  # fmt: skip
    cols = ("server", "req_s", "errors", "rss_mb_before", "idle_threads", "idle_rss_mb", "normal_client_s",
            "normal_client_status")  # fmt: skip
    print(" | ".join(cols), flush=True)
    for name in a.servers:
        r = measure(name, payloads, a.seconds, a.connections, a.idle)
        print(" | ".join(str(r[c]) for c in cols), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
