"""`meterhouse up` at start: a port it cannot take stops it at once, in one line naming the listener, its
address and the option that sets it; a store that does not answer yet is said once, usage is spooled
meanwhile, and `meterhouse ready` (like /readyz) waits until the store answers a query."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import time

import grpc
import pytest
import requests
from conftest import free_port
from otlp_builders import point, sum_request

from meterhouse.core.datadir import LOCK_FILE
from meterhouse.demo import fetch_usage

pytestmark = pytest.mark.e2e
PB = {"Content-Type": "application/x-protobuf"}
EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
UNREACHABLE = "store unreachable at start; the spool takes usage meanwhile, written once the store answers"
HOUR = 3600


def held_port() -> socket.socket:
    """A port another program listens on (a local OpenTelemetry Collector on 4317, say)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def exit_code(proc: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def assert_nothing_left(up) -> None:
    """No process of its session runs, the data directory holds only its lock file, and that is free."""
    with pytest.raises(ProcessLookupError):
        os.killpg(up.proc.pid, 0)
    assert sorted(p.name for p in up.data_dir.iterdir()) == [LOCK_FILE]  # no spool, no database
    fd = os.open(up.data_dir / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a process holds it
    finally:
        os.close(fd)


LISTENERS = [
    ("--otlp-grpc-port", "OTLP/gRPC", "MH_OTLP_GRPC_PORT"),
    ("--otlp-http-port", "OTLP/HTTP", "MH_OTLP_HTTP_PORT"),
    ("--http-port", "the API and /metrics (HTTP)", "MH_HTTP_PORT"),
    ("--sql-port", "the SQL endpoint (ClickHouse HTTP)", "MH_SQL_PORT"),  # 8123: a local ClickHouse's too
]


@pytest.mark.parametrize(("flag", "listener", "env"), LISTENERS, ids=[f for f, _, _ in LISTENERS])
def test_a_port_another_process_listens_on_stops_the_start_at_once_naming_it(up_factory, flag, listener, env):
    with held_port() as other:
        port = other.getsockname()[1]
        started = time.monotonic()
        up = up_factory(flag, str(port), wait=False)
        code = exit_code(up.proc, 30)
        took = time.monotonic() - started
        out = up.output()
        assert code == 1, f"exit {code} (None: still running) after {took:.1f}s:\n{out}"
        assert took < 15, took  # at once: not after opening the store (a ClickHouse server may be slow)
        assert out.splitlines() == [
            f"meterhouse: cannot listen for {listener} on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}; "
            f"another process holds that port: stop it, or set {flag} / {env} to a free port"
        ], out  # one line: no traceback, no gRPC log line, nothing logged before it
        assert_nothing_left(up)
        up.stop()


def test_an_address_that_is_not_this_host_s_stops_the_start_naming_the_host_option(up_factory):
    up = up_factory("--host", "192.0.2.1", "--allow-unauthenticated", "--allow-unauthenticated-ingest",
                    wait=False)  # fmt: skip  # TEST-NET-1: on no interface, nothing is sent there
    code = exit_code(up.proc, 30)
    out = up.output()
    assert code == 1, out
    assert out.splitlines() == [
        f"meterhouse: cannot listen for the API and /metrics (HTTP) on 192.0.2.1:{up.http_port}: "
        f"{os.strerror(errno.EADDRNOTAVAIL)}; the address is not one of this host's (or does not resolve): "
        "set --host / MH_HOST"
    ], out
    assert_nothing_left(up)
    up.stop()


def faults(tmp_path, *down: str):
    path = tmp_path / "faults.json"
    time.sleep(0.01)  # a new mtime: the harness reads the file again
    path.write_text(json.dumps({"down": list(down)}))
    return path


def records(up) -> list[dict]:
    out = []
    for line in up.output().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def logged(up, msg: str) -> list[dict]:
    return [r for r in records(up) if r.get("msg") == msg]


def wait_for(cond, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cond()


def readyz(up) -> int:
    return requests.get(f"{up.api}/readyz", timeout=10).status_code


def send_http(up, org: str, value: int) -> None:
    body = sum_request({"api.calls": [point(value, {"org.id": org})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body, headers=PB, timeout=30)
    assert r.status_code == 200, r.text  # acknowledged: in the spool, fsync'd


def send_grpc(up, org: str, value: int) -> None:
    body = sum_request({"api.calls": [point(value, {"org.id": org})]}).SerializeToString()
    with grpc.insecure_channel(up.otlp_grpc) as channel:
        channel.unary_unary(EXPORT)(body, timeout=30)  # raises unless OK


def pending_points(up) -> float:
    for line in requests.get(f"{up.api}/metrics", timeout=10).text.splitlines():
        if line.startswith("meterhouse_pending_points "):
            return float(line.split()[1])
    raise AssertionError("meterhouse_pending_points not exposed")


def test_a_store_down_at_start_is_said_once_usage_is_spooled_and_ready_waits_for_it(up_factory, tmp_path):
    ff = faults(tmp_path, "embedded")
    up = up_factory("--health-check-interval-s", "0.1", "--retry-max-backoff-s", "0.2", faults=ff,
                    ready_path="/healthz")  # fmt: skip
    [line] = logged(up, UNREACHABLE)
    assert line["level"] == "warning" and line["store"] == "embedded", line
    assert readyz(up) == 503
    expected = {"org-a": 0, "org-b": 0}
    for i in range(6):
        org, value = ("org-a", 10**12 + i) if i % 2 else ("org-b", 7 * i + 1)
        (send_grpc if i % 3 == 0 else send_http)(up, org, value)
        expected[org] += value
    assert pending_points(up) == 6  # held by the spool, not written
    time.sleep(1)  # ten health checks: the store still does not answer
    assert readyz(up) == 503
    assert logged(up, "meterhouse ready") == [], up.output()

    faults(tmp_path)  # the store answers again
    wait_for(lambda: readyz(up) == 200)
    wait_for(lambda: logged(up, "meterhouse ready") != [], 5)  # the main loop looks twice a second
    [ready] = logged(up, "meterhouse ready")
    assert ready["store"] == "embedded"
    lines = [r.get("msg") for r in records(up)]
    assert lines.index(UNREACHABLE) < lines.index("meterhouse ready")
    assert len(logged(up, UNREACHABLE)) == 1  # said once, not per health check
    up.drain()
    now = int(time.time())
    start, end = now // HOUR * HOUR - HOUR, (now // HOUR + 2) * HOUR
    totals = {org: fetch_usage(up.api, org, "api.calls", start, end, "1h")["total"] for org in expected}
    assert totals == expected
    assert up.stop() == 0


def test_an_unreachable_clickhouse_server_is_named_without_its_credentials(up_factory):
    port = free_port()  # nothing listens there: connections are refused
    up = up_factory("--clickhouse-url", f"http://meter:s3cret-pw@127.0.0.1:{port}", "--shutdown-timeout-s",
                    "1", ready_path="/healthz")  # fmt: skip
    [line] = logged(up, UNREACHABLE)
    assert line["store"] == f"http://127.0.0.1:{port}", line
    assert "Connection refused" in line["error"], line
    send_http(up, "org-a", 5)  # acknowledged: spooled
    assert pending_points(up) == 1
    assert readyz(up) == 503
    assert logged(up, "meterhouse ready") == []
    assert up.stop() == 0
    assert "s3cret-pw" not in up.output()


def environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("operator", [None, "pymalloc"])
def test_up_runs_python_objects_on_the_c_malloc_unless_the_operator_chose(up_factory, operator, monkeypatch):
    """Python's own allocator keeps freed objects' memory in arenas it cannot give back; `up` re-executes
    itself once with PYTHONMALLOC=malloc and glibc's arenas limited to two (same process, same command
    line), keeping an operator's value."""
    env = {} if operator is None else {"PYTHONMALLOC": operator, "MALLOC_ARENA_MAX": "4"}
    for name in ("PYTHONMALLOC", "MALLOC_ARENA_MAX", "JE_MALLOC_CONF", "MH_ALLOCATOR_SET"):
        monkeypatch.delenv(name, raising=False)
    up = up_factory(env=env)
    seen = environ(up.proc.pid)
    assert seen.get("PYTHONMALLOC") == (operator or "malloc")
    assert seen.get("MALLOC_ARENA_MAX") == ("4" if operator else "2")
    r = requests.post(
        f"{up.otlp_http}/v1/metrics",
        data=sum_request({"m": [point(1, {"org.id": "org-a"})]}).SerializeToString(),
        headers=PB,
        timeout=30,
    )
    assert r.status_code == 200
    assert up.stop() == 0
