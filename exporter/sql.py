"""A read-only ClickHouse HTTP endpoint over the embedded engine (``--sql-port``, README "SQL endpoint").

Grafana's ClickHouse plugin, clickhouse-connect, the official JS client and ``meterhouse sql`` speak
ClickHouse's HTTP protocol to it: the query in the URL (``query=``) or the body, ``database``,
``default_format`` (TabSeparated when neither it nor the query's ``FORMAT`` names one), query
parameters as ``param_<name>``, ``/ping``, HTTP basic auth or ``X-ClickHouse-User``/``X-ClickHouse-Key``,
errors as ClickHouse writes them (``Code: N. DB::Exception: ...``, ``X-ClickHouse-Exception-Code``).

What it runs is read-only in every way, checked twice:

- **by the engine's own parser** (:func:`check`): the query parsed from a value and written back by the
  engine (``formatQuery``: one statement, comments gone; that text is what runs), its ``EXPLAIN AST``
  (which parses and runs nothing): only a ``SELECT`` (with ``UNION``/``INTERSECT``/``EXCEPT``), ``SHOW``,
  ``DESCRIBE``, ``EXISTS`` or ``SHOW CREATE`` passes; no ``SETTINGS`` clause anywhere, no
  ``INTO OUTFILE`` on any statement; table functions only from :data:`TABLE_FUNCTIONS` (numbers, view:
  none reaches files, the network, processes or the process's Python objects, as ``file``, ``url``,
  ``s3``, ``remote``, ``executable`` and chdb's ``python`` do, nor takes a structure string whose
  ``ALIAS`` expressions the check would not see); no function of :data:`FUNCTIONS_DENIED` (the scalar
  ``file`` reads a file even in read-only mode); output formats only the engine's own;
- **by the engine's read-only mode** on each of the endpoint's own engine handles (``readonly = 1``,
  set once with the handle's limits, which it then cannot change): no insert, DDL, ``SYSTEM``,
  ``KILL``, setting change or file, network or process table function, whatever the parser check let
  through.

Bounded per query and in total: each handle is a process of its own (exporter/sql_worker.py) running
one query at a time, with ``max_execution_time``, ``max_memory_usage`` (an eighth of the engine's memory
share), ``max_result_bytes`` and ``max_threads = 1``, and killed a second past its time limit (the
engine checks that limit only between blocks); at most ``sql_max_concurrent`` handles, and a request
that finds none free within a second is answered 503 (code 202, TOO_MANY_SIMULTANEOUS_QUERIES). A query
never waits behind an insert, nor an insert behind it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, request

from meterhouse.core.config import Token
from meterhouse.exporter.auth import Auth, Unauthorized
from meterhouse.exporter.sql_worker import GRACE_S

log = logging.getLogger("meterhouse.sql")

#: Statements that read: the root node of their ``EXPLAIN AST``.
READ_STATEMENTS = frozenset(
    {"SelectWithUnionQuery", "ShowTables", "DescribeQuery", "ExistsTableQuery", "ShowCreateTableQuery"}
)
#: Table functions that reach nothing outside the engine's own tables and the query itself, and take
#: no structure string (``values('a UInt8, b String ALIAS file(...)', 1)`` ran the expression inside
#: the string, which no check of the query sees: adversary 33).
TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries", "view", "primes"}
)  # fmt: skip
#: Functions refused (lower-case names, and name prefixes): those that reach outside the engine even in
#: read-only mode (``file``; the AI functions call a configured provider over the network), and those
#: whose cost grows with the product of their inputs' lengths, which the time limit, checked only
#: between blocks, does not stop (``editDistance`` over 10 rows of 60 kB strings ran 30 s against a
#: 2 s limit: adversary 35).
FUNCTIONS_DENIED = frozenset(
    {"file", "editdistance", "editdistanceutf8", "levenshteindistance", "levenshteindistanceutf8",
     "dameraulevenshteindistance", "arraysimilarity", "arrayreduceinranges"}
)  # fmt: skip
FUNCTION_PREFIXES_DENIED = ("ai", "jaro", "arraylevenshtein", "sparsegrams")
#: ``SHOW TABLES``/``SHOW DATABASES`` as served: their ``WHERE`` and ``LIMIT`` expressions are not in
#: the AST dump (one ``ShowTables`` line), so only the forms without them pass (``file()`` in a
#: ``SHOW TABLES WHERE`` read a file, and ``python()`` there froze the process: adversary 35).
_SHOW_TABLES = re.compile(
    r"^SHOW (DATABASES|TABLES)( FROM [A-Za-z0-9_`.]+)?( (NOT )?I?LIKE '(?:[^'\\]|\\.)*')?(\nFORMAT \S+)?$"
)
#: Column transformers whose expressions the AST shows (``EXCEPT``, ``REPLACE``); any other is refused.
SHOWN_TRANSFORMERS = frozenset({"ColumnsExceptTransformer", "ColumnsReplaceTransformer"})
#: Every kind of ``EXPLAIN AST`` node a read may hold and whose expressions the dump shows in full (taken
#: from the dumps of SELECTs using joins, windows, CTEs, lambdas, ARRAY JOIN, GROUPING SETS, WITH FILL,
#: SAMPLE, FINAL, QUALIFY, column matchers and transformers, set operations, SHOW/DESCRIBE/EXISTS). A
#: node of any other kind is refused: a kind that hides its expressions (``APPLY``'s, which read a file)
#: is not served before someone has looked at it.
AST_NODES = frozenset(
    {"SelectWithUnionQuery", "SelectIntersectExceptQuery", "SelectQuery", "ExpressionList", "Function",
     "Identifier", "Literal", "Asterisk", "QualifiedAsterisk", "Subquery", "TablesInSelectQuery",
     "TablesInSelectQueryElement", "TableExpression", "TableIdentifier", "TableJoin", "ArrayJoin",
     "OrderByElement", "WindowDefinition", "WindowListElement", "WithElement", "SampleRatio",
     "ColumnsRegexpMatcher", "ColumnsListMatcher", "QualifiedColumnsRegexpMatcher",
     "QualifiedColumnsListMatcher", "ColumnsTransformerList", "ColumnsExceptTransformer",
     "ColumnsReplaceTransformer", "ColumnsReplaceTransformer::Replacement", "Set"}
    | READ_STATEMENTS
)  # fmt: skip

#: A handle idle this long has its process ended (the next query starts one again, in about half a second).
IDLE_S = 300.0

#: ClickHouse's error codes this endpoint answers with, and the HTTP status ClickHouse gives each.
SYNTAX_ERROR, UNKNOWN_DATABASE, READONLY, TOO_MANY_QUERIES, AUTH_FAILED = 62, 81, 164, 202, 516
UNKNOWN_FORMAT, BAD_ARGUMENTS, TIMEOUT_EXCEEDED = 73, 36, 159
_STATUS = {
    SYNTAX_ERROR: 400, 60: 404, UNKNOWN_DATABASE: 404, 46: 404, 47: 400, 43: 400, 42: 400, 53: 400,
    READONLY: 403, 497: 403, AUTH_FAILED: 401, TOO_MANY_QUERIES: 503, 159: 500, 241: 500, 396: 500,
    UNKNOWN_FORMAT: 400, BAD_ARGUMENTS: 400,
}  # fmt: skip
_CODE = re.compile(r"Code: (\d+)\. ")
#: The engine's formatter writes these clauses at the start of a line of their own (a string or a quoted
#: name's line breaks are escaped in its text): found there whatever the statement.
_OUTFILE = re.compile(r"^INTO OUTFILE\b", re.M)
_FORMAT_CLAUSE = re.compile(r"^FORMAT (\S+)$", re.M)
#: A query id as clients make them (uuids, names): anything else is replaced by one of ours.
_QUERY_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
_NAME = re.compile(r"\(([A-Z_]+)\)\s*$")

#: Response content types by output format (ClickHouse's own).
_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
}
#: URL parameters that are the protocol's, not settings.
_PROTOCOL_PARAMS = frozenset(
    {"query", "database", "default_format", "user", "password", "query_id", "session_id",
     "session_timeout", "session_check", "compress", "decompress", "enable_http_compression",
     "wait_end_of_query", "buffer_size", "quota_key", "readonly", "role"}
)  # fmt: skip


class SqlError(Exception):
    """An answer in ClickHouse's error form: ``Code: N. DB::Exception: message (NAME)``."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code, self.name = code, name

    @property
    def status(self) -> int:
        return _STATUS.get(self.code, 500)

    def body(self) -> str:
        return f"Code: {self.code}. DB::Exception: {self}. ({self.name})\n"

    @classmethod
    def from_engine(cls, err: Exception) -> SqlError:
        text = str(err)
        m = _CODE.search(text)
        code = int(m.group(1)) if m else 1001
        n = _NAME.search(text)
        message = text[m.end() :] if m else text
        message = message.removeprefix("DB::Exception: ").strip()
        message = _NAME.sub("", message).rstrip(". ")
        return cls(code, n.group(1) if n else "STD_EXCEPTION", message)


