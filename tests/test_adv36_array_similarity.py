"""adv36: claim 2 (time bound), ``arraySimilarity``: a quadratic distance the denylist missed.

adv35's fix refused ``editDistance`` and friends, ``jaro*`` and ``arrayLevenshtein*`` by name. The engine's
``arraySimilarity(from, to, from_weights, to_weights)`` is the same weighted Levenshtein over arrays
(O(n*m) in one call, inside one block, where ``max_execution_time`` is not checked), under another
name. One call on two 60,000-element arrays ran 18.3 s against a 2 s limit (standalone harness), and
the cost grows with the square of the length.
"""

from __future__ import annotations

import threading
import time

import requests
from conftest import free_port

TIMEOUT_S = 2
N = 60_000
RUNAWAY = (f"SELECT arraySimilarity(range({N}), arrayMap(x -> x + 1, range({N})), "
           f"arrayWithConstant({N}, 1.), arrayWithConstant({N}, 1.))")  # fmt: skip


def ask(stack, query: str, timeout: float = 300) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=query.encode(), timeout=timeout,
                         params={"database": stack.config.database})  # fmt: skip


def test_array_similarity_is_held_to_the_time_limit(stack_factory):
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
        f"arraySimilarity runaways ran {[round(x, 1) for x in took]} s against {TIMEOUT_S} s: {answers}"
    )
    assert honest.status_code == 200, (
        f"an honest query {TIMEOUT_S + 3} s after two runaways started: {honest.status_code} {honest.text!r}"
    )
