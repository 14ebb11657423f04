"""The `meterhouse` command: the only place that composes the planes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from meterhouse import __version__
from meterhouse.core import datadir
from meterhouse.core.config import Config, ConfigError, env_of, flag_of, load_config, redact_urls
from meterhouse.core.listen import ListenError
from meterhouse.core.log import setup_logging
from meterhouse.core.tls import load_material


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration option, with the option's own help text and default."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file with options (keys as below, snake_case); overridden by MH_* variables and flags.",
    )
    defaults = Config()
    for f in fields(Config):
        if not f.metadata.get("flag", True):
            continue
        flag = flag_of(f.name)
        env_help = f"env {env_of(f.name)}"
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if str(f.type) == "bool":  # a switch: --spool-fsync / --no-spool-fsync
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=f"{text} [default: {'on' if getattr(defaults, f.name) else 'off'}; "
                f"{env_help}=true|false]",
            )
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            type=typ,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{text} [default: {getattr(defaults, f.name)}; {env_help}]",
        )


def _config_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The configuration from parsed flags, the config file they name, and ``env`` (default: os.environ)."""
    flags = {f.name: getattr(args, f.name) for f in fields(Config) if f.metadata.get("flag", True)}
    return load_config(flags, env=env, config_file=args.config)


def check_bind(config: Config) -> None:
    """Refuse an open API, or open OTLP ports, on a non-loopback address."""
    if config.is_public_bind and not config.auth_tokens and not config.allow_unauthenticated:
        raise ConfigError(
            f"host: {config.host} is not a loopback address and no API tokens are configured "
            "(auth.tokens in the config file); add tokens, or pass --allow-unauthenticated"
        )
    if config.is_public_bind and not config.ingest_tokens and not config.allow_unauthenticated_ingest:
        raise ConfigError(
            f"host: {config.host} is not a loopback address and no ingest tokens are configured "
            "(ingest.tokens in the config file, or MH_INGEST_TOKENS_FILE): anyone could send usage for "
            "any org; add ingest tokens, or pass --allow-unauthenticated-ingest"
        )


#: The allocators' settings ``up`` runs with. Python's objects on the C library's malloc: Python's own
#: allocator keeps freed objects' memory in 1 MiB arenas that go back to the system only when wholly
#: empty (under a mix of large and hostile requests the collector held 355 MiB of empty pools beside 109
#: MB of live objects, and grew past its budget in minutes), while the C library's is what the trimmer
#: (core/memory.py) hands back each second. (The engine's jemalloc returning freed pages after 0.5 s
#: rather than 5, ``JE_MALLOC_CONF=dirty_decay_ms:500``, made no difference to the hostile mix's peak.)
#: And two malloc arenas, not glibc's 8 per core: each of the collector's threads (some 180 under the
#: hostile mix) took memory in its own arena, where what it freed stayed spread too thinly to trim; the
#: same 300 s of the hostile mix peaked at 713-727 MiB anonymous with two arenas against 867-1,032 with
#: the default, at the same throughput.
ALLOCATOR_ENVIRONMENT = {"PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "2"}


def system_malloc() -> None:
    """Run ``up`` with :data:`ALLOCATOR_ENVIRONMENT`, re-executing the same command line once (the
    same process) when any is not set; a value set by the operator is kept (README, "Memory")."""
    wanted = {k: v for k, v in ALLOCATOR_ENVIRONMENT.items() if k not in os.environ}
    if wanted and sys.orig_argv and os.environ.get("MH_ALLOCATOR_SET") is None:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **wanted, "MH_ALLOCATOR_SET": "1"})


def cmd_up(args: argparse.Namespace) -> int:
    system_malloc()
    config = _config_from(args)
    check_bind(config)
    load_material(config)  # a bad certificate or key stops start-up with the key named
    setup_logging(config.log_level, config.log_format)
    from meterhouse.runtime import run_up

    def reload_config() -> Config:
        new = _config_from(args)
        check_bind(new)
        return new

    return run_up(config, reload_config)


def cmd_demo(args: argparse.Namespace) -> int:
    from meterhouse.demo import run_demo

    return run_demo(
        orgs=args.orgs, seconds=args.seconds, endpoint=args.endpoint, api=args.api, seed=args.seed
    )


