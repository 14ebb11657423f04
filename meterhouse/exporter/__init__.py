"""The exporter plane: a bounded Prometheus target and the per-org usage API (Flask)."""

from meterhouse.exporter.app import create_app

__all__ = ["create_app"]
