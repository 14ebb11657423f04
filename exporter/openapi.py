"""The OpenAPI 3 description of ``/api/v1``, served at ``/api/v1/openapi.json`` and kept true by a
schemathesis run against the Flask app in the test suite."""

from __future__ import annotations

from meterhouse import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_NUMBER = {"type": "number"}  # an exact JSON integer for integer usage, a double otherwise
_TIME = {"type": "string", "format": "date-time"}
_ID = {"type": "string", "minLength": 1, "maxLength": 1024}


def _param(name: str, description: str, schema: dict, required: bool = False, where: str = "query") -> dict:
    return {"name": name, "in": where, "required": required, "description": description, "schema": schema}


def _errors(*codes: int) -> dict:
    text = {400: "Invalid or unknown parameter, or a cursor of another query", 401: "Missing or invalid bearer token (when tokens are configured)",
            403: "The token may not read this org (or may not close months)", 404: "No such path or metric (the closest are named), or the month is not closed",
            409: "The month has not ended, or is inside the late window (force=true closes it); or a cursor is stale",
            429: "Too many exports streaming at once (Retry-After)",
            503: "ClickHouse is not reachable"}  # fmt: skip
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes
    }


_RANGE = [
    _param(
        "from",
        "Start of the half-open range [from, to), RFC 3339 (default: 24 h before to); an empty or inverted range is empty.",
        _TIME,
    ),
    _param("to", "End of the range, RFC 3339 (default: the end of the current hour).", _TIME),
]
_MONTH = _param(
    "month",
    "The month, YYYY-MM (UTC).",
    {"type": "string", "pattern": "^(19[7-9][0-9]|2[01][0-9][0-9]|22[0-5][0-9]|226[01])-(0[1-9]|1[0-2])$"},
    True,
    "path",
)
_PAGE = [
    _param(
        "limit", "Lines per page (1-1000, default 1000).", {"type": "integer", "minimum": 1, "maximum": 1000}
    ),
    _param(
        "offset",
        "Lines to skip (the previous page's next_offset).",
        {"type": "integer", "minimum": 0, "maximum": 10**12},
    ),
]
_EXACT = {"type": "string", "pattern": "^-?[0-9]+$"}  # an integer of any size, as text
_NS_TIME = {"type": "string", "format": "date-time"}
_CLOSE_PREVIEW = {
    "type": "object",
    "required": ["dry_run", "month", "status", "forced", "cutoff", "orgs", "lines", "lines_written", "points",
                 "total", "unconfirmed_collectors"],
    "properties": {
        "dry_run": {"type": "boolean", "enum": [True]},
        "month": {"type": "string"},
        "status": {"type": "string", "enum": ["new", "running", "done"]},
        "forced": {"type": "boolean"},
        "cutoff": _NS_TIME,
        "orgs": {"type": "integer"},
        "lines": {"type": "integer"},
        "lines_written": {"type": "integer"},
        "points": {"type": "integer"},
        "total": _NUMBER,
        "unconfirmed_collectors": {"type": "array", "items": {"type": "string"}},
    },
}  # fmt: skip
_CLOSE = {
    "type": "object",
    "required": [
        "month",
        "close_id",
        "status",
        "forced",
        "cutoff",
        "orgs",
        "lines",
        "points",
        "total",
        "rollup",
        "reconciled",
    ],
    "properties": {
        "month": {"type": "string"},
        "close_id": {"type": "string"},
        "status": {"type": "string", "enum": ["running", "done"]},
        "forced": {"type": "boolean"},
        "cutoff": _NS_TIME,
        "closed_at": {**_NS_TIME, "nullable": True},
        "orgs": {"type": "integer"},
        "lines": {"type": "integer"},
        "points": {"type": "integer"},
        "total": _NUMBER,
        "rollup": {
            "type": "object",
            "required": ["total", "points"],
            "properties": {"total": _NUMBER, "points": {"type": "integer"}},
        },
        "mismatched_lines": {"type": "integer"},
        "reconciled": {"type": "boolean"},
        "unconfirmed_collectors": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Collectors that had not confirmed, when the cutoff was taken, that every point "
            "they acknowledged before the close was asked for was committed (such points are adjustments).",
        },
        "verification": {
            "type": "object",
            "required": ["verified", "mismatches"],
            "properties": {
                "verified": {"type": "boolean"},
                "mismatches": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "org_id",
                            "metric",
                            "statement_points",
                            "raw_points",
                            "statement_total",
                            "raw_total",
                        ],
                        "properties": {
                            "org_id": {"type": "string"},
                            "metric": {"type": "string"},
                            "statement_points": {"type": "integer"},
                            "raw_points": {"type": "integer"},
                            "statement_total": _NUMBER,
                            "raw_total": _NUMBER,
                        },
                    },
                },
            },
        },
        "progress": {
            "type": "object",
            "properties": {
                "done": {"type": "integer"},
                "total": {"type": "integer"},
                "rate": {"type": "number"},
                "eta_s": {"type": "integer", "nullable": True},
            },
        },
    },
}
_STATEMENT = {
    "type": "object",
    "required": [
        "month",
        "org_id",
        "metric",
        "unit",
        "total",
        "points",
        "total_int",
        "total_double",
        "first_point",
        "last_point",
        "close_id",
        "closed_at",
        "forced",
        "checksum",
        "rollup_total",
        "rollup_points",
        "reconciled",
    ],
    "properties": {
        "month": {"type": "string"},
        "org_id": {"type": "string"},
        "metric": {"type": "string"},
        "unit": {"type": "string"},
        "total": _NUMBER,
        "points": {"type": "integer"},
        "total_int": _EXACT,
        "total_double": {"type": "number"},
        "first_point": _NS_TIME,
        "last_point": _NS_TIME,
        "close_id": {"type": "string"},
        "closed_at": _NS_TIME,
        "forced": {"type": "boolean"},
        "checksum": {"type": "string"},
        "rollup_total": _NUMBER,
        "rollup_points": {"type": "integer"},
        "reconciled": {"type": "boolean"},
    },
}
_ADJUSTMENT = {
    "type": "object",
    "required": [
        "month",
        "org_id",
        "metric",
        "unit",
        "amount",
        "points",
        "amount_int",
        "amount_double",
        "arrived_at",
        "batch_id",
    ],
    "properties": {
        "month": {"type": "string"},
        "org_id": {"type": "string"},
        "metric": {"type": "string"},
        "unit": {"type": "string"},
        "amount": _NUMBER,
        "points": {"type": "integer"},
        "amount_int": _EXACT,
        "amount_double": {"type": "number"},
        "arrived_at": _NS_TIME,
        "batch_id": {"type": "string"},
    },
}


