"""The sink: takes spooled records in order and writes them to ClickHouse, exactly once.

Records are grouped into one column-oriented insert per table (when ``flush_max_points`` points or
``flush_max_bytes`` bytes wait, or the oldest has waited ``flush_interval_s``; a group is never larger
than either bound, nor than ``flush_max_keys`` attribute keys, unless one request is: ClickHouse squashes
a group into one block, at several times its size in memory, and its attribute-cardinality views keep
states per key, docs/capacity.md). Before the insert the group and its deduplication token (a
digest of the requests' contents) are written to the spool, so a replay after a crash repeats the same
insert and ClickHouse counts it once. Every failure is classified by what ClickHouse's error means
(:func:`failure_cause`): a full or broken disk, memory, too many parts, a timeout or an outage is retried
with exponential backoff and full jitter for as long as it takes (the points are safe in the spool);
only content the server refuses for good goes to the dead letters, named by its error code, with what
of it the ledger tables already held, so that :func:`redrive` adds exactly the rest.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from meterhouse.collector.deadletter import DeadLetter, DeadLetters, Landed
from meterhouse.collector.identity import VERIFY, GroupSeen, Verifier
from meterhouse.collector.model import BATCH_COLUMNS, DIST_BATCH_COLUMNS, Blocks, PointBatch, content_digest
from meterhouse.collector.spool import Group, Spool, encode_blocks
from meterhouse.core import native, schema
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import is_embedded

log = logging.getLogger("meterhouse.writer")

#: ClickHouse error codes that no retry can fix: the data itself is refused (CANNOT_PARSE_TEXT,
#: CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME, ILLEGAL_TYPE_OF_ARGUMENT,
#: TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA,
#: TOO_LARGE_STRING_SIZE, SIZES_OF_ARRAYS_DOESNT_MATCH).
PERMANENT_CODES = frozenset({6, 27, 38, 41, 43, 53, 69, 70, 72, 117, 131, 190})
#: The server's trouble, by cause: it refuses now and will take the same batch once the cause is gone,
#: however often it failed. Each is retried for as long as it takes, never dead-lettered.
CAUSE_OF_CODE: dict[int, str] = {
    243: "disk_full",  # NOT_ENOUGH_SPACE
    241: "memory",  # MEMORY_LIMIT_EXCEEDED
    173: "memory",  # CANNOT_ALLOCATE_MEMORY
    252: "too_many_parts",  # TOO_MANY_PARTS
    242: "read_only",  # TABLE_IS_READ_ONLY
    164: "read_only",  # READONLY (the user's setting)
    74: "read_only",  # CANNOT_READ_FROM_FILE_DESCRIPTOR
    75: "read_only",  # CANNOT_WRITE_TO_FILE_DESCRIPTOR
    76: "read_only",  # CANNOT_OPEN_FILE
    77: "read_only",  # CANNOT_CLOSE_FILE
    88: "read_only",  # CANNOT_TRUNCATE_FILE
    172: "read_only",  # CANNOT_CREATE_DIRECTORY
    204: "read_only",  # CANNOT_FSYNC
    274: "read_only",  # AIO_READ_ERROR
    275: "read_only",  # AIO_WRITE_ERROR
    159: "timeout",  # TIMEOUT_EXCEEDED
    209: "timeout",  # SOCKET_TIMEOUT
    210: "unavailable",  # NETWORK_ERROR
    192: "unavailable",  # UNKNOWN_USER: credentials or grants, not the content
    193: "unavailable",  # WRONG_PASSWORD
    194: "unavailable",  # REQUIRED_PASSWORD
    497: "unavailable",  # ACCESS_DENIED
    516: "unavailable",  # AUTHENTICATION_FAILED
    202: "unavailable",  # TOO_MANY_SIMULTANEOUS_QUERIES
    203: "unavailable",  # NO_FREE_CONNECTION
    225: "unavailable",  # NO_ZOOKEEPER
    254: "unavailable",  # NO_ACTIVE_REPLICAS
    279: "unavailable",  # ALL_CONNECTION_TRIES_FAILED
    285: "unavailable",  # TOO_FEW_LIVE_REPLICAS
    319: "unavailable",  # UNKNOWN_STATUS_OF_INSERT
    439: "unavailable",  # CANNOT_SCHEDULE_TASK
    999: "unavailable",  # KEEPER_EXCEPTION
}
TRANSIENT_CODES = frozenset(CAUSE_OF_CODE)
#: Codes of a file operation that failed: the errno in the message says why (ENOSPC is a full disk).
_FILE_CODES = frozenset({74, 75, 76, 77, 88, 172, 204, 274, 275})
#: Codes that say nothing of the cause (POCO_EXCEPTION, STD_EXCEPTION, UNKNOWN_EXCEPTION): their text is
#: read, as a file operation's is; any other code decides by itself.
_GENERIC_CODES = frozenset({1000, 1001, 1002})
#: What the server says of a disk or memory in the text of errors whose code is generic (POCO_EXCEPTION
#: 1000, STD_EXCEPTION 1001, ...): errno names and strerror texts, first match wins.
_CAUSE_IN_MESSAGE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"No space left|ENOSPC|errno: 28\b|NOT_ENOUGH_SPACE|not enough space|Disk quota", re.I),
     "disk_full"),
    (re.compile(r"Read-only file system|EROFS|errno: 30\b|Input/output error|\bEIO\b|errno: 5\b|"
                r"Cannot write|Cannot fsync|Access to file denied|Permission denied|readonly mode", re.I),
     "read_only"),
    (re.compile(r"Memory limit|bad_alloc|Cannot allocate memory|ENOMEM", re.I), "memory"),
    (re.compile(r"Too many parts", re.I), "too_many_parts"),
    (re.compile(r"timed? ?out|Timeout", re.I), "timeout"),
)  # fmt: skip
_CODE = re.compile(r"Code:\s*(\d+)")
_CODE_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*(?:\(version [^)]*\))?\s*$")


class PermanentError(Exception):
    """An insert that can never succeed as it is."""


def error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code an error carries (``Code: N.``), or None."""
    m = _CODE.search(str(exc))
    return int(m.group(1)) if m else None


