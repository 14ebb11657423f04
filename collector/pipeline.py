"""The collector's chain, built from the sink back to the receivers.

endpoints (ClickHouse, failover) ← writer ← spool ← ingestor (decode, dedup) ← receivers (gRPC, HTTP)
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable

from meterhouse.collector.auth import IngestTokens
from meterhouse.collector.budget import DecodeBudget
from meterhouse.collector.cumulative import CumulativeState
from meterhouse.collector.deadletter import DeadLetters
from meterhouse.collector.decode import Limits
from meterhouse.collector.dedup import RecentRequests
from meterhouse.collector.failover import EndpointSet
from meterhouse.collector.files import Files
from meterhouse.collector.identity import EdgeIdentity
from meterhouse.collector.ingest import (
    Ingestor,
    attribute_sets_loader,
    attribute_sets_present,
    committed_state_loader,
    restore_cumulative,
    with_dead_letters,
)
from meterhouse.collector.ratelimit import RateLimiter
from meterhouse.collector.receivers.grpc import GrpcLimits, OtlpGrpcReceiver
from meterhouse.collector.receivers.http import OtlpHttpReceiver
from meterhouse.collector.series import SeriesLimiter
from meterhouse.collector.spool import Spool
from meterhouse.collector.writer import Writer, settle_redrives
from meterhouse.core import memory, schema
from meterhouse.core.config import Config
from meterhouse.core.httpserver import limits_from as http_limits_from
from meterhouse.core.listen import OTLP_GRPC, OTLP_HTTP, ListenError, listening
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Store, connect, is_embedded
from meterhouse.core.tls import ServerTls

log = logging.getLogger("meterhouse.collector")


def limits_from(config: Config) -> Limits:
    return Limits(
        org_attribute=config.org_attribute,
        max_attributes=config.max_attributes,
        max_attribute_length=config.max_attribute_length,
        max_metric_name_length=config.max_metric_name_length,
        max_unit_length=config.max_unit_length,
        max_scope_length=config.max_scope_length,
        max_description_length=config.max_description_length,
        max_points_per_request=config.max_points_per_request,
        max_past_ns=int(config.max_past_s * 1e9),
        max_future_ns=int(config.max_future_s * 1e9),
    )


class Collector:
    """Start sinks first, stop sources first."""

    def __init__(
        self,
        config: Config,
        metrics: PipelineMetrics,
        connect_endpoint: Callable[[str], Store] | None = None,
        files: Files | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        """``connect_endpoint`` opens a ClickHouse endpoint and ``files`` is the file layer of the spool
        and dead letters: the seams through which tests inject outages and disk errors."""
        self.config = config
        self.memory = memory.plan(config)
        self.trimmer = memory.Trimmer()
        self.tls = tls
        self.metrics = metrics
        self.endpoints = EndpointSet(
            config.endpoints,
            connect_endpoint
            or (
                lambda url: connect(
                    url,
                    config.data_dir,
                    config.database,
                    config.raw_retention_days,
                    config.cluster,
                    memory=self.memory,
                )
            ),
            metrics,
            config.database,
            failover_after_failures=config.failover_after_failures,
            failback_hold_s=config.failback_hold_s,
            health_check_interval_s=config.health_check_interval_s,
        )
        # Until start() reads the floor, every point is to verify (see collector/identity.py).
        self.identity = EdgeIdentity(floor_ns=2**63 - 1, max_streams=self.memory.identity_max_streams)
        self.spool = Spool(
            config.data_dir / "spool",
            max_bytes=config.spool_max_bytes,
            segment_bytes=config.spool_segment_bytes,
            fsync=config.spool_fsync,
            max_cached_bytes=self.memory.spool_cache_bytes,
            files=files,
            mark=self.identity.mark,
            max_record_bytes=self.memory.request_spooled_bytes,
            max_record_keys=self.memory.insert_attribute_keys,
        )
        self.recent = (
            RecentRequests(
                config.data_dir / "spool" / "recent-requests.log",
                config.dedup_window_s,
                max_entries=self.memory.dedup_requests,
            )
            if config.dedup_window_s > 0
            else None
        )
        self.dead_letters = DeadLetters(config.data_dir / "dead-letter", files)
        self.writer = Writer(
            self.spool,
            self.endpoints,
            metrics,
            self.dead_letters,
            flush_interval_s=config.flush_interval_s,
            flush_max_points=config.flush_max_points,
            # A group's insert must fit the engine's share as a request's does (core/memory.py).
            flush_max_bytes=min(config.flush_max_bytes, self.memory.request_spooled_bytes),
            flush_max_keys=self.memory.insert_attribute_keys,
            backoff_max_s=config.retry_max_backoff_s,
            poison_after_attempts=config.poison_after_attempts,
            # ``is not None``: an empty RecentRequests is falsy (it has a length), and the hook must be
            # wired from the first start, when no digest is known yet.
            before_commit=self.recent.committed if self.recent is not None else None,
        )
        self.cumulative = CumulativeState(
            # Committed (ClickHouse), spooled (``restore_cumulative`` at start) and dead-lettered points.
            with_dead_letters(
                committed_state_loader(self.endpoints, config.cluster), self.dead_letters.cumulative
            ),
            committed_seq=lambda: self.spool.committed_seq,
            max_entries=self.memory.cumulative_series,
        )
        self.tokens = IngestTokens(config.ingest_tokens)
        self.rate = (
            RateLimiter(config.ingest_points_per_s, config.ingest_burst_points)
            if config.ingest_points_per_s > 0
            else None
        )
        self.series = (
            SeriesLimiter(
                config.series_per_org_metric,
                attribute_sets_loader(self.endpoints, config.series_per_org_metric),
                attribute_sets_present(self.endpoints),
            )
            if config.series_per_org_metric > 0
            else None
        )
        self.decode_budget = DecodeBudget(self.memory.decode_bytes)
        self.ingestor = Ingestor(
            self.spool, metrics, limits_from(config), self.cumulative, self.recent,
            tokens=self.tokens, rate=self.rate, series=self.series,
        )  # fmt: skip
        self.http = OtlpHttpReceiver(
            config.host,
            config.otlp_http_port,
            self.ingestor,
            metrics,
            config.max_request_bytes,
            limits=http_limits_from(config),
            max_bytes_in_flight=self.memory.http_bytes_in_flight,
            tls=tls,
            decode_budget=self.decode_budget,
        )
        self.grpc = OtlpGrpcReceiver(
            config.host,
            config.otlp_grpc_port,
            self.ingestor,
            metrics,
            config.max_request_bytes,
            max_concurrent_rpcs=config.grpc_max_concurrent_rpcs,
            max_bytes_in_flight=self.memory.grpc_bytes_in_flight,
            tls=tls,
            limits=GrpcLimits.from_config(config),
            decode_budget=self.decode_budget,
        )
        m = metrics
        m.spool_limit_bytes.set(config.spool_max_bytes)
        m.spool_bytes.set_function(self.spool.disk_bytes)
        m.spool_uncommitted_bytes.set_function(lambda: self.spool.uncommitted_bytes)
        m.spool_oldest_age.set_function(self.spool.oldest_age_s)
        m.pending_points.set_function(lambda: self.spool.pending_points)
        m.dead_letters_pending.set_function(self.writer.dead_letters.count)
        m.data_dir_free_bytes.set_function(lambda: _disk_usage(config.data_dir)[0])
        m.data_dir_size_bytes.set_function(lambda: _disk_usage(config.data_dir)[1])
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started and self.writer.running

    @property
    def alive(self) -> bool:
        """False once the writer has stopped while the collector runs (nothing in-process restarts it)."""
        return not self._started or self.writer.running

    def bind(self) -> None:
        """Take both OTLP ports before anything starts (see ``meterhouse/core/listen.py``); a port that
        cannot be taken raises ListenError naming it, and neither is then held."""
        host = self.config.host
        try:
            with listening(OTLP_HTTP, host, self.config.otlp_http_port):
                self.http.bind()
            with listening(OTLP_GRPC, host, self.config.otlp_grpc_port):
                self.grpc.bind()
        except ListenError:
            self.http.shutdown(0)
            raise

    def start(self) -> None:
        log.info("memory budget", extra=self.memory.describe())
        self.trimmer.start()
        self.bind()
        self.endpoints.start()
        if not self.endpoints.active_healthy():  # none answered: the check switches to any that does
            log.warning(
                "store unreachable at start; the spool takes usage meanwhile, written once the store answers",
                extra={"store": ",".join(ep.label for ep in self.endpoints.endpoints),
                       "error": self.endpoints.endpoints[self.endpoints.active].error},
            )  # fmt: skip
        report = self.spool.open()
        m = self.metrics
        m.spool_quarantined_records.inc(report.quarantined_records)
        m.spool_quarantined_bytes.inc(report.quarantined_bytes)
        m.spool_replayed.inc(report.pending_records)
        if report.quarantined_records:
            self.endpoints.record_event("spool_quarantine", "spool", "quarantine",
                                        f"{report.quarantined_records} damaged record(s)",
                                        f"bytes={report.quarantined_bytes}")  # fmt: skip
        if report.pending_records:
            log.info("replaying spool", extra={"records": report.pending_records,
                                               "points": self.spool.pending_points,
                                               "replay_groups": report.replay_groups})  # fmt: skip
            self.endpoints.record_event("spool_replay", "spool", self.endpoints.name,
                                        f"{report.pending_records} record(s) not yet committed at start",
                                        f"points={self.spool.pending_points}")  # fmt: skip
        if self.spool.last_seq == 0 or not report.pending_records:
            # A new spool, or one with nothing to replay (its numbers may jump without splitting a group):
            # above every number the database holds (a dead letter's redrive numbers its rows above the
            # spool's and reserves them in it; this holds without that reservation too).
            self._continue_numbering()
        if is_embedded(self.config.endpoints[0]):
            # A dead-letter redrive cut short: what its rows put in is read from the tables while its
            # number is still the newest, before the writer numbers anything above it.
            settled = settle_redrives(self.dead_letters, self.endpoints)
            if settled:
                log.warning("dead letters: redrives cut short settled", extra={"letters": settled})
        self.dead_letters.load()  # tokens and cumulative points, before the writer and receivers
        if self.recent is not None:
            self.recent.load(report.digests)
        restore_cumulative(self.cumulative, self.spool)  # before the writer commits and receivers run
        spooled_max = 0
        if report.pending_records:
            for batch in self.spool.uncommitted_batches():
                spooled_max = max(spooled_max, *batch.columns["time"], *batch.dist_columns.get("time", []))
                if self.series is not None:
                    # Sets of points accepted but not yet in ClickHouse are admitted already.
                    self.series.observe(batch.columns)
                    if batch.dist_columns:
                        self.series.observe(batch.dist_columns)
        self.identity.floor_ns = max(self._stored_max_time(), spooled_max)
        self.writer.start()
        self.http.start()
        self.grpc.start()
        self._started = True

    def _stored_max_time(self) -> int:
        """The greatest time of any stored point: no point acknowledged before this start is later than
        it (with the spool's). Unread, the latest time any point could have been accepted with."""
        try:
            return int(self.endpoints.scalar(schema.max_point_time_sql(self.endpoints.database)) or 0)
        except Exception as e:  # noqa: BLE001 - the bound stands in for the time not read
            bound = time.time_ns() + int(self.config.max_future_s * 1e9)
            log.warning("the stored points' latest time unread; points up to the accepted future verified",
                        extra={"error": f"{type(e).__name__}: {e}"[:300]})  # fmt: skip
            return bound

    def _continue_numbering(self) -> None:
        """A new spool (or one with nothing uncommitted): number its records above every group the
        database holds, so neither the writer's ledger (``schema.SEQ_COLUMN``, embedded) nor point
        identity's check (rows of groups before this one, ``collector/identity.py``; any endpoint)
        mistakes an old group's rows (or a dead letter's redrive's) for a new one's.

        A database that cannot be read now may still hold groups: then above the clock in nanoseconds,
        which no number given so far can have reached (a spool numbers one by one from 0 or from such a
        floor, far slower than the clock runs)."""
        try:
            floor = self.endpoints.max_batch_seq()
        except Exception as e:  # noqa: BLE001 - the clock stands in for the number not read
            floor = time.time_ns()
            log.warning("spool: the database's last batch number unread; numbering above the clock",
                        extra={"error": f"{type(e).__name__}: {e}"[:300], "seq": floor})  # fmt: skip
        if floor > self.spool.last_seq:
            log.info("spool: numbering records above the database's last batch",
                     extra={"seq": floor, "spool_seq": self.spool.last_seq})  # fmt: skip
            self.spool.advance(floor)

    def reload(self, config: Config) -> None:
        """Serve new ingest tokens (SIGHUP); TLS material is swapped by its owner, ``tls``."""
        self.tokens.replace(config.ingest_tokens)
        if self.rate is not None:
            self.rate.forget({"", *(p.id for p in self.tokens.principals)})

    def shutdown(self, timeout_s: float) -> None:
        """Stop receivers, write what the spool holds until the deadline, then close."""
        deadline = time.monotonic() + timeout_s
        self._started = False

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self.http.shutdown(left())
        self.grpc.shutdown(min(left(), 1.0))
        self.http.in_flight.wait_idle(max(0.1, left()))
        self.writer.shutdown(left())
        self.spool.shutdown(left())
        if self.recent is not None:
            self.recent.close()
        self.endpoints.shutdown(min(left(), 1.0) + 0.5)
        self.trimmer.stop()


def _disk_usage(path: str | os.PathLike[str]) -> tuple[float, float]:
    """(free, total) bytes of the file system holding ``path``; NaN when it cannot be read."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return float("nan"), float("nan")
    return float(usage.free), float(usage.total)