@dataclass(frozen=True)
class Ast:
    """The parts of a query's ``EXPLAIN AST`` this endpoint decides on."""

    statement: str
    output_format: str  # the query's own FORMAT clause, or ""


def _nodes(explain: str) -> list[tuple[int, str, str]]:
    """The ``EXPLAIN AST`` lines as (depth, kind, rest). Literals are printed quoted and escaped, but a
    name or alias holding a line break adds lines to the dump: such a line can only be refused (its kind
    is no node's, or names a function it denies), never hide a node, since the dump prints each node's
    line before its children's and a table function is its ``TableExpression``'s first child."""
    out = []
    for line in explain.split("\n"):
        if not line.strip():
            continue
        text = line.lstrip(" ")
        kind, _, rest = text.partition(" ")
        out.append((len(line) - len(text), kind, rest))
    return out


#: Databases whose tables are served besides meterhouse's own: the engine's catalogue.
CATALOGUE_DATABASES = frozenset({"system", "information_schema", "INFORMATION_SCHEMA"})
_NAME_PART = re.compile(r"^\w+$")


def _table(database: str, table: str, databases: frozenset[str]) -> None:
    """Refuse a table outside the served databases, or whose name is not a plain one: the engine's
    ``default`` database maps a path to a file as a table name (``EXISTS TABLE default.`/etc/passwd```
    answered whether any host file exists: adversary 36)."""
    if (database and database not in databases) or not _NAME_PART.match(table):
        raise SqlError(
            READONLY, "READONLY", f"table {database + '.' if database else ''}{table} is not served here"
        )


