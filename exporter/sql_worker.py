"""The SQL endpoint's query processes: each endpoint handle is a process of its own, killed at its time limit.

The engine checks ``max_execution_time`` only between blocks, so a query whose one row takes long (re2's
slow path over a 1 MB string, a function whose cost is the product of its inputs) ran 18 s against a 2 s
limit, and no thread of the collector's process can be stopped from outside. A process can: each handle
of the endpoint (exporter/sql.py) is a child process with an embedded engine of its own, and a query that
has not answered by its limit and :data:`GRACE_S` is ended by SIGKILL, its process replaced.

The child cannot open the collector's data directory (the engine locks it), and must not change a byte
of it. It reads a **mirror** under ``<data_dir>/sql-workers/<n>``: each table's parts as hard links to
the collector's files (a part's files never change once it has its name: a merge or a mutation writes a
new part), attached in an engine that writes nothing to them: its queries' connection is read-only
(``readonly = 1``, and the endpoint's checks before it), and each table is attached with settings under
which no merge can start and no part is removed (:data:`STILL`; a merge would write new parts beside the
links, and the engine's ``readonly`` disk option is its object stores', not its local disks'). Before
each query the child compares each table's parts with the collector's (by name and inode), links the new
ones, drops the gone ones and attaches the table again if any changed (a few ms; nothing when nothing
changed). A part the collector removes while a query reads it stays readable there (its
files live while a link does); a part removed while the mirror links it (a merge, which writes its
result before it removes its sources) makes the mirror list the table again, so no query sees a table
with a merge's sources gone and its result not yet there.

Protocol (stdin/stdout of the child): frames of a 4-byte big-endian length and a JSON header, then as
many bytes as the header's ``size`` says. The first frame is the spec (:func:`Worker.spawn`); then each
request ``{"sql", "format", "params"}`` gets ``{"ok": true, "size", "rows_read", "bytes_read",
"elapsed"}`` and the output, or ``{"ok": false, "error"}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("meterhouse.sql")

#: How long past its own time limit a query may run before its process is killed: the engine's own
#: limit, checked between blocks, ends most queries first, with its own message.
GRACE_S = 1.0
#: How often an idle process brings its mirror up to date: the links of parts the collector merged away
#: hold their disk space until then (at most the tables' size in the last such interval; nothing after
#: the process is ended, five minutes idle: exporter/sql.py ``IDLE_S``).
IDLE_SYNC_S = 10.0
#: How long a new process may take to start (import the engine, attach the tables).
START_S = 60.0
#: The folder of the query processes' mirrors, in the data directory (the same file system: hard links).
WORKERS_DIR = "sql-workers"
#: ClickHouse's error code for a query past its time limit.
TIMEOUT_EXCEEDED = 159

_HEADER = struct.Struct(">I")
#: Entries of a table's folder that are not its parts, or not parts yet (the engine writes a part under
#: a ``tmp_`` name and renames it when whole). The insert deduplication log is the collector's to write:
#: never linked (the query process's engine keeps an empty one of its own).
_NOT_PARTS = ("tmp", "delete_tmp", "detached", "moving", "broken", "ignored", "clone", "covered-by-broken",
              "deduplication_logs")  # fmt: skip
_TO = re.compile(r"\bTO\s+(\S+)")


class WorkerError(Exception):
    """The query process failed or was killed: the message is ClickHouse's error text."""


