"""persistence: chat sessions, ordered messages and file records behind one async API."""

from __future__ import annotations

import logging

from persistence.errors import (
    ConfigError,
    InvalidDataError,
    MigrationError,
    PersistenceError,
    SchemaVersionError,
    StorageConnectionError,
)
from persistence.manager import SessionManager
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.sql.backend import PostgreSQLSessionStorage, SQLiteSessionStorage
from persistence.storage import SessionStorage, StorageCounts, UnitOfWork

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ChatMessage",
    "ChatSession",
    "ConfigError",
    "InvalidDataError",
    "MigrationError",
    "PersistenceError",
    "PostgreSQLSessionStorage",
    "SQLiteSessionStorage",
    "SchemaVersionError",
    "SessionManager",
    "SessionStorage",
    "StorageConnectionError",
    "StorageCounts",
    "UnitOfWork",
    "UploadedFileRecord",
]