def redrive(dead_letters, store, first_seq: int | None = None) -> tuple[int, int]:
    """Insert every dead letter again (``collector/writer.py``: ``redrive``); (re-driven, still failing)."""
    from meterhouse.collector.writer import redrive as redrive_letters

    def report(letter, error) -> None:
        if error is None:
            print(f"{letter.path.name}: re-driven ({letter.points} points)")
        else:
            print(f"{letter.path.name}: still refused: {str(error)[:300]}", file=sys.stderr)

    return redrive_letters(dead_letters, store, first_seq, report)


def _reserve_numbers(config: Config, store, letters: int) -> int | None:
    """On the embedded engine: the first of ``letters`` numbers above every group, reserved in the spool
    (so that `meterhouse up` numbers its records above them), or None when the spool holds points not yet
    written (they go in first: a redrive's rows above their group's number would be taken for theirs)."""
    from meterhouse.collector.spool import Spool

    spool = Spool(config.data_dir / "spool")
    try:
        report = spool.open()
        if report.pending_records:
            print(f"meterhouse: the spool holds {spool.pending_points} point(s) acknowledged and not yet "
                  "written; they go in before any dead letter: run `meterhouse up` until "
                  "meterhouse_pending_points is 0, stop it, then redrive", file=sys.stderr)  # fmt: skip
            return None
        first = max(int(store.max_batch_seq()), spool.last_seq) + 1
        spool.reserve(first + max(letters, 1) - 1)
        return first
    finally:
        spool.shutdown(1.0)


