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
    text = {400: "Invalid parameter", 401: "Missing or invalid bearer token (when tokens are configured)",
            403: "The token may not read this org", 404: "No such path",
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
                        "order": {"type": "string", "enum": ["desc", "asc"]},
                        "limit": {"type": "integer"},
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
                        _param("limit", "How many orgs (1-1000).", {"type": "integer", "minimum": 1, "maximum": 1000}),
                        _param("order", "Largest first (desc) or smallest first.", {"type": "string", "enum": ["desc", "asc"]}),
                        _param("status", "The orgs behind meterhouse_orgs_silent / _spiking.", {"type": "string", "enum": ["silent", "spiking"]}),
                    ],
                    "responses": {
                        "200": {"description": "Orgs", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Orgs"}}}},
                        **_errors(400, 401, 503),
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
