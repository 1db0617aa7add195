"""Configuration: one typed object, loaded once by the CLI and handed down."""

from pycrio.config.loader import ConfigError, LoadedConfig, Override, dropin_files, load_config
from pycrio.config.schema import (
    LOG_LEVELS,
    MAX_SAMPLING_RATE,
    APIConfig,
    Config,
    ImageConfig,
    MetricsConfig,
    TracingConfig,
)
from pycrio.config.writer import render_toml

__all__ = [
    "APIConfig",
    "Config",
    "ConfigError",
    "ImageConfig",
    "LOG_LEVELS",
    "LoadedConfig",
    "MAX_SAMPLING_RATE",
    "MetricsConfig",
    "Override",
    "TracingConfig",
    "dropin_files",
    "load_config",
    "render_toml",
]
