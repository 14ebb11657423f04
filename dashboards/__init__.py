"""Grafana dashboards as code (grafanalib): ``*.dashboard.py`` sources, generated JSON in ``json/``."""

from meterhouse.dashboards.build import build, load, render, sources

__all__ = ["build", "load", "render", "sources"]
