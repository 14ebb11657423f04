"""adv36: claim 2 (time bound), ``arraySimilarity``: a quadratic distance the denylist missed.

adv35's fix refused ``editDistance`` and friends, ``jaro*`` and ``arrayLevenshtein*`` by name. The engine's
``arraySimilarity(from, to, from_weights, to_weights)`` is the same weighted Levenshtein over arrays
(O(n*m) in one call, inside one block, where ``max_execution_time`` is not checked), under another
name. One call on two 60,000-element arrays ran 18.3 s against a 2 s limit (standalone harness), and
the cost grows with the square of the length.
"""

from __future__ import annotations

import pytest
from sql_runaway import assert_held_to_the_time_limit

N = 60_000
RUNAWAY = (f"SELECT arraySimilarity(range({N}), arrayMap(x -> x + 1, range({N})), "
           f"arrayWithConstant({N}, 1.), arrayWithConstant({N}, 1.))")  # fmt: skip


@pytest.mark.soak  # refused by name; the end of a runaway at its limit: tests/exporter/test_sql_worker.py
def test_array_similarity_is_held_to_the_time_limit(stack_factory):
    assert_held_to_the_time_limit(stack_factory, RUNAWAY, "arraySimilarity")