def failure_cause(exc: BaseException) -> str:
    """Why an insert failed, one of ``core.metrics.INSERT_FAILURE_CAUSES``. The code decides when the
    server names one of its trouble or refuses the content; a generic code (or none) is read for what
    it says of the disk, memory or time; a connection error is ``unavailable``."""
    if isinstance(exc, PermanentError | TypeError | OverflowError):
        return "refused"
    code = error_code(exc)
    if code in PERMANENT_CODES:
        return "refused"  # the message may quote the refused data: it is not read
    if code in CAUSE_OF_CODE and code not in _FILE_CODES:
        return CAUSE_OF_CODE[code]
    if code is not None and code not in _FILE_CODES and code not in _GENERIC_CODES:
        return "other"  # a specific code meterhouse does not list: its message may quote the data
    text = str(exc)
    for pattern, cause in _CAUSE_IN_MESSAGE:
        if pattern.search(text):
            return cause
    if code in CAUSE_OF_CODE:
        return CAUSE_OF_CODE[code]  # a file that cannot be read or written, for no reason it names
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "unavailable"
    return "other"


def classify(exc: BaseException) -> str:
    """``permanent`` (a dead letter at once: content the server refuses for good), ``transient`` (retried
    for as long as it takes: a full or broken disk, memory, too many parts, a timeout, an outage) or
    ``retryable`` (unknown: retried; with a server error code, dead-lettered after repeated failures on
    an endpoint that is otherwise healthy)."""
    cause = failure_cause(exc)
    if cause == "refused":
        return "permanent"
    return "retryable" if cause == "other" else "transient"


def refusal(exc: BaseException) -> tuple[int | None, str]:
    """The code a dead letter is named by and its reason: ``Code: 53 TYPE_MISMATCH: …``."""
    code = error_code(exc)
    text = f"{type(exc).__name__}: {exc}"
    if code is None:
        return None, text[:1000]
    m = _CODE_NAME.search(str(exc).strip())
    return code, f"Code: {code}{' ' + m.group(1) if m else ''}: {text}"[:1000]


def merge(
    batches: list[PointBatch], token: str, seq: int = 0
) -> tuple[list[list[Any]] | None, list[list[Any]] | None]:
    """The batches' columns per table, concatenated, each with its ``batch_id`` and ``batch_seq``."""

    def one(attr: str, size_attr: str, names: tuple[str, ...], suffix: str) -> list[list[Any]] | None:
        parts = [b for b in batches if getattr(b, size_attr)]
        if not parts:
            return None
        if len(parts) == 1:
            columns = [getattr(parts[0], attr)[name] for name in names]
        else:
            columns = [[v for b in parts for v in getattr(b, attr)[name]] for name in names]
        rows = sum(getattr(b, size_attr) for b in parts)
        columns.append([token + suffix] * rows)
        columns.append([seq] * rows)
        return columns

    return one("columns", "size", BATCH_COLUMNS, ":n"), one(
        "dist_columns", "dist_size", DIST_BATCH_COLUMNS, ":d"
    )


NUMBER_NAMES = (*BATCH_COLUMNS, "batch_id", "batch_seq")
DIST_NAMES = (*DIST_BATCH_COLUMNS, "batch_id", "batch_seq")


