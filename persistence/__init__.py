"""persistence: chat sessions, ordered messages and file records behind one async API."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from persistence.errors import (
    ConfigError,
    InvalidDataError,
    MigrationError,
    PersistenceError,
    SchemaVersionError,
    SessionConflictError,
    SessionDeletedError,
    StorageConnectionError,
)
from persistence.frozen_metadata import thaw
from persistence.manager import SessionManager
from persistence.models import ChatMessage, ChatSession, UploadedFileRecord
from persistence.storage import SessionStorage, StorageCounts, UnitOfWork
from persistence.transfer import (
    backup_storage,
    export_to_json,
    import_from_json,
    migrate_storage,
    restore_backup,
    verify_migration,
)

if TYPE_CHECKING:
    from persistence.mongo.backend import MongoDBSessionStorage
    from persistence.sql.backend import PostgreSQLSessionStorage, SQLiteSessionStorage

logging.getLogger(__name__).addHandler(logging.NullHandler())

# The backends and their drivers (SQLAlchemy, asyncpg, PyMongo, Beanie) load on first
# use, so `import persistence` and `persistence --help` stay quick; the MongoDB
# drivers are besides the optional `mongodb` extra.
_BACKENDS = {
    "SQLiteSessionStorage": "persistence.sql.backend",
    "PostgreSQLSessionStorage": "persistence.sql.backend",
    "MongoDBSessionStorage": "persistence.mongo.backend",
}


def __getattr__(name: str) -> Any:
    module = _BACKENDS.get(name)
    if module is None:
        raise AttributeError(f"module 'persistence' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        # MongoDB's drivers are the optional `mongodb` extra.
        if name != "MongoDBSessionStorage" or (exc.name or "").startswith("persistence"):
            raise
        raise ConfigError(
            f"MongoDBSessionStorage needs beanie and pymongo ({exc.name or 'a module'}"
            " is missing): pip install 'persistence[mongodb]'"
        ) from None
    globals()[name] = value
    return value


__all__ = [
    "ChatMessage",
    "ChatSession",
    "ConfigError",
    "InvalidDataError",
    "MigrationError",
    "MongoDBSessionStorage",
    "PersistenceError",
    "PostgreSQLSessionStorage",
    "SQLiteSessionStorage",
    "SchemaVersionError",
    "SessionConflictError",
    "SessionDeletedError",
    "SessionManager",
    "SessionStorage",
    "StorageConnectionError",
    "StorageCounts",
    "UnitOfWork",
    "UploadedFileRecord",
    "backup_storage",
    "export_to_json",
    "import_from_json",
    "migrate_storage",
    "restore_backup",
    "thaw",
    "verify_migration",
]
