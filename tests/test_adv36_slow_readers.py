"""adv36: claim 2 (concurrency bound: 503 past sql_max_concurrent, never a hang), clients that ask for a
large answer and then do not read it.

adversary 33 had trickling request *bodies* read on the event loop so that they hold no worker. The
answer goes the other way: the WSGI worker hands the answer (here 15 MB, under max_result_bytes) to the
server and waits while the client's socket is full. Four clients that never read hold every worker of
the endpoint (sql_max_concurrent + 2): an honest ``SELECT 1`` then gets neither an answer nor a 503.
"""

from __future__ import annotations

import socket
import time

import requests
from conftest import free_port

QUERY = b"SELECT repeat('x', 1000) FROM numbers(15000)"


def test_clients_not_reading_answers_do_not_hold_the_endpoint(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=2)
    url = f"http://127.0.0.1:{stack.sql_port}/"
    assert requests.post(url, data=b"SELECT 1", timeout=10).status_code == 200
    held = []
    for _ in range(6):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", stack.sql_port))
        s.sendall(b"POST /?database=" + stack.config.database.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: " + str(len(QUERY)).encode() + b"\r\n\r\n" + QUERY)  # fmt: skip
        s.recv(100)  # the answer has started; read no more of it
        held.append(s)
    time.sleep(2)
    t = time.monotonic()
    try:
        r = requests.post(url, data=b"SELECT 1", timeout=20)
        answer = f"{r.status_code} {r.text[:80]!r}"
    except requests.RequestException as err:
        answer = f"no answer: {type(err).__name__}"
    took = time.monotonic() - t
    for s in held:
        s.close()
    assert answer.startswith(("200", "503")) and took < 5, (
        f"SELECT 1 while 6 clients leave 15 MB answers unread: {answer} after {took:.1f} s"
    )
