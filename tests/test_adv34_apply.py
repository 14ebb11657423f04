"""adv34: claim 1 (no file read), the columns transformer ``APPLY``.

``SELECT * APPLY(file) FROM (SELECT '/path' AS p)`` calls ``file`` on every column the ``*`` matches. In
the engine's ``EXPLAIN AST`` the transformer is one leaf, ``ColumnsApplyTransformer``, with no child
naming the function (nor the body of a lambda: ``APPLY(x -> file(x))``), so ``check()`` sees no
``Function file`` node; the engine's ``readonly = 1`` does not stop the scalar ``file``.
"""

from __future__ import annotations

import pytest
from conftest import free_port
from sql_runaway import ask

SECRET = "s3cr3t-0f-th3-h0st-adv34"


@pytest.mark.parametrize(
    "template",
    [
        "SELECT * APPLY(file) FROM (SELECT '{path}' AS p)",
        "SELECT COLUMNS('p') APPLY(file) FROM (SELECT '{path}' AS p)",
        "SELECT * APPLY(x -> file(x)) FROM (SELECT '{path}' AS p)",
    ],
    ids=["apply_name", "columns_apply", "apply_lambda"],
)
def test_file_through_columns_apply_reads_no_file(stack_factory, tmp_path, template):
    stack = stack_factory(sql_port=free_port())
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    r = ask(stack, template.format(path=secret))
    assert SECRET not in r.text, (
        f"file() reached through a columns APPLY transformer: {r.status_code} {r.text!r}"
    )
    assert r.status_code == 403 and r.headers["X-ClickHouse-Exception-Code"] == "164", (r.status_code, r.text)