def _page_of(key: str, item: dict, extra: dict) -> dict:
    return {
        "type": "object",
        "required": [key, "limit", "offset", "next_offset"],
        "properties": {
            **extra,
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next_offset": {"type": "integer", "nullable": True},
            key: {"type": "array", "items": item},
        },
    }


def _json_or_csv(name: str) -> dict:
    return {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
        "text/csv": {"schema": {"type": "string"}},
    }


_POINTS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["start", "value"],
        "properties": {"start": _TIME, "value": _NUMBER},
    },
}


def spec() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "meterhouse usage API",
            "version": __version__,
            "description": "Exact per-org usage from ClickHouse. With tokens configured every call needs "
            "`Authorization: Bearer <token>`; a token reads only the orgs in its scope.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "RollupRebuild": {
                    "type": "object",
                    "required": ["month", "tables", "drifting_orgs_before", "drifting_orgs_after", "seconds"],
                    "properties": {
                        "month": {"type": "string"},
                        "tables": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                            k: {"type": "integer"} for k in ("rows_before", "points_before", "rows_after", "points_after")}}},
                        "drifting_orgs_before": {"type": "integer"},
                        "drifting_orgs_after": {"type": "integer"},
                        "seconds": {"type": "number"},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
                "Usage": {
                    "type": "object",
                    "required": ["org_id", "metric", "unit", "step", "from", "to", "source", "total", "points"],
                    "properties": {
                        "org_id": {"type": "string"},
                        "metric": {"type": "string"},
                        "unit": {"type": "string"},
                        "step": {"type": "string", "enum": ["1m", "1h", "1d"]},
                        "from": _TIME,
                        "to": _TIME,
                        "source": {"type": "string", "enum": ["rollup", "raw"]},
                        "total": _NUMBER,
                        "points": _POINTS,
                        "group_by": {"type": "string"},
                        "groups": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["value", "total", "points"],
                                "properties": {"value": {"type": "string"}, "total": _NUMBER, "points": _POINTS},
                            },
                        },
                    },
                },
                "Orgs": {
                    "type": "object",
                    "required": ["orgs"],
                    "properties": {
                        "metric": {"type": "string"},
                        "from": _TIME,
                        "to": _TIME,
                        "source": {"type": "string", "enum": ["rollup", "raw"]},
                        "order": {"type": "string", "enum": ["desc", "asc", "org"]},
                        "limit": {"type": "integer"},
                        "next_cursor": {"type": "string", "nullable": True, "description": "The next page's cursor; null on the last page."},
                        "status": {"type": "string", "enum": ["silent", "spiking"]},
                        "computed_at": {"type": "string", "format": "date-time", "nullable": True},
                        "orgs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["org_id"],
                                "properties": {
                                    "org_id": {"type": "string"},
                                    "total": _NUMBER,
                                    "last_seen": _TIME,
                                    "metric": {"type": "string"},
                                    "last_hour_usage": _NUMBER,
                                    "baseline": _NUMBER,
                                    "ratio": _NUMBER,
                                    "hour": _TIME,
                                },
                            },
                        },
                    },
                },
                "Close": _CLOSE,
                "ClosePreview": _CLOSE_PREVIEW,
                "Statements": _page_of("statements", _STATEMENT, {"month": {"type": "string"}, "org_id": {"type": "string"}, "close": _CLOSE}),
                "Adjustments": _page_of("adjustments", _ADJUSTMENT, {"month": {"type": "string"}, "close": _CLOSE}),
                "Catalog": {
                    "type": "object",
                    "required": ["metrics"],
                    "properties": {
                        "metrics": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["metric", "kind", "unit", "last_seen", "points"],
                                "properties": {
                                    "metric": {"type": "string"},
                                    "kind": {"type": "string"},
                                    "unit": {"type": "string"},
                                    "last_seen": _TIME,
                                    "points": {"type": "integer"},
                                },
                            },
                        }
                    },
                },
            },
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/orgs/{org_id}/usage": {
                "get": {
                    "operationId": "orgUsage",
                    "summary": "Usage of one org and metric: total and one point per step with data.",
                    "parameters": [
                        _param("org_id", "The org (an unknown org has total 0).", _ID, True, "path"),
                        _param("metric", "Metric name.", _ID, True),
                        *_RANGE,
                        _param("step", "Bucket size (1m reads raw points); a range too long for it gets the next larger step.", {"type": "string", "enum": ["1m", "1h", "1d"]}),
                        _param("group_by", "Split by the value of this attribute key.", _ID),
                    ],
                    "responses": {
                        "200": {"description": "Usage", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Usage"}}}},
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/api/v1/orgs": {
                "get": {
                    "operationId": "orgs",
                    "summary": "Orgs ranked by usage of a metric, or (with status) the silent or spiking orgs.",
                    "parameters": [
                        _param("metric", "Metric to rank by; without it orgs are ranked by their number of points.", _ID),
                        *_RANGE,
                        _param("limit", "Orgs per page (1-1000; default 100, 1000 with status).", {"type": "integer", "minimum": 1, "maximum": 1000}),
                        _param("order", "Largest total first (desc, the default), smallest first (asc), or by org id (org): the order to read every org by while usage arrives (README, Reading usage: what holds for each order).", {"type": "string", "enum": ["desc", "asc", "org"]}),
                        _param("status", "The orgs behind meterhouse_orgs_silent / _spiking.", {"type": "string", "enum": ["silent", "spiking"]}),
                        _param("cursor", "The previous page's next_cursor: the next page of the same query. Alone, or with the same parameters (another value is a 400); 409 cursor_stale when a total ranking's totals, or the org-health snapshot, changed since the first page.", {"type": "string", "maxLength": 12288}),
                    ],
                    "responses": {
                        "200": {"description": "Orgs", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Orgs"}}}},
                        **_errors(400, 401, 409, 503),
                    },
                }
            },
            "/api/v1/usage/export": {
                "get": {
                    "operationId": "usageExport",
                    "summary": "Usage of every org (an org-scoped token: its orgs) over [from, to) per step, from the hourly rollup, streamed as CSV or NDJSON: one row per org, metric and step with usage, sorted by org, metric and start.",
                    "parameters": [
                        _param("from", "Start of the half-open range, RFC 3339, a whole hour (UTC); another time is a 400 (the rollup is exact for whole hours).", _TIME, True),
                        _param("to", "End of the range, RFC 3339, a whole hour (UTC); an empty or inverted range is empty.", _TIME, True),
                        _param("step", "1h, 1d (UTC days) or 1mo (calendar months, UTC); default 1h. A range that starts or ends inside a day or month has that step's usage inside the range only, at the step's start.", {"type": "string", "enum": ["1h", "1d", "1mo"]}),
                        _param("metric", "One metric (404 for one never received, 400 for one that is not a sum); every summed metric without it.", _ID),
                        _param("format", "csv (default; a header line, then org_id,metric,start,value,unit) or ndjson (one JSON object a line, with those fields).", {"type": "string", "enum": ["csv", "ndjson"]}),
                    ],
                    "responses": {
                        "200": {"description": "The rows, streamed (chunked); a transfer that ends without its last chunk failed mid-way", "content": {
                            "text/csv": {"schema": {"type": "string"}},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        }},
                        **_errors(400, 401, 404, 429, 503),
                    },
                }
            },
            "/api/v1/months/{month}/close": {
                "post": {
                    "operationId": "closeMonth",
                    "summary": "Close a month: one immutable statement line per org and metric from raw points, checked against the hourly rollup. Idempotent: a closed month answers its close. Needs an admin token when tokens are configured.",
                    "parameters": [_MONTH, _param("force", "Close inside the late window (recorded on the statement).", {"type": "string", "enum": ["true", "false"]}),
                                   _param("dry_run", "Write nothing: answer what the close writes (orgs, lines, totals as of the cutoff it would take, after the same wait for acknowledged points).", {"type": "string", "enum": ["true", "false"]})],
                    "responses": {
                        "200": {"description": "The close (with dry_run=true: a ClosePreview)", "content": {"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/Close"}, {"$ref": "#/components/schemas/ClosePreview"}]}}}},
                        **_errors(400, 401, 403, 404, 409, 503),
                    },
                },
                "get": {
                    "operationId": "monthClose",
                    "summary": "The close of a month (running, with progress, or done). Org-scoped tokens see the totals of their orgs' lines. With verify=true, a finished close's lines are checked against the raw points they were computed from.",
                    "parameters": [_MONTH, _param("verify", "Check the statement lines against their raw points (verification).", {"type": "string", "enum": ["true", "false"]})],
                    "responses": {
                        "200": {"description": "The close", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Close"}}}},
                        **_errors(400, 401, 404, 503),
                    },
                },
            },
            "/api/v1/months/{month}/rollup/rebuild": {
                "post": {
                    "operationId": "rebuildMonthRollup",
                    "summary": "Compute the month's hourly rollups again from raw points and put them in place of the month's partition in one step, the collector's writer waiting meanwhile: the remedy of reconciliation drift (meterhouse rollup rebuild). Needs an admin token when tokens are configured.",
                    "parameters": [_MONTH],
                    "responses": {
                        "200": {"description": "Drifting orgs before and after, and each rollup's rows and points before and after", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RollupRebuild"}}}},
                        **_errors(400, 401, 403, 409, 503),
                    },
                }
            },
            "/api/v1/months/{month}/statements": {
                "get": {
                    "operationId": "monthStatements",
                    "summary": "A closed month's statement lines, by org and metric (CSV with Accept: text/csv; org-scoped tokens see their orgs).",
                    "parameters": [_MONTH, *_PAGE],
                    "responses": {
                        "200": {"description": "Statement lines", "content": _json_or_csv("Statements")},
                        **_errors(400, 401, 404, 503),
                    },
                }
            },
            "/api/v1/months/{month}/adjustments": {
                "get": {
                    "operationId": "monthAdjustments",
                    "summary": "Points of a closed month that arrived after its close, per org, metric and arriving batch; never in the statement.",
                    "parameters": [_MONTH, *_PAGE],
                    "responses": {
                        "200": {"description": "Adjustments", "content": _json_or_csv("Adjustments")},
                        **_errors(400, 401, 404, 503),
                    },
                }
            },
            "/api/v1/orgs/{org_id}/statements": {
                "get": {
                    "operationId": "orgStatements",
                    "summary": "One org's statement lines over every closed month, newest first.",
                    "parameters": [_param("org_id", "The org.", _ID, True, "path"), *_PAGE],
                    "responses": {
                        "200": {"description": "Statement lines", "content": _json_or_csv("Statements")},
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/api/v1/metrics-catalog": {
                "get": {
                    "operationId": "metricsCatalog",
                    "summary": "The metrics that exist, with kind, unit, last seen and point count.",
                    "responses": {
                        "200": {"description": "Catalog", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Catalog"}}}},
                        **_errors(401, 503),
                    },
                }
            },
        },
    }  # fmt: skip
