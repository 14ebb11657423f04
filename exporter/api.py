"""The per-org usage API (``/api/v1``): exact usage read from ClickHouse with bound parameters.

Every parameter is validated before a query runs; every value reaches ClickHouse as a bound parameter.
Errors are ``{"error": {"code", "message"}}`` with a 4xx (503 when ClickHouse cannot be reached).
"""

from __future__ import annotations

import difflib
import time
from types import SimpleNamespace
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from flask import Blueprint, Response, current_app, g, jsonify, request

from meterhouse.core import schema
from meterhouse.core.close import WaitCommitted
from meterhouse.core.timefmt import format_rfc3339, parse_rfc3339
from meterhouse.exporter import cursor
from meterhouse.exporter.auth import Auth, Unauthorized
from meterhouse.exporter.export import register_export
from meterhouse.exporter.months import register_months
from meterhouse.exporter.openapi import spec

NS = 10**9
HOUR_NS = 3600 * NS
STEP_NS = {"1m": 60 * NS, "1h": HOUR_NS, "1d": 24 * HOUR_NS}
MAX_BUCKETS = 110_000  # enough for 1d steps over every time the API accepts (1970-2262)
MAX_NS = 2**63 - 1
MAX_ID_LENGTH = 1024
MAX_LIMIT = 1000
ROLLUP, RAW = "rollup", "raw"
STATUSES = ("silent", "spiking")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_parameter", message)


def _number(vi: int, vd: float) -> int | float:
    """Exact integer usage stays an integer; double usage is a double."""
    return int(vi) if vd == 0 else float(vi) + float(vd)


def _text(name: str, required: bool = False) -> str | None:
    value = request.args.get(name)
    if value is None or value == "":
        if required:
            raise ApiError(400, "missing_parameter", f"query parameter {name!r} is required")
        return None
    if len(value) > MAX_ID_LENGTH:
        raise _bad(f"{name}: at most {MAX_ID_LENGTH} characters")
    return value


def _time(name: str, default_ns: int = 0, required: bool = False) -> int:
    raw = _text(name, required)
    if raw is None:
        return default_ns
    try:
        ns = parse_rfc3339(raw)
    except (ValueError, OverflowError) as e:
        raise _bad(f"{name}: {e}") from None
    return min(max(ns, 0), MAX_NS)  # nothing is stored outside 1970-2262: clamping changes no answer


