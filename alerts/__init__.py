"""Prometheus alert and recording rules, with promtool unit tests and runbooks."""

__all__: list[str] = []
