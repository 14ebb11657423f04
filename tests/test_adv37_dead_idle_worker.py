"""Adversary 37: a query process that died while idle fails the next honest query.

Claim (README "SQL endpoint", brief 37 claim 3): each handle is a process "killed and replaced" when it
fails; a query is answered or refused for what it does, and a dead process is not a user's error. The
pool (``Engine.handle``) hands out an idle handle without looking whether its process still lives
(``Worker.alive`` is read only after a failure), so the query sent to a process that died while idle
(the OOM killer's choice, a crash of its idle re-sync: ``mirror.refresh()`` in ``main()``'s idle loop is
outside every ``try``, an ``sql-workers`` clean-up by an operator) is answered 500.

What I did: one query (its process starts and waits, idle); the process SIGKILLed as the OOM killer
would; then ``SELECT 1``.

Measured: ``SELECT 1`` answered 500, ``Code: 1001 ... the query's process ended (BrokenPipeError)``; only
the query after it is served by a new process.
"""

from __future__ import annotations

import os
import signal
import time

from conftest import free_port
from sql_runaway import ask, query_processes


def test_adv37_a_query_after_its_idle_process_died_is_served(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=1)
    assert ask(stack, "SELECT 1").text == "1\n"
    (pid,) = query_processes()
    os.kill(pid, signal.SIGKILL)  # as the OOM killer ends the largest process
    time.sleep(0.5)
    r = ask(stack, "SELECT 1")
    assert r.status_code == 200 and r.text == "1\n", (
        f"SELECT 1 after its idle query process died: {r.status_code} {r.text.strip()!r}"
    )
