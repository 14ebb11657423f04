"""Cardinality and org health: active, silent and spiking orgs with the lists behind them, attribute
cardinality per metric, unattributed points, and the orgs with the most series."""

from grafanalib.core import Dashboard, Templating, Time

from meterhouse.core import schema
from meterhouse.dashboards.common import (
    ATTRIBUTE_CARDINALITY,
    CLICKHOUSE,
    COUNT,
    DATABASE,
    HOURLY,
    METRIC_ORGS,
    SCHEMA_VERSION,
    SELECTOR,
    ClickHouseTarget,
    at,
    datasource_variables,
    described,
    job_instance_variables,
    literal,
    org_link,
    prom,
    series,
    settings_variable,
    stat,
    table,
)

S = "{" + SELECTOR + "}"

# The same queries as the meterhouse_orgs_silent / _spiking gauges, with the same settings: the
# meterhouse_org_health_* gauges export them and hidden variables read them (the defaults where absent).
SETTINGS = {  # variable: (gauge, default, ClickHouse conversion)
    "silent_after_s": ("meterhouse_org_health_silent_after_seconds", "1800", "toFloat64OrDefault"),
    "spike_factor": ("meterhouse_org_health_spike_factor", "5", "toFloat64OrDefault"),
    "spike_baseline_hours": ("meterhouse_org_health_spike_baseline_hours", "24", "toUInt32OrDefault"),
    "spike_min_usage": ("meterhouse_org_health_spike_min_usage", "100", "toFloat64OrDefault"),
}


def setting(name: str) -> str:
    """The setting's variable as a SQL value: its default when the variable is empty (no such gauge)."""
    _gauge, default, convert = SETTINGS[name]
    typ = "UInt32" if convert == "toUInt32OrDefault" else "Float64"
    return f"{convert}('${{{name}}}', to{typ}({default}))"


silent_orgs = ClickHouseTarget(
    literal(
        schema.orgs_silent_sql(DATABASE),
        day_ago="now() - INTERVAL 1 DAY",
        quiet_since=f"now() - toIntervalSecond(toUInt32({setting('silent_after_s')}))",
        limit="200",
    ),
    ("org_id", "last"),
    table=True,
)

# Quiet for over a day: they left the silent list; meterhouse_orgs_silent_over_24h counts them.
silent_over_24h = ClickHouseTarget(
    literal(
        schema.orgs_silent_sql(DATABASE),
        day_ago="now() - INTERVAL 7 DAY",
        quiet_since="now() - INTERVAL 1 DAY",
        limit="200",
    ),
    ("org_id", "last"),
    table=True,
)

spiking_orgs = ClickHouseTarget(
    literal(
        schema.orgs_spiking_sql(DATABASE),
        last="toStartOfHour(now()) - INTERVAL 1 HOUR",
        hours=setting("spike_baseline_hours"),
        factor=setting("spike_factor"),
        min_usage=setting("spike_min_usage"),
        limit="200",
    ),
    ("org_id", "metric", "last_usage", "baseline"),
    table=True,
)

attribute_cardinality = ClickHouseTarget(
    f"""SELECT metric, key, uniqExactMerge(distinct_values) AS distinct_values, uniqExactMerge(orgs) AS orgs
FROM {ATTRIBUTE_CARDINALITY}
WHERE hour >= $__fromTime AND hour < $__toTime
GROUP BY metric, key ORDER BY distinct_values DESC, metric, key LIMIT 100""",
    ("metric", "key", "distinct_values", "orgs"),
    table=True,
)

