"""adv36: claim 2 (memory; the process must not be OOM-killed), answers their clients never read.

Each answer is bounded (max_result_bytes: 20 MiB at the default 1 GiB budget), and the engine handle is
free again once the answer is built. The server then writes the answer into the connection's transport
buffer whole and keeps it there while the client does not read: nothing bounds how many such answers are
held at once but the connection bounds (256 per address, 1,310 in all). A client that opens connections,
asks each for a ~7 MB answer and reads none of them grows the collector's memory by that much each.
"""

from __future__ import annotations

import socket
import time

import pytest
import requests
from conftest import free_port

QUERY = b"SELECT repeat('x', 1000) FROM numbers(7000)"
CLIENTS = 100


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.soak  # 10 s; the default suite checks the bound (tests/exporter/test_sql_worker.py)
def test_unread_answers_do_not_pile_up_in_memory(up_factory):
    port = free_port()
    up = up_factory("--sql-port", str(port))
    url = f"http://127.0.0.1:{port}/"
    first = requests.post(url, data=QUERY, timeout=30)  # one answer, read: the baseline
    assert first.status_code == 200, first.text[:300]
    time.sleep(2)
    before = rss_mib(up.proc.pid)
    held = []
    for _ in range(CLIENTS):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(QUERY)).encode() + b"\r\n\r\n"
                  + QUERY)  # fmt: skip
        s.recv(100)  # the answer has started; read no more of it
        held.append(s)
    time.sleep(3)
    after = rss_mib(up.proc.pid)
    alive = up.proc.poll() is None
    for s in held:
        s.close()
    assert alive and after - before < 256, (
        f"{CLIENTS} unread ~7 MB answers: the collector's RSS {before:.0f} -> {after:.0f} MiB "
        f"(+{after - before:.0f} MiB; alive: {alive})"
    )