def stamp(block: bytes, rows: int, batch_id: str, seq: int) -> bytes:
    """A record's block with the group's ``batch_id`` and ``batch_seq`` columns."""
    block = native.with_constant(block, rows, "batch_id", "String", batch_id)
    return native.with_constant(block, rows, "batch_seq", "UInt64", seq)


def merge_blocks(blocks: list[Blocks], token: str, seq: int = 0) -> tuple[bytes, bytes]:
    """The records' Native blocks per table, each with its ``batch_id`` and ``batch_seq`` columns.

    A group whose token says so (``schema.ONE_BLOCK_TOKEN_PREFIX``, every group this version begins)
    sends one block per table holding all its records' rows (``native.concat``): the engine parses,
    squashes and runs its views over one block, not one per record (a group of 50-point requests was
    about a thousand). A group an earlier version began sends the blocks one after another, as its first
    try did: on a ClickHouse server the token's deduplication is per block, so a repeat must keep them."""
    if token.startswith(schema.ONE_BLOCK_TOKEN_PREFIX):
        numbers = [b.numbers for b in blocks if b.size]
        dists = [b.dists for b in blocks if b.dist_size]
        rows, dist_rows = sum(b.size for b in blocks), sum(b.dist_size for b in blocks)
        return (
            stamp(native.concat(numbers), rows, token + ":n", seq) if numbers else b"",
            stamp(native.concat(dists), dist_rows, token + ":d", seq) if dists else b"",
        )
    numbers_ = b"".join(stamp(b.numbers, b.size, token + ":n", seq) for b in blocks if b.size)
    dists_ = b"".join(stamp(b.dists, b.dist_size, token + ":d", seq) for b in blocks if b.dist_size)
    return numbers_, dists_


def _encoded(names: Sequence[str], types: Sequence[str], columns: list[list[Any]] | None) -> bytes:
    return native.encode(names, types, columns) if columns else b""


def _derived(
    token: str, numbers: bytes, dists: bytes, seq: int, seen: native.KeySet
) -> tuple[list[tuple[str, Sequence[str], bytes]], list[bytes]]:
    """The embedded engine's inserts the writer derives from a group's blocks, in order: the sets ("s")
    and the sums' pairs for the attribute cardinality ("a") of its (attribute set, hour) pairs not sent
    before (``seen``; repeatable, so not under the ledger: ``schema.REPEATABLE_INSERTS``), then its orgs
    ("o") and catalog ("c", "e") rows (``schema.WRITER_TABLES``); and the pairs' keys, which join ``seen``
    once the repeatable inserts are in. All come before the points, so that a group an earlier version
    began asks whether its points had landed before this try inserts them (``Store.insert_earlier``)."""
    if not token.startswith(schema.ONE_BLOCK_TOKEN_PREFIX):  # the records' blocks one after another
        numbers = native.concat(native.split(numbers)) if numbers else numbers
        dists = native.concat(native.split(dists)) if dists else dists
    empty: native.Summary = ([], [], b"", [], b"")
    orgs, catalog, sets, keys, pairs = native.group_summary(numbers, seen, True) if numbers else empty
    d_catalog: list[native.CatalogRow] = []
    if dists:
        _, d_catalog, d_sets, d_keys, _ = native.group_summary(dists, seen, False)
        sets = native.concat([sets, d_sets]) if sets and d_sets else sets or d_sets
        keys = [*keys, *d_keys]
    out: list[tuple[str, Sequence[str], bytes]] = [
        ("s", native.SET_NAMES, sets),
        ("a", native.PAIR_NAMES, pairs),
    ]
    rows: Sequence[tuple[Any, ...]]
    for kind, rows in (("o", orgs or []), ("c", catalog), ("e", d_catalog)):
        columns = schema.WRITER_COLUMNS[kind]
        names = tuple(c.name for c in columns)
        values = [list(col) for col in zip(*rows, strict=True)] if rows else []
        block = native.encode(names, [c.type for c in columns], [*values, [seq] * len(rows)]) if rows else b""
        out.append((kind, names, block))
    return out, keys


