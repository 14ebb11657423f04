"""The exporter plane: a bounded Prometheus target, org health, and the per-org usage API (Flask)."""

from meterhouse.exporter.app import create_app
from meterhouse.exporter.health import OrgHealth
from meterhouse.exporter.reconcile import Reconciler

__all__ = ["OrgHealth", "Reconciler", "create_app"]
