"""Org usage: one org's usage of one metric, over time, by attribute, month to date, and the top orgs.

Long ranges read the hourly rollup; ranges short enough for a step under an hour read raw points (the
two branches of the query are chosen by Grafana's interval). Every query filters on the leading
sort-key columns (org_id, metric, time).
"""

from grafanalib.core import Dashboard, Templating, Time

from meterhouse.core import schema
from meterhouse.dashboards.common import (
    ATTRIBUTE_SETS,
    CATALOG,
    CLICKHOUSE,
    COUNT,
    HOURLY,
    METRIC_ORGS,
    ORG_USAGE_UID,
    ORGS,
    POINTS,
    SCHEMA_VERSION,
    USAGE,
    ClickHouseTarget,
    at,
    clickhouse_variable,
    datasource_variables,
    described,
    org_link,
    series,
    stat,
    table,
)  # fmt: skip

ORG = "${org:singlequote}"
METRIC = "${metric:singlequote}"
ATTR = "${attribute:singlequote}"

# Usage is summed over the half-open range [from, to), as the API does. Time series show every hour that
# overlaps the range (hour >= toStartOfHour(from)); exact totals split it at whole hours (below).
HOURS = "hour >= toStartOfHour($__fromTime) AND hour < $__toTime"
RAW = "time >= $__fromTime AND time < $__toTime"

usage_over_time = ClickHouseTarget(
    f"""SELECT $__timeInterval(hour) AS time, {USAGE} AS usage FROM {HOURLY}
WHERE $__interval_s >= 3600 AND org_id = {ORG} AND metric = {METRIC} AND {HOURS}
GROUP BY time ORDER BY time
UNION ALL
SELECT $__timeInterval(time) AS time, {USAGE} AS usage FROM {POINTS}
WHERE $__interval_s < 3600 AND org_id = {ORG} AND metric = {METRIC} AND kind = 'sum' AND {RAW}
GROUP BY time ORDER BY time""",
    ("time", "usage"),
)

# Exactly [from, to): whole hours from the rollup, the partial first and last hours from raw points.
FIRST_FULL = "toStartOfHour($__fromTime + INTERVAL 3599 SECOND)"
LAST_FULL_END = "toStartOfHour($__toTime)"
total_in_range = ClickHouseTarget(
    f"""SELECT sum(usage) AS usage FROM (
    SELECT {USAGE} AS usage FROM {HOURLY}
    WHERE org_id = {ORG} AND metric = {METRIC} AND hour >= {FIRST_FULL} AND hour < {LAST_FULL_END}
    UNION ALL
    SELECT {USAGE} AS usage FROM {POINTS}
    WHERE org_id = {ORG} AND metric = {METRIC} AND kind = 'sum' AND {RAW}
        AND (time < {FIRST_FULL} OR time >= greatest({LAST_FULL_END}, {FIRST_FULL}))
)""",
    ("usage",),
    table=True,
)

