"""adv36: claim 2 (time bound), one plain ``match()``: a re2 pattern that defeats re2's DFA.

``allow_hyperscan = 0`` (adversary 34) sends every regexp to re2. re2 is linear in the text, but times
the pattern's size: ``(?:a?){900}a{900}b`` has some 2,700 states, overflows re2's DFA memory budget and
falls back to the NFA, which walks every state at each byte. One call over one 1 MB string is one
block, where ``max_execution_time`` is not checked: 16.9 s against a 2 s limit when the endpoint's
queries ran in the collector's process. Each now runs in a process of its own, killed at the limit
(exporter/sql_worker.py).
"""

from __future__ import annotations

import pytest
from sql_runaway import assert_held_to_the_time_limit, assert_ingest_goes_on_beside

RUNAWAY = "SELECT match(materialize(repeat('a', 1000000)), '(?:a?){900}a{900}b')"


@pytest.mark.soak  # the default suite ends a runaway at its limit (tests/exporter/test_sql_worker.py)
def test_regexp_nfa_is_held_to_the_time_limit(stack_factory):
    assert_held_to_the_time_limit(stack_factory, RUNAWAY, "match()")


@pytest.mark.soak
def test_ingest_commits_while_two_regexp_runaways_hold_the_handles(stack_factory):
    """Claim 3 beside the same runaways: a point posted meanwhile is acknowledged and committed promptly."""
    assert_ingest_goes_on_beside(stack_factory, RUNAWAY, "adv36.calls")
