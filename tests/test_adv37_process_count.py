"""Adversary 37 (an attack that held, as far as sampling sees): at most ``--sql-max-concurrent`` query
processes while runaway queries are killed at their limit and replaced under many clients.

Claim (brief 37 claim 4): child processes are at most ``--sql-max-concurrent`` at once. ``_discard``
lowers the count of handles before it kills the process, so a new one may be started while the old one
dies.

What I did: ``sql_max_concurrent`` 1, ``sql_timeout_s`` 1; six clients each sending a runaway (re2's slow
path: killed by the parent past its 1 s + 1 s) or ``SELECT 1``, for 12 s, while /proc is sampled every 5
ms for this process's live (not zombie) query processes.

Measured: it held: the most live query processes seen at once was 1 (thousands of samples).
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import free_port
from sql_runaway import ask, query_processes

RUNAWAY = "SELECT match(materialize(repeat('a', 1000000)), '(?:a?){900}a{900}b')"


@pytest.mark.soak  # an attack that held; 8 s
def test_adv37_query_processes_stay_within_the_bound(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=1, sql_timeout_s=1)
    stop = threading.Event()
    most = [0]
    samples = [0]

    def sample() -> None:
        while not stop.is_set():
            most[0] = max(most[0], len(query_processes()))
            samples[0] += 1
            time.sleep(0.005)

    def client(i: int) -> None:
        while not stop.is_set():
            ask(stack, RUNAWAY if i % 2 else "SELECT 1", timeout=30)

    threads = [threading.Thread(target=sample)] + [
        threading.Thread(target=client, args=(i,)) for i in range(6)
    ]
    for t in threads:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join()
    assert samples[0] > 100
    assert most[0] <= 1, f"{most[0]} live query processes at once, sql_max_concurrent 1"
