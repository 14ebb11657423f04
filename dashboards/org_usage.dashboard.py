"""Org usage: one org's usage of one metric, over time, by attribute, month to date, and the top orgs.

Long ranges read the hourly rollup; ranges short enough for a step under an hour read raw points (the
two branches of the query are chosen by Grafana's interval). Every query filters on the leading
sort-key columns (org_id, metric, time).
"""

from grafanalib.core import Dashboard, Template, Templating, Time
from grafanalib.formatunits import NUMBER_FORMAT

from meterhouse.dashboards.common import (
    CATALOG,
    CLICKHOUSE,
    HOURLY,
    ORGS,
    POINTS,
    USAGE,
    ClickHouseTarget,
    at,
    series,
    stat,
    table,
)  # fmt: skip

ORG = "${org:singlequote}"
METRIC = "${metric:singlequote}"
ATTR = "${attribute:singlequote}"

usage_over_time = ClickHouseTarget(
    f"""SELECT $__timeInterval(hour) AS time, {USAGE} AS usage FROM {HOURLY}
WHERE $__interval_s >= 3600 AND org_id = {ORG} AND metric = {METRIC} AND $__timeFilter(hour)
GROUP BY time
UNION ALL
SELECT $__timeInterval(time) AS time, {USAGE} AS usage FROM {POINTS}
WHERE $__interval_s < 3600 AND org_id = {ORG} AND metric = {METRIC} AND kind = 'sum' AND $__timeFilter(time)
GROUP BY time
ORDER BY time""",
    ("time", "usage"),
)

total_in_range = ClickHouseTarget(
    f"""SELECT {USAGE} AS usage FROM {HOURLY}
WHERE org_id = {ORG} AND metric = {METRIC} AND $__timeFilter(hour)""",
    ("usage",),
    table=True,
)

by_attribute = ClickHouseTarget(
    f"""SELECT $__timeInterval(hour) AS time, attributes[{ATTR}] AS value, {USAGE} AS usage FROM {HOURLY}
WHERE org_id = {ORG} AND metric = {METRIC} AND $__timeFilter(hour)
GROUP BY time, value ORDER BY time, value""",
    ("time", "value", "usage"),
)

month_to_date = ClickHouseTarget(
    f"""SELECT
    sumIf(toFloat64(value_int) + value_double, hour >= toStartOfMonth(now())) AS month_to_date,
    sumIf(toFloat64(value_int) + value_double, hour >= toStartOfMonth(now()) - INTERVAL 1 MONTH
        AND hour < now() - INTERVAL 1 MONTH) AS last_month_to_same_day,
    sumIf(toFloat64(value_int) + value_double, hour >= toStartOfMonth(now()) - INTERVAL 1 MONTH
        AND hour < toStartOfMonth(now())) AS last_month
FROM {HOURLY}
WHERE org_id = {ORG} AND metric = {METRIC} AND hour >= toStartOfMonth(now()) - INTERVAL 1 MONTH""",
    ("month_to_date", "last_month_to_same_day", "last_month"),
    table=True,
)

top_orgs = ClickHouseTarget(
    f"""SELECT org_id, {USAGE} AS usage FROM {HOURLY}
WHERE metric = {METRIC} AND $__timeFilter(hour) AND org_id != ''
GROUP BY org_id ORDER BY usage DESC LIMIT 20""",
    ("org_id", "usage"),
    table=True,
)

VARIABLES = {
    "org": ClickHouseTarget(f"SELECT DISTINCT org_id FROM {ORGS} WHERE org_id != '' ORDER BY org_id", ("org_id",), table=True),
    "metric": ClickHouseTarget(f"SELECT DISTINCT metric FROM {CATALOG} WHERE kind = 'sum' ORDER BY metric", ("metric",), table=True),
    "attribute": ClickHouseTarget(
        f"""SELECT DISTINCT arrayJoin(mapKeys(attributes)) AS attribute FROM {HOURLY}
WHERE org_id = {ORG} AND metric = {METRIC} AND $__timeFilter(hour) ORDER BY attribute""",
        ("attribute",), table=True),
}  # fmt: skip

dashboard = Dashboard(
    title="meterhouse / Org usage",
    uid="meterhouse-org-usage",
    description="Exact usage of one org: over time, by attribute, month to date; and the largest orgs.",
    tags=["meterhouse"],
    timezone="utc",
    time=Time("now-7d", "now"),
    templating=Templating(
        list=[
            Template(name=name, label=name, query=target.rawSql, dataSource=CLICKHOUSE, refresh=2, sort=1)
            for name, target in VARIABLES.items()
        ]
    ),  # fmt: skip
    panels=[
        series(
            "Usage of $metric by $org",
            [usage_over_time],
            at(0, 0, 16, 9),
            NUMBER_FORMAT,
            datasource=CLICKHOUSE,
        ),
        stat("Total in range", [total_in_range], at(16, 0, 8, 4), NUMBER_FORMAT, datasource=CLICKHOUSE),
        table("Month to date against last month", month_to_date, at(16, 4, 8, 5)),
        series(
            "$metric by $attribute",
            [by_attribute],
            at(0, 9, 16, 9),
            NUMBER_FORMAT,
            datasource=CLICKHOUSE,
            stacking={"mode": "normal"},
        ),  # fmt: skip
        table("Top orgs by $metric", top_orgs, at(16, 9, 8, 9)),
    ],
).auto_panel_ids()
