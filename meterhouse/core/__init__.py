"""The small core every plane shares: configuration, the ClickHouse schema and client, metric names."""

from meterhouse.core.config import Config, ConfigError, load_config
from meterhouse.core.metrics import PipelineMetrics
from meterhouse.core.store import Store, open_store

__all__ = ["Config", "ConfigError", "PipelineMetrics", "Store", "load_config", "open_store"]
