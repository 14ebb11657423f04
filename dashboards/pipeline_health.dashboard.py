"""Pipeline health: is usage flowing, how late, is the spool draining, which endpoint takes writes."""

from grafanalib.core import Annotations, Dashboard, Templating, Time
from grafanalib.formatunits import BYTES_IEC, SECONDS

from meterhouse.dashboards.common import (
    BACKLOG_CRITICAL_S,
    BACKLOG_WARNING_S,
    COUNT,
    EVENTS,
    LAG_CRITICAL_S,
    LAG_WARNING_S,
    NEEDS_RULES,
    NON_PRIMARY,
    SCHEMA_VERSION,
    SELECTOR,
    SPOOL_WARNING,
    ClickHouseTarget,
    at,
    clickhouse_annotation,
    datasource_variables,
    described,
    job_instance_variables,
    prom,
    series,
    stat,
)

RATE = "$__rate_interval"
S = "{" + SELECTOR + "}"

pipeline_events = ClickHouseTarget(
    f"""SELECT time, concat(kind, ': ', source, ' -> ', target) AS title, reason AS text, kind AS tags
FROM {EVENTS} WHERE time >= $__fromTime AND time < $__toTime ORDER BY time""",
    ("time", "title", "text", "tags"),
    table=True,
)
ANNOTATIONS = {"Pipeline events": pipeline_events}

#: What each panel shows, and the alert that watches it (Grafana shows it on the panel's (i)).
DESCRIPTIONS = {
    'Points received /s': 'OTLP points accepted (answered 200) per second, both transports, before they are written.',
    'Points written /s': 'Points committed to ClickHouse per second. Below the received rate for long, the spool grows (see Oldest spooled point).',
    'p99 ingest lag': "99th percentile of receipt-to-commit time over 5 minutes. Orange at MeterhouseIngestionLagHigh's 60 s, red at MeterhouseIngestionLagCritical's 600 s.",
    'Oldest spooled point': 'Age of the oldest acknowledged point not yet in ClickHouse: the freshness of every usage answer. Orange at 300 s and red at 1,800 s (the spool backlog alerts).',
    'Spool used': 'Acknowledged, uncommitted bytes against --spool-max-bytes. Orange at 80% (MeterhouseSpoolNearFull); at 100% new requests are answered 503 and retried by senders.',
    'Writing to endpoint #': 'Index of the ClickHouse endpoint taking writes (0 = the first configured). Orange on any other: a failover happened (MeterhouseWritingToNonPrimary).',
    'Points in, written and rejected': 'Points received, written and rejected per second; rejections by reason (every rejected point is counted and logged).',
    'Ingest lag (receipt to commit)': 'Quantiles of the time from receipt to commit in ClickHouse.',
    'Spool': 'Bytes held in the spool (acknowledged, not yet committed) against its limit.',
    'Oldest spooled point (grows during a stall)': 'Age of the oldest uncommitted point: flat when healthy, a rising line during a ClickHouse stall or outage.',
    'Pending points': 'Points spooled and not yet committed.',
    'Insert duration (p99)': "99th percentile of one group's insert into ClickHouse.",
    'Insert retries, and failures by cause': 'Insert attempts retried, and failures by cause (disk, memory, too many parts, timeout, outage). Nothing acknowledged is dropped: a failing group is retried, then dead-lettered.',
    'Dead letters on disk (unbilled until re-driven)': 'Batches ClickHouse refused for good, kept on disk: usage not yet billed until `meterhouse dead-letter redrive`.',
    'Data directory free': 'Free space where the spool and the embedded engine live.',
    'Endpoints (1 = healthy / active)': 'Each configured ClickHouse endpoint: healthy (its checks pass) and active (taking writes).',
    'Failovers': 'Switches of the active endpoint (also shown as annotations from pipeline_events).',
    'OTLP requests by outcome': 'Requests per second by transport and outcome (ok, rejected, backpressure, too large, unauthenticated...).',
    'Duplicates and back-pressure': 'Re-sent requests recognised as duplicates, points dropped by point identity as repeats, and requests refused for back-pressure (retried by senders).',
    'SLO error ratios (1h): 5xx answers, stale time': 'Share of requests answered 5xx, and share of time the oldest uncommitted point was older than the freshness objective, over the last hour.',
}  # fmt: skip

