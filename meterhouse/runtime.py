"""`meterhouse up`: composes the collector and exporter planes in one process and runs them."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import cast

from a2wsgi import WSGIMiddleware
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from meterhouse import __version__
from meterhouse.collector import Collector
from meterhouse.core.config import Config
from meterhouse.core.httpserver import App, HttpServer, InFlightLimit, limits_from
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.exporter import OrgHealth, Reconciler, create_app

log = logging.getLogger("meterhouse")


class Stack:
    """Everything `meterhouse up` runs, with ports resolved once started."""

    def __init__(self, config: Config, connect_endpoint=None, files=None) -> None:
        """``connect_endpoint(url) -> Store`` overrides how endpoints are opened (tests share one engine);
        ``files`` the spool's file layer (tests inject disk errors)."""
        self.config = config
        self.registry = CollectorRegistry()
        for c in (ProcessCollector, PlatformCollector, GCCollector):
            c(registry=self.registry)
        self.metrics = PipelineMetrics(self.registry)
        self.collector = Collector(config, self.metrics, connect_endpoint, files)
        # Reads go to whichever endpoint is active, with health of their own (reads never fail writes over).
        self.store = self.collector.endpoints.reads()
        self.health = OrgHealth(
            self.store,
            self.registry,
            refresh_s=config.health_refresh_s,
            silent_after_s=config.silent_after_s,
            spike_factor=config.spike_factor,
            spike_baseline_hours=config.spike_baseline_hours,
            spike_min_usage=config.spike_min_usage,
            top_k=config.top_k,
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
            alive=lambda: self.collector.alive,
        )
        # The Flask app runs on a2wsgi's bounded thread pool; the server holds connections, not threads.
        limits = limits_from(config)
        wsgi = WSGIMiddleware(self.app, workers=8)  # type: ignore[arg-type]  # Flask is a WSGI app
        asgi = InFlightLimit(cast(App, wsgi), limits.max_requests_in_flight)
        self._http = HttpServer(asgi, config.host, config.http_port, limits, "http-api")

    @property
    def http_port(self) -> int:
        return self._http.port

    def start(self) -> None:
        self.collector.start()
        self.health.start()
        self.reconciler.start()
        self._http.start()

    def shutdown(self, timeout_s: float) -> None:
        self.health.shutdown(1.0)
        self.reconciler.shutdown(1.0)
        self.collector.shutdown(timeout_s)
        self._http.shutdown(1.0)


def run_up(config: Config) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        stack = Stack(config)
        stack.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    store = ",".join(ep.label for ep in stack.collector.endpoints.endpoints)
    log.info(
        "meterhouse ready",
        extra={
            "version": __version__,
            "otlp_grpc": f"{config.host}:{stack.collector.grpc.port}",
            "otlp_http": f"http://{config.host}:{stack.collector.http.port}/v1/metrics",
            "http": f"http://{config.host}:{stack.http_port}",
            "store": store,
            "data_dir": str(config.data_dir),
            "startup_s": round(time.monotonic() - started, 3),
        },
    )
    stop.wait()
    stack.shutdown(config.shutdown_timeout_s)
    log.info("stopped")
    return 0
