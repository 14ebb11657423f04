"""One typed configuration object, read from defaults, a YAML file, `MH_*` variables and flags.

Later sources win: defaults < ``--config FILE`` < environment < command-line flags. Every value is
validated at start; a bad one raises :class:`ConfigError` naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from meterhouse.core import hours

ENV_PREFIX = "MH_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number from 0 to 65535"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or more"


Check = Callable[[Any], "str | None"]


def _choice(*allowed: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _identifier(v: str) -> str | None:
    ok = v and (v[0].isalpha() or v[0] == "_") and all(c.isalnum() or c == "_" for c in v)
    return None if ok else "must be a plain identifier (letters, digits, underscore)"


def _urls(v: str) -> str | None:
    for url in (u.strip() for u in v.split(",") if u.strip()):
        if not url.startswith(("http://", "https://", "embedded")):
            return f"each endpoint must be http(s)://host:port or embedded[#name] ({url!r} is not)"
    return None


def _optional_identifier(v: str) -> str | None:
    return _identifier(v) if v else None


def _opt(check: Check | None, *, default: Any, help: str) -> Any:
    return field(default=default, metadata={"check": check, "help": help})


@dataclass(frozen=True)
class Config:
    """Everything `meterhouse up` needs. Field help text is the documentation of each option."""

    data_dir: Path = _opt(
        None,
        default=Path("./meterhouse-data"),
        help="Directory for the embedded ClickHouse data, the spool and other local state.",
    )
    clickhouse_url: str = _opt(
        _urls,
        default="embedded",
        help="ClickHouse endpoints in priority order, comma-separated: http(s)://[user:pass@]host:8123 "
        "or embedded (the chdb engine under data_dir). Writes fail over down the list.",
    )
    database: str = _opt(_identifier, default="meterhouse", help="ClickHouse database name.")
    cluster: str = _opt(
        _optional_identifier,
        default="",
        help="ClickHouse cluster (remote_servers) name: the schema is created ON CLUSTER, replicated and "
        "sharded by org, and the endpoints are nodes of it. Empty = one node.",
    )
    host: str = _opt(None, default="127.0.0.1", help="Address every listener binds.")
    otlp_grpc_port: int = _opt(_port, default=4317, help="OTLP/gRPC port (0 = any free port).")
    otlp_http_port: int = _opt(_port, default=4318, help="OTLP/HTTP port (0 = any free port).")
    http_port: int = _opt(
        _port, default=9464, help="Port of /metrics, /healthz, /readyz and /api/v1 (0 = any)."
    )
    sql_port: int = _opt(
        _port,
        default=8123,
        help="Port of the read-only ClickHouse HTTP endpoint over the embedded engine, for Grafana's "
        "ClickHouse plugin, ClickHouse clients and `meterhouse sql` (0 = off; README, SQL endpoint).",
    )
    sql_max_concurrent: int = _opt(
        _positive, default=2, help="Queries the SQL endpoint runs at once; one more waits a second, then 503."
    )
    sql_timeout_s: float = _opt(
        _positive, default=30.0, help="Longest a SQL endpoint query runs (whole seconds, max_execution_time)."
    )
    org_attribute: str = _opt(
        None, default="org.id", help="Attribute key naming the organization (point, then resource)."
    )
    flush_interval_s: float = _opt(
        _positive, default=1.0, help="Longest time a spooled point waits before its insert."
    )
    flush_max_points: int = _opt(
        _positive,
        default=100_000,
        help="Insert as soon as this many points wait (fewer, larger parts: less merging; BENCHMARKS §14).",
    )
    flush_max_bytes: int = _opt(
        _positive,
        default=16 << 20,
        help="Insert as soon as this many bytes of spooled points wait (one group's size; a request "
        "larger than it is a group alone). Bounds the writer's memory: docs/capacity.md.",
    )
    max_request_bytes: int = _opt(
        _positive, default=20 * 1024 * 1024, help="Largest OTLP request body, measured after decompression."
    )
    max_points_per_request: int = _opt(
        _positive,
        default=50_000,
        help="Most data points in one OTLP request (413 / RESOURCE_EXHAUSTED beyond): a request is inserted "
        "whole, so this bounds one insert's memory.",
    )
    max_request_spooled_bytes: int = _opt(
        _non_negative,
        default=0,
        help="Largest a request's points may take as spooled and inserted (resource, scope and metric "
        "are stored with every point, so a small body can take far more); beyond, 413 / RESOURCE_EXHAUSTED "
        "(0 = a twelfth of the engine's share of --memory-budget-bytes, 21 MiB at the default: an insert "
        "takes up to 40 MiB and 8 times its bytes).",
    )
    max_insert_attribute_keys: int = _opt(
        _non_negative,
        default=0,
        help="Most distinct attribute keys (per metric and hour) one insert may carry: a request with more "
        "is refused, 413 / RESOURCE_EXHAUSTED, and the writer's groups hold no more, summed over their "
        "requests (0 = one per 8 KiB of the engine's share of --memory-budget-bytes, 32,768 at the "
        "default: the attribute-cardinality views keep states per key).",
    )
    http_read_header_timeout_s: float = _opt(
        _non_negative,
        default=60.0,
        help="Both HTTP ports: seconds for a request line and its headers to arrive (408; 0 = off).",
    )
    http_read_timeout_s: float = _opt(
        _non_negative,
        default=60.0,
        help="Both HTTP ports: seconds for a request body to arrive after its headers (408; 0 = off).",
    )
    http_idle_timeout_s: float = _opt(
        _non_negative,
        default=60.0,
        help="Both HTTP ports: a connection that sends nothing for this long is closed (0 = off).",
    )
    http_max_header_bytes: int = _opt(
        _positive, default=64 * 1024, help="Both HTTP ports: largest request line and headers (431 beyond)."
    )
    http_max_requests_in_flight: int = _opt(
        _positive,
        default=64,
        help="Requests handled at once on each HTTP port; more are answered 503 with Retry-After.",
    )
    http_max_bytes_in_flight: int = _opt(
        _non_negative,
        default=0,
        help="OTLP/HTTP body bytes held at once (before decompression); beyond, 503 with Retry-After "
        "(0 = 2% of --memory-budget-bytes).",
    )
    http_max_connections: int = _opt(
        _non_negative,
        default=0,
        help="Open connections on each HTTP port; more are answered 503 and closed (0 = as many as 2% of "
        "--memory-budget-bytes holds at 16 KiB a connection: 1,310 at 1 GiB).",
    )
    http_max_connections_per_address: int = _opt(
        _positive,
        default=256,
        help="Open connections from one client address on each HTTP port; more are answered 503 and closed.",
    )
    http_min_body_rate_bytes_s: float = _opt(
        _non_negative,
        default=1024.0,
        help="Both HTTP ports: a body arriving slower than this (bytes/s, averaged from its headers on) "
        "after the grace period is answered 408 and closed (0 = off).",
    )
    http_min_body_rate_grace_s: float = _opt(
        _non_negative,
        default=5.0,
        help="Seconds a body may arrive at any rate before the minimum body rate applies.",
    )
    grpc_max_concurrent_rpcs: int = _opt(
        _positive,
        default=64,
        help="OTLP/gRPC calls whose request has arrived, handled or queued for a worker at once; more are "
        "answered RESOURCE_EXHAUSTED with RetryInfo.",
    )
    grpc_max_bytes_in_flight: int = _opt(
        _non_negative,
        default=0,
        help="OTLP/gRPC request bytes held by calls at once; beyond, UNAVAILABLE with RetryInfo "
        "(0 = 2% of --memory-budget-bytes).",
    )
    grpc_read_timeout_s: float = _opt(
        _non_negative,
        default=30.0,
        help="Seconds for an OTLP/gRPC call's request message to arrive after the call starts "
        "(DEADLINE_EXCEEDED; 0 = off).",
    )
    grpc_max_calls_per_address: int = _opt(
        _positive,
        default=64,
        help="OTLP/gRPC calls open at once from one client address, their messages arriving or handled; "
        "more are answered RESOURCE_EXHAUSTED with RetryInfo.",
    )
    grpc_max_streams_per_connection: int = _opt(
        _positive,
        default=100,
        help="Calls (HTTP/2 streams) open at once on one gRPC connection; more are reset (REFUSED_STREAM).",
    )
    grpc_max_connections: int = _opt(
        _non_negative,
        default=0,
        help="Open connections on the OTLP/gRPC port; at the bound the one idle longest (no call open, or "
        "no HTTP/2 preface yet) is closed to make room, and a new one is closed when every other has a call "
        "open (0 = as many as 2% of --memory-budget-bytes holds at 16 KiB a connection: 1,310 at 1 GiB).",
    )
    grpc_max_connections_per_address: int = _opt(
        _positive,
        default=256,
        help="Open connections on the OTLP/gRPC port from one client address; more are closed at once.",
    )
    grpc_keepalive_min_time_s: float = _opt(
        _positive,
        default=300.0,
        help="Clients pinging more often than this are sent GOAWAY (keepalive enforcement; gRPC's default).",
    )
    grpc_keepalive_permit_without_calls: bool = _opt(
        None, default=False, help="Allow client keepalive pings on a connection with no call open."
    )
    grpc_max_connection_idle_s: float = _opt(
        _non_negative,
        default=300.0,
        help="Close a gRPC connection with no call open for this long, one that never sent anything "
        "included (GOAWAY; 0 = never).",
    )
    grpc_max_connection_age_s: float = _opt(
        _non_negative,
        default=0.0,
        help="Close a gRPC connection after this long, letting its calls finish for 30 s (0 = never).",
    )
    spool_max_bytes: int = _opt(
        _positive,
        default=1 << 30,
        help="Spooled bytes not yet in ClickHouse before receivers answer retryable 503.",
    )
    spool_segment_bytes: int = _opt(_positive, default=64 << 20, help="Size of one spool segment file.")
    spool_fsync: bool = _opt(
        None,
        default=True,
        help="fsync each spool append before answering (off: faster, loses the last requests on power loss).",
    )
    spool_cache_bytes: int = _opt(
        _non_negative,
        default=0,
        help="Bytes of spooled requests also kept in memory for the writer; a larger backlog is read back "
        "from disk (0 = 4% of --memory-budget-bytes).",
    )
    dedup_window_s: float = _opt(
        _non_negative,
        default=900.0,
        help="An identical request re-sent within this many seconds counts once (0 = off).",
    )
    identity_max_streams: int = _opt(
        _non_negative,
        default=0,
        help="Streams whose latest point time the edge keeps for point identity (a table of 16-byte slots, "
        "at most 70% full: 23-46 bytes a stream); "
        "past it the oldest are forgotten and their points verified against ClickHouse (0 = as many as "
        "3% of --memory-budget-bytes holds).",
    )
    memory_budget_bytes: int = _opt(
        _positive,
        default=1 << 30,
        help="Memory the collector process may use: the embedded engine's limits and caches, request bytes "
        "in flight, the spool's cache and point identity are shares of it (README, Memory); "
        "at least 512 MiB.",
    )
    retry_max_backoff_s: float = _opt(
        _positive, default=5.0, help="Longest wait between two attempts of a failed insert."
    )
    poison_after_attempts: int = _opt(
        _positive,
        default=10,
        help="Failed attempts with a ClickHouse error code meterhouse does not know, on an otherwise "
        "healthy endpoint, after which a batch goes to the dead letters (a full or broken disk, memory, too "
        "many parts, timeouts and outages are retried for as long as it takes).",
    )
    health_check_interval_s: float = _opt(
        _positive, default=2.0, help="How often every ClickHouse endpoint is checked."
    )
    failover_after_failures: int = _opt(
        _positive, default=3, help="Consecutive failures of the active endpoint that move writes on."
    )
    failback_hold_s: float = _opt(
        _non_negative,
        default=30.0,
        help="How long a preferred endpoint must stay healthy before writes move back to it.",
    )
    raw_retention_days: int = _opt(
        _non_negative,
        default=0,
        help="Days raw points are kept (a ClickHouse TTL; 0 = forever). The hourly rollup is kept; "
        "1m steps are served within this retention only.",
    )
    max_past_s: float = _opt(
        _positive, default=2 * 366 * 86400.0, help="Points older than this (seconds before now) are rejected."
    )
    max_future_s: float = _opt(
        _positive, default=86400.0, help="Points newer than this (seconds after now) are rejected."
    )
    max_attributes: int = _opt(_positive, default=128, help="Most attributes on one point.")
    max_attribute_length: int = _opt(
        _positive, default=4096, help="Longest attribute key or value, in characters."
    )
    max_metric_name_length: int = _opt(
        _positive, default=1024, help="Longest metric name, in characters (control characters are refused)."
    )
    max_unit_length: int = _opt(
        _positive, default=255, help="Longest metric unit, in characters (control characters are refused)."
    )
    max_scope_length: int = _opt(
        _positive,
        default=1024,
        help="Longest instrumentation scope name or version, in characters (control characters are refused).",
    )
    max_description_length: int = _opt(
        _positive, default=4096, help="Longest metric description, in characters."
    )
    shutdown_timeout_s: float = _opt(
        _non_negative, default=10.0, help="Deadline for flushing on SIGTERM/SIGINT."
    )
    health_refresh_s: float = _opt(
        _positive, default=60.0, help="How often org-health gauges (active, silent, spiking) are recomputed."
    )
    silent_after_s: float = _opt(
        _positive,
        default=1800.0,
        help="An org that reported in the last 24 h but not for this long counts as silent.",
    )
    spike_factor: float = _opt(
        _positive,
        default=5.0,
        help="An org spikes when its last complete hour exceeds this many times its hourly baseline.",
    )
    spike_baseline_hours: int = _opt(
        _positive, default=24, help="Hours before the last complete one that make the spike baseline."
    )
    spike_min_usage: float = _opt(
        _non_negative, default=100.0, help="Usage in the last hour below this never counts as a spike."
    )
    traffic_hours: str = _opt(
        hours.check,
        default="",
        help="When senders are awake, e.g. 'Mon-Fri 08:00-18:00 Europe/Berlin' (windows joined by ';'): "
        "MeterhouseNoTraffic warns only then (meterhouse_traffic_expected). Empty: always.",
    )
    top_k: int = _opt(
        _non_negative,
        default=0,
        help="Export the K orgs with most points in 24 h as labelled series (0 = off; K bounds the series).",
    )
    late_window_days: int = _opt(
        _non_negative,
        default=35,
        help="Days after a month's end during which it stays open for late points; closing it sooner "
        "needs force.",
    )
    reconcile_interval_s: float = _opt(
        _positive, default=300.0, help="How often raw points are reconciled against the hourly rollup."
    )
    reconcile_months: int = _opt(
        _positive, default=3, help="Months reconciled continuously: the current one and those before it."
    )
    allow_unauthenticated: bool = _opt(
        None, default=False, help="Serve the API without tokens on a non-loopback --host (refused otherwise)."
    )
    auth_tokens: tuple[Token, ...] = field(
        default=(),
        metadata={
            "check": None,
            "flag": False,
            "help": "Bearer tokens and their org scopes (config file `auth.tokens`, or a YAML file "
            "`tokens: [...]` named by MH_AUTH_TOKENS_FILE; never a flag, so tokens stay out of `ps`).",
        },
    )
    allow_unauthenticated_ingest: bool = _opt(
        None,
        default=False,
        help="Serve OTLP without ingest tokens on a non-loopback --host (refused otherwise; API tokens "
        "alone are not enough).",
    )
    ingest_tokens: tuple[Token, ...] = field(
        default=(),
        metadata={
            "check": None,
            "flag": False,
            "help": "Bearer tokens that may send usage, and the orgs each may send for (config file "
            "`ingest.tokens`, or a YAML file `tokens: [...]` named by MH_INGEST_TOKENS_FILE; never a flag).",
        },
    )
    tls_cert_file: str = _opt(
        None,
        default="",
        help="PEM certificate chain served on all three listeners (config file `tls.cert_file`; "
        "empty = plain TCP). Reloaded on SIGHUP.",
    )
    tls_key_file: str = _opt(None, default="", help="PEM private key of tls_cert_file (`tls.key_file`).")
    tls_client_ca_file: str = _opt(
        None,
        default="",
        help="PEM CA bundle for client certificates (`tls.client_ca_file`): when set, mutual TLS is "
        "required on all three listeners.",
    )
    ingest_points_per_s: float = _opt(
        _non_negative,
        default=0.0,
        help="Data points per second each ingest token may send (`limits.ingest_points_per_s`; "
        "0 = unlimited); above it requests are answered retryable 429 / RESOURCE_EXHAUSTED.",
    )
    ingest_burst_points: int = _opt(
        _non_negative,
        default=0,
        help="Points a token may send at once above its rate (`limits.ingest_burst_points`; "
        "0 = one second's worth).",
    )
    series_per_org_metric: int = _opt(
        _non_negative,
        default=0,
        help="Attribute sets kept per org and metric (`limits.series_per_org_metric`; 0 = unlimited); "
        "new sets beyond it are folded into one series otel.metric.overflow=true.",
    )
    log_level: str = _opt(_choice("debug", "info", "warning", "error"), default="info", help="Log level.")
    log_format: str = _opt(
        _choice("auto", "json", "text"), default="auto", help="auto = JSON lines unless stderr is a terminal."
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise ConfigError(f"{f.name}: {problem} (got {getattr(self, f.name)!r})")
        self._check_endpoints()
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls.cert_file and tls.key_file: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls.client_ca_file: needs tls.cert_file and tls.key_file (mutual TLS is TLS)")

    def _check_endpoints(self) -> None:
        """Several endpoints are safe only as nodes of one replicated schema: with plain tables on each,
        points written during a failover would stay on the other server, and a retry there would count
        twice. ``embedded#name`` handles all open the one embedded database, so they may be listed."""
        urls = self.endpoints
        embedded = [u for u in urls if u == "embedded" or u.startswith("embedded#")]
        if self.cluster and embedded:
            raise ConfigError(
                f"cluster: the embedded engine cannot be a node of cluster {self.cluster!r}; "
                "name the cluster's ClickHouse servers in clickhouse_url"
            )
        if len(urls) > 1 and not self.cluster and len(embedded) != len(urls):
            raise ConfigError(
                "clickhouse_url: several endpoints are only safe as replicas of one replicated schema; "
                "pass --cluster NAME (their ClickHouse cluster), or name one endpoint "
                f"(got {len(urls)}: {redact_urls(', '.join(urls))})"
            )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def endpoints(self) -> list[str]:
        """The ClickHouse endpoints in priority order (``embedded`` when none is named)."""
        return [u.strip() for u in self.clickhouse_url.split(",") if u.strip()] or ["embedded"]

    @property
    def is_public_bind(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


def _coerce(name: str, typ: Any, raw: Any, source: str) -> Any:
    try:
        if typ in ("bool", bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in ("int", int):
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if typ in ("float", float):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ in ("Path", Path):
            return Path(str(raw))
        if not isinstance(raw, str | int | float):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(str(typ), "a string")
        raise ConfigError(f"{name}: must be {kind} (got {raw!r} from {source})") from None


@dataclass(frozen=True)
class Token:
    """A bearer token and the orgs it may read (API) or send for (ingest), ``*`` = all; API tokens
    may also be allowed to close months."""

    token: str
    orgs: tuple[str, ...]
    admin: bool = False

    @property
    def all_orgs(self) -> bool:
        return "*" in self.orgs

    def allows(self, org: str) -> bool:
        return self.all_orgs or org in self.orgs


def _tokens(raw: Any, source: str, section: str = "auth") -> tuple[Token, ...]:
    if not isinstance(raw, dict) or set(raw) - {"tokens"}:
        raise ConfigError(f"{section}: must be a mapping with the key tokens (from {source})")
    entries = raw.get("tokens") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{section}.tokens: must be a list (from {source})")
    out = []
    for i, e in enumerate(entries):
        where = f"{section}.tokens[{i}]"
        keys = {"token", "orgs", "admin"} if section == "auth" else {"token", "orgs"}
        if not isinstance(e, dict) or not {"token", "orgs"} <= set(e) <= keys:
            shape = (
                "{token: ..., orgs: [...], admin: false}"
                if section == "auth"
                else "{token: ..., orgs: [...]}"
            )
            raise ConfigError(f"{where}: must be {shape} (from {source})")
        if not isinstance(e.get("admin", False), bool):
            raise ConfigError(f"{where}.admin: must be true or false (from {source})")
        tok, orgs = e["token"], e["orgs"]
        if not isinstance(tok, str) or len(tok) < 16:
            raise ConfigError(f"{where}.token: must be a string of at least 16 characters (from {source})")
        if tok != tok.strip() or not all(" " <= ch <= "~" for ch in tok):
            # A presented token is stripped, and headers and gRPC metadata carry visible ASCII: such a
            # token could never be matched.
            raise ConfigError(
                f"{where}.token: must be visible ASCII (spaces inside only) to be sent in a header "
                f"(from {source})"
            )
        if not isinstance(orgs, list) or not orgs or not all(isinstance(o, str) and o for o in orgs):
            raise ConfigError(f"{where}.orgs: must be a non-empty list of org ids or '*' (from {source})")
        out.append(Token(tok, tuple(orgs), e.get("admin", False)))
    if len({t.token for t in out}) != len(out):
        raise ConfigError(f"{section}.tokens: a token appears twice (from {source})")
    return tuple(out)


def redact_urls(urls: str) -> str:
    """The endpoint list with any password replaced by ``***`` (for printing and logs)."""
    out = []
    for url in urls.split(","):
        parts = urlsplit(url.strip())
        if parts.password is not None:
            host = parts.hostname or ""
            netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
            url = urlunsplit(parts._replace(netloc=netloc))
        out.append(url.strip())
    return ",".join(out)


def _tokens_file(path: Path, source: str, section: str = "auth") -> tuple[Token, ...]:
    """Tokens from a YAML file of its own: ``tokens: [{token, orgs}]`` (or ``<section>: {tokens: ...}``)."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(
            f"{section} tokens file: cannot read {path} (named by {source}): {e.strerror}"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{section} tokens file: {path} (named by {source}) is not valid YAML: {_yaml_error(e)}"
        ) from None
    if isinstance(loaded, dict) and set(loaded) == {section}:
        loaded = loaded[section]
    tokens = _tokens(loaded, str(path), section)
    if not tokens:
        # Empty, or read in the middle of a rewrite: serving it would open the door to anyone.
        raise ConfigError(f"{section} tokens file: {path} (named by {source}) names no token")
    return tokens


def _yaml_error(e: yaml.YAMLError) -> str:
    """Where and what a YAML error is, without PyYAML's quote of the offending line (a file of
    settings may hold tokens and passwords, and this message is logged)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + (e.problem or e.context or "syntax error")
    return type(e).__name__


#: Nested mappings of the config file and the options their keys stand for (``tls: {cert_file: ...}``).
SECTIONS: dict[str, dict[str, str]] = {
    "tls": {"cert_file": "tls_cert_file", "key_file": "tls_key_file", "client_ca_file": "tls_client_ca_file"},
    "limits": {
        "ingest_points_per_s": "ingest_points_per_s",
        "ingest_burst_points": "ingest_burst_points",
        "series_per_org_metric": "series_per_org_metric",
    },
}


def _flatten_sections(loaded: dict[str, Any], source: str) -> dict[str, Any]:
    """``tls:`` and ``limits:`` mappings → their flat option names; an unknown key is named."""
    out = {k: v for k, v in loaded.items() if k not in SECTIONS}
    for section, keys in SECTIONS.items():
        raw = loaded.get(section)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ConfigError(f"{section}: must be a mapping of {', '.join(keys)} (from {source})")
        for key, value in raw.items():
            key = str(key).replace("-", "_")
            if key not in keys:
                raise ConfigError(
                    f"{section}.{key}: unknown option; known: {', '.join(keys)} (from {source})"
                )
            out[keys[key]] = value
    return out


def flag_of(option: str) -> str:
    """The command-line flag of an option: ``--otlp-grpc-port``."""
    return "--" + option.replace("_", "-")


def env_of(option: str) -> str:
    """The environment variable of an option: ``MH_OTLP_GRPC_PORT``."""
    return ENV_PREFIX + option.upper()


def option_names_of(option: str) -> str:
    """Where an operator sets an option, for messages: ``--otlp-grpc-port / MH_OTLP_GRPC_PORT``."""
    return f"{flag_of(option)} / {env_of(option)}"


def option_names() -> list[str]:
    """Options that are flags and environment variables (tokens come from files only)."""
    return [f.name for f in fields(Config) if f.metadata.get("flag", True)]


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Config:
    """Merge the sources (defaults < file < env < flags) into a validated :class:`Config`."""
    known = {f.name: f for f in fields(Config) if f.metadata.get("flag", True)}
    values: dict[str, Any] = {}

    def take(items: Mapping[str, Any], source: str) -> None:
        for key, raw in items.items():
            if key not in known:
                raise ConfigError(f"{key}: unknown option (from {source})")
            if raw is None:
                continue
            values[key] = _coerce(key, known[key].type, raw, source)

    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {_yaml_error(e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must hold a mapping of option: value")
        loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        if "auth" in loaded:
            values["auth_tokens"] = _tokens(loaded.pop("auth"), str(path))
        if "ingest" in loaded:
            values["ingest_tokens"] = _tokens(loaded.pop("ingest"), str(path), "ingest")
        take(_flatten_sections(loaded, str(path)), str(path))
    env = os.environ if env is None else env
    from_env = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in env.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() in known
    }
    take(from_env, "environment")
    tokens_file = env.get(ENV_PREFIX + "AUTH_TOKENS_FILE")
    if tokens_file:
        values["auth_tokens"] = _tokens_file(Path(tokens_file), ENV_PREFIX + "AUTH_TOKENS_FILE")
    ingest_tokens_file = env.get(ENV_PREFIX + "INGEST_TOKENS_FILE")
    if ingest_tokens_file:
        values["ingest_tokens"] = _tokens_file(
            Path(ingest_tokens_file), ENV_PREFIX + "INGEST_TOKENS_FILE", "ingest"
        )
    take(dict(flags or {}), "command line")
    return dataclasses.replace(Config(), **values) if values else Config()
