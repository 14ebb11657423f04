"""adv33: the protocol claims of the SQL endpoint (README "SQL endpoint"): errors as ClickHouse writes
them, and ``X-ClickHouse-Format`` naming the format of the answer."""

from __future__ import annotations

import requests
from conftest import free_port


def test_format_clause_of_show_is_named_in_the_header(stack_factory):
    stack = stack_factory(sql_port=free_port())
    r = requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=b"SHOW TABLES FORMAT JSON", timeout=30,
                      params={"database": stack.config.database})  # fmt: skip
    assert r.status_code == 200 and r.text.lstrip().startswith("{"), r.text[:100]
    assert r.headers["X-ClickHouse-Format"] == "JSON" and r.headers["Content-Type"].startswith(
        "application/json"
    ), (r.headers["X-ClickHouse-Format"], r.headers["Content-Type"])


def test_odd_request_values_are_answered_in_clickhouse_form(stack_factory):
    stack = stack_factory(sql_port=free_port())
    url = f"http://127.0.0.1:{stack.sql_port}/"
    answers = {
        "default_format=ArrowTable": requests.post(url, data=b"SELECT 1", timeout=30,
                                                   params={"default_format": "ArrowTable"}),
        "query_id with CRLF": requests.post(url, data=b"SELECT 1", timeout=30,
                                            params={"query_id": "a\r\nX-Injected: 1"}),
    }  # fmt: skip
    bad = {k: f"{r.status_code} {r.text[:40]!r}" for k, r in answers.items()
           if not (r.status_code == 200 or r.text.startswith("Code: "))}  # fmt: skip
    assert not bad, bad
