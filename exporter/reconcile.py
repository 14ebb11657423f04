"""Continuous reconciliation: raw points against the hourly rollup, per open and closed month.

A background thread compares, every ``interval_s``, the last ``months`` months (the current one and those
before it) in ClickHouse and exports the drift as a few gauges labelled by month state (``open`` or
``closed``), never by org; the drifting orgs are listed by the shared query the dashboard runs. It also
counts late points, by what became of them (``meterhouse_late_points_total{disposition}``):
``open_month`` — committed after their month ended, while it was still open, so in its statement;
``adjustment`` — committed after their month was closed, so kept out of it and listed as adjustments.
And it checks what finance signed: the statement lines of the reconciled closed months against the raw
points they were computed from (``meterhouse_statement_mismatched_lines``), so that nothing changes a
closed month silently.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meterhouse.core import schema
from meterhouse.core.close import NS, Month, count_statement_mismatches, get_close

log = logging.getLogger("meterhouse.reconcile")
MONTH_STATES = ("open", "closed")
DISPOSITIONS = ("open_month", "adjustment")


class Reconciler:
    """Computes drift and late-point counts on a timer and exports them through a registry collector."""

    def __init__(
        self,
        store,
        registry: CollectorRegistry,
        *,
        interval_s: float = 300.0,
        months: int = 3,
        clock=time.time,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.months = months
        self.clock = clock
        zero = dict.fromkeys(MONTH_STATES, 0)
        self.drifting_orgs: dict[str, int] = dict(zero)
        self.drift_points: dict[str, int] = dict(zero)
        self.drift_value: dict[str, float] = dict.fromkeys(MONTH_STATES, 0.0)
        self.months_checked: dict[str, int] = dict(zero)
        self.late_points: dict[str, int] = dict.fromkeys(DISPOSITIONS, 0)
        self.statement_mismatches = 0
        self.computed_at = 0.0
        self.duration_s = 0.0
        self.ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        registry.register(self)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval_s)

    def refresh(self) -> bool:
        """Recompute now; on failure the previous numbers stay and ``ok`` turns 0."""
        started = time.perf_counter()
        db = self.store.database
        try:
            closed = {int(m): int(cutoff) for m, cutoff in self.store.rows(schema.closes_sql(db))}
            newest = Month.of_ns(int(self.clock() * NS))
            window = [newest]
            for _ in range(self.months - 1):
                window.append(window[-1].previous())
            drift = {
                int(m): (int(orgs), int(points), float(value))
                for m, orgs, points, value in self.store.rows(
                    schema.drift_summary_sql(db), {"from_ns": window[-1].start_ns, "to_ns": newest.end_ns}
                )
            }
            orgs = dict.fromkeys(MONTH_STATES, 0)
            points = dict.fromkeys(MONTH_STATES, 0)
            checked = dict.fromkeys(MONTH_STATES, 0)
            value = dict.fromkeys(MONTH_STATES, 0.0)
            for month in window:
                state = "closed" if month.key in closed else "open"
                o, p, v = drift.get(month.key, (0, 0, 0.0))
                orgs[state] += o
                points[state] += p
                value[state] += v
                checked[state] += 1
            # The signed numbers themselves: each closed month's lines against the raw points at its cutoff.
            mismatches = 0
            for month in window:
                if month.key in closed and (record := get_close(self.store, month)) is not None:
                    mismatches += count_statement_mismatches(self.store, month, record)
            late_all = sum(int(n) for _m, n in self.store.rows(schema.late_points_sql(db)))
            after_close = 0
            for key, cutoff_ms in closed.items():
                month = Month(key // 100, key % 100)
                params = {"from_ns": month.start_ns, "to_ns": month.end_ns, "cutoff_ms": cutoff_ms}
                after_close += int(self.store.scalar(schema.after_close_points_sql(db), params) or 0)
        except Exception as e:  # noqa: BLE001 - keep the last good numbers, say so
            self.ok = False
            log.warning("reconciliation failed", extra={"error": str(e)[:300]})
            return False
        self.drifting_orgs, self.drift_points, self.drift_value, self.months_checked = (
            orgs,
            points,
            value,
            checked,
        )
        self.statement_mismatches = mismatches
        # A point committed after its close is late too; the two dispositions do not overlap. A point
        # committed within a close's settle seconds was open_month until that close took its cutoff before
        # it; the counters never go down (Prometheus would read a reset and count every point again).
        counted = {"open_month": max(0, late_all - after_close), "adjustment": after_close}
        self.late_points = {d: max(self.late_points[d], counted[d]) for d in DISPOSITIONS}
        self.computed_at = self.clock()
        self.duration_s = time.perf_counter() - started
        self.ok = True
        return True

    # -- Prometheus collector -------------------------------------------------------------------
    def describe(self):
        return []

    def collect(self):
        def by_state(name: str, text: str, values: dict) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"meterhouse_reconcile_{name}", text, labels=["month_state"])
            for s in MONTH_STATES:
                family.add_metric([s], values[s])
            return family

        yield by_state(
            "drifting_orgs",
            "Orgs whose raw points and hourly rollup disagree in the reconciled months "
            "(the list: the Reconciliation panel, from ClickHouse).",
            self.drifting_orgs,
        )
        yield by_state(
            "drift_points", "Points by which raw and rollup disagree (absolute, summed).", self.drift_points
        )
        yield by_state(
            "drift_value", "Usage by which raw and rollup disagree (absolute, summed).", self.drift_value
        )
        yield by_state("months", "Months reconciled, by state.", self.months_checked)
        yield GaugeMetricFamily(
            "meterhouse_statement_mismatched_lines",
            "Statement lines of the reconciled closed months that no longer match the raw points they were "
            "computed from (edited or deleted lines, or points that slipped between statement and "
            "adjustments). The list: GET /api/v1/months/{month}/close?verify=true.",
            value=self.statement_mismatches,
        )
        late = CounterMetricFamily(
            "meterhouse_late_points",
            "Points committed after their month ended, by disposition: in the open month's statement "
            "(open_month) or an adjustment to a closed month (adjustment). Read from ClickHouse.",
            labels=["disposition"],
        )
        for d in DISPOSITIONS:
            late.add_metric([d], self.late_points[d])
        yield late
        for name, text, value in (
            ("last_run_timestamp_seconds", "When reconciliation last succeeded.", self.computed_at),
            ("duration_seconds", "How long the last reconciliation took.", self.duration_s),
            ("ok", "1 when the last reconciliation succeeded.", 1 if self.ok else 0),
        ):
            yield GaugeMetricFamily(f"meterhouse_reconcile_{name}", text, value=value)
