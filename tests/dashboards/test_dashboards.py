"""The dashboards: generated JSON matches the sources, and every ClickHouse query runs on the real schema."""

import json
import re
import runpy
import time
from pathlib import Path

import pytest
from usage_rows import put

from meterhouse.core import schema
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
            if var.get("datasource") == CLICKHOUSE:
                assert var["query"] == variables[var["name"]].rawSql
                out.append((name, f"variable {var['name']}", variables[var["name"]]))
        annotations = namespace.get("ANNOTATIONS", {})
        for ann in dashboard.annotations.list:
            if ann.get("datasource") == CLICKHOUSE:
                assert ann["target"]["rawSql"] == annotations[ann["name"]].rawSql
                out.append((name, f"annotation {ann['name']}", annotations[ann["name"]]))
    return out


#: The org-health settings' hidden variables (read from the meterhouse_org_health_* gauges): their
#: defaults, as meterhouse exports them unless its flags change them.
SETTINGS = {
    "silent_after_s": "1800",
    "spike_factor": "5",
    "spike_baseline_hours": "24",
    "spike_min_usage": "100",
}


def expand(
    sql: str,
    database: str,
    interval_s: int,
    frm: int = FROM,
    to: int = TO,
    org: str = "org-a",
    settings: dict[str, str] = SETTINGS,
) -> str:
    """Grafana's macros and variables, as the ClickHouse plugin expands them, with concrete values."""
    for name, value in settings.items():
        sql = sql.replace(f"${{{name}}}", value)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 >= toDateTime({frm}) AND \1 <= toDateTime({to})", sql)
    sql = re.sub(
        r"\$__timeInterval\(([^)]+)\)",
        rf"toStartOfInterval(toDateTime(\1), INTERVAL {interval_s} second)",
        sql,
    )
    sql = sql.replace("$__interval_s", str(interval_s))
    sql = sql.replace("$__fromTime", f"toDateTime({frm})").replace("$__toTime", f"toDateTime({to})")
    for var, value in {"org": org, "metric": "api.calls", "attribute": "feature"}.items():
        sql = sql.replace(f"${{{var}:singlequote}}", f"'{value}'")
    sql = sql.replace(f"{DATABASE}.", f"{database}.")
    assert "$" not in sql, sql
    return sql


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
    rows.append({"org_id": "org-gone", "time": now - 48 * hour, "value_int": 5})  # silent for over 24 h
    rows.append({"org_id": "", "time": now - hour, "value_int": 7})
    put(store, rows)
    # A rollup row with no raw points behind it: the drift the reconciliation panel lists.
    store.client.command(f"""INSERT INTO {store.database}.usage_hourly (org_id, metric, hour, attributes_hash,
        unit, value_int, value_double, points)
        VALUES ('org-drift', 'api.calls', toDateTime({(now // hour - 1) * 3600}, 'UTC'), 1, '', 3, 0, 1)""")
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


def test_every_clickhouse_query_runs_through_the_sql_endpoint_as_grafana_sends_it(filled, stack_factory):
    """The embedded engine's SQL endpoint (README, "SQL endpoint") serves every dashboard query over
    ClickHouse's HTTP protocol, as Grafana's ClickHouse plugin speaks it, here by clickhouse-connect's HTTP
    client: the same columns and rows as the engine answers them directly."""
    import clickhouse_connect
    from conftest import free_port

    stack = stack_factory(sql_port=free_port(), database=filled.database)  # the tables it serves
    client = clickhouse_connect.get_client(host="127.0.0.1", port=stack.sql_port, database=filled.database)
    for interval_s in (60, 3600):
        for dash, what, target in clickhouse_queries():
            sql = expand(target.rawSql, filled.database, interval_s)
            direct = filled.client.query(sql)
            served = client.query(sql)
            assert tuple(served.column_names) == target.columns, (dash, what)
            assert served.result_rows == direct.result_rows, (dash, what)


