"""The SQL endpoint's query processes (exporter/sql_worker.py): killed at their limit, reading a mirror of
hard links that they never write, fresh at each query, whole while the collector merges under them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import drain, free_port
from otlp_builders import point, sum_request
from sql_runaway import ask, query_processes
from test_adv28_dedup_eviction import post

#: One row whose ``match()`` takes re2's slow path: 17 s of one block (tests/test_adv36_regexp_nfa.py).
RUNAWAY = "SELECT match(materialize(repeat('a', 1000000)), '(?:a?){900}a{900}b')"


def test_a_query_past_its_limit_is_ended_with_its_process(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_timeout_s=1, sql_max_concurrent=1)
    assert ask(stack, "SELECT 1").status_code == 200
    (first,) = query_processes()
    t0 = time.monotonic()
    r = ask(stack, RUNAWAY)
    took = time.monotonic() - t0
    assert r.status_code == 500 and r.headers["X-ClickHouse-Exception-Code"] == "159", r.text
    assert "TIMEOUT_EXCEEDED" in r.text and took < 4, f"{took:.1f} s: {r.text}"
    assert not Path(f"/proc/{first}").exists() or Path(f"/proc/{first}/stat").read_text().split()[2] == "Z"
    again = ask(stack, "SELECT 41 + 1")
    assert again.status_code == 200 and again.text == "42\n"
    assert first not in query_processes()


def test_an_engine_error_keeps_the_process(stack_factory):
    """A refusal or the engine's own error is an answer, not a reason to start a process again."""
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=1)
    assert ask(stack, "SELECT 1").status_code == 200
    before = query_processes()
    assert ask(stack, "SELECT throwIf(1, 'no')").status_code != 200
    assert ask(stack, "SELECT * FROM nowhere").status_code == 404
    assert ask(stack, "SELECT 2").text == "2\n"
    assert query_processes() == before


def _files(folder: Path) -> dict[int, tuple[int, int]]:
    out = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            out[st.st_ino] = (st.st_size, st.st_mtime_ns)
    return out


def test_the_mirror_is_links_never_written_and_fresh_at_each_query(stack_factory):
    stack = stack_factory(sql_port=free_port())
    db = stack.config.database
    assert ask(stack, "SELECT 1").status_code == 200
    store = stack.collector.endpoints.endpoints[0].store
    tables = Path(store.client.query(
        "SELECT data_paths[1] FROM system.tables WHERE database = {db:String} AND name = 'usage_points'",
        parameters={"db": db}).result_rows[0][0])  # fmt: skip
    sent = 0
    for round_ in range(6):
        now = time.time_ns()
        post(stack, sum_request({"mirror.calls": [
            point(round_ + 1, {"org.id": f"org-{i}"}, t_ns=now - 10**9 + i, start_ns=now - 2 * 10**9)
            for i in range(5)]}))  # fmt: skip
        sent += 5 * (round_ + 1)
        drain(stack)
        before = _files(tables)
        r = ask(stack, f"SELECT sum(value_int) FROM {db}.usage_points WHERE metric = 'mirror.calls'")
        assert r.status_code == 200 and float(r.text) == sent, (r.text, sent)  # what was committed, at once
        after = _files(tables)
        changed = {ino for ino in before.keys() & after.keys() if before[ino] != after[ino]}
        assert not changed, f"files of the collector's engine changed under a query: {changed}"
    mirror = stack.config.data_dir / "sql-workers"
    # Every file of a part in the mirror is a link to the collector's (the engine's own insert
    # deduplication log, empty, is its own and beside the parts).
    own = [p for p in mirror.rglob("*") if p.is_file() and "mirror" in p.parts and p.stat().st_nlink < 2
           and "deduplication_logs" not in p.parts and p.name != "format_version.txt"]  # fmt: skip
    assert not own, f"files the query process wrote into its mirror: {own[:5]}"