def check(explain: str, canonical: str = "", databases: frozenset[str] | None = None) -> Ast:
    """Decide on a query from its ``EXPLAIN AST`` and the engine's own text of it (``formatQuery``; see
    the module's doc); :class:`SqlError` if refused. ``databases``: those whose tables may be named
    (meterhouse's and the catalogue's; None: any, for a check of syntax alone)."""
    if _OUTFILE.search(canonical):
        raise SqlError(READONLY, "READONLY", "INTO OUTFILE is not served here")
    nodes = _nodes(explain)
    if not nodes:
        raise SqlError(SYNTAX_ERROR, "SYNTAX_ERROR", "empty query")
    base, statement, _ = nodes[0]
    if statement not in READ_STATEMENTS:
        raise SqlError(READONLY, "READONLY", f"only reading queries are served here, not {statement}")
    if databases is not None:
        if statement in ("ExistsTableQuery", "ShowCreateTableQuery"):
            parts = nodes[0][2].split(" ")
            _table(parts[0], parts[1] if len(parts) > 1 else "", databases)
        shown = re.search(r"^SHOW (?:DATABASES|TABLES) FROM (\S+)", canonical)
        if shown and shown.group(1).strip("`") not in databases:
            raise SqlError(READONLY, "READONLY", f"database {shown.group(1)} is not served here")
    if statement == "ShowTables" and not _SHOW_TABLES.match(canonical.strip()):
        raise SqlError(
            READONLY, "READONLY", "SHOW with WHERE or LIMIT is not served here; SELECT from system.tables"
        )
    output_format = ""
    parents: list[tuple[int, str]] = []
    for depth, kind, rest in nodes[1:]:
        while parents and parents[-1][0] >= depth:
            parents.pop()
        parent = parents[-1][1] if parents else statement
        if kind == "Set":
            raise SqlError(READONLY, "READONLY", "settings cannot be changed here (a SETTINGS clause)")
        if kind not in AST_NODES:
            raise SqlError(READONLY, "READONLY", f"the syntax of {kind} is not served here")
        if kind.endswith("Transformer") and kind not in SHOWN_TRANSFORMERS:
            # ``* APPLY(file)``, ``APPLY(x -> file(x))``: the AST shows the transformer as one node, not
            # the function it applies, which no check here would see (adversary 34 read a file so).
            raise SqlError(READONLY, "READONLY", f"{kind} (APPLY) is not served here")
        if depth == base + 1 and statement == "SelectWithUnionQuery":
            if kind == "Literal":
                raise SqlError(READONLY, "READONLY", "INTO OUTFILE is not served here")
            if kind == "Identifier":
                output_format = rest.split(" ", 1)[0]
        if kind == "TableIdentifier" and databases is not None:
            name = rest.split(" ", 1)[0]
            db, dot, table = name.partition(".")
            _table(db if dot else "", table if dot else db, databases)
        if kind == "Function":
            name = rest.split(" ", 1)[0]
            if parent == "TableExpression" and name.lower() not in TABLE_FUNCTIONS:
                raise SqlError(READONLY, "READONLY", f"table function {name} is not served here")
            if name.lower() in FUNCTIONS_DENIED or name.lower().startswith(FUNCTION_PREFIXES_DENIED):
                raise SqlError(READONLY, "READONLY", f"function {name} is not served here")
        parents.append((depth, kind))
    clause = _FORMAT_CLAUSE.search(canonical)
    return Ast(statement, clause.group(1) if clause else output_format)


