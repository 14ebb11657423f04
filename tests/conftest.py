"""Shared fixtures: a real embedded ClickHouse for in-process tests, and `meterhouse up` subprocesses.

chdb opens one data directory per process, so in-process tests share one engine and each test gets a
database of its own. End-to-end tests run `meterhouse up` as real subprocesses on free loopback ports.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from meterhouse.core.config import Config
from meterhouse.core.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Long soak tests run only when asked for by a marker expression (`-m soak`, `-m "soak or e2e"`)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("soak") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("soak")])
        items[:] = kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture
def store(engine_dir) -> Store:
    """A real embedded ClickHouse database with the schema, private to the test."""
    config = Config(data_dir=engine_dir, database=f"t_{uuid.uuid4().hex[:12]}")
    s = open_store(config)
    yield s
    s.client.command(f"DROP DATABASE IF EXISTS {s.database} SYNC")


class UpProcess:
    """A `meterhouse up` subprocess on free loopback ports, stopped (and reaped) by the test."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        ports_of: UpProcess | None = None,
        faults: Path | None = None,
        cgroup: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.cgroup = cgroup  # a memory cgroup's directory: the process starts inside it
        self.faults = faults  # a control file: started through tests/fault_up.py (see there)
        if ports_of is not None:  # a restart that clients must find on the same ports
            self.otlp_http_port, self.otlp_grpc_port = ports_of.otlp_http_port, ports_of.otlp_grpc_port
            self.http_port = ports_of.http_port
        else:
            self.otlp_http_port, self.otlp_grpc_port, self.http_port = free_port(), free_port(), free_port()
        # Short flushes keep tests quick: every acknowledgement waits for a commit.
        self.extra = list(extra) if "--flush-interval-s" in extra else ["--flush-interval-s", "0.1", *extra]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-{uuid.uuid4().hex[:6]}.log"

    @property
    def otlp_http(self) -> str:
        return f"http://127.0.0.1:{self.otlp_http_port}"

    @property
    def otlp_grpc(self) -> str:
        return f"127.0.0.1:{self.otlp_grpc_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def launcher(self) -> list[str]:
        """What runs `meterhouse up` after the interpreter: the package, or a wrapper that injects faults."""
        if self.faults is None:
            return ["-m", "meterhouse"]
        return [str(ROOT / "tests" / "fault_up.py"), str(self.faults)]

    def start(self, wait: bool = True, ready_path: str = "/readyz") -> UpProcess:
        cmd = [
            sys.executable, *self.launcher(), "up",
            "--data-dir", str(self.data_dir),
            "--otlp-http-port", str(self.otlp_http_port),
            "--otlp-grpc-port", str(self.otlp_grpc_port),
            "--http-port", str(self.http_port),
            "--log-format", "json",
            *([] if "--sql-port" in self.extra else ["--sql-port", "0"]), *self.extra,
        ]  # fmt: skip
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        procs = None if self.cgroup is None else self.cgroup / "cgroup.procs"

        def join_cgroup() -> None:  # in the child, before exec
            if procs is not None:
                procs.write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=join_cgroup if procs is not None else None,
        )
        if wait:
            self.wait_ready(path=ready_path)
        return self

    def wait_ready(self, timeout_s: float = 60, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"meterhouse up exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(f"{self.api}{path}", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"meterhouse up not ready in {timeout_s}s:\n{self.output()}")

    def pending_points(self) -> float:
        """Points spooled and not yet written, as the process reports them."""
        text = requests.get(f"{self.api}/metrics", timeout=10).text
        return float(re.search(r"\nmeterhouse_pending_points (\S+)", text).group(1))

    def drain(self, timeout_s: float = 30) -> None:
        """Wait until everything acknowledged so far is committed (answers come once spooled)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = requests.get(f"{self.api}/metrics", timeout=10).text
            if "\nmeterhouse_pending_points 0.0\n" in text:
                return
            time.sleep(0.05)
        raise AssertionError(f"spool not drained in {timeout_s}s: {self.pending_points():,.0f} points left")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        self.log.close()
        return code


@pytest.fixture
def up_factory(tmp_path):
    """Start `meterhouse up` subprocesses; every one still running is killed at teardown."""
    started: list[UpProcess] = []

    def start(
        *extra: str, data_dir: Path | None = None, wait: bool = True, ready_path: str = "/readyz", **kw
    ) -> UpProcess:
        p = UpProcess(data_dir or tmp_path / f"data{len(started)}", *extra, **kw)
        started.append(p)
        return p.start(wait=wait, ready_path=ready_path)

    yield start
    for p in started:
        if p.proc is not None:
            p.stop(signal.SIGKILL)


@pytest.fixture
def up(up_factory) -> UpProcess:
    return up_factory()


def module_up(tmp_path_factory, name: str, *extra: str) -> Iterator[UpProcess]:
    """Body of a module-scoped fixture: one `meterhouse up` for the module's tests, killed after them."""
    p = UpProcess(tmp_path_factory.mktemp(name) / "data", *extra)
    p.start()
    yield p
    p.stop(signal.SIGKILL)


def shared_engine(engine_dir: Path, database: str):
    """Open endpoints on this process's one embedded engine (chdb opens one directory per process)."""
    from meterhouse.core.store import connect

    return lambda url: connect(url, engine_dir, database)


@pytest.fixture
def stack_factory(engine_dir, tmp_path):
    """Whole `meterhouse up` stacks in this process: own data dir (spool), shared engine, own database."""
    from meterhouse.runtime import Stack

    stacks = []

    def make(**overrides):
        values = dict(data_dir=tmp_path / f"stack{len(stacks)}", database=f"s_{uuid.uuid4().hex[:12]}",
                      otlp_http_port=0, otlp_grpc_port=0, http_port=0, sql_port=0, flush_interval_s=0.05)  # fmt: skip
        values.update(overrides)
        config = Config(**values)
        s = Stack(config, shared_engine(engine_dir, config.database))
        s.start()
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.shutdown(5)
        s.collector.endpoints.endpoints[0].store.client.command(
            f"DROP DATABASE IF EXISTS {s.config.database} SYNC"
        )


def drain(stack, timeout_s: float = 30) -> None:
    """Wait until an in-process stack has committed everything it acknowledged."""
    deadline = time.monotonic() + timeout_s
    while stack.collector.spool.pending_points and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.collector.spool.pending_points == 0, "spool not drained"


@pytest.fixture
def stack(stack_factory):
    return stack_factory()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite leaves no process behind: every subprocess a test starts is stopped by it."""
    yield
    deadline = time.monotonic() + 10
    while _children(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _children(os.getpid())
    assert not left, f"processes left behind: {left}"