def test_queries_see_every_row_while_the_collector_merges_under_them(stack_factory):
    """The collector inserts and merges (its merged sources go at once) while queries count: each answer is
    a count the table had, never one with a merge's sources gone and its result missing."""
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=2)
    db = stack.config.database
    client = stack.collector.endpoints.endpoints[0].store.client
    client.command(f"CREATE TABLE {db}.merge_probe (x UInt64) ENGINE = MergeTree ORDER BY x")
    for _ in range(20):
        client.command(f"INSERT INTO {db}.merge_probe SELECT number FROM numbers(1000)")
    started, inserted = [20], [20]  # thousands of rows: inserts begun, inserts done
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            started[0] += 1
            client.command(f"INSERT INTO {db}.merge_probe SELECT number FROM numbers(1000)")
            inserted[0] += 1
            client.command(f"OPTIMIZE TABLE {db}.merge_probe FINAL")

    bad: list[str] = []

    def count() -> None:
        last = 0
        while not stop.is_set():
            low = inserted[0]
            r = ask(stack, f"SELECT count() FROM {db}.merge_probe")
            high = started[0]
            if r.status_code != 200:
                bad.append(f"{r.status_code} {r.text[:200]}")
                continue
            n = int(r.text)
            if n % 1000 or not (low * 1000 <= n <= high * 1000) or n < last:
                bad.append(f"{n} rows, {low}-{high} thousand inserted, {last} before")
            last = n

    threads = [threading.Thread(target=churn)] + [threading.Thread(target=count) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    assert inserted[0] > 25, "the collector's engine merged too little to test anything"
    assert not bad, bad[:10]


@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_a_query_process_ends_with_its_collector(tmp_path, sig):
    """However the collector's process ends, its query processes end with it (they hold links)."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from meterhouse.core.store import connect
        from meterhouse.exporter.sql_worker import Spawner
        data = Path({str(tmp_path)!r})
        connect("embedded", data, "db").ensure_schema()
        w = Spawner(data, "db", 5, 64 << 20)({{"max_threads": 1}})
        print(w._proc.pid, flush=True)
        time.sleep(600)
    """)  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        parent.send_signal(sig)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists(), "the query process outlived its collector"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_answers_their_clients_do_not_read_are_bounded(stack_factory):
    """Past the endpoint's share for unread answers, the next answer is 503 (code 202), not held."""
    import socket

    stack = stack_factory(sql_port=free_port(), memory_budget_bytes=1 << 30)
    query = b"SELECT repeat('x', 1000) FROM numbers(7000)"
    held, heads = [], []
    for _ in range(20):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", stack.sql_port))
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(query), query))
        heads.append(s.recv(400))
        held.append(s)
    refused = [h for h in heads if h.startswith(b"HTTP/1.1 503")]
    served = len(heads) - len(refused)
    for s in held:
        s.close()
    # 6% of 1 GiB holds nine 7 MB answers beside what the kernel's socket buffers took.
    assert refused and 2 <= served < 20 and b"x-clickhouse-exception-code: 202" in refused[0], heads[-1]
    assert requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=b"SELECT 1", timeout=30).text == "1\n"


def test_the_mirror_lists_again_when_a_part_goes_while_it_is_linked(tmp_path, monkeypatch):
    """A merge writes its result, then removes its sources: one removed while the mirror links it makes the
    mirror list the table again, and find the result (files only; the engine's merge, as it happens)."""
    from meterhouse.exporter import sql_worker

    src, dst = tmp_path / "src", tmp_path / "dst"
    for part in ("all_1_1_0", "all_2_2_0"):
        (src / part).mkdir(parents=True)
        (src / part / "data.bin").write_bytes(part.encode())
        (src / part / "checksums.txt").write_bytes(b"sums")
    (src / "tmp_insert_all_3_3_0").mkdir()  # a part being written: not a part yet
    dst.mkdir()
    real = sql_worker._link_part

    def merged_meanwhile(a: Path, b: Path) -> bool:
        if a.name == "all_2_2_0" and a.exists():  # the engine merges 1 and 2, then removes its sources
            (src / "all_1_2_1").mkdir()
            (src / "all_1_2_1" / "data.bin").write_bytes(b"merged")
            (src / "all_1_2_1" / "checksums.txt").write_bytes(b"sums")
            for gone in ("all_1_1_0", "all_2_2_0"):
                for f in (src / gone).iterdir():
                    f.unlink()
                (src / gone).rmdir()
        return real(a, b)

    monkeypatch.setattr(sql_worker, "_link_part", merged_meanwhile)
    assert sql_worker.sync_table(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["all_1_2_1"]
    assert (dst / "all_1_2_1" / "data.bin").stat().st_ino == (src / "all_1_2_1" / "data.bin").stat().st_ino
    assert not sql_worker.sync_table(src, dst)  # nothing changed since


def test_an_idle_process_is_ended_and_started_again_when_asked(stack_factory):
    stack = stack_factory(sql_port=free_port())
    assert ask(stack, "SELECT 1").status_code == 200
    (first,) = query_processes()
    assert stack.sql_engine.reap(3600) == 0 and query_processes() == {first}  # used a moment ago
    assert stack.sql_engine.reap(0) == 1 and query_processes() == set()
    assert ask(stack, "SELECT 1").text == "1\n" and len(query_processes()) == 1


def test_an_idle_process_lets_go_of_removed_parts(stack_factory, monkeypatch):
    """The mirror's links hold the disk space of parts the collector removed (merged away, dropped): an
    idle process drops them every IDLE_SYNC_S, not only at its next query."""
    from meterhouse.exporter import sql_worker

    monkeypatch.setattr(sql_worker, "IDLE_SYNC_S", 0.5)
    stack = stack_factory(sql_port=free_port())
    db = stack.config.database
    client = stack.collector.endpoints.endpoints[0].store.client
    client.command(f"CREATE TABLE {db}.merge_probe (x UInt64) ENGINE = MergeTree ORDER BY x")
    for _ in range(5):
        client.command(f"INSERT INTO {db}.merge_probe SELECT number FROM numbers(1000)")
    assert ask(stack, f"SELECT count() FROM {db}.merge_probe").text == "5000\n"
    uuid = client.query(
        f"SELECT toString(uuid) FROM system.tables WHERE database = '{db}' AND name = 'merge_probe'"
    )
    (probe,) = (stack.config.data_dir / "sql-workers").glob(f"*/mirror/store/*/{uuid.result_rows[0][0]}")
    assert len([c for c in probe.iterdir() if c.name.startswith("all_")]) > 1
    client.command(f"TRUNCATE TABLE {db}.merge_probe")  # its parts' folders go at once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        parts = sorted(c.name for c in probe.iterdir() if c.name.startswith("all_"))
        if not parts:
            break
        time.sleep(0.1)
    assert not parts, f"the idle process still links {parts}"
