"""Tables derived from committed rows by a job instead of a view on every insert.

The attribute-cardinality table (distinct values and distinct orgs per metric, attribute key and hour)
fed two materialized views per insert: about a third of the whole schema's insert cost for one
Grafana panel. On the embedded engine it is filled here, from the rollup's rows and the attribute sets
they name (``schema.cardinality_job_sql``), every ``--cardinality-interval-s``. Its states are sets, so
a range taken twice adds nothing; the job's progress (the first ledger number it has not taken) is kept
in ``derived_progress`` after each range, and a kill repeats at most the range it cut short.

Only rows of committed groups are taken (the spool's last committed number bounds each run): every row
of a group numbered below that is in place. A group in doubt at a start is numbered above it and
replayed later, so the next run takes it. Rows inserted outside the writer's ledger (number 0, by tools)
are taken only by a new database's first run. On a ClickHouse server several collectors number their own
groups, so the views stay there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from meterhouse.core import schema
from meterhouse.core.store import Store

log = logging.getLogger("meterhouse.collector.derived")

#: Ledger numbers per range at first (a number is a spool record: up to one request's points); halved
#: while a range fails for memory, doubled back after each range that succeeds.
RECORDS_PER_RANGE = 64


class CardinalityJob:
    """Fills the attribute-cardinality table from committed rollup rows, in the background."""

    def __init__(
        self,
        on_store: Callable[[Callable[[Store], Any]], Any],
        committed: Callable[[], int],
        interval_s: float,
        query_settings: dict[str, Any] | None = None,
    ) -> None:
        """``on_store`` runs a function on the store (the endpoint set's routing); ``committed`` is the
        spool's last committed number; ``query_settings`` bound each range's queries (memory)."""
        self.on_store = on_store
        self.committed = committed
        self.interval_s = interval_s
        self.query_settings = query_settings or {}
        self.step = RECORDS_PER_RANGE
        self.last_error = ""
        self._resume_from: int | None = None  # PROGRESS_PENDING's value, from prepare
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prepare(self) -> None:
        """Before the writer starts: a database whose views filled the table until now is taken from above
        the spool's last committed group (``schema.PROGRESS_PENDING``); every group below it went
        through the views. The number is kept: a store that cannot be read now is set by the first run
        that can."""
        self._resume_from = self.committed() + 1
        try:
            self._resume()
        except Exception as e:  # noqa: BLE001 - the first run that reaches the store does it
            log.warning("attribute cardinality: progress unread at start; set at the first run",
                        extra={"error": f"{type(e).__name__}: {e}"[:300]})  # fmt: skip

    def _resume(self) -> None:
        if self._resume_from is None:
            return
        if self.on_store(lambda s: s.progress(schema.CARDINALITY_JOB)) == schema.PROGRESS_PENDING:
            start = self._resume_from
            self.on_store(lambda s: s.set_progress(schema.CARDINALITY_JOB, start))
            log.info("attribute cardinality: the job takes over from the views", extra={"from_seq": start})
        self._resume_from = None

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cardinality-job", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - tried again at the next interval
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("attribute cardinality job failed, will retry", extra={"error": self.last_error})

    def run_once(self) -> int:
        """Take every committed range not taken yet; the number of ranges taken."""
        self._resume()
        top = self.committed()
        taken = 0
        while not self._stop.is_set():
            nxt = self.on_store(lambda s: s.progress(schema.CARDINALITY_JOB))
            if nxt is None or nxt == schema.PROGRESS_PENDING or nxt > top:
                return taken
            first = self.on_store(partial(Store.next_seq_at_or_above, seq=nxt))
            if first is None or first > top:
                self.on_store(lambda s: s.set_progress(schema.CARDINALITY_JOB, top + 1))
                return taken
            hi = min(top, first + self.step - 1)
            started = time.monotonic()
            try:
                self.on_store(
                    partial(Store.derive_cardinality, lo=first, hi=hi, settings=self.query_settings)
                )
            except Exception as e:
                if "MEMORY_LIMIT_EXCEEDED" in str(e) and self.step > 1:
                    self.step //= 2
                    log.warning("attribute cardinality: a range failed for memory; smaller ranges",
                                extra={"records": self.step})  # fmt: skip
                    continue
                raise
            self.on_store(partial(Store.set_progress, job=schema.CARDINALITY_JOB, seq=hi + 1))
            self.step = min(RECORDS_PER_RANGE, self.step * 2)
            taken += 1
            spent = round(time.monotonic() - started, 3)
            log.debug(
                "attribute cardinality: range taken", extra={"from_seq": first, "to_seq": hi, "s": spent}
            )
        return taken