class Engine:
    """The endpoint's own handles on the embedded engine, each read-only with its limits."""

    def __init__(
        self,
        connect: Callable[[dict[str, Any]], Any],
        max_concurrent: int,
        timeout_s: float,
        memory_bytes: int,
        result_bytes: int,
        wait_s: float = 1.0,
        database: str = "meterhouse",
    ) -> None:
        #: The databases whose tables are served: meterhouse's and the engine's catalogue.
        self.databases = frozenset({database}) | CATALOGUE_DATABASES
        self._connect = connect
        self.settings = {
            "max_execution_time": max(1, int(timeout_s)),
            "max_memory_usage": memory_bytes,
            "max_result_bytes": result_bytes,
            "result_overflow_mode": "'throw'",
            "max_threads": 1,
            # The multi-regexp functions compile their patterns inside one block, where the time limit
            # is not checked: 100 fuzzy patterns ran 58 s against a 2 s limit (adversary 34).
            "allow_hyperscan": 0,
        }
        self.wait_s = wait_s
        self.timeout_s = timeout_s
        self._formats: dict[str, str] = {}  # the engine's output formats, by lower-case name
        self._free: queue.LifoQueue[tuple[float, Any]] = queue.LifoQueue()  # (last used, handle)
        self._closed = threading.Event()
        threading.Thread(target=self._reaping, name="sql-reaper", daemon=True).start()
        self._made = 0
        self._max = max(1, max_concurrent)
        self._lock = threading.Lock()

    def _handle(self) -> Any:
        """A new handle, already counted in ``_made`` (uncounted again if it cannot be made)."""
        try:
            return self._connect(self.settings)
        except Exception:
            with self._lock:
                self._made -= 1
            raise

    def _idle(self) -> Any:
        """An idle handle whose process is alive (one that died idle, OOM-killed or by its own end, is
        discarded: its next query failed, adversary 37); raises queue.Empty when there is none."""
        while True:
            _, h = self._free.get_nowait()
            if h.alive:
                return h
            self._discard(h)

    @contextmanager
    def handle(self) -> Iterator[Any]:
        try:
            h = self._idle()
        except queue.Empty:
            with self._lock:
                make = self._made < self._max
                if make:
                    self._made += 1
            if make:
                h = self._handle()
            else:
                try:
                    _, h = self._free.get(timeout=self.wait_s)
                except queue.Empty:
                    raise SqlError(
                        TOO_MANY_QUERIES,
                        "TOO_MANY_SIMULTANEOUS_QUERIES",
                        f"{self._max} queries are running (sql_max_concurrent); retry later",
                    ) from None
                if not h.alive:
                    self._discard(h)
                    with self._lock:
                        self._made += 1
                    h = self._handle()
        try:
            yield h
        except SqlError as err:
            if err.code != TIMEOUT_EXCEEDED and h.alive:
                # A refusal, or the engine's error: the process replaced the connection that failed
                # (exporter/sql_worker.py) and takes the next query.
                self._free.put((time.monotonic(), h))
                raise
            self._discard(h)
            raise
        except BaseException:
            self._discard(h)
            raise
        self._free.put((time.monotonic(), h))

    def _discard(self, h: Any) -> None:
        with self._lock:
            self._made -= 1
        try:
            h.close()
        except Exception:  # noqa: BLE001 - closing a failed handle; nothing else to do with it
            log.debug("closing a failed SQL handle failed", exc_info=True)

    def reap(self, idle_s: float) -> int:
        """End the processes of handles idle for ``idle_s`` or more (each holds some 95 MiB); how many."""
        kept, ended = [], 0
        while True:
            try:
                used, h = self._free.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() - used >= idle_s:
                self._discard(h)
                ended += 1
            else:
                kept.append((used, h))
        for item in reversed(kept):  # the most recently used on top again
            self._free.put(item)
        return ended

    def _reaping(self) -> None:
        while not self._closed.wait(IDLE_S / 4):
            self.reap(IDLE_S)

    def close(self) -> None:
        """End every idle handle's process (at shutdown)."""
        self._closed.set()
        self.reap(0)

    def output_format(self, h: Any, name: str, deadline: float | None = None) -> str:
        """``name`` as one of the engine's own output formats (``system.formats``), or :class:`SqlError`.
        The client library's formats of its own (``DataFrame``, ``ArrowTable``) are built in this
        process's Python, outside the engine's memory and time limits and holding the interpreter: one
        took 400 MiB and 11 s, OOM-killed a 1 GiB collector and held up ingest (adversary 33)."""
        if not self._formats:
            rows = h.query(
                "SELECT name FROM system.formats WHERE is_output", "TSVRaw", deadline=deadline, fresh=False
            )
            rows = rows.bytes().decode()
            self._formats = {n.lower(): n for n in rows.split("\n") if n}
        found = self._formats.get(name.lower())
        if found is None:
            raise SqlError(UNKNOWN_FORMAT, "UNKNOWN_FORMAT", f"unknown output format {name!r}")
        return found

    def run(
        self, sql: str, database: str, fmt: str, params: dict[str, str]
    ) -> tuple[bytes, Ast, dict[str, Any]]:
        """The query's output in ``fmt`` (unless it names its own), after the checks; all the steps
        within one time limit (and the grace), each a round trip to the handle's process."""
        with self.handle() as h:
            deadline = time.monotonic() + self.timeout_s + GRACE_S
            fmt = self.output_format(h, fmt, deadline)
            if database not in self.databases:  # the engine's "default" maps file paths to tables
                raise SqlError(READONLY, "READONLY", f"database {database} is not served here")
            try:
                # The query as the engine's formatter writes it back, parsed from a value (no text of the
                # query is ever run as it came): exactly one statement (the engine runs each of
                # ``a; b``, the checks would see only ``a``), comments gone. That text is checked and run.
                canonical = (
                    h.query(
                        "SELECT formatQuery({q:String})",
                        "TSVRaw",
                        params={"q": _escaped(sql)},
                        deadline=deadline,
                        fresh=False,
                    )
                    .bytes()
                    .decode()
                )
                canonical = canonical.removesuffix("\n")
                explained = h.query(
                    "EXPLAIN AST " + canonical, "TSV", params=params or None, deadline=deadline, fresh=False
                )
            except Exception as err:  # noqa: BLE001 - the engine's parser says why
                raise SqlError.from_engine(err) from None
            ast = check(explained.bytes().decode("utf-8", "replace"), canonical, self.databases)
            try:
                h.query(f"USE `{database.replace('`', '')}`", deadline=deadline, fresh=False)
                result = h.query(canonical, fmt, params=params or None, deadline=deadline)
            except Exception as err:  # noqa: BLE001 - the engine's own error, passed on
                raise SqlError.from_engine(err) from None
            summary = {
                "read_rows": str(result.rows_read()),
                "read_bytes": str(result.bytes_read()),
                "elapsed_ns": str(int(result.elapsed() * 1e9)),
            }
            return result.bytes(), ast, summary


