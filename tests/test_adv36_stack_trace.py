"""adv36: claims 2 and 3, ``system.stack_trace``: every query signals every thread of the process.

Reading ``system.stack_trace`` makes the engine send a signal to each thread of the process (the
collector's Python threads, the servers' event loops, the writer) to collect its stack. Run in a loop
from two SQL connections while OTLP points are posted: the process must survive and every point be
acknowledged and committed.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from conftest import drain, free_port
from otlp_builders import point, sum_request


@pytest.mark.soak
def test_stack_trace_loop_neither_kills_nor_stalls_ingest(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_timeout_s=5, sql_max_concurrent=2)
    url = f"http://127.0.0.1:{stack.sql_port}/"
    stop = time.monotonic() + 20
    answers: dict[str, int] = {}
    lock = threading.Lock()

    def hammer() -> None:
        while time.monotonic() < stop:
            try:
                r = requests.post(
                    url,
                    data=b"SELECT count(), groupUniqArray(thread_name) FROM system.stack_trace",
                    timeout=30,
                )
                key = str(r.status_code)
            except requests.RequestException as err:
                key = type(err).__name__
            with lock:
                answers[key] = answers.get(key, 0) + 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    bad, worst = [], 0.0
    ingest = f"http://127.0.0.1:{stack.collector.http.port}/v1/metrics"
    i = 0
    while time.monotonic() < stop:
        now = time.time_ns()
        req = sum_request({"adv36.calls": [point(1, {"org.id": f"org-{i % 7}"}, t_ns=now - 10**9,
                                                  start_ns=now - 2 * 10**9)]})  # fmt: skip
        t0 = time.monotonic()
        try:
            r = requests.post(
                ingest,
                data=req.SerializeToString(),
                headers={"Content-Type": "application/x-protobuf"},
                timeout=30,
            )
            if r.status_code != 200:
                bad.append(r.status_code)
        except requests.RequestException as err:
            bad.append(type(err).__name__)
        worst = max(worst, time.monotonic() - t0)
        i += 1
        time.sleep(0.02)
    for t in threads:
        t.join()
    drain(stack, timeout_s=30)
    assert not bad and worst < 5, (
        f"ingest beside system.stack_trace: failures {bad[:10]}, slowest {worst:.1f} s"
    )
    assert set(answers) == {"200"}, f"system.stack_trace answers: {answers}"