def test_the_org_lists_use_the_settings_the_gauges_export(filled):
    """The silent and spiking lists take --silent-after-s, --spike-factor... from the gauges that export
    them (hidden Prometheus variables), not the defaults written into the dashboard (they disagreed with
    the gauges and alerts once a flag changed); without those gauges, the defaults."""
    from meterhouse.exporter import OrgHealth

    names = {m.name for m in OrgHealth(filled, __import__("prometheus_client").CollectorRegistry()).collect()}
    variables = {v["name"]: v for v in dashboards_json()["org_health"]["templating"]["list"]}
    for var in SETTINGS:
        gauge = re.search(r"max\((\w+)\{", variables[var]["definition"]).group(1)
        assert gauge in names and variables[var]["hide"] == 2, var
    spiking = [t for d, w, t in clickhouse_queries() if "over ${spike_factor}x" in w][0]

    def orgs(settings) -> set[str]:
        return {
            r[0]
            for r in filled.client.query(
                expand(spiking.rawSql, filled.database, 3600, settings=settings)
            ).result_rows
        }

    assert "org-a" in orgs(SETTINGS)  # 50x its baseline
    assert "org-a" not in orgs({**SETTINGS, "spike_factor": "60"})
    assert orgs(dict.fromkeys(SETTINGS, "")) == orgs(SETTINGS)  # no gauge: the defaults


def test_every_query_names_its_tables_through_the_database_variable():
    """``--database foo`` must not break the dashboards: no query names the default database."""
    for name, dash in dashboards_json().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["database"]["query"] == "meterhouse", name
        text = json.dumps(dash)
        assert "meterhouse." not in text.replace("meterhouse.dashboards", ""), name
        for url in re.findall(r'"url": "(/d/[^"]*)"', text):
            assert "${database:queryparam}" in url and "${clickhouse:queryparam}" in url, (name, url)


# -- JSON shape: what Grafana 11 and the ClickHouse plugin (4.x) read --------------------------------
def dashboards_json() -> dict[str, dict]:
    return {src.name.removesuffix(".dashboard.py"): json.loads(render(load(src))) for src in sources()}


def _datasources(node):
    if isinstance(node, dict):
        if "datasource" in node:
            yield node["datasource"]
        for v in node.values():
            yield from _datasources(v)
    elif isinstance(node, list):
        for v in node:
            yield from _datasources(v)


def test_datasources_are_variables_not_hard_coded_uids():
    for name, d in dashboards_json().items():
        kinds = {v["query"]: v["name"] for v in d["templating"]["list"] if v["type"] == "datasource"}
        assert kinds == {"prometheus": "prometheus", "grafana-clickhouse-datasource": "clickhouse"}, name
        for ds in _datasources(d):
            assert isinstance(ds, dict) and ds["uid"] in ("${prometheus}", "${clickhouse}"), (name, ds)


def test_current_schema_version_units_and_data_points():
    for name, d in dashboards_json().items():
        assert d["schemaVersion"] == 39, name  # Grafana 11.1, the pinned image
        for panel in d["panels"]:
            unit = panel["fieldConfig"]["defaults"].get("unit")
            assert unit and unit != "none", f"{name} / {panel['title']}: no unit"
            limit = 100 if panel["type"] in ("stat", "table") else 1000
            assert panel.get("maxDataPoints") == limit, f"{name} / {panel['title']}"


def test_every_clickhouse_target_has_the_shape_the_plugin_reads():
    for d in dashboards_json().values():
        for panel in d["panels"]:
            for t in panel["targets"]:
                if t["datasource"]["type"] != "grafana-clickhouse-datasource":
                    assert t["datasource"]["type"] == "prometheus" and t["expr"] and t["refId"], panel[
                        "title"
                    ]
                    continue
                assert t["editorType"] == "sql" and t["rawSql"].strip() and t["refId"], panel["title"]
                assert (t["format"], t["queryType"]) in ((0, "timeseries"), (1, "table")), panel["title"]
                configs = {x["options"]["configRefId"] for x in panel.get("transformations", [])
                           if x["id"] == "configFromData"}  # fmt: skip
                table = panel["type"] in ("stat", "table") or t["refId"] in configs
                assert t["format"] == (1 if table else 0), panel["title"]


