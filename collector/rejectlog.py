"""A warning log line for rejected points: one per (reason, metric) and interval, never one per point.

Each line names the reason, the metric, an example org and the number of points rejected for that pair
since its previous line, so what is rejected is never silent and a flood of bad points is one line a
minute. The exact counts are in ``meterhouse_points_rejected_total{reason}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from meterhouse.collector.decode import RejectSample

log = logging.getLogger("meterhouse.rejected")


@dataclass
class _Pending:
    """One (reason, metric): when its last line was written, and what was rejected since."""

    logged_at: float
    points: int = 0
    org: str = ""


class RejectLog:
    """Rate-limited rejection log lines, keyed by (reason, metric); at most ``max_keys`` are tracked."""

    def __init__(
        self,
        interval_s: float = 60.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[tuple[str, str], _Pending] = OrderedDict()

    def record(self, by_metric: dict[tuple[str, str], RejectSample]) -> None:
        """Take one request's rejections by (reason, metric)."""
        now = self._clock()
        lines = []
        with self._lock:
            for key, sample in by_metric.items():
                entry = self._keys.get(key)
                if entry is None:
                    entry = self._keys[key] = _Pending(now - self.interval_s)
                    while len(self._keys) > self.max_keys:
                        self._keys.popitem(last=False)  # metric names are the sender's: bound them
                entry.points += sample.points
                entry.org = entry.org or sample.org
                if now - entry.logged_at >= self.interval_s:
                    lines.append((key, entry.points, entry.org))
                    self._keys[key] = _Pending(now)
                    self._keys.move_to_end(key)
        for (reason, metric), n, org in lines:
            log.warning(
                "data points rejected",
                extra={"reason": reason, "metric": metric[:200], "example_org": org, "points": n,
                       "interval_s": self.interval_s},
            )  # fmt: skip
