"""Cardinality and org health: active, silent and spiking orgs with the lists behind them, attribute
cardinality per metric, unattributed points, and the orgs with the most series."""

from grafanalib.core import Dashboard, Templating, Time
from grafanalib.formatunits import NUMBER_FORMAT

from meterhouse.core import schema
from meterhouse.dashboards.common import (
    CLICKHOUSE,
    DATABASE,
    HOURLY,
    ClickHouseTarget,
    at,
    literal,
    prom,
    series,
    stat,
    table,
)

# The same queries as the meterhouse_orgs_silent / _spiking gauges, with the default thresholds.
silent_orgs = ClickHouseTarget(
    literal(
        schema.orgs_silent_sql(DATABASE),
        day_ago="now() - INTERVAL 1 DAY",
        quiet_since="now() - INTERVAL 30 MINUTE",
        limit="200",
    ),
    ("org_id", "last"),
    table=True,
)

spiking_orgs = ClickHouseTarget(
    literal(
        schema.orgs_spiking_sql(DATABASE),
        last="toStartOfHour(now()) - INTERVAL 1 HOUR",
        hours="24",
        factor="5",
        min_usage="100",
        limit="200",
    ),
    ("org_id", "metric", "last_usage", "baseline"),
    table=True,
)

attribute_cardinality = ClickHouseTarget(
    f"""SELECT metric, key, uniqExact(attributes[key]) AS distinct_values, uniqExact(org_id) AS orgs
FROM {HOURLY} ARRAY JOIN mapKeys(attributes) AS key
WHERE $__timeFilter(hour)
GROUP BY metric, key ORDER BY distinct_values DESC LIMIT 100""",
    ("metric", "key", "distinct_values", "orgs"),
    table=True,
)

biggest_orgs_by_series = ClickHouseTarget(
    f"""SELECT org_id, uniqExact(metric, attributes_hash) AS series, sum(points) AS points
FROM {HOURLY}
WHERE $__timeFilter(hour) AND org_id != ''
GROUP BY org_id ORDER BY series DESC, points DESC LIMIT 50""",
    ("org_id", "series", "points"),
    table=True,
)

# The orgs behind meterhouse_reconcile_drifting_orgs, for the whole months the time range touches.
drifting_orgs = ClickHouseTarget(
    literal(
        schema.drifting_orgs_sql(DATABASE),
        from_ns="toUnixTimestamp64Nano(toDateTime64(toStartOfMonth($__fromTime), 9, 'UTC'))",
        to_ns="toUnixTimestamp64Nano(toDateTime64(toStartOfMonth($__toTime) + INTERVAL 1 MONTH, 9, 'UTC'))",
        limit="200",
    ),
    ("month", "org_id", "metric", "raw_points", "rollup_points", "value_drift"),
    table=True,
)

unattributed = ClickHouseTarget(
    f"""SELECT $__timeInterval(hour) AS time, sum(points) AS points FROM {HOURLY}
WHERE org_id = '' AND $__timeFilter(hour)
GROUP BY time ORDER BY time""",
    ("time", "points"),
)

dashboard = Dashboard(
    title="meterhouse / Cardinality and org health",
    uid="meterhouse-org-health",
    description="Which orgs are active, silent or spiking; how many series each metric and org has.",
    tags=["meterhouse"],
    timezone="utc",
    time=Time("now-24h", "now"),
    refresh="1m",
    templating=Templating(list=[]),
    panels=[
        stat(
            "Active orgs (1h)",
            [prom('max(meterhouse_orgs_active{window="1h"})')],
            at(0, 0, 6, 4),
            NUMBER_FORMAT,
        ),
        stat(
            "Active orgs (24h)",
            [prom('max(meterhouse_orgs_active{window="24h"})')],
            at(6, 0, 6, 4),
            NUMBER_FORMAT,
        ),
        stat("Silent orgs", [prom("max(meterhouse_orgs_silent)")], at(12, 0, 6, 4), NUMBER_FORMAT),
        stat("Spiking orgs", [prom("max(meterhouse_orgs_spiking)")], at(18, 0, 6, 4), NUMBER_FORMAT),
        series(
            "Org counts",
            [
                prom("max by (window) (meterhouse_orgs_active)", "active {{window}}", "A"),
                prom("max(meterhouse_orgs_silent)", "silent", "B"),
                prom("max(meterhouse_orgs_spiking)", "spiking", "C"),
            ],
            at(0, 4, 12, 8),
            NUMBER_FORMAT,
        ),  # fmt: skip
        series(
            "Points without an org", [unattributed], at(12, 4, 12, 8), NUMBER_FORMAT, datasource=CLICKHOUSE
        ),
        table("Silent orgs (reported in 24 h, not in the last 30 min)", silent_orgs, at(0, 12, 12, 9)),
        table("Spiking orgs (last hour over 5x the 24 h baseline)", spiking_orgs, at(12, 12, 12, 9)),
        table("Attribute cardinality per metric", attribute_cardinality, at(0, 21, 12, 9)),
        table("Biggest orgs by series", biggest_orgs_by_series, at(12, 21, 12, 9)),
        table(
            "Reconciliation: orgs whose raw points and hourly rollup disagree",
            drifting_orgs,
            at(0, 30, 24, 9),
        ),
    ],
).auto_panel_ids()
