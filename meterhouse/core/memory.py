"""One memory budget, ``--memory-budget-bytes``, and every memory bound derived from it.

A collector's memory is spent in five places: the process itself (Python, the engine's code), the
embedded engine (inserts, merges, queries and its caches), request bodies being received and decoded,
the spool's in-memory copy of spooled records, and the edge's point-identity table. Each gets a share of
the budget; an option set explicitly (not 0) overrides its share. The engine enforces its share itself
(``max_server_memory_usage``: an allocation past it fails the query with MEMORY_LIMIT_EXCEEDED, which the
writer retries, see README "Delivery guarantees"); meterhouse's shares are bounds on what it holds.

Shares (README, "Memory", has the table with the figures they come from):

- the engine, everything it allocates (``max_server_memory_usage``): 25%, which one insert may use whole
  (``max_memory_usage``: a group of 100,000 points of distinct series needs about 160 MiB; a
  smaller per-query share left such a group failing MEMORY_LIMIT_EXCEEDED on every retry, holding up
  everyone's usage behind it); its mark cache 2% and each of three index caches 0.5%;
- requests being decompressed, parsed and decoded at once, both transports, counted in what they cost
  decoded (collector/decode.py, ``decoded_cost``: per point, packed number and repeated message counted
  off the wire, per byte and object of OTLP/JSON): 15%, which is also the most one request may cost (a
  request of 30,000 cumulative points with 10 attributes each; more is refused 413);
- OTLP/HTTP bodies and OTLP/gRPC messages being received: 2% each (at least one request each);
- the spool's memory copy of spooled records: 4%;
- point identity, a table of 16-byte slots at most 70% full (about 23 bytes a stream): 3%;
- the cumulative conversion's last point per series, about 440 bytes a series: 8% (a request that
  would add series past it while the entries cannot go, their points not yet written, is answered 503);
- the digests of recent requests (the request-level dedup's fast path), about 250 bytes each: 2% (past
  it the oldest go; point identity still drops a re-sent copy's points);
- open connections, about 16 KiB each: 2% on each port (OTLP/HTTP, OTLP/gRPC, the API), unless
  ``--http-max-connections`` / ``--grpc-max-connections`` are set;
- each query of the SQL endpoint (exporter/sql.py): an eighth of the engine's share inside the engine
  (two at once by default: a quarter), and its answer at most 2% of the budget.

One request's points as stored are at most a twelfth of the engine's share (``request_spooled_bytes``):
a request is one insert at least, which takes up to 40 MiB and 8 times its bytes, beside the engine's
caches and merges. An insert (a request, a group of them) carries at most one distinct attribute key per
metric and hour for each 8 KiB of the engine's share (``insert_attribute_keys``): the attribute-cardinality
views keep states per key, and an insert's memory grows with its distinct keys far faster than with its
bytes (31,750 keys took 96-112 MiB, 95,250 took 256-320 MiB).

The rest (about a quarter) is the process itself (140 MiB idle: interpreter, libraries, threads), what gRPC
holds of messages still arriving, the writer's groups outside the engine, and the engine's code pages
(file-backed: the kernel may drop and re-read them under pressure).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from meterhouse.core.config import ConfigError

if TYPE_CHECKING:
    from meterhouse.core.config import Config

#: Bytes the cumulative conversion holds per series (an entry and its dict slot, Python on malloc).
CUMULATIVE_BYTES_PER_SERIES = 440
#: The least budget: its engine share (a quarter) must insert a request of a twelfth of that share, which
#: takes up to 40 MiB and 8 times its bytes; below, even one-point inserts failed for memory for ever
#: (a 125 MB budget was accepted and nothing was written).
MIN_BUDGET_BYTES = 512 << 20
#: Bytes an open connection costs (buffers, transport and protocol objects; measured 14-16 kB on HTTP).
CONNECTION_BYTES = 16 * 1024
#: Bytes the request-level dedup holds per digest kept (collector/dedup.py; measured 240 with tracemalloc).
DEDUP_BYTES_PER_REQUEST = 250
#: Bytes of one slot of the edge's point-identity table (collector/identity.py): a stream's key and time.
IDENTITY_SLOT_BYTES = 16


def identity_streams(share_bytes: int) -> int:
    """The streams a point-identity table of at most ``share_bytes`` holds: its slots are a power of
    two, at most 70% of them used (``EdgeIdentity``; 734,003 streams in 3% of 1 GiB)."""
    slots = 16
    while slots * 2 * IDENTITY_SLOT_BYTES <= share_bytes:
        slots *= 2
    return slots * 7 // 10


#: The engine's share per distinct attribute key (per metric and hour) one insert may carry: 31,750 keys
#: took 96-112 MiB of an insert, 63,500 took 128-160 MiB (BENCHMARKS.md section 12).
ENGINE_BYTES_PER_ATTRIBUTE_KEY = 8 * 1024


@dataclass(frozen=True)
class MemoryPlan:
    """What each part of a collector may hold, in bytes (streams for identity)."""

    budget_bytes: int
    engine_bytes: int
    engine_mark_cache_bytes: int
    engine_index_cache_bytes: int
    http_bytes_in_flight: int
    grpc_bytes_in_flight: int
    decode_bytes: int
    spool_cache_bytes: int
    identity_max_streams: int
    #: The most one request's points may take as stored: its insert (a group of one) must fit in the
    #: engine's share, and an insert takes up to 40 MiB and 8 times its bytes (docs/capacity.md).
    request_spooled_bytes: int
    #: The most distinct attribute keys (per metric and hour) one insert may carry: a request's (413
    #: beyond) and a group's (summed over its records; collector/spool.py ``attribute_keys``).
    insert_attribute_keys: int
    #: Cumulative series whose last point the conversion keeps (collector/cumulative.py).
    cumulative_series: int
    #: Digests of recent requests the request-level dedup keeps (collector/dedup.py).
    dedup_requests: int
    #: Open connections on each port (each HTTP port, the gRPC port).
    connections_per_port: int
    #: What one query of the SQL endpoint may allocate, in its own process's engine (an eighth of the
    #: engine's share; each such process also holds some 95 MiB of its own: exporter/sql_worker.py).
    sql_query_bytes: int = 0
    #: The most one SQL endpoint answer may hold (the engine's ``max_result_bytes``): 2% of the budget.
    sql_result_bytes: int = 0
    #: The most the SQL endpoint's answers may hold while their clients have not read them (6% of the
    #: budget: three answers of the largest size).
    sql_unread_bytes: int = 0

    def engine_options(self) -> dict[str, str]:
        """The embedded engine's server settings (given when it is opened, once per process). One
        background merge at a time (the engine's default on two cores is up to four): on the benchmark's
        two cores, merges running beside ingest took CPU from it and memory with it; one at a time,
        with the writer's larger groups, the realistic fleet went from 41-49k to 66-80k points/s and
        from 30.5-34.7 to 24.8-25.0 CPU-s per million points, merges included (BENCHMARKS.md §14)."""
        return {
            "background_pool_size": "1",
            "background_merges_mutations_concurrency_ratio": "1",
            "max_server_memory_usage": str(self.engine_bytes),
            "mark_cache_size": str(self.engine_mark_cache_bytes),
            "primary_index_cache_size": str(self.engine_index_cache_bytes),
            "index_mark_cache_size": str(self.engine_index_cache_bytes),
            "uncompressed_cache_size": "0",
            "query_condition_cache_size": str(self.engine_index_cache_bytes),
        }

    def engine_settings(self) -> dict[str, int]:
        """Settings of every query the embedded engine runs."""
        return {"max_memory_usage": self.engine_bytes}  # one insert may use the engine's whole share

    def describe(self) -> dict[str, int]:
        return asdict(self)


def plan(config: Config) -> MemoryPlan:
    """The plan of ``config``: shares of its budget, or the options it sets explicitly.

    Raises ConfigError when the budget is below :data:`MIN_BUDGET_BYTES` or cannot hold one request of
    ``--max-request-bytes``.
    """
    b = config.memory_budget_bytes
    if b < MIN_BUDGET_BYTES:
        raise ConfigError(
            f"memory_budget_bytes: {b} is below {MIN_BUDGET_BYTES} (512 MiB), the least whose engine share "
            "can insert one request of the largest size it lets in (an insert takes up to 40 MiB and 8 times "
            "its bytes); raise the budget"
        )

    def share(explicit: int, fraction: float) -> int:
        return explicit if explicit > 0 else int(b * fraction)

    engine = int(b * 0.25)
    p = MemoryPlan(
        budget_bytes=b,
        engine_bytes=engine,
        engine_mark_cache_bytes=int(b * 0.02),
        engine_index_cache_bytes=int(b * 0.005),
        http_bytes_in_flight=share(config.http_max_bytes_in_flight, 0.02),
        grpc_bytes_in_flight=share(config.grpc_max_bytes_in_flight, 0.02),
        decode_bytes=int(b * 0.15),
        spool_cache_bytes=share(config.spool_cache_bytes, 0.04),
        identity_max_streams=config.identity_max_streams or max(1000, identity_streams(int(b * 0.03))),
        request_spooled_bytes=config.max_request_spooled_bytes or engine // 12,
        insert_attribute_keys=config.max_insert_attribute_keys or engine // ENGINE_BYTES_PER_ATTRIBUTE_KEY,
        cumulative_series=max(10_000, int(b * 0.08) // CUMULATIVE_BYTES_PER_SERIES),
        dedup_requests=max(10_000, int(b * 0.02) // DEDUP_BYTES_PER_REQUEST),
        connections_per_port=max(100, int(b * 0.02) // CONNECTION_BYTES),
        sql_query_bytes=engine // 8,
        sql_result_bytes=int(b * 0.02),
        sql_unread_bytes=int(b * 0.06),
    )
    for name, held, explicit in (
        ("http", p.http_bytes_in_flight, config.http_max_bytes_in_flight),
        ("grpc", p.grpc_bytes_in_flight, config.grpc_max_bytes_in_flight),
    ):
        if not explicit and held < config.max_request_bytes:
            raise ConfigError(
                f"memory_budget_bytes: {b} leaves {held} bytes for OTLP/{name.upper()} requests in flight, "
                f"fewer than one request of max_request_bytes ({config.max_request_bytes}); raise the "
                f"budget or set {name}_max_bytes_in_flight"
            )
    return p


class Trimmer:
    """Gives freed heap memory back to the kernel every ``interval_s`` (glibc's ``malloc_trim``).

    The embedded engine and Python both allocate through glibc's malloc, which keeps what is freed in its
    per-thread arenas for reuse: after a burst of large decodes and inserts the process held hundreds of
    MiB it no longer used (anonymous memory 1.0-1.35 GiB against 35 MiB tracked by the engine and 275 MiB
    by Python), and in a memory cgroup that is what gets a process OOM-killed. Trimming once a second
    halved the gap in the same run. Without glibc (another libc) this does nothing.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def start(self) -> None:
        if self._trim is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._trim is not None
        while not self._stop.wait(self.interval_s):
            self._trim(0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
