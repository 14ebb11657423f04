"""adv33: claim 5 under concurrency: queries failing past max_result_bytes beside distinct small queries
on the other handles; no answer may carry another query's output."""

from __future__ import annotations

import threading
import time

import requests
from conftest import free_port


def test_no_answer_carries_a_failed_querys_output_under_concurrency(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=3)
    url = f"http://127.0.0.1:{stack.sql_port}/"
    stop = time.monotonic() + 10
    bad: list[str] = []
    counts = {"fail": 0, "ask": 0}

    def failer() -> None:
        while time.monotonic() < stop:
            r = requests.post(url, data=b"SELECT * FROM numbers(1000000000)", timeout=60)
            counts["fail"] += 1
            if r.status_code == 200:
                bad.append(f"failing query answered 200 ({len(r.content)} bytes)")

    def asker(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            want = f"ask-{k}-{i}"
            r = requests.post(url, data=f"SELECT '{want}'".encode(), timeout=60)
            counts["ask"] += 1
            if r.status_code == 200 and r.text != want + "\n":
                bad.append(f"{want!r} answered {r.text[:60]!r}")

    threads = [threading.Thread(target=failer) for _ in range(2)] + [
        threading.Thread(target=asker, args=(k,)) for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not bad, (counts, bad[:5])
    print(counts)
