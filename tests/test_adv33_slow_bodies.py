"""adv33: claim 2's concurrency bound ("at most sql_max_concurrent at once; one more waits a second, then
503") against bodies that trickle in above the minimum body rate.

The SQL app runs on ``sql_max_concurrent + 2`` WSGI worker threads and reads the body itself
(``_body``) on one of them, before the query takes an engine handle: four clients sending a query at
2 KiB/s (above ``--http-min-body-rate-bytes-s``, inside ``--http-read-timeout-s``) hold every worker,
and a fifth client's ``SELECT 1`` is answered neither 200 nor 503 in time.
"""

from __future__ import annotations

import socket
import threading
import time

import requests
from conftest import free_port


def trickle(port: int, stop: threading.Event) -> None:
    body = b"SELECT '" + b"x" * 200_000 + b"'"
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        i = 0
        while not stop.is_set() and i < len(body):
            s.sendall(body[i : i + 512])
            i += 512
            time.sleep(0.25)  # 2 KiB/s
    except OSError:
        pass
    finally:
        s.close()


def test_trickling_bodies_do_not_hold_the_sql_endpoint(stack_factory):
    stack = stack_factory(sql_port=free_port(), sql_max_concurrent=2)
    port = stack.sql_port
    stop = threading.Event()
    threads = [threading.Thread(target=trickle, args=(port, stop), daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        started = time.monotonic()
        try:
            r = requests.post(f"http://127.0.0.1:{port}/", data=b"SELECT 1", timeout=15)
            answer = f"{r.status_code} {r.text[:60]!r}"
        except requests.RequestException as e:
            answer = type(e).__name__
        took = time.monotonic() - started
        assert took < 5 and (answer.startswith(("200", "503"))), (
            f"SELECT 1 answered {answer} after {took:.1f} s while 4 bodies trickled in at 2 KiB/s"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(5)
