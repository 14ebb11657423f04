"""adv33: the SQL endpoint's read-only claim (README "SQL endpoint", claim 1): no file read or write.

Two parser-check gaps (exporter/sql.py ``check``), each reaching something the engine's
``readonly = 1`` does not stop:

* ``INTO OUTFILE`` is refused only for a ``SelectWithUnionQuery`` root; ``SHOW``, ``DESCRIBE``,
  ``EXISTS`` and ``SHOW CREATE`` are queries with output too, and the engine writes their answer to any
  path in readonly mode (``TRUNCATE`` overwrites an existing file, ``DESCRIBE (SELECT 1 AS `text`)``
  chooses the content).
* the scalar ``file()`` is refused only where it appears as a Function node of the AST; a column
  ``ALIAS file(...)`` inside the structure string of the allowed ``values()`` table function is a string
  literal to the check, and the engine evaluates it.
"""

from __future__ import annotations

import requests
from conftest import free_port


def ask(stack, query: str) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=query.encode(), timeout=60,
                         params={"database": stack.config.database})  # fmt: skip


def test_into_outfile_of_show_describe_exists_writes_no_file(stack_factory, tmp_path):
    stack = stack_factory(sql_port=free_port())
    victim = tmp_path / "victim.txt"
    victim.write_text("original content\n")
    queries = {
        "show": f"SHOW TABLES INTO OUTFILE '{tmp_path}/show.txt'",
        "describe": f"DESCRIBE TABLE usage_points INTO OUTFILE '{tmp_path}/describe.txt'",
        "exists": f"EXISTS TABLE usage_points INTO OUTFILE '{tmp_path}/exists.txt'",
        "show_create": f"SHOW CREATE TABLE usage_points INTO OUTFILE '{tmp_path}/show_create.txt'",
        # chosen content, over an existing file
        "overwrite": f"DESCRIBE (SELECT 1 AS `attacker controlled line`) INTO OUTFILE '{victim}' "
                     "TRUNCATE FORMAT TSVRaw",
    }  # fmt: skip
    answers = {k: ask(stack, q) for k, q in queries.items()}
    written = sorted(p.name for p in tmp_path.glob("*.txt") if p.name != "victim.txt")
    statuses = {k: r.status_code for k, r in answers.items()}
    assert written == [] and victim.read_text() == "original content\n", (
        f"files written through the read-only endpoint: {written}; victim now "
        f"{victim.read_text()!r}; statuses {statuses}"
    )
    assert all(s == 403 for s in statuses.values()), statuses


def test_file_in_a_values_column_alias_reads_no_file(stack_factory, tmp_path):
    stack = stack_factory(sql_port=free_port())
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-0f-th3-h0st\n")
    query = f"SELECT b FROM values('a UInt8, b String ALIAS file(\\'{secret}\\')', 1)"
    r = ask(stack, query)
    assert "s3cr3t-0f-th3-h0st" not in r.text, (
        f"file() reached through a column ALIAS in values()'s structure: {r.status_code} {r.text!r}"
    )
    assert r.status_code == 403 and r.headers["X-ClickHouse-Exception-Code"] == "164", (r.status_code, r.text)
