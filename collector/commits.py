"""What a close asks of the collector: wait until every point acknowledged so far is committed, and (when
other collectors may write the same ClickHouse) publish how far this one has committed.

A point is acknowledged once its spool record is durable, and the record's sequence number is taken before
that; so once no record numbered up to the spool's last number (read now) is uncommitted, every point
acknowledged before now is in ClickHouse (or in a dead letter). Records whose write failed were never
acknowledged and are never committed: they are not uncommitted records either.
"""

from __future__ import annotations

import logging
import threading
import time

from meterhouse.collector.failover import EndpointSet
from meterhouse.collector.spool import Spool
from meterhouse.core import commits

log = logging.getLogger("meterhouse.commits")


def committed_through(spool: Spool, position: int) -> bool:
    """Whether every record numbered up to ``position`` is committed."""
    return all(r.seq > position for r in spool.uncommitted_records())


def wait_committed(
    spool: Spool, timeout_s: float, stop: threading.Event | None = None, poll_s: float = 0.02
) -> bool:
    """Wait until every point acknowledged before the call is committed; False after ``timeout_s`` (or
    on ``stop``)."""
    position = spool.last_seq
    deadline = time.monotonic() + timeout_s
    while not committed_through(spool, position):
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return False
        time.sleep(poll_s)
    return True


class CommitPublisher:
    """Every ``interval_s``: read ClickHouse's clock, wait until what the spool acknowledged before then
    is committed, and publish that time as this collector's (``core.commits.publish``)."""

    def __init__(self, spool: Spool, endpoints: EndpointSet, name: str, interval_s: float = 1.0) -> None:
        self.spool = spool
        self.endpoints = endpoints
        self.name = name
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                now_ms = int(self.endpoints.scalar(commits.NOW_MS_SQL))
                # The clock is read before the position: a point acknowledged before now_ms has a record
                # numbered at most the position read after it.
                if wait_committed(self.spool, timeout_s=3600, stop=self._stop):
                    published = int(self.endpoints.scalar(commits.NOW_MS_SQL))
                    commits.publish(self.endpoints, self.name, now_ms, published)
                failing = False
            except Exception as e:  # noqa: BLE001 - published again at the next round
                if not failing:
                    log.warning("cannot publish how far this collector has committed",
                                extra={"error": f"{type(e).__name__}: {e}"[:300]})  # fmt: skip
                failing = True
            self._stop.wait(self.interval_s)

    def shutdown(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