def insert_calls(
    store: Any,
    token: str,
    seq: int = 0,
    *,
    blocks: list[Blocks] | None = None,
    batches: list[PointBatch] | None = None,
    landed: Landed | None = None,
    seen: native.KeySet | None = None,
) -> list[tuple[str, Callable[[bool], None]]]:
    """The inserts of one group per table ("n" numbers, "d" distributions), as calls to make; a call
    given ``True`` inserts a group that may have landed before (``Store.insert_in_doubt``; ``landed``:
    per insert, the partitions of each ledger table known to hold it under another number).

    ClickHouse keys a token's deduplication by the blocks the insert holds (a repeat that holds its rows
    in other blocks is not dropped), so a repeat must send what the first try sent: ``blocks``, the
    records' Native blocks one after another (spool format 3), or ``batches``, their columns merged into
    one block per table (what the writer of spool formats 1-2 sent, through ``Store.insert_points``).
    ``seq`` is the group's ``batch_seq`` (0 for a dead letter of an earlier version's redrive, which the
    token alone guards). On the embedded engine the writer's own rows come first (:func:`_derived`;
    ``seen``: the attribute sets it has stored)."""
    calls: list[tuple[str, Callable[[bool], None]]] = []
    shaped: list[tuple[str, Sequence[str], bytes]]
    if blocks is not None:
        numbers, dists = merge_blocks(blocks, token, seq)
        shaped = [("n", NUMBER_NAMES, numbers), ("d", DIST_NAMES, dists)]
    else:
        n_cols, d_cols = merge(batches or [], token, seq)
        shaped = [
            ("n", schema.INGEST_COLUMN_NAMES,
             _encoded(schema.INGEST_COLUMN_NAMES, schema.INGEST_COLUMN_TYPES, n_cols)),
            ("d", schema.DIST_INGEST_COLUMN_NAMES,
             _encoded(schema.DIST_INGEST_COLUMN_NAMES, schema.DIST_INGEST_COLUMN_TYPES, d_cols)),
        ]  # fmt: skip
    keys: list[bytes] = []
    if getattr(store, "embedded", False):
        seen = seen if seen is not None else native.KeySet(1 << 10)
        derived, keys = _derived(token, shaped[0][2], shaped[1][2], seq, seen)
        shaped = [*derived, *shaped]
    last_repeatable = next((k for k, _, b in reversed(shaped) if b and k in schema.REPEATABLE_INSERTS), "")
    for kind, names, block in shaped:
        if not block:
            continue

        def call(doubt: bool, kind: str = kind, names: Sequence[str] = names, block: bytes = block) -> None:
            suffix = f"{token}:{kind}"
            if kind in schema.REPEATABLE_INSERTS:
                # Never dropped as a repeat (the embedded engine's deduplication log may hold the token of
                # a part a kill took): in doubt without deduplication, else under a token of its own each
                # time. A set or pair sent twice counts once; the keys join ``seen`` once both are in.
                if doubt and hasattr(store, "insert_in_doubt"):
                    store.insert_in_doubt(kind, names, block, suffix, seq)
                else:
                    store.insert_native(
                        schema.REPEATABLE_INSERTS[kind], names, block, f"{suffix}:{uuid.uuid4().hex}"
                    )
                if kind == last_repeatable and seen is not None:
                    seen.add(keys)
            elif doubt and hasattr(store, "insert_in_doubt"):
                if landed and landed.get(kind):
                    store.insert_in_doubt(kind, names, block, suffix, seq, landed[kind])
                else:
                    store.insert_in_doubt(kind, names, block, suffix, seq)
            elif not token.startswith(schema.LEDGER_TOKEN_PREFIX) and hasattr(store, "insert_earlier"):
                store.insert_earlier(kind, names, block, suffix)  # a group an earlier version began
            else:
                store.insert_native(schema.INGEST_OF[kind], names, block, suffix)

        calls.append((kind, call))
    return calls


def redrive_letter(store: Any, batches: list[PointBatch], token: str, per_batch_blocks: bool) -> None:
    """Insert a dead letter's batches again under its token alone, in the blocks the writer sent them in
    (one per batch, or merged into one): what ClickHouse needs to drop an insert that did land. For a
    letter whose ledger is not known (made by an earlier version, or on a ClickHouse server, where the
    token decides); see :func:`redrive` for the others."""
    if per_batch_blocks:
        calls = insert_calls(store, token, blocks=[encode_blocks(b) for b in batches])
    else:
        calls = insert_calls(store, token, batches=batches)
    for _table, insert in calls:
        insert(False)


class RedriveError(Exception):
    """A redrive that cannot go on without counting something twice or losing it (said with the fix)."""


def _kinds(batches: list[PointBatch], store: Any = None) -> list[str]:
    """The ledger's inserts that ``batches`` make: "n", "d", and on the embedded engine "o", "c" and "e"
    (``schema.WRITER_TABLES``)."""
    numbers, dists = sum(b.size for b in batches), sum(b.dist_size for b in batches)
    derive = getattr(store, "embedded", False)
    return [k for k, n in (("o", derive and numbers), ("c", derive and numbers), ("e", derive and dists),
                           ("n", numbers), ("d", dists)) if n]  # fmt: skip


def _ledger_letter(store: Any, letter: DeadLetter) -> bool:
    """Whether the ledger redrives ``letter``: the writer recorded what of it had landed (the embedded
    engine), and the store is embedded (one writer: its numbers decide)."""
    return letter.landed is not None and is_embedded(str(store.name))


