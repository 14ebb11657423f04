"""adv36: claim 2 (time bound), ``arrayReduceInRanges``: N aggregations of N elements in one call.

``arrayReduceInRanges('uniqCombined', ranges, arr)`` aggregates ``arr`` over each of ``ranges``; with N
ranges each spanning the whole array it does N*N work (the aggregate's states merged per range) inside
one call, one block, where ``max_execution_time`` is not checked. N = 40,000 ran 20.3 s against a 2 s
limit (standalone harness). The aggregate's name is a string literal, so no name check would see it;
no string distance is involved.
"""

from __future__ import annotations

import pytest
from sql_runaway import assert_held_to_the_time_limit

N = 40_000
RUNAWAY = (f"SELECT length(arrayReduceInRanges('uniqCombined', arrayMap(i -> (1, {N}), range({N})), "
           f"range({N})))")  # fmt: skip


@pytest.mark.soak  # refused by name; the end of a runaway at its limit: tests/exporter/test_sql_worker.py
def test_reduce_in_ranges_is_held_to_the_time_limit(stack_factory):
    assert_held_to_the_time_limit(stack_factory, RUNAWAY, "arrayReduceInRanges")
