"""Shared pieces of the dashboards: data sources, a ClickHouse target, panel helpers.

Table and column names come from the schema module, so a renamed column breaks the build (and the
test that runs every query), not a dashboard in production.
"""

from __future__ import annotations

import re
from typing import Any

import attr
from grafanalib.core import GridPos, Stat, Table, Target, TimeSeries

from meterhouse.core import schema

#: Every query names its tables in the database of the ``database`` variable (``--database``; default
#: meterhouse), so the JSON serves any install.
DATABASE = "${database}"
DEFAULT_DATABASE = "meterhouse"
#: Data sources are dashboard variables, so the JSON imports into any Grafana (no hard-coded uid).
PROMETHEUS = {"type": "prometheus", "uid": "${prometheus}"}
CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "${clickhouse}"}
#: Unit of counts and usage (metric units vary): short numbers (1.2 K, 3.4 Mil).
COUNT = "short"
#: The dashboard JSON schema version of the pinned Grafana (11.1).
SCHEMA_VERSION = 39
#: The ClickHouse plugin version the targets are written for (pinned in docker-compose.yml).
CLICKHOUSE_PLUGIN_VERSION = "4.3.2"
#: What a dashboard whose panels read recording rules says of them where it is imported (its description).
NEEDS_RULES = (
    " Needs meterhouse's recording rules (alerts/*.rules.yml, also shipped in the Python package) "
    "loaded in the Prometheus it reads: panels on `instance:`/`job:` series are empty without them."
)
#: Prometheus selector of the job and instance variables.
SELECTOR = 'job=~"$job",instance=~"$instance"'

HOURLY = f"{DATABASE}.{schema.HOURLY_TABLE}"
POINTS = f"{DATABASE}.{schema.POINTS_TABLE}"
ORGS = f"{DATABASE}.{schema.ORGS_TABLE}"
CATALOG = f"{DATABASE}.{schema.CATALOG_TABLE}"
EVENTS = f"{DATABASE}.{schema.EVENTS_TABLE}"
#: Cross-org rankings read these, ordered by metric and hour, not the org-first rollup.
METRIC_ORGS = f"{DATABASE}.{schema.METRIC_ORGS_TABLE}"
ATTRIBUTE_CARDINALITY = f"{DATABASE}.{schema.ATTRIBUTE_CARDINALITY_TABLE}"
ATTRIBUTE_SETS = f"{DATABASE}.{schema.ATTRIBUTE_SETS_TABLE}"
#: Usage as one number per row (integer sums exactly in Int128; shown as a double in panels).
USAGE = "sum(toFloat64(value_int) + value_double)"


@attr.s
class ClickHouseTarget:
    """A query for the grafana-clickhouse-datasource plugin (SQL editor).

    ``columns`` names what the query must return; the test suite runs every query against the real
    schema and checks them. It is not part of the dashboard JSON.
    """

    rawSql: str = attr.ib()
    columns: tuple[str, ...] = attr.ib()
    refId: str = attr.ib(default="A")
    table: bool = attr.ib(default=False)

    def to_json_data(self) -> dict:
        return {
            "datasource": CLICKHOUSE,
            "editorType": "sql",
            "format": 1 if self.table else 0,  # 1 = table, 0 = time series
            "pluginVersion": CLICKHOUSE_PLUGIN_VERSION,
            "queryType": "table" if self.table else "timeseries",
            "rawSql": self.rawSql,
            "refId": self.refId,
        }


def datasource_variables() -> list[dict]:
    """One variable per data source type: the panels reference ``${prometheus}`` and ``${clickhouse}``;
    and the ClickHouse database meterhouse writes to (``--database``)."""
    return [
        {"name": name, "label": label, "type": "datasource", "query": plugin, "hide": 0, "refresh": 1,
         "regex": "", "current": {}, "options": []}
        for name, label, plugin in (("prometheus", "Prometheus", "prometheus"),
                                    ("clickhouse", "ClickHouse", "grafana-clickhouse-datasource"))
    ] + [textbox_variable("database", "database", DEFAULT_DATABASE)]  # fmt: skip