def settle_redrive(letters: DeadLetters, store: Any, letter: DeadLetter) -> None:
    """A redrive of ``letter`` was cut short (a kill, an error): ask the tables which partitions hold its
    rows (numbered ``redrive_seq``, still the newest number: nothing writes between a redrive and its
    settling, which the next redrive or `meterhouse up`'s start does first), add them to what the letter
    says had landed, and clear the number. The next redrive then adds only the rest."""
    seq = letter.redrive_seq
    if seq is None:
        return
    top = int(store.max_batch_seq())
    if top > seq:
        raise RedriveError(
            f"{letter.path.name}: a redrive of this letter (number {seq}) was cut short and rows numbered "
            f"up to {top} were written since, so what it put in can no longer be told from the tables; "
            "compare the letter with usage_points (batch_id) before removing or re-driving it"
        )
    landed = {k: {t: set(p) for t, p in tables.items()} for k, tables in (letter.landed or {}).items()}
    for kind in _kinds(letter.batches or [], store):
        for table, parts in (store.landed(kind, seq) or {}).items():
            if parts:
                landed.setdefault(kind, {}).setdefault(table, set()).update(parts)
    settled = {k: {t: sorted(p) for t, p in tables.items()} for k, tables in landed.items()}
    letters.update(letter, landed=settled, redrive_seq=None)
    log.warning("dead letter: a redrive cut short settled from the tables",
                extra={"file": letter.path.name, "seq": seq, "landed": settled})  # fmt: skip


def settle_redrives(letters: DeadLetters, store: Any) -> int:
    """Settle every redrive cut short (:func:`settle_redrive`); before anything else writes."""
    cut = 0
    for letter in letters.each(with_batches=True):
        if letter.redrive_seq is not None:
            settle_redrive(letters, store, letter)
            cut += 1
    return cut


def redrive(
    letters: DeadLetters,
    store: Any,
    first_seq: int | None = None,
    report: Callable[[DeadLetter, BaseException | None], None] | None = None,
) -> tuple[int, int]:
    """Insert every dead letter again; (re-driven, still failing). Each letter is deleted once in.

    On the embedded engine a letter the writer made is re-driven as a group of the ledger: its rows get a
    number above every other (``first_seq`` on, numbers the spool has reserved; else above the highest
    the tables hold), written in the letter before the insert, and it goes through
    ``Store.insert_in_doubt`` leaving out the partitions that held it when it was refused. A kill at any
    moment leaves a letter whose number says where to look: the next redrive (or `meterhouse up`'s start)
    settles it from the tables (:func:`settle_redrive`) and the rest goes in. Nothing else may write
    between (the spool must be empty: ``meterhouse dead-letter redrive`` checks). Other letters (an
    earlier version's, a ClickHouse server's) are inserted under their token alone (``redrive_letter``).
    """
    settle_redrives(letters, store)
    ok = failed = 0
    seq = first_seq
    for letter in letters.each(with_batches=True):  # one letter (one group) in memory at a time
        try:
            if _ledger_letter(store, letter):
                if seq is None or seq <= int(store.max_batch_seq()):
                    seq = int(store.max_batch_seq()) + 1
                letters.update(letter, redrive_seq=seq)
                for _kind, insert in insert_calls(store, letter.token, seq, batches=letter.batches or [],
                                                  landed=letter.landed):  # fmt: skip
                    insert(True)
                seq += 1
            else:
                redrive_letter(store, letter.batches or [], letter.token, letter.per_batch_blocks)
        except Exception as e:  # noqa: BLE001 - reported; the letter stays, settled
            failed += 1
            if report is not None:
                report(letter, e)
            cut = letter.redrive_seq
            if cut is not None:
                settle_redrive(letters, store, letter)  # before the next letter's rows are above its own
                seq = cut + 1
            continue
        letters.remove(letter)
        ok += 1
        if report is not None:
            report(letter, None)
    return ok, failed


def _totals(group: Group) -> tuple[int, int, int]:
    """The group's points, bytes and attribute keys (summed over its records)."""
    r = group.records
    return sum(x.points for x in r), sum(x.length for x in r), sum(x.keys for x in r)


def _remaining(batches: list[PointBatch], done: set[str]) -> list[PointBatch]:
    """The batches without the tables already inserted (a dead letter holds only what is not in)."""
    if not done:
        return batches
    out = []
    for b in batches:
        cols, size = (PointBatch.empty(), 0) if "n" in done else (b.columns, b.size)
        dist, dist_size = (PointBatch.empty_dist(), 0) if "d" in done else (b.dist_columns, b.dist_size)
        if size or dist_size:
            out.append(PointBatch(cols, size, b.digest, b.received_ns, dist, dist_size))
    return out