biggest_orgs_by_series = ClickHouseTarget(
    f"""SELECT org_id, uniqExactMerge(series) AS series, sum(points) AS points
FROM {METRIC_ORGS}
WHERE hour >= $__fromTime AND hour < $__toTime AND org_id != ''
GROUP BY org_id ORDER BY series DESC, points DESC, org_id LIMIT 50""",
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
WHERE org_id = '' AND hour >= toStartOfHour($__fromTime) AND hour < $__toTime
GROUP BY time ORDER BY time""",
    ("time", "points"),
)

#: What each panel shows, and the alert that watches it (Grafana shows it on the panel's (i)).
DESCRIPTIONS = {
    'Active orgs (1h)': 'Orgs that reported usage in the last hour.',
    'Active orgs (24h)': 'Orgs that reported usage in the last 24 hours.',
    'Silent orgs': 'Orgs that reported in the last 24 h but not in the last --silent-after-s (as of the last refresh).',
    'Spiking orgs': 'Orgs whose last hour is over --spike-factor times their baseline. Orange at any (MeterhouseOrgsSpiking).',
    'Org counts': 'Active, silent and spiking orgs over time.',
    'Points without an org': 'Points stored without org.id, billed to nobody (MeterhousePointsWithoutOrg).',
    'Silent orgs (reported in 24 h, not in the last ${silent_after_s} s)': 'The orgs behind the silent gauge, with its setting (--silent-after-s, read from meterhouse_org_health_silent_after_seconds): when each last reported.',
    'Silent for over 24 h (reported in 7 d)': 'Orgs that reported in the last week but not in the last day.',
    'Spiking orgs (last hour over ${spike_factor}x the ${spike_baseline_hours} h baseline)': 'The orgs behind the spiking gauge, with its settings (--spike-factor, --spike-baseline-hours, --spike-min-usage, read from their meterhouse_org_health_* gauges): their last hour against their baseline.',
    'Attribute cardinality per metric': 'Distinct attribute sets per metric: a sudden rise is an unbounded attribute (a request id) at a sender.',
    'Biggest orgs by series': 'Orgs with the most distinct series (metric and attribute set).',
    'Reconciliation: orgs whose raw points and hourly rollup disagree': 'Per month, orgs whose raw points and hourly rollup totals differ (MeterhouseReconciliationDrift).',
}  # fmt: skip

dashboard = Dashboard(
    title="meterhouse / Cardinality and org health",
    uid="meterhouse-org-health",
    description="Which orgs are active, silent or spiking; how many series each metric and org has.",
    tags=["meterhouse"],
    timezone="utc",
    time=Time("now-24h", "now"),
    refresh="5m",
    schemaVersion=SCHEMA_VERSION,
    templating=Templating(
        list=datasource_variables()
        + job_instance_variables()
        + [settings_variable(n, g) for n, (g, _, _) in SETTINGS.items()]
    ),
    panels=[
        stat(
            "Active orgs (1h)",
            [prom('max(meterhouse_orgs_active{window="1h",' + SELECTOR + "})")],
            at(0, 0, 6, 4),
            COUNT,
        ),
        stat(
            "Active orgs (24h)",
            [prom('max(meterhouse_orgs_active{window="24h",' + SELECTOR + "})")],
            at(6, 0, 6, 4),
            COUNT,
        ),
        stat("Silent orgs", [prom("max(meterhouse_orgs_silent" + S + ")")], at(12, 0, 6, 4), COUNT),
        stat(
            "Spiking orgs",
            [prom("max(meterhouse_orgs_spiking" + S + ")")],
            at(18, 0, 6, 4),
            COUNT,
            thresholds=[(None, "green"), (1, "orange")],
        ),  # MeterhouseOrgsSpiking: any  # fmt: skip
        series(
            "Org counts",
            [
                prom("max by (window) (meterhouse_orgs_active" + S + ")", "active {{window}}", "A"),
                prom("max(meterhouse_orgs_silent" + S + ")", "silent", "B"),
                prom("max(meterhouse_orgs_spiking" + S + ")", "spiking", "C"),
                prom("max(meterhouse_orgs_silent_over_24h" + S + ")", "silent for over 24 h", "D"),
            ],
            at(0, 4, 12, 8),
            COUNT,
        ),  # fmt: skip
        series("Points without an org", [unattributed], at(12, 4, 12, 8), COUNT, datasource=CLICKHOUSE),
        table(
            "Silent orgs (reported in 24 h, not in the last ${silent_after_s} s)",
            silent_orgs,
            at(0, 12, 8, 9),
            "dateTimeAsIso",
            overrides=[org_link()],
        ),
        table(
            "Silent for over 24 h (reported in 7 d)",
            silent_over_24h,
            at(8, 12, 8, 9),
            "dateTimeAsIso",
            overrides=[org_link()],
        ),
        table(
            "Spiking orgs (last hour over ${spike_factor}x the ${spike_baseline_hours} h baseline)",
            spiking_orgs,
            at(16, 12, 8, 9),
            COUNT,
            overrides=[org_link()],
        ),
        table("Attribute cardinality per metric", attribute_cardinality, at(0, 21, 12, 9), COUNT),
        table(
            "Biggest orgs by series", biggest_orgs_by_series, at(12, 21, 12, 9), COUNT, overrides=[org_link()]
        ),
        table(
            "Reconciliation: orgs whose raw points and hourly rollup disagree",
            drifting_orgs,
            at(0, 30, 24, 9),
            COUNT,
            overrides=[org_link()],
        ),
    ],
).auto_panel_ids()
dashboard = described(dashboard, DESCRIPTIONS)
