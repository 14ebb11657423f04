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

log = logging.getLogger("meterhouse.rejected")


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
        #: (reason, metric) → [time of its last line, points held back since, an example org]
        self._keys: OrderedDict[tuple[str, str], list] = OrderedDict()

    def record(self, by_metric: dict[tuple[str, str], list]) -> None:
        """Take one request's rejections: {(reason, metric): [points, example org]}."""
        now = self._clock()
        lines = []
        with self._lock:
            for key, (n, org) in by_metric.items():
                entry = self._keys.get(key)
                if entry is None:
                    entry = self._keys[key] = [now - self.interval_s, 0, org]
                    while len(self._keys) > self.max_keys:
                        self._keys.popitem(last=False)  # metric names are the sender's: bound them
                entry[1] += n
                entry[2] = entry[2] or org
                if now - entry[0] >= self.interval_s:
                    lines.append((key, entry[1], entry[2]))
                    entry[0], entry[1], entry[2] = now, 0, ""
                    self._keys.move_to_end(key)
        for (reason, metric), n, org in lines:
            log.warning(
                "data points rejected",
                extra={"reason": reason, "metric": metric[:200], "example_org": org, "points": n,
                       "interval_s": self.interval_s},
            )  # fmt: skip