def _range() -> tuple[int, int]:
    """[from, to) in ns; an empty or inverted range is simply empty."""
    now = time.time_ns()
    to_ns = _time("to", (now // HOUR_NS + 1) * HOUR_NS)
    from_ns = _time("from", max(0, to_ns - 24 * HOUR_NS))
    return from_ns, max(from_ns, to_ns)


def _choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = _text(name) or default
    if value not in allowed:
        raise _bad(f"{name}: must be one of {', '.join(allowed)}")
    return value


def _limit(default: int = 100) -> int:
    raw = _text("limit")
    if raw is None:
        return default
    # ASCII digits only: str.isdigit() is also true for '²', which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad(f"limit: must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _org_id(org_id: str) -> str:
    if not org_id or len(org_id) > MAX_ID_LENGTH:
        raise _bad(f"org id: 1 to {MAX_ID_LENGTH} characters")
    scope = g.get("scope")
    if scope is not None and not scope.allows(org_id):
        raise ApiError(403, "forbidden", "this token may not read that org")
    return org_id


def _query(store, sql: str, params: dict[str, Any]) -> list[tuple]:
    try:
        return store.rows(sql, params)
    except (ConnectionError, OSError, OperationalError) as e:
        raise ApiError(503, "unavailable", f"ClickHouse is not reachable: {str(e)[:200]}") from None


def _guarded(fn):
    """``fn()``, with ClickHouse unreachable answered 503 (as :func:`_query` does)."""
    try:
        return fn()
    except (ConnectionError, OSError, OperationalError) as e:
        raise ApiError(503, "unavailable", f"ClickHouse is not reachable: {str(e)[:200]}") from None


def _aligned(step: str, from_ns: int, to_ns: int) -> bool:
    """The rollup is exact for whole hours; any other range (or a 1m step) reads raw points."""
    return step != "1m" and from_ns % HOUR_NS == 0 and to_ns % HOUR_NS == 0


def _series(rows) -> tuple[list[dict], int, float, str]:
    points, total_i, total_d, unit = [], 0, 0.0, ""
    for start, vi, vd, _n, u in rows:
        points.append({"start": format_rfc3339(start), "value": _number(vi, vd)})
        total_i += int(vi)
        total_d += float(vd)
        unit = unit or u
    return points, total_i, total_d, unit


def _summable(store, metric: str) -> None:
    """404 for a metric the catalog does not know, naming the closest it does; 400 for one that has no
    sum points (a histogram, summary or gauge: /usage sums counters), saying where to read it."""
    kinds = {str(m): list(k) for m, k in _query(store, schema.metric_kinds_sql(store.database), {})}
    if metric not in kinds:
        if _query(store, schema.metric_in_rollup_sql(store.database), {"metric": metric}):
            return  # summed, and not in the catalog: never a 404 for a metric that has usage
        close = difflib.get_close_matches(metric, list(kinds), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; GET /api/v1/metrics-catalog lists them"
        raise ApiError(404, "unknown_metric", f"no metric {metric!r} has been received{hint}")
    if schema.KIND_SUM not in kinds[metric]:
        kind = ", ".join(sorted(kinds[metric]))
        raise ApiError(
            400, "not_a_sum",
            f"metric {metric!r} is a {kind}, not a sum: /usage adds up sums (counters). Read its points from "
            f"the {schema.DIST_TABLE if kind != schema.KIND_GAUGE else schema.POINTS_TABLE} table "
            "(README, SQL endpoint: meterhouse sql)",
        )  # fmt: skip


def org_usage(store, org_id: str, raw_retention_days: int = 0) -> dict[str, Any]:
    org_id = _org_id(org_id)
    metric = _text("metric", required=True)
    assert metric is not None  # required
    _summable(store, metric)
    step = _choice("step", tuple(STEP_NS), "1h")
    group_by = _text("group_by")
    from_ns, to_ns = _range()
    while (to_ns - from_ns) // STEP_NS[step] > MAX_BUCKETS:  # the step the range needs
        step = {"1m": "1h", "1h": "1d"}[step]
    # Raw points exist only within their retention: older ranges are read from the hourly rollup,
    # whole hours (the hours holding `from` and `to` count in full).
    beyond_retention = (
        bool(raw_retention_days) and from_ns < time.time_ns() - raw_retention_days * 24 * HOUR_NS
    )
    if beyond_retention and step == "1m":
        step = "1h"
    rollup = beyond_retention or _aligned(step, from_ns, to_ns)
    params = {"org": org_id, "metric": metric, "from_ns": from_ns, "to_ns": to_ns}
    body: dict[str, Any] = {
        "org_id": org_id, "metric": metric, "unit": "", "step": step,
        "from": format_rfc3339(from_ns), "to": format_rfc3339(to_ns),
        "source": ROLLUP if rollup else RAW,
    }  # fmt: skip
    if group_by is None:
        points, ti, td, unit = _series(
            _query(store, schema.usage_series_sql(store.database, step, rollup), params)
        )
        body.update(unit=unit, total=_number(ti, td), points=points)
        return body
    rows = _query(store, schema.usage_grouped_sql(store.database, step, rollup), {**params, "key": group_by})
    groups: dict[str, list] = {}
    for grp, *rest in rows:
        groups.setdefault(grp, []).append(tuple(rest))
    out, all_i, all_d, unit = [], 0, 0.0, ""
    for value, grp_rows in groups.items():
        points, ti, td, u = _series(grp_rows)
        out.append({"value": value, "total": _number(ti, td), "points": points})
        all_i, all_d, unit = all_i + ti, all_d + td, unit or u
    body.update(unit=unit, total=_number(all_i, all_d), group_by=group_by, groups=out, points=[])
    return body


#: The query a ranking cursor binds: each parameter as resolved (times in ns), and the token's scope.
_RANKING_CURSOR = {"metric": (str, type(None)), "from": int, "to": int, "order": str, "limit": int,
                   "scope": str, "status": type(None)}  # fmt: skip
_STATUS_CURSOR = {"status": str, "limit": int, "scope": str}


def _scope_digest() -> str:
    scope = g.get("scope")
    return cursor.scope_digest(None if scope is None or scope.all_orgs else tuple(scope.orgs))


def _cursor() -> cursor.Cursor | None:
    raw = request.args.get("cursor") or None  # its own bound (cursor.MAX_CHARS), not an id's
    if raw is None:
        return None
    try:
        return cursor.decode(raw)
    except cursor.BadCursor as e:
        raise ApiError(400, "invalid_cursor", f"cursor: {e}") from None


def _bound(c: cursor.Cursor, shape: dict[str, Any], key: tuple[Any, ...], given: dict[str, Any]) -> None:
    """``c`` continues the query ``given`` (the parameters sent beside it, resolved): 400 otherwise."""
    try:
        c.expect(shape, key)
    except cursor.BadCursor as e:
        raise ApiError(400, "invalid_cursor", f"cursor: {e}") from None
    if c.query["scope"] != _scope_digest():
        raise ApiError(400, "cursor_mismatch", "cursor: it was made for another token's orgs")
    for name, value in given.items():
        if c.query[name] != value:
            raise ApiError(
                400, "cursor_mismatch",
                f"cursor: it continues a query with another {name}; send it alone, or with the parameters "
                "of the page it came from",
            )  # fmt: skip


def _stale(what: str) -> ApiError:
    return ApiError(409, "cursor_stale", f"cursor: {what} since its first page; start again without it")


def org_ranking(store, c: cursor.Cursor | None) -> dict[str, Any]:
    """Orgs by total or by id, a page at a time (keyset: the cursor holds the last org's sort key)."""
    if c is None:
        metric = _text("metric")  # without one, orgs are ranked by their number of points
        order = _choice("order", schema.ORG_ORDERS, "desc")
        limit = _limit()
        from_ns, to_ns = _range()
    else:
        q = c.query
        order = q["order"] if q.get("order") in schema.ORG_ORDERS else ""
        key = (str,) if order == "org" else ((int, float), str)
        given: dict[str, Any] = {}
        if "metric" in request.args:
            given["metric"] = _text("metric")
        if "order" in request.args:
            given["order"] = _choice("order", schema.ORG_ORDERS, "desc")
        if "limit" in request.args:
            given["limit"] = _limit()
        for name in ("from", "to"):
            if name in request.args:
                given[name] = _time(name, 0)
        if "from" in given and "to" in given:
            given["to"] = max(given["from"], given["to"])
        _bound(c, _RANKING_CURSOR, key, given)
        metric, limit, from_ns, to_ns = q["metric"], q["limit"], q["from"], q["to"]
        if not (1 <= limit <= MAX_LIMIT and 0 <= from_ns <= to_ns <= MAX_NS and order):
            raise ApiError(400, "invalid_cursor", "cursor: not a cursor of this API (its query)")
    rollup = _aligned("1h", from_ns, to_ns)
    scope = g.get("scope")
    scoped = scope is not None and not scope.all_orgs
    # One row more than the page: whether another page follows, so that the last page has no cursor.
    params: dict[str, Any] = {"metric": metric or "", "from_ns": from_ns, "to_ns": to_ns, "limit": limit + 1}
    if scoped:
        params["orgs"] = list(scope.orgs)
    if c is not None:
        params["after_org"] = c.key[-1]
        if order != "org":
            params["after_total"] = float(c.key[0])
    sql = schema.org_page_sql(store.database, rollup, order, scoped, metric is not None, c is not None)
    rows = _query(store, sql, params)
    check = 0
    page: list[tuple[str, int, float, tuple[Any, ...]]]
    if order == "org":
        page = [(org, vi, vd, (org,)) for org, vi, vd in rows]
    else:
        check = int(rows[0][5]) if rows else 0
        if c is not None and check != c.check:
            raise _stale("the totals of this range have changed (usage arrived)")
        page = [(org, vi, vd, (float(t), org)) for org, vi, vd, t, past, _n in rows if past]
    more = len(page) > limit
    page = page[:limit]
    next_cursor = None
    if more:
        query = {"metric": metric, "from": from_ns, "to": to_ns, "order": order, "limit": limit,
                 "scope": _scope_digest(), "status": None}  # fmt: skip
        next_cursor = cursor.encode(cursor.Cursor(query, page[-1][3], check))
    return {
        "metric": metric or "", "from": format_rfc3339(from_ns), "to": format_rfc3339(to_ns),
        "source": ROLLUP if rollup else RAW, "order": order, "limit": limit,
        "orgs": [{"org_id": org, "total": _number(vi, vd)} for org, vi, vd, _key in page],
        "next_cursor": next_cursor,
    }  # fmt: skip


def org_status(health, status: str | None, c: cursor.Cursor | None) -> dict[str, Any]:
    """The silent or spiking orgs of the last org-health snapshot, a page at a time: a cursor holds the
    position after its page in that snapshot, and is stale once the snapshot is recomputed."""
    if health is None:
        raise ApiError(503, "unavailable", "org health is not computed by this process")
    snap = health.snapshot
    computed_ms = int(snap.computed_at * 1000) if snap.computed_at else 0
    if c is None:
        assert status is not None
        limit, start = _limit(MAX_LIMIT), 0
    else:
        given: dict[str, Any] = {} if status is None else {"status": status}
        if "limit" in request.args:
            given["limit"] = _limit(MAX_LIMIT)
        _bound(c, _STATUS_CURSOR, (int,), given)
        status, limit, start = c.query["status"], c.query["limit"], c.key[0]
        if status not in STATUSES or not 1 <= limit <= MAX_LIMIT or start < 0:
            raise ApiError(400, "invalid_cursor", "cursor: not a cursor of this API (its query)")
        if c.check != computed_ms:
            raise _stale("the org-health snapshot has been recomputed")
    entries = snap.silent if status == "silent" else snap.spiking
    scope = g.get("scope")
    if scope is not None and not scope.all_orgs:
        entries = [e for e in entries if scope.allows(e["org_id"])]
    end = start + limit
    next_cursor = None
    if end < len(entries):
        query = {"status": status, "limit": limit, "scope": _scope_digest()}
        next_cursor = cursor.encode(cursor.Cursor(query, (end,), computed_ms))
    return {
        "status": status,
        "computed_at": format_rfc3339(int(snap.computed_at * NS)) if snap.computed_at else None,
        "orgs": entries[start:end],
        "next_cursor": next_cursor,
    }


def metrics_catalog(store) -> dict[str, Any]:
    rows = _query(store, schema.catalog_sql(store.database), {})
    return {
        "metrics": [
            {
                "metric": m,
                "kind": k,
                "unit": u,
                "last_seen": format_rfc3339(int(ms) * 10**6),
                "points": int(n),
            }
            for m, k, u, ms, n in rows
        ]
    }


def _error_response(status: int, code: str, message: str) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def allowed_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """The query parameters of each route and method, from the OpenAPI description (one list, which the
    schemathesis test holds the routes to): ``{(flask rule, METHOD): names}``."""
    out: dict[tuple[str, str], frozenset[str]] = {("/api/v1/openapi.json", "GET"): frozenset()}
    for path, item in spec()["paths"].items():
        rule = path.replace("{org_id}", "<path:org_id>").replace("{month}", "<month>")
        for method, operation in item.items():
            names = frozenset(p["name"] for p in operation.get("parameters", ()) if p["in"] == "query")
            out[(rule, method.upper())] = names
    return out


def create_api(
    store,
    health=None,
    auth: Auth | None = None,
    raw_retention_days: int = 0,
    late_window_days: int = 35,
    close_wait: WaitCommitted | None = None,
) -> Blueprint:
    auth = auth or Auth(())
    api = Blueprint("api_v1", __name__, url_prefix="/api/v1")
    helpers = SimpleNamespace(
        ApiError=ApiError, query=_guarded, bad=_bad, org_id=_org_id, text=_text, time=_time, choice=_choice,
        summable=_summable, response=_error_response,
    )  # fmt: skip
    register_months(api, store, late_window_days, close_wait, helpers)
    register_export(api, store, helpers)
    allowed = allowed_parameters()

    @api.before_request
    def _authenticate():
        if request.endpoint == "api_v1.openapi":
            return None
        try:
            g.scope = auth.authenticate(request.headers.get("Authorization"))
        except Unauthorized as e:
            response = jsonify({"error": {"code": "unauthorized", "message": str(e)}})
            response.headers["WWW-Authenticate"] = 'Bearer realm="meterhouse"'
            return response, 401
        return None

    @api.before_request
    def _known_parameters():
        """Every parameter is one the route takes (its OpenAPI description), and given once: a misspelled
        or unsupported one was silently ignored, and answered as if it had not been sent."""
        rule = request.url_rule
        if rule is None or request.method == "OPTIONS":
            return None
        names = allowed.get((rule.rule, "GET" if request.method == "HEAD" else request.method), frozenset())
        for name in request.args:
            if name not in names:
                takes = ", ".join(sorted(names)) if names else "no query parameters"
                return _error_response(400, "unknown_parameter", f"unknown query parameter {name[:64]!r}: "
                                       f"this endpoint takes {takes}")  # fmt: skip
            if len(request.args.getlist(name)) > 1:
                return _error_response(400, "invalid_parameter", f"{name}: given more than once")
        return None

    @api.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return _error_response(e.status, e.code, e.message)

    @api.errorhandler(Exception)
    def _internal(e: Exception):
        status = getattr(e, "code", None)
        if isinstance(status, int) and 400 <= status < 500:  # werkzeug's own 404/405
            return jsonify({"error": {"code": "not_found" if status == 404 else "bad_request",
                                      "message": getattr(e, "description", str(e))}}), status  # fmt: skip
        current_app.logger.exception("api error")
        return jsonify({"error": {"code": "internal", "message": "internal error"}}), 500

    @api.get("/orgs/<path:org_id>/usage")
    def usage(org_id: str):
        return jsonify(org_usage(store, org_id, raw_retention_days))

    @api.get("/orgs")
    def orgs():
        c = _cursor()
        status = _choice("status", STATUSES, "") if _text("status") is not None else None
        if status is not None or (c is not None and c.query.get("status") is not None):
            ignored = [n for n in ("metric", "from", "to", "order") if n in request.args]
            if ignored:  # a ranking's parameters, which the health lists would not honour
                raise _bad(f"{', '.join(ignored)}: not with status (its lists take limit and cursor)")
            return jsonify(org_status(health, status, c))
        return jsonify(org_ranking(store, c))

    @api.get("/metrics-catalog")
    def catalog():
        return jsonify(metrics_catalog(store))

    @api.get("/openapi.json")
    def openapi():
        return jsonify(spec())

    return api
