"""Org health: high-cardinality questions answered in ClickHouse, exported to Prometheus bounded.

A background thread recomputes, every ``refresh_s``, how many orgs are active, silent and spiking, from
the rollup and the per-org last-seen table (never from raw points, never on a scrape). Scrapes read the
cached numbers; the lists behind them are served by the API, not as labels. The only org-labelled
series is the optional top-K, capped at K.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from meterhouse.core import schema
from meterhouse.core.hours import ALWAYS, TrafficHours

log = logging.getLogger("meterhouse.health")
LIST_LIMIT = 10_000
WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}


@dataclass
class Snapshot:
    computed_at: float = 0.0
    active: dict[str, int] = field(default_factory=dict)
    silent: list[dict] = field(default_factory=list)
    spiking: list[dict] = field(default_factory=list)
    top: list[tuple[str, int]] = field(default_factory=list)
    #: Orgs seen in the previous 7 days but not in the last 24 h (they have left ``silent``).
    silent_over_24h: int = 0
    duration_s: float = 0.0
    ok: bool = False
    #: Counts of every silent and spiking org (the lists above stop at LIST_LIMIT entries).
    silent_count: int = 0
    spiking_count: int = 0


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(int(ts), tz=UTC)


class OrgHealth:
    """Computes :class:`Snapshot` on a timer and exports it through a registry collector."""

    def __init__(
        self,
        store,
        registry: CollectorRegistry,
        *,
        refresh_s: float = 60.0,
        silent_after_s: float = 1800.0,
        spike_factor: float = 5.0,
        spike_baseline_hours: int = 24,
        spike_min_usage: float = 100.0,
        top_k: int = 0,
        traffic_hours: TrafficHours = ALWAYS,
        clock=time.time,
    ) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.silent_after_s = silent_after_s
        self.spike_factor = spike_factor
        self.spike_baseline_hours = spike_baseline_hours
        self.spike_min_usage = spike_min_usage
        self.top_k = top_k
        self.traffic_hours = traffic_hours
        self.clock = clock
        self.snapshot = Snapshot()
        self.refreshes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        registry.register(self)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="org-health", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self.refresh_s)
            self._wake.clear()

    # -- computing ------------------------------------------------------------------------------
    def refresh(self) -> Snapshot:
        """Recompute now (also what the timer calls); on failure the previous numbers stay."""
        started = time.perf_counter()
        now = self.clock()
        db = self.store.database
        try:
            active = {
                w: int(self.store.scalar(schema.orgs_active_sql(db), {"since": _dt(now - s)}) or 0)
                for w, s in WINDOWS.items()
            }
            quiet = {"day_ago": _dt(now - 86400), "quiet_since": _dt(now - self.silent_after_s)}
            silent = [
                {"org_id": org, "last_seen": _dt(ms / 1000).isoformat().replace("+00:00", "Z")}
                for org, ms in self.store.rows(schema.orgs_silent_sql(db), {**quiet, "limit": LIST_LIMIT})
            ]
            # The gauges count every org; the lists (what the API serves) stop at LIST_LIMIT.
            silent_count = int(self.store.scalar(schema.orgs_silent_count_sql(db), quiet) or 0)
            over_24h = {"day_ago": _dt(now - 7 * 86400), "quiet_since": _dt(now - 86400)}
            silent_over_24h = int(self.store.scalar(schema.orgs_silent_count_sql(db), over_24h) or 0)
            last_hour = _dt(now // 3600 * 3600 - 3600)
            spike = {"last": last_hour, "hours": self.spike_baseline_hours, "factor": self.spike_factor,
                     "min_usage": self.spike_min_usage}  # fmt: skip
            spiking = [
                {"org_id": org, "metric": metric, "last_hour_usage": last, "baseline": base,
                 "ratio": last / base, "hour": last_hour.isoformat().replace("+00:00", "Z")}
                for org, metric, last, base in self.store.rows(
                    schema.orgs_spiking_sql(db), {**spike, "limit": LIST_LIMIT})
            ]  # fmt: skip
            spiking_count = int(self.store.scalar(schema.orgs_spiking_count_sql(db), spike) or 0)
            top = []
            if self.top_k:
                params = {"since": _dt(now - 86400), "k": self.top_k}
                top = [(org, int(n)) for org, n in self.store.rows(schema.top_orgs_by_points_sql(db), params)]
        except Exception as e:  # noqa: BLE001 - keep the last good numbers, count the failure
            self.failures += 1
            self.snapshot.ok = False
            log.warning("org health refresh failed", extra={"error": str(e)[:300]})
            return self.snapshot
        self.snapshot = Snapshot(now, active, silent, spiking, top, silent_over_24h,
                                 time.perf_counter() - started, True,
                                 silent_count, spiking_count)  # fmt: skip
        self.refreshes += 1
        return self.snapshot

    # -- Prometheus collector -------------------------------------------------------------------
    def describe(self):
        return []

    def collect(self):
        snap = self.snapshot
        active = GaugeMetricFamily(
            "meterhouse_orgs_active", "Orgs with usage in the window.", labels=["window"]
        )
        for w in WINDOWS:
            active.add_metric([w], snap.active.get(w, 0))
        yield active
        yield GaugeMetricFamily(
            "meterhouse_orgs_silent",
            f"Orgs that reported in the previous 24 h but not in the last {self.silent_after_s:g} s "
            "(the list: GET /api/v1/orgs?status=silent).", value=snap.silent_count)  # fmt: skip
        yield GaugeMetricFamily(
            "meterhouse_orgs_silent_over_24h",
            "Orgs that reported in the previous 7 days but not in the last 24 h (no longer in "
            "meterhouse_orgs_silent).", value=snap.silent_over_24h)  # fmt: skip
        yield GaugeMetricFamily(
            "meterhouse_orgs_spiking",
            f"Orgs whose last complete hour exceeds {self.spike_factor:g} x their hourly baseline "
            "(the list: GET /api/v1/orgs?status=spiking).",
            value=snap.spiking_count,
        )
        for name, text, value in (
            # The settings the gauges use, so that the dashboards' lists use the same (their variables).
            (
                "silent_after_seconds",
                "Silent after this long without usage (--silent-after-s).",
                self.silent_after_s,
            ),
            (
                "spike_factor",
                "Spiking above this many times the baseline (--spike-factor).",
                self.spike_factor,
            ),
            (
                "spike_baseline_hours",
                "Hours of the spike baseline (--spike-baseline-hours).",
                self.spike_baseline_hours,
            ),
            (
                "spike_min_usage",
                "Least last-hour usage that can spike (--spike-min-usage).",
                self.spike_min_usage,
            ),
            ("last_refresh_timestamp_seconds", "When org health was last computed.", snap.computed_at),
            ("refresh_duration_seconds", "How long the last org-health refresh took.", snap.duration_s),
            ("refresh_ok", "1 when the last org-health refresh succeeded.", 1 if snap.ok else 0),
        ):
            yield GaugeMetricFamily(f"meterhouse_org_health_{name}", text, value=value)
        expected = self.traffic_hours.expected(datetime.fromtimestamp(self.clock(), UTC))
        yield GaugeMetricFamily(
            "meterhouse_traffic_expected",
            "1 while senders are expected to send (--traffic-hours; always when unset): MeterhouseNoTraffic "
            "warns only then.", value=1 if expected else 0)  # fmt: skip
        if self.top_k:
            top = GaugeMetricFamily(
                "meterhouse_top_org_points",
                f"Points in the last 24 h of the {self.top_k} largest orgs (capped at top_k series).",
                labels=["org_id"])  # fmt: skip
            for org, n in snap.top[: self.top_k]:
                top.add_metric([org], n)
            yield top
