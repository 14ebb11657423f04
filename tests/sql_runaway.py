"""The SQL endpoint as the adversaries drive it (``ask``, ``query_processes``), and queries that run past its time limit
inside one block (the engine checks the limit only between blocks), driven as the adversaries found
them: two at once against a stack with ``sql_max_concurrent`` 2, an honest query sent once both are past
their limit, and ingest beside them. Shared by tests/test_adv34_*.py to tests/test_adv36_*.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import requests
from conftest import drain, free_port
from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import post

TIMEOUT_S = 2


def ask(stack, query: str, timeout: float = 300) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=query.encode(), timeout=timeout,
                         params={"database": stack.config.database})  # fmt: skip


def query_processes() -> set[int]:
    """The SQL endpoint's live query processes this test process started (exporter/sql_worker.py)."""
    out = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != os.getpid() or state == "Z":
                continue
            if b"meterhouse.exporter.sql_worker" in (proc / "cmdline").read_bytes():
                out.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def runaway_stack(stack_factory):
    return stack_factory(sql_port=free_port(), sql_timeout_s=TIMEOUT_S, sql_max_concurrent=2)


def assert_held_to_the_time_limit(stack_factory, query: str, what: str) -> None:
    """Two ``query`` at once end within the time limit (and some slack), and an honest query sent when
    both would be past it is answered 200, not 503 for want of a free connection."""
    stack = runaway_stack(stack_factory)
    took: list[float] = []
    answers: list[str] = []

    def runaway() -> None:
        t = time.monotonic()
        r = ask(stack, query)
        took.append(time.monotonic() - t)
        answers.append(f"{r.status_code} {r.text[:120]!r}")

    threads = [threading.Thread(target=runaway) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(TIMEOUT_S + 3)  # both past their limit by now, were it kept
    honest = ask(stack, "SELECT 1")
    for t in threads:
        t.join()
    assert max(took) < TIMEOUT_S + 3, (
        f"{what} runaways ran {[round(x, 1) for x in took]} s against {TIMEOUT_S} s: {answers}"
    )
    assert honest.status_code == 200, (
        f"an honest query {TIMEOUT_S + 3} s after two runaways started: {honest.status_code} {honest.text!r}"
    )


def assert_ingest_goes_on_beside(stack_factory, query: str, metric: str) -> None:
    """A point posted while two ``query`` hold both connections is acknowledged and committed promptly."""
    stack = runaway_stack(stack_factory)
    threads = [threading.Thread(target=ask, args=(stack, query)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1)
    t0 = time.monotonic()
    now = time.time_ns()
    post(stack, sum_request({metric: [point(7, {"org.id": "org-1"}, t_ns=now - 10**9,
                                            start_ns=now - 2 * 10**9)]}))  # fmt: skip
    drain(stack, timeout_s=60)
    took = time.monotonic() - t0
    for t in threads:
        t.join()
    assert took < 5, f"a point took {took:.1f} s to be committed while two SQL runaways ran"
