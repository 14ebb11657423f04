"""adv34: claim 2 (bounded time), vectorscan's pattern compilation.

``multiFuzzyMatchAny(s, distance, [patterns])`` compiles its patterns (with edit distance) into one
vectorscan database inside a single block of the query: ``max_execution_time`` is checked only between
blocks, so a 3 KB query holds its engine handle (and a core) for as long as the compile takes. With
``sql_timeout_s`` 10 the answer came after 60 s (``Timeout exceeded: elapsed 59896 ms``): the time limit
is noticed only after the compile. ``reject_expensive_hyperscan_regexps`` does not look at this.
"""

from __future__ import annotations

import random
import time

import requests
from conftest import free_port


def fuzzy_query(n: int = 100, distance: int = 8, length: int = 30) -> str:
    rnd = random.Random(3)
    pats = ["'" + "".join(rnd.choice("abcdefghijklmnop") for _ in range(length)) + "'" for _ in range(n)]
    return f"SELECT multiFuzzyMatchAny(toString(number), {distance}, [{','.join(pats)}]) FROM numbers(1)"


def test_a_query_compiling_fuzzy_regexps_ends_within_the_timeout(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_timeout_s=2.0)
    query = fuzzy_query()
    assert len(query) < 4000
    started = time.monotonic()
    r = requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=query.encode(), timeout=600)
    took = time.monotonic() - started
    assert took < 10.0, (
        f"a {len(query)}-byte query ran {took:.1f} s against sql_timeout_s 2 "
        f"({r.status_code} {r.text[:200]!r})"
    )
