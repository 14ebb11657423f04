"""The Flask app: Prometheus target, health and readiness, and the usage API."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from werkzeug.exceptions import HTTPException

from meterhouse.core.close import WaitCommitted
from meterhouse.core.config import Token
from meterhouse.exporter.api import create_api
from meterhouse.exporter.auth import Auth


def create_app(
    store,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    health=None,
    tokens: tuple[Token, ...] = (),
    raw_retention_days: int = 0,
    late_window_days: int = 35,
    close_wait: WaitCommitted | None = None,
    alive: Callable[[], bool] = lambda: True,
) -> Flask:
    """``store`` answers queries (a Store or the failover set); ``ready`` tells whether receivers and
    writer run; ``health`` is the OrgHealth behind ``/api/v1/orgs?status=``. /metrics, /healthz and
    /readyz stay open; the API needs a token once ``tokens`` are configured. ``close_wait`` waits until
    every point acknowledged so far is committed (see ``meterhouse.core.close``), before a close's cutoff."""
    app = Flask("meterhouse")
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider's documented knob

    @app.get("/metrics")
    def metrics():
        accept = request.headers.get("Accept", "")
        if "application/openmetrics-text" in accept:
            return Response(
                openmetrics.generate_latest(registry), content_type=openmetrics.CONTENT_TYPE_LATEST
            )
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz():
        # Liveness: 503 once a part that nothing restarts in-process (the writer) has stopped, so that a
        # supervisor restarts the process instead of it answering every request 503 for ever.
        if not alive():
            return jsonify({"status": "dead"}), 503
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        checks = {"pipeline": bool(ready()), "store": store.ping()}
        status = 200 if all(checks.values()) else 503
        return jsonify({"status": "ready" if status == 200 else "not ready", "checks": checks}), status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.code or 0, "bad_request")
        return jsonify({"error": {"code": code, "message": e.description or e.name}}), e.code

    auth = Auth(tokens)
    app.extensions["meterhouse.auth"] = auth  # its tokens are replaced on reload (SIGHUP)
    app.register_blueprint(create_api(store, health, auth, raw_retention_days, late_window_days, close_wait))
    return app