def job_instance_variables() -> list[dict]:
    """The meterhouse job and instance(s) the Prometheus panels show (``SELECTOR``)."""

    def var(name: str, query: str, **kw) -> dict:
        return {"name": name, "label": name, "type": "query", "datasource": PROMETHEUS,
                "query": {"query": query, "refId": f"{name}-variable", "qryType": 1},
                "definition": query, "refresh": 2, "sort": 1, "hide": 0, "regex": "", "current": {},
                "options": [], **kw}  # fmt: skip

    return [
        var("job", "label_values(meterhouse_build_info, job)", includeAll=False, multi=False),
        var("instance", 'label_values(meterhouse_build_info{job=~"$job"}, instance)',
            includeAll=True, multi=True, allValue=".*"),
    ]  # fmt: skip


def settings_variable(name: str, gauge: str) -> dict:
    """A hidden variable holding a meterhouse setting, read from the gauge that exports it (the value of
    ``query_result``'s line ``{} VALUE TIMESTAMP``), so that a ClickHouse list uses the setting the
    Prometheus gauge and alerts use."""
    query = f"query_result(max({gauge}{{{SELECTOR}}}))"
    return {"name": name, "label": name, "type": "query", "datasource": PROMETHEUS,
            "query": {"query": query, "refId": f"{name}-variable", "qryType": 3}, "definition": query,
            "refresh": 2, "hide": 2, "regex": "/ ([-+0-9.eE]+) [0-9]+$/", "current": {}, "options": [],
            "includeAll": False, "multi": False}  # fmt: skip


def clickhouse_variable(name: str, target: ClickHouseTarget, label: str = "", sort: int = 1) -> dict:
    """A query variable of the ClickHouse plugin: refreshed once on load (``refresh: 1``); ``sort`` 0
    keeps the query's order, 1 sorts alphabetically. Any value can be typed in (``allowCustomValue``)."""
    return {"name": name, "label": label or name, "type": "query", "datasource": CLICKHOUSE,
            "query": target.rawSql, "definition": target.rawSql, "refresh": 1, "sort": sort, "hide": 0,
            "includeAll": False, "multi": False, "allowCustomValue": True, "regex": "", "current": {},
            "options": []}  # fmt: skip


def textbox_variable(name: str, label: str, default: str = "") -> dict:
    return {"name": name, "label": label, "type": "textbox", "query": default, "hide": 0,
            "current": {"text": default, "value": default}, "options": []}  # fmt: skip


def clickhouse_annotation(name: str, target: ClickHouseTarget, color: str = "red") -> dict:
    """An annotation the ClickHouse plugin runs: it reads ``target`` (editorType, rawSql, refId) and skips
    an annotation without one."""
    t = target.to_json_data()
    query = {k: t[k] for k in ("editorType", "format", "pluginVersion", "rawSql")} | {"refId": "annotation"}
    return {"name": name, "datasource": CLICKHOUSE, "enable": True, "hide": False, "iconColor": color,
            "target": query}  # fmt: skip


ORG_USAGE_UID = "meterhouse-org-usage"


def org_link(field: str = "org_id", metric: bool = False) -> dict:
    """A field override linking each org of a ranking to the org usage dashboard: the same time range,
    data source and database, and (``metric``) the same metric. Grafana percent-encodes the values it
    puts in a data link (``${__value.raw}`` included) and ``:queryparam`` writes ``var-name=value``."""
    carried = ["${__url_time_range}", "${clickhouse:queryparam}", "${database:queryparam}"]
    if metric:
        carried.append("${metric:queryparam}")
    url = f"/d/{ORG_USAGE_UID}/?var-org=${{__value.raw}}&" + "&".join(carried)
    links = [{"title": "Usage of this org", "url": url}]
    return {"matcher": {"id": "byName", "options": field}, "properties": [{"id": "links", "value": links}]}


