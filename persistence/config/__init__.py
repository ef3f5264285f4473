"""Configuration: which store to use (settings), where values come from (sources),
how passwords stay hidden (masking), and building the store (factory)."""

from __future__ import annotations

from persistence.config.factory import create_storage, sql_url
from persistence.config.loading import load_config
from persistence.config.masking import mask_secrets, mask_url
from persistence.config.settings import (
    MongoDBOptions,
    PostgreSQLOptions,
    SQLiteOptions,
    StorageConfig,
    config_from_url,
)
from persistence.config.sources import CONFIG_FILE_VARIABLE, DISCOVERED_FILES, config_file_path

__all__ = [
    "CONFIG_FILE_VARIABLE",
    "DISCOVERED_FILES",
    "MongoDBOptions",
    "PostgreSQLOptions",
    "SQLiteOptions",
    "StorageConfig",
    "config_file_path",
    "config_from_url",
    "create_storage",
    "load_config",
    "mask_secrets",
    "mask_url",
    "sql_url",
]
