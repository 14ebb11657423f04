"""adv35: claim 1 (no file read), the ``WHERE`` / ``LIMIT`` of ``SHOW TABLES``.

``EXPLAIN AST SHOW TABLES WHERE <expr>`` dumps one line, ``ShowTables``, and none of the statement's
expressions, so ``check()`` sees no ``Function file``. The engine runs ``SHOW TABLES`` as a ``SELECT ...
FROM system.tables WHERE ... AND (<expr>)``, and ``readonly = 1`` does not stop the scalar ``file``: a
cast error carries the file's text back (``Cannot parse string '<the file>' as UInt8``).
"""

from __future__ import annotations

import pytest
from conftest import free_port
from sql_runaway import ask

SECRET = "s3cr3t-0f-th3-h0st-adv35"


@pytest.mark.parametrize(
    "template",
    [
        "SHOW TABLES WHERE toUInt8(file('{path}')) = 1",
        "SHOW TABLES LIKE '%' LIMIT toUInt8(file('{path}'))",
        "SHOW DICTIONARIES WHERE toUInt8(file('{path}')) = 1",
    ],
    ids=["show_tables_where", "show_tables_limit", "show_dictionaries_where"],
)
def test_file_in_show_tables_clause_reads_no_file(stack_factory, tmp_path, template):
    stack = stack_factory(sql_port=free_port())
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    r = ask(stack, template.format(path=secret))
    assert SECRET not in r.text, (
        f"file() read through a SHOW clause the AST dump omits: {r.status_code} {r.text!r}"
    )
    assert r.status_code == 403 and r.headers["X-ClickHouse-Exception-Code"] == "164", (r.status_code, r.text)


def test_file_in_show_tables_where_is_no_oracle(stack_factory, tmp_path):
    """Without an error: the answer's rows tell whether the file starts so (a byte-by-byte oracle)."""
    stack = stack_factory(sql_port=free_port())
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    yes = ask(stack, f"SHOW TABLES WHERE file('{secret}') LIKE '{SECRET[:6]}%'")
    no = ask(stack, f"SHOW TABLES WHERE file('{secret}') LIKE 'nope%'")
    assert not (yes.status_code == 200 and no.status_code == 200 and yes.text != no.text), (
        f"file() read through SHOW TABLES WHERE: {yes.text!r} vs {no.text!r}"
    )
