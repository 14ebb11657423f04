"""adv35: claim 2 (time bound), a function whose one call runs for seconds inside a block.

``editDistance`` is quadratic in its strings' length (at most 65,536 each): one call on two 60,000-byte
strings takes about 3 s, and the engine checks ``max_execution_time`` between blocks only, so a block of
ten rows runs some 30 s against a 2 s limit (more rows: hours). Two such queries hold both of the
endpoint's handles, and every other query is answered 503 meanwhile.
"""

from __future__ import annotations

import pytest
from sql_runaway import assert_held_to_the_time_limit, assert_ingest_goes_on_beside

RUNAWAY = ("SELECT sum(editDistance(repeat(toString(number % 10), 60000), repeat('b', 60000))) "
           "FROM numbers(10)")  # fmt: skip


@pytest.mark.soak  # refused by name; the end of a runaway at its limit: tests/exporter/test_sql_worker.py
def test_quadratic_function_is_held_to_the_time_limit(stack_factory):
    assert_held_to_the_time_limit(stack_factory, RUNAWAY, "editDistance")


def test_ingest_commits_while_two_runaways_hold_the_handles(stack_factory):
    """Claim 3 beside the same runaways: a point posted meanwhile is acknowledged and committed promptly."""
    assert_ingest_goes_on_beside(stack_factory, RUNAWAY, "adv35.calls")
