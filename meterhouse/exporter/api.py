"""The per-org usage API (``/api/v1``): exact usage read from ClickHouse with bound parameters."""

from __future__ import annotations

import time
from typing import Any

from clickhouse_connect.driver.exceptions import OperationalError
from flask import Blueprint, current_app, jsonify, request

from meterhouse.core import schema
from meterhouse.core.store import Store
from meterhouse.core.timefmt import format_rfc3339, parse_rfc3339

NS = 10**9
HOUR_NS = 3600 * NS
STEP_NS = {"1m": 60 * NS, "1h": HOUR_NS, "1d": 24 * HOUR_NS}
MAX_BUCKETS = 100_000
MAX_ID_LENGTH = 1024
ROLLUP, RAW = "rollup", "raw"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _number(vi: int, vd: float) -> int | float:
    """Exact integer usage stays an integer; double usage is a double."""
    return int(vi) if vd == 0 else float(vi) + float(vd)


def _param(name: str, default: str | None = None) -> str:
    value = request.args.get(name, default)
    if value is None or value == "":
        raise ApiError(400, "missing_parameter", f"query parameter {name!r} is required")
    return value


def _time_param(name: str, default_ns: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default_ns
    try:
        return parse_rfc3339(raw)
    except ValueError as e:
        raise ApiError(400, "invalid_parameter", f"{name}: {e}") from None


def _query(store: Store, sql: str, params: dict[str, Any]) -> list[tuple]:
    try:
        return store.rows(sql, params)
    except (ConnectionError, OSError, OperationalError) as e:
        raise ApiError(503, "unavailable", f"ClickHouse is not reachable: {str(e)[:200]}") from None


def org_usage(store: Store, org_id: str) -> dict[str, Any]:
    metric = _param("metric")
    step = request.args.get("step") or "1h"
    if step not in STEP_NS:
        raise ApiError(400, "invalid_parameter", f"step: must be one of {', '.join(STEP_NS)}")
    if len(org_id) > MAX_ID_LENGTH or len(metric) > MAX_ID_LENGTH:
        raise ApiError(400, "invalid_parameter", f"org id and metric are at most {MAX_ID_LENGTH} characters")
    now = time.time_ns()
    to_ns = _time_param("to", (now // HOUR_NS + 1) * HOUR_NS)
    from_ns = _time_param("from", to_ns - 24 * HOUR_NS)
    if from_ns >= to_ns:
        raise ApiError(400, "invalid_parameter", "from must be earlier than to")
    if (to_ns - from_ns) // STEP_NS[step] > MAX_BUCKETS:
        raise ApiError(
            400,
            "invalid_parameter",
            f"range holds more than {MAX_BUCKETS} steps of {step}; use a larger step",
        )
    # The rollup is exact for whole hours; any other range reads raw points.
    rollup = step != "1m" and from_ns % HOUR_NS == 0 and to_ns % HOUR_NS == 0
    rows = _query(
        store,
        schema.usage_series_sql(store.database, step, rollup),
        {"org": org_id, "metric": metric, "from_ns": from_ns, "to_ns": to_ns},
    )
    points, total_i, total_d, unit = [], 0, 0.0, ""
    for start, vi, vd, _n, u in rows:
        points.append({"start": format_rfc3339(start), "value": _number(vi, vd)})
        total_i += int(vi)
        total_d += float(vd)
        unit = unit or u
    return {
        "org_id": org_id,
        "metric": metric,
        "unit": unit,
        "step": step,
        "from": format_rfc3339(from_ns),
        "to": format_rfc3339(to_ns),
        "source": ROLLUP if rollup else RAW,
        "total": _number(total_i, total_d),
        "points": points,
    }


def create_api(store: Store) -> Blueprint:
    api = Blueprint("api_v1", __name__, url_prefix="/api/v1")

    @api.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return jsonify({"error": {"code": e.code, "message": e.message}}), e.status

    @api.get("/orgs/<path:org_id>/usage")
    def usage(org_id: str):
        return jsonify(org_usage(store, org_id))

    @api.errorhandler(Exception)
    def _internal(e: Exception):
        current_app.logger.exception("api error")
        return jsonify({"error": {"code": "internal", "message": "internal error"}}), 500

    return api