by_attribute = ClickHouseTarget(
    f"""SELECT $__timeInterval(h.hour) AS time, sets.value AS value, {USAGE} AS usage FROM {HOURLY} AS h
LEFT JOIN (
    SELECT {schema.ATTRIBUTES_HASH} AS attributes_hash,
        any(attr_values[indexOf(attr_keys, {ATTR})]) AS value
    FROM {ATTRIBUTE_SETS} WHERE org_id = {ORG} AND metric = {METRIC} GROUP BY attributes_hash
) AS sets ON h.attributes_hash = sets.attributes_hash
WHERE h.org_id = {ORG} AND h.metric = {METRIC} AND {HOURS}
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

# The metric's unit, from the catalog: OpenTelemetry's (UCUM) units as Grafana's unit ids; annotations
# in braces ("{call}") and anything else, a plain number. Grafana's "Config from query results"
# transformation sets every number field's unit from it (egress.bytes showed as "4.49 Bil", not GiB).
OTEL_UNITS = {"By": "bytes", "KiBy": "kbytes", "MiBy": "mbytes", "GiBy": "gbytes", "TiBy": "tbytes",
              "KBy": "deckbytes", "MBy": "decmbytes", "GBy": "decgbytes", "bit": "bits", "By/s": "Bps",
              "bit/s": "bps", "s": "s", "ms": "ms", "us": "µs", "ns": "ns", "min": "m", "h": "h", "d": "d",
              "%": "percent", "1": "short"}  # fmt: skip
metric_unit = ClickHouseTarget(
    f"""SELECT transform(anyLast(unit), {list(OTEL_UNITS)}, {list(OTEL_UNITS.values())}, 'short') AS unit
FROM {CATALOG} WHERE metric = {METRIC}""",
    ("unit",),
    refId="U",
    table=True,
)
UNIT_FROM_CATALOG = [
    {"id": "configFromData", "options": {"configRefId": "U", "applyTo": {"id": "byType", "options": "number"},
                                         "mappings": [{"fieldName": "unit", "handlerKey": "unit"}]}}
]  # fmt: skip

top_orgs = ClickHouseTarget(
    f"""SELECT org_id, {USAGE} AS usage FROM {METRIC_ORGS}
WHERE metric = {METRIC} AND hour >= $__fromTime AND hour < $__toTime AND org_id != ''
GROUP BY org_id ORDER BY usage DESC, org_id LIMIT 20""",
    ("org_id", "usage"),
    table=True,
)

#: The org: a drop-down of the 1,000 orgs with the most points (the first is chosen, so the dashboard
#: opens with data), in which any other org id can be typed (100k orgs make no drop-down); the rankings
#: link to it. Metrics and attribute keys are few and are read once when the dashboard loads.
VARIABLES = {
    "org": ClickHouseTarget(
        f"SELECT org_id FROM {ORGS} WHERE org_id != '' GROUP BY org_id ORDER BY sum(points) DESC, org_id LIMIT 1000",
        ("org_id",), table=True),
    "metric": ClickHouseTarget(f"SELECT DISTINCT metric FROM {CATALOG} WHERE kind = 'sum' ORDER BY metric LIMIT 1000", ("metric",), table=True),
    "attribute": ClickHouseTarget(
        f"""SELECT DISTINCT arrayJoin(attr_keys) AS attribute FROM {ATTRIBUTE_SETS}
WHERE org_id = {ORG} AND metric = {METRIC}
ORDER BY attribute LIMIT 100""",
        ("attribute",), table=True),
}  # fmt: skip

#: What each panel shows, and the alert that watches it (Grafana shows it on the panel's (i)).
DESCRIPTIONS = {
    'Usage of $metric by $org': "The org's usage of the metric over time: hourly rollup for steps of an hour or more, raw points below.",
    'Total in range': 'Exact usage over [from, to): whole hours from the rollup, the partial first and last hours from raw points (as the API adds them).',
    'Month to date against last month': 'This month so far, last month to the same day, and last month whole (UTC).',
    '$metric by $attribute': "The org's usage broken down by one attribute's values.",
    'Top orgs by $metric': 'The 20 orgs with the most usage of the metric in the range; each links to its usage.',
}  # fmt: skip

dashboard = Dashboard(
    title="meterhouse / Org usage",
    uid=ORG_USAGE_UID,
    description="Exact usage of one org: over time, by attribute, month to date; and the largest orgs.",
    tags=["meterhouse"],
    timezone="utc",
    time=Time("now-7d", "now"),
    # Usage is committed within seconds but read for hours and days: refreshed every 5 minutes, not
    # grafanalib's 10 s (the range's partial hours are read from raw points each time).
    refresh="5m",
    schemaVersion=SCHEMA_VERSION,
    templating=Templating(
        list=datasource_variables()
        + [
            clickhouse_variable(name, target, sort=0 if name == "org" else 1)
            for name, target in VARIABLES.items()
        ]
    ),  # fmt: skip
    panels=[
        series(
            "Usage of $metric by $org",
            [usage_over_time, metric_unit],
            at(0, 0, 16, 9),
            COUNT,
            datasource=CLICKHOUSE,
            transformations=UNIT_FROM_CATALOG,
        ),
        stat(
            "Total in range",
            [total_in_range, metric_unit],
            at(16, 0, 8, 4),
            COUNT,
            datasource=CLICKHOUSE,
            transformations=UNIT_FROM_CATALOG,
        ),  # fmt: skip
        table(
            "Month to date against last month",
            month_to_date,
            at(16, 4, 8, 5),
            COUNT,
            (metric_unit,),
            transformations=UNIT_FROM_CATALOG,
        ),  # fmt: skip
        series(
            "$metric by $attribute",
            [by_attribute, metric_unit],
            at(0, 9, 16, 9),
            COUNT,
            datasource=CLICKHOUSE,
            stacking={"mode": "normal"},
            transformations=UNIT_FROM_CATALOG,
        ),  # fmt: skip
        table(
            "Top orgs by $metric",
            top_orgs,
            at(16, 9, 8, 9),
            COUNT,
            (metric_unit,),
            overrides=[org_link(metric=True)],
            transformations=UNIT_FROM_CATALOG,
        ),  # fmt: skip
    ],
).auto_panel_ids()
dashboard = described(dashboard, DESCRIPTIONS)
