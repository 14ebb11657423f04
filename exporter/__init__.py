"""The exporter plane: a bounded Prometheus target, org health, and the per-org usage API (Flask)."""

from meterhouse.exporter.app import create_app
from meterhouse.exporter.health import OrgHealth

__all__ = ["OrgHealth", "create_app"]