dashboard = Dashboard(
    title="meterhouse / Pipeline health",
    uid="meterhouse-pipeline",
    description="Points in and out, ingest lag, spool backlog, inserts, endpoints and failovers."
    + NEEDS_RULES,
    tags=["meterhouse"],
    timezone="utc",
    time=Time("now-6h", "now"),
    refresh="30s",
    schemaVersion=SCHEMA_VERSION,
    annotations=Annotations(list=[clickhouse_annotation(n, t) for n, t in ANNOTATIONS.items()]),
    templating=Templating(list=datasource_variables() + job_instance_variables()),
    panels=[
        stat(
            "Points received /s",
            [prom("sum(instance:meterhouse_points_received:rate5m" + S + ")")],
            at(0, 0, 4, 4),
            COUNT,
        ),
        stat(
            "Points written /s",
            [prom("sum(instance:meterhouse_points_written:rate5m" + S + ")")],
            at(4, 0, 4, 4),
            COUNT,
        ),
        stat(
            "p99 ingest lag",
            [prom("max(instance:meterhouse_ingest_lag_seconds:p99_rate5m" + S + ")")],
            at(8, 0, 4, 4),
            SECONDS,
            thresholds=[(None, "green"), (LAG_WARNING_S, "orange"), (LAG_CRITICAL_S, "red")],
        ),
        stat(
            "Oldest spooled point",
            [prom("max(meterhouse_spool_oldest_age_seconds" + S + ")")],
            at(12, 0, 4, 4),
            SECONDS,
            thresholds=[(None, "green"), (BACKLOG_WARNING_S, "orange"), (BACKLOG_CRITICAL_S, "red")],
        ),
        stat(
            "Spool used",
            [
                prom(
                    "max(meterhouse_spool_uncommitted_bytes" + S + " / meterhouse_spool_limit_bytes" + S + ")"
                )
            ],
            at(16, 0, 4, 4),
            "percentunit",
            thresholds=[(None, "green"), (SPOOL_WARNING, "orange"), (1.0, "red")],
        ),  # fmt: skip
        stat(
            "Writing to endpoint #",
            [prom("max(meterhouse_active_endpoint_priority" + S + ")")],
            at(20, 0, 4, 4),
            COUNT,
            thresholds=[(None, "green"), (NON_PRIMARY, "orange")],
        ),
        series(
            "Points in, written and rejected",
            [
                prom("sum(instance:meterhouse_points_received:rate5m" + S + ")", "received", "A"),
                prom("sum(instance:meterhouse_points_written:rate5m" + S + ")", "written", "B"),
                prom(
                    "sum by (reason) (instance_reason:meterhouse_points_rejected:rate5m" + S + ")",
                    "rejected: {{reason}}",
                    "C",
                ),
                prom(
                    "sum(rate(meterhouse_points_unattributed_total" + S + "[" + RATE + "]))",
                    "without org",
                    "D",
                ),
            ],
            at(0, 4, 12, 8),
            "pps",
        ),  # fmt: skip
        series(
            "Ingest lag (receipt to commit)",
            [
                prom("max(instance:meterhouse_ingest_lag_seconds:p50_rate5m" + S + ")", "p50", "A"),
                prom(
                    "histogram_quantile(0.9, sum by (le) (instance_le:meterhouse_ingest_lag_seconds_bucket:rate5m"
                    + S
                    + "))",
                    "p90",
                    "B",
                ),
                prom("max(instance:meterhouse_ingest_lag_seconds:p99_rate5m" + S + ")", "p99", "C"),
            ],
            at(12, 4, 12, 8),
            SECONDS,
        ),  # fmt: skip
        series(
            "Spool",
            [
                prom("sum(meterhouse_spool_bytes" + S + ")", "on disk", "A"),
                prom("sum(meterhouse_spool_uncommitted_bytes" + S + ")", "not yet in ClickHouse", "B"),
                prom("max(meterhouse_spool_limit_bytes" + S + ")", "limit (503 above)", "C"),
            ],
            at(0, 12, 8, 8),
            BYTES_IEC,
        ),  # fmt: skip
        series(
            "Oldest spooled point (grows during a stall)",
            [prom("max(meterhouse_spool_oldest_age_seconds" + S + ")", "oldest uncommitted point", "A")],
            at(8, 12, 8, 8),
            SECONDS,
        ),  # fmt: skip
        series(
            "Pending points",
            [prom("sum(meterhouse_pending_points" + S + ")", "spooled, not yet in ClickHouse", "A")],
            at(16, 12, 8, 8),
            COUNT,
        ),  # fmt: skip
        series(
            "Insert duration (p99)",
            [
                prom(
                    "histogram_quantile(0.99, sum by (le) (rate(meterhouse_insert_duration_seconds_bucket"
                    + S
                    + "["
                    + RATE
                    + "])))",
                    "p99 insert",
                    "A",
                )
            ],
            at(0, 36, 8, 8),
            SECONDS,
        ),  # fmt: skip
        series(
            "Insert retries, and failures by cause",
            [
                prom("sum(rate(meterhouse_insert_retries_total" + S + "[" + RATE + "]))", "retries", "A"),
                prom(
                    "sum by (cause) (rate(meterhouse_insert_failures_total" + S + "[" + RATE + "]))",
                    "failed: {{cause}}",
                    "B",
                ),
            ],
            at(8, 36, 8, 8),
            "ops",
        ),  # fmt: skip
        series(
            "Dead letters on disk (unbilled until re-driven)",
            [prom("sum(meterhouse_dead_letters_pending" + S + ")", "dead-letter batches", "A")],
            at(16, 36, 8, 8),
            COUNT,
        ),  # fmt: skip
        series(
            "Data directory free",
            [
                prom(
                    "min(meterhouse_data_dir_free_bytes" + S + " / meterhouse_data_dir_size_bytes" + S + ")",
                    "free share",
                    "A",
                )
            ],
            at(0, 44, 12, 8),
            "percentunit",
        ),  # fmt: skip
        series(
            "SLO error ratios (1h): 5xx answers, stale time",
            [
                prom(
                    'max(job:meterhouse_requests_unavailable:ratio_rate1h{job=~"$job"})',
                    "requests answered 5xx",
                    "A",
                ),
                prom('max(job:meterhouse_spool_stale:ratio_avg1h{job=~"$job"})', "time stale (> 2 min)", "B"),
            ],
            at(12, 44, 12, 8),
            "percentunit",
        ),  # fmt: skip
        series(
            "Endpoints (1 = healthy / active)",
            [
                prom("max by (endpoint) (meterhouse_endpoint_up" + S + ")", "up: {{endpoint}}", "A"),
                prom("max by (endpoint) (meterhouse_endpoint_active" + S + ")", "active: {{endpoint}}", "B"),
            ],
            at(0, 20, 12, 8),
            "bool_yes_no",
        ),  # fmt: skip
        series(
            "Failovers",
            [
                prom(
                    "sum by (from_endpoint, to_endpoint) (increase(meterhouse_failovers_total"
                    + S
                    + "["
                    + RATE
                    + "]))",
                    "{{from_endpoint}} -> {{to_endpoint}}",
                ),
            ],
            at(12, 20, 12, 8),
            COUNT,
            drawStyle="bars",
        ),  # fmt: skip
        series(
            "OTLP requests by outcome",
            [
                prom(
                    "sum by (transport, outcome) (rate(meterhouse_requests_total" + S + "[" + RATE + "]))",
                    "{{transport}} {{outcome}}",
                ),
            ],
            at(0, 28, 12, 8),
            "reqps",
        ),  # fmt: skip
        series(
            "Duplicates and back-pressure",
            [
                prom(
                    "sum(rate(meterhouse_requests_deduplicated_total" + S + "[" + RATE + "]))",
                    "re-sent requests /s",
                    "A",
                ),
                prom(
                    "sum(rate(meterhouse_spool_full_total" + S + "[" + RATE + "]))", "503 spool full /s", "B"
                ),
            ],
            at(12, 28, 12, 8),
            "reqps",
        ),  # fmt: skip
    ],
).auto_panel_ids()
dashboard = described(dashboard, DESCRIPTIONS)
