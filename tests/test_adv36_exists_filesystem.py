"""adv36: claim 1 (no file read), ``EXISTS TABLE default.`/any/path```: a probe of the host's filesystem.

chdb's ``default`` database is an ``Overlay`` holding a ``Filesystem`` database (clickhouse-local's): a
table name that is a path names that file. Reading it is refused in ``readonly = 1``
(``default: Cannot execute query in readonly mode``), but ``EXISTS`` (an allowed statement, identifiers
only, so the AST check passes it) asks the filesystem whether the path exists and answers 1 or 0:
which files and directories exist anywhere the process may stat (``/root/.ssh/id_rsa``, other
tenants' spool files, ``/proc/PID``), outside the engine's own tables.
"""

from __future__ import annotations

import requests
from conftest import free_port


def test_exists_does_not_probe_the_filesystem(stack_factory, tmp_path):
    stack = stack_factory(sql_port=free_port())
    present = tmp_path / "secret-key.pem"
    present.write_text("x")
    absent = tmp_path / "no-such-file"
    url = f"http://127.0.0.1:{stack.sql_port}/"

    def ask(path) -> str:
        r = requests.post(url, data=f"EXISTS TABLE default.`{path}`".encode(), timeout=30,
                          params={"database": stack.config.database})  # fmt: skip
        return f"{r.status_code} {r.text.strip()[:100]}"

    a, b = ask(present), ask(absent)
    assert not (a == "200 1" and b == "200 0"), (
        f"EXISTS answers whether a host file exists: {present} -> {a!r}, {absent} -> {b!r}"
    )
