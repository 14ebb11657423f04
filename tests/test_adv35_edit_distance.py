"""adv35: claim 2 (time bound), a function whose one call runs for seconds inside a block.

``editDistance`` is quadratic in its strings' length (at most 65,536 each): one call on two 60,000-byte
strings takes about 3 s, and the engine checks ``max_execution_time`` between blocks only, so a block of
ten rows runs some 30 s against a 2 s limit (more rows: hours). Two such queries hold both of the
endpoint's handles, and every other query is answered 503 meanwhile.
"""

from __future__ import annotations

import threading
import time

import requests
from conftest import free_port

TIMEOUT_S = 2
RUNAWAY = ("SELECT sum(editDistance(repeat(toString(number % 10), 60000), repeat('b', 60000))) "
           "FROM numbers(10)")  # fmt: skip


def ask(stack, query: str, timeout: float = 180) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=query.encode(), timeout=timeout,
                         params={"database": stack.config.database})  # fmt: skip


def test_quadratic_function_is_held_to_the_time_limit(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_timeout_s=TIMEOUT_S, sql_max_concurrent=2)
    took: list[float] = []

    def runaway() -> None:
        t = time.monotonic()
        ask(stack, RUNAWAY)
        took.append(time.monotonic() - t)

    threads = [threading.Thread(target=runaway) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(TIMEOUT_S + 3)  # both past their limit by now, were it kept
    honest = ask(stack, "SELECT 1")
    for t in threads:
        t.join()
    assert honest.status_code == 200, (
        f"an honest query {TIMEOUT_S + 3} s after two runaways started: {honest.status_code} {honest.text!r}"
    )
    assert max(took) < TIMEOUT_S + 3, (
        f"runaway queries ran {[round(x, 1) for x in took]} s against {TIMEOUT_S} s"
    )


def test_ingest_commits_while_two_runaways_hold_the_handles(stack_factory):
    """Claim 3 beside the same runaways: a point posted meanwhile is acknowledged and committed promptly."""
    from conftest import drain
    from otlp_builders import point, sum_request
    from test_adv28_dedup_eviction import post

    stack = stack_factory(sql_port=free_port(), sql_timeout_s=TIMEOUT_S, sql_max_concurrent=2)
    threads = [threading.Thread(target=ask, args=(stack, RUNAWAY)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1)
    t0 = time.monotonic()
    now = time.time_ns()
    post(stack, sum_request({"adv35.calls": [point(7, {"org.id": "org-1"}, t_ns=now - 10**9,
                                                       start_ns=now - 2 * 10**9)]}))  # fmt: skip
    drain(stack, timeout_s=60)
    took = time.monotonic() - t0
    for t in threads:
        t.join()
    assert took < 5, f"a point took {took:.1f} s to be committed while two SQL runaways ran"