def _write_frame(out: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    data = json.dumps(header).encode()
    out.write(_HEADER.pack(len(data)) + data)
    out.write(payload)
    out.flush()


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray:
    """``n`` bytes of ``fd``, read into one buffer (an answer is held once, not once per chunk and once
    joined); TimeoutError past ``deadline``, EOFError if the other side ended."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        k = os.readv(fd, [view[got:]])
        if not k:
            raise EOFError
        got += k
    return buf


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    """All of ``data`` to the pipe ``fd`` (non-blocking), or TimeoutError past ``deadline``: a process
    busy elsewhere (syncing its mirror) does not hold the writer outside every time limit."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


def _read_frame(fd: int, deadline: float | None = None) -> tuple[dict[str, Any], bytearray]:
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    header = json.loads(_read_exact(fd, size, deadline))
    return header, _read_exact(fd, int(header.get("size", 0)), deadline)


# --- the parent's side --------------------------------------------------------------------------------


class Result:
    """A query's output, as the endpoint reads an engine result."""

    def __init__(self, payload: bytearray, header: dict[str, Any]) -> None:
        self._payload, self._header = payload, header

    def bytes(self) -> bytearray:
        return self._payload

    def rows_read(self) -> int:
        return int(self._header.get("rows_read", 0))

    def bytes_read(self) -> int:
        return int(self._header.get("bytes_read", 0))

    def elapsed(self) -> float:
        return float(self._header.get("elapsed", 0.0))


class Worker:
    """One query process: :meth:`query` answers within its limit, or the process is killed."""

    def __init__(self, proc: subprocess.Popen[bytes], folder: Path, limit_s: float) -> None:
        self._proc, self.folder, self.limit_s = proc, folder, limit_s

    @classmethod
    def spawn(cls, folder: Path, spec: dict[str, Any], limit_s: float) -> Worker:
        """A new process mirroring ``spec["source"]`` (the collector's engine folder) into ``folder``;
        ``spec``: ``database``, ``tables`` (rows of ``system.tables``), ``settings`` (each query's, then
        ``readonly = 1``), ``options`` (the engine's server settings)."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "meterhouse.exporter.sql_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the collector's terminal is the collector's to handle
        )  # fmt: skip
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        worker = cls(proc, folder, limit_s)
        try:
            header, _ = worker._ask({**spec, "folder": str(folder)}, time.monotonic() + START_S)
        except BaseException:
            worker.close()
            raise
        if not header.get("ok"):
            worker.close()
            raise WorkerError(header.get("error", "the SQL query process did not start"))
        return worker

    def _ask(self, request: dict[str, Any], deadline: float) -> tuple[dict[str, Any], bytearray]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        body = json.dumps(request).encode()
        _write_all(self._proc.stdin.fileno(), _HEADER.pack(len(body)) + body, deadline)
        return _read_frame(self._proc.stdout.fileno(), deadline)

    def query(
        self,
        sql: str,
        fmt: str = "TSV",
        params: dict[str, str] | None = None,
        deadline: float | None = None,
        fresh: bool = True,
    ) -> Result:
        """``sql``'s output in ``fmt``; :class:`WorkerError` with the engine's text if it failed, or with
        TIMEOUT_EXCEEDED (the process killed) if it did not answer by ``deadline`` (the limit and the grace
        from now when None; the endpoint gives one deadline to all the steps of one query). ``fresh``: the
        mirror is brought up to date first (not for the steps that read no table: parsing, ``USE``)."""
        started = time.monotonic()
        if deadline is None:
            deadline = started + self.limit_s + GRACE_S
        try:
            request = {"sql": sql, "format": fmt, "params": params or {}, "fresh": fresh}
            header, payload = self._ask(request, deadline)
        except TimeoutError:
            self.close()
            raise WorkerError(
                f"Code: {TIMEOUT_EXCEEDED}. DB::Exception: Timeout exceeded: elapsed "
                f"{time.monotonic() - started:.1f} s, maximum: {self.limit_s:g} s; the query's process "
                "was ended. (TIMEOUT_EXCEEDED)"
            ) from None
        except (EOFError, OSError, ValueError) as err:
            self.close()
            raise WorkerError(
                f"Code: 1001. DB::Exception: the query's process ended ({type(err).__name__}). "
                "(STD_EXCEPTION)"
            ) from None
        if not header.get("ok"):
            raise WorkerError(header.get("error", ""))
        return Result(payload, header)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        """Kill the process (its queries are reads: nothing of it needs to end well) and remove its
        mirror (links only)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Spawner:
    """Makes the endpoint's handles: a :class:`Worker` on ``database``'s tables, with each query's
    ``settings`` (the endpoint's limits); ``memory_bytes`` bounds the child's engine."""

    def __init__(self, data_dir: Path, database: str, limit_s: float, memory_bytes: int) -> None:
        self.root = data_dir.resolve() / WORKERS_DIR
        self.database, self.limit_s = database, limit_s
        # The child's engine: its queries' share and some for the engine itself, small caches, one
        # background thread (its merges are stopped).
        self.options = {
            "max_server_memory_usage": str(memory_bytes + (64 << 20)),
            "mark_cache_size": str(16 << 20), "primary_index_cache_size": str(8 << 20),
            "index_mark_cache_size": str(8 << 20), "uncompressed_cache_size": "0",
            "query_condition_cache_size": str(8 << 20), "background_pool_size": "1",
            "background_merges_mutations_concurrency_ratio": "1",
        }  # fmt: skip
        self._made = itertools.count()
        self._tables: list[dict[str, Any]] | None = None
        self.source = Path()  # the collector's engine folder, with the tables
        self._lock = threading.Lock()
        shutil.rmtree(self.root, ignore_errors=True)  # earlier runs' mirrors: the data directory is ours

    def tables(self) -> list[dict[str, Any]]:
        """The database's tables as the collector's engine has them (read once: the schema changes only
        when the collector starts)."""
        from meterhouse.core.store import embedded_handle, embedded_path

        with self._lock:
            if self._tables is None:
                h = embedded_handle()
                try:
                    out = h.query(
                        "SELECT name, engine, toString(uuid) AS uuid, create_table_query, data_paths "
                        "FROM system.tables WHERE database = {db:String} ORDER BY name",
                        "JSON", params={"db": self.database},
                    )  # fmt: skip
                    self._tables = json.loads(out.bytes())["data"]
                    self.source = embedded_path()
                finally:
                    h.close()
            return self._tables

    def __call__(self, settings: dict[str, Any]) -> Worker:
        tables = self.tables()
        spec = {"source": str(self.source), "database": self.database, "tables": tables,
                "settings": settings, "options": self.options, "idle_sync_s": IDLE_SYNC_S}  # fmt: skip
        return Worker.spawn(self.root / str(next(self._made)), spec, self.limit_s)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --- the child's side ---------------------------------------------------------------------------------


#: Table settings of the mirror's tables, from their attach on (a ``SYSTEM STOP MERGES`` after the attach
#: came too late: the engine chose a TTL merge in between and wrote a part of its own into the mirror,
#: adversary 37): no merge can select parts (none is 1 byte or less), no TTL merge is due for a century,
#: and outdated parts are not removed by this engine (the sync does that).
STILL = {
    "max_bytes_to_merge_at_max_space_in_pool": "1",
    "max_bytes_to_merge_at_min_space_in_pool": "1",
    "merge_with_ttl_timeout": str(100 * 365 * 86400),
    "merge_with_recompression_ttl_timeout": str(100 * 365 * 86400),
    "old_parts_lifetime": str(100 * 365 * 86400),
}
_SETTING = re.compile(r"(\w+) = ('(?:[^'\\]|\\.)*'|[^,]+?)(?:, |$)")


def _with_settings(query: str, settings: dict[str, str]) -> str:
    """``query`` (a table's ``create_table_query``) with ``settings`` in its ``SETTINGS`` clause, replacing
    any of the same name (the engine refuses a setting twice)."""
    head, sep, tail = query.rpartition(" SETTINGS ")
    if not sep:
        head, tail = query, ""
    merged = {k: v for k, v in _SETTING.findall(tail)}
    merged.update(settings)
    return f"{head} SETTINGS " + ", ".join(f"{k} = {v}" for k, v in merged.items())


def _same_part(a: Path, b: Path) -> bool:
    """Whether the mirror's part ``b`` is the links of the collector's part ``a`` (not a part of the same
    name the query process wrote, nor an earlier part of that name)."""
    try:
        return os.stat(a / "checksums.txt").st_ino == os.stat(b / "checksums.txt").st_ino
    except OSError:
        return False


def _parts(folder: Path) -> set[str]:
    with os.scandir(folder) as entries:
        return {
            e.name for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(_NOT_PARTS)
        }


def _link(src: str, dst: str) -> None:
    """A hard link, or a copy where the mirror is on another file system than the engine's folder."""
    try:
        os.link(src, dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copy2(src, dst)


def _link_part(src: Path, dst: Path) -> bool:
    """Hard-link the part ``src`` as ``dst``; False if the collector removed it meanwhile."""
    tmp = dst.with_name(".linking-" + dst.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, copy_function=_link)
    except (FileNotFoundError, shutil.Error):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return True


def sync_table(src: Path, dst: Path) -> bool:
    """Make ``dst``'s parts ``src``'s (hard links); True if any changed. Lists again after a part went
    while it was linked: a merge writes its result before it removes its sources, so the next listing
    holds the result."""
    changed = False
    for attempt in range(100):
        want, have = _parts(src), _parts(dst)
        have -= {name for name in have & want if not _same_part(src / name, dst / name)}
        if want == have:
            return changed
        changed = True
        complete = True
        for name in sorted(want - have):
            complete = _link_part(src / name, dst / name) and complete
        for name in _parts(dst) - want:
            shutil.rmtree(dst / name, ignore_errors=True)
        # Every part listed is linked. Parts added since are after this snapshot; a listed part removed
        # since (merged away) is linked, so its rows are here: list again only to catch a listing that
        # raced a merge, and not forever while the collector inserts and merges without pause (a spawn
        # failed so under a tight insert-and-OPTIMIZE loop).
        if complete and (want <= _parts(src) or attempt >= 10):
            return changed
    raise RuntimeError(f"the parts of {src} could not be linked: they kept going while mirrored")


class Mirror:
    """The child's engine: the collector's tables attached from hard links, never written (module doc)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import chdb

        self.source = Path(spec["source"])
        folder = Path(spec["folder"])
        self.disk = folder / "mirror"
        self.disk.mkdir(parents=True)
        options = {"custom_local_disks_base_directory": str(folder), **spec.get("options", {})}
        query = "&".join(f"{k}={v}" for k, v in options.items())
        self._connect = lambda: chdb.connect(f"file:{folder / 'engine'}?{query}")  # type: ignore[no-untyped-call]
        self.settings: dict[str, Any] = spec.get("settings", {})
        self.database: str = spec["database"]
        self.admin = self._connect()
        self.tables: dict[str, tuple[Path, Path]] = {}  # name: (the collector's folder, the mirror's)
        self._schema(spec["tables"])
        self.reader = self._reader()
        self.broken = False

    def _schema(self, tables: list[dict[str, Any]]) -> None:
        db = f"`{self.database}`"
        self.admin.query(f"CREATE DATABASE IF NOT EXISTS {db}")
        disk = f"disk(type = 'local', path = '{self.disk}/')"
        later = []
        for t in tables:
            name, engine, query = t["name"], t["engine"], t["create_table_query"]
            if engine.endswith("MergeTree") and t.get("data_paths"):
                src = Path(t["data_paths"][0])
                rel = src.relative_to(self.source)
                dst = self.disk / rel
                dst.mkdir(parents=True)
                if (src / "format_version.txt").exists():
                    _link(str(src / "format_version.txt"), str(dst / "format_version.txt"))
                sync_table(src, dst)
                self.tables[name] = (src, dst)
                query = query.replace("CREATE TABLE ", "ATTACH TABLE ", 1)
                query = query.replace(
                    f"{self.database}.{name} ", f"{self.database}.{name} UUID '{t['uuid']}' ", 1
                )
                query = _with_settings(query, {**STILL, "disk": disk})
                self.admin.query(query)
                self._still(name)
            elif engine == "MaterializedView":
                m = _TO.search(query)
                if m:  # reading such a view reads its target table
                    later.append(f"CREATE VIEW {db}.`{name}` AS SELECT * FROM {m.group(1)}")
            elif engine == "View":
                later.append(query)
            else:
                self.admin.query(query)  # a Null table: its data is the views'
        for query in later:
            self.admin.query(query)

    def _still(self, name: str) -> None:
        """No merge of the table in this process: it would write parts of its own into the mirror (the
        engine's ``readonly`` disk option is its object stores', not its local disks')."""
        for what in ("MERGES", "TTL MERGES"):
            self.admin.query(f"SYSTEM STOP {what} `{self.database}`.`{name}`")

    def _reader(self) -> Any:
        h = self._connect()
        for name, value in self.settings.items():
            h.query(f"SET {name} = {value}")
        h.query("SET readonly = 1")  # last: from here the connection cannot change a setting
        return h

    def refresh(self) -> None:
        for name, (src, dst) in self.tables.items():
            if sync_table(src, dst):
                self.admin.query(f"DETACH TABLE `{self.database}`.`{name}`")
                self.admin.query(f"ATTACH TABLE `{self.database}`.`{name}`")
                self._still(name)

    def answer(self, request: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        try:
            if request.get("fresh", True):
                self.refresh()
        except Exception as err:  # noqa: BLE001 - said to the parent; then this process ends
            # A table may be left detached, or its mirror half synced: no later query runs here.
            self.broken = True
            error = f"Code: 1001. DB::Exception: the mirror could not be synced: {err}. (STD_EXCEPTION)"
            return {"ok": False, "error": error}, b""
        try:
            result = self.reader.query(
                request["sql"], request.get("format", "TSV"), params=request.get("params") or None
            )
        except Exception as err:  # noqa: BLE001 - the engine's own error, passed on
            # A connection whose query failed is not used again: after a query ended by an error part-way
            # through its output, the engine answered the connection's next query with that output.
            with contextlib.suppress(Exception):
                self.reader.close()
            self.reader = self._reader()
            return {"ok": False, "error": str(err)}, b""
        payload = result.bytes()
        header = {"ok": True, "size": len(payload), "rows_read": result.rows_read(),
                  "bytes_read": result.bytes_read(), "elapsed": result.elapsed()}  # fmt: skip
        return header, payload


def _die_with_parent() -> None:
    """SIGKILL this process when the collector's ends, however it ends (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(0)


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer.fileno(), sys.stdout.buffer
    try:
        spec, _ = _read_frame(stdin)
        mirror = Mirror(spec)
    except EOFError:
        return
    except Exception as err:  # noqa: BLE001 - said to the parent, which logs it
        _write_frame(stdout, {"ok": False, "error": f"Code: 1001. DB::Exception: {err}. (STD_EXCEPTION)"})
        return
    _write_frame(stdout, {"ok": True})
    while True:
        while not select.select([stdin], [], [], float(spec.get("idle_sync_s", IDLE_SYNC_S)))[0]:
            try:
                mirror.refresh()  # drops the links of parts merged away, whose disk space they would hold
            except Exception:  # noqa: BLE001 - the parent starts another process at its next query
                os._exit(1)
        try:
            request, _ = _read_frame(stdin)
        except EOFError:
            return
        header, payload = mirror.answer(request)
        _write_frame(stdout, header, payload)
        if mirror.broken:
            os._exit(1)


if __name__ == "__main__":
    main()
