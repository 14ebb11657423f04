"""`meterhouse up`: composes the collector and exporter planes in one process and runs them."""

from __future__ import annotations

import hashlib
import logging
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import cast

from a2wsgi import WSGIMiddleware
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from meterhouse import __version__
from meterhouse.collector import Collector
from meterhouse.collector.commits import CommitPublisher, wait_committed
from meterhouse.core import commits, datadir
from meterhouse.core.config import Config, ConfigError
from meterhouse.core.hours import TrafficHours
from meterhouse.core.httpserver import (
    App,
    BufferedBody,
    HttpServer,
    InFlightLimit,
    UnreadAnswers,
    limits_from,
)
from meterhouse.core.listen import API, SQL, ListenError, listening
from meterhouse.core.memory import plan as memory_plan
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import is_embedded
from meterhouse.core.tls import ServerTls, load_material
from meterhouse.exporter import OrgHealth, Reconciler, create_app
from meterhouse.exporter.auth import Auth
from meterhouse.exporter.sql import ANSWERS_UNREAD, MAX_QUERY_BYTES, QUERY_TOO_LONG, Engine, create_sql_app
from meterhouse.exporter.sql_worker import WORKERS_DIR, Spawner

log = logging.getLogger("meterhouse")


def collector_name(config: Config) -> str:
    """This collector's name in ``collector_commits``: the host, and its data directory (hashed), so that
    a restart keeps it and two collectors on one host differ."""
    digest = hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}/{digest}"


