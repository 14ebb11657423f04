"""adv33: ``default_format=DataFrame`` (chdb's own output "format") on the SQL endpoint.

The endpoint passes ``default_format`` to chdb's ``Connection.query`` as it came. chdb takes
``DataFrame``/``DataStore`` to mean "build a pandas DataFrame in this Python process" (``query_df``):
every row of an Array column becomes a numpy array object, some 20 times the engine's bytes, outside the
engine's ``max_memory_usage`` (32 MiB) and past ``max_result_bytes`` (20 MiB is what the engine measured,
not what Python builds) and ``max_execution_time`` (the conversion runs after the query). Then the
endpoint fails on the DataFrame (no ``rows_read``) and answers a bare 500 that is not ClickHouse's form.
Claims 2 (bounded per query, no OOM kill whatever the query) and the protocol's error form.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests
from conftest import free_port
from hostile_mix import AnonPeak, MemoryCgroup, cgroup_unavailable

# 2.2 million one-element arrays: 19 MiB in the engine (under max_result_bytes), ~230 MiB of DataFrame.
HEAVY = "SELECT [number % 2]::Array(UInt8) AS a FROM numbers(2200000)"


def test_dataframe_default_format_is_answered_in_clickhouse_form(stack_factory):
    stack = stack_factory(sql_port=free_port())
    r = requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=b"SELECT number FROM numbers(3)",
                      params={"default_format": "DataFrame"}, timeout=60)  # fmt: skip
    assert r.text.startswith("Code: ") or r.status_code == 200, (r.status_code, r.text[:200])


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_dataframe_answers_do_not_take_meterhouse_past_its_memory_budget(up_factory):
    why = cgroup_unavailable()
    if why:
        pytest.skip(why)
    budget = 1 << 30
    cgroup = MemoryCgroup(budget)
    up = None
    statuses: list[int | str] = []
    lock = threading.Lock()
    try:
        port = free_port()
        up = up_factory("--memory-budget-bytes", str(budget), "--sql-port", str(port), cgroup=cgroup.path)
        peak = AnonPeak(up.proc.pid)

        def sender() -> None:
            for _ in range(3):
                try:
                    r = requests.post(f"http://127.0.0.1:{port}/", data=HEAVY.encode(),
                                      params={"default_format": "DataFrame"}, timeout=120)  # fmt: skip
                    s: int | str = r.status_code
                except requests.RequestException as e:
                    s = type(e).__name__
                with lock:
                    statuses.append(s)

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        took = time.monotonic() - started
        time.sleep(1)
        alive = up.proc.poll() is None
        anon = peak.stop()
        assert alive and cgroup.oom_kills() == 0, (
            f"meterhouse up {'alive' if alive else f'exited {up.proc.returncode}'}, "
            f"{cgroup.oom_kills()} OOM kills in its {budget >> 20} MiB cgroup (cgroup peak "
            f"{cgroup.peak_bytes() >> 20} MiB, anonymous peak {anon >> 20} MiB) after 2 x 3 SQL queries "
            f"with default_format=DataFrame over {took:.0f} s; answers {statuses}"
        )
        # What the engine's limits allow per query is 32 MiB; two at once, an eighth of the budget each.
        assert anon < 700 << 20, f"anonymous peak {anon >> 20} MiB; answers {statuses}"
    finally:
        if up is not None and up.proc is not None:
            up.stop(signal.SIGKILL)
        cgroup.remove()
