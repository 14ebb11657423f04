"""The decode budget: what requests being decompressed, parsed and decoded at once cost, both transports.

A request's decoded form costs many times its bytes (a data point is some 60 bytes on the wire and up
to a few kilobytes in columns and Python objects; an empty bucket or array element is a byte or two and
tens of bytes parsed; README, "Memory"), so what bounds a collector's memory under load is not the bytes
it holds but what it decodes at once. Each worker takes its request's cost (collector/decode.py,
``decoded_cost``: points, numbers and repeated messages counted off the wire format, objects off the
JSON text) from this budget before it decodes, waiting (holding nothing) while others decode. A
compressed body takes the most its inflating may hold (twice what it may inflate to: the pieces, then
them joined), then its decompressed cost; a protobuf request that
leaves the native fast path grows to its Python walk's cost. A wait longer than ``wait_s`` is answered
retryable (503 / UNAVAILABLE), and a request costing more than three quarters of the budget is refused
(413 / RESOURCE_EXHAUSTED, :class:`TooCostly`), never decoded: nothing was kept either way. The last
quarter is for small requests alone (``_limit``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: A receiver's decode budget when it is built alone (the pipeline gives both the one its memory plan
#: derives): the default memory budget's share.
STANDALONE_DECODE_BYTES = int((1 << 30) * 0.15)


class Busy(Exception):
    """The budget stayed taken for longer than the wait: answer retryable, nothing kept."""


class TooCostly(Exception):
    """The request costs more than one request may take of the budget: it is never decoded."""

    def __init__(self, cost: int, most: int) -> None:
        super().__init__(
            f"decoding this request would take about {_mib(cost)}, more than one request may of the decode "
            f"budget ({_mib(most)}, from --memory-budget-bytes); send fewer data points, attributes or "
            "buckets per request"
        )
        self.cost, self.most = cost, most


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


class DecodeBudget:
    """Bytes decoded at once; :meth:`hold` takes a share for the length of a ``with`` block."""

    def __init__(self, capacity: int, wait_s: float = 10.0) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self.waits = 0  # takes that had to wait, for the metric
        self._cond = threading.Condition()

    @property
    def most(self) -> int:
        """The most one request may cost: three quarters of the capacity."""
        return self.capacity * 3 // 4

    def _limit(self, n: int) -> int:
        """What may be taken in all once a request of ``n`` joins: the whole capacity for a small one
        (a quarter of it at most), three quarters for a large one. So large requests together never
        take the last quarter, and a small (honest) request never waits for them: with every waiter
        woken at once and the first to take the lock winning, requests each costing almost the whole
        budget answered 2-3 of 20 one-point requests 503 after their 10 s wait."""
        return self.capacity if n <= self.capacity // 4 else self.most

    def _take(self, n: int, deadline: float) -> int:
        if n > self.most:
            raise TooCostly(n, self.most)
        limit = self._limit(n)
        with self._cond:
            if self.used + n > limit:
                self.waits += 1
                while self.used + n > limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Busy(f"requests of {self.used} bytes are being decoded; retry later")
                    self._cond.wait(left)
            self.used += n
            return n

    def _give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    @contextmanager
    def hold(self, n: int) -> Iterator[Hold]:
        """Hold ``n`` bytes while the block runs; raises :class:`Busy` or :class:`TooCostly`."""
        hold = Hold(self, self._take(n, time.monotonic() + self.wait_s))
        try:
            yield hold
        finally:
            self._give(hold.held)


class Hold:
    """One worker's share of the budget."""

    def __init__(self, budget: DecodeBudget, held: int) -> None:
        self.budget, self.held = budget, held

    def resize(self, n: int) -> None:
        """Hold ``n`` bytes instead, giving back what is over it (a body once inflated, whose share was
        its most before) or growing as :meth:`grow`."""
        if n >= self.held:
            self.grow(n)
            return
        self.budget._give(self.held - n)
        self.held = n

    def grow(self, n: int) -> None:
        """Hold ``n`` bytes instead (a body once decompressed). Never waits while holding: when the
        rest is not free at once, the share is given back and ``n`` waited for whole. Raises as
        :meth:`DecodeBudget.hold`, the share kept until the block ends."""
        b = self.budget
        if n > b.most:
            raise TooCostly(n, b.most)
        if n <= self.held:
            return
        with b._cond:
            if b.used + n - self.held <= b._limit(n):
                b.used += n - self.held
                self.held = n
                return
        b._give(self.held)
        self.held = 0
        self.held = b._take(n, time.monotonic() + b.wait_s)