def test_usage_panels_take_the_metrics_unit_from_the_catalog(filled):
    """Usage showed as a plain number whatever its unit ("4.49 Bil" bytes): each usage panel reads the
    metric's unit from the catalog (refId U) and Grafana's "Config from query results" applies it to
    its number fields; OpenTelemetry's units map to Grafana's ids, anything else is a plain number."""
    dash = dashboards_json()["org_usage"]
    for panel in dash["panels"]:
        (config,) = [x for x in panel["transformations"] if x["id"] == "configFromData"]
        assert config["options"]["configRefId"] == "U"
        assert config["options"]["mappings"] == [{"fieldName": "unit", "handlerKey": "unit"}]
        (unit,) = [t for t in panel["targets"] if t["refId"] == "U"]
    hour = (time.time_ns() // 3600 // 10**9) * 3600 * 10**9
    for metric, otel, grafana in (("egress.bytes", "By", "bytes"), ("cpu.time", "ms", "ms"),
                                  ("api.hits", "{request}", "short")):  # fmt: skip
        put(filled, [{"org_id": "org-u", "metric": metric, "unit": otel, "time": hour, "value_int": 1}])
        sql = expand(unit["rawSql"], filled.database, 3600).replace("'api.calls'", f"'{metric}'")
        assert filled.client.query(sql).result_rows == [(grafana,)], metric


def test_annotations_carry_a_target_the_plugin_runs():
    """The plugin runs ``annotation.target`` and skips an annotation without one: a top-level rawSql never
    ran (only a legacy ``rawQuery`` is migrated)."""
    seen = 0
    for name, d in dashboards_json().items():
        for ann in d["annotations"]["list"]:
            if ann["datasource"]["type"] != "grafana-clickhouse-datasource":
                continue
            seen += 1
            assert "rawSql" not in ann and "rawQuery" not in ann, name
            assert ann["enable"] and ann["name"] and ann["iconColor"]
            target = ann["target"]
            assert target["editorType"] == "sql" and target["refId"] == "annotation"
            assert re.match(r"SELECT time\b", target["rawSql"]) and " AS title" in target["rawSql"]
    assert seen >= 1


def test_variables_are_cheap_and_the_org_is_picked_or_typed():
    """The org: the 1,000 orgs with the most points, busiest first (the dashboard opens on one, with
    data; a textbox opened empty, "No data"), any other typed in; from the orgs table (one row an org),
    never a SELECT DISTINCT over raw points."""
    d = dashboards_json()
    org = {v["name"]: v for v in d["org_usage"]["templating"]["list"]}["org"]
    assert org["type"] == "query" and org["allowCustomValue"] and org["sort"] == 0
    assert "LIMIT 1000" in org["query"] and "org_last_seen" in org["query"]
    for name, dash in d.items():
        for v in dash["templating"]["list"]:
            if v["type"] == "query" and v["datasource"]["type"] == "grafana-clickhouse-datasource":
                assert v["refresh"] == 1 and "LIMIT" in v["query"], (name, v["name"])
        if name != "org_usage":
            names = [v["name"] for v in dash["templating"]["list"]]
            assert {"job", "instance"} <= set(names), name
            for panel in dash["panels"]:
                for t in panel["targets"]:
                    if "expr" in t and "meterhouse" in t["expr"]:
                        assert "$job" in t["expr"], (name, panel["title"])


def test_rankings_link_to_the_org_dashboard():
    linked = 0
    for d in dashboards_json().values():
        for panel in d["panels"]:
            sql = " ".join(t.get("rawSql", "") for t in panel["targets"])
            if panel["type"] == "table" and re.match(r"\s*SELECT org_id\b", sql):
                links = [p for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "org_id"
                         for p in o["properties"] if p["id"] == "links"]  # fmt: skip
                assert links and "/d/meterhouse-org-usage/" in links[0]["value"][0]["url"], panel["title"]
                assert "var-org=${__value.raw}" in links[0]["value"][0]["url"]
                linked += 1
    assert linked >= 4


def _top_level_branches(sql: str) -> list[str]:
    depth, start, out, i = 0, 0, [], 0
    while i < len(sql):
        c = sql[i]
        depth += c == "("
        depth -= c == ")"
        if depth == 0 and sql.startswith("UNION ALL", i):
            out.append(sql[start:i])
            start = i + len("UNION ALL")
        i += 1
    return [*out, sql[start:]]


def test_union_all_orders_both_branches_and_usage_is_half_open():
    for dash, what, target in clickhouse_queries():
        branches = _top_level_branches(target.rawSql)
        if len(branches) > 1:
            assert all("ORDER BY" in b for b in branches), (dash, what)
        # $__timeFilter is closed at both ends ([from, to]); summed usage must be [from, to).
        assert "$__timeFilter" not in target.rawSql, (dash, what)


def test_total_in_range_equals_the_half_open_sum_on_unaligned_ranges(store):
    """A range that starts and ends inside an hour: the panel sums exactly the points in [from, to), like
    the API; the closed $__timeFilter on hour buckets dropped the partial first hour and added the hour
    starting at `to`."""
    hour = 3600
    base = (int(time.time()) // hour - 10) * hour
    rows = [{"org_id": "org-t", "time": (base + m * 600) * 10**9, "value_int": 1 + m} for m in range(6 * 8)]
    put(store, rows)
    namespace = runpy.run_path(str(next(s for s in sources() if s.name.startswith("org_usage"))))
    for frm, to in ((base + 1800, base + 5 * hour + 1200), (base + hour, base + 3 * hour), (base + 600, base + 1800),
                    (base + 3000, base + hour + 1)):  # fmt: skip
        expected = sum(r["value_int"] for r in rows if frm * 10**9 <= r["time"] < to * 10**9)
        sql = expand(namespace["total_in_range"].rawSql, store.database, 3600, frm, to, org="org-t")
        assert store.client.query(sql).result_rows[0][0] == expected, (frm - base, to - base)


# -- cross-org panels: served from tables ordered for them, proved by ClickHouse's own plan ----------
def granules(store, sql: str) -> tuple[int, int]:
    """(selected, total) granules of the primary-key step of ``EXPLAIN indexes = 1``, summed over tables."""
    plan = "\n".join(r[0] for r in store.client.query(f"EXPLAIN indexes = 1 {sql}").result_rows)
    keys = re.findall(r"PrimaryKey.*?Granules: (\d+)/(\d+)", plan, re.S)
    assert keys, plan
    return sum(int(s) for s, _ in keys), sum(int(t) for _, t in keys)


def test_cross_org_panels_read_only_the_granules_of_their_hours(store):
    """The top-orgs, biggest-orgs and attribute-cardinality panels read a few granules of the tables
    ordered for them, where the same rankings on the org-first rollup read every granule."""
    hour = 3600 * 10**9
    start = (time.time_ns() // hour - 48) * hour
    rows = [
        {"org_id": f"org-{o:03}", "metric": f"metric.{m:02}", "time": start + h * hour + 60 * 10**9,
         "value_int": 1 + o, "attrs": {"feature": f"f{o % 7}"}}
        for m in range(30) for h in range(48) for o in range(50)
    ]  # fmt: skip
    put(store, rows)
    frm, to = int((start + 40 * hour) / 10**9), int((start + 46 * hour) / 10**9)
    usage = runpy.run_path(str(next(s for s in sources() if s.name.startswith("org_usage"))))
    health = runpy.run_path(str(next(s for s in sources() if s.name.startswith("org_health"))))
    top = expand(usage["top_orgs"].rawSql, store.database, 3600, frm, to).replace(
        "'api.calls'", "'metric.07'"
    )
    # The same ranking on the org-first rollup reads every granule (the old panel).
    old = top.replace(
        f"{store.database}.{schema.METRIC_ORGS_TABLE}", f"{store.database}.{schema.HOURLY_TABLE}"
    )
    old_selected, old_total = granules(store, old)
    assert old_selected == old_total >= 8, (old_selected, old_total)
    queries = {"top orgs": top} | {
        panel: expand(health[panel].rawSql, store.database, 3600, frm, to)
        for panel in ("biggest_orgs_by_series", "attribute_cardinality")
    }
    for panel, sql in queries.items():
        selected, _ = granules(store, sql)
        assert selected * 4 <= old_total, (panel, selected, old_total)
    # And they answer what the rollup answers.
    assert store.client.query(top).result_rows == store.client.query(old).result_rows
    assert store.client.query(top).result_rows[0] == ("org-049", 6 * 50.0)


def test_every_panel_and_derived_table_is_the_same_on_the_embedded_engine_as_with_the_views(store):
    """The embedded engine fills the orgs, the catalog and the attribute sets from the writer and the
    attribute cardinality by a job, where a server's views fill them per insert: the same rows written to
    both give every panel the same answer, and every derived table the same content."""
    from meterhouse.core.store import Store

    views = Store(store.client, store.database + "_views", "http://views")  # a server's schema
    views.ensure_schema()
    hour = 3600 * 10**9
    now = time.time_ns()
    rows = [
        {"org_id": f"org-{o}", "metric": ("api.calls", "egress.bytes", "temp")[m],
         "kind": (schema.KIND_SUM, schema.KIND_SUM, schema.KIND_GAUGE)[m], "unit": ("{call}", "By", "Cel")[m],
         "time": (now // hour - h) * hour + (o * 7 + m) * 10**9, "value_int": 1 + o * h + m,
         "attrs": {"feature": f"f{(o + h) % 3}", "region": ("eu", "us")[o % 2], **({"plan": "pro"} if h % 4 else {})}}
        for o in range(12) for m in range(3) for h in range(0, 30, 2)
    ]  # fmt: skip
    try:
        for target in (store, views):
            for part in (rows[::3], rows[1::3], rows[2::3]):  # three groups, sets repeated across them
                put(target, part)
        frm, to = int((now - 26 * hour) / 10**9), int(now / 10**9)
        queries = clickhouse_queries()
        for dash, what, target in queries:
            for interval_s in (60, 3600):
                got = store.client.query(
                    expand(target.rawSql, store.database, interval_s, frm, to)
                ).result_rows
                want = views.client.query(
                    expand(target.rawSql, views.database, interval_s, frm, to)
                ).result_rows
                assert sorted(map(repr, got)) == sorted(map(repr, want)), (dash, what)
        tables = {
            schema.ORGS_TABLE: "SELECT org_id, min(first_seen), max(last_seen), sum(points) FROM {t} GROUP BY 1",
            schema.CATALOG_TABLE: "SELECT metric, kind, max(last_seen), sum(points), any(unit) FROM {t} GROUP BY 1, 2",
            schema.ATTRIBUTE_SETS_TABLE: "SELECT DISTINCT org_id, metric, attr_keys, attr_values FROM {t}",
            schema.ATTRIBUTE_CARDINALITY_TABLE: "SELECT metric, hour, key, uniqExactMerge(distinct_values), "
            "uniqExactMerge(orgs) FROM {t} GROUP BY 1, 2, 3",
        }  # fmt: skip
        for table, sql in tables.items():
            got = sorted(store.rows(sql.format(t=f"{store.database}.{table}")))
            want = sorted(views.rows(sql.format(t=f"{views.database}.{table}")))
            assert got == want and len(got) >= 3, table
    finally:
        store.client.command(f"DROP DATABASE IF EXISTS {views.database} SYNC")


def test_grafanas_own_typed_model_reads_every_dashboard():
    """grafana-foundation-sdk (Grafana's generated model of the dashboard schema) reads each JSON whole:
    grafanalib's null members made ``Dashboard.from_json`` fail on all three."""
    from grafana_foundation_sdk.models.dashboard import Dashboard as Model

    for name, dash in dashboards_json().items():
        model = Model.from_json(dash)
        assert len(model.panels or []) == len(dash["panels"]), name
        assert model.uid == dash["uid"] and model.title == dash["title"], name


def test_every_stat_has_thresholds_and_those_an_alert_watches_are_the_alerts_levels():
    """No stat shows a bad number in green: each has thresholds (a neutral colour for a plain count), and
    the numbers an alert watches change colour exactly at the alert's levels (alerts/*.rules.yml)."""
    from meterhouse.dashboards import common

    rules = "".join(p.read_text() for p in (Path(__file__).parents[2] / "alerts").glob("*.rules.yml"))
    for alert, level in [
        ("MeterhouseIngestionLagHigh", common.LAG_WARNING_S),
        ("MeterhouseIngestionLagCritical", common.LAG_CRITICAL_S),
        ("MeterhouseSpoolBacklogOld", common.BACKLOG_WARNING_S),
        ("MeterhouseSpoolBacklogCritical", common.BACKLOG_CRITICAL_S),
        ("MeterhouseSpoolNearFull", common.SPOOL_WARNING),
    ]:
        expr = re.search(rf"alert: {alert}\n\s+expr: (.+)", rules)
        assert expr and expr.group(1).rstrip().endswith(f"> {level}"), (alert, expr and expr.group(1))
    found = {}
    for name, dash in dashboards_json().items():
        for panel in dash["panels"]:
            if panel["type"] != "stat":
                continue
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert isinstance(steps, list) and steps and steps[0]["value"] is None, (name, panel["title"])
            found[panel["title"]] = [s["value"] for s in steps[1:]]
    assert found["p99 ingest lag"] == [common.LAG_WARNING_S, common.LAG_CRITICAL_S]
    assert found["Oldest spooled point"] == [common.BACKLOG_WARNING_S, common.BACKLOG_CRITICAL_S]
    assert found["Spool used"] == [common.SPOOL_WARNING, 1.0]


def test_no_dashboard_refreshes_faster_than_30_seconds():
    """grafanalib's default refresh (10 s) had the org usage dashboard re-read raw points every 10 s."""
    allowed = {"30s": 30, "1m": 60, "5m": 300, "15m": 900}
    for name, dash in dashboards_json().items():
        assert dash["refresh"] in allowed, (name, dash["refresh"])


def test_every_panel_says_what_it_shows():
    """A description on every panel (Grafana's (i)): what it shows, and the alert that watches it."""
    for name, dash in dashboards_json().items():
        for panel in dash["panels"]:
            assert len(panel.get("description", "")) >= 20, (name, panel["title"])


def test_a_dashboard_reading_recording_rules_says_so_where_it_is_imported():
    """Imported elsewhere, a dashboard on recording rules the JSON does not carry showed empty panels:
    its description names the rules it needs, and every series it reads is defined there."""
    rules_dir = Path(__file__).parents[2] / "alerts"
    defined = set(re.findall(r"record: (\S+)", "".join(p.read_text() for p in rules_dir.glob("*.rules.yml"))))
    for name, dash in dashboards_json().items():
        used = set()
        for panel in dash["panels"]:
            for t in panel["targets"]:
                used |= set(
                    re.findall(r"\b((?:instance|job|instance_reason)[a-z_]*:[a-z0-9_:]+)", t.get("expr", ""))
                )
        assert used <= defined, (name, used - defined)
        if used:
            assert "recording rules" in dash["description"], name