def _escaped(value: str) -> str:
    """``value`` as a query parameter's text (ClickHouse's escaped form: backslash, tab, newline)."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
        .replace("\0", "\\0")
    )  # fmt: skip


def _credentials() -> tuple[str, str]:
    """The user and password of the request, as ClickHouse takes them (header, basic auth, URL)."""
    user = request.headers.get("X-ClickHouse-User")
    key = request.headers.get("X-ClickHouse-Key")
    if user is not None or key is not None:
        return user or "default", key or ""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            user, _, key = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise SqlError(AUTH_FAILED, "AUTHENTICATION_FAILED", "malformed basic authorization") from None
        return user, key
    if scheme.lower() == "bearer":
        return "default", value.strip()
    return request.args.get("user", "default"), request.args.get("password", "")


def _authorize(auth: Auth) -> Token | None:
    if not auth.enabled:
        return None
    _user, key = _credentials()
    try:
        token = auth.authenticate(f"Bearer {key}" if key else None)
    except Unauthorized:
        raise SqlError(
            AUTH_FAILED, "AUTHENTICATION_FAILED",
            "an API token is the password (HTTP basic auth, X-ClickHouse-Key or password=)",
        ) from None  # fmt: skip
    if token is not None and not token.all_orgs:
        raise SqlError(
            497, "ACCESS_DENIED",
            "this token reads some orgs only, and SQL cannot be scoped by org: an all-orgs token is needed",
        )  # fmt: skip
    return token


#: The longest query text taken (URL and body together), as the engine's ``max_query_size`` bounds it.
MAX_QUERY_BYTES = 1 << 20
QUERY_TOO_LONG = (
    f"Code: 62. DB::Exception: the query is longer than {MAX_QUERY_BYTES} bytes. (SYNTAX_ERROR)\n".encode()
)


#: The answer in place of one that would pass the bound on answers their clients have not read
#: (core/httpserver.py ``UnreadAnswers``), in ClickHouse's form.
ANSWERS_UNREAD = (
    503, b"text/plain; charset=UTF-8",
    b"Code: 202. DB::Exception: answers their clients have not yet read hold the SQL endpoint's share of "
    b"memory; retry later. (TOO_MANY_SIMULTANEOUS_QUERIES)\n",
    [(b"x-clickhouse-exception-code", b"202")],
)  # fmt: skip


def _body() -> str:
    """The request body, whole: read from the server's stream itself, as a chunked body (no
    Content-Length: the official JS client sends every query so) reads empty through Flask's."""
    stream = request.environ["wsgi.input"]
    data = stream.read(MAX_QUERY_BYTES + 1)
    if len(data) > MAX_QUERY_BYTES:
        raise SqlError(SYNTAX_ERROR, "SYNTAX_ERROR", f"the query is longer than {MAX_QUERY_BYTES} bytes")
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        raise SqlError(SYNTAX_ERROR, "SYNTAX_ERROR", "the query is not UTF-8") from None


