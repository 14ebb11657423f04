"""The dashboards: generated JSON matches the sources, and every ClickHouse query runs on the real schema."""

import json
import re
import runpy
import time

import pytest
from usage_rows import put

from meterhouse.dashboards import build, load, render, sources
from meterhouse.dashboards.common import CLICKHOUSE, DATABASE, ClickHouseTarget

NOW = int(time.time())
FROM, TO = NOW - 7 * 86400, NOW + 3600


def test_committed_json_matches_the_sources(tmp_path):
    written = build(tmp_path)
    assert len(written) == 3
    for path in written:
        committed = sources()[0].parent / "json" / path.name
        assert committed.exists(), f"{path.name} is not committed: run `meterhouse dashboards build`"
        assert committed.read_text() == path.read_text(), (
            f"{path.name} drifted: run `meterhouse dashboards build`"
        )


def test_generation_is_deterministic():
    for src in sources():
        assert render(load(src)) == render(load(src))
        assert json.loads(render(load(src)))["uid"].startswith("meterhouse-")


def clickhouse_queries():
    """(dashboard, what, ClickHouseTarget) for every ClickHouse panel, variable and annotation."""
    out = []
    for src in sources():
        namespace = runpy.run_path(str(src))
        dashboard, name = namespace["dashboard"], src.name.removesuffix(".dashboard.py")
        for panel in dashboard.panels:
            out += [(name, panel.title, t) for t in panel.targets if isinstance(t, ClickHouseTarget)]
        variables = namespace.get("VARIABLES", {})
        for var in dashboard.templating.list:
            if var.dataSource == CLICKHOUSE:
                assert var.query == variables[var.name].rawSql
                out.append((name, f"variable {var.name}", variables[var.name]))
        for ann in dashboard.annotations.list:
            if ann.get("datasource") == CLICKHOUSE:
                out.append(
                    (
                        name,
                        f"annotation {ann['name']}",
                        ClickHouseTarget(ann["rawSql"], ("time", "title", "text", "tags")),
                    )
                )
    return out


def expand(sql: str, database: str, interval_s: int) -> str:
    """Grafana's macros and variables, as the ClickHouse plugin expands them, with concrete values."""
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 >= toDateTime({FROM}) AND \1 <= toDateTime({TO})", sql)
    sql = re.sub(
        r"\$__timeInterval\(([^)]+)\)",
        rf"toStartOfInterval(toDateTime(\1), INTERVAL {interval_s} second)",
        sql,
    )
    sql = sql.replace("$__interval_s", str(interval_s))
    sql = sql.replace("$__fromTime", f"toDateTime({FROM})").replace("$__toTime", f"toDateTime({TO})")
    for var, value in {"org": "org-a", "metric": "api.calls", "attribute": "feature"}.items():
        sql = sql.replace(f"${{{var}:singlequote}}", f"'{value}'")
    assert "$" not in sql, sql
    return sql.replace(f"{DATABASE}.", f"{database}.")


@pytest.fixture
def filled(store):
    hour = 3600 * 10**9
    now = time.time_ns()
    rows = []
    for h in range(0, 30):  # a steady day and a half for org-a and org-b; org-a spikes in the last full hour
        for org, v in (("org-a", 100), ("org-b", 10)):
            t = (now // hour - h) * hour + 60 * 10**9
            rows.append(
                {
                    "org_id": org,
                    "time": t,
                    "value_int": v * (50 if (org == "org-a" and h == 1) else 1),
                    "attrs": {"feature": "search" if h % 2 else "export", "region": "eu"},
                }
            )
    rows.append({"org_id": "org-quiet", "time": now - 3 * hour, "value_int": 5})
    rows.append({"org_id": "", "time": now - hour, "value_int": 7})
    put(store, rows)
    # A rollup row with no raw points behind it: the drift the reconciliation panel lists.
    store.client.command(f"""INSERT INTO {store.database}.usage_hourly (org_id, metric, hour, attributes_hash,
        attributes, unit, value_int, value_double, points)
        VALUES ('org-drift', 'api.calls', toDateTime({(now // hour - 1) * 3600}, 'UTC'), 1, map(), '', 3, 0, 1)""")
    store.client.insert(f"{store.database}.pipeline_events", [[now // 10**6 - 60_000], ["failover"], ["embedded#a"],
                        ["embedded#b"], ["2 consecutive failures"], [""]],
                        column_names=["time", "kind", "source", "target", "reason", "details"],
                        column_type_names=["DateTime64(3, 'UTC')", "String", "String", "String", "String", "String"],
                        column_oriented=True)  # fmt: skip
    return store


@pytest.mark.parametrize("interval_s", [60, 3600])
def test_every_clickhouse_query_runs_and_returns_its_columns(filled, interval_s):
    queries = clickhouse_queries()
    assert len(queries) >= 12
    for dash, what, target in queries:
        sql = expand(target.rawSql, filled.database, interval_s)
        result = filled.client.query(sql)
        assert tuple(result.column_names) == target.columns, (dash, what)
        assert result.result_rows, f"{dash} / {what} returned no rows from data that should show"
