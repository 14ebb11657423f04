"""The read-only ClickHouse HTTP endpoint over the embedded engine (exporter/sql.py), driven by real
clients: clickhouse-connect (ClickHouse's own Python client) and plain HTTP, against whole stacks in this
process (real loopback sockets, the real embedded engine) and a `meterhouse up` subprocess for
`meterhouse sql`."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import clickhouse_connect
import pytest
import requests
from conftest import drain, free_port
from otlp_builders import point, sum_request
from test_adv28_dedup_eviction import post

from meterhouse.core.config import Token

SEC = 10**9
ALL = "sql-all-orgs-token-0123456789"
SCOPED = "sql-scoped-token-0123456789"


def sql_stack(stack_factory, **kw):
    return stack_factory(sql_port=free_port(), **kw)


def ask(stack, query: str, method: str = "POST", **kw) -> requests.Response:
    url = f"http://127.0.0.1:{stack.sql_port}/"
    if method == "GET":
        return requests.get(url, params={"query": query, **kw.pop("params", {})}, timeout=60, **kw)
    return requests.post(url, data=query.encode(), timeout=60, **kw)


def test_clickhouse_connect_reads_what_was_ingested(stack_factory):
    stack = sql_stack(stack_factory)
    t = time.time_ns() - 60 * SEC
    post(stack, sum_request({"sql.calls": [point(v, {"org.id": f"org-{v % 3}"}, t_ns=t + v * SEC,
                                                 start_ns=t + (v - 1) * SEC) for v in range(1, 31)]}))  # fmt: skip
    drain(stack)
    want: dict[str, int] = {}
    for v in range(1, 31):
        want[f"org-{v % 3}"] = want.get(f"org-{v % 3}", 0) + v
    client = clickhouse_connect.get_client(
        host="127.0.0.1", port=stack.sql_port, database=stack.config.database
    )
    rows = client.query(
        "SELECT org_id, sum(value_int) FROM usage_points WHERE metric = {m:String} GROUP BY org_id ORDER BY org_id",
        parameters={"m": "sql.calls"},
    ).result_rows
    assert {o: int(v) for o, v in rows} == want
    hourly = client.query("SELECT sum(value_int) FROM usage_hourly WHERE metric = 'sql.calls'").result_rows
    assert int(hourly[0][0]) == sum(want.values())
    df = client.query_df("SELECT org_id, count() AS n FROM usage_points GROUP BY org_id ORDER BY org_id")
    assert list(df["n"]) == [10, 10, 10]
    tables = {r[0] for r in client.query("SHOW TABLES").result_rows}
    assert {"usage_points", "usage_hourly", "distribution_points"} <= tables
    assert client.query("DESCRIBE TABLE usage_points").result_rows[0][0] == "org_id"
    # The protocol as ClickHouse speaks it: /ping, default_format, a FORMAT clause, the database.
    assert requests.get(f"http://127.0.0.1:{stack.sql_port}/ping", timeout=10).text == "Ok.\n"
    r = ask(stack, "SELECT count() AS n FROM usage_points", params={"default_format": "JSONEachRow",
                                                                    "database": stack.config.database})  # fmt: skip
    assert (
        r.status_code == 200 and r.json() == {"n": 30} and r.headers["X-ClickHouse-Format"] == "JSONEachRow"
    )
    r = ask(stack, f"SELECT count() FROM {stack.config.database}.usage_points FORMAT JSON")
    assert int(r.json()["data"][0]["count()"]) == 30 and r.headers["Content-Type"].startswith(
        "application/json"
    )
    r = ask(stack, "SELECT 1 FROM no_such_table", params={"database": stack.config.database})
    assert r.status_code == 404 and r.headers["X-ClickHouse-Exception-Code"] == "60"
    assert r.text.startswith("Code: 60. DB::Exception:")
    r = ask(stack, "SELEC 1")
    assert r.status_code == 400 and r.headers["X-ClickHouse-Exception-Code"] == "62"


REFUSED = [
    "INSERT INTO usage_points (org_id) VALUES ('x')",
    "INSERT INTO usage_points SELECT * FROM usage_points",
    "CREATE TABLE t (a UInt8) ENGINE = Memory",
    "DROP TABLE usage_points",
    "TRUNCATE TABLE usage_points",
    "ALTER TABLE usage_points DELETE WHERE 1",
    "OPTIMIZE TABLE usage_points FINAL",
    "RENAME TABLE usage_points TO x",
    "SYSTEM STOP MERGES",
    "SYSTEM FLUSH LOGS",
    "KILL QUERY WHERE 1",
    "SET max_execution_time = 1000",
    "SET readonly = 0",
    "USE system",
    "SELECT 1 SETTINGS max_execution_time = 1000",
    "SELECT * FROM (SELECT 1 SETTINGS max_threads = 64)",
    "SELECT 1 UNION ALL SELECT 2 SETTINGS readonly = 0",
    "SELECT 1 INTO OUTFILE 'sql-endpoint-outfile.txt'",
    "SELECT file('/etc/hostname')",
    "SELECT arrayMap(x -> file(x), ['/etc/hostname'])",
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "SELECT * FROM s3('http://127.0.0.1:1/bucket/x.csv')",
    "SELECT * FROM remote('127.0.0.1:1', system.one)",
    "SELECT * FROM executable('id', 'TSV', 'a String')",
    "SELECT * FROM python(secret)",
    "SELECT * FROM Python(secret)",
    "SELECT * FROM mysql('127.0.0.1:1', 'a', 'b', 'c', 'd')",
    "SELECT * FROM postgresql('127.0.0.1:1', 'a', 'b', 'c', 'd')",
    "SELECT * FROM usage_points AS p JOIN file('/etc/hostname', 'LineAsString') AS f ON 1",
    "SELECT * FROM system.one WHERE 1 IN (SELECT * FROM file('/etc/hostname', 'LineAsString'))",
    "EXPLAIN QUERY TREE SELECT file('/etc/hostname')",
    "SELECT 1; DROP TABLE usage_points",
    # The engine runs each statement of ``a; b``: the second is never seen by a check of the first.
    "SELECT 1; SELECT file('/etc/hostname')",
    "SELECT 1 /* ; */; SELECT * FROM python(secret)",
    "CREATE DICTIONARY d (a UInt8) PRIMARY KEY a SOURCE(FILE(path '/etc/hostname' format 'TSV')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "SELECT 1 FROM system.one FORMAT TSV SETTINGS readonly = 0",
]


def test_every_write_escape_and_setting_change_is_refused_and_changes_nothing(stack_factory, tmp_path):
    stack = sql_stack(stack_factory)
    db = stack.config.database
    before = ask(stack, "SELECT count() FROM system.tables", params={"database": db}).text
    for query in REFUSED:
        for method in ("POST", "GET"):
            r = ask(stack, query, method=method, params={"database": db})
            assert r.status_code in (400, 403), (query, r.status_code, r.text)
            assert r.headers["X-ClickHouse-Exception-Code"] in ("62", "164"), (query, r.text)
            assert "/etc/hostname" not in r.text.split("DB::Exception:")[0]
            assert r.text.startswith("Code: "), (query, r.text)
    assert ask(stack, "SELECT count() FROM system.tables", params={"database": db}).text == before
    assert not list(tmp_path.rglob("sql-endpoint-outfile.txt"))
    # Settings as URL parameters are setting changes too.
    r = requests.get(f"http://127.0.0.1:{stack.sql_port}/", timeout=10,
                     params={"query": "SELECT 1", "max_execution_time": "100000"})  # fmt: skip
    assert r.status_code == 403 and r.headers["X-ClickHouse-Exception-Code"] == "164"
    # What stays allowed: table functions that reach nothing but the query, query parameters.
    r = ask(stack, "SELECT sum(number) FROM numbers(10)")
    assert r.status_code == 200 and r.text == "45\n"
    r = requests.post(f"http://127.0.0.1:{stack.sql_port}/", data=b"SELECT {s:String} AS s", timeout=10,
                      params={"param_s": "') FROM file('/etc/hostname", "default_format": "JSONEachRow"})  # fmt: skip
    assert r.status_code == 200 and r.json() == {"s": "') FROM file('/etc/hostname"}


def test_time_memory_and_result_size_are_bounded(stack_factory):
    stack = sql_stack(stack_factory, sql_timeout_s=1.0, memory_budget_bytes=1 << 30, sql_max_concurrent=1)
    r = ask(stack, "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 7")
    assert r.status_code == 500 and r.headers["X-ClickHouse-Exception-Code"] == "159", (
        r.text
    )  # TIMEOUT_EXCEEDED
    r = ask(stack, "SELECT * FROM numbers(1000000000)")
    assert r.headers["X-ClickHouse-Exception-Code"] in ("396", "159"), r.text  # result too large, or slow
    # The engine answered a handle's next query with the output of one that failed part-way: the next
    # query (on the one handle, sql_max_concurrent 1) gets its own answer.
    assert ask(stack, "SELECT 2").text == "2\n"
    r = ask(stack, "SELECT length(groupArray(number)) FROM numbers(100000000)")
    assert r.headers["X-ClickHouse-Exception-Code"] in ("241", "159"), r.text  # MEMORY_LIMIT_EXCEEDED
    assert ask(stack, "SELECT 1").text == "1\n"  # the handles are sound after each


def test_queries_past_the_concurrency_bound_are_answered_503_and_ingest_goes_on(stack_factory):
    stack = sql_stack(stack_factory, sql_max_concurrent=1, sql_timeout_s=8.0)
    slow: list[requests.Response] = []
    heavy = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 7"
    runner = threading.Thread(target=lambda: slow.append(ask(stack, heavy)))
    runner.start()
    time.sleep(1.5)
    r = ask(stack, "SELECT 1")
    assert r.status_code == 503 and r.headers["X-ClickHouse-Exception-Code"] == "202", r.text
    # Ingest is not held up by the query: a point is acknowledged and committed while it runs.
    t = time.time_ns() - 10 * SEC
    post(stack, sum_request({"sql.during": [point(5, {"org.id": "org-q"}, t_ns=t, start_ns=t - SEC)]}))
    drain(stack)
    assert runner.is_alive(), "the heavy query ended before the point was committed"
    runner.join(30)
    assert slow[0].headers["X-ClickHouse-Exception-Code"] == "159"
    r = ask(stack, "SELECT sum(value_int) FROM usage_points WHERE metric = 'sql.during'",
            params={"database": stack.config.database})  # fmt: skip
    assert r.text == "5\n"


def test_the_password_is_an_all_orgs_api_token(stack_factory):
    stack = sql_stack(stack_factory, auth_tokens=(Token(ALL, ("*",)), Token(SCOPED, ("org-1",))))
    url = f"http://127.0.0.1:{stack.sql_port}/"

    def status(headers=None, params=None) -> tuple[int, str]:
        r = requests.post(url, data=b"SELECT 1", headers=headers or {}, params=params or {}, timeout=10)
        return r.status_code, r.headers.get("X-ClickHouse-Exception-Code", "")

    basic = "Basic " + base64.b64encode(f"default:{ALL}".encode()).decode()
    assert status({"Authorization": basic}) == (200, "")
    assert status({"X-ClickHouse-User": "grafana", "X-ClickHouse-Key": ALL}) == (200, "")
    assert status(params={"user": "default", "password": ALL}) == (200, "")
    assert status() == (401, "516")
    assert status({"X-ClickHouse-Key": ALL + "x"}) == (401, "516")
    assert status({"Authorization": "Basic !!!"}) == (401, "516")
    assert status({"X-ClickHouse-Key": SCOPED}) == (403, "497")  # SQL cannot be scoped by org
    client = clickhouse_connect.get_client(host="127.0.0.1", port=stack.sql_port, username="grafana",
                                           password=ALL)  # fmt: skip
    assert client.query("SELECT 41 + 1").result_rows == [(42,)]
    with pytest.raises(Exception, match="516"):
        clickhouse_connect.get_client(host="127.0.0.1", port=stack.sql_port, password="wrong-token")
    # A reload (SIGHUP) replaces the endpoint's tokens as it does the API's.
    stack.reload(dataclasses.replace(stack.config, auth_tokens=(Token(SCOPED + "2", ("*",)),)))
    assert status({"X-ClickHouse-Key": ALL}) == (401, "516")
    assert status({"X-ClickHouse-Key": SCOPED + "2"}) == (200, "")


def test_meterhouse_sql_queries_a_running_server(up_factory):
    port = free_port()
    up = up_factory("--sql-port", str(port))
    body = sum_request({"cli.calls": [point(7, {"org.id": "org-cli"})]}).SerializeToString()
    r = requests.post(f"{up.otlp_http}/v1/metrics", data=body,
                      headers={"Content-Type": "application/x-protobuf"}, timeout=30)  # fmt: skip
    assert r.status_code == 200
    up.drain()
    cmd = [sys.executable, "-m", "meterhouse", "sql", "--sql-port", str(port)]
    done = subprocess.run([*cmd, "SELECT org_id, sum(value_int) AS total FROM usage_points GROUP BY org_id"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "org_id\ttotal\norg-cli\t7\n"
    done = subprocess.run([*cmd, "--format", "JSONEachRow", "--param", "o=org-cli",
                           "SELECT sum(value_int) AS t FROM usage_points WHERE org_id = {o:String}"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout == '{"t":7}\n', done.stderr
    done = subprocess.run([*cmd, "-"], input="DROP TABLE usage_points", capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 1 and "Code: 164" in done.stderr
    done = subprocess.run(
        [*cmd[:-1], str(free_port()), "SELECT 1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "no SQL endpoint answers" in done.stderr


def test_clickhouse_official_js_client_reads_and_is_refused_writes(stack_factory):
    """@clickhouse/client (pinned in tests/js/package-lock.json, installed by scripts/test.sh) on Node."""
    js = Path(__file__).parent.parent / "js"
    if shutil.which("node") is None or not (js / "node_modules" / "@clickhouse" / "client").exists():
        pytest.fail("node and tests/js's packages are needed: scripts/test.sh installs them (npm ci)")
    stack = sql_stack(stack_factory, auth_tokens=(Token(ALL, ("*",)),))
    t = time.time_ns() - 60 * SEC
    post(stack, sum_request({"js.calls": [point(v, {"org.id": f"org-js-{v % 2}"}, t_ns=t + v * SEC,
                                                start_ns=t + (v - 1) * SEC) for v in range(1, 11)]}))  # fmt: skip
    drain(stack)
    url = f"http://127.0.0.1:{stack.sql_port}"
    done = subprocess.run(["node", "sql.js", url, stack.config.database, ALL, "org-js-1"], cwd=js,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ping"] is True
    assert out["totals"] == [{"org_id": "org-js-0", "total": "30"}, {"org_id": "org-js-1", "total": "25"}]
    assert out["one"] == [{"total": "25"}]
    assert out["drop"] == "164" and out["url"] == "164"
    assert ask(stack, "EXISTS TABLE usage_points", params={"database": stack.config.database},
               headers={"X-ClickHouse-Key": ALL}).text == "1\n"  # fmt: skip


def test_every_runbook_query_runs_on_the_sql_endpoint(stack_factory):
    """docs/runbooks.md's `meterhouse sql "..."` commands, as an on-call engineer pastes them (placeholders
    filled), answer 200 against a running stack's endpoint: none names a table that does not exist."""
    runbooks = (Path(__file__).parent.parent.parent / "docs" / "runbooks.md").read_text()
    queries = re.findall(r'meterhouse sql "([^"]+)"', runbooks)
    assert len(queries) >= 4
    stack = sql_stack(stack_factory)
    for query in queries:
        r = ask(stack, query.replace("…", "org-1"), params={"database": stack.config.database})
        assert r.status_code == 200, (query, r.text)


