"""adv35: claims 1 and 2, chdb's ``python()`` table function inside a ``SHOW TABLES WHERE`` subquery.

The clause is missing from the ``EXPLAIN AST`` dump (see test_adv35_show_where.py), so the check never
sees the table function; the engine's ``readonly = 1`` does not refuse ``python()`` (it refuses ``file``,
``url``, ``executable``): the engine goes looking for a Python object by name from its own thread, and
in a `meterhouse up` the whole process froze (the SQL endpoint and the HTTP API answer nothing;
under a bare chdb handle in a thread: SIGSEGV or a hang).
"""

from __future__ import annotations

import requests
from conftest import free_port

QUERY = "SHOW TABLES WHERE name IN (SELECT * FROM python(x))"


def test_python_table_function_in_show_where_neither_runs_nor_kills(up_factory):
    port = free_port()
    up = up_factory("--sql-port", str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        r = requests.post(url, data=QUERY.encode(), timeout=30)
        answer = f"{r.status_code} {r.text[:200]!r}"
    except requests.RequestException as err:
        answer = f"no answer: {type(err).__name__}"
    alive = up.proc.poll() is None
    try:
        after = requests.post(url, data=b"SELECT 1", timeout=10).status_code
    except requests.RequestException as err:
        after = type(err).__name__
    try:
        api = requests.get(f"{up.api}/readyz", timeout=10).status_code
    except requests.RequestException as err:
        api = type(err).__name__
    assert alive and after == 200 and api == 200, (
        f"python() through SHOW TABLES WHERE: {answer}; process exit code {up.proc.poll()}, then SELECT 1: "
        f"{after}; the HTTP API's /readyz: {api}\n{up.output()[-600:]}"
    )
    assert answer.startswith("403"), answer
