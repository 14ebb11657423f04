"""Shared pieces of the dashboards: data sources, a ClickHouse target, panel helpers.

Table and column names come from the schema module, so a renamed column breaks the build (and the
test that runs every query), not a dashboard in production.
"""

from __future__ import annotations

import re

import attr
from grafanalib.core import GridPos, Stat, Table, Target, TimeSeries

from meterhouse.core import schema

DATABASE = "meterhouse"
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}

HOURLY = f"{DATABASE}.{schema.HOURLY_TABLE}"
POINTS = f"{DATABASE}.{schema.POINTS_TABLE}"
ORGS = f"{DATABASE}.{schema.ORGS_TABLE}"
CATALOG = f"{DATABASE}.{schema.CATALOG_TABLE}"
EVENTS = f"{DATABASE}.{schema.EVENTS_TABLE}"
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
            "queryType": "table" if self.table else "timeseries",
            "rawSql": self.rawSql,
            "refId": self.refId,
        }


def literal(sql: str, database: str = DATABASE, **values: str) -> str:
    """A shared query of the schema module with its bound parameters replaced by SQL expressions
    (Grafana cannot bind parameters): one definition serves the API, the gauges and the dashboards."""
    for name, expr in values.items():
        sql, n = re.subn(r"\{" + name + r":[^}]+\}", expr, sql)
        assert n, f"no parameter {name} in the query"
    assert not re.search(r"\{\w+:[^}]+\}", sql), f"unbound parameters left: {sql}"
    return sql


def prom(expr: str, legend: str = "", ref: str = "A") -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=PROMETHEUS)


def at(x: int, y: int, w: int, h: int) -> GridPos:
    return GridPos(h=h, w=w, x=x, y=y)


def series(
    title: str, targets: list, pos: GridPos, unit: str = "", datasource=PROMETHEUS, **kw
) -> TimeSeries:
    return TimeSeries(title=title, dataSource=datasource, targets=targets, gridPos=pos, unit=unit, **kw)


def stat(title: str, targets: list, pos: GridPos, unit: str = "none", datasource=PROMETHEUS, **kw) -> Stat:
    return Stat(title=title, dataSource=datasource, targets=targets, gridPos=pos, format=unit,
                reduceCalc="lastNotNull", **kw)  # fmt: skip


def table(title: str, target: ClickHouseTarget, pos: GridPos, **kw) -> Table:
    return Table(title=title, dataSource=CLICKHOUSE, targets=[target], gridPos=pos, **kw)
