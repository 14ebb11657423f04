"""adv36: claim 2 (time bound), ``arrayReduceInRanges``: N aggregations of N elements in one call.

``arrayReduceInRanges('uniqCombined', ranges, arr)`` aggregates ``arr`` over each of ``ranges``; with N
ranges each spanning the whole array it does N*N work (the aggregate's states merged per range) inside
one call, one block, where ``max_execution_time`` is not checked. N = 40,000 ran 20.3 s against a 2 s
limit (standalone harness). The aggregate's name is a string literal, so no name check would see it;
no string distance is involved.
"""

from __future__ import annotations

import threading
import time

import requests
from conftest import free_port

TIMEOUT_S = 2
N = 40_000
RUNAWAY = (f"SELECT length(arrayReduceInRanges('uniqCombined', arrayMap(i -> (1, {N}), range({N})), "
           f"range({N})))")  # fmt: skip


def ask(stack, query: str, timeout: float = 300) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=query.encode(), timeout=timeout,
                         params={"database": stack.config.database})  # fmt: skip


def test_reduce_in_ranges_is_held_to_the_time_limit(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_timeout_s=TIMEOUT_S, sql_max_concurrent=2)
    took: list[float] = []
    answers: list[str] = []

    def runaway() -> None:
        t = time.monotonic()
        r = ask(stack, RUNAWAY)
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
        f"arrayReduceInRanges runaways ran {[round(x, 1) for x in took]} s against {TIMEOUT_S} s: {answers}"
    )
    assert honest.status_code == 200, (
        f"an honest query {TIMEOUT_S + 3} s after two runaways started: {honest.status_code} {honest.text!r}"
    )
