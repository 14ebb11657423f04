"""meterhouse: exact per-organization usage from OTLP into ClickHouse, with bounded Prometheus metrics."""

__all__ = ["__version__"]

__version__ = "0.1.0"
