"""Pipeline health: is usage flowing, how late, is the spool draining, which endpoint takes writes."""

from grafanalib.core import Annotations, Dashboard, Templating, Time
from grafanalib.formatunits import BYTES_IEC, NUMBER_FORMAT, SECONDS

from meterhouse.dashboards.common import CLICKHOUSE, EVENTS, at, prom, series, stat

RATE = "$__rate_interval"

failover_annotations = {
    "datasource": CLICKHOUSE,
    "enable": True,
    "iconColor": "red",
    "name": "Pipeline events",
    "editorType": "sql",
    "rawSql": (
        f"SELECT time, concat(kind, ': ', source, ' -> ', target) AS title, "
        f"reason AS text, kind AS tags FROM {EVENTS} WHERE $__timeFilter(time) ORDER BY time"
    ),
}

dashboard = Dashboard(
    title="meterhouse / Pipeline health",
    uid="meterhouse-pipeline",
    description="Points in and out, ingest lag, spool backlog, inserts, endpoints and failovers.",
    tags=["meterhouse"],
    timezone="utc",
    time=Time("now-6h", "now"),
    refresh="30s",
    annotations=Annotations(list=[failover_annotations]),
    templating=Templating(list=[]),
    panels=[
        stat(
            "Points received /s",
            [prom("sum(meterhouse:points_received:rate5m)")],
            at(0, 0, 4, 4),
            NUMBER_FORMAT,
        ),
        stat(
            "Points written /s",
            [prom("sum(meterhouse:points_written:rate5m)")],
            at(4, 0, 4, 4),
            NUMBER_FORMAT,
        ),
        stat("p99 ingest lag", [prom("max(meterhouse:ingest_lag_seconds:p99_5m)")], at(8, 0, 4, 4), SECONDS),
        stat(
            "Oldest spooled point",
            [prom("max(meterhouse_spool_oldest_age_seconds)")],
            at(12, 0, 4, 4),
            SECONDS,
        ),
        stat(
            "Spool used",
            [prom("max(meterhouse_spool_uncommitted_bytes / meterhouse_spool_limit_bytes)")],
            at(16, 0, 4, 4),
            "percentunit",
        ),  # fmt: skip
        stat("Writing to endpoint #", [prom("max(meterhouse_active_endpoint_priority)")], at(20, 0, 4, 4)),
        series(
            "Points in, written and rejected",
            [
                prom("sum(meterhouse:points_received:rate5m)", "received", "A"),
                prom("sum(meterhouse:points_written:rate5m)", "written", "B"),
                prom("sum by (reason) (meterhouse:points_rejected:rate5m)", "rejected: {{reason}}", "C"),
                prom("sum(rate(meterhouse_points_unattributed_total[" + RATE + "]))", "without org", "D"),
            ],
            at(0, 4, 12, 8),
            "pps",
        ),  # fmt: skip
        series(
            "Ingest lag (receipt to commit)",
            [
                prom("max(meterhouse:ingest_lag_seconds:p50_5m)", "p50", "A"),
                prom(
                    "histogram_quantile(0.9, sum by (le) (rate(meterhouse_ingest_lag_seconds_bucket["
                    + RATE
                    + "])))",
                    "p90",
                    "B",
                ),
                prom("max(meterhouse:ingest_lag_seconds:p99_5m)", "p99", "C"),
            ],
            at(12, 4, 12, 8),
            SECONDS,
        ),  # fmt: skip
        series(
            "Spool",
            [
                prom("sum(meterhouse_spool_bytes)", "on disk", "A"),
                prom("sum(meterhouse_spool_uncommitted_bytes)", "not yet in ClickHouse", "B"),
                prom("max(meterhouse_spool_limit_bytes)", "limit (503 above)", "C"),
            ],
            at(0, 12, 8, 8),
            BYTES_IEC,
        ),  # fmt: skip
        series(
            "Oldest spooled point and pending points",
            [
                prom("max(meterhouse_spool_oldest_age_seconds)", "oldest age (s)", "A"),
                prom("sum(meterhouse_pending_points)", "pending points", "B"),
            ],
            at(8, 12, 8, 8),
        ),  # fmt: skip
        series(
            "Inserts",
            [
                prom(
                    "histogram_quantile(0.99, sum by (le) (rate(meterhouse_insert_duration_seconds_bucket["
                    + RATE
                    + "])))",
                    "p99 insert (s)",
                    "A",
                ),
                prom("sum(rate(meterhouse_insert_retries_total[" + RATE + "]))", "retries /s", "B"),
                prom("sum(rate(meterhouse_insert_failures_total[" + RATE + "]))", "failed attempts /s", "C"),
                prom(
                    "sum(increase(meterhouse_dead_letter_batches_total[" + RATE + "]))", "dead letters", "D"
                ),
            ],
            at(16, 12, 8, 8),
        ),  # fmt: skip
        series(
            "Endpoints (1 = healthy / active)",
            [
                prom("max by (endpoint) (meterhouse_endpoint_up)", "up: {{endpoint}}", "A"),
                prom("max by (endpoint) (meterhouse_endpoint_active)", "active: {{endpoint}}", "B"),
            ],
            at(0, 20, 12, 8),
        ),  # fmt: skip
        series(
            "Failovers",
            [
                prom(
                    "sum by (from_endpoint, to_endpoint) (increase(meterhouse_failovers_total["
                    + RATE
                    + "]))",
                    "{{from_endpoint}} -> {{to_endpoint}}",
                ),
            ],
            at(12, 20, 12, 8),
            drawStyle="bars",
        ),  # fmt: skip
        series(
            "OTLP requests by outcome",
            [
                prom(
                    "sum by (transport, outcome) (rate(meterhouse_requests_total[" + RATE + "]))",
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
                    "sum(rate(meterhouse_requests_deduplicated_total[" + RATE + "]))",
                    "re-sent requests /s",
                    "A",
                ),
                prom("sum(rate(meterhouse_spool_full_total[" + RATE + "]))", "503 spool full /s", "B"),
            ],
            at(12, 28, 12, 8),
            "reqps",
        ),  # fmt: skip
    ],
).auto_panel_ids()
