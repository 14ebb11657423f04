"""The Flask app: Prometheus target, health and readiness, and the usage API."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from meterhouse.core.store import Store
from meterhouse.exporter.api import create_api


def create_app(store: Store, registry: CollectorRegistry, ready: Callable[[], bool]) -> Flask:
    """``ready`` tells whether receivers and writer are up; the store is pinged on each /readyz."""
    app = Flask("meterhouse")
    app.json.sort_keys = False

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
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        checks = {"pipeline": bool(ready()), "store": store.ping()}
        status = 200 if all(checks.values()) else 503
        return jsonify({"status": "ready" if status == 200 else "not ready", "checks": checks}), status

    app.register_blueprint(create_api(store))
    return app
