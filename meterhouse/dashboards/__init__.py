"""Grafana dashboards as code (grafanalib); generated JSON is committed beside the sources."""

__all__: list[str] = []
