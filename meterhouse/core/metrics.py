"""Names and construction of every metric meterhouse exports to Prometheus.

Nothing registers at import time: :class:`PipelineMetrics` takes the registry it fills. No metric carries
an org id or any other unbounded label (README, "Prometheus metrics"); label values come from the fixed
sets here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "meterhouse"

#: Why a data point was rejected. The set is small and fixed; every rejection counts under one.
REJECT_REASONS = (
    "no_value",  # the point carries no value
    "invalid_timestamp",  # time 0, before start time, or outside the accepted window
    "invalid_value",  # NaN or Inf where usage must be a number
    "negative_delta",  # a monotonic delta sum that decreases
    "out_of_order",  # a cumulative point older than its series' last one, with another value
    "out_of_range",  # a sum's value or cumulative delta beyond Int64, or beyond ±1e288 for a double
    "attribute_limit",  # too many attributes, or a key or value over the length limit
    "unsupported_metric",  # no data, or a sum without temporality
    "org_not_allowed",  # the sender's ingest token may not send for the point's org
    "invalid_name",  # a metric name, unit, description or scope over its length limit, or a control character
    "request_too_large",  # every point of a request that takes more than max_request_spooled_bytes stored
)

#: Why a data point was stored changed. Each repair keeps the usage exactly; it is counted and logged.
REPAIR_REASONS = ("start_after_time",)  # start time a few ms after the time (an SDK race): start := time

#: What the writer found for a point the edge marked to verify by its identity (``collector/identity.py``):
#: ``repeat``, the same point (stream and interval) was already stored, so it counts zero; ``new``, it
#: was not (an older or overlapping interval of its stream, or its first point since a restart) and counts.
IDENTITY_OUTCOMES = ("repeat", "new")

#: Why an insert into ClickHouse failed (``collector/writer.py``: ``failure_cause``). Every cause but
#: ``refused`` and ``other`` is retried for as long as it takes and never makes a dead letter.
INSERT_FAILURE_CAUSES = (
    "disk_full",  # NOT_ENOUGH_SPACE, ENOSPC: the server's disk is full
    "memory",  # MEMORY_LIMIT_EXCEEDED and allocation failures
    "too_many_parts",  # TOO_MANY_PARTS: merges are behind
    "read_only",  # a read-only table or file system, a failing disk (EIO), a file that cannot be written
    "timeout",  # TIMEOUT_EXCEEDED, SOCKET_TIMEOUT, a client-side timeout
    "unavailable",  # no connection, the network, too many queries, Keeper
    "refused",  # content the server refuses for good (a type mismatch, unparsable values): a dead letter
    "other",  # anything else: retried; with a server error code, a dead letter after repeated failures
)

#: Why a whole request was refused by a limit (retryable: the client sends it again).
LIMIT_REASONS = ("ingest_rate",)

#: Outcomes of one OTLP request, by transport.
REQUEST_OUTCOMES = (
    "ok",
    "partial",
    "invalid",
    "too_large",
    "unsupported_media_type",
    "backpressure",
    "unavailable",
    "unauthenticated",
    "rate_limited",
    "error",  # meterhouse failed by its own fault (HTTP 500, gRPC INTERNAL): a bug, never the sender's
    "not_found",  # OTLP/HTTP to another path than /v1/metrics (404) or not a POST (405): the sender's
    "read_timeout",  # OTLP/gRPC: the request message did not arrive in time (DEADLINE_EXCEEDED)
    "address_limit",  # OTLP/gRPC: too many calls open from the client's address (RESOURCE_EXHAUSTED)
)
TRANSPORTS = ("http", "grpc")

LAG_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
)


class PipelineMetrics:
    """The collector's metrics, registered in the registry the caller passes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = PREFIX
        self.points_received = Counter(
            f"{p}_points_received", "Data points received over OTLP, before validation.", registry=registry
        )
        self.points_written = Counter(
            f"{p}_points_written", "Data points committed to ClickHouse.", registry=registry
        )
        self.points_rejected = Counter(
            f"{p}_points_rejected",
            "Data points rejected as invalid, by reason.",
            ["reason"],
            registry=registry,
        )
        self.points_repaired = Counter(
            f"{p}_points_repaired",
            "Data points stored with a field corrected (usage kept exactly), by reason.",
            ["reason"],
            registry=registry,
        )
        self.points_unattributed = Counter(
            f"{p}_points_unattributed",
            "Data points stored without an org id (no org attribute on point or resource).",
            registry=registry,
        )
        self.requests = Counter(
            f"{p}_requests",
            "OTLP export requests answered, by transport and outcome.",
            ["transport", "outcome"],
            registry=registry,
        )
        self.limited_requests = Counter(
            f"{p}_limited_requests",
            "OTLP requests refused (retryable) by a limit, by reason.",
            ["reason"],
            registry=registry,
        )
        self.series_folded = Counter(
            f"{p}_series_folded",
            "Data points whose new attribute set was over the per-org-and-metric series limit, "
            "stored in the overflow series otel.metric.overflow=true.",
            registry=registry,
        )
        self.ingest_lag = Histogram(
            f"{p}_ingest_lag_seconds",
            "Time from a batch's receipt to its commit in ClickHouse, observed once per batch at commit "
            "(nothing is observed during a stall: meterhouse_spool_oldest_age_seconds grows instead).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.last_commit = Gauge(
            f"{p}_last_commit_timestamp_seconds",
            "Unix time of the last successful insert into ClickHouse.",
            registry=registry,
        )
        self.pending_points = Gauge(
            f"{p}_pending_points", "Points spooled and not yet committed to ClickHouse.", registry=registry
        )
        self.insert_duration = Histogram(
            f"{p}_insert_duration_seconds", "Duration of one batch insert into ClickHouse.", registry=registry
        )
        self.insert_retries = Counter(
            f"{p}_insert_retries", "Batch inserts retried after a retryable error.", registry=registry
        )
        self.groups_halved = Counter(
            f"{p}_groups_halved",
            "Groups whose insert failed for memory, none of it landed, given back to be written in halves.",
            registry=registry,
        )
        self.writer_errors = Counter(
            f"{p}_writer_errors",
            "Errors of the writer loop outside an insert (spool read, intent, commit), each retried.",
            registry=registry,
        )
        self.insert_failures = Counter(
            f"{p}_insert_failures",
            "Failed batch insert attempts (retried, or dead-lettered), by cause: disk_full, memory, "
            "too_many_parts, read_only, timeout, unavailable (all retried for as long as it takes), "
            "refused (a dead letter) or other.",
            ["cause"],
            registry=registry,
        )
        # -- spool (backlog) ------------------------------------------------------------------------
        self.spool_bytes = Gauge(f"{p}_spool_bytes", "Bytes of spool segments on disk.", registry=registry)
        self.spool_limit_bytes = Gauge(
            f"{p}_spool_limit_bytes",
            "Spooled bytes not yet in ClickHouse at which receivers answer 503.",
            registry=registry,
        )
        self.spool_uncommitted_bytes = Gauge(
            f"{p}_spool_uncommitted_bytes",
            "Spooled bytes not yet committed to ClickHouse.",
            registry=registry,
        )
        self.spool_oldest_age = Gauge(
            f"{p}_spool_oldest_age_seconds",
            "Age of the oldest spooled record not yet committed (0 when none): the backlog alerts watch.",
            registry=registry,
        )
        self.spool_full = Counter(
            f"{p}_spool_full", "Requests answered 503 because the spool was full.", registry=registry
        )
        self.spool_replayed = Counter(
            f"{p}_spool_replayed_records", "Spool records replayed at start-up.", registry=registry
        )
        self.spool_quarantined_records = Counter(
            f"{p}_spool_quarantined_records", "Damaged spool records moved to quarantine.", registry=registry
        )
        self.spool_quarantined_bytes = Counter(
            f"{p}_spool_quarantined_bytes", "Bytes moved to the spool quarantine.", registry=registry
        )
        self.requests_deduplicated = Counter(
            f"{p}_requests_deduplicated",
            "Requests identical to one accepted within the dedup window, answered without storing again.",
            registry=registry,
        )
        self.points_identity_checked = Counter(
            f"{p}_points_identity_checked",
            "Points checked by identity (stream and interval) against the stored ones before insert, "
            "by outcome: repeat (already stored, counted zero) or new (counted).",
            ["outcome"],
            registry=registry,
        )
        self.dead_letter_batches = Counter(
            f"{p}_dead_letter_batches",
            "Batches ClickHouse refused for good, kept as dead letters.",
            registry=registry,
        )
        self.dead_letter_points = Counter(
            f"{p}_dead_letter_points", "Points in dead-lettered batches.", registry=registry
        )
        self.dead_letters_pending = Gauge(
            f"{p}_dead_letters_pending",
            "Dead-letter batches on disk, not yet re-driven (usage missing from ClickHouse while > 0).",
            registry=registry,
        )
        # -- the data directory (chdb and the spool share it) ------------------------------------
        self.data_dir_free_bytes = Gauge(
            f"{p}_data_dir_free_bytes",
            "Bytes available to meterhouse on the file system of the data directory.",
            registry=registry,
        )
        self.data_dir_size_bytes = Gauge(
            f"{p}_data_dir_size_bytes",
            "Size of the file system holding the data directory.",
            registry=registry,
        )
        # -- endpoints (a handful, from configuration) --------------------------------------------
        self.endpoint_up = Gauge(
            f"{p}_endpoint_up",
            "Whether a ClickHouse endpoint passed its last health checks.",
            ["endpoint"],
            registry=registry,
        )
        self.endpoint_active = Gauge(
            f"{p}_endpoint_active",
            "1 for the endpoint writes go to, 0 for the others.",
            ["endpoint"],
            registry=registry,
        )
        self.active_endpoint_priority = Gauge(
            f"{p}_active_endpoint_priority",
            "Position of the active endpoint in the configured list (0 = the primary).",
            registry=registry,
        )
        self.failovers = Counter(
            f"{p}_failovers",
            "Switches of the write endpoint (failovers and failbacks).",
            ["from_endpoint", "to_endpoint"],
            registry=registry,
        )
        import platform

        from meterhouse import __version__

        self.build_info = Gauge(f"{p}_build_info", "meterhouse version and Python, value 1.",
                                ["version", "python"], registry=registry)  # fmt: skip
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        for reason in REJECT_REASONS:
            self.points_rejected.labels(reason=reason)
        for reason in LIMIT_REASONS:
            self.limited_requests.labels(reason=reason)
        for reason in REPAIR_REASONS:
            self.points_repaired.labels(reason=reason)
        for cause in INSERT_FAILURE_CAUSES:
            self.insert_failures.labels(cause=cause)
        for outcome in IDENTITY_OUTCOMES:
            self.points_identity_checked.labels(outcome=outcome)
        for transport in TRANSPORTS:
            for outcome in REQUEST_OUTCOMES:
                self.requests.labels(transport=transport, outcome=outcome)