class Writer:
    """Spool → ClickHouse, one thread."""

    def __init__(
        self,
        spool: Spool,
        store: Any,  # a Store or the failover EndpointSet (insert_points, insert_distributions)
        metrics: PipelineMetrics,
        dead_letters: DeadLetters,
        *,
        flush_interval_s: float = 1.0,
        flush_max_points: int = 50_000,
        flush_max_bytes: int = 16 << 20,
        flush_max_keys: int = 32_768,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        poison_after_attempts: int = 10,
        before_commit: Callable[[list[Blocks]], None] | None = None,
    ) -> None:
        self.spool = spool
        self.store = store  # a Store, or an EndpointSet that fails over
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.flush_interval_s = flush_interval_s
        self.flush_max_points = flush_max_points
        self.flush_max_bytes = flush_max_bytes
        self.flush_max_keys = flush_max_keys
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.poison_after_attempts = poison_after_attempts
        # Called after an insert and before the spool forgets its records (the dedup digests sync).
        self.before_commit = before_commit
        self.verifier = Verifier(store)
        # The attribute sets this writer has stored (the embedded engine's; ``_derived``): 32 MiB, about
        # 1.4 million sets before it is emptied and begun again.
        self.seen_sets = native.KeySet() if getattr(store, "embedded", False) else None
        # The bounds groups are made under: the options', halved while groups fail for memory (see
        # :meth:`_halve`) and doubled back with each group committed.
        self._max_points, self._max_bytes, self._max_keys = flush_max_points, flush_max_bytes, flush_max_keys
        self._stop = threading.Event()
        #: Held around each group's write; :meth:`held` holds it for another writer of the same tables
        #: (a rollup rebuild), which then sees no insert of this one between its read and its write.
        self._held = threading.Lock()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self.last_error = ""

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meterhouse-writer", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float) -> None:
        """Write what is spooled until ``timeout_s`` runs out; the rest stays in the spool. Idempotent."""
        self._deadline = min(self._deadline, time.monotonic() + timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)

    def held(self) -> threading.Lock:
        """No group is written while this is held (the group being written is finished first); points are
        still acknowledged and spooled meanwhile."""
        return self._held

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """A supervised loop: any error outside the insert (loading, the intent, the commit) is counted,
        logged and retried with backoff; the group stays in flight, so nothing is skipped."""
        errors = 0
        while not (self._stop.is_set() and time.monotonic() >= self._deadline):
            try:
                group = self.spool.next_group(
                    self._max_points, self.flush_interval_s, self._stop, self._max_bytes, self._max_keys
                )
                if group is None:
                    return
                with self._held:
                    if not self.write(group):
                        return  # shutting down with the group still spooled
                errors = 0
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one error
                errors += 1
                self.metrics.writer_errors.inc()
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.error("writer error, will retry", extra={"error": self.last_error, "in_a_row": errors})
                if not self._backoff(min(errors, 8)):
                    return

    def write(self, group: Group) -> bool:
        """Insert one group; True once it is committed or dead-lettered. Each table's insert is marked
        in the spool once done, so a retry, a replay or a dead letter covers only what is left."""
        if group.replay and group.token is not None and self.dead_letters.holds(group.token):
            # The process died after the group's dead letter was durable and before the commit mark:
            # the letter holds what was not inserted, so the group is done.
            log.warning("replay: the group is in a dead letter already; not written again",
                        extra={"records": len(group.records)})  # fmt: skip
            self.spool.commit(group)
            return True
        if self._split(group):
            return True
        batches = [self.spool.blocks(r) for r in group.records]
        verified = any(b.verify for b in batches)
        if verified:
            batches = self._verify(group, batches)
        token = group.token
        # In doubt: the group may have landed, in part, before (its intent is from before a restart, or
        # a try failed). The ledger (``schema.SEQ_COLUMN``) answers for groups whose intent says so.
        doubt = token is not None and token.startswith(schema.LEDGER_TOKEN_PREFIX)
        if token is None:
            token = schema.ONE_BLOCK_TOKEN_PREFIX + content_digest(*(b.digest.encode() for b in batches))
            self.spool.intent(group, token)
        elif group.damaged and not doubt:
            self._skip_landed(group, token)
        inserts = self._inserts(group, batches, token)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                for table, insert in inserts:
                    if table not in group.done:
                        insert(doubt)
                        self.spool.part(group, table)
                break
            except Exception as e:  # noqa: BLE001 - classified below
                doubt = token.startswith(schema.LEDGER_TOKEN_PREFIX)
                cause = failure_cause(e)
                self.metrics.insert_failures.labels(cause=cause).inc()
                error = f"{type(e).__name__}: {e}"[:1000]
                kind = classify(e)
                if cause == "memory" and self._halve(group):
                    return True
                # An unknown error the server names by a code, on an endpoint that otherwise answers, is
                # taken as a refusal of this content after repeated tries; trouble of the server (a full
                # or broken disk, memory, parts, time, an outage) and errors without a code never are.
                healthy = self.store.active_healthy() if hasattr(self.store, "active_healthy") else True
                poisoned = (
                    kind == "retryable"
                    and error_code(e) is not None
                    and healthy
                    and attempt >= self.poison_after_attempts
                )
                if kind == "permanent" or poisoned:
                    loaded = [
                        self.spool.decoded(r, b) if verified else self.spool.load(r)
                        for r, b in zip(group.records, batches, strict=True)
                    ]
                    per_batch = all(r.version >= 3 for r in group.records)  # as _inserts sent it
                    self._dead_letter(group, _remaining(loaded, group.done), token, e, per_batch)
                    return True
                extra = {
                    "attempt": attempt,
                    "cause": cause,
                    "error": error[:300],
                    "endpoint": self.store.name,
                }
                log.warning("insert failed, will retry", extra=extra)
                if not self._backoff(attempt):
                    return False
                self.metrics.insert_retries.inc()
        self.metrics.insert_duration.observe(time.perf_counter() - started)
        if self.before_commit is not None:
            self.before_commit(batches)
        self.spool.commit(group)
        self._committed(batches)
        self._max_points = min(self.flush_max_points, self._max_points * 2)
        self._max_bytes = min(self.flush_max_bytes, self._max_bytes * 2)
        self._max_keys = min(self.flush_max_keys, self._max_keys * 2)
        return True

    def _nothing_landed(self, group: Group) -> bool | None:
        """Whether no row of ``group`` is in any ledger table (rows at or above its number: none newer
        exists while it is in flight); None where the ledger does not decide (a ClickHouse server, or a
        group an earlier version began)."""
        ask = getattr(self.store, "landed", None)
        if ask is None or group.token is None or not group.token.startswith(schema.LEDGER_TOKEN_PREFIX):
            return None
        landed = [ask(kind, group.last) for kind in schema.INGEST_OF]
        if any(found is None for found in landed):
            return None
        return not any(any(found.values()) for found in landed if found is not None)

    def _halve(self, group: Group) -> bool:
        """A group of several records whose insert failed for memory, of which nothing landed, is given
        back to the spool and its records grouped afresh under half its points, bytes and keys (doubled back
        with each group committed): True when so. Each record was let in only if its insert alone fits
        the engine's share (README, "Limits"), but records together may not, and retrying the same group
        would fail for ever with everyone's usage behind it. A group that landed in part is retried as
        it is, one view at a time (``Store.insert_in_doubt``), the ledger tables that hold it skipped."""
        if len(group.records) < 2 or group.done or not self._nothing_landed(group):
            return False
        points, size, keys = _totals(group)
        self._max_points, self._max_bytes = max(1, points // 2), max(1, size // 2)
        self._max_keys = max(1, keys // 2)
        extra = {
            "records": len(group.records),
            "first": group.first,
            "last": group.last,
            "points": points,
            "bytes": size,
            "keys": keys,
            "max_points": self._max_points,
            "max_bytes": self._max_bytes,
            "max_keys": self._max_keys,
        }
        log.warning("a group failed for memory; its records are grouped afresh, smaller", extra=extra)
        self.metrics.groups_halved.inc()
        self.spool.release(group)
        return True

    def _split(self, group: Group) -> bool:
        """A replayed group larger than the bounds (an earlier version's, or made under larger ones) that
        nothing of has landed is given back to the spool, whose records are then grouped afresh under
        today's bounds, each group with its own intent and number: True when so. Asked of the ledger
        (rows at or above the group's number, in every table of both inserts: none newer exists), so
        only on the embedded engine and for a group of the ledger; elsewhere the token decides, and only
        the same insert repeated is dropped, so the group is replayed whole."""
        if not group.replay or group.done or len(group.records) < 2:
            return False
        points, size, keys = _totals(group)
        if points <= self.flush_max_points and size <= self.flush_max_bytes and keys <= self.flush_max_keys:
            return False
        nothing = self._nothing_landed(group)
        extra = {"records": len(group.records), "points": points, "bytes": size, "keys": keys}
        if nothing is None:
            log.warning("replay: a group larger than the bounds is replayed whole (its token decides here)",
                        extra=extra)  # fmt: skip
            return False
        if not nothing:
            log.warning(
                "replay: a group larger than the bounds had landed in part; replayed whole", extra=extra
            )
            return False
        log.warning("replay: a group larger than the bounds, of which nothing landed, is grouped afresh",
                    extra=extra)  # fmt: skip
        self.spool.release(group)
        return True

    def _verify(self, group: Group, batches: list[Blocks]) -> list[Blocks]:
        """The group's records without the points the edge flagged whose identity is already stored
        (``collector/identity.py``). Only rows of earlier groups count as stored, so a replay of this
        group after a crash drops the same points and inserts the same blocks. One record's points are
        decoded at a time; a record with nothing dropped keeps its blocks."""
        seen: GroupSeen = (set(), set())
        out: list[Blocks] = []
        checked = dropped = 0
        for r, b in zip(group.records, batches, strict=True):
            flagged = self.spool.load_flagged(r, b) if b.verify else (self.spool.load(r), [], [])
            checked += flagged[1].count(VERIFY) + flagged[2].count(VERIFY)
            kept, gone = self.verifier.filter(flagged, group.last, seen)
            del flagged
            dropped += gone
            out.append(encode_blocks(kept) if gone or b.verify else b)
        m = self.metrics.points_identity_checked
        m.labels(outcome="repeat").inc(dropped)
        m.labels(outcome="new").inc(checked - dropped)
        if dropped:
            extra = {"points": dropped, "checked": checked, "records": len(group.records)}
            log.info("points already stored dropped by identity", extra=extra)
        return out

    def _skip_landed(self, group: Group, token: str) -> None:
        """A replay group that lost records to damage: a table whose raw points already hold the batch
        is done (its insert landed before the crash); only the rest is inserted."""
        for table, raw in schema.RAW_OF.items():
            if table in group.done:
                continue
            if self.store.scalar(
                schema.batch_landed_sql(self.store.database, table), {"b": f"{token}:{table}"}
            ):
                log.warning("replay: a damaged group's insert had landed; not inserted again",
                            extra={"table": raw, "records": len(group.records)})  # fmt: skip
                self.spool.part(group, table)

    def _inserts(
        self, group: Group, batches: list[Blocks], token: str
    ) -> list[tuple[str, Callable[[bool], None]]]:
        """The group's inserts as the first try sent them (see :func:`insert_calls`): a group holding any
        record of spool formats 1-2 as merged columns, a format 3 group as the records' blocks."""
        if any(r.version < 3 for r in group.records):
            return insert_calls(
                self.store, token, group.last, batches=[self.spool.load(r) for r in group.records],
                seen=self.seen_sets,
            )  # fmt: skip
        return insert_calls(self.store, token, group.last, blocks=batches, seen=self.seen_sets)

    def _committed(self, batches: list[Blocks]) -> None:
        now_ns = time.time_ns()
        self.metrics.points_written.inc(sum(b.total for b in batches))
        self.metrics.last_commit.set(now_ns / 1e9)
        for b in batches:
            self.metrics.ingest_lag.observe(max(0.0, (now_ns - b.received_ns) / 1e9))

    def _dead_letter(
        self, group: Group, batches: list[PointBatch], token: str, exc: BaseException, per_batch_blocks: bool
    ) -> None:
        """Keep what ClickHouse refused on disk, named by the server's error code, with what of it the
        ledger tables already hold (asked now, while the group is the newest: ``Store.landed``), so that
        the redrive adds only what each table lacks. Raises when that cannot be asked: the group stays
        in flight and is tried again."""
        code, reason = refusal(exc)
        landed = self._landed(group, batches) if token.startswith(schema.LEDGER_TOKEN_PREFIX) else None
        path = self.dead_letters.put(token, reason, batches, per_batch_blocks, code=code, seq=group.last,
                                     landed=landed)  # fmt: skip
        points = sum(b.total for b in batches)
        self.metrics.dead_letter_batches.inc()
        self.metrics.dead_letter_points.inc(points)
        log.error("batch refused by ClickHouse, kept as a dead letter",
                  extra={"file": path.name, "points": points, "code": code,
                         "error": reason[:300]})  # fmt: skip
        record = getattr(self.store, "record_event", None)
        if record is not None:
            record("dead_letter", self.store.name, path.name, reason[:500], f"points={points}")
        self.spool.commit(group)

    def _landed(self, group: Group, batches: list[PointBatch]) -> Landed | None:
        """Per insert the letter holds, the partitions of each ledger table that hold the group (None
        where the ledger does not decide: a ClickHouse server, or a group an earlier version began,
        whose rows carry no number; its redrive goes under the token alone, as that group's replay)."""
        ask = getattr(self.store, "landed", None)
        if ask is None:
            return None
        out: Landed = {}
        for kind in _kinds(batches, self.store):
            found = ask(kind, group.last)
            if found is None:
                return None  # the token decides there (a server): the redrive repeats it
            out[kind] = {table: sorted(parts) for table, parts in found.items() if parts}
        return out

    def _backoff(self, attempt: int) -> bool:
        """Wait with full jitter; False once shutting down past the deadline."""
        delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
        if self._stop.is_set():
            if self._deadline - time.monotonic() <= delay:
                return False
            time.sleep(delay)
        else:
            self._stop.wait(delay)  # shutdown cuts the wait short; the next try is the flush
        return True
