"""sentlink's configuration: one YAML file validated into frozen models.

``load_config`` raises ConfigError whose ``problems`` are ``FILE:LINE:COL: message`` lines.
"""

from __future__ import annotations

from sentlink.config.listen import MilterSocket, parse_listen
from sentlink.config.loader import default_config_path, load_config, load_config_text
from sentlink.config.models import (
    AccountConfig,
    Config,
    CrmConfig,
    LogConfig,
    MilterConfig,
    OutboundConfig,
    PrivateConfig,
    StoreConfig,
    WatchConfig,
)

__all__ = [
    "AccountConfig",
    "Config",
    "CrmConfig",
    "LogConfig",
    "MilterConfig",
    "MilterSocket",
    "OutboundConfig",
    "PrivateConfig",
    "StoreConfig",
    "WatchConfig",
    "default_config_path",
    "load_config",
    "load_config_text",
    "parse_listen",
]