def _query_text() -> str:
    parts = [request.args.get("query", "")]
    if request.method == "POST":
        parts.append(_body())
    text = "\n".join(p for p in parts if p)
    if not text.strip():
        raise SqlError(SYNTAX_ERROR, "SYNTAX_ERROR", "empty query")
    return text


def _params() -> dict[str, str]:
    out = {}
    for name, value in request.args.items():
        if name.startswith("param_"):
            out[name.removeprefix("param_")] = value
        elif name not in _PROTOCOL_PARAMS:
            raise SqlError(READONLY, "READONLY", f"cannot modify '{name}' setting in readonly mode")
    return out


def _content_type(fmt: str) -> str:
    f = fmt.lower()
    if f in _CONTENT_TYPES:
        return _CONTENT_TYPES[f]
    if f.startswith(("tabseparated", "tsv")):
        return _CONTENT_TYPES["tsv"]
    if f.startswith(("pretty", "vertical", "markdown")):
        return "text/plain; charset=UTF-8"
    if f.startswith("json"):
        return "application/json; charset=UTF-8"
    return "application/octet-stream"


def create_sql_app(engine: Engine, auth: Auth, database: str, version: str) -> Flask:
    """The endpoint's Flask app (``auth``'s tokens are replaced on reload, as the API's)."""
    app = Flask("meterhouse-sql")

    @app.get("/ping")
    def ping():
        return Response("Ok.\n", content_type="text/plain; charset=UTF-8")

    @app.route("/", methods=["GET", "POST"])
    def query():
        query_id = request.args.get("query_id", "")
        if not _QUERY_ID.match(query_id):
            query_id = str(uuid.uuid4())
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": "UTC",
                   "X-ClickHouse-Server-Display-Name": "meterhouse"}  # fmt: skip
        started = time.monotonic()
        try:
            _authorize(auth)
            if request.method == "GET" and not request.args.get("query"):
                return Response("Ok.\n", content_type="text/plain; charset=UTF-8", headers=headers)
            sql = _query_text()
            params = _params()
            db = request.headers.get("X-ClickHouse-Database") or request.args.get("database") or database
            fmt = request.args.get("default_format") or "TabSeparated"
            body, ast, summary = engine.run(sql, db, fmt, params)
        except Exception as err:  # noqa: BLE001 - every answer in ClickHouse's form, never an HTML page
            e = err if isinstance(err, SqlError) else SqlError(1001, "STD_EXCEPTION", type(err).__name__)
            if not isinstance(err, SqlError):
                log.exception("sql endpoint error", extra={"query_id": query_id})
            log.info("sql query refused", extra={"code": e.code, "error": str(e)[:300], "query_id": query_id})
            headers["X-ClickHouse-Exception-Code"] = str(e.code)
            return Response(f"{e.body()[:-1]} (version {version})\n", status=e.status,
                            content_type="text/plain; charset=UTF-8", headers=headers)  # fmt: skip
        out = ast.output_format or fmt
        headers["X-ClickHouse-Format"] = out
        headers["X-ClickHouse-Summary"] = json.dumps(summary)
        content_type = _content_type(out)
        log.debug("sql query", extra={"query_id": query_id, "s": round(time.monotonic() - started, 3)})
        return Response(body, content_type=content_type, headers=headers)

    return app
