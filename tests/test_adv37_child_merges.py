"""Adversary 37: the query process's engine merges (TTL merges) in its mirror: its merges are not stopped.

Claim (README "SQL endpoint"; exporter/sql_worker.py): "Its engine writes nothing there: its query
connection is read-only and its merges are stopped"; the mirror is links to the collector's files only,
and a query sees exactly the collector's committed parts (brief 37 claims 1 and 2). The child stops
merges with ``SYSTEM STOP MERGES`` / ``SYSTEM STOP TTL MERGES`` *after* each ``ATTACH TABLE``: the engine
starts a table's background merge selection at its attach, so between the two the child's engine may
choose and run a merge (a TTL merge: a table whose parts hold rows past their TTL), writing a part of its
own (``tmp_merge_*`` then ``all_*``) into the mirror, rewriting (dropping) rows the collector still holds.

What I did: an in-process stack with the SQL endpoint; a MergeTree table with a row TTL whose rows are all
expired, 10 parts, its process started; then the child traced (``strace -f -e trace=%file``: it slows
the child's syscalls, widening the window, which exists without it) while the collector inserts a part
and ``OPTIMIZE ... FINAL``s every fifth round and 5 SQL queries follow each insert (each re-syncs and
re-attaches the table), 30 rounds, then 12 s idle (idle re-syncs).

Measured: the child opened 26 files of its mirror for writing (``tmp_merge_all_18_18_1/primary.cidx``,
``data.bin``, ``checksums.txt``, ...) and committed 1 merge of its own (``tmp_merge_*`` renamed to
``all_*``); a second run: 45 files, 3 merges; an exploratory run: ``all_1_25_9``, a 25-part merge. No byte
of the collector's files changed (its files are only read through the links); the breach is the
mirror's own parts, which also hold disk space of their own and, when the collector's merge of the same
parts gets the same name, are never linked again (``sync_table`` compares names only).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from conftest import free_port
from sql_runaway import ask, query_processes


@pytest.mark.soak  # 30 s under strace; the default suite checks the links (tests/exporter/test_sql_worker.py)
def test_adv37_the_query_process_never_merges_in_its_mirror(stack_factory, tmp_path):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=1)
    db = stack.config.database
    client = stack.collector.endpoints.endpoints[0].store.client
    client.command(f"CREATE TABLE {db}.probe (x UInt64, s String) ENGINE = MergeTree ORDER BY x "
                   "TTL toDateTime(x) + INTERVAL 1 DAY")  # fmt: skip
    for i in range(10):
        client.command(f"INSERT INTO {db}.probe SELECT number, toString(number) FROM numbers({i * 10}, 10)")
    assert ask(stack, "SELECT 1").status_code == 200
    (pid,) = query_processes()
    log = tmp_path / "strace.log"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=%file", "-p", str(pid)])
    try:
        time.sleep(1)
        for i in range(30):
            client.command(
                f"INSERT INTO {db}.probe SELECT number, toString(number) FROM numbers({1000 + i * 10}, 10)"
            )
            if i % 5 == 0:
                client.command(f"OPTIMIZE TABLE {db}.probe FINAL")
            for q in (f"SELECT count() FROM {db}.probe", f"SELECT * FROM {db}.probe FORMAT Null",
                      f"SELECT count() FROM {db}.usage_points", "SELECT count() FROM system.parts",
                      f"SELECT * FROM {db}.probe WHERE x > 5 ORDER BY s LIMIT 3"):  # fmt: skip
                r = ask(stack, q)
                assert r.status_code == 200, r.text
        time.sleep(12)
    finally:
        tracer.terminate()
        tracer.wait()
    lines = log.read_text().splitlines()
    writes = [ln for ln in lines if "/mirror/" in ln and re.search(r"O_WRONLY|O_RDWR|O_TRUNC", ln)]
    merged = [ln for ln in lines if re.search(r'rename\(".*/tmp_merge_[^"]*", ".*/all_[^"]*"', ln)]
    assert not writes and not merged, (
        f"the query process opened {len(writes)} files of its mirror for writing and committed "
        f"{len(merged)} merges of its own: {[w.split(chr(34))[1].rsplit('/', 2)[-2:] for w in writes[:4]]}"
    )