def literal(sql: str, database: str = DATABASE, **values: str) -> str:
    """A shared query of the schema module with its bound parameters replaced by SQL expressions
    (Grafana cannot bind parameters): one definition serves the API, the gauges and the dashboards."""
    for name, expr in values.items():
        sql, n = re.subn(r"\{" + name + r":[^}]+\}", expr, sql)
        assert n, f"no parameter {name} in the query"
    assert not re.search(r"\{\w+:[^}]+\}", sql), f"unbound parameters left: {sql}"
    return sql


def described(dashboard: Any, descriptions: dict[str, str]) -> Any:
    """Every panel with its description (what it shows, and the alert that watches it), by title."""
    titles = [p.title for p in dashboard.panels]
    assert sorted(titles) == sorted(descriptions), set(titles) ^ set(descriptions)
    for panel in dashboard.panels:
        panel.description = descriptions[panel.title]
    return dashboard


def prom(expr: str, legend: str = "", ref: str = "A") -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=PROMETHEUS)


def at(x: int, y: int, w: int, h: int) -> GridPos:
    return GridPos(h=h, w=w, x=x, y=y)


def series(title: str, targets: list, pos: GridPos, unit: str, datasource=PROMETHEUS, **kw) -> TimeSeries:
    """A time series with one unit (one quantity per axis)."""
    assert unit, f"{title}: every panel has a unit"
    kw.setdefault("maxDataPoints", 1000)
    return TimeSeries(title=title, dataSource=datasource, targets=targets, gridPos=pos, unit=unit, **kw)


#: The thresholds of the alerts a stat shows (alerts/*.rules.yml; a test holds the two equal): the stat
#: turns orange where the warning fires and red where the critical one does.
LAG_WARNING_S, LAG_CRITICAL_S = 60, 600  # MeterhouseIngestionLagHigh, MeterhouseIngestionLagCritical
BACKLOG_WARNING_S, BACKLOG_CRITICAL_S = 300, 1800  # MeterhouseSpoolBacklogOld, MeterhouseSpoolBacklogCritical
SPOOL_WARNING = 0.8  # MeterhouseSpoolNearFull; past 1.0 the spool answers 503
NON_PRIMARY = 1  # MeterhouseWritingToNonPrimary: any endpoint but the first
#: A count with no good or bad value: one neutral colour.
NEUTRAL: list[tuple[float | None, str]] = [(None, "blue")]


def steps(*levels: tuple[float | None, str]) -> dict:
    """Grafana's absolute thresholds: the base colour (``None``), then each level and its colour."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in levels]}


def stat(
    title: str,
    targets: list,
    pos: GridPos,
    unit: str,
    datasource=PROMETHEUS,
    thresholds: list[tuple[float | None, str]] = NEUTRAL,
    **kw,
) -> Stat:
    """A single number: few data points are enough; coloured by ``thresholds`` (the alerts' own levels
    where an alert watches the number; neutral for a plain count)."""
    assert unit, f"{title}: every panel has a unit"
    assert thresholds and thresholds[0][0] is None, f"{title}: thresholds start with a base colour"
    panel = Stat(title=title, dataSource=datasource, targets=targets, gridPos=pos, format=unit,
                 reduceCalc="lastNotNull", maxDataPoints=100, colorMode="value", **kw)  # fmt: skip
    panel.thresholds = steps(*thresholds)["steps"]
    return panel


def table(
    title: str,
    target: ClickHouseTarget,
    pos: GridPos,
    unit: str,
    more: tuple[ClickHouseTarget, ...] = (),
    **kw,
) -> Table:
    """A ClickHouse table; ``more`` queries beside its own (a unit read from the catalog)."""
    return Table(title=title, dataSource=CLICKHOUSE, targets=[target, *more], gridPos=pos, unit=unit, **kw)