def cmd_dead_letter(args: argparse.Namespace) -> int:
    from meterhouse.collector.deadletter import DeadLetters
    from meterhouse.collector.writer import RedriveError
    from meterhouse.core.store import is_embedded, open_store

    config = _config_from(args)
    if not config.data_dir.is_dir():  # not "0 dead letters" for a directory that is not there
        print(f"meterhouse: no data directory at {config.data_dir.resolve()}; pass the one `meterhouse up` "
              "runs with (--data-dir, MH_DATA_DIR or the config file)", file=sys.stderr)  # fmt: skip
        return 1
    datadir.lock(config.data_dir)  # list too: one process per data directory (a redrive removes letters)
    letters = DeadLetters(config.data_dir / "dead-letter")
    if args.action == "list":
        found = letters.list()
        for letter in found:
            code = f"  code={letter.code}" if letter.code is not None else ""
            print(f"{letter.path.name}  points={letter.points}{code}  reason={letter.reason[:200]}")
        print(f"{len(found)} dead letter(s) in {letters.dir}")
        return 0
    try:
        store = open_store(config)
    except Exception as e:  # noqa: BLE001 - a clear message instead of a trace
        print(f"meterhouse: cannot open ClickHouse ({e}); with the embedded engine, stop "
              "`meterhouse up` on this data dir first", file=sys.stderr)  # fmt: skip
        return 1
    first = None
    if is_embedded(config.endpoints[0]):
        first = _reserve_numbers(config, store, letters.count())
        if first is None:
            return 1
    try:
        ok, failed = redrive(letters, store, first)
    except RedriveError as e:
        print(f"meterhouse: redrive stopped: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - settling a redrive cut short needs ClickHouse: said clearly
        print(f"meterhouse: redrive stopped, every letter kept: {type(e).__name__}: {str(e)[:300]}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"re-driven {ok}, still failing {failed}")
    return 0 if failed == 0 else 1


def _server_url(config: Config, port: int | None = None, scheme: str = "http") -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    host = "[" + host + "]" if ":" in host else host
    return f"{scheme}://{host}:{config.http_port if port is None else port}"


def cmd_sql(args: argparse.Namespace) -> int:
    """Run one read-only query through the running server's SQL endpoint and print its answer."""
    import requests

    config = _config_from(args)
    if not config.sql_port:
        print("meterhouse: the SQL endpoint is off (sql_port 0)", file=sys.stderr)
        return 2
    query = sys.stdin.read() if args.query == "-" else args.query
    fmt = args.format or ("PrettyCompact" if sys.stdout.isatty() else "TabSeparatedWithNames")
    base = _server_url(config, config.sql_port, "https" if config.tls_enabled else "http")
    params = {"default_format": fmt, "database": config.database}
    for p in args.param:
        name, eq, value = p.partition("=")
        if not eq or not name:
            print(f"meterhouse: --param {p!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        params[f"param_{name}"] = value
    headers = {"X-ClickHouse-Key": args.token} if args.token else {}
    try:
        r = requests.post(base + "/", params=params, data=query.encode(), headers=headers,
                          timeout=config.sql_timeout_s + 30, stream=True)  # fmt: skip
    except requests.RequestException as e:
        print(f"meterhouse: no SQL endpoint answers on {base} ({type(e).__name__}); is `meterhouse up` "
              "running with this --sql-port and --host?", file=sys.stderr)  # fmt: skip
        return 1
    if r.status_code != 200:
        print(f"meterhouse: {r.text.strip()}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    for chunk in r.iter_content(1 << 16):
        out.write(chunk)
    out.flush()
    return 0


def _server_answers(base: str) -> bool:
    """Whether a running meterhouse answers at ``base`` (its /healthz)."""
    import requests

    try:
        requests.get(f"{base}/healthz", timeout=2).raise_for_status()
    except requests.RequestException:
        return False
    return True


def _api_message(response: Any) -> str:
    """The message of an API error answer, or the start of its text when it is not one."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(response.text[:300])


def _close_remote(base: str, args: argparse.Namespace) -> int | None:
    """Close through a running server's API; None when nothing answers there."""
    import json
    import threading

    import requests

    if not _server_answers(base):
        return None
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    url = f"{base}/api/v1/months/{args.month}/close"
    result: dict = {}
    params = {"force": str(args.force).lower()}
    if args.dry_run or args.force:
        # What the close writes, before it writes it (a dry run takes the cutoff a close would take now;
        # the close takes its own, a moment later).
        try:
            dry = requests.post(url, params={**params, "dry_run": "true"}, headers=headers, timeout=3600)
        except requests.RequestException as e:
            print(f"meterhouse: dry run failed: {e}", file=sys.stderr)
            return 1
        if dry.status_code != 200:
            print(f"meterhouse: close refused ({dry.status_code}): {_api_message(dry)}", file=sys.stderr)
            return 3 if dry.status_code == 409 else 1
        body = dry.json()
        if args.dry_run:
            print(json.dumps(body, indent=2))
            return 0
        print(f"would write: {_preview_text(body)}", file=sys.stderr)

    def post() -> None:
        try:
            result["response"] = requests.post(url, params=params, headers=headers, timeout=24 * 3600)
        except requests.RequestException as e:
            result["error"] = e

    print(f"closing {args.month} on the running server at {base}", file=sys.stderr)
    worker = threading.Thread(target=post, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(1.0)
        if worker.is_alive() and sys.stderr.isatty():
            try:
                body = requests.get(url, headers=headers, timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            if body.get("progress"):
                p = body["progress"]
                print(f"\r\033[Korgs {p['done']}/{p['total']}  left {p.get('eta_s') or '?'}s",
                      end="", file=sys.stderr)  # fmt: skip
    if "error" in result:
        print(f"meterhouse: close failed: {result['error']}", file=sys.stderr)
        return 1
    response = result["response"]
    if response.status_code != 200:
        print(f"\nmeterhouse: close refused ({response.status_code}): {_api_message(response)}",
              file=sys.stderr)  # fmt: skip
        return 3 if response.status_code == 409 else 1
    print(json.dumps(response.json(), indent=2))
    return 0


def _preview_text(p: dict) -> str:
    """A dry run's answer (``exporter.months.preview_json``) on one line."""
    forced = "forced " if p["forced"] else ""
    out = (f"{forced}close of {p['month']}, cutoff {p['cutoff']}: orgs {p['orgs']}, lines {p['lines']} "
           f"({p['lines_written']} written), points {p['points']}, total {p['total']}")  # fmt: skip
    if p["unconfirmed_collectors"]:
        out += f"; not confirmed committed: {', '.join(p['unconfirmed_collectors'])}"
    return out


def _spool_pending(config: Config) -> int:
    """Points the data directory's spool acknowledged and has not committed (0 without a spool)."""
    from meterhouse.collector.spool import Spool

    directory = config.data_dir / "spool"
    if not directory.is_dir():
        return 0
    spool = Spool(directory, max_bytes=config.spool_max_bytes, segment_bytes=config.spool_segment_bytes,
                  fsync=config.spool_fsync)  # fmt: skip
    try:
        spool.open()
        return sum(r.points for r in spool.uncommitted_records())
    finally:
        spool.shutdown(1.0)


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _add_month_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--month``, ``--token`` and ``--direct`` of the month commands (through a running server, or on a
    stopped data directory)."""
    parser.add_argument("--month", required=True, metavar="YYYY-MM", help=f"The month to {verb} (UTC).")
    parser.add_argument("--token", help="API token (admin) when the running server has tokens configured.")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="Work on the data directory even if a server answers on --http-port.",
    )


def _open_direct(config: Config) -> Any:
    """The store of a data directory no server holds (its lock taken), or None with the reason printed."""
    from meterhouse.core.store import is_embedded, open_store

    if is_embedded(config.endpoints[0]):  # a ClickHouse server is not in the data directory
        datadir.lock(config.data_dir)
    try:
        return open_store(config)
    except Exception as e:  # noqa: BLE001 - a clear message instead of a trace
        print(f"meterhouse: cannot open ClickHouse ({e}); is `meterhouse up` running on another "
              "--http-port?", file=sys.stderr)  # fmt: skip
        return None


def cmd_close(args: argparse.Namespace) -> int:
    """Close a month: through the running server when one answers, else on the data directory."""
    import json

    from meterhouse.core import close, commits
    from meterhouse.core.store import is_embedded
    from meterhouse.exporter.months import close_json, preview_json

    config = _config_from(args)
    try:
        month = close.Month.parse(args.month)
    except ValueError as e:
        print(f"meterhouse: {e}", file=sys.stderr)
        return 2
    if not args.direct:
        code = _close_remote(_server_url(config), args)
        if code is not None:
            return code
    store = _open_direct(config)
    if store is None:
        return 1
    # A stopped data directory has nothing in flight; what its spool acknowledged and did not commit would
    # be left out of the statement (adjustments once `meterhouse up` commits it): refused, not guessed.
    pending = _spool_pending(config)
    if pending:
        print(f"meterhouse: close refused: the spool under {config.data_dir} holds {pending} acknowledged "
              "point(s) not yet committed; start `meterhouse up` on it and close through it (the close "
              "waits for them), or let it commit them and stop it first", file=sys.stderr)  # fmt: skip
        return 3
    wait = None
    if not is_embedded(config.endpoints[0]):  # collectors may run elsewhere against this ClickHouse

        def wait() -> list[str]:
            since_ms = int(store.scalar(commits.NOW_MS_SQL))
            return commits.wait_for_collectors(store, since_ms, commits.CLOSE_WAIT_S)

    kw: dict[str, Any] = dict(late_window_days=config.late_window_days, force=args.force, wait_committed=wait)
    try:
        if args.dry_run:
            print(json.dumps(preview_json(close.dry_run(store, month, **kw)), indent=2))
            return 0
        shown = (lambda p: print(f"writing: {p.text()}", file=sys.stderr)) if args.force else None
        record = close.close_month(
            store, month, batch_orgs=args.batch_orgs, progress=close.terminal_progress(),
            before_writing=shown, **kw,
        )  # fmt: skip
    except close.CloseRefused as e:
        print(f"meterhouse: close refused: {e}", file=sys.stderr)
        return 3
    if record.unconfirmed:
        print(f"meterhouse: warning: collectors that did not confirm their commits before the cutoff: "
              f"{', '.join(record.unconfirmed)}", file=sys.stderr)  # fmt: skip
    print(json.dumps(close_json(record), indent=2))
    return 0


def cmd_rollup(args: argparse.Namespace) -> int:
    """Rebuild a month of the hourly rollups from raw points: through the running server when one
    answers (it holds its writer meanwhile), else on the data directory."""
    import json

    import requests

    from meterhouse.core import close, rollup

    config = _config_from(args)
    try:
        month = close.Month.parse(args.month)
    except ValueError as e:
        print(f"meterhouse: {e}", file=sys.stderr)
        return 2
    base = _server_url(config)
    if not args.direct and _server_answers(base):
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        print(f"meterhouse: rebuilding the rollups of {month} through {base} (its writer waits "
              "meanwhile)", file=sys.stderr)  # fmt: skip
        try:
            r = requests.post(f"{base}/api/v1/months/{month}/rollup/rebuild", headers=headers, timeout=7200)
        except requests.RequestException as e:
            print(f"meterhouse: rollup rebuild failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if r.status_code != 200:
            print(f"meterhouse: rollup rebuild refused ({r.status_code}): {_api_message(r)}", file=sys.stderr)
            return 1 if r.status_code >= 500 else 3
        print(json.dumps(r.json(), indent=2))
        return 0
    store = _open_direct(config)
    if store is None:
        return 1
    try:
        done = rollup.rebuild_month(store, month, progress=lambda text: print(text, file=sys.stderr))
    except rollup.RebuildRefused as e:
        print(f"meterhouse: rollup rebuild refused: {e}", file=sys.stderr)
        return 3
    print(json.dumps(done.as_json(), indent=2))
    return 0


def options_table() -> str:
    """The Markdown table of every option, as the README carries it."""
    defaults = Config()
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|",
            "| `--config` | | | YAML file with any of the options below (snake_case keys). |"]  # fmt: skip
    for f in fields(Config):
        if not f.metadata.get("flag", True):
            continue
        flag = flag_of(f.name)
        if str(f.type) == "bool":
            flag += f"` / `--no-{flag[2:]}"
        rows.append(f"| `{flag}` | `{env_of(f.name)}` | "
                    f"`{getattr(defaults, f.name)}` | {f.metadata['help']} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def cmd_dashboards(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meterhouse.dashboards import build

    out = Path(args.out) if args.out else None
    for path in build(out) if out else build():
        print(f"wrote {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.options_table:
        print(options_table(), end="")
        return 0
    config = _config_from(args)
    for f in fields(Config):
        value = getattr(config, f.name)
        if f.name in ("auth_tokens", "ingest_tokens"):  # never print secrets
            value = [f"{t.token[:4]}… orgs={list(t.orgs)}" for t in value]
        elif f.name == "clickhouse_url":
            value = redact_urls(value)
        print(f"{f.name}: {value}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the DDL `meterhouse up` applies: single-node, or ``--cluster NAME``'s replicated, sharded one."""
    from meterhouse.core import schema

    config = _config_from(args) if args.config else None
    database = args.database or (config.database if config else "meterhouse")
    cluster = args.cluster if args.cluster is not None else (config.cluster if config else "")
    days = args.raw_retention_days if args.raw_retention_days is not None else (
        config.raw_retention_days if config else 0)  # fmt: skip
    from meterhouse.core.config import _identifier

    for name, value in (("database", database), ("cluster", cluster)):
        if value and (problem := _identifier(value)):
            raise ConfigError(f"{name}: {problem} (got {value!r})")
    for statement in schema.render(database, cluster, days):
        print(statement + ";\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterhouse",
        description="Exact per-organization usage metrics: OTLP in, ClickHouse inside, "
        "bounded Prometheus out.",
    )
    parser.add_argument("--version", action="version", version=f"meterhouse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="Run receivers, writer, exporter and API in one process.")
    _add_config_flags(up)
    up.set_defaults(func=cmd_up)

    cfg = sub.add_parser("config", help="Print the effective configuration and exit.")
    cfg.add_argument(
        "--options-table",
        action="store_true",
        help="Print the Markdown table of all options (the README's) instead.",
    )
    _add_config_flags(cfg)
    cfg.set_defaults(func=cmd_config)

    dl = sub.add_parser("dead-letter", help="List dead-lettered batches, or insert them again.")
    dl.add_argument("action", choices=["list", "redrive"])
    _add_config_flags(dl)
    dl.set_defaults(func=cmd_dead_letter)

    cl = sub.add_parser(
        "close",
        help="Close a month: immutable per-org statements from raw points, checked against the rollup.",
    )
    _add_month_flags(cl, "close")
    cl.add_argument(
        "--force",
        action="store_true",
        help="Close even inside the late window (recorded); prints what it writes before writing it.",
    )
    cl.add_argument(
        "--dry-run",
        action="store_true",
        help="Write nothing: print what the close would write (orgs, lines, totals as of its cutoff).",
    )
    cl.add_argument(
        "--batch-orgs", type=_positive_int, default=2000, help="Orgs written per insert [default: 2000]."
    )
    _add_config_flags(cl)
    cl.set_defaults(func=cmd_close)
    ro = sub.add_parser(
        "rollup",
        help="Rebuild a month of the hourly rollups from raw points (the remedy of reconciliation drift).",
    )
    ro.add_argument("action", choices=["rebuild"])
    _add_month_flags(ro, "rebuild")
    _add_config_flags(ro)
    ro.set_defaults(func=cmd_rollup)
    sch = sub.add_parser(
        "schema", help="Print the ClickHouse DDL (with --cluster NAME: replicated and sharded by org)."
    )
    sch.add_argument("--config", metavar="FILE", help="YAML file to take database and cluster from.")
    sch.add_argument("--cluster", metavar="NAME", default=None, help="Render for this ClickHouse cluster.")
    sch.add_argument("--database", metavar="NAME", default=None, help="Database [default: meterhouse].")
    sch.add_argument("--raw-retention-days", type=int, default=None, help="Include the raw-points TTL.")
    sch.set_defaults(func=cmd_schema)

    sql = sub.add_parser(
        "sql",
        help="Run a read-only SQL query on the running meterhouse's tables (its SQL endpoint).",
        description="Run one read-only query (SELECT, SHOW, DESCRIBE, EXISTS) through the SQL endpoint of "
        "the `meterhouse up` this configuration names (--host, --sql-port, --database), and print "
        "the answer. Exit 1 with the server's error when it refuses the query.",
    )
    sql.add_argument("query", help="The query; - reads it from standard input.")
    sql.add_argument(
        "--format",
        metavar="FORMAT",
        help="Output format (any ClickHouse output format) [default: PrettyCompact on a terminal, "
        "else TabSeparatedWithNames].",
    )
    sql.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="A query parameter, for {NAME:Type} in the query (repeatable).",
    )
    sql.add_argument("--token", help="API token with all-orgs read scope, when tokens are configured.")
    _add_config_flags(sql)
    sql.set_defaults(func=cmd_sql)

    dash = sub.add_parser("dashboards", help="Generate the Grafana dashboards' JSON from their sources.")
    dash.add_argument("action", choices=["build"])
    dash.add_argument(
        "--out",
        metavar="DIR",
        help="Where to write (default: the package's json/ folder, which Grafana provisioning mounts).",
    )
    dash.set_defaults(func=cmd_dashboards)

    demo = sub.add_parser(
        "demo",
        help="Send realistic usage for N orgs with the OpenTelemetry SDK "
        "and check the totals read back from the API.",
    )
    demo.add_argument("--orgs", type=int, default=50, help="Number of orgs [default: 50].")
    demo.add_argument("--seconds", type=float, default=10.0, help="How long to send [default: 10].")
    demo.add_argument(
        "--endpoint",
        default="http://127.0.0.1:4318",
        help="OTLP/HTTP base URL [default: http://127.0.0.1:4318].",
    )
    demo.add_argument(
        "--api",
        default="http://127.0.0.1:9464",
        help="meterhouse HTTP base URL, to read totals back [default: http://127.0.0.1:9464].",
    )
    demo.add_argument("--seed", type=int, default=None, help="Random seed, for repeatable runs.")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"meterhouse: configuration error: {e}", file=sys.stderr)
        return 2
    except (datadir.DataDirError, ListenError) as e:
        # Another process holds the data directory (or it cannot be made), or a port (or it is privileged,
        # or the address not this host's): one line, nothing started.
        print(f"meterhouse: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