class Stack:
    """Everything `meterhouse up` runs, with ports resolved once started."""

    def __init__(self, config: Config, connect_endpoint=None, files=None) -> None:
        """``connect_endpoint(url) -> Store`` overrides how endpoints are opened (tests share one engine);
        ``files`` the spool's file layer (tests inject disk errors)."""
        self.config = config
        material = load_material(config)
        self.tls = ServerTls(material) if material is not None else None
        self.registry = CollectorRegistry()
        for c in (ProcessCollector, PlatformCollector, GCCollector):
            c(registry=self.registry)
        self.metrics = PipelineMetrics(self.registry)
        self.collector = Collector(config, self.metrics, connect_endpoint, files, tls=self.tls)
        # Reads go to whichever endpoint is active, with health of their own (reads never fail writes over).
        self.store = self.collector.endpoints.reads()
        self.name = collector_name(config)
        self.close_wait_s = commits.CLOSE_WAIT_S
        # The embedded engine has one collector, this one; a server or cluster may have others, which
        # publish how far they have committed, as this one does.
        self.publisher = (
            None
            if is_embedded(config.endpoints[0])
            else CommitPublisher(self.collector.spool, self.collector.endpoints, self.name)
        )
        self.health = OrgHealth(
            self.store,
            self.registry,
            refresh_s=config.health_refresh_s,
            silent_after_s=config.silent_after_s,
            spike_factor=config.spike_factor,
            spike_baseline_hours=config.spike_baseline_hours,
            spike_min_usage=config.spike_min_usage,
            top_k=config.top_k,
            traffic_hours=TrafficHours.parse(config.traffic_hours),
        )
        self.reconciler = Reconciler(
            self.store, self.registry, interval_s=config.reconcile_interval_s, months=config.reconcile_months
        )
        self.app = create_app(
            self.store,
            self.registry,
            lambda: self.collector.ready,
            self.health,
            config.auth_tokens,
            config.raw_retention_days,
            config.late_window_days,
            close_wait=self.wait_committed,
            alive=lambda: self.collector.alive,
        )
        # A rollup rebuild holds the writer (exporter/months.py, core/rollup.py).
        self.app.extensions["meterhouse.writer_hold"] = self.collector.writer.held
        # The Flask app runs on a2wsgi's bounded thread pool; the server holds connections, not threads.
        limits = limits_from(config)
        wsgi = WSGIMiddleware(self.app, workers=8)  # type: ignore[arg-type]  # Flask is a WSGI app
        asgi = InFlightLimit(cast(App, wsgi), limits.max_requests_in_flight)
        self._http = HttpServer(asgi, config.host, config.http_port, limits, "http-api", self.tls)
        self._sql: HttpServer | None = None
        # An earlier run's mirrors of the SQL endpoint (killed, or run with it on): they hold the disk space
        # of parts merged away since (adversary 37). The data directory is this process's.
        shutil.rmtree(config.data_dir / WORKERS_DIR, ignore_errors=True)
        if config.sql_port and is_embedded(config.endpoints[0]):
            memory = memory_plan(config)
            # Each handle is a process of its own, killed at its time limit (exporter/sql_worker.py).
            self._sql_workers = Spawner(config.data_dir, config.database, config.sql_timeout_s,
                                        memory.sql_query_bytes)  # fmt: skip
            self.sql_engine = Engine(self._sql_workers, config.sql_max_concurrent, config.sql_timeout_s,
                                     memory.sql_query_bytes, memory.sql_result_bytes,
                                     database=config.database)  # fmt: skip
            engine = self.sql_engine
            self.sql_auth = Auth(config.auth_tokens)
            self.sql_app = create_sql_app(engine, self.sql_auth, config.database, __version__)
            sql_wsgi = WSGIMiddleware(self.sql_app, workers=config.sql_max_concurrent + 2)  # type: ignore[arg-type]
            answers = UnreadAnswers(cast(App, sql_wsgi), memory.sql_unread_bytes, ANSWERS_UNREAD)
            whole_bodies = BufferedBody(answers, MAX_QUERY_BYTES, QUERY_TOO_LONG)
            self._sql = HttpServer(
                InFlightLimit(whole_bodies, limits.max_requests_in_flight),
                config.host, config.sql_port, limits, "http-sql", self.tls,
            )  # fmt: skip
        elif config.sql_port:
            log.info("SQL endpoint off: the first endpoint is a ClickHouse server; query it directly",
                     extra={"endpoint": config.endpoints[0].split("@")[-1]})  # fmt: skip

    @property
    def http_port(self) -> int:
        return self._http.port

    @property
    def sql_port(self) -> int:
        """The SQL endpoint's port, or 0 when it is off."""
        return self._sql.port if self._sql is not None else 0

    def wait_committed(self) -> list[str]:
        """What a close waits for before its cutoff: every point acknowledged before now committed, by
        this collector (its spool) and by every other collector that published lately; the names of
        those that did not confirm it within ``close_wait_s``."""
        since_ms = int(self.store.scalar(commits.NOW_MS_SQL)) if self.publisher is not None else 0
        deadline = time.monotonic() + self.close_wait_s
        missing = [] if wait_committed(self.collector.spool, self.close_wait_s) else [self.name]
        if self.publisher is not None:
            left = max(0.0, deadline - time.monotonic())
            missing += commits.wait_for_collectors(self.store, since_ms, left, exclude={self.name})
        return missing

    def bind(self) -> None:
        """Take every listening port before anything starts: the API's, then the collector's (gRPC's last,
        see ``meterhouse/core/listen.py``). ListenError names the one that cannot be taken; none is then
        held."""
        with listening(API, self.config.host, self.config.http_port):
            self._http.bind()
        try:
            if self._sql is not None:
                with listening(SQL, self.config.host, self.config.sql_port):
                    self._sql.bind()
            self.collector.bind()
        except ListenError:
            self._http.shutdown(0)
            if self._sql is not None:
                self._sql.shutdown(0)
            raise

    def ready(self) -> bool:
        """What /readyz answers 200 for: the pipeline runs and the active ClickHouse endpoint answered
        its last health check (a query)."""
        return self.collector.ready and self.store.ping()

    def start(self) -> None:
        self.bind()
        self.collector.start()
        if self.publisher is not None:
            self.publisher.start()
        self.health.start()
        self.reconciler.start()
        self._http.start()
        if self._sql is not None:
            self._sql.start()

    def reload(self, config: Config) -> None:
        """SIGHUP: new certificates, ingest and API tokens, for new connections and requests.

        Open connections, requests in flight and the spool are untouched. Raises ConfigError (and
        keeps everything as it was) when the new configuration is bad: every check comes before the
        first change.
        """
        # Like TLS, authentication is not turned off by a reload: an empty list would serve anyone.
        if self.config.ingest_tokens and not config.ingest_tokens:
            raise ConfigError(
                "ingest.tokens: removing every ingest token would open ingest; restart without them"
            )
        if self.config.auth_tokens and not config.auth_tokens:
            raise ConfigError(
                "auth.tokens: removing every API token would open the API; restart without them"
            )
        if self.tls is not None:
            self.tls.reload(config)
        elif config.tls_enabled:
            raise ConfigError("tls: cannot be turned on by a reload; restart with it")
        self.collector.reload(config)
        self.app.extensions["meterhouse.auth"].tokens = config.auth_tokens  # one reference swap
        if self._sql is not None:
            self.sql_auth.tokens = config.auth_tokens
        self.config = config

    def shutdown(self, timeout_s: float) -> None:
        if self.publisher is not None:
            self.publisher.shutdown(1.0)
        self.health.shutdown(1.0)
        self.reconciler.shutdown(1.0)
        self.collector.shutdown(timeout_s)
        self._http.shutdown(1.0)
        if self._sql is not None:
            self._sql.shutdown(1.0)
            self.sql_engine.close()
            self._sql_workers.close()


