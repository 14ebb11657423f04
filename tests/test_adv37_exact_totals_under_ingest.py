"""Adversary 37 (an attack that held): exact totals from the SQL endpoint while OTLP ingest and merges run.

Claim (brief 37 claim 2, README "SQL endpoint"): a query sees exactly what was committed before it began:
never a part missing, never rows twice, never an error because the collector merged or removed a part.

What I did: an in-process stack with the SQL endpoint (2 processes); one thread posts 150 OTLP/HTTP sums
(value i for the i-th, 3 orgs) one request at a time, another ``OPTIMIZE TABLE usage_points FINAL`` in
the collector's engine every 0.2 s (its merged sources go at once), and three threads ask
``sum(value_int)`` and ``count()`` of the raw table and the rollup's ``sum`` through the SQL endpoint as
fast as they can. Each answer must be 200 (or the documented 503, code 202: three askers, two processes), a prefix sum of what was sent (1+2+...+k for some k, between
what was acknowledged and committed before it and what was sent by its end), never smaller than that
thread's last, and the final answer exactly what was sent.

Measured: it held: several hundred answers, none an error, none a non-prefix total or a step back; the
final totals exact (11,325 = 1+...+150 points, 150 rows).
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import drain, free_port
from otlp_builders import point, sum_request
from sql_runaway import ask
from test_adv28_dedup_eviction import post

N = 150
PREFIX = {k * (k + 1) // 2: k for k in range(N + 1)}


@pytest.mark.soak  # 10 s; the default suite counts rows under merges (tests/exporter/test_sql_worker.py)
def test_adv37_sql_totals_are_exact_while_ingest_and_merges_run(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=2)
    db = stack.config.database
    client = stack.collector.endpoints.endpoints[0].store.client
    sent = [0]
    stop = threading.Event()
    bad: list[str] = []
    answers = [0]

    def ingest() -> None:
        for i in range(1, N + 1):
            now = time.time_ns()
            post(stack, sum_request({"adv37.exact": [point(i, {"org.id": f"org-{i % 3}"}, t_ns=now - 10**6,
                                                           start_ns=now - 10**9)]}))  # fmt: skip
            sent[0] = i
            time.sleep(0.02)

    def merge() -> None:
        while not stop.is_set():
            client.command(f"OPTIMIZE TABLE {db}.usage_points FINAL")
            time.sleep(0.2)

    def count() -> None:
        last = 0
        while not stop.is_set():
            r = ask(stack, f"SELECT sum(value_int), count() FROM {db}.usage_points "
                           "WHERE metric = 'adv37.exact'")  # fmt: skip
            high = sent[0]
            answers[0] += 1
            if r.status_code == 503 and r.headers.get("X-ClickHouse-Exception-Code") == "202":
                continue  # three askers, two processes: one waits a second, then 503 (documented)
            if r.status_code != 200:
                bad.append(f"{r.status_code} {r.text[:200]}")
                continue
            total, rows = (int(float(x)) for x in r.text.split())
            k = PREFIX.get(total)
            if k is None or k != rows or k > high or total < last:
                bad.append(f"sum {total} over {rows} rows, {high} sent, {last} before")
            last = total

    threads = [threading.Thread(target=f) for f in (merge, count, count, count)]
    for t in threads:
        t.start()
    ingest()
    drain(stack)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    final = ask(stack, f"SELECT sum(value_int), count() FROM {db}.usage_points WHERE metric = 'adv37.exact'")
    assert final.text.split() == [str(N * (N + 1) // 2), str(N)], final.text
    assert answers[0] > 100, answers[0]
    assert not bad, (len(bad), bad[:10])