LEGIT = [
    "SELECT a, count() FROM (SELECT number % 3 AS a FROM numbers(10)) GROUP BY a WITH ROLLUP ORDER BY a",
    "SELECT a, sum(a) OVER (PARTITION BY a % 2 ORDER BY a ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS s "
    "FROM (SELECT number AS a FROM numbers(5)) ORDER BY a",
    "WITH q AS (SELECT number AS a FROM numbers(3)) SELECT x.a FROM q AS x INNER JOIN q AS y ON x.a = y.a ORDER BY 1",
    "SELECT e FROM (SELECT [1, 2] AS arr) ARRAY JOIN arr AS e",
    "SELECT arrayMap(x -> x + 1, [1, 2]), CASE WHEN 1 > 0 THEN 'y' ELSE 'n' END, toString(1), INTERVAL 1 HOUR",
    "SELECT COLUMNS('org') FROM usage_points LIMIT 1",
    "SELECT * EXCEPT (attributes, resource) FROM usage_points LIMIT 1",
    "SELECT number FROM numbers(10) ORDER BY number LIMIT 1 BY number % 2",
    "SELECT 1 UNION ALL SELECT 2 INTERSECT SELECT 2",
    "SHOW CREATE TABLE usage_points",
]


def test_common_read_syntax_passes_the_node_allowlist(stack_factory):
    """The check refuses any AST node kind it does not know (one that hides its expressions, as APPLY's
    did, is not served unseen); what reads commonly use passes."""
    from meterhouse.exporter.sql import SqlError, check

    stack = sql_stack(stack_factory)
    for query in LEGIT:
        r = ask(stack, query, params={"database": stack.config.database})
        assert r.status_code == 200, (query, r.text)
    with pytest.raises(SqlError, match="SomeFutureNode"):
        check("SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  SomeFutureNode\n")
    with pytest.raises(SqlError, match="ColumnsApplyTransformer"):
        check("SelectWithUnionQuery (children 1)\n ExpressionList\n  Asterisk\n   ColumnsApplyTransformer\n")


def test_every_table_function_of_the_engine_but_the_allowed_is_refused(stack_factory):
    """Every table function the engine has (system.table_functions, asked of the endpoint itself), used
    in a FROM: refused unless it is one of the few that reach nothing (exporter/sql.py TABLE_FUNCTIONS)."""
    from meterhouse.exporter.sql import TABLE_FUNCTIONS

    stack = sql_stack(stack_factory)
    names = ask(stack, "SELECT name FROM system.table_functions ORDER BY name").text.split()
    assert len(names) > 50
    refused = 0
    for name in names:
        r = ask(stack, f"SELECT * FROM {name}('x') LIMIT 1")
        if name.lower() in TABLE_FUNCTIONS:
            continue
        assert r.status_code in (400, 403) and r.headers["X-ClickHouse-Exception-Code"] in ("164", "62"), (
            name,
            r.text,
        )
        refused += 1
    assert refused >= len(names) - len(TABLE_FUNCTIONS)