def run_up(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; on SIGHUP read ``reload_config()`` and serve its tokens and TLS files.

    The data directory is locked first, for the process's life: a second process on it gets
    ``datadir.DataDirInUse`` before anything in it is read or written. Then every port is taken: one that
    cannot be raises ``ListenError`` before the store or spool is opened. ``meterhouse ready`` is logged
    once /readyz would answer 200, which waits for the store to answer a query (usage is spooled
    meanwhile)."""
    datadir.lock(config.data_dir)
    wake = threading.Event()  # set by every signal; what to do is in the two flags below
    stop = threading.Event()
    hup = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_hup(_signum: int, _frame: object) -> None:
        hup.set()
        wake.set()  # the main thread reloads and goes on, unless a stop came too

    if reload_config is not None:
        signal.signal(signal.SIGHUP, on_hup)
    started = time.monotonic()
    try:
        stack = Stack(config)
        stack.bind()  # a port that cannot be taken: ListenError, before anything is started or written
        stack.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    announced = False
    while not stop.is_set():
        if not announced and stack.ready():  # as /readyz: not before the store answers
            announced = True
            _announce_ready(stack, time.monotonic() - started)
        # Python runs signal handlers in the main thread only, and a signal the kernel hands to another
        # thread does not interrupt a wait without timeout: its handler would run only at the next
        # signal. Waking up now and then runs it.
        wake.wait(0.5)
        wake.clear()
        if stop.is_set():  # a stop wins over a reload that came with it
            break
        if hup.is_set():
            hup.clear()
            _reload(stack, reload_config)
    stack.shutdown(config.shutdown_timeout_s)
    log.info("stopped")
    return 0


def _announce_ready(stack: Stack, startup_s: float) -> None:
    """The one `meterhouse ready` line: where it listens and which store answered."""
    config = stack.config
    log.info(
        "meterhouse ready",
        extra={
            "version": __version__,
            "otlp_grpc": f"{config.host}:{stack.collector.grpc.port}",
            "otlp_http": f"http://{config.host}:{stack.collector.http.port}/v1/metrics",
            "http": f"http://{config.host}:{stack.http_port}",
            "sql": f"http://{config.host}:{stack.sql_port}" if stack.sql_port else "off",
            "store": stack.collector.endpoints.name,
            "data_dir": str(config.data_dir),
            "startup_s": round(startup_s, 3),
        },
    )


def _reload(stack: Stack, reload_config: Callable[[], Config] | None) -> None:
    """Read the configuration again and serve its tokens and certificates; a bad one changes nothing."""
    if reload_config is None:
        return
    try:
        config = reload_config()
        stack.reload(config)
    except ConfigError as e:
        log.error("reload refused, still serving the previous tokens and certificates: %s", e)
        return
    log.info(
        "reloaded",
        extra={
            "ingest_tokens": len(config.ingest_tokens),
            "api_tokens": len(config.auth_tokens),
            "tls": config.tls_enabled,
        },
    )
