"""adv33: claim 3, "never stalls ingest", against one SQL query with ``default_format=DataFrame``.

chdb builds the DataFrame in C++ and Python after the engine's query ended (no max_execution_time
there), holding the interpreter lock: the OTLP receivers of the same process wait behind it. The
collector runs as a `meterhouse up` subprocess so that the client's clock is not held by the same lock.
"""

from __future__ import annotations

import signal
import threading
import time

import requests
from conftest import free_port
from otlp_builders import point, sum_request

SEC = 10**9
HEAVY = "SELECT [number % 2]::Array(UInt8) AS a FROM numbers(2200000)"


def test_ingest_is_acknowledged_promptly_while_a_dataframe_query_runs(up_factory):
    port = free_port()
    up = up_factory("--sql-port", str(port))
    try:
        url = f"{up.otlp_http}/v1/metrics"
        done = threading.Event()
        answer: list[int] = []

        def query() -> None:
            r = requests.post(f"http://127.0.0.1:{port}/", data=HEAVY.encode(),
                              params={"default_format": "DataFrame"}, timeout=300)  # fmt: skip
            answer.append(r.status_code)
            done.set()

        t0 = time.time_ns() - 60 * SEC
        reqs = [sum_request({"stall.calls": [point(1, {"org.id": "org-s"}, t_ns=t0 + i * 1000, start_ns=t0)]})
                .SerializeToString() for i in range(1, 400)]  # fmt: skip
        runner = threading.Thread(target=query, daemon=True)
        started = time.monotonic()
        runner.start()
        waits: list[float] = []
        for body in reqs:
            if done.is_set():
                break
            s = time.monotonic()
            r = requests.post(url, data=body, timeout=120, headers={"Content-Type": "application/x-protobuf"})
            waits.append(time.monotonic() - s)
            assert r.status_code == 200, r.text
            time.sleep(0.1)
        runner.join(300)
        took = time.monotonic() - started
        assert max(waits) < 2.0, (
            f"an OTLP request waited {max(waits):.1f} s (median {sorted(waits)[len(waits) // 2]:.2f} s, "
            f"{len(waits)} requests over {took:.0f} s) while one SQL query with default_format=DataFrame "
            f"ran (answer {answer})"
        )
    finally:
        up.stop(signal.SIGKILL)
